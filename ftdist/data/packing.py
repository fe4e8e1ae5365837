"""Sequence packing: several documents per row of `max_seq_len` tokens, never mixing them.

Which documents share a row is decided once, from (lengths, seed): best-fit-decreasing bin
packing applied to consecutive windows of a seeded shuffle. Within a window rows come out
nearly full; across windows the order stays random, and every rank computes the same rows.
What keeps documents apart is in `collate_packed`: position ids restart at 0 for every
document, the first token of a document is never a label (it would be predicted from the
previous document), and a per-token document id lets the model build a block-diagonal
causal mask (see ftdist.model.attention).
"""

from __future__ import annotations

import bisect
import logging
import os
import random
import time
import uuid
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from ftdist.constants import IGNORE_INDEX
from ftdist.data.loader import Batch
from ftdist.data.prepare import Example

PAD_DOCUMENT = -1  # document id of padding positions

log = logging.getLogger(__name__)


def example_lengths(examples) -> Sequence[int]:
    """Tokens per example (both sequences of a preference pair): memory-mapped examples
    (ftdist.data.columns) hold them in memory, so no example is built to count them."""
    mapped = getattr(examples, "lengths", None)
    if mapped is not None:
        return mapped.tolist()  # Python ints: callers index them one at a time and write them to JSON
    return [len(e) if hasattr(e, "chosen") else len(e.input_ids) for e in examples]


def packed_items(examples, capacity: int, seed: int, window: int) -> list[list[int]]:
    """pack_documents of the examples' lengths; for memory-mapped examples, read from (or saved
    to) the cache entry beside them, since packing a million documents takes seconds each run."""
    directory = getattr(examples, "directory", None)
    if directory is None:
        return pack_documents(example_lengths(examples), capacity, seed, window)
    path = Path(directory) / f"packing-{examples.split}-{capacity}-{seed}-{window}.npz"
    if path.is_file():
        return load_rows(path)
    started = time.monotonic()
    rows = pack_documents(example_lengths(examples), capacity, seed, window)
    try:
        save_rows(path, rows)
    except OSError as e:  # a read-only cache directory: packing is cheap enough to redo next time
        log.warning("packing: cannot save the packed rows to %s (%s); they are computed again next run", path, e)
    log.info("packing: %d documents into %d rows in %.1f s", sum(len(r) for r in rows), len(rows),
             time.monotonic() - started)
    return rows


def save_rows(path: Path, rows: list[list[int]]) -> None:
    """Packed rows as flat indices and row offsets. Written under a private name and renamed:
    ranks that pack at once each write a whole file, and a reader never sees half of one."""
    offsets = np.zeros(len(rows) + 1, dtype=np.int64)
    np.cumsum([len(r) for r in rows], out=offsets[1:])
    indices = np.fromiter((i for r in rows for i in r), dtype=np.int64, count=int(offsets[-1]))
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.npz")
    try:
        np.savez(tmp, indices=indices, offsets=offsets)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def load_rows(path: Path) -> list[list[int]]:
    with np.load(path) as saved:
        flat, offsets = saved["indices"].tolist(), saved["offsets"].tolist()
    return [flat[a:b] for a, b in zip(offsets[:-1], offsets[1:])]


def pack_documents(lengths: Sequence[int], capacity: int, seed: int, window: int = 2000) -> list[list[int]]:
    """Group document indices into rows whose lengths sum to at most `capacity`."""
    if isinstance(lengths, np.ndarray):  # indexing a list is several times faster in the loop below
        lengths = lengths.tolist()
    if any(n > capacity for n in lengths):
        raise ValueError(f"a document is longer than the row capacity {capacity}; truncate first")
    order = list(range(len(lengths)))
    rng = random.Random(seed)
    rng.shuffle(order)
    rows: list[list[int]] = []
    for start in range(0, len(order), window):
        chunk = rows_best_fit(order[start : start + window], lengths, capacity)
        rng.shuffle(chunk)
        rows.extend(chunk)
    return rows


def rows_best_fit(indices: list[int], lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Best-fit decreasing: each document, longest first, goes to the fullest row it fits in."""
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (free tokens, row number), kept sorted
    for i in sorted(indices, key=lambda i: -lengths[i]):
        n = lengths[i]
        pos = bisect.bisect_left(free, (n, -1))
        if pos == len(free):
            rows.append([i])
            bisect.insort(free, (capacity - n, len(rows) - 1))
        else:
            room, row = free.pop(pos)
            rows[row].append(i)
            bisect.insort(free, (room - n, row))
    return rows


def collate_packed(rows: Sequence[Sequence[Example]], pad_token_id: int) -> Batch:
    """Concatenate each row's documents; right-pad rows to the longest one in the batch."""
    width = max(sum(len(e.input_ids) for e in row) for row in rows)
    ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    positions = torch.zeros((len(rows), width), dtype=torch.long)
    documents = torch.full((len(rows), width), PAD_DOCUMENT, dtype=torch.long)
    segments: list[list[tuple[int, int]]] = []
    for r, row in enumerate(rows):
        segments.append([])
        at = 0
        for d, e in enumerate(row):
            n = len(e.input_ids)
            ids[r, at : at + n] = torch.tensor(e.input_ids)
            doc_labels = torch.tensor(e.labels)
            doc_labels[0] = IGNORE_INDEX  # never predicted across the boundary
            labels[r, at : at + n] = doc_labels
            positions[r, at : at + n] = torch.arange(n)
            documents[r, at : at + n] = d
            segments[r].append((at, n))
            at += n
    mask = (documents != PAD_DOCUMENT).long()
    return Batch.from_tensors(
        ids, mask, labels, position_ids=positions, document_ids=documents, segments=segments,
        num_documents=sum(len(r) for r in rows),
    )
