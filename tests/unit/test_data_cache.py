"""The tokenized cache (ftdist.data.cache): the examples and report it maps equal those prepared
in one process, for every format; the key changes with anything that changes tokens; a build
that dies or races another never leaves an entry that is used."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import random_examples, random_pairs, write_jsonl

from ftdist.checkpoint import train_data_fingerprint
from ftdist.config import DataConfig
from ftdist.data import cache
from ftdist.data.columns import MappedExamples, write_split
from ftdist.data.example import Document, Example
from ftdist.data.packing import example_lengths, pack_documents, packed_items
from ftdist.data.prepare import DataError, prepare_data
from ftdist.objectives.reference import attach


def rows_of(fmt: str, n: int) -> list:
    """n rows of `fmt`, of varied lengths, with a bad row every 9th (on_bad_row=skip counts them)."""
    rows = []
    for i in range(n):
        words = " ".join(f"w{i * 7 % (j + 3)}" for j in range(i % 11 + 1))
        if i % 9 == 8:
            rows.append('{"broken": ')
        elif fmt == "instruction":
            rows.append({"prompt": f"question {i}: {words}", "response": f"answer {i} {words}"})
        elif fmt == "text":
            rows.append({"text": f"text {i} {words}"})
        elif fmt == "chat":
            turns = [{"role": "user", "content": f"hi {i}"}, {"role": "assistant", "content": f"hello {words}"}]
            if i % 2:
                turns += [{"role": "user", "content": "more"}, {"role": "assistant", "content": f"sure {i}"}]
            rows.append({"messages": turns})
        elif fmt == "preference":
            rows.append({"prompt": f"q {i} {words}", "chosen": f"good {i}", "rejected": f"bad {words} {i}"})
        else:
            rows.append({"text": f"doc {i} {words}", "label": ["ham", "spam", "eggs"][i % 3]})
    return rows


def cfg_for(path: str, fmt: str, cache_dir: Path | None, **kw) -> DataConfig:
    kw.setdefault("max_seq_len", 24)  # short: some examples are truncated, some dropped
    kw.setdefault("val_fraction", 0.2)
    kw.setdefault("on_bad_row", "skip")
    return DataConfig(path=path, format=fmt, cache=cache_dir is not None,
                      cache_dir=None if cache_dir is None else str(cache_dir), **kw)


def builds(cache_dir: Path) -> list[dict]:
    log = cache_dir / "builds.jsonl"
    return [json.loads(line) for line in log.read_text().splitlines()] if log.is_file() else []


@pytest.mark.parametrize("fmt", ["instruction", "text", "chat", "preference", "classification"])
def test_cached_examples_and_report_equal_those_prepared_in_process(tmp_path, tiny_tokenizer, monkeypatch, fmt):
    monkeypatch.setattr(cache, "ROWS_PER_TASK", 7)  # many shards, over 2 worker processes
    path = write_jsonl(tmp_path / "rows.jsonl", rows_of(fmt, 60))
    want_train, want_val, want_report = prepare_data(cfg_for(path, fmt, None), tiny_tokenizer, seed=3)
    train, val, report = prepare_data(cfg_for(path, fmt, tmp_path / "c", num_proc=2), tiny_tokenizer, seed=3)
    assert isinstance(train, MappedExamples) and builds(tmp_path / "c")[0]["processes"] == 2
    assert report.to_dict() == want_report.to_dict()
    assert report.truncated > 0 and sum(report.bad_rows.values()) > 0  # the data exercises both
    assert list(train) == want_train and list(val) == want_val
    assert example_lengths(train) == example_lengths(want_train)
    items = [[i] for i in range(len(train))]
    assert train_data_fingerprint(train, items) == train_data_fingerprint(want_train, items)
    # A second call maps the same entry: no second build.
    again, _, again_report = prepare_data(cfg_for(path, fmt, tmp_path / "c", num_proc=2), tiny_tokenizer, seed=3)
    assert len(builds(tmp_path / "c")) == 1 and list(again) == want_train and again_report == want_report


def test_a_bad_row_met_by_a_worker_is_named_by_file_and_line_and_leaves_no_entry(tmp_path, tiny_tokenizer, monkeypatch):
    monkeypatch.setattr(cache, "ROWS_PER_TASK", 5)
    rows = rows_of("instruction", 40)
    rows = [r for r in rows if isinstance(r, dict)]
    rows[33] = {"prompt": "p", "response": 7}
    path = write_jsonl(tmp_path / "rows.jsonl", rows)
    with pytest.raises(DataError, match=r"rows\.jsonl:34: wrong_type"):
        prepare_data(cfg_for(path, "instruction", tmp_path / "c", on_bad_row="error", num_proc=2), tiny_tokenizer, 0)
    assert [p.name for p in (tmp_path / "c").iterdir() if not p.name.endswith(".lock")] == []


def test_a_changed_source_tokenizer_or_setting_gets_its_own_entry(tmp_path, tiny_tokenizer, tiny_model_dir):
    from transformers import AutoTokenizer

    path = tmp_path / "rows.jsonl"
    write_jsonl(path, rows_of("instruction", 30))
    c = tmp_path / "c"
    first, _, _ = prepare_data(cfg_for(str(path), "instruction", c), tiny_tokenizer, 0)
    entries = {first.directory}
    prepare_data(cfg_for(str(path), "instruction", c, max_seq_len=25), tiny_tokenizer, 0)  # a token setting
    prepare_data(cfg_for(str(path), "instruction", c), tiny_tokenizer, 1)  # the hold-out's seed
    other = AutoTokenizer.from_pretrained(tiny_model_dir)
    other.chat_template = "note: " + other.chat_template  # every rendering starts with these words
    prepare_data(cfg_for(str(path), "instruction", c), other, 0)  # the tokenizer's chat template
    assert len(builds(c)) == 4
    # The same size and modification time, other content: the hash of the file's ends tells.
    stat = path.stat()
    text = path.read_text()
    path.write_text(text.replace("question 0:", "question X:"))
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    changed, changed_val, _ = prepare_data(cfg_for(str(path), "instruction", c), tiny_tokenizer, 0)
    assert len(builds(c)) == 5 and changed.directory not in entries
    assert any("question X:" in tiny_tokenizer.decode(e.input_ids) for e in [*changed, *changed_val])
    # Settings that only say how to build or batch share the entry.
    same, _, _ = prepare_data(cfg_for(str(path), "instruction", c, num_proc=1, packing=True), tiny_tokenizer, 0)
    assert len(builds(c)) == 5 and same.directory == changed.directory


def test_leftovers_of_a_dead_builder_and_a_damaged_entry_are_rebuilt(tmp_path, tiny_tokenizer):
    path = write_jsonl(tmp_path / "rows.jsonl", rows_of("instruction", 30))
    c = tmp_path / "c"
    want, _, _ = prepare_data(cfg_for(path, "instruction", None), tiny_tokenizer, 0)
    entry = prepare_data(cfg_for(path, "instruction", c), tiny_tokenizer, 0)[0].directory
    (entry / "meta.json").unlink()  # damaged by hand: no longer an entry
    dead = c / f".tmp-{entry.name}-{socket.gethostname()}-999999-deadbeef"
    dead.mkdir()
    (dead / "train.ids.values.npy").write_bytes(b"half")
    train, _, _ = prepare_data(cfg_for(path, "instruction", c), tiny_tokenizer, 0)
    assert list(train) == want and not dead.exists() and len(builds(c)) == 2


BUILD_SCRIPT = """
import sys
from transformers import AutoTokenizer
from ftdist.checkpoint import train_data_fingerprint
from ftdist.config import DataConfig
from ftdist.data.prepare import prepare_data
tok = AutoTokenizer.from_pretrained(sys.argv[1])
cfg = DataConfig(path=sys.argv[2], max_seq_len=64, val_fraction=0.1, cache_dir=sys.argv[3], num_proc=1)
train, val, report = prepare_data(cfg, tok, 0)
print(train_data_fingerprint(train, []), report.train_examples)
"""


def start_builder(tiny_model_dir: str, path: str, cache_dir: Path) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-c", BUILD_SCRIPT, tiny_model_dir, path, str(cache_dir)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def test_a_builder_killed_mid_build_leaves_nothing_that_is_used(tmp_path, tiny_tokenizer, tiny_model_dir):
    path = write_jsonl(tmp_path / "rows.jsonl", [r for r in rows_of("instruction", 6000) if isinstance(r, dict)])
    c = tmp_path / "c"
    builder = start_builder(tiny_model_dir, path, c)
    deadline = time.monotonic() + 120
    while not list(c.glob(".tmp-*/shards/*")) and builder.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert builder.poll() is None, "the builder finished before it could be killed; give it more rows"
    builder.send_signal(signal.SIGKILL)
    builder.wait()
    assert [p for p in c.iterdir() if not p.name.startswith(".") and p.suffix != ".lock"] == []
    cfg = DataConfig(path=path, max_seq_len=64, val_fraction=0.1, cache_dir=str(c), num_proc=1)
    train, _, _ = prepare_data(cfg, tiny_tokenizer, 0)
    want, _, _ = prepare_data(DataConfig(path=path, max_seq_len=64, val_fraction=0.1, cache=False), tiny_tokenizer, 0)
    assert train_data_fingerprint(train, []) == train_data_fingerprint(want, [])
    assert not list(c.glob(".tmp-*"))


def test_concurrent_builders_of_one_key_build_it_once(tmp_path, tiny_model_dir):
    path = write_jsonl(tmp_path / "rows.jsonl", [r for r in rows_of("instruction", 1500) if isinstance(r, dict)])
    c = tmp_path / "c"
    procs = [start_builder(tiny_model_dir, path, c) for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err[-2000:] for _, err in outs]
    assert outs[0][0] == outs[1][0] and len(builds(c)) == 1


# --- the mapped format itself ----------------------------------------------------------------


def random_documents(n: int) -> list[Document]:
    g = torch.Generator().manual_seed(1)
    return [Document(torch.randint(5, 900, (3 + i % 13,), generator=g).tolist(), ["a", "b"][i % 2], i % 2, i % 5 == 0)
            for i in range(n)]


@pytest.mark.parametrize("kind", ["example", "pair", "document"])
def test_mapped_examples_read_back_and_hash_like_the_list(tmp_path, kind):
    if kind == "example":
        examples = random_examples(50)
        examples[3] = Example(examples[3].input_ids, examples[3].labels, [1, 2, 3], "ref é ✓")
    elif kind == "pair":
        examples = random_pairs(40, margins=True)
    else:
        examples = random_documents(45)
    write_split(tmp_path, "train", kind, examples)
    mapped = MappedExamples(tmp_path, "train", kind)
    assert list(mapped) == examples and mapped[-1] == examples[-1] and mapped[2:5] == examples[2:5]
    assert example_lengths(mapped) == example_lengths(examples)
    items = pack_documents(example_lengths(examples), 64, seed=0, window=16)
    assert train_data_fingerprint(mapped, items) == train_data_fingerprint(examples, items)
    h1, h2 = hashlib.sha256(), hashlib.sha256()
    mapped.fingerprint_into(h1, chunk=7)  # chunk boundaries do not change the bytes
    mapped.fingerprint_into(h2)
    assert h1.hexdigest() == h2.hexdigest()


def test_packing_of_mapped_examples_is_saved_with_them_and_equals_packing_the_list(tmp_path):
    examples = random_examples(300, hi=60)
    write_split(tmp_path, "train", "example", examples)
    mapped = MappedExamples(tmp_path, "train", "example")
    want = pack_documents([len(e.input_ids) for e in examples], 128, seed=5, window=50)
    assert packed_items(mapped, 128, 5, 50) == want
    saved = list(tmp_path.glob("packing-train-128-5-50.npz"))
    assert len(saved) == 1
    with np.load(saved[0]) as z:  # what a later run reads back
        flat, offsets = z["indices"].tolist(), z["offsets"].tolist()
    assert [flat[a:b] for a, b in zip(offsets[:-1], offsets[1:])] == want
    assert packed_items(mapped, 128, 5, 50) == want
    assert packed_items(mapped, 128, 6, 50) != want  # another seed, another packing


def test_reference_log_probs_attach_to_mapped_pairs(tmp_path):
    pairs = random_pairs(10)
    write_split(tmp_path, "train", "pair", pairs)
    mapped = MappedExamples(tmp_path, "train", "pair")
    values = torch.arange(20, dtype=torch.float64).reshape(10, 2) / 3
    attach(mapped, values)
    attach(pairs, values)
    assert [p.reference_logps for p in mapped] == [p.reference_logps for p in pairs]
    assert mapped[4].reference_logps == (8 / 3, 9 / 3)
    with pytest.raises(ValueError, match="3 reference log-prob rows for 10 pairs"):
        attach(mapped, values[:3])
