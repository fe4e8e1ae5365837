"""2-process DDP on gloo gives the per-step losses of 1 process with the same global batch."""

from __future__ import annotations

import pytest
from helpers import FAST, assert_same_final_weights, concurrently, read_metrics, run_train

TRAIN_FIELDS = {"step", "loss", "lr", "grad_norm", "tokens", "tokens_per_s", "mfu", "peak_mem_gb", "elapsed_s"}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp")
    common = [*FAST, "train.max_steps=6", "train.micro_batch_size=4", "train.eval_every_steps=3"]
    # The two one-process runs at once (helpers.concurrently). The second, one micro-batch of 8,
    # catches a mean-of-micro-batch-means, which the split of the first cannot.
    concurrently(
        lambda: run_train([*common, "train.grad_accum_steps=2", f"output_dir={root}/single"]),
        lambda: run_train([*common, "train.micro_batch_size=8", f"output_dir={root}/single_micro8"]),
    )
    run_train([*common, "strategy=ddp", "train.grad_accum_steps=1", f"output_dir={root}/ddp"], nproc=2)
    return root


@pytest.mark.parametrize("reference", ["single", "single_micro8"])
def test_ddp_losses_equal_single_process(runs, reference):
    single, single_eval = read_metrics(runs / reference)
    ddp, ddp_eval = read_metrics(runs / "ddp")
    assert [r["step"] for r in ddp] == list(range(1, 7))
    for a, b in zip(single, ddp, strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5), (a, b)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4)
        assert b["tokens"] == a["tokens"] and b["label_tokens"] == a["label_tokens"]
    assert len(single_eval) == len(ddp_eval) == 3  # start, step 3, end
    for a, b in zip(single_eval, ddp_eval, strict=True):
        assert b["eval_loss"] == pytest.approx(a["eval_loss"], rel=1e-5)


def test_ddp_final_weights_match_single_process(runs):
    assert_same_final_weights(runs / "single", runs / "ddp")


def test_metrics_lines_carry_every_field(runs):
    train, evals = read_metrics(runs / "ddp")
    for record in train:
        assert TRAIN_FIELDS <= record.keys()
        assert record["tokens_per_s"] > 0 and 0 < record["mfu"] < 1 and record["peak_mem_gb"] > 0
    assert all({"step", "eval_loss"} <= r.keys() for r in evals)
    assert (runs / "ddp" / "config.yaml").exists() and (runs / "ddp" / "train.log").exists()
