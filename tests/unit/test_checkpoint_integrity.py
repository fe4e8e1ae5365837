"""Checkpoint integrity: a manifest of every file (size, sha256) written before the commit
rename; resume=auto checks it and falls back past a damaged checkpoint; checkpoint state loads
with torch.load(weights_only=True); a checkpoint that does not fit on the disk stops the run
with one line.

The checkpoints are real: an in-process Trainer over the tiny model writes them through
save_checkpoint (torch.distributed.checkpoint, one process). The disk-full run is a real
ftdist.train on a real 16 MiB tmpfs, mounted in a user and mount namespace (`unshare -Urm`, no
root needed where the kernel allows unprivileged user namespaces; skipped where it does not).
The multi-process cases (a truncated shard of a 2-rank FSDP run, one DeepSpeed rank failing to
write) are in tests/dist/test_checkpoint_fallback.py.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import random
import re
import shutil
import subprocess

import numpy as np
import pytest
import torch
from helpers import FAST, REPO, random_examples, run_env, train_cmd

from ftdist.checkpoint import (
    checkpoint_dir,
    complete_checkpoints,
    load_checkpoint,
    load_plain,
    prune,
    resolve_resume,
    rng_state,
    set_rng_state,
)
from ftdist.config import ConfigError, DataConfig, FtdistConfig, ModelConfig, TinyModelSpec, TrainConfig
from ftdist.constants import EXIT_CHECKPOINT_WRITE
from ftdist.integrity import MANIFEST, shares
from ftdist.parallel.base import Strategy
from ftdist.trainer import Trainer

SHARD = "model_optimizer/__0_0.distcp"


def make_trainer(model, tokenizer, run_dir) -> Trainer:
    cfg = FtdistConfig(
        model=ModelConfig(tiny=TinyModelSpec()),
        data=DataConfig(path="unused", max_seq_len=64),
        train=TrainConfig(micro_batch_size=2, max_steps=4),
        output_dir=str(run_dir),
    )
    return Trainer(cfg, Strategy(cfg.strategy), copy.deepcopy(model), tokenizer, random_examples(12), [], run_dir)


@pytest.fixture(scope="module")
def tiny_model(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)


@pytest.fixture(scope="module")
def written(tiny_model, tiny_tokenizer, tmp_path_factory):
    """A run directory with checkpoints at steps 2 and 4, as save_checkpoint writes them."""
    run_dir = tmp_path_factory.mktemp("written")
    trainer = make_trainer(tiny_model, tiny_tokenizer, run_dir)
    for step in (2, 4):
        trainer.step = step
        trainer.checkpoint()
    return run_dir


@pytest.fixture()
def run_dir(written, tmp_path):
    """A fresh copy of `written` for a test to damage."""
    shutil.copytree(written, tmp_path / "run")
    return tmp_path / "run"


def test_manifest_lists_every_file_with_its_size_and_sha256(written):
    for path in complete_checkpoints(written):
        manifest = json.loads((path / MANIFEST).read_text())
        on_disk = {}
        for folder, _, files in os.walk(path):
            for name in files:
                with open(os.path.join(folder, name), "rb") as f:
                    data = f.read()
                relative = os.path.relpath(os.path.join(folder, name), path)
                on_disk[relative] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
        del on_disk[MANIFEST]
        assert manifest["files"] == on_disk
        assert {"trainer.pt", "rng/rank0.pt", SHARD, "model_optimizer/.metadata"} <= set(on_disk)
        assert manifest["step"] == int(path.name.split("_")[1])
    assert not list(written.glob("checkpoints/*.partial"))


def truncate(path):
    os.truncate(path / SHARD, (path / SHARD).stat().st_size // 2)
    return f"{SHARD} is {(path / SHARD).stat().st_size} bytes, the manifest says"


def remove_rng(path):
    (path / "rng" / "rank0.pt").unlink()
    return "rng/rank0.pt is missing"


def flip_a_byte(path):
    data = bytearray((path / SHARD).read_bytes())
    data[len(data) // 2] ^= 0x01
    (path / SHARD).write_bytes(bytes(data))
    return f"{SHARD} has sha256"


DAMAGE = {"truncated": truncate, "missing": remove_rng, "flipped_byte": flip_a_byte}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_auto_falls_back_past_a_damaged_checkpoint_naming_the_file(run_dir, caplog, damage):
    newest = checkpoint_dir(run_dir, 4)
    expected = DAMAGE[damage](newest)
    with caplog.at_level(logging.WARNING, logger="ftdist"):
        assert resolve_resume("auto", run_dir) == checkpoint_dir(run_dir, 2)
    warning = " ".join(r.getMessage() for r in caplog.records)
    assert str(newest) in warning and expected in warning, warning
    # Set aside, not deleted and not tried again: a rerun goes straight to step 2.
    assert newest.with_name("step_00000004.damaged").is_dir() and not newest.exists()
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="ftdist"):
        assert resolve_resume("auto", run_dir) == checkpoint_dir(run_dir, 2)
    assert not caplog.records


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_resume_path_to_a_damaged_checkpoint_is_a_one_line_config_error(run_dir, damage):
    newest = checkpoint_dir(run_dir, 4)
    expected = DAMAGE[damage](newest)
    with pytest.raises(ConfigError) as err:
        resolve_resume(str(newest), run_dir)
    message = str(err.value)
    assert "\n" not in message and str(newest) in message and expected in message, message
    assert newest.is_dir()  # the user's own choice: left where it is


def test_every_checkpoint_damaged_is_an_error_then_and_on_every_rerun(run_dir):
    for step in (2, 4):
        truncate(checkpoint_dir(run_dir, step))
    with pytest.raises(ConfigError) as err:
        resolve_resume("auto", run_dir)
    message = str(err.value)
    assert "\n" not in message and "no intact checkpoint" in message
    assert "step_00000004: " in message and "step_00000002: " in message and "resume=none" in message
    # Set aside now, they must not turn the next attempt into a silent fresh start.
    with pytest.raises(ConfigError, match=r"every checkpoint .* is damaged \(step_00000002.damaged, step_00000004.damaged\)"):
        resolve_resume("auto", run_dir)


def test_an_unreadable_manifest_is_damage(run_dir, caplog):
    (checkpoint_dir(run_dir, 4) / MANIFEST).write_text('{"format": 1, "files": ')
    with caplog.at_level(logging.WARNING, logger="ftdist"):
        assert resolve_resume("auto", run_dir) == checkpoint_dir(run_dir, 2)
    assert any("manifest.json is unreadable" in r.getMessage() for r in caplog.records)


def test_a_checkpoint_without_a_manifest_is_taken_with_a_warning(run_dir, caplog):
    """Checkpoints written before manifests existed still resume (their files are not checked)."""
    (checkpoint_dir(run_dir, 4) / MANIFEST).unlink()
    with caplog.at_level(logging.WARNING, logger="ftdist"):
        assert resolve_resume("auto", run_dir) == checkpoint_dir(run_dir, 4)
    assert any("no manifest" in r.getMessage() and "step_00000004" in r.getMessage() for r in caplog.records)


def test_keep_does_not_count_a_damaged_checkpoint(run_dir):
    """keep=1 with a damaged newest checkpoint keeps the good one before it (pruning looks at
    presence and sizes only: it runs at every save)."""
    truncate(checkpoint_dir(run_dir, 4))
    prune(run_dir, keep=1)
    assert [p.name for p in complete_checkpoints(run_dir)] == ["step_00000002"]
    assert (run_dir / "checkpoints" / "step_00000004.damaged").is_dir()


def test_shares_split_every_file_once_by_size():
    sizes = {f"f{i}": s for i, s in enumerate([100, 90, 80, 10, 10, 5, 1, 0])}
    split = shares(sizes, 3)
    assert sorted(n for share in split for n in share) == sorted(sizes)
    loads = [sum(sizes[n] for n in share) for share in split]
    assert max(loads) - min(loads) <= max(sizes.values()) and max(loads) == 100
    assert shares(sizes, 3) == split  # every rank computes the same split


# --- state as plain data: torch.load(weights_only=True) --------------------------------------


class RunsCodeWhenUnpickled:
    """What a tampered checkpoint could hold: unpickling it calls os.mkdir."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.mkdir, (self.marker,)


@pytest.mark.parametrize("name", ["trainer.pt", "rng/rank0.pt"])
def test_a_pickled_object_in_checkpoint_state_is_refused_naming_the_file(
    run_dir, tiny_model, tiny_tokenizer, tmp_path, name
):
    path = checkpoint_dir(run_dir, 4)
    marker = tmp_path / "code_ran"
    state = load_plain(path / name)
    state["extra"] = RunsCodeWhenUnpickled(marker)
    torch.save(state, path / name)
    trainer = make_trainer(tiny_model, tiny_tokenizer, run_dir)
    with pytest.raises(ConfigError) as err:
        load_checkpoint(trainer, path)
    message = str(err.value)
    assert "\n" not in message and str(path / name) in message and "posix.mkdir" in message, message
    assert "weights_only=True" in message
    assert not marker.exists()


def test_checkpoint_state_is_plain_data(written, tiny_model, tiny_tokenizer, tmp_path):
    path = checkpoint_dir(written, 4)
    for name in ("trainer.pt", "rng/rank0.pt"):
        torch.load(path / name, weights_only=True)  # no allow-list needed
    trainer = make_trainer(tiny_model, tiny_tokenizer, tmp_path)
    load_checkpoint(trainer, path)
    assert trainer.step == 4


def draws() -> list:
    return [random.random(), float(np.random.rand()), float(np.random.randn()), float(torch.rand(1))]


@pytest.mark.parametrize("legacy", [False, True], ids=["plain", "legacy_numpy_tuple"])
def test_rng_state_round_trips_through_weights_only_load(tmp_path, legacy):
    """The plain form, and the form written before it (numpy's tuple with an ndarray), restore
    the same draws."""
    np.random.randn()  # a cached gaussian, which numpy's state carries too
    state = rng_state()
    if legacy:
        state["numpy"] = np.random.get_state()
    expected = draws()
    torch.save(state, tmp_path / "rng.pt")
    from ftdist.checkpoint import _legacy_numpy_globals

    set_rng_state(load_plain(tmp_path / "rng.pt", allow=_legacy_numpy_globals()))
    assert draws() == expected


# --- a checkpoint that does not fit on the disk ----------------------------------------------


def can_mount_tmpfs() -> bool:
    mount = ["unshare", "-Urm", "sh", "-c", "mount -t tmpfs -o size=1m tmpfs /mnt"]
    probe = subprocess.run(mount, check=False, capture_output=True)
    return probe.returncode == 0


def test_a_full_disk_stops_the_run_with_one_line_and_no_partial_checkpoint(tmp_path):
    """A real 16 MiB filesystem: the step-2 checkpoint (11 MiB) fits, the step-4 one does not."""
    if shutil.which("unshare") is None or not can_mount_tmpfs():
        pytest.skip("no unprivileged user and mount namespaces here (unshare -Urm) for a small tmpfs")
    small, kept = tmp_path / "small", tmp_path / "kept"
    small.mkdir()
    cmd = train_cmd(None, [*FAST, "train.max_steps=4", "train.micro_batch_size=2", "checkpoint.every_steps=2",
                           f"output_dir={small}/run"])
    # The tmpfs lives as long as the namespace: copy what the run left before leaving it.
    script = f'mount -t tmpfs -o size=16m tmpfs "{small}" && "$@"; rc=$?; cp -a "{small}/run" "{kept}"; exit $rc'
    proc = subprocess.run(
        ["unshare", "-Urm", "sh", "-c", script, "sh", *cmd], check=False, cwd=REPO, env=run_env(),
        capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == EXIT_CHECKPOINT_WRITE, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "Logging error" not in proc.stderr, proc.stderr[-3000:]
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith("ftdist: CheckpointWriteError: checkpoint step_00000004 could not be written in "), line
    assert f"{small}/run/checkpoints" in line, line
    # DCP's writer serializes through torch.save, so a full disk surfaces as torch's short write
    # (the same RuntimeError measured on a 30 MB filesystem), or as ENOSPC from a plain write.
    assert "rank 0: a write came up short (" in line or "No space left on device" in line, line
    assert f"the last complete checkpoint is {small}/run/checkpoints/step_00000002" in line, line
    needed, free = re.search(r"needs about ([\d.]+) MiB \(the size of step_00000002\), ([\d.]+) MiB is free", line).groups()
    step2 = sum(p.stat().st_size for p in (kept / "checkpoints" / "step_00000002").rglob("*") if p.is_file())
    assert float(needed) == pytest.approx(step2 / 2**20, abs=0.06)  # the manifest excluded: 588 bytes
    assert float(free) < float(needed) and float(free) < 16
    assert sorted(p.name for p in (kept / "checkpoints").iterdir()) == ["step_00000002"]  # the partial is gone
    assert resolve_resume("auto", kept) == kept / "checkpoints" / "step_00000002"  # and it is intact
