"""Checkpoints that are complete or invisible, and exact resumption.

Layout: output_dir/checkpoints/step_00000040/ holding
  model_optimizer/   the strategy's own format (torch.distributed.checkpoint, or DeepSpeed's)
  trainer.pt         step, token and skip counters, scheduler state, batch geometry (rank 0)
  rng/rank{r}.pt     python, numpy, torch and CUDA generator states of each rank
  manifest.json      every file's size and sha256 (ftdist.integrity)
Every rank writes into step_N.partial/; the ranks then hash and fsync the files (each its share),
rank 0 writes the manifest and renames the directory to step_N: a checkpoint cut short by a
crash or a kill is never picked up by resume, and one damaged later (a truncated or lost shard)
is found by resume=auto, which falls back to the one before. Each phase ends in a vote of every
rank's outcome, so a rank whose write failed (disk full) stops all ranks with one message
instead of leaving them waiting in a collective. Checkpoint state is plain data and tensors,
read back with torch.load(weights_only=True). The data position needs no state of its own: the
sampler derives each step's batch from (seed, step), packing included.
"""

from __future__ import annotations

import hashlib
import logging
import os
import pickle
import random
import re
import shutil
import sys
from pathlib import Path

import numpy as np
import torch

from ftdist.config import ConfigError
from ftdist.integrity import (
    DamagedCheckpoint,
    check_files,
    check_sizes,
    fsync_dir,
    hash_share,
    list_files,
    read_manifest,
    shares,
    write_manifest,
)

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


class CheckpointWriteError(RuntimeError):
    """A checkpoint could not be written (disk full, quota, an I/O error). Every rank raises it
    with the same one-line message, its partial directory is gone, and ftdist.train exits with
    EXIT_CHECKPOINT_WRITE: a rerun resumes from the last complete checkpoint once there is room."""


class _RankFailed(Exception):
    """Some rank's part of a checkpoint failed; `failures` holds one line per failed rank."""

    def __init__(self, failures: list[str], storage: bool):
        super().__init__("; ".join(failures))
        self.failures, self.storage = failures, storage


class _OneProcess:
    """The collectives resolve_resume needs, for a caller without a strategy (tools, tests)."""

    rank, world_size, is_main = 0, 1, True

    def broadcast_object(self, obj):
        return obj

    def all_gather_object(self, obj) -> list:
        return [obj]


# torch.save's messages for a write that came up short (a full disk, as measured on a 30 MB
# filesystem: "[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598").
_SHORT_WRITE = ("inline_container.cc", "PytorchStreamWriter", "file write failed")


def _is_checkpoint_exception(e: BaseException) -> bool:
    """torch.distributed.checkpoint's CheckpointException (a BaseException), looked up without
    importing that package (0.7 s, torch.distributed.tensor with it) into runs that never use it:
    where it was never imported, nothing can have raised one."""
    api = sys.modules.get("torch.distributed.checkpoint.api")
    return api is not None and isinstance(e, api.CheckpointException)


def storage_error(e: BaseException) -> str | None:
    """One line for a failure of the storage (an OSError, torch's short write, either wrapped by
    torch.distributed.checkpoint); None for anything else, which keeps its traceback."""
    if _is_checkpoint_exception(e):
        found = (storage_error(inner) for inner, _ in e.failures.values())
        return next((m for m in found if m), None)
    if isinstance(e, OSError):
        return f"{e.strerror or e}" + (f" ({e.filename})" if e.filename else "")
    if isinstance(e, RuntimeError) and any(m in str(e) for m in _SHORT_WRITE):
        return f"a write came up short ({_first_line(e)})"
    return None


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [""])[0]


def _on_every_rank(strategy, fn) -> list:
    """fn() on every rank, then every rank learns all ranks' outcomes: the results, or the same
    _RankFailed everywhere. A rank whose write failed must not leave the others waiting for it
    in the next collective."""
    error = None
    try:
        result = fn()
    except BaseException as e:  # noqa: BLE001 - re-raised below; CheckpointException is a BaseException
        if not isinstance(e, Exception) and not _is_checkpoint_exception(e):
            raise  # KeyboardInterrupt, SystemExit and the like: not an outcome to vote on
        result, error = None, e
    storage = error is None or storage_error(error) is not None
    failure = None if error is None else storage_error(error) or f"{type(error).__name__}: {_first_line(error)}"
    outcomes = strategy.all_gather_object((result, failure, storage))
    if not storage:
        raise error  # a bug, not the storage: its own traceback; the other ranks stop below
    failed = [f"rank {r}: {f}" for r, (_, f, _) in enumerate(outcomes) if f]
    if failed:
        raise _RankFailed(failed, storage=all(ok for *_, ok in outcomes))
    return [r for r, _, _ in outcomes]


def _fresh_partial(partial: Path) -> None:
    shutil.rmtree(partial, ignore_errors=True)  # left by an earlier attempt at this step
    # model_optimizer/ too: DeepSpeed makes it on rank 0 alone, ahead of a barrier of its own.
    for sub in ("rng", "model_optimizer"):
        (partial / sub).mkdir(parents=True)


def _write_state(trainer, partial: Path) -> None:
    strategy = trainer.strategy
    strategy.save_checkpoint(trainer.model, trainer.optimizer, partial / "model_optimizer")
    torch.save(rng_state(), partial / "rng" / f"rank{strategy.rank}.pt")
    # An objective's own per-rank state (GRPO's rollouts mid-way through their iterations).
    objective_state = getattr(trainer.objective, "state_dict", lambda: None)()
    if objective_state is not None:
        (partial / "objective").mkdir(exist_ok=True)
        torch.save(objective_state, partial / "objective" / f"rank{strategy.rank}.pt")
    if strategy.is_main:
        torch.save(trainer.checkpoint_state(), partial / "trainer.pt")


def _commit(partial: Path, final: Path, entries: dict, trainer) -> None:
    write_manifest(partial, entries, trainer.step)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(partial, final)  # the commit point: atomic on one filesystem
    fsync_dir(final.parent)  # the rename itself survives a node crash
    prune(trainer.run_dir, trainer.cfg.checkpoint.keep)


def save_checkpoint(trainer) -> Path:
    """Write the full training state of `trainer` at its current step; every rank calls this.
    Raises CheckpointWriteError on every rank where any rank could not write its part."""
    strategy = trainer.strategy
    final = checkpoint_dir(trainer.run_dir, trainer.step)
    partial = final.with_name(final.name + ".partial")
    try:
        _on_every_rank(strategy, lambda: strategy.is_main and _fresh_partial(partial))
        _on_every_rank(strategy, lambda: _write_state(trainer, partial))
        sizes = _on_every_rank(strategy, lambda: list_files(partial) if strategy.is_main else None)[0]
        mine = shares(sizes, strategy.world_size)[strategy.rank]
        hashed = _on_every_rank(strategy, lambda: hash_share(partial, mine, sync=True))
        entries = {name: e for share in hashed for name, e in share.items()}
        _on_every_rank(strategy, lambda: strategy.is_main and _commit(partial, final, entries, trainer))
    except _RankFailed as e:
        if not e.storage:  # the failed rank raised its own error and takes part in no collective
            if strategy.is_main:
                shutil.rmtree(partial, ignore_errors=True)
            raise RuntimeError(f"checkpoint {final.name} failed on another rank: {e}") from None
        message = strategy.broadcast_object(_give_up(partial, final, e.failures) if strategy.is_main else None)
        raise CheckpointWriteError(message) from None
    log.info("checkpoint saved: %s (%s in %d files)", final, _size(sum(sizes.values())), len(sizes))
    return final


def _give_up(partial: Path, final: Path, failures: list[str]) -> str:
    """Remove what was written of the failed checkpoint; the one line every rank reports."""
    written = sum(list_files(partial).values()) if partial.is_dir() else 0
    shutil.rmtree(partial, ignore_errors=True)
    previous = [p for p in complete_checkpoints(final.parent.parent) if p != final]
    last = previous[-1] if previous else None
    needed = max(written, sum(list_files(last).values()) if last else 0)
    basis = f"the size of {last.name}" if last and needed > written else "what was written before it failed"
    free = shutil.disk_usage(_existing(final.parent)).free
    more = f" (and {len(failures) - 1} more)" if len(failures) > 1 else ""
    resume = f"{last} (a rerun resumes from it)" if last else "none (a rerun starts over)"
    return (
        f"checkpoint {final.name} could not be written in {final.parent}: {failures[0]}{more}; it needs about "
        f"{_size(needed)} ({basis}), {_size(free)} is free there; the last complete checkpoint is {resume}"
    )


def _existing(path: Path) -> Path:
    """`path` or its nearest existing parent (checkpoints/ itself may be what could not be made)."""
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _size(n: int) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return ""


# --- choosing the checkpoint to resume from ---------------------------------------------------


def checkpoint_problems(path: Path, strategy=None) -> list[str] | None:
    """What is wrong with checkpoint `path`, one line per file ([]: nothing); None where it has
    no manifest to check against. A collective: every rank hashes its share of the files."""
    strategy = strategy or _OneProcess()

    def manifest():
        try:
            return read_manifest(path), None
        except DamagedCheckpoint as e:
            return None, str(e)

    entries, problem = strategy.broadcast_object(manifest() if strategy.is_main else None)
    if problem:
        return [problem]
    if entries is None:
        return None
    mine = shares({name: e["size"] for name, e in entries.items()}, strategy.world_size)[strategy.rank]
    found = strategy.all_gather_object(check_files(path, entries, mine))
    return sorted(p for share in found for p in share)


def _candidates(resume: str, run_dir: Path) -> tuple[list[Path], str | None]:
    """(checkpoints to try, newest first; an error message)."""
    if resume == "auto":
        found = complete_checkpoints(run_dir)
        damaged = sorted(p.name for p in (run_dir / "checkpoints").glob("step_*.damaged"))
        if not found and damaged:
            # A rerun after every checkpoint was set aside must not silently start over.
            return [], (
                f"resume=auto: every checkpoint in {run_dir / 'checkpoints'} is damaged ({', '.join(damaged)}); "
                "resume=none starts over, resume=PATH picks one"
            )
        return found[::-1], None
    path = Path(resume).expanduser()
    if not path.is_dir():
        return [], f"resume={resume}: no such checkpoint directory"
    if not (path / "trainer.pt").is_file() or path.name.endswith(".partial"):
        return [], f"resume={resume}: not a complete ftdist checkpoint (no trainer.pt; cut short while saving?)"
    return [path], None


def _one_line(problems: list[str]) -> str:
    return problems[0] + (f" (and {len(problems) - 1} more)" if len(problems) > 1 else "")


def _set_aside(path: Path, problems: list[str]) -> None:
    """Rename a damaged checkpoint step_N.damaged: not tried (or counted by keep) again, and
    kept for a look (a file that only seemed lost, on a flaky filesystem, can be renamed back)."""
    damaged = path.with_name(path.name + ".damaged")
    shutil.rmtree(damaged, ignore_errors=True)
    try:
        os.replace(path, damaged)
    except OSError as e:
        log.warning("could not rename damaged checkpoint %s: %s", path, e)
        return
    log.warning("checkpoint %s is damaged: %s; set aside as %s (not tried again)", path, _one_line(problems), damaged.name)


def resolve_resume(resume: str, run_dir: Path, strategy=None) -> Path | None:
    """The checkpoint to resume from (None: a fresh start), the same on every rank.

    Every rank of `strategy` calls it (rank 0 lists, every rank checks its share of the files);
    without a strategy this process checks alone. resume=auto takes the newest checkpoint whose
    files match its manifest, setting damaged ones aside with a warning; resume=PATH to a damaged
    checkpoint is a ConfigError. A checkpoint without a manifest (ftdist before manifests) is
    taken, with a warning that it was not checked."""
    strategy = strategy or _OneProcess()
    if resume == "none":
        return None
    candidates, error = strategy.broadcast_object(_candidates(resume, run_dir) if strategy.is_main else None)
    if error:
        raise ConfigError(error)
    rejected = []
    for path in candidates:
        problems = checkpoint_problems(path, strategy)
        if not problems:
            if problems is None and strategy.is_main:
                log.warning("resume: %s has no manifest (written before ftdist wrote them): its files are not checked", path)
            return path
        if resume != "auto":
            raise ConfigError(f"resume={resume}: damaged checkpoint: {_one_line(problems)}")
        if strategy.is_main:
            _set_aside(path, problems)
        rejected.append(f"{path.name}: {_one_line(problems)}")
    if rejected:
        raise ConfigError(
            f"resume=auto: no intact checkpoint in {run_dir / 'checkpoints'} ({'; '.join(rejected)}); "
            "each was renamed step_N.damaged; resume=none starts over"
        )
    return None


# --- state as plain data ----------------------------------------------------------------------


def rng_state() -> dict:
    """Every generator's state as plain data and tensors (read back with weights_only=True):
    numpy's legacy state holds an ndarray, stored here as a list of ints."""
    name, key, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "python": random.getstate(),  # (version, tuple of 625 ints, None or a float)
        "numpy": {"name": name, "key": key.tolist(), "pos": pos, "has_gauss": has_gauss, "gauss": gauss},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    saved = state["numpy"]
    if isinstance(saved, dict):
        keys = ("name", "key", "pos", "has_gauss", "gauss")
        saved = tuple(np.asarray(saved[k], dtype=np.uint32) if k == "key" else saved[k] for k in keys)
    np.random.set_state(saved)  # a tuple: written before the dict form
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def load_plain(path: Path, allow: tuple = ()):
    """torch.load with weights_only=True: a file holding a pickled object other than plain data
    and tensors (code that would run on load) is refused, naming the file and the object."""
    try:
        with torch.serialization.safe_globals(list(allow)):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        # torch words it "Unsupported global: GLOBAL m.f" or "unsupported GLOBAL m.f whose module...".
        found = re.search(r"GLOBAL ([\w.]+)", str(e))
        what = found.group(1) if found else "an object torch does not accept as plain data"
        raise ConfigError(
            f"resume: {path} holds a pickled object that is not plain data ({what}); ftdist reads checkpoint "
            "state with torch.load(weights_only=True) and runs no code from a file"
        ) from None
    except (RuntimeError, EOFError) as e:  # a checkpoint without a manifest is not checked first
        raise ConfigError(f"resume: {path} is unreadable ({str(e).strip().splitlines()[0]})") from None


def _legacy_numpy_globals() -> tuple:
    """What an ndarray pickles as: RNG files written before the plain form hold numpy's state."""
    multiarray = getattr(np, "_core", None) or np.core
    return (multiarray.multiarray._reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32)))


def train_data_fingerprint(examples, items: list[list[int]]) -> str:
    """sha256 over every training example's token ids and labels and over how items group them:
    resuming on other data of the same size would silently train on other batches."""
    h = hashlib.sha256()
    hash_examples(h, examples)
    for item in items:
        h.update(np.asarray([len(item), *item], dtype=np.int64).tobytes())
    return h.hexdigest()


def hash_examples(h, examples) -> None:
    """Feed `h` each example's length, token ids and labels (int64; a pair's are chosen then
    rejected). Memory-mapped examples feed the same bytes, in bulk."""
    if hasattr(examples, "fingerprint_into"):
        examples.fingerprint_into(h)
        return
    for e in examples:
        ids = np.asarray(e.input_ids, dtype=np.int64)
        h.update(np.int64(ids.size).tobytes())
        h.update(ids.tobytes())
        h.update(np.asarray(e.labels, dtype=np.int64).tobytes())


def prune(run_dir: Path, keep: int) -> None:
    """Keep the newest `keep` checkpoints whose files are all there at their sizes (a check by
    stat alone: this runs at every save); damaged ones are set aside and do not count, so keep=N
    never deletes the last good checkpoint and leaves damaged ones in its place."""
    kept = 0
    for path in reversed(complete_checkpoints(run_dir)):
        if kept >= keep:
            shutil.rmtree(path, ignore_errors=True)
            continue
        problems = check_sizes(path)
        if problems:
            _set_aside(path, problems)
        else:
            kept += 1


def load_checkpoint(trainer, path: Path) -> None:
    """Restore `trainer` from a checkpoint written by save_checkpoint (any world size where the
    strategy can reshard)."""
    state = load_plain(path / "trainer.pt")
    if state.get("format") != FORMAT_VERSION:
        raise ConfigError(f"resume: {path} has checkpoint format {state.get('format')}, expected {FORMAT_VERSION}")
    trainer.check_resumable(state, path)
    trainer.strategy.load_checkpoint(trainer.model, trainer.optimizer, path / "model_optimizer", state)
    trainer.restore_checkpoint_state(state)
    rng = path / "rng" / f"rank{trainer.strategy.rank}.pt"
    if rng.is_file():
        set_rng_state(load_plain(rng, allow=_legacy_numpy_globals()))
    else:
        # Expected after resharding to more ranks; otherwise the file was lost. Either way the
        # resumed steps will not repeat an uninterrupted run's random draws (dropout).
        saved = sorted(p.name for p in (path / "rng").glob("rank*.pt"))
        log.warning(
            "resume: %s has no RNG state for rank %d (it holds %s): random draws from here on differ from an "
            "uninterrupted run's", path, trainer.strategy.rank, ", ".join(saved) or "none",
        )
    objective_state = path / "objective" / f"rank{trainer.strategy.rank}.pt"
    if objective_state.is_file():
        trainer.objective.load_state_dict(load_plain(objective_state), trainer.step)
    log.info("resumed from %s at step %d", path, trainer.step)
