"""The preference demo (+experiment=tiny_dpo_cpu): it composes, a shortened run trains and
reports held-out reward accuracy, and its warm-started tiny model has learnt from its SFT task.
The full demo (minutes) is not run here."""

from __future__ import annotations

import pytest
import torch
from helpers import read_metrics

from ftdist.config import ConfigError, DataConfig, TinyModelSpec, compose, load_config
from ftdist.data.loader import collate
from ftdist.data.prepare import prepare_data
from ftdist.model.tiny import build_model, build_tokenizer, warm_start
from ftdist.objectives.sft import sft_loss_sum
from ftdist.train import run

DEMO = ["+experiment=tiny_dpo_cpu"]
# The demo shortened: a warm start of a few steps (its own cache entry), a few hundred pairs.
SHORT = [*DEMO, "model.tiny.sft_steps=4", "data.num_synthetic_rows=400", "data.max_val_examples=16",
         "train.max_steps=3", "train.warmup_steps=1", "train.eval_every_steps=2", "train.progress_bar=false"]


def test_demo_composes_to_dpo_on_preference_pairs_from_a_warm_started_tiny_model():
    cfg = load_config(compose([*DEMO, "output_dir=unused"]))
    assert cfg.objective.name == "dpo" and cfg.data.format == "preference"
    assert cfg.data.path == "synthetic:json_preference" and cfg.strategy.name == "single"
    assert cfg.model.tiny.sft_task == "json_extraction" and cfg.model.tiny.sft_steps > 0


def test_shortened_demo_trains_and_reports_reward_accuracy(tmp_path):
    _, summary = run(compose([*SHORT, f"output_dir={tmp_path}"]), output_dir=str(tmp_path))
    assert summary["steps"] == 3
    _, evals = read_metrics(tmp_path)
    assert [e["step"] for e in evals] == [0, 2, 3]
    for record in evals:
        assert {"eval_rewards/accuracies", "eval_rewards/margins", "eval_pairs"} <= set(record)
        assert record["eval_pairs"] == 16
    # At step 0 the policy is its reference: every reward is 0, so no pair counts as won.
    assert evals[0]["eval_rewards/accuracies"] == 0.0
    assert summary["eval_rewards/accuracies_before"] == 0.0 and "eval_rewards/accuracies_after" in summary


def test_a_warm_start_needs_both_a_task_and_steps():
    with pytest.raises(ConfigError, match="sft_steps"):
        TinyModelSpec(sft_task="json_extraction")
    with pytest.raises(ConfigError, match="sft_task"):
        TinyModelSpec(sft_steps=10)


def test_warm_start_lowers_held_out_loss_on_its_task():
    spec = TinyModelSpec(hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1, intermediate_size=64,
                         sft_task="json_extraction", sft_steps=30, sft_batch_size=8)
    tokenizer = build_tokenizer(spec.vocab_size)
    random_init = build_model(spec, tokenizer)
    warm = build_model(spec, tokenizer)
    warm_start(warm, tokenizer, spec)
    # Another seed than the warm start's rows: responses it never saw.
    held_out, _, _ = prepare_data(DataConfig(path="synthetic:json_extraction", max_seq_len=128, val_fraction=0.0,
                                             num_synthetic_rows=64), tokenizer, seed=spec.seed + 1)
    random_loss, warm_loss = (held_out_loss(model, held_out, tokenizer) for model in (random_init, warm))
    # Random init sits near ln(vocab) ~ 6.8 nats a token; 30 small steps measured 4.2.
    assert warm_loss < random_loss - 1.5, (warm_loss, random_loss)


def held_out_loss(model, examples, tokenizer) -> float:
    batch = collate(examples, tokenizer.pad_token_id)
    with torch.no_grad():
        logits = model.eval()(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    return sft_loss_sum(logits, batch.labels).item() / batch.num_label_tokens


def test_sizing_the_demo_never_runs_its_warm_start(tmp_path, monkeypatch):
    """ftdist.plan and the dry run read the tiny model's config, which a warm start does not
    change: they must not train 500 SFT steps to get it."""
    from ftdist.model.architectures import model_config
    from ftdist.model.tiny import spec_dir

    monkeypatch.setenv("FTDIST_CACHE", str(tmp_path))
    cfg = load_config(compose([*DEMO, "output_dir=unused"]))
    config = model_config(cfg.model)
    assert config.num_hidden_layers == cfg.model.tiny.num_layers
    assert not spec_dir(cfg.model.tiny).exists()  # the warm-started model was not built
