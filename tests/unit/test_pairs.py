"""python -m ftdist.data.pairs: two answer files joined row for row into preference rows."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, shared_dataset
from helpers import write_jsonl

from ftdist.config import DataConfig
from ftdist.data.pairs import Fields, join_pairs, main
from ftdist.data.prepare import prepare_data
from ftdist.data.sources import DataError


def answers(tmp_path, name, responses, prompts=None):
    prompts = prompts or [f"question {i}" for i in range(len(responses))]
    return write_jsonl(tmp_path / name, [{"prompt": p, "response": r} for p, r in zip(prompts, responses, strict=True)])


def read_jsonl(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def test_rows_are_joined_in_order_first_file_chosen(tmp_path, capsys):
    a = answers(tmp_path, "a.jsonl", ["good 0", "good 1", "good 2"])
    b = answers(tmp_path, "b.jsonl", ["bad 0", "bad 1", "bad 2"])
    out = tmp_path / "sub" / "pairs.jsonl"
    assert main(["--chosen", a, "--rejected", b, "--out", str(out)]) == 0
    assert read_jsonl(out) == [{"prompt": f"question {i}", "chosen": f"good {i}", "rejected": f"bad {i}"}
                               for i in range(3)]
    assert capsys.readouterr().out.strip() == (
        f"wrote 3 pairs to {out}; skipped 0 (same_responses 0, empty_response 0)")


def test_identical_and_empty_answers_are_skipped_and_counted(tmp_path, capsys):
    a = answers(tmp_path, "a.jsonl", ["same", "kept", "  ", "x", "Lima."])
    b = answers(tmp_path, "b.jsonl", ["same", "other", "y", "", " Lima.\n"])  # whitespace around does not count
    out = tmp_path / "pairs.jsonl"
    assert main(["--chosen", a, "--rejected", b, "--out", str(out)]) == 0
    assert read_jsonl(out) == [{"prompt": "question 1", "chosen": "kept", "rejected": "other"}]
    assert "wrote 1 pairs" in capsys.readouterr().out
    result = join_pairs(a, b)
    assert dict(result.skipped) == {"same_responses": 2, "empty_response": 2}


def test_blank_lines_do_not_shift_rows(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", [{"prompt": "p0", "response": "a0"}, "", {"prompt": "p1", "response": "a1"}])
    b = answers(tmp_path, "b.jsonl", ["b0", "b1"], ["p0", "p1"])
    assert [p["rejected"] for p in join_pairs(a, b).pairs] == ["b0", "b1"]


def test_prompt_mismatch_names_both_files_and_lines(tmp_path, capsys):
    a = answers(tmp_path, "a.jsonl", ["a0", "a1"], ["p0", "p1"])
    b = answers(tmp_path, "b.jsonl", ["b0", "b1"], ["p0", "something else"])
    out = tmp_path / "pairs.jsonl"
    assert main(["--chosen", a, "--rejected", b, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("ftdist.pairs: DataError: ")
    assert f"{a}:2 and {b}:2: the prompts differ" in err
    assert not out.exists()  # nothing written on an error


def test_malformed_line_and_missing_field_name_file_and_line(tmp_path):
    good = answers(tmp_path, "good.jsonl", ["a0", "a1"])
    broken = write_jsonl(tmp_path / "broken.jsonl", [{"prompt": "question 0", "response": "b0"}, '{"prompt": "q'])
    with pytest.raises(DataError, match=rf"^{broken}:2: invalid_json: "):
        join_pairs(good, broken)
    missing = write_jsonl(tmp_path / "missing.jsonl", [{"prompt": "question 0", "answer": "b0"}, {"prompt": "q"}])
    with pytest.raises(DataError, match=rf"^{missing}:1: missing_field: row has no field 'response' "
                                        r"\(fields: prompt, answer\)"):
        join_pairs(missing, good)
    with pytest.raises(DataError, match=rf"^{good}:1: missing_field: row has no field 'text'"):
        join_pairs(good, good, Fields(response="text"))
    not_object = write_jsonl(tmp_path / "list.jsonl", ["[1, 2]", "[3]"])
    with pytest.raises(DataError, match=rf"^{not_object}:1: wrong_type: a row must be a JSON object, got array$"):
        join_pairs(good, not_object)
    number = write_jsonl(tmp_path / "number.jsonl", [{"prompt": "question 0", "response": 7}, {"prompt": "q"}])
    with pytest.raises(DataError, match=rf"^{number}:1: wrong_type: field 'response' must be a string"):
        join_pairs(number, good)


def test_files_of_different_lengths_and_missing_files_are_errors(tmp_path):
    a = answers(tmp_path, "a.jsonl", ["a0", "a1", "a2"])
    b = answers(tmp_path, "b.jsonl", ["b0", "b1"])
    with pytest.raises(DataError, match=rf"^{a} has 3 rows and {b} has 2"):
        join_pairs(a, b)
    with pytest.raises(DataError, match="nowhere.jsonl: file not found"):
        join_pairs(a, str(tmp_path / "nowhere.jsonl"))
    txt = tmp_path / "answers.txt"
    txt.write_text("x\n")
    with pytest.raises(DataError, match="unsupported file type"):
        join_pairs(a, str(txt))


def test_field_names_and_input_field(tmp_path):
    rows = lambda answer: [
        {"instruction": "Translate.", "context": "Bonjour", "answer": f"{answer} 0"},
        {"instruction": "Say hi.", "context": "", "answer": f"{answer} 1"},
    ]
    a = write_jsonl(tmp_path / "a.jsonl", rows("Hello"))
    b = write_jsonl(tmp_path / "b.jsonl", rows("Goodbye"))
    out = tmp_path / "pairs.jsonl"
    argv = ["--chosen", a, "--rejected", b, "--out", str(out), "--prompt-field", "instruction",
            "--response-field", "answer", "--input-field", "context"]
    assert main(argv) == 0
    assert read_jsonl(out) == [
        {"prompt": "Translate.\n\nBonjour", "chosen": "Hello 0", "rejected": "Goodbye 0"},
        {"prompt": "Say hi.", "chosen": "Hello 1", "rejected": "Goodbye 1"},  # an empty input adds nothing
    ]
    # The input is part of the prompt the two rows must share.
    other = rows("Goodbye")
    other[0]["context"] = "Guten Tag"
    b2 = write_jsonl(tmp_path / "b2.jsonl", other)
    with pytest.raises(DataError, match=rf"{a}:1 and {b2}:1: the prompts differ \(field 'instruction' with 'context'\)"):
        join_pairs(a, b2, Fields("instruction", "answer", "context"))


def test_message_prompts_and_assistant_message_answers_pass_through(tmp_path):
    prompt = [{"role": "user", "content": "Capital of Peru?"}]
    a = write_jsonl(tmp_path / "a.jsonl", [{"prompt": prompt, "response": {"role": "assistant", "content": "Lima."}}])
    b = write_jsonl(tmp_path / "b.jsonl", [{"prompt": prompt, "response": {"role": "assistant", "content": "Quito."}}])
    assert join_pairs(a, b).pairs == [{"prompt": prompt, "chosen": {"role": "assistant", "content": "Lima."},
                                       "rejected": {"role": "assistant", "content": "Quito."}}]


def test_out_may_not_overwrite_an_input_and_usage_errors_are_one_line(tmp_path, capsys):
    a = answers(tmp_path, "a.jsonl", ["a0"])
    b = answers(tmp_path, "b.jsonl", ["b0"])
    assert main(["--chosen", a, "--rejected", b, "--out", b]) == 2
    assert "is one of the input files" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(["--chosen", a, "--out", str(tmp_path / "p.jsonl")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--rejected" in err


def test_joined_rows_are_accepted_by_the_preference_format(tmp_path, tiny_tokenizer):
    a = answers(tmp_path, "a.jsonl", ["Lima is the capital.", "Four.", "Blue."])
    b = answers(tmp_path, "b.jsonl", ["Quito.", "Five.", "Blue. "])  # the last pair: same answer
    out = tmp_path / "pairs.jsonl"
    assert main(["--chosen", a, "--rejected", b, "--out", str(out)]) == 0
    cfg = DataConfig(path=str(out), format="preference", max_seq_len=64, val_fraction=0.0)
    train, val, report = prepare_data(cfg, tiny_tokenizer, seed=0)
    assert len(train) == 2 and not val and not report.bad_rows


SELF_INSTRUCT = "self_instruct/{}_predictions.jsonl"


def test_self_instruct_predictions_join_into_252_pairs(tmp_path, tiny_tokenizer):
    chosen = shared_dataset(SELF_INSTRUCT.format("text-davinci-003"))
    rejected = shared_dataset(SELF_INSTRUCT.format("davinci"))
    out = tmp_path / "pairs.jsonl"
    proc = subprocess.run(
        [sys.executable, "-m", "ftdist.data.pairs", "--chosen", str(chosen), "--rejected", str(rejected),
         "--out", str(out)], cwd=REPO, capture_output=True, text=True, check=False, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"wrote 252 pairs to {out}; skipped 0 (same_responses 0, empty_response 0)"
    pairs = read_jsonl(out)
    first_chosen, first_rejected = (read_jsonl(p)[0] for p in (chosen, rejected))
    assert pairs[0] == {"prompt": first_chosen["prompt"], "chosen": first_chosen["response"],
                        "rejected": first_rejected["response"]}
    # Every pair is a valid preference row: none is refused, none dropped at a generous length.
    cfg = DataConfig(path=str(out), format="preference", max_seq_len=4096, val_fraction=0.0)
    train, _, report = prepare_data(cfg, tiny_tokenizer, seed=0)
    assert len(train) == 252 and not report.bad_rows and report.dropped_no_labels == 0
