"""python -m ftdist.plan under objective=grpo: the rollout's KV cache against the cache generate
builds, the reference model only where the run loads one, and training rows of micro-batch x
group_size sequences of prompt + max_new_tokens tokens."""

from __future__ import annotations

import pytest
import torch

import ftdist.plan
from ftdist.constants import GIB
from ftdist.model_memory import model_state
from ftdist.plan import activations, compose_plan_config, make_plan, report

M, G, P, N = 2, 3, 16, 8  # prompts per micro-batch, group size, prompt bound (data.max_seq_len), new tokens
GRPO = ["+experiment=tiny_cpu", "objective=grpo", "objective.rewards=[exact_match]", "plan.workspace_gb=0",
        f"train.micro_batch_size={M}", f"objective.group_size={G}", f"data.max_seq_len={P}",
        f"objective.max_new_tokens={N}"]


def planned(*overrides: str) -> tuple[dict, object]:
    cfg = compose_plan_config(list(overrides))
    return make_plan(cfg), cfg


def gpu_bytes(plan: dict, part: str) -> float:
    return plan["breakdown_gb"][part] * GIB


@pytest.mark.parametrize(("dtype", "torch_dtype", "element_bytes"), [
    ("fp32", torch.float32, 4), ("bf16", torch.bfloat16, 2),
])
def test_kv_cache_is_what_generate_holds(tiny_model_dir, dtype, torch_dtype, element_bytes):
    from transformers import AutoModelForCausalLM

    plan, _ = planned(*GRPO, f"model.dtype={dtype}")
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch_dtype).eval()
    prompts = torch.randint(10, model.config.vocab_size, (M * G, P), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # as the rollout calls it: greedy over its own scores, KV cache on
        out = model.generate(input_ids=prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=N,
                             min_new_tokens=N, do_sample=False, use_cache=True, return_dict_in_generate=True,
                             pad_token_id=model.config.pad_token_id)
    cache = out.past_key_values
    held = sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers)
    assert all(layer.keys.shape[0] == M * G and layer.keys.dtype == torch_dtype for layer in cache.layers)
    # generate never feeds its last sampled token back: the cache holds P + N - 1 positions. The
    # plan counts all P + N of a row (the row training then runs), one position more.
    positions = cache.get_seq_length()
    assert positions == P + N - 1
    per_position = held // positions
    assert per_position * positions == held
    rollout = {part: gib * GIB for part, gib in plan["rollout_gb"].items()}
    assert rollout["kv_cache"] == per_position * (P + N)
    # The last decode step's logits: the model's, and the fp32 copy sampled from.
    assert rollout["logits"] == M * G * model.config.vocab_size * (element_bytes + 4)


@pytest.mark.parametrize(("strategy", "shards"), [
    (["strategy=single"], 1), (["strategy=fsdp", "cluster.gpus_per_node=2"], 2),
], ids=["single", "fsdp"])
def test_reference_model_only_with_beta_and_without_peft(strategy, shards):
    without, _ = planned(*GRPO, *strategy, "objective.beta=0")
    model, cfg = planned(*GRPO, *strategy, "objective.beta=0.04")
    assert without["objective"]["reference"] is None and gpu_bytes(without, "reference") == 0
    assert model["objective"] == {"name": "grpo", "reference": "model", "reference_model": "training"}
    whole = model["params"]["total"] * 4  # fp32 tiny, a frozen copy of the policy's base
    assert gpu_bytes(model, "reference") == pytest.approx(whole / shards, rel=1e-12)
    assert (model["per_gpu_gb"] - without["per_gpu_gb"]) * GIB == pytest.approx(whole / shards, rel=1e-9)
    for part in ("parameters", "gradients", "optimizer", "activations", "communication"):
        assert model["breakdown_gb"][part] == without["breakdown_gb"][part], part
    assert "objective grpo, reference model" in report(cfg, model)
    # Under LoRA the reference is the policy with its adapters off: no second model.
    lora_ref, cfg = planned(*GRPO, *strategy, "peft=lora", "objective.beta=0.04")
    lora, _ = planned(*GRPO, *strategy, "peft=lora", "objective.beta=0")
    assert lora_ref["objective"]["reference"] == "adapter" and gpu_bytes(lora_ref, "reference") == 0
    assert lora_ref["breakdown_gb"] == lora["breakdown_gb"]
    assert "objective grpo, reference adapter" in report(cfg, lora_ref)
    # Each micro-batch's reference forward costs time (4N FLOPs per token of the frozen model's), not memory.
    assert lora_ref["speed"]["reference_flops_per_token"] > 0 == lora["speed"]["reference_flops_per_token"]


@pytest.mark.parametrize("checkpointing", [False, True])
def test_training_activations_are_sfts_for_group_rows_of_prompt_plus_completion(checkpointing):
    # A micro-batch of M prompts trains on M x G rows of P + N tokens: SFT's activations for those.
    for group, new in ((G, N), (2 * G, N), (G, 4 * N)):
        grpo = compose_plan_config([*GRPO, f"objective.group_size={group}", f"objective.max_new_tokens={new}"])
        sft = compose_plan_config(["+experiment=tiny_cpu", f"train.micro_batch_size={M * group}",
                                   f"data.max_seq_len={P + new}"])
        m = model_state(grpo)
        assert activations(grpo, m, checkpointing) == activations(sft, m, checkpointing) > 0
    base = compose_plan_config(GRPO)
    doubled = compose_plan_config([*GRPO, f"objective.group_size={2 * G}"])
    m = model_state(base)
    assert activations(doubled, m, checkpointing) == 2 * activations(base, m, checkpointing)  # linear in rows
    plan, _ = planned(*GRPO, f"model.gradient_checkpointing={str(checkpointing).lower()}")
    assert plan["speed"]["tokens_per_step"] == M * G * (P + N)


def test_generation_and_training_take_turns_so_the_larger_is_the_activations_part(monkeypatch):
    plan, _ = planned(*GRPO)
    training = plan["activations_gb"]["no_checkpointing"]
    assert 0 < sum(plan["rollout_gb"].values()) < training  # the tiny model's logits outweigh its cache
    assert plan["breakdown_gb"]["activations"] == training
    state = sum(gib for part, gib in plan["breakdown_gb"].items() if part != "activations")
    assert plan["per_gpu_gb"] == pytest.approx(state + training, rel=1e-12)
    # A rollout larger than training's activations replaces them; it is not added to them.
    monkeypatch.setattr(ftdist.plan, "rollout_bytes", lambda cfg, config: {"kv_cache": 3 * GIB, "logits": GIB})
    bigger, _ = planned(*GRPO)
    assert bigger["breakdown_gb"]["activations"] == 4
    assert bigger["per_gpu_gb"] == pytest.approx(state + 4, rel=1e-12)


def test_report_shows_the_rollout():
    plan, cfg = planned(*GRPO)
    text = report(cfg, plan)
    assert f"micro {M} prompts x {G} completions = {M * G} rows x {P + N} tokens" in text
    assert f"rollout: {M * G} sequences generated together ({M} prompts x group {G}), each at most {P} prompt " in text
    assert f"KV cache {plan['rollout_gb']['kv_cache']:.2f}" in text
    assert "objective grpo (no reference model)" in text and "  reference " not in text
    sft, cfg = planned("+experiment=tiny_cpu")
    assert sft["rollout_gb"] == {} and "rollout" not in report(cfg, sft)
