"""A resumed run's summary reports its own throughput, not one inflated by earlier invocations."""

from __future__ import annotations

import json

import pytest
from helpers import FAST, read_metrics, run_train


def test_mean_tokens_per_s_after_resume_counts_only_this_invocation(tmp_path):
    out = [*FAST, "train.max_steps=6", "train.micro_batch_size=2", "train.log_every_steps=1", f"output_dir={tmp_path}"]
    run_train([*out, "train.stop_after_steps=3"])
    first = json.loads((tmp_path / "summary.json").read_text())
    assert first["steps"] == 3 and first["complete"] is False
    run_train(out)  # resume=auto: steps 4-6
    summary = json.loads((tmp_path / "summary.json").read_text())
    train, _ = read_metrics(tmp_path)
    assert [r["step"] for r in train] == [1, 2, 3, 4, 5, 6]
    second = [r for r in train if r["step"] > 3]
    tokens = sum(r["tokens"] for r in second)
    assert summary["total_tokens"] == sum(r["tokens"] for r in train) > tokens  # the old formula's numerator
    # elapsed_s restarts with each invocation: the last line holds the second invocation's time.
    assert summary["mean_tokens_per_s"] == pytest.approx(tokens / second[-1]["elapsed_s"], rel=1e-9)
