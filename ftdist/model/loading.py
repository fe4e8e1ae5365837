"""Load a causal LM and its tokenizer through `from_pretrained`, for hub names and local paths.

The tiny model goes through the same path: it is built into a cache directory first.
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass

import torch

from ftdist.config import ConfigError, ModelConfig, PeftConfig
from ftdist.model.adapters import (
    apply_adapters,
    keep_4bit_weights_trainable,
    quantization_config,
    quantize_4bit_on,
)
from ftdist.model.attention import resolve_attn_implementation
from ftdist.model.tiny import ensure_tiny_model

log = logging.getLogger(__name__)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object
    path: str
    attn_implementation: str


def resolve_model_path(cfg: ModelConfig) -> str:
    if cfg.tiny is not None:
        return ensure_tiny_model(cfg.tiny)
    path = str(cfg.name_or_path)
    if path.startswith(("/", "./", "../", "~")) and not os.path.exists(os.path.expanduser(path)):
        raise ConfigError(f"model.name_or_path: local model directory {path!r} does not exist")
    return os.path.expanduser(path)


def load_tokenizer(cfg: ModelConfig, model_path: str | None = None):
    from transformers import AutoTokenizer

    path = cfg.tokenizer or model_path or resolve_model_path(cfg)
    try:
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=cfg.trust_remote_code)
    except OSError as e:
        raise ConfigError(f"model.tokenizer / model.name_or_path: cannot load a tokenizer from {path!r}: {e}") from e
    if tok.pad_token_id is None:
        # Padding positions never carry labels or attention, so any id works; eos is standard.
        tok.pad_token = tok.eos_token
    return tok


def finish_model(
    model: torch.nn.Module, cfg: ModelConfig, peft: PeftConfig | None, quantized: bool
) -> torch.nn.Module:
    """What every built model goes through before training: 4-bit weights kept trainable,
    gradient checkpointing, no KV cache, adapters (benchmarks/gpu_adapters.py builds its
    random-init model in memory and finishes it here too)."""
    if quantized:
        keep_4bit_weights_trainable(model)
    if cfg.gradient_checkpointing:
        # Non-reentrant checkpointing works with DDP and with a frozen base under PEFT.
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False  # caches are for generation, not training
    if peft is not None:
        model = apply_adapters(model, peft)
    return model


def load_model(
    cfg: ModelConfig, device: torch.device, peft: PeftConfig | None = None, strategy=None
) -> LoadedModel:
    """The model with its adapters, on `device`, or as the strategy needs it to shard.

    Under a strategy that loads on rank 0 only (FSDP), rank 0 loads the weights to CPU and every
    other rank builds the same model on the meta device; the strategy moves rank 0's weights
    into the shards. A 4-bit base is quantized while it loads, on every rank's own device; where
    the strategy shards it (FSDP), every rank keeps the whole quantized base in CPU memory until
    fully_shard moves it to the GPU one block at a time, so the GPU never holds more than its
    shards and one block.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    path = resolve_model_path(cfg)
    tokenizer = load_tokenizer(cfg, path)
    dtype = DTYPES[cfg.dtype]
    attn = resolve_attn_implementation(cfg.attn_implementation, device)
    if dtype == torch.bfloat16 and device.type == "cpu":
        log.warning("model.dtype=bf16 on CPU: bf16 matmuls are far slower than fp32 on most CPUs")
    quant = quantization_config(peft, dtype)
    deferred = quant is None and strategy is not None and strategy.loads_on_rank0_only
    # A 4-bit base bound for FSDP shards waits in CPU memory (quantized on the GPU all the same).
    parked = quant is not None and strategy is not None and strategy.shards_parameters
    load_device = torch.device("cpu") if parked else device
    quantizing = quantize_4bit_on(device) if parked and device.type == "cuda" else contextlib.nullcontext()
    try:
        if deferred and not strategy.is_main:
            config = AutoConfig.from_pretrained(path, trust_remote_code=cfg.trust_remote_code)
            with torch.device("meta"):
                model = AutoModelForCausalLM.from_config(
                    config, dtype=dtype, attn_implementation=attn, trust_remote_code=cfg.trust_remote_code
                )
        else:
            extra = {"quantization_config": quant, "device_map": {"": load_device}} if quant is not None else {}
            with quantizing as on_device:
                model = AutoModelForCausalLM.from_pretrained(
                    path, dtype=dtype, attn_implementation=attn, trust_remote_code=cfg.trust_remote_code, **extra
                )
            if on_device is not None:
                on_device.check(model)  # every 4-bit weight was quantized on the GPU, none on the CPU
    except OSError as e:
        raise ConfigError(f"model.name_or_path: cannot load a model from {path!r}: {e}") from e
    model = finish_model(model, cfg, peft, quantized=quant is not None)
    if not deferred and quant is None:
        model = model.to(device)
    return LoadedModel(model=model, tokenizer=tokenizer, path=path, attn_implementation=attn)
