"""data.format=classification: label sets, tokenization, bad rows and the data report."""

from __future__ import annotations

import pytest
from conftest import shared_dataset
from helpers import write_jsonl

from ftdist.config import DataConfig
from ftdist.data.classification import sort_labels
from ftdist.data.prepare import DataError, prepare_data


def cfg(path: str, **kw) -> DataConfig:
    kw.setdefault("max_seq_len", 64)
    kw.setdefault("val_fraction", 0.0)
    return DataConfig(path=path, format="classification", **kw)


def test_labels_are_the_sorted_training_labels_and_texts_tokenize_as_the_tokenizer_does(tmp_path, tiny_tokenizer):
    rows = [{"text": f"message number {i}", "label": ["spam", "ham", "eggs"][i % 3]} for i in range(9)]
    train, _, report = prepare_data(cfg(write_jsonl(tmp_path / "d.jsonl", rows)), tiny_tokenizer, seed=0)
    assert report.labels == ["eggs", "ham", "spam"]
    assert report.label_counts == {"eggs": 3, "ham": 3, "spam": 3}
    for row, doc in zip(rows, train, strict=True):
        assert doc.input_ids == tiny_tokenizer(row["text"])["input_ids"]  # what a HF pipeline feeds the model
        assert doc.label == row["label"] and report.labels[doc.target] == row["label"]


def test_integer_labels_sort_as_numbers_and_equal_their_strings(tmp_path, tiny_tokenizer):
    assert sort_labels(["10", "2", "1"]) == ["1", "2", "10"]
    assert sort_labels(["b", "10", "a"]) == ["10", "a", "b"]
    rows = [{"text": "x y", "label": 10}, {"text": "y z", "label": "2"}, {"text": "z", "label": 2.0}]
    train, _, report = prepare_data(cfg(write_jsonl(tmp_path / "d.jsonl", rows)), tiny_tokenizer, seed=0)
    assert report.labels == ["2", "10"]
    assert [d.target for d in train] == [1, 0, 0]


def test_fixed_labels_set_the_order_and_unknown_labels_are_bad_rows(tmp_path, tiny_tokenizer, caplog):
    rows = [{"text": "aaa", "label": "pos"}, {"text": "bbb", "label": "neg"}, {"text": "ccc", "label": "meh"}]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    with pytest.raises(DataError, match=r"d.jsonl:3: unknown_label: label 'meh' is not one of the run's 3 classes"):
        prepare_data(cfg(path), tiny_tokenizer, seed=0, labels=["pos", "neg", "neutral"])
    train, _, report = prepare_data(cfg(path, on_bad_row="skip"), tiny_tokenizer, seed=0, labels=["pos", "neg", "neutral"])
    assert report.labels == ["pos", "neg", "neutral"]
    assert [d.target for d in train] == [0, 1]
    assert report.bad_rows == {"unknown_label": 1}
    assert report.label_counts == {"pos": 1, "neg": 1, "neutral": 0}
    assert "neutral" in caplog.text  # a class with no training document is warned about


def test_a_validation_label_training_never_saw_is_a_bad_validation_row(tmp_path, tiny_tokenizer):
    train_rows = [{"text": f"t{i}", "label": "ab"[i % 2]} for i in range(6)]
    val_rows = [{"text": "v1", "label": "a"}, {"text": "v2", "label": "c"}]
    config = cfg(write_jsonl(tmp_path / "t.jsonl", train_rows), validation_path=write_jsonl(tmp_path / "v.jsonl", val_rows),
                 on_bad_row="skip")
    _, val, report = prepare_data(config, tiny_tokenizer, seed=0)
    assert report.labels == ["a", "b"] and len(val) == 1
    assert report.val_bad_rows == {"unknown_label": 1}
    assert report.val_label_counts == {"a": 1, "b": 0}
    assert "v.jsonl:2" in report.bad_row_examples["unknown_label"]


@pytest.mark.parametrize("row,kind", [
    ({"text": "", "label": "a"}, "empty_text"),
    ({"text": 5, "label": "a"}, "wrong_type"),
    ({"text": "x"}, "missing_field"),
    ({"text": "x", "label": ""}, "missing_label"),
    ({"text": "x", "label": True}, "missing_label"),
    ({"text": "x", "label": [1]}, "wrong_type"),
    ({"text": "x", "label": 1.5}, "wrong_type"),
])
def test_malformed_rows_are_counted_by_kind(tmp_path, tiny_tokenizer, row, kind):
    rows = [{"text": "one", "label": "a"}, {"text": "two", "label": "b"}, row]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    with pytest.raises(DataError, match=rf"d.jsonl:3: {kind}"):
        prepare_data(cfg(path), tiny_tokenizer, seed=0)
    _, _, report = prepare_data(cfg(path, on_bad_row="skip"), tiny_tokenizer, seed=0)
    assert report.bad_rows == {kind: 1} and report.train_examples == 2


def test_truncation_keeps_the_head_and_drops_nothing(tmp_path, tiny_tokenizer):
    rows = [{"text": "word " * 50, "label": "a"}, {"text": "short", "label": "b"}]
    train, _, report = prepare_data(cfg(write_jsonl(tmp_path / "d.jsonl", rows), max_seq_len=8), tiny_tokenizer, seed=0)
    assert train[0].input_ids == tiny_tokenizer(rows[0]["text"])["input_ids"][:8]
    assert report.truncated == 1 and report.dropped_no_labels == 0 and report.train_examples == 2


def test_truncation_cuts_as_the_tokenizer_does_keeping_a_closing_special_token(tmp_path, tiny_model_dir):
    """A tokenizer that closes every text with a special token keeps it when it truncates; the
    documents are what a pipeline with truncation=True feeds the saved model."""
    from tokenizers import processors
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    bos, eos = tok.bos_token, tok.eos_token
    tok._tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A {eos}", special_tokens=[(bos, tok.bos_token_id), (eos, tok.eos_token_id)])
    rows = [{"text": "word " * 50, "label": "a"}, {"text": "short", "label": "b"}]
    train, _, report = prepare_data(cfg(write_jsonl(tmp_path / "d.jsonl", rows), max_seq_len=8), tok, seed=0)
    long, short = train
    assert long.input_ids == tok(rows[0]["text"], truncation=True, max_length=8)["input_ids"]
    assert len(long.input_ids) == 8 and long.input_ids[0] == tok.bos_token_id and long.input_ids[-1] == tok.eos_token_id
    assert short.input_ids == tok("short")["input_ids"] and short.input_ids[-1] == tok.eos_token_id
    assert report.truncated == 1


def test_one_class_is_not_a_classification_task(tmp_path, tiny_tokenizer):
    rows = [{"text": f"t{i}", "label": "same"} for i in range(4)]
    with pytest.raises(DataError, match="1 distinct label"):
        prepare_data(cfg(write_jsonl(tmp_path / "d.jsonl", rows)), tiny_tokenizer, seed=0)


def test_sms_spam_collection_prepares_without_a_bad_row(tiny_tokenizer):
    path = shared_dataset("sms_spam/SMSSpamCollection.tsv")
    config = cfg(str(path), columns=["label", "text"], val_fraction=0.1, max_seq_len=256)
    train, val, report = prepare_data(config, tiny_tokenizer, seed=0)
    assert report.labels == ["ham", "spam"]
    assert report.bad_rows == {} and report.val_bad_rows == {}
    assert len(train) + len(val) == 5574
    counts = {k: report.label_counts[k] + report.val_label_counts[k] for k in report.labels}
    assert counts == {"ham": 4827, "spam": 747}
