"""PEFT adapters (LoRA, DoRA) and the 4-bit base model of QLoRA, through peft and bitsandbytes.

Named `adapters` rather than `peft` so it never shadows the peft package it imports.
"""

from __future__ import annotations

import weakref

import torch

from ftdist.compat import library_error, library_version, require_attr
from ftdist.config import ConfigError, PeftConfig
from ftdist.constants import DTYPES
from ftdist.model.heads import HEAD_NAMES, head_module

STORAGE_DTYPES = {**DTYPES, "uint8": torch.uint8}  # bnb_4bit_quant_storage may also be uint8


def quantization_config(peft: PeftConfig | None, compute_dtype: torch.dtype, scoring: bool = False):
    """bitsandbytes 4-bit NF4 with double quantization for peft=qlora, else None.

    The packed 4-bit weights are stored as bf16 by default: FSDP2 casts parameters to its bf16
    compute dtype after gathering them, which leaves bf16 storage intact but would destroy
    uint8-packed weights; and every rank's shard stays a plain tensor FSDP can split.
    """
    if peft is None or peft.method != "qlora":
        return None
    try:
        from transformers import BitsAndBytesConfig
    except ImportError as e:  # pragma: no cover - transformers always ships it
        raise ConfigError(f"peft=qlora: {e}") from e
    storage = STORAGE_DTYPES["bf16" if peft.quant_storage == "auto" else peft.quant_storage]
    # A scoring head is new and trained in full (modules_to_save): never quantized.
    skip = {"llm_int8_skip_modules": list(HEAD_NAMES)} if scoring else {}
    return BitsAndBytesConfig(
        **skip,
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute_dtype,
        bnb_4bit_quant_storage=storage,
    )


QUANTIZE_ON_DEVICE = "ftdist's QLoRA loading quantizes each 4-bit weight on the GPU through it (on the CPU a 70B base takes 47 minutes)"
KEEP_TRAINABLE = "ftdist turns it off so evaluation does not repack 4-bit weights into an inference-only CPU layout"


class QuantizeOnDevice:
    """While a 4-bit base loads into CPU memory, quantize each weight on `device` (a GPU).

    FSDP + QLoRA loads the base into CPU memory so that no GPU ever holds all of it (Llama 70B
    in NF4 is about 39 GiB, more than a 24 GB card); fully_shard then moves one block at a time to
    the GPU and keeps only this rank's shard. bitsandbytes quantizes a weight on the device it is
    moved to, and on CPU, with the one thread per rank torchrun gives, that is about 25M weights/s
    (measured here): 47 minutes for 70B. It has no option to quantize elsewhere, so
    Params4bit._quantize is wrapped for the duration of the load: quantize on the GPU, then move
    the packed weight and its constants to where transformers placed it.

    The wrapper is a private hook: a bitsandbytes or transformers that quantizes by another route
    would leave it uncalled and quantize on the CPU, slowly and silently. So it records every
    weight it quantized, and `check(model)`, called where the load finishes, requires that every
    4-bit weight of the loaded model is one of them.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.calls = 0
        self._quantized: dict[int, weakref.ref] = {}
        self._original = None

    def __enter__(self):
        from bitsandbytes.nn import Params4bit

        original = require_attr(Params4bit, "_quantize", "bitsandbytes", QUANTIZE_ON_DEVICE)
        device, quantized = self.device, self._quantized

        def quantize_then_move(param, target):
            original(param, device)
            param.data = param.data.to(target)
            param.quant_state.to(target)  # in place, and the module's reference is the same object
            self.calls += 1
            quantized[id(param)] = weakref.ref(param)
            return param

        self._original = original
        Params4bit._quantize = quantize_then_move
        return self

    def __exit__(self, *exc) -> None:
        from bitsandbytes.nn import Params4bit

        Params4bit._quantize = self._original

    def check(self, model: torch.nn.Module) -> None:
        """Raise unless every 4-bit weight of `model` went through the wrapper (a checkpoint saved
        already quantized loads packed: nothing to quantize, nothing to check)."""
        from bitsandbytes.nn import Params4bit

        if getattr(getattr(model, "hf_quantizer", None), "pre_quantized", False):
            return
        weights = {n: p for n, p in model.named_parameters() if isinstance(p, Params4bit)}
        missed = [n for n, p in weights.items() if (ref := self._quantized.get(id(p))) is None or ref() is not p]
        if missed:
            raise library_error(
                "bitsandbytes",
                f"Params4bit._quantize, wrapped by ftdist, ran {self.calls} times while {len(missed)} of the "
                f"model's {len(weights)} 4-bit weights were quantized another way (e.g. {missed[0]}), "
                f"on the CPU (transformers {library_version('transformers')})",
                QUANTIZE_ON_DEVICE,
            )


def quantize_4bit_on(device: torch.device) -> QuantizeOnDevice:
    """A context that quantizes the 4-bit weights loaded inside it on `device`; call its
    `check(model)` on the loaded model."""
    return QuantizeOnDevice(device)


def keep_4bit_weights_trainable(model: torch.nn.Module) -> None:
    """Stop bitsandbytes repacking 4-bit weights for CPU inference during evaluation.

    bitsandbytes 0.50 converts a Linear4bit's weight to an inference-only CPU layout the first
    time it runs in eval mode, and never converts it back: training after an evaluation then
    runs a kernel without autograd and silently drops the gradient through the frozen base
    (measured here: the adapters of earlier layers got wrong gradients). The switch is the
    instance attribute `support_avx512bf16_for_cpu`; a bitsandbytes without it is refused rather
    than trusted.
    """
    from bitsandbytes.nn import Linear4bit

    for module in model.modules():
        if isinstance(module, Linear4bit):
            require_attr(module, "support_avx512bf16_for_cpu", "bitsandbytes", KEEP_TRAINABLE)
            module.support_avx512bf16_for_cpu = False


def lora_config(peft: PeftConfig, scoring: bool = False):
    """scoring: the model has a scoring head (sequence classification), which trains in full
    beside the adapters and is saved with them (peft's modules_to_save for SEQ_CLS)."""
    from peft import LoraConfig

    # peft's "all-linear" adapts every linear layer except the LM head; a scoring head is left
    # out too (it trains in full instead).
    all_linear = list(peft.target_modules) == ["all-linear"]
    return LoraConfig(
        r=peft.r,
        lora_alpha=peft.alpha,
        lora_dropout=peft.dropout,
        target_modules="all-linear" if all_linear else list(peft.target_modules),
        exclude_modules=list(HEAD_NAMES) if scoring and all_linear else None,
        use_dora=peft.method == "dora",
        task_type="SEQ_CLS" if scoring else "CAUSAL_LM",
    )


def apply_adapters(model: torch.nn.Module, peft: PeftConfig, scoring: bool = False) -> torch.nn.Module:
    """The model with trainable adapters and a frozen base (unchanged for peft=none); a scoring
    head trains in full, in fp32, beside the adapters."""
    if peft.method == "none":
        return model
    from peft import get_peft_model

    try:
        wrapped = get_peft_model(model, lora_config(peft, scoring))
    except ValueError as e:  # e.g. a target module name that matches nothing
        raise ConfigError(f"peft.target_modules={list(peft.target_modules)}: {e}") from e
    if not any(p.requires_grad for p in wrapped.parameters()):
        raise ConfigError("peft: no parameter is trainable; check peft.target_modules")
    if scoring:
        keep_head_fp32(wrapped)
    return wrapped


def keep_head_fp32(peft_model: torch.nn.Module) -> None:
    """The trained copy of the scoring head in fp32, as peft keeps LoRA weights: a bf16 head would
    lose small updates to rounding. Its input is cast up to match (the bf16 base feeds it)."""
    head = head_module(peft_model)
    trained = [p for p in head.parameters() if p.requires_grad]
    if not trained:
        raise RuntimeError(f"peft left the scoring head {type(head).__name__} frozen (modules_to_save)")
    for p in trained:
        p.data = p.data.float()
    head.register_forward_pre_hook(lambda module, args: tuple(
        a.float() if torch.is_tensor(a) and a.is_floating_point() else a for a in args))
