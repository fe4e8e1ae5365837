"""Attention backend choice and the masks that keep packed documents apart.

Measured here: transformers' sdpa, flex and eager paths do not separate documents from reset
position ids alone, so every backend but a varlen kernel keeps documents apart explicitly:
- sdpa (as configured: `document_sdpa` below): attention runs per document, each a causal
  sdpa call on its own slice, so a packed row costs sum(n_i^2) instead of T^2 and no mask is
  built; unpacked batches take transformers' own sdpa path unchanged;
- plain transformers sdpa (models loaded outside ftdist): a boolean block-diagonal causal mask;
- eager: the same as an additive float mask (0 / dtype min), which is what eager expects;
- flex_attention: a BlockMask built from the per-token document ids, and kernel options that
  keep every query length on the main flex kernel (see FLEX_KERNEL_OPTIONS);
- flash_attention_2: no mask; transformers derives cu_seqlens from the restarting position ids.
Padding positions form a "document" of their own (id -1), so no query row is fully masked
(a fully masked row would give NaN, and NaN times a zero gradient is still NaN).

Sliding-window models (Mistral, Qwen2 with use_sliding_window, Gemma 2/3) apply their window
through the mask transformers builds, and a packed row replaces that mask, so every packed path
adds the window itself, per document (a query sees itself and the window - 1 keys before it,
as in transformers' `sliding_window_overlay`): per-document sdpa windows each document longer
than the window (the layer's own `sliding_window` argument, so full-attention layers stay
full); the eager, plain sdpa and flex masks add `q - k < window`, and models that mix full and
sliding layers get one mask per layer type (the dict transformers' hybrid models accept);
flash varlen needs nothing (transformers passes the layer's window to the kernel, which
applies it within each sequence). Unpacked batches take the model's own mask path, window
included.
"""

from __future__ import annotations

import dataclasses
import importlib.util

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from ftdist.config import ConfigError
from ftdist.data.loader import Batch

DOCUMENT_SDPA = "ftdist_document_sdpa"

# Inductor lowers flex_attention with a query shorter than 128 tokens (no grad: evaluation,
# a short document alone) to its flex-decoding kernel. With grouped-query attention that
# kernel packs the query heads of one KV head into its M tile, so for 64 < T < 128 and two
# query heads per KV head the tile (256) exceeds the block mask's 128-row query blocks, every
# candidate config is filtered out, and compilation fails with NoValidChoicesError (seen on an
# H200 with torch 2.11; pytorch/pytorch#185349 fixes the lowering later). The main flex kernel
# handles every length; FORCE_USE_FLEX_ATTENTION is the knob torch has accepted since 2.5 (newer
# releases also take BACKEND="TRITON", but reject the two together).
FLEX_KERNEL_OPTIONS = {"FORCE_USE_FLEX_ATTENTION": True}


ALL_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.MATH]
PER_DOCUMENT_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def document_sdpa_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """transformers attention function: per-document causal sdpa when `document_segments` is given.

    query [B, H, T, D], key/value [B, H_kv, T, D]; returns ([B, T, H, D], None) like sdpa.
    """
    segments = kwargs.pop("document_segments", None)
    if segments is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout, scaling, **kwargs)
    if kwargs.get("softcap") is not None:  # as transformers' sdpa refuses it (Gemma 2): never drop it silently
        raise ValueError("sdpa attention does not support logit softcapping; use model.attn_implementation=eager")
    p = dropout if module.training else 0.0
    # cuDNN attention (torch's first choice on Hopper) builds a new plan for every sequence
    # length, and every document has its own: measured on an H200, packed steps ran 20x slower
    # than padded ones. Flash and memory-efficient kernels take any length as is.
    backends = PER_DOCUMENT_BACKENDS if query.is_cuda else ALL_BACKENDS
    with sdpa_kernel(backends):
        return _per_document_sdpa(query, key, value, segments, scaling, p, kwargs.get("sliding_window")), None


@torch.compiler.disable  # a Python loop over documents of every length: eager, between compiled parts
def _per_document_sdpa(query, key, value, segments, scaling, p, window=None):
    rows = []
    for b, row in enumerate(segments):
        pieces = []
        for s, n in row:
            # A document no longer than the window is plain causal; a longer one gets an n x n mask.
            mask = sliding_window_causal(n, window, query.device) if window is not None and n > window else None
            pieces.append(
                F.scaled_dot_product_attention(
                    query[b : b + 1, :, s : s + n], key[b : b + 1, :, s : s + n], value[b : b + 1, :, s : s + n],
                    attn_mask=mask, is_causal=mask is None, scale=scaling, dropout_p=p, enable_gqa=True,
                )
            )
        used = sum(n for _, n in row)
        if used < query.size(2):  # padding after the last document: no label, no attention
            pieces.append(query.new_zeros(1, query.size(1), query.size(2) - used, query.size(3)))
        rows.append(torch.cat(pieces, dim=2))
    return torch.cat(rows, dim=0).transpose(1, 2).contiguous()


def register_attention_functions() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(DOCUMENT_SDPA, document_sdpa_attention)
    AttentionMaskInterface.register(DOCUMENT_SDPA, sdpa_mask)


def flash_attn_available() -> bool:
    return importlib.util.find_spec("flash_attn") is not None


def resolve_attn_implementation(requested: str, device: torch.device) -> str:
    """The name to load the model with for `model.attn_implementation` on `device`.

    sdpa loads as ftdist's document-aware sdpa, which is transformers' sdpa for unpacked batches.
    """
    has_flash = device.type == "cuda" and flash_attn_available()
    if requested == "auto":
        requested = "flash_attention_2" if has_flash else "sdpa"
    if requested == "flash_attention_2" and not has_flash:
        raise ConfigError(
            "model.attn_implementation=flash_attention_2 needs the flash-attn package and a CUDA device; "
            "use auto, sdpa or flex_attention"
        )
    if requested == "flex_attention" and device.type == "cpu":
        raise ConfigError("model.attn_implementation=flex_attention has no backward pass on CPU; use sdpa or eager")
    if requested == "sdpa":
        register_attention_functions()
        return DOCUMENT_SDPA
    return requested


@dataclasses.dataclass(frozen=True)
class SlidingWindow:
    """A model's sliding-window attention: a query sees itself and the `size` - 1 keys before it."""

    size: int
    every_layer: bool  # False: some layers attend to the whole causal context (Gemma 2/3, Qwen2)


def sliding_window_of(config) -> SlidingWindow | None:
    """The sliding window of a transformers model config, or None when no layer has one.

    Qwen2 without use_sliding_window sets `sliding_window` to None; models with `layer_types`
    name which layers slide; a model without them (Mistral) slides on every layer.
    """
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    size = getattr(text, "sliding_window", None)
    layer_types = getattr(text, "layer_types", None)
    if size is None or (layer_types is not None and "sliding_attention" not in layer_types):
        return None
    return SlidingWindow(int(size), layer_types is None or all(t == "sliding_attention" for t in layer_types))


def sliding_window_causal(n: int, window: int, device) -> torch.Tensor:
    """[n, n] boolean: query q may attend key k iff k <= q and q - k < window."""
    distance = torch.arange(n, device=device)[:, None] - torch.arange(n, device=device)[None, :]
    return (distance >= 0) & (distance < window)


def block_diagonal_causal(document_ids: torch.Tensor, window: int | None = None) -> torch.Tensor:
    """[B, 1, T, T] boolean: query q may attend key k iff same document, k <= q (and q - k < window)."""
    same = document_ids[:, :, None] == document_ids[:, None, :]
    t = document_ids.size(1)
    causal = sliding_window_causal(t, window if window is not None else t, document_ids.device)
    return (same & causal)[:, None]


def flex_block_mask(document_ids: torch.Tensor, window: int | None = None):
    from torch.nn.attention.flex_attention import create_block_mask

    b, t = document_ids.shape
    reach = window if window is not None else t  # a window as long as the row is plain causal

    def same_document_causal(b, h, q, k):
        return (document_ids[b, q] == document_ids[b, k]) & (q >= k) & (q - k < reach)

    return create_block_mask(same_document_causal, b, None, t, t, device=document_ids.device)


def attention_kwargs(attn_implementation: str) -> dict:
    """Extra forward keyword arguments every call needs under this backend (flex: kernel options).

    transformers passes them through the model's forward to the attention function.
    """
    if attn_implementation == "flex_attention":
        return {"kernel_options": dict(FLEX_KERNEL_OPTIONS)}
    return {}


def model_inputs(
    batch: Batch, attn_implementation: str, dtype: torch.dtype, window: SlidingWindow | None = None
) -> dict:
    """Keyword arguments for the model's forward for this batch and backend.

    `window` is the model's sliding window (`sliding_window_of(model.config)`); packed rows
    need it under eager, plain sdpa and flex, whose masks replace the model's own.
    """
    if batch.document_ids is None:
        return {
            "input_ids": batch.input_ids,
            "attention_mask": batch.attention_mask,
            **attention_kwargs(attn_implementation),
        }
    inputs = {"input_ids": batch.input_ids, "position_ids": batch.position_ids}
    if attn_implementation == "flash_attention_2":
        return inputs
    if attn_implementation == DOCUMENT_SDPA:
        inputs["document_segments"] = batch.segments
        # Per-document attention needs no mask. Given none, transformers would look for the
        # documents in the position ids, reading them to the host (a device synchronisation per
        # forward); a 4D mask it takes as already built, and document_sdpa_attention ignores it.
        inputs["attention_mask"] = torch.ones((1, 1, 1, 1), dtype=torch.bool, device=batch.input_ids.device)
        return inputs
    if window is not None and window.size >= batch.input_ids.size(1):
        window = None  # no document is longer than the window: plain causal is the same mask
    if window is None:
        inputs["attention_mask"] = document_mask(batch.document_ids, attn_implementation, dtype)
    elif window.every_layer:
        inputs["attention_mask"] = document_mask(batch.document_ids, attn_implementation, dtype, window.size)
    else:
        inputs["attention_mask"] = {
            "full_attention": document_mask(batch.document_ids, attn_implementation, dtype),
            "sliding_attention": document_mask(batch.document_ids, attn_implementation, dtype, window.size),
        }
    inputs.update(attention_kwargs(attn_implementation))
    return inputs


def document_mask(document_ids: torch.Tensor, attn_implementation: str, dtype: torch.dtype, window: int | None = None):
    """The packed-document mask in the form the backend takes (BlockMask, additive float, boolean)."""
    if attn_implementation == "flex_attention":
        return flex_block_mask(document_ids, window)
    allowed = block_diagonal_causal(document_ids, window)
    if attn_implementation != "eager":
        return allowed
    blocked = torch.full(allowed.shape, torch.finfo(dtype).min, dtype=dtype, device=allowed.device)
    return torch.where(allowed, torch.zeros((), dtype=dtype, device=allowed.device), blocked)
