"""README: "resuming with another seed, global batch or dataset is refused". The batches of
step s are a function of (seed, global batch, the training items), so a checkpoint records all
three, the data as a sha256 of every example's token ids and labels: other data of the same
size is refused too, naming what differs. A checkpoint written before the fingerprint existed
resumes with a warning. (End to end: tests/integration/test_run_dir_claims.py.)
"""

from __future__ import annotations

import copy
import logging

import pytest
import torch
from helpers import random_examples

from ftdist.config import ConfigError, DataConfig, FtdistConfig, ModelConfig, TinyModelSpec, TrainConfig
from ftdist.data.prepare import Example
from ftdist.parallel.base import Strategy
from ftdist.trainer import Trainer


@pytest.fixture(scope="module")
def tiny_model(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)


@pytest.fixture()
def make_trainer(tiny_model, tiny_tokenizer, tmp_path):
    def make(examples, seed: int = 0, micro: int = 2) -> Trainer:
        cfg = FtdistConfig(
            model=ModelConfig(tiny=TinyModelSpec()),
            data=DataConfig(path="unused", max_seq_len=64),
            train=TrainConfig(micro_batch_size=micro, max_steps=4),
            seed=seed,
            output_dir=str(tmp_path),
        )
        return Trainer(cfg, Strategy(cfg.strategy), copy.deepcopy(tiny_model), tiny_tokenizer, examples, [], tmp_path)

    return make


def test_the_same_data_resumes(make_trainer):
    saved = make_trainer(random_examples(12)).checkpoint_state()
    make_trainer(random_examples(12)).check_resumable(saved, "ckpt")  # rebuilt, equal: no error


def other_labels(examples: list[Example]) -> list[Example]:
    """The same token ids with the loss on every token (as data.train_on_prompt=true gives)."""
    return [Example(e.input_ids, list(e.input_ids)) for e in examples]


@pytest.mark.parametrize(
    "change",
    [
        lambda ex: random_examples(len(ex), seed=1),  # another dataset of the same size
        other_labels,  # same tokens, other labels
        lambda ex: ex[1:] + ex[:1],  # same examples in another order (the sampler indexes them)
    ],
    ids=["other_rows", "other_labels", "other_order"],
)
def test_other_data_of_the_same_size_is_refused_naming_the_data(make_trainer, change):
    examples = random_examples(12)
    saved = make_trainer(examples).checkpoint_state()
    with pytest.raises(ConfigError) as err:
        make_trainer(change(examples)).check_resumable(saved, "ckpt")
    message = str(err.value)
    assert "ckpt" in message and "other training data" in message and "same number of items (12)" in message
    assert saved["train_data_sha256"][:12] in message


@pytest.mark.parametrize("key,kwargs,value", [("seed", {"seed": 1}, "seed=0"), ("global batch", {"micro": 3}, "global_batch_size=2")])
def test_another_seed_or_global_batch_is_refused(make_trainer, key, kwargs, value):
    saved = make_trainer(random_examples(12)).checkpoint_state()
    with pytest.raises(ConfigError, match=value):
        make_trainer(random_examples(12), **kwargs).check_resumable(saved, "ckpt")


def test_a_checkpoint_without_the_fingerprint_resumes_with_a_warning(make_trainer, caplog):
    saved = make_trainer(random_examples(12)).checkpoint_state()
    del saved["train_data_sha256"]  # as checkpoints written before it existed
    with caplog.at_level(logging.WARNING, logger="ftdist"):
        make_trainer(random_examples(12, seed=1)).check_resumable(saved, "old_ckpt")
    assert any("old_ckpt" in r.getMessage() and "fingerprint" in r.getMessage() for r in caplog.records)
