"""Cleaning aids (ftdist.data.clean) on hand-made rows with known answers: each format's row text,
exact and near duplicates, personal data and its look-alikes, short responses; and real data:
GSM8K arithmetic is not personal data, the SMS spam collection's phone numbers are."""

from __future__ import annotations

import json

from conftest import shared_dataset

from ftdist.config import DataConfig, DataFields
from ftdist.data.clean import (
    FIELD_SEPARATOR,
    exact_duplicates,
    find_pii,
    luhn_valid,
    near_duplicates,
    normalize,
    response_fields,
    row_fields,
    row_text,
    scan_rows,
    shingles,
)
from ftdist.data.sources import BadRow, Row, read_rows

SEP = FIELD_SEPARATOR


def data(fmt: str = "instruction", **fields) -> DataConfig:
    return DataConfig(path="rows.jsonl", format=fmt, max_seq_len=64, fields=DataFields(**fields))


# --- row text ---------------------------------------------------------------------------------


def test_instruction_text_appends_the_context_field_to_the_prompt_as_the_format_does():
    cfg = data(input="input")
    row = {"prompt": "Translate.", "input": "Hola", "response": "Hello", "id": 7}
    assert row_text(row, cfg) == f"Translate.\n\nHola{SEP}Hello"
    # The same prompt written into one field encodes the same, so it is the same text.
    assert row_text({"prompt": "Translate.\n\nHola", "response": "Hello"}, cfg) == row_text(row, cfg)
    assert row_text({"prompt": "Translate.", "input": "  ", "response": "Hello"}, cfg) == f"Translate.{SEP}Hello"
    assert row_text(row, data()) == f"Translate.{SEP}Hello"  # no data.fields.input: not read
    assert row_text({"question": "Q", "answer": 42}, data(prompt="question", response="answer")) == f"Q{SEP}42"


def test_fields_never_run_into_each_other():
    cfg = data()
    a, b = {"prompt": "a b", "response": "c"}, {"prompt": "a", "response": "b c"}
    assert normalize(row_text(a, cfg)) != normalize(row_text(b, cfg))
    assert exact_duplicates([a, b], cfg) == {}


def test_chat_text_holds_roles_contents_reasoning_tool_calls_and_tools():
    cfg = data("chat")
    call = {"type": "function", "function": {"name": "weather", "arguments": {"city": "Lima"}}}
    row = {"messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "Weather "}, {"type": "text", "text": "in Lima?"}]},
        {"role": "assistant", "content": None, "tool_calls": [call], "reasoning_content": "Ask the tool."},
        {"role": "tool", "content": {"temp": 21}, "tool_call_id": "c1"},
        {"role": "assistant", "content": "21 degrees."},
    ], "tools": [{"type": "function", "function": {"name": "weather"}}]}
    fields = dict(row_fields(row, cfg))
    assert fields["messages[1].content"] == "Weather in Lima?"
    assert fields["messages[2].reasoning_content"] == "Ask the tool."
    assert json.loads(fields["messages[2].tool_calls"]) == [call]
    assert fields["messages[3].content"] == '{"temp": 21}'
    assert fields["messages[3].tool_call_id"] == "c1"
    assert "tools" in fields and "tools" not in dict(row_fields(row, cfg, tools=False))
    text = row_text(row, cfg)
    assert text.startswith(f"system{SEP}Be brief.{SEP}user{SEP}Weather in Lima?{SEP}assistant{SEP}")
    assert text.endswith(f"assistant{SEP}21 degrees.{SEP}" + fields["tools"])
    # Roles are part of the text: the same words said by the other side are another conversation.
    swapped = {"messages": [{"role": "assistant", "content": "Hi"}, {"role": "user", "content": "Hello"}]}
    plain = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}
    assert row_text(swapped, cfg) != row_text(plain, cfg)


def test_text_preference_and_classification_text():
    assert row_text({"text": "Once upon a time", "meta": 1}, data("text")) == "Once upon a time"
    pref = data("preference")
    assert row_text({"prompt": "Capital of Peru?", "chosen": "Lima.", "rejected": "Quito."}, pref) == (
        f"Capital of Peru?{SEP}Lima.{SEP}Quito.")
    conversation = {"prompt": [{"role": "user", "content": "Capital of Peru?"}],
                    "chosen": {"role": "assistant", "content": "Lima."},
                    "rejected": [{"role": "assistant", "content": "Quito."}]}
    assert row_text(conversation, pref) == (
        f"user{SEP}Capital of Peru?{SEP}assistant{SEP}Lima.{SEP}assistant{SEP}Quito.")
    assert [name for name, _ in row_fields(conversation, pref)] == [
        "prompt[0].role", "prompt[0].content", "chosen[0].role", "chosen[0].content",
        "rejected[0].role", "rejected[0].content"]
    cls = data("classification", label="category")
    assert row_text({"text": "free prize!!", "category": 1}, cls) == f"free prize!!{SEP}1"
    assert row_text({"text": "free prize!!", "category": "spam"}, cls) == f"free prize!!{SEP}spam"


def test_a_row_that_is_not_an_object_has_no_text():
    for value in (None, [1, 2], "text", 3):
        assert row_text(value, data()) == ""
        assert row_fields(value, data()) == []


def test_normalize_lowercases_and_collapses_whitespace():
    assert normalize("  The  Capital\tof\n\nPERU?  ") == "the capital of peru?"
    assert normalize(f"A{SEP}B") == "a \u241e b"  # the separator survives


# --- exact duplicates -------------------------------------------------------------------------


def test_exact_duplicates_differ_only_in_case_and_whitespace():
    cfg = data()
    rows = [
        {"prompt": "What is the capital of Peru?", "response": "Lima."},  # 0
        {"prompt": "What is 2 + 2?", "response": "4"},  # 1
        {"prompt": "what is  the capital of PERU?", "response": " lima.\n"},  # 2: duplicate of 0
        {"prompt": "What is the capital of Peru?", "response": "Lima, of course."},  # 3: another answer
        "not an object",  # 4: never a duplicate
        "not an object",  # 5
        {"prompt": "What is 2 + 2?"},  # 6: no response, a bad row for prepare
        {"prompt": "What is 2 + 2?"},  # 7
        {"prompt": "WHAT IS 2 + 2?", "response": "4", "source": "other"},  # 8: duplicate of 1 (extra keys unread)
        {"prompt": "what is the capital of peru?", "response": "lima."},  # 9: duplicate of 0, not of 2
    ]
    assert exact_duplicates(rows, cfg) == {2: 0, 8: 1, 9: 0}


def test_exact_duplicates_take_source_rows_and_skip_unparsed_ones():
    cfg = data("text")
    rows = [Row("t.jsonl:1", {"text": "Hello world"}), Row("t.jsonl:2", problem=BadRow("invalid_json", "x")),
            Row("t.jsonl:3", problem=BadRow("invalid_json", "x")), Row("t.jsonl:4", {"text": "hello   WORLD"})]
    assert exact_duplicates(rows, cfg) == {3: 0}
    assert exact_duplicates([], cfg) == {}


# --- near duplicates --------------------------------------------------------------------------

LONG = ("The committee met on Tuesday to review the budget for the new library and agreed that the "
        "reading rooms would open in spring while the archive and the children's section would follow "
        "in the autumn once the last shelves had been delivered and the lighting had been inspected by "
        "the city engineer who had asked for a second survey of the roof")
OTHER = ("A small boat left the harbour before dawn carrying three fishermen their nets and a radio "
         "that could barely reach the coast guard station on the far side of the bay where the weather "
         "report was read every hour between midnight and six in the morning by a retired teacher")


def true_jaccard(a: str, b: str) -> float:
    x, y = shingles(a), shingles(b)
    return len(x & y) / len(x | y)


def test_one_word_changed_in_a_long_text_is_a_near_duplicate():
    cfg = data("text")
    changed = LONG.replace("Tuesday", "Wednesday")
    rows = [{"text": LONG}, {"text": OTHER}, {"text": changed}, {"text": LONG.upper()}, {"text": "short one"}]
    exact = exact_duplicates(rows, cfg)
    assert exact == {3: 0}
    found = near_duplicates(rows, cfg, threshold=0.8, skip=exact)
    assert [(d.index, d.first) for d in found] == [(2, 0)]
    expected = true_jaccard(LONG, changed)
    assert 0.85 < expected < 0.95  # 3 of 60 shingles replaced: 57 / 63
    assert abs(found[0].jaccard - expected) < 0.1
    # Without the skip, the upper-cased copy is a near-duplicate too (of the first row: Jaccard 1).
    assert [(d.index, d.first, d.jaccard) for d in near_duplicates(rows, cfg)][-1] == (3, 0, 1.0)
    assert near_duplicates(rows, cfg, threshold=0.99, skip=exact) == []
    # Seeded: the same answer every time.
    assert near_duplicates(rows, cfg, skip=exact) == found


def test_near_duplicates_point_at_the_most_similar_earlier_row():
    cfg = data("text")
    one, two = LONG.replace("Tuesday", "Monday"), LONG.replace("Tuesday", "Monday").replace("roof", "walls")
    rows = [{"text": two}, {"text": LONG}, {"text": one}]
    found = near_duplicates(rows, cfg, threshold=0.7)
    assert [(d.index, d.first) for d in found] == [(1, 0), (2, 0)]  # row 2 differs from row 0 by one word
    assert found[1].jaccard > found[0].jaccard


# --- personal data ----------------------------------------------------------------------------

POSITIVES = [
    ("email", "write to jane.doe+ml@example.co.uk today"),
    ("email", "Contact: ops@lab-7.example.org."),
    ("phone", "call +1 (555) 123-4567 now"),
    ("phone", "office +44 20 7946 0958."),
    ("phone", "mobile +4915123456789"),
    ("phone", "ring (555) 123-4567"),
    ("phone", "ring 555-123-4567 or 555.123.4567"),
    ("phone", "London 020 7946 0958"),
    ("phone", "UK mobile 07700 900123"),
    ("phone", "Paris 01 23 45 67 89"),
    ("phone", "To claim, call09061701461 now"),
    ("card", "card 4111 1111 1111 1111 exp 12/30"),
    ("card", "card 4111-1111-1111-1111"),
    ("card", "card 5500000000000004."),
    ("card", "amex 3782 822463 10005"),
    ("ipv4", "server 192.168.1.20 is down"),
    ("ipv4", "ping 10.0.0.1."),
    ("ipv4", "gateway 255.255.255.0"),
]

NEGATIVES = [
    "card 4111 1111 1111 1112 fails Luhn",
    "4111111111111112",
    "999.1.1.1 is no address",
    "192.168.001.1 has a leading zero",
    "1.2.3 and 1.2.3.4.5",
    "release v1.2.3.4",
    "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n#### 72",
    "5,000,000 + 2,500,000 = 7,500,000 people",
    "The answer is 1234567890 grains",
    "In 2019-2020 she paid $1,234.56 for 12 * 3 = 36 items",
    "pi is 3.14159265358979 roughly",
    "123 456 7890 apples",  # grouped like a phone, but an area code cannot start with 1
    "0.5 * 120 = 60 and 0.25 * 4000 = 1000",
    "user at example dot com",
    "He scored 100 200 300 400 points",
]


def test_each_kind_of_personal_data_is_found_with_its_span():
    for kind, text in POSITIVES:
        found = find_pii(text)
        assert [m.kind for m in found][:1] == [kind], (text, found)
        for m in found:
            assert text[m.start:m.end] == m.text
    both = find_pii("ring 555-123-4567 or 555.123.4567")
    assert [(m.kind, m.text) for m in both] == [("phone", "555-123-4567"), ("phone", "555.123.4567")]
    assert find_pii("mail a@b.io or c@d.io")[1].text == "c@d.io"


def test_look_alikes_are_not_personal_data():
    for text in NEGATIVES:
        assert find_pii(text) == [], text


def test_luhn():
    assert luhn_valid("4111111111111111") and luhn_valid("378282246310005") and luhn_valid("79927398713")
    assert not luhn_valid("4111111111111112") and not luhn_valid("79927398710")


def test_redaction_keeps_only_the_ends():
    (m,) = find_pii("mail jane.doe@example.com")
    assert m.redacted() == "ja**.***@*******.*om"


def test_gsm8k_arithmetic_is_not_personal_data():
    rows = read_rows(str(shared_dataset("gsm8k/train.jsonl")))
    cfg = data(prompt="question", response="answer")
    flagged = [(r.location, name, m.text) for r in rows for name, text in row_fields(r.value, cfg)
               for m in find_pii(text)]
    assert len(rows) == 7473
    assert flagged == []  # measured: none of GSM8K's 7,473 rows


def test_sms_spam_phone_numbers_are_found():
    rows = read_rows(str(shared_dataset("sms_spam/SMSSpamCollection.tsv")), columns=["label", "text"])
    cfg = data("classification")
    phones = {r.location for r in rows for name, text in row_fields(r.value, cfg) for m in find_pii(text)
              if m.kind == "phone"}
    # Measured: 396 of the 5,574 messages (premium-rate numbers in spam, "call09061701461" included).
    assert len(phones) >= 390


# --- short responses and a whole scan ---------------------------------------------------------


def test_short_responses_per_format():
    assert response_fields({"prompt": "p", "response": "r"}, data()) == [("response", "r")]
    chat = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": ""},
                         {"role": "assistant", "content": None, "tool_calls": [{"function": {"name": "f"}}]},
                         {"role": "assistant", "content": "done"}]}
    assert response_fields(chat, data("chat")) == [("messages[1].content", ""), ("messages[3].content", "done")]
    pref = {"prompt": "p", "chosen": "yes", "rejected": [{"role": "assistant", "content": "no"}]}
    assert response_fields(pref, data("preference")) == [("chosen", "yes"), ("rejected[0].content", "no")]
    assert response_fields({"text": "t", "label": 1}, data("classification")) == []
    assert response_fields({"text": "t"}, data("text")) == []


def test_scan_rows_locates_every_finding():
    cfg = data()
    values = [
        {"prompt": "What is the capital of Peru?", "response": "Lima."},
        {"prompt": "Mail me at jo@example.com", "response": "ok"},
        {"prompt": "WHAT IS THE CAPITAL OF PERU?", "response": "lima."},
        {"prompt": "Nothing to see", "response": "   "},
        {"prompt": "card 4111 1111 1111 1111, host 10.1.2.3", "response": "call +1 555 123 4567"},
        {"prompt": LONG, "response": "Noted."},
        {"prompt": LONG.replace("Tuesday", "Friday"), "response": "Noted."},
    ]
    rows = [Row(f"d.jsonl:{i + 1}", v) for i, v in enumerate(values)]
    rows.append(Row("d.jsonl:9", problem=BadRow("invalid_json", "Expecting value")))
    report = scan_rows(rows, cfg, min_response_chars=3)
    assert [(f.location, f.first_location) for f in report.exact_duplicates] == [("d.jsonl:3", "d.jsonl:1")]
    assert [(f.index, f.first) for f in report.near_duplicates] == [(6, 5)]
    assert [(f.location, f.field, f.kind) for f in report.pii] == [
        ("d.jsonl:2", "prompt", "email"), ("d.jsonl:5", "prompt", "card"), ("d.jsonl:5", "prompt", "ipv4"),
        ("d.jsonl:5", "response", "phone")]
    assert [(f.location, f.field, f.detail) for f in report.short_responses] == [
        ("d.jsonl:2", "response", "2 characters"), ("d.jsonl:4", "response", "0 characters")]
    counts = report.counts()
    assert counts == {"rows": 8, "unreadable_rows": 1, "exact_duplicates": 1, "near_duplicates": 1, "pii_rows": 2,
                      "pii_rows_by_kind": {"email": 1, "phone": 1, "card": 1, "ipv4": 1}, "pii_matches": 4,
                      "short_responses": 2}
    as_json = json.loads(json.dumps(report.to_dict()))
    assert as_json["findings"]["pii"][0]["detail"] == "chars 11-25: jo@*******.*om"
    assert scan_rows(rows, cfg).counts()["short_responses"] == 1  # by default only the empty one
