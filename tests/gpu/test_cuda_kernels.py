"""On CUDA: the chunked LM head in bf16, and Liger-Kernel (model.liger=true), against the eager path.

Not yet run on a GPU when written (no device was lent). Run with FTDIST_TEST_GPU=1; the Liger
cases need `pip install 'ftdist[liger]'`."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from helpers import random_examples
from transformers import AutoModelForCausalLM

from ftdist.config import StrategyConfig
from ftdist.data.packing import collate_packed
from ftdist.model import lm_head
from ftdist.model.forward import ModelForward
from ftdist.parallel import build_strategy

pytestmark = pytest.mark.gpu


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def loss_and_grads(model, forward, batch):
    model.zero_grad(set_to_none=True)
    loss = -forward.token_logps(batch).sum()
    loss.backward()
    return loss.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def test_bf16_parameters_take_fp32_logits_chunk_by_chunk(tiny_model_dir):
    """bf16 weights: the chunked head multiplies with fp32 accumulation and output (out_dtype)."""
    strategy = build_strategy(StrategyConfig(name="single"))
    batch = collate_packed([random_examples(4, seed=1, hi=60)], 0).to(torch.device("cuda"))
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.bfloat16).cuda()
    chunked = ModelForward(model, strategy, bf16=True, loss_chunk_tokens=16).bind(model)
    got = chunked.token_logps(batch)
    assert got.dtype == torch.float32
    with torch.no_grad():
        hidden = model.model(input_ids=batch.input_ids, position_ids=batch.position_ids).last_hidden_state
        want = lm_head.label_logps(hidden.float(), model.lm_head.weight.float(), None,
                                   lm_head.shifted_targets(batch.labels), 0)
    assert relative(got.detach(), want) < 1e-2  # bf16 hidden states; the logits themselves unrounded


@pytest.mark.skipif(importlib.util.find_spec("liger_kernel") is None, reason="pip install 'ftdist[liger]'")
def test_liger_kernels_train_like_the_eager_path(tiny_model_dir):
    from ftdist.model.liger import apply_liger

    strategy = build_strategy(StrategyConfig(name="single"))
    batch = collate_packed([random_examples(4, seed=2, hi=60), random_examples(3, seed=3, hi=60)], 0)
    batch = batch.to(torch.device("cuda"))
    eager = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).cuda()
    want_loss, want = loss_and_grads(eager, ModelForward(eager, strategy, bf16=False).bind(eager), batch)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).cuda()
    apply_liger(model, torch.device("cuda"))
    got_loss, got = loss_and_grads(model, ModelForward(model, strategy, bf16=False, liger=True).bind(model), batch)
    assert relative(got_loss, want_loss) < 1e-5
    assert got.keys() == want.keys()
    for name in want:
        assert relative(got[name], want[name]) < 1e-4, name
