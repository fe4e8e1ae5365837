"""python -m ftdist.plan: the acceptance layouts, and the byte counts it rests on, computed by hand."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from ftdist.config import ConfigError
from ftdist.constants import GIB
from ftdist.model_memory import model_state, nf4_bytes_per_param, nf4_constant_bytes
from ftdist.parallel import strategy_class
from ftdist.parallel.deepspeed import zero_gradient_partitions
from ftdist.plan import activations, compose_plan_config, main

REPO = Path(__file__).resolve().parents[2]


def plan_cli(*overrides: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "ftdist.plan", *overrides], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300, check=False)


def test_cli_70b_qlora_on_two_24gb_gpus_fits_as_answer_ai_ran_it():
    # The acceptance command. The experiment is Answer.AI's 70B QLoRA on 2 x 24 GB: FSDP with CPU
    # offload, 2048 tokens, checkpointing, micro-batch 1.
    proc = plan_cli("+experiment=llama70b_qlora", "cluster.gpus_per_node=2", "cluster.gpu_mem_gb=24", "plan.json=true")
    assert proc.returncode == 0, proc.stderr[-2000:]
    plan = json.loads(proc.stdout)
    assert plan["fits"] is True and plan["world_size"] == 2
    assert plan["per_gpu_gb"] <= 24
    assert plan["per_gpu_gb"] == pytest.approx(sum(plan["breakdown_gb"].values()))
    assert plan["breakdown_gb"]["parameters"] == 0  # sharded 4-bit base lives in CPU memory
    assert plan["speed"]["peak_tflops"] == 989  # cluster.gpu defaults to h100
    # Loading: each rank quantizes the whole base (~37.6 GiB: 4-bit linears, bf16 embeddings and
    # head, constants, fp32 adapters) into CPU memory; the GPU holds its shards and one unit.
    load = plan["loading"]
    assert load["host_rank0_gb"] == load["host_other_rank_gb"] == pytest.approx(37.6, abs=0.1)
    assert load["host_per_node_gb"] == pytest.approx(2 * load["host_rank0_gb"])
    assert load["gpu_gb"] < 24


def test_cli_names_the_gpu_for_its_peak():
    proc = plan_cli("+experiment=llama70b_qlora", "cluster.gpus_per_node=2", "cluster.gpu_mem_gb=24", "cluster.gpu=4090",
                    "plan.json=true")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout)["speed"]["peak_tflops"] == 165


def test_70b_qlora_without_offload_does_not_fit_24gb_and_says_to_offload(capsys):
    # Without offload even 2k context and checkpointing exceed 24 GB: the 4-bit base alone is ~18 GiB a rank.
    plan = main(["+experiment=llama70b_qlora", "cluster.gpus_per_node=2", "cluster.gpu_mem_gb=24",
                 "strategy.cpu_offload=false", "plan.json=true"])
    assert plan["fits"] is False and plan["per_gpu_gb"] > 24 and plan["breakdown_gb"]["parameters"] > 17
    assert plan["suggestion"]["overrides"] == ["strategy.cpu_offload=true"]
    assert plan["suggestion"]["per_gpu_gb"] <= 24
    # At 4096 tokens too (the 8 x 80 GB setting), with the same cheapest change.
    plan = main(["+experiment=llama70b_qlora", "cluster.gpus_per_node=2", "cluster.gpu_mem_gb=24",
                 "strategy.cpu_offload=false", "data.max_seq_len=4096"])
    assert plan["fits"] is False and plan["suggestion"]["overrides"] == ["strategy.cpu_offload=true"]
    assert "DOES NOT FIT" in capsys.readouterr().out


def test_loading_that_exceeds_host_memory_does_not_fit():
    # 8 ranks each quantizing the whole 70B base into CPU memory need ~300 GiB on the node.
    common = ["+experiment=llama70b_qlora", "cluster.gpus_per_node=8", "strategy.cpu_offload=false", "plan.json=true"]
    roomy = main([*common, "cluster.cpu_mem_gb=512"])
    assert roomy["fits"] is True and roomy["loading"]["host_per_node_gb"] == pytest.approx(8 * 37.6, abs=1)
    tight = main([*common, "cluster.cpu_mem_gb=256"])
    assert tight["fits_gpu"] is True and tight["fits_cpu"] is False and tight["fits"] is False


def test_70b_full_zero3_needs_more_than_one_node():
    one = main(["+experiment=llama70b_full_zero3", "cluster.nodes=1", "cluster.gpus_per_node=8",
                "cluster.gpu_mem_gb=80", "plan.json=true"])
    assert one["fits"] is False and one["per_gpu_gb"] > 80
    # 1,129 GiB of offloaded state per node exceeds the default 1,024 GiB of host memory: more nodes.
    assert one["suggestion"]["overrides"] == ["cluster.nodes=4"]
    eight = main(["+experiment=llama70b_full_zero3", "cluster.nodes=8", "cluster.gpus_per_node=8",
                  "cluster.gpu_mem_gb=80", "plan.json=true"])
    assert eight["fits"] is True and eight["per_gpu_gb"] < 80 and eight["world_size"] == 64
    assert eight["suggestion"] is None


def test_offload_suggested_where_host_memory_holds_it():
    plan = main(["+experiment=llama70b_full_zero3", "cluster.cpu_mem_gb=2048", "plan.json=true"])
    assert plan["suggestion"]["overrides"] == ["strategy=zero3_offload"]


def test_suggestions_try_checkpointing_then_smaller_micro_batch():
    base = ["+experiment=llama8b_lora_fsdp", "cluster.gpus_per_node=1", "strategy=ddp", "peft=lora"]
    plan = main([*base, "model.gradient_checkpointing=false", "train.micro_batch_size=4", "cluster.gpu_mem_gb=40",
                 "plan.json=true"])
    assert not plan["fits"]
    assert plan["suggestion"]["overrides"][0] == "model.gradient_checkpointing=true"
    assert plan["activations_gb"]["no_checkpointing"] > 5 * plan["activations_gb"]["checkpointing"]


@pytest.mark.parametrize("bad", ["cluster.gpu_mem=24", "plan.jsn=true", "+cluster.gpus=2"])
def test_misspelled_cluster_and_plan_keys_are_rejected(bad):
    proc = plan_cli("+experiment=llama70b_qlora", bad)
    assert proc.returncode == 2
    assert "unknown config key" in proc.stderr or "Key" in proc.stderr, proc.stderr[-1000:]


def test_bad_values_name_the_key():
    with pytest.raises(ConfigError, match="cluster.gpu='b200x'"):
        compose_plan_config(["+experiment=llama70b_qlora", "cluster.gpu=b200x"])
    with pytest.raises(ConfigError, match="plan.mfu"):
        compose_plan_config(["+experiment=llama70b_qlora", "plan.mfu=1.5"])


def test_speed_from_flops_and_mfu():
    plan = main(["+experiment=llama70b_full_zero3", "cluster.nodes=8", "cluster.gpu=a100", "plan.mfu=0.5",
                 "plan.json=true"])
    sp = plan["speed"]
    n = plan["params"]["total"]
    assert sp["peak_tflops"] == 312
    # 6N per token (the input embedding does no matmul), + causal attention over a whole 4096-token
    # row: 80 layers x 64 query heads x 128 wide, 12 FLOPs per (query, key) pair and width, 4096 x
    # 4097 / 2 pairs over 4096 tokens; + 2N and a third of the attention recomputed under checkpointing.
    emb = 128256 * 8192
    attention = 12 * 80 * 64 * 128 * 4097 / 2
    assert sp["matmul_flops_per_token"] == pytest.approx(6 * (n - emb), rel=1e-3)
    assert sp["attention_flops_per_token"] == pytest.approx(attention)
    assert sp["flops_per_token"] == pytest.approx(6 * (n - emb) + attention, rel=1e-3)
    assert sp["recompute_flops_per_token"] == pytest.approx(2 * (n - emb) + attention / 3, rel=1e-3)
    tokens = 1 * 4 * 4096  # micro x accum x seq, per GPU
    step = tokens * (sp["flops_per_token"] + sp["recompute_flops_per_token"]) / (312e12 * 0.5)
    assert sp["step_time_s"] == pytest.approx(step)
    assert sp["tokens_per_s"] == pytest.approx(64 * tokens / step)


# --- anchors ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def llama8b():
    cfg = compose_plan_config(["+experiment=llama8b_full_zero3"])
    return cfg, model_state(cfg)


def bytes_per_param(cfg, m) -> float:
    full = strategy_class(cfg.strategy).state_bytes(cfg, m)
    return (full["parameters"] + full["gradients"] + full["optimizer"]) / m.census.total


def test_mixed_precision_adam_is_16_bytes_per_param(llama8b):
    cfg, m = llama8b
    # DeepSpeed bf16: 2 (bf16 weight) + 2 (bf16 grad) + 4 (fp32 master) + 4 + 4 (Adam m, v).
    assert bytes_per_param(cfg, m) == pytest.approx(16)
    for stage in (1, 2):
        cfg.strategy.zero_stage = stage
        assert bytes_per_param(cfg, m) == pytest.approx(16)
    cfg.strategy.zero_stage = 3


def test_fsdp_bytes_per_param_follow_the_model_dtype():
    # fp32 weights under bf16 compute (FSDP2's MixedPrecisionPolicy): 4 + 4 + 8 = 16.
    fp32 = compose_plan_config(["+experiment=llama8b_lora_fsdp", "peft=none", "model.dtype=fp32"])
    assert bytes_per_param(fp32, model_state(fp32)) == pytest.approx(16)
    # A bf16 model under torch AdamW trains in pure bf16 (no fp32 master): 2 + 2 + 4.
    bf16 = compose_plan_config(["+experiment=llama8b_lora_fsdp", "peft=none"])
    assert bytes_per_param(bf16, model_state(bf16)) == pytest.approx(8)


def test_nf4_double_quant_is_about_0_52_bytes_per_param():
    n = 8192 * 28672
    # 4 bits + an 8-bit absmax per 64 + an fp32 scale per 256 absmaxes, + two small code tables.
    assert nf4_constant_bytes(n) == n // 64 + 4 * (n // 64 // 256) + 16 * 4 + 256 * 4 + 4
    assert nf4_bytes_per_param(n) == pytest.approx(0.5 + 1 / 64 + 4 / (64 * 256), abs=1e-5)
    assert nf4_bytes_per_param(n) == pytest.approx(0.52, abs=0.005)


def test_qlora_plan_counts_4bit_base_and_replicated_constants():
    cfg = compose_plan_config(["+experiment=llama70b_qlora"])
    m = model_state(cfg)
    a = m.config
    h, kv, inter, layers = a.hidden_size, 8 * 128, a.intermediate_size, a.num_hidden_layers
    linear = layers * (2 * h * h + 2 * h * kv + 3 * h * inter)
    rest = m.census.total - linear  # embeddings, head, norms: bf16
    assert m.base_bytes == pytest.approx(linear / 2 + rest * 2)
    assert m.quant_constant_bytes == pytest.approx(linear * (1 / 64 + 4 / (64 * 256)), rel=1e-3)
    assert m.adapter_bytes == m.trainable * 4  # peft keeps LoRA in fp32


def tiny_state(h=64, inter=128, layers=2, heads=4, kv_heads=2, vocab=100):
    from transformers import LlamaConfig

    config = LlamaConfig(hidden_size=h, intermediate_size=inter, num_hidden_layers=layers, num_attention_heads=heads,
                         num_key_value_heads=kv_heads, vocab_size=vocab)
    return SimpleNamespace(config=config, census=SimpleNamespace(adapted_modules=0, adapted_in_features=0))


def test_activations_by_hand_for_a_tiny_config():
    cfg = compose_plan_config(["+experiment=tiny_cpu", "data.max_seq_len=8", "train.micro_batch_size=2",
                               "model.dtype=fp32", "train.mixed_precision=none"])
    m = tiny_state()
    tokens = 2 * 8
    # Per token and layer (fp32): 8h + 2 kv + 4 I = 512 + 64 + 512 = 1088 values = 4352 bytes.
    per_layer = tokens * 1088 * 4
    logits = tokens * 100 * (4 + 8)  # fp32 logits + fp32 loss copy and its gradient
    assert activations(cfg, m, checkpointing=False) == 2 * per_layer + logits == 158_464
    # Checkpointing keeps each layer's input (h values a token) and recomputes one layer at a time.
    assert activations(cfg, m, checkpointing=True) == 2 * tokens * 64 * 4 + per_layer + logits == 97_024
    # bf16 compute halves the saved tensors; the loss's fp32 copies stay.
    bf16 = compose_plan_config(["+experiment=tiny_cpu", "data.max_seq_len=8", "train.micro_batch_size=2",
                                "train.mixed_precision=bf16"])
    assert activations(bf16, m, checkpointing=False) == 2 * tokens * 1088 * 2 + tokens * 100 * (2 + 8)


def test_plan_json_has_every_part(capsys):
    plan = main(["+experiment=tiny_cpu", "plan.json=true"])
    printed = json.loads(capsys.readouterr().out)
    assert printed["fits"] is True and isinstance(printed["per_gpu_gb"], float)
    assert set(plan["breakdown_gb"]) == {"parameters", "lora", "quant_constants", "reference", "gradients",
                                         "optimizer", "activations", "communication", "workspace"}
    assert plan["breakdown_gb"]["reference"] == 0 and plan["objective"] == {"name": "sft", "reference": None,
                                                                           "reference_model": None}
    assert plan["world_size"] == 1 and plan["breakdown_gb"]["workspace"] == 2.0
    assert plan["breakdown_gb"]["parameters"] * GIB == pytest.approx(plan["params"]["total"] * 4)


def test_fsdp_unsharded_accumulation_holds_whole_fp32_gradients():
    # Full fine-tuning of a bf16 8B model on 8 ranks with 8 micro-batches a step: by default FSDP
    # reduce-scatters every micro-batch (gradients 1/8, bf16); accumulate_unsharded keeps every
    # gradient whole, in fp32 (FSDP2's reduce dtype), until the last micro-batch.
    common = ["+experiment=llama8b_lora_fsdp", "peft=none", "plan.json=true"]
    sharded = main(common)
    whole = main([*common, "strategy.accumulate_unsharded=true"])
    n = sharded["params"]["trainable"]
    assert sharded["breakdown_gb"]["gradients"] == pytest.approx(n * 2 / 8 / GIB)
    assert whole["breakdown_gb"]["gradients"] == pytest.approx(n * 4 / GIB)
    # One micro-batch per step: nothing is held between micro-batches.
    single_micro = main([*common, "strategy.accumulate_unsharded=true", "train.grad_accum_steps=1"])
    assert single_micro["breakdown_gb"]["gradients"] == sharded["breakdown_gb"]["gradients"]


def test_zero2_gradient_buffers_hold_straddling_parameters_whole():
    # One group of 10 + 6 elements on 2 ranks: slices [0, 8) and [8, 16). The 10-element parameter
    # overlaps both, so both buffers hold all of it; rank 1 also holds the 6.
    assert zero_gradient_partitions([[10, 6]], 2) == [10, 16]
    # Padded to a multiple of 2 x world = 4: 13 elements become slices of 8 (the 9 straddles), and
    # the second group's 3 become slices of 2 (it straddles too); groups add up.
    assert zero_gradient_partitions([[4, 9], [3]], 2) == [4 + 9 + 3, 9 + 3]
    assert zero_gradient_partitions([[8, 8], []], 2) == [8, 8]
