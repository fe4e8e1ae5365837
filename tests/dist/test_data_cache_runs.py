"""Training from the tokenized cache, end to end: the same losses as data prepared in the
process, one build for all ranks, and no second build when a preempted run resumes."""

from __future__ import annotations

import json
import subprocess

from conftest import shared_dataset
from helpers import FAST, REPO, concurrently, read_metrics, run_env, train_cmd

GSM8K = [
    f"data.path={shared_dataset('gsm8k/test.jsonl')}", "data.fields.prompt=question", "data.fields.response=answer",
    "data.max_seq_len=192", "data.packing=true", "train.micro_batch_size=2", "train.max_steps=6",
    "checkpoint.every_steps=3", "train.save_final=false",
]


def run(overrides: list[str], nproc: int | None = None, fault: str | None = None, check: bool = True):
    env = run_env()
    if fault:
        env["FTDIST_INJECT_FAULT"] = fault
    proc = subprocess.run(train_cmd(nproc, overrides), cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"run failed ({proc.returncode}):\n{proc.stderr[-6000:]}")
    return proc


def losses(run_dir) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run_dir)[0]}


def builds(cache_dir) -> list[dict]:
    return [json.loads(line) for line in (cache_dir / "builds.jsonl").read_text().splitlines()]


def test_cached_data_trains_bitwise_like_data_prepared_in_process(tmp_path):
    base = [*FAST, *GSM8K]
    concurrently(
        lambda: run([*base, "data.cache=false", f"output_dir={tmp_path}/in_process"]),
        lambda: run([*base, f"data.cache_dir={tmp_path}/cache", f"output_dir={tmp_path}/cached"]),
    )
    expected = losses(tmp_path / "in_process")
    assert sorted(expected) == list(range(1, 7))
    assert losses(tmp_path / "cached") == expected  # floats read back from JSON: bitwise
    reports = [json.loads((tmp_path / name / "data_report.json").read_text()) for name in ("in_process", "cached")]
    assert reports[0] == reports[1] and reports[0]["truncated"] > 0
    assert len(builds(tmp_path / "cache")) == 1


def test_two_ranks_tokenize_once_and_a_resumed_run_does_not_tokenize_again(tmp_path):
    cache_dir = tmp_path / "cache"
    command = [*FAST, *GSM8K, "strategy=ddp", f"data.cache_dir={cache_dir}", f"output_dir={tmp_path}/run"]
    first = run(command, nproc=2, fault="sigterm:3:1", check=False)
    assert first.returncode != 0, "a preempted run must not exit 0"
    assert max(losses(tmp_path / "run")) == 3
    assert len(builds(cache_dir)) == 1  # local rank 0 built; rank 1 waited and mapped it
    assert first.stderr.count("data: built cache") == 1  # rank 0's log (other ranks log warnings only)
    second = run(command, nproc=2)
    assert len(builds(cache_dir)) == 1
    assert "data: built cache" not in second.stderr and second.stderr.count("data: reused cache") == 1
    assert sorted(losses(tmp_path / "run")) == list(range(1, 7))
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    rss = summary["host_peak_rss_gb_per_rank"]
    assert len(rss) == 2 and all(0.05 < x < 8 for x in rss)
