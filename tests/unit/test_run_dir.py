"""ftdist.run_dir on real directories and real processes: who holds a run directory, when a lock
is stale, and what a rerun may do there (ftdist/run_dir.py's docstring states the rules)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from dataclasses import replace

import pytest

from ftdist.config import ConfigError, FtdistConfig, TrainConfig
from ftdist.run_dir import LOCK_NAME, Holder, acquire_lock, decide, release_lock


@pytest.fixture
def live_pid():
    """A process of this user that stays alive for the test."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    yield proc.pid
    proc.kill()
    proc.wait()


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()  # exited and reaped: the pid names no process
    return proc.pid


def write_lock(run_dir, holder: Holder) -> None:
    (run_dir / LOCK_NAME).write_text(json.dumps(holder.__dict__))


def test_lock_records_host_pid_slurm_job_and_start(tmp_path, monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    me = Holder.me()
    assert acquire_lock(tmp_path, me) is None
    recorded = json.loads((tmp_path / LOCK_NAME).read_text())
    assert recorded["host"] == socket.gethostname() and recorded["pid"] == os.getpid()
    assert recorded["slurm_job_id"] == "4242" and recorded["started"]
    release_lock(tmp_path, me)
    assert not (tmp_path / LOCK_NAME).exists()


def test_lock_of_a_live_process_on_this_host_is_refused_naming_it(tmp_path, live_pid):
    other = replace(Holder.me(), pid=live_pid, identity=None)
    write_lock(tmp_path, other)
    with pytest.raises(ConfigError) as e:
        acquire_lock(tmp_path, Holder.me())
    message = str(e.value)
    assert f"pid {live_pid} on {socket.gethostname()}" in message and str(tmp_path / LOCK_NAME) in message
    assert "\n" not in message
    assert Holder.read(tmp_path / LOCK_NAME) == other  # untouched


def test_lock_of_a_dead_process_is_taken_over_with_a_warning(tmp_path):
    stale = replace(Holder.me(), pid=dead_pid(), identity=None)
    write_lock(tmp_path, stale)
    me = Holder.me()
    warning = acquire_lock(tmp_path, me)
    assert f"pid {stale.pid}" in warning and "no longer running" in warning
    assert Holder.read(tmp_path / LOCK_NAME) == me
    assert [p.name for p in tmp_path.iterdir()] == [LOCK_NAME]  # no stale copy left behind


def test_a_reused_pid_is_not_the_holder(tmp_path, live_pid):
    """The pid is alive, but it started at another time than the process that took the lock."""
    write_lock(tmp_path, replace(Holder.me(), pid=live_pid, identity="another-boot:123"))
    assert "no longer running" in acquire_lock(tmp_path, Holder.me())


def test_lock_of_another_host_is_refused_unless_the_same_slurm_job(tmp_path, monkeypatch):
    elsewhere = Holder("node-b", 1234, "2026-01-01T00:00:00", None, "77")
    write_lock(tmp_path, elsewhere)
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    with pytest.raises(ConfigError, match="pid 1234 on node-b, Slurm job 77"):
        acquire_lock(tmp_path, Holder.me())
    monkeypatch.setenv("SLURM_JOB_ID", "78")
    with pytest.raises(ConfigError, match="in use by another run"):
        acquire_lock(tmp_path, Holder.me())
    monkeypatch.setenv("SLURM_JOB_ID", "77")  # the job requeued onto another node after a hard kill
    assert "same Slurm job 77" in acquire_lock(tmp_path, Holder.me())


def test_unreadable_lock_is_taken_over(tmp_path):
    (tmp_path / LOCK_NAME).write_text('{"host": "n')  # killed while writing it
    assert "unreadable" in acquire_lock(tmp_path, Holder.me())


def test_release_leaves_a_lock_another_run_took_over(tmp_path):
    me = Holder.me()
    acquire_lock(tmp_path, me)
    successor = replace(me, pid=dead_pid())
    write_lock(tmp_path, successor)
    release_lock(tmp_path, me)
    assert Holder.read(tmp_path / LOCK_NAME) == successor


# --- the rerun rules ---------------------------------------------------------------------------------


def cfg(**kw) -> FtdistConfig:
    return FtdistConfig(train=TrainConfig(save_final=kw.pop("save_final", True)), **kw)


def finished_run(run_dir, complete: bool = True) -> None:
    (run_dir / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n')
    (run_dir / "summary.json").write_text(json.dumps({"steps": 1, "complete": complete}))
    (run_dir / "final").mkdir()


def test_empty_directory_starts_fresh(tmp_path):
    decision = decide(cfg(), tmp_path)
    assert decision.resume_from is None and decision.finished is None and decision.fresh


def test_a_directory_whose_run_stopped_before_training_starts_again_but_is_not_fresh(tmp_path):
    (tmp_path / "config.yaml").write_text("seed: 0\n")
    (tmp_path / "train.log").write_text("...\n")
    decision = decide(cfg(), tmp_path)
    assert decision.finished is None and not decision.fresh  # a later failure must not delete it


def test_previous_run_without_checkpoint_is_refused_and_left_alone(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n')
    with pytest.raises(ConfigError, match="holds a previous run .metrics.jsonl. and no checkpoint") as e:
        decide(cfg(), tmp_path)
    assert "resume=none overwrite=true" in str(e.value)
    with pytest.raises(ConfigError, match="resume=none would mix two runs"):
        decide(cfg(resume="none"), tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.jsonl"]


def test_overwrite_needs_resume_none(tmp_path):
    with pytest.raises(ConfigError, match="overwrite=true .* needs resume=none .got resume=auto"):
        decide(cfg(overwrite=True), tmp_path)


def test_overwrite_moves_the_previous_run_aside_and_keeps_the_lock(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    finished_run(run_dir)
    acquire_lock(run_dir, Holder.me())
    decision = decide(cfg(resume="none", overwrite=True), run_dir)
    assert [p.name for p in run_dir.iterdir()] == [LOCK_NAME]
    (aside,) = [p for p in tmp_path.iterdir() if p.name.startswith("run.replaced-")]
    assert sorted(p.name for p in aside.iterdir()) == ["final", "metrics.jsonl", "summary.json"]
    assert str(aside) in decision.notes[0] and not decision.fresh


def test_finished_run_is_left_alone_by_resume_auto(tmp_path):
    finished_run(tmp_path)
    assert decide(cfg(), tmp_path).finished == {"steps": 1, "complete": True}


@pytest.mark.parametrize("damage", ["incomplete", "no_final"])
def test_a_run_is_not_finished_without_a_complete_summary_and_its_final_model(tmp_path, damage):
    finished_run(tmp_path, complete=damage != "incomplete")
    if damage == "no_final":
        (tmp_path / "final").rmdir()
    with pytest.raises(ConfigError, match="no checkpoint to resume from"):
        decide(cfg(), tmp_path)


def test_a_checkpoint_is_resumed(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n')
    checkpoint = tmp_path / "checkpoints" / "step_00000001"
    checkpoint.mkdir(parents=True)
    assert decide(cfg(), tmp_path).resume_from == str(checkpoint)
