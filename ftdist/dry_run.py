"""`dry_run=true`: ftdist.plan's sizing of this launch, in a dry run's words. Nothing is
downloaded, loaded or written.

The model is built on the meta device with the adapters training uses (ftdist.model_memory), so
the parameter counts are the real module tree's, and every memory figure is ftdist.plan's. The
world size is the planner's too: cluster.nodes x cluster.gpus_per_node (1 x 8 unless set), except
under torchrun, where the launch's WORLD_SIZE, in nodes of LOCAL_WORLD_SIZE ranks, sets those two
keys: the ranks that will run are the ones to size.
"""

from __future__ import annotations

import copy
import os

from ftdist import plan
from ftdist.config import FtdistConfig
from ftdist.model_memory import NF4_BYTES_PER_PARAM, Census, micro_batch_shape, model_state, objective_reference
from ftdist.parallel import strategy_class


def format_count(n: float) -> str:
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.1f}{unit}"
    return str(int(n))


def launch_config(cfg: FtdistConfig, world_size: int | None = None) -> tuple[FtdistConfig, str]:
    """cfg with the cluster shaped as this launch is (an explicit `world_size`: one node of it),
    and where that shape comes from."""
    sized = copy.deepcopy(cfg)
    c = sized.cluster
    if world_size:
        c.nodes, c.gpus_per_node = 1, world_size
        why = "as requested"
    elif os.environ.get("WORLD_SIZE"):
        world = int(os.environ["WORLD_SIZE"])
        per_node = int(os.environ.get("LOCAL_WORLD_SIZE", world))
        per_node = per_node if world % per_node == 0 else world  # uneven nodes: size them as one
        c.nodes, c.gpus_per_node = world // per_node, per_node
        why = "from WORLD_SIZE"
    else:
        why = (f"WORLD_SIZE unset: cluster.nodes x cluster.gpus_per_node = {c.nodes} x {c.gpus_per_node} assumed, "
               "as python -m ftdist.plan does; set WORLD_SIZE=N to size for N ranks")
    if plan.world_size(sized) != c.nodes * c.gpus_per_node:
        why = f"strategy={cfg.strategy.name} runs one process"
    return sized, why


def resolve_world_size(cfg: FtdistConfig, world_size: int | None = None) -> tuple[int, str]:
    sized, why = launch_config(cfg, world_size)
    return plan.world_size(sized), why


def memory_gib(planned: dict) -> dict[str, float]:
    """The plan's GPU parts per rank in GiB, their total, and the CPU (offloaded state)."""
    return {**planned["breakdown_gb"], "total_gpu": planned["per_gpu_gb"], "cpu": planned["cpu_per_rank_gb"]}


def describe_model(cfg: FtdistConfig, config, c: Census) -> list[str]:
    m, p = cfg.model, cfg.peft
    name = m.architecture or ("tiny" if m.tiny is not None else m.name_or_path)
    attn = m.attn_implementation
    if attn == "auto":
        attn = "auto (flash_attention_2 where flash-attn and CUDA are present, else sdpa)"
    shape = f"{config.num_hidden_layers} layers, hidden {config.hidden_size}, vocab {config.vocab_size}"
    share = f"{100 * c.trainable / c.total:.2f}%"
    lines = [
        f"model: {name} ({config.model_type}, {shape}), {m.dtype}, attention {attn}",
        f"parameters: {format_count(c.total)} total, {format_count(c.trainable)} trainable ({share})",
    ]
    if p.method != "none":
        lines.append(f"adapters: {p.method} r={p.r} alpha={p.alpha} on {', '.join(p.target_modules)}: "
                     f"{format_count(c.adapter)} parameters, base frozen")
    if p.method == "qlora":
        lines.append(f"base linear weights in 4-bit NF4: {NF4_BYTES_PER_PARAM:.3f} bytes/param with double-quantized "
                     "constants; embeddings, norms and output head stay 16-bit")
    return lines


def describe_batch(cfg: FtdistConfig, world: int) -> str:
    t, d = cfg.train, cfg.data
    micro, row_tokens = micro_batch_shape(cfg)
    rows = micro * t.grad_accum_steps * world
    kind = "packed rows" if d.packing else "rows (at most)"
    pairs = ""
    if d.format == "preference":  # whole pairs: two rows each, or packed into rows of twice the length
        pairs = " (rows of whole chosen/rejected pairs)" if d.packing else f" ({t.micro_batch_size} chosen/rejected pairs)"
    return (f"batch: micro {micro}{pairs} x accum {t.grad_accum_steps} x {world} ranks = {rows} {kind} of "
            f"{row_tokens} tokens = {rows * row_tokens:,} tokens per optimizer step")


def describe_memory(cfg: FtdistConfig, mem: dict, world: int) -> list[str]:
    lines = ["memory per rank (GiB, estimate; python -m ftdist.plan explains each part):"]
    has_reference = objective_reference(cfg) is not None
    shown = [part for part in mem if part not in ("total_gpu", "cpu") and (part != "reference" or has_reference)]
    lines += [f"  {part:<16} {mem[part]:8.2f}" for part in shown]
    lines.append(f"  {'total GPU':<16} {mem['total_gpu']:8.2f}")
    if mem["cpu"]:
        per_node = min(world, cfg.cluster.gpus_per_node)  # as ftdist.plan counts a node's ranks
        lines.append(f"  {'CPU':<16} {mem['cpu']:8.2f}   offloaded state; {mem['cpu'] * per_node:.1f} per node of "
                     f"{per_node} ranks")
    return lines


def describe_fit(cfg: FtdistConfig, planned: dict) -> list[str]:
    """ftdist.plan's verdict (training and loading, GPU per rank and host per node) in lines."""
    total, budget = planned["per_gpu_gb"], cfg.cluster.gpu_mem_gb
    then = "; python -m ftdist.plan names the cheapest change that fits"
    if total > budget:
        lines = [f"WARNING: does not fit: {total:.2f} GiB per rank exceeds the {budget:g} GiB GPU assumed "
                 f"(cluster.gpu_mem_gb) by {total - budget:.2f} GiB" + then]
    elif not planned["fits_gpu"]:
        lines = [f"WARNING: does not fit: loading peaks at {planned['loading']['gpu_gb']:.2f} GiB per rank, over the {budget:g} "
                 f"GiB GPU assumed (cluster.gpu_mem_gb), before the model is sharded" + then]
    else:
        lines = [f"fits: {total:.2f} GiB per rank of the {budget:g} GiB GPU assumed (cluster.gpu_mem_gb)"]
    if not planned["fits_cpu"]:
        lines.append(f"WARNING: does not fit in host memory: more than the {cfg.cluster.cpu_mem_gb:g} GiB per node "
                     "assumed (cluster.cpu_mem_gb), while loading or for offloaded state" + then)
    return lines


def sharding_lines(cfg: FtdistConfig, planned: dict, census: Census) -> list[str]:
    lines = list(planned["layout"])
    units = strategy_class(cfg.strategy).units(census.num_layers)
    if units:
        lines.insert(0, f"{units} units ({census.num_layers} decoder layers + the root: embeddings, final norm, "
                        "output head)")
    return lines


def dry_run(cfg: FtdistConfig, world_size: int | None = None) -> dict:
    """Print the report (rank 0 only, if launched under torchrun) and return its numbers."""
    sized, world_note = launch_config(cfg, world_size)
    m = model_state(sized)
    planned = plan.make_plan(sized, m)
    world, census, mem = planned["world_size"], m.census, memory_gib(planned)
    lines = [f"ftdist dry run: {cfg.experiment_name} (meta device: no weights loaded, nothing launched)"]
    lines += describe_model(cfg, m.config, census)
    lines.append(describe_batch(cfg, world))
    lines.append(f"sharding ({cfg.strategy.name}): " + "; ".join(sharding_lines(cfg, planned, census)))
    lines += describe_memory(sized, mem, world)
    lines += describe_fit(cfg, planned)
    lines.append(
        f"assumptions: world size {world} ({world_note}); bf16 compute on GPU unless model.dtype=fp32 and "
        "train.mixed_precision=none; python -m ftdist.plan says whether a cluster fits and what to change"
    )
    report = "\n".join(lines)
    if os.environ.get("RANK", "0") == "0":
        print(report, flush=True)
    return {
        "experiment": cfg.experiment_name,
        "world_size": world,
        "strategy": cfg.strategy.name,
        "total_params": census.total,
        "trainable_params": census.trainable,
        "adapter_params": census.adapter,
        "num_layers": census.num_layers,
        "fsdp_units": strategy_class(cfg.strategy).units(census.num_layers),
        "memory_gib": mem,
        "gpu_mem_gb": cfg.cluster.gpu_mem_gb,
        "fits_gpu": planned["fits_gpu"],
        "fits_cpu": planned["fits_cpu"],
        "report": report,
    }
