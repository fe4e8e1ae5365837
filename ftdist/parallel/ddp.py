"""DistributedDataParallel: every rank holds the whole model, gradients are all-reduced."""

from __future__ import annotations

import torch
from torch.nn.parallel import DistributedDataParallel

from ftdist.parallel.base import DistributedStrategy


class DDPStrategy(DistributedStrategy):
    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids)

    def unwrap(self, model: torch.nn.Module) -> torch.nn.Module:
        return model.module if isinstance(model, DistributedDataParallel) else model

    def accumulating(self, model: torch.nn.Module):
        return model.no_sync()

    @property
    def grad_reduction_factor(self) -> float:
        return float(self.world_size)  # DDP averages gradients over ranks
