"""train.on_nonfinite=skip under DeepSpeed ZeRO: a NaN on one rank leaves every parameter, the
fp32 master partitions and the optimizer state exactly as they were on that step.

README: "a NaN/Inf loss or gradient norm on any rank is seen by all; ... skip (parameters
unchanged, skipped_steps counted in metrics.jsonl)". The DDP twin of this test is
tests/dist/test_resume.py::test_nan_on_one_rank_is_skipped_by_all_ranks_leaving_parameters_unchanged.
Here the evidence is DeepSpeed's own checkpoint files, written after every step: the step that
saw the NaN must hold bitwise the tensors of the step before it, and the next step must move on.
"""

from __future__ import annotations

import math
import subprocess
from pathlib import Path

import pytest
import torch
from helpers import FAST, REPO, read_metrics, run_env, train_cmd
from omegaconf import OmegaConf

from ftdist.parallel.deepspeed import CHECKPOINT_TAG

STEPS = 4
NAN_STEP = 3  # 1-based optimizer step whose loss becomes NaN on rank 1


def tensors(obj, prefix: str = "") -> dict[str, torch.Tensor]:
    """Every tensor inside a (nested) checkpoint object, by its path."""
    if isinstance(obj, torch.Tensor):
        return {prefix: obj}
    out: dict[str, torch.Tensor] = {}
    if isinstance(obj, dict):
        for k, v in obj.items():
            out.update(tensors(v, f"{prefix}/{k}"))
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            out.update(tensors(v, f"{prefix}/{i}"))
    return out


def checkpoint_tensors(run_dir: Path, step: int) -> dict[str, torch.Tensor]:
    """Model states and every rank's optimizer partition (fp32 master and Adam state)."""
    root = run_dir / "checkpoints" / f"step_{step:08d}" / "model_optimizer" / CHECKPOINT_TAG
    files = sorted(root.glob("*.pt"))
    assert any("optim_states" in f.name for f in files) and any("model_states" in f.name for f in files), files
    out = {}
    for f in files:
        state = torch.load(f, map_location="cpu", weights_only=False)
        # Only what training changes: the module and the optimizer (not DeepSpeed's counters).
        keep = {k: state[k] for k in ("module", "optimizer_state_dict") if k in state}
        out.update(tensors(keep, f.name))
    return out


def same(a: dict, b: dict) -> bool:
    assert a.keys() == b.keys()
    return all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def zero2_nan_run(tmp_path_factory):
    import deepspeed  # noqa: F401 - the dev extra installs it: missing fails, never skips

    out = tmp_path_factory.mktemp("zero_nan") / "zero2"
    overrides = [
        *FAST, "strategy=zero2", "train.micro_batch_size=1", f"train.max_steps={STEPS}", "checkpoint.every_steps=1",
        "checkpoint.keep=10", "train.on_nonfinite=skip", "train.save_final=false", f"output_dir={out}",
    ]
    env = {**run_env(), "FTDIST_INJECT_FAULT": f"nan:{NAN_STEP}:1"}
    proc = subprocess.run(
        train_cmd(2, overrides), check=False, cwd=REPO, env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-6000:]
    return out


def test_zero2_nan_on_one_rank_is_skipped_with_parameters_and_optimizer_state_unchanged(zero2_nan_run):
    train, _ = read_metrics(zero2_nan_run)
    assert [r["step"] for r in train] == list(range(1, STEPS + 1))
    assert [r["skipped_steps"] for r in train] == [0, 0, 1, 1]
    assert str(train[NAN_STEP - 1]["loss"]) == "nan"
    assert all(r["loss"] == r["loss"] for i, r in enumerate(train) if i != NAN_STEP - 1)  # finite elsewhere

    before = checkpoint_tensors(zero2_nan_run, NAN_STEP - 1)
    skipped = checkpoint_tensors(zero2_nan_run, NAN_STEP)
    after = checkpoint_tensors(zero2_nan_run, NAN_STEP + 1)
    assert any("optim_states" in k and "exp_avg" in k for k in before), "Adam state missing from the checkpoint"
    assert same(before, skipped), [k for k in before if not torch.equal(before[k], skipped[k])][:10]
    assert not same(skipped, after)  # the next step trains again
    assert all(torch.isfinite(v).all() for v in after.values() if v.is_floating_point())


def test_zero2_skipped_step_keeps_the_schedule_of_the_other_strategies(zero2_nan_run):
    """Single, DDP and FSDP advance the schedule on a skipped step (it counts as one of
    train.max_steps); under ZeRO every line's lr must be the same function of its step."""
    t = OmegaConf.load(zero2_nan_run / "config.yaml").train
    assert t.schedule == "cosine" and t.warmup_steps == 2
    train, _ = read_metrics(zero2_nan_run)
    expected = []
    for s in range(STEPS):  # the lr a step trains with: warmup (s+1)/w, then cosine to min_lr_ratio
        if s < t.warmup_steps:
            expected.append(t.lr * (s + 1) / t.warmup_steps)
        else:
            cos = 0.5 * (1 + math.cos(math.pi * (s - t.warmup_steps) / (STEPS - t.warmup_steps)))
            expected.append(t.lr * (t.min_lr_ratio + (1 - t.min_lr_ratio) * cos))
    for line, lr in zip(train, expected, strict=True):
        assert line["lr"] == pytest.approx(lr, rel=1e-12), line["step"]
