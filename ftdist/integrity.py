"""What a checkpoint's files should be: a manifest of every file's size and sha256.

save_checkpoint hashes (and fsyncs) the files of step_N.partial/ before the commit rename, so a
committed checkpoint lists exactly the bytes it was written with; resume checks them again. At
70B scale a checkpoint is hundreds of GB (weights plus optimizer state), so no rank reads it all:
the files are split over the ranks by size (`shares`) and each rank hashes its own share. Every
rank computes the same split from the same list, so only file names and digests travel.

The manifest guards against truncation, lost files and flipped bits; it is not a signature (who
can rewrite the files can rewrite the manifest).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

MANIFEST = "manifest.json"
MANIFEST_FORMAT = 1
CHUNK = 8 << 20  # bytes per read: large enough that hashing, not syscalls, sets the pace


class DamagedCheckpoint(Exception):
    """A checkpoint whose manifest cannot be read; the message says what is wrong with it."""


def list_files(root: Path) -> dict[str, int]:
    """Relative path -> size of every file under `root` but the manifest, sorted by path."""
    sizes = {p.relative_to(root).as_posix(): p.stat().st_size for p in root.rglob("*") if p.is_file()}
    sizes.pop(MANIFEST, None)
    return dict(sorted(sizes.items()))


def shares(sizes: dict[str, int], world_size: int) -> list[list[str]]:
    """The files split over ranks by bytes (largest first, each to the least-loaded rank): the
    same answer on every rank for the same `sizes`."""
    loads, out = [0] * world_size, [[] for _ in range(world_size)]
    for name in sorted(sizes, key=lambda n: (-sizes[n], n)):
        rank = min(range(world_size), key=lambda r: (loads[r], r))
        out[rank].append(name)
        loads[rank] += sizes[name]
    return out


def hash_file(path: Path, sync: bool = False) -> tuple[int, str]:
    """(bytes read, sha256) of a file; with sync, its data is forced to disk as well."""
    digest, size = hashlib.sha256(), 0
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
            size += len(chunk)
        if sync:
            # fsync through any descriptor flushes the file's dirty pages, whoever wrote them.
            os.fsync(f.fileno())
    return size, digest.hexdigest()


def hash_share(root: Path, names: list[str], sync: bool) -> dict[str, dict]:
    entries = {}
    for name in names:
        size, sha = hash_file(root / name, sync)
        entries[name] = {"size": size, "sha256": sha}
    return entries


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_manifest(root: Path, entries: dict[str, dict], step: int) -> None:
    """manifest.json in `root`, durable together with every directory entry under `root`
    (the files themselves were fsync'ed as they were hashed)."""
    manifest = {"format": MANIFEST_FORMAT, "step": step, "algorithm": "sha256", "files": dict(sorted(entries.items()))}
    path = root / MANIFEST
    with open(path, "w") as f:
        json.dump(manifest, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    for d in sorted({(root / name).parent for name in entries} | {root}, key=lambda p: -len(p.parts)):
        fsync_dir(d)


def read_manifest(root: Path) -> dict[str, dict] | None:
    """The manifest's file entries; None where the checkpoint has no manifest (written before
    ftdist wrote them). Raises DamagedCheckpoint where it is there but unreadable."""
    path = root / MANIFEST
    if not path.exists():
        return None
    try:
        manifest = json.loads(path.read_text())
        files = manifest["files"]
        if manifest["format"] != MANIFEST_FORMAT or not all({"size", "sha256"} <= set(e) for e in files.values()):
            raise ValueError(f"format {manifest['format']}")
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise DamagedCheckpoint(f"{MANIFEST} is unreadable ({type(e).__name__}: {e})") from None
    return files


def _size_problem(path: Path, name: str, expected: dict) -> str | None:
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return f"{name} is missing ({expected['size']} bytes in the manifest)"
    if size != expected["size"]:
        return f"{name} is {size} bytes, the manifest says {expected['size']}"
    return None


def check_files(root: Path, entries: dict[str, dict], names: list[str]) -> list[str]:
    """What is wrong with files `names` of `root` against the manifest's entries: one line each."""
    problems = []
    for name in names:
        expected = entries[name]
        try:
            # A wrong size tells already: no need to read the file.
            problem = _size_problem(root / name, name, expected) or _digest_problem(root / name, name, expected)
        except OSError as e:
            problem = f"{name} is unreadable ({e.strerror or e})"
        if problem:
            problems.append(problem)
    return problems


def _digest_problem(path: Path, name: str, expected: dict) -> str | None:
    _, sha = hash_file(path)
    if sha != expected["sha256"]:
        return f"{name} has sha256 {sha[:12]}..., the manifest says {expected['sha256'][:12]}..."
    return None


def check_sizes(root: Path) -> list[str]:
    """The cheap part of the check (presence and sizes, no reading): for pruning, which runs at
    every save and must not read old checkpoints back."""
    try:
        entries = read_manifest(root)
    except DamagedCheckpoint as e:
        return [str(e)]
    if entries is None:
        return []
    found = (_size_problem(root / name, name, expected) for name, expected in entries.items())
    return [p for p in found if p]
