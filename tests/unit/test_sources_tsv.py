"""Local .tsv files, and header-less .tsv/.csv files whose columns data.columns names.

Expected rows are written out by hand from the bytes each test writes, not derived from the
reader's own splitting."""

from __future__ import annotations

import json
from collections import Counter

import pytest
from conftest import shared_dataset

from ftdist.config import DataConfig
from ftdist.data.sources import LOCAL_EXTENSIONS, BadRow, DataError, check_data_source, read_rows

SMS_LABELS = ["label", "text"]


def write(tmp_path, name: str, data: bytes) -> str:
    path = tmp_path / name
    path.write_bytes(data)
    return str(path)


def test_tsv_is_a_local_extension():
    assert ".tsv" in LOCAL_EXTENSIONS


def test_tsv_first_line_is_the_header(tmp_path):
    path = write(tmp_path, "train.tsv", b"prompt\tresponse\nWhat is 2+2?\t4\nno answer\t\n")
    rows = read_rows(path)
    # "4" stays a string and the empty cell stays "" (as for .csv).
    assert [r.value for r in rows] == [{"prompt": "What is 2+2?", "response": "4"},
                                       {"prompt": "no answer", "response": ""}]
    assert [r.location for r in rows] == [f"{path}:2", f"{path}:3"]
    assert all(r.problem is None for r in rows)


def test_tsv_with_columns_has_no_header_and_counts_lines_from_one(tmp_path):
    path = write(tmp_path, "sms.tsv", b"ham\thello there\r\nspam\tWIN now\r\n\r\nham\tok\r\n")
    rows = read_rows(path, columns=["label", "text"])
    # CRLF endings leave no "\r" behind; the blank line 3 is skipped but still counted.
    assert [r.value for r in rows] == [{"label": "ham", "text": "hello there"},
                                       {"label": "spam", "text": "WIN now"},
                                       {"label": "ham", "text": "ok"}]
    assert [r.location for r in rows] == [f"{path}:1", f"{path}:2", f"{path}:4"]


def test_tsv_quotes_are_text_and_never_join_lines(tmp_path):
    path = write(tmp_path, "q.tsv", b'ham\tHe said "see you\nspam\t"Free" entry\nham\tsize 5" screen""\n')
    rows = read_rows(path, columns=["label", "text"])
    assert [r.value for r in rows] == [{"label": "ham", "text": 'He said "see you'},
                                       {"label": "spam", "text": '"Free" entry'},
                                       {"label": "ham", "text": 'size 5" screen""'}]
    assert [r.location for r in rows] == [f"{path}:1", f"{path}:2", f"{path}:3"]


def test_tsv_line_with_wrong_field_count_is_a_bad_row_at_its_line(tmp_path):
    path = write(tmp_path, "bad.tsv", b"label\ttext\nham\tfine\nspam\ttoo\tmany\nlonely\nham\tfine again\n")
    rows = read_rows(path)
    assert [r.location for r in rows] == [f"{path}:{i}" for i in (2, 3, 4, 5)]
    assert [r.value for r in rows] == [{"label": "ham", "text": "fine"}, None, None,
                                       {"label": "ham", "text": "fine again"}]
    bad = [r.problem for r in rows[1:3]]
    assert all(isinstance(p, BadRow) and p.kind == "wrong_columns" for p in bad)
    assert bad[0].detail == "expected 2 fields (label, text), got 3"
    assert bad[1].detail == "expected 2 fields (label, text), got 1"


def test_tsv_invalid_utf8_line_is_a_bad_row(tmp_path):
    path = write(tmp_path, "enc.tsv", b"ham\tok\nspam\t\xff\xfe\n")
    rows = read_rows(path, columns=["label", "text"])
    assert rows[0].value == {"label": "ham", "text": "ok"}
    assert rows[1].location == f"{path}:2" and rows[1].problem.kind == "not_utf8"


@pytest.mark.parametrize("columns", [None, ["prompt", "response"]])
def test_tsv_byte_order_mark_is_stripped(tmp_path, columns):
    header = b"" if columns else b"prompt\tresponse\n"
    path = write(tmp_path, "bom.tsv", b"\xef\xbb\xbf" + header + b"q\ta\n")
    assert [r.value for r in read_rows(path, columns=columns)] == [{"prompt": "q", "response": "a"}]


def test_tsv_without_a_header_line_is_an_error(tmp_path):
    path = write(tmp_path, "empty.tsv", b"\n\n")
    with pytest.raises(DataError, match=r"empty\.tsv:1: tsv file has no header line"):
        read_rows(path)
    assert read_rows(path, columns=["a"]) == []  # with data.columns an empty file is just empty


def test_tsv_header_with_a_repeated_name_is_an_error(tmp_path):
    path = write(tmp_path, "dup.tsv", b"text\ttext\na\tb\n")
    with pytest.raises(DataError, match=r"dup\.tsv:1: tsv header line"):
        read_rows(path)


def test_csv_with_columns_reads_the_first_line_as_a_record(tmp_path):
    path = write(tmp_path, "train.csv", b'What is 2+2?,4\n"a, quoted, prompt",\n')
    rows = read_rows(path, columns=["prompt", "response"])
    assert [r.value for r in rows] == [{"prompt": "What is 2+2?", "response": "4"},
                                       {"prompt": "a, quoted, prompt", "response": ""}]
    assert [r.location for r in rows] == [f"{path}:1", f"{path}:2"]


@pytest.mark.parametrize("name", ["train.jsonl", "train.json", "train.parquet"])
def test_columns_for_a_file_without_columns_is_an_error(tmp_path, name):
    path = write(tmp_path, name, json.dumps({"prompt": "p", "response": "r"}).encode() + b"\n")
    with pytest.raises(DataError, match=r"^data\.columns=\['a', 'b'\]: .*header-less \.csv or \.tsv"):
        read_rows(path, columns=["a", "b"])


def test_columns_for_a_synthetic_source_is_an_error():
    with pytest.raises(DataError, match=r"^data\.columns="):
        read_rows("synthetic:support_tickets", num_synthetic_rows=3, columns=["text", "label"])


@pytest.mark.parametrize("columns", [[], ["a", "a"], ["a", ""]])
def test_columns_need_distinct_names(tmp_path, columns):
    path = write(tmp_path, "x.tsv", b"1\t2\n")
    with pytest.raises(DataError, match=r"^data\.columns=.*distinct, non-empty"):
        read_rows(path, columns=columns)


def test_check_data_source_names_data_columns_and_the_key(tmp_path):
    train = write(tmp_path, "train.tsv", b"ham\thi\n")
    val = write(tmp_path, "val.jsonl", b"{}\n")
    check_data_source(DataConfig(path=train, columns=["label", "text"], max_seq_len=8))
    with pytest.raises(DataError, match=r"^data\.columns=\['label', 'text'\]: .* data\.validation_path="):
        check_data_source(DataConfig(path=train, validation_path=val, columns=["label", "text"], max_seq_len=8))


def test_sms_spam_collection_reads_whole():
    path = shared_dataset("sms_spam/SMSSpamCollection.tsv")
    raw_lines = path.read_bytes().split(b"\r\n")
    rows = read_rows(str(path), columns=SMS_LABELS)
    assert [r.problem for r in rows if r.problem is not None] == []
    assert len(rows) == 5574 and rows[-1].location == f"{path}:5574"
    assert Counter(r.value["label"] for r in rows) == {"ham": 4827, "spam": 747}
    assert rows[0].value == {"label": "ham", "text": "Go until jurong point, crazy.. Available only in bugis n "
                                                      "great world la e buffet... Cine there got amore wat..."}
    # 145 messages hold a '"'; each is still exactly its own line of the file.
    quoted = [r for r in rows if '"' in r.value["text"]]
    assert len(quoted) == 145
    for r in quoted:
        line = int(r.location.rsplit(":", 1)[1])
        assert raw_lines[line - 1].decode() == f"{r.value['label']}\t{r.value['text']}"
