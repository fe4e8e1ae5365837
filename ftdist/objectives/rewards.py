"""Reward functions for objective=grpo: `objective.rewards`, summed with `objective.reward_weights`.

Each spec names one function scoring every completion of a step; a completion's reward is the
weighted sum (weights default to 1 each), and each function's own values are kept for metrics
under a short name (`reward_names`: rewards/<name>/mean).

    exact_match        1.0 where the completion equals the row's reference response, surrounding
                       whitespace ignored (ftdist.eval.metrics.exact_match), else 0.0
    numeric_answer     1.0 where the completion's last number equals the reference's answer (the
                       number after GSM8K's `#### `, else its last number), else 0.0
    json_valid         1.0 where the completion parses as JSON, else 0.0 (no reference needed)
    format:REGEX       1.0 where REGEX matches the whole completion, surrounding whitespace
                       stripped (re.fullmatch, re.DOTALL: `.` crosses lines), else 0.0
    reward_model:PATH  the score of a reward model ftdist trained (objective=reward; PATH is its run
                       directory, the run's final/ or an export) for the prompt and completion,
                       rendered as its training rendered a pair's sequence (ftdist.score). Loaded
                       on the first score, on the training device, in eval mode; batches of 16.
    pkg.module.fn      (or pkg.module:fn) fn(prompts, completions, references) -> one real
                       number per completion; a reference is None where the row has none

Prompts reach reward functions as the policy saw them, rendered by its template and decoded with
special tokens dropped. A reward model whose tokenizer and chat template are the policy's scores
the policy's token ids (prompt and completion) as they are; another renders the decoded texts
as its training rendered a pair's sequence.

Checks. At config time (`check_reward_specs`, cheap: nothing is loaded): a known spec, a
non-empty valid regex, an existing reward-model directory, an importable callable, no spec
listed twice: ConfigError naming objective.rewards[i]. At each score: every function must
return a sequence (or 1-D tensor/array) of exactly one finite real number per completion (bools
count as 0/1); a function that raises or returns anything else stops training with RewardError
naming the reward, as do exact_match and numeric_answer on a row without a reference, and a
reward model that must render a completion it cannot encode (an empty one: ftdist.score refuses
it too; token ids are scored whatever they hold). A
reward that is silently wrong (NaN, a shifted list) would corrupt every advantage of its group.
"""

from __future__ import annotations

import importlib
import math
import numbers
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from ftdist.config import ConfigError
from ftdist.eval.metrics import exact_match, json_valid, numeric_answer

BUILTIN_REWARDS: dict[str, Callable[[str, str], float]] = {
    "exact_match": exact_match, "numeric_answer": numeric_answer, "json_valid": json_valid}
NEEDS_REFERENCE = ("exact_match", "numeric_answer")
FORMAT_PREFIX = "format:"
REWARD_MODEL_PREFIX = "reward_model:"
REWARD_MODEL_BATCH = 16
VALID_SPECS = ("exact_match | numeric_answer | json_valid | format:REGEX | reward_model:PATH | "
               "a dotted path package.module.function (or package.module:function)")
_DOTTED_PATH = re.compile(r"[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*[.:][A-Za-z_]\w*")

RewardFn = Callable[[list, list[str], list], object]


class RewardError(RuntimeError):
    """A reward function failed, or returned something that is not one finite number per completion."""


@dataclass(frozen=True)
class _Spec:
    kind: str  # builtin | format | reward_model | callable
    name: str  # the metric name before numbering
    target: object  # the metric function, compiled regex, model directory, or user callable


def check_reward_specs(specs: list[str]) -> None:
    """ConfigError naming objective.rewards[i] for the first spec that cannot be a reward."""
    first_at: dict[str, int] = {}
    for i, spec in enumerate(specs):
        if spec in first_at:
            raise ConfigError(f"{_label(i, spec)}: listed twice (also objective.rewards[{first_at[spec]}]); give "
                              "each reward once and weight it with objective.reward_weights")
        first_at[spec] = i
        _parse(i, spec)


def reward_names(specs: list[str]) -> list[str]:
    """One unique metric name per spec: a repeated name gets _2, _3, ... in order."""
    names: list[str] = []
    for i, spec in enumerate(specs):
        base = _parse(i, spec).name
        name, n = base, 1
        while name in names:
            n += 1
            name = f"{base}_{n}"
        names.append(name)
    return names


def _label(i: int, spec) -> str:
    return f"objective.rewards[{i}]={spec}"


def _parse(i: int, spec) -> _Spec:
    if not isinstance(spec, str):
        raise ConfigError(f"{_label(i, spec)}: a {type(spec).__name__}, not a reward spec; valid: {VALID_SPECS}")
    if spec in BUILTIN_REWARDS:
        return _Spec("builtin", spec, BUILTIN_REWARDS[spec])
    if spec.startswith(FORMAT_PREFIX):
        return _Spec("format", "format", _compile_format(i, spec))
    if spec.startswith(REWARD_MODEL_PREFIX):
        return _Spec("reward_model", "reward_model", _reward_model_dir(i, spec))
    if _DOTTED_PATH.fullmatch(spec):
        fn = _import_callable(i, spec)
        return _Spec("callable", getattr(fn, "__name__", None) or type(fn).__name__, fn)
    raise ConfigError(f"{_label(i, spec)}: unknown reward; valid: {VALID_SPECS}")


def _compile_format(i: int, spec: str) -> re.Pattern:
    source = spec[len(FORMAT_PREFIX):]
    if not source:
        raise ConfigError(f"{_label(i, spec)}: an empty pattern (write format:REGEX, matched against the whole "
                          "completion)")
    try:
        return re.compile(source, re.DOTALL)
    except re.error as e:
        raise ConfigError(f"{_label(i, spec)}: not a valid regular expression ({e})") from None


def _reward_model_dir(i: int, spec: str) -> Path:
    raw = spec[len(REWARD_MODEL_PREFIX):]
    if not raw:
        raise ConfigError(f"{_label(i, spec)}: no path (write reward_model:PATH, a reward run's directory, its "
                          "final/, or an export)")
    path = Path(raw).expanduser()
    if not path.is_dir():
        raise ConfigError(f"{_label(i, spec)}: no such directory (a reward run's directory, its final/, or an "
                          f"export; working directory: {os.getcwd()})")
    return path


def _import_callable(i: int, spec: str) -> Callable:
    module_name, _, attr = spec.rpartition(":") if ":" in spec else spec.rpartition(".")
    try:
        module = importlib.import_module(module_name)
    except Exception as e:  # a user's module may fail to import in any way; say how
        raise ConfigError(f"{_label(i, spec)}: cannot import module {module_name} ({type(e).__name__}: {e}); "
                          f"valid: {VALID_SPECS}") from e
    if not hasattr(module, attr):
        raise ConfigError(f"{_label(i, spec)}: module {module_name} has no attribute {attr}")
    fn = getattr(module, attr)
    if not callable(fn):
        raise ConfigError(f"{_label(i, spec)}: {module_name}.{attr} is not callable (it is of type "
                          f"{type(fn).__name__}); name a function fn(prompts, completions, references) -> list[float]")
    return fn


class RewardFunctions:
    """The configured rewards, ready to score a step's completions."""

    def __init__(self, specs: list[str], weights: list[float] | None, device: torch.device, tokenizer=None,
                 load_reward_model=None):
        """tokenizer: the policy's; load_reward_model: (path, device) -> Scorer, for reward_model:
        specs (ftdist.score.load_reward_model, passed in: the scorer's loading reads runs through
        ftdist.export, which imports the objectives)."""
        specs = list(specs)
        check_reward_specs(specs)
        self.specs = specs
        self.names = reward_names(specs)
        self.weights = _checked_weights(weights, len(specs))
        self.device = device
        self.functions: list[RewardFn] = [_build(i, spec, _parse(i, spec), device) for i, spec in enumerate(specs)]
        for fn in self.functions:
            if isinstance(fn, RewardModelReward):
                fn.policy_tokenizer, fn.load = tokenizer, load_reward_model

    def score(self, prompts: list, completions: list[str], references: list[str | None],
              sequences: list[list[int]] | None = None) -> tuple[list[float], dict[str, list[float]]]:
        """(weighted sum per completion, each reward's values keyed by its name); rows are aligned:
        prompts[k] and references[k] belong to completions[k]. sequences: each completion with its
        prompt as the policy's token ids, which a reward model with the policy's tokenizer scores
        as they are (a decoded prompt rendered again would not be what it was trained on)."""
        if not len(prompts) == len(completions) == len(references):
            raise ValueError(f"RewardFunctions.score: {len(prompts)} prompts, {len(completions)} completions and "
                             f"{len(references)} references; give one prompt and reference per completion")
        values = {name: self._call(i, prompts, completions, references, sequences) for i, name in enumerate(self.names)}
        totals = [sum(w * values[name][k] for w, name in zip(self.weights, self.names))
                  for k in range(len(completions))]
        return totals, values

    def _call(self, i: int, prompts: list, completions: list[str], references: list, sequences) -> list[float]:
        label = _label(i, self.specs[i])
        fn = self.functions[i]
        extra = {"sequences": sequences} if isinstance(fn, RewardModelReward) else {}
        try:
            # Copies: a function that edits its arguments cannot change what the next one sees.
            out = fn(list(prompts), list(completions), list(references), **extra)
        except RewardError:
            raise
        except Exception as e:
            raise RewardError(f"{label} raised {type(e).__name__}: {e}") from e
        return checked_values(out, len(completions), label)


def _checked_weights(weights: list[float] | None, count: int) -> list[float]:
    if weights is None:
        return [1.0] * count
    weights = list(weights)
    if len(weights) != count:
        raise ConfigError(f"objective.reward_weights has {len(weights)} weights for {count} rewards")
    for i, w in enumerate(weights):
        if isinstance(w, bool) or not isinstance(w, numbers.Real) or not math.isfinite(w):
            raise ConfigError(f"objective.reward_weights[{i}]={w!r}: not a finite number")
    return [float(w) for w in weights]


def checked_values(values, count: int, label: str) -> list[float]:
    """`values` as `count` floats, or RewardError saying what is wrong with them."""
    if hasattr(values, "ndim") and hasattr(values, "tolist"):  # a tensor or an ndarray
        if values.ndim != 1:
            raise RewardError(f"{label} returned a {type(values).__name__} of shape {tuple(values.shape)}; a reward "
                              f"function returns one number per completion ({count})")
        values = values.tolist()
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
        raise RewardError(f"{label} returned a {type(values).__name__}, not a list of {count} numbers (one per "
                          "completion)")
    if len(values) != count:
        raise RewardError(f"{label} returned {len(values)} values for {count} completions")
    return [_checked_number(v, k, label) for k, v in enumerate(values)]


def _checked_number(value, k: int, label: str) -> float:
    if hasattr(value, "ndim") and getattr(value, "ndim", None) == 0 and hasattr(value, "item"):
        value = value.item()  # a 0-d tensor or array
    if not isinstance(value, numbers.Real):
        raise RewardError(f"{label}: completion {k}'s reward is {value!r} ({type(value).__name__}), not a real number")
    try:
        number = float(value)
    except OverflowError:  # an int too large for a float
        number = math.inf
    if not math.isfinite(number):
        raise RewardError(f"{label}: completion {k}'s reward is {value!r}, not finite")
    return number


def _build(i: int, spec: str, parsed: _Spec, device: torch.device) -> RewardFn:
    if parsed.kind == "builtin":
        return _metric_reward(_label(i, spec), parsed.name, parsed.target)
    if parsed.kind == "format":
        return _format_reward(parsed.target)
    if parsed.kind == "reward_model":
        return RewardModelReward(parsed.target, device, _label(i, spec))
    return parsed.target


def _metric_reward(label: str, name: str, metric: Callable[[str, str], float]) -> RewardFn:
    def reward(prompts: list, completions: list[str], references: list) -> list[float]:
        if name in NEEDS_REFERENCE:
            missing = next((k for k, ref in enumerate(references) if ref is None), None)
            if missing is not None:
                raise RewardError(f"{label}: completion {missing}'s prompt row has no reference response ({name} "
                                  "compares each completion with its row's reference)")
        return [metric(c, "" if ref is None else ref) for c, ref in zip(completions, references)]

    return reward


def _format_reward(pattern: re.Pattern) -> RewardFn:
    def reward(prompts: list, completions: list[str], references: list) -> list[float]:
        return [float(pattern.fullmatch(c.strip()) is not None) for c in completions]

    return reward


class RewardModelReward:
    """A reward model's score for each (prompt, completion), loaded on its first call."""

    def __init__(self, path: Path, device: torch.device, label: str):
        self.path, self.device, self.label = path, device, label
        self.scorer = None
        self.load = None  # set by RewardFunctions: (path, device) -> a Scorer (ftdist.score.load_reward_model)
        self.policy_tokenizer = None  # set by RewardFunctions: the policy's, to score its token ids as they are
        self.same_tokens = False

    def __call__(self, prompts: list, completions: list[str], references: list,
                 sequences: list[list[int]] | None = None) -> list[float]:
        if self.scorer is None:
            if self.load is None:
                raise RewardError(f"{self.label}: no reward-model loader was given (whoever runs the objective passes "
                                  "ftdist.score.load_reward_model)")
            self.scorer = self.load(self.path, self.device)
            self.same_tokens = same_rendering(self.scorer.tokenizer, self.policy_tokenizer)
        if sequences is not None and self.same_tokens:
            ids = [list(s) for s in sequences]
        else:
            ids = [self._encode(k, p, c) for k, (p, c) in enumerate(zip(prompts, completions))]
        scores: list[float] = []
        for start in range(0, len(ids), REWARD_MODEL_BATCH):
            scores += [result["score"] for result in self.scorer.score_ids(ids[start:start + REWARD_MODEL_BATCH])]
        return scores

    def _encode(self, k: int, prompt, completion: str) -> list[int]:
        from ftdist.data.sources import BadRow, DataError

        try:
            return self.scorer.encode_row({"prompt": prompt, "response": completion})
        except (BadRow, DataError) as e:
            raise RewardError(f"{self.label}: completion {k} cannot be scored as a reward model's input ({e})") from None


def same_rendering(reward_tokenizer, policy_tokenizer) -> bool:
    """Whether the reward model reads the policy's token ids as the policy means them: the same
    vocabulary and chat template (a reward model trained by ftdist from the policy's base)."""
    if policy_tokenizer is None:
        return False
    return (reward_tokenizer.get_vocab() == policy_tokenizer.get_vocab()
            and getattr(reward_tokenizer, "chat_template", None) == getattr(policy_tokenizer, "chat_template", None))
