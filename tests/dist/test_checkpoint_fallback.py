"""Checkpoint integrity across ranks (2 gloo processes under torchrun).

A truncated shard: an FSDP run is preempted at step 6 (checkpoints at steps 4 and 6), one rank's
shard of the step-6 checkpoint is cut in half, and the same command run again must warn naming
that file, set step 6 aside, resume from step 4 and log, for steps 5-8, exactly the losses of
an uninterrupted run (on CPU in fp32 the same world size resumes bitwise).

A rank that cannot write: under DeepSpeed ZeRO-2 rank 1 alone may not write files past 1 MB
(RLIMIT_FSIZE, see fsize_limited_rank.py), so its optimizer partition fails while rank 0 writes
its part and waits in DeepSpeed's closing barrier. Both ranks must stop with the same one line
and exit code, promptly (the process-group timeout is cut to 60 s, so a hang fails the test
instead of the suite), leaving no partial checkpoint.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import FAST, REPO, read_metrics, run_env, shared_run, train_cmd

from ftdist.constants import EXIT_CHECKPOINT_WRITE

FSDP = [*FAST, "train.max_steps=8", "train.micro_batch_size=1", "checkpoint.every_steps=4", "strategy=fsdp"]
SHARD = "model_optimizer/__1_0.distcp"  # rank 1's shard


def run(cmd, fault: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
    env = run_env()
    if fault:
        env["FTDIST_INJECT_FAULT"] = fault
    proc = subprocess.run(cmd, check=False, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"run failed ({proc.returncode}):\n{proc.stderr[-6000:]}")
    return proc


def losses(run_dir: Path) -> dict[int, float]:
    train, _ = read_metrics(run_dir)
    steps = [r["step"] for r in train]
    assert steps == sorted(set(steps)), f"a step logged twice: {steps}"
    return {r["step"]: r["loss"] for r in train}


@pytest.fixture(scope="module")
def fell_back(tmp_path_factory):
    root = tmp_path_factory.mktemp("fallback")
    out = root / "resumed"
    straight = shared_run(tmp_path_factory, FSDP, 2)  # test_resume.py's uninterrupted FSDP run too
    first = run(train_cmd(2, [*FSDP, f"output_dir={out}"]), fault="sigterm:6:1", check=False)
    assert first.returncode != 0, "a preempted run must not exit 0"
    checkpoints = out / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step_00000004", "step_00000006"]
    shard = checkpoints / "step_00000006" / SHARD
    size = shard.stat().st_size
    os.truncate(shard, size // 2)
    resumed = run(train_cmd(2, [*FSDP, f"output_dir={out}"]))
    return straight, out, resumed.stderr, size


def test_a_truncated_shard_is_named_and_set_aside(fell_back):
    _, out, stderr, size = fell_back
    warning = next((line for line in stderr.splitlines() if "is damaged" in line), None)
    assert warning is not None, stderr[-3000:]
    assert "step_00000006" in warning and f"{SHARD} is {size // 2} bytes, the manifest says {size}" in warning
    assert "resumed from" in stderr and "step_00000004" in stderr.split("resumed from", 1)[1].splitlines()[0]
    names = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert names == ["step_00000004", "step_00000006.damaged", "step_00000008"]


def test_the_fallback_run_logs_exactly_the_uninterrupted_losses(fell_back):
    straight, out, _, _ = fell_back
    a, b = losses(straight), losses(out)
    assert sorted(a) == sorted(b) == list(range(1, 9))
    assert [b[s] for s in range(5, 9)] == [a[s] for s in range(5, 9)]  # exact, not approx


def test_a_rank_that_cannot_write_stops_every_rank_with_one_line(tmp_path):
    out = tmp_path / "zero2"
    overrides = [*FAST, "train.max_steps=4", "train.micro_batch_size=2", "checkpoint.every_steps=2",
                 "strategy=zero2", "strategy.timeout_s=60", f"output_dir={out}"]
    limited = str(REPO / "tests" / "dist" / "fsize_limited_rank.py")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           limited, "1", str(1 << 20), "-m", "ftdist.train", *overrides]
    start = time.monotonic()
    proc = run(cmd, check=False)
    assert proc.returncode != 0 and time.monotonic() - start < 120, proc.stderr[-4000:]
    assert f"exitcode  : {EXIT_CHECKPOINT_WRITE}" in proc.stderr, proc.stderr[-4000:]
    # Both ranks, the same words. Found by pattern, not by line: the ranks share one stderr, and
    # under load another process's output can land inside a line.
    lines = re.findall(r"ftdist: CheckpointWriteError: .*?\(a rerun starts over\)", proc.stderr)
    assert len(lines) == 2 and lines[0] == lines[1], proc.stderr[-4000:]
    line = lines[0]
    assert f"checkpoint step_00000002 could not be written in {out}/checkpoints: rank 1: " in line, line
    assert "zero_pp_rank_1" in line or "a write came up short" in line, line
    assert "the last complete checkpoint is none" in line and " is free there" in line, line
    workers = proc.stderr.split("failed (exitcode", 1)[0]  # after it: torchrun's own traceback
    assert "Traceback" not in workers, workers[-4000:]
    assert not [p.name for p in (out / "checkpoints").iterdir()]  # the partial checkpoint is gone
