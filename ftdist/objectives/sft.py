"""Supervised fine-tuning: next-token cross-entropy on the tokens that carry labels (the
responses, unless data.train_on_prompt), over padded or packed rows (`data.packing`).

Rows become examples by ftdist.data (formats instruction, chat, text); evaluation is the
token-weighted loss over the validation set and, where asked, exact match of greedy generations
against the reference responses (`eval.exact_match_samples`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ftdist.config import FtdistConfig
from ftdist.constants import IGNORE_INDEX
from ftdist.data.loader import Batch, collate
from ftdist.data.packing import collate_packed, packed_items
from ftdist.data.prepare import Example, prepare_data
from ftdist.eval.generation import generation_metrics
from ftdist.objectives.base import EvalContext, Forward, ObjectiveLoss, TrainingContext, loss_pass


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


class SFTObjective:
    name = "sft"
    sum_keys: tuple[str, ...] = ()
    loads_reference_model = False
    reference_forwards = 0

    def __init__(self, cfg: FtdistConfig, tokenizer):
        self.cfg = cfg
        self.pad_token_id = tokenizer.pad_token_id
        # summary.json reports each generation metric before and after training; the first listed
        # is the task metric (exact_match by default).
        metrics = tuple(cfg.eval.generation.metrics)
        self.task_metric = metrics[0] if metrics else None
        self.summary_extra_metrics = metrics[1:]

    def setup(self, ctx: TrainingContext) -> None:
        pass

    # --- data -----------------------------------------------------------------------------

    def prepare_data(self, tokenizer):
        return prepare_data(self.cfg.data, tokenizer, self.cfg.seed)

    def make_items(self, examples: list[Example]) -> list[list[int]]:
        d = self.cfg.data
        if not d.packing:
            return [[i] for i in range(len(examples))]
        return packed_items(examples, d.max_seq_len, self.cfg.seed, d.packing_window)

    def item_length(self, examples: list[Example], item: list[int]) -> int:
        return sum(len(examples[i].input_ids) for i in item)

    def collate(self, examples: list[Example], items: list[list[int]]) -> Batch:
        if self.cfg.data.packing:
            return collate_packed([[examples[i] for i in item] for item in items], self.pad_token_id)
        return collate([examples[item[0]] for item in items], self.pad_token_id)

    def padding_batch(self) -> Batch:
        ids = torch.full((1, 1), self.pad_token_id, dtype=torch.long)
        return Batch.from_tensors(ids, torch.ones_like(ids), torch.full_like(ids, IGNORE_INDEX))

    # --- loss -----------------------------------------------------------------------------

    def loss_count(self, batch: Batch) -> int:
        return batch.num_label_tokens

    def loss(self, forward: Forward, batch: Batch) -> ObjectiveLoss:
        return ObjectiveLoss(-forward.token_logps(batch).sum())

    def train_metrics(self, count: float, sums: dict[str, float]) -> dict:
        return {"label_tokens": int(count)}

    # --- evaluation -----------------------------------------------------------------------

    def evaluate(self, ctx: EvalContext, with_generation: bool) -> dict:
        """eval_loss: token-weighted mean over the whole validation set (all ranks' shards)."""
        loss_sum, count, _ = loss_pass(self, ctx)
        record = {"eval_loss": loss_sum / max(count, 1.0), "eval_label_tokens": int(count)}
        gen = ctx.cfg.eval.generation
        if with_generation and gen.samples > 0:
            record_to = ctx.record_path("generations")
            means, total, _ = generation_metrics(
                ctx.model, ctx.tokenizer, ctx.examples, gen, ctx.strategy, record_to,
                reasoning_close=ctx.cfg.data.reasoning_tags[1],
            )
            if total:
                record.update(means)
                record["generation_n"] = total
        return record

    def describe_eval(self, record: dict) -> str:
        return f"eval_loss {record['eval_loss']:.4f}{describe_generation(record, self.cfg.eval.generation.metrics)}"


def describe_generation(record: dict, metrics: list[str]) -> str:
    """', exact_match 50.0%, token_f1 71.2% of 20' for the generation metrics an eval line holds."""
    shown = [f"{m} {record[m]:.1%}" for m in metrics if m in record]
    return f", {', '.join(shown)} of {record['generation_n']}" if shown else ""
