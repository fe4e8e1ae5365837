"""Checkpoints that are complete or invisible, and exact resumption.

Layout: output_dir/checkpoints/step_00000040/ holding
  model_optimizer/   the strategy's own format (torch.distributed.checkpoint, or DeepSpeed's)
  trainer.pt         step, token and skip counters, scheduler state, batch geometry (rank 0)
  rng/rank{r}.pt     python, numpy, torch and CUDA generator states of each rank
Every rank writes into step_N.partial/; after a barrier rank 0 renames it to step_N, so a
checkpoint cut short by a crash or a kill is never picked up by resume. The data position needs
no state of its own: the sampler derives each step's batch from (seed, step), packing included.
"""

from __future__ import annotations

import hashlib
import logging
import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch

from ftdist.config import ConfigError

log = logging.getLogger("ftdist")

STEP_DIR = re.compile(r"^step_(\d{8})$")
FORMAT_VERSION = 1


def checkpoint_dir(run_dir: Path, step: int) -> Path:
    return run_dir / "checkpoints" / f"step_{step:08d}"


def complete_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first (partial ones have another name)."""
    root = run_dir / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and STEP_DIR.match(p.name)]
    return sorted(found, key=lambda p: int(STEP_DIR.match(p.name).group(1)))


def resolve_resume(resume: str, run_dir: Path) -> Path | None:
    """The checkpoint to resume from: None for a fresh start."""
    if resume == "none":
        return None
    if resume == "auto":
        found = complete_checkpoints(run_dir)
        return found[-1] if found else None
    path = Path(resume).expanduser()
    if not path.is_dir():
        raise ConfigError(f"resume={resume}: no such checkpoint directory")
    if not (path / "trainer.pt").is_file() or path.name.endswith(".partial"):
        raise ConfigError(f"resume={resume}: not a complete ftdist checkpoint (no trainer.pt; cut short while saving?)")
    return path


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(trainer) -> Path:
    """Write the full training state of `trainer` at its current step; every rank calls this."""
    strategy = trainer.strategy
    final = checkpoint_dir(trainer.run_dir, trainer.step)
    partial = final.with_name(final.name + ".partial")
    if strategy.is_main:
        shutil.rmtree(partial, ignore_errors=True)  # left by an earlier attempt at this step
        (partial / "rng").mkdir(parents=True)
    strategy.barrier()
    strategy.save_checkpoint(trainer.model, trainer.optimizer, partial / "model_optimizer")
    torch.save(rng_state(), partial / "rng" / f"rank{strategy.rank}.pt")
    if strategy.is_main:
        torch.save(trainer.checkpoint_state(), partial / "trainer.pt")
    strategy.barrier()
    if strategy.is_main:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(partial, final)  # the commit point: atomic on one filesystem
        prune(trainer.run_dir, trainer.cfg.checkpoint.keep)
        log.info("checkpoint saved: %s", final)
    strategy.barrier()
    return final


def train_data_fingerprint(examples, items: list[list[int]]) -> str:
    """sha256 over every training example's token ids and labels and over how items group them:
    resuming on other data of the same size would silently train on other batches."""
    h = hashlib.sha256()
    for e in examples:
        ids = np.asarray(e.input_ids, dtype=np.int64)
        h.update(np.int64(ids.size).tobytes())
        h.update(ids.tobytes())
        h.update(np.asarray(e.labels, dtype=np.int64).tobytes())
    for item in items:
        h.update(np.asarray([len(item), *item], dtype=np.int64).tobytes())
    return h.hexdigest()


def prune(run_dir: Path, keep: int) -> None:
    for old in complete_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def load_checkpoint(trainer, path: Path) -> None:
    """Restore `trainer` from a checkpoint written by save_checkpoint (any world size where the
    strategy can reshard)."""
    state = torch.load(path / "trainer.pt", weights_only=False)
    if state.get("format") != FORMAT_VERSION:
        raise ConfigError(f"resume: {path} has checkpoint format {state.get('format')}, expected {FORMAT_VERSION}")
    trainer.check_resumable(state, path)
    trainer.strategy.load_checkpoint(trainer.model, trainer.optimizer, path / "model_optimizer", state)
    trainer.restore_checkpoint_state(state)
    rng = path / "rng" / f"rank{trainer.strategy.rank}.pt"
    if rng.is_file():
        set_rng_state(torch.load(rng, weights_only=False))
    else:
        # Expected after resharding to more ranks; otherwise the file was lost. Either way the
        # resumed steps will not repeat an uninterrupted run's random draws (dropout).
        saved = sorted(p.name for p in (path / "rng").glob("rank*.pt"))
        log.warning(
            "resume: %s has no RNG state for rank %d (it holds %s): random draws from here on differ from an "
            "uninterrupted run's", path, trainer.strategy.rank, ", ".join(saved) or "none",
        )
    log.info("resumed from %s at step %d", path, trainer.step)
