"""Hydra multirun on the local launcher: each run of a sweep in its own directory, with its value."""

from __future__ import annotations

import yaml
from helpers import FAST, read_metrics, run_train


def test_local_sweep_runs_each_value_in_its_own_directory(tmp_path):
    run_train(["-m", *FAST, "train.max_steps=2", "train.micro_batch_size=2", "train.lr=1e-3,2e-3", f"output_dir={tmp_path}"])
    seen = {}
    for job in ("0", "1"):
        config = yaml.safe_load((tmp_path / job / "config.yaml").read_text())
        train, _ = read_metrics(tmp_path / job)
        assert [r["step"] for r in train] == [1, 2]
        seen[config["train"]["lr"]] = train
    assert sorted(seen) == [1e-3, 2e-3]
    # Same data and init, different learning rates: the first step agrees, the second cannot.
    assert seen[1e-3][0]["loss"] == seen[2e-3][0]["loss"]
    assert seen[1e-3][1]["loss"] != seen[2e-3][1]["loss"]
