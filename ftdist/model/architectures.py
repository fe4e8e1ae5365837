"""Model configurations known without a download, and the config of any `model.*` selection.

A dry run sizes a 70B model on a machine with no hub access and no weights, so the published
configs of the architectures ftdist ships experiments for are written out here, in the form
of the models' own `config.json` (transformers turns rope_theta + rope_scaling into its
rope parameters).
"""

from __future__ import annotations

import dataclasses
import os

from ftdist.config import ConfigError, ModelConfig

# Llama 3.1's long-context RoPE: frequencies rescaled beyond the original 8K window.
_LLAMA31_COMMON = {
    "model_type": "llama",
    "vocab_size": 128256,
    "max_position_embeddings": 131072,
    "rms_norm_eps": 1e-5,
    "rope_theta": 500000.0,
    "rope_scaling": {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    },
    "hidden_act": "silu",
    "attention_bias": False,
    "mlp_bias": False,
    "tie_word_embeddings": False,
    "bos_token_id": 128000,
    "eos_token_id": 128001,
}

# name -> LlamaConfig kwargs (meta-llama/Llama-3.1-8B and -70B config.json)
ARCHITECTURES: dict[str, dict] = {
    "llama-3.1-8b": {
        **_LLAMA31_COMMON,
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
    },
    "llama-3.1-70b": {
        **_LLAMA31_COMMON,
        "hidden_size": 8192,
        "intermediate_size": 28672,
        "num_hidden_layers": 80,
        "num_attention_heads": 64,
        "num_key_value_heads": 8,
    },
}


def known_architectures() -> list[str]:
    return sorted(ARCHITECTURES)


def architecture_config(name: str):
    """The transformers config of a known architecture name."""
    from transformers import AutoConfig

    if name not in ARCHITECTURES:
        raise ConfigError(
            f"model.architecture={name!r} is not a known architecture; known: {', '.join(known_architectures())}"
        )
    kwargs = dict(ARCHITECTURES[name])
    return AutoConfig.for_model(kwargs.pop("model_type"), **kwargs)


def model_config(cfg: ModelConfig):
    """The transformers config of `cfg`: a known architecture, the tiny model, or a local directory.

    Never downloads: a hub name is looked up in the local cache only.
    """
    from transformers import AutoConfig

    if cfg.architecture:
        return architecture_config(cfg.architecture)
    if cfg.tiny is not None:
        from ftdist.model.tiny import ensure_tiny_model

        # A warm start changes the weights, not the config: sizing never trains for it (the
        # preference demo's model would run 500 SFT steps for `ftdist.plan` to read a config).
        spec = dataclasses.replace(cfg.tiny, sft_task=None, sft_steps=0)
        return AutoConfig.from_pretrained(ensure_tiny_model(spec))
    path = os.path.expanduser(str(cfg.name_or_path))
    try:
        return AutoConfig.from_pretrained(path, local_files_only=True, trust_remote_code=cfg.trust_remote_code)
    except (OSError, ValueError) as e:
        raise ConfigError(
            f"model.name_or_path={cfg.name_or_path!r} is not a local model directory (nor in the local hub cache), "
            f"so its config is unknown without a download: set model.architecture to one of "
            f"{', '.join(known_architectures())}, or point model.name_or_path at a local directory ({e})"
        ) from None


def decoder_blocks(model) -> list:
    """The model's repeated transformer blocks (FSDP's per-block units, the planner's layers):
    modules of the classes transformers marks unsplittable (`_no_split_modules`); [] where the
    model declares none. A peft wrapper is looked through."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    names = set(getattr(base, "_no_split_modules", None) or ())
    return [m for m in model.modules() if type(m).__name__ in names]


def required_decoder_blocks(model, needed_by: str, instead: str) -> list:
    """decoder_blocks(model), or a ConfigError naming what needed them and what to do instead."""
    blocks = decoder_blocks(model)
    if not blocks:
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        raise ConfigError(
            f"{needed_by}: found no decoder blocks in {type(base).__name__} (looked for "
            f"{sorted(getattr(base, '_no_split_modules', None) or [])}); {instead}"
        )
    return blocks
