"""How every pass of a run calls the model: its precision, its attention masks, its LM head.

`ModelForward` is built once per run from the unwrapped model, before wrapping; `bind(model)`
gives the callable the objectives get (`Forward` in ftdist.objectives.base).
"""

from __future__ import annotations

import contextlib

import torch

from ftdist.compat import require_attr
from ftdist.model import lm_head
from ftdist.model.attention import model_inputs, sliding_window_of


class ModelForward:
    """(model, micro-batch) -> logits as every pass of a run computes them: the run's precision
    (bf16 autocast where the strategy does not already cast) and the masks packed rows need
    under the backend the model loaded with. Built from the unwrapped model, before wrapping.

    `token_logps` gives what the losses use instead of logits: each position's log-probability
    of its next label, in fp32, from the LM head computed chunk by chunk (ftdist.model.lm_head)."""

    def __init__(self, model: torch.nn.Module, strategy, bf16: bool, loss_chunk_tokens: int | None = None,
                 liger: bool = False):
        self.attn_implementation = require_attr(
            model.config, "_attn_implementation", "transformers", "packed batches need the backend the model loaded with"
        )
        self.sliding_window = sliding_window_of(model.config)
        self.model_dtype = next(model.parameters()).dtype
        self.device_type = strategy.device.type
        self.autocast = bf16 and not strategy.handles_mixed_precision
        self.loss_chunk_tokens = loss_chunk_tokens
        self.liger = liger
        self.heads: dict[int, torch.nn.Module | None] = {}  # id(model) -> its patched LM head (None: none)

    def precision(self):
        """The run's compute precision as a context: bf16 autocast where the strategy does not already cast."""
        return torch.autocast(self.device_type, dtype=torch.bfloat16) if self.autocast else contextlib.nullcontext()

    def __call__(self, model: torch.nn.Module, batch) -> torch.Tensor:
        with self.precision():
            return model(**model_inputs(batch, self.attn_implementation, self.model_dtype, self.sliding_window)).logits

    def token_logps(self, model: torch.nn.Module, batch, temperature: float = 1.0,
                    entropy: torch.Tensor | None = None) -> torch.Tensor:
        """[B, T] fp32: log p(labels[:, t + 1]) at position t, 0 where that label is ignored,
        under logits / temperature. entropy: a [B, T] fp32 tensor to fill with each position's
        entropy (no gradient; policy optimization logs it)."""
        head = self.head_of(model)
        if head is None:  # a head ftdist cannot chunk: full logits, then fp32 log-softmax
            return lm_head.logits_label_logps(self(model, batch), batch.labels, temperature, entropy)
        with lm_head.targets(head, lm_head.shifted_targets(batch.labels), temperature, entropy):
            return self(model, batch)

    def head_of(self, model: torch.nn.Module) -> torch.nn.Module | None:
        if id(model) not in self.heads:
            self.heads[id(model)] = lm_head.install_in(model, self.loss_chunk_tokens, self.liger)
        return self.heads[id(model)]

    def bind(self, model: torch.nn.Module) -> BoundForward:
        return BoundForward(self, model)


class BoundForward:
    """A ModelForward for one model: `forward(batch)` gives logits (or a scoring head's scores),
    `forward.token_logps(batch)` the label log-probs the losses use."""

    def __init__(self, forward: ModelForward, model: torch.nn.Module):
        self.forward, self.model = forward, model

    def __call__(self, batch) -> torch.Tensor:
        return self.forward(self.model, batch)

    def token_logps(self, batch, temperature: float = 1.0, entropy: torch.Tensor | None = None) -> torch.Tensor:
        return self.forward.token_logps(self.model, batch, temperature, entropy)
