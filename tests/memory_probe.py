"""What a rank holds, in bytes, of a live model: parameters, gradients, optimizer state and
quantization constants, counted from local storage (DDP replicas, FSDP2 DTensor shards and its
unsharded gradients under accumulation, DeepSpeed ZeRO partitions and flat buffers, bitsandbytes'
QuantState). tests/dist/test_plan_model_state.py holds ftdist.plan's figures against it.

It lives under tests/ because it reads FSDP2's and DeepSpeed's private state, which ftdist itself
never should; where that state is missing (another library version) it raises rather than
counting less. Workers launched by torchrun put tests/ on sys.path to import it.
"""

from __future__ import annotations

import torch
from torch.distributed.fsdp import FSDPModule

from ftdist.compat import require_attr

WHY = "tests/memory_probe.py counts the gradients FSDP2 holds unsharded between micro-batches through it"


def _local(t) -> torch.Tensor | None:
    if t is None or not isinstance(t, torch.Tensor):
        return None
    return t.to_local() if hasattr(t, "to_local") else t


def _add(tensors, seen: set[int]) -> int:
    """Bytes of the storages behind `tensors` not counted yet: views into one flat buffer
    (DeepSpeed's partitions, its gradient buffer) count that buffer once."""
    total = 0
    for t in tensors:
        t = _local(t)
        if t is None or t.numel() == 0:
            continue
        storage = t.untyped_storage()
        if storage.data_ptr() in seen:
            continue
        seen.add(storage.data_ptr())
        total += storage.nbytes()
    return total


def _quant_tensors(module: torch.nn.Module):
    states = []
    for m in module.modules():
        qs = getattr(m, "quant_state", None) or getattr(getattr(m, "weight", None), "quant_state", None)
        if qs is not None and all(qs is not s for s in states):
            states.append(qs)
    for qs in states:
        yield from (qs.absmax, qs.code, getattr(qs, "offset", None))
        if getattr(qs, "state2", None) is not None:
            yield from (qs.state2.absmax, qs.state2.code)


def _fsdp_unsharded_grads(module: torch.nn.Module):
    """Gradients FSDP2 holds unsharded between micro-batches when gradient sync is off: on its
    private unsharded parameters, invisible through module.parameters()."""
    for m in module.modules():
        if not isinstance(m, FSDPModule):
            continue
        state = require_attr(m, "_get_fsdp_state", "torch", WHY)()
        group = require_attr(state, "_fsdp_param_group", "torch", WHY)
        for fp in require_attr(group, "fsdp_params", "torch", WHY) if group is not None else []:
            yield require_attr(fp, "unsharded_accumulated_grad", "torch", WHY)
            unsharded = getattr(fp, "_unsharded_param", None)  # made at the first all-gather
            yield unsharded.grad if unsharded is not None else None


def measure_model_state(model: torch.nn.Module, optimizer, strategy=None) -> dict[str, int]:
    """Bytes this rank holds in parameters (base and adapter), gradients, optimizer state and
    quantization constants: the local storage only (FSDP2 DTensor shards, DeepSpeed ZeRO
    partitions, FSDP2's unsharded gradients under accumulation). Call it with gradients present
    (after a backward)."""
    module = strategy.unwrap(model) if strategy is not None else model
    module = getattr(module, "module", module)  # DDP, DeepSpeed engine
    seen: set = set()
    params = list(module.parameters())
    local_params = [getattr(p, "ds_tensor", p) for p in params]
    out = {"parameters": _add(local_params, seen)}
    grads = [p.grad for p in params] + list(_fsdp_unsharded_grads(module))
    grads.append(getattr(optimizer, "grad_partitions_flat_buffer", None))  # ZeRO-3's gradient partitions
    grads += list(getattr(optimizer, "averaged_gradients", {}).values()) if isinstance(
        getattr(optimizer, "averaged_gradients", None), dict) else []
    out["gradients"] = _add([g for gs in grads for g in (gs if isinstance(gs, list) else [gs])], seen)
    inner = getattr(optimizer, "optimizer", optimizer)  # DeepSpeed wraps the torch optimizer
    states = [v for st in inner.state.values() for k, v in st.items() if k != "step"]
    masters = list(getattr(optimizer, "fp32_partitioned_groups_flat", [])) + list(
        getattr(optimizer, "single_partition_of_fp32_groups", []))
    # DeepSpeed's master partitions are the torch optimizer's parameters; shared storage counts once.
    out["optimizer"] = _add(states, seen) + _add(masters, seen)
    out["quant_constants"] = _add(_quant_tensors(module), seen)
    return out


def measure_loaded(model: torch.nn.Module) -> int:
    """Bytes this rank holds of a model just loaded (parameters and quantization constants; meta
    tensors hold nothing), before the strategy shards it."""
    seen: set = set()
    return _add([p for p in model.parameters() if not p.is_meta], seen) + _add(_quant_tensors(model), seen)


def measure_frozen(model: torch.nn.Module) -> int:
    """Bytes this rank holds of a frozen model's parameters as the strategy placed it (DPO's
    reference after prepare_frozen: FSDP2 DTensor shards, a DeepSpeed engine's ZeRO-3 partitions,
    or a whole copy)."""
    module = getattr(model, "module", model)  # DeepSpeed engine
    return _add([getattr(p, "ds_tensor", p) for p in module.parameters()], set())
