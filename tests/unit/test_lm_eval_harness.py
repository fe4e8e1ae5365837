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


# Two gloo ranks, the model sharded with FSDP2 (per block, then the root), both calling run_lm_eval
# in lock-step as the eval runner does: each forward all-gathers the parameters, so the ranks
# must run the same forwards, and each must get the full results.
FSDP_RANKS = """
import json, sys
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard
from transformers import AutoModelForCausalLM, AutoTokenizer
from ftdist.config import LmEvalConfig
from ftdist.eval.harness import run_lm_eval

model_dir, task_dir, task = sys.argv[1:]
dist.init_process_group("gloo")
model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
for layer in model.model.layers:
    fully_shard(layer)
fully_shard(model)
results = run_lm_eval(model, AutoTokenizer.from_pretrained(model_dir), LmEvalConfig(tasks=[task], include_path=task_dir))
gathered = [None] * dist.get_world_size()
dist.all_gather_object(gathered, results)
if dist.get_rank() == 0:
    print("RESULTS " + json.dumps(gathered))
dist.destroy_process_group()
"""


def test_fsdp_sharded_ranks_in_lock_step_each_get_the_full_results(tiny, tiny_model_dir, task_dir, tmp_path):
    import subprocess

    from helpers import run_env

    script = tmp_path / "ranks.py"
    script.write_text(FSDP_RANKS)
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script),
         tiny_model_dir, str(task_dir), TASK],
        env=run_env(), capture_output=True, text=True, timeout=300, check=False,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    per_rank = json.loads(proc.stdout.split("RESULTS ", 1)[1])
    acc, acc_norm, _ = expected_scores(*tiny)
    for results in per_rank:
        assert results[TASK]["acc"] == pytest.approx(acc, abs=1e-9)
        assert results[TASK]["acc_norm"] == pytest.approx(acc_norm, abs=1e-9)
