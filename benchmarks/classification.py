"""The classification acceptance runs, timed: the SMS Spam Collection and the support-ticket demo,
each trained from scratch on CPU by `python -m ftdist.train` exactly as the README shows, one
after the other (run it on an idle machine: the times are wall clock).

    python benchmarks/classification.py [--only sms|demo] [--out-root /tmp/ftdist-cls-bench]

Prints one JSON object: per run, wall seconds (process start to exit, tiny model build included
when not cached), held-out accuracy, macro-F1, expected calibration error, and the majority
baseline's accuracy and macro-F1, from the run's summary.json.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RUNS = {"sms": "tiny_sms_spam_cpu", "demo": "tiny_cls_cpu"}


def run(experiment: str, out: Path) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "ftdist.train", f"+experiment={experiment}", f"output_dir={out}",
                    "train.progress_bar=false"], cwd=REPO, check=True, capture_output=True)
    seconds = time.perf_counter() - start
    summary = json.loads((out / "summary.json").read_text())
    report = summary["classification"]
    return {
        "experiment": experiment, "wall_s": round(seconds, 1), "steps": summary["steps"],
        "documents": report["documents"], "accuracy": report["accuracy"], "macro_f1": report["macro_f1"],
        "ece": report["ece"], "majority_class": report["majority_baseline"]["class"],
        "majority_accuracy": report["majority_baseline"]["accuracy"],
        "majority_macro_f1": report["majority_baseline"]["macro_f1"],
        "accuracy_at_step_0": summary.get("eval_accuracy_before"),
        "mean_tokens_per_s": round(summary["mean_tokens_per_s"]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", choices=sorted(RUNS))
    parser.add_argument("--out-root", type=Path, default=Path("/tmp/ftdist-cls-bench"))
    args = parser.parse_args()
    names = [args.only] if args.only else list(RUNS)
    print(json.dumps({name: run(RUNS[name], args.out_root / name) for name in names}, indent=2))


if __name__ == "__main__":
    main()
