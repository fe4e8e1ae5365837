"""The learning-rate schedule, the run length from train.epochs, and gradient clipping.

README: "AdamW, warmup + cosine/linear/constant schedule, clipping, batch sizes, steps or
epochs"; "`grad_norm` is before clipping". Every expected value here is computed by hand (the
formulas written out below, or plain tensor arithmetic), not by ftdist.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from helpers import random_examples

from ftdist.config import DataConfig, FtdistConfig, ModelConfig, TinyModelSpec, TrainConfig
from ftdist.optim import lr_multiplier
from ftdist.parallel.base import Strategy
from ftdist.trainer import Trainer


def config(tmp_path=".", **train) -> FtdistConfig:
    return FtdistConfig(
        model=ModelConfig(tiny=TinyModelSpec()),
        data=DataConfig(path="unused", max_seq_len=64),
        train=TrainConfig(**train),
        output_dir=str(tmp_path),
    )


# (schedule, warmup, total, min_lr_ratio) -> {step index: multiplier}, worked out by hand:
# warmup ramps (s + 1) / warmup; then progress p = (s - warmup) / (total - warmup), capped at 1;
# cosine: m + (1 - m) * (1 + cos(pi p)) / 2; linear: m + (1 - m) * (1 - p); constant: 1.
HAND = {
    ("cosine", 4, 14, 0.1): {
        0: 0.25, 1: 0.5, 2: 0.75, 3: 1.0, 4: 1.0,
        6: 0.1 + 0.9 * (1 + math.cos(0.2 * math.pi)) / 2,  # 0.914057...
        9: 0.55, 13: 0.1 + 0.9 * (1 + math.cos(0.9 * math.pi)) / 2, 14: 0.1, 30: 0.1,
    },
    ("linear", 4, 14, 0.1): {0: 0.25, 3: 1.0, 4: 1.0, 6: 0.82, 9: 0.55, 14: 0.1, 30: 0.1},
    ("linear", 0, 10, 0.0): {0: 1.0, 1: 0.9, 5: 0.5, 10: 0.0},
    ("cosine", 0, 10, 0.0): {0: 1.0, 5: 0.5, 10: 0.0},
    ("constant", 3, 10, 0.1): {0: 1 / 3, 1: 2 / 3, 2: 1.0, 3: 1.0, 9: 1.0, 20: 1.0},
}


@pytest.mark.parametrize("key", list(HAND), ids=lambda k: f"{k[0]}-w{k[1]}-T{k[2]}-m{k[3]}")
def test_lr_multiplier_matches_the_hand_computed_schedule(key):
    schedule, warmup, total, min_ratio = key
    cfg = config(schedule=schedule, warmup_steps=warmup, min_lr_ratio=min_ratio, max_steps=total)
    for step, expected in HAND[key].items():
        assert lr_multiplier(step, cfg, total) == pytest.approx(expected, abs=1e-12), step


@pytest.fixture(scope="module")
def tiny_model(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)


def trainer_for(tiny_model, tokenizer, tmp_path, examples, **train) -> Trainer:
    cfg = config(tmp_path, **train)
    return Trainer(cfg, Strategy(cfg.strategy), copy.deepcopy(tiny_model), tokenizer, examples, [], tmp_path)


@pytest.mark.parametrize(
    "n,micro,accum,epochs,steps",
    [
        (10, 4, 1, 1.0, 3),  # 10 / 4 = 2.5 -> 3: the last step runs into the next epoch
        (10, 2, 2, 0.5, 2),  # 5 / 4 = 1.25 -> 2
        (12, 4, 1, 2.0, 6),  # whole epochs: exactly 6
        (12, 3, 1, 0.1, 1),  # a fraction of one step still trains one step
    ],
)
def test_epochs_give_ceil_of_epochs_times_items_over_global_batch(
    tiny_model, tiny_tokenizer, tmp_path, n, micro, accum, epochs, steps
):
    trainer = trainer_for(
        tiny_model, tiny_tokenizer, tmp_path, random_examples(n), micro_batch_size=micro, grad_accum_steps=accum,
        max_steps=None, epochs=epochs,
    )
    assert trainer.total_steps == steps
    # The schedule is laid over that length: the last step's multiplier is the floor.
    assert lr_multiplier(steps, trainer.cfg, trainer.total_steps) == pytest.approx(trainer.cfg.train.min_lr_ratio)


def test_max_steps_overrides_epochs(tiny_model, tiny_tokenizer, tmp_path):
    trainer = trainer_for(tiny_model, tiny_tokenizer, tmp_path, random_examples(10), max_steps=7, epochs=3.0)
    assert trainer.total_steps == 7


def test_trainer_scheduler_lr_sequence_is_lr_times_the_multiplier(tiny_model, tiny_tokenizer, tmp_path):
    """The scheduler the strategy builds gives step s the lr train.lr x multiplier(s)."""
    train = {"lr": 1e-3, "warmup_steps": 2, "schedule": "linear", "min_lr_ratio": 0.2, "max_steps": 6}
    trainer = trainer_for(tiny_model, tiny_tokenizer, tmp_path, random_examples(8), **train)
    seen = []
    for _ in range(8):
        seen.append(trainer.scheduler.get_last_lr()[0])
        trainer.optimizer.step()
        trainer.scheduler.step()
    # warmup 1/2, 2/2; then p = (s - 2) / 4: 0.2 + 0.8 * (1 - p), flat at 0.2 from step 6 on.
    expected = [1e-3 * m for m in (0.5, 1.0, 1.0, 0.8, 0.6, 0.4, 0.2, 0.2)]
    assert len(seen) == len(expected)
    for got, want in zip(seen, expected, strict=True):
        assert got == pytest.approx(want, rel=1e-12)


# --- clipping ------------------------------------------------------------------------------------


def linear_with_grads(seed: int = 0) -> tuple[torch.nn.Linear, dict[str, torch.Tensor]]:
    torch.manual_seed(seed)
    layer = torch.nn.Linear(5, 3)
    x, y = torch.randn(7, 5), torch.randn(7, 3)
    torch.nn.functional.mse_loss(layer(x), y, reduction="sum").backward()
    return layer, {n: p.grad.clone() for n, p in layer.named_parameters()}


def hand_norm(grads: dict[str, torch.Tensor]) -> float:
    return math.sqrt(sum(float((g.double() ** 2).sum()) for g in grads.values()))


@pytest.mark.parametrize("max_norm", [0.5, 1e6, None])
def test_strategy_optimizer_step_reports_the_norm_before_clipping_and_steps_on_clipped_gradients(max_norm):
    layer, grads = linear_with_grads()
    before = {n: p.detach().clone() for n, p in layer.named_parameters()}
    norm = hand_norm(grads)
    assert norm > 0.5  # so max_norm=0.5 clips
    lr = 0.1
    # Plain SGD: the update is -lr x the gradient it was given, so it shows the clipping exactly.
    optimizer = torch.optim.SGD(layer.parameters(), lr=lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    reported = Strategy(config().strategy).optimizer_step(layer, optimizer, scheduler, max_norm)

    assert reported == pytest.approx(norm, rel=1e-6)  # before clipping, whatever max_norm is
    # clip_grad_norm_ scales by max_norm / (norm + 1e-6) when that is below 1.
    scale = 1.0 if max_norm is None else min(1.0, max_norm / (norm + 1e-6))
    for name, p in layer.named_parameters():
        torch.testing.assert_close(p.detach(), before[name] - lr * scale * grads[name], rtol=1e-6, atol=1e-7)
        assert p.grad is None  # zeroed for the next step
    if max_norm == 0.5:
        applied = {n: (before[n] - p.detach()) / lr for n, p in layer.named_parameters()}
        assert hand_norm(applied) == pytest.approx(0.5, rel=1e-4)


@pytest.mark.filterwarnings(r"ignore:Detected call of `lr_scheduler.step\(\)` before `optimizer.step\(\)`")
def test_non_finite_norm_leaves_parameters_unchanged_and_still_advances_the_schedule():
    layer, _ = linear_with_grads()
    layer.weight.grad[0, 0] = float("nan")
    before = {n: p.detach().clone() for n, p in layer.named_parameters()}
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0 / (s + 1))
    reported = Strategy(config().strategy).optimizer_step(layer, optimizer, scheduler, 1.0)
    assert math.isnan(reported)
    assert all(torch.equal(p.detach(), before[n]) for n, p in layer.named_parameters())
    assert scheduler.get_last_lr()[0] == pytest.approx(0.05)  # step 1 of the schedule
