"""Reference text for the forgetting check (ftdist.eval.perplexity): windows, bad rows, and a
perplexity that does not depend on how windows are batched (padding carries no loss)."""

from __future__ import annotations

import math

import pytest
import torch

from ftdist.config import DataConfig, EvalConfig, StrategyConfig
from ftdist.data.sources import DataError
from ftdist.eval.perplexity import forgetting_figures, perplexity, read_reference_text
from ftdist.model.forward import ModelForward
from ftdist.parallel import build_strategy
from tests.helpers import write_jsonl


def data_config(**kw) -> DataConfig:
    return DataConfig(path="unused.jsonl", max_seq_len=16, **kw)


def test_documents_become_windows_of_max_seq_len_and_every_token_but_a_windows_first_counts(tmp_path, tiny_tokenizer):
    texts = ["short one", "a much longer document that spans several windows of sixteen tokens each, " * 2]
    path = write_jsonl(tmp_path / "ref.jsonl", [{"body": t} for t in texts])
    text = read_reference_text(EvalConfig(reference_data=path, reference_field="body"), data_config(), tiny_tokenizer, 0)
    ids = [[tiny_tokenizer.bos_token_id, *tiny_tokenizer(t, add_special_tokens=False)["input_ids"],
            tiny_tokenizer.eos_token_id] for t in texts]
    expected = [d[i : i + 16] for d in ids for i in range(0, len(d), 16) if len(d[i : i + 16]) > 1]
    assert [w.input_ids for w in text.windows] == expected and all(w.labels == w.input_ids for w in text.windows)
    assert text.documents == 2 and text.tokens == sum(len(w) - 1 for w in expected)
    first = read_reference_text(EvalConfig(reference_data=path, reference_field="body", reference_max_docs=1),
                                data_config(), tiny_tokenizer, 0)
    assert first.documents == 1 and [w.input_ids for w in first.windows] == expected[:1]


def test_bad_rows_stop_the_check_or_are_counted_and_a_missing_file_is_named(tmp_path, tiny_tokenizer):
    path = write_jsonl(tmp_path / "ref.jsonl", [{"text": "fine"}, {"other": "no text field"}, "{broken"])
    e = EvalConfig(reference_data=path)
    with pytest.raises(DataError, match=r"eval.reference_data .*ref.jsonl:2: missing_field"):
        read_reference_text(e, data_config(), tiny_tokenizer, 0)
    text = read_reference_text(e, data_config(on_bad_row="skip"), tiny_tokenizer, 0)
    assert text.documents == 1 and sum(text.bad_rows.values()) == 2 and "missing_field" in text.bad_rows
    with pytest.raises(DataError, match="eval.reference_data=.*nope.jsonl: data file not found"):
        read_reference_text(EvalConfig(reference_data=str(tmp_path / "nope.jsonl")), data_config(), tiny_tokenizer, 0)
    empty = write_jsonl(tmp_path / "empty.jsonl", [{"other": 1}])
    with pytest.raises(DataError, match="no document with text in field 'text'"):
        read_reference_text(EvalConfig(reference_data=empty), data_config(on_bad_row="skip"), tiny_tokenizer, 0)


def test_perplexity_is_the_same_whatever_the_batching(tmp_path, tiny_model_dir, tiny_tokenizer):
    from transformers import AutoModelForCausalLM

    docs = [{"text": "word " * n} for n in (1, 5, 9, 30)]
    text = read_reference_text(EvalConfig(reference_data=write_jsonl(tmp_path / "r.jsonl", docs)), data_config(),
                               tiny_tokenizer, 0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    strategy = build_strategy(StrategyConfig(name="single"))
    forward = ModelForward(model, strategy, bf16=False).bind(model)
    with torch.no_grad():
        one = perplexity(forward, text, strategy, 1, tiny_tokenizer.pad_token_id)
        padded = perplexity(forward, text, strategy, 3, tiny_tokenizer.pad_token_id)  # windows of unequal length
    assert one[2] == padded[2] == text.tokens
    assert padded[0] == pytest.approx(one[0], rel=1e-5) and one[0] == pytest.approx(math.exp(one[1] / one[2]))


def test_forgetting_figures_gate_on_the_relative_change():
    from ftdist.data.example import Example
    from ftdist.eval.perplexity import ReferenceText

    Text = ReferenceText([Example([1, 2, 3], [1, 2, 3])] * 4, documents=3, bad_rows={}, source="ref.jsonl")
    rose = forgetting_figures(Text, base=10.0, tuned=11.5, max_forgetting=0.1)
    assert rose["relative_change"] == pytest.approx(0.15) and rose["exceeded"]
    assert not forgetting_figures(Text, base=10.0, tuned=10.5, max_forgetting=0.1)["exceeded"]
    assert not forgetting_figures(Text, base=10.0, tuned=50.0, max_forgetting=None)["exceeded"]
    alone = forgetting_figures(Text, base=None, tuned=11.0, max_forgetting=0.1)
    assert "exceeded" not in alone and "base_perplexity" not in alone
    assert rose["tokens"] == 8 and rose["windows"] == 4 and rose["documents"] == 3
