"""`ftdist.eval`: a run's tuned model and its base, through the run's objective, side by side.

Each model is loaded as the run trained it (same strategy, dtype, attention backend, 4-bit base
under QLoRA, adapters on it), placed by the strategy as a frozen model, evaluated, and freed
before the next one loads, so the evaluation never holds more than training did. Every figure is
a sum over all ranks (the objective's loss pass, generation metrics, perplexity); rank 0 writes
RUN_DIR/eval/.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import logging
import time
from pathlib import Path

import torch

from ftdist.config import ConfigError, FtdistConfig, PeftConfig
from ftdist.eval.generation import write_jsonl
from ftdist.objectives.base import EvalContext, TrainingContext
from ftdist.score import load_reward_model

log = logging.getLogger("ftdist")

BASE, TUNED = "base", "tuned"


class ForgettingExceeded(RuntimeError):
    """The tuned model's perplexity on eval.reference_data rose more than eval.max_forgetting."""


# --- what is evaluated ------------------------------------------------------------------------


def tuned_source(run_dir: Path | None, cfg: FtdistConfig) -> Path:
    """eval.checkpoint, else the run's final/ (else its newest complete checkpoint)."""
    from ftdist.export import resolve_source

    if cfg.eval.checkpoint is None and run_dir is None:
        raise ConfigError("nothing to evaluate: give a run directory or eval.checkpoint=PATH")
    return resolve_source(Path(cfg.eval.checkpoint).expanduser() if cfg.eval.checkpoint else run_dir)


def source_kind(source: Path) -> str:
    """adapter (a PEFT final/) | checkpoint (step_N) | model (any Hugging Face model directory)."""
    if (source / "model_optimizer").is_dir():
        return "checkpoint"
    return "adapter" if (source / "adapter_config.json").is_file() else "model"


def load_eval_model(cfg: FtdistConfig, strategy, head, source: Path | None, bf16: bool):
    """(model placed by the strategy, frozen and in eval mode; its forward) for the base
    (source None) or a trained model."""
    from ftdist.model.forward import ModelForward
    from ftdist.model.loading import load_model

    device = strategy.device
    with strategy.loading_context(bf16=bf16):
        if source is None:
            model = load_model(cfg.model, device, cfg.peft, strategy, adapters=False, head=head).model
        elif source_kind(source) == "model":
            model_cfg = dataclasses.replace(cfg.model, name_or_path=str(source), tiny=None)
            model = load_model(model_cfg, device, PeftConfig(method="none"), strategy, head=head).model
        else:
            model = load_model(cfg.model, device, cfg.peft, strategy, head=head).model
            load_weights(model, trained_state(cfg, source, model), strategy)
    forward = ModelForward(model, strategy, bf16, cfg.model.loss_chunk_tokens, cfg.model.liger)
    return strategy.prepare_frozen(model, cfg.train, bf16), forward


def trained_state(cfg: FtdistConfig, source: Path, model) -> dict[str, torch.Tensor]:
    """The trained tensors of a PEFT final/ or a checkpoint, under `model`'s parameter names."""
    from ftdist.export import adapter_names, full_model_names, read_final_adapter, read_model_state

    if source_kind(source) == "adapter":
        return read_final_adapter(source, model)
    names = adapter_names(model) if cfg.peft.method != "none" else full_model_names(model)
    return read_model_state(source / "model_optimizer", names)


def load_weights(model: torch.nn.Module, state: dict[str, torch.Tensor], strategy) -> None:
    """Copy `state` into the model as loaded: under ZeRO-3 into the gathered partitions; where
    a rank holds only meta tensors (FSDP loads on rank 0), nothing: sharding fills them from
    rank 0's."""
    from ftdist.parallel.deepspeed import is_zero_init_model

    tensors = dict(model.named_parameters()) | dict(model.named_buffers())
    unknown = sorted(state.keys() - tensors.keys())
    if unknown:
        raise ConfigError(f"the trained weights do not fit the run's model: {len(unknown)} unknown, e.g. {unknown[0]}")
    targets = [tensors[name] for name in state]
    if is_zero_init_model(model):
        import deepspeed

        with deepspeed.zero.GatheredParameters(targets, modifier_rank=0):
            if strategy.is_main:
                _copy(tensors, state)
        return
    if not any(t.is_meta for t in targets):
        _copy(tensors, state)


@torch.no_grad()
def _copy(tensors: dict[str, torch.Tensor], state: dict[str, torch.Tensor]) -> None:
    for name, value in state.items():
        tensors[name].copy_(value.to(tensors[name].dtype))


# --- evaluating one model -----------------------------------------------------------------------


@dataclasses.dataclass
class EvalData:
    tokenizer: object
    objective: object
    train_examples: list
    val_examples: list
    val_items: list
    data_report: dict
    reference_text: object | None  # perplexity.ReferenceText


def prepare_eval_data(cfg: FtdistConfig, tokenizer, objective) -> EvalData:
    from ftdist.eval.perplexity import read_reference_text

    train, val, report = objective.prepare_data(tokenizer)
    reference = None
    if cfg.eval.reference_data is not None:
        reference = read_reference_text(cfg.eval, cfg.data, tokenizer, cfg.seed)
    return EvalData(tokenizer, objective, train, val, objective.make_items(val), report.to_dict(), reference)


def evaluate_model(role: str, cfg: FtdistConfig, strategy, data: EvalData, source: Path | None, eval_dir: Path,
                   bf16: bool, reference=None) -> dict:
    """The objective's eval line, perplexity and harness figures of one model."""
    from ftdist.eval.perplexity import perplexity
    from ftdist.trainer import seed_everything

    t0 = time.perf_counter()
    head = getattr(data.objective, "head", None)
    # As training seeded before it loaded: a base model's new scoring head is the run's step-0 head.
    seed_everything(cfg.seed)
    model, forward = load_eval_model(cfg, strategy, head, source, bf16)
    module = strategy.unwrap(model)
    metrics: dict = {}
    if role == BASE and data.objective.name == "dpo":
        log.info("base: dpo's figures measure a model against its reference, the base itself: not evaluated")
    else:
        setup_objective(data, cfg, strategy, model, forward, bf16, eval_dir, reference)
        ctx = EvalContext(model=module, forward=forward.bind(module), strategy=strategy,
                          tokenizer=data.tokenizer, examples=data.val_examples, items=data.val_items,
                          batch_size=cfg.train.eval_batch_size, step=0, run_dir=eval_dir.parent, cfg=cfg,
                          record_tag=role, load_reward_model=load_reward_model)
        metrics = data.objective.evaluate(ctx, with_generation=True) if data.val_examples else {}
    out = {"path": str(source) if source else model_path_of(cfg), "metrics": metrics}
    if data.reference_text is not None:
        ppl, nll, tokens = perplexity(forward.bind(module), data.reference_text, strategy,
                                      cfg.train.eval_batch_size, data.tokenizer.pad_token_id)
        out.update(perplexity=ppl, nll_sum=nll, perplexity_tokens=tokens)
    if cfg.eval.lm_eval.tasks:
        from ftdist.eval.harness import run_lm_eval

        out["lm_eval"] = run_lm_eval(module, data.tokenizer, cfg.eval.lm_eval)
    out["seconds"] = time.perf_counter() - t0
    del model, module, forward
    free_memory(strategy)
    return out


def setup_objective(data: EvalData, cfg, strategy, model, forward, bf16: bool, eval_dir: Path, reference) -> None:
    """What the objective binds to before its passes (DPO's reference), for this model."""
    data.objective.setup(TrainingContext(
        model=model, strategy=strategy, logits=forward, reference_model=reference, bf16=bf16,
        train_examples=data.train_examples, val_examples=data.val_examples, run_dir=eval_dir.parent,
        load_reward_model=load_reward_model,
    ))


def model_path_of(cfg: FtdistConfig) -> str:
    from ftdist.model.loading import resolve_model_path

    return resolve_model_path(cfg.model)


def free_memory(strategy) -> None:
    gc.collect()
    if strategy.device.type == "cuda":
        torch.cuda.empty_cache()


# --- the whole evaluation -----------------------------------------------------------------------


def run_evaluation(cfg: FtdistConfig, strategy, run_dir: Path | None, eval_dir: Path, tracker=None) -> dict:
    """Evaluate base (with eval.compare_base) and tuned models; rank 0 writes the report into
    eval_dir; returns the report. Raises ForgettingExceeded (after writing it) past the gate."""
    from ftdist.export import base_and_tokenizer
    from ftdist.objectives import build_objective
    from ftdist.trainer import use_bf16

    source = tuned_source(run_dir, cfg)
    cfg = reference_for_eval(cfg)
    _, tokenizer = base_and_tokenizer(cfg)
    objective = build_objective(cfg, tokenizer)
    # The run's data again: a classifier's classes (its head) come from its training split.
    data = prepare_eval_data(cfg, tokenizer, objective)
    bf16 = use_bf16(cfg, strategy.device)
    if strategy.is_main:
        eval_dir.mkdir(parents=True, exist_ok=True)
    reference = load_reference(cfg, strategy, objective, bf16)
    models = {}
    if cfg.eval.compare_base:
        log.info("evaluating the base model (%s)", model_path_of(cfg))
        models[BASE] = evaluate_model(BASE, cfg, strategy, data, None, eval_dir, bf16, reference)
    log.info("evaluating the tuned model (%s)", source)
    models[TUNED] = evaluate_model(TUNED, cfg, strategy, data, source, eval_dir, bf16, reference)
    report = build_report(cfg, run_dir, data, models, eval_dir) if strategy.is_main else {}
    report = strategy.broadcast_object(report)
    if strategy.is_main:
        write_outputs(report, eval_dir, tracker)
    strategy.barrier()
    gate = report.get("forgetting") or {}
    if gate.get("exceeded"):
        raise ForgettingExceeded(
            f"perplexity on {gate['reference_data']} rose {gate['relative_change']:.1%} (base {gate['base_perplexity']:.4g} "
            f"-> tuned {gate['tuned_perplexity']:.4g}), more than eval.max_forgetting={gate['max_forgetting']:g}; "
            f"report: {eval_dir / 'report.md'}"
        )
    return report


def reference_for_eval(cfg: FtdistConfig) -> FtdistConfig:
    """DPO with precomputed reference log-probs: a live frozen reference instead. Computing the
    cache now would take the model under evaluation for the starting weights; the frozen copy of
    the starting weights gives the same log-probs."""
    if cfg.objective.name != "dpo":
        return cfg
    from ftdist.objectives.reference import reference_mode

    if reference_mode(cfg) != "precomputed":
        return cfg
    return dataclasses.replace(cfg, objective=dataclasses.replace(cfg.objective, reference="model"))


def load_reference(cfg: FtdistConfig, strategy, objective, bf16: bool):
    """DPO with reference=model: the frozen reference the run trained against."""
    if not objective.loads_reference_model:
        return None
    from ftdist.model.loading import load_reference_model

    with strategy.loading_context(bf16=bf16):
        reference = load_reference_model(cfg, strategy)
    return strategy.prepare_frozen(reference, cfg.train, bf16)


# --- the report -----------------------------------------------------------------------------------


def build_report(cfg: FtdistConfig, run_dir: Path | None, data: EvalData, models: dict, eval_dir: Path) -> dict:
    from ftdist.eval.perplexity import forgetting_figures

    report = {
        "run_dir": str(run_dir) if run_dir else None,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "objective": cfg.objective.name,
        "task_metric": data.objective.task_metric,
        "models": {role: {"path": m["path"], "metrics": m["metrics"], "seconds": m["seconds"]} for role, m in models.items()},
        "data": (read_json(run_dir / "data_report.json") if run_dir else None) or data.data_report,
        "training": training_history(run_dir) if run_dir else None,
        "generations": combined_generations(eval_dir, list(models), cfg.eval.report_generations),
    }
    if data.reference_text is not None:
        base = models[BASE]["perplexity"] if BASE in models else None
        report["forgetting"] = forgetting_figures(data.reference_text, base, models[TUNED]["perplexity"],
                                                  cfg.eval.max_forgetting)
    if cfg.eval.lm_eval.tasks:
        report["lm_eval"] = {role: m["lm_eval"] for role, m in models.items()}
    return {k: v for k, v in report.items() if v is not None}


def read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def training_history(run_dir: Path) -> dict | None:
    """The run's train and eval lines (metrics.jsonl), for the loss curves."""
    from ftdist.tracking import readable_lines

    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return None
    lines = [json.loads(line) for line in readable_lines(path)]
    return {"train": [r for r in lines if "loss" in r and "eval_loss" not in r],
            "eval": [r for r in lines if "eval_loss" in r]}


def combined_generations(eval_dir: Path, roles: list[str], shown: int) -> list[dict] | None:
    """eval/generations.jsonl: each held-out prompt with its reference and every model's
    response and scores, from the per-model files the objective wrote; returns the first
    `shown` for the report."""
    per_role = {}
    for role in roles:
        path = eval_dir / f"generations_{role}.jsonl"
        if path.is_file():
            per_role[role] = [json.loads(line) for line in path.read_text().splitlines() if line]
    if not per_role:
        return None
    first = next(iter(per_role.values()))
    rows = []
    for i, record in enumerate(first):
        row = {"index": record["index"], "prompt": record["prompt"], "reference": record["reference"]}
        row.update({role: records[i]["response"] for role, records in per_role.items()})
        row["scores"] = {role: records[i]["scores"] for role, records in per_role.items()}
        rows.append(row)
    write_jsonl(eval_dir / "generations.jsonl", rows)
    return rows[:shown]


def write_outputs(report: dict, eval_dir: Path, tracker) -> None:
    from ftdist.eval.report import describe_report, log_report_to_wandb, write_report

    files = write_report(eval_dir, report)
    for line in describe_report(report):
        log.info("%s", line)
    log.info("report: %s", eval_dir / "report.html")
    if tracker is not None:
        log_report_to_wandb(tracker.run, report, {k: v for k, v in files.items() if str(v).endswith(".png")})
