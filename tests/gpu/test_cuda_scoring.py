"""On CUDA: a classifier's packed documents score as each alone (bf16, sdpa and flex_attention),
and under QLoRA the scoring head trains in fp32 on a 4-bit base. Run with FTDIST_TEST_GPU=1 on a
machine with a GPU (benchmarks/gpu_checks.sh step 3); never yet run on a GPU."""

from __future__ import annotations

import copy

import pytest
import torch

from ftdist.config import ModelConfig, PeftConfig, TinyModelSpec
from ftdist.data.example import Document
from ftdist.model.attention import model_inputs, register_attention_functions
from ftdist.model.heads import HeadOutput, ScoreHead
from ftdist.model.loading import load_model
from ftdist.objectives.classification import collate_scored

pytestmark = pytest.mark.gpu

register_attention_functions()
HEAD = ScoreHead(("a", "b", "c"), "classification")


def documents(n: int) -> list[Document]:
    g = torch.Generator().manual_seed(0)
    return [Document(torch.randint(10, 800, (int(torch.randint(5, 120, (1,), generator=g)),), generator=g).tolist(),
                     "a", 0) for _ in range(n)]


@pytest.mark.parametrize("attn", ["sdpa", "flex_attention"])
def test_packed_documents_score_as_each_alone_on_cuda(attn):
    device = torch.device("cuda")
    torch.manual_seed(0)
    model = load_model(ModelConfig(tiny=TinyModelSpec(), dtype="bf16", attn_implementation=attn), device,
                       head=HEAD).model.eval()
    head = HeadOutput(model)
    docs = documents(12)
    batch = collate_scored([[d.input_ids for d in docs[:6]], [d.input_ids for d in docs[6:]]], 0, packed=True)
    batch = batch.to(device)
    attn_name = model.config._attn_implementation
    with torch.no_grad():
        model(**model_inputs(batch, attn_name, torch.bfloat16, None))
        packed = head.take()[batch.pool_rows, batch.pool_columns].float()
        for i, d in enumerate(docs):
            alone = model(input_ids=torch.tensor([d.input_ids], device=device)).logits[0].float()
            torch.testing.assert_close(packed[i], alone, rtol=2e-2, atol=2e-2)


def test_qlora_head_trains_in_fp32_on_a_4bit_base():
    device = torch.device("cuda")
    torch.manual_seed(0)
    model = load_model(ModelConfig(tiny=TinyModelSpec(), dtype="bf16"), device,
                       PeftConfig(method="qlora", r=4, dropout=0.0), head=HEAD).model
    head = HeadOutput(model)
    trained = {n: p for n, p in model.named_parameters() if p.requires_grad and "score" in n}
    assert trained and all(p.dtype == torch.float32 for p in trained.values())
    before = {n: p.detach().clone() for n, p in trained.items()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    ids = torch.randint(10, 800, (4, 32), device=device)
    model(input_ids=ids)
    loss = torch.nn.functional.cross_entropy(head.take()[:, -1].float(), torch.tensor([0, 1, 2, 0], device=device))
    loss.backward()
    optimizer.step()
    assert all(not torch.equal(before[n], p) for n, p in trained.items())
    assert copy.deepcopy(model.config.id2label) == {0: "a", 1: "b", 2: "c"}
