"""Exact match (`eval.exact_match_samples`) reports what a plain greedy decode of each prompt gives.

The runs learn six question -> city pairs; the validation file holds those six and two questions
the model never saw, so the fine-tuned score is neither 0 nor 1 and the base model's is 0. Each
run's per-example record (output_dir/eval/exact_match_step_N.jsonl) and its reported score are
checked against an independent decode in this process: the run's final/ model (or the base model
for step 0) loaded with transformers, each prompt alone, unpadded, no KV cache, argmax token by
token until eos or eval.max_new_tokens.

Two ranks split the prompts; under fsdp and zero3 the parameters are sharded, so ranks generate
in lock-step (synced_gpus), and with 7 samples in chunks of 3 rank 1 runs one filler chunk.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import FAST, read_metrics, run_train, worker_config

SEEN = [
    ("Where does Ana Silva live?", "Lisbon"),
    ("Where does Ben Meyer live?", "Berlin"),
    ("Where does Chloe Dubois live?", "Paris"),
    ("Where does David Rossi live?", "Rome"),
    ("Where does Elena Novak live?", "Prague"),
    ("Where does Farid Haddad live?", "Cairo"),
]
UNSEEN = [("Where does Grace Kim live?", "Seoul"), ("Where does Hugo Larsen live?", "Oslo")]
# Unseen at 1 and 4; the 8th row lies past exact_match_samples and must not be evaluated.
VALIDATION = [SEEN[0], UNSEEN[0], SEEN[1], SEEN[2], UNSEEN[1], SEEN[3], SEEN[4], SEEN[5]]
SAMPLES, MAX_NEW_TOKENS, STEPS = 7, 8, 60
RUNS = {  # name: (overrides, nproc); the global batch is 8 in every run
    "single": (["train.micro_batch_size=8"], None),
    "fsdp": (["strategy=fsdp", "train.micro_batch_size=4"], 2),
    "zero3": (["strategy=zero3", "train.micro_batch_size=4"], 2),
}


def write_jsonl(path: Path, pairs) -> None:
    path.write_text("".join(json.dumps({"prompt": p, "response": r}) + "\n" for p, r in pairs))


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> list[str]:
    root = tmp_path_factory.mktemp("exact_match_data")
    write_jsonl(root / "train.jsonl", SEEN * 20)
    write_jsonl(root / "val.jsonl", VALIDATION)
    return [
        f"data.path={root / 'train.jsonl'}",
        f"data.validation_path={root / 'val.jsonl'}",
        f"train.max_steps={STEPS}",
        f"eval.exact_match_samples={SAMPLES}",
        f"eval.max_new_tokens={MAX_NEW_TOKENS}",
        "eval.batch_size=3",
    ]


@pytest.fixture(scope="module", params=list(RUNS))
def run(request, data, tmp_path_factory):
    if request.param == "zero3":
        pytest.importorskip("deepspeed")
    overrides, nproc = RUNS[request.param]
    out = tmp_path_factory.mktemp("exact_match") / request.param
    all_overrides = [*FAST, *data, *overrides]
    run_train([*all_overrides, f"output_dir={out}"], nproc=nproc)
    return out, all_overrides


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
    path = run_dir / "eval" / f"exact_match_step_{step:08d}.jsonl"
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
    assert reported["exact_match_n"] == SAMPLES
    assert reported["exact_match"] == pytest.approx(sum(matches) / SAMPLES, abs=1e-12)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary[f"exact_match_{when}"] == reported["exact_match"]
    if when == "before":
        assert sum(matches) == 0  # a random-init model does not answer
    else:  # learned most seen pairs, and no unseen one: the score is not trivially 0 or 1
        assert sum(matches) >= 3 and not matches[1] and not matches[4], got
