"""Strategy options that change how a step runs, not what it computes, give the same numbers.

On 2 gloo ranks in fp32, 60 steps of memorize_task (the runs test_exact_match also checks):
strategy=zero3_offload against strategy=zero3, and FSDP with model.gradient_checkpointing=true or
strategy.reshard_after_forward=false against default FSDP.

Measured: the FSDP variants' losses, grad norms, eval losses and weights equal default FSDP's
bitwise. zero3_offload's grad norm differs from zero3's by ~1e-8 relative from step 1 (DeepSpeed
sums the offloaded norm in another order), so the clipped updates differ by rounding, and 60
steps of lr 3e-3 amplify that: losses within 1.1e-6 relative over steps 1-20, then up to 3e-4 as
the model memorizes; weights within 6e-5; eval loss 6e-6; the same generated texts. Tolerances
below leave about 10x headroom over those.

Equal numbers would also come from an option that is silently ignored, so each run's probes
(see memorize_task) show that the option took effect.
"""

from __future__ import annotations

import json

import pytest
from helpers import assert_same_final_weights, read_metrics
from memorize_task import STEPS, probes, task_run

EARLY = 20  # steps before rounding differences grow
# name: (reference, relative tolerance of the losses up to step EARLY, of later ones, and of the
# eval losses, absolute tolerance of the final weights)
VARIANTS = {
    "fsdp_checkpointing": ("fsdp", 1e-6, 1e-6, 1e-6, 1e-6),
    "fsdp_no_reshard": ("fsdp", 1e-6, 1e-6, 1e-6, 1e-6),
    "zero3_offload": ("zero3", 1e-5, 3e-3, 1e-4, 5e-4),
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return lambda name: task_run(name, tmp_path_factory)[0]


def generated(run_dir) -> list[str]:
    lines = (run_dir / "eval" / f"generations_step_{STEPS:08d}.jsonl").read_text().splitlines()
    return [json.loads(line)["response"] for line in lines]


@pytest.mark.parametrize("name", list(VARIANTS))
def test_variant_matches_its_reference(runs, name):
    reference, early, late, eval_rel, weights_abs = VARIANTS[name]
    reference, variant = runs(reference), runs(name)
    (ref, ref_eval), (got, got_eval) = read_metrics(reference), read_metrics(variant)
    assert [r["step"] for r in got] == [r["step"] for r in ref] == list(range(1, STEPS + 1))
    for a, b in zip(ref, got, strict=True):
        rel = early if a["step"] <= EARLY else late
        assert b["loss"] == pytest.approx(a["loss"], rel=rel, abs=0), (a, b)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=10 * rel), (a, b)
        assert b["tokens"] == a["tokens"] and b["label_tokens"] == a["label_tokens"]
    assert [r["step"] for r in got_eval] == [r["step"] for r in ref_eval] == [0, STEPS]
    for a, b in zip(ref_eval, got_eval, strict=True):
        assert b["eval_loss"] == pytest.approx(a["eval_loss"], rel=eval_rel, abs=0)
        assert b["exact_match"] == a["exact_match"]
    assert generated(variant) == generated(reference)
    assert_same_final_weights(reference, variant, rtol=0, atol=weights_abs)


def test_gradient_checkpointing_recomputes_each_block_in_backward(runs):
    # One micro-batch per step and rank: each block runs forward once per step, and once more
    # in backward when checkpointed.
    assert [p["train_forwards_block0_mlp"] for p in probes(runs("fsdp"))] == [STEPS, STEPS]
    assert [p["train_forwards_block0_mlp"] for p in probes(runs("fsdp_checkpointing"))] == [2 * STEPS, 2 * STEPS]


def test_reshard_after_forward_false_keeps_blocks_gathered(runs):
    # Seen at the first forward of each step (without checkpointing there is no other).
    assert all(p["block0_sharded_at_block1"] == [True] * STEPS for p in probes(runs("fsdp")))
    assert all(p["block0_sharded_at_block1"] == [False] * STEPS for p in probes(runs("fsdp_no_reshard")))


def test_zero3_offload_offloads_optimizer_and_parameters(runs):
    for p in probes(runs("zero3_offload")):
        assert (p["offload_optimizer"], p["offload_param"]) == (True, True)
    for p in probes(runs("zero3")):
        assert (p["offload_optimizer"], p["offload_param"]) == (False, False)
