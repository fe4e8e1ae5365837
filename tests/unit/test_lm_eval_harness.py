"""lm-evaluation-harness on a loaded model (ftdist.eval.harness), offline, with a local task.

The task (tests/assets/lm_eval_task) is 16 three-way questions over a local jsonl file. Its metrics
are checked against the same scores computed here with a plain forward: lm-eval's multiple-choice
`acc` picks the choice whose continuation " <choice>" has the highest summed log-likelihood after
the question, `acc_norm` the highest per character of the choice.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
import yaml

from ftdist.config import ConfigError, LmEvalConfig
from ftdist.eval.harness import check_lm_eval_available, run_lm_eval

pytest.importorskip("lm_eval")  # the `eval` extra, part of `dev`

ASSETS = Path(__file__).resolve().parents[1] / "assets" / "lm_eval_task"
TASK = "ftdist_tiny_mc"


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory) -> Path:
    """The asset task YAML with its data file's absolute path filled in: datasets resolves a
    relative data_files path against the working directory, so the copy works from anywhere."""
    config = yaml.safe_load((ASSETS / f"{TASK}.yaml").read_text())
    config["dataset_kwargs"]["data_files"]["test"] = str(ASSETS / f"{TASK}.jsonl")
    directory = tmp_path_factory.mktemp("lm_eval_tasks")
    (directory / f"{TASK}.yaml").write_text(yaml.safe_dump(config))
    return directory


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval(), AutoTokenizer.from_pretrained(tiny_model_dir)


def continuation_logprob(model, tokenizer, context: str, continuation: str) -> float:
    """Summed log-probability of `continuation`'s tokens after `context`'s, one forward pass."""
    context_ids = tokenizer(context)["input_ids"]
    whole_ids = tokenizer(context + continuation)["input_ids"]
    # A byte-level BPE splits before a space, so the context's tokens are a prefix of the whole's:
    # the continuation's tokens are well defined.
    assert whole_ids[:len(context_ids)] == context_ids
    with torch.no_grad():
        logits = model(torch.tensor([whole_ids])).logits[0].double()
    logprobs = torch.log_softmax(logits[:-1], dim=-1)  # position i predicts token i + 1
    targets = torch.tensor(whole_ids[len(context_ids):])
    return logprobs[len(context_ids) - 1:].gather(1, targets[:, None]).sum().item()


def expected_scores(model, tokenizer) -> tuple[float, float, list[int]]:
    docs = [json.loads(line) for line in (ASSETS / f"{TASK}.jsonl").read_text().splitlines()]
    acc, acc_norm, predictions = [], [], []
    for doc in docs:
        lls = [continuation_logprob(model, tokenizer, doc["question"], " " + choice) for choice in doc["choices"]]
        per_char = [ll / len(choice) for ll, choice in zip(lls, doc["choices"])]
        predictions.append(max(range(len(lls)), key=lls.__getitem__))
        acc.append(predictions[-1] == doc["answer"])
        acc_norm.append(max(range(len(lls)), key=per_char.__getitem__) == doc["answer"])
    return sum(acc) / len(docs), sum(acc_norm) / len(docs), predictions


def test_local_task_acc_matches_direct_loglikelihoods(tiny, task_dir):
    model, tokenizer = tiny
    acc, acc_norm, predictions = expected_scores(model, tokenizer)
    # Not a degenerate model: it picks different positions and gets some, not all, right, so a
    # wrong score per document would show in the fractions; the task's long choices make
    # normalizing by length change picks, so acc_norm checks the normalization.
    assert len(set(predictions)) > 1 and 0 < acc < 1 and 0 < acc_norm < 1 and acc != acc_norm

    results = run_lm_eval(model, tokenizer, LmEvalConfig(tasks=[TASK], include_path=str(task_dir)), batch_size=4)

    assert set(results) == {TASK}
    metrics = results[TASK]
    assert metrics["acc"] == pytest.approx(acc, abs=1e-9)
    assert metrics["acc_norm"] == pytest.approx(acc_norm, abs=1e-9)
    assert all(type(value) is float for value in metrics.values())
    assert not any("stderr" in name for name in metrics)


def test_limit_scores_only_the_first_documents(tiny, task_dir):
    model, tokenizer = tiny
    config = LmEvalConfig(tasks=[TASK], include_path=str(task_dir), limit=4)
    metrics = run_lm_eval(model, tokenizer, config)[TASK]
    _, _, predictions = expected_scores(model, tokenizer)
    answers = [json.loads(line)["answer"] for line in (ASSETS / f"{TASK}.jsonl").read_text().splitlines()]
    assert metrics["acc"] == pytest.approx(sum(p == a for p, a in zip(predictions[:4], answers[:4])) / 4)


def test_unknown_task_is_a_config_error_naming_it_and_where_it_looked(task_dir):
    config = LmEvalConfig(tasks=[TASK, "no_such_task_xyz"], include_path=str(task_dir))
    with pytest.raises(ConfigError, match=r"no_such_task_xyz.*" + str(task_dir)):
        check_lm_eval_available(config)
    check_lm_eval_available(LmEvalConfig(tasks=[TASK], include_path=str(task_dir)))  # known: passes


def test_include_path_that_is_not_a_directory_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="eval.lm_eval.include_path"):
        check_lm_eval_available(LmEvalConfig(tasks=[TASK], include_path=str(tmp_path / "absent")))


def test_missing_lm_eval_is_a_config_error_with_the_install_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # what an environment without the extra sees
    with pytest.raises(ConfigError, match=r"pip install 'ftdist\[eval\]'"):
        check_lm_eval_available(LmEvalConfig(tasks=[TASK]))


def test_no_tasks_runs_nothing(monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # not even imported
    check_lm_eval_available(LmEvalConfig())
    assert run_lm_eval(object(), object(), LmEvalConfig()) == {}
