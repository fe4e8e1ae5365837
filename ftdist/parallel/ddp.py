"""DistributedDataParallel: every rank holds the whole model, gradients are all-reduced."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from ftdist.config import StrategyConfig
from ftdist.parallel.base import Strategy, init_process_group, pick_device


class DDPStrategy(Strategy):
    def __init__(self, cfg: StrategyConfig):
        self.cfg = cfg
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.device = pick_device(self.local_rank)
        init_process_group(cfg, self.device)
        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()
        self.backend = dist.get_backend()

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids)

    def unwrap(self, model: torch.nn.Module) -> torch.nn.Module:
        return model.module if isinstance(model, DistributedDataParallel) else model

    def no_sync(self, model: torch.nn.Module):
        return model.no_sync()

    @property
    def grad_reduction_factor(self) -> float:
        return float(self.world_size)  # DDP averages gradients over ranks

    def all_reduce_sum(self, values: list[float]) -> list[float]:
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.tolist()

    def broadcast_object(self, obj):
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        dist.barrier()

    def shutdown(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()
