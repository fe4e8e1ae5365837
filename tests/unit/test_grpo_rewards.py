"""GRPO reward functions (ftdist.objectives.rewards) against values worked out by hand.

The built-ins are checked on hand-made completions whose rewards are written out here; a user's
reward is a real module imported from a dotted path; the reward model is a tiny reward run
trained for one step, its scores checked against ftdist.score's own scoring of a rows file
(batched and padded differently) and against transformers' own forward of each sequence alone.
"""

from __future__ import annotations

import io
import json
import re
import sys

import pytest
import torch
from helpers import shared_run

from ftdist.config import ConfigError
from ftdist.objectives.rewards import RewardError, RewardFunctions, check_reward_specs, reward_names
from ftdist.score import load_reward_model

CPU = torch.device("cpu")

# (completion, reference, exact_match, numeric_answer, json_valid, format:\d+)
TABLE = [
    ("42", "42", 1.0, 1.0, 1.0, 1.0),
    ("  42\n", "#### 42", 0.0, 1.0, 1.0, 1.0),  # GSM8K's answer marker; JSON allows surrounding whitespace
    ("The total is 1,234.0", "so 1234", 0.0, 1.0, 0.0, 0.0),  # separators and a trailing .0 do not matter
    ('{"answer": 7}', '{"answer": 7}', 1.0, 1.0, 1.0, 0.0),
    ("NaN", "nan", 0.0, 0.0, 0.0, 0.0),  # no number; NaN is not RFC 8259 JSON
    ("7 then 8", "7", 0.0, 0.0, 0.0, 0.0),  # the last number counts
]
COMPLETIONS = [row[0] for row in TABLE]
REFERENCES = [row[1] for row in TABLE]
PROMPTS = [f"question {k}" for k in range(len(TABLE))]
EXPECTED = {name: [row[2 + j] for row in TABLE] for j, name in enumerate(("exact_match", "numeric_answer", "json_valid",
                                                                          "format"))}

USER_REWARDS = '''
import torch

CALLS = []
NOT_CALLABLE = 3

def length_reward(prompts, completions, references):
    CALLS.append((prompts, completions, references))
    return [len(c) / 10 for c in completions]

def exact_match(prompts, completions, references):  # named like a built-in: its metric is exact_match_2
    return [0.5] * len(completions)

def tensor_reward(prompts, completions, references):
    return torch.arange(len(completions), dtype=torch.float32)

def bool_reward(prompts, completions, references):
    return tuple(c.startswith("4") for c in completions)

def raises(prompts, completions, references):
    raise KeyError("no such thing")

def too_few(prompts, completions, references):
    return [1.0] * (len(completions) - 1)

def nan_reward(prompts, completions, references):
    return [0.0, float("nan"), 0.0]

def inf_reward(prompts, completions, references):
    return [0.0, 1.0, float("inf")]

def tensor_inf(prompts, completions, references):
    return torch.tensor([-float("inf"), 0.0, 0.0])

def none_reward(prompts, completions, references):
    return [None, 1.0, 1.0]

def text_reward(prompts, completions, references):
    return ["1.0", "1.0", "1.0"]

def scalar_reward(prompts, completions, references):
    return 1.0

def column_reward(prompts, completions, references):
    return torch.zeros(len(completions), 1)
'''


@pytest.fixture()
def user_module(tmp_path, monkeypatch):
    """`rewardmod`, a module of reward functions on sys.path, imported afresh by each test."""
    (tmp_path / "rewardmod.py").write_text(USER_REWARDS)
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("rewardmod", None)
    yield "rewardmod"
    sys.modules.pop("rewardmod", None)


def test_builtin_rewards_give_each_completions_value_and_the_weighted_sum():
    specs, weights = ["exact_match", "numeric_answer", "json_valid", r"format:\d+"], [1.0, 0.5, 0.25, -2.0]
    totals, values = RewardFunctions(specs, weights, CPU).score(PROMPTS, COMPLETIONS, REFERENCES)
    assert values == EXPECTED
    assert totals == pytest.approx([1.0 + 0.5 + 0.25 - 2.0, 0.5 + 0.25 - 2.0, 0.5, 1.0 + 0.5 + 0.25, 0.0, 0.0])
    unweighted, _ = RewardFunctions(specs, None, CPU).score(PROMPTS, COMPLETIONS, REFERENCES)
    assert unweighted == [sum(row[2:]) for row in TABLE]


def test_format_reward_matches_the_whole_stripped_completion_across_lines():
    spec = r"format:<think>.*?</think>\s*<answer>.+</answer>"
    completions = ["<think>a\nb</think>\n<answer>4</answer>\n",  # `.` crosses lines; trailing newline stripped
                   "  <think>x</think><answer>4</answer>  ",
                   "<think>x</think><answer>4</answer> and more",  # text after: not the whole completion
                   "so <think>x</think><answer>4</answer>",  # text before: re.search would match, fullmatch not
                   "<think>x</think>"]
    _, values = RewardFunctions([spec], None, CPU).score([""] * 5, completions, [None] * 5)
    assert values == {"format": [1.0, 1.0, 0.0, 0.0, 0.0]}


@pytest.mark.parametrize("spec", ["exact_match", "numeric_answer"])
def test_a_reference_reward_on_a_row_without_a_reference_names_the_completion(spec):
    rewards = RewardFunctions(["json_valid", spec], None, CPU)
    with pytest.raises(RewardError, match=re.escape(f"objective.rewards[1]={spec}: completion 1's prompt row has no "
                                                    "reference response")):
        rewards.score(["p"] * 3, ["1", "2", "3"], ["1", None, "3"])
    _, values = RewardFunctions(["json_valid"], None, CPU).score(["p"] * 2, ["1", "x"], [None, None])
    assert values == {"json_valid": [1.0, 0.0]}  # json_valid reads no reference


def test_a_dotted_path_callable_is_called_with_the_rows_and_its_values_used(user_module):
    import rewardmod

    specs = ["rewardmod.length_reward", "rewardmod:tensor_reward", "rewardmod:bool_reward", "exact_match",
             "rewardmod.exact_match"]
    rewards = RewardFunctions(specs, [1.0, 2.0, 3.0, 1.0, 4.0], CPU)
    totals, values = rewards.score(PROMPTS, COMPLETIONS, REFERENCES)
    assert rewardmod.CALLS == [(PROMPTS, COMPLETIONS, REFERENCES)]
    lengths = [len(c) / 10 for c in COMPLETIONS]
    starts_with_4 = [1.0, 0.0, 0.0, 0.0, 0.0, 0.0]
    assert values == {"length_reward": lengths, "tensor_reward": [0.0, 1.0, 2.0, 3.0, 4.0, 5.0],
                      "bool_reward": starts_with_4, "exact_match": EXPECTED["exact_match"], "exact_match_2": [0.5] * 6}
    assert totals == pytest.approx([lengths[k] + 2.0 * k + 3.0 * starts_with_4[k] + EXPECTED["exact_match"][k] + 2.0
                                    for k in range(6)])


def test_reward_names_are_short_and_numbered_where_they_clash(user_module, tmp_path):
    (tmp_path / "rm" / "final").mkdir(parents=True)
    specs = ["exact_match", "format:a", "format:b", "rewardmod.length_reward", "rewardmod:length_reward",
             f"reward_model:{tmp_path / 'rm'}", f"reward_model:{tmp_path / 'rm' / 'final'}", "rewardmod.exact_match",
             "numeric_answer", "json_valid", "format:c"]
    assert reward_names(specs) == ["exact_match", "format", "format_2", "length_reward", "length_reward_2",
                                   "reward_model", "reward_model_2", "exact_match_2", "numeric_answer", "json_valid",
                                   "format_3"]


@pytest.mark.parametrize(("function", "problem"), [
    ("raises", "rewardmod.raises raised KeyError: 'no such thing'"),
    ("too_few", "rewardmod.too_few returned 2 values for 3 completions"),
    ("nan_reward", "rewardmod.nan_reward: completion 1's reward is nan, not finite"),
    ("inf_reward", "rewardmod.inf_reward: completion 2's reward is inf, not finite"),
    ("tensor_inf", "rewardmod.tensor_inf: completion 0's reward is -inf, not finite"),
    ("none_reward", "rewardmod.none_reward: completion 0's reward is None (NoneType), not a real number"),
    ("text_reward", "rewardmod.text_reward: completion 0's reward is '1.0' (str), not a real number"),
    ("scalar_reward", "rewardmod.scalar_reward returned a float, not a list of 3 numbers"),
    ("column_reward", "rewardmod.column_reward returned a Tensor of shape (3, 1)"),
])
def test_a_failing_or_malformed_reward_stops_with_reward_error_naming_it(user_module, function, problem):
    rewards = RewardFunctions(["json_valid", f"rewardmod.{function}"], None, CPU)
    with pytest.raises(RewardError, match=re.escape(f"objective.rewards[1]={problem}")):
        rewards.score(["p"] * 3, ["1", "2", "3"], ["1", "2", "3"])


@pytest.mark.parametrize(("specs", "message"), [
    (["exact_mach"], ("objective.rewards[0]=exact_mach: unknown reward; valid: exact_match | numeric_answer | "
                      "json_valid | format:REGEX | reward_model:PATH | a dotted path package.module.function")),
    (["regex:\\d+"], "objective.rewards[0]=regex:\\d+: unknown reward; valid: exact_match"),
    (["json_valid", "format:"], "objective.rewards[1]=format:: an empty pattern (write format:REGEX"),
    (["format:(ab"], "objective.rewards[0]=format:(ab: not a valid regular expression (missing ), unterminated"),
    (["reward_model:"], "objective.rewards[0]=reward_model:: no path (write reward_model:PATH"),
    (["reward_model:/no/such/run"], ("objective.rewards[0]=reward_model:/no/such/run: no such directory (a reward "
                                     "run's directory, its final/, or an export; working directory: ")),
    (["no_such_module_xyz.score"], ("objective.rewards[0]=no_such_module_xyz.score: cannot import module "
                                    "no_such_module_xyz (ModuleNotFoundError: No module named 'no_such_module_xyz')")),
    (["rewardmod:missing"], "objective.rewards[0]=rewardmod:missing: module rewardmod has no attribute missing"),
    (["rewardmod.NOT_CALLABLE"], ("objective.rewards[0]=rewardmod.NOT_CALLABLE: rewardmod.NOT_CALLABLE is not "
                                  "callable (it is of type int)")),
    (["exact_match", "json_valid", "exact_match"], ("objective.rewards[2]=exact_match: listed twice (also "
                                                    "objective.rewards[0]); give each reward once and weight it "
                                                    "with objective.reward_weights")),
])
def test_check_reward_specs_rejects_what_cannot_be_a_reward(user_module, specs, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        check_reward_specs(specs)


def test_check_reward_specs_accepts_every_kind(user_module, tmp_path):
    check_reward_specs(["exact_match", "numeric_answer", "json_valid", "format:<a>.*</a>", f"reward_model:{tmp_path}",
                        "rewardmod.length_reward", "rewardmod:tensor_reward"])


@pytest.mark.parametrize(("weights", "message"), [
    ([1.0], "objective.reward_weights has 1 weights for 2 rewards"),
    ([1.0, float("nan")], "objective.reward_weights[1]=nan: not a finite number"),
])
def test_reward_weights_must_be_one_finite_number_per_reward(weights, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        RewardFunctions(["exact_match", "json_valid"], weights, CPU)


# A reward model trained for one step: a random score head, scores that differ from text to text.
REWARD_RUN = ["model=tiny", "objective=reward", "data=preference", "data.path=synthetic:json_preference",
              "data.num_synthetic_rows=16", "data.max_seq_len=96", "data.val_fraction=0.25", "train.max_steps=1",
              "train.micro_batch_size=4", "train.warmup_steps=0", "train.eval_every_steps=null",
              "train.progress_bar=false"]
# 20 rows: two batches of the reward function's 16, completions of different lengths (padding).
RM_PROMPTS = [f"Give the record for item {k} as JSON." for k in range(20)]
RM_COMPLETIONS = [json.dumps({"item": k, "tags": ["x"] * (k % 5)}) if k % 3 else f"Item {k} has no record."
                  for k in range(20)]


def ftdist_score(run_dir, tmp_path) -> list[float]:
    """What `python -m ftdist.score RUN --file rows.jsonl --batch-size 5` writes, run in this process."""
    from types import SimpleNamespace

    from ftdist.score import load_scorer, score_file

    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps({"prompt": p, "response": c}) + "\n" for p, c in zip(RM_PROMPTS, RM_COMPLETIONS)))
    args = SimpleNamespace(device="cpu", text_field="text", prompt_field="prompt", response_field="response")
    out = io.StringIO()
    score_file(load_scorer(run_dir, args), rows, out, batch_size=5, echo=False)
    return [json.loads(line)["score"] for line in out.getvalue().splitlines()]


def scores_alone(final_dir) -> list[float]:
    """transformers' own forward of each chat-rendered sequence, unpadded, pooled by transformers."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(final_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(final_dir)
    out = []
    for prompt, completion in zip(RM_PROMPTS, RM_COMPLETIONS):
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt},
                                              {"role": "assistant", "content": completion}], tokenize=False)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert len(ids) < tokenizer.model_max_length  # nothing truncated
        with torch.no_grad():
            out.append(float(model(input_ids=torch.tensor([ids])).logits[0, 0]))
    return out


def test_reward_model_scores_as_ftdist_score_and_transformers_do(tmp_path_factory, tmp_path):
    run_dir = shared_run(tmp_path_factory, REWARD_RUN)
    rewards = RewardFunctions([f"reward_model:{run_dir}", "json_valid"], [0.5, 2.0], CPU,
                              load_reward_model=load_reward_model)
    assert rewards.functions[0].scorer is None  # loaded on the first score, not at construction
    totals, values = rewards.score(RM_PROMPTS, RM_COMPLETIONS, [None] * 20)
    scores = values["reward_model"]
    assert len(set(scores)) == 20, "texts should score differently"
    assert scores == pytest.approx(ftdist_score(run_dir, tmp_path), abs=1e-5)
    assert scores == pytest.approx(scores_alone(run_dir / "final"), abs=1e-5)
    assert not rewards.functions[0].scorer.model.training
    assert totals == pytest.approx([0.5 * s + 2.0 * float(k % 3 != 0) for k, s in enumerate(scores)])
    # With the policy's own tokenizer, the policy's token ids are scored as they are: the same
    # scores as the rendered texts where the ids are that rendering.
    tokenizer = rewards.functions[0].scorer.tokenizer
    same = RewardFunctions([f"reward_model:{run_dir}"], None, CPU, tokenizer, load_reward_model)
    sequences = [tokenizer(tokenizer.apply_chat_template([{"role": "user", "content": p}, {"role": "assistant", "content": c}],
                                                         tokenize=False), add_special_tokens=False)["input_ids"]
                 for p, c in zip(RM_PROMPTS, RM_COMPLETIONS)]
    _, by_ids = same.score(["unused"] * 20, ["unused"] * 20, [None] * 20, sequences)
    assert same.functions[0].same_tokens
    assert by_ids["reward_model"] == pytest.approx(scores, abs=1e-5)
    with pytest.raises(RewardError, match=re.escape(f"objective.rewards[0]=reward_model:{run_dir}: completion 1 cannot be "
                                                    "scored as a reward model's input (empty_response: ")):
        rewards.score(["p", "p"], ["fine", "  "], [None, None])


def test_a_language_model_or_a_classifier_is_not_a_reward_model(tmp_path, tiny_model_dir, tiny_tokenizer):
    from ftdist.config import ModelConfig, TinyModelSpec
    from ftdist.model.heads import ScoreHead
    from ftdist.model.loading import load_model

    classifier = tmp_path / "classifier"
    load_model(ModelConfig(tiny=TinyModelSpec()), CPU, head=ScoreHead(("yes", "no"), "classification")).model \
        .save_pretrained(classifier)
    tiny_tokenizer.save_pretrained(classifier)
    for path, problem in ((tiny_model_dir, "a LlamaForCausalLM without a scoring head"),
                          (classifier, "a classifier (labels yes, no), not a reward model")):
        rewards = RewardFunctions([f"reward_model:{path}"], None, CPU, load_reward_model=load_reward_model)
        with pytest.raises(RewardError, match=re.escape(f"objective.rewards[0]=reward_model:{path} raised ConfigError: "
                                                        f"{path}")) as caught:
            rewards.score(["p"], ["c"], [None])
        assert problem in str(caught.value)
