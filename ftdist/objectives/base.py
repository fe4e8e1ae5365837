"""What a training objective is to the trainer: the seam new objectives plug into.

An objective owns everything that differs between, say, supervised fine-tuning and preference
optimization: how a row becomes an example, how items (examples, or packed rows of several)
become a micro-batch, the loss of a micro-batch, the metrics it adds to train and eval lines,
and its evaluation pass. The trainer owns what they share: accumulation, the all-reduce of the
global normaliser, clipping, stepping, checkpoints, logging and preemption.

The loss contract: `loss` returns a SUM over the objective's units (label tokens for SFT, pairs
for DPO, sequences for a classifier) and `loss_count` says how many units a micro-batch holds,
known before any forward. The trainer all-reduces the counts of the whole global batch (every
micro-batch on every rank) first and divides each micro-batch's sum by that total, so unequal
lengths, accumulation splits and world sizes all give the same gradient.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from ftdist.data.loader import eval_shard


class MicroBatch(Protocol):
    """What the trainer reads of any objective's micro-batch: token accounting for the train
    line (tokens, packing efficiency, FLOPs) and the move to the device."""

    num_tokens: int  # real (non-padding) tokens
    num_documents: int

    @property
    def slots(self) -> int: ...  # token positions computed, padding included

    @property
    def document_lengths(self) -> list[int]: ...  # real tokens of each document (FLOPs count)

    def to(self, device: torch.device) -> MicroBatch: ...


@dataclass
class ObjectiveLoss:
    """One micro-batch's loss as a sum (a tensor to backpropagate), and any further sums the
    objective's metrics need (keyed by its `sum_keys`, summed over the global batch before
    `train_metrics` sees them)."""

    loss_sum: torch.Tensor
    sums: dict[str, float | torch.Tensor] = field(default_factory=dict)  # 0-dim device tensors: no host read
    # Optional: one row per unit, in the micro-batch's order (a classifier's class probabilities),
    # which loss_pass(..., keep_outputs=True) hands back with each unit's example index.
    outputs: torch.Tensor | None = None


# ftdist.trainer.BoundForward: forward(batch) -> logits (or scores), under the run's precision;
# forward.token_logps(batch) -> [B, T] fp32 label log-probs from the chunked LM head.
Forward = Any


@dataclass
class EvalContext:
    """What an evaluation pass may use: the unwrapped model in eval mode, the forward the
    trainer uses (autocast, attention masks), the strategy's collectives, the validation set."""

    model: torch.nn.Module
    forward: Forward
    strategy: Any  # ftdist.parallel.base.Strategy
    tokenizer: Any
    examples: list
    items: list[list[int]]
    batch_size: int
    step: int
    run_dir: Path
    cfg: Any  # ftdist.config.FtdistConfig
    # None during training: per-example records go to run_dir/eval/KIND_step_N.jsonl; ftdist.eval
    # names the model instead (eval/KIND_base.jsonl, eval/KIND_tuned.jsonl).
    record_tag: str | None = None
    # (path, device) -> a loaded reward model (ftdist.score.load_reward_model), for an objective
    # that scores with one (GRPO's reward_model:PATH); passed in, as ftdist.score imports the objectives.
    load_reward_model: Callable | None = None

    def record_path(self, kind: str) -> Path:
        """Where this pass writes its per-example records of `kind` (generations, predictions)."""
        name = f"{kind}_{self.record_tag}" if self.record_tag else f"{kind}_step_{self.step:08d}"
        return self.run_dir / "eval" / f"{name}.jsonl"


@dataclass
class TrainingContext:
    """What an objective may bind to once the trainer has prepared the model (Objective.setup):
    DPO's reference forward and its precomputed log-probs need the policy, the strategy and,
    where one was loaded, the frozen reference model."""

    model: torch.nn.Module  # the policy, as the strategy wrapped it
    strategy: Any  # ftdist.parallel.base.Strategy
    logits: Callable[[torch.nn.Module, Any], torch.Tensor]  # (model, micro-batch) -> logits, as the trainer runs it
    reference_model: torch.nn.Module | None  # frozen and placed by strategy.prepare_frozen, where one was loaded
    bf16: bool  # whether this run computes in bf16
    train_examples: list
    val_examples: list
    run_dir: Path
    load_reward_model: Callable | None = None  # as EvalContext.load_reward_model


class Objective(Protocol):
    name: str
    # The eval metric summary.json reports before and after training ("exact_match" for SFT:
    # exact_match_before/after), or None.
    task_metric: str | None
    # Optional: summary_extra_metrics, further eval metrics reported before and after training.
    # Keys of ObjectiveLoss.sums, fixed up front: every rank all-reduces the same list, even a
    # rank that evaluates no batch.
    sum_keys: tuple[str, ...]

    # Optional: `unit`, what an example is called in the log ("examples", "pairs", "documents").
    # Whether train.py loads a second, frozen model for this objective (DPO's reference=model).
    loads_reference_model: bool
    # Optional: `head`, a ftdist.model.heads.ScoreHead (read after prepare_data): the model is then
    # the architecture's sequence-classification class with that head instead of the causal LM.
    # Optional: summary_details() -> dict merged into summary.json (classification's report).
    # No-grad forwards over each micro-batch beyond the trained one (DPO's live reference): the
    # step's FLOPs (MFU) count them.
    reference_forwards: int
    # Optional, for on-policy objectives (GRPO):
    # - prepare_step(batches, step) -> batches: the step's collated items (prompts) turned into
    #   what the loss trains on (rollouts), before the step's counts are taken; every rank calls it
    #   with as many micro-batches.
    # - updates_per_batch: optimizer steps per sampler batch (GRPO's iterations); default 1.
    # - state_dict() -> dict | None and load_state_dict(state, step): per-rank state a checkpoint
    #   keeps (rollouts a resume cannot regenerate).
    # - check_config(cfg) (a static method): checks before launch that config.validate cannot make.

    def setup(self, ctx: TrainingContext) -> None:
        """Bind to the prepared model before the first step (and before a checkpoint loads)."""
        ...

    def prepare_data(self, tokenizer) -> tuple[list, list, Any]:
        """(train examples, validation examples, report with to_dict()) from the run's `data.*`."""
        ...

    def make_items(self, examples: list) -> list[list[int]]:
        """What the sampler orders and a micro-batch holds: lists of example indices."""
        ...

    def item_length(self, examples: list, item: list[int]) -> int:
        """Tokens of an item (evaluation groups items of similar length)."""
        ...

    def collate(self, examples: list, items: list[list[int]]) -> MicroBatch: ...

    def padding_batch(self) -> MicroBatch:
        """A forward with nothing to learn: keeps sharded ranks in step when one has fewer batches."""
        ...

    def loss_count(self, batch: MicroBatch) -> int:
        """Units this micro-batch's loss sums over (its share of the global normaliser)."""
        ...

    def loss(self, forward: Forward, batch: MicroBatch) -> ObjectiveLoss: ...

    def train_metrics(self, count: float, sums: dict[str, float]) -> dict:
        """Fields of the train line from the global batch's count and sums."""
        ...

    def evaluate(self, ctx: EvalContext, with_generation: bool) -> dict:
        """Fields of an eval line (the trainer adds the step); a collective on every rank."""
        ...

    def describe_eval(self, record: dict) -> str:
        """The eval line for the log, e.g. 'eval_loss 0.1234, exact_match 50.0% of 20'."""
        ...


def loss_pass(objective: Objective, ctx: EvalContext, keep_outputs: bool = False):
    """The validation set's loss sum, count and metric sums over all ranks' shards; with
    keep_outputs, also this rank's (example index, output row) for each unit of its shard, from
    ObjectiveLoss.outputs (one unit per example, in the order of the items' examples).

    Each rank takes a share of the items, grouped by length to waste little padding; the
    result is a sum, so the grouping does not change it."""
    lengths = [objective.item_length(ctx.examples, item) for item in ctx.items]
    strategy = ctx.strategy
    mine, padding = eval_shard(lengths, strategy.rank, strategy.world_size, ctx.batch_size, strategy.shards_parameters)
    loss_sum, count, sums, outputs = 0.0, 0, {}, []
    for idx in mine:
        items = [ctx.items[j] for j in idx]
        batch = objective.collate(ctx.examples, items).to(strategy.device)
        out = objective.loss(ctx.forward, batch)
        loss_sum += out.loss_sum.item()
        count += objective.loss_count(batch)
        for key, value in out.sums.items():
            sums[key] = sums.get(key, 0.0) + float(value)
        if keep_outputs:
            outputs += zip([i for item in items for i in item], out.outputs.tolist(), strict=True)
    # The whole loss runs, not just the forward: an objective's loss may hold further sharded
    # forwards (DPO's reference), and every rank must run as many of those too.
    for _ in range(padding):
        objective.loss(ctx.forward, objective.padding_batch().to(strategy.device))
    keys = objective.sum_keys
    total_loss, total_count, *values = strategy.all_reduce_sum([loss_sum, count, *(sums.get(k, 0.0) for k in keys)])
    totals = total_loss, total_count, dict(zip(keys, values, strict=True))
    return (*totals, outputs) if keep_outputs else totals
