"""Generation metrics against hand-worked expected values, and on real GSM8K answers.

Each expected value below was worked out by hand from the metric's specification in
ftdist/eval/metrics.py's docstring, not by running the code.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from ftdist.eval.metrics import (
    check_metric_specs,
    exact_match,
    json_valid,
    metric_function,
    normalized_match,
    numeric_answer,
    score_response,
    token_f1,
)

GSM8K_TEST = Path(__file__).resolve().parents[2].parent / "shared" / "datasets" / "gsm8k" / "test.jsonl"


@pytest.mark.parametrize(
    "response, reference, expected",
    [
        ("Paris", "Paris", 1.0),
        ("  Paris\n", "Paris ", 1.0),  # surrounding whitespace ignored
        ("paris", "Paris", 0.0),  # case matters
        ("Paris.", "Paris", 0.0),
        ("New  York", "New York", 0.0),  # inner whitespace matters
        ("", "", 1.0),
        ("", "Paris", 0.0),
    ],
)
def test_exact_match(response, reference, expected):
    assert exact_match(response, reference) == expected


@pytest.mark.parametrize(
    "response, reference, expected",
    [
        ("The Eiffel Tower!", "eiffel tower", 1.0),  # article, case, punctuation
        ("an apple,  a pear", "apple pear", 1.0),
        ("  New\tYork  ", "new york", 1.0),
        ("Theater", "ater", 0.0),  # "the" is removed only as a word
        ("apple pear", "pear apple", 0.0),  # order matters
        ("", "the", 1.0),  # both normalize to ""
        ("a", "b", 0.0),
    ],
)
def test_normalized_match(response, reference, expected):
    assert normalized_match(response, reference) == expected


@pytest.mark.parametrize(
    "response, reference, expected",
    [
        ("The answer is 72", "She sold 48 + 24 = 72 clips.\n#### 72", 1.0),
        ("72", "#### 72", 1.0),
        ("First 10, then 12, finally 72.", "#### 72", 1.0),  # the response's LAST number
        ("72, or maybe 70", "#### 72", 0.0),
        ("It costs $1,234 in total", "Sum is 1000 + 234.\n#### 1,234", 1.0),  # separators
        ("1234", "####1,234", 1.0),  # marker without a space
        ("1,234.0", "#### 1234", 1.0),  # a trailing .0
        ("12.50", "#### 12.5", 1.0),
        ("12.5", "#### 12", 0.0),
        ("The change was -3 degrees", "#### -3", 1.0),  # negative numbers
        ("3", "#### -3", 0.0),
        ("pages 10-12", "#### 12", 1.0),  # a range's hyphen is no minus sign
        ("x = -12", "#### 12", 0.0),
        ("0.5", "the answer is .5", 1.0),
        # No marker: the reference's LAST number is the answer.
        ("8", "3 apples and 5 pears make 8 fruit", 1.0),
        ("3", "3 apples and 5 pears make 8 fruit", 0.0),
        # With a marker, the first number after it, whatever follows or precedes.
        ("18", "9 * 2 = 18\n#### 18 dollars, not 20", 1.0),
        ("20", "9 * 2 = 18\n#### 18 dollars, not 20", 0.0),
        # Nothing to compare: never a match.
        ("", "#### 5", 0.0),
        ("no number here", "#### 5", 0.0),
        ("5", "no number in the reference", 0.0),
        ("", "", 0.0),
    ],
)
def test_numeric_answer(response, reference, expected):
    assert numeric_answer(response, reference) == expected


@pytest.mark.parametrize(
    "response, reference, expected",
    [
        # Normalized tokens; common = multiset intersection; F1 = 2PR/(P+R).
        ("the cat sat", "cat sat on mat", 2 / 3),  # got [cat sat], want [cat sat on mat]: P=1, R=1/2
        ("a b c d", "a b x y", 1 / 3),  # "a" is an article: got [b c d], want [b x y]: P=R=1/3
        ("red red blue", "red blue blue", 2 / 3),  # counts clip: common = red + blue = 2, P=R=2/3
        ("Cat.", "cat", 1.0),
        ("dog", "cat", 0.0),
        ("", "", 1.0),  # both empty: a match
        ("", "cat", 0.0),
        ("the", "cat", 0.0),  # normalizes to empty
        ("one two three four five", "five", 1 / 3),  # P=1/5, R=1: 2*(1/5)/(6/5)
    ],
)
def test_token_f1(response, reference, expected):
    assert token_f1(response, reference) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize(
    "response, expected",
    [
        ('{"name": "Ada", "age": 36}', 1.0),
        ("  [1, 2.5, null, true]\n", 1.0),
        ('"just a string"', 1.0),
        ("42", 1.0),
        ('{"name": "Ada",}', 0.0),  # trailing comma
        ("{'name': 'Ada'}", 0.0),  # single quotes
        ('{"a": 1} trailing', 0.0),
        ("", 0.0),
        ('{"x": NaN}', 0.0),  # Python's json would accept it; JSON does not
        ("Infinity", 0.0),
        ("[" * 100_000 + "]" * 100_000, 0.0),  # too deep for the parser: scored, not raised
        ("1" * 5000, 0.0),  # past Python's int digit limit: scored, not raised
    ],
)
def test_json_valid(response, expected):
    assert json_valid(response, "the reference is not read {") == expected


@pytest.mark.parametrize(
    "pattern, response, reference, expected",
    [
        # Without a group: does the pattern match the response anywhere.
        (r"\d{3}-\d{4}", "call 555-1234 now", "ignored", 1.0),
        (r"\d{3}-\d{4}", "call me", "555-1234", 0.0),
        (r"^yes\b", "yes, sure", "no", 1.0),
        (r"(?:yes|no)$", "I say no", "", 1.0),  # a non-capturing group is no group
        # With a group: the group's text in response equals the group's text in reference.
        (r"Answer: (\w+)", "Answer: B because...", "Answer: B", 1.0),
        (r"Answer: (\w+)", "Answer: C", "Answer: B", 0.0),
        (r"Answer: (\w+)", "I think B", "Answer: B", 0.0),  # no match in the response
        # ...or the whole reference (stripped) where the pattern does not match it.
        (r"Answer: (\w+)", "Answer: B", " B\n", 1.0),
        (r"Answer: (\w+)", "Answer: B", "The answer is B", 0.0),
        (r"label=(\w*)", "label=", "label=", 1.0),  # empty groups on both sides
    ],
)
def test_regex_metric(pattern, response, reference, expected):
    assert metric_function(f"regex:{pattern}")(response, reference) == expected


@pytest.mark.parametrize(
    "specs, message",
    [
        (["exact_match", "bleu"], "unknown metric 'bleu'; valid: exact_match, normalized_match"),
        (["regex:("], "'regex:(': not a valid regular expression"),
        (["regex:"], "'regex:': an empty pattern"),
        (["token_f1", "exact_match", "token_f1"], "a metric is listed twice"),
        (["regex:a+", "regex:a+"], "a metric is listed twice"),
    ],
)
def test_check_metric_specs_errors(specs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        check_metric_specs(specs)


def test_check_metric_specs_accepts_valid():
    check_metric_specs(["exact_match", "normalized_match", "numeric_answer", "token_f1", "json_valid", r"regex:(\d+)"])
    check_metric_specs([])


def test_score_response_keys_by_spec():
    specs = ["exact_match", "normalized_match", "numeric_answer", "token_f1", "json_valid", r"regex:= (\d+)"]
    scores = score_response(specs, "The total = 42", "total = 42")
    # exact: differs by "The "; normalized: "the" removed, "=" is punctuation -> "total 42" both;
    # numeric: 42 == 42; token F1: identical bags; json: not JSON; regex: "42" == "42".
    assert scores == {
        "exact_match": 0.0,
        "normalized_match": 1.0,
        "numeric_answer": 1.0,
        "token_f1": 1.0,
        "json_valid": 0.0,
        r"regex:= (\d+)": 1.0,
    }
    assert list(scores) == specs
    with pytest.raises(ValueError, match="unknown metric 'rouge'"):
        score_response(["rouge"], "a", "a")


def _gsm8k_answers(n: int) -> list[str]:
    if not GSM8K_TEST.exists():
        pytest.skip(f"GSM8K not found at {GSM8K_TEST} (see shared/datasets/SOURCES.md)")
    with GSM8K_TEST.open() as f:
        return [json.loads(line)["answer"] for _, line in zip(range(n), f)]


def test_numeric_answer_on_real_gsm8k_references():
    answers = _gsm8k_answers(200)
    assert len(answers) == 200
    for answer in answers:
        assert numeric_answer(answer, answer) == 1.0, answer
        # The answer with its final number changed: reasoning intact, last number wrong.
        body, final = answer.rsplit("####", 1)
        value = int(final.strip().replace(",", ""))
        changed = f"{body}#### {value + 1}"
        assert numeric_answer(changed, answer) == 0.0, changed
        assert numeric_answer(answer, changed) == 0.0, changed
        # The bare number, written with or without separators, is the answer.
        assert numeric_answer(f"The answer is {value:,}.", answer) == 1.0
        assert numeric_answer(str(value), answer) == 1.0
