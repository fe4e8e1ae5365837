"""DeepSpeed ZeRO 1/2/3 with 2 gloo processes gives the numbers of 1 process with the same global batch.

Every run here has the global batch of 4 of the single-process reference (micro 2 x accum 2):
zero1 as 2 ranks x micro 2, zero2 and zero3 as 2 ranks x micro 1 x accum 2, so DeepSpeed's own
accumulation (boundaries, no division by gradient_accumulation_steps) is exercised too.
Weight decay is large (1.0) so a parameter put in the wrong decay group (a ZeRO-3 partition
looks one-dimensional) moves the loss well beyond the tolerances.

Tolerances: fp32 throughout. ZeRO reduces gradients in buckets in another order than one
process sums micro-batches, and ZeRO-3 runs its own linear autograd function, so results agree
to float rounding amplified by Adam over 5 steps: measured loss rel <= 1e-7, grad norm rel
<= 1e-5, weights <= 5e-6 abs; the asserts leave 10-100x headroom.

Run as a script (under torchrun), this file trains through ftdist's CLI and then writes each
rank's parameter checksums, so the tests can check that ranks hold identical weights.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import REPO, assert_same_final_weights, concurrently, read_metrics, run_env, run_train

from ftdist.config import ConfigError, StrategyConfig, TrainConfig
from ftdist.parallel.deepspeed import deepspeed_config

STEPS = 5
COMMON = [
    "+experiment=tiny_cpu",
    "data.num_synthetic_rows=300",
    "eval.generation.samples=0",
    "train.progress_bar=false",
    "train.warmup_steps=2",
    f"train.max_steps={STEPS}",
    "train.eval_every_steps=3",
    "train.weight_decay=1.0",
]
# name: (strategy, micro_batch_size, grad_accum_steps) on 2 ranks
RUNS = {"zero1": ("zero1", 2, 1), "zero2": ("zero2", 1, 2), "zero3": ("zero3", 1, 2)}


def checksum(t: torch.Tensor) -> str:
    return hashlib.sha256(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()).hexdigest()


def record_checksums(trainer) -> None:
    """rank r writes param_sha256.rank{r}.json: every parameter's name, and a checksum of each
    one it holds whole (all under ZeRO 1/2; under ZeRO-3 only the small persistent ones, since
    each element of a partitioned parameter lives on one rank)."""
    params = dict(trainer.strategy.unwrap(trainer.model).named_parameters())
    whole = {n: checksum(p) for n, p in params.items() if 0 < p.numel() == getattr(p, "ds_numel", p.numel())}
    record = {"names": sorted(params), "whole": whole}
    (trainer.run_dir / f"param_sha256.rank{trainer.strategy.rank}.json").write_text(json.dumps(record, indent=1))


def cli_with_checksums() -> None:
    """`python -m ftdist.train` as users run it, then record_checksums on every rank."""
    import ftdist.train as entry

    train = entry.run

    def run_and_record(dcfg, output_dir=None):
        trainer, summary = train(dcfg, output_dir)
        record_checksums(trainer)
        return trainer, summary

    entry.run = run_and_record
    entry.cli()


def run_deepspeed(name: str, root: Path) -> Path:
    strategy, micro, accum = RUNS[name]
    out = root / name
    geometry = [f"strategy={strategy}", f"train.micro_batch_size={micro}", f"train.grad_accum_steps={accum}"]
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    # Run as a script, this file needs the repository and tests/ (helpers) on its path.
    path = os.pathsep.join(p for p in (str(REPO), str(REPO / "tests"), os.environ.get("PYTHONPATH")) if p)
    proc = subprocess.run(
        [*launcher, __file__, *COMMON, *geometry, f"output_dir={out}"],
        check=False,
        cwd=REPO,
        env={**run_env(), "PYTHONPATH": path},
        capture_output=True,
        text=True,
        timeout=600,
    )
    if proc.returncode != 0:
        raise AssertionError(f"{name} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return out


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    import deepspeed  # noqa: F401 - the dev extra installs it: missing fails, never skips
    root = tmp_path_factory.mktemp("deepspeed")
    # The one-process reference beside the first 2-rank run (helpers.concurrently).
    concurrently(
        lambda: run_train([*COMMON, "train.micro_batch_size=2", "train.grad_accum_steps=2", f"output_dir={root}/single"]),
        lambda: run_deepspeed(FIRST, root),
    )
    return root


FIRST = next(iter(RUNS))  # trained by the fixture `root`


@pytest.fixture(scope="module", params=list(RUNS))
def run(request, root):
    return root / FIRST if request.param == FIRST else run_deepspeed(request.param, root)


def test_losses_and_grad_norms_equal_single_process(root, run):
    single, single_eval = read_metrics(root / "single")
    ds, ds_eval = read_metrics(run)
    assert [r["step"] for r in ds] == list(range(1, STEPS + 1))
    for a, b in zip(single, ds, strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5), (a, b)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4), (a, b)
        assert b["lr"] == pytest.approx(a["lr"], rel=1e-12)  # the schedule steps once per global step
        assert b["tokens"] == a["tokens"] and b["label_tokens"] == a["label_tokens"]
    assert [r["step"] for r in ds_eval] == [r["step"] for r in single_eval] == [0, 3, STEPS]
    for a, b in zip(single_eval, ds_eval, strict=True):
        assert b["eval_loss"] == pytest.approx(a["eval_loss"], rel=1e-5)


def test_throughput_metrics_are_reported(run):
    train, _ = read_metrics(run)
    for record in train:
        # FLOPs per token count a ZeRO-3 parameter by its full shape, not its local partition.
        assert record["tokens_per_s"] > 0 and 0 < record["mfu"] < 1 and record["peak_mem_gb"] > 0, record


def test_saved_weights_match_single_process(root, run):
    assert_same_final_weights(root / "single", run, atol=5e-5)


def test_ranks_hold_identical_parameters(run):
    rank0 = json.loads((run / "param_sha256.rank0.json").read_text())
    rank1 = json.loads((run / "param_sha256.rank1.json").read_text())
    assert rank0["whole"] and rank0 == rank1
    if run.name != "zero3":  # ZeRO 1/2 replicate every parameter
        assert sorted(rank0["whole"]) == rank0["names"]
    # Under ZeRO-3 each element of a partitioned parameter exists on one rank only; the
    # gathered save matching the single-process weights (above) covers those.


# --- the config DeepSpeed gets ----------------------------------------------------------------


def test_config_batch_geometry_and_clipping():
    train = TrainConfig(micro_batch_size=3, grad_accum_steps=4, max_grad_norm=0.5)
    config = deepspeed_config(StrategyConfig(name="deepspeed", zero_stage=2), train, world_size=8, bf16=False)
    assert config["train_micro_batch_size_per_gpu"] == 3
    assert config["gradient_accumulation_steps"] == 4
    assert config["train_batch_size"] == 3 * 4 * 8
    assert config["gradient_clipping"] == 0.5
    assert config["bf16"] == {"enabled": False} and "communication_data_type" not in config
    assert config["zero_optimization"]["stage"] == 2
    unclipped = deepspeed_config(StrategyConfig(name="deepspeed"), TrainConfig(max_grad_norm=None), 1, bf16=True)
    assert unclipped["gradient_clipping"] == 0.0  # DeepSpeed's "no clipping"
    assert unclipped["bf16"] == {"enabled": True} and unclipped["communication_data_type"] == "fp32"


def test_config_offload_and_stage3_sections():
    cfg = StrategyConfig(name="deepspeed", zero_stage=3, offload_optimizer=True, offload_params=True)
    zero = deepspeed_config(cfg, TrainConfig(), 2, bf16=False)["zero_optimization"]
    assert zero["stage"] == 3 and zero["stage3_gather_16bit_weights_on_model_save"] is True
    assert zero["offload_optimizer"]["device"] == "cpu" and zero["offload_param"]["device"] == "cpu"
    plain = deepspeed_config(StrategyConfig(name="deepspeed", zero_stage=1), TrainConfig(), 2, bf16=False)
    assert "offload_optimizer" not in plain["zero_optimization"] and "offload_param" not in plain["zero_optimization"]


def test_config_optimizer_sections():
    train = TrainConfig(lr=1e-4, adam_beta1=0.8, adam_beta2=0.9, adam_eps=1e-6, weight_decay=0.1)
    torch_opt = deepspeed_config(StrategyConfig(name="deepspeed", optimizer="torch"), train, 2, bf16=False)
    assert "optimizer" not in torch_opt
    assert torch_opt["zero_allow_untested_optimizer"] is True and torch_opt["zero_force_ds_cpu_optimizer"] is False
    ds_opt = deepspeed_config(StrategyConfig(name="deepspeed", optimizer="deepspeed"), train, 2, bf16=False)
    assert ds_opt["optimizer"] == {
        "type": "AdamW",
        "params": {"lr": 1e-4, "betas": [0.8, 0.9], "eps": 1e-6, "weight_decay": 0.1},
    }


def test_missing_deepspeed_is_a_config_error(monkeypatch):
    from ftdist.parallel.deepspeed import DeepSpeedStrategy

    monkeypatch.setitem(sys.modules, "deepspeed", None)  # import deepspeed -> ImportError
    with pytest.raises(ConfigError, match="needs DeepSpeed"):
        DeepSpeedStrategy(StrategyConfig(name="deepspeed"))


if __name__ == "__main__":  # under torchrun: see run_deepspeed
    cli_with_checksums()
