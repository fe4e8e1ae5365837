"""`python -m ftdist.plan +experiment=NAME [cluster.*=...] [plan.json=true]`: will it fit, how fast?

Sizes one rank of a run before it is launched: the model is built on the meta device (shapes
and dtypes, no weights, nothing downloaded, no data read) with the adapters training uses, and
each part of a GPU's memory is counted from that module tree under the rules the strategies in
ftdist/parallel actually follow:

- single, ddp, fsdp train with torch.optim.AdamW, whose two states take the parameter's dtype.
  An fp32 model under bf16 compute (model.dtype=fp32) is mixed precision at 4+4+8 = 16 bytes per
  trained parameter; a bf16 model trains in pure bf16 (2+2+4), with no fp32 master.
- DeepSpeed casts to bf16 when bf16 is on and keeps an fp32 master partition beside Adam's fp32
  states: 2+2+4+8 = 16 bytes per parameter (the ZeRO paper's count); on an fp32 model, 4+4+4+8.
- QLoRA's 4-bit weights are packed two to a byte; their quantization constants (bitsandbytes'
  QuantState: an 8-bit absmax per 64 weights, an fp32 scale per 256 absmaxes, code tables) are
  plain attributes, so FSDP does not shard them: every rank holds all of them.

tests/memory_probe.py counts the same parts on a live model after a step (reading FSDP2's and
DeepSpeed's private state, which only a test should); tests/dist/test_plan_model_state.py holds
the two together on 2 ranks.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import sys
from dataclasses import dataclass, field

import torch

from ftdist.config import ConfigError, FtdistConfig
from ftdist.constants import EXIT_BAD_INPUT, GIB
from ftdist.dry_run import Census, activation_bytes, build_meta_model, compute_bytes, take_census

NF4_BLOCK = 64  # weights per absmax
NF4_NESTED_BLOCK = 256  # absmaxes per fp32 scale (double quantization)
NF4_CODE_BYTES = 16 * 4  # the NF4 code table, fp32
NESTED_CODE_BYTES = 256 * 4 + 4  # the 8-bit dynamic code for the absmaxes, fp32, and its offset
# DeepSpeed's defaults (ftdist's generated config does not change them), in elements.
DS_REDUCE_BUCKET = 500_000_000
DS_ALLGATHER_BUCKET = 500_000_000
DS_MAX_LIVE_PARAMETERS = 1_000_000_000
MAX_NODES = 128
PARTS = ("parameters", "lora", "quant_constants", "gradients", "optimizer", "activations", "communication", "workspace")


def nf4_constant_bytes(numel: int) -> int:
    """QuantState bytes of one NF4 weight with double quantization (bitsandbytes' layout)."""
    blocks = math.ceil(numel / NF4_BLOCK)
    return blocks + 4 * math.ceil(blocks / NF4_NESTED_BLOCK) + NF4_CODE_BYTES + NESTED_CODE_BYTES


def nf4_bytes_per_param(numel: int) -> float:
    """Packed 4-bit weight plus its constants, per parameter (-> 0.5 + 1/64 + 4/16384 for large weights)."""
    return (numel / 2 + nf4_constant_bytes(numel)) / numel


@dataclass
class ModelState:
    """The module tree's storage, full (unsharded), as the plan needs it."""

    config: object
    census: Census
    base_bytes: float  # base weights as stored, 4-bit ones packed (numel / 2)
    base_compute_bytes: float  # the same in the compute dtype 16-bit weights are gathered in
    quant_constant_bytes: float
    adapter_bytes: float
    trainable: int
    trainable_bytes: float  # trained parameters in their stored dtype
    layer_gather_bytes: float  # largest decoder layer, as all-gathered
    root_gather_bytes: float  # embeddings, final norm, head, as all-gathered
    unit_stored_bytes: float  # largest FSDP unit (a layer, or the root) as stored: fully_shard moves it whole
    layer_trainable: int  # largest unit's trained parameters
    root_trainable: int
    largest_param: int
    optimizer_groups: list[list[int]]  # trained parameters' sizes, in the optimizer's groups and order
    matmul_params: int  # per-token matmul parameters (ftdist.metrics' FLOPs count)
    flops_per_token: float


def model_state(cfg: FtdistConfig, built=None) -> ModelState:
    """The storage of the configured model, built on the meta device (or from build_meta_model's
    result, when the caller has one)."""
    from ftdist.metrics import matmul_params, train_flops_per_token

    config, model, quantized, layers, base_ids = built or build_meta_model(cfg)
    census = take_census(model, quantized, layers, base_ids)
    act = compute_bytes(cfg)

    def stored(p) -> float:
        return p.numel() / 2 if id(p) in quantized else p.numel() * p.element_size()

    def gathered(p) -> float:
        # FSDP's MixedPrecisionPolicy gathers floating weights in bf16; packed 4-bit data stays as is.
        return p.numel() / 2 if id(p) in quantized else p.numel() * min(p.element_size(), act)

    params = list(model.parameters())
    layer_ids = {id(p) for layer in layers for p in layer.parameters()}
    root = [p for p in params if id(p) not in layer_ids]
    per_layer = [list(layer.parameters()) for layer in layers] or [[]]
    biggest = max(per_layer, key=lambda ps: sum(gathered(p) for p in ps))
    trainable = [p for p in params if p.requires_grad]
    return ModelState(
        config=config,
        census=census,
        base_bytes=sum(stored(p) for p in params if id(p) in base_ids),
        base_compute_bytes=sum(gathered(p) for p in params if id(p) in base_ids),
        quant_constant_bytes=sum(nf4_constant_bytes(p.numel()) for p in params if id(p) in quantized),
        adapter_bytes=sum(stored(p) for p in params if id(p) not in base_ids),
        trainable=sum(p.numel() for p in trainable),
        trainable_bytes=sum(stored(p) for p in trainable),
        layer_gather_bytes=sum(gathered(p) for p in biggest),
        root_gather_bytes=sum(gathered(p) for p in root),
        unit_stored_bytes=max(sum(stored(p) for p in ps) for ps in [root, *per_layer]),
        layer_trainable=sum(p.numel() for p in biggest if p.requires_grad),
        root_trainable=sum(p.numel() for p in root if p.requires_grad),
        largest_param=max(p.numel() for p in params),
        optimizer_groups=[[p.numel() for p in group] for group in optimizer_groups(trainable)],
        matmul_params=matmul_params(model),
        flops_per_token=train_flops_per_token(model),
    )


def optimizer_groups(trainable: list[torch.nn.Parameter]) -> list[list[torch.nn.Parameter]]:
    """ftdist.trainer.build_optimizer's groups: weight-decayed matrices, then norms and biases."""
    return [[p for p in trainable if p.dim() >= 2], [p for p in trainable if p.dim() < 2]]


def zero_gradient_partitions(groups: list[list[int]], world: int) -> list[int]:
    """Elements of DeepSpeed ZeRO-1/2's gradient partition buffer on each rank (contiguous
    gradients, its default). Each group is flattened, padded to a multiple of 2 x world and cut
    into equal slices, but the buffer holds every parameter that overlaps the rank's slice whole,
    so a parameter straddling a boundary counts on both ranks (DeepSpeed 0.19's stage_1_and_2)."""
    per_rank = [0] * world
    for sizes in groups:
        if not sizes:
            continue
        alignment = 2 * world
        part = math.ceil(sum(sizes) / alignment) * alignment // world
        for rank in range(world):
            start, end, offset = rank * part, (rank + 1) * part, 0
            for n in sizes:
                if start <= offset < end or offset < start < offset + n:
                    per_rank[rank] += n
                offset += n
    return per_rank


# --- memory -----------------------------------------------------------------------------------


@dataclass
class Layout:
    """Where each kind of state lives and over how many ranks it is split."""

    param_shards: int
    grad_shards: int
    optim_shards: int
    params_on_cpu: bool = False
    grads_on_cpu: bool = False
    optim_on_cpu: bool = False
    notes: list[str] = field(default_factory=list)


def unsharded_accumulation(cfg: FtdistConfig) -> bool:
    """FSDP holding whole gradients between micro-batches (strategy.accumulate_unsharded)."""
    return cfg.strategy.name == "fsdp" and cfg.strategy.accumulate_unsharded and cfg.train.grad_accum_steps > 1


def layout(cfg: FtdistConfig, world: int) -> Layout:
    s = cfg.strategy
    if s.name in ("single", "ddp"):
        who = "one process" if s.name == "single" else f"DDP: each of {world} ranks"
        return Layout(1, 1, 1, notes=[f"{who} holds a full replica of parameters, gradients and optimizer state"])
    if s.name == "fsdp":
        off = s.cpu_offload
        note = f"FSDP2 over {world} ranks: parameters, gradients and optimizer state sharded 1/{world}"
        lay = Layout(world, world, world, off, off, off, [note + (", in CPU memory (cpu_offload)" if off else "")])
        if unsharded_accumulation(cfg):
            lay.grad_shards, lay.grads_on_cpu = 1, False
            lay.notes.append(f"accumulate_unsharded: until the last of {cfg.train.grad_accum_steps} micro-batches "
                             "every rank holds all gradients unsharded, on the GPU, in the reduce dtype")
        return lay
    stage = s.zero_stage
    lay = Layout(world if stage == 3 else 1, world if stage >= 2 else 1, world,
                 params_on_cpu=s.offload_params, grads_on_cpu=s.offload_optimizer and stage >= 2,
                 optim_on_cpu=s.offload_optimizer)
    split = {1: "optimizer state", 2: "optimizer state and gradients", 3: "parameters, gradients and optimizer state"}
    lay.notes.append(f"DeepSpeed ZeRO stage {stage} over {world} ranks: {split[stage]} partitioned 1/{world}")
    if s.offload_optimizer or s.offload_params:
        what = [w for w, on in (("optimizer state", s.offload_optimizer), ("parameters", s.offload_params)) if on]
        lay.notes.append(f"{' and '.join(what)} offloaded to CPU")
    return lay


def state_bytes(cfg: FtdistConfig, m: ModelState) -> dict[str, float]:
    """Full (unsharded) bytes of parameters, adapters, gradients and optimizer state, in the dtypes
    the configured strategy keeps them."""
    act = compute_bytes(cfg)
    out = {"parameters": m.base_bytes, "lora": m.adapter_bytes, "gradients": m.trainable_bytes}
    if cfg.strategy.name == "deepspeed":
        # DeepSpeed holds parameters and gradients in its engine dtype (bf16 when bf16 is on).
        engine = act
        out["parameters"] = m.base_compute_bytes if engine == 2 else m.base_bytes
        out["lora"] = m.adapter_bytes * engine / 4
        out["gradients"] = m.trainable * engine
        # An fp32 master partition always: DeepSpeed 0.19's ZeRO-3 means to share it with fp32
        # partitions, but compares a device name (str) with a torch.device, which never matches
        # (measured: tests/dist/test_plan_model_state.py).
        out["optimizer"] = m.trainable * 12
    else:
        out["optimizer"] = 2 * m.trainable_bytes  # AdamW's exp_avg and exp_avg_sq, in the parameter's dtype
    if unsharded_accumulation(cfg) and act == 2:
        out["gradients"] = m.trainable * 4  # FSDP2 accumulates unsharded gradients in fp32 (the reduce dtype)
    return out


def communication_bytes(cfg: FtdistConfig, m: ModelState, world: int) -> tuple[float, str]:
    s, act = cfg.strategy, compute_bytes(cfg)
    if s.name == "single" or world == 1 and s.name == "ddp":
        return 0.0, "none (one process)"
    if s.name == "ddp":
        # gradient_as_bucket_view is off: DDP's buckets are a second copy of every gradient.
        return m.trainable_bytes, "DDP gradient buckets: a flat copy of all gradients"
    fp32_reduce = act == 2  # gradients are summed over ranks in fp32 under bf16 compute
    if s.name == "fsdp":
        if s.reshard_after_forward:
            gathered = m.root_gather_bytes + 2 * m.layer_gather_bytes
            what = "root unit (embeddings, head) + 2 decoder layers all-gathered (in use and prefetched)"
        else:
            gathered = m.base_compute_bytes + m.adapter_bytes
            what = "every unit stays gathered (reshard_after_forward=false)"
        unsharded = max(m.layer_trainable, m.root_trainable) * (act + (4 if fp32_reduce else 0))
        return gathered + unsharded, f"{what}; one unit's unsharded gradients before reduce-scatter"
    grad_bucket = min(DS_REDUCE_BUCKET, m.trainable) * (act + (4 if fp32_reduce else 0))
    if s.zero_stage == 3:
        layer = m.layer_gather_bytes / act  # elements (no 4-bit weights under DeepSpeed)
        live = min(DS_MAX_LIVE_PARAMETERS, max(m.largest_param, layer) + layer)
        return live * act + grad_bucket, ("largest module (or layer) + next layer all-gathered "
                                          "(stage3_max_live_parameters 1e9); reduce bucket 5e8 elements")
    gather_bucket = min(DS_ALLGATHER_BUCKET, m.trainable) * act
    return grad_bucket + gather_bucket, "reduce bucket and all-gather bucket (5e8 elements each)"


def activations(cfg: FtdistConfig, m: ModelState, checkpointing: bool) -> float:
    c = copy.deepcopy(cfg)
    c.model.gradient_checkpointing = checkpointing
    if c.train.mixed_precision == "auto":
        c.train.mixed_precision = "bf16"  # the GPU the plan sizes computes in bf16
    return activation_bytes(c, m.config, m.census)


def memory(cfg: FtdistConfig, m: ModelState, rank: int | None = None) -> dict:
    """GPU bytes by part on `rank` (None: the rank that holds most), CPU bytes per rank, and the
    notes behind them."""
    world = cfg.cluster.nodes * cfg.cluster.gpus_per_node if cfg.strategy.name != "single" else 1
    lay = layout(cfg, world)
    full = state_bytes(cfg, m)
    if cfg.strategy.name == "deepspeed" and cfg.strategy.zero_stage == 2:
        # Uneven: each rank's buffer holds the parameters straddling its slice whole.
        buffers = zero_gradient_partitions(m.optimizer_groups, world)
        elements = max(buffers) if rank is None else buffers[rank]
        full["gradients"] = elements * world * full["gradients"] / max(m.trainable, 1)
    placement = {
        "parameters": (lay.param_shards, lay.params_on_cpu),
        "lora": (lay.param_shards, lay.params_on_cpu),
        "gradients": (lay.grad_shards, lay.grads_on_cpu),
        "optimizer": (lay.optim_shards, lay.optim_on_cpu),
    }
    gpu, cpu_parts = {}, {}
    for part, (shards, on_cpu) in placement.items():
        share = full[part] / shards
        gpu[part] = 0.0 if on_cpu else share
        cpu_parts[part] = share if on_cpu else 0.0
    gpu["quant_constants"] = m.quant_constant_bytes  # replicated: FSDP does not shard QuantState
    gpu["activations"] = activations(cfg, m, cfg.model.gradient_checkpointing)
    gpu["communication"], comm_note = communication_bytes(cfg, m, world)
    gpu["workspace"] = cfg.plan.workspace_gb * GIB
    return {"world": world, "gpu": {k: gpu[k] for k in PARTS}, "cpu": sum(cpu_parts.values()), "cpu_parts": cpu_parts,
            "layout": lay, "comm_note": comm_note}


def fits(cfg: FtdistConfig, mem: dict, load: dict) -> tuple[bool, bool]:
    """Whether training and loading fit: GPU memory per rank, host memory per node (offloaded
    state while training; the unsharded model while loading, freed as it is sharded)."""
    budget_gpu, budget_cpu = cfg.cluster.gpu_mem_gb * GIB, cfg.cluster.cpu_mem_gb * GIB
    gpu_ok = max(sum(mem["gpu"].values()), load["gpu"]) <= budget_gpu
    ranks_per_node = min(mem["world"], cfg.cluster.gpus_per_node)
    cpu_ok = max(mem["cpu"] * ranks_per_node, load["host_per_node"]) <= budget_cpu
    return gpu_ok, cpu_ok


# --- what to change when it does not fit ------------------------------------------------------


def _with(cfg: FtdistConfig, overrides: dict[str, object]) -> FtdistConfig:
    c = copy.deepcopy(cfg)
    for key, value in overrides.items():
        node, _, attr = key.rpartition(".")
        target = c
        for part in node.split("."):
            target = getattr(target, part)
        setattr(target, attr, value)
    return c


def _on_one_node(cfg: FtdistConfig, world: int) -> FtdistConfig:
    return _with(cfg, {"cluster.nodes": 1, "cluster.gpus_per_node": world})


def _render(overrides: dict[str, object]) -> list[str]:
    if overrides.get("strategy.offload_params") and overrides.get("strategy.zero_stage") == 3:
        rest = {k: v for k, v in overrides.items() if not k.startswith("strategy.")}
        return ["strategy=zero3_offload", *_render(rest)]
    return [f"{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in overrides.items()]


def candidate_changes(cfg: FtdistConfig) -> list[tuple[str, dict]]:
    """The changes to try, cheapest first; each includes the cheap ones before it."""
    s, t = cfg.strategy, cfg.train
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
    if s.name in ("single", "ddp"):
        if s.name == "ddp":
            out.append(("shard with FSDP2", {**cheap, "strategy.name": "fsdp"}))
        offload = {"strategy.name": "fsdp", "strategy.cpu_offload": True}
    elif s.name == "fsdp":
        offload = {"strategy.cpu_offload": True}
    elif s.zero_stage == 3:
        offload = {"strategy.name": "deepspeed", "strategy.zero_stage": 3,
                   "strategy.offload_optimizer": True, "strategy.offload_params": True}
    else:
        offload = {"strategy.offload_optimizer": True}
    if not all(getattr(s, k.split(".")[1]) == v for k, v in offload.items()):
        out.append(("offload to CPU memory", {**cheap, **offload}))
    sharded = {} if s.name in ("fsdp", "deepspeed") else {"strategy.name": "fsdp"}
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
            return {"change": why, "overrides": _render(overrides),
                    "per_gpu_gb": sum(mem["gpu"].values()) / GIB}
    return None


# --- speed ------------------------------------------------------------------------------------


def speed(cfg: FtdistConfig, m: ModelState, world: int) -> dict:
    from ftdist.metrics import GPU_PEAK_FLOPS, attention_flops_per_pair, causal_pairs

    t = cfg.train
    peak = GPU_PEAK_FLOPS[cfg.cluster.gpu.upper()]
    seq = cfg.data.max_seq_len
    tokens_per_rank = t.micro_batch_size * t.grad_accum_steps * seq
    # The causal attention term as the trainer's `mfu` counts it, for rows that are one document
    # each: the most attention work a row can hold (packed shorter documents do less).
    attention = attention_flops_per_pair(m.config) * causal_pairs(seq) / seq
    # Checkpointing recomputes each layer's forward in backward: 2N more FLOPs (and a third of
    # the attention term) the GPU spends, which MFU (model FLOPs) does not credit.
    recompute = 2.0 * m.matmul_params + attention / 3 if cfg.model.gradient_checkpointing else 0.0
    model_flops = m.flops_per_token + attention
    step_s = tokens_per_rank * (model_flops + recompute) / (peak * cfg.plan.mfu)
    return {
        "gpu": cfg.cluster.gpu, "peak_tflops": peak / 1e12, "mfu": cfg.plan.mfu,
        "flops_per_token": model_flops, "matmul_flops_per_token": m.flops_per_token,
        "attention_flops_per_token": attention, "recompute_flops_per_token": recompute,
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
        "strategy": describe_strategy(cfg),
        "peft": cfg.peft.method,
        "params": {"total": m.census.total, "trainable": m.trainable, "adapter": m.census.adapter},
        "breakdown_gb": {k: v / GIB for k, v in mem["gpu"].items()},
        "cpu_per_rank_gb": mem["cpu"] / GIB,
        "activations_gb": {"checkpointing": activations(cfg, m, True) / GIB,
                           "no_checkpointing": activations(cfg, m, False) / GIB},
        "speed": speed(cfg, m, mem["world"]),
        "suggestion": None if gpu_ok and cpu_ok else suggest(cfg, m),
        "loading": {"host_per_node_gb": load["host_per_node"] / GIB, "host_rank0_gb": load["host_rank0"] / GIB,
                    "host_other_rank_gb": load["host_other_rank"] / GIB, "gpu_gb": load["gpu"] / GIB,
                    "how": load["note"]},
        "layout": mem["layout"].notes,
        "communication": mem["comm_note"],
    }
    return plan


def loading(cfg: FtdistConfig, m: ModelState, mem: dict) -> dict:
    """Memory while the model loads, before the strategy has sharded it, as ftdist.model.loading
    does it: host bytes on rank 0 and on each other rank, host bytes per node, and the GPU peak
    per rank (weights arrive in their final place, except where noted)."""
    s, world = cfg.strategy, mem["world"]
    per_node = min(world, cfg.cluster.gpus_per_node)
    whole = m.base_bytes + m.adapter_bytes + m.quant_constant_bytes  # the model as loaded, not sharded
    gpu = mem["gpu"]
    settled = gpu["parameters"] + gpu["lora"] + gpu["quant_constants"] + gpu["workspace"]
    if s.name == "fsdp" and cfg.peft.method == "qlora":
        # Every rank quantizes the whole base (on its GPU) into CPU memory; fully_shard then moves
        # one unit at a time to the GPU, shards it, and frees the rest.
        return {"host_rank0": whole, "host_other_rank": whole, "host_per_node": per_node * whole,
                "gpu": settled + m.unit_stored_bytes,
                "note": "every rank quantizes the whole 4-bit base into CPU memory; fully_shard moves it to the "
                        "GPU one block at a time"}
    if s.name == "fsdp":
        return {"host_rank0": whole, "host_other_rank": 0.0, "host_per_node": whole, "gpu": settled,
                "note": "rank 0 loads the whole model into CPU memory, the other ranks build it on the meta "
                        "device; rank 0 broadcasts each tensor into the shards"}
    if s.name == "deepspeed" and s.zero_stage == 3:
        return {"host_rank0": 0.0, "host_other_rank": 0.0, "host_per_node": 0.0, "gpu": settled,
                "note": "zero.Init partitions each tensor as it loads"}
    if cfg.peft.method == "qlora":
        return {"host_rank0": 0.0, "host_other_rank": 0.0, "host_per_node": 0.0, "gpu": settled,
                "note": "each weight is quantized on the GPU as it loads"}
    return {"host_rank0": whole, "host_other_rank": whole, "host_per_node": per_node * whole, "gpu": settled,
            "note": "every rank loads the whole model into CPU memory, then moves it to its GPU"}


def describe_strategy(cfg: FtdistConfig) -> str:
    s = cfg.strategy
    if s.name == "deepspeed":
        off = "_offload" if s.offload_params or s.offload_optimizer else ""
        return f"zero{s.zero_stage}{off}"
    return s.name + ("+cpu_offload" if s.name == "fsdp" and s.cpu_offload else "")


NOTES = {
    "parameters": "base weights as stored (4-bit packed 2 per byte under QLoRA)",
    "lora": "adapter weights (fp32 where peft keeps them so)",
    "quant_constants": "NF4 absmax (8-bit / 64 weights) + fp32 scale / 256 absmaxes + code tables; not sharded",
    "gradients": "trained parameters only",
    "optimizer": "AdamW m, v (+ fp32 master under DeepSpeed)",
    "activations": "saved for backward + logits and fp32 loss",
    "communication": "",
    "workspace": "CUDA context, cuBLAS/NCCL workspaces, allocator slack (plan.workspace_gb)",
}


def report(cfg: FtdistConfig, plan: dict) -> str:
    t, d = cfg.train, cfg.data
    sp = plan["speed"]
    ckpt = "on" if cfg.model.gradient_checkpointing else "off"
    lines = [
        (f"ftdist plan: {plan['experiment']} on {plan['nodes']} node(s) x {plan['gpus_per_node']} {cfg.cluster.gpu} "
        f"of {cfg.cluster.gpu_mem_gb:g} GiB = {plan['world_size']} GPUs; strategy {plan['strategy']}, "
        f"peft {plan['peft']}"),
        f"parameters: {plan['params']['total']:,} total, {plan['params']['trainable']:,} trained",
        (f"batch: micro {t.micro_batch_size} x {d.max_seq_len} tokens ({'packed' if d.packing else 'padded, at most'}), "
        f"accum {t.grad_accum_steps}, activation checkpointing {ckpt}"),
        *[f"sharding: {n}" for n in plan["layout"]],
        "memory per GPU (GiB):",
    ]
    notes = {**NOTES, "communication": plan["communication"]}
    for part, gib in plan["breakdown_gb"].items():
        lines.append(f"  {part:<16}{gib:8.2f}   {notes[part]}")
    lines.append(f"  {'total':<16}{plan['per_gpu_gb']:8.2f}   of {cfg.cluster.gpu_mem_gb:g}")
    acts = plan["activations_gb"]
    lines.append(f"  activations with checkpointing {acts['checkpointing']:.2f}, without {acts['no_checkpointing']:.2f}")
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
        f"+ {sp['attention_flops_per_token'] / 1e9:.1f} causal attention over whole {d.max_seq_len}-token rows)"
        + (f" + {sp['recompute_flops_per_token'] / 1e9:.1f} recomputed" if sp["recompute_flops_per_token"] else "")
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
    (parameters include adapters), in GPU and CPU memory together: offloaded state is still this
    rank's."""
    m = m or model_state(cfg)
    c = _on_one_node(cfg, world)
    mem = memory(c, m, rank)

    def held(part: str) -> float:
        return mem["gpu"][part] + mem["cpu_parts"].get(part, 0.0)

    return {"parameters": held("parameters") + held("lora"), "gradients": held("gradients"),
            "optimizer": held("optimizer"), "quant_constants": held("quant_constants")}


# --- command line -----------------------------------------------------------------------------


def compose_plan_config(overrides: list[str]) -> FtdistConfig:
    """The typed config of `overrides`, without data (data.path may be unset) or a run directory."""
    from ftdist.config import compose, load_config

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
