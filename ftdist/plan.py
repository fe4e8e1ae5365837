"""`python -m ftdist.plan +experiment=NAME [cluster.*=...] [plan.json=true]`: will it fit, how fast?

Sizes one rank of a run before it is launched: the model is built on the meta device (shapes
and dtypes, no weights, nothing downloaded, no data read) with the adapters training uses
(ftdist.model_memory), and each part of a GPU's memory is counted under the rules the configured
strategy follows. Those rules are the strategy's own: each class in ftdist/parallel says, beside
the code that runs, what it keeps in which dtype, how it shards and places it, its communication
buffers, what loading holds, and which change of it frees memory. This module holds only what
every strategy shares: activations, speed, the fits check, the search for a change that fits,
and the report. What an objective adds comes from one place, model_memory.objective_shape:
preference objectives size a micro-batch of pairs as its chosen and rejected sequences; a frozen
reference model (DPO's, GRPO's with beta > 0), where the run loads one, is a part of its own,
placed as the strategy places the policy's weights; GRPO's rollout (generation with a KV cache)
takes turns with training, so the larger of the two is the activations part. `dry_run=true`
(ftdist.dry_run) prints the same numbers in its own words.

tests/memory_probe.py counts the same parts on a live model after a step (reading FSDP2's and
DeepSpeed's private state, which only a test should); tests/dist/test_plan_model_state.py holds
the two together on 2 ranks.
"""

from __future__ import annotations

import contextlib
import copy
import json
import operator
import sys

from ftdist.config import ConfigError, FtdistConfig, compose, load_config
from ftdist.constants import EXIT_BAD_INPUT, GIB
from ftdist.model_memory import (
    LOSS_BYTES_PER_LOGIT,
    ModelState,
    activation_bytes,
    compute_bytes,
    model_state,
    objective_reference,
    objective_shape,
    reference_config,
    reference_forward_each_micro_batch,
    reference_model_use,
    rollout_bytes,
)
from ftdist.parallel import strategy_class

MAX_NODES = 128
PARTS = ("parameters", "lora", "quant_constants", "reference", "gradients", "optimizer", "activations", "communication",
         "workspace")


# --- memory -----------------------------------------------------------------------------------


def on_planned_gpu(cfg: FtdistConfig) -> FtdistConfig:
    c = copy.deepcopy(cfg)
    if c.train.mixed_precision == "auto":
        c.train.mixed_precision = "bf16"  # the GPU the plan sizes computes in bf16
    return c


def activations(cfg: FtdistConfig, m: ModelState, checkpointing: bool) -> float:
    c = on_planned_gpu(cfg)
    c.model.gradient_checkpointing = checkpointing
    return activation_bytes(c, m.config, m.census)


def rollout(cfg: FtdistConfig, m: ModelState) -> dict[str, int]:
    """The objective's generation working set by part (model_memory.rollout_bytes; none for
    objectives that generate nothing)."""
    return rollout_bytes(on_planned_gpu(cfg), m.config)


def working_set(cfg: FtdistConfig, m: ModelState) -> float:
    """Training's activations, or the rollout's peak where larger: generation and training take
    turns, so the GPU holds one of them at a time beside the state."""
    return max(activations(cfg, m, cfg.model.gradient_checkpointing), sum(rollout(cfg, m).values()))


def world_size(cfg: FtdistConfig) -> int:
    """The ranks planned for: cluster.nodes x cluster.gpus_per_node, or one where the strategy
    runs one process."""
    return strategy_class(cfg.strategy).planned_world_size(cfg)


def memory(cfg: FtdistConfig, m: ModelState, rank: int | None = None) -> dict:
    """GPU bytes by part on `rank` (None: the rank that holds most), CPU bytes per rank, and the
    notes behind them."""
    strategy = strategy_class(cfg.strategy)
    world = strategy.planned_world_size(cfg)
    lay = strategy.layout(cfg, world)
    share = strategy.rank_state_bytes(cfg, m, world, rank)
    gpu, cpu_parts = {}, {}
    for part, (_, on_cpu) in lay.placement().items():
        gpu[part] = 0.0 if on_cpu else share[part]
        cpu_parts[part] = share[part] if on_cpu else 0.0
    # Replicated under every strategy: QuantState is not a parameter, so FSDP does not shard it.
    gpu["quant_constants"] = m.quant_constant_bytes
    reference, reference_on_cpu = reference_share(cfg, m, world)
    in_training = reference if reference_model_use(cfg) == "training" else 0.0
    gpu["reference"], cpu_parts["reference"] = (0.0, in_training) if reference_on_cpu else (in_training, 0.0)
    gpu["activations"] = working_set(cfg, m)
    gpu["communication"], comm_note = strategy.communication_bytes(cfg, m, world)
    gpu["workspace"] = cfg.plan.workspace_gb * GIB
    reference_gpu = 0.0 if reference_on_cpu else reference
    return {"world": world, "gpu": {k: gpu[k] for k in PARTS}, "cpu": sum(cpu_parts.values()), "cpu_parts": cpu_parts,
            "layout": lay, "comm_note": comm_note, "reference_gpu": reference_gpu,
            "reference_pass": reference_pass(cfg, m, gpu, reference_gpu)}


def reference_share(cfg: FtdistConfig, m: ModelState, world: int) -> tuple[float, bool]:
    """(bytes, in CPU memory) of the objective's frozen reference model on each rank; 0 where the
    run loads none. prepare_frozen places it as the strategy places the policy's base weights: whole
    (single, DDP, ZeRO-1/2) or 1/world (FSDP2, ZeRO-3), in the dtype the strategy keeps them in
    (DeepSpeed: bf16 where it computes in bf16), in CPU memory where those are offloaded."""
    if m.reference is None:
        return 0.0, False
    strategy = strategy_class(cfg.strategy)
    shards, on_cpu = strategy.layout(cfg, world).placement()["parameters"]
    return strategy.state_bytes(reference_config(cfg), m.reference)["parameters"] / shards, on_cpu


def reference_pass(cfg: FtdistConfig, m: ModelState, gpu: dict, reference_gpu: float) -> float:
    """GPU peak per rank of the pass objective.reference=precomputed makes before training (0 for
    other modes): the training state less its activations (an upper bound: the optimizer state
    may not exist yet), the reference model where one is loaded for the pass, and the no-grad
    logits of train.eval_batch_size pairs (two rows each) with their fp32 log-softmax."""
    if objective_reference(cfg) != "precomputed":
        return 0.0
    logits = 2 * cfg.train.eval_batch_size * cfg.data.max_seq_len * m.config.vocab_size * (
        compute_bytes(cfg) + LOSS_BYTES_PER_LOGIT)
    return sum(v for part, v in gpu.items() if part != "activations") + reference_gpu + logits


def loading(cfg: FtdistConfig, m: ModelState, mem: dict) -> dict:
    """Memory while the model loads, before the strategy has sharded it: host bytes on rank 0
    and on each other rank, host bytes per node (rank 0's node), and the GPU peak per rank
    (weights arrive in their final place, except where the strategy says otherwise)."""
    strategy = strategy_class(cfg.strategy)
    held = strategy.loading(cfg, m)
    host_rank0, host_other, gpu_extra, note = held.host_rank0, held.host_other_rank, held.gpu_extra, held.note
    if m.reference is not None:
        ref = strategy.loading(reference_config(cfg), m.reference)
        # ftdist.train loads the reference right after the policy, before prepare: FSDP's policy
        # still waits in host memory then; elsewhere load_model has moved it to the GPU already.
        both = operator.add if strategy.loads_on_rank0_only else max
        host_rank0, host_other = both(host_rank0, ref.host_rank0), both(host_other, ref.host_other_rank)
        gpu_extra = max(gpu_extra, ref.gpu_extra)
        how = "the same way" if ref.note == note else f"as a model without adapters ({ref.note})"
        note += f"; the reference model then loads {how}" + (", both held until prepare" if both is operator.add else "")
    per_node = min(mem["world"], cfg.cluster.gpus_per_node)
    gpu = mem["gpu"]
    settled = gpu["parameters"] + gpu["lora"] + gpu["quant_constants"] + mem["reference_gpu"] + gpu["workspace"]
    return {"host_rank0": host_rank0, "host_other_rank": host_other,
            "host_per_node": host_rank0 + (per_node - 1) * host_other, "gpu": settled + gpu_extra, "note": note}


def fits(cfg: FtdistConfig, mem: dict, load: dict) -> tuple[bool, bool]:
    """Whether training, loading and a precomputed reference's pass fit: GPU memory per rank, host
    memory per node (offloaded state while training; the unsharded model while loading, freed as
    it is sharded)."""
    budget_gpu, budget_cpu = cfg.cluster.gpu_mem_gb * GIB, cfg.cluster.cpu_mem_gb * GIB
    gpu_ok = max(sum(mem["gpu"].values()), load["gpu"], mem["reference_pass"]) <= budget_gpu
    ranks_per_node = min(mem["world"], cfg.cluster.gpus_per_node)
    cpu_ok = max(mem["cpu"] * ranks_per_node, load["host_per_node"]) <= budget_cpu
    return gpu_ok, cpu_ok


# --- what to change when it does not fit ------------------------------------------------------


def _with(cfg: FtdistConfig, overrides: dict[str, object]) -> FtdistConfig:
    c = copy.deepcopy(cfg)
    for key, value in overrides.items():
        node, _, attr = key.rpartition(".")
        setattr(_node(c, node), attr, value)
    return c


def _node(cfg: FtdistConfig, dotted: str):
    for part in dotted.split("."):
        cfg = getattr(cfg, part)
    return cfg


def _in_effect(cfg: FtdistConfig, overrides: dict[str, object]) -> bool:
    return all(_node(cfg, key) == value for key, value in overrides.items())


def _on_one_node(cfg: FtdistConfig, world: int) -> FtdistConfig:
    return _with(cfg, {"cluster.nodes": 1, "cluster.gpus_per_node": world})


def candidate_changes(cfg: FtdistConfig) -> list[tuple[str, dict]]:
    """The changes to try, cheapest first; each includes the cheap ones before it: activation
    checkpointing, smaller micro-batches, the strategy's own changes (sharding, offload), then
    more nodes, over which the strategy (or FSDP, where it replicates) shards its state."""
    t, strategy = cfg.train, strategy_class(cfg.strategy)
    out: list[tuple[str, dict]] = []
    base: dict[str, object] = {}
    if not cfg.model.gradient_checkpointing:
        base = {"model.gradient_checkpointing": True}
        out.append(("activation checkpointing", dict(base)))
    micro = t.micro_batch_size
    while micro > 1:
        micro //= 2
        accum = t.grad_accum_steps * t.micro_batch_size // micro
        out.append((f"micro-batch {micro} with {accum} accumulation steps (same global batch)",
                    {**base, "train.micro_batch_size": micro, "train.grad_accum_steps": accum}))
    cheap = out[-1][1] if out else {}
    out += [(why, {**cheap, **change}) for why, change in strategy.memory_changes(cfg) if not _in_effect(cfg, change)]
    sharded = strategy.sharding_change(cfg)
    nodes = cfg.cluster.nodes
    while nodes < MAX_NODES:
        nodes *= 2
        out.append((f"{nodes} nodes", {**cheap, **sharded, "cluster.nodes": nodes}))
    return out


def suggest(cfg: FtdistConfig, m: ModelState) -> dict | None:
    for why, overrides in candidate_changes(cfg):
        changed = _with(cfg, overrides)
        mem = memory(changed, m)
        if all(fits(changed, mem, loading(changed, m, mem))):
            return {"change": why, "overrides": strategy_class(cfg.strategy).render_overrides(overrides),
                    "per_gpu_gb": sum(mem["gpu"].values()) / GIB}
    return None


# --- speed ------------------------------------------------------------------------------------


def speed(cfg: FtdistConfig, m: ModelState, world: int) -> dict:
    from ftdist.metrics import GPU_PEAK_FLOPS, attention_flops_per_pair, causal_pairs

    t = cfg.train
    peak = GPU_PEAK_FLOPS[cfg.cluster.gpu.upper()]
    shape = objective_shape(cfg)
    seq = shape.sequence_tokens  # a sequence's longest (a packed pair's row holds two)
    rows, row_tokens = shape.rows, shape.row_tokens
    tokens_per_rank = rows * row_tokens * t.grad_accum_steps
    # The causal attention term as the trainer's `mfu` counts it, for rows that are one document
    # each: the most attention work a row can hold (packed shorter documents do less).
    attention = attention_flops_per_pair(m.config) * causal_pairs(seq) / seq
    # Checkpointing recomputes each layer's forward in backward: 2N more FLOPs (and a third of
    # the attention term) the GPU spends, which MFU (model FLOPs) does not credit.
    recompute = 2.0 * m.matmul_params + attention / 3 if cfg.model.gradient_checkpointing else 0.0
    # The reference's forward (adapter or model): a forward, which MFU does not credit either.
    reference = 2.0 * m.matmul_params + attention / 3 if reference_forward_each_micro_batch(cfg) else 0.0
    model_flops = m.flops_per_token + attention
    step_s = tokens_per_rank * (model_flops + recompute + reference) / (peak * cfg.plan.mfu)
    return {
        "gpu": cfg.cluster.gpu, "peak_tflops": peak / 1e12, "mfu": cfg.plan.mfu,
        "flops_per_token": model_flops, "matmul_flops_per_token": m.flops_per_token,
        "attention_flops_per_token": attention, "recompute_flops_per_token": recompute,
        "reference_flops_per_token": reference,
        "tokens_per_step": tokens_per_rank * world, "step_time_s": step_s,
        "tokens_per_s": tokens_per_rank * world / step_s, "tokens_per_s_per_gpu": tokens_per_rank / step_s,
    }


# --- the plan ---------------------------------------------------------------------------------


def make_plan(cfg: FtdistConfig, m: ModelState | None = None) -> dict:
    """Everything the report prints, as numbers (GiB for memory)."""
    m = m or model_state(cfg)
    mem = memory(cfg, m)
    load = loading(cfg, m, mem)
    gpu_ok, cpu_ok = fits(cfg, mem, load)
    per_gpu = sum(mem["gpu"].values()) / GIB
    ranks_per_node = min(mem["world"], cfg.cluster.gpus_per_node)
    plan = {
        "experiment": cfg.experiment_name,
        "fits": gpu_ok and cpu_ok,
        "fits_gpu": gpu_ok,
        "fits_cpu": cpu_ok,
        "per_gpu_gb": per_gpu,
        "gpu_mem_gb": cfg.cluster.gpu_mem_gb,
        "cpu_per_node_gb": mem["cpu"] * ranks_per_node / GIB,
        "cpu_mem_gb": cfg.cluster.cpu_mem_gb,
        "world_size": mem["world"],
        "nodes": cfg.cluster.nodes,
        "gpus_per_node": cfg.cluster.gpus_per_node,
        "strategy": strategy_class(cfg.strategy).describe(cfg),
        "peft": cfg.peft.method,
        "objective": {"name": cfg.objective.name, "reference": objective_reference(cfg),
                      "reference_model": reference_model_use(cfg)},
        "params": {"total": m.census.total, "trainable": m.trainable, "adapter": m.census.adapter},
        "breakdown_gb": {k: v / GIB for k, v in mem["gpu"].items()},
        "cpu_per_rank_gb": mem["cpu"] / GIB,
        "activations_gb": {"checkpointing": activations(cfg, m, True) / GIB,
                           "no_checkpointing": activations(cfg, m, False) / GIB},
        "rollout_gb": {part: v / GIB for part, v in rollout(cfg, m).items()},
        "speed": speed(cfg, m, mem["world"]),
        "suggestion": None if gpu_ok and cpu_ok else suggest(cfg, m),
        "reference_pass_gb": mem["reference_pass"] / GIB,
        "loading": {"host_per_node_gb": load["host_per_node"] / GIB, "host_rank0_gb": load["host_rank0"] / GIB,
                    "host_other_rank_gb": load["host_other_rank"] / GIB, "gpu_gb": load["gpu"] / GIB,
                    "how": load["note"]},
        "layout": mem["layout"].notes,
        "communication": mem["comm_note"],
    }
    return plan


NOTES = {
    "parameters": "base weights as stored (4-bit packed 2 per byte under QLoRA)",
    "lora": "adapter weights (fp32 where peft keeps them so)",
    "quant_constants": "NF4 absmax (8-bit / 64 weights) + fp32 scale / 256 absmaxes + code tables; not sharded",
    "reference": "",
    "gradients": "trained parameters only",
    "optimizer": "AdamW m, v (+ fp32 master under DeepSpeed)",
    "activations": "saved for backward + logits and fp32 loss",
    "communication": "",
    "workspace": "CUDA context, cuBLAS/NCCL workspaces, allocator slack (plan.workspace_gb)",
}


REFERENCE_NOTES = {
    "adapter": "none: the policy with its adapters disabled (its logits: activations)",
    "model": "frozen copy of the base, no adapters, placed as the strategy places the policy's weights",
    "precomputed": "none while training: log-probs computed in a pass before it",
}


def describe_objective(cfg: FtdistConfig, plan: dict) -> str:
    o = plan["objective"]
    if o["reference"] is None:
        return f"objective {o['name']}" + ("" if o["name"] == "sft" else " (no reference model)")
    path = cfg.objective.reference_path
    source = f" ({path})" if path and o["reference_model"] else ""
    return f"objective {o['name']}, reference {o['reference']}{source}"


def describe_batch(cfg: FtdistConfig) -> str:
    t, d = cfg.train, cfg.data
    shape = objective_shape(cfg)
    rows, row_tokens = shape.rows, shape.row_tokens
    kind = "packed" if d.packing else "padded, at most"
    if shape.rollout:
        micro = (f"micro {t.micro_batch_size} prompts x {cfg.objective.group_size} completions = {rows} rows x "
                 f"{row_tokens} tokens (data.max_seq_len prompt + objective.max_new_tokens, padded, at most)")
    elif d.format != "preference":
        micro = f"micro {rows} x {row_tokens} tokens ({kind})"
    elif d.packing:
        micro = f"micro {rows} x {row_tokens} tokens (packed rows of whole chosen/rejected pairs)"
    else:
        micro = f"micro {t.micro_batch_size} pairs = {rows} rows (chosen, rejected) x {row_tokens} tokens ({kind})"
    ckpt = "on" if cfg.model.gradient_checkpointing else "off"
    return f"batch: {micro}, accum {t.grad_accum_steps}, activation checkpointing {ckpt}"


def describe_rollout(cfg: FtdistConfig, rollout_gb: dict) -> list[str]:
    """The rollout's lines (none where the objective generates nothing)."""
    r = objective_shape(cfg).rollout
    if r is None:
        return []
    return [f"  rollout: {r.rows} sequences generated together ({cfg.train.micro_batch_size} prompts x group "
            f"{cfg.objective.group_size}), each at most {r.prompt_tokens} prompt tokens (data.max_seq_len bounds the "
            f"prompt: the planner reads no data) + {r.new_tokens} new; generation time is not in the step time",
            f"  rollout: KV cache {rollout_gb['kv_cache']:.2f} + last decode step's logits {rollout_gb['logits']:.2f} "
            f"= {sum(rollout_gb.values()):.2f} GiB"]


def report(cfg: FtdistConfig, plan: dict) -> str:
    sequence = objective_shape(cfg).sequence_tokens
    sp = plan["speed"]
    mode = plan["objective"]["reference"]
    lines = [
        (f"ftdist plan: {plan['experiment']} on {plan['nodes']} node(s) x {plan['gpus_per_node']} {cfg.cluster.gpu} "
        f"of {cfg.cluster.gpu_mem_gb:g} GiB = {plan['world_size']} GPUs; strategy {plan['strategy']}, "
        f"peft {plan['peft']}; {describe_objective(cfg, plan)}"),
        f"parameters: {plan['params']['total']:,} total, {plan['params']['trainable']:,} trained",
        describe_batch(cfg),
        *[f"sharding: {n}" for n in plan["layout"]],
        "memory per GPU (GiB):",
    ]
    notes = {**NOTES, "communication": plan["communication"], "reference": REFERENCE_NOTES.get(mode, "")}
    if plan["rollout_gb"]:
        notes["activations"] += ", or the rollout's if larger (they take turns)"
    for part, gib in plan["breakdown_gb"].items():
        if part != "reference" or mode is not None:
            lines.append(f"  {part:<16}{gib:8.2f}   {notes[part]}")
    lines.append(f"  {'total':<16}{plan['per_gpu_gb']:8.2f}   of {cfg.cluster.gpu_mem_gb:g}")
    acts = plan["activations_gb"]
    lines.append(f"  activations with checkpointing {acts['checkpointing']:.2f}, without {acts['no_checkpointing']:.2f}")
    lines += describe_rollout(cfg, plan["rollout_gb"])
    if mode == "precomputed":
        held = f"the reference model of {cfg.objective.reference_path}, " if plan["objective"]["reference_model"] else ""
        lines.append(f"reference pass before training: GPU peak {plan['reference_pass_gb']:.2f} GiB per GPU (training "
                     f"state less activations, {held}no-grad logits of {cfg.train.eval_batch_size} pairs)")
    if plan["cpu_per_rank_gb"]:
        lines.append(f"CPU memory: {plan['cpu_per_node_gb']:.1f} GiB per node of {cfg.cluster.cpu_mem_gb:g} "
                     "(cluster.cpu_mem_gb) for offloaded state")
    load = plan["loading"]
    lines.append(f"loading: {load['host_per_node_gb']:.1f} GiB of CPU memory per node of {cfg.cluster.cpu_mem_gb:g}, "
                 f"GPU peak {load['gpu_gb']:.1f} GiB: {load['how']}")
    verdict = "FITS" if plan["fits"] else "DOES NOT FIT" + ("" if plan["fits_gpu"] else " in GPU memory") + (
        "" if plan["fits_cpu"] else " in CPU memory")
    lines.append(f"verdict: {verdict}")
    sug = plan["suggestion"]
    if not plan["fits"]:
        if sug:
            lines.append(f"cheapest change that fits: {sug['change']}: {' '.join(sug['overrides'])} "
                         f"(-> {sug['per_gpu_gb']:.1f} GiB per GPU)")
        else:
            lines.append(f"no change tried fits (checkpointing, micro-batch 1, offload, up to {MAX_NODES} nodes)")
    lines.append(
        f"speed at MFU {sp['mfu']:g} of {sp['peak_tflops']:.0f} TFLOP/s bf16 peak: step {sp['step_time_s']:.2f} s for "
        f"{sp['tokens_per_step']:,} tokens, {sp['tokens_per_s']:,.0f} tokens/s ({sp['tokens_per_s_per_gpu']:,.0f} per GPU); "
        f"{sp['flops_per_token'] / 1e9:.1f} GFLOP/token (6N trained, 4N frozen, "
        f"+ {sp['attention_flops_per_token'] / 1e9:.1f} causal attention over whole {sequence}-token rows)"
        + (f" + {sp['recompute_flops_per_token'] / 1e9:.1f} recomputed" if sp["recompute_flops_per_token"] else "")
        + (f" + {sp['reference_flops_per_token'] / 1e9:.1f} reference forward" if sp["reference_flops_per_token"] else "")
    )
    lines.append("assumptions: bf16 compute on the GPU (unless train.mixed_precision=none with model.dtype=fp32); "
                 "memory in GiB (a GPU sold as 80 GB holds 80 GiB); DeepSpeed bucket sizes are its defaults; "
                 "CPU-offload transfer time and QLoRA dequantization time are not in the step time")
    return "\n".join(lines)


def predicted_loading(cfg: FtdistConfig, world: int, m: ModelState | None = None) -> dict:
    """The plan's loading figures (see `loading`) for `world` ranks on one node: host_rank0 and
    host_other_rank are what tests/memory_probe.py's measure_loaded counts on those ranks."""
    m = m or model_state(cfg)
    c = _on_one_node(cfg, world)
    return loading(c, m, memory(c, m))


def predicted_model_state(
    cfg: FtdistConfig, world: int, m: ModelState | None = None, rank: int | None = None
) -> dict[str, float]:
    """The plan's per-rank bytes of what tests/memory_probe.py's measure_model_state counts
    (parameters include adapters; the objective's frozen reference model apart), in GPU and CPU
    memory together: offloaded state is still this rank's."""
    m = m or model_state(cfg)
    c = _on_one_node(cfg, world)
    mem = memory(c, m, rank)

    def held(part: str) -> float:
        return mem["gpu"][part] + mem["cpu_parts"].get(part, 0.0)

    return {"parameters": held("parameters") + held("lora"), "gradients": held("gradients"),
            "optimizer": held("optimizer"), "quant_constants": held("quant_constants"), "reference": held("reference")}


# --- command line -----------------------------------------------------------------------------


def compose_plan_config(overrides: list[str]) -> FtdistConfig:
    """The typed config of `overrides`, without data (data.path may be unset) or a run directory."""
    dcfg = compose([*overrides, "output_dir=/nonexistent/plan"])  # Hydra's errors: one-line ConfigErrors
    dcfg.dry_run = True  # sizing only: load_config then needs no data.path and no installed backend
    return load_config(dcfg)


def main(argv: list[str] | None = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    # Anything printed while building (e.g. the tiny model's first tokenizer build) goes to
    # stderr: stdout holds only the report, or only the JSON object.
    with contextlib.redirect_stdout(sys.stderr):
        cfg = compose_plan_config(argv)
        plan = make_plan(cfg)
    print(json.dumps(plan, indent=2) if cfg.plan.json else report(cfg, plan), flush=True)
    return plan


def cli() -> None:
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    try:
        main()
    except (ConfigError, HydraException, OmegaConfBaseException) as e:
        print(f"ftdist: {type(e).__name__}: {e}", file=sys.stderr)
        sys.exit(EXIT_BAD_INPUT)


if __name__ == "__main__":
    cli()
