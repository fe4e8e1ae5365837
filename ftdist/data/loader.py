"""Which examples each rank trains on at each step, and how they become padded tensors.

The order is defined once for the whole job, independent of world size and accumulation: an
endless stream of seeded per-epoch permutations, cut into global batches of
`world_size * grad_accum_steps * micro_batch_size` examples. Optimizer step s always gets the
same examples, so 2 ranks x micro 2 trains on exactly what 1 process x micro 2 x accum 2 does,
and resuming at step s needs nothing but s. An epoch boundary may fall inside a global batch;
no example is ever dropped.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np
import torch

from ftdist.constants import IGNORE_INDEX
from ftdist.data.prepare import Example


class GlobalBatchSampler:
    def __init__(self, num_examples: int, global_batch_size: int, seed: int, shuffle: bool = True):
        if num_examples <= 0:
            raise ValueError("no training examples")
        self.n = num_examples
        self.global_batch_size = global_batch_size
        self.seed = seed
        self.shuffle = shuffle
        self._perms: dict[int, np.ndarray] = {}

    def _perm(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            if self.shuffle:
                self._perms[epoch] = np.random.default_rng([self.seed, epoch]).permutation(self.n)
            else:
                self._perms[epoch] = np.arange(self.n)
            self._perms.pop(epoch - 2, None)  # steps only move forward; keep memory flat
        return self._perms[epoch]

    def global_indices(self, step: int) -> list[int]:
        start = step * self.global_batch_size
        out = []
        for pos in range(start, start + self.global_batch_size):
            out.append(int(self._perm(pos // self.n)[pos % self.n]))
        return out

    def epoch_at(self, step: int) -> float:
        return step * self.global_batch_size / self.n

    def rank_micro_batches(self, step: int, rank: int, world_size: int, micro_batch_size: int) -> list[list[int]]:
        """This rank's micro-batches (lists of example indices) for optimizer `step`."""
        indices = self.global_indices(step)
        per_rank = self.global_batch_size // world_size
        mine = indices[rank * per_rank : (rank + 1) * per_rank]
        return [mine[i : i + micro_batch_size] for i in range(0, per_rank, micro_batch_size)]


@dataclass
class Batch:
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor
    num_tokens: int  # real (non-padding) tokens
    num_label_tokens: int  # tokens that carry a loss after the next-token shift
    # Packed rows only: positions restart per document; document id per token (-1: padding).
    position_ids: torch.Tensor | None = None
    document_ids: torch.Tensor | None = None
    num_documents: int = 0
    segments: list | None = None  # per row: (start, length) of each document

    def __post_init__(self):
        if not self.num_documents and self.document_ids is None:
            self.num_documents = self.input_ids.size(0)

    @classmethod
    def from_tensors(cls, input_ids, attention_mask, labels, **packed) -> Batch:
        """A batch with its token counts computed from the tensors (one rule for every layout)."""
        return cls(
            input_ids=input_ids,
            attention_mask=attention_mask,
            labels=labels,
            num_tokens=int(attention_mask.sum()),
            num_label_tokens=int((labels[:, 1:] != IGNORE_INDEX).sum()),
            **packed,
        )

    @property
    def document_lengths(self) -> list[int]:
        """Real tokens of each document: packed segments, else each row's unpadded length."""
        if self.segments is not None:
            return [n for row in self.segments for _, n in row]
        return self.attention_mask.sum(dim=1).tolist()

    @property
    def slots(self) -> int:
        """Token positions computed, padding included (the denominator of packing efficiency)."""
        return self.input_ids.numel()

    def to(self, device: torch.device) -> Batch:
        move = functools.partial(to_device, device=device)
        return replace(
            self,
            input_ids=move(self.input_ids),
            attention_mask=move(self.attention_mask),
            labels=move(self.labels),
            position_ids=move(self.position_ids),
            document_ids=move(self.document_ids),
        )


def to_device(t: torch.Tensor | None, device: torch.device) -> torch.Tensor | None:
    """`t` on `device`. To a GPU through pinned memory and without blocking: a copy from
    pageable memory would first wait for everything queued on the device (the previous
    micro-batch's backward), a host synchronisation per micro-batch."""
    if t is None:
        return None
    if device.type == "cuda" and t.device.type == "cpu":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def collate(examples: Sequence[Example], pad_token_id: int) -> Batch:
    """Right-pad to the longest example; padding gets no attention and no label."""
    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    for row, e in enumerate(examples):
        n = len(e.input_ids)
        ids[row, :n] = torch.tensor(e.input_ids)
        mask[row, :n] = 1
        labels[row, :n] = torch.tensor(e.labels)
    return Batch.from_tensors(ids, mask, labels)


def eval_batches(lengths: Sequence[int], rank: int, world_size: int, batch_size: int) -> list[list[int]]:
    """This rank's share of the validation rows, grouped by length to waste little padding.

    eval_loss is a token-weighted sum over all shards, so how rows are grouped does not matter.
    """
    mine = sorted(range(rank, len(lengths), world_size), key=lambda i: lengths[i])
    return [mine[i : i + batch_size] for i in range(0, len(mine), batch_size)]


def eval_shard(lengths: Sequence[int], rank: int, world_size: int, batch_size: int,
               shards_parameters: bool) -> tuple[list[list[int]], int]:
    """(this rank's eval_batches, how many padding batches it runs after them). Where parameters
    are sharded every forward is a collective, so a rank with fewer batches matches the busiest
    one with forwards whose results it drops."""
    mine = eval_batches(lengths, rank, world_size, batch_size)
    if not shards_parameters:
        return mine, 0
    most = max(len(eval_batches(lengths, r, world_size, batch_size)) for r in range(world_size))
    return mine, most - len(mine)
