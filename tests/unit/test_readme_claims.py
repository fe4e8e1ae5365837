"""README claims that no other test checked, one named test each, against an independent
computation: truncation drops are warned with their count; CPU runs refuse cpu_offload and nccl
in one line; only rank 0 starts W&B; the default tiny-model cache; renamed chat/text fields;
data.packing_window reaching the packer; the line that says the gpu tests did not run."""

from __future__ import annotations

import logging
import os
import random
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import FAST, REPO, random_examples, run_env, train_cmd, write_jsonl

from ftdist.config import DataConfig, DataFields, TinyModelSpec, compose, load_config
from ftdist.constants import EXIT_BAD_INPUT
from ftdist.constants import IGNORE_INDEX as IGNORE
from ftdist.data.packing import pack_documents
from ftdist.data.prepare import DataError, prepare_data


def chat_ids(tokenizer, messages: list[dict], generation_prompt: bool = False) -> list[int]:
    """The tokenizer's own rendering of a conversation (the independent reference)."""
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


# --- "most examples are truncated to nothing and dropped, with a warning" --------------------


def test_examples_dropped_by_truncation_are_warned_with_their_count(tmp_path, tiny_tokenizer, caplog):
    max_len = 24
    rows = [{"prompt": "x " * n, "response": "y " * 6} for n in (1, 3, 30, 40, 50)]
    path = write_jsonl(tmp_path / "train.jsonl", rows)
    # Independently: the loss starts right after the prompt (the user turn and the generation
    # prompt, as the chat template renders them), so a row keeps no label iff that prompt fills
    # max_seq_len.
    prompt_lens = [len(chat_ids(tiny_tokenizer, [{"role": "user", "content": r["prompt"]}], True)) for r in rows]
    expected = sum(n >= max_len for n in prompt_lens)
    assert 1 <= expected < len(rows)
    with caplog.at_level(logging.WARNING, logger="ftdist.data.prepare"):
        train, _, report = prepare_data(DataConfig(path=path, max_seq_len=max_len, val_fraction=0.0), tiny_tokenizer, 0)
    assert report.dropped_no_labels == expected and len(train) == len(rows) - expected
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(f"dropped {expected} of {len(rows)} train examples" in w and "data.max_seq_len=24" in w
               for w in warnings), warnings


# --- CPU runs: strategy.cpu_offload=true and strategy.backend=nccl are bad input --------------


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["strategy=fsdp", "strategy.cpu_offload=true"], "strategy.cpu_offload=true"),
        (["strategy=ddp", "strategy.backend=nccl"], "strategy.backend=nccl needs CUDA devices"),
    ],
)
def test_cpu_run_refuses_gpu_only_options_in_one_line(tmp_path, overrides, expected):
    cache = tmp_path / "cache"  # empty: loading (or building) the tiny model would fill it
    proc = subprocess.run(
        train_cmd(None, [*FAST, *overrides, f"output_dir={tmp_path / 'run'}"]), cwd=REPO,
        env={**run_env(), "FTDIST_CACHE": str(cache)}, capture_output=True, text=True, timeout=300, check=False,
    )
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == EXIT_BAD_INPUT, proc.stderr[-3000:]
    assert len(lines) == 1 and lines[0].startswith("ftdist: ConfigError: ") and expected in lines[0], lines
    assert not (tmp_path / "run").exists()  # no run directory left behind
    assert not cache.exists()  # stopped before any weights loaded


# --- tracking=wandb: "Weights & Biases on rank 0" ---------------------------------------------


def test_wandb_under_two_rank_ddp_starts_one_run_on_rank_0(tmp_path):
    out, stray = tmp_path / "run", tmp_path / "stray"
    env = {**run_env(), "WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_DIR": str(stray)}
    env.pop("WANDB_API_KEY", None)
    overrides = [*FAST, "strategy=ddp", "tracking=wandb", "train.max_steps=2", f"output_dir={out}"]
    proc = subprocess.run(train_cmd(2, overrides), cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
                          check=False)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "world size 2" in (out / "train.log").read_text()
    runs = sorted((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, sorted((out / "wandb").iterdir())
    assert len(list((out / "wandb").rglob("run-*.wandb"))) == 1
    # A second rank's wandb.init without dir= would land in WANDB_DIR.
    assert not stray.exists()


# --- the tiny model's cache, renamed fields, packing window --------------------------------


def test_default_tiny_model_cache_is_home_cache_ftdist(tmp_path, monkeypatch):
    from ftdist.model.tiny import cache_root, spec_dir

    monkeypatch.delenv("FTDIST_CACHE", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert cache_root() == tmp_path / ".cache" / "ftdist"
    assert spec_dir(TinyModelSpec()).parent == tmp_path / ".cache" / "ftdist" / "tiny"
    monkeypatch.setenv("FTDIST_CACHE", str(tmp_path / "elsewhere"))
    assert cache_root() == tmp_path / "elsewhere"


def test_chat_format_reads_the_field_named_by_data_fields_messages(tmp_path, tiny_tokenizer):
    messages = [{"role": "user", "content": "say hi"}, {"role": "assistant", "content": "hello there"}]
    path = write_jsonl(tmp_path / "chat.jsonl", [{"conversation": messages}])
    cfg = DataConfig(path=path, format="chat", fields=DataFields(messages="conversation"), max_seq_len=256,
                     val_fraction=0.0)
    (example,), _, _ = prepare_data(cfg, tiny_tokenizer, seed=0)
    whole = chat_ids(tiny_tokenizer, messages)
    prompt = chat_ids(tiny_tokenizer, messages[:1], generation_prompt=True)
    assert example.input_ids == whole and whole[: len(prompt)] == prompt
    assert example.labels == [IGNORE] * len(prompt) + whole[len(prompt):]
    # The default name is not read once the field is renamed.
    write_jsonl(tmp_path / "chat.jsonl", [{"messages": messages}])
    with pytest.raises(DataError, match="conversation"):
        prepare_data(cfg, tiny_tokenizer, seed=0)


def test_text_format_reads_the_field_named_by_data_fields_text(tmp_path, tiny_tokenizer):
    body = "Packed documents never see each other."
    path = write_jsonl(tmp_path / "text.jsonl", [{"body": body, "text": "not this one"}])
    cfg = DataConfig(path=path, format="text", fields=DataFields(text="body"), max_seq_len=256, val_fraction=0.0)
    (example,), _, _ = prepare_data(cfg, tiny_tokenizer, seed=0)
    bos = [tiny_tokenizer.bos_token_id] if tiny_tokenizer.bos_token_id is not None else []
    expected = bos + tiny_tokenizer(body, add_special_tokens=False)["input_ids"] + [tiny_tokenizer.eos_token_id]
    assert example.input_ids == expected and example.labels == expected


def test_packing_window_from_the_command_line_reaches_pack_documents(tmp_path, tiny_model_dir, tiny_tokenizer):
    from transformers import AutoModelForCausalLM

    from ftdist.parallel.base import Strategy
    from ftdist.trainer import Trainer

    window = 7
    cfg = load_config(compose(["+experiment=tiny_cpu", "data.packing=true", f"data.packing_window={window}",
                               "seed=3", f"output_dir={tmp_path}"]))
    examples = random_examples(60, seed=11, lo=5, hi=60)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation="sdpa")
    trainer = Trainer(cfg, Strategy(cfg.strategy), model, tiny_tokenizer, examples, examples[:5], tmp_path)

    lengths = [len(e.input_ids) for e in examples]
    assert trainer.train_items == pack_documents(lengths, 128, 3, window)
    assert trainer.train_items != pack_documents(lengths, 128, 3)  # the default window packs otherwise
    # Independently of pack_documents: each row holds documents of one window of the seeded
    # shuffle, fits the row, and every document is packed exactly once.
    order = list(range(len(examples)))
    random.Random(3).shuffle(order)
    window_of = {doc: i // window for i, doc in enumerate(order)}
    for row in trainer.train_items:
        assert len({window_of[doc] for doc in row}) == 1, row
        assert sum(lengths[doc] for doc in row) <= 128
    assert sorted(doc for row in trainer.train_items for doc in row) == list(range(len(examples)))


# --- "The gpu tests ... elsewhere one line says they did not run" ---------------------------


def test_without_nvidia_smi_one_line_says_the_gpu_tests_did_not_run():
    gpu_file = REPO / "tests" / "gpu" / "test_cuda_training.py"
    n_tests = len(re.findall(r"^def test_", gpu_file.read_text(), flags=re.MULTILINE))
    assert n_tests == 2
    path = [d for d in os.environ.get("PATH", "").split(os.pathsep)
            if d and not (Path(d) / "nvidia-smi").exists()]
    env = {**os.environ, "PATH": os.pathsep.join(path), "CUDA_VISIBLE_DEVICES": ""}
    env.pop("FTDIST_TEST_GPU", None)
    env.pop("PYTEST_ADDOPTS", None)
    assert shutil.which("nvidia-smi", path=env["PATH"]) is None
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(gpu_file.relative_to(REPO))],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300, check=False,
    )
    assert proc.returncode == 5, proc.stdout[-3000:] + proc.stderr[-3000:]  # no tests ran
    lines = proc.stdout.splitlines()
    assert any(line.startswith(f"ftdist: the {n_tests} gpu tests did not run (nvidia-smi not found)")
               for line in lines), proc.stdout
    assert any(f"{n_tests} deselected" in line for line in lines), proc.stdout


# --- "source .venv/bin/activate": launch/multinode.sh finds the venv without it ----------------


def copy_launcher(root: Path) -> Path:
    """launch/multinode.sh in a checkout of its own, so its .venv can be a stub."""
    (root / "launch").mkdir(parents=True)
    return Path(shutil.copy(REPO / "launch" / "multinode.sh", root / "launch" / "multinode.sh"))


def test_multinode_uses_the_checkouts_venv_when_python_is_unset(tmp_path):
    script = copy_launcher(tmp_path)
    stub = tmp_path / ".venv" / "bin" / "python"  # answers the import check, then shows its argv
    stub.parent.mkdir(parents=True)
    stub.write_text('#!/bin/sh\necho "venv python: $*"\n')
    stub.chmod(0o755)
    env = {"PATH": "/usr/bin:/bin", "HEAD_ADDR": "127.0.0.1", "NNODES": "1", "GPUS_PER_NODE": "1"}
    proc = subprocess.run(["bash", str(script), "+experiment=tiny_cpu"], env=env, capture_output=True, text=True,
                          timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[-1].startswith("venv python: -m torch.distributed.run --nnodes 1"), proc.stdout
    assert proc.stdout.rstrip().endswith("-m ftdist.train +experiment=tiny_cpu")


def test_multinode_without_torch_is_one_line_exit_2(tmp_path):
    script = copy_launcher(tmp_path)  # no .venv beside it
    no_torch = tmp_path / "bin" / "python3"  # an interpreter whose imports all fail
    no_torch.parent.mkdir()
    no_torch.write_text("#!/bin/sh\nexit 1\n")
    no_torch.chmod(0o755)
    env = {"PATH": f"{no_torch.parent}:/usr/bin:/bin", "HEAD_ADDR": "127.0.0.1", "NNODES": "1"}
    proc = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == EXIT_BAD_INPUT
    expected = ("launch/multinode.sh: PYTHON=python3 cannot import torch and ftdist; run 'source .venv/bin/activate' "
                "or set PYTHON=/path/to/venv/bin/python")
    assert proc.stderr.splitlines() == [expected]
