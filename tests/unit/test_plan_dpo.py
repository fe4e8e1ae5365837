"""python -m ftdist.plan under preference objectives: a micro-batch of m pairs is 2m sequences, and
DPO's reference model adds its own bytes per rank (or none), each checked against a count by hand."""

from __future__ import annotations

import pytest

from ftdist.constants import GIB
from ftdist.model_memory import LOSS_BYTES_PER_LOGIT, model_state
from ftdist.plan import activations, compose_plan_config, make_plan, report

TINY = ["+experiment=tiny_cpu", "data.max_seq_len=64", "train.micro_batch_size=4", "plan.workspace_gb=0"]
PAIRS = [*TINY, "data=preference", "data.path=synthetic:json_preference", "data.max_seq_len=64"]


def planned(*overrides: str) -> tuple[dict, object]:
    cfg = compose_plan_config(list(overrides))
    return make_plan(cfg), cfg


def gpu_bytes(plan: dict, part: str) -> float:
    return plan["breakdown_gb"][part] * GIB


def test_a_micro_batch_of_m_pairs_is_sized_as_sft_with_2m_rows():
    sft, _ = planned(*TINY, "train.micro_batch_size=8")
    simpo, _ = planned(*PAIRS, "objective=simpo")
    assert gpu_bytes(simpo, "activations") == gpu_bytes(sft, "activations") > 0
    assert simpo["speed"]["tokens_per_step"] == sft["speed"]["tokens_per_step"] == 8 * 64
    # Packed: each of the 4 items is one row of up to 2 x 64 tokens.
    packed_sft, _ = planned(*TINY, "data.max_seq_len=128", "data.packing=true")
    packed_orpo, _ = planned(*PAIRS, "objective=orpo", "data.packing=true")
    assert gpu_bytes(packed_orpo, "activations") == gpu_bytes(packed_sft, "activations")


def test_the_reference_forward_adds_no_activation_memory():
    """It runs first, under no_grad: its logits are freed before the policy's forward saves
    anything, and its peak (the same logits, nothing saved) is below the policy's."""
    lora = ["peft=lora", "strategy=fsdp", "cluster.gpus_per_node=2"]
    simpo, _ = planned(*PAIRS, *lora, "objective=simpo")
    dpo, _ = planned(*PAIRS, *lora, "objective=dpo", "objective.reference=adapter")
    assert gpu_bytes(dpo, "activations") == gpu_bytes(simpo, "activations")
    assert gpu_bytes(dpo, "reference") == gpu_bytes(simpo, "reference") == 0
    # A precomputed reference runs no forward while training.
    precomputed, _ = planned(*PAIRS, *lora, "objective=dpo", "objective.reference=precomputed")
    assert gpu_bytes(precomputed, "activations") == gpu_bytes(simpo, "activations")


def vocab_size(cfg) -> int:
    return model_state(cfg).config.vocab_size


@pytest.mark.parametrize(("strategy", "precision", "bytes_per_param", "shards", "on_cpu"), [
    (["strategy=single"], "none", 4, 1, False),
    (["strategy=ddp"], "none", 4, 1, False),
    (["strategy=fsdp"], "bf16", 4, 2, False),  # FSDP2 keeps the loaded dtype sharded; bf16 is only gathered
    (["strategy=fsdp", "strategy.cpu_offload=true"], "none", 4, 2, True),
    (["strategy=zero1"], "bf16", 2, 1, False),  # a whole copy, cast to the engine's bf16
    (["strategy=zero2"], "none", 4, 1, False),
    (["strategy=zero3"], "bf16", 2, 2, False),  # zero.Init partitions in bf16
    (["strategy=zero3_offload"], "bf16", 2, 2, True),
], ids=["single", "ddp", "fsdp", "fsdp_offload", "zero1", "zero2", "zero3", "zero3_offload"])
def test_reference_model_needs_the_base_weights_over_its_shards_more_than_adapter(
    strategy, precision, bytes_per_param, shards, on_cpu
):
    # Under LoRA: reference=model loads a second copy of the base (no adapters); reference=adapter
    # reuses the policy's. Only the frozen copy differs between the two.
    common = [*PAIRS, "peft=lora", *strategy, "cluster.gpus_per_node=2", f"train.mixed_precision={precision}",
              "objective=dpo"]
    adapter, _ = planned(*common, "objective.reference=adapter")
    model, _ = planned(*common, "objective.reference=model")
    expected = model["params"]["total"] * bytes_per_param / shards
    where = "cpu_per_rank_gb" if on_cpu else "per_gpu_gb"
    assert (model[where] - adapter[where]) * GIB == pytest.approx(expected, rel=1e-12)
    assert model["breakdown_gb"]["reference"] * GIB == (0 if on_cpu else pytest.approx(expected, rel=1e-12))
    for part in ("parameters", "lora", "gradients", "optimizer", "activations", "communication"):
        assert model["breakdown_gb"][part] == adapter["breakdown_gb"][part], part


def test_qlora_reference_model_is_the_policys_4bit_base(tmp_path):
    common = [*PAIRS, "peft=qlora", "strategy=fsdp", "cluster.gpus_per_node=2", "objective=dpo"]
    model, _ = planned(*common, "objective.reference=model")
    adapter, _ = planned(*common, "objective.reference=adapter")
    assert gpu_bytes(model, "reference") == gpu_bytes(model, "parameters")  # the same packed base, sharded alike
    assert gpu_bytes(adapter, "reference") == 0
    # A reference_path loads as saved: full precision, not quantized.
    saved = tmp_path / "ref"
    saved.mkdir()
    other, _ = planned(*common, "objective.reference=model", f"objective.reference_path={saved}")
    assert gpu_bytes(other, "reference") == other["params"]["total"] * 4 / 2  # fp32 tiny, sharded 1/2


def test_reference_model_loads_beside_the_policy_where_fsdp_holds_it_in_host_memory():
    fsdp, _ = planned(*PAIRS, "peft=none", "strategy=fsdp", "cluster.gpus_per_node=2", "objective=dpo")
    ddp, _ = planned(*PAIRS, "peft=none", "strategy=ddp", "cluster.gpus_per_node=2", "objective=dpo")
    whole = fsdp["params"]["total"] * 4
    # FSDP: rank 0 holds both whole models until prepare shards them; the other rank builds on meta.
    assert fsdp["loading"]["host_rank0_gb"] * GIB == 2 * whole and fsdp["loading"]["host_other_rank_gb"] == 0
    # DDP: load_model moves the policy to its GPU before the reference loads.
    assert ddp["loading"]["host_rank0_gb"] * GIB == ddp["loading"]["host_other_rank_gb"] * GIB == whole
    assert fsdp["objective"] == {"name": "dpo", "reference": "model", "reference_model": "training"}


def test_precomputed_reference_counts_its_pass_before_training(tmp_path):
    common = [*PAIRS, "peft=none", "strategy=fsdp", "cluster.gpus_per_node=2", "objective=dpo",
              "objective.reference=precomputed", "train.eval_batch_size=512"]
    own, cfg = planned(*common)
    other, _ = planned(*common, f"objective.reference_path={tmp_path}")
    assert gpu_bytes(own, "reference") == gpu_bytes(other, "reference") == 0  # freed before training
    assert other["objective"]["reference_model"] == "before training"
    # The pass: the training state less activations, the reference where one is loaded for it,
    # and the no-grad logits of eval_batch_size pairs (fp32 logits and fp32 log-softmax).
    state = sum(v for k, v in own["breakdown_gb"].items() if k != "activations") * GIB
    logits = 2 * 512 * 64 * vocab_size(cfg) * (4 + LOSS_BYTES_PER_LOGIT)
    assert own["reference_pass_gb"] * GIB == pytest.approx(state + logits, rel=1e-12)
    reference = own["params"]["total"] * 4 / 2
    assert (other["reference_pass_gb"] - own["reference_pass_gb"]) * GIB == pytest.approx(reference, rel=1e-9)
    # The pass decides the fit where it is the peak.
    assert own["reference_pass_gb"] > own["per_gpu_gb"]
    between = (own["reference_pass_gb"] + own["per_gpu_gb"]) / 2
    tight, _ = planned(*common, f"cluster.gpu_mem_gb={between}")
    assert tight["fits_gpu"] is False


def test_report_names_the_objective_and_the_reference():
    plan, cfg = planned(*PAIRS, "peft=none", "strategy=fsdp", "cluster.gpus_per_node=2", "objective=dpo")
    text = report(cfg, plan)
    assert "objective dpo, reference model" in text
    assert "micro 4 pairs = 8 rows (chosen, rejected) x 64 tokens" in text
    assert "  reference " in text
    simpo, cfg = planned(*PAIRS, "objective=simpo")
    text = report(cfg, simpo)
    assert "objective simpo (no reference model)" in text and "  reference " not in text


def test_activations_count_dpo_by_hand():
    # activations(): the policy's saved tensors and logits for 2m rows, as SFT's for 2m rows.
    cfg = compose_plan_config([*PAIRS, "peft=none", "objective=dpo"])
    sft = compose_plan_config([*TINY, "train.micro_batch_size=8"])
    m = model_state(cfg)
    assert activations(cfg, m, False) == activations(sft, m, False)
