"""Training objectives behind one interface (base.Objective), chosen by `objective.name`.

Adding an objective: a module here with a class following base.Objective, an entry in
OBJECTIVES, and conf/objective/NAME.yaml (`name: NAME` plus its options). Code outside the
package (a plugin, a test) can add one with `register_objective` instead.
"""

from __future__ import annotations

from ftdist.config import ConfigError, FtdistConfig
from ftdist.objectives.base import Objective
from ftdist.objectives.classification import ClassificationObjective
from ftdist.objectives.dpo import DPOObjective
from ftdist.objectives.grpo import GRPOObjective
from ftdist.objectives.preference import ORPOObjective, SimPOObjective
from ftdist.objectives.reward import RewardObjective
from ftdist.objectives.sft import SFTObjective

OBJECTIVES: dict[str, type] = {"sft": SFTObjective, "dpo": DPOObjective, "simpo": SimPOObjective, "orpo": ORPOObjective,
                               "classification": ClassificationObjective, "reward": RewardObjective,
                               "grpo": GRPOObjective}


def register_objective(name: str, cls: type) -> None:
    """Make `objective.name=NAME` build `cls(cfg, tokenizer)`."""
    OBJECTIVES[name] = cls


def objective_class(name: str) -> type:
    if name not in OBJECTIVES:
        raise ConfigError(f"objective.name={name!r} is not an objective; known: {', '.join(sorted(OBJECTIVES))}")
    return OBJECTIVES[name]


def check_objective(cfg: FtdistConfig) -> None:
    """The configured objective exists and accepts its options beyond what config.validate
    checks (config cannot import this package, which imports config): GRPO's reward functions."""
    check = getattr(objective_class(cfg.objective.name), "check_config", None)
    if check is not None:
        check(cfg)


def scores_sequences(name: str) -> bool:
    """Whether objective `name` trains a scoring head (a sequence-classification model) rather
    than the LM head: it declares the head it needs (`head`, a ScoreHead once its data is prepared,
    and `head_for(labels)`, the head for a given class list)."""
    return hasattr(objective_class(name), "head")


def score_head(cfg: FtdistConfig, labels: list[str] | None):
    """The scoring head cfg.objective trains, for the classes `labels` (a reward model ignores
    them), or None for a language-model objective. Export reads the classes from the run's
    data_report.json; the planner, which reads no data, passes objective.labels or placeholders."""
    cls = objective_class(cfg.objective.name)
    return cls.head_for(labels) if hasattr(cls, "head") else None


def build_objective(cfg: FtdistConfig, tokenizer) -> Objective:
    return objective_class(cfg.objective.name)(cfg, tokenizer)
