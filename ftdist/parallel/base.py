"""What every parallel strategy provides, and the process-group plumbing they share.

Model code knows nothing of parallelism: a strategy takes a built model and wraps it. The
trainer sees only this interface: wrap, no_sync (gradient accumulation), all-reduce of a
few scalars, and unwrap for evaluation and saving.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import socket

import torch
import torch.distributed as dist

from ftdist.config import ConfigError, StrategyConfig


def launched_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def pick_device(local_rank: int) -> torch.device:
    if torch.cuda.is_available():
        if local_rank >= torch.cuda.device_count():
            raise ConfigError(
                f"LOCAL_RANK={local_rank} but only {torch.cuda.device_count()} CUDA device(s) are visible: "
                "use --nproc_per_node <= the GPU count, or CUDA_VISIBLE_DEVICES= to train on CPU"
            )
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_process_group(cfg: StrategyConfig, device: torch.device) -> None:
    backend = cfg.backend
    if backend == "auto":
        backend = "nccl" if device.type == "cuda" else "gloo"
    if backend == "nccl" and device.type != "cuda":
        raise ConfigError("strategy.backend=nccl needs CUDA devices; use strategy.backend=gloo on CPU")
    timeout = datetime.timedelta(seconds=cfg.timeout_s)
    if "WORLD_SIZE" in os.environ:  # under torchrun: env:// rendezvous
        dist.init_process_group(backend=backend, timeout=timeout, device_id=device if device.type == "cuda" else None)
    else:  # a plain `python -m` run: a one-process group so the same code path runs
        dist.init_process_group(
            backend=backend, init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1, timeout=timeout
        )


class Strategy:
    """Single process: no communication. Subclasses add the collective parts."""

    backend = "none"

    def __init__(self, cfg: StrategyConfig):
        self.cfg = cfg
        self.rank = 0
        self.world_size = 1
        self.local_rank = 0
        self.device = pick_device(0)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        return model

    def unwrap(self, model: torch.nn.Module) -> torch.nn.Module:
        return model

    def no_sync(self, model: torch.nn.Module):
        return contextlib.nullcontext()

    @property
    def grad_reduction_factor(self) -> float:
        """Multiply the loss by this so the reduced gradient is a sum over ranks, not a mean."""
        return 1.0

    def all_reduce_sum(self, values: list[float]) -> list[float]:
        return list(values)

    def broadcast_object(self, obj):
        return obj

    def barrier(self) -> None:
        pass

    def shutdown(self) -> None:
        pass
