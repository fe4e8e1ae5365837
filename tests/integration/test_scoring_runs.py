"""Classifier and reward-model runs end to end: exact resume, final/ as a Hugging Face
sequence classifier reproducing the run's eval predictions, export and merge of a LoRA
classifier (its head trained in full beside the adapters), and `python -m ftdist.score`."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from helpers import REPO, read_metrics, run_env, run_train

from ftdist.data.encoding import holdout_indices
from ftdist.data.synthetic import generate_rows

ROWS, VAL, SEED = 200, 0.1, 0
CLASSIFY = ["model=tiny", "objective=classification", "data=classification", "data.path=synthetic:support_tickets",
            f"data.num_synthetic_rows={ROWS}", "data.max_seq_len=64", f"data.val_fraction={VAL}", "data.packing=true",
            "train.max_steps=8", "train.micro_batch_size=4", "train.lr=2e-3", "train.warmup_steps=2",
            "train.eval_every_steps=null", "train.progress_bar=false", "checkpoint.every_steps=4"]
REWARD = ["model=tiny", "objective=reward", "data=preference", "data.path=synthetic:json_preference",
          f"data.num_synthetic_rows={ROWS}", "data.max_seq_len=96", f"data.val_fraction={VAL}", "train.max_steps=6",
          "train.micro_batch_size=4", "train.lr=2e-3", "train.progress_bar=false", "objective.center_rewards=0.01"]
LORA = ["peft=lora", "peft.r=4", "peft.dropout=0.0"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("scoring_runs")
    jobs = {
        "full": [*CLASSIFY],
        "lora": [*CLASSIFY, *LORA],
        "lora_stopped": [*CLASSIFY, *LORA, "train.stop_after_steps=4"],
        "reward": [*REWARD],
    }
    # Single-process runs take one core each: two at a time.
    with ThreadPoolExecutor(2) as pool:
        list(pool.map(lambda name: run_train([*jobs[name], f"output_dir={root / name}"]), jobs))
    run_train([*jobs["lora_stopped"][:-1], f"output_dir={root / 'lora_stopped'}"])  # resume=auto from step 4
    return root


def validation_rows(task: str) -> list[dict]:
    """The run's held-out rows, in the order its validation split has them."""
    rows = generate_rows(task, ROWS, SEED)
    held = holdout_indices(len(rows), VAL, None, SEED)
    return [r for i, r in enumerate(rows) if i in held]


def final_predictions(run_dir: Path, raw: bool = False) -> list[dict] | str:
    steps = sorted((run_dir / "eval").glob("predictions_step_*.jsonl"))
    text = steps[-1].read_text()
    return text if raw else [json.loads(line) for line in text.splitlines()]


def score(model: Path, rows: list[dict], tmp_path: Path, *extra: str) -> list[dict]:
    rows_file, out = tmp_path / "rows.jsonl", tmp_path / "scored.jsonl"
    rows_file.write_text("".join(json.dumps(r) + "\n" for r in rows))
    subprocess.run([sys.executable, "-m", "ftdist.score", str(model), "--file", str(rows_file), "--out", str(out),
                    "--batch-size", "5", *extra], check=True, cwd=REPO, env=run_env(), capture_output=True, text=True)
    return [json.loads(line) for line in out.read_text().splitlines()]


def test_a_stopped_and_resumed_lora_classifier_trains_exactly_as_an_uninterrupted_one(runs):
    (resumed, resumed_evals), (whole, whole_evals) = read_metrics(runs / "lora_stopped"), read_metrics(runs / "lora")
    assert [r["step"] for r in resumed] == [r["step"] for r in whole] == list(range(1, 9))
    for got, want in zip(resumed, whole, strict=True):
        assert got["loss"] == pytest.approx(want["loss"], rel=1e-6), got["step"]
        assert got["accuracy"] == want["accuracy"]
    assert resumed_evals[-1]["eval_loss"] == pytest.approx(whole_evals[-1]["eval_loss"], rel=1e-6)
    summary = json.loads((runs / "lora_stopped" / "summary.json").read_text())
    assert summary["eval_accuracy_before"] == json.loads((runs / "lora" / "summary.json").read_text())["eval_accuracy_before"]


def test_final_reloads_as_a_hugging_face_classifier_and_reproduces_the_eval_predictions(runs, tmp_path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    final = runs / "full" / "final"
    model = AutoModelForSequenceClassification.from_pretrained(final).eval()
    tokenizer = AutoTokenizer.from_pretrained(final)
    assert tokenizer.model_max_length == 64  # data.max_seq_len: truncation=True cuts where training did
    labels = json.loads((runs / "full" / "data_report.json").read_text())["labels"]
    assert model.config.id2label == dict(enumerate(labels))
    rows, predictions = validation_rows("support_tickets"), final_predictions(runs / "full")
    assert [p["index"] for p in predictions] == list(range(len(rows)))
    for row, want in zip(rows, predictions, strict=True):
        assert row["label"] == want["label"]
        with torch.no_grad():  # transformers' own forward and pooling, one text at a time
            probs = torch.softmax(model(**tokenizer(row["text"], truncation=True, return_tensors="pt")).logits[0], -1)
        assert model.config.id2label[int(probs.argmax())] == want["predicted"]
        assert probs.tolist() == pytest.approx([want["probabilities"][n] for n in labels], abs=1e-6)
    # The command-line scorer, batched and padded, gives the same.
    scored = score(runs / "full", [{"text": r["text"]} for r in rows], tmp_path)
    for got, want in zip(scored, predictions, strict=True):
        assert got["label"] == want["predicted"]
        assert [got["probabilities"][n] for n in labels] == pytest.approx([want["probabilities"][n] for n in labels],
                                                                           abs=1e-6)


def test_lora_classifier_exports_merges_and_scores_as_trained(runs, tmp_path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    run_dir = runs / "lora"
    final = run_dir / "final"
    assert json.loads((final / "head.json").read_text())["objective"] == "classification"
    merged = tmp_path / "merged"
    subprocess.run([sys.executable, "-m", "ftdist.export", str(run_dir), "--out", str(merged), "--merge"], check=True,
                   cwd=REPO, env=run_env(), capture_output=True, text=True)
    model = AutoModelForSequenceClassification.from_pretrained(merged).eval()
    tokenizer = AutoTokenizer.from_pretrained(merged)
    labels = json.loads((run_dir / "data_report.json").read_text())["labels"]
    rows, predictions = validation_rows("support_tickets"), final_predictions(run_dir)
    by_adapter = score(run_dir, [{"text": r["text"]} for r in rows], tmp_path)  # base + adapter + trained head
    for row, want, got in zip(rows, predictions, by_adapter, strict=True):
        with torch.no_grad():
            probs = torch.softmax(model(**tokenizer(row["text"], truncation=True, return_tensors="pt")).logits[0], -1)
        want_probs = [want["probabilities"][n] for n in labels]
        assert probs.tolist() == pytest.approx(want_probs, abs=1e-5)  # merged: rounding of the merge only
        assert [got["probabilities"][n] for n in labels] == pytest.approx(want_probs, abs=1e-6)


def test_reward_model_scores_rank_the_validation_pairs_as_its_evaluation_did(runs, tmp_path):
    run_dir = runs / "reward"
    _, evals = read_metrics(run_dir)
    rows = validation_rows("json_preference")
    scored = score(run_dir, [{"prompt": r["prompt"], "response": r[side]} for r in rows for side in ("chosen", "rejected")],
                   tmp_path)
    chosen, rejected = [s["score"] for s in scored[0::2]], [s["score"] for s in scored[1::2]]
    ranked_right = sum(c > r for c, r in zip(chosen, rejected)) / len(rows)
    assert evals[-1]["eval_pairs"] == len(rows)
    assert ranked_right == pytest.approx(evals[-1]["eval_accuracy"])
    margin = sum(c - r for c, r in zip(chosen, rejected)) / len(rows)
    assert margin == pytest.approx(evals[-1]["eval_margin"], rel=1e-4, abs=1e-5)


@pytest.mark.parametrize("name", ["lora", "reward"])
def test_eval_gives_the_runs_own_step_0_and_final_figures(runs, name, tmp_path):
    """ftdist.eval loads the base (its new head seeded as the run seeded it) and the final model
    afresh; a LoRA classifier's eval also goes to an offline W&B run."""
    run_dir = tmp_path / name
    shutil.copytree(runs / name, run_dir)
    _, evals = read_metrics(run_dir)
    extra = ["tracking=wandb", "tracking.mode=offline"] if name == "lora" else []
    subprocess.run([sys.executable, "-m", "ftdist.eval", str(run_dir), *extra], check=True, cwd=REPO, env=run_env(),
                   capture_output=True, text=True)
    report = json.loads((run_dir / "eval" / "report.json").read_text())
    for role, line in (("base", evals[0]), ("tuned", evals[-1])):
        got = report["models"][role]["metrics"]
        assert got.keys() == line.keys() - {"step"}, role
        for key, value in got.items():
            assert value == pytest.approx(line[key], rel=1e-5, abs=1e-6), (role, key)
    if name == "lora":
        assert (run_dir / "eval" / "predictions_tuned.jsonl").read_text() == final_predictions(run_dir, raw=True)
        assert list((run_dir / "eval" / "wandb").glob("offline-run-*/run-*.wandb")), "no offline W&B run"


def test_score_refuses_a_language_model_and_names_a_bad_row(runs, tiny_model_dir, tmp_path):
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"text": "fine"}\n{"txt": "no text field"}\n')

    def score_cli(model) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "ftdist.score", str(model), "--file", str(rows)], cwd=REPO,
                              env=run_env(), capture_output=True, text=True)

    language_model = score_cli(tiny_model_dir)
    assert language_model.returncode == 2
    assert "LlamaForCausalLM without a scoring head, not a classifier or reward model" in language_model.stderr
    bad_row = score_cli(runs / "full")
    assert bad_row.returncode == 2
    assert f"ftdist.score: DataError: {rows}:2: missing_field: row has no field 'text'" in bad_row.stderr
