"""Scoring heads: a linear head on the last token in place of the LM head (objectives
classification and reward), through transformers' sequence-classification classes.

The model is the architecture's `AutoModelForSequenceClassification` class (LlamaForSequence-
Classification, ...), so `final/` is an ordinary Hugging Face classifier: it loads with
`AutoModelForSequenceClassification.from_pretrained` and carries `id2label`. Its own forward pools
one position per row (the last token that is not padding); ftdist pools each document of a packed
row at its own last token instead, so it reads the head's output at every position (`HeadOutput`)
and gathers the positions it wants. Unpacked, the two agree: a row's last real token is the one
transformers pools, provided the pad token never occurs inside a text (the pad token is a
special token of its own in every tokenizer ftdist sets up, or eos, which classification text does
not contain).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

HEAD_NAMES = ("score", "classifier")  # what transformers' sequence-classification classes call their head
# Beside a PEFT adapter (whose directory has no model config): the head the base must be built
# with before the adapter loads, e.g. AutoPeftModelForSequenceClassification.from_pretrained(
# DIR, num_labels=..., id2label=...), as ftdist.score does.
HEAD_FILE = "head.json"


@dataclass(frozen=True)
class ScoreHead:
    """What the head outputs: one score per class (classification) or a single reward score."""

    labels: tuple[str, ...]  # class names in order; a reward model: ("reward",)
    objective: str  # classification | reward
    # transformers' own pooling finds each row's last real token by it; where the model's config
    # has none, the tokenizer's (its pad, or eos) goes into the config.
    pad_token_id: int | None = None

    @property
    def num_labels(self) -> int:
        return len(self.labels)

    def configure(self, config) -> None:
        """Set the head's size and names on a transformers config (before the model is built)."""
        config.num_labels = self.num_labels
        config.id2label = dict(enumerate(self.labels))
        config.label2id = {name: i for i, name in enumerate(self.labels)}
        if getattr(config, "pad_token_id", None) is None and self.pad_token_id is not None:
            config.pad_token_id = self.pad_token_id
        if self.objective == "classification":
            config.problem_type = "single_label_classification"
        # ftdist.score reads it: a reward model prints a score, a classifier labels and probabilities.
        config.ftdist_objective = self.objective

    def write(self, directory: Path) -> None:
        (Path(directory) / HEAD_FILE).write_text(json.dumps(
            {"objective": self.objective, "num_labels": self.num_labels, "labels": list(self.labels)}, indent=2) + "\n")

    @classmethod
    def read(cls, directory: Path) -> ScoreHead | None:
        """The head written beside an adapter, or None where there is none."""
        file = Path(directory) / HEAD_FILE
        if not file.is_file():
            return None
        raw = json.loads(file.read_text())
        return cls(tuple(raw["labels"]), raw["objective"])


def truncate_as_trained(tokenizer, max_seq_len: int):
    """The tokenizer a scoring model is saved with (final/, exports): with model_max_length at
    data.max_seq_len, a transformers pipeline or tokenizer call with truncation=True cuts texts
    where training did, so the saved model scores the ids it was evaluated on."""
    tokenizer.model_max_length = max_seq_len
    return tokenizer


def head_module(model: torch.nn.Module) -> torch.nn.Module:
    """The scoring head of a sequence-classification model (under PEFT: its trainable copy's wrapper)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    for name in HEAD_NAMES:
        module = getattr(base, name, None)
        if isinstance(module, torch.nn.Module):
            return module
    raise TypeError(f"{type(base).__name__} has no scoring head (looked for {', '.join(HEAD_NAMES)})")


class HeadOutput:
    """Keeps the head's output at every position from the latest forward: [B, T, num_labels].

    A forward hook rather than the model's return value: the model returns one pooled row each,
    and packed rows hold several documents. The hooked tensor is the head's own output, so the
    gradient flows through the same graph as transformers' pooled logits would (DDP and ZeRO
    hooks included)."""

    def __init__(self, model: torch.nn.Module):
        self.latest: torch.Tensor | None = None
        self.handle = head_module(model).register_forward_hook(self._keep)

    def _keep(self, module, args, output) -> None:
        self.latest = output

    def take(self) -> torch.Tensor:
        out, self.latest = self.latest, None
        if out is None:
            raise RuntimeError("the scoring head did not run in this forward")
        return out

    def remove(self) -> None:
        self.handle.remove()
