"""Packing never mixes documents: logits, loss and gradients equal the unpacked computation."""

from __future__ import annotations

import copy
import random

import pytest
import torch
from helpers import in_process_trainer, random_examples
from transformers import AutoModelForCausalLM

from ftdist.data.loader import GlobalBatchSampler
from ftdist.data.packing import collate_packed, pack_documents
from ftdist.data.prepare import Example
from ftdist.model.attention import DOCUMENT_SDPA, model_inputs, register_attention_functions


def test_pack_documents_places_every_document_once_within_capacity():
    rng = random.Random(1)
    lengths = [rng.randint(20, 900) for _ in range(3000)]
    rows = pack_documents(lengths, capacity=2048, seed=0, window=1000)
    flat = sorted(i for row in rows for i in row)
    assert flat == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in row) <= 2048 for row in rows)
    efficiency = sum(lengths) / (len(rows) * 2048)
    assert efficiency > 0.97, efficiency


def test_pack_documents_is_deterministic_for_a_seed_and_shuffled():
    lengths = [random.Random(2).randint(5, 100) for _ in range(500)]
    assert pack_documents(lengths, 256, seed=3) == pack_documents(lengths, 256, seed=3)
    assert pack_documents(lengths, 256, seed=3) != pack_documents(lengths, 256, seed=4)


def test_overlong_document_is_rejected():
    with pytest.raises(ValueError, match="longer than the row capacity"):
        pack_documents([10, 300], capacity=256, seed=0)


def test_collate_restarts_positions_and_never_labels_across_documents():
    a = Example([1, 2, 3], [1, 2, 3])
    b = Example([4, 5, 6, 7], [-100, -100, 6, 7])
    c = Example([8, 9], [8, 9])
    batch = collate_packed([[a, b], [c]], pad_token_id=0)
    assert batch.input_ids.tolist() == [[1, 2, 3, 4, 5, 6, 7], [8, 9, 0, 0, 0, 0, 0]]
    assert batch.position_ids.tolist()[0] == [0, 1, 2, 0, 1, 2, 3]
    assert batch.document_ids.tolist() == [[0, 0, 0, 1, 1, 1, 1], [0, 0, -1, -1, -1, -1, -1]]
    # Each document's first token is not a label: nothing is predicted across a boundary.
    assert batch.labels.tolist() == [[-100, 2, 3, -100, -100, 6, 7], [-100, 9] + [-100] * 5]
    assert batch.num_tokens == 9 and batch.num_documents == 3 and batch.slots == 14
    assert batch.num_label_tokens == 5


register_attention_functions()


@pytest.mark.parametrize("backend", [DOCUMENT_SDPA, "sdpa", "eager", "flex_attention"])
def test_packed_document_logits_equal_the_document_alone(tiny_model_dir, backend):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation=backend).eval()
    model.requires_grad_(False)  # flex_attention has no CPU backward; inference is what is compared
    docs = random_examples(7, seed=5)
    rows = [docs[:4], docs[4:]]
    batch = collate_packed(rows, pad_token_id=0)
    with torch.no_grad():
        packed = model(**model_inputs(batch, backend, torch.float32)).logits
        for r, row in enumerate(rows):
            at = 0
            for doc in row:
                n = len(doc.input_ids)
                alone = model(input_ids=torch.tensor([doc.input_ids])).logits[0]
                assert (packed[r, at : at + n] - alone).abs().max().item() <= 1e-5
                at += n


def test_position_ids_alone_do_not_separate_documents(tiny_model_dir):
    # Why the explicit masks exist (and that the equality test above can fail).
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation="sdpa").eval()
    docs = random_examples(2, seed=6, lo=10)
    batch = collate_packed([docs], pad_token_id=0)
    with torch.no_grad():
        leaky = model(input_ids=batch.input_ids, position_ids=batch.position_ids).logits[0]
        alone = model(input_ids=torch.tensor([docs[1].input_ids])).logits[0]
    n0 = len(docs[0].input_ids)
    assert (leaky[n0:] - alone).abs().max().item() > 1e-2


@pytest.mark.parametrize("attn", [DOCUMENT_SDPA, "sdpa", "eager"])
def test_packed_batch_loss_and_gradients_equal_padded(tiny_model_dir, tiny_tokenizer, tmp_path, attn):
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation=attn)
    examples = random_examples(12, seed=7)
    padded = in_process_trainer(tmp_path, copy.deepcopy(base), tiny_tokenizer, examples, packing=False, micro=12, attn=attn)
    packed = in_process_trainer(tmp_path, copy.deepcopy(base), tiny_tokenizer, examples, packing=True, micro=len(examples), attn=attn)
    assert len(packed.train_items) < len(examples)  # several documents per row
    # One global batch holding every document, in both layouts.
    packed.sampler = GlobalBatchSampler(len(packed.train_items), len(packed.train_items), seed=0)
    packed.cfg.train.micro_batch_size = len(packed.train_items)
    a = padded.forward_backward(padded.step_batches(0))
    b = packed.forward_backward(packed.step_batches(0))
    assert a["label_tokens"] == b["label_tokens"] and a["tokens"] == b["tokens"] and b["documents"] == 12
    assert b["loss_sum"] / b["label_tokens"] == pytest.approx(a["loss_sum"] / a["label_tokens"], rel=1e-6)
    assert b["tokens"] / b["slots"] > a["tokens"] / a["slots"]
    grads = dict(padded.model.named_parameters())
    for name, p in packed.model.named_parameters():
        torch.testing.assert_close(p.grad, grads[name].grad, rtol=1e-4, atol=1e-6, msg=name)
    # eval_loss does not depend on packing either.
    assert packed.evaluate(False)["eval_loss"] == pytest.approx(padded.evaluate(False)["eval_loss"], rel=1e-6)


def test_ranks_get_disjoint_documents_when_packed():
    lengths = [random.Random(3).randint(5, 60) for _ in range(400)]
    rows = pack_documents(lengths, 128, seed=0)
    sampler = GlobalBatchSampler(len(rows), 8, seed=0)
    for step in range(10):
        per_rank = [
            {doc for micro in sampler.rank_micro_batches(step, r, 2, 2) for j in micro for doc in rows[j]}
            for r in range(2)
        ]
        assert not per_rank[0] & per_rank[1]
