"""dry_run=true: every shipped experiment sizes on the meta device, and its numbers match
counts made independently from the published architectures."""

from __future__ import annotations

import functools
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from ftdist.config import (
    CONF_DIR,
    ConfigError,
    DataConfig,
    FtdistConfig,
    ModelConfig,
    PeftConfig,
    TrainConfig,
    compose,
    load_config,
)
from ftdist.constants import GIB
from ftdist.dry_run import dry_run, format_count, resolve_world_size
from ftdist.model.adapters import apply_adapters
from ftdist.model.architectures import ARCHITECTURES, model_config
from ftdist.model_memory import NF4_BYTES_PER_PARAM, activation_bytes, decoder_layers, take_census
from ftdist.plan import main

REPO = Path(CONF_DIR).parent
EXPERIMENTS = sorted(p.stem for p in (Path(CONF_DIR) / "experiment").glob("*.yaml"))
WORLD = 8


def compose_dry_run(overrides: list[str]) -> FtdistConfig:
    # No data.path: a dry run must size a shipped experiment without one.
    return load_config(compose(["output_dir=/tmp/x", "dry_run=true", *overrides]))


@functools.cache
def sized(experiment: str, *overrides: str) -> dict:
    return dry_run(compose_dry_run([f"+experiment={experiment}", *overrides]), world_size=WORLD)


def linear_shapes(arch: str) -> list[tuple[int, int]]:
    """(in, out) of the seven linears of one Llama decoder layer, from the published config."""
    a = ARCHITECTURES[arch]
    h, inter = a["hidden_size"], a["intermediate_size"]
    kv = a["num_key_value_heads"] * h // a["num_attention_heads"]
    return [(h, h), (h, kv), (h, kv), (h, h), (h, inter), (h, inter), (inter, h)]


def llama_params(arch: str) -> int:
    a = ARCHITECTURES[arch]
    layer = sum(i * o for i, o in linear_shapes(arch)) + 2 * a["hidden_size"]  # + two RMSNorms
    return a["num_hidden_layers"] * layer + 2 * a["vocab_size"] * a["hidden_size"] + a["hidden_size"]


def lora_params(arch: str, r: int) -> int:
    return ARCHITECTURES[arch]["num_hidden_layers"] * sum(r * (i + o) for i, o in linear_shapes(arch))


def test_published_parameter_counts():
    # The model cards' counts: 8,030,261,248 and 70,553,706,496.
    assert llama_params("llama-3.1-8b") == 8_030_261_248
    assert llama_params("llama-3.1-70b") == 70_553_706_496


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_sizes_on_meta(experiment, tiny_model_dir):
    # The GRPO demo starts from the model its first command trains: here, the tiny model.
    out = sized(experiment, *([f"model.name_or_path={tiny_model_dir}"] if experiment == "tiny_grpo_cpu" else []))
    assert out["total_params"] > 0 and 0 < out["trainable_params"] <= out["total_params"]
    assert format_count(out["total_params"]) in out["report"]
    mem = out["memory_gib"]
    parts = ("parameters", "lora", "quant_constants", "gradients", "optimizer", "activations", "communication",
             "workspace", "reference")  # reference: DPO's frozen copy (tiny_dpo_cpu), 0 elsewhere
    assert mem["total_gpu"] == pytest.approx(sum(mem.get(k, 0.0) for k in parts))
    assert mem["activations"] > 0


def test_llama70b_qlora_counts_and_plan():
    # The shipped experiment offloads the shards to CPU memory; on the GPU they count as 0.
    offloaded = sized("llama70b_qlora")["memory_gib"]
    assert offloaded["parameters"] == offloaded["lora"] == offloaded["optimizer"] == 0
    out = dry_run(compose_dry_run(["+experiment=llama70b_qlora", "strategy.cpu_offload=false"]), world_size=WORLD)
    assert out["total_params"] == pytest.approx(70.55e9, rel=0.005)
    assert out["total_params"] == llama_params("llama-3.1-70b")
    assert out["trainable_params"] == out["adapter_params"] == lora_params("llama-3.1-70b", r=16)
    assert "70.6B" in out["report"] and "207.1M" in out["report"]
    assert out["fsdp_units"] == 81 and out["world_size"] == WORLD
    # 4-bit decoder linears (packed 2 per byte), bf16 embeddings/norms/head and fp32 adapters, all
    # sharded over WORLD ranks; the NF4 constants (absmax etc.) are not sharded by FSDP (measured
    # in tests/dist/test_plan_model_state.py), so every rank holds all of them.
    a = ARCHITECTURES["llama-3.1-70b"]
    linear = a["num_hidden_layers"] * sum(i * o for i, o in linear_shapes("llama-3.1-70b"))
    stored = linear * 0.5 + (out["total_params"] - linear) * 2
    mem = out["memory_gib"]
    assert mem["parameters"] == pytest.approx(stored / WORLD / GIB)
    assert mem["lora"] == pytest.approx(out["adapter_params"] * 4 / WORLD / GIB)
    constants = linear * (NF4_BYTES_PER_PARAM - 0.5)  # 8-bit absmax per 64 weights + fp32 scale per 256 of them
    assert mem["quant_constants"] == pytest.approx(constants / GIB, rel=1e-3)
    assert mem["optimizer"] == pytest.approx(out["trainable_params"] * 8 / WORLD / GIB)


def test_llama8b_full_zero3_counts_and_memory():
    out = sized("llama8b_full_zero3")
    n = out["total_params"]
    assert n == pytest.approx(8.03e9, rel=0.005) and out["trainable_params"] == n
    assert "8.0B" in out["report"] and "ZeRO stage 3" in out["report"]
    # bf16 parameters and gradients, fp32 Adam states and master weights, each 1/WORLD per rank.
    mem = out["memory_gib"]
    assert mem["parameters"] == pytest.approx(n * 2 / WORLD / GIB)
    assert mem["gradients"] == pytest.approx(n * 2 / WORLD / GIB)
    assert mem["optimizer"] == pytest.approx(n * 12 / WORLD / GIB)


def test_lora_trainable_count_is_r_times_in_plus_out():
    out = sized("llama8b_lora_fsdp")
    assert out["trainable_params"] == lora_params("llama-3.1-8b", r=16) == 41_943_040
    assert out["fsdp_units"] == 33


def test_dora_adds_one_magnitude_per_output():
    cfg = compose_dry_run(["+experiment=llama8b_lora_fsdp", "peft=dora"])
    out = dry_run(cfg, world_size=WORLD)
    magnitudes = ARCHITECTURES["llama-3.1-8b"]["num_hidden_layers"] * sum(o for _, o in linear_shapes("llama-3.1-8b"))
    assert out["trainable_params"] == lora_params("llama-3.1-8b", r=16) + magnitudes


def saved_activation_bytes(config, peft: PeftConfig, rows: int, seq: int) -> tuple[float, float]:
    """(bytes autograd saves in one fp32 forward, dry_run's estimate), counted by saved-tensor hooks."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").train()
    layers, base_ids = decoder_layers(model), {id(p) for p in model.parameters()}
    model = apply_adapters(model, peft)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in params:  # weights are not activations
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    ids = torch.randint(0, config.vocab_size, (rows, seq))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(input_ids=ids, labels=ids)
    cfg = FtdistConfig(
        model=ModelConfig(name_or_path="x", dtype="fp32"), data=DataConfig(path="x", max_seq_len=seq),
        train=TrainConfig(micro_batch_size=rows, mixed_precision="none"), peft=peft,
    )
    return sum(saved.values()), activation_bytes(cfg, config, take_census(model, set(), layers, base_ids))


@pytest.mark.parametrize("method", ["none", "lora"])
def test_activation_estimate_per_layer_matches_saved_tensors(method):
    from transformers import LlamaConfig

    peft = PeftConfig(method=method, r=8)
    per_layer = []
    for layers in (1, 2):
        config = LlamaConfig(vocab_size=500, hidden_size=128, intermediate_size=384, num_hidden_layers=layers,
                             num_attention_heads=4, num_key_value_heads=2)
        per_layer.append(saved_activation_bytes(config, peft, rows=2, seq=64))
    measured = per_layer[1][0] - per_layer[0][0]
    estimated = per_layer[1][1] - per_layer[0][1]
    assert estimated == pytest.approx(measured, rel=0.02)


def test_world_size_from_argument_env_or_default(monkeypatch):
    cfg = compose_dry_run(["+experiment=llama8b_lora_fsdp"])
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert resolve_world_size(cfg, None)[0] == 8
    assert resolve_world_size(cfg, 4)[0] == 4
    monkeypatch.setenv("WORLD_SIZE", "32")
    assert resolve_world_size(cfg, None)[0] == 32
    single = compose_dry_run(["+experiment=tiny_cpu"])
    assert resolve_world_size(single, None)[0] == 1


def test_unknown_architecture_names_key_and_known_ones():
    cfg = compose_dry_run(["+experiment=llama8b_lora_fsdp", "model.architecture=llama-9b"])
    with pytest.raises(ConfigError, match="model.architecture='llama-9b'.*llama-3.1-70b, llama-3.1-8b"):
        dry_run(cfg)


def test_hub_name_without_architecture_is_a_clear_error():
    with pytest.raises(ConfigError, match="model.name_or_path='nobody/no-such-model'.*model.architecture"):
        model_config(ModelConfig(name_or_path="nobody/no-such-model"))


def test_local_directory_config(tiny_model_dir):
    config = model_config(ModelConfig(name_or_path=tiny_model_dir))
    assert config.hidden_size == 128 and config.num_hidden_layers == 4


def test_cli_dry_run_prints_report_and_writes_nothing(tmp_path):
    run_dir = tmp_path / "run"
    env = {**os.environ, "FTDIST_CACHE": os.environ.get("FTDIST_CACHE", str(tmp_path / "cache"))}
    env.pop("WORLD_SIZE", None)
    proc = subprocess.run(
        [sys.executable, "-m", "ftdist.train", "+experiment=llama70b_qlora", "dry_run=true", f"output_dir={run_dir}"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300, check=False,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "70.6B" in proc.stdout and "81 units" in proc.stdout and "memory per rank" in proc.stdout
    assert not run_dir.exists()  # Hydra's run directory is removed: a dry run leaves nothing behind


def test_estimate_over_the_assumed_gpu_warns_and_is_not_fits(capsys):
    total = sized("llama8b_full_zero3")["memory_gib"]["total_gpu"]
    small, large = round(total / 2, 1), round(total * 2, 1)
    over = dry_run(compose_dry_run(["+experiment=llama8b_full_zero3", f"cluster.gpu_mem_gb={small}"]), world_size=WORLD)
    assert over["fits_gpu"] is False and over["gpu_mem_gb"] == small
    warning = (f"WARNING: does not fit: {total:.2f} GiB per rank exceeds the {small:g} GiB GPU assumed "
               f"(cluster.gpu_mem_gb) by {total - small:.2f} GiB")
    assert [line for line in over["report"].splitlines() if line.startswith("WARNING")] == [
        warning + "; python -m ftdist.plan names the cheapest change that fits"]
    assert warning in capsys.readouterr().out
    under = dry_run(compose_dry_run(["+experiment=llama8b_full_zero3", f"cluster.gpu_mem_gb={large}"]), world_size=WORLD)
    assert under["fits_gpu"] is True and "WARNING" not in under["report"]
    assert f"fits: {total:.2f} GiB per rank of the {large:g} GiB GPU assumed (cluster.gpu_mem_gb)" in under["report"]


def printed_memory(out: str) -> dict[str, str]:
    """Part -> the GiB figure a report prints for it, in the plan's layout and the dry run's."""
    return dict(re.findall(r"^  (\w+)(?: GPU)?\s+(\d+\.\d\d)(?:\s|$)", out, re.MULTILINE))


@pytest.mark.parametrize("objective", [[], ["objective=dpo", "data=preference", "data.path=x", "peft=none"]],
                         ids=["sft", "dpo"])
def test_plan_and_dry_run_print_the_same_per_rank_memory(monkeypatch, capsys, objective):
    # The same world size reached both ways: torchrun's WORLD_SIZE (one node of 4) for the dry
    # run, cluster.gpus_per_node for the planner.
    overrides = ["+experiment=llama8b_lora_fsdp", *objective]
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    dry = dry_run(compose_dry_run(overrides))
    dry_printed = printed_memory(capsys.readouterr().out)
    monkeypatch.delenv("WORLD_SIZE")
    planned = main([*overrides, "cluster.gpus_per_node=4"])
    plan_printed = printed_memory(capsys.readouterr().out)
    assert dry["world_size"] == planned["world_size"] == 4
    parts = set(planned["breakdown_gb"])
    shown = parts if objective else parts - {"reference"}  # only DPO prints its reference's line
    assert set(dry_printed) == set(plan_printed) == shown | {"total"}
    assert dry_printed == plan_printed
    assert {part: dry["memory_gib"][part] for part in parts} == planned["breakdown_gb"]
    assert dry["memory_gib"]["total_gpu"] == planned["per_gpu_gb"]


@pytest.mark.parametrize(
    "overrides",
    [
        ["+experiment=llama8b_lora_fsdp"],  # fits
        ["+experiment=llama8b_lora_fsdp", "cluster.gpu_mem_gb=8"],  # training over the GPU
        ["+experiment=llama8b_lora_fsdp", "cluster.cpu_mem_gb=8"],  # rank 0 loads 15 GiB on the host
    ],
)
def test_dry_run_gives_the_planners_verdict(overrides, capsys):
    dry = dry_run(compose_dry_run(overrides), world_size=WORLD)
    planned = main([*overrides, f"cluster.gpus_per_node={WORLD}"])
    capsys.readouterr()
    assert (dry["fits_gpu"], dry["fits_cpu"]) == (planned["fits_gpu"], planned["fits_cpu"])
    assert ("WARNING" in dry["report"]) == (not planned["fits"])
