"""`python -m ftdist.eval RUN_DIR [key=value ...]`, also under torchrun: the run's tuned model
(final/, or eval.checkpoint=PATH) and its base (model.*), side by side, on the run's validation
data with its objective's metrics; perplexity on eval.reference_data (forgetting) and
lm-evaluation-harness tasks where asked; RUN_DIR/eval/report.{json,md,html}.

The run's resolved config.yaml is the starting point; key=value overrides change it as on the
ftdist.train command line (eval.*, strategy=..., model.*). Exit codes: 0, 2 (bad input), 5 (the
forgetting gate, eval.max_forgetting), 1 (a bug).
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from ftdist.config import GROUP_SCHEMAS, ConfigError, FtdistConfig

log = logging.getLogger("ftdist")

USAGE = "usage: python -m ftdist.eval RUN_DIR [key=value ...]"


def eval_config(run_dir: Path, overrides: list[str]) -> FtdistConfig:
    """The run's config.yaml with `overrides` applied, checked as a training config is."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    from ftdist.config import check_override_keys, hydra_error_message, load_config

    path = run_dir / "config.yaml"
    if not path.is_file():
        raise ConfigError(f"{path}: no config.yaml; RUN_DIR must be a run directory written by ftdist.train")
    bad = [o for o in overrides if "=" not in o or o.startswith(("+", "~"))]
    if bad:
        raise ConfigError(f"{bad[0]!r}: overrides are key=value (e.g. eval.generation.samples=50); {USAGE}")
    check_override_keys(overrides, groups=())
    try:
        merged = OmegaConf.merge(OmegaConf.structured(FtdistConfig), OmegaConf.load(path))
        # Hydra's grammar, as on the ftdist.train command line: lists, quoting, escapes.
        for override in OverridesParser.create().parse_overrides(overrides):
            key, value = override.key_or_group, override.value()
            if key in GROUP_SCHEMAS:  # a group choice (strategy=fsdp): that option's file, as Hydra composes it
                value = group_option(key, value)
            OmegaConf.update(merged, key, value, merge=False)
    except (HydraException, OmegaConfBaseException) as e:
        raise ConfigError(f"{path} with {' '.join(overrides)}: {hydra_error_message(e)}") from None
    return load_config(merged)


def group_option(group: str, option) -> object:
    """conf/GROUP/OPTION.yaml over the group's schema defaults."""
    from omegaconf import OmegaConf

    from ftdist.config import CONF_DIR

    directory = Path(CONF_DIR) / group
    path = directory / f"{option}.yaml"
    if not isinstance(option, str) or not path.is_file():
        options = ", ".join(sorted(p.stem for p in directory.glob("*.yaml")))
        raise ConfigError(f"{group}={option}: not an option of {group} (valid: {options})")
    chosen = OmegaConf.load(path)
    chosen.pop("defaults", None)
    return OmegaConf.merge(OmegaConf.structured(GROUP_SCHEMAS[group]), chosen)


def setup_eval_logging(eval_dir: Path, is_main: bool) -> None:
    from ftdist.console import install

    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if is_main:
        eval_dir.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(eval_dir / "eval.log"))
    level = logging.INFO if is_main else logging.WARNING
    for handler in handlers:
        handler.setLevel(level)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", handlers=handlers,
                        force=True)
    install(handlers, is_main)


def evaluate(run_dir: Path, overrides: list[str]) -> dict:
    """Evaluate as the command line says; returns the report (empty on ranks other than 0)."""
    from ftdist.config import check_packages_import
    from ftdist.eval.perplexity import check_reference_source
    from ftdist.eval.runner import run_evaluation, tuned_source
    from ftdist.parallel import build_strategy
    from ftdist.tracking import WandbTracker

    cfg = eval_config(run_dir, overrides)
    check_packages_import(cfg)
    check_reference_source(cfg.eval, cfg.data)
    tuned_source(run_dir, cfg)  # a missing eval.checkpoint, before the process group and the log start
    if cfg.eval.lm_eval.tasks:
        from ftdist.eval.harness import check_lm_eval_available

        check_lm_eval_available(cfg.eval.lm_eval)
    strategy = build_strategy(cfg.strategy)
    tracker = None
    try:
        eval_dir = run_dir / "eval"
        setup_eval_logging(eval_dir, strategy.is_main)
        if cfg.tracking.backend == "wandb" and strategy.is_main:
            from dataclasses import asdict

            tracker = WandbTracker(cfg.tracking, eval_dir, asdict(cfg), f"{cfg.experiment_name}-{run_dir.name}-eval")
        report = run_evaluation(cfg, strategy, run_dir, eval_dir, tracker)
        if tracker is not None:
            tracker.finish({})
            tracker = None
        return report
    finally:
        if tracker is not None:
            tracker.abort()
        strategy.shutdown()


def main(argv: list[str] | None = None) -> int:
    from ftdist.constants import EXIT_BAD_INPUT, EXIT_FORGETTING
    from ftdist.data.sources import DataError
    from ftdist.eval.runner import ForgettingExceeded
    from ftdist.train import say

    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__ if argv else USAGE, file=sys.stderr)
        return 0 if argv else EXIT_BAD_INPUT
    try:
        evaluate(Path(argv[0]), argv[1:])
    except ForgettingExceeded as e:
        say(f"ftdist: forgetting: {e}")
        return EXIT_FORGETTING
    except (ConfigError, DataError) as e:
        say(f"ftdist: {type(e).__name__}: {e}")
        return EXIT_BAD_INPUT
    return 0


def cli() -> None:
    from ftdist.train import leave

    leave(main())


if __name__ == "__main__":
    cli()
