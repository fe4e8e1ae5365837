"""Strategy options that change how a step runs, not what it computes, give the same numbers.

On 2 gloo ranks in fp32: strategy=zero3_offload against strategy=zero3, and FSDP with
model.gradient_checkpointing=true or strategy.reshard_after_forward=false against default FSDP.
Measured: losses and eval losses are bitwise equal, grad norms equal to 1e-7 relative
(DeepSpeed's offloaded norm is summed in another order); the asserts allow 1e-6 and 1e-5.

Equal numbers would also come from an option that is silently ignored, so each run records
what it did. Run as a script under torchrun, this file trains through ftdist's CLI with probes:
the number of training forwards of the first decoder block's MLP (gradient checkpointing
recomputes it in backward: twice per micro-batch), whether that block's parameters are sharded again when
the next block starts (reshard_after_forward), and what DeepSpeed's ZeRO-3 optimizer offloads.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import FAST, REPO, assert_same_final_weights, read_metrics, run_env

STEPS = 5
COMMON = [*FAST, f"train.max_steps={STEPS}", "train.micro_batch_size=2", "train.eval_every_steps=3"]
RUNS = {  # name: (overrides, the run it must equal)
    "fsdp": (["strategy=fsdp"], None),
    "fsdp_checkpointing": (["strategy=fsdp", "model.gradient_checkpointing=true"], "fsdp"),
    "fsdp_no_reshard": (["strategy=fsdp", "strategy.reshard_after_forward=false"], "fsdp"),
    "zero3": (["strategy=zero3"], None),
    "zero3_offload": (["strategy=zero3_offload"], "zero3"),
}


# --- the probes (inside each rank) --------------------------------------------------------------


def _blocks(model):
    """The first decoder block, its MLP, and the second block."""
    modules = dict(model.named_modules())
    first = next(n for n in modules if n.endswith("layers.0"))
    return modules[first], modules[f"{first}.mlp"], modules[first[: -len("0")] + "1"]


def install_probes(trainer) -> dict:
    from torch.distributed.tensor import DTensor

    model = trainer.strategy.unwrap(trainer.model)
    first, mlp, second = _blocks(model)
    seen = {"train_forwards_block0": 0, "block0_sharded_at_block1": []}

    def count(module, args):
        if module.training:
            seen["train_forwards_block0"] += 1

    def sharded(module, args):
        if module.training:
            seen["block0_sharded_at_block1"].append(all(isinstance(p, DTensor) for p in first.parameters()))

    # transformers checkpoints a block's forward, not its __call__, so hooks on the block itself
    # stay outside the recompute: count its MLP, which the recompute calls again.
    mlp.register_forward_pre_hook(count)
    second.register_forward_pre_hook(sharded)
    optimizer = getattr(trainer.model, "optimizer", None)  # DeepSpeed's ZeRO optimizer
    for flag in ("offload_optimizer", "offload_param"):
        seen[flag] = getattr(optimizer, flag, None)
    return seen


def cli_with_probes() -> None:
    """`python -m ftdist.train` as users run it; each rank writes probes.rank{r}.json at the end."""
    import ftdist.train as entry
    from ftdist.trainer import Trainer

    fit = Trainer.fit

    def probed_fit(self, resume_from=None):
        seen = install_probes(self)
        summary = fit(self, resume_from)
        (self.run_dir / f"probes.rank{self.strategy.rank}.json").write_text(json.dumps(seen))
        return summary

    Trainer.fit = probed_fit
    entry.cli()


# --- the tests ----------------------------------------------------------------------------------


def run_probed(name: str, root: Path) -> Path:
    out = root / name
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    path = os.pathsep.join(p for p in (str(REPO), str(REPO / "tests"), os.environ.get("PYTHONPATH")) if p)
    proc = subprocess.run(
        [*launcher, __file__, *COMMON, *RUNS[name][0], f"output_dir={out}"],
        check=False, cwd=REPO, env={**run_env(), "PYTHONPATH": path}, capture_output=True, text=True, timeout=600,
    )
    if proc.returncode != 0:
        raise AssertionError(f"{name} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("strategy_variants")
    return {name: run_probed(name, root) for name in RUNS if "zero" not in name or _has_deepspeed()}


def _has_deepspeed() -> bool:
    try:
        import deepspeed  # noqa: F401
    except ImportError:
        return False
    return True


def probes(run: Path) -> list[dict]:
    return [json.loads((run / f"probes.rank{r}.json").read_text()) for r in range(2)]


@pytest.mark.parametrize("name", [n for n, (_, ref) in RUNS.items() if ref])
def test_variant_matches_its_reference(runs, name):
    if name not in runs:
        pytest.skip("DeepSpeed is not installed")
    reference = RUNS[name][1]
    (ref, ref_eval), (got, got_eval) = read_metrics(runs[reference]), read_metrics(runs[name])
    assert [r["step"] for r in got] == [r["step"] for r in ref] == list(range(1, STEPS + 1))
    for a, b in zip(ref, got, strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-6, abs=0), (a, b)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-5), (a, b)
        assert b["tokens"] == a["tokens"] and b["label_tokens"] == a["label_tokens"]
    assert [r["step"] for r in got_eval] == [r["step"] for r in ref_eval] == [0, 3, STEPS]
    for a, b in zip(ref_eval, got_eval, strict=True):
        assert b["eval_loss"] == pytest.approx(a["eval_loss"], rel=1e-6, abs=0)
    assert_same_final_weights(runs[reference], runs[name], rtol=1e-6, atol=1e-6)


def test_gradient_checkpointing_recomputes_each_block_in_backward(runs):
    # One micro-batch per step and rank: each block runs forward once per step, and once more
    # in backward when checkpointed.
    assert [p["train_forwards_block0"] for p in probes(runs["fsdp"])] == [STEPS, STEPS]
    assert [p["train_forwards_block0"] for p in probes(runs["fsdp_checkpointing"])] == [2 * STEPS, 2 * STEPS]


def test_reshard_after_forward_false_keeps_blocks_gathered(runs):
    default, kept = probes(runs["fsdp"]), probes(runs["fsdp_no_reshard"])
    # Counted in the first forward of each step (checkpointing is off in both runs).
    assert all(p["block0_sharded_at_block1"] == [True] * STEPS for p in default)
    assert all(p["block0_sharded_at_block1"] == [False] * STEPS for p in kept)


def test_zero3_offload_offloads_optimizer_and_parameters(runs):
    if "zero3" not in runs:
        pytest.skip("DeepSpeed is not installed")
    for p in probes(runs["zero3_offload"]):
        assert (p["offload_optimizer"], p["offload_param"]) == (True, True)
    for p in probes(runs["zero3"]):
        assert (p["offload_optimizer"], p["offload_param"]) == (False, False)


if __name__ == "__main__":  # under torchrun: see run_probed
    cli_with_probes()
