"""The classification demo (+experiment=tiny_cls_cpu): it composes, and a shortened run trains and
reports held-out accuracy and macro-F1 beside the majority baseline. The full demo (minutes) is
not run here."""

from __future__ import annotations

import json

from helpers import read_metrics

from ftdist.config import compose, load_config
from ftdist.train import run

DEMO = ["+experiment=tiny_cls_cpu"]
SHORT = [*DEMO, "data.num_synthetic_rows=400", "data.max_val_examples=40", "train.max_steps=4", "train.warmup_steps=1",
         "train.eval_every_steps=2", "train.progress_bar=false"]


def test_demo_composes_to_a_packed_classifier_on_the_support_ticket_task():
    cfg = load_config(compose([*DEMO, "output_dir=unused"]))
    assert cfg.objective.name == "classification" and cfg.data.format == "classification"
    assert cfg.data.path == "synthetic:support_tickets" and cfg.data.packing and cfg.strategy.name == "single"
    assert cfg.model.tiny is not None and cfg.model.tiny.sft_task is None  # trained from scratch


def test_shortened_demo_reports_accuracy_and_macro_f1_beside_the_majority_baseline(tmp_path):
    _, summary = run(compose([*SHORT, f"output_dir={tmp_path}"]), output_dir=str(tmp_path))
    assert summary["steps"] == 4
    _, evals = read_metrics(tmp_path)
    assert [e["step"] for e in evals] == [0, 2, 4]
    for record in evals:
        assert {"eval_loss", "eval_accuracy", "eval_macro_f1", "eval_ece", "eval_documents"} <= set(record)
        assert record["eval_documents"] == 20  # 5% of 400 rows
    report = summary["classification"]
    assert report["majority_baseline"]["class"] == "billing"
    assert set(report["per_class"]) == {"account", "billing", "shipping", "technical"}
    assert json.loads((tmp_path / "summary.json").read_text())["classification"] == report
    log = (tmp_path / "train.log").read_text()  # the end-of-run lines
    baseline = f"majority baseline, always 'billing': accuracy {report['majority_baseline']['accuracy']:.4f}"
    assert f"held-out accuracy {report['accuracy']:.4f}, macro-F1 {report['macro_f1']:.4f}" in log
    assert baseline in log and "confusion matrix" in log
