"""report.html in a real headless browser (Debian's chromium, installed with apt-get when
missing): the screenshot shows the plots, found by their explicit line and bar colours.

A control page, the same report with its images removed, shows none of those colours, so the
counted pixels come from the embedded PNGs and not from the page's own styling.
"""

from __future__ import annotations

import re
import time

import numpy as np
import pytest
from browser import BrowserUnavailable, ensure_chromium, screenshot
from PIL import Image

from ftdist.eval.report import EVAL_LOSS_COLOUR, TRAIN_LOSS_COLOUR, TUNED_COLOUR, write_report

WIDTH, HEIGHT = 1280, 2400


@pytest.fixture(scope="module")
def chromium() -> str:
    start = time.monotonic()
    try:
        path = ensure_chromium()
    except BrowserUnavailable as e:
        pytest.skip(str(e))
    print(f"chromium ready in {time.monotonic() - start:.0f} s: {path}")
    return path


def report() -> dict:
    steps = range(1, 201)
    return {
        "run_dir": "runs/browser", "created": "2026-12-01T09:00:00Z", "objective": "sft", "task_metric": "exact_match",
        "models": {"base": {"path": "base", "metrics": {"eval_loss": 2.3, "exact_match": 0.0, "token_f1": 0.2}},
                   "tuned": {"path": "final", "metrics": {"eval_loss": 0.4, "exact_match": 1.0, "token_f1": 0.9}}},
        "forgetting": {"reference_data": "ref.jsonl", "documents": 5, "tokens": 900, "base_perplexity": 10.0,
                       "tuned_perplexity": 10.5, "relative_change": 0.05, "max_forgetting": 0.1, "exceeded": False},
        "training": {"train": [{"step": s, "loss": 0.3 + 2.0 * 0.98**s} for s in steps],
                     "eval": [{"step": s, "eval_loss": 0.35 + 2.0 * 0.98**s} for s in (0, 50, 100, 150, 200)]},
        "generations": [{"index": 0, "prompt": "<b>not bold</b>", "reference": "42", "base": "41", "tuned": "42"}],
    }  # fmt: skip


def pixels_near(rgb: np.ndarray, colour: str, tol: int = 24) -> int:
    want = np.array([int(colour[i : i + 2], 16) for i in (1, 3, 5)])
    return int((np.abs(rgb - want).max(axis=-1) <= tol).sum())


def test_report_html_renders_its_plots_in_chromium(chromium, tmp_path):
    paths = write_report(tmp_path / "eval", report())
    start = time.monotonic()
    shot = screenshot(paths["html"], tmp_path / "report.png", WIDTH, HEIGHT)
    print(f"screenshot in {time.monotonic() - start:.1f} s: {shot}")
    rgb = np.asarray(Image.open(shot).convert("RGB"), dtype=int)
    assert rgb.shape == (HEIGHT, WIDTH, 3)
    # The train curve: ~700 px of axes wide and 2.5 px thick; a legend swatch adds a few dozen.
    assert pixels_near(rgb, TRAIN_LOSS_COLOUR) > 1000
    assert pixels_near(rgb, EVAL_LOSS_COLOUR) > 1000
    assert pixels_near(rgb, TUNED_COLOUR) > 10_000  # bars of two plots
    assert (rgb.min(axis=-1) < 200).mean() > 0.05  # a page of plots and text, not a blank one

    control = tmp_path / "eval" / "no_images.html"
    control.write_text(re.sub(r"<img [^>]*>", "", paths["html"].read_text(encoding="utf-8")), encoding="utf-8")
    bare = np.asarray(Image.open(screenshot(control, tmp_path / "bare.png", WIDTH, HEIGHT)).convert("RGB"), dtype=int)
    for colour in (TRAIN_LOSS_COLOUR, EVAL_LOSS_COLOUR, TUNED_COLOUR):
        assert pixels_near(bare, colour) == 0, colour
