"""The optimizer and its schedule: AdamW over two groups, warmup then cosine or linear decay.

Which parameters are weight-decayed is defined once here (`decay_groups`): the trainer builds
the optimizer from it, DeepSpeed's own Adam takes its groups, and the planner counts ZeRO's
per-group partitions from it.
"""

from __future__ import annotations

import math

import torch

from ftdist.config import FtdistConfig
from ftdist.metrics import logical_ndim


def decay_groups(params) -> tuple[list, list]:
    """(weight-decayed, not decayed) trained parameters, in model order: norm gains and biases
    are not decayed (standard for transformers)."""
    trained = [p for p in params if p.requires_grad]
    return [p for p in trained if logical_ndim(p) >= 2], [p for p in trained if logical_ndim(p) < 2]


def build_optimizer(model: torch.nn.Module, cfg: FtdistConfig) -> torch.optim.Optimizer:
    t = cfg.train
    decay, no_decay = decay_groups(model.parameters())
    groups = [{"params": decay, "weight_decay": t.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=t.lr, betas=(t.adam_beta1, t.adam_beta2), eps=t.adam_eps)


def lr_multiplier(step: int, cfg: FtdistConfig, total_steps: int) -> float:
    """Linear warmup from 0, then cosine or linear decay to min_lr_ratio (or constant)."""
    t = cfg.train
    if step < t.warmup_steps:
        return (step + 1) / t.warmup_steps
    if t.schedule == "constant":
        return 1.0
    span = max(1, total_steps - t.warmup_steps)
    progress = min(1.0, (step - t.warmup_steps) / span)
    shape = 0.5 * (1 + math.cos(math.pi * progress)) if t.schedule == "cosine" else 1 - progress
    return t.min_lr_ratio + (1 - t.min_lr_ratio) * shape
