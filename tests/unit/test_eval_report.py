"""The eval report: report.json, report.md, a self-contained report.html and PNG plots, the
console lines, and the W&B logging (a real offline run, read back from its files).

Expected figures are written out by hand from the report dict below (0.0 -> "0.0%", a change of
+1.0 -> "+100.0 pp"), not produced by the formatting code under test.
"""

from __future__ import annotations

import base64
import copy
import json
import re
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
from PIL import Image

from ftdist.eval.report import TRAIN_LOSS_COLOUR, TUNED_COLOUR, describe_report, log_report_to_wandb, write_report

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
HOSTILE = "<script>alert('x')</script> & |pipe|"


def full_report() -> dict:
    return {
        "run_dir": "runs/demo",
        "created": "2026-12-01T09:00:00Z",
        "objective": "sft",
        "task_metric": "exact_match",
        "models": {
            "base": {
                "path": "models/base",
                "metrics": {"eval_loss": 2.3, "exact_match": 0.0, "token_f1": 0.1, "generation_n": 200},
            },
            "tuned": {
                "path": "runs/demo/final",
                "metrics": {"eval_loss": 0.4, "exact_match": 1.0, "token_f1": 0.95, "generation_n": 200},
            },
        },
        "forgetting": {
            "reference_data": "ref.jsonl",
            "documents": 50,
            "tokens": 12000,
            "base_perplexity": 12.1,
            "tuned_perplexity": 12.9,
            "relative_change": 0.066,
            "max_forgetting": 0.1,
            "exceeded": False,
        },
        "lm_eval": {
            "base": {HOSTILE: {"acc": 0.5, "acc_norm": 0.4}},
            "tuned": {HOSTILE: {"acc": 0.55, "acc_norm": 0.38}},
        },
        "data": {
            "source": "data/train.jsonl",
            "rows_read": 120,
            "train_rows": 108,
            "val_rows": 12,
            "bad_rows": {"missing_field": 2, "empty_response": 1},
            "truncated": 3,
            "train_examples": 105,
            "val_examples": 12,
        },
        "training": {
            "train": [{"step": s, "loss": 2.5 * 0.97**s, "lr": 1e-3} for s in range(1, 101)],
            "eval": [{"step": s, "eval_loss": 2.4 * 0.97**s, "exact_match": s / 100} for s in (0, 50, 100)],
        },
        "generations": [
            {
                "index": 3,
                "prompt": f"Extract: {HOSTILE}",
                "reference": '{"name": "Ada"}',
                "base": "``` not json",
                "tuned": '{"name": "Ada"}',
                "scores": {"base": {"exact_match": 0.0}, "tuned": {"exact_match": 1.0}},
            },
            {
                "index": 7,
                "prompt": "Second prompt",
                "reference": "42",
                "base": "41",
                "tuned": "42",
                "scores": {"base": {"exact_match": 0.0}, "tuned": {"exact_match": 1.0}},
            },
        ],
    }


def tuned_only_report() -> dict:
    """eval.compare_base=false, no reference data, no harness, no training log, no generations."""
    return {
        "run_dir": "runs/min",
        "task_metric": "exact_match",
        "models": {"tuned": {"path": "runs/min/final", "metrics": {"exact_match": 1.0, "eval_loss": 0.5}}},
    }


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE and data[12:16] == b"IHDR", path
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def pixels_near(path: Path, colour: str, tol: int = 24) -> int:
    rgb = np.asarray(Image.open(path).convert("RGB"), dtype=int)
    want = np.array([int(colour[i : i + 2], 16) for i in (1, 3, 5)])
    return int((np.abs(rgb - want).max(axis=-1) <= tol).sum())


class _Text(HTMLParser):
    """The document's text as a browser shows it, and every tag and attribute it holds."""

    def __init__(self):
        super().__init__()
        self.text, self.tags = [], []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))

    def handle_data(self, data):
        self.text.append(data)


def parse_html(path: Path) -> _Text:
    parser = _Text()
    parser.feed(path.read_text(encoding="utf-8"))
    return parser


def test_write_report_writes_every_file_and_json_round_trips(tmp_path):
    report = full_report()
    paths = write_report(tmp_path / "eval", report)
    assert set(paths) == {"json", "md", "html", "loss_curves", "metrics_base_vs_tuned", "forgetting"}
    assert {p.name for p in paths.values()} == {p.name for p in (tmp_path / "eval").iterdir()}
    assert json.loads(paths["json"].read_text()) == report
    assert report == full_report()  # the caller's dict is not modified


def test_plots_are_real_pngs_with_the_plotted_colours(tmp_path):
    paths = write_report(tmp_path, full_report())
    for name in ("loss_curves", "metrics_base_vs_tuned", "forgetting"):
        width, height = png_size(paths[name])
        assert width >= 600 and height >= 400, (name, width, height)
        assert paths[name].stat().st_size > 10_000, name
        Image.open(paths[name]).verify()
    # A 100-step curve 2.5 px wide across ~700 px of axes: well over a thousand pixels of its colour.
    assert pixels_near(paths["loss_curves"], TRAIN_LOSS_COLOUR) > 1000
    assert pixels_near(paths["metrics_base_vs_tuned"], TUNED_COLOUR) > 5000
    assert pixels_near(paths["metrics_base_vs_tuned"], TRAIN_LOSS_COLOUR) == 0


def test_html_is_self_contained_and_embeds_each_plot(tmp_path):
    paths = write_report(tmp_path, full_report())
    page = paths["html"].read_text(encoding="utf-8")
    tags = parse_html(paths["html"]).tags
    assert not re.search(r"(src|href)\s*=\s*[\"']?(https?:|//)", page, re.IGNORECASE)
    assert "<link" not in page and "@import" not in page and "url(" not in page and "<script" not in page
    images = [attrs["src"] for tag, attrs in tags if tag == "img"]
    assert len(images) == 3 and all(src.startswith("data:image/png;base64,") for src in images)
    embedded = {base64.b64decode(src.split(",", 1)[1]) for src in images}
    assert embedded == {paths[n].read_bytes() for n in ("loss_curves", "metrics_base_vs_tuned", "forgetting")}


def test_text_from_data_is_escaped_but_shown_verbatim(tmp_path):
    paths = write_report(tmp_path, full_report())
    page = paths["html"].read_text(encoding="utf-8")
    assert "<script>" not in page and "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;" in page
    shown = "".join(parse_html(paths["html"]).text)
    assert f"Extract: {HOSTILE}" in shown  # a reader sees the prompt exactly as the data has it
    assert "``` not json" in shown
    md = paths["md"].read_text()
    # In a table cell: no raw tag, and the pipes do not split the cell.
    assert "| &lt;script>alert('x')&lt;/script> &amp; \\|pipe\\| | acc | 50.0% | 55.0% | +5.0 pp |" in md
    # In a fenced block the text stays literal; a fence longer than its own ``` keeps it open.
    assert f"```text\nExtract: {HOSTILE}\n```" in md
    assert "````text\n``` not json\n````" in md


def test_markdown_has_the_figures(tmp_path):
    md = write_report(tmp_path, full_report())["md"].read_text()
    assert "exact_match: base 0.0% -> tuned 100.0%" in md
    for row in (
        "| eval_loss | 2.3000 | 0.4000 | -1.9000 |",
        "| exact_match | 0.0% | 100.0% | +100.0 pp |",
        "| token_f1 | 10.0% | 95.0% | +85.0 pp |",
        "| generation_n | 200 | 200 |  |",
        "| bad_rows | missing_field: 2, empty_response: 1 |",
        "| truncated | 3 |",
        "| rows_read | 120 |",
    ):
        assert row in md, row
    # 12.9 / 12.1 - 1 = 6.6 %, under the 10 % threshold.
    assert "base 12.1000 -> tuned 12.9000 (+6.6%); threshold +10.0%: passed [50 documents, 12000 tokens]" in md
    assert md.index("### Example 3") < md.index("### Example 7")
    assert "![loss_curves](loss_curves.png)" in md
    assert "not measured" not in md


def test_absent_sections_are_reported_as_not_measured(tmp_path):
    paths = write_report(tmp_path, tuned_only_report())
    assert set(paths) == {"json", "md", "html", "metrics_base_vs_tuned"}  # no curve, no forgetting
    md = paths["md"].read_text()
    shown = " ".join(parse_html(paths["html"]).text)
    assert "| exact_match | — | 100.0% |  |" in md
    for text in (
        "exact_match: tuned 100.0% (base not evaluated)",
        "Base model: not measured",
        "Training curves: not measured",
        "Forgetting: not measured",
        "lm-evaluation-harness: not measured",
        "Data report: not measured",
        "Generations: not measured",
    ):
        assert text in md and text in shown, text


def test_forgetting_gate_and_missing_threshold(tmp_path):
    report = full_report()
    report["forgetting"].update(tuned_perplexity=14.52, relative_change=0.2, exceeded=True)
    md = write_report(tmp_path / "a", report)["md"].read_text()
    assert "(+20.0%); threshold +10.0%: EXCEEDED" in md
    report["forgetting"].update(max_forgetting=None, exceeded=None)
    assert "no threshold set" in describe_report(report)[-1]
    # eval.compare_base=false: the runner's block has no base perplexity, change or verdict.
    report = tuned_only_report() | {
        "forgetting": {
            "reference_data": "ref.jsonl",
            "documents": 5,
            "tokens": 900,
            "tuned_perplexity": 9.5,
            "max_forgetting": 0.1,
        }
    }
    paths = write_report(tmp_path / "b", report)
    assert "forgetting" not in paths  # nothing to compare: no plot
    line = "perplexity on ref.jsonl: base — -> tuned 9.5000; threshold +10.0%: not checked (no base perplexity)"
    assert line in paths["md"].read_text() and describe_report(report)[-1] == "forgetting: " + line


def test_describe_report_lines():
    assert describe_report(full_report()) == [
        "exact_match: base 0.0% -> tuned 100.0%",
        "  eval_loss: base 2.3000 -> tuned 0.4000 (-1.9000)",
        "  exact_match: base 0.0% -> tuned 100.0% (+100.0 pp)",
        "  token_f1: base 10.0% -> tuned 95.0% (+85.0 pp)",
        "  generation_n: base 200 -> tuned 200",
        "forgetting: perplexity on ref.jsonl: base 12.1000 -> tuned 12.9000 (+6.6%); threshold +10.0%: passed",
    ]
    no_headline = copy.deepcopy(tuned_only_report()) | {"task_metric": None}
    assert describe_report(no_headline) == [
        "  exact_match: base — -> tuned 100.0%",
        "  eval_loss: base — -> tuned 0.5000",
    ]


def _summary(run_file: Path) -> dict:
    """The run's summary as the .wandb file records it (offline runs write no wandb-summary.json)."""
    from integration.test_wandb import wandb_records  # the suite's reader of .wandb files
    from wandb.proto import wandb_internal_pb2

    summary = {}
    for data in wandb_records(run_file):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(data)
        if record.WhichOneof("record_type") == "summary":
            summary.update(
                {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.summary.update}
            )
    return summary


def test_log_report_to_wandb_offline(tmp_path, monkeypatch):
    import wandb

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    report = full_report()
    paths = write_report(tmp_path / "eval", report)
    run = wandb.init(mode="offline", dir=tmp_path, project="ftdist-test")
    log_report_to_wandb(run, report, paths)
    run.finish()
    (run_dir,) = (tmp_path / "wandb").glob("offline-run-*")
    media = run_dir / "files" / "media"
    for name in ("loss_curves", "metrics_base_vs_tuned", "forgetting"):
        (logged,) = (media / "images" / "eval" / "plots").glob(f"{name}_*.png")
        assert logged.read_bytes() == paths[name].read_bytes()
    (table,) = (media / "table" / "eval").glob("generations_*.table.json")
    table = json.loads(table.read_text())
    assert table["columns"] == ["index", "prompt", "reference", "base", "tuned"]
    assert table["data"] == [[g[c] for c in table["columns"]] for g in report["generations"]]
    (run_file,) = run_dir.glob("*.wandb")
    summary = _summary(run_file)
    for model in ("base", "tuned"):
        for name, value in report["models"][model]["metrics"].items():
            assert summary[f"eval/{model}/{name}"] == value
    assert summary["eval/forgetting/tuned_perplexity"] == 12.9 and summary["eval/forgetting/exceeded"] == 0
    assert summary[f"eval/lm_eval/tuned/{HOSTILE}/acc"] == 0.55
