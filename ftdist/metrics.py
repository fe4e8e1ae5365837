"""Throughput numbers: FLOPs per token, device peak FLOP/s, MFU and peak memory."""

from __future__ import annotations

import logging
import re
import resource
import time
from collections.abc import Iterable
from dataclasses import dataclass

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
_unknown_gpus_warned: set[str] = set()
_impossible_mfu_warned: set[str] = set()  # device types

log = logging.getLogger(__name__)


def measure_cpu_peak_flops(size: int = 1024, repeats: int = 6, rounds: int = 3, gap_s: float = 0.05) -> float:
    """fp32 matmul FLOP/s this process reaches with its threads (the CPU's practical peak).

    Best of `rounds` x `repeats` timed matmuls after a warm-up, the rounds `gap_s` apart: a peak
    taken while other processes held the cores came out at a quarter of the idle figure (MFU
    then read 1.5-1.7), and a busy spell rarely covers every round. A peak still too low is
    raised by the first step that beats it (checked_mfu).
    """
    threads = torch.get_num_threads()
    if threads not in _cpu_peak_cache:
        a = torch.randn(size, size)
        b = torch.randn(size, size)
        for _ in range(2):
            a @ b  # warm-up: first-call allocation and thread-pool start
        best = float("inf")
        for r in range(rounds):
            if r:
                time.sleep(gap_s)
            for _ in range(repeats):
                t0 = time.perf_counter()
                a @ b
                best = min(best, time.perf_counter() - t0)
        _cpu_peak_cache[threads] = 2 * size**3 / best
    return _cpu_peak_cache[threads]


def gpu_peak_flops(device_name: str) -> float | None:
    """The GPU_PEAK_FLOPS entry for a device name (`torch.cuda.get_device_name`), or None.

    A key matches a whole word of the name ("NVIDIA A100-SXM4-80GB" is an A100; "NVIDIA L40"
    is not an L4). An unknown GPU gets None, so its lines log `mfu: null` rather than a
    utilisation computed from a guessed peak; it is warned about once per process.
    """
    words = set(re.split(r"[^0-9A-Za-z]+", device_name.upper()))
    for key, peak in GPU_PEAK_FLOPS.items():
        if key in words:
            return peak
    if device_name not in _unknown_gpus_warned:
        _unknown_gpus_warned.add(device_name)
        log.warning(
            "GPU %r is not in ftdist.metrics.GPU_PEAK_FLOPS (%s): its peak FLOP/s is unknown, so mfu is logged as null",
            device_name, ", ".join(GPU_PEAK_FLOPS),
        )
    return None


def device_peak_flops(device: torch.device) -> float | None:
    """Peak FLOP/s of one device: the datasheet bf16 peak of a known GPU, a CPU's measured fp32 peak."""
    if device.type == "cuda":
        return gpu_peak_flops(torch.cuda.get_device_name(device))
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
    # None for a sequence classifier: its scoring head is an ordinary (small) matmul at every position.
    out = getattr(model.get_output_embeddings(), "weight", None) if hasattr(model, "get_output_embeddings") else None
    total = 0
    for p in model.parameters():
        if (trainable_only and not p.requires_grad) or logical_ndim(p) < 2:
            continue
        if p is emb and (out is None or p is not out):
            continue
        total += logical_numel(p)
    return total


def train_flops_per_token(model: torch.nn.Module) -> float:
    """Matmul FLOPs per token of a training step. Forward 2N; backward 2N for activation
    gradients (every layer, frozen or not, passes them on) plus 2N for weight gradients of what
    trains: 6N for full fine-tuning, 4 N_frozen + 6 N_adapter under LoRA, QLoRA and DoRA."""
    return 4.0 * matmul_params(model) + 2.0 * matmul_params(model, trainable_only=True)


def attention_flops_per_pair(config) -> float:
    """Training FLOPs per (query, key) pair that causal attention computes, over all layers.

    Per layer and pair: QK^T and AV are each a dot product of width heads x head_dim (2 FLOPs
    per multiply-add); the backward pass costs twice the forward (dQ, dK from the scores, dP,
    dV from AV): 3 x 2 x 2 x heads x head_dim. Grouped-query attention shares K and V across
    heads but still scores every query head, so the query heads count.
    """
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    return 12.0 * text.num_hidden_layers * text.num_attention_heads * head_dim


def causal_pairs(length: int) -> int:
    """(query, key) pairs under a causal mask: token i attends to itself and the i - 1 before."""
    return length * (length + 1) // 2


@dataclass(frozen=True)
class TrainFlops:
    """FLOPs of a training step, from the real length of every document in it.

    Packed documents attend only within themselves and padding does no useful work, so the
    attention term is a sum over documents, not over rows or padded slots. Activation
    checkpointing's recomputed forward is not counted (model FLOPs, not hardware FLOPs).
    """

    per_token: float  # matmul FLOPs per real token
    per_attention_pair: float  # attention FLOPs per causal (query, key) pair
    forward_per_token: float = 0.0  # matmul FLOPs per token of a forward alone (2N)

    @classmethod
    def of(cls, model: torch.nn.Module) -> TrainFlops:
        return cls(train_flops_per_token(model), attention_flops_per_pair(model.config), 2.0 * matmul_params(model))

    def step(self, document_lengths: Iterable[int]) -> float:
        lengths = [int(n) for n in document_lengths]
        return self.per_token * sum(lengths) + self.per_attention_pair * sum(causal_pairs(n) for n in lengths)

    def forward(self, document_lengths: Iterable[int]) -> float:
        """A no-grad forward over the same documents (DPO's reference): a third of the attention
        term (the forward's QK^T and AV), 2N per token."""
        lengths = [int(n) for n in document_lengths]
        return self.forward_per_token * sum(lengths) + self.per_attention_pair / 3 * sum(causal_pairs(n) for n in lengths)


def mfu(flops: float, seconds: float, world_size: int, peak_flops_per_device: float | None) -> float | None:
    """Model FLOPs utilisation: the global step's FLOPs over what the devices could do in `seconds`
    (None where the device's peak is unknown)."""
    if peak_flops_per_device is None:
        return None
    return flops / (seconds * world_size * peak_flops_per_device)


def checked_mfu(
    flops: float, seconds: float, world_size: int, peak: float | None, device: torch.device
) -> tuple[float | None, float | None]:
    """(mfu, peak to use from now on) for one step, never an impossible figure unannounced.

    A step above the peak (mfu > 1) is warned about once per process. A CPU's peak is measured
    (measure_cpu_peak_flops), so the step proves it low: the peak rises to the step's rate, in
    this process's cache too, and the step logs 1.0. A GPU's peak is its datasheet's, so the
    FLOP count is what is wrong: the figure is logged as computed, for someone to look into.
    """
    value = mfu(flops, seconds, world_size, peak)
    if value is None or value <= 1.0:
        return value, peak
    achieved = flops / (seconds * world_size)
    if device.type == "cuda":
        _warn_impossible_once(device, value, peak, "the step's FLOP count or GPU_PEAK_FLOPS is wrong; logged as computed")
        return value, peak
    _warn_impossible_once(device, value, peak, f"the peak measured at start-up was low (busy machine?): raised to {achieved:.4g}")
    _cpu_peak_cache[torch.get_num_threads()] = achieved
    return 1.0, achieved


def _warn_impossible_once(device: torch.device, value: float, peak: float, consequence: str) -> None:
    if device.type in _impossible_mfu_warned:
        return
    _impossible_mfu_warned.add(device.type)
    log.warning(
        "mfu %.2f > 1: a step ran faster than the %s peak of %.4g FLOP/s per device; %s",
        value, device.type, peak, consequence,
    )


def peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9  # ru_maxrss is in KiB on Linux; GB as on CUDA
