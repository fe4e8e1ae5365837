"""prepare_data: bad-row policy, truncation accounting, train/validation split, real data."""

from __future__ import annotations

import json
import logging

import datasets
import pytest
from conftest import shared_dataset
from helpers import write_jsonl

from ftdist.config import DataConfig, DataFields
from ftdist.constants import IGNORE_INDEX as IGNORE
from ftdist.data.formats import RowEncoder
from ftdist.data.prepare import DataError, prepare_data


def good_rows(n: int) -> list[dict]:
    return [{"prompt": f"What is {i} plus {i}?", "response": f"{2 * i}"} for i in range(n)]



def make_cfg(path: str, **kw) -> DataConfig:
    kw.setdefault("max_seq_len", 256)
    kw.setdefault("val_fraction", 0.0)
    return DataConfig(path=path, **kw)


def assert_accounted(report) -> None:
    """Every row is an example, a counted bad row, or a counted no-label drop."""
    d = report.to_dict()
    assert d["train_rows"] + d["turn_examples"] == (
        sum(d["bad_rows"].values()) + d["duplicates"] + d["dropped_no_labels"] + d["train_examples"])
    assert d["val_rows"] + d["val_turn_examples"] == (
        sum(d["val_bad_rows"].values()) + d["val_duplicates"] + d["val_dropped_no_labels"] + d["val_examples"])
    assert d["rows_read"] == d["train_rows"] + d["val_rows"]
    json.dumps(d)  # JSON-able


# --- malformed rows: one per kind, both policies --------------------------------------------

BAD_LINES = [  # (format, raw line, kind)
    ("instruction", '{"prompt": "p", ', "invalid_json"),
    ("instruction", "[1, 2]", "not_an_object"),
    ("instruction", '{"prompt": "p", "answer": "a"}', "missing_field"),
    ("instruction", '{"prompt": "p", "response": 7}', "wrong_type"),
    ("instruction", '{"prompt": "p", "response": ""}', "empty_response"),
    ("text", '{"text": " "}', "empty_response"),
    ("chat", '{"messages": [{"role": "user", "content": "hi"}]}', "no_assistant_turn"),
    ("chat", '{"messages": [{"role": "robot", "content": "hi"}]}', "bad_message"),
]

GOOD = {
    "instruction": {"prompt": "p", "response": "r"},
    "text": {"text": "some text"},
    "chat": {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]},
}


@pytest.mark.parametrize("fmt, line, kind", BAD_LINES)
def test_first_bad_row_fails_with_file_line_and_kind(tmp_path, tiny_tokenizer, fmt, line, kind):
    path = write_jsonl(tmp_path / "train.jsonl", [GOOD[fmt], "", GOOD[fmt], line, line])
    with pytest.raises(DataError) as info:
        prepare_data(make_cfg(path, format=fmt), tiny_tokenizer, seed=0)
    assert str(info.value).startswith(f"{path}:4: {kind}: ")


def test_missing_field_message_names_the_field_and_the_row_fields(tmp_path, tiny_tokenizer):
    path = write_jsonl(tmp_path / "train.jsonl", [{"prompt": "p", "answer": "a"}])
    with pytest.raises(DataError, match=r"train\.jsonl:1: missing_field: row has no field 'response' "
                                        r"\(fields: prompt, answer\)"):
        prepare_data(make_cfg(path), tiny_tokenizer, seed=0)


@pytest.mark.parametrize("fmt", ["instruction", "text", "chat"])
def test_skip_mode_drops_and_counts_each_kind(tmp_path, tiny_tokenizer, caplog, fmt):
    bad = [(line, kind) for f, line, kind in BAD_LINES if f == fmt or kind in ("invalid_json", "not_an_object")]
    rows = [GOOD[fmt]] * 3 + [line for line, _ in bad] * 2
    path = write_jsonl(tmp_path / "train.jsonl", rows)
    with caplog.at_level(logging.WARNING, logger="ftdist.data.prepare"):
        train, val, report = prepare_data(make_cfg(path, format=fmt, on_bad_row="skip"), tiny_tokenizer, seed=0)
    expected = {}
    for _, kind in bad:
        expected[kind] = expected.get(kind, 0) + 2
    assert report.bad_rows == expected
    assert len(train) == report.train_examples == 3 and val == []
    assert set(report.bad_row_examples) == set(expected)
    assert report.bad_row_examples["invalid_json"].startswith(f"{path}:4: ")
    assert "skipped" in caplog.text and str(sum(expected.values())) in caplog.text
    assert_accounted(report)


def test_all_rows_bad_is_an_error_even_when_skipping(tmp_path, tiny_tokenizer):
    path = write_jsonl(tmp_path / "train.jsonl", ["nope", "[]"])
    with pytest.raises(DataError, match="no training examples remain out of 2 rows.*invalid_json"):
        prepare_data(make_cfg(path, on_bad_row="skip"), tiny_tokenizer, seed=0)


def test_broken_template_error_names_the_row(tmp_path, plain_tokenizer):
    plain_tokenizer.chat_template = "{{ messages|length }}{% for m in messages %}{{ m['content'] }}{% endfor %}"
    path = write_jsonl(tmp_path / "train.jsonl", [GOOD["instruction"]])
    with pytest.raises(DataError, match=r"train\.jsonl:1: the chat template starts assistant message 2 differently"):
        prepare_data(make_cfg(path, on_bad_row="skip"), plain_tokenizer, seed=0)


# --- truncation -----------------------------------------------------------------------------


@pytest.mark.parametrize("max_len", [40, 25])  # 25: one example keeps exactly one label
def test_truncation_keeps_the_head_and_counts_drops(tmp_path, tiny_tokenizer, max_len):
    rows = [{"prompt": "x " * n, "response": "y " * 8} for n in (1, 10, 20, 40)]
    path = write_jsonl(tmp_path / "train.jsonl", rows)
    cfg = make_cfg(path, max_seq_len=max_len)
    full = [RowEncoder(cfg, tiny_tokenizer)(r).examples[0] for r in rows]
    train, _, report = prepare_data(cfg, tiny_tokenizer, seed=0)

    # Independently: labels start right after the prompt, so an example keeps a label iff its
    # prompt is shorter than max_len; `truncated` counts the kept ones that were cut.
    prompt_lens = [len(e.prompt_ids) for e in full]
    expect_truncated = sum(len(e.input_ids) > max_len and p < max_len for e, p in zip(full, prompt_lens))
    expect_dropped = sum(p >= max_len for p in prompt_lens)
    assert expect_truncated >= 1 and expect_dropped >= 1  # the fixture exercises both
    assert report.truncated == expect_truncated
    assert report.dropped_no_labels == expect_dropped
    kept = [e for e, p in zip(full, prompt_lens) if p < max_len]
    assert [e.input_ids for e in train] == [e.input_ids[:max_len] for e in kept]
    assert [e.labels for e in train] == [e.labels[:max_len] for e in kept]
    assert all(len(e.input_ids) == len(e.labels) <= max_len for e in train)
    assert report.train_label_tokens == sum(sum(x != IGNORE for x in e.labels[1:]) for e in train)
    assert_accounted(report)


def test_everything_dropped_by_truncation_is_an_error(tmp_path, tiny_tokenizer):
    path = write_jsonl(tmp_path / "train.jsonl", good_rows(3))
    with pytest.raises(DataError, match="no training examples remain.*dropped_no_labels: 3"):
        prepare_data(make_cfg(path, max_seq_len=4), tiny_tokenizer, seed=0)


# --- train / validation ---------------------------------------------------------------------


def references(examples) -> list[str]:
    return [e.reference for e in examples]


def test_holdout_is_seeded_disjoint_and_complete(tmp_path, tiny_tokenizer):
    rows = good_rows(40)
    path = write_jsonl(tmp_path / "train.jsonl", rows)
    cfg = make_cfg(path, val_fraction=0.25)
    train, val, report = prepare_data(cfg, tiny_tokenizer, seed=7)
    again_train, again_val, _ = prepare_data(cfg, tiny_tokenizer, seed=7)
    _, other_val, _ = prepare_data(cfg, tiny_tokenizer, seed=8)
    assert len(val) == report.val_examples == 10 and len(train) == report.train_examples == 30
    assert references(val) == references(again_val) and references(train) == references(again_train)
    assert references(val) != references(other_val)
    assert sorted(references(train) + references(val)) == sorted(r["response"] for r in rows)
    assert report.validation_source == "holdout"
    assert_accounted(report)


def test_val_fraction_zero_gives_no_validation(tmp_path, tiny_tokenizer):
    path = write_jsonl(tmp_path / "train.jsonl", good_rows(10))
    train, val, report = prepare_data(make_cfg(path, val_fraction=0.0), tiny_tokenizer, seed=0)
    assert len(train) == 10 and val == [] and report.validation_source == "none"


def test_max_val_examples_caps_holdout_and_the_rest_trains(tmp_path, tiny_tokenizer):
    path = write_jsonl(tmp_path / "train.jsonl", good_rows(40))
    train, val, report = prepare_data(make_cfg(path, val_fraction=0.5, max_val_examples=3), tiny_tokenizer, seed=0)
    assert len(val) == 3 and len(train) == 37
    assert_accounted(report)


def test_validation_path_has_its_own_counts(tmp_path, tiny_tokenizer):
    train_path = write_jsonl(tmp_path / "train.jsonl", good_rows(5) + ["bad"])
    val_path = write_jsonl(tmp_path / "val.jsonl", good_rows(3) + [{"prompt": "p"}, {"prompt": "p"}])
    cfg = make_cfg(train_path, validation_path=val_path, val_fraction=0.5, on_bad_row="skip")
    train, val, report = prepare_data(cfg, tiny_tokenizer, seed=0)
    assert (len(train), len(val)) == (5, 3)  # val_fraction is ignored when validation_path is set
    assert report.bad_rows == {"invalid_json": 1}
    assert report.val_bad_rows == {"missing_field": 2}
    assert report.validation_source == val_path
    assert (report.train_rows, report.val_rows, report.rows_read) == (6, 5, 11)
    assert_accounted(report)


def test_bad_validation_row_fails_naming_the_validation_file(tmp_path, tiny_tokenizer):
    train_path = write_jsonl(tmp_path / "train.jsonl", good_rows(2))
    val_path = write_jsonl(tmp_path / "val.jsonl", good_rows(2) + [{"prompt": 1, "response": "r"}])
    with pytest.raises(DataError, match=r"val\.jsonl:3: wrong_type: field 'prompt'"):
        prepare_data(make_cfg(train_path, validation_path=val_path), tiny_tokenizer, seed=0)


def test_empty_validation_file_is_an_error(tmp_path, tiny_tokenizer):
    train_path = write_jsonl(tmp_path / "train.jsonl", good_rows(2))
    val_path = write_jsonl(tmp_path / "val.jsonl", [""])
    with pytest.raises(DataError, match=r"val\.jsonl: no validation examples remain out of 0 rows"):
        prepare_data(make_cfg(train_path, validation_path=val_path), tiny_tokenizer, seed=0)


# --- sources end to end ---------------------------------------------------------------------


@pytest.mark.parametrize("suffix", ["json", "parquet", "csv"])
def test_every_file_type_gives_the_same_examples_as_jsonl(tmp_path, tiny_tokenizer, suffix):
    rows = good_rows(6)
    expected, _, _ = prepare_data(make_cfg(write_jsonl(tmp_path / "a.jsonl", rows)), tiny_tokenizer, seed=0)
    path = tmp_path / f"a.{suffix}"
    if suffix == "json":
        path.write_text(json.dumps(rows, indent=1))
    else:
        getattr(datasets.Dataset.from_list(rows), f"to_{suffix}")(str(path), **({"index": False} if suffix == "csv" else {}))
    train, _, report = prepare_data(make_cfg(str(path)), tiny_tokenizer, seed=0)
    assert train == expected and report.rows_read == 6


def test_csv_bad_row_is_reported_at_its_line(tmp_path, tiny_tokenizer):
    path = tmp_path / "train.csv"
    datasets.Dataset.from_list(good_rows(2) + [{"prompt": "p", "response": ""}]).to_csv(str(path), index=False)
    with pytest.raises(DataError, match=r"train\.csv:4: empty_response"):
        prepare_data(make_cfg(str(path)), tiny_tokenizer, seed=0)


def test_missing_data_file_fails_before_anything_else(tmp_path, tiny_tokenizer):
    with pytest.raises(DataError, match="data file not found: .*nope.jsonl"):
        prepare_data(make_cfg(str(tmp_path / "nope.jsonl")), tiny_tokenizer, seed=0)


def test_synthetic_source(tiny_tokenizer):
    cfg = make_cfg("synthetic:json_extraction", num_synthetic_rows=50, val_fraction=0.1)
    train, val, report = prepare_data(cfg, tiny_tokenizer, seed=0)
    assert (len(train), len(val)) == (45, 5) and report.bad_rows == {} and report.truncated == 0
    assert all(json.loads(e.reference)["name"] for e in val)


def test_real_gsm8k_test_file_loads_cleanly(tiny_tokenizer):
    path = shared_dataset("gsm8k/test.jsonl")
    cfg = make_cfg(str(path), fields=DataFields(prompt="question", response="answer"), max_seq_len=1024,
                   val_fraction=0.05)
    train, val, report = prepare_data(cfg, tiny_tokenizer, seed=0)
    n_lines = sum(1 for line in path.read_text().split("\n") if line.strip())
    assert report.rows_read == n_lines and report.bad_rows == {} and report.val_bad_rows == {}
    assert report.val_examples == round(0.05 * n_lines)
    assert all("####" in e.reference for e in [*train, *val])
    assert_accounted(report)


def test_a_label_at_position_0_alone_does_not_keep_an_example(tmp_path, tiny_tokenizer):
    # The trainer shifts labels, so position 0 is never a target: text cut to its bos token
    # has nothing to learn, while one more token gives it one label.
    rows = [{"text": "some words here"}, {"text": "more words"}]
    path = write_jsonl(tmp_path / "train.jsonl", rows)
    with pytest.raises(DataError, match="dropped_no_labels: 2"):
        prepare_data(make_cfg(path, format="text", max_seq_len=1), tiny_tokenizer, seed=0)
    train, _, report = prepare_data(make_cfg(path, format="text", max_seq_len=2), tiny_tokenizer, seed=0)
    assert len(train) == 2 and report.truncated == 2 and report.train_label_tokens == 2


@pytest.mark.parametrize("cache", [False, True])
def test_dedupe_drops_and_counts_rows_that_repeat_an_earlier_one(tmp_path, tiny_tokenizer, cache):
    rows = good_rows(10)
    train = [*rows, {"prompt": "WHAT is 3 plus 3?", "response": " 6 "}, dict(rows[5]),
             {"prompt": "What is  1\tplus 1?", "response": "2"}, {"prompt": "What is 3 plus 3", "response": "6"}]
    # The validation file repeats one train row (it would leak the answer) and has one new row.
    val = [dict(rows[7]), {"prompt": "What is 20 plus 20?", "response": "40"}]
    path = write_jsonl(tmp_path / "train.jsonl", train)
    val_path = write_jsonl(tmp_path / "val.jsonl", val)
    kw = dict(validation_path=val_path, cache=cache, cache_dir=str(tmp_path / "cache"))
    _, _, kept = prepare_data(make_cfg(path, **kw), tiny_tokenizer, seed=0)
    assert (kept.duplicates, kept.val_duplicates, kept.train_examples, kept.val_examples) == (0, 0, 14, 2)
    train_ex, val_ex, report = prepare_data(make_cfg(path, dedupe=True, **kw), tiny_tokenizer, seed=0)
    # Case and whitespace do not make a row new; a missing "?" does.
    assert (report.duplicates, report.val_duplicates) == (3, 1)
    assert (report.train_examples, report.val_examples) == (11, 1)
    assert [tiny_tokenizer.decode(e.input_ids, skip_special_tokens=True) for e in val_ex][0].count("20 plus 20") == 1
    assert_accounted(report)
