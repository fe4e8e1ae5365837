"""train.compile: each decoder block compiled with torch.compile, before any sharding.

Blocks rather than the whole model, as torchtitan does: every block has the same code, so one
compiled graph serves them all (transformers' blocks take their parameters as inputs), and the
parts around them (embedding, head, loss, the strategies' hooks) stay eager. Compiling before
FSDP's fully_shard or DeepSpeed's wrapping keeps their per-block hooks outside the graphs.

Sequence lengths change from one micro-batch to the next. Dynamo's automatic dynamic shapes
compile a block again once, for a symbolic length, when a second length arrives; after that
lengths cost no recompile (train lines carry `compiled_graphs`, which then stops growing).
Per-document sdpa (packed rows on the sdpa backend) loops over the documents in Python, so it
runs eagerly between the compiled parts of a block (ftdist.model.attention disables it for
compile); flex attention compiles whole.
"""

from __future__ import annotations

import functools
import logging

import torch
from torch.utils.checkpoint import checkpoint

from ftdist.config import ConfigError
from ftdist.model.architectures import required_decoder_blocks
from ftdist.model.attention import DOCUMENT_SDPA

log = logging.getLogger(__name__)


def compile_blocks(model: torch.nn.Module, packed: bool = False) -> int:
    """Compile every decoder block of `model` in place; returns how many.

    Gradient checkpointing moves inside the compiled blocks: transformers checkpoints a block
    around its call, in torch.utils.checkpoint, which turns dynamo off for everything it runs,
    so its blocks would never compile. Here each block's forward is checkpointed (non-reentrant,
    as model.gradient_checkpointing does) and that is compiled, which dynamo traces whole."""
    blocks = required_decoder_blocks(model, "train.compile=true", "set train.compile=false")
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    checkpointed = bool(getattr(base, "is_gradient_checkpointing", False))
    if checkpointed and packed and getattr(base.config, "_attn_implementation", None) == DOCUMENT_SDPA:
        # Per-document sdpa runs eagerly (a loop over documents), and dynamo cannot leave a
        # checkpointed region to run it: every block would fall back to eager, uncompiled.
        raise ConfigError(
            "train.compile=true with model.gradient_checkpointing=true and packed rows needs an attention "
            "backend that compiles: model.attn_implementation=flex_attention (on a GPU); or drop one of the three"
        )
    if checkpointed:
        base.gradient_checkpointing_disable()
    for block in blocks:
        if checkpointed:
            block.forward = functools.partial(_checkpointed, block.forward)
        block.compile()
    log.info("train.compile: compiled %d decoder blocks (%s)%s", len(blocks), type(blocks[0]).__name__,
             ", each checkpointed inside" if checkpointed else "")
    return len(blocks)


def compiled_graphs() -> int:
    """Graphs dynamo has compiled in this process so far: train lines carry it under
    train.compile, so a count still growing after the first steps shows recompiles."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def _checkpointed(forward, *args, **kwargs):
    return checkpoint(forward, *args, use_reentrant=False, **kwargs)
