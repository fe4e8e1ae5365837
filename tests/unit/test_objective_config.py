"""objective.* options: each belongs to its objectives, values in range, and the combinations a
preference objective needs (pairs, adapters for reference=adapter) checked before anything loads."""

from __future__ import annotations

import pytest

from ftdist.config import ConfigError, compose, load_config

PAIRS = ["data=preference", "data.path=pairs.jsonl", "output_dir=/tmp/x"]
TEXTS = ["data=classification", "data.path=texts.jsonl", "output_dir=/tmp/x"]


def config(overrides: list[str]):
    return load_config(compose(overrides))


@pytest.mark.parametrize(("overrides", "message"), [
    (["objective.beta=0.2", "data.path=x.jsonl", "output_dir=/tmp/x"], "objective.beta applies to objective=dpo|simpo|orpo, not objective=sft"),
    ([*PAIRS, "objective=dpo", "objective.gamma=1.0"], "objective.gamma applies to objective=simpo, not objective=dpo"),
    ([*PAIRS, "objective=orpo", "objective.loss_type=ipo"], "objective.loss_type applies to objective=dpo|grpo, not objective=orpo"),
    ([*PAIRS, "objective=simpo", "objective.reference=model"], "objective.reference applies to objective=dpo"),
    (["objective=dpo", "data.path=x.jsonl", "output_dir=/tmp/x"], "objective=dpo trains on chosen/rejected pairs: it needs data.format=preference"),
    ([*PAIRS], "data.format=preference holds chosen/rejected pairs: train them with objective=dpo\\|simpo\\|orpo\\|reward"),
    ([*PAIRS, "objective=dpo", "objective.loss_type=kto"], "objective.loss_type='kto' is not one of sigmoid, ipo, hinge, robust"),
    ([*PAIRS, "objective=dpo", "objective.beta=0"], "objective.beta must be > 0"),
    ([*PAIRS, "objective=dpo", "objective.label_smoothing=0.5"], r"objective.label_smoothing must be in \[0, 0.5\)"),
    ([*PAIRS, "objective=dpo", "objective.loss_type=hinge", "objective.label_smoothing=0.1"],
     "objective.label_smoothing applies to loss_type=sigmoid|robust, not hinge"),
    ([*PAIRS, "objective=dpo", "objective.sft_weight=-1"], "objective.sft_weight must be >= 0"),
    ([*PAIRS, "objective=dpo", "objective.reference=adapter"], "objective.reference=adapter runs the policy with its adapters disabled"),
    ([*PAIRS, "objective=dpo", "peft=lora", "objective.reference_path=/tmp"], "objective.reference_path names a reference model to load"),
    ([*PAIRS, "objective=dpo", "objective.reference=model", "objective.reference_path=/no/such/dir"],
     "objective.reference_path=/no/such/dir: no such model directory"),
    ([*PAIRS, "objective=dpo", "data.train_on_prompt=true"], "data.train_on_prompt=true: a preference pair's"),
    (["objective=classification", "data.path=x.jsonl", "output_dir=/tmp/x"],
     "objective=classification trains on labelled texts: it needs data.format=classification"),
    ([*TEXTS], "data.format=classification holds labelled texts: train them with objective=classification, not objective=sft"),
    ([*TEXTS, "objective=reward"], "objective=reward trains on chosen/rejected pairs: it needs data.format=preference"),
    ([*PAIRS, "objective=reward", "objective.beta=0.3"], "objective.beta applies to objective=dpo|simpo|orpo, not objective=reward"),
    ([*PAIRS, "objective=dpo", "objective.margin=m"], "objective.margin applies to objective=reward, not objective=dpo"),
    ([*TEXTS, "objective=classification", "objective.center_rewards=0.1"], "objective.center_rewards applies to objective=reward"),
    ([*PAIRS, "objective=reward", "objective.center_rewards=-1"], "objective.center_rewards must be >= 0"),
    ([*TEXTS, "objective=classification", "objective.labels=[a]"], "objective.labels needs at least two classes"),
    ([*TEXTS, "objective=classification", "objective.labels=[a,b,a]"], "objective.labels has a class twice"),
    ([*TEXTS, "objective=classification", "objective.class_weights=balanced"], "objective.class_weights='balanced': use none, auto"),
    ([*TEXTS, "objective=classification", "objective.class_weights=[1,2]"], "objective.class_weights as a list needs objective.labels"),
    ([*TEXTS, "objective=classification", "objective.labels=[a,b,c]", "objective.class_weights=[1,2]"],
     "objective.class_weights has 2 weights for 3 classes"),
    ([*TEXTS, "objective=classification", "objective.labels=[a,b]", "objective.class_weights=[1,0]"],
     "objective.class_weights must be positive numbers"),
    ([*TEXTS, "objective=classification", "data.train_on_prompt=true"], "a classifier has no prompt"),
])
def test_bad_objective_settings_fail_at_compose_naming_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message):
        config(overrides)


@pytest.mark.parametrize("overrides", [
    ["objective=dpo"],
    ["objective=dpo", "peft=qlora", "objective.reference=adapter"],
    ["objective=dpo", "objective.reference=precomputed", "objective.loss_type=robust", "objective.label_smoothing=0.1"],
    ["objective=simpo", "objective.gamma=1.0"],
    ["objective=orpo", "objective.beta=0.5"],
])
def test_workable_preference_settings_compose(overrides):
    cfg = config([*PAIRS, *overrides])
    assert cfg.data.format == "preference"


def test_objective_defaults_follow_their_papers():
    assert config([*PAIRS, "objective=dpo"]).objective.beta == 0.1
    simpo = config([*PAIRS, "objective=simpo"]).objective
    assert (simpo.beta, simpo.gamma) == (2.0, 0.5)
