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


def logical_ndim(p: torch.Tensor) -> int:
    """Dimensions of the weight a parameter stands for (ZeRO-3 partitions are flat, shape (0,))."""
    return len(getattr(p, "ds_shape", p.shape))


def logical_numel(p: torch.Tensor) -> int:
    """Elements a parameter stands for, whatever its storage: ZeRO-3 partitions keep the full
    count in ds_numel, and 4-bit weights are packed several to a stored element."""
    if hasattr(p, "ds_numel"):
        return int(p.ds_numel)
    quant_state = getattr(p, "quant_state", None)
    if quant_state is not None:
        return int(torch.Size(quant_state.shape).numel())
    return p.numel()


def matmul_params(model: torch.nn.Module, trainable_only: bool = False) -> int:
    """Parameters used in matmuls per token: all but norms and the input embedding lookup.

    With tied embeddings the table is also the output projection, so it counts once.
    """
    emb = model.get_input_embeddings().weight if hasattr(model, "get_input_embeddings") else None
    out = model.get_output_embeddings().weight if hasattr(model, "get_output_embeddings") else None
    total = 0
    for p in model.parameters():
        if (trainable_only and not p.requires_grad) or logical_ndim(p) < 2:
            continue
        if p is emb and (out is None or p is not out):
            continue
        total += logical_numel(p)
    return total


def train_flops_per_token(model: torch.nn.Module) -> float:
    """Forward 2N, backward 2N for activation gradients plus 2N for weight gradients of the
    parameters that train: 6N for full fine-tuning, about 4N under LoRA. The attention-score
    term is left out."""
    return 4.0 * matmul_params(model) + 2.0 * matmul_params(model, trainable_only=True)


def peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # ru_maxrss is in KiB on Linux
