"""DistributedDataParallel: every rank holds the whole model, gradients are all-reduced."""

from __future__ import annotations

import torch
from torch.nn.parallel import DistributedDataParallel

from ftdist.config import FtdistConfig
from ftdist.model_memory import ModelState
from ftdist.parallel.base import DistributedStrategy, Layout, replicated


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

    # --- what it costs ------------------------------------------------------------------------

    @classmethod
    def layout(cls, cfg: FtdistConfig, world: int) -> Layout:
        return replicated(f"DDP: each of {world} ranks")

    @classmethod
    def communication_bytes(cls, cfg: FtdistConfig, m: ModelState, world: int) -> tuple[float, str]:
        if world == 1:
            return super().communication_bytes(cfg, m, world)
        # wrap() leaves gradient_as_bucket_view off: DDP's buckets are a second copy of every gradient.
        return m.trainable_bytes, "DDP gradient buckets: a flat copy of all gradients"

    @classmethod
    def memory_changes(cls, cfg: FtdistConfig) -> list[tuple[str, dict[str, object]]]:
        # The same GPUs sharding what each now replicates: cheaper than moving state to the host.
        return [("shard with FSDP2", {"strategy.name": "fsdp"}), *super().memory_changes(cfg)]
