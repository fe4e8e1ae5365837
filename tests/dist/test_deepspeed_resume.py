"""DeepSpeed ZeRO-3 checkpoints: preempt, resume, and get the losses of an uninterrupted run.

The full fine-tuning run is stopped the way a cluster stops it: rank 1 receives SIGTERM after
step 4 (FTDIST_INJECT_FAULT), both ranks write DeepSpeed's checkpoint and exit, and the same
command run again resumes (resume=auto is the default). The LoRA run resumes from the step-4
checkpoint its uninterrupted twin wrote. Tolerance: none. On CPU in fp32 with the same world
size the resumed steps are bitwise those of the uninterrupted run (measured: every loss,
grad norm and lr of steps 5-8 identical, and the final weights too).

A checkpoint resumed on another world size is refused with a ConfigError naming both sizes:
DeepSpeed's optimizer partitions do not reshard without a universal-checkpoint conversion.

Each run costs ~15 s of start-up (imports, data, zero.Init) on 2 cores, so independent runs go
two at a time: they overlap by ~20% and their numbers do not depend on load (one thread each).
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from helpers import FAST, REPO, read_metrics, run_env, train_cmd
from safetensors.torch import load_file

from ftdist.config import ConfigError
from ftdist.parallel.deepspeed import CHECKPOINT_TAG, check_same_layout
from ftdist.resilience import PREEMPTED_MARKER

BASE = [*FAST, "train.max_steps=8", "train.micro_batch_size=2", "checkpoint.every_steps=4", "strategy=zero3"]
LORA = [*BASE, "peft=lora", "peft.dropout=0"]  # no dropout: its masks come from the RNG stream
# The same global batch (4) on one process, so resuming reaches the world-size check.
ONE_PROCESS = [*BASE, "train.micro_batch_size=4"]


def start(root: Path, name: str, overrides: list[str], nproc: int | None = 2, fault: str | None = None):
    """Launch a run in the background; its stdout and stderr go to root/name.{out,err}."""
    env = run_env()
    if fault:
        env["FTDIST_INJECT_FAULT"] = fault
    # Files, not pipes: a run nobody reads yet must not block on a full pipe.
    with open(root / f"{name}.out", "w") as out, open(root / f"{name}.err", "w") as err:
        proc = subprocess.Popen(train_cmd(nproc, overrides), cwd=REPO, env=env, stdout=out, stderr=err)
    return proc, root / name


def finish(launched, check: bool = True) -> subprocess.CompletedProcess:
    proc, log = launched
    proc.wait(timeout=600)
    stderr = log.with_suffix(".err").read_text()
    if check and proc.returncode != 0:
        raise AssertionError(f"{log.name} failed ({proc.returncode}):\n{stderr[-6000:]}")
    return subprocess.CompletedProcess(proc.args, proc.returncode, log.with_suffix(".out").read_text(), stderr)


def copy_first_half(src, dst) -> None:
    """A run directory as a run stopped after step 4 leaves it: its metrics and checkpoint."""
    shutil.copytree(src / "checkpoints" / "step_00000004", dst / "checkpoints" / "step_00000004")
    lines = (src / "metrics.jsonl").read_text().splitlines()
    (dst / "metrics.jsonl").write_text("".join(line + "\n" for line in lines if json.loads(line)["step"] <= 4))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    import deepspeed  # noqa: F401 - the dev extra installs it: missing fails, never skips
    root = tmp_path_factory.mktemp("deepspeed_resume")
    full, lora = [*BASE, f"output_dir={root}/full"], [*LORA, f"output_dir={root}/lora"]
    # Two runs at a time, each pair launched once what it needs exists.
    straight = start(root, "full_straight", [*BASE, f"output_dir={root}/full_straight"])
    lora_straight = start(root, "lora_straight", [*LORA, f"output_dir={root}/lora_straight"])
    finish(straight)
    finish(lora_straight)
    copy_first_half(root / "lora_straight", root / "lora")
    preempting, lora_resuming = start(root, "full_preempted", full, fault="sigterm:4:1"), start(root, "lora", lora)
    preempted = finish(preempting, check=False)
    finish(lora_resuming)
    left = {
        "checkpoints": sorted(p.name for p in (root / "full" / "checkpoints").iterdir()),
        "marker": json.loads((root / "full" / PREEMPTED_MARKER).read_text()),
        "last_step": max(history(root / "full")),
    }
    saved = root / "full_straight" / "checkpoints" / "step_00000004"
    resuming = start(root, "full_resumed", full)
    one_process = start(root, "one_process", [*ONE_PROCESS, f"resume={saved}", f"output_dir={root}/one_process"], None)
    finish(resuming)
    resharded = finish(one_process, check=False)
    return {"root": root, "preempted": preempted, "left": left, "resharded": resharded}


def history(run_dir) -> dict[int, dict]:
    train, _ = read_metrics(run_dir)
    steps = [r["step"] for r in train]
    assert steps == sorted(set(steps)), f"a step logged twice: {steps}"
    return {r["step"]: r for r in train}


def assert_resumed_exactly(straight, resumed) -> None:
    a, b = history(straight), history(resumed)
    assert sorted(a) == sorted(b) == list(range(1, 9))
    for step in range(5, 9):  # exact: same world size, fp32, same reduction order
        for key in ("loss", "grad_norm", "lr", "tokens"):
            assert b[step][key] == a[step][key], (step, key, a[step][key], b[step][key])
    assert not (resumed / PREEMPTED_MARKER).exists()


def test_preempted_zero3_run_checkpoints_at_the_signalled_step_and_exits_nonzero(runs):
    assert runs["preempted"].returncode != 0, "a preempted run must not exit 0"
    assert "preempted at step 4" in runs["preempted"].stderr
    left = runs["left"]
    assert left["marker"]["step"] == 4 and left["last_step"] == 4  # both ranks stopped at step 4
    assert left["checkpoints"] == ["step_00000004"]  # complete: no step_00000004.partial


def test_zero3_resumed_losses_and_weights_are_bitwise_those_of_an_uninterrupted_run(runs):
    root = runs["root"]
    assert_resumed_exactly(root / "full_straight", root / "full")
    a = load_file(root / "full_straight" / "final" / "model.safetensors")
    b = load_file(root / "full" / "final" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_zero3_lora_resumes_exactly_from_a_checkpoint_without_the_frozen_base(runs):
    root = runs["root"]
    assert_resumed_exactly(root / "lora_straight", root / "lora")
    files = root / "lora" / "checkpoints" / "step_00000004" / "model_optimizer" / CHECKPOINT_TAG
    module = torch.load(next(files.glob("*_model_states.pt")), weights_only=False)["module"]
    # The frozen base is not saved. DeepSpeed drops frozen parameters by their named_parameters()
    # name, which names a tied head once, as the embedding: the head's alias stays (a zero-size
    # placeholder under ZeRO-3).
    base = [k for k in module if k.endswith(".weight") and ".lora_" not in k]
    assert len(module) > 1 and base in ([], ["base_model.model.lm_head.weight"]), base


def test_deepspeed_files_name_no_partial_path(runs):
    # Written under step_N.partial/ and then renamed: nothing inside may point at the old name.
    model_optimizer = runs["root"] / "full" / "checkpoints" / "step_00000008" / "model_optimizer"
    assert (model_optimizer / "latest").read_text() == CHECKPOINT_TAG
    files = [p for p in model_optimizer.rglob("*") if p.is_file()]
    assert len(files) >= 4 and not [p for p in files if b".partial" in p.read_bytes()]


def test_deepspeed_checkpoint_manifest_lists_every_file_and_verifies(runs):
    """DeepSpeed writes its own files; the manifest covers them all (each rank's partitions,
    `latest`, its recovery script) with the sizes and sha256 found on disk."""
    import hashlib

    from ftdist.checkpoint import checkpoint_problems
    from ftdist.integrity import MANIFEST

    checkpoint = runs["root"] / "full" / "checkpoints" / "step_00000008"
    files = {p.relative_to(checkpoint).as_posix(): p.read_bytes() for p in checkpoint.rglob("*") if p.is_file()}
    del files[MANIFEST]
    listed = json.loads((checkpoint / MANIFEST).read_text())["files"]
    assert listed == {n: {"size": len(b), "sha256": hashlib.sha256(b).hexdigest()} for n, b in files.items()}
    ranks = {n for n in listed if "zero_pp_rank_" in n and n.endswith("optim_states.pt")}
    assert len(ranks) == 2 and {"rng/rank0.pt", "rng/rank1.pt", "model_optimizer/latest", "trainer.pt"} <= set(listed)
    assert checkpoint_problems(checkpoint) == []


def test_resume_on_another_world_size_is_a_clear_config_error(runs):
    proc = runs["resharded"]
    assert proc.returncode == 2, proc.stderr[-3000:]
    message = proc.stderr.strip().splitlines()[-1]
    assert message.startswith("ftdist: ConfigError:"), message
    assert "world size 2" in message and "world size 1" in message and "ftdist.export" in message
    assert "Traceback" not in proc.stderr


def test_layout_check_names_the_stage_and_strategy():
    saved = {"strategy": "deepspeed", "world_size": 2, "zero_stage": 3}
    check_same_layout(saved, 2, 3, "ckpt")
    with pytest.raises(ConfigError, match="ZeRO-3 on world size 2, this run is ZeRO-2 on world size 2"):
        check_same_layout(saved, 2, 2, "ckpt")
    with pytest.raises(ConfigError, match="saved by strategy 'fsdp', not DeepSpeed"):
        check_same_layout({**saved, "strategy": "fsdp"}, 2, 3, "ckpt")
