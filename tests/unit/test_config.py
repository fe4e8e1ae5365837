"""Every shipped config composes and validates; bad keys and values fail naming the key."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from hydra.errors import ConfigCompositionException

from ftdist.config import (
    CONF_DIR,
    ConfigError,
    FtdistConfig,
    check_override_keys,
    compose,
    load_config,
    register_schemas,
)

REPO = Path(CONF_DIR).parent
# What a group option needs before it validates (files that leave a required key open).
REQUIRED = {"data": ["data.path=x.jsonl"], "model/hf": ["model.name_or_path=some/model"],
            "data/preference": ["objective=dpo"], "data/classification": ["objective=classification"],
            "objective/classification": ["data=classification"], "objective/grpo": ["objective.rewards=[exact_match]"],
            # The GRPO demo starts from the model its first command trains.
            "experiment/tiny_grpo_cpu": ["model.name_or_path=some/model"]}
# Preference objectives and reward models train on pairs only.
REQUIRED.update({f"objective/{name}": ["data=preference"] for name in ("dpo", "simpo", "orpo", "reward")})
# Experiments that leave data.path for the user (every shipped one but the embedded demo).
REQUIRED.update(
    {
        f"experiment/{f.stem}": REQUIRED["data"]
        for f in (Path(CONF_DIR) / "experiment").glob("*.yaml")
        if "  path:" not in f.read_text()
    }
)


def compose_config(overrides: list[str]) -> FtdistConfig:
    return load_config(compose(["output_dir=/tmp/x", *overrides]))


def hydra_compose_config(overrides: list[str]) -> FtdistConfig:
    """Through Hydra's own compose, not config.compose: the tests using it check what the
    registered schema makes Hydra itself reject, past the CLI pre-check (check_override_keys)
    and before config.compose turns Hydra's error into a one-line ConfigError."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    register_schemas()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        dcfg = hydra_compose("config", overrides=["output_dir=/tmp/x", *overrides])
    return load_config(dcfg)


def shipped_group_options():
    for group_dir in sorted(p for p in Path(CONF_DIR).iterdir() if p.is_dir()):
        for f in sorted(group_dir.glob("*.yaml")):
            yield group_dir.name, f.stem


@pytest.mark.parametrize("group,option", list(shipped_group_options()))
def test_every_shipped_config_composes_and_validates(group, option):
    extra = REQUIRED.get(f"{group}/{option}", []) + (REQUIRED["data"] if group != "experiment" else [])
    choice = f"+experiment={option}" if group == "experiment" else f"{group}={option}"
    cfg = compose_config([choice, *extra])
    assert isinstance(cfg, FtdistConfig)


def test_demo_experiment_values():
    cfg = compose_config(["+experiment=tiny_cpu"])
    assert cfg.data.path == "synthetic:json_extraction"
    assert cfg.model.tiny is not None and cfg.strategy.name == "single"


def test_unknown_key_names_key_and_valid_ones():
    with pytest.raises(ConfigError) as e:
        check_override_keys(["train.lrr=1"])
    assert "lrr" in str(e.value) and "lr," in str(e.value) and "micro_batch_size" in str(e.value)
    with pytest.raises(ConfigError, match="'bogus' is not a key of data.fields"):
        check_override_keys(["data.fields.bogus=x"])
    with pytest.raises(ConfigError, match="top level"):
        check_override_keys(["lerning_rate=1"])
    check_override_keys(["+experiment=tiny_cpu", "model=tiny", "train.lr=1e-4", "data.fields.prompt=q", "hydra.run.dir=x"])


def test_unknown_key_from_yaml_or_force_add_is_rejected(tmp_path):
    # Keys that bypass the CLI pre-check still fail: a group file's key at compose time...
    (tmp_path / "train").mkdir()
    (tmp_path / "train" / "typo.yaml").write_text("lrr: 1\n")
    with pytest.raises(ConfigCompositionException, match="lrr"):
        hydra_compose_config([f"hydra.searchpath=[file://{tmp_path}]", "train=typo", "data.path=x"])
    # ...and a force-added key (which struct mode lets through) in check_known_keys.
    with pytest.raises(ConfigError, match="train.lrr"):
        hydra_compose_config(["+experiment=tiny_cpu", "+train.lrr=1"])


def test_wrong_type_is_rejected_at_compose():
    with pytest.raises(ConfigCompositionException, match="train.lr"):
        hydra_compose_config(["+experiment=tiny_cpu", "train.lr=abc"])


@pytest.mark.parametrize(
    "override,key",
    [
        ("train.micro_batch_size=0", "train.micro_batch_size"),
        ("train.grad_accum_steps=-1", "train.grad_accum_steps"),
        ("data.max_seq_len=0", "data.max_seq_len"),
        ("data.format=xml", "data.format"),
        ("data.on_bad_row=ignore", "data.on_bad_row"),
        ("strategy.name=magic", "strategy.name"),
        ("train.lr=-1", "train.lr"),
        ("data.val_fraction=1.5", "data.val_fraction"),
        ("data.max_seq_len=5000", "data.max_seq_len"),
        ("train.schedule=step", "train.schedule"),
    ],
)
def test_cross_field_checks_name_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        compose_config(["+experiment=tiny_cpu", override])


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["strategy=zero3", "peft=qlora"], "cannot partition bitsandbytes 4-bit weights; use strategy=fsdp"),
        (["strategy=zero2", "peft=qlora"], "use strategy=fsdp"),
        (["strategy=fsdp", "strategy.offload_params=true"], "needs DeepSpeed ZeRO stage 3"),
        (["strategy=zero2", "strategy.offload_params=true"], "needs DeepSpeed ZeRO stage 3"),
        (["strategy=zero3", "strategy.cpu_offload=true"], "is an FSDP option"),
        (["strategy=ddp", "strategy.accumulate_unsharded=true"], "accumulate_unsharded=true is an FSDP option"),
        (["strategy=fsdp", "strategy.offload_optimizer=true"], "is a DeepSpeed option"),
        (["strategy=zero3", "strategy.zero_stage=4"], "strategy.zero_stage"),
        (["peft=lora", "peft.target_modules=[]"], "peft.target_modules is empty"),
        (["peft=lora", "peft.dropout=1.0"], "peft.dropout"),
        (["peft=adapter"], "peft"),
    ],
)
def test_impossible_strategy_and_peft_combinations_fail_at_compose(overrides, message):
    with pytest.raises((ConfigError, ConfigCompositionException), match=re.escape(message)):
        compose_config(["+experiment=tiny_cpu", *overrides])


@pytest.mark.parametrize("strategy", ["fsdp", "zero1", "zero2", "zero3", "zero3_offload"])
@pytest.mark.parametrize("peft", ["none", "lora", "dora"])
def test_workable_combinations_compose(strategy, peft):
    cfg = compose_config(["+experiment=tiny_cpu", f"strategy={strategy}", f"peft={peft}"])
    assert cfg.peft.method == peft


def test_missing_required_key_is_named():
    with pytest.raises(Exception, match="data.path|path"):
        compose_config([])


def test_cli_bad_key_fails_before_any_model_loads(tmp_path):
    env_cache = tmp_path / "cache"  # an empty cache: building the tiny model would fill it
    proc = subprocess.run(
        [sys.executable, "-m", "ftdist.train", "+experiment=tiny_cpu", "train.lrr=1", f"output_dir={tmp_path}/run"],
        capture_output=True, text=True, cwd=REPO, env={**__import__("os").environ, "FTDIST_CACHE": str(env_cache)},
    )
    assert proc.returncode == 2
    assert "lrr" in proc.stderr and "Valid keys" in proc.stderr
    assert not env_cache.exists() and not (tmp_path / "run").exists()


def test_cli_bad_value_fails_before_any_model_loads(tmp_path):
    env_cache = tmp_path / "cache"
    proc = subprocess.run(
        [sys.executable, "-m", "ftdist.train", "+experiment=tiny_cpu", "train.micro_batch_size=0", f"output_dir={tmp_path}/run"],
        capture_output=True, text=True, cwd=REPO, env={**__import__("os").environ, "FTDIST_CACHE": str(env_cache)},
    )
    assert proc.returncode == 2, proc.stderr
    assert "train.micro_batch_size" in proc.stderr
    assert not env_cache.exists()
