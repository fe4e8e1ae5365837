"""On CUDA: every packed document's logits equal the document alone, for flex_attention and
sdpa, within bf16 tolerance. Run with FTDIST_TEST_GPU=1 on a machine with a GPU.

flex_attention history: on an H200 with torch 2.11 the compiled flex kernel failed in inference
with inductor's NoValidChoicesError. The documents run alone here are 20-200 tokens; under 128
query tokens without grad inductor picks its flex-decoding kernel, whose GQA tile overflows the
block mask's query block for 64 < T < 128 (pytorch/pytorch#185349). ftdist now passes
FLEX_KERNEL_OPTIONS (the main flex kernel for every length); the second test isolates the case.
"""

from __future__ import annotations

import traceback

import pytest
import torch
from helpers import random_examples
from transformers import AutoModelForCausalLM

from ftdist.data.packing import collate_packed
from ftdist.model.attention import (
    DOCUMENT_SDPA,
    FLEX_KERNEL_OPTIONS,
    attention_kwargs,
    model_inputs,
    register_attention_functions,
)

pytestmark = pytest.mark.gpu


register_attention_functions()


def _fail_clearly(what: str, error: BaseException):
    """pytest.fail with the exception's type and first lines up front (inductor errors are long)."""
    lines = "".join(traceback.format_exception_only(type(error), error)).strip().splitlines()
    head = "\n".join(lines[:12])
    pytest.fail(
        f"{what} failed on {torch.cuda.get_device_name()} (torch {torch.__version__}, "
        f"triton {_triton_version()}): {type(error).__name__}\n{head}",
        pytrace=False,
    )


def _triton_version() -> str:
    try:
        import triton

        return triton.__version__
    except ImportError:
        return "absent"


@pytest.mark.parametrize("backend", ["flex_attention", "sdpa", DOCUMENT_SDPA])
def test_packed_logits_match_alone_on_cuda_bf16(tiny_model_dir, backend):
    if not torch.cuda.is_available():
        pytest.fail("FTDIST_TEST_GPU=1 but no CUDA device is visible")
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation=backend, dtype=torch.bfloat16)
    model = model.cuda().eval()
    docs = random_examples(9, seed=11, lo=20, hi=200)
    rows = [docs[:5], docs[5:]]
    batch = collate_packed(rows, pad_token_id=0).to(torch.device("cuda"))
    extra = attention_kwargs(backend)
    lengths = []
    try:
        with torch.no_grad():
            packed = model(**model_inputs(batch, backend, torch.bfloat16)).logits.float()
            worst = 0.0
            for r, row in enumerate(rows):
                at = 0
                for doc in row:
                    n = len(doc.input_ids)
                    lengths.append(n)
                    alone = model(input_ids=torch.tensor([doc.input_ids], device="cuda"), **extra).logits[0].float()
                    worst = max(worst, (packed[r, at : at + n] - alone).abs().max().item())
                    at += n
    except Exception as e:  # noqa: BLE001 - reported with the context that matters
        _fail_clearly(f"{backend} forward (documents alone so far: lengths {lengths})", e)
    # bf16 keeps ~3 significant digits; logits here are O(1-10).
    assert worst <= 0.1, worst
    print(f"{backend}: max |packed - alone| = {worst:.4f} (alone lengths {lengths})")


def test_flex_short_gqa_query_without_grad_on_cuda():
    """The failing case alone: compiled flex, no grad, Q_LEN=100, 2 query heads per KV head.

    With FLEX_KERNEL_OPTIONS it must compile and match sdpa. Without them the result is only
    printed: NoValidChoicesError there confirms the diagnosis (a fixed torch compiles both).
    """
    if not torch.cuda.is_available():
        pytest.fail("FTDIST_TEST_GPU=1 but no CUDA device is visible")
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    torch.manual_seed(0)
    t, hq, hkv, d = 100, 4, 2, 32  # the tiny test model's heads, a document under 128 tokens
    q = torch.randn(1, hq, t, d, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(1, hkv, t, d, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(1, hkv, t, d, device="cuda", dtype=torch.bfloat16)
    mask = create_block_mask(lambda b, h, qi, ki: qi >= ki, 1, None, t, t, device="cuda")
    reference = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True).float()

    def run(options):
        torch._dynamo.reset()
        compiled = torch.compile(flex_attention, dynamic=False)
        with torch.no_grad():
            return compiled(q, k, v, block_mask=mask, enable_gqa=True, kernel_options=options).float()

    try:
        run(None)
        print(f"flex without kernel options: compiled (torch {torch.__version__} has the decoding fix)")
    except Exception as e:  # noqa: BLE001 - diagnostic only
        print(f"flex without kernel options: {type(e).__name__} (torch {torch.__version__}): {str(e)[:300]}")
    try:
        out = run(dict(FLEX_KERNEL_OPTIONS))
    except Exception as e:  # noqa: BLE001
        _fail_clearly(f"compiled flex_attention with {FLEX_KERNEL_OPTIONS}", e)
    worst = (out - reference).abs().max().item()
    print(f"flex with {FLEX_KERNEL_OPTIONS}: max |flex - sdpa| = {worst:.4f}")
    assert worst <= 2e-2, worst
