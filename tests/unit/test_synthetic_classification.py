"""synthetic:support_tickets, the classification demo task, and the tokenizer corpus it must
leave alone."""

from __future__ import annotations

import hashlib
import json
from collections import Counter

import pytest

from ftdist.data.sources import read_rows
from ftdist.data.synthetic import (
    AMBIGUOUS_FRACTION,
    AMBIGUOUS_MESSAGES,
    CANT_GET_IN,
    NO_MONEY_BACK,
    TASKS,
    TICKET_ASIDES,
    TICKET_CLASSES,
    TICKET_TEMPLATES,
    TICKET_VAGUE,
    generate_rows,
    tokenizer_corpus,
)

# sha256 of json.dumps(tokenizer_corpus()), computed before support_tickets was added. The tiny
# tokenizer is trained on this corpus, and so the ids of every tiny-model test and regression
# anchor depend on it: a new task must not change it.
TOKENIZER_CORPUS_SHA256 = "6e03811c41ff5fef640cd6c6c9afa7fb5dcefc210660e2a79ef4d3bab0402c2d"

N = 4000


@pytest.fixture(scope="module")
def rows():
    return generate_rows("support_tickets", N, seed=0)


def is_ambiguous(text: str) -> bool:
    return any(message in text for message in AMBIGUOUS_MESSAGES)


def test_tokenizer_corpus_is_unchanged():
    corpus = tokenizer_corpus()
    assert len(corpus) == 3150
    assert hashlib.sha256(json.dumps(corpus).encode()).hexdigest() == TOKENIZER_CORPUS_SHA256


def test_support_tickets_is_a_task():
    assert "support_tickets" in TASKS
    rows = read_rows("synthetic:support_tickets", num_synthetic_rows=3, seed=5)
    assert [r.value for r in rows] == generate_rows("support_tickets", 3, 5)
    assert rows[0].location == "synthetic:support_tickets:row 1"


def test_same_seed_same_rows_other_seed_other_rows():
    assert generate_rows("support_tickets", 300, 7) == generate_rows("support_tickets", 300, 7)
    assert generate_rows("support_tickets", 300, 7) != generate_rows("support_tickets", 300, 8)


def test_every_row_is_a_text_with_one_of_four_labels(rows):
    assert set(TICKET_CLASSES) == {"billing", "technical", "shipping", "account"}
    for row in rows:
        assert set(row) == {"text", "label"}
        assert isinstance(row["text"], str) and row["text"].strip() and "{" not in row["text"]
        assert row["label"] in TICKET_CLASSES


def test_class_proportions(rows):
    counts = Counter(row["label"] for row in rows)
    expected = {"billing": 0.45, "technical": 0.30, "shipping": 0.15, "account": 0.10}
    for label, share in expected.items():
        assert abs(counts[label] / N - share) < 0.03, (label, counts)  # ~4 standard deviations


def test_ambiguous_rows_are_about_two_percent_and_labelled_at_random(rows):
    # The detection is sound only if no other part of a ticket contains an ambiguous message.
    others = [t for table in (TICKET_TEMPLATES, TICKET_VAGUE, TICKET_ASIDES) for ts in table.values() for t in ts]
    assert not any(is_ambiguous(t) for t in others)
    ambiguous = [row for row in rows if is_ambiguous(row["text"])]
    assert AMBIGUOUS_FRACTION == 0.02
    assert 0.01 < len(ambiguous) / N < 0.03, len(ambiguous)  # 80 expected, sd 9
    assert len({row["label"] for row in ambiguous}) >= 3


def test_the_shared_vague_messages_carry_both_labels(rows):
    labels = {message: {row["label"] for row in rows if message in row["text"]}
              for message in (CANT_GET_IN, NO_MONEY_BACK)}
    assert labels == {CANT_GET_IN: {"technical", "account"}, NO_MONEY_BACK: {"billing", "shipping"}}


def test_no_single_word_decides_the_class(rows):
    """The most telling word of each class covers well under all of its rows, so a model has to
    combine cues rather than find one keyword."""
    words = [set(row["text"].lower().replace(",", " ").replace(".", " ").split()) for row in rows]
    for label in TICKET_CLASSES:
        mine = [w for w, row in zip(words, rows) if row["label"] == label]
        for word in set().union(*mine):
            with_word = [row["label"] for w, row in zip(words, rows) if word in w]
            precision = with_word.count(label) / len(with_word)
            recall = sum(word in w for w in mine) / len(mine)
            assert not (precision > 0.95 and recall > 0.4), (label, word, precision, recall)
