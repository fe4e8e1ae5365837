"""Stop anywhere, resume, and get the losses of an uninterrupted run.

Every interrupted run here is stopped the way a cluster stops it: one rank receives SIGTERM
(injected at a given step through FTDIST_INJECT_FAULT), all ranks checkpoint at that step and
exit, and the same command run again resumes (resume=auto is the default). On CPU in fp32 the
resumed steps are bitwise equal to the uninterrupted ones for the same world size.
"""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest
import torch
from helpers import FAST, REPO, assert_same_final_weights, concurrently, read_metrics, run_env, shared_run, train_cmd

from ftdist.constants import EXIT_PREEMPTED
from ftdist.resilience import PREEMPTED_MARKER

BASE = [*FAST, "train.max_steps=8", "train.micro_batch_size=2", "checkpoint.every_steps=4", "train.eval_every_steps=null"]


def run(overrides, nproc=None, fault=None, check=True, launcher_args=()):
    env = run_env()
    if fault:
        env["FTDIST_INJECT_FAULT"] = fault
    cmd = train_cmd(nproc, overrides)
    if launcher_args:
        cmd = [*cmd[:4], *launcher_args, *cmd[4:]]
    proc = subprocess.run(cmd, check=False, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"run failed ({proc.returncode}):\n{proc.stderr[-6000:]}")
    return proc


def losses(run_dir) -> dict[int, float]:
    train, _ = read_metrics(run_dir)
    steps = [r["step"] for r in train]
    assert steps == sorted(set(steps)), f"a step logged twice: {steps}"
    return {r["step"]: r["loss"] for r in train}


def interrupted(root, name, overrides, nproc, stop_rank=0):
    """Preempt at step 4 (one rank signalled), then rerun the same command to the end."""
    out = [*overrides, f"output_dir={root}/{name}"]
    first = run(out, nproc, fault=f"sigterm:4:{stop_rank}", check=False)
    assert first.returncode != 0, "a preempted run must not exit 0"
    assert first.returncode == EXIT_PREEMPTED or "exitcode  : 75" in first.stderr
    marker = json.loads((root / name / PREEMPTED_MARKER).read_text())
    assert marker["step"] == 4
    assert [p.name for p in (root / name / "checkpoints").iterdir()] == ["step_00000004"]
    assert max(losses(root / name)) == 4  # every rank stopped at step 4
    run(out, nproc)
    assert not (root / name / PREEMPTED_MARKER).exists()
    return root / name


CASES = {
    # name: (overrides, nproc, signalled rank)
    "single": ([], None, 0),
    "ddp": (["strategy=ddp", "train.micro_batch_size=1"], 2, 1),
    "fsdp": (["strategy=fsdp", "train.micro_batch_size=1"], 2, 1),
    "fsdp_qlora": (["strategy=fsdp", "train.micro_batch_size=1", "peft=qlora"], 2, 0),
}


# The one-process FSDP run that test_fsdp_checkpoint_reshards_across_world_sizes[1-2] resumes on 2
# ranks: micro-batch 1 x 2 accumulated, the 2-rank runs' global batch.
FSDP_ONE_RANK = [*BASE, "strategy=fsdp", "train.micro_batch_size=1", "train.grad_accum_steps=2"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Every run of the fixtures `resumed` and `controls`, in two lanes at once
    (helpers.concurrently): the 2-rank runs one after another, and beside them the one-process
    runs one after another (a 2-rank run leaves part of the second core idle)."""
    root = tmp_path_factory.mktemp("resume")
    runs = {}

    def two_ranks():
        for name, (overrides, nproc, rank) in CASES.items():
            if nproc is not None:
                # The uninterrupted 8-step FSDP run is test_checkpoint_fallback.py's too (shared_run).
                straight = shared_run(tmp_path_factory, [*BASE, *overrides], nproc)
                runs[name] = (straight, interrupted(root, name, [*BASE, *overrides], nproc, rank))

    def one_process():
        assert CASES["single"] == ([], None, 0)
        run([*BASE, f"output_dir={root}/single_straight"])
        runs["single"] = (root / "single_straight", interrupted(root, "single", BASE, None, 0))
        run([*FSDP_ONE_RANK, f"output_dir={root}/fsdp_one_rank"])
        runs["fsdp_one_rank"] = (root / "fsdp_one_rank", None)
        runs["controls"] = control_runs(tmp_path_factory.mktemp("resume_controls"))

    concurrently(two_ranks, one_process)
    return root, runs


@pytest.fixture(scope="module")
def resumed(trained):
    root, runs = trained
    return root, {name: runs[name] for name in [*CASES, "fsdp_one_rank"]}


@pytest.mark.parametrize("name", list(CASES))
def test_resumed_losses_are_bitwise_those_of_an_uninterrupted_run(resumed, name):
    straight, resumed_dir = resumed[1][name]
    a, b = losses(straight), losses(resumed_dir)
    assert sorted(a) == sorted(b) == list(range(1, 9))
    assert [b[s] for s in range(5, 9)] == [a[s] for s in range(5, 9)]  # exact, not approx
    assert json.loads((resumed_dir / "summary.json").read_text())["total_tokens"] == sum(
        r["tokens"] for r in read_metrics(straight)[0]
    )


def test_only_complete_checkpoints_are_kept_and_found(resumed):
    _, runs = resumed
    straight = runs["single"][0]
    names = sorted(p.name for p in (straight / "checkpoints").iterdir())
    assert names == ["step_00000004", "step_00000008"]
    # A checkpoint cut short while saving is invisible to resume=auto.
    partial = straight / "checkpoints" / "step_00000012.partial"
    partial.mkdir()
    from ftdist.checkpoint import resolve_resume

    assert resolve_resume("auto", straight).name == "step_00000008"
    from ftdist.config import ConfigError

    with pytest.raises(ConfigError, match="not a complete ftdist checkpoint"):
        resolve_resume(str(partial), straight)
    with pytest.raises(ConfigError, match="no such checkpoint"):
        resolve_resume(str(straight / "nope"), straight)


def _copy_first_half(src, dst):
    """A run directory as the interrupted run left it: steps 1-4 and the step-4 checkpoint."""
    dst.mkdir(parents=True)
    shutil.copytree(src / "checkpoints" / "step_00000004", dst / "checkpoints" / "step_00000004")
    lines = (src / "metrics.jsonl").read_text().splitlines()
    (dst / "metrics.jsonl").write_text("".join(l + "\n" for l in lines if json.loads(l)["step"] <= 4))


@pytest.mark.parametrize("saved_on,resumed_on", [(2, 1), (1, 2)])
def test_fsdp_checkpoint_reshards_across_world_sizes(resumed, tmp_path, saved_on, resumed_on):
    _, runs = resumed
    micro = {1: ["train.micro_batch_size=1", "train.grad_accum_steps=2"], 2: ["train.micro_batch_size=1"]}
    source = runs["fsdp" if saved_on == 2 else "fsdp_one_rank"][0]
    target = tmp_path / "resharded"
    _copy_first_half(source, target)
    run([*BASE, "strategy=fsdp", *micro[resumed_on], f"output_dir={target}"], None if resumed_on == 1 else 2)
    a, b = losses(source), losses(target)
    for step in range(5, 9):  # other reduction order: equal to float rounding, not bitwise
        assert b[step] == pytest.approx(a[step], rel=1e-5), step
    assert_same_final_weights(source, target)


def test_resume_refuses_a_different_global_batch(resumed, tmp_path):
    _, runs = resumed
    target = tmp_path / "other_batch"
    _copy_first_half(runs["single"][0], target)
    proc = run([*BASE, "train.micro_batch_size=3", f"output_dir={target}"], check=False)
    assert proc.returncode == 2
    assert "global_batch_size=2" in proc.stderr and "this run has 3" in proc.stderr


def _checkpoint_model(path):
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    dcp_to_torch_save(path / "model_optimizer", path / "flat.pt")
    return torch.load(path / "flat.pt", weights_only=False)["model"]


def test_nan_on_one_rank_is_skipped_by_all_ranks_leaving_parameters_unchanged(tmp_path):
    out = tmp_path / "nan_skip"
    run(
        [*BASE, "strategy=ddp", "train.micro_batch_size=1", "train.max_steps=5", "checkpoint.every_steps=1",
         "checkpoint.keep=10", "train.on_nonfinite=skip", f"output_dir={out}"],
        2,
        fault="nan:3:1",
    )
    train, _ = read_metrics(out)
    assert [r["skipped_steps"] for r in train] == [0, 0, 1, 1, 1]
    assert str(train[2]["loss"]) == "nan"
    before = _checkpoint_model(out / "checkpoints" / "step_00000002")
    after = _checkpoint_model(out / "checkpoints" / "step_00000003")
    later = _checkpoint_model(out / "checkpoints" / "step_00000004")
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not all(torch.equal(after[k], later[k]) for k in after)
    assert all(torch.isfinite(v).all() for v in later.values())


def test_nan_on_one_rank_stops_every_rank_with_raise(tmp_path):
    out = tmp_path / "nan_raise"
    proc = run([*BASE, "strategy=ddp", "train.micro_batch_size=1", f"output_dir={out}"], 2, fault="nan:3:1", check=False)
    assert proc.returncode != 0
    assert proc.stderr.count("NonFiniteError") >= 2  # both ranks, not only the poisoned one
    train, _ = read_metrics(out)
    assert [r["step"] for r in train] == [1, 2]


def test_elastic_restart_resumes_from_the_last_checkpoint(resumed, tmp_path):
    _, runs = resumed
    out = tmp_path / "elastic"
    overrides = [*BASE, "strategy=ddp", "train.micro_batch_size=1", f"output_dir={out}"]
    proc = run(overrides, 2, fault="crash:6:1", launcher_args=["--max-restarts=1"])
    assert "injected crash at step 6" in proc.stderr
    a, b = losses(runs["ddp"][0]), losses(out)
    assert b == a


@pytest.mark.parametrize("name", ["single", "fsdp"])
def test_four_steps_then_resume_auto_to_eight_matches_eight_straight(resumed, tmp_path, name):
    """The issue's acceptance, as a user runs it: stop after 4 steps, rerun to 8."""
    overrides, nproc, _ = CASES[name]
    _, runs = resumed
    out = [*BASE, *overrides, f"output_dir={tmp_path / name}"]
    run([*out, "train.stop_after_steps=4"], nproc)
    assert not (tmp_path / name / "final").exists()
    run(out, nproc)
    a, b = losses(runs[name][0]), losses(tmp_path / name)
    assert [b[s] for s in range(5, 9)] == [a[s] for s in range(5, 9)]


# --- negative controls: the equality above fails when resume loses a part of the state --------

# LoRA with adapter dropout: the only randomness in this loop (the sampler derives each batch
# from seed and step, and the tiny Llama has no dropout of its own), so the RNG state matters.
# 8 steps of micro-batch 2, a checkpoint at step 4, one process.
CONTROL = [*BASE, "peft=lora", "peft.dropout=0.1"]


def _drop_rng_state(checkpoint):
    (checkpoint / "rng" / "rank0.pt").unlink()


def _reset_optimizer_state(checkpoint):
    """Replace the saved AdamW state with that of a fresh optimizer (step 0, zero moments)."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save, torch_save_to_dcp

    saved, flat = checkpoint / "model_optimizer", checkpoint / "flat.pt"
    dcp_to_torch_save(saved, flat)
    state = torch.load(flat, weights_only=False)
    moments = [t for s in state["optimizer"]["state"].values() for t in s.values()]
    assert moments and all(t.abs().sum() > 0 for t in moments)  # there was state to lose
    for t in moments:
        t.zero_()
    torch.save(state, flat)
    shutil.rmtree(saved)
    torch_save_to_dcp(flat, saved)
    flat.unlink()


def _rewrite_manifest(checkpoint):
    """A checkpoint that was written without the removed state, rather than one damaged since:
    its manifest lists what is there, so resume takes it (and does not set it aside)."""
    from ftdist.integrity import hash_share, list_files, write_manifest

    write_manifest(checkpoint, hash_share(checkpoint, list(list_files(checkpoint)), sync=False), step=4)


CONTROLS = {"intact": lambda checkpoint: None, "no_rng": _drop_rng_state, "fresh_optimizer": _reset_optimizer_state}


def control_runs(root):
    """An uninterrupted LoRA run, and resumes from its step-4 checkpoint with parts removed."""
    straight = root / "straight"
    run([*CONTROL, f"output_dir={straight}"])
    resumed = {}
    for name, damage in CONTROLS.items():
        _copy_first_half(straight, root / name)
        damage(root / name / "checkpoints" / "step_00000004")
        _rewrite_manifest(root / name / "checkpoints" / "step_00000004")
        proc = run([*CONTROL, f"output_dir={root / name}"])
        assert "resumed from" in proc.stderr
        resumed[name] = (losses(root / name), proc.stderr)
    return losses(straight), resumed


@pytest.fixture(scope="module")
def controls(trained):
    """control_runs, trained by the fixture `trained`."""
    return trained[1]["controls"]


def _resumed_steps(run_losses):
    assert sorted(run_losses) == list(range(1, 9))
    return [run_losses[s] for s in range(5, 9)]


def test_resume_control_intact_checkpoint_is_exact(controls):
    """The positive control for the two below: with dropout, the same checkpoint resumes exactly."""
    straight, resumed = controls
    assert _resumed_steps(resumed["intact"][0]) == _resumed_steps(straight)


def test_resume_control_without_rng_state_changes_losses(controls):
    straight, resumed = controls
    got, stderr = resumed["no_rng"]
    assert "no RNG state" in stderr
    # Other dropout masks from the first resumed step on; same model, so close but not equal.
    assert all(a != b for a, b in zip(_resumed_steps(straight), _resumed_steps(got), strict=True))


def test_resume_control_with_a_fresh_optimizer_changes_losses(controls):
    straight, resumed = controls
    expected, got = _resumed_steps(straight), _resumed_steps(resumed["fresh_optimizer"][0])
    # Step 5's loss comes from the restored weights before any update: still exact. Every
    # update after it is a first Adam step (about lr x sign(grad)), not the continued one.
    assert got[0] == expected[0]
    assert all(a != b for a, b in zip(expected[1:], got[1:], strict=True))
