"""Load a causal LM (or, with a scoring head, the architecture's sequence-classification class)
and its tokenizer through `from_pretrained`, for hub names and local paths.

The tiny model goes through the same path: it is built into a cache directory first.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
from dataclasses import dataclass

import torch

from ftdist.compat import require_attr
from ftdist.config import ConfigError, ModelConfig, PeftConfig
from ftdist.constants import DTYPES
from ftdist.model.adapters import (
    apply_adapters,
    keep_4bit_weights_trainable,
    quantization_config,
    quantize_4bit_on,
)
from ftdist.model.attention import resolve_attn_implementation
from ftdist.model.heads import ScoreHead
from ftdist.model.tiny import ensure_tiny_model

log = logging.getLogger(__name__)



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


def _first_line(error: Exception) -> str:
    return next((line.strip() for line in str(error).splitlines() if line.strip()), type(error).__name__)


def _check_config_file(cfg: ModelConfig, path: str) -> None:
    """A local model directory's config.json, read before transformers does: transformers would
    prompt for custom code on a terminal, and its errors run over many lines."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    where = f"model.name_or_path={path!r}"
    file = os.path.join(path, "config.json")
    if not os.path.isfile(file):
        raise ConfigError(f"{where}: no config.json there (a Hugging Face model directory, as save_pretrained writes)")
    try:
        with open(file) as f:
            raw = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{file}: not valid JSON ({e})") from None
    model_type = raw.get("model_type") if isinstance(raw, dict) else None
    if not model_type:
        raise ConfigError(f"{file}: no model_type, so transformers cannot tell which architecture it is")
    if model_type in CONFIG_MAPPING:
        return
    if "auto_map" in raw:
        if not cfg.trust_remote_code:
            raise ConfigError(
                f"{where}: model_type {model_type!r} is not built into transformers; the directory ships its own "
                "code (auto_map in config.json), which runs only with model.trust_remote_code=true. Read that code "
                "first: it runs with your permissions"
            )
        return
    import transformers

    raise ConfigError(
        f"{where}: config.json has model_type {model_type!r}, which transformers {transformers.__version__} does not "
        "know (a newer transformers may; a model with its own code needs auto_map and model.trust_remote_code=true)"
    )


def load_model_config(cfg: ModelConfig, path: str):
    """The model's transformers config (config.json only: no weights), or a ConfigError naming the path."""
    from transformers import AutoConfig

    if os.path.isdir(path):
        _check_config_file(cfg, path)
    try:
        return AutoConfig.from_pretrained(path, trust_remote_code=cfg.trust_remote_code)
    except (OSError, ValueError) as e:
        raise ConfigError(f"model.name_or_path={path!r}: cannot read the model's config: {_first_line(e)}") from None


ATTENTION_SUPPORT = {"sdpa": "_supports_sdpa", "flex_attention": "_supports_flex_attn",
                     "flash_attention_2": "_supports_flash_attn"}


def model_mapping(scoring: bool):
    """transformers' config -> model class table for the causal LM, or the sequence classifier."""
    from transformers.models.auto import modeling_auto

    return (modeling_auto.MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING if scoring
            else modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING)


def auto_model_class(scoring: bool):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    return AutoModelForSequenceClassification if scoring else AutoModelForCausalLM


def choose_attention(cfg: ModelConfig, config, device: torch.device, path: str, scoring: bool = False) -> str:
    """The attention implementation to load with: `model.attn_implementation` resolved for the device,
    checked against what the model class supports (auto falls back to eager where sdpa is missing).
    scoring: the model is the architecture's sequence-classification class (a scoring head)."""
    attn = resolve_attn_implementation(cfg.attn_implementation, device)
    mapping = model_mapping(scoring)
    if type(config) not in mapping:
        if getattr(config, "auto_map", None):  # custom code: transformers checks it as it loads
            return attn
        what = "sequence-classification" if scoring else "causal-LM"
        raise ConfigError(
            f"model.name_or_path={path!r}: model_type {config.model_type!r} has no {what} class in transformers "
            f"({auto_model_class(scoring).__name__} cannot build it)"
        )
    model_class = mapping[type(config)]
    backend = "sdpa" if attn.endswith("sdpa") else attn  # ftdist's document sdpa needs transformers' sdpa
    supported = ["eager"] + [
        name for name, flag in ATTENTION_SUPPORT.items()
        if require_attr(model_class, flag, "transformers", "ftdist reads which attention backends a model class has")
    ]
    if backend in supported:
        return attn
    if cfg.attn_implementation == "auto":
        log.warning("%s does not support %s attention: using eager", model_class.__name__, backend)
        return "eager"
    raise ConfigError(
        f"model.attn_implementation={cfg.attn_implementation}: {model_class.__name__} ({path}) does not support it; "
        f"it supports {', '.join(supported)}"
    )


def check_model(cfg: ModelConfig, device: torch.device, scoring: bool = False) -> str:
    """What config.json alone can tell (path, model type, custom code, attention backend), checked
    before data and weights load; returns the attention implementation to load with."""
    path = resolve_model_path(cfg)
    return choose_attention(cfg, load_model_config(cfg, path), device, path, scoring)


def load_tokenizer(cfg: ModelConfig, model_path: str | None = None):
    from transformers import AutoTokenizer

    path = cfg.tokenizer or model_path or resolve_model_path(cfg)
    try:
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=cfg.trust_remote_code)
    except (OSError, ValueError) as e:  # no tokenizer files, or none transformers can convert
        raise ConfigError(
            f"model.tokenizer / model.name_or_path: cannot load a tokenizer from {path!r}: {_first_line(e)}"
        ) from None
    if tok.pad_token_id is None:
        # Padding positions never carry labels or attention, so any id works; eos is standard.
        tok.pad_token = tok.eos_token
    return tok


def finish_model(
    model: torch.nn.Module, cfg: ModelConfig, peft: PeftConfig | None, quantized: bool, scoring: bool = False
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
        model = apply_adapters(model, peft, scoring=scoring)
    return model


def load_model(
    cfg: ModelConfig, device: torch.device, peft: PeftConfig | None = None, strategy=None, adapters: bool = True,
    head: ScoreHead | None = None,
) -> LoadedModel:
    """The model with its adapters, on `device`, or as the strategy needs it to shard.

    Under a strategy that loads on rank 0 only (FSDP), rank 0 loads the weights to CPU and every
    other rank builds the same model on the meta device; the strategy moves rank 0's weights
    into the shards. A 4-bit base is quantized while it loads, on every rank's own device; where
    the strategy shards it (FSDP), every rank keeps the whole quantized base in CPU memory until
    fully_shard moves it to the GPU one block at a time, so the GPU never holds more than its
    shards and one block.

    adapters=False loads the base as `peft` would (4-bit under qlora) without adding adapters:
    DPO's frozen reference is the policy's starting point, quantization included.

    head: a scoring head (classification, reward) in place of the LM head: the architecture's
    sequence-classification class, its head new unless the checkpoint has one of that size.
    """
    path = resolve_model_path(cfg)
    tokenizer = load_tokenizer(cfg, path)
    dtype = DTYPES[cfg.dtype]
    config = load_model_config(cfg, path)
    scoring = head is not None
    if scoring:
        if head.pad_token_id is None:
            head = dataclasses.replace(head, pad_token_id=tokenizer.pad_token_id)
        head.configure(config)
    auto_class = auto_model_class(scoring)
    attn = choose_attention(cfg, config, device, path, scoring)
    if dtype == torch.bfloat16 and device.type == "cpu":
        log.warning("model.dtype=bf16 on CPU: bf16 matmuls are far slower than fp32 on most CPUs")
    quant = quantization_config(peft, dtype, scoring)
    deferred = quant is None and strategy is not None and strategy.loads_on_rank0_only
    # A 4-bit base bound for FSDP shards waits in CPU memory (quantized on the GPU all the same).
    parked = quant is not None and strategy is not None and strategy.shards_parameters
    load_device = torch.device("cpu") if parked else device
    quantizing = quantize_4bit_on(device) if parked and device.type == "cuda" else contextlib.nullcontext()
    try:
        if deferred and not strategy.is_main:
            with torch.device("meta"):
                model = auto_class.from_config(
                    config, dtype=dtype, attn_implementation=attn, trust_remote_code=cfg.trust_remote_code
                )
        else:
            extra = {"quantization_config": quant, "device_map": {"": load_device}} if quant is not None else {}
            with quantizing as on_device:
                model = auto_class.from_pretrained(
                    path, config=config, dtype=dtype, attn_implementation=attn, trust_remote_code=cfg.trust_remote_code,
                    **extra,
                )
            if on_device is not None:
                on_device.check(model)  # every 4-bit weight was quantized on the GPU, none on the CPU
    except OSError as e:
        raise ConfigError(f"model.name_or_path: cannot load a model from {path!r}: {e}") from e
    if cfg.liger:  # the model's own code, before adapters wrap its layers
        from ftdist.model.liger import apply_liger

        apply_liger(model, device)
    model = finish_model(model, cfg, peft if adapters else None, quantized=quant is not None, scoring=scoring)
    if not deferred and quant is None:
        model = model.to(device)
    return LoadedModel(model=model, tokenizer=tokenizer, path=path, attn_implementation=attn)


def load_reference_model(cfg, strategy):
    """DPO's frozen reference: objective.reference_path (as saved), else the policy's starting
    weights loaded as the policy is (the same strategy, dtype, attention and 4-bit quantization
    under qlora), but with no adapters."""
    from dataclasses import replace

    from ftdist.config import PeftConfig

    path = cfg.objective.reference_path
    log.info("loading the reference model from %s", path or "the starting weights")
    if path is None:
        return load_model(cfg.model, strategy.device, cfg.peft, strategy, adapters=False).model
    model_cfg = replace(cfg.model, name_or_path=path, tiny=None)
    return load_model(model_cfg, strategy.device, PeftConfig(method="none"), strategy).model
