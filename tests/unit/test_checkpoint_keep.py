"""checkpoint.keep: only the newest N complete checkpoints stay (README, "Checkpoints").

The pruning function runs on real directories laid out as save_checkpoint leaves them: complete
step_NNNNNNNN/ checkpoints, a step_N.partial/ cut short by a crash, and files that are not
checkpoints. The end-to-end run (checkpoint.every_steps=1, checkpoint.keep=2) is
tests/integration/test_run_dir_claims.py::test_keep_leaves_only_the_newest_checkpoints.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from ftdist.checkpoint import checkpoint_dir, complete_checkpoints, prune, resolve_resume


def lay_out(run_dir: Path, steps: list[int], partial: list[int]) -> None:
    for step in steps:
        d = checkpoint_dir(run_dir, step)
        (d / "rng").mkdir(parents=True)
        (d / "trainer.pt").write_bytes(b"x")
        (d / "rng" / "rank0.pt").write_bytes(b"x")
    for step in partial:
        d = checkpoint_dir(run_dir, step)
        d.with_name(d.name + ".partial").mkdir(parents=True)
    (run_dir / "checkpoints" / "notes.txt").write_text("not a checkpoint")


def names(run_dir: Path) -> list[str]:
    return sorted(p.name for p in (run_dir / "checkpoints").iterdir())


@pytest.mark.parametrize("keep", [1, 2, 3])
def test_prune_keeps_the_newest_complete_checkpoints_by_step_number(tmp_path, keep):
    # Step 100 sorts before step 20 as a string of another width: the order must be numeric.
    steps = [5, 20, 100, 7, 60]
    lay_out(tmp_path, steps, partial=[120])
    prune(tmp_path, keep)
    newest = sorted(steps)[-keep:]
    assert [p.name for p in complete_checkpoints(tmp_path)] == [f"step_{s:08d}" for s in newest]
    # A partial checkpoint and foreign files are never prune's to delete.
    assert names(tmp_path) == sorted([*(f"step_{s:08d}" for s in newest), "step_00000120.partial", "notes.txt"])
    assert resolve_resume("auto", tmp_path).name == f"step_{max(steps):08d}"


def test_prune_with_fewer_checkpoints_than_keep_deletes_nothing(tmp_path):
    lay_out(tmp_path, [3, 6], partial=[])
    prune(tmp_path, 5)
    assert names(tmp_path) == ["notes.txt", "step_00000003", "step_00000006"]


def test_prune_without_checkpoints_directory_is_a_no_op(tmp_path):
    prune(tmp_path, 2)
    assert not (tmp_path / "checkpoints").exists()


def test_keep_must_be_positive():
    """keep=0 would make prune's slice [:-0] keep everything: the config refuses it instead."""
    from ftdist.config import ConfigError, compose, load_config

    dcfg = compose(["+experiment=tiny_cpu", "checkpoint.keep=0"])
    with pytest.raises(ConfigError, match="checkpoint.keep"):
        load_config(dcfg)
