"""Cleaning aids: duplicates, near-duplicates, personal data and empty responses in raw rows.

Everything here reads rows as the sources give them (ftdist.data.sources: a parsed record and
its location), before any tokenizer: a row's text is the text of the fields its `data.format`
reads (`row_fields`, `row_text`). Nothing is dropped here; `data.dedupe` (prepare.py) drops the
exact duplicates `exact_duplicates` names, and `python -m ftdist.data clean` reports the rest,
each finding with the row's file:line and the field.

- exact duplicates: the same text after lowercasing and collapsing whitespace (`normalize`);
- near-duplicates: MinHash LSH (datasketch) over word 3-gram shingles, with the estimated
  Jaccard similarity of each pair; seeded, so the same rows give the same answer everywhere;
- personal data (PII): e-mail addresses, phone numbers (international `+CC ...`, North American
  `(555) 123-4567`, and national numbers with a trunk 0 such as `020 7946 0958`), card-like
  numbers (13-19 digits, plain or in 4-digit groups, Luhn-checked) and IPv4 addresses. The
  patterns want the shapes people write these in, not any run of digits: arithmetic such as
  GSM8K's `48/2 = <<48/2=24>>24` is not a phone number;
- short responses: a response (instruction, chat assistant turns, preference answers) with
  fewer than `min_response_chars` characters once stripped.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from ftdist.config import DataConfig
from ftdist.data.messages import REASONING_KEYS
from ftdist.data.sources import Row

# Between two fields of a row's text: not whitespace (normalize keeps it), so fields never run
# into each other ({"prompt": "a b", "response": "c"} is not {"prompt": "a", "response": "b c"}).
FIELD_SEPARATOR = "\n\u241e\n"  # SYMBOL FOR RECORD SEPARATOR
NEAR_THRESHOLD = 0.8
NUM_PERM = 128
LSH_MAX_THRESHOLD = 0.9
SHINGLE_WORDS = 3
MINHASH_SEED = 1
MIN_RESPONSE_CHARS = 1  # only empty (or whitespace) responses by default
PII_KINDS = ("email", "phone", "card", "ipv4")

# The fields each format cannot do without: a row lacking one is a bad row (prepare reports it),
# never a duplicate.
REQUIRED = {"instruction": ("prompt", "response"), "chat": ("messages",), "text": ("text",),
            "preference": ("prompt", "chosen", "rejected"), "classification": ("text", "label")}


# --- a row's text -----------------------------------------------------------------------------


def row_fields(value: Any, cfg: DataConfig, tools: bool = True) -> list[tuple[str, str]]:
    """(field, text) of each field `cfg.format` reads from the raw row `value`, in order; a
    message's parts are `messages[2].content`, `messages[2].tool_calls` and so on. Absent fields
    are left out; a non-string value is its JSON. `tools=False` leaves out a chat row's tool list
    (often the same long list in every row)."""
    if not isinstance(value, dict):
        return []
    f, fmt = cfg.fields, cfg.format
    if fmt == "text":
        return _present(value, [f.text])
    if fmt == "classification":
        return _present(value, [f.text, f.label])
    if fmt == "chat":
        out = _messages(value.get(f.messages), f.messages)
        if tools and f.tools:
            out += _present(value, [f.tools])
        return out
    if fmt == "preference":
        prompt = value.get(f.prompt)
        out = _messages(prompt, f.prompt) if isinstance(prompt, list) else _present(value, [f.prompt, f.input])
        for name in (f.chosen, f.rejected):
            answer = value.get(name)
            out += _messages([answer] if isinstance(answer, dict) else answer, name) if isinstance(
                answer, (dict, list)) else _present(value, [name])
        return out
    return _present(value, [f.prompt, f.input, f.response])


def row_text(value: Any, cfg: DataConfig, tools: bool = True) -> str:
    """The text of one raw row: its fields (`row_fields`) joined with FIELD_SEPARATOR; a
    non-empty context field (data.fields.input) is appended to the prompt with a blank line, as
    the instruction and preference formats append it. "" for a row that is not an object."""
    parts: list[str] = []
    for name, text in row_fields(value, cfg, tools):
        if cfg.fields.input is not None and name == cfg.fields.input:
            if text.strip() and parts:
                parts[-1] += "\n\n" + text
            continue
        parts.append(text)
    return FIELD_SEPARATOR.join(parts)


def normalize(text: str) -> str:
    """Lowercase, whitespace runs as one space, stripped."""
    return " ".join(text.lower().split())


def response_fields(value: Any, cfg: DataConfig) -> list[tuple[str, str]]:
    """(field, text) of each response of a row: an instruction's response, a chat row's assistant
    contents (a turn with tool calls and no content has none), a preference row's chosen and
    rejected answers. Text and classification rows have none."""
    if not isinstance(value, dict) or cfg.format in ("text", "classification"):
        return []
    f = cfg.fields
    if cfg.format == "instruction":
        return [(f.response, value[f.response])] if isinstance(value.get(f.response), str) else []
    names = [f.messages] if cfg.format == "chat" else [f.chosen, f.rejected]
    out = []
    for name in names:
        answer = value.get(name)
        if isinstance(answer, str):
            out.append((name, answer))
            continue
        messages = [answer] if isinstance(answer, dict) else answer if isinstance(answer, list) else []
        for i, m in enumerate(messages):
            if isinstance(m, dict) and m.get("role") == "assistant":
                content = _content_text(m.get("content"))
                if content is not None and not (m.get("tool_calls") and not content.strip()):
                    out.append((f"{name}[{i}].content", content))
    return out


def _present(value: dict, names: Iterable[str | None]) -> list[tuple[str, str]]:
    return [(name, _as_text(value[name])) for name in names if name is not None and value.get(name) is not None]


def _as_text(value: Any) -> str:
    if isinstance(value, str):
        return value
    return json.dumps(value, ensure_ascii=False, sort_keys=True, default=str)


def _content_text(content: Any) -> str | None:
    """A message's content as text: a string, OpenAI-style text parts joined, else its JSON."""
    if content is None or isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and isinstance(p.get("text"), str) for p in content):
        return "".join(p["text"] for p in content)
    return _as_text(content)


def _messages(messages: Any, name: str) -> list[tuple[str, str]]:
    if not isinstance(messages, list):
        return [] if messages is None else [(name, _as_text(messages))]
    out = []
    for i, m in enumerate(messages):
        at = f"{name}[{i}]"
        if not isinstance(m, dict):
            out.append((at, _as_text(m)))
            continue
        out.append((f"{at}.role", _as_text(m.get("role"))))
        content = _content_text(m.get("content"))
        if content is not None:
            out.append((f"{at}.content", content))
        for key in (*REASONING_KEYS, "tool_calls", "tool_call_id", "name"):
            if m.get(key) is not None:
                out.append((f"{at}.{key}", _as_text(m[key])))
    return out


def _value(row: Row | Any) -> Any:
    """A source Row's parsed record (None when it could not be parsed), or a raw value as given."""
    if isinstance(row, Row):
        return None if row.problem is not None else row.value
    return row


def _complete(value: Any, cfg: DataConfig) -> bool:
    if not isinstance(value, dict):
        return False
    names = [getattr(cfg.fields, key) for key in REQUIRED.get(cfg.format, ())]
    return all(value.get(name) is not None for name in names)


# --- exact and near duplicates ----------------------------------------------------------------


def exact_duplicates(rows: Sequence[Row | Any], cfg: DataConfig) -> dict[int, int]:
    """{index of a row: index of the first row with the same normalized text}, for every row that
    repeats an earlier one. `rows` are source Rows or raw values; a row that is not an object, or
    lacks a field its format needs, is never a duplicate (prepare reports it as a bad row)."""
    first: dict[bytes, int] = {}
    out: dict[int, int] = {}
    for i, row in enumerate(rows):
        value = _value(row)
        if not _complete(value, cfg):
            continue
        key = hashlib.blake2b(normalize(row_text(value, cfg)).encode(), digest_size=16).digest()
        if key in first:
            out[i] = first[key]
        else:
            first[key] = i
    return out


@dataclass(frozen=True)
class NearDuplicate:
    index: int  # the later row
    first: int  # the earlier row it is most similar to (the earliest of equals)
    jaccard: float  # MinHash estimate of the Jaccard similarity of their word shingles


def shingles(text: str, words: int = SHINGLE_WORDS) -> set[bytes]:
    """Word n-grams of the normalized text (the whole text when it has fewer words)."""
    tokens = normalize(text).split()
    if len(tokens) <= words:
        return {" ".join(tokens).encode()} if tokens else set()
    return {" ".join(tokens[i:i + words]).encode() for i in range(len(tokens) - words + 1)}


def near_duplicates(rows: Sequence[Row | Any], cfg: DataConfig, threshold: float = NEAR_THRESHOLD,
                    num_perm: int = NUM_PERM, skip: Iterable[int] = ()) -> list[NearDuplicate]:
    """Rows whose text (tool lists left out) is similar to an earlier row's: estimated Jaccard
    similarity of word 3-gram shingles >= threshold, by MinHash LSH. Rows in `skip` (e.g. the
    exact duplicates, counted apart) are neither matched nor matched against. Deterministic: a
    fixed seed and hash function, rows visited in order, candidates in index order."""
    from datasketch import MinHash, MinHashLSH

    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"near-duplicate threshold must be in (0, 1], got {threshold}")
    skipped = set(skip)
    indices, sets = [], []
    for i, row in enumerate(rows):
        value = _value(row)
        if i in skipped or not _complete(value, cfg):
            continue
        found = shingles(row_text(value, cfg, tools=False))
        if found:
            indices.append(i)
            sets.append(found)
    # Candidates come from LSH tuned to at most 0.9 (datasketch finds no banding for 128
    # permutations much above that); each is then kept only if its estimate reaches `threshold`.
    lsh = MinHashLSH(threshold=min(threshold, LSH_MAX_THRESHOLD), num_perm=num_perm)
    hashes: dict[int, MinHash] = {}
    out = []
    for i, mh in zip(indices, MinHash.generator(sets, num_perm=num_perm, seed=MINHASH_SEED, scheme="affine32")):
        best = None
        for j in sorted(lsh.query(mh)):
            score = float(mh.jaccard(hashes[j]))
            if score >= threshold and (best is None or score > best[1]):
                best = (j, score)
        if best is not None:
            out.append(NearDuplicate(i, best[0], round(best[1], 4)))
        lsh.insert(i, mh)
        hashes[i] = mh
    return out


# --- personal data ----------------------------------------------------------------------------


@dataclass(frozen=True)
class PiiMatch:
    kind: str  # email | phone | card | ipv4
    start: int  # character span in the field's text
    end: int
    text: str

    def redacted(self) -> str:
        """The match with all but its first and last two characters' letters and digits hidden."""
        t = self.text
        if len(t) <= 4:
            return re.sub(r"\w", "*", t)
        return t[:2] + re.sub(r"\w", "*", t[2:-2]) + t[-2:]


_EMAIL = re.compile(
    r"(?<![\w.%+-])[A-Za-z0-9][A-Za-z0-9._%+-]*@[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?"
    r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)*\.[A-Za-z]{2,}(?![\w-])"
)
_IPV4 = re.compile(r"(?<![\w.])\d{1,3}(?:\.\d{1,3}){3}(?![\w]|\.\d)")
# Cards: 13-19 digits in one run, or in the groups cards are printed in (4-4-4-4[-3], 4-6-5,
# 4-6-4), one separator throughout. Issuers' first digits are 2-6 (Mastercard's 2-series, Amex
# and Diners 3, Visa 4, Mastercard 5, Discover 6).
_CARD = re.compile(
    r"(?<![\w.,+-])(?:[2-6]\d{12,18}|[2-6]\d{3}([ -])\d{4}\1\d{4}\1\d{4}(?:\1\d{3})?|[2-6]\d{3}([ -])\d{6}\2\d{4,5})"
    r"(?![\w]|[.,-]\d)"
)
# Phones, each shape with its separators (a run of digits alone is a number, not a phone):
# international (+CC, then groups, an area code maybe in parentheses); North American with
# separators (area codes start with 2-9); national with a trunk 0 (UK, France,
# Germany...), grouped or in one run of 10-11 digits. Letters may touch a phone number (spam
# texts write "call09050000327"); digits may not.
_PHONES = (
    re.compile(r"(?<![\d)+])\+\d{1,3}(?:[ .-]?\(?\d{1,4}\)?){2,5}(?!\d|[.-]\d)"),
    re.compile(r"(?<![\d.+-])(?:\([2-9]\d{2}\) ?|[2-9]\d{2}[ .-])\d{3}[ .-]\d{4}(?!\d|[.-]\d)"),
    re.compile(r"(?<![\d.+-])(?:\(0\d{1,4}\) ?|0\d{1,4}[ .-]?)\d{2,4}(?:[ .-]?\d{2,4}){1,3}(?!\d|[.,-]\d)"),
)
PHONE_DIGITS = {0: (8, 15), 1: (10, 10), 2: (10, 11)}  # per pattern: digits a number of that shape has


def luhn_valid(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch)
        if i % 2:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def find_pii(text: str) -> list[PiiMatch]:
    """Personal data in `text`, in order; each span is claimed once (e-mail, then IPv4, card, phone)."""
    found: list[PiiMatch] = []

    def free(m: re.Match) -> bool:
        return all(m.end() <= p.start or m.start() >= p.end for p in found)

    def add(kind: str, m: re.Match) -> None:
        found.append(PiiMatch(kind, m.start(), m.end(), m.group()))

    for m in _EMAIL.finditer(text):
        add("email", m)
    for m in _IPV4.finditer(text):
        if free(m) and _is_ipv4(m.group()):
            add("ipv4", m)
    for m in _CARD.finditer(text):
        digits = re.sub(r"\D", "", m.group())
        if free(m) and 13 <= len(digits) <= 19 and luhn_valid(digits):
            add("card", m)
    for n, pattern in enumerate(_PHONES):
        low, high = PHONE_DIGITS[n]
        for m in pattern.finditer(text):
            if free(m) and low <= sum(ch.isdigit() for ch in m.group()) <= high:
                add("phone", m)
    return sorted(found, key=lambda p: p.start)


def _is_ipv4(text: str) -> bool:
    try:
        ipaddress.IPv4Address(text)  # octets <= 255, no leading zeros
    except ValueError:
        return False
    return True


# --- a whole dataset --------------------------------------------------------------------------


@dataclass
class Finding:
    """One thing found in one row: where (the row's file:line and the field) and what."""

    kind: str  # exact_duplicate | near_duplicate | email | phone | card | ipv4 | short_response
    location: str  # the row's "path:line" (or "path:row N")
    index: int  # the row's index in the rows scanned (training rows, then validation rows)
    field: str | None = None  # personal data and responses: the field, e.g. messages[3].content
    detail: str = ""
    first: int | None = None  # duplicates: the earlier row's index
    first_location: str | None = None
    jaccard: float | None = None  # near-duplicates: the estimated similarity

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class CleanReport:
    rows: int
    unreadable: int  # rows not parsed or not objects: left to prepare's bad-row report
    near_threshold: float
    min_response_chars: int
    exact_duplicates: list[Finding]
    near_duplicates: list[Finding]
    pii: list[Finding]
    short_responses: list[Finding]

    def pii_rows(self) -> dict[str, int]:
        """Rows with each kind of personal data (a row with two e-mail addresses counts once)."""
        return {kind: len({f.index for f in self.pii if f.kind == kind}) for kind in PII_KINDS}

    def counts(self) -> dict:
        return {
            "rows": self.rows,
            "unreadable_rows": self.unreadable,
            "exact_duplicates": len(self.exact_duplicates),
            "near_duplicates": len(self.near_duplicates),
            "pii_rows": len({f.index for f in self.pii}),
            "pii_rows_by_kind": self.pii_rows(),
            "pii_matches": len(self.pii),
            "short_responses": len({f.index for f in self.short_responses}),
        }

    def to_dict(self) -> dict:
        return {
            **self.counts(),
            "near_threshold": self.near_threshold,
            "min_response_chars": self.min_response_chars,
            "findings": {name: [f.to_dict() for f in getattr(self, name)]
                         for name in ("exact_duplicates", "near_duplicates", "pii", "short_responses")},
        }


def scan_rows(rows: Sequence[Row], cfg: DataConfig, near_threshold: float = NEAR_THRESHOLD,
              min_response_chars: int = MIN_RESPONSE_CHARS) -> CleanReport:
    """Every finding in `rows` (source Rows: training rows, then validation rows, so a
    validation row that repeats a training row is found too)."""
    exact = exact_duplicates(rows, cfg)
    exact_found = [Finding("exact_duplicate", rows[i].location, i, detail=f"same text as {rows[j].location}",
                           first=j, first_location=rows[j].location) for i, j in exact.items()]
    near_found = [Finding("near_duplicate", rows[d.index].location, d.index,
                          detail=f"estimated Jaccard {d.jaccard:.2f} with {rows[d.first].location}",
                          first=d.first, first_location=rows[d.first].location, jaccard=d.jaccard)
                  for d in near_duplicates(rows, cfg, near_threshold, skip=exact)]
    pii, short = [], []
    unreadable = 0
    for i, row in enumerate(rows):
        value = _value(row)
        if not isinstance(value, dict):
            unreadable += 1
            continue
        for name, text in row_fields(value, cfg):
            for m in find_pii(text):
                pii.append(Finding(m.kind, row.location, i, name, f"chars {m.start}-{m.end}: {m.redacted()}"))
        for name, text in response_fields(value, cfg):
            if len(text.strip()) < min_response_chars:
                short.append(Finding("short_response", row.location, i, name, f"{len(text.strip())} characters"))
    return CleanReport(len(rows), unreadable, near_threshold, min_response_chars, exact_found, near_found, pii, short)
