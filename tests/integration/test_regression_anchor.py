"""A stored 20-step loss curve of `+experiment=tiny_cpu`: the check every strategy could fail together.

The rest of the suite compares N ranks to 1 rank, or packed to padded; a regression they all
share (loss normalisation, label shift, optimizer, schedule, data order, the tiny model's
build) keeps those equal. This test compares the numbers themselves with a stored curve
(tests/assets/tiny_cpu_loss_anchor.json, made by tests/assets/regenerate_anchor.py).
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import torch
import transformers

ASSETS = Path(__file__).resolve().parents[1] / "assets"
REGENERATE = "python tests/assets/regenerate_anchor.py"


def regenerate_module():
    spec = importlib.util.spec_from_file_location("regenerate_anchor", ASSETS / "regenerate_anchor.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_tiny_cpu_loss_curve_matches_the_stored_anchor(tmp_path):
    anchor = json.loads((ASSETS / "tiny_cpu_loss_anchor.json").read_text())
    regen = regenerate_module()
    assert anchor["overrides"] == regen.OVERRIDES, f"the script's overrides moved from the anchor's: run {REGENERATE}"
    curve = regen.run_curve(anchor["overrides"], tmp_path / "run")
    how = (
        f"stored with torch {anchor['torch']}, transformers {anchor['transformers']} on {anchor['date']}; "
        f"running torch {torch.__version__}, transformers {transformers.__version__}. If the change is deliberate "
        f"(a fix to the numbers, or a pinned-version move), regenerate with `{REGENERATE}` and say why in the commit"
    )
    assert len(curve["losses"]) == len(anchor["losses"]), how
    for step, (got, want) in enumerate(zip(curve["losses"], anchor["losses"]), start=1):
        assert abs(got - want) <= 1e-6 * abs(want), f"step {step}: loss {got!r}, anchor {want!r} ({how})"
    assert abs(curve["eval_loss"] - anchor["eval_loss"]) <= 1e-6 * abs(anchor["eval_loss"]), how
