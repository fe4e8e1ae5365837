"""objective.* options: each belongs to its objectives, values in range, and the combinations a
preference objective needs (pairs, adapters for reference=adapter) checked before anything loads."""

from __future__ import annotations

import pytest

from ftdist.config import ConfigError, compose, load_config

PAIRS = ["data=preference", "data.path=pairs.jsonl", "output_dir=/tmp/x"]


def config(overrides: list[str]):
    return load_config(compose(overrides))


@pytest.mark.parametrize(("overrides", "message"), [
    (["objective.beta=0.2", "data.path=x.jsonl", "output_dir=/tmp/x"], "objective.beta applies to objective=dpo|simpo|orpo, not objective=sft"),
    ([*PAIRS, "objective=dpo", "objective.gamma=1.0"], "objective.gamma applies to objective=simpo, not objective=dpo"),
    ([*PAIRS, "objective=orpo", "objective.loss_type=ipo"], "objective.loss_type applies to objective=dpo, not objective=orpo"),
    ([*PAIRS, "objective=simpo", "objective.reference=model"], "objective.reference applies to objective=dpo"),
    (["objective=dpo", "data.path=x.jsonl", "output_dir=/tmp/x"], "objective=dpo trains on chosen/rejected pairs: it needs data.format=preference"),
    ([*PAIRS], "data.format=preference holds chosen/rejected pairs: train them with objective=dpo|simpo|orpo"),
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
