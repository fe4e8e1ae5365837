"""dpo, simpo and orpo against the papers' formulas computed by hand, pair by pair.

Every expected figure comes from running each sequence alone through an unwrapped copy of the
model (no padding, no packing, no batching) and applying the formula in plain Python floats;
the trainer's step-1 loss and metrics (padded or packed, accumulated or not) must equal them.
The reference is a perturbed copy of the policy, so log-ratios, rewards and losses are far from
their step-0 values and a sign or a normalisation error shows.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from helpers import packed_padded_accumulated, random_pairs

from ftdist.config import DataConfig, FtdistConfig, ModelConfig, ObjectiveConfig, PeftConfig, TinyModelSpec, TrainConfig
from ftdist.constants import IGNORE_INDEX
from ftdist.data.example import Example
from ftdist.data.preference import Pair
from ftdist.model.loading import load_model
from ftdist.parallel.base import Strategy
from ftdist.trainer import Trainer


def sequence_logp(model, example: Example) -> tuple[float, int]:
    """(summed log-prob of the labelled tokens, their number), the sequence run alone."""
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([example.input_ids])).logits[0, :-1].double(), dim=-1)
    total, count = 0.0, 0
    for pos, label in enumerate(example.labels[1:]):
        if label != IGNORE_INDEX:
            total += logp[pos, label].item()
            count += 1
    return total, count


def logsig(x: float) -> float:
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def by_hand(objective: ObjectiveConfig, policy, reference, pairs: list[Pair]) -> dict:
    """The mean loss and TRL-named metrics over `pairs`, from the papers' formulas."""
    o, rows = objective, []
    for pair in pairs:
        (pc, nc), (pr, nr) = sequence_logp(policy, pair.chosen), sequence_logp(policy, pair.rejected)
        eps = o.label_smoothing
        if o.name == "dpo":
            rc, rr = sequence_logp(reference, pair.chosen)[0], sequence_logp(reference, pair.rejected)[0]
            delta = (pc - rc) - (pr - rr)
            loss = {
                "sigmoid": -(1 - eps) * logsig(o.beta * delta) - eps * logsig(-o.beta * delta),
                "robust": (-(1 - eps) * logsig(o.beta * delta) + eps * logsig(-o.beta * delta)) / (1 - 2 * eps),
                "hinge": max(0.0, 1 - o.beta * delta),
                "ipo": ((pc - rc) / nc - (pr - rr) / nr - 1 / (2 * o.beta)) ** 2,
            }[o.loss_type] + o.sft_weight * (-pc / nc)
            chosen_reward, rejected_reward = o.beta * (pc - rc), o.beta * (pr - rr)
        elif o.name == "simpo":
            x = o.beta * pc / nc - o.beta * pr / nr - o.gamma
            loss = -(1 - eps) * logsig(x) - eps * logsig(-x)
            chosen_reward, rejected_reward = o.beta * pc / nc, o.beta * pr / nr
        else:  # orpo
            mc, mr = pc / nc, pr / nr
            log_odds = (mc - math.log(1 - math.exp(mc))) - (mr - math.log(1 - math.exp(mr)))
            loss = -mc - o.beta * logsig(log_odds)
            chosen_reward, rejected_reward = o.beta * mc, o.beta * mr
        rows.append((loss, chosen_reward, rejected_reward, pc, pr))
    n = len(rows)
    mean = lambda k: sum(r[k] for r in rows) / n
    return {
        "loss": mean(0), "rewards/chosen": mean(1), "rewards/rejected": mean(2),
        "rewards/accuracies": sum(r[1] > r[2] for r in rows) / n, "rewards/margins": mean(1) - mean(2),
        "logps/chosen": mean(3), "logps/rejected": mean(4), "logps/chosen_preferred": sum(r[3] > r[4] for r in rows) / n,
    }


def perturbed(model, seed: int = 1, scale: float = 0.05):
    """A copy of `model` with noise on every weight: a reference that differs from the policy."""
    out = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in out.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)
    return out.eval()


def make_trainer(tmp_path, objective: ObjectiveConfig, pairs, packing=False, micro=4, accum=1, peft="none",
                 reference_model=None, model=None, tokenizer=None):
    cfg = FtdistConfig(
        model=ModelConfig(tiny=TinyModelSpec()),
        data=DataConfig(path="unused", format="preference", max_seq_len=64, packing=packing),
        train=TrainConfig(micro_batch_size=micro, grad_accum_steps=accum, max_steps=3, lr=1e-3, warmup_steps=0),
        objective=objective,
        peft=PeftConfig(method=peft, dropout=0.0),
        output_dir=str(tmp_path),
    )
    if model is None:
        model = load_model(cfg.model, torch.device("cpu"), cfg.peft).model
    tmp_path.mkdir(parents=True, exist_ok=True)
    return Trainer(cfg, Strategy(cfg.strategy), model, tokenizer or TOKENIZER[0], pairs, pairs[:6], tmp_path,
                   reference_model=reference_model)


TOKENIZER: list = []  # the tiny tokenizer (objectives read its pad id); set by the autouse fixture


@pytest.fixture(autouse=True)
def _tokenizer(tiny_tokenizer):
    TOKENIZER[:] = [tiny_tokenizer]


def step0_pairs(trainer, pairs):
    return [pairs[i] for item in trainer.sampler.global_indices(0) for i in trainer.train_items[item]]


@pytest.fixture(scope="module")
def policy():
    return load_model(ModelConfig(tiny=TinyModelSpec()), torch.device("cpu")).model


DPO_CASES = {
    "sigmoid": ObjectiveConfig(name="dpo", beta=0.3),
    "sigmoid_smoothed_sft": ObjectiveConfig(name="dpo", beta=0.2, label_smoothing=0.1, sft_weight=0.5),
    "robust": ObjectiveConfig(name="dpo", loss_type="robust", beta=0.2, label_smoothing=0.2),
    "hinge": ObjectiveConfig(name="dpo", loss_type="hinge", beta=0.05),
    "ipo": ObjectiveConfig(name="dpo", loss_type="ipo", beta=0.5),
}


@pytest.mark.parametrize("case", sorted(DPO_CASES))
@pytest.mark.parametrize("packing", [False, True], ids=["padded", "packed"])
def test_dpo_step_matches_the_formula_pair_by_pair(tmp_path, policy, case, packing):
    pairs = random_pairs(24)
    reference = perturbed(policy)
    objective = copy.deepcopy(DPO_CASES[case])
    objective.reference = "model"
    trainer = make_trainer(tmp_path, objective, pairs, packing=packing, micro=2 if packing else 4,
                           model=copy.deepcopy(policy), reference_model=copy.deepcopy(reference))
    expected = by_hand(objective, policy, reference, step0_pairs(trainer, pairs))
    record = trainer.train_step()
    assert record["pairs"] == len(step0_pairs(trainer, pairs))
    for key, value in expected.items():
        assert record[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key
    assert 0.0 < expected["rewards/accuracies"] < 1.0  # a perturbed reference: a non-trivial step


@pytest.mark.parametrize("name", ["simpo", "orpo"])
def test_reference_free_objectives_match_their_formulas(tmp_path, policy, name):
    pairs = random_pairs(16, seed=3)
    objective = ObjectiveConfig(name=name, beta=2.0 if name == "simpo" else 0.25, gamma=0.7 if name == "simpo" else 0.5,
                                label_smoothing=0.1 if name == "simpo" else 0.0)
    trainer = make_trainer(tmp_path, objective, pairs, model=copy.deepcopy(policy))
    expected = by_hand(objective, policy, None, step0_pairs(trainer, pairs))
    record = trainer.train_step()
    for key, value in expected.items():
        assert record[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key



def test_packed_and_accumulated_dpo_give_the_padded_gradient(tmp_path, policy):
    """The pairs of a packed step, also as one padded micro-batch and as 3 accumulated ones: the
    same loss and gradient, every pair weighing the same wherever it lands."""
    pairs = random_pairs(32, seed=7)
    reference = perturbed(policy)
    objective = ObjectiveConfig(name="dpo", beta=0.3, reference="model")

    def trainer(name, packing):
        return make_trainer(tmp_path / name, objective, pairs, packing=packing, micro=2, model=copy.deepcopy(policy),
                            reference_model=copy.deepcopy(reference))

    runs = packed_padded_accumulated(trainer, pairs)
    reference_grads, reference_loss = runs[1]
    for grads, loss in (runs[0], runs[2]):
        assert loss == pytest.approx(reference_loss, rel=1e-5)
        assert grads.keys() == reference_grads.keys()
        for name, g in reference_grads.items():
            torch.testing.assert_close(grads[name], g, rtol=1e-4, atol=1e-6, msg=name)


def run_losses(trainer, steps: int = 3) -> list[float]:
    return [trainer.train_step()["loss"] for _ in range(steps)]


@pytest.mark.parametrize("method", ["lora", "dora", "qlora"])
def test_reference_modes_give_the_same_losses_under_adapters(tmp_path, method):
    """adapter (the policy with its adapters off), model (a frozen copy of the base, 4-bit under
    qlora) and precomputed: one trajectory."""
    pairs = random_pairs(24, seed=11)
    peft = PeftConfig(method=method, dropout=0.0)
    runs = {}
    for mode in ("adapter", "model", "precomputed"):
        torch.manual_seed(0)  # adapter weights are drawn at wrapping: the same for each mode
        cfg_model = ModelConfig(tiny=TinyModelSpec())
        model = load_model(cfg_model, torch.device("cpu"), peft).model
        reference = load_model(cfg_model, torch.device("cpu"), peft, adapters=False).model if mode == "model" else None
        trainer = make_trainer(tmp_path / mode, ObjectiveConfig(name="dpo", beta=0.5, reference=mode), pairs,
                               peft=method, model=model, reference_model=reference)
        runs[mode] = run_losses(trainer)
    assert runs["adapter"][0] == pytest.approx(math.log(2), abs=1e-6)
    assert abs(runs["adapter"][-1] - math.log(2)) > 1e-4  # the adapters moved: later steps are not ln 2
    for mode in ("model", "precomputed"):
        assert runs[mode] == pytest.approx(runs["adapter"], rel=1e-5), mode


def test_precomputed_from_the_starting_weights_equals_a_frozen_copy(tmp_path, policy):
    pairs = random_pairs(24, seed=13)
    frozen = make_trainer(tmp_path / "model", ObjectiveConfig(name="dpo", reference="model"), pairs,
                          model=copy.deepcopy(policy), reference_model=copy.deepcopy(policy))
    cached = make_trainer(tmp_path / "pre", ObjectiveConfig(name="dpo", reference="precomputed"), pairs,
                          model=copy.deepcopy(policy))
    assert (tmp_path / "pre" / "reference_logps.pt").is_file()
    assert run_losses(cached) == pytest.approx(run_losses(frozen), rel=1e-5)


def test_eval_reports_means_over_validation_pairs(tmp_path, policy):
    pairs = random_pairs(20, seed=17)
    reference = perturbed(policy, seed=4)
    objective = ObjectiveConfig(name="dpo", beta=0.4, reference="model")
    trainer = make_trainer(tmp_path, objective, pairs, model=copy.deepcopy(policy),
                           reference_model=copy.deepcopy(reference))
    trainer.cfg.train.eval_batch_size = 4  # 6 validation pairs: batches of 4 and 2, padded unevenly
    expected = by_hand(objective, policy, reference, pairs[:6])
    record = trainer.evaluate(with_generation=False)
    assert record["eval_pairs"] == 6
    assert record["eval_loss"] == pytest.approx(expected["loss"], rel=1e-5)
    for key in ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen"):
        assert record[f"eval_{key}"] == pytest.approx(expected[key], rel=1e-5, abs=1e-6), key


@pytest.mark.parametrize(("mode", "forwards"), [("model", 1), ("precomputed", 0)])
def test_step_flops_count_the_reference_forward(tmp_path, policy, mode, forwards):
    """A live reference adds one forward (2N per token, a third of the attention term) to every
    micro-batch's training FLOPs; a precomputed one adds nothing."""
    from ftdist.metrics import causal_pairs, matmul_params

    pairs = random_pairs(12, seed=19)
    trainer = make_trainer(tmp_path, ObjectiveConfig(name="dpo", reference=mode), pairs, model=copy.deepcopy(policy),
                           reference_model=copy.deepcopy(policy) if mode == "model" else None)
    batches = trainer.step_batches(0)
    lengths = [n for b in batches for n in b.document_lengths]
    n = matmul_params(trainer.model)
    attention = trainer.flops.per_attention_pair * sum(causal_pairs(x) for x in lengths)
    train = 6 * n * sum(lengths) + attention
    expected = train + forwards * (2 * n * sum(lengths) + attention / 3)
    assert trainer.forward_backward(batches)["flops"] == pytest.approx(expected, rel=1e-9)
