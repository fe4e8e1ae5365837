"""On CUDA: flex_attention trains packed rows (forward and backward), which the CPU suite cannot
check (flex has no backward on CPU). Run with FTDIST_TEST_GPU=1 on a machine with a GPU.

1. One packed batch: the gradients of every parameter under flex equal those under ftdist's
   per-document sdpa (an independent way to keep documents apart), in fp32.
2. A packed training run with flex_attention logs the losses of the same run with per-document
   sdpa, within bf16 tolerance.
"""

from __future__ import annotations

import pytest
import torch
from helpers import FAST, random_examples, read_metrics, run_train
from transformers import AutoModelForCausalLM

from ftdist.data.packing import collate_packed
from ftdist.model.attention import DOCUMENT_SDPA, model_inputs, register_attention_functions

pytestmark = pytest.mark.gpu

register_attention_functions()


@pytest.fixture(autouse=True)
def need_cuda():
    if not torch.cuda.is_available():
        pytest.fail("FTDIST_TEST_GPU=1 but no CUDA device is visible")


def packed_gradients(model_dir: str, backend: str) -> tuple[float, dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation=backend, dtype=torch.float32)
    model = model.cuda().train()
    docs = random_examples(9, seed=5, lo=20, hi=200)
    batch = collate_packed([docs[:5], docs[5:]], pad_token_id=0).to(torch.device("cuda"))
    logits = model(**model_inputs(batch, backend, torch.float32)).logits.float()
    loss = torch.nn.functional.cross_entropy(
        logits[:, :-1].flatten(0, 1), batch.labels[:, 1:].flatten(), ignore_index=-100, reduction="sum"
    )
    loss.backward()
    return loss.item(), {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def test_flex_backward_matches_per_document_sdpa_on_cuda(tiny_model_dir):
    flex_loss, flex = packed_gradients(tiny_model_dir, "flex_attention")
    sdpa_loss, sdpa = packed_gradients(tiny_model_dir, DOCUMENT_SDPA)
    assert flex_loss == pytest.approx(sdpa_loss, rel=1e-4)
    assert flex.keys() == sdpa.keys() and len(flex) > 0
    for name in sdpa:
        scale = sdpa[name].abs().max().item() + 1e-6
        worst = (flex[name] - sdpa[name]).abs().max().item()
        assert worst <= 1e-3 * scale, (name, worst, scale)


def test_flex_packed_training_matches_per_document_sdpa_on_cuda(tmp_path):
    common = [*FAST, "train.max_steps=20", "train.micro_batch_size=4", "data.packing=true"]
    run_train([*common, "model.attn_implementation=flex_attention", f"output_dir={tmp_path}/flex"])
    run_train([*common, "model.attn_implementation=sdpa", f"output_dir={tmp_path}/sdpa"])
    flex, _ = read_metrics(tmp_path / "flex")
    sdpa, _ = read_metrics(tmp_path / "sdpa")
    assert len(flex) == len(sdpa) == 20
    for a, b in zip(sdpa, flex, strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=3e-2), (a["step"], a["loss"], b["loss"])
    assert flex[-1]["loss"] < flex[0]["loss"]
