"""The process group every multi-process strategy runs on: device choice, init (torchrun's
env://, torchelastic's agent store on restarts, or a one-process group), and the preflight
check that every rank joined before the first collective."""

from __future__ import annotations

import datetime
import os
import socket
import time

import torch
import torch.distributed as dist

from ftdist.config import ConfigError, StrategyConfig
from ftdist.resilience import injected_fault


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


class PreflightError(RuntimeError):
    """Some ranks did not join: the message names them and what to check."""


def preflight(store, rank: int, world_size: int, timeout_s: float, device: torch.device) -> None:
    """Every rank checks in through the store, then one all-reduce proves the collectives work.

    A missing rank would otherwise leave the others blocked in their first collective until the
    process-group timeout (minutes), with no word of which rank is gone.
    """
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")

    def key(r: int) -> str:
        return f"ftdist/preflight/{attempt}/{r}"

    store.set(key(rank), "1")
    deadline = time.monotonic() + timeout_s
    while True:
        missing = [r for r in range(world_size) if not store.check([key(r)])]
        if not missing:
            break
        if time.monotonic() > deadline:
            raise PreflightError(
                f"preflight: rank(s) {missing} of {world_size} did not check in within {timeout_s:g} s "
                f"(this is rank {rank}). Check that every node launched (same --nnodes, --rdzv_endpoint, "
                "--rdzv_id), that their logs show no earlier error, and that the nodes reach each other "
                "(firewall, GLOO_SOCKET_IFNAME / NCCL_SOCKET_IFNAME); strategy.preflight_timeout_s sets the wait"
            )
        time.sleep(0.05)
    ones = torch.ones(1, device=device)
    dist.all_reduce(ones)
    if int(ones.item()) != world_size:
        raise PreflightError(f"preflight: all-reduce over {world_size} ranks gave {ones.item()}")


def init_process_group(cfg: StrategyConfig, device: torch.device) -> None:
    backend = cfg.backend
    if backend == "auto":
        backend = "nccl" if device.type == "cuda" else "gloo"
    if backend == "nccl" and device.type != "cuda":
        raise ConfigError("strategy.backend=nccl needs CUDA devices; use strategy.backend=gloo on CPU")
    timeout = datetime.timedelta(seconds=cfg.timeout_s)
    if backend == "gloo" and os.environ.get("LOCAL_WORLD_SIZE") == os.environ.get("WORLD_SIZE"):
        # Every rank on this node: talk over loopback. Measured here: with gloo's default
        # interface, the workers torchrun restarts after a failure (--max-restarts) hang in
        # init_process_group; on loopback they rendezvous at once.
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    device_id = device if device.type == "cuda" else None
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        # torchrun's agent hosts the store and outlives restarted workers. Keys of a restart are
        # kept apart from the failed attempt's, which a new rank could otherwise read (measured:
        # restarted gloo ranks dialled the dead attempt's ports and failed).
        store = dist.TCPStore(
            os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False, timeout=timeout
        )
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        store = dist.PrefixStore(f"ftdist/attempt_{attempt}", store)
        dist.init_process_group(
            backend=backend,
            store=store,
            rank=int(os.environ["RANK"]),
            world_size=int(os.environ["WORLD_SIZE"]),
            timeout=timeout,
            device_id=device_id,
        )
    elif "WORLD_SIZE" in os.environ:  # launched with env:// variables by something else
        dist.init_process_group(backend=backend, timeout=timeout, device_id=device_id)
        store = dist.distributed_c10d._get_default_store()
    else:  # a plain `python -m` run: a one-process group so the same code path runs
        dist.init_process_group(
            backend=backend, init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1, timeout=timeout
        )
        return
    if injected_fault(0, dist.get_rank()) == "stall":
        time.sleep(cfg.preflight_timeout_s + 30)  # a rank that never checks in (tests)
    preflight(store, dist.get_rank(), dist.get_world_size(), cfg.preflight_timeout_s, device)
