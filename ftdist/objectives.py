"""Training objectives. Losses are returned as sums over label tokens, never means: the
trainer divides by the label-token count of the whole global batch (all micro-batches, all
ranks), so micro-batches with unequal lengths do not change the gradient."""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def sft_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed next-token cross-entropy over positions whose (shifted) label is not ignored."""
    shift_logits = logits[:, :-1, :].float()
    shift_labels = labels[:, 1:]
    return F.cross_entropy(
        shift_logits.reshape(-1, shift_logits.size(-1)),
        shift_labels.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )
