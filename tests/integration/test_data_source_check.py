"""A local data.path that does not exist is reported before the tokenizer or model loads (a hub
tokenizer that cannot be reached is retried for about 45 s first otherwise), in one line, exit 2;
hub dataset names and existing files still pass the check."""

from __future__ import annotations

import subprocess
import time

import pytest
from helpers import FAST, REPO, run_env, train_cmd

from ftdist.config import DataConfig
from ftdist.constants import EXIT_BAD_INPUT
from ftdist.data.sources import DataError, check_data_source


def test_missing_local_data_path_fails_before_a_hub_tokenizer_is_tried(tmp_path):
    missing = tmp_path / "no_such" / "train.jsonl"
    env = run_env()  # the shared tiny-model cache: check_model builds the tiny model once, before the data check
    env.pop("HF_HUB_OFFLINE", None)  # the hub is unreachable here and would be retried
    overrides = [*FAST, f"data.path={missing}", "model.tokenizer=ftdist-test/unreachable-tokenizer",
                 f"output_dir={tmp_path / 'run'}"]
    start = time.monotonic()
    proc = subprocess.run(train_cmd(None, overrides), cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300, check=False)
    elapsed = time.monotonic() - start
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == EXIT_BAD_INPUT, proc.stderr[-3000:]
    assert len(lines) == 1 and lines[0].startswith(f"ftdist: DataError: data.path={missing}: data file not found"), lines
    # The message alone tells the order apart (without the check the tokenizer's error came
    # instead). Measured: 16-26 s under load with the check (imports and the tiny model), 57 s
    # without it; the bound is loose on purpose.
    assert elapsed < 40, f"took {elapsed:.0f} s: the tokenizer was tried first"
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("path", ["./data/train", "data/train.jsonl", "/abs/train.parquet", "~/nope/train.csv"])
def test_paths_that_look_local_and_are_missing_name_the_key(path):
    with pytest.raises(DataError, match=rf"^data\.path={path}: data file not found"):
        check_data_source(DataConfig(path=path, max_seq_len=8))


def test_missing_validation_file_names_validation_path(tmp_path):
    train = tmp_path / "train.jsonl"
    train.write_text('{"prompt": "a", "response": "b"}\n')
    with pytest.raises(DataError, match=r"^data\.validation_path=.*val\.jsonl: data file not found"):
        check_data_source(DataConfig(path=str(train), validation_path=str(tmp_path / "val.jsonl"), max_seq_len=8))


def test_hub_names_existing_files_and_synthetic_tasks_pass(tmp_path):
    train = tmp_path / "train.jsonl"
    train.write_text("")
    for path in ("openai/gsm8k", "squad", str(train), str(tmp_path), "synthetic:json_extraction"):
        check_data_source(DataConfig(path=path, max_seq_len=8))  # nothing read, nothing raised


def test_unsupported_file_type_and_unknown_synthetic_task_are_named(tmp_path):
    text = tmp_path / "train.txt"
    text.write_text("hello")
    with pytest.raises(DataError, match=r"^data\.path=.*train\.txt: unsupported data file type '\.txt'"):
        check_data_source(DataConfig(path=str(text), max_seq_len=8))
    with pytest.raises(DataError, match=r"^data\.path=synthetic:nope: unknown synthetic task 'nope'"):
        check_data_source(DataConfig(path="synthetic:nope", max_seq_len=8))
