"""Throughput numbers: FLOPs per token, device peak FLOP/s, MFU and peak memory."""

from __future__ import annotations

import resource
import time

import torch

# Dense bf16 peak FLOP/s per device (vendor datasheets, no sparsity).
GPU_PEAK_FLOPS = {
    "H200": 989e12,
    "H100": 989e12,
    "A100": 312e12,
    "L40S": 362e12,
    "A10G": 125e12,
    "L4": 121e12,
    "4090": 165e12,
    "V100": 125e12,
}

_cpu_peak_cache: dict[int, float] = {}


def measure_cpu_peak_flops(size: int = 1024, repeats: int = 8) -> float:
    """fp32 matmul FLOP/s this process reaches with its threads (the CPU's practical peak)."""
    threads = torch.get_num_threads()
    if threads not in _cpu_peak_cache:
        a = torch.randn(size, size)
        b = torch.randn(size, size)
        a @ b  # warm-up
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            a @ b
            best = min(best, time.perf_counter() - t0)
        _cpu_peak_cache[threads] = 2 * size**3 / best
    return _cpu_peak_cache[threads]


def device_peak_flops(device: torch.device) -> float:
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, peak in GPU_PEAK_FLOPS.items():
            if key in name:
                return peak
        return 312e12  # unknown GPU: assume A100-class rather than report no MFU
    return measure_cpu_peak_flops()


def matmul_params(model: torch.nn.Module) -> int:
    """Parameters used in matmuls per token: all but norms and the input embedding lookup.

    With tied embeddings the table is also the output projection, so it counts once.
    """
    emb = model.get_input_embeddings().weight if hasattr(model, "get_input_embeddings") else None
    out = model.get_output_embeddings().weight if hasattr(model, "get_output_embeddings") else None
    total = 0
    for p in model.parameters():
        if p.dim() < 2:
            continue
        if p is emb and (out is None or p is not out):
            continue
        total += p.numel()
    return total


def train_flops_per_token(model: torch.nn.Module) -> float:
    """6 x N_matmul: forward 2N, backward 4N. The attention-score term is left out here."""
    return 6.0 * matmul_params(model)


def peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # ru_maxrss is in KiB on Linux
