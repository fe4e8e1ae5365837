"""Join two answer files into preference pairs: `python -m ftdist.data.pairs`.

    python -m ftdist.data.pairs --chosen A.jsonl --rejected B.jsonl --out pairs.jsonl
        [--prompt-field prompt] [--response-field response] [--input-field input]

Row i of A and row i of B answer the same prompt (blank lines do not count as rows). Each pair
is written as one JSON line `{"prompt", "chosen", "rejected"}`, A's answer chosen, ready for
`data=preference` (`data.format=preference`). With `--input-field`, a non-empty input is
appended to the prompt as the instruction format appends it (`prompt + "\\n\\n" + input`).

Errors stop with one line and exit code 2, nothing written: a file that cannot be read, a
malformed line or a missing field (file:line), files of different lengths, row i of the two
files with different prompts (both files and lines). Rows that data.format=preference would
refuse are skipped and counted, never written: identical answers (`same_responses`, compared
without surrounding whitespace) and an empty answer (`empty_response`).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections import Counter
from dataclasses import dataclass
from typing import Any

from ftdist.console import OneLineParser
from ftdist.constants import EXIT_BAD_INPUT
from ftdist.data.messages import type_name
from ftdist.data.sources import LOCAL_EXTENSIONS, DataError, Row, read_rows, source_kind

SKIP_KINDS = ("same_responses", "empty_response")


@dataclass(frozen=True)
class Fields:
    prompt: str = "prompt"
    response: str = "response"
    input: str | None = None


@dataclass
class JoinResult:
    pairs: list[dict]
    skipped: Counter  # kind -> rows

    def describe(self, out: str) -> str:
        skipped = sum(self.skipped.values())
        counts = ", ".join(f"{kind} {self.skipped[kind]}" for kind in SKIP_KINDS)
        return f"wrote {len(self.pairs)} pairs to {out}; skipped {skipped} ({counts})"


def join_pairs(chosen_path: str, rejected_path: str, fields: Fields = Fields()) -> JoinResult:
    """The preference rows of two answer files, row for row; raises DataError on bad input."""
    chosen_rows, rejected_rows = _rows(chosen_path), _rows(rejected_path)
    if len(chosen_rows) != len(rejected_rows):
        raise DataError(f"{chosen_path} has {len(chosen_rows)} rows and {rejected_path} has {len(rejected_rows)}: "
                        "the files must answer the same prompts, row for row")
    pairs, skipped = [], Counter({kind: 0 for kind in SKIP_KINDS})
    for a, b in zip(chosen_rows, rejected_rows):
        prompt_a, answer_a = _read(a, fields)
        prompt_b, answer_b = _read(b, fields)
        if prompt_a != prompt_b:
            raise DataError(f"{a.location} and {b.location}: the prompts differ (field '{fields.prompt}'"
                            f"{'' if fields.input is None else f' with {fields.input!r}'}): "
                            "row i of both files must answer the same prompt")
        if _is_empty(answer_a) or _is_empty(answer_b):
            skipped["empty_response"] += 1
        elif _same(answer_a, answer_b):
            skipped["same_responses"] += 1
        else:
            pairs.append({"prompt": prompt_a, "chosen": answer_a, "rejected": answer_b})
    return JoinResult(pairs, skipped)


def _rows(path: str) -> list[Row]:
    expanded = os.path.expanduser(path)
    if source_kind(expanded) != "file":
        raise DataError(f"{path}: file not found (working directory: {os.getcwd()})")
    if not expanded.lower().endswith(LOCAL_EXTENSIONS):
        raise DataError(f"{path}: unsupported file type; use one of {', '.join(LOCAL_EXTENSIONS)}")
    return read_rows(expanded)


def _read(row: Row, fields: Fields) -> tuple[Any, Any]:
    """(prompt, answer) of one row: a string prompt (or a list of messages) and its answer (a
    string, or assistant message(s))."""
    if row.problem is not None:
        raise DataError(f"{row.location}: {row.problem}")
    if not isinstance(row.value, dict):
        raise DataError(f"{row.location}: wrong_type: a row must be a JSON object, got {type_name(row.value)}")
    prompt, answer = (_field(row, name) for name in (fields.prompt, fields.response))
    if not isinstance(prompt, str | list):
        raise DataError(f"{row.location}: wrong_type: field '{fields.prompt}' must be a string or a list of "
                        f"messages, got {type_name(prompt)}")
    if not isinstance(answer, str | dict | list):
        raise DataError(f"{row.location}: wrong_type: field '{fields.response}' must be a string or assistant "
                        f"message(s), got {type_name(answer)}")
    if fields.input is not None:
        context = row.value.get(fields.input)
        if context is not None and not isinstance(context, str):
            raise DataError(f"{row.location}: wrong_type: field '{fields.input}' must be a string, "
                            f"got {type_name(context)}")
        if not isinstance(prompt, str):
            raise DataError(f"{row.location}: wrong_type: --input-field needs a string prompt, "
                            f"field '{fields.prompt}' is {type_name(prompt)}")
        if context and context.strip():
            prompt = f"{prompt}\n\n{context}"  # as data.format=instruction|preference append data.fields.input
    return prompt, answer


def _field(row: Row, name: str) -> Any:
    if name not in row.value or row.value[name] is None:
        present = ", ".join(map(str, row.value)) or "none"
        raise DataError(f"{row.location}: missing_field: row has no field '{name}' (fields: {present})")
    return row.value[name]


def _is_empty(answer: Any) -> bool:
    return not answer.strip() if isinstance(answer, str) else not answer


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, str) and isinstance(b, str):
        return a.strip() == b.strip()
    return a == b


def write_jsonl(rows: list[dict], out: str) -> None:
    """All rows or none: written to a temporary file, then renamed over `out`."""
    out = os.path.expanduser(out)
    parent = os.path.dirname(out)
    if parent:
        os.makedirs(parent, exist_ok=True)
    tmp = f"{out}.tmp"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
        os.replace(tmp, out)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = OneLineParser(tool="ftdist.pairs", prog="python -m ftdist.data.pairs", description=__doc__.split("\n\n")[0])
    parser.add_argument("--chosen", required=True, help="answer file whose answers are preferred (row for row)")
    parser.add_argument("--rejected", required=True, help="answer file to the same prompts, dispreferred")
    parser.add_argument("--out", required=True, help="the preference rows, JSON lines {prompt, chosen, rejected}")
    parser.add_argument("--prompt-field", default="prompt", help="the prompt's field in both files (default: prompt)")
    parser.add_argument("--response-field", default="response",
                        help="the answer's field in both files (default: response)")
    parser.add_argument("--input-field", default=None,
                        help="a context field appended to the prompt when non-empty (default: none)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    fields = Fields(args.prompt_field, args.response_field, args.input_field)
    out = os.path.abspath(os.path.expanduser(args.out))
    if out in {os.path.abspath(os.path.expanduser(p)) for p in (args.chosen, args.rejected)}:
        print(f"ftdist.pairs: usage: --out {args.out} is one of the input files", file=sys.stderr)
        return EXIT_BAD_INPUT
    try:
        result = join_pairs(args.chosen, args.rejected, fields)
        write_jsonl(result.pairs, args.out)
    except DataError as e:
        print(f"ftdist.pairs: DataError: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except OSError as e:
        print(f"ftdist.pairs: {type(e).__name__}: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    print(result.describe(args.out))
    return 0


def cli() -> None:
    sys.exit(main())


if __name__ == "__main__":
    cli()
