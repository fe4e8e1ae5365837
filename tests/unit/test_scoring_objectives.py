"""Classification and reward objectives against independent computations.

Every expected figure comes from the Hugging Face sequence-classification model's own forward,
one document (or one sequence of a pair) at a time, unpadded: transformers pools the last token
itself there, so the trainer's pooling of packed and padded rows is checked against another
implementation, not against itself.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from helpers import packed_padded_accumulated, random_pairs

from ftdist.config import DataConfig, FtdistConfig, ModelConfig, ObjectiveConfig, PeftConfig, TinyModelSpec, TrainConfig
from ftdist.data.example import Document
from ftdist.model.heads import ScoreHead
from ftdist.model.loading import load_model
from ftdist.objectives import build_objective
from ftdist.parallel.base import Strategy
from ftdist.trainer import Trainer

LABELS = ("billing", "shipping", "technical")


def random_documents(n: int, seed: int = 0) -> list[Document]:
    g = torch.Generator().manual_seed(seed)
    docs = []
    for i in range(n):
        ids = torch.randint(10, 800, (2 + (i * 7) % 13,), generator=g).tolist()
        target = int(torch.randint(0, len(LABELS), (1,), generator=g))
        docs.append(Document(ids, LABELS[target], target))
    return docs



@pytest.fixture(scope="module")
def classifier():
    torch.manual_seed(0)
    return load_model(ModelConfig(tiny=TinyModelSpec()), torch.device("cpu"), head=ScoreHead(LABELS, "classification")).model


@pytest.fixture(scope="module")
def reward_model():
    torch.manual_seed(0)
    return load_model(ModelConfig(tiny=TinyModelSpec()), torch.device("cpu"), head=ScoreHead(("reward",), "reward")).model


def make_trainer(tmp_path, tokenizer, model, examples, objective: ObjectiveConfig, packing: bool, micro: int,
                 weights=None):
    fmt = "classification" if objective.name == "classification" else "preference"
    cfg = FtdistConfig(
        model=ModelConfig(tiny=TinyModelSpec()),
        data=DataConfig(path="unused", format=fmt, max_seq_len=64, packing=packing),
        train=TrainConfig(micro_batch_size=micro, grad_accum_steps=1, max_steps=3, lr=1e-3, warmup_steps=0),
        objective=objective, peft=PeftConfig(method="none"), output_dir=str(tmp_path),
    )
    obj = build_objective(cfg, tokenizer)
    if objective.name == "classification":  # what prepare_data sets from the data
        obj.labels = list(LABELS)
        obj.weights = None if weights is None else torch.tensor(weights)
    tmp_path.mkdir(parents=True, exist_ok=True)
    return Trainer(cfg, Strategy(cfg.strategy), model, tokenizer, examples, examples[:6], tmp_path, objective=obj)



def alone(model, ids: list[int]) -> torch.Tensor:
    """transformers' own pooled output for one unpadded sequence."""
    return model(input_ids=torch.tensor([ids])).logits[0].float()


def step_examples(trainer, examples):
    return [examples[i] for item in trainer.sampler.global_indices(0) for i in trainer.train_items[item]]


@pytest.mark.parametrize("packing", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("weights", [None, [0.5, 2.0, 1.0]], ids=["unweighted", "weighted"])
def test_classification_step_is_the_mean_cross_entropy_of_each_document_alone(tmp_path, tiny_tokenizer, classifier,
                                                                              packing, weights):
    docs = random_documents(40)
    model = copy.deepcopy(classifier)
    trainer = make_trainer(tmp_path, tiny_tokenizer, model, docs, ObjectiveConfig(name="classification"), packing,
                           micro=2 if packing else 6, weights=weights)
    step = step_examples(trainer, docs)
    if packing:
        assert len(step) > 2, "packed rows should hold several documents"
    w = torch.ones(len(LABELS)) if weights is None else torch.tensor(weights)
    with torch.no_grad():
        expected = sum(w[d.target] * F.cross_entropy(alone(classifier, d.input_ids), torch.tensor(d.target))
                       for d in step) / len(step)
        correct = sum(int(alone(classifier, d.input_ids).argmax()) == d.target for d in step)
    record = trainer.train_step()
    assert record["documents_scored"] == len(step)
    assert record["loss"] == pytest.approx(float(expected), rel=1e-5)
    assert record["accuracy"] == pytest.approx(correct / len(step))


@pytest.mark.parametrize("objective", ["classification", "reward"])
def test_packed_and_accumulated_give_the_padded_gradient(tmp_path, tiny_tokenizer, classifier, reward_model, objective):
    """The documents (pairs) of a packed step, also as one padded micro-batch and as 3 accumulated
    ones: the same loss and gradient, fp32, 1e-5 relative."""
    examples = random_documents(48, seed=3) if objective == "classification" else random_pairs(32, seed=5, margins=True)
    base = classifier if objective == "classification" else reward_model
    cfg = ObjectiveConfig(name=objective)

    def trainer(name, packing):
        return make_trainer(tmp_path / name, tiny_tokenizer, copy.deepcopy(base), examples, cfg, packing, micro=2)

    runs = packed_padded_accumulated(trainer, examples)
    want_grads, want_loss = runs[1]
    assert "score" in " ".join(want_grads), "the head must train"
    for grads, loss in (runs[0], runs[2]):
        assert loss == pytest.approx(want_loss, rel=1e-5)
        assert grads.keys() == want_grads.keys()
        for name, g in want_grads.items():
            torch.testing.assert_close(grads[name], g, rtol=1e-5, atol=1e-6, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("packing", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("center", [0.0, 0.1])
def test_reward_step_is_bradley_terry_over_each_sequence_alone(tmp_path, tiny_tokenizer, reward_model, packing, center):
    pairs = random_pairs(30, seed=1, margins=True)
    trainer = make_trainer(tmp_path, tiny_tokenizer, copy.deepcopy(reward_model), pairs,
                           ObjectiveConfig(name="reward", center_rewards=center), packing, micro=2 if packing else 5)
    step = step_examples(trainer, pairs)
    with torch.no_grad():
        chosen = torch.stack([alone(reward_model, p.chosen.input_ids)[0] for p in step])
        rejected = torch.stack([alone(reward_model, p.rejected.input_ids)[0] for p in step])
    margins = torch.tensor([p.margin for p in step])
    losses = -F.logsigmoid(chosen - rejected - margins) + center * (chosen + rejected) ** 2
    record = trainer.train_step()
    assert record["pairs"] == len(step)
    assert record["loss"] == pytest.approx(float(losses.mean()), rel=1e-5)
    assert record["rewards/accuracies"] == pytest.approx(float((chosen > rejected).float().mean()))
    assert record["rewards/margins"] == pytest.approx(float((chosen - rejected).mean()), rel=1e-5, abs=1e-6)
    assert record["rewards/chosen"] == pytest.approx(float(chosen.mean()), rel=1e-5, abs=1e-6)


def test_classification_evaluation_gathers_every_document(tmp_path, tiny_tokenizer, classifier):
    """eval_accuracy and eval_loss over the validation documents, each scored alone; the
    predictions file holds each document once, in validation order."""
    import json

    docs = random_documents(20, seed=9)
    trainer = make_trainer(tmp_path, tiny_tokenizer, copy.deepcopy(classifier), docs,
                           ObjectiveConfig(name="classification"), packing=True, micro=2)
    trainer.val_examples = docs
    trainer.val_items = trainer.objective.make_items(docs)
    record = trainer.evaluate(with_generation=False)
    with torch.no_grad():
        scores = [alone(classifier, d.input_ids) for d in docs]
    expected_loss = sum(F.cross_entropy(s, torch.tensor(d.target)) for s, d in zip(scores, docs)) / len(docs)
    expected_acc = sum(int(s.argmax()) == d.target for s, d in zip(scores, docs)) / len(docs)
    assert record["eval_documents"] == len(docs)
    assert record["eval_loss"] == pytest.approx(float(expected_loss), rel=1e-5)
    assert record["eval_accuracy"] == pytest.approx(expected_acc)
    lines = [json.loads(x) for x in (tmp_path / "eval" / "predictions_step_00000000.jsonl").read_text().splitlines()]
    assert [r["index"] for r in lines] == list(range(len(docs)))
    for r, s in zip(lines, scores):
        probs = torch.softmax(s, -1)
        assert r["predicted"] == LABELS[int(probs.argmax())]
        assert [r["probabilities"][name] for name in LABELS] == pytest.approx(probs.tolist(), abs=1e-6)


def test_a_peft_scoring_head_trains_in_fp32_on_a_bf16_base():
    """peft keeps its LoRA weights in fp32; the head it trains in full (modules_to_save) is kept
    in fp32 too, and its bf16 input is cast up to meet it."""
    from ftdist.model.heads import HeadOutput

    torch.manual_seed(0)
    model = load_model(ModelConfig(tiny=TinyModelSpec(), dtype="bf16"), torch.device("cpu"),
                       PeftConfig(method="lora", r=4, dropout=0.0), head=ScoreHead(LABELS, "classification")).model
    trained = {n: p for n, p in model.named_parameters() if p.requires_grad and "score" in n}
    assert list(trained) == ["base_model.model.score.modules_to_save.default.weight"]
    assert trained[next(iter(trained))].dtype == torch.float32
    assert model.base_model.model.model.embed_tokens.weight.dtype == torch.bfloat16
    head = HeadOutput(model)
    model(input_ids=torch.tensor([[5, 6, 7]]))
    scores = head.take()
    assert scores.dtype == torch.float32
    scores[0, -1].sum().backward()
    assert trained[next(iter(trained))].grad is not None
