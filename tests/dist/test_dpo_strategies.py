"""Preference objectives on every strategy, 2 gloo ranks against one process.

Each 2-rank run sees the same global batches as a one-process run with accumulation (2 ranks x
micro 2 = 1 x micro 2 x accum 2), so its losses and reward metrics must equal that run's, step by
step. Every run also shows DPO's step-0 invariant: policy and reference are the same model, so
the held-out loss at step 0 and the train loss of step 1 are ln 2 and every reward is 0.
ZeRO-1 and ZeRO-2 share prepare_frozen's replicated path (zero2 runs here); adapters as the
reference under 2 ranks: tests/dist/test_dpo_self_instruct.py (fsdp + qlora).
"""

from __future__ import annotations

import math

import pytest
from helpers import read_metrics, run_train, train_beside

STEPS = 3
BASE = [
    "model=tiny", "data=preference", "data.path=synthetic:json_preference", "data.num_synthetic_rows=120",
    "data.max_seq_len=96", "data.val_fraction=0.1", "strategy=single", f"train.max_steps={STEPS}", "train.lr=1e-3",
    "train.warmup_steps=0", "train.eval_batch_size=8", "train.progress_bar=false", "train.save_final=false",
    "train.eval_every_steps=null",
]
ONE = ["train.micro_batch_size=2", "train.grad_accum_steps=2"]
TWO = ["train.micro_batch_size=2", "train.grad_accum_steps=1"]
METRICS = ("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
           "logps/rejected", "logps/chosen_preferred")

# name: (overrides, ranks, the one-process run it must equal)
RUNS = {
    "single": (["objective=dpo", *ONE], None, None),
    "single_packed": (["objective=dpo", "data.packing=true", *ONE], None, None),
    "ddp": (["objective=dpo", "strategy=ddp", *TWO], 2, "single"),
    "fsdp_packed": (["objective=dpo", "strategy=fsdp", "data.packing=true", *TWO], 2, "single_packed"),
    "zero3": (["objective=dpo", "strategy=zero3", *TWO], 2, "single"),
    "zero2_precomputed": (["objective=dpo", "strategy=zero2", "objective.reference=precomputed", *TWO], 2, "single"),
    # The reference-free objectives share everything but their per-pair loss with dpo (whose
    # formulas tests/unit/test_dpo.py checks): one sharded run stands for both.
    "single_simpo": (["objective=simpo", *ONE], None, None),
    "fsdp_simpo": (["objective=simpo", "strategy=fsdp", *TWO], 2, "single_simpo"),
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("dpo_strategies")

    def train(name):
        overrides, nproc, _ = RUNS[name]
        run_train([*BASE, *overrides, f"output_dir={root}/{name}"], nproc=nproc)

    train_beside(train, [n for n, (_, nproc, _) in RUNS.items() if nproc is not None],
                 [n for n, (_, nproc, _) in RUNS.items() if nproc is None])
    return {name: read_metrics(root / name) for name in RUNS}


@pytest.mark.parametrize("name", [n for n, (_, _, same) in RUNS.items() if same])
def test_two_ranks_equal_one_process(runs, name):
    train, evals = runs[name]
    expected_train, expected_evals = runs[RUNS[name][2]]
    assert [r["step"] for r in train] == list(range(1, STEPS + 1))
    for got, want in zip(train, expected_train, strict=True):
        assert got["pairs"] == want["pairs"] == 4
        for key in METRICS:
            # Rewards are beta x differences of log-probs near -170: 1e-5 of those, absolute.
            assert got[key] == pytest.approx(want[key], rel=1e-5, abs=1e-4 if "rewards" in key else 1e-6), (got["step"], key)
    for got, want in zip(evals, expected_evals, strict=True):
        assert got["eval_pairs"] == want["eval_pairs"] == 12
        assert got["eval_loss"] == pytest.approx(want["eval_loss"], rel=1e-5)
        assert got["eval_rewards/accuracies"] == pytest.approx(want["eval_rewards/accuracies"], abs=1e-9)


@pytest.mark.parametrize("name", [n for n, (o, _, _) in RUNS.items() if "objective=dpo" in o])
def test_dpo_starts_at_ln2_with_zero_rewards_on_every_strategy(runs, name):
    train, evals = runs[name]
    first_eval = evals[0]
    assert first_eval["step"] == 0
    assert first_eval["eval_loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert train[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    for record, prefix in ((train[0], ""), (first_eval, "eval_")):
        for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"):
            assert record[prefix + key] == pytest.approx(0.0, abs=1e-6), (prefix, key)
    assert abs(train[-1]["loss"] - math.log(2)) > 1e-5  # and it trains away from it
