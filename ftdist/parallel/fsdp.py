"""FSDP2 (`fully_shard`): parameters, gradients and optimizer state sharded over ranks.

Each decoder block is one FSDP unit, then the root (embeddings, final norm, head), so only one
block's full weights exist at a time. Rank 0 alone loads the weights (other ranks build on the
meta device) and they are scattered into every rank's shards after sharding.

FSDPStrategy's class methods size all of it (ftdist.plan): shards, the gathered units and
unsharded gradients communication holds, and what loading holds before sharding.
"""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, set_model_state_dict
from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, MixedPrecisionPolicy, fully_shard

from ftdist.compat import require_attr
from ftdist.config import ConfigError, FtdistConfig, TrainConfig
from ftdist.model.architectures import required_decoder_blocks
from ftdist.model_memory import ModelState, compute_bytes
from ftdist.parallel.base import DistributedStrategy, Layout, Loading


def fsdp_units(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The decoder blocks each made an FSDP unit; a model that declares none cannot be sharded."""
    return required_decoder_blocks(model, "strategy=fsdp", "this architecture cannot be sharded per block")


def apply_fsdp(model: torch.nn.Module, mp: MixedPrecisionPolicy, reshard: bool, offload: bool, frozen: bool = False) -> int:
    """fully_shard every decoder block, then the root; returns the number of FSDP units. A frozen
    model (no backward) reshards its root after forward too."""
    kwargs = {"mp_policy": mp, "reshard_after_forward": reshard}
    if offload:
        kwargs["offload_policy"] = CPUOffloadPolicy()
    blocks = fsdp_units(model)
    for block in blocks:
        fully_shard(block, **kwargs)
    # The root keeps its parameters gathered after forward: backward needs them right away. A
    # frozen model never runs backward, so it would hold its root gathered for good.
    fully_shard(model, **{**kwargs, "reshard_after_forward": frozen})
    return len(blocks) + 1


def tied_parameters(model: torch.nn.Module) -> list[list[str]]:
    """Names that share one parameter (tied embeddings), each group listed together."""
    groups: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(p), []).append(name)
    return [names for names in groups.values() if len(names) > 1]


def retie(model: torch.nn.Module, groups: list[list[str]]) -> None:
    """Point every alias back at its group's first parameter.

    Loading a state dict with assign=True (how meta ranks receive rank 0's weights) gives each
    name its own tensor, silently untying them: the copy FSDP does not manage then trains apart.
    """
    for first, *aliases in groups:
        shared = model.get_parameter(first)
        for alias in aliases:
            owner, _, attr = alias.rpartition(".")
            setattr(model.get_submodule(owner), attr, shared)


def broadcast_buffers(model: torch.nn.Module, device: torch.device) -> None:
    """Rank 0's buffers (rotary frequencies are not in the state dict) on every rank."""
    for module in model.modules():
        for name, buf in list(module.named_buffers(recurse=False)):
            if buf.is_meta:
                buf = torch.empty_like(buf, device=device)
                non_persistent = require_attr(
                    module, "_non_persistent_buffers_set", "torch", "ftdist keeps a meta buffer's persistence through it"
                )
                module.register_buffer(name, buf, persistent=name not in non_persistent)
            dist.broadcast(buf, src=0)


class FSDPStrategy(DistributedStrategy):
    shards_parameters = True
    loads_on_rank0_only = True

    def __init__(self, cfg):
        super().__init__(cfg)
        # Checked here, before any weights load, so the run stops with one line (README: errors).
        if cfg.cpu_offload and self.device.type != "cuda":
            self.shutdown()
            raise ConfigError("strategy.cpu_offload=true moves shards from GPU to CPU memory; this run is on CPU already")

    def prepare(self, model, make_optimizer, make_scheduler, train: TrainConfig, bf16: bool):
        self.handles_mixed_precision = bf16
        self.num_units = self._shard(model, bf16, self.cfg.reshard_after_forward)
        optimizer = make_optimizer(model)
        return model, optimizer, make_scheduler(optimizer)

    def prepare_frozen(self, model, train: TrainConfig, bf16: bool):
        """Sharded like the policy (a frozen copy holds 1/world of the weights per rank); each
        unit is gathered for its forward and freed after it."""
        model.requires_grad_(False)
        self._shard(model, bf16, reshard=True, frozen=True)
        return model.eval()

    def _shard(self, model, bf16: bool, reshard: bool, frozen: bool = False) -> int:
        """fully_shard `model` and fill every rank's shards; returns the number of FSDP units."""
        # bf16 compute, fp32 gradient reduction: summing over ranks in bf16 loses precision.
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else MixedPrecisionPolicy()
        deferred = not self._has_quantized(model)  # as load_model decided: see loads_on_rank0_only
        full = model.state_dict() if self.is_main and deferred else {}
        ties = tied_parameters(model)
        units = apply_fsdp(model, mp, reshard, self.cfg.cpu_offload, frozen)
        if deferred:
            # Rank 0 holds the loaded weights; everyone else's shards are filled from them.
            set_model_state_dict(
                model, full, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True, strict=False)
            )
            del full
            retie(model, ties)
            broadcast_buffers(model, self.device)
        if not self.cfg.cpu_offload:
            model.to(self.device)
        return units

    @staticmethod
    def _has_quantized(model: torch.nn.Module) -> bool:
        # 4-bit bases are loaded (and quantized) on every rank, not broadcast from rank 0.
        return any(type(p).__name__ == "Params4bit" for p in model.parameters())

    @classmethod
    def accumulates_unsharded(cls, cfg: FtdistConfig) -> bool:
        """Whether every rank holds whole gradients between micro-batches (see accumulating)."""
        return cfg.strategy.accumulate_unsharded and cfg.train.grad_accum_steps > 1

    @contextlib.contextmanager
    def accumulating(self, model: FSDPModule):
        if not self.cfg.accumulate_unsharded:
            # Reduce-scatter every micro-batch: the sharded gradients accumulate, and no rank ever
            # holds a whole model's gradients (FSDP2 would keep them unsharded, in fp32, until sync).
            yield
            return
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)

    @property
    def grad_reduction_factor(self) -> float:
        return float(self.world_size)  # FSDP averages gradients over ranks

    def full_state_dict(self, model, trainable_only: bool = False) -> dict | None:
        if trainable_only:
            # Gather only what trains (adapters); each full_tensor() is a collective on every rank.
            out = {}
            for name, p in model.named_parameters():
                if p.requires_grad:
                    value = p.full_tensor() if hasattr(p, "full_tensor") else p
                    out[name] = value.detach().cpu()
            return out if self.is_main else None
        state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return state if self.is_main else None

    # --- what it costs ------------------------------------------------------------------------

    @classmethod
    def describe(cls, cfg: FtdistConfig) -> str:
        return "fsdp" + ("+cpu_offload" if cfg.strategy.cpu_offload else "")

    @classmethod
    def units(cls, num_layers: int) -> int:
        return num_layers + 1  # apply_fsdp: one per decoder block, then the root

    @classmethod
    def layout(cls, cfg: FtdistConfig, world: int) -> Layout:
        off = cfg.strategy.cpu_offload
        note = f"FSDP2 over {world} ranks: parameters, gradients and optimizer state sharded 1/{world}"
        lay = Layout(world, world, world, off, off, off, [note + (", in CPU memory (cpu_offload)" if off else "")])
        if cls.accumulates_unsharded(cfg):
            lay.grad_shards, lay.grads_on_cpu = 1, False
            lay.notes.append(f"accumulate_unsharded: until the last of {cfg.train.grad_accum_steps} micro-batches "
                             "every rank holds all gradients unsharded, on the GPU, in the reduce dtype")
        return lay

    @classmethod
    def state_bytes(cls, cfg: FtdistConfig, m: ModelState) -> dict[str, float]:
        out = super().state_bytes(cfg, m)
        if cls.accumulates_unsharded(cfg) and compute_bytes(cfg) == 2:
            out["gradients"] = m.trainable * 4  # FSDP2 accumulates unsharded gradients in fp32 (the reduce dtype)
        return out

    @classmethod
    def communication_bytes(cls, cfg: FtdistConfig, m: ModelState, world: int) -> tuple[float, str]:
        act = compute_bytes(cfg)
        if cfg.strategy.reshard_after_forward:
            gathered = m.root_gather_bytes + 2 * m.layer_gather_bytes
            what = "root unit (embeddings, head) + 2 decoder layers all-gathered (in use and prefetched)"
        else:
            gathered = m.base_compute_bytes + m.adapter_bytes
            what = "every unit stays gathered (reshard_after_forward=false)"
        # prepare()'s policy reduces in fp32 under bf16 compute: a unit's gradients exist in both.
        reduce = 4 if act == 2 else 0
        unsharded = max(m.layer_trainable, m.root_trainable) * (act + reduce)
        return gathered + unsharded, f"{what}; one unit's unsharded gradients before reduce-scatter"

    @classmethod
    def loading(cls, cfg: FtdistConfig, m: ModelState) -> Loading:
        whole = m.loaded_bytes
        if cfg.peft.method == "qlora":
            # Every rank quantizes the whole base (on its GPU) into CPU memory; fully_shard then
            # moves one unit at a time to the GPU, shards it, and frees the rest.
            return Loading(whole, whole, "every rank quantizes the whole 4-bit base into CPU memory; fully_shard "
                           "moves it to the GPU one block at a time", gpu_extra=m.unit_stored_bytes)
        return Loading(whole, 0.0, "rank 0 loads the whole model into CPU memory, the other ranks build it on the "
                       "meta device; rank 0 broadcasts each tensor into the shards")

    @classmethod
    def memory_changes(cls, cfg: FtdistConfig) -> list[tuple[str, dict[str, object]]]:
        return [("offload to CPU memory", {"strategy.cpu_offload": True})]

    @classmethod
    def sharding_change(cls, cfg: FtdistConfig) -> dict[str, object]:
        return {}
