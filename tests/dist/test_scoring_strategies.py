"""Classifiers and reward models on every strategy and PEFT method, 2 gloo ranks against one process.

Each 2-rank run sees the same global batches as a one-process run with accumulation (2 ranks x
micro 2 = 1 x micro 2 x accum 2), so its losses, train accuracy and reward metrics must equal
that run's, step by step, and its evaluation (every validation document gathered from both
ranks) must give the same figures. The scoring head starts from the same seeded init on every
rank and in every run, so the comparisons are exact up to fp32 reduction order.
"""

from __future__ import annotations

import json

import pytest
from helpers import read_metrics, run_train, train_beside

STEPS = 3
COMMON = ["model=tiny", "strategy=single", f"train.max_steps={STEPS}", "train.lr=1e-3", "train.warmup_steps=0",
          "train.eval_batch_size=8", "train.progress_bar=false", "data.val_fraction=0.1",
          "train.eval_every_steps=null", "train.save_final=false"]
CLASSIFY = [*COMMON, "objective=classification", "data=classification", "data.path=synthetic:support_tickets",
            "data.num_synthetic_rows=120", "data.max_seq_len=64", "objective.class_weights=auto"]
REWARD = [*COMMON, "objective=reward", "data=preference", "data.path=synthetic:json_preference",
          "data.num_synthetic_rows=120", "data.max_seq_len=96"]
ONE = ["train.micro_batch_size=2", "train.grad_accum_steps=2"]
TWO = ["train.micro_batch_size=2", "train.grad_accum_steps=1"]
LORA = ["peft=lora", "peft.dropout=0.0", "peft.r=4"]

# name: (overrides, ranks, the one-process run it must equal)
RUNS = {
    "cls_single": ([*CLASSIFY, *ONE], None, None),
    "cls_single_packed": ([*CLASSIFY, "data.packing=true", *ONE], None, None),
    "cls_ddp": ([*CLASSIFY, "strategy=ddp", *TWO], 2, "cls_single"),
    "cls_fsdp_packed": ([*CLASSIFY, "strategy=fsdp", "data.packing=true", *TWO], 2, "cls_single_packed"),
    "cls_zero1": ([*CLASSIFY, "strategy=zero1", *TWO], 2, "cls_single"),
    "cls_single_lora": ([*CLASSIFY, *LORA, *ONE], None, None),
    "cls_zero3_lora": ([*CLASSIFY, *LORA, "strategy=zero3", *TWO], 2, "cls_single_lora"),
    "cls_single_qlora": ([*CLASSIFY, "peft=qlora", "peft.dropout=0.0", "peft.r=4", *ONE], None, None),
    "cls_fsdp_qlora": ([*CLASSIFY, "peft=qlora", "peft.dropout=0.0", "peft.r=4", "strategy=fsdp", *TWO], 2,
                       "cls_single_qlora"),
    "reward_single": ([*REWARD, *ONE], None, None),
    "reward_single_packed": ([*REWARD, "data.packing=true", *ONE], None, None),
    "reward_zero2": ([*REWARD, "strategy=zero2", *TWO], 2, "reward_single"),
    "reward_single_packed_dora": ([*REWARD, "peft=dora", "peft.dropout=0.0", "peft.r=4", "data.packing=true", *ONE],
                                  None, None),
    "reward_fsdp_packed_dora": ([*REWARD, "peft=dora", "peft.dropout=0.0", "peft.r=4", "strategy=fsdp",
                                 "data.packing=true", *TWO], 2, "reward_single_packed_dora"),
}
CLS_METRICS = ("loss", "accuracy", "grad_norm")
REWARD_METRICS = ("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "grad_norm")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("scoring_strategies")

    def train(name):
        overrides, nproc, _ = RUNS[name]
        run_train([*overrides, f"output_dir={root}/{name}"], nproc=nproc)

    train_beside(train, [n for n, (_, nproc, _) in RUNS.items() if nproc is not None],
                 [n for n, (_, nproc, _) in RUNS.items() if nproc is None])
    return {name: (*read_metrics(root / name), root / name) for name in RUNS}


@pytest.mark.parametrize("name", [n for n, (_, _, same) in RUNS.items() if same])
def test_two_ranks_equal_one_process(runs, name):
    train, evals, _ = runs[name]
    expected_train, expected_evals, _ = runs[RUNS[name][2]]
    reward = name.startswith("reward")
    assert [r["step"] for r in train] == list(range(1, STEPS + 1))
    for got, want in zip(train, expected_train, strict=True):
        unit = "pairs" if reward else "documents_scored"
        assert got[unit] == want[unit]
        assert got[unit] == 4 or "packed" in name  # a packed row holds several
        for key in REWARD_METRICS if reward else CLS_METRICS:
            assert got[key] == pytest.approx(want[key], rel=1e-5, abs=1e-6), (got["step"], key)
    assert [e["step"] for e in evals] == [e["step"] for e in expected_evals] == [0, STEPS]
    for got, want in zip(evals, expected_evals, strict=True):
        assert got["eval_loss"] == pytest.approx(want["eval_loss"], rel=1e-5)
        keys = ("eval_accuracy", "eval_margin") if reward else ("eval_accuracy", "eval_macro_f1", "eval_ece")
        for key in keys:
            assert got[key] == pytest.approx(want[key], rel=1e-5, abs=1e-6), key
        assert got["eval_pairs" if reward else "eval_documents"] == want["eval_pairs" if reward else "eval_documents"] == 12


@pytest.mark.parametrize("name", [n for n, (_, nproc, _) in RUNS.items() if n.startswith("cls") and nproc == 2])
def test_sharded_predictions_equal_one_process(runs, name):
    """Every validation document's probabilities, gathered from both ranks, as one process has them."""
    _, _, run_dir = runs[name]
    _, _, one_dir = runs[RUNS[name][2]]
    files = [d / "eval" / f"predictions_step_{STEPS:08d}.jsonl" for d in (run_dir, one_dir)]
    got, want = ([json.loads(line) for line in f.read_text().splitlines()] for f in files)
    assert [r["index"] for r in got] == [r["index"] for r in want] == list(range(12))
    for a, b in zip(got, want, strict=True):
        assert a["predicted"] == b["predicted"]
        assert list(a["probabilities"].values()) == pytest.approx(list(b["probabilities"].values()), abs=1e-6)


def test_summary_reports_the_classification_figures(runs):
    _, _, run_dir = runs["cls_ddp"]
    summary = json.loads((run_dir / "summary.json").read_text())
    report = summary["classification"]
    assert set(report["per_class"]) == {"account", "billing", "shipping", "technical"}
    matrix = report["confusion_matrix"]["rows_true_columns_predicted"]
    assert sum(map(sum, matrix)) == report["documents"] == 12
    assert summary["eval_accuracy_after"] == report["accuracy"]
    assert report["majority_baseline"]["class"] == "billing"
    assert 0.0 <= report["ece"] <= 1.0
