"""Sources: every local file type, hub names and synthetic tasks, with row locations."""

from __future__ import annotations

import json

import datasets
import pytest

from ftdist.data.sources import DataError, read_rows
from ftdist.data.synthetic import generate_rows

RECORDS = [{"prompt": f"question {i}", "response": str(i)} for i in range(3)]


def test_jsonl_rows_carry_line_numbers_and_skip_blank_lines(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text("\ufeff" + json.dumps(RECORDS[0]) + "\n\n  \n" + json.dumps(RECORDS[1]) + "\n")
    rows = read_rows(str(path))
    assert [r.value for r in rows] == RECORDS[:2]
    assert [r.location for r in rows] == [f"{path}:1", f"{path}:4"]
    assert all(r.problem is None for r in rows)


def test_jsonl_bad_json_and_bad_utf8_are_row_problems_not_crashes(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_bytes(b'{"prompt": "a", \n' + b'{"prompt": "\xff"}\n' + json.dumps(RECORDS[0]).encode() + b"\n")
    rows = read_rows(str(path))
    assert [(r.location, r.problem.kind if r.problem else None) for r in rows] == [
        (f"{path}:1", "invalid_json"),
        (f"{path}:2", "invalid_json"),
        (f"{path}:3", None),
    ]
    assert "UTF-8" in rows[1].problem.detail


def test_jsonl_keeps_unicode_line_separators_inside_strings(tmp_path):
    path = tmp_path / "train.jsonl"
    record = {"prompt": "a\u2028b\x1cc", "response": "x"}
    path.write_text(json.dumps(record, ensure_ascii=False) + "\n", encoding="utf-8")
    assert [r.value for r in read_rows(str(path))] == [record]


def test_json_array_rows_are_located_at_their_first_line(tmp_path):
    path = tmp_path / "train.json"
    path.write_text(json.dumps(RECORDS, indent=2))
    rows = read_rows(str(path))
    assert [r.value for r in rows] == RECORDS
    lines = path.read_text().split("\n")
    for row in rows:
        line = int(row.location.rsplit(":", 1)[1])
        assert lines[line - 1].strip() == "{"
        assert f'"prompt": "{row.value["prompt"]}"' in lines[line]


def test_json_array_may_hold_non_objects_and_be_empty(tmp_path):
    path = tmp_path / "train.json"
    path.write_text('[1, {"a": 2}]')
    assert [r.value for r in read_rows(str(path))] == [1, {"a": 2}]
    path.write_text(" [ ] ")
    assert read_rows(str(path)) == []


@pytest.mark.parametrize(
    "text, line",
    [('[\n{"a": 1},\n{"a": 2\n]', 4), ('[\n{"a": 1}\n{"a": 2}]', 3), ('[{"a": 1}]\n\nextra', 3)],
)
def test_json_array_syntax_error_fails_the_file_with_its_line(tmp_path, text, line):
    path = tmp_path / "train.json"
    path.write_text(text)
    with pytest.raises(DataError, match=rf"train\.json:{line}: invalid_json"):
        read_rows(str(path))


def test_json_file_may_hold_json_lines(tmp_path):
    path = tmp_path / "train.json"
    path.write_text("\n".join(json.dumps(r) for r in RECORDS))
    rows = read_rows(str(path))
    assert [r.value for r in rows] == RECORDS
    assert rows[2].location == f"{path}:3"


def test_parquet_rows_are_numbered(tmp_path):
    path = tmp_path / "train.parquet"
    datasets.Dataset.from_list(RECORDS).to_parquet(str(path))
    rows = read_rows(str(path))
    assert [r.value for r in rows] == RECORDS
    assert [r.location for r in rows] == [f"{path}:row {i}" for i in (1, 2, 3)]


def test_csv_rows_are_text_located_by_line(tmp_path):
    path = tmp_path / "train.csv"
    records = RECORDS + [{"prompt": "no answer", "response": ""}]
    datasets.Dataset.from_list(records).to_csv(str(path), index=False)
    rows = read_rows(str(path))
    # "0".."2" stay strings (CSV has no types) and the empty cell stays "", not None/NaN.
    assert [r.value for r in rows] == records
    assert [r.location for r in rows] == [f"{path}:{i}" for i in (2, 3, 4, 5)]


@pytest.mark.parametrize("name", ["train.jsonl", "train.parquet", "sub/train.csv", "data.json"])
def test_missing_local_file_is_a_clear_error(tmp_path, name):
    with pytest.raises(DataError, match="data file not found: .*" + name.split("/")[-1]):
        read_rows(str(tmp_path / name))


@pytest.mark.parametrize("name", ["./data/train", "/no/such/dir/train", "data/train.jsonl"])
def test_paths_that_look_local_are_not_sent_to_the_hub(monkeypatch, name):
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: pytest.fail("hub was asked"))
    with pytest.raises(DataError, match="data file not found"):
        read_rows(name)


def test_unsupported_extension_is_an_error(tmp_path):
    path = tmp_path / "train.txt"
    path.write_text("hello")
    with pytest.raises(DataError, match=r"train\.txt: unsupported data file type '\.txt'"):
        read_rows(str(path))


def test_corrupt_parquet_is_a_data_error(tmp_path):
    path = tmp_path / "train.parquet"
    path.write_bytes(b"not parquet at all")
    with pytest.raises(DataError, match=r"train\.parquet: cannot read parquet file"):
        read_rows(str(path))


def test_hub_name_goes_to_load_dataset_with_the_split(monkeypatch):
    calls = []

    def fake_load_dataset(name, split):
        calls.append((name, split))
        return RECORDS

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    rows = read_rows("openai/gsm8k", split="test")
    assert calls == [("openai/gsm8k", "test")]
    assert [r.value for r in rows] == RECORDS
    assert rows[1].location == "openai/gsm8k[test]:row 2"


def test_hub_failure_is_a_data_error(monkeypatch):
    def failing(name, split):
        raise ConnectionError("no network")

    monkeypatch.setattr(datasets, "load_dataset", failing)
    with pytest.raises(DataError, match="cannot load dataset 'org/name' .*split 'train'.*no network"):
        read_rows("org/name")


def test_synthetic_rows_match_the_generator():
    rows = read_rows("synthetic:json_extraction", num_synthetic_rows=5, seed=3)
    assert [r.value for r in rows] == generate_rows("json_extraction", 5, 3)
    assert rows[4].location == "synthetic:json_extraction:row 5"


def test_unknown_synthetic_task_is_a_data_error():
    with pytest.raises(DataError, match="synthetic:nope: unknown synthetic task"):
        read_rows("synthetic:nope", num_synthetic_rows=5)


def test_dataset_directory_loads_through_load_dataset_with_the_split(tmp_path):
    # A dataset repository on disk goes through the same datasets.load_dataset path as a hub
    # name (the real loader, offline): its split files are found by name.
    (tmp_path / "repo").mkdir()
    (tmp_path / "repo" / "train.jsonl").write_text('{"prompt": "a", "response": "b"}\n{"prompt": "c", "response": "d"}\n')
    (tmp_path / "repo" / "test.jsonl").write_text('{"prompt": "e", "response": "f"}\n')
    train = read_rows(str(tmp_path / "repo"), split="train")
    test = read_rows(str(tmp_path / "repo"), split="test")
    assert [r.value for r in train] == [{"prompt": "a", "response": "b"}, {"prompt": "c", "response": "d"}]
    assert [r.value["prompt"] for r in test] == ["e"]
    assert train[1].location.endswith(":row 2")
