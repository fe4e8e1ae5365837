"""The run directory under faults, through the real entry point: a second run into a held
directory, a lock left by a killed run, reruns of runs without checkpoints and of finished runs,
overwrite, a summary across stop_after_steps + resume, and bad input leaving nothing behind.

Every run is a FAST tiny_cpu run of a few steps (seconds each on 2 cores).
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from helpers import FAST, REPO, read_metrics, run_env, run_train, train_cmd

from ftdist.constants import EXIT_PREEMPTED
from ftdist.run_dir import LOCK_NAME, Holder, acquire_lock, release_lock

SHORT = [*FAST, "train.max_steps=3"]


def snapshot(run_dir: Path) -> dict[str, bytes]:
    return {str(p.relative_to(run_dir)): p.read_bytes() for p in sorted(run_dir.rglob("*")) if p.is_file()}


def stderr_lines(proc) -> list[str]:
    return [line for line in proc.stderr.splitlines() if line.strip()]


def one_line(proc, code: int) -> str:
    lines = stderr_lines(proc)
    assert proc.returncode == code, proc.stderr[-3000:]
    assert len(lines) == 1, proc.stderr[-3000:]
    return lines[0]


def dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


# --- one run at a time ---------------------------------------------------------------------------


def test_second_run_into_a_held_directory_stops_at_once_naming_the_holder(tmp_path):
    """The test process holds the lock as a run's rank 0 does; the second run writes nothing."""
    out = tmp_path / "run"
    out.mkdir()
    me = Holder.me()
    acquire_lock(out, me)
    before = snapshot(out)
    try:
        proc = run_train([*SHORT, f"output_dir={out}"], check=False)
        after = snapshot(out)
    finally:
        release_lock(out, me)
    line = one_line(proc, 2)
    assert line.startswith("ftdist: ConfigError: ") and "in use by another run" in line, line
    assert f"pid {me.pid} on {me.host}" in line and str(out / LOCK_NAME) in line, line
    assert after == before  # stopped before config.yaml, train.log, data and model; the lock is still ours


def wait_for_training(run_dir: Path, proc: subprocess.Popen, log: Path, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, log.read_text()[-3000:]
        if (run_dir / "metrics.jsonl").exists() and read_metrics(run_dir)[0]:
            return
        time.sleep(0.2)
    raise AssertionError("the first run logged no step")


def test_a_training_run_holds_its_directory_until_preempted_then_a_rerun_resumes(tmp_path):
    out = tmp_path / "run"
    common = [*FAST, "train.max_steps=500", f"output_dir={out}"]
    log = tmp_path / "first.stderr"
    with log.open("w") as stderr:  # a file, not a pipe: nothing blocks on a full pipe
        first = subprocess.Popen(train_cmd(None, common), cwd=REPO, env=run_env(), stderr=stderr)
    try:
        wait_for_training(out, first, log)
        holder = Holder.read(out / LOCK_NAME)
        assert holder is not None and holder.pid == first.pid
        second = run_train(common, check=False)
        assert "in use by another run" in one_line(second, 2) and f"pid {first.pid}" in second.stderr
        first.send_signal(signal.SIGTERM)  # a preemption: checkpoint, release, exit 75
        first.wait(timeout=300)
    finally:
        first.kill()
    assert first.returncode == EXIT_PREEMPTED, log.read_text()[-3000:]
    assert not (out / LOCK_NAME).exists()
    step = json.loads((out / "preempted.json").read_text())["step"]
    proc = run_train([*common, f"train.stop_after_steps={step + 1}"])  # the requeue takes the directory
    assert f"resumed from {out / 'checkpoints' / f'step_{step:08d}'}" in proc.stderr
    assert [r["step"] for r in read_metrics(out)[0]] == list(range(1, step + 2))
    assert not (out / LOCK_NAME).exists()


def test_lock_of_a_dead_process_is_taken_over_with_a_warning(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    stale = Holder(Holder.me().host, dead_pid(), "2026-01-01T00:00:00")
    (out / LOCK_NAME).write_text(json.dumps(stale.__dict__))
    proc = run_train([*SHORT, f"output_dir={out}"])
    assert f"took over the lock {out / LOCK_NAME} of pid {stale.pid}" in proc.stderr
    assert "no longer running" in proc.stderr
    assert json.loads((out / "summary.json").read_text())["steps"] == 3
    assert not (out / LOCK_NAME).exists()


# --- reruns ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def crashed_run(tmp_path_factory) -> Path:
    """A run killed at step 2 without a checkpoint (checkpoints are off by default): its
    metrics.jsonl and config.yaml stay, and so does its lock (os._exit skips every finally)."""
    out = tmp_path_factory.mktemp("crashed") / "run"
    proc = subprocess.run(
        train_cmd(None, [*SHORT, f"output_dir={out}"]), cwd=REPO, env={**run_env(), "FTDIST_INJECT_FAULT": "crash:2:0"},
        capture_output=True, text=True, timeout=600, check=False,
    )
    assert proc.returncode == 1 and "injected crash at step 2" in proc.stderr, proc.stderr[-3000:]
    assert (out / LOCK_NAME).exists() and not (out / "checkpoints").exists()
    return out


@pytest.fixture
def crashed_copy(crashed_run, tmp_path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(crashed_run, out)
    return out


def test_rerun_without_a_checkpoint_is_refused_and_leaves_the_directory_unchanged(crashed_copy):
    before = snapshot(crashed_copy)
    proc = run_train([*SHORT, f"output_dir={crashed_copy}"], check=False)
    line = one_line(proc, 2)
    assert f"output_dir {crashed_copy} holds a previous run (metrics.jsonl) and no checkpoint" in line, line
    assert "use a new output_dir, or resume=none overwrite=true" in line, line
    after = snapshot(crashed_copy)
    del before[LOCK_NAME]  # the dead run's stale lock, taken over and released
    assert after == before


def test_overwrite_moves_the_previous_run_aside_and_trains_afresh(crashed_copy):
    before = snapshot(crashed_copy)
    del before[LOCK_NAME]
    proc = run_train([*SHORT, "resume=none", "overwrite=true", f"output_dir={crashed_copy}"])
    (aside,) = crashed_copy.parent.glob("run.replaced-*")
    assert f"moved the previous run in {crashed_copy} to {aside}" in proc.stderr
    assert {k: v for k, v in snapshot(aside).items() if k != LOCK_NAME} == before
    assert [r["step"] for r in read_metrics(crashed_copy)[0]] == [1, 2, 3]  # each step once, no old lines
    assert json.loads((crashed_copy / "summary.json").read_text())["complete"] is True


EM = [*FAST, "train.max_steps=4", "eval.generation.samples=4", "eval.generation.max_new_tokens=8"]


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory) -> Path:
    """A finished run: 4 steps, exact match measured before and after."""
    out = tmp_path_factory.mktemp("straight") / "run"
    run_train([*EM, f"output_dir={out}"])
    return out


def test_rerun_of_a_finished_run_is_a_no_op(straight_run, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(straight_run, out)
    before = snapshot(out)
    assert "summary.json" in before and any(k.startswith("final/") for k in before)
    proc = run_train([*EM, f"output_dir={out}"])
    line = one_line(proc, 0)
    assert line == (f"ftdist: {out} holds a finished run (summary.json, 4 steps): nothing to do; "
                    "to train again use a new output_dir, or resume=none overwrite=true"), line
    assert snapshot(out) == before  # summary.json, final/, metrics.jsonl, train.log: byte for byte


# --- summary.json across stop_after_steps + resume ---------------------------------------------------


def test_summary_after_stop_and_resume_describes_the_whole_run(straight_run, tmp_path):
    em, straight, resumed = EM, straight_run, tmp_path / "resumed"
    run_train([*em, "train.stop_after_steps=2", f"output_dir={resumed}"])
    state = torch.load(resumed / "checkpoints" / "step_00000002" / "trainer.pt", weights_only=True)
    run_train([*em, f"output_dir={resumed}"])
    expected = json.loads((straight / "summary.json").read_text())
    summary = json.loads((resumed / "summary.json").read_text())
    train, evals = read_metrics(resumed)
    at_start = [r for r in evals if r["step"] == 0]
    assert len(at_start) == 1  # measured by the first invocation only
    assert state["summary_carry"]["exact_match_before"] == at_start[0]["exact_match"]
    assert summary["exact_match_before"] == at_start[0]["exact_match"] == expected["exact_match_before"]
    assert summary["exact_match_after"] == evals[-1]["exact_match"] == expected["exact_match_after"]
    for key in ("final_eval_loss", "final_loss", "total_tokens", "steps"):
        assert summary[key] == expected[key], key  # CPU fp32 resume is exact
    # Throughput: the second invocation's tokens over its own training time, nothing earlier.
    second = [r for r in train if r["step"] > 2]
    assert summary["mean_tokens_per_s"] == pytest.approx(sum(r["tokens"] for r in second) / second[-1]["elapsed_s"])


# --- bad input leaves nothing behind -------------------------------------------------------------------


def bad_input(tmp_path: Path, case: str) -> list[str]:
    if case == "bad_row":
        data = tmp_path / "bad.jsonl"
        data.write_text('{"prompt": "a", "response": "b"}\n{"prompt": "c"}\n')
        return [f"data.path={data}"]
    if case == "missing_data":
        return [f"data.path={tmp_path / 'nope.jsonl'}"]
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"model_type": "nope"}))
    return ["model=hf", f"model.name_or_path={model}"]


@pytest.mark.parametrize(
    ("case", "nproc"),
    [("bad_row", None), ("missing_data", None), ("wrong_model", None), ("bad_row", 2), ("wrong_model", 2)],
)
def test_bad_input_leaves_no_run_directory(tmp_path, case, nproc):
    ddp = ["strategy=ddp", "train.micro_batch_size=1"] if nproc else []
    proc = run_train([*SHORT, *ddp, *bad_input(tmp_path, case), f"output_dir={tmp_path}/run"], nproc, check=False)
    assert proc.returncode in ((2,) if nproc is None else (1, 2)), proc.stderr[-3000:]
    assert "ftdist: ConfigError" in proc.stderr or "ftdist: DataError" in proc.stderr, proc.stderr[-3000:]
    assert not (tmp_path / "run").exists()


def test_bad_input_never_removes_a_directory_that_held_something(tmp_path, crashed_run):
    """A directory holding a user's file, and one whose previous run was moved aside by
    overwrite=true: both stay (with what they held) when the new run fails on bad data."""
    user = tmp_path / "user"
    user.mkdir()
    (user / "job.sbatch").write_text("#!/bin/bash\n")
    replaced = tmp_path / "replaced"
    shutil.copytree(crashed_run, replaced)
    for out, extra in ((user, []), (replaced, ["resume=none", "overwrite=true"])):
        proc = run_train([*SHORT, *extra, *bad_input(tmp_path, "bad_row"), f"output_dir={out}"], check=False)
        assert proc.returncode == 2 and "DataError" in proc.stderr, proc.stderr[-3000:]
        assert out.is_dir() and not (out / LOCK_NAME).exists()
    assert (user / "job.sbatch").read_text() == "#!/bin/bash\n"
    (aside,) = tmp_path.glob("replaced.replaced-*")
    assert (aside / "metrics.jsonl").read_bytes() == (crashed_run / "metrics.jsonl").read_bytes()
