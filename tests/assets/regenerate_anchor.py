"""Regenerate the regression anchor: `python tests/assets/regenerate_anchor.py`.

The suite mostly compares N ranks to 1 rank, which cannot see a regression every strategy
shares (a changed loss normalisation, label shift, optimizer or schedule step, data order).
tests/integration/test_regression_anchor.py reruns a fixed 20-step fp32 `+experiment=tiny_cpu`
run (single process, one thread) and compares every loss with the stored ones to 1e-6.

Regenerate only on purpose, and say why in the commit:
- a deliberate change to the numbers (a fix to the loss, the data pipeline, the tiny model or
  its tokenizer, the optimizer or schedule), after checking the new curve is the right one;
- a move of the pinned torch or transformers versions (the JSON records the versions it was
  made with; kernels and initialisers may change the last bits between releases).
Never regenerate to make a failing test pass without knowing which of these it is.

The curve is deterministic on one machine (OMP_NUM_THREADS=1, fp32, seeded model, tokenizer
and data); a CPU with other matmul kernels may differ in the last digits.
"""

from __future__ import annotations

import datetime
import json
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ANCHOR = HERE / "tiny_cpu_loss_anchor.json"
sys.path.insert(0, str(HERE.parent))  # tests/: helpers (the same launch as the test's)

# Small and fast (about 20 s on 2 cores), and every step after warm-up still moves the loss.
OVERRIDES = [
    "+experiment=tiny_cpu",
    "data.num_synthetic_rows=300",
    "eval.generation.samples=0",
    "train.eval_at_start=false",
    "train.eval_every_steps=null",
    "train.progress_bar=false",
    "train.warmup_steps=2",
    "train.max_steps=20",
    "train.micro_batch_size=8",
    "train.log_every_steps=1",
    "train.save_final=false",
]


def run_curve(overrides: list[str], run_dir: Path) -> dict:
    """Train with `overrides` into `run_dir`; the per-step losses and the final eval loss."""
    from helpers import read_metrics, run_train

    run_train([*overrides, f"output_dir={run_dir}"])
    train, evals = read_metrics(run_dir)
    return {"losses": [r["loss"] for r in train], "eval_loss": evals[-1]["eval_loss"] if evals else None}


def main() -> None:
    import torch
    import transformers

    with tempfile.TemporaryDirectory() as tmp:
        curve = run_curve(OVERRIDES, Path(tmp) / "run")
    anchor = {
        "overrides": OVERRIDES,
        **curve,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "date": datetime.date.today().isoformat(),
        "regenerate": "python tests/assets/regenerate_anchor.py (see its docstring for when)",
    }
    ANCHOR.write_text(json.dumps(anchor, indent=2) + "\n")
    print(f"wrote {ANCHOR}: {len(curve['losses'])} losses, last {curve['losses'][-1]}, eval {curve['eval_loss']}")


if __name__ == "__main__":
    main()
