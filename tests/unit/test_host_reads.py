"""A training step reads the device to the host once: the micro-batches' forwards and backwards
queue work without waiting on it, and the optimizer step reads the step's figures together with
the gradient norm it must check anyway.

On CPU there is no queue to stall, but the reads are the same calls: every Tensor.item, tolist,
bool, float and int made while the trainer runs is counted, except in torch.optim (AdamW's step
counters live on the host on every device)."""

from __future__ import annotations

import collections
import contextlib
import sys

import pytest
import torch
from helpers import random_examples, random_pairs

from ftdist.config import DataConfig, FtdistConfig, ModelConfig, ObjectiveConfig, TinyModelSpec, TrainConfig
from ftdist.model.loading import load_model
from ftdist.parallel.base import Strategy
from ftdist.trainer import Trainer

READS = ("item", "tolist", "__bool__", "__float__", "__int__", "__index__")


@contextlib.contextmanager
def counting_reads():
    """Count tensor reads by the code that made them (file:line outside torch's own frames)."""
    reads: collections.Counter = collections.Counter()
    saved = {name: getattr(torch.Tensor, name) for name in READS}

    def wrapper(name):
        original = saved[name]

        def read(self, *args, **kwargs):
            frame = sys._getframe(1)
            while frame is not None and "/torch/" in frame.f_code.co_filename and "/torch/optim/" not in frame.f_code.co_filename:
                frame = frame.f_back
            where = "?" if frame is None else f"{frame.f_code.co_filename}:{frame.f_lineno}"
            if "/torch/optim/" not in where:
                reads[where] += 1
            return original(self, *args, **kwargs)

        return read

    for name in READS:
        setattr(torch.Tensor, name, wrapper(name))
    try:
        yield reads
    finally:
        for name, original in saved.items():
            setattr(torch.Tensor, name, original)


@pytest.mark.parametrize("objective", ["sft", "simpo"])
def test_a_step_of_eight_micro_batches_reads_the_device_once(tmp_path, tiny_tokenizer, objective):
    pairs = objective != "sft"
    cfg = FtdistConfig(
        model=ModelConfig(tiny=TinyModelSpec()),
        data=DataConfig(path="unused", format="preference" if pairs else "instruction", max_seq_len=64, packing=True),
        train=TrainConfig(micro_batch_size=1, grad_accum_steps=8, max_steps=2),
        objective=ObjectiveConfig(name=objective),
        output_dir=str(tmp_path),
    )
    examples = random_pairs(40) if pairs else random_examples(60, hi=40)
    model = load_model(cfg.model, torch.device("cpu"), cfg.peft).model
    trainer = Trainer(cfg, Strategy(cfg.strategy), model, tiny_tokenizer, examples, [], tmp_path)
    batches = trainer.step_batches(0)  # collated on the host, before any device work
    assert len(batches) == 8
    with counting_reads() as reads:
        totals = trainer.accumulate(batches)
    assert dict(reads) == {}, "reads of device values while the micro-batches run"
    with counting_reads() as reads:
        grad_norm, _, values = trainer.optimizer_step(totals)
    assert sum(reads.values()) == 1 and all("parallel/base.py" in where for where in reads), dict(reads)
    figures = trainer.totals_of(values)
    assert figures["count"] > 0 and figures["loss_sum"] > 0 and grad_norm > 0
