"""`python -m ftdist.eval RUN_DIR`: its figures against independent computations.

The training run measured its base (step 0) and its final model itself; the eval command loads
both afresh, so its figures must equal the run's own eval lines. Perplexity on reference text is
recomputed here with a plain transformers forward, window by window. The forgetting gate exits 5
from ftdist.eval and from a training run with eval.at_end=true.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.helpers import FAST, REPO, read_metrics, run_env, run_train, write_jsonl

SAMPLES = 8
RUN = [*FAST, "train.max_steps=30", f"eval.generation.samples={SAMPLES}", "eval.generation.max_new_tokens=24"]
# General English, unlike the run's JSON records; the last document spans several 128-token windows.
REFERENCE = [
    {"text": "The quick brown fox jumps over the lazy dog."},
    {"text": "Paris is the capital of France, and Berlin is the capital of Germany."},
    {"text": "Water boils at one hundred degrees Celsius at sea level. " * 6},
]


def run_eval(run_dir: Path, *overrides: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "ftdist.eval", str(run_dir), *overrides], cwd=REPO, env=run_env(),
                          capture_output=True, text=True, timeout=600, check=False)
    if check and proc.returncode != 0:
        raise AssertionError(f"ftdist.eval failed ({proc.returncode}):\n{proc.stderr[-5000:]}")
    return proc


@pytest.fixture(scope="module")
def gated_run(tmp_path_factory):
    """A full fine-tune whose training ended with the whole evaluation (eval.at_end) and a
    forgetting gate of 0: its perplexity on English rose, so the run exits 5 after writing it all."""
    root = tmp_path_factory.mktemp("eval_cmd")
    reference = write_jsonl(root / "reference.jsonl", REFERENCE)
    out = root / "run"
    proc = run_train([*RUN, f"output_dir={out}", "eval.at_end=true", f"eval.reference_data={reference}",
                      "eval.max_forgetting=0.0"], check=False)
    return out, reference, proc


def test_a_training_run_with_eval_at_end_stops_with_exit_5_past_the_forgetting_gate(gated_run):
    out, _, proc = gated_run
    assert proc.returncode == 5, proc.stderr[-4000:]
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith("ftdist: forgetting: perplexity on ") and "eval.max_forgetting=0" in line, line
    report = json.loads((out / "eval" / "report.json").read_text())
    assert report["forgetting"]["exceeded"] and report["forgetting"]["relative_change"] > 0
    assert json.loads((out / "summary.json").read_text())["complete"]  # the run itself finished


def test_eval_equals_the_runs_own_before_and_after_figures_and_an_independent_perplexity(gated_run):
    out, reference, _ = gated_run
    proc = run_eval(out, "eval.max_forgetting=null")  # the run's gate off: exit 0
    report = json.loads((out / "eval" / "report.json").read_text())
    _, evals = read_metrics(out)
    before, after = evals[0], evals[-1]
    assert before["step"] == 0 and after["step"] == 30
    for role, line in (("base", before), ("tuned", after)):
        got = report["models"][role]["metrics"]
        assert got["eval_loss"] == pytest.approx(line["eval_loss"], rel=1e-6), role
        assert got["exact_match"] == line["exact_match"] and got["generation_n"] == SAMPLES, role
    # The same greedy text the run generated at its end, prompt by prompt.
    trained = [json.loads(x) for x in (out / "eval" / "generations_step_00000030.jsonl").read_text().splitlines()]
    combined = [json.loads(x) for x in (out / "eval" / "generations.jsonl").read_text().splitlines()]
    assert [r["response"] for r in trained] == [r["tuned"] for r in combined]
    assert [r["reference"] for r in trained] == [r["reference"] for r in combined]
    assert "exact_match: base 0.0% -> tuned" in proc.stderr

    forgetting = report["forgetting"]
    base_ppl, base_tokens = independent_perplexity(report["models"]["base"]["path"], REFERENCE, 128)
    tuned_ppl, tuned_tokens = independent_perplexity(str(out / "final"), REFERENCE, 128)
    assert forgetting["tokens"] == base_tokens == tuned_tokens
    assert forgetting["documents"] == len(REFERENCE) and forgetting["windows"] > len(REFERENCE)
    assert forgetting["base_perplexity"] == pytest.approx(base_ppl, rel=1e-5)
    assert forgetting["tuned_perplexity"] == pytest.approx(tuned_ppl, rel=1e-5)
    assert forgetting["relative_change"] == pytest.approx(tuned_ppl / base_ppl - 1, rel=1e-5)
    for name in ("report.json", "report.md", "report.html", "loss_curves.png"):
        assert (out / "eval" / name).stat().st_size > 0, name


def test_eval_max_forgetting_exits_5_only_past_the_threshold(gated_run):
    out, reference, _ = gated_run
    change = json.loads((out / "eval" / "report.json").read_text())["forgetting"]["relative_change"]
    common = [f"eval.reference_data={reference}", "eval.generation.samples=0", "eval.compare_base=true"]
    past = run_eval(out, *common, f"eval.max_forgetting={change / 2}", check=False)
    assert past.returncode == 5, past.stderr[-3000:]
    assert past.stderr.strip().splitlines()[-1].startswith("ftdist: forgetting: perplexity on ")
    within = run_eval(out, *common, f"eval.max_forgetting={change * 2}", check=False)
    assert within.returncode == 0, within.stderr[-3000:]
    assert "passed" in within.stderr


def test_eval_bad_input_is_one_line_with_exit_2(tmp_path, gated_run, capfd):
    from ftdist.eval.__main__ import main

    out, _, _ = gated_run
    cases = {
        (str(tmp_path),): "no config.yaml",
        (str(out), "eval.nope=1"): "unknown config key 'eval.nope'",
        (str(out), "eval.generation.metrics=[bleu]"): "unknown metric 'bleu'",
        (str(out), "eval.generation.metrics=[exact_match"): "cannot parse override",
        (str(out), "eval.reference_data=missing.jsonl"): "eval.reference_data=missing.jsonl: data file not found",
        (str(out), "eval.checkpoint=/nonexistent"): "/nonexistent: no such run directory",
    }
    for args, expected in cases.items():
        assert main(list(args)) == 2, args
        lines = capfd.readouterr().err.strip().splitlines()
        assert expected in lines[-1] and lines[-1].startswith("ftdist: "), (args, lines[-3:])


def independent_perplexity(model_dir: str, docs: list[dict], window: int) -> tuple[float, int]:
    """exp(mean next-token NLL) over every document cut into `window`-token pieces, by a plain
    transformers forward of each piece alone."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    nll, count = 0.0, 0
    for doc in docs:
        ids = [tok.bos_token_id, *tok(doc["text"], add_special_tokens=False)["input_ids"], tok.eos_token_id]
        for start in range(0, len(ids), window):
            piece = torch.tensor([ids[start : start + window]])
            if piece.size(1) < 2:
                continue
            with torch.no_grad():
                logp = torch.log_softmax(model(piece).logits[0, :-1].double(), dim=-1)
            nll -= logp.gather(1, piece[0, 1:, None]).sum().item()
            count += piece.size(1) - 1
    return math.exp(nll / count), count
