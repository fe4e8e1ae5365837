"""Reward models: a single-score head trained on chosen/rejected pairs with the Bradley-Terry
loss (data.format=preference; README: "Classification and reward models").

Each sequence (prompt + response, rendered as for DPO) is scored by the head at its last token:
r = score(prompt, response). Per pair, with the optional margin m from the row field named by
objective.margin (Touvron et al. 2023, Llama 2) and c = objective.center_rewards (Eisenstein et
al. 2023, as TRL's center_rewards_coefficient):

    loss = -log sigmoid(r_chosen - r_rejected - m) + c (r_chosen + r_rejected)^2

summed over pairs and divided by the pairs of the global batch. Pairs batch and pack as for DPO
(ftdist.objectives.preference): whole pairs per row, each sequence pooled at its own last token.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

from ftdist.data.prepare import prepare_data
from ftdist.model.heads import HeadOutput, ScoreHead, truncate_as_trained
from ftdist.objectives.base import EvalContext, Forward, ObjectiveLoss, TrainingContext, loss_pass
from ftdist.objectives.classification import ScoreBatch, collate_scored, pooled_scores
from ftdist.objectives.preference import PreferenceObjective

REWARD_METRICS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins")


@dataclasses.dataclass
class RewardBatch(ScoreBatch):
    """Sequences of whole pairs, each pooled at its last token: sequence 2p is pair p's chosen."""

    num_pairs: int = 0
    margins: torch.Tensor | None = None  # [P] per-pair margins (zeros without objective.margin)

    def to(self, device: torch.device) -> RewardBatch:
        moved = super().to(device)
        return dataclasses.replace(moved, margins=None if self.margins is None else self.margins.to(device))


class RewardObjective(PreferenceObjective):
    name = "reward"
    task_metric = "eval_accuracy"
    summary_extra_metrics = ()
    sum_keys: tuple[str, ...] = REWARD_METRICS
    head = ScoreHead(("reward",), "reward")

    @classmethod
    def head_for(cls, labels=None) -> ScoreHead:
        """One score, whatever the data."""
        return cls.head

    def __init__(self, cfg, tokenizer):
        super().__init__(cfg, tokenizer)
        self.head_output: HeadOutput | None = None

    def setup(self, ctx: TrainingContext) -> None:
        # Dropout stays as configured: no reference model has to agree with the trained one.
        self.head_output = HeadOutput(ctx.strategy.unwrap(ctx.model))

    def prepare_data(self, tokenizer):
        truncate_as_trained(tokenizer, self.cfg.data.max_seq_len)
        return prepare_data(self.cfg.data, tokenizer, self.cfg.seed, margin_field=self.options.margin)

    def collate(self, examples, items) -> RewardBatch:
        """Packed: each item a row of its pairs' sequences; else each sequence a row of its own."""
        pairs = [[examples[i] for i in item] for item in items]
        sequences = [[s.input_ids for pair in item for s in (pair.chosen, pair.rejected)] for item in pairs]
        if not self.cfg.data.packing:
            sequences = [[ids] for item in sequences for ids in item]
        base = collate_scored(sequences, self.pad_token_id, self.cfg.data.packing)
        margins = [pair.margin or 0.0 for item in pairs for pair in item]
        fields = {f.name: getattr(base, f.name) for f in dataclasses.fields(ScoreBatch)}
        return RewardBatch(**fields, num_pairs=len(margins), margins=torch.tensor(margins, dtype=torch.float32))

    def padding_batch(self) -> RewardBatch:
        """One pad token scored, no pair: a forward with nothing to learn."""
        base = collate_scored([[[self.pad_token_id]]], self.pad_token_id, packed=False)
        fields = {f.name: getattr(base, f.name) for f in dataclasses.fields(ScoreBatch)}
        return RewardBatch(**fields, num_pairs=0, margins=torch.zeros(0))

    def pair_rewards(self, forward: Forward, batch: RewardBatch) -> tuple[torch.Tensor, torch.Tensor]:
        scores = pooled_scores(self.head_output, forward, batch)[:, 0]
        return scores[0::2], scores[1::2]

    def loss(self, forward: Forward, batch: RewardBatch) -> ObjectiveLoss:
        chosen, rejected = self.pair_rewards(forward, batch)
        if batch.num_pairs == 0:  # a padding batch (sharded evaluation): a forward, nothing to learn
            return ObjectiveLoss(chosen.sum() * 0.0, dict.fromkeys(REWARD_METRICS, 0.0))
        losses = -F.logsigmoid(chosen - rejected - batch.margins)
        if self.options.center_rewards:
            losses = losses + self.options.center_rewards * (chosen + rejected) ** 2
        with torch.no_grad():
            stats = torch.stack([chosen.sum(), rejected.sum(), (chosen > rejected).float().sum(),
                                 (chosen - rejected).sum()]).to(torch.float64)  # left on the device
        return ObjectiveLoss(losses.sum(), dict(zip(REWARD_METRICS, stats.unbind(), strict=True)))

    def train_metrics(self, count: float, sums: dict[str, float]) -> dict:
        return {"pairs": int(count), **{key: sums[key] / max(count, 1.0) for key in REWARD_METRICS}}

    def evaluate(self, ctx: EvalContext, with_generation: bool) -> dict:
        """eval_accuracy: the fraction of validation pairs ranked right (chosen scored higher);
        eval_margin: the mean r_chosen - r_rejected; over all ranks' shards."""
        loss_sum, count, sums = loss_pass(self, ctx)
        pairs = max(count, 1.0)
        return {"eval_loss": loss_sum / pairs, "eval_accuracy": sums["rewards/accuracies"] / pairs,
                "eval_margin": sums["rewards/margins"] / pairs, "eval_reward_chosen": sums["rewards/chosen"] / pairs,
                "eval_reward_rejected": sums["rewards/rejected"] / pairs, "eval_pairs": int(count)}

    def describe_eval(self, record: dict) -> str:
        return (f"eval_loss {record['eval_loss']:.4f}, pairs ranked right {record['eval_accuracy']:.1%}, "
                f"margin {record['eval_margin']:.4f} over {record['eval_pairs']} pairs")
