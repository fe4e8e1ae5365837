"""Packing keeps a sliding-window model's window: every document sees only its last `window` keys.

Tiny Mistral (every layer slides), Qwen2 (use_sliding_window, full first layer) and Gemma 3
(sliding then full layer) are built locally with a window of 8 and documents of 12-40 tokens;
the reference is each document alone through the unmodified transformers model (its eager
path, which builds its own sliding-window mask).
"""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import in_process_trainer, random_examples
from transformers import AutoConfig, AutoModelForCausalLM

from ftdist.data.loader import GlobalBatchSampler, collate
from ftdist.data.packing import collate_packed
from ftdist.model.attention import (
    DOCUMENT_SDPA,
    SlidingWindow,
    model_inputs,
    register_attention_functions,
    sliding_window_of,
)

WINDOW = 8
SMALL = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
         "num_key_value_heads": 2, "max_position_embeddings": 256}

ARCHITECTURES = {
    "mistral": {"model_type": "mistral", "sliding_window": WINDOW},
    "qwen2": {"model_type": "qwen2", "use_sliding_window": True, "sliding_window": WINDOW, "max_window_layers": 1},
    "gemma3": {"model_type": "gemma3_text", "sliding_window": WINDOW, "head_dim": 16, "query_pre_attn_scalar": 16,
               "layer_types": ["sliding_attention", "full_attention"]},
}

register_attention_functions()


@pytest.fixture(scope="module", params=sorted(ARCHITECTURES))
def windowed_model_dir(request, tmp_path_factory, tiny_tokenizer) -> str:
    kwargs = dict(ARCHITECTURES[request.param])
    config = AutoConfig.for_model(
        kwargs.pop("model_type"), vocab_size=len(tiny_tokenizer), pad_token_id=tiny_tokenizer.pad_token_id,
        **SMALL, **kwargs,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    # Random init with std 0.02 gives nearly uniform attention; larger weights make the window
    # (and any leak past it) show in the logits.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.2)
    path = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return str(path)


def long_documents(n: int, seed: int) -> list:
    docs = random_examples(n, seed=seed, lo=12, hi=40)
    assert all(len(d.input_ids) > WINDOW for d in docs)
    return docs


def alone_logits(model_dir: str, docs: list) -> list[torch.Tensor]:
    reference = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="eager").eval()
    with torch.no_grad():
        return [reference(input_ids=torch.tensor([d.input_ids])).logits[0] for d in docs]


def max_packed_error(model, batch, rows, alone, backend, window) -> float:
    with torch.no_grad():
        packed = model(**model_inputs(batch, backend, torch.float32, window)).logits
    worst, k = 0.0, 0
    for r, row in enumerate(rows):
        at = 0
        for doc in row:
            n = len(doc.input_ids)
            worst = max(worst, (packed[r, at : at + n] - alone[k]).abs().max().item())
            at += n
            k += 1
    return worst


@pytest.mark.parametrize("backend", [DOCUMENT_SDPA, "sdpa", "eager", "flex_attention"])
def test_packed_document_logits_equal_the_document_alone_with_its_window(windowed_model_dir, backend):
    model = AutoModelForCausalLM.from_pretrained(windowed_model_dir, attn_implementation=backend).eval()
    model.requires_grad_(False)  # flex_attention has no CPU backward; inference is what is compared
    window = sliding_window_of(model.config)
    assert window is not None and window.size == WINDOW
    docs = long_documents(7, seed=11)
    rows = [docs[:4], docs[4:]]
    batch = collate_packed(rows, pad_token_id=0)
    alone = alone_logits(windowed_model_dir, docs)
    assert max_packed_error(model, batch, rows, alone, backend, window) <= 1e-5
    if backend != DOCUMENT_SDPA:
        # Without the window the mask lets long documents see past it: the check above can fail.
        assert max_packed_error(model, batch, rows, alone, backend, None) > 1e-3


def test_per_document_sdpa_without_the_window_would_leak(windowed_model_dir):
    # document_sdpa takes the window from each layer's own `sliding_window` argument; a model
    # config with a window longer than every document shows what the packed logits were before the window was applied.
    config = AutoConfig.from_pretrained(windowed_model_dir)
    config.sliding_window = 10_000  # longer than every document: plain causal per document
    model = AutoModelForCausalLM.from_pretrained(windowed_model_dir, config=config, attn_implementation=DOCUMENT_SDPA)
    docs = long_documents(4, seed=12)
    batch = collate_packed([docs], pad_token_id=0)
    alone = alone_logits(windowed_model_dir, docs)
    assert max_packed_error(model.eval(), batch, [docs], alone, DOCUMENT_SDPA, None) > 1e-3


@pytest.mark.parametrize("backend", [DOCUMENT_SDPA, "sdpa", "eager"])
def test_unpacked_batches_take_the_models_own_window(windowed_model_dir, backend):
    model = AutoModelForCausalLM.from_pretrained(windowed_model_dir, attn_implementation=backend).eval()
    docs = long_documents(5, seed=13)
    batch = collate(docs, pad_token_id=0)  # right-padded rows, no document ids
    alone = alone_logits(windowed_model_dir, docs)
    with torch.no_grad():
        padded = model(**model_inputs(batch, backend, torch.float32, sliding_window_of(model.config))).logits
    for r, doc in enumerate(docs):
        n = len(doc.input_ids)
        assert (padded[r, :n] - alone[r]).abs().max().item() <= 1e-5


@pytest.mark.parametrize("backend", ["sdpa", "eager", "flex_attention"])
def test_a_window_no_shorter_than_the_row_changes_no_mask(backend):
    docs = long_documents(3, seed=14)
    batch = collate_packed([docs], pad_token_id=0)
    t = batch.input_ids.size(1)
    plain = model_inputs(batch, backend, torch.float32)["attention_mask"]
    for every_layer in (True, False):
        wide = model_inputs(batch, backend, torch.float32, SlidingWindow(t, every_layer))["attention_mask"]
        if backend == "flex_attention":
            plain, wide = plain.to_dense(), wide.to_dense()
        assert torch.equal(wide, plain)


def test_sliding_window_of_reads_each_architecture():
    def config(model_type, **kwargs):
        return AutoConfig.for_model(model_type, **SMALL, **kwargs)

    assert sliding_window_of(config("llama")) is None
    assert sliding_window_of(config("qwen2", use_sliding_window=False)) is None
    assert sliding_window_of(config("mistral", sliding_window=None)) is None
    assert sliding_window_of(config("mistral", sliding_window=4096)) == SlidingWindow(4096, True)
    assert sliding_window_of(config("qwen2", use_sliding_window=True, sliding_window=64, max_window_layers=1)) == (
        SlidingWindow(64, False)
    )
    assert sliding_window_of(config("qwen2", use_sliding_window=True, sliding_window=64, max_window_layers=0)) == (
        SlidingWindow(64, True)
    )
    gemma2 = config("gemma2", sliding_window=4096, layer_types=["sliding_attention", "full_attention"])
    assert sliding_window_of(gemma2) == SlidingWindow(4096, False)


@pytest.mark.parametrize("attn", [DOCUMENT_SDPA, "eager"])
def test_trainer_packed_loss_and_gradients_equal_padded_with_a_window(
    windowed_model_dir, tiny_tokenizer, tmp_path, attn
):
    base = AutoModelForCausalLM.from_pretrained(windowed_model_dir, attn_implementation=attn)
    examples = long_documents(10, seed=15)
    padded = in_process_trainer(tmp_path, copy.deepcopy(base), tiny_tokenizer, examples, packing=False, micro=10, attn=attn)
    packed = in_process_trainer(tmp_path, copy.deepcopy(base), tiny_tokenizer, examples, packing=True, micro=10, attn=attn)
    assert len(packed.train_items) < len(examples)  # several documents per row
    packed.sampler = GlobalBatchSampler(len(packed.train_items), len(packed.train_items), seed=0)
    packed.cfg.train.micro_batch_size = len(packed.train_items)
    a = padded.forward_backward(padded.step_batches(0))
    b = packed.forward_backward(packed.step_batches(0))
    assert a["label_tokens"] == b["label_tokens"] and b["documents"] == 10
    assert b["loss_sum"] / b["label_tokens"] == pytest.approx(a["loss_sum"] / a["label_tokens"], rel=1e-6)
    grads = dict(padded.model.named_parameters())
    for name, p in packed.model.named_parameters():
        torch.testing.assert_close(p.grad, grads[name].grad, rtol=1e-4, atol=1e-6, msg=name)
