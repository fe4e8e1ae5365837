"""Sequence classification: a scoring head on the last token of each document, cross-entropy
over the classes (data.format=classification; README: "Classification and reward models").

The model is the architecture's sequence-classification class (ftdist.model.heads). A document's
score is the head's output at its last token, read from the head's output at every position, so
a packed row of several documents (`data.packing`, kept apart by the document masks of
ftdist.model.attention) scores each at its own last token and packed equals unpacked.

The loss is a sum over documents (each weighted by its class's weight, objective.class_weights)
and `loss_count` the number of documents: the trainer divides by the documents of the whole
global batch. Evaluation gathers every validation document's probabilities to all ranks and
reports accuracy, macro-F1 and calibration (class_metrics), and writes each document's
prediction to eval/predictions_step_N.jsonl.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging

import numpy as np
import torch
import torch.nn.functional as F

from ftdist.config import FtdistConfig
from ftdist.constants import IGNORE_INDEX
from ftdist.data.example import Document, Example
from ftdist.data.loader import Batch, collate, to_device
from ftdist.data.packing import collate_packed, packed_items
from ftdist.data.prepare import prepare_data
from ftdist.model.heads import HeadOutput, ScoreHead, truncate_as_trained
from ftdist.objectives.base import EvalContext, Forward, ObjectiveLoss, TrainingContext, loss_pass
from ftdist.objectives.class_metrics import classification_report

log = logging.getLogger(__name__)


@dataclasses.dataclass
class ScoreBatch(Batch):
    """A micro-batch of documents to score: where each one's last token is, and its class."""

    pool_rows: torch.Tensor | None = None  # [N] row of each document's last token
    pool_columns: torch.Tensor | None = None  # [N] its position in the row
    targets: torch.Tensor | None = None  # [N] class index (classification); unused by reward models

    def to(self, device: torch.device) -> ScoreBatch:
        moved = super().to(device)
        move = functools.partial(to_device, device=device)
        return dataclasses.replace(moved, pool_rows=move(self.pool_rows), pool_columns=move(self.pool_columns),
                                   targets=move(self.targets))


def collate_scored(items: list[list[list[int]]], pad_token_id: int, packed: bool,
                   targets: list[int] | None = None) -> ScoreBatch:
    """Token sequences -> one micro-batch: each item a packed row of its sequences, or (unpacked)
    each item's single sequence a row of its own; every sequence pooled at its last token."""
    rows = [[Example(ids, [IGNORE_INDEX] * len(ids)) for ids in item] for item in items]
    if packed:
        base = collate_packed(rows, pad_token_id)
        last = [(r, start + n - 1) for r, row in enumerate(base.segments) for start, n in row]
    else:
        base = collate([row[0] for row in rows], pad_token_id)
        last = [(r, len(row[0].input_ids) - 1) for r, row in enumerate(rows)]
    fields = {f.name: getattr(base, f.name) for f in dataclasses.fields(Batch)}
    fields["num_documents"] = len(last)
    return ScoreBatch(
        **fields,
        pool_rows=torch.tensor([r for r, _ in last], dtype=torch.long),
        pool_columns=torch.tensor([c for _, c in last], dtype=torch.long),
        targets=None if targets is None else torch.tensor(targets, dtype=torch.long),
    )


def pooled_scores(head: HeadOutput, forward: Forward, batch: ScoreBatch) -> torch.Tensor:
    """[N, num_labels] fp32 scores of the batch's documents at their last tokens."""
    forward(batch)  # transformers' own pooled logits: one per row, wrong for packed rows
    return head.take()[batch.pool_rows, batch.pool_columns].float()


def class_weights(setting, labels: list[str], counts: dict[str, int]) -> list[float] | None:
    """objective.class_weights as one weight per class, or None (all 1)."""
    if isinstance(setting, str):
        if setting == "none":
            return None
        # auto: n / (classes x count), scikit-learn's "balanced"; a class absent from training gets 0.
        n = sum(counts.values())
        return [n / (len(labels) * counts[name]) if counts[name] else 0.0 for name in labels]
    return [float(w) for w in setting]


class ClassificationObjective:
    name = "classification"
    unit = "documents"
    task_metric = "eval_accuracy"
    summary_extra_metrics = ("eval_macro_f1",)
    sum_keys: tuple[str, ...] = ("correct",)
    loads_reference_model = False
    reference_forwards = 0

    def __init__(self, cfg: FtdistConfig, tokenizer):
        self.cfg = cfg
        self.pad_token_id = tokenizer.pad_token_id
        self.labels: list[str] | None = None  # known once the data is prepared
        self.weights: torch.Tensor | None = None
        self.majority_class = 0
        self.head_output: HeadOutput | None = None
        self.last_report: dict | None = None

    @staticmethod
    def head_for(labels: list[str]) -> ScoreHead:
        """The head of a classifier of these classes: one output per class."""
        return ScoreHead(tuple(labels), "classification")

    @property
    def head(self) -> ScoreHead:
        """The model's head (train.py loads the model with it)."""
        if self.labels is None:
            raise RuntimeError("classification: the label set is known once prepare_data has run")
        return self.head_for(self.labels)

    def setup(self, ctx: TrainingContext) -> None:
        self.head_output = HeadOutput(ctx.strategy.unwrap(ctx.model))
        if self.weights is not None:
            self.weights = self.weights.to(ctx.strategy.device)

    # --- data -----------------------------------------------------------------------------

    def prepare_data(self, tokenizer):
        train, val, report = prepare_data(self.cfg.data, tokenizer, self.cfg.seed, labels=self.cfg.objective.labels)
        truncate_as_trained(tokenizer, self.cfg.data.max_seq_len)
        self.labels = report.labels
        counts = report.label_counts
        self.majority_class = max(range(len(self.labels)), key=lambda i: counts[self.labels[i]])
        weights = class_weights(self.cfg.objective.class_weights, self.labels, counts)
        if weights is not None:
            self.weights = torch.tensor(weights, dtype=torch.float32)
            log.info("classification: class weights %s", dict(zip(self.labels, (round(w, 4) for w in weights))))
        return train, val, report

    def make_items(self, examples: list[Document]) -> list[list[int]]:
        d = self.cfg.data
        if not d.packing:
            return [[i] for i in range(len(examples))]
        return packed_items(examples, d.max_seq_len, self.cfg.seed, d.packing_window)

    def item_length(self, examples: list[Document], item: list[int]) -> int:
        return sum(len(examples[i].input_ids) for i in item)

    def collate(self, examples: list[Document], items: list[list[int]]) -> ScoreBatch:
        return collate_scored([[examples[i].input_ids for i in item] for item in items], self.pad_token_id,
                              self.cfg.data.packing, [examples[i].target for item in items for i in item])

    def padding_batch(self) -> ScoreBatch:
        """A one-token row with no document: a forward with nothing to learn."""
        ids = torch.full((1, 1), self.pad_token_id, dtype=torch.long)
        base = Batch.from_tensors(ids, torch.ones_like(ids), torch.full_like(ids, IGNORE_INDEX))
        empty = torch.zeros(0, dtype=torch.long)
        fields = {f.name: getattr(base, f.name) for f in dataclasses.fields(Batch)}
        return ScoreBatch(**{**fields, "num_documents": 0}, pool_rows=empty, pool_columns=empty, targets=empty)

    # --- loss -----------------------------------------------------------------------------

    def loss_count(self, batch: ScoreBatch) -> int:
        return len(batch.targets)

    def loss(self, forward: Forward, batch: ScoreBatch) -> ObjectiveLoss:
        scores = pooled_scores(self.head_output, forward, batch)
        losses = F.cross_entropy(scores, batch.targets, weight=self.weights, reduction="sum")
        correct = (scores.detach().argmax(dim=-1) == batch.targets).sum().to(torch.float64)  # left on the device
        return ObjectiveLoss(losses, {"correct": correct}, outputs=torch.softmax(scores.detach(), dim=-1))

    def train_metrics(self, count: float, sums: dict[str, float]) -> dict:
        return {"documents_scored": int(count), "accuracy": sums["correct"] / max(count, 1.0)}

    # --- evaluation -----------------------------------------------------------------------

    def evaluate(self, ctx: EvalContext, with_generation: bool) -> dict:
        """Every validation document's class probabilities (all ranks' shards, gathered to every
        rank), then eval_loss, eval_accuracy, eval_macro_f1 and eval_ece over all of them."""
        loss_sum, count, _, mine = loss_pass(self, ctx, keep_outputs=True)
        gathered = sorted(p for part in ctx.strategy.all_gather_object(mine) for p in part)  # by example index
        probs = np.array([p for _, p in gathered], dtype=np.float64).reshape(len(gathered), len(self.labels))
        targets = np.array([ctx.examples[i].target for i, _ in gathered], dtype=np.int64)
        report = classification_report(probs, targets, self.labels, self.majority_class)
        self.last_report = report
        if ctx.strategy.is_main:
            self.write_predictions(ctx, [i for i, _ in gathered], probs)
        return {
            "eval_loss": loss_sum / max(count, 1.0),
            "eval_accuracy": report["accuracy"],
            "eval_macro_f1": report["macro_f1"],
            "eval_ece": report["ece"],
            "eval_documents": report["documents"],
        }

    def write_predictions(self, ctx: EvalContext, index: list[int], probs: np.ndarray) -> None:
        out = ctx.record_path("predictions")
        out.parent.mkdir(parents=True, exist_ok=True)
        with open(out, "w") as f:
            for i, p in zip(index, probs, strict=True):
                f.write(json.dumps({
                    "index": i,  # the validation document's position in the run's validation split
                    "label": ctx.examples[i].label,
                    "predicted": self.labels[int(p.argmax())],
                    "probabilities": dict(zip(self.labels, p.tolist(), strict=True)),
                }) + "\n")

    def describe_eval(self, record: dict) -> str:
        return (f"eval_loss {record['eval_loss']:.4f}, accuracy {record['eval_accuracy']:.1%}, macro-F1 "
                f"{record['eval_macro_f1']:.4f}, ECE {record['eval_ece']:.4f} over {record['eval_documents']} documents")

    def summary_details(self) -> dict:
        """summary.json's classification report: per-class figures, confusion matrix, calibration,
        and the majority baseline, from the last evaluation."""
        return {} if self.last_report is None else {"classification": self.last_report}
