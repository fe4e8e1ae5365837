"""`ftdist.eval` on a LoRA run: one process equals the run's own figures, two FSDP ranks (sharded
parameters: the generation and every forward are collectives) equal one process, and the run's
last checkpoint evaluates like its final/. A local lm-evaluation-harness task runs on base and
tuned models each time."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import LORA_GENERATION_STEPS, REPO, lora_generation_run, read_metrics, run_env

pytest.importorskip("lm_eval")  # the `eval` extra, part of `dev`

TASK = "ftdist_tiny_mc"
LM_EVAL = [f"eval.lm_eval.tasks=[{TASK}]", "eval.lm_eval.include_path=tests/assets/lm_eval_task",
           "eval.lm_eval.batch_size=4"]


def evaluate(run_dir: Path, *overrides: str, nproc: int | None = None) -> tuple[dict, list[dict]]:
    """(report.json, generations.jsonl rows) of `ftdist.eval run_dir overrides`, from the repository root."""
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] if nproc \
        else [sys.executable]
    proc = subprocess.run([*launch, "-m", "ftdist.eval", str(run_dir), *overrides], cwd=REPO, env=run_env(),
                          capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-5000:]
    eval_dir = run_dir / "eval"
    generations = eval_dir / "generations.jsonl"
    rows = [json.loads(x) for x in generations.read_text().splitlines()] if generations.is_file() else []
    return json.loads((eval_dir / "report.json").read_text()), rows


@pytest.fixture(scope="module")
def run_copy(tmp_path_factory) -> Path:
    """The shared LoRA run, copied: these evaluations write its eval/ directory."""
    out = tmp_path_factory.mktemp("eval_strategies") / "run"
    shutil.copytree(lora_generation_run(tmp_path_factory) / "run", out)
    return out


@pytest.fixture(scope="module")
def single(run_copy):
    return evaluate(run_copy, *LM_EVAL)


def test_one_process_equals_the_runs_own_figures_and_runs_the_harness_on_both_models(run_copy, single):
    report, rows = single
    _, evals = read_metrics(run_copy)
    before, after = evals[0], evals[-1]
    for role, line in (("base", before), ("tuned", after)):
        got = report["models"][role]["metrics"]
        assert got["eval_loss"] == pytest.approx(line["eval_loss"], rel=1e-6), role
        assert (got["exact_match"], got["generation_n"]) == (line["exact_match"], line["generation_n"]), role
        assert set(report["lm_eval"][role][TASK]) >= {"acc", "acc_norm"}, role
    trained = (run_copy / "eval" / f"generations_step_{LORA_GENERATION_STEPS:08d}.jsonl").read_text().splitlines()
    assert [json.loads(x)["response"] for x in trained] == [r["tuned"] for r in rows]


def test_two_fsdp_ranks_equal_one_process(run_copy, single):
    report, rows = single
    sharded, sharded_rows = evaluate(run_copy, *LM_EVAL, "strategy=fsdp", nproc=2)
    for role in ("base", "tuned"):
        one, two = report["models"][role]["metrics"], sharded["models"][role]["metrics"]
        assert two["eval_loss"] == pytest.approx(one["eval_loss"], rel=1e-5), role
        assert two["exact_match"] == one["exact_match"] and two["generation_n"] == one["generation_n"], role
        for metric, value in report["lm_eval"][role][TASK].items():
            assert sharded["lm_eval"][role][TASK][metric] == pytest.approx(value, abs=1e-9), (role, metric)
    assert [(r["base"], r["tuned"]) for r in sharded_rows] == [(r["base"], r["tuned"]) for r in rows]


def test_the_last_checkpoint_evaluates_like_final(run_copy, single):
    report, rows = single
    step = run_copy / "checkpoints" / f"step_{LORA_GENERATION_STEPS:08d}"
    from_checkpoint, checkpoint_rows = evaluate(run_copy, "eval.compare_base=false", f"eval.checkpoint={step}")
    assert "base" not in from_checkpoint["models"] and from_checkpoint["models"]["tuned"]["path"] == str(step)
    got, expected = from_checkpoint["models"]["tuned"]["metrics"], report["models"]["tuned"]["metrics"]
    assert got["eval_loss"] == pytest.approx(expected["eval_loss"], rel=1e-6)
    assert [r["tuned"] for r in checkpoint_rows] == [r["tuned"] for r in rows]
