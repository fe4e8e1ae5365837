"""The loss of a step is the mean over all label tokens of the global batch, whatever the split.

Reference: one forward over all examples padded together, cross-entropy averaged over every
label token (an independent computation). micro 1 x accum 4 and micro 4 x accum 1 must both
give its gradient, with examples of very unequal lengths.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from ftdist.config import DataConfig, FtdistConfig, ModelConfig, TinyModelSpec, TrainConfig
from ftdist.data.loader import collate
from ftdist.data.prepare import Example
from ftdist.parallel.base import Strategy
from ftdist.trainer import Trainer


def make_examples(vocab: int) -> list[Example]:
    g = torch.Generator().manual_seed(0)
    out = []
    for length, prompt_len in ((5, 2), (31, 10), (12, 11), (47, 3)):  # label tokens: 3, 21, 1, 44
        ids = torch.randint(10, vocab, (length,), generator=g).tolist()
        labels = [-100] * prompt_len + ids[prompt_len:]
        out.append(Example(ids, labels, None, None))
    return out


def reference_grads(model, examples, pad_id):
    batch = collate(examples, pad_id)
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)), batch.labels[:, 1:].reshape(-1))
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("micro,accum", [(1, 4), (4, 1), (2, 2)])
def test_accumulation_gives_global_token_mean_gradient(tiny_model_dir, tiny_tokenizer, micro, accum, tmp_path):
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    examples = make_examples(base.config.vocab_size)
    ref_loss, ref = reference_grads(copy.deepcopy(base), examples, tiny_tokenizer.pad_token_id)

    cfg = FtdistConfig(
        model=ModelConfig(tiny=TinyModelSpec()),
        data=DataConfig(path="unused", max_seq_len=64),
        train=TrainConfig(micro_batch_size=micro, grad_accum_steps=accum),
        output_dir=str(tmp_path),
    )
    trainer = Trainer(cfg, Strategy(cfg.strategy), copy.deepcopy(base), tiny_tokenizer, examples, [], tmp_path)
    batches = trainer.step_batches(0)
    assert len(batches) == accum
    totals = trainer.forward_backward(batches)
    loss_sum, label_tokens = totals["loss_sum"], totals["label_tokens"]
    assert label_tokens == 3 + 21 + 1 + 44
    assert loss_sum / label_tokens == pytest.approx(ref_loss, rel=1e-5)
    for name, p in trainer.model.named_parameters():
        torch.testing.assert_close(p.grad, ref[name], rtol=1e-4, atol=1e-6, msg=name)
