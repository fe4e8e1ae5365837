"""Preference optimization on chosen/rejected pairs: dpo, simpo and orpo (README: "Preference
optimization", with each loss's formula and source).

A micro-batch holds whole pairs: unpacked, one sequence per row in the order chosen, rejected,
chosen, ...; packed (`data.packing`), rows of up to 2 x data.max_seq_len tokens, each holding
whole pairs (both sequences, kept apart by the document masks of ftdist.model.attention). Either
way sequence 2p is pair p's chosen response and 2p + 1 its rejected one, and a sequence's
log-probability is the sum over its labelled (response) tokens.

The loss is a sum over pairs, and `loss_count` the number of pairs: the trainer divides by the
pairs of the whole global batch, so every pair weighs the same whatever micro-batch, rank or
packed row it lands in.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math

import torch
import torch.nn.functional as F

from ftdist.config import FtdistConfig
from ftdist.constants import IGNORE_INDEX
from ftdist.data.example import Example
from ftdist.data.loader import Batch, collate, to_device
from ftdist.data.packing import collate_packed, packed_items
from ftdist.data.preference import Pair
from ftdist.data.prepare import prepare_data
from ftdist.objectives.base import EvalContext, Forward, ObjectiveLoss, TrainingContext, loss_pass

log = logging.getLogger(__name__)

# The metrics TRL's preference trainers log, under the same names (means over the step's pairs).
PAIR_METRICS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
                "logps/rejected", "logps/chosen_preferred")
# logps/chosen_preferred (not TRL's): the fraction of pairs whose chosen response the policy itself
# finds likelier. Unlike DPO's reward accuracy (0 at step 0 by definition: the policy is its
# reference) it measures the model before training too.


@dataclasses.dataclass
class PairBatch(Batch):
    """A micro-batch of whole pairs: sequence 2p is pair p's chosen, 2p + 1 its rejected."""

    sequence_ids: torch.Tensor | None = None  # [B, T]: the sequence each position belongs to (-1: padding)
    num_pairs: int = 0
    response_tokens: torch.Tensor | None = None  # [2P]: labelled tokens of each sequence
    reference_logps: torch.Tensor | None = None  # [2P]: precomputed reference log-probs, where they were

    def to(self, device: torch.device) -> PairBatch:
        moved = super().to(device)
        move = functools.partial(to_device, device=device)
        return dataclasses.replace(moved, sequence_ids=move(self.sequence_ids),
                                   response_tokens=move(self.response_tokens),
                                   reference_logps=move(self.reference_logps))


def collate_pairs(items: list[list[Pair]], pad_token_id: int, packed: bool) -> PairBatch:
    """Pairs -> one micro-batch: each item a packed row of its pairs, or (unpacked) each pair two rows."""
    sequences = [s for item in items for pair in item for s in (pair.chosen, pair.rejected)]
    if packed:
        base = collate_packed([[s for pair in item for s in (pair.chosen, pair.rejected)] for item in items], pad_token_id)
        sequence_ids = torch.full_like(base.input_ids, -1)
        k = 0
        for r, row in enumerate(base.segments):
            for start, n in row:
                sequence_ids[r, start:start + n] = k
                k += 1
    else:
        base = collate(sequences, pad_token_id)
        rows = torch.arange(len(sequences)).unsqueeze(1).expand_as(base.input_ids)
        sequence_ids = torch.where(base.attention_mask.bool(), rows, -1)
    references = [pair.reference_logps for item in items for pair in item]
    reference = None
    if all(r is not None for r in references):
        reference = torch.tensor([x for r in references for x in r], dtype=torch.float32)
    fields = {f.name: getattr(base, f.name) for f in dataclasses.fields(Batch)}
    return PairBatch(
        **fields, sequence_ids=sequence_ids, num_pairs=len(references),
        response_tokens=torch.tensor([sum(label != IGNORE_INDEX for label in s.labels[1:]) for s in sequences]),
        reference_logps=reference,
    )


def sequence_logps(token_logps: torch.Tensor, batch: PairBatch) -> torch.Tensor:
    """[2P] summed log-probabilities of each sequence's labelled tokens (fp32), from the
    forward's token_logps [B, T] (position t holds the log-prob of label t + 1)."""
    labels = batch.labels[:, 1:].reshape(-1)
    per_token = token_logps[:, :-1].reshape(-1)
    on = labels != IGNORE_INDEX
    # Unlabelled positions add 0 to sequence 0 (their id may be -1): a boolean index instead
    # would read the mask's count to the host, a synchronisation per micro-batch.
    sequence = batch.sequence_ids[:, 1:].reshape(-1).clamp(min=0)
    out = torch.zeros(2 * batch.num_pairs, dtype=torch.float32, device=token_logps.device)
    return out.index_add(0, sequence, per_token * on)


def disable_dropout(model: torch.nn.Module) -> int:
    """Set every dropout to 0 (as TRL does): with dropout the policy would differ from its reference
    at step 0, and the loss and rewards would be noise around their true values. Returns how many
    dropouts were active."""
    active = 0
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout) and module.p > 0:
            module.p = 0.0
            active += 1
    return active


def log_sigmoid_smoothed(x: torch.Tensor, smoothing: float) -> torch.Tensor:
    """-(1 - e) log sigmoid(x) - e log sigmoid(-x): the logistic loss with labels flipped at rate e."""
    return -(1 - smoothing) * F.logsigmoid(x) - smoothing * F.logsigmoid(-x)


class PreferenceObjective:
    """What dpo, simpo and orpo share: pair data, packing, collation, metrics, evaluation. A
    subclass gives `pair_losses`: per-pair losses and the rewards its metrics report."""

    name = "preference"
    unit = "pairs"
    task_metric = "eval_rewards/accuracies"
    summary_extra_metrics = ("eval_logps/chosen_preferred",)
    sum_keys: tuple[str, ...] = PAIR_METRICS
    loads_reference_model = False
    reference_forwards = 0

    def __init__(self, cfg: FtdistConfig, tokenizer):
        self.cfg = cfg
        self.options = cfg.objective
        self.pad_token_id = tokenizer.pad_token_id

    def setup(self, ctx: TrainingContext) -> None:
        active = disable_dropout(ctx.strategy.unwrap(ctx.model))
        if active and ctx.strategy.is_main:
            log.info("%s: set %d dropout layers to 0 (policy and reference must agree)", self.name, active)

    # --- data -----------------------------------------------------------------------------

    def prepare_data(self, tokenizer):
        return prepare_data(self.cfg.data, tokenizer, self.cfg.seed)

    def make_items(self, examples: list[Pair]) -> list[list[int]]:
        d = self.cfg.data
        if not d.packing:
            return [[i] for i in range(len(examples))]
        # Each sequence is at most max_seq_len, so the longest pair fits in a row of twice that.
        return packed_items(examples, 2 * d.max_seq_len, self.cfg.seed, d.packing_window)

    def item_length(self, examples: list[Pair], item: list[int]) -> int:
        return sum(len(examples[i]) for i in item)

    def collate(self, examples: list[Pair], items: list[list[int]]) -> PairBatch:
        return collate_pairs([[examples[i] for i in item] for item in items], self.pad_token_id, self.cfg.data.packing)

    def padding_batch(self) -> PairBatch:
        """One pair of one-token sequences with no label: a forward with nothing to learn."""
        sequence = Example([self.pad_token_id], [IGNORE_INDEX])
        return collate_pairs([[Pair(sequence, sequence)]], self.pad_token_id, packed=False)

    # --- loss -----------------------------------------------------------------------------

    def loss_count(self, batch: PairBatch) -> int:
        return batch.num_pairs

    def reference_logps(self, batch: PairBatch) -> torch.Tensor | None:
        """[2P] reference log-probs, or None for a reference-free objective."""
        return None

    def pair_losses(self, batch: PairBatch, logps: torch.Tensor, reference: torch.Tensor | None):
        """(per-pair loss [P], chosen rewards [P], rejected rewards [P]) from the policy's [2P] log-probs."""
        raise NotImplementedError

    def loss(self, forward: Forward, batch: PairBatch) -> ObjectiveLoss:
        # The reference's no-grad forward first: its logits are gone before the policy's forward
        # saves anything for backward, so the two never take memory at once.
        reference = self.reference_logps(batch)
        logps = sequence_logps(forward.token_logps(batch), batch)
        losses, chosen_rewards, rejected_rewards = self.pair_losses(batch, logps, reference)
        with torch.no_grad():
            chosen_rewards, rejected_rewards = chosen_rewards.detach(), rejected_rewards.detach()
            stats = torch.stack([
                chosen_rewards.sum(), rejected_rewards.sum(), (chosen_rewards > rejected_rewards).float().sum(),
                (chosen_rewards - rejected_rewards).sum(), logps[0::2].detach().sum(), logps[1::2].detach().sum(),
                (logps[0::2] > logps[1::2]).float().sum(),
            ]).to(torch.float64)  # left on the device: the trainer reads a step's sums once
        return ObjectiveLoss(losses.sum(), dict(zip(PAIR_METRICS, stats.unbind(), strict=True)))

    def train_metrics(self, count: float, sums: dict[str, float]) -> dict:
        return {"pairs": int(count), **{key: sums[key] / max(count, 1.0) for key in PAIR_METRICS}}

    # --- evaluation -----------------------------------------------------------------------

    def evaluate(self, ctx: EvalContext, with_generation: bool) -> dict:
        """eval_loss and eval_rewards/*, eval_logps/*: means over all validation pairs (all ranks)."""
        loss_sum, count, sums = loss_pass(self, ctx)
        pairs = max(count, 1.0)
        return {"eval_loss": loss_sum / pairs, **{f"eval_{k}": v / pairs for k, v in sums.items()},
                "eval_pairs": int(count)}

    def describe_eval(self, record: dict) -> str:
        return (f"eval_loss {record['eval_loss']:.4f}, reward accuracy {record['eval_rewards/accuracies']:.1%}, "
                f"margin {record['eval_rewards/margins']:.4f}, chosen likelier {record['eval_logps/chosen_preferred']:.1%} "
                f"over {record['eval_pairs']} pairs")


def mean_token_logps(logps: torch.Tensor, batch: PairBatch) -> torch.Tensor:
    """[2P] log-probabilities per response token (length-normalized; an empty response counts 1)."""
    return logps / batch.response_tokens.clamp(min=1).to(logps.dtype)


class SimPOObjective(PreferenceObjective):
    """SimPO (Meng et al. 2024): reference-free, length-normalized, with a target margin gamma."""

    name = "simpo"

    def pair_losses(self, batch, logps, reference):
        o = self.options
        mean = mean_token_logps(logps, batch)
        chosen, rejected = o.beta * mean[0::2], o.beta * mean[1::2]
        return log_sigmoid_smoothed(chosen - rejected - o.gamma, o.label_smoothing), chosen, rejected


def log1m_exp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, accurate near 0 and for very negative x."""
    x = x.clamp(max=-1e-7)
    return torch.where(x > -math.log(2), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


class ORPOObjective(PreferenceObjective):
    """ORPO (Hong et al. 2024): NLL on the chosen response plus beta times an odds-ratio loss,
    both on length-normalized log-probabilities; no reference model."""

    name = "orpo"

    def pair_losses(self, batch, logps, reference):
        mean = mean_token_logps(logps, batch)
        chosen, rejected = mean[0::2], mean[1::2]
        log_odds = (chosen - log1m_exp(chosen)) - (rejected - log1m_exp(rejected))
        losses = -chosen - self.options.beta * F.logsigmoid(log_odds)
        return losses, self.options.beta * chosen, self.options.beta * rejected
