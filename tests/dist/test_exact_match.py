"""Exact match (`eval.generation.samples`) reports what a plain greedy decode of each prompt gives.

The runs learn memorize_task's six question -> city pairs; its validation file holds those six
and two questions never trained on, so the fine-tuned score is neither 0 nor 1 and the base
model's is 0. Each run's per-example record (output_dir/eval/generations_step_N.jsonl) and its
reported score are checked against an independent decode in this process: the run's final/
model (or the base model for step 0) loaded with transformers, each prompt alone, unpadded, no
KV cache, argmax token by token until eos or eval.generation.max_new_tokens.

Two ranks split the prompts; under fsdp and zero3 the parameters are sharded, so ranks generate
in lock-step (synced_gpus), and with 7 samples in chunks of 3 rank 1 runs one filler chunk.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import read_metrics, worker_config
from memorize_task import MAX_NEW_TOKENS, SAMPLES, STEPS, VALIDATION, task_run


@pytest.fixture(scope="module", params=["single", "fsdp", "zero3"])
def run(request, tmp_path_factory):
    return task_run(request.param, tmp_path_factory)


@torch.no_grad()
def greedy_decode(model, tokenizer, prompt_ids: list[int]) -> str:
    stop = {tokenizer.eos_token_id, model.config.eos_token_id}
    ids, new = list(prompt_ids), []
    for _ in range(MAX_NEW_TOKENS):
        token = int(model(torch.tensor([ids])).logits[0, -1].argmax())
        if token in stop:
            break
        ids.append(token)
        new.append(token)
    return tokenizer.decode(new, skip_special_tokens=True)


def records(run_dir: Path, step: int) -> list[dict]:
    path = run_dir / "eval" / f"generations_step_{step:08d}.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.parametrize("when", ["before", "after"])
def test_exact_match_equals_an_independent_greedy_decode(run, when):
    from transformers import AutoModelForCausalLM

    from ftdist.data.prepare import prepare_data
    from ftdist.model.loading import load_tokenizer, resolve_model_path

    run_dir, overrides = run
    cfg = worker_config(run_dir, overrides)
    tokenizer = load_tokenizer(cfg.model)
    _, val, _ = prepare_data(cfg.data, tokenizer, cfg.seed)
    assert [e.reference for e in val] == [r for _, r in VALIDATION]
    for chunk in ([0, 1, 2], [3, 4, 5], [0, 2, 4], [1, 3, 5]):  # one process, rank 0, rank 1
        assert len({len(val[i].prompt_ids) for i in chunk}) > 1, chunk  # padding is exercised
    model_dir = resolve_model_path(cfg.model) if when == "before" else run_dir / "final"
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    expected = [greedy_decode(model, tokenizer, e.prompt_ids) for e in val[:SAMPLES]]
    matches = [t.strip() == e.reference.strip() for t, e in zip(expected, val[:SAMPLES], strict=True)]

    _, evals = read_metrics(run_dir)
    assert [r["step"] for r in evals] == [0, STEPS]
    reported = evals[0 if when == "before" else -1]
    got = records(run_dir, reported["step"])
    assert [r["index"] for r in got] == list(range(SAMPLES))
    assert [r["reference"] for r in got] == [r for _, r in VALIDATION[:SAMPLES]]
    assert [r["response"] for r in got] == expected
    assert [r["match"] for r in got] == matches
    assert reported["generation_n"] == SAMPLES
    assert reported["exact_match"] == pytest.approx(sum(matches) / SAMPLES, abs=1e-12)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary[f"exact_match_{when}"] == reported["exact_match"]
    if when == "before":
        assert sum(matches) == 0  # a random-init model does not answer
    else:  # learned most seen pairs, and no unseen one: the score is not trivially 0 or 1
        assert sum(matches) >= 3 and not matches[1] and not matches[4], got
