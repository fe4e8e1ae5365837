"""model.liger=true: Liger-Kernel's Triton kernels in place of transformers' own.

RMSNorm, rotary embeddings and the SwiGLU MLP are patched into the model instance by Liger's
own per-architecture functions; the LM-head loss becomes Liger's fused linear cross-entropy
(ftdist.model.lm_head calls it with reduction="none" for per-token log-probs). Applied before
adapters and sharding, like any change to the model's code. CUDA only: the kernels are Triton.
"""

from __future__ import annotations

import logging

import torch

from ftdist.compat import require_private
from ftdist.config import ConfigError

log = logging.getLogger(__name__)


def apply_liger(model: torch.nn.Module, device: torch.device) -> None:
    if device.type != "cuda":
        raise ConfigError(f"model.liger=true: Liger-Kernel's kernels are Triton kernels for CUDA; this run is on {device}")
    supported = require_private("liger_kernel.transformers.monkey_patch", "MODEL_TYPE_TO_APPLY_LIGER_FN", "liger-kernel",
                                "model.liger=true looks up the patch of the model's architecture")
    model_type = getattr(model.config, "model_type", None)
    if model_type not in supported:
        raise ConfigError(f"model.liger=true: Liger-Kernel has no kernels for model type {model_type!r} "
                          f"(it has: {', '.join(sorted(supported))})")
    # ftdist computes its losses itself (the LM head's log-probs): Liger's loss patches of the
    # model's forward, which act only when labels are passed to it, stay off.
    supported[model_type](model=model, rope=True, rms_norm=True, swiglu=True, cross_entropy=False,
                          fused_linear_cross_entropy=False)
    log.info("model.liger: Liger-Kernel RMSNorm, RoPE and SwiGLU applied to %s", type(model).__name__)


def fused_label_logps(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                      target: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """Per-token log-probs [N] from Liger's fused linear cross-entropy (fp32 accumulation,
    chunked internally), 0 where the target is ignored."""
    function = require_private("liger_kernel.ops.fused_linear_cross_entropy", "LigerFusedLinearCrossEntropyFunction",
                               "liger-kernel", "model.liger=true computes the LM-head loss with it")
    loss = function.apply(hidden, weight, target, bias, None, ignore_index, 0.0, 0.0, "none")[0]
    return -loss.float()
