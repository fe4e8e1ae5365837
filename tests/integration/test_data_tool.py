"""`python -m ftdist.data` as users run it (subprocesses, the tiny model's tokenizer): stats
against the rows tokenized here independently, preview's loss markers, validate's bad rows with
file:line, clean's counts on rows with known duplicates and personal data, the cache built once
and then reused, and one-line errors with exit code 2."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from helpers import REPO, run_env

from ftdist.constants import EXIT_BAD_INPUT

MAX_SEQ_LEN = 40
ROWS = [
    {"prompt": "What is the capital of Peru?", "response": "Lima."},
    {"prompt": "Name a primary colour.", "response": "Blue."},
    {"prompt": "2 + 2?", "response": "4"},
    {"prompt": "Say hello.", "response": "Hello there, how are you today?"},
    {"prompt": "Translate 'gato'.", "response": "Cat."},
    {"prompt": "Spell 'dog'.", "response": "D-O-G"},
    # Cut to MAX_SEQ_LEN with labels left: truncated, kept.
    {"prompt": "Tell a story.", "response": "Once upon a time a fox lived in a quiet wood by a cold river."},
    # Its response starts past MAX_SEQ_LEN: no label left, dropped.
    {"prompt": "Please read this very long question with many words before answering it briefly.",
     "response": "Fine."},
]


def run_data(args: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ftdist.data", *args], cwd=REPO, env=run_env(), capture_output=True,
                          text=True, timeout=timeout, check=False)


def write_jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("data_tool")


@pytest.fixture(scope="module")
def overrides(data_dir):
    train = write_jsonl(data_dir / "train.jsonl", ROWS)
    return [f"data.path={train}", f"data.cache_dir={data_dir / 'cache'}", "data.val_fraction=0",
            f"data.max_seq_len={MAX_SEQ_LEN}"]


def expected_stats(tokenizer) -> dict:
    """The figures of ROWS from the tokenizer alone: the chat template's rendering tokenized, the
    response (and the end-of-turn token) labelled, truncated to MAX_SEQ_LEN."""
    lengths, full, labelled, truncated, dropped = [], [], 0, 0, 0
    for row in ROWS:
        messages = [{"role": "user", "content": row["prompt"]}, {"role": "assistant", "content": row["response"]}]
        ids = tokenizer(tokenizer.apply_chat_template(messages, tokenize=False), add_special_tokens=False).input_ids
        response = len(tokenizer(row["response"], add_special_tokens=False).input_ids) + 1  # + <|end|>
        start = len(ids) - response
        full.append(len(ids))
        if start >= MAX_SEQ_LEN:
            dropped += 1
            continue
        truncated += len(ids) > MAX_SEQ_LEN
        lengths.append(min(len(ids), MAX_SEQ_LEN))
        labelled += min(len(ids), MAX_SEQ_LEN) - start
    return {"lengths": lengths, "full": full, "label_tokens": labelled, "truncated": truncated, "dropped": dropped}


def test_prepare_stats_and_a_second_prepare_that_reuses_the_cache(overrides, data_dir, tiny_tokenizer):
    first = run_data(["prepare", *overrides])
    assert first.returncode == 0, first.stderr[-3000:]
    assert first.stdout.startswith(f"cache built: {data_dir / 'cache'}"), first.stdout

    stats_json, png = data_dir / "stats.json", data_dir / "lengths.png"
    stats = run_data(["stats", "--json", str(stats_json), *overrides, "--png", str(png), "--full-lengths"])
    assert stats.returncode == 0, stats.stderr[-3000:]
    want = expected_stats(tiny_tokenizer)
    assert want["truncated"] == 1 and want["dropped"] == 1  # the rows mean what they say
    got = json.loads(stats_json.read_text())["splits"]["train"]
    lengths = np.asarray(want["lengths"])
    assert got["rows"] == len(ROWS) and got["examples"] == len(ROWS) - 1
    assert got["tokens"] == lengths.sum() and got["label_tokens"] == want["label_tokens"]
    assert (got["truncated"], got["dropped_no_labels"]) == (1, 1)
    assert got["at_max_seq_len"] == int((lengths == MAX_SEQ_LEN).sum())
    for p in (50, 90, 99):
        assert got["lengths"][f"p{p}"] == int(np.percentile(lengths, p, method="inverted_cdf"))
    assert got["lengths"]["max"] == MAX_SEQ_LEN and sum(got["histogram"]["counts"]) == len(lengths)
    full = np.asarray(want["full"])  # --full-lengths: every row encoded again, untruncated
    assert got["full_lengths"]["max"] == full.max() and got["full_lengths"]["count"] == len(ROWS)
    assert got["full_lengths"]["p50"] == int(np.percentile(full, 50, method="inverted_cdf"))
    assert got["over_max_seq_len"] == int((full > MAX_SEQ_LEN).sum()) == 2
    p = got["lengths"]
    assert f"sequence length: p50 {p['p50']}, p90 {p['p90']}, p99 {p['p99']}, max {p['max']}" in stats.stdout
    assert "#" in stats.stdout  # the terminal histogram
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    second = run_data(["prepare", *overrides])
    assert second.returncode == 0, second.stderr[-3000:]
    assert second.stdout.splitlines()[0] == first.stdout.splitlines()[0].replace("built", "reused")
    assert f"train: {len(ROWS)} rows -> {len(ROWS) - 1} examples, {lengths.sum()} tokens" in second.stdout


def test_preview_marks_the_tokens_that_carry_the_loss(overrides):
    proc = run_data(["preview", "2", "--start", "0", *overrides])
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert "tokens with a loss are shown between \u00ab and \u00bb" in out
    assert "<|bos|><|user|>What is the capital of Peru?<|end|><|assistant|>\u00abLima.<|end|>\u00bb" in out
    assert "<|user|>Name a primary colour.<|end|><|assistant|>\u00abBlue.<|end|>\u00bb" in out
    assert "2 + 2?" not in out  # two examples only
    assert "\033[" not in out  # not a terminal: no colour codes


def test_validate_passes_a_good_file_and_lists_each_bad_row(overrides, data_dir):
    good = run_data(["validate", *overrides])
    assert good.returncode == 0, good.stderr[-3000:]
    assert good.stdout.strip() == f"validate: all {len(ROWS)} rows parse and encode (data.format=instruction)"

    bad_file = data_dir / "bad.jsonl"
    lines = [json.dumps(ROWS[0]), json.dumps(ROWS[1]), '{"prompt": "unclosed', json.dumps(ROWS[2]),
             json.dumps({"prompt": "no answer"})]
    bad_file.write_text("\n".join(lines) + "\n")
    bad = run_data(["validate", f"data.path={bad_file}", *overrides[1:]])
    assert bad.returncode == EXIT_BAD_INPUT, bad.stderr[-3000:]
    listed = bad.stdout.strip().splitlines()
    assert [line.split(": ")[:2] for line in listed] == [[f"{bad_file}:3", "invalid_json"],
                                                        [f"{bad_file}:5", "missing_field"]]
    errors = [line for line in bad.stderr.splitlines() if line.startswith("ftdist:")]
    assert errors == [(f"ftdist: DataError: 2 of 5 rows are bad (invalid_json 1, missing_field 1); first: "
                      f"{listed[0]}")], bad.stderr


def test_clean_counts_the_known_duplicates_and_personal_data(data_dir):
    story = ("The committee met on Tuesday to review the budget for the new library and agreed that the reading "
             "rooms would open in spring while the archive and the children's section would follow in the autumn "
             "once the last shelves had been delivered and the lighting had been inspected by the city engineer")
    rows = [
        {"prompt": "What is the capital of Peru?", "response": "Lima."},  # 1
        {"prompt": "Email me at ana.ruiz@example.com", "response": "Done."},  # 2: email
        {"prompt": "what is the capital of  PERU?", "response": "lima."},  # 3: duplicate of 1
        {"prompt": "Summarize.", "response": story},  # 4
        {"prompt": "Summarize.", "response": story.replace("Tuesday", "Monday")},  # 5: near 4
        {"prompt": "My card is 4111 1111 1111 1111", "response": "Never share it."},  # 6: card
        {"prompt": "Call +44 20 7946 0958 from 10.0.0.7", "response": " "},  # 7: phone, ipv4, empty
        {"prompt": "Natalia sold 48/2 = <<48/2=24>>24 clips", "response": "#### 72"},  # 8: nothing
    ]
    path = write_jsonl(data_dir / "clean.jsonl", rows)
    val = write_jsonl(data_dir / "clean_val.jsonl", [rows[0]])  # 9: a validation row repeating a training row
    out = data_dir / "clean.json"
    proc = run_data(["clean", f"data.path={path}", f"data.validation_path={val}", "--json", str(out), "--limit", "1"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert {k: report[k] for k in ("rows", "train_rows", "exact_duplicates", "near_duplicates", "pii_rows",
                                   "pii_rows_by_kind", "short_responses")} == {
        "rows": 9, "train_rows": 8, "exact_duplicates": 2, "near_duplicates": 1, "pii_rows": 3,
        "pii_rows_by_kind": {"email": 1, "phone": 1, "card": 1, "ipv4": 1}, "short_responses": 1}
    findings = report["findings"]
    assert [(f["location"], f["first_location"]) for f in findings["exact_duplicates"]] == [
        (f"{path}:3", f"{path}:1"), (f"{val}:1", f"{path}:1")]
    assert [(f["location"], f["first_location"]) for f in findings["near_duplicates"]] == [(f"{path}:5", f"{path}:4")]
    assert [(f["location"], f["field"], f["kind"]) for f in findings["pii"]] == [
        (f"{path}:2", "prompt", "email"), (f"{path}:6", "prompt", "card"), (f"{path}:7", "prompt", "phone"),
        (f"{path}:7", "prompt", "ipv4")]
    assert f"  {path}:3: same text as {path}:1" in proc.stdout
    assert f"  ... and 1 more ({out} lists them all)" in proc.stdout  # --limit 1


def test_bad_input_is_one_line_and_exit_2(tmp_path):
    unknown = run_data(["stats", "data.pathh=x.jsonl"])
    assert unknown.returncode == EXIT_BAD_INPUT
    assert unknown.stderr.strip().splitlines() == [
        unknown.stderr.strip()] and unknown.stderr.startswith("ftdist: ConfigError: unknown config key 'data.pathh'")
    missing = run_data(["clean", f"data.path={tmp_path / 'nope.jsonl'}"])
    assert missing.returncode == EXIT_BAD_INPUT
    assert missing.stderr.strip() == (f"ftdist: DataError: data.path={tmp_path / 'nope.jsonl'}: data file not found "
                                      f"(working directory: {REPO}); a path with a file extension (.jsonl, .json, "
                                      ".parquet, .csv, .tsv) or starting with /, ./, ../ or ~/ is read as a local "
                                      "file, anything else as a hub dataset name")
