"""On CUDA: packed rows keep a sliding window under flash varlen, flex and per-document sdpa.

flash_attention_2 needs no mask: transformers passes each layer's window to the varlen kernel,
which applies it within each sequence. This checks that claim (and flex's windowed BlockMask
compiled on a GPU) against each document alone through transformers' own eager path. Not yet
run on a GPU when written (no device was lent); the same code with "cuda" swapped for "cpu"
passed for flex and per-document sdpa (5e-6 with the window, 8.0 without). flash in bf16 is
compared only with the leak it prevents: expect to tune that on its first run.
Run with FTDIST_TEST_GPU=1.
"""

from __future__ import annotations

import pytest
import torch
from helpers import random_examples
from transformers import AutoConfig, AutoModelForCausalLM

from ftdist.data.packing import collate_packed
from ftdist.model.attention import (
    DOCUMENT_SDPA,
    flash_attn_available,
    model_inputs,
    register_attention_functions,
    sliding_window_of,
)

pytestmark = pytest.mark.gpu
WINDOW = 16

register_attention_functions()


@pytest.fixture(scope="module")
def mistral_dir(tmp_path_factory, tiny_tokenizer) -> str:
    config = AutoConfig.for_model(
        "mistral", vocab_size=len(tiny_tokenizer), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024, sliding_window=WINDOW,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():  # larger than the default init, so attention past the window shows
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.1)
    path = tmp_path_factory.mktemp("mistral")
    model.save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return str(path)


def packed_error(model_dir, backend, dtype, docs, rows, window_size=None) -> float:
    """Max |packed - alone| over every document; alone is transformers' eager path in fp32."""
    config = AutoConfig.from_pretrained(model_dir)
    if window_size is not None:
        config.sliding_window = window_size
    model = AutoModelForCausalLM.from_pretrained(model_dir, config=config, attn_implementation=backend, dtype=dtype)
    model = model.cuda().eval()
    reference = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="eager").cuda().eval()
    batch = collate_packed(rows, pad_token_id=0).to(torch.device("cuda"))
    worst = 0.0
    with torch.no_grad():
        packed = model(**model_inputs(batch, backend, dtype, sliding_window_of(model.config))).logits.float()
        k = 0
        for r, row in enumerate(rows):
            at = 0
            for doc in row:
                n = len(doc.input_ids)
                alone = reference(input_ids=torch.tensor([doc.input_ids], device="cuda")).logits[0]
                worst = max(worst, (packed[r, at : at + n] - alone).abs().max().item())
                at, k = at + n, k + 1
    return worst


@pytest.mark.parametrize(
    ("backend", "dtype"),
    [("flash_attention_2", torch.bfloat16), ("flex_attention", torch.float32), (DOCUMENT_SDPA, torch.float32)],
)
def test_packed_rows_keep_the_window_on_cuda(mistral_dir, backend, dtype):
    if not torch.cuda.is_available():
        pytest.fail("FTDIST_TEST_GPU=1 but no CUDA device is visible")
    if backend == "flash_attention_2" and not flash_attn_available():
        pytest.skip("flash-attn is not installed")
    docs = random_examples(9, seed=21, lo=40, hi=200)
    rows = [docs[:5], docs[5:]]
    windowed = packed_error(mistral_dir, backend, dtype, docs, rows)
    leaky = packed_error(mistral_dir, backend, dtype, docs, rows, window_size=100_000)  # the window ignored
    print(f"{backend}: max |packed - alone| {windowed:.4g} with the window, {leaky:.4g} without")
    assert leaky > 10 * windowed, (windowed, leaky)
    if dtype == torch.float32:
        assert windowed <= 1e-3, windowed
