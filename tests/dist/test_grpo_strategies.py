"""GRPO on the strategies: 2 gloo ranks against one process, and exact resume.

- With completions fixed (tests/dist/grpo_support.py: a function of the prompt, not of the
  model), 2 fsdp ranks x micro 2 must give the losses and metrics of 1 process x micro 2 x
  accumulation 2 step by step: the loss of a step is defined over the whole global batch (dapo
  divides by the global batch's completion tokens), with a KL penalty to a frozen sharded copy.
- With sampled completions, 4 steps then a resume to 8 must give the losses of 8 steps straight
  (the rollouts of a resumed run are regenerated from (seed, step, prompt index) and the same
  weights), on one process and on 2 fsdp ranks with LoRA and the adapter-disabled reference;
  and with iterations=2, a resume in the middle of a generation batch reuses its saved rollouts.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
from helpers import REPO, concurrently, read_metrics, run_env, run_train

STEPS = 8
BASE = [
    "+experiment=tiny_cpu", "objective=grpo", "objective.rewards=[exact_match,grpo_support.vowel_share]",
    "objective.group_size=4", "objective.max_new_tokens=24", "data.num_synthetic_rows=160", "train.lr=1e-3",
    "train.warmup_steps=0", "train.eval_every_steps=null", "eval.generation.samples=0", "train.progress_bar=false",
    "train.save_final=false", "train.eval_batch_size=8", "train.micro_batch_size=2",
]
ONE, TWO = ["train.grad_accum_steps=2"], ["train.grad_accum_steps=1", "strategy=fsdp"]
METRICS = ("loss", "grad_norm", "reward", "reward_std", "kl", "clip_ratio", "entropy", "completion_length",
           "completions_clipped_ratio", "frac_reward_zero_std", "rewards/vowel_share/mean")


def run_fixed(overrides: list[str], nproc: int | None) -> None:
    script = str(REPO / "tests" / "dist" / "grpo_support.py")
    launch = [sys.executable] if nproc is None else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    proc = subprocess.run([*launch, script, *overrides], cwd=REPO, env=run_env(), capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-6000:]


def run_resumed(overrides: list[str], stop_at: int, nproc: int | None) -> None:
    run_train([*overrides, f"train.stop_after_steps={stop_at}"], nproc=nproc)
    run_train(overrides, nproc=nproc)


def assert_same_steps(got: list[dict], want: list[dict], steps: int, rel: float) -> None:
    assert [r["step"] for r in got] == [r["step"] for r in want] == list(range(1, steps + 1))
    for g, w in zip(got, want, strict=True):
        for key in METRICS:
            assert g[key] == pytest.approx(w[key], rel=rel, abs=1e-7), (g["step"], key)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:  # the reward function's module, for every run
        mp.setenv("PYTHONPATH", str(REPO / "tests" / "dist"))
        return train_all(tmp_path_factory.mktemp("grpo"))


def train_all(root):
    fixed = [*BASE, "train.max_steps=3", "objective.beta=0.04"]
    lora = [*BASE, *TWO, "peft=lora", "objective.beta=0.04", f"train.max_steps={STEPS}"]
    single = [*BASE, *ONE, f"train.max_steps={STEPS}"]
    iterations = [*single, "objective.iterations=2", "objective.loss_type=grpo"]
    concurrently(lambda: run_fixed([*fixed, *TWO, f"output_dir={root}/fsdp_fixed"], 2),
                 lambda: (run_fixed([*fixed, *ONE, f"output_dir={root}/single_fixed"], None),
                          run_train([*single, f"output_dir={root}/single"]),
                          run_resumed([*single, f"output_dir={root}/single_resumed"], 4, None)))
    concurrently(lambda: run_train([*lora, f"output_dir={root}/fsdp_lora"], nproc=2),
                 lambda: (run_train([*iterations, f"output_dir={root}/iterations"]),
                          run_resumed([*iterations, f"output_dir={root}/iterations_resumed"], 3, None)))
    run_resumed([*lora, f"output_dir={root}/fsdp_lora_resumed"], 4, 2)
    return {p.name: read_metrics(p)[0] for p in root.iterdir()}


def test_two_fsdp_ranks_equal_one_process_with_accumulation_on_fixed_completions(runs):
    assert_same_steps(runs["fsdp_fixed"], runs["single_fixed"], 3, rel=1e-5)
    first = runs["single_fixed"][0]
    assert first["rewards/exact_match/mean"] == 0.25  # one whole reference in each group of 4
    assert first["kl"] == 0.0 and runs["single_fixed"][1]["kl"] > 0  # the reference is the starting policy
    assert all(r["grad_norm"] > 0 for r in runs["single_fixed"])


def test_a_resumed_run_gives_the_losses_of_an_uninterrupted_one(runs):
    assert_same_steps(runs["single_resumed"], runs["single"], STEPS, rel=1e-6)
    assert len({round(r["loss"], 9) for r in runs["single"]}) > 1  # it trained: the losses move


def test_a_resume_inside_a_generation_batch_reuses_its_rollouts(runs):
    assert_same_steps(runs["iterations_resumed"], runs["iterations"], STEPS, rel=1e-6)
    steps = runs["iterations"]
    assert all(steps[i]["reward"] == steps[i + 1]["reward"] for i in range(0, STEPS, 2))  # one batch, two updates
    assert any(r["clip_ratio"] > 0 or r["loss"] != 0 for r in steps[1::2])


def test_fsdp_lora_grpo_trains_and_resumes_exactly(runs):
    assert_same_steps(runs["fsdp_lora_resumed"], runs["fsdp_lora"], STEPS, rel=1e-5)
    steps = runs["fsdp_lora"]
    assert steps[0]["kl"] == 0.0 and steps[-1]["kl"] > 0  # the adapters moved the policy off its base
    assert all(r["grad_norm"] > 0 for r in steps)
