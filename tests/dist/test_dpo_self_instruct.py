"""DPO on real pairs (self-instruct: text-davinci-003's answers chosen over davinci's, joined by
`python -m ftdist.data.pairs`): with train.lr=0 the policy stays equal to its reference, so every
pair's log-ratio difference is 0 and the sigmoid loss is exactly ln 2, with all rewards 0. Checked
under single, fsdp on 2 gloo ranks (reference: a frozen copy sharded like the policy) and fsdp +
qlora (reference: the policy's 4-bit base with its adapters disabled).

The single run accumulates 2 micro-batches so that its global batch is the 2-rank runs' (2 ranks x
micro 2): its step's pairs, and so their log-probs, are the fsdp run's.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
from conftest import REPO, shared_dataset
from helpers import concurrently, read_metrics, run_train

MICRO = 2
RUNS = {  # name: (overrides, nproc)
    "single": (["train.grad_accum_steps=2"], None),
    "fsdp": (["strategy=fsdp"], 2),
    "fsdp_qlora": (["strategy=fsdp", "peft=qlora"], 2),
}
REWARDS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins")


@pytest.fixture(scope="module")
def pairs_path(tmp_path_factory):
    folder = "self_instruct/{}_predictions.jsonl"
    chosen, rejected = shared_dataset(folder.format("text-davinci-003")), shared_dataset(folder.format("davinci"))
    out = tmp_path_factory.mktemp("self_instruct") / "pairs.jsonl"
    subprocess.run([sys.executable, "-m", "ftdist.data.pairs", "--chosen", str(chosen), "--rejected", str(rejected),
                    "--out", str(out)], cwd=REPO, check=True, capture_output=True, timeout=120)
    return out


@pytest.fixture(scope="module")
def runs(pairs_path, tmp_path_factory):
    root = tmp_path_factory.mktemp("dpo_self_instruct")

    def train(name):
        overrides, nproc = RUNS[name]
        run_train([
            "model=tiny", "data=preference", f"data.path={pairs_path}", "data.max_seq_len=256",
            "data.max_val_examples=4", "objective=dpo", "train.lr=0", "train.max_steps=2",
            f"train.micro_batch_size={MICRO}", "train.eval_every_steps=null", "train.progress_bar=false",
            "eval.generation.samples=0", *overrides, f"output_dir={root / name}",
        ], nproc=nproc)

    # The one-process run beside the first 2-rank run (helpers.concurrently), then the other.
    concurrently(lambda: train("single"), lambda: train("fsdp"))
    train("fsdp_qlora")
    assert set(RUNS) == {"single", "fsdp", "fsdp_qlora"}
    return root


@pytest.mark.parametrize("run", list(RUNS))
def test_dpo_loss_is_ln2_with_zero_rewards_when_the_policy_cannot_move(runs, run):
    train, evals = read_metrics(runs / run)
    assert [r["step"] for r in train] == [1, 2]
    for record in train:  # lr=0: step 2's policy is still the reference
        assert abs(record["loss"] - math.log(2)) < 1e-6, record
        assert record["pairs"] == 2 * MICRO
        assert all(record[key] == 0.0 for key in REWARDS), record
        assert record["logps/chosen"] < 0 and record["logps/rejected"] < 0
    assert [r["step"] for r in evals] == [0, 2]
    for record in evals:
        assert abs(record["eval_loss"] - math.log(2)) < 1e-6, record
        assert all(record[f"eval_{key}"] == 0.0 for key in REWARDS), record
        assert record["eval_pairs"] > 0
    summary = json.loads((runs / run / "summary.json").read_text())
    assert summary["eval_rewards/accuracies_before"] == summary["eval_rewards/accuracies_after"] == 0.0


def test_fsdp_step_logps_equal_single_process(runs):
    """Both trained on the same global batch: the same pairs, so the same log-probs."""
    (single, _), (fsdp, _) = read_metrics(runs / "single"), read_metrics(runs / "fsdp")
    for a, b in zip(single, fsdp, strict=True):
        assert b["tokens"] == a["tokens"]
        for key in ("logps/chosen", "logps/rejected"):
            assert b[key] == pytest.approx(a[key], rel=1e-5), key
