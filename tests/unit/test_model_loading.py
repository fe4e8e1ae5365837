"""Model loading through from_pretrained: dtype, gradient checkpointing, the tiny cache."""

from __future__ import annotations

import os
import subprocess
import sys

import torch

from ftdist.config import ModelConfig, TinyModelSpec
from ftdist.model.loading import load_model
from ftdist.objectives.sft import sft_loss_sum


def _loss_and_grads(model, ids):
    model.train()
    logits = model(input_ids=ids).logits
    loss = sft_loss_sum(logits, ids) / (ids.numel() - ids.size(0))
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_gradient_checkpointing_gives_same_loss_and_gradients(tiny_model_dir):
    ids = torch.randint(10, 500, (2, 24), generator=torch.Generator().manual_seed(0))
    plain = load_model(ModelConfig(tiny=TinyModelSpec()), torch.device("cpu")).model
    ckpt = load_model(ModelConfig(tiny=TinyModelSpec(), gradient_checkpointing=True), torch.device("cpu")).model
    assert ckpt.is_gradient_checkpointing and not plain.is_gradient_checkpointing
    loss_a, grads_a = _loss_and_grads(plain, ids)
    loss_b, grads_b = _loss_and_grads(ckpt, ids)
    assert loss_a == loss_b
    for name in grads_a:
        torch.testing.assert_close(grads_b[name], grads_a[name], rtol=1e-5, atol=1e-7)


def test_dtype_is_applied(tiny_model_dir):
    model = load_model(ModelConfig(tiny=TinyModelSpec(), dtype="bf16"), torch.device("cpu")).model
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


def test_tiny_model_builds_once_under_concurrent_builders(tmp_path):
    code = (
        "from ftdist.config import TinyModelSpec; from ftdist.model.tiny import ensure_tiny_model;"
        "print(ensure_tiny_model(TinyModelSpec(hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1,"
        " intermediate_size=64)))"
    )
    env = {**os.environ, "FTDIST_CACHE": str(tmp_path)}
    procs = [subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, text=True) for _ in range(3)]
    # The last line: importing DeepSpeed (where installed) logs its accelerator choice to stdout.
    paths = {p.communicate(timeout=120)[0].strip().splitlines()[-1] for p in procs}
    assert all(p.returncode == 0 for p in procs)
    assert len(paths) == 1
    built = [d for d in (tmp_path / "tiny").iterdir()]
    assert len(built) == 1 and (built[0] / "done").exists()  # no leftover temp directories
