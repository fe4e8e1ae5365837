"""Data sources: turn `data.path` into rows, each tagged with where it came from.

A source is a local .jsonl/.json/.parquet/.csv/.tsv file, a hub dataset name (anything else
that is not an existing file), or `synthetic:NAME`. Every row carries a location string
(`data/train.jsonl:17`, `data/train.parquet:row 17`) so that any later complaint about the row
can point at it. JSON and TSV files are parsed here rather than by `datasets` because only a
parser we drive ourselves can report the line of a broken record and carry on past it.

A .csv or .tsv file's first line names its columns, unless `data.columns` does (the file then
has no header line). Every cell is read as text, an empty one as "".
"""

from __future__ import annotations

import bisect
import csv
import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

LOCAL_EXTENSIONS = (".jsonl", ".json", ".parquet", ".csv", ".tsv")
TABLE_EXTENSIONS = (".csv", ".tsv")  # the files data.columns can name the columns of
SYNTHETIC_PREFIX = "synthetic:"


class DataError(ValueError):
    """Input data that cannot be used; the message names the file, the line or row, and why."""


class BadRow(Exception):
    """One malformed row. `kind` is a stable name that reports count by (e.g. `missing_field`)."""

    def __init__(self, kind: str, detail: str):
        super().__init__(f"{kind}: {detail}")
        self.kind = kind
        self.detail = detail


@dataclass(frozen=True)
class Row:
    location: str  # "path:line" or "path:row N", for messages
    value: Any = None  # the parsed record; not necessarily a dict (formats check)
    problem: BadRow | None = None  # set when the record could not even be parsed


def source_kind(path: str) -> str:
    """What `path` names: synthetic | file | directory | missing (looks local, is not there) | hub."""
    if path.startswith(SYNTHETIC_PREFIX):
        return "synthetic"
    if os.path.isfile(path):
        return "file"
    if os.path.isdir(path):
        return "directory"
    return "missing" if _looks_local(path) else "hub"


def check_data_source(cfg) -> None:
    """What can be told about `data.path` and `data.validation_path` without reading them
    (`cfg` is a DataConfig); run before the tokenizer loads, since a hub tokenizer that cannot be
    reached is retried for tens of seconds before a missing file would otherwise be reported."""
    for key in ("path", "validation_path"):
        path = getattr(cfg, key)
        if path is not None:
            _check_source(f"data.{key}", path)
            if getattr(cfg, "columns", None) is not None:
                _check_columns(cfg.columns, path, f"data.{key}")


def _check_source(key: str, path: str) -> None:
    kind = source_kind(os.path.expanduser(path))
    if kind == "missing":
        raise DataError(
            f"{key}={path}: data file not found (working directory: {os.getcwd()}); a path with a file extension "
            f"({', '.join(LOCAL_EXTENSIONS)}) or starting with /, ./, ../ or ~/ is read as a local file, "
            "anything else as a hub dataset name"
        )
    if kind == "file" and not path.lower().endswith(LOCAL_EXTENSIONS):
        ext = os.path.splitext(path)[1] or "(none)"
        raise DataError(f"{key}={path}: unsupported data file type '{ext}'; use one of {', '.join(LOCAL_EXTENSIONS)}")
    if kind == "synthetic":
        from ftdist.data.synthetic import TASKS

        name = path[len(SYNTHETIC_PREFIX):]
        if name not in TASKS:
            raise DataError(f"{key}={path}: unknown synthetic task {name!r}; known: {', '.join(sorted(TASKS))}")


def _check_columns(columns: Iterable[str], path: str, key: str | None = None) -> list[str]:
    names = list(columns)
    if not path.lower().endswith(TABLE_EXTENSIONS):
        source = path if key is None else f"{key}={path}"
        raise DataError(f"data.columns={names}: names the columns of a header-less .csv or .tsv file, "
                        f"and {source} is not one; remove data.columns")
    if not distinct_names(names):
        raise DataError(f"data.columns={names}: needs one distinct, non-empty name per column")
    return names


def distinct_names(names: list) -> bool:
    """Column names a row can be keyed by: at least one, each a non-empty string, none twice."""
    return bool(names) and len(set(names)) == len(names) and all(isinstance(n, str) and n for n in names)


def read_rows(path: str, split: str = "train", num_synthetic_rows: int = 0, seed: int = 0,
              columns: Iterable[str] | None = None) -> list[Row]:
    """All rows of `path`, in source order. Raises DataError when the source cannot be read.

    `columns` (data.columns) are the names of a header-less .csv/.tsv file's columns, in order.
    """
    path = os.path.expanduser(path)  # Hydra passes ~/data.jsonl through unexpanded
    names = None if columns is None else _check_columns(columns, path)
    kind = source_kind(path)
    if kind == "synthetic":
        return _synthetic_rows(path[len(SYNTHETIC_PREFIX):], num_synthetic_rows, seed)
    if kind == "file":
        return _local_rows(path, names)
    if kind == "missing":
        raise DataError(f"data file not found: {path} (working directory: {os.getcwd()})")
    # A directory is a dataset repository on disk (e.g. a downloaded hub dataset): the same
    # loader as a hub name.
    return _hub_rows(path, split)


def _looks_local(path: str) -> bool:
    """True for a path the user meant as a file; a hub name like `openai/gsm8k` is not one."""
    if path.lower().endswith(LOCAL_EXTENSIONS):
        return True
    return "/" in path and path.startswith((".", "/", "~"))


def _local_rows(path: str, columns: list[str] | None) -> list[Row]:
    ext = os.path.splitext(path)[1].lower()
    if ext == ".jsonl":
        return list(_jsonl_rows(path))
    if ext == ".json":
        return _json_rows(path)
    if ext == ".tsv":
        return list(_tsv_rows(path, columns))
    if ext in (".parquet", ".csv"):
        return _datasets_file_rows(path, ext[1:], columns)
    raise DataError(f"{path}: unsupported data file type '{ext}'; use one of {', '.join(LOCAL_EXTENSIONS)}")


def _jsonl_rows(path: str) -> Iterator[Row]:
    with open(path, "rb") as f:
        yield from _parse_lines(path, f)


def _decoded_lines(path: str, lines: Iterable[bytes]) -> Iterator[tuple[str, str | UnicodeDecodeError]]:
    """(location, text) of each non-blank line, or (location, the error) for one that is not
    UTF-8; a byte-order mark opening the file is not part of the text."""
    for lineno, raw in enumerate(lines, 1):
        location = f"{path}:{lineno}"
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            yield location, e
            continue
        if lineno == 1:
            line = line.lstrip("\ufeff")
        if line.strip():
            yield location, line


def _parse_lines(path: str, lines: Iterable[bytes]) -> Iterator[Row]:
    # Split on b"\n" only (not str.splitlines): U+2028 and friends may stand unescaped inside a
    # JSON string, and splitting there would corrupt a valid record.
    for location, line in _decoded_lines(path, lines):
        if isinstance(line, UnicodeDecodeError):
            yield Row(location, problem=BadRow("invalid_json", f"line is not valid UTF-8 (byte {line.start})"))
            continue
        try:
            yield Row(location, json.loads(line))
        except json.JSONDecodeError as e:
            yield Row(location, problem=BadRow("invalid_json", f"{e.msg} (column {e.colno})"))


def _json_rows(path: str) -> list[Row]:
    """A .json file holds either one array of records or JSON lines."""
    with open(path, "rb") as f:
        raw = f.read()
    if not raw.lstrip(b"\xef\xbb\xbf \t\r\n").startswith(b"["):
        return list(_parse_lines(path, raw.split(b"\n")))
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise DataError(f"{path}:{line}: file is not valid UTF-8 (byte {e.start})") from None
    return list(_json_array_rows(path, text, text.index("[") + 1))


def _json_array_rows(path: str, text: str, pos: int) -> Iterator[Row]:
    """Elements of a top-level JSON array, each located at the line where it starts.

    A syntax error inside an array cannot be skipped (there is no reliable place to resume),
    so it fails the whole file, with its line and column.
    """
    decoder = json.JSONDecoder()
    newlines = [i for i, ch in enumerate(text) if ch == "\n"]

    def skip_ws(i: int) -> int:
        while i < len(text) and text[i] in " \t\r\n":
            i += 1
        return i

    pos = skip_ws(pos)
    closed = text[pos:pos + 1] == "]"
    pos += closed
    while not closed:
        try:
            value, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{e.lineno}: invalid_json: {e.msg} (column {e.colno})") from None
        yield Row(f"{path}:{bisect.bisect_right(newlines, pos) + 1}", value)
        pos = skip_ws(end)
        sep = text[pos:pos + 1]
        if sep not in (",", "]"):
            line = bisect.bisect_right(newlines, pos) + 1
            raise DataError(f"{path}:{line}: invalid_json: expected ',' or ']' after an array element")
        closed = sep == "]"
        pos = skip_ws(pos + 1)
    if text[pos:].strip():
        line = bisect.bisect_right(newlines, pos) + 1
        raise DataError(f"{path}:{line}: invalid_json: extra data after the top-level array")


def _tsv_rows(path: str, columns: list[str] | None) -> Iterator[Row]:
    """One record per physical line, split at every tab. TSV has no quoting (a field cannot
    hold a tab or a newline), so a `"` is text: the SMS Spam Collection has many unpaired ones,
    which a CSV-style reader would take for a quoted field running on over the lines after it."""
    with open(path, "rb") as f:
        lines = f.read().split(b"\n")
    names = columns
    for location, line in _decoded_lines(path, lines):
        if isinstance(line, UnicodeDecodeError):
            if names is None:
                raise DataError(f"{location}: header line is not valid UTF-8 (byte {line.start})") from None
            yield Row(location, problem=BadRow("not_utf8", f"line is not valid UTF-8 (byte {line.start})"))
            continue
        line = line.removesuffix("\r")
        fields = line.split("\t")
        if names is None:
            names = _tsv_header(location, fields)
        elif len(fields) != len(names):
            detail = f"expected {len(names)} fields ({', '.join(names)}), got {len(fields)}"
            yield Row(location, problem=BadRow("wrong_columns", detail))
        else:
            yield Row(location, dict(zip(names, fields)))
    if names is None:
        raise DataError(f"{path}:1: tsv file has no header line (data.columns names the columns of one without)")


def _tsv_header(location: str, names: list[str]) -> list[str]:
    if not distinct_names(names):
        raise DataError(f"{location}: tsv header line {names} needs one distinct, non-empty name per column "
                        "(data.columns names the columns of a file without one)")
    return names


def _datasets_file_rows(path: str, builder: str, columns: list[str] | None = None) -> list[Row]:
    import datasets

    kwargs: dict[str, Any] = {}
    if builder == "csv":
        # CSV has no types: read every column as text (an answer "18" must stay a string) and
        # keep empty cells as "" instead of pandas' NaN, so formats see what the file says.
        header = _csv_header(path) if columns is None else columns
        kwargs = {"features": datasets.Features({c: datasets.Value("string") for c in header}),
                  "keep_default_na": False}
        if columns is not None:
            kwargs["column_names"] = columns  # pandas then reads the first line as a record
    try:
        ds = datasets.load_dataset(builder, data_files=path, split="train", **kwargs)
    except Exception as e:  # noqa: BLE001 (any reader failure becomes one clear message)
        raise DataError(f"{path}: cannot read {builder} file: {type(e).__name__}: {e}") from None
    # A CSV record's line is its index + 1, + 1 more after a header line, when no field spans lines.
    first = 1 if columns is not None else 2
    where = (lambda i: f"{path}:{i + first}") if builder == "csv" else (lambda i: f"{path}:row {i + 1}")
    return [Row(where(i), record) for i, record in enumerate(ds)]


def _csv_header(path: str) -> list[str]:
    with open(path, newline="", encoding="utf-8-sig") as f:
        header = next(csv.reader(f), None)
    if not header:
        raise DataError(f"{path}:1: csv file has no header row")
    return header


def _hub_rows(name: str, split: str) -> list[Row]:
    import datasets

    try:
        ds = datasets.load_dataset(name, split=split)
    except Exception as e:  # noqa: BLE001 (network, auth and missing-split errors alike)
        raise DataError(
            f"cannot load dataset '{name}' (split '{split}'): it is not a local file, and loading it "
            f"from the hub failed: {type(e).__name__}: {e}"
        ) from None
    return [Row(f"{name}[{split}]:row {i + 1}", record) for i, record in enumerate(ds)]


def _synthetic_rows(name: str, n: int, seed: int) -> list[Row]:
    from ftdist.data.synthetic import generate_rows

    try:
        rows = generate_rows(name, n, seed)
    except ValueError as e:
        raise DataError(f"{SYNTHETIC_PREFIX}{name}: {e}") from None
    return [Row(f"{SYNTHETIC_PREFIX}{name}:row {i + 1}", r) for i, r in enumerate(rows)]
