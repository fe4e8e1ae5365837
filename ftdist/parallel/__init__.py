"""Parallel strategies behind one interface (see base.Strategy)."""

from __future__ import annotations

from ftdist.config import ConfigError, StrategyConfig
from ftdist.console import pin_deepspeed_accelerator
from ftdist.parallel.base import Strategy, launched_world_size

# Now, on import: ftdist.train imports this package before anything imports DeepSpeed (the
# package check of a zero* run, transformers saving a model), and each rank's DeepSpeed would
# otherwise print its accelerator detection's 'Setting accelerator to CPU' warning.
pin_deepspeed_accelerator()


def build_strategy(cfg: StrategyConfig) -> Strategy:
    if cfg.name == "single":
        if launched_world_size() > 1:
            raise ConfigError(
                f"strategy=single but WORLD_SIZE={launched_world_size()} (launched by torchrun): "
                "use strategy=ddp, fsdp or zero* for more than one process"
            )
        return Strategy(cfg)
    if cfg.name == "ddp":
        from ftdist.parallel.ddp import DDPStrategy

        return DDPStrategy(cfg)
    if cfg.name == "fsdp":
        from ftdist.parallel.fsdp import FSDPStrategy

        return FSDPStrategy(cfg)
    if cfg.name == "deepspeed":
        from ftdist.parallel.deepspeed import DeepSpeedStrategy

        return DeepSpeedStrategy(cfg)
    raise ConfigError(f"strategy.name={cfg.name!r} is not implemented")
