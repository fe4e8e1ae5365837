"""python -m ftdist.plan for classifiers and reward models: no LM head's weights and, per token,
num_labels scores instead of the vocabulary's logits, each checked against a count by hand."""

from __future__ import annotations

from ftdist.constants import GIB
from ftdist.model_memory import LOSS_BYTES_PER_LOGIT
from ftdist.plan import compose_plan_config, make_plan

LLAMA = ["+experiment=llama8b_lora_fsdp", "data.path=x.jsonl", "plan.workspace_gb=0"]
CLASSIFY = [*LLAMA, "objective=classification", "data=classification", "data.path=x.jsonl", "objective.labels=[a,b,c]"]


def planned(*overrides: str):
    cfg = compose_plan_config(list(overrides))
    return make_plan(cfg), cfg


def test_a_classifier_is_sized_without_the_lm_head_and_its_logits():
    lm, cfg = planned(*LLAMA)
    cls, _ = planned(*CLASSIFY)
    hidden, vocab = 4096, 128_256  # Llama-3.1-8B
    assert lm["params"]["total"] - cls["params"]["total"] == vocab * hidden - 3 * hidden
    assert cls["params"]["trainable"] - lm["params"]["trainable"] == 3 * hidden  # the head trains in full
    tokens = cfg.train.micro_batch_size * cfg.data.max_seq_len
    act = 2  # bf16
    saved_logits = tokens * (vocab - 3) * (act + LOSS_BYTES_PER_LOGIT)
    got = (lm["breakdown_gb"]["activations"] - cls["breakdown_gb"]["activations"]) * GIB
    assert abs(got - saved_logits) < 1e-6 * saved_logits


def test_a_reward_model_has_one_output():
    reward, _ = planned(*LLAMA, "objective=reward", "data=preference", "data.path=x.jsonl")
    dpo, _ = planned(*LLAMA, "objective=simpo", "data=preference", "data.path=x.jsonl")
    assert dpo["params"]["total"] - reward["params"]["total"] == 128_256 * 4096 - 4096
