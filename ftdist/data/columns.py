"""Prepared examples as memory-mapped columns: how the tokenized cache stores them and reads them back.

A split is a set of `.npy` files in one directory, named `SPLIT.COLUMN.PART.npy`. A ragged column
(token ids of every example, back to back) is `values` (int32) and `offsets` (int64, n + 1),
plus a `none` mask where an example may have no value (an Example without prompt_ids); text is a
ragged column of UTF-8 bytes; a scalar column is one value per example. Reading maps the files
(np.load(mmap_mode="r")): only offsets and lengths are touched until an example is asked for,
and every process on a node shares the page cache instead of holding its own copy.

`MappedExamples` is what the trainer gets: a read-only sequence whose items are the same
Example, Pair or Document objects prepare_in_process builds, made on access.
"""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ftdist.data.example import Document, Example
from ftdist.data.preference import Pair

# kind -> columns: (name, type) with type ragged | ragged? (may be None) | text? | int | float? | bool | text
EXAMPLE_COLUMNS = [("ids", "ragged"), ("labels", "ragged"), ("prompt_ids", "ragged?"), ("reference", "text?")]
KINDS = {
    "example": EXAMPLE_COLUMNS,
    "pair": [(f"{side}.{name}", kind) for side in ("chosen", "rejected") for name, kind in EXAMPLE_COLUMNS]
    + [("margin", "float?")],
    "document": [("ids", "ragged"), ("target", "int"), ("truncated", "bool"), ("label", "text")],
}


def kind_of(data_format: str) -> str:
    return {"preference": "pair", "classification": "document"}.get(data_format, "example")


def _values(kind: str, examples: list) -> dict[str, list]:
    """Each column's per-example values, read off the objects."""
    if kind == "document":
        return {"ids": [d.input_ids for d in examples], "target": [d.target for d in examples],
                "truncated": [d.truncated for d in examples], "label": [d.label for d in examples]}
    if kind == "pair":
        out = {}
        for side in ("chosen", "rejected"):
            for name, values in _values("example", [getattr(p, side) for p in examples]).items():
                out[f"{side}.{name}"] = values
        out["margin"] = [p.margin for p in examples]
        return out
    return {"ids": [e.input_ids for e in examples], "labels": [e.labels for e in examples],
            "prompt_ids": [e.prompt_ids for e in examples], "reference": [e.reference for e in examples]}


def write_split(directory: Path, split: str, kind: str, examples: list) -> None:
    """Write `examples` as the columns of `split` under `directory`."""
    values = _values(kind, examples)
    for name, column_type in KINDS[kind]:
        stem = directory / f"{split}.{name}"
        column = values[name]
        if column_type in ("int", "bool", "float?"):
            dtype = {"int": np.int64, "bool": np.bool_, "float?": np.float64}[column_type]
            data = [np.nan if v is None else v for v in column] if column_type == "float?" else column
            np.save(f"{stem}.data.npy", np.asarray(data, dtype=dtype).reshape(len(column)))
            continue
        if column_type.startswith("text"):
            column = [None if v is None else v.encode("utf-8") for v in column]
        _write_ragged(stem, column, np.uint8 if column_type.startswith("text") else np.int32)


def _write_ragged(stem: Path, column: list, dtype) -> None:
    lengths = np.fromiter((0 if v is None else len(v) for v in column), dtype=np.int64, count=len(column))
    offsets = np.zeros(len(column) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    present = (v for v in column if v is not None)
    np.save(f"{stem}.values.npy", np.fromiter(itertools.chain.from_iterable(present), dtype=dtype, count=int(offsets[-1])))
    np.save(f"{stem}.offsets.npy", offsets)
    np.save(f"{stem}.none.npy", np.fromiter((v is None for v in column), dtype=np.bool_, count=len(column)))


def merge_splits(shards: list[Path], directory: Path, split: str, kind: str) -> None:
    """Concatenate `split`'s columns of each shard directory, in order, into `directory`.
    Streams file by file, so the merge holds one column of one shard at a time."""
    for name, column_type in KINDS[kind]:
        parts = ("data",) if column_type in ("int", "bool", "float?") else ("values", "offsets", "none")
        for part in parts:
            arrays = [np.load(shard / f"{split}.{name}.{part}.npy", mmap_mode="r") for shard in shards]
            target = directory / f"{split}.{name}.{part}.npy"
            if part == "offsets":  # each shard's offsets start at 0: shift them past the shards before
                size = sum(len(a) - 1 for a in arrays) + 1
            else:
                size = sum(len(a) for a in arrays)
            if size == 0:
                np.save(target, np.zeros(0, dtype=arrays[0].dtype))
                continue
            out = np.lib.format.open_memmap(target, mode="w+", dtype=arrays[0].dtype, shape=(size,))
            at, base = 0, 0
            for a in arrays:
                if part == "offsets":
                    out[at:at + len(a)] = a + base
                    at, base = at + len(a) - 1, base + int(a[-1])
                else:
                    out[at:at + len(a)] = a
                    at += len(a)
            out.flush()
            del out


class _Ragged:
    def __init__(self, stem: Path, text: bool = False):
        self.values = np.load(f"{stem}.values.npy", mmap_mode="r")
        self.offsets = np.load(f"{stem}.offsets.npy", mmap_mode="r")
        self.none = np.load(f"{stem}.none.npy", mmap_mode="r")
        self.text = text

    def __getitem__(self, i: int):
        if self.none[i]:
            return None
        chunk = self.values[self.offsets[i]:self.offsets[i + 1]]
        return bytes(chunk).decode("utf-8") if self.text else chunk.tolist()

    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)


class MappedExamples(Sequence):
    """One split of the cache as a read-only sequence of Examples, Pairs or Documents."""

    def __init__(self, directory: Path, split: str, kind: str):
        self.directory, self.split, self.kind = Path(directory), split, kind
        self.columns = {}
        for name, column_type in KINDS[kind]:
            stem = self.directory / f"{split}.{name}"
            if column_type in ("int", "bool", "float?"):
                self.columns[name] = np.load(f"{stem}.data.npy", mmap_mode="r")
            else:
                self.columns[name] = _Ragged(stem, text=column_type.startswith("text"))
        ids = self.columns["chosen.ids" if kind == "pair" else "ids"]
        # Tokens per item, held in memory: packing, eval grouping and logs read every length.
        self.lengths = ids.lengths()
        if kind == "pair":
            self.lengths = self.lengths + self.columns["rejected.ids"].lengths()
        self.reference_logps: np.ndarray | None = None  # [n, 2], set by DPO's precomputed reference pass

    def __len__(self) -> int:
        return len(self.lengths)

    def __eq__(self, other) -> bool:
        """Equal to any sequence of the same examples in the same order (a list of them included)."""
        if not isinstance(other, Sequence) or isinstance(other, (str, bytes)) or len(other) != len(self):
            return NotImplemented if not isinstance(other, Sequence) else False
        return all(a == b for a, b in zip(self, other))

    __hash__ = None  # mutable (reference_logps) and compared by value

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(f"example {i} of {len(self)}")
        c = self.columns
        if self.kind == "document":
            return Document(c["ids"][i], c["label"][i], int(c["target"][i]), bool(c["truncated"][i]))
        if self.kind == "pair":
            margin = float(c["margin"][i])
            logps = None if self.reference_logps is None else tuple(self.reference_logps[i].tolist())
            return Pair(self._example(i, "chosen."), self._example(i, "rejected."), logps,
                        None if np.isnan(margin) else margin)
        return self._example(i, "")

    def _example(self, i: int, prefix: str) -> Example:
        c = self.columns
        return Example(c[prefix + "ids"][i], c[prefix + "labels"][i], c[prefix + "prompt_ids"][i],
                       c[prefix + "reference"][i])

    def fingerprint_into(self, h: hashlib._Hash, chunk: int = 4096) -> None:
        """Feed `h` the bytes checkpoint.train_data_fingerprint hashes for a list of these
        examples (per example: its length, its ids, its labels, as int64), built a chunk of
        examples at a time with numpy instead of one small array per example."""
        c = self.columns
        if self.kind == "document":
            n = len(self)
            targets = _Flat(np.asarray(c["target"]), np.arange(n + 1, dtype=np.int64))
            segments, header = [_Flat.of(c["ids"]), targets], [0]
        elif self.kind == "pair":
            names = ("chosen.ids", "rejected.ids", "chosen.labels", "rejected.labels")
            segments, header = [_Flat.of(c[k]) for k in names], [0, 1]
        else:
            segments, header = [_Flat.of(c["ids"]), _Flat.of(c["labels"])], [0]
        for a in range(0, len(self), chunk):
            h.update(_fingerprint_chunk(segments, header, a, min(a + chunk, len(self))).tobytes())


class _Flat:
    """A ragged column's values and offsets (for the fingerprint)."""

    def __init__(self, values, offsets):
        self.values, self.offsets = values, np.asarray(offsets)

    @classmethod
    def of(cls, column: _Ragged) -> _Flat:
        return cls(column.values, column.offsets)


def _fingerprint_chunk(segments: list[_Flat], header: list[int], a: int, b: int) -> np.ndarray:
    """Examples [a, b) as one int64 stream: per example, the summed length of the `header`
    segments, then each segment's values in turn."""
    lengths = [np.diff(s.offsets[a:b + 1]) for s in segments]
    sizes = 1 + sum(lengths)
    starts = np.zeros(b - a, dtype=np.int64)
    np.cumsum(sizes[:-1], out=starts[1:])
    out = np.empty(int(sizes.sum()), dtype=np.int64)
    out[starts] = sum(lengths[k] for k in header)
    at = starts + 1
    for s, n in zip(segments, lengths):
        first, last = int(s.offsets[a]), int(s.offsets[b])
        out[np.repeat(at - s.offsets[a:b], n) + np.arange(first, last)] = s.values[first:last]
        at = at + n
    return out
