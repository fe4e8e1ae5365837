"""`dry_run=true`: size a run before it is launched. Nothing is downloaded, loaded or written.

The model is built from its config on the meta device (shapes and dtypes, no storage) and wrapped
with the same peft adapters training uses, so the parameter counts are the real module tree's.
The memory figures are ftdist.plan's, for WORLD_SIZE ranks (8 when unset).
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass

import torch

from ftdist.config import FtdistConfig
from ftdist.constants import DTYPES, GIB

DEFAULT_WORLD_SIZE = 8  # one 8-GPU node: the usual unit of a cluster allocation
# bitsandbytes NF4 with double quantization: 4 bits per weight, an 8-bit absmax per block of 64
# weights, and an fp32 scale per 256 of those absmaxes.
NF4_BYTES_PER_PARAM = 0.5 + 1 / 64 + 4 / (64 * 256)
LOSS_BYTES_PER_LOGIT = 8  # the loss upcasts the logits to fp32, and their gradient is fp32 too


@dataclass
class Census:
    """Parameter counts of a built (meta) model (its storage: ftdist.plan.ModelState)."""

    total: int  # base model parameters; a 4-bit weight counts as one parameter
    trainable: int
    adapter: int  # parameters peft added
    num_layers: int
    adapted_in_features: int  # summed input width of the adapted linears of one layer
    adapted_modules: int  # adapted linears per layer


def format_count(n: float) -> str:
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.1f}{unit}"
    return str(int(n))


def build_meta_model(cfg: FtdistConfig):
    """(hf config, model with adapters, ids of the weights QLoRA stores in 4 bits, decoder layers,
    ids of the base model's parameters)."""
    from transformers import AutoModelForCausalLM

    from ftdist.console import quiet_library_hints
    from ftdist.model.adapters import apply_adapters

    quiet_library_hints()  # before apply_adapters imports peft, and peft bitsandbytes
    from ftdist.model.architectures import model_config

    config = model_config(cfg.model)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(
            config, dtype=DTYPES[cfg.model.dtype], trust_remote_code=cfg.model.trust_remote_code
        )
    quantized = quantized_weights(model) if cfg.peft.method == "qlora" else set()
    layers = decoder_layers(model)
    base_ids = {id(p) for p in model.parameters()}
    # Adapters on meta too: a 70B's LoRA alone is ~200M parameters.
    with torch.device("meta"):
        model = apply_adapters(model, cfg.peft)
    return config, model, quantized, layers, base_ids


def quantized_weights(model: torch.nn.Module) -> set[int]:
    # transformers' bitsandbytes integration quantizes every nn.Linear but the output head.
    head = model.get_output_embeddings()
    return {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Linear) and m is not head}


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The repeated blocks (FSDP's per-block units): transformers names their class."""
    names = set(getattr(model, "_no_split_modules", None) or ())
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if not layers:  # no declared block class: the longest ModuleList
        lists = [m for m in model.modules() if isinstance(m, torch.nn.ModuleList)]
        layers = list(max(lists, key=len)) if lists else []
    return layers


def take_census(model, quantized: set[int], layers, base_ids: set[int]) -> Census:
    params = list(model.parameters())
    adapted = [m for m in layers[0].modules() if hasattr(m, "lora_A")] if layers else []
    return Census(
        total=sum(p.numel() for p in params if id(p) in base_ids),
        trainable=sum(p.numel() for p in params if p.requires_grad),
        adapter=sum(p.numel() for p in params if id(p) not in base_ids),
        num_layers=len(layers),
        adapted_in_features=sum(m.in_features for m in adapted),
        adapted_modules=len(adapted),
    )


def resolve_world_size(cfg: FtdistConfig, world_size: int | None) -> tuple[int, str]:
    if cfg.strategy.name == "single":
        return 1, "strategy=single runs one process"
    if world_size:
        return world_size, "as requested"
    if os.environ.get("WORLD_SIZE"):
        return int(os.environ["WORLD_SIZE"]), "from WORLD_SIZE"
    return DEFAULT_WORLD_SIZE, "WORLD_SIZE unset: one node of 8 GPUs assumed; set WORLD_SIZE=N to size for N ranks"


def compute_bytes(cfg: FtdistConfig) -> int:
    # bf16 where the model is bf16 or autocast runs (auto: bf16 on a bf16 GPU, the target here).
    return 2 if cfg.model.dtype == "bf16" or cfg.train.mixed_precision != "none" else 4


def activation_bytes(cfg: FtdistConfig, config, c: Census) -> float:
    """Saved activations of one micro-batch: a rough count of the tensors autograd keeps."""
    h, inter, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or h // heads
    kv = getattr(config, "num_key_value_heads", heads) * head_dim
    rows, seq = cfg.train.micro_batch_size, cfg.data.max_seq_len
    tokens, act = rows * seq, compute_bytes(cfg)
    # Per token and layer, as counted with saved-tensor hooks on transformers' Llama (sdpa):
    # 8h + 2kv + 4I (norm inputs and outputs and the projections' 2-D views, q, k, v, attention
    # output with no T x T matrix, MLP gate, up, activation, product). LoRA keeps its r-wide
    # hidden and, with dropout, its own dropped copy of each adapted input and a 1-byte mask.
    per_token = 8 * h + 2 * kv + 4 * inter + c.adapted_modules * cfg.peft.r
    masks = 0
    if cfg.peft.dropout > 0:
        per_token += c.adapted_in_features
        masks = c.adapted_in_features
    per_layer = tokens * (per_token * act + masks)
    if cfg.model.attn_implementation == "eager":
        per_layer += rows * heads * seq * seq * 2 * act  # scores and probabilities
    if cfg.model.gradient_checkpointing:  # layer inputs kept, one layer recomputed at a time
        saved = layers * tokens * h * act + per_layer
    else:
        saved = layers * per_layer
    return saved + tokens * config.vocab_size * (act + LOSS_BYTES_PER_LOGIT)


def memory_per_rank(cfg: FtdistConfig, built, world: int) -> tuple[dict[str, float], list[str]]:
    """GiB per rank by part, and the sharding notes, from ftdist.plan's memory model (the one
    checked against what ranks hold) for `world` ranks on one node."""
    from ftdist.plan import memory, model_state

    sized = copy.deepcopy(cfg)
    sized.cluster.nodes, sized.cluster.gpus_per_node = 1, world
    mem = memory(sized, model_state(sized, built))
    gib = {part: value / GIB for part, value in mem["gpu"].items()}
    gib["total_gpu"] = sum(gib.values())
    gib["cpu"] = mem["cpu"] / GIB
    return gib, mem["layout"].notes


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
    rows = t.micro_batch_size * t.grad_accum_steps * world
    kind = "packed rows" if d.packing else "rows (at most)"
    return (f"batch: micro {t.micro_batch_size} x accum {t.grad_accum_steps} x {world} ranks = {rows} {kind} of "
            f"{d.max_seq_len} tokens = {rows * d.max_seq_len:,} tokens per optimizer step")


def describe_memory(cfg: FtdistConfig, mem: dict, world: int) -> list[str]:
    lines = ["memory per rank (GiB, estimate; python -m ftdist.plan explains each part):"]
    lines += [f"  {part:<16} {value:8.2f}" for part, value in mem.items() if part not in ("total_gpu", "cpu")]
    lines.append(f"  {'total GPU':<16} {mem['total_gpu']:8.2f}")
    if mem["cpu"]:
        per_node = int(os.environ.get("LOCAL_WORLD_SIZE", min(world, DEFAULT_WORLD_SIZE)))
        lines.append(f"  {'CPU':<16} {mem['cpu']:8.2f}   offloaded state; {mem['cpu'] * per_node:.1f} per node of "
                     f"{per_node} ranks")
    return lines


def describe_fit(cfg: FtdistConfig, mem: dict) -> tuple[bool, str]:
    """Whether the per-rank estimate fits the GPU cluster.gpu_mem_gb says a rank has, in one line."""
    total, budget = mem["total_gpu"], cfg.cluster.gpu_mem_gb
    if total <= budget:
        return True, f"fits: {total:.2f} GiB per rank of the {budget:g} GiB GPU assumed (cluster.gpu_mem_gb)"
    return False, (
        f"WARNING: does not fit: {total:.2f} GiB per rank exceeds the {budget:g} GiB GPU assumed "
        f"(cluster.gpu_mem_gb) by {total - budget:.2f} GiB; python -m ftdist.plan names the cheapest change that fits"
    )


def dry_run(cfg: FtdistConfig, world_size: int | None = None) -> dict:
    """Print the report (rank 0 only, if launched under torchrun) and return its numbers."""
    built = build_meta_model(cfg)
    config, model, quantized, layers, base_ids = built
    census = take_census(model, quantized, layers, base_ids)
    world, world_note = resolve_world_size(cfg, world_size)
    mem, plan_lines = memory_per_rank(cfg, built, world)
    if cfg.strategy.name == "fsdp":
        plan_lines.insert(0, f"{census.num_layers + 1} units ({census.num_layers} decoder layers + the root: "
                             "embeddings, final norm, output head)")
    lines = [f"ftdist dry run: {cfg.experiment_name} (meta device: no weights loaded, nothing launched)"]
    lines += describe_model(cfg, config, census)
    lines.append(describe_batch(cfg, world))
    lines.append(f"sharding ({cfg.strategy.name}): " + "; ".join(plan_lines))
    lines += describe_memory(cfg, mem, world)
    fits_gpu, fit_line = describe_fit(cfg, mem)
    lines.append(fit_line)
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
        "fsdp_units": census.num_layers + 1 if cfg.strategy.name == "fsdp" else None,
        "memory_gib": mem,
        "gpu_mem_gb": cfg.cluster.gpu_mem_gb,
        "fits_gpu": fits_gpu,
        "report": report,
    }
