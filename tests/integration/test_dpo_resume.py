"""DPO with precomputed reference log-probs stops, resumes and gets the uninterrupted losses;
the cache is reused on resume and a cache made for other data is refused."""

from __future__ import annotations

import json

from helpers import concurrently, read_metrics, run_train

BASE = [
    "model=tiny", "data=preference", "data.path=synthetic:json_preference", "data.num_synthetic_rows=80",
    "data.max_seq_len=96", "data.val_fraction=0.1", "objective=dpo", "objective.reference=precomputed",
    "objective.beta=0.5", "train.max_steps=4", "train.micro_batch_size=2", "train.lr=1e-3", "train.warmup_steps=0",
    "train.progress_bar=false", "train.eval_every_steps=null", "checkpoint.every_steps=2",
]


def test_precomputed_reference_resumes_exactly_and_refuses_a_stale_cache(tmp_path):
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    # Single-process runs, two at a time (helpers.concurrently): each pair is independent.
    concurrently(lambda: run_train([*BASE, f"output_dir={straight}"]),
                 lambda: run_train([*BASE, "train.stop_after_steps=2", f"output_dir={stopped}"]))
    cache = stopped / "reference_logps.pt"
    written = cache.stat().st_mtime_ns
    # The resume (resume=auto: from step 2), and the same cache file given to a run on other pairs.
    _, other = concurrently(
        lambda: run_train([*BASE, f"output_dir={stopped}"]),
        lambda: run_train([*BASE, "data.num_synthetic_rows=60", f"objective.reference_cache={cache}",
                           f"output_dir={tmp_path / 'other'}"], check=False),
    )

    assert cache.stat().st_mtime_ns == written  # read on resume, not computed again
    assert "reference log-probs of 72 train and 8 validation pairs from" in (stopped / "train.log").read_text()
    (a, a_eval), (b, b_eval) = read_metrics(straight), read_metrics(stopped)
    assert [r["step"] for r in b] == [1, 2, 3, 4]
    for key in ("loss", "rewards/margins", "logps/chosen"):
        assert [r[key] for r in b] == [r[key] for r in a], key  # fp32 on CPU: bitwise
    assert b_eval[-1]["eval_loss"] == a_eval[-1]["eval_loss"]
    summary = json.loads((stopped / "summary.json").read_text())
    assert summary["eval_rewards/accuracies_after"] > 0.0
    # Both before/after figures, the step-0 ones carried across the resume in the checkpoint.
    uninterrupted = json.loads((straight / "summary.json").read_text())
    for key in ("eval_rewards/accuracies", "eval_logps/chosen_preferred"):
        assert summary[f"{key}_before"] == uninterrupted[f"{key}_before"] == a_eval[0][key]
        assert summary[f"{key}_after"] == uninterrupted[f"{key}_after"] == a_eval[-1][key]
    assert (stopped / "final" / "model.safetensors").is_file() and (stopped / "final" / "config.json").is_file()

    # The same cache file for other pairs: refused with what differs, never used or overwritten.
    assert other.returncode != 0
    assert "was computed for another data_sha256 than this run's" in other.stderr
    assert cache.stat().st_mtime_ns == written
