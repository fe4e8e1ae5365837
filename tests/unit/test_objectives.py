"""The objective seam: a new objective plugs in without touching the trainer.

A toy objective (label-smoothed SFT, which also reports its plain NLL as a train metric) is
registered from here, chosen by `objective.name`, and trained one step with accumulation; its
loss, its extra metric and its eval loss are checked against the same formulas computed by hand,
example by example, on a copy of the initial model."""

from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import random_examples

from ftdist.config import (
    ConfigError,
    DataConfig,
    FtdistConfig,
    ModelConfig,
    ObjectiveConfig,
    TinyModelSpec,
    TrainConfig,
)
from ftdist.constants import IGNORE_INDEX
from ftdist.model.loading import load_model
from ftdist.objectives import OBJECTIVES, check_objective, register_objective
from ftdist.objectives.base import ObjectiveLoss
from ftdist.objectives.sft import SFTObjective
from ftdist.parallel.base import Strategy
from ftdist.trainer import Trainer

SMOOTHING = 0.1


class LabelSmoothedSFT(SFTObjective):
    name = "label_smoothed_sft"
    sum_keys = ("nll",)

    def loss(self, forward, batch) -> ObjectiveLoss:
        logits, labels = forward(batch)[:, :-1].float().flatten(0, 1), batch.labels[:, 1:].flatten()
        smoothed = F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX, label_smoothing=SMOOTHING, reduction="sum")
        nll = F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX, reduction="sum")
        return ObjectiveLoss(smoothed, {"nll": nll.item()})

    def train_metrics(self, count: float, sums: dict[str, float]) -> dict:
        return {**super().train_metrics(count, sums), "nll": sums["nll"] / max(count, 1.0)}


def by_hand(model, examples) -> tuple[float, float, int]:
    """(smoothed loss sum, NLL sum, label tokens) of `examples`, each run alone and unpadded:
    smoothed = (1 - eps) * nll + eps * mean over the vocabulary of -log p."""
    smoothed = nll = 0.0
    count = 0
    with torch.no_grad():
        for e in examples:
            logp = torch.log_softmax(model(torch.tensor([e.input_ids])).logits[0, :-1].double(), dim=-1)
            for pos, label in enumerate(e.labels[1:]):
                if label == IGNORE_INDEX:
                    continue
                nll += -logp[pos, label].item()
                smoothed += (1 - SMOOTHING) * -logp[pos, label].item() + SMOOTHING * -logp[pos].mean().item()
                count += 1
    return smoothed, nll, count


@pytest.fixture()
def toy_registered():
    register_objective(LabelSmoothedSFT.name, LabelSmoothedSFT)
    yield
    OBJECTIVES.pop(LabelSmoothedSFT.name)


def test_a_toy_objective_trains_through_the_unchanged_trainer(toy_registered, tiny_tokenizer, tmp_path):
    cfg = FtdistConfig(
        model=ModelConfig(tiny=TinyModelSpec()),
        data=DataConfig(path="unused", max_seq_len=128),
        train=TrainConfig(micro_batch_size=2, grad_accum_steps=2, max_steps=1),
        objective=ObjectiveConfig(name=LabelSmoothedSFT.name),
        output_dir=str(tmp_path),
    )
    check_objective(cfg)
    model = load_model(cfg.model, torch.device("cpu")).model
    initial = copy.deepcopy(model).eval()
    examples = random_examples(12, seed=5)
    trainer = Trainer(cfg, Strategy(cfg.strategy), model, tiny_tokenizer, examples, examples[8:], tmp_path)
    assert isinstance(trainer.objective, LabelSmoothedSFT)

    step0 = [examples[i] for item in trainer.sampler.global_indices(0) for i in trainer.train_items[item]]
    smoothed, nll, count = by_hand(initial, step0)
    record = trainer.train_step()
    assert record["label_tokens"] == count
    assert record["loss"] == pytest.approx(smoothed / count, rel=1e-5)
    assert record["nll"] == pytest.approx(nll / count, rel=1e-5)
    # The smoothing is really applied: on a random-init model's near-uniform logits it moves the
    # loss little (2.4e-4 relative), but well beyond the 1e-5 the figures match by hand.
    assert record["loss"] != pytest.approx(record["nll"], rel=1e-4)

    trained = copy.deepcopy(trainer.model).eval()
    smoothed, _, count = by_hand(trained, examples[8:])
    evaluated = trainer.evaluate(with_generation=False)
    assert evaluated["eval_label_tokens"] == count
    assert evaluated["eval_loss"] == pytest.approx(smoothed / count, rel=1e-5)


def test_an_unknown_objective_is_a_config_error_naming_the_known_ones():
    cfg = FtdistConfig(data=DataConfig(path="x"), objective=ObjectiveConfig(name="dpoo"), output_dir="/tmp/x")
    with pytest.raises(ConfigError, match=r"objective.name='dpoo' is not an objective; known: .*sft"):
        check_objective(cfg)


def test_the_trainer_holds_no_objective_specific_code():
    source = (Path(__file__).parents[2] / "ftdist" / "trainer.py").read_text()
    specific = re.findall(r"sft_loss|exact_match|\.labels\b|num_label_tokens|collate_packed|pack_documents", source)
    assert specific == []
