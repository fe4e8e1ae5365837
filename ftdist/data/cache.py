"""The tokenized cache: prepare the data once, in parallel, and map it in every later run and rank.

An entry is a directory `<data.cache_dir>/<key digest>/` holding the prepared splits as
memory-mapped columns (ftdist.data.columns), the DataReport and the key it was built for
(`meta.json`). The key covers everything that changes tokens: the source files (path, size,
modification time and a hash of their first and last MiB; a hub dataset's fingerprint), the
tokenizer (its whole serialized pipeline, chat template and special tokens), every `data.*`
setting but the ones that only say how to build (cache, cache_dir, num_proc) or how to batch
(packing, packing_window), the seed (hold-out and synthetic rows), the objective's fixed labels
and margin field, and the source code of ftdist.data. Any change gives another entry; nothing
stale is ever read.

Builds are safe to race: a builder writes a private temporary directory and renames it into
place (rename is atomic, so an entry is complete or absent), under a lock file so a second
builder of the same key waits and then finds it built. In a job, local rank 0 of each node
builds (on a shared cache directory the lock makes that one build); every other rank waits on a
collective with a long timeout and then maps the entry read-only.

Rows are encoded by `data.num_proc` forked workers, each a contiguous run of rows written as a
shard, merged in row order: the result is the one prepare_in_process gives, byte for byte.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import fcntl
import hashlib
import json
import logging
import os
import shutil
import socket
import time
import uuid
from pathlib import Path

from ftdist.config import DataConfig
from ftdist.data import columns
from ftdist.data.columns import MappedExamples, kind_of, merge_splits, write_split
from ftdist.data.encoding import (
    DataPlan,
    DataReport,
    EncodedChunk,
    _warn_losses,
    encode_chunk,
    finish_report,
    plan_data,
)
from ftdist.data.sources import DataError, source_kind

log = logging.getLogger(__name__)

CACHE_FORMAT = 1
# What a build may take before the ranks waiting on it give up: a cold build of a large dataset
# takes many minutes, far longer than the process group's timeout for training collectives.
BUILD_WAIT = datetime.timedelta(hours=6)
# Settings that do not change the prepared examples.
NOT_IN_KEY = ("cache", "cache_dir", "num_proc", "packing", "packing_window")
MAX_PROC = 8
ROWS_PER_TASK = 2000  # rows per shard: small enough to balance workers, large enough to amortise a file set


def cache_root(cfg: DataConfig) -> Path:
    if cfg.cache_dir:
        return Path(os.path.expanduser(cfg.cache_dir))
    return Path(os.environ.get("FTDIST_CACHE", Path.home() / ".cache" / "ftdist")) / "data"


def cached_data(cfg: DataConfig, tokenizer, seed: int, labels: list | None, margin_field: str | None):
    """(train, val, report) from the cache entry of this data, built first where missing."""
    started = time.monotonic()
    key = cache_key(cfg, tokenizer, seed, labels, margin_field)
    path = cache_root(cfg) / digest(key)
    built = False
    outcome = None
    if _local_rank() == 0:
        try:
            built = ensure_built(path, key, cfg, tokenizer, seed, labels, margin_field)
            outcome = ("ok", "")
        except DataError as e:
            outcome = ("data", str(e))
            if not _distributed():
                raise
        except Exception as e:  # noqa: BLE001 (the waiting ranks must hear of any failure, then it propagates)
            if not _distributed():
                raise
            _share_outcome(("error", f"{type(e).__name__}: {e}"))
            raise
    for kind, message in _share_outcome(outcome):
        if kind == "data":
            raise DataError(message)
        if kind == "error":
            raise RuntimeError(f"building the data cache {path} failed on another rank: {message}")
    train, val, report = open_entry(path)
    if not built:  # the build warned of what the data lost; a reuse says it again
        _warn_losses(report, cfg.max_seq_len)
    log.info("data: %s cache %s (%d train, %d validation examples) in %.1f s", "built" if built else "reused",
             path, len(train), len(val), time.monotonic() - started)
    return train, val, report


def open_entry(path: Path) -> tuple[MappedExamples, MappedExamples, DataReport]:
    meta = json.loads((path / "meta.json").read_text())
    report = DataReport(**meta["report"])
    return MappedExamples(path, "train", meta["kind"]), MappedExamples(path, "val", meta["kind"]), report


# --- the key ---------------------------------------------------------------------------------


def cache_key(cfg: DataConfig, tokenizer, seed: int, labels: list | None, margin_field: str | None) -> dict:
    settings = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in NOT_IN_KEY}
    return {
        "format": CACHE_FORMAT,
        "code": code_fingerprint(),
        "source": source_fingerprint(cfg.path, cfg.split),
        "validation_source": None if cfg.validation_path is None else source_fingerprint(cfg.validation_path, cfg.split),
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "data": settings,
        "seed": seed,
        "labels": None if labels is None else [str(x) for x in labels],
        "margin_field": margin_field,
    }


def digest(key: dict) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:24]


def code_fingerprint() -> str:
    """The source of ftdist.data (and the constants it uses): a change to how rows are encoded
    must not reuse examples encoded the old way."""
    h = hashlib.sha256()
    package = Path(columns.__file__).parent
    for path in sorted(package.glob("*.py")) + [package.parent / "constants.py"]:
        h.update(path.name.encode())
        h.update(path.read_bytes())
    return h.hexdigest()


def source_fingerprint(path: str, split: str) -> dict:
    path = os.path.expanduser(path)
    kind = source_kind(path)
    if kind == "synthetic":  # generated from (name, rows, seed), which the key holds; code_fingerprint covers the generator
        return {"synthetic": path}
    if kind == "file":
        return _file_fingerprint(path)
    if kind == "missing":
        raise DataError(f"data file not found: {path} (working directory: {os.getcwd()})")
    if os.path.isdir(path):
        files = sorted(p for p in Path(path).rglob("*") if p.is_file())
        return {"directory": os.path.realpath(path), "split": split, "files": [_file_fingerprint(str(p)) for p in files]}
    return {"hub": path, "split": split, "fingerprint": _hub_fingerprint(path, split)}


def _file_fingerprint(path: str) -> dict:
    stat = os.stat(path)
    h = hashlib.sha256()
    with open(path, "rb") as f:  # the ends of the file: a copy that kept size and time still differs here
        h.update(f.read(1 << 20))
        if stat.st_size > 2 << 20:
            f.seek(-(1 << 20), os.SEEK_END)
            h.update(f.read())
    return {"path": os.path.realpath(path), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "ends": h.hexdigest()}


def _hub_fingerprint(name: str, split: str) -> str:
    import datasets

    try:
        return datasets.load_dataset(name, split=split)._fingerprint
    except Exception as e:  # noqa: BLE001 (network, auth and missing-split errors alike)
        raise DataError(f"cannot load dataset '{name}' (split '{split}'): {type(e).__name__}: {e}") from None


def tokenizer_fingerprint(tokenizer) -> str:
    h = hashlib.sha256(type(tokenizer).__name__.encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        h.update(backend.to_str().encode())
    else:
        h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    h.update(json.dumps([tokenizer.chat_template, tokenizer.bos_token_id, tokenizer.eos_token_id,
                         tokenizer.pad_token_id, str(getattr(tokenizer, "special_tokens_map", {})),
                         getattr(tokenizer, "truncation_side", None)], default=str).encode())
    return h.hexdigest()


# --- building --------------------------------------------------------------------------------


def ensure_built(path: Path, key: dict, cfg: DataConfig, tokenizer, seed: int, labels, margin_field) -> bool:
    """Build the entry at `path` unless it exists; True when this call built it."""
    if (path / "meta.json").is_file():
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    with _locked(path.parent / f"{path.name}.lock"):
        if (path / "meta.json").is_file():  # another builder finished while this one waited
            return False
        # Holding the lock, no other builder of this key on this host is at work: what is left of
        # one here died (its temporary directory; another host's may be live where the filesystem
        # does not share locks between hosts), and an entry without meta.json was damaged by hand.
        left = path.parent.glob(f".tmp-{path.name}-{socket.gethostname()}-*")
        for stale in [*left, *([path] if path.exists() else [])]:
            log.warning("data: removing %s, left by a cache build that did not finish", stale)
            shutil.rmtree(stale, ignore_errors=True)
        build(path, key, cfg, tokenizer, seed, labels, margin_field)
    return True


@contextlib.contextmanager
def _locked(lock: Path):
    with open(lock, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


# The plan a forked worker encodes from: set in the parent before the fork, inherited by the
# workers (the rows are shared copy-on-write instead of pickled to each one).
_PLAN: DataPlan | None = None


def build(path: Path, key: dict, cfg: DataConfig, tokenizer, seed: int, labels, margin_field) -> None:
    global _PLAN
    started = time.monotonic()
    plan = plan_data(cfg, tokenizer, seed, labels, margin_field)
    kind = kind_of(cfg.format)
    tmp = path.parent / f".tmp-{path.name}-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    shards = tmp / "shards"
    shards.mkdir(parents=True)
    tasks: list[tuple] = []
    for source, rows in plan.sources:
        for start in range(0, len(rows), ROWS_PER_TASK):
            tasks.append((len(tasks), source, start, min(start + ROWS_PER_TASK, len(rows)), str(shards), kind))
    workers = min(num_workers(cfg), len(tasks))
    log.info("data: building the cache %s from %d rows with %d process(es)", path,
             sum(len(rows) for _, rows in plan.sources), workers)
    try:
        _PLAN = plan
        results = _run_tasks(tasks, workers)
        _PLAN = None
        failed = [r for r in results if isinstance(r, DataError)]
        if failed:  # the first bad row in file order, whichever worker met it first
            raise failed[0]
        report = finish_report(plan, results)
        del plan
        shard_dirs = [shards / str(i) for i in range(len(tasks))]
        for split in ("train", "val"):
            merge_splits(shard_dirs, tmp, split, kind)
        shutil.rmtree(shards)
        meta = {"format": CACHE_FORMAT, "kind": kind, "key": key, "report": report.to_dict(),
                "built": {"host": socket.gethostname(), "pid": os.getpid(), "processes": workers,
                          "seconds": round(time.monotonic() - started, 2)}}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1, default=str) + "\n")
        try:
            os.rename(tmp, path)
        except OSError:  # a builder that held no lock (a filesystem without flock) got there first
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        _PLAN = None
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    with open(path.parent / "builds.jsonl", "a") as f:  # one line per build: who built what, how long
        f.write(json.dumps({"entry": path.name, **meta["built"]}) + "\n")
    log.info("data: built %s in %.1f s", path, time.monotonic() - started)


def num_workers(cfg: DataConfig) -> int:
    if cfg.num_proc:
        return cfg.num_proc
    return max(1, min(MAX_PROC, len(os.sched_getaffinity(0))))


def _run_tasks(tasks: list[tuple], workers: int) -> list:
    if workers <= 1:
        return [_encode_task(t) for t in tasks]
    import multiprocessing

    # Fork, so the workers share the parent's rows. tokenizers warns in a forked child once its
    # parent used its thread pool, unless told parallelism is off: the workers are the parallelism.
    previous = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    try:
        with multiprocessing.get_context("fork").Pool(workers) as pool:
            return pool.map(_encode_task, tasks, chunksize=1)
    finally:
        if previous is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = previous


def _encode_task(task: tuple) -> EncodedChunk | DataError:
    """Encode one run of rows and write its examples as a shard; hand back the counts only."""
    index, source, start, stop, shards, kind = task
    try:
        chunk = encode_chunk(_PLAN, source, start, stop)
    except DataError as e:
        return e
    directory = Path(shards) / str(index)
    directory.mkdir()
    write_split(directory, "train", kind, chunk.train)
    write_split(directory, "val", kind, chunk.val)
    chunk.train, chunk.val = [], []
    return chunk


# --- ranks -----------------------------------------------------------------------------------


def _local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0")) if _distributed() else 0


def _distributed() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


_WAIT_GROUP = None


def _share_outcome(outcome) -> list:
    """Every builder's outcome, on every rank, through a gloo group whose timeout allows a long build."""
    if not _distributed():
        return [outcome] if outcome else []
    global _WAIT_GROUP
    import torch.distributed as dist

    if _WAIT_GROUP is None:
        _WAIT_GROUP = dist.new_group(backend="gloo", timeout=BUILD_WAIT)
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, outcome, group=_WAIT_GROUP)
    return [o for o in gathered if o]
