"""Generation metrics: how one generated response compares with its reference, each in [0, 1].

    exact_match       the response equals the reference, surrounding whitespace ignored
    normalized_match  equal after normalizing both: lower case, punctuation and the articles
                      a/an/the removed, whitespace collapsed (SQuAD's answer normalization)
    numeric_answer    the last number of the response equals the reference's answer: the number
                      after GSM8K's `#### ` where the reference has one, else its last number
                      (thousands separators and a trailing `.0` do not matter)
    token_f1          F1 of the normalized tokens of response and reference (bags of words)
    json_valid        the response parses as JSON (the reference is not read)
    regex:PATTERN     with a capture group: the group's text in the response equals the group's
                      text in the reference (or the whole reference where the pattern does not
                      match it); without one: the pattern matches the response somewhere
"""

from __future__ import annotations

import json
import re
import string
from collections import Counter
from collections.abc import Callable
from decimal import Decimal, InvalidOperation

REGEX_PREFIX = "regex:"
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = str.maketrans("", "", string.punctuation)
# A number as people write one: sign, thousands separators, decimals ("-1,234.50", "3", ".5").
# A hyphen after a letter or digit joins words or spans a range ("10-12", "16-3"): not a sign.
_NUMBER = re.compile(r"(?:(?<!\w)-)?(?:\d{1,3}(?:,\d{3})+|\d+)?(?:\.\d+)?")
_GSM8K_ANSWER = re.compile(r"####\s*(.+)")


def normalize_answer(text: str) -> str:
    text = text.lower().translate(_PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(response: str, reference: str) -> float:
    return float(response.strip() == reference.strip())


def normalized_match(response: str, reference: str) -> float:
    return float(normalize_answer(response) == normalize_answer(reference))


def numbers_in(text: str) -> list[Decimal]:
    out = []
    for m in _NUMBER.finditer(text):
        token = m.group(0)
        if not any(c.isdigit() for c in token):
            continue
        try:
            out.append(Decimal(token.replace(",", "")))
        except InvalidOperation:  # pragma: no cover - the pattern admits only numbers
            continue
    return out


def reference_number(reference: str) -> Decimal | None:
    marked = _GSM8K_ANSWER.search(reference)
    found = numbers_in(marked.group(1) if marked else reference)
    if marked and found:
        return found[0]  # "#### 72": the answer is the first number after the marker
    return found[-1] if found else None


def numeric_answer(response: str, reference: str) -> float:
    expected = reference_number(reference)
    got = numbers_in(response)
    return float(expected is not None and bool(got) and got[-1] == expected)


def token_f1(response: str, reference: str) -> float:
    got, want = normalize_answer(response).split(), normalize_answer(reference).split()
    if not got or not want:
        return float(got == want)  # both empty: a match; one empty: nothing in common
    common = sum((Counter(got) & Counter(want)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(got), common / len(want)
    return 2 * precision * recall / (precision + recall)


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not JSON")  # Python's json accepts NaN/Infinity; RFC 8259 does not


def json_valid(response: str, reference: str) -> float:
    # ValueError, not only JSONDecodeError: an integer past Python's digit limit raises a plain one.
    try:
        json.loads(response, parse_constant=_reject_constant)
    except (ValueError, RecursionError):
        return 0.0
    return 1.0


def regex_metric(pattern: re.Pattern) -> Callable[[str, str], float]:
    def score(response: str, reference: str) -> float:
        got = pattern.search(response)
        if pattern.groups == 0:
            return float(got is not None)
        if got is None:
            return 0.0
        want = pattern.search(reference)
        expected = want.group(1) if want is not None else reference
        return float((got.group(1) or "").strip() == (expected or "").strip())

    return score


METRICS: dict[str, Callable[[str, str], float]] = {
    "exact_match": exact_match,
    "normalized_match": normalized_match,
    "numeric_answer": numeric_answer,
    "token_f1": token_f1,
    "json_valid": json_valid,
}


def metric_function(spec: str) -> Callable[[str, str], float]:
    """The scorer a spec names; ValueError naming the spec and the valid ones otherwise."""
    if spec in METRICS:
        return METRICS[spec]
    if spec.startswith(REGEX_PREFIX):
        source = spec[len(REGEX_PREFIX) :]
        if not source:
            raise ValueError(f"{spec!r}: an empty pattern (write regex:PATTERN)")
        try:
            return regex_metric(re.compile(source))
        except re.error as e:
            raise ValueError(f"{spec!r}: not a valid regular expression ({e})") from None
    raise ValueError(f"unknown metric {spec!r}; valid: {', '.join(METRICS)}, regex:PATTERN")


def check_metric_specs(specs: list[str]) -> None:
    if len(set(specs)) != len(specs):
        raise ValueError(f"a metric is listed twice: {list(specs)}")
    for spec in specs:
        metric_function(spec)


def score_response(specs: list[str], response: str, reference: str) -> dict[str, float]:
    """Every metric of `specs` for one response, keyed by its spec."""
    return {spec: metric_function(spec)(response, reference) for spec in specs}
