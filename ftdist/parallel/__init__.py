"""Parallel strategies behind one interface (see base.Strategy), each in its own module with
both what it does and what it costs; `strategy_class` is the one place a name is looked up."""

from __future__ import annotations

from ftdist.config import ConfigError, StrategyConfig
from ftdist.console import pin_deepspeed_accelerator
from ftdist.parallel.base import Strategy
from ftdist.parallel.process_group import launched_world_size

# Now, on import: ftdist.train imports this package before anything imports DeepSpeed (the
# package check of a zero* run, transformers saving a model), and each rank's DeepSpeed would
# otherwise print its accelerator detection's 'Setting accelerator to CPU' warning.
pin_deepspeed_accelerator()


def strategy_class(cfg: StrategyConfig) -> type[Strategy]:
    """The class that runs `cfg` (build_strategy) and sizes it (ftdist.plan, with no process
    group). Modules import on demand: FSDP's takes most of a second, and none imports DeepSpeed
    itself until a DeepSpeedStrategy is built."""
    if cfg.name == "single":
        return Strategy
    if cfg.name == "ddp":
        from ftdist.parallel.ddp import DDPStrategy

        return DDPStrategy
    if cfg.name == "fsdp":
        from ftdist.parallel.fsdp import FSDPStrategy

        return FSDPStrategy
    if cfg.name == "deepspeed":
        from ftdist.parallel.deepspeed import DeepSpeedStrategy

        return DeepSpeedStrategy
    raise ConfigError(f"strategy.name={cfg.name!r} is not implemented")


def build_strategy(cfg: StrategyConfig) -> Strategy:
    if cfg.name == "single" and launched_world_size() > 1:
        raise ConfigError(
            f"strategy=single but WORLD_SIZE={launched_world_size()} (launched by torchrun): "
            "use strategy=ddp, fsdp or zero* for more than one process"
        )
    return strategy_class(cfg)(cfg)
