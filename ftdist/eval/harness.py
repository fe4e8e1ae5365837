"""lm-evaluation-harness tasks on an already-loaded model (`eval.lm_eval.*`).

lm-eval is an optional extra (`pip install 'ftdist[eval]'`) and is imported only when tasks are
asked for, so importing ftdist stays fast. Local tasks (`eval.lm_eval.include_path`: a directory of
task YAML files over local data files) run with no network; the call also sets the Hugging Face
offline switches so that a hub task whose data is not cached fails at once instead of waiting on
the network.

Distributed use (read from lm-eval 0.4.13's `HFLM.__init__` and `evaluator.simple_evaluate`):
when `HFLM` is given a model object rather than a name, it sets its own rank 0 and world size 1
and never splits documents across processes or pads their requests; only a model it loads itself
under `accelerate launch` is data-parallel. So every torch.distributed rank that calls
`run_lm_eval` with the same model, tasks, limit and batch size runs every document, in the same
order, in the same batches: the same forwards in lock-step, which an FSDP-sharded model needs (each
forward all-gathers its parameters on every rank). An integer batch size is required for that
(`auto` would probe memory per rank). lm-eval's `simple_evaluate` builds its results only where
the LOCAL_RANK environment variable is 0 and returns None elsewhere; `run_lm_eval` sets LOCAL_RANK
to 0 for the call, so every rank returns the same metrics and the caller decides who reports them.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
from pathlib import Path

from ftdist.config import ConfigError, LmEvalConfig

INSTALL_HINT = "eval.lm_eval.tasks needs lm-evaluation-harness: pip install 'ftdist[eval]'"

# Warnings lm-eval gives on every call with a model object: that is how ftdist calls it on purpose.
_EXPECTED_WARNINGS = ("`pretrained` model kwarg is not of type `str`", "Passed an already-initialized model")


def check_lm_eval_available(lm: LmEvalConfig) -> None:
    """Fail early, before any model loads: lm-eval is missing, include_path is not a directory, or
    a task name is unknown. Does nothing when no tasks are configured."""
    if lm.tasks:
        _import_lm_eval()
        _check_task_names(lm, _task_manager(lm.include_path))


def run_lm_eval(model, tokenizer, lm: LmEvalConfig, batch_size: int | None = None) -> dict[str, dict[str, float]]:
    """Run `lm.tasks` on `model` (a transformers model or peft PeftModel, in eval mode, on its
    device) and return {task: {metric: value}}: plain floats, stderr and non-numeric fields
    dropped. A metric under lm-eval's default filter keeps its bare name (`acc`, `acc_norm`);
    under another filter it keeps lm-eval's `metric,filter` name (`exact_match,strict-match`).
    `batch_size` overrides `lm.batch_size`. See the module docstring for distributed use."""
    if not lm.tasks:
        return {}
    lm_eval = _import_lm_eval()
    manager = _task_manager(lm.include_path)
    _check_task_names(lm, manager)
    with _lm_eval_call_environment():
        wrapped = _hflm_class()(pretrained=model, tokenizer=tokenizer, batch_size=batch_size or lm.batch_size)
        results = lm_eval.simple_evaluate(
            model=wrapped, tasks=list(lm.tasks), num_fewshot=lm.num_fewshot, limit=lm.limit,
            task_manager=manager, log_samples=False,
            bootstrap_iters=0,  # stderrs are dropped anyway; bootstrapping them costs minutes
        )
    return {task: _numeric_metrics(values) for task, values in results["results"].items()}


@functools.cache
def _hflm_class():
    from lm_eval.models.huggingface import HFLM

    class RankZeroBarsHFLM(HFLM):
        """HFLM whose request progress bars show on global rank 0 only: given a model object, HFLM
        thinks every rank is rank 0, and N ranks would draw N copies of each bar."""

        def loglikelihood(self, requests, disable_tqdm: bool = False):
            return super().loglikelihood(requests, disable_tqdm=disable_tqdm or not _is_rank_zero())

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
            return super().loglikelihood_rolling(requests, disable_tqdm=disable_tqdm or not _is_rank_zero())

        def generate_until(self, requests, disable_tqdm: bool = False):
            return super().generate_until(requests, disable_tqdm=disable_tqdm or not _is_rank_zero())

    return RankZeroBarsHFLM


def _is_rank_zero() -> bool:
    import torch.distributed as dist

    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def _import_lm_eval():
    try:
        import lm_eval
    except ImportError as e:
        raise ConfigError(INSTALL_HINT) from e
    return lm_eval


@functools.lru_cache(maxsize=4)
def _task_manager(include_path: str | None):
    # Indexing lm-eval's built-in task YAMLs takes seconds; base and tuned model share one index.
    from lm_eval.tasks import TaskManager

    if include_path is not None and not Path(include_path).is_dir():
        raise ConfigError(f"eval.lm_eval.include_path={include_path!r} is not a directory")
    with _quiet_lm_eval():
        return TaskManager(include_path=include_path)


def _check_task_names(lm: LmEvalConfig, manager) -> None:
    known = set(manager.all_tasks)
    unknown = [name for name in lm.tasks if name not in known]
    if unknown:
        where = "lm-eval's built-in tasks"
        where += f" and the task YAML files under {lm.include_path}" if lm.include_path else \
            " (eval.lm_eval.include_path is unset: no local tasks)"
        raise ConfigError(f"eval.lm_eval.tasks: unknown task(s) {', '.join(map(repr, unknown))}: not among {where}")


def _numeric_metrics(values: dict) -> dict[str, float]:
    metrics = {}
    for key, value in values.items():
        name, _, filter_name = key.partition(",")
        if name.endswith("_stderr") or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        metrics[name if filter_name in ("", "none") else key] = float(value)
    return metrics


class _DropExpectedWarnings(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(_EXPECTED_WARNINGS)


@contextlib.contextmanager
def _quiet_lm_eval():
    # lm-eval logs every task, seed and request count at INFO; keep its warnings, minus the two
    # it gives on every call with a model object.
    logger = logging.getLogger("lm_eval")
    level, drop = logger.level, _DropExpectedWarnings()
    logger.setLevel(logging.WARNING)
    hflm_logger = logging.getLogger("lm_eval.models.huggingface")
    hflm_logger.addFilter(drop)
    try:
        yield
    finally:
        hflm_logger.removeFilter(drop)
        logger.setLevel(level)


@contextlib.contextmanager
def _lm_eval_call_environment():
    """Offline, quiet, and LOCAL_RANK=0 (see the module docstring) for the length of one call."""
    import datasets
    import huggingface_hub.constants

    # datasets and huggingface_hub read the offline variables once, at import: set both the
    # variables (for anything imported during the call) and the module constants.
    overrides = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "LOCAL_RANK": "0"}
    saved_env = {key: os.environ.get(key) for key in overrides}
    saved_flags = datasets.config.HF_HUB_OFFLINE, huggingface_hub.constants.HF_HUB_OFFLINE
    os.environ.update(overrides)
    datasets.config.HF_HUB_OFFLINE = huggingface_hub.constants.HF_HUB_OFFLINE = True
    bars_were_on = datasets.is_progress_bar_enabled()
    if not _is_rank_zero():
        datasets.disable_progress_bars()
    try:
        with _quiet_lm_eval():
            yield
    finally:
        if bars_were_on:
            datasets.enable_progress_bars()
        datasets.config.HF_HUB_OFFLINE, huggingface_hub.constants.HF_HUB_OFFLINE = saved_flags
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
