"""GRPO's loss, advantages and rollouts against independent computations.

The loss is computed here a second way, token by token from full logits of each sequence run
alone (no padding, no chunked head), and compared with the objective's for every loss_type, with
importance ratios far enough from 1 that the clip is active and a KL penalty to another model.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from ftdist.config import ConfigError, StrategyConfig, compose, load_config
from ftdist.data.example import Example
from ftdist.model.forward import ModelForward
from ftdist.objectives.grpo import GRPOObjective, completion_mask, group_advantages
from ftdist.objectives.rollout import Sampling, SeededSampling, row_keys, sample_completions, top_p_filter
from ftdist.parallel import build_strategy

BASE = ["+experiment=tiny_cpu", "objective=grpo", "objective.rewards=[exact_match]", "output_dir=/tmp/unused"]


def grpo_config(*overrides: str):
    return load_config(compose([*BASE, *overrides]))


def tiny_model(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)


def perturbed(model, scale: float, seed: int):
    """A copy of `model` with noise on every weight: another policy (old) or a reference."""
    other = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)
    return other


PROMPTS = [[5, 17, 33, 9], [5, 40, 41]]  # two prompts, groups of 3
COMPLETIONS = [[60, 61, 62], [60, 70], [71, 72, 73, 74, 75], [80], [81, 82], [83, 84, 85, 86]]
REWARDS = torch.tensor([1.0, 0.0, 0.5, 0.0, 1.0, 1.0], dtype=torch.float64)
GROUP = 3
MAX_NEW = 6


def sequence_logps(model, prompt, completion, temperature):
    """log p of each completion token from the sequence alone, full logits, fp32."""
    ids = torch.tensor([prompt + completion])
    logp = (model(input_ids=ids).logits[0].float() / temperature).log_softmax(-1)
    return torch.stack([logp[len(prompt) - 1 + k, t] for k, t in enumerate(completion)])


def independent_loss(model, old_model, ref_model, advantages, loss_type, eps, eps_high, beta, temperature):
    per_sequence = []
    for row, completion in enumerate(COMPLETIONS):
        prompt = PROMPTS[row // GROUP]
        lp = sequence_logps(model, prompt, completion, temperature)
        with torch.no_grad():
            old = lp.detach() if old_model is None else sequence_logps(old_model, prompt, completion, temperature)
            ref = sequence_logps(ref_model, prompt, completion, temperature) if beta else None
        terms = []
        for k in range(len(completion)):
            ratio = torch.exp(lp[k] - old[k])
            a = advantages[row]
            term = -torch.minimum(ratio * a, ratio.clamp(1 - eps, 1 + eps_high) * a)
            if beta:
                d = ref[k] - lp[k]
                term = term + beta * (torch.exp(d) - d - 1)
            terms.append(term)
        per_sequence.append(terms)
    if loss_type == "grpo":
        return sum(sum(t) / len(t) for t in per_sequence) / len(per_sequence)
    total = sum(sum(t) for t in per_sequence)
    if loss_type == "dapo":
        return total / sum(len(t) for t in per_sequence)
    return total / (len(per_sequence) * MAX_NEW)


def aligned(model, rows, temperature):
    """The independent per-token values placed where token_logps puts them ([B, T])."""
    out = torch.zeros(rows.labels.shape)
    with torch.no_grad():
        for row, completion in enumerate(COMPLETIONS):
            start = len(PROMPTS[row // GROUP]) - 1
            out[row, start:start + len(completion)] = sequence_logps(model, PROMPTS[row // GROUP], completion, temperature)
    return out


@pytest.mark.parametrize("loss_type,iterations,beta,temperature", [
    ("grpo", 1, 0.0, 1.0), ("dapo", 1, 0.0, 1.0), ("dr_grpo", 1, 0.0, 1.0),
    ("grpo", 2, 0.1, 0.7), ("dapo", 2, 0.1, 1.0), ("dr_grpo", 2, 0.1, 1.3),
])
def test_loss_and_gradients_equal_an_independent_computation(tiny_model_dir, loss_type, iterations, beta, temperature):
    cfg = grpo_config(f"objective.loss_type={loss_type}", f"objective.group_size={GROUP}",
                      f"objective.max_new_tokens={MAX_NEW}", f"objective.beta={beta}", "objective.epsilon=0.1",
                      "objective.epsilon_high=0.15", f"objective.temperature={temperature}",
                      f"objective.iterations={iterations}")
    torch.manual_seed(0)
    model = tiny_model(tiny_model_dir)
    old_model = perturbed(model, 0.02, seed=1) if iterations > 1 else None  # ratios far from 1: clipping active
    ref_model = perturbed(model, 0.05, seed=2)
    objective = GRPOObjective(cfg, tokenizer=type("T", (), {"pad_token_id": 0})())
    objective.train_examples = [Example([], [], prompt_ids=p) for p in PROMPTS]
    advantages = group_advantages(REWARDS, GROUP, "group", None).float()
    batch = objective.rollout_batch([0, 1], COMPLETIONS, advantages)
    if old_model is not None:
        batch.old_logps = aligned(old_model, batch.rows, temperature)
    if beta:
        batch.ref_logps = aligned(ref_model, batch.rows, temperature)
    strategy = build_strategy(StrategyConfig(name="single"))
    forward = ModelForward(model, strategy, bf16=False).bind(model)
    out = objective.loss(forward, batch)
    loss = out.loss_sum / objective.loss_count(batch)
    loss.backward()
    got_grads = {n: p.grad.clone() for n, p in model.named_parameters()}

    expected_model = tiny_model(tiny_model_dir)
    want = independent_loss(expected_model, old_model, ref_model, advantages, loss_type, 0.1, 0.15, beta, temperature)
    want.backward()
    assert loss.item() == pytest.approx(want.item(), rel=1e-5, abs=1e-7)
    for name, p in expected_model.named_parameters():
        torch.testing.assert_close(got_grads[name], p.grad, rtol=1e-4, atol=1e-6, msg=name)
    assert out.sums["completion_tokens"].item() == sum(map(len, COMPLETIONS))
    if iterations > 1:
        assert out.sums["clipped_tokens"].item() > 0  # the clip was exercised
    if beta:
        assert out.sums["kl_sum"].item() > 0


def test_entropy_equals_the_full_distributions(tiny_model_dir):
    cfg = grpo_config(f"objective.group_size={GROUP}", "objective.temperature=0.8")
    model = tiny_model(tiny_model_dir)
    objective = GRPOObjective(cfg, tokenizer=type("T", (), {"pad_token_id": 0})())
    objective.train_examples = [Example([], [], prompt_ids=p) for p in PROMPTS]
    batch = objective.rollout_batch([0, 1], COMPLETIONS, torch.zeros(len(COMPLETIONS)))
    forward = ModelForward(model, build_strategy(StrategyConfig(name="single")), bf16=False).bind(model)
    entropy = torch.zeros(batch.rows.labels.shape)
    forward.token_logps(batch.rows, 0.8, entropy)
    mask = completion_mask(batch.rows)
    with torch.no_grad():
        logp = (model(input_ids=batch.rows.input_ids, attention_mask=batch.rows.attention_mask).logits / 0.8).log_softmax(-1)
    want = -(logp.exp() * logp).sum(-1)
    torch.testing.assert_close(entropy[mask], want[mask], rtol=1e-5, atol=1e-5)
    assert (entropy[~mask] == 0).all()


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_advantages_are_rewards_relative_to_their_group(scale):
    rewards = torch.tensor([1.0, 0.0, 0.5, 0.0, 2.0, 2.0, 3.0, 3.0], dtype=torch.float64)
    r = rewards.numpy().reshape(-1, 4)
    centred = r - r.mean(1, keepdims=True)
    batch_std = float(np.std(rewards.numpy(), ddof=1))
    want = {"group": centred / (np.std(r, axis=1, ddof=1, keepdims=True) + 1e-4),
            "batch": centred / (batch_std + 1e-4), "none": centred}[scale]
    got = group_advantages(rewards, 4, scale, batch_std)
    np.testing.assert_allclose(got.numpy(), want.reshape(-1), rtol=1e-12)


def test_a_group_of_equal_rewards_has_zero_advantage():
    got = group_advantages(torch.tensor([1.0, 1.0, 1.0, 0.0, 1.0, 0.0]), 3, "group", None)
    assert got[:3].abs().max() == 0


# --- rollouts ------------------------------------------------------------------------------------


@pytest.mark.parametrize("temperature,top_p", [(1.0, 1.0), (0.7, 1.0), (1.0, 0.8)])
def test_seeded_sampling_draws_from_the_softmax(temperature, top_p):
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0])
    n = 40000
    keys = row_keys(0, 3, list(range(n)), [0] * n, "cpu")
    scores = SeededSampling(keys, 0, temperature, top_p)(torch.zeros(n, 0, dtype=torch.long), logits.expand(n, -1))
    freq = torch.bincount(scores.argmax(-1), minlength=5).double() / n
    p = (logits.double() / temperature).softmax(-1)
    if top_p < 1:  # the nucleus: the top tokens until their mass reaches top_p, renormalised
        kept = (p.cumsum(-1) - p) < top_p
        p = torch.where(kept, p, 0.0)
        p = p / p.sum()
    np.testing.assert_allclose(freq.numpy(), p.numpy(), atol=0.012)  # ~4 sigma at n = 40,000


def test_top_p_keeps_the_smallest_set_reaching_p():
    scores = torch.tensor([[0.0, 3.0, 1.0, 2.0]])  # probabilities 0.032, 0.644, 0.087, 0.237
    kept = top_p_filter(scores, 0.8).isfinite()[0].tolist()
    assert kept == [False, True, False, True]
    assert top_p_filter(scores, 0.5).isfinite()[0].tolist() == [False, True, False, False]


def test_noise_depends_on_the_key_only():
    a = row_keys(7, 2, [10, 11, 12], [0, 1, 0], "cpu")
    b = row_keys(7, 2, [12], [0], "cpu")
    assert a[2] == b[0]
    assert len(set(a.tolist())) == 3
    assert row_keys(7, 3, [12], [0], "cpu")[0] != b[0]  # another step, another draw
    assert row_keys(8, 2, [12], [0], "cpu")[0] != b[0]  # another seed


def test_a_prompts_completions_do_not_depend_on_what_is_generated_beside_them(tiny_model_dir, tiny_tokenizer):
    model = tiny_model(tiny_model_dir)
    sampling = Sampling(group_size=3, max_new_tokens=12, temperature=1.0, top_p=0.95, seed=0)
    a = tiny_tokenizer("Extract: Ana is 30.")["input_ids"]
    b = tiny_tokenizer("Meet Ben, a 41-year-old pilot from Oslo, who flies.")["input_ids"]
    both = sample_completions(model, tiny_tokenizer, [a, b], [4, 9], 5, sampling, torch.device("cpu"), False)
    alone = sample_completions(model, tiny_tokenizer, [b], [9], 5, sampling, torch.device("cpu"), False)
    assert both[3:] == alone
    assert len(both) == 6 and all(len(c) <= 12 for c in both)
    assert len({tuple(c) for c in both[3:]}) > 1  # a group's samples differ
    later = sample_completions(model, tiny_tokenizer, [b], [9], 6, sampling, torch.device("cpu"), False)
    assert later != alone


# --- configuration -------------------------------------------------------------------------------


@pytest.mark.parametrize("overrides,message", [
    (["objective.loss_type=sigmoid"], "is a dpo loss"),
    (["objective.rewards=[]"], "needs objective.rewards"),
    (["objective.group_size=1"], "a group of one"),
    (["objective.temperature=0"], "objective.temperature must be > 0"),
    (["objective.top_p=0"], "objective.top_p must be in"),
    (["objective.reward_weights=[1.0,2.0]"], "2 weights for 1 rewards"),
    (["objective.reference=precomputed"], "cannot be computed ahead"),
    (["objective.reference=adapter"], "needs peft=lora"),
    (["data.packing=true"], "data.packing=true with objective=grpo"),
    (["objective.label_smoothing=0.1"], "objective.label_smoothing applies to objective=dpo"),
    (["data=preference"], "holds chosen/rejected pairs"),
    (["data=text"], "needs data.format=instruction|chat"),
])
def test_impossible_grpo_settings_are_refused_before_launch(overrides, message):
    with pytest.raises(ConfigError, match=message):
        grpo_config(*overrides)


def test_an_unknown_reward_is_refused_before_launch():
    from ftdist.objectives import check_objective

    with pytest.raises(ConfigError, match="no_such_reward"):
        check_objective(grpo_config("objective.rewards=[no_such_reward]"))


def test_dpo_refuses_a_grpo_loss():
    with pytest.raises(ConfigError, match="is a grpo loss"):
        load_config(compose(["+experiment=tiny_dpo_cpu", "objective.loss_type=dapo", "output_dir=/tmp/unused"]))


# --- prompts without responses -------------------------------------------------------------------


def test_rows_without_a_response_are_prompts_to_sample_for(tmp_path, tiny_tokenizer):
    import json

    rows = [{"prompt": "Capital of Peru?", "response": "Lima."}, {"prompt": "Capital of Chile?"},
            {"prompt": "Two plus two?", "response": None}]
    chat = [{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."},
                          {"role": "user", "content": "Capital of Peru?"}]},
            {"messages": [{"role": "user", "content": "Capital of Chile?"}, {"role": "assistant", "content": "Santiago."}]}]
    (tmp_path / "i.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "c.jsonl").write_text("".join(json.dumps(r) + "\n" for r in chat))
    for path, fmt, alone in ((tmp_path / "i.jsonl", "instruction", [1, 2]), (tmp_path / "c.jsonl", "chat", [0])):
        cfg = grpo_config(f"data.path={path}", f"data.format={fmt}", "data.val_fraction=0", "data.cache=false")
        objective = GRPOObjective(cfg, tiny_tokenizer)
        train, _, _ = objective.prepare_data(tiny_tokenizer)
        assert len(train) == len(rows if fmt == "instruction" else chat)  # none dropped
        assert len(objective.make_items(train)) == len(train)
        for i, e in enumerate(train):
            assert e.prompt_ids is not None
            if i in alone:  # the prompt as a response would follow it; nothing labelled, no reference
                assert e.reference is None and e.input_ids == e.prompt_ids
                assert set(e.labels) == {-100}
                text = tiny_tokenizer.decode(e.prompt_ids)
                assert "Capital" in text or "Two plus" in text
            else:
                assert e.reference is not None
    # SFT still needs every response: the same file fails there, naming the row.
    from ftdist.data.sources import DataError

    with pytest.raises((DataError, ConfigError)):
        from ftdist.data.prepare import prepare_data

        sft = load_config(compose(["+experiment=tiny_cpu", f"data.path={tmp_path / 'i.jsonl'}", "data.val_fraction=0",
                                   "data.cache=false", "output_dir=/tmp/unused"]))
        prepare_data(sft.data, tiny_tokenizer, 0)
    with pytest.raises(ConfigError, match="data.responses=optional"):
        load_config(compose(["+experiment=tiny_cpu", "data.responses=optional", "output_dir=/tmp/unused"]))
