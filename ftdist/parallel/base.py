"""What every parallel strategy provides (the process group they run on: process_group.py).

Model code knows nothing of parallelism: a strategy takes a built model and wraps it. The
trainer sees only this interface: prepare (wrap the model, build optimizer and schedule),
accumulating and backward (gradient accumulation), optimizer_step (clip, step, schedule),
all-reduce of a few scalars, unwrap for evaluation, and full_state_dict for saving.

Each strategy class also says what it costs, beside the code that incurs it: class-level methods
that size a run from its config and the model's storage (ftdist.model_memory.ModelState), with
no process group and no weights. ftdist.plan adds them up; tests/dist/test_plan_model_state.py
holds them to what each rank holds.
"""

from __future__ import annotations

import contextlib
import math
import os
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from ftdist.config import ConfigError, FtdistConfig, StrategyConfig, TrainConfig
from ftdist.model_memory import ModelState
from ftdist.parallel.process_group import init_process_group, pick_device


@dataclass
class Layout:
    """Where each kind of model state lives and over how many ranks it is split."""

    param_shards: int
    grad_shards: int
    optim_shards: int
    params_on_cpu: bool = False
    grads_on_cpu: bool = False
    optim_on_cpu: bool = False
    notes: list[str] = field(default_factory=list)

    def placement(self) -> dict[str, tuple[int, bool]]:
        """(shards, in CPU memory) of each part of the model state; adapters go with parameters."""
        params = (self.param_shards, self.params_on_cpu)
        return {"parameters": params, "lora": params, "gradients": (self.grad_shards, self.grads_on_cpu),
                "optimizer": (self.optim_shards, self.optim_on_cpu)}


def replicated(who: str) -> Layout:
    return Layout(1, 1, 1, notes=[f"{who} holds a full replica of parameters, gradients and optimizer state"])


@dataclass
class Loading:
    """Memory while the model loads, before the strategy has sharded it: host bytes on rank 0
    and on each other rank, and GPU bytes beyond the rank's settled share."""

    host_rank0: float
    host_other_rank: float
    note: str
    gpu_extra: float = 0.0


class Strategy:
    """Single process: no communication. Subclasses add the collective parts."""

    backend = "none"

    def __init__(self, cfg: StrategyConfig):
        self.cfg = cfg
        self.rank = 0
        self.world_size = 1
        self.local_rank = 0
        self.device = pick_device(0)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # True where parameters are sharded, so every forward is a collective: all ranks must run
    # the same number of forwards (evaluation pads with dummy batches, generation syncs).
    shards_parameters = False
    # True where the strategy computes in bf16 itself (FSDP mixed precision, DeepSpeed bf16), so
    # the trainer must not autocast on top.
    handles_mixed_precision = False
    # True where rank 0 alone loads the weights and the other ranks build on the meta device;
    # prepare() then fills every rank's shards from rank 0 (FSDP).
    loads_on_rank0_only = False

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        return model

    def loading_context(self, bf16: bool = False):
        """Active while the model is loaded (DeepSpeed ZeRO-3: zero.Init partitions as it loads,
        in bf16 where the run computes in bf16)."""
        return contextlib.nullcontext()

    def prepare(self, model: torch.nn.Module, make_optimizer, make_scheduler, train: TrainConfig, bf16: bool):
        """(model, optimizer, scheduler) ready to train: the model wrapped, then the optimizer
        built over the wrapped parameters (sharded ones, where the strategy shards).

        train gives the batch geometry and clipping to backends that need them up front
        (DeepSpeed's config); bf16 is whether this run computes in bf16."""
        wrapped = self.wrap(model)
        optimizer = make_optimizer(wrapped)
        return wrapped, optimizer, make_scheduler(optimizer)

    def prepare_frozen(self, model: torch.nn.Module, train: TrainConfig, bf16: bool) -> torch.nn.Module:
        """A model that only runs forwards (DPO's reference), placed as this strategy places the
        policy's weights: here whole on the device, in eval mode, with no parameter training."""
        model.requires_grad_(False)
        return model.to(self.device).eval()

    def backward(self, model: torch.nn.Module, loss: torch.Tensor) -> None:
        loss.backward()

    def optimizer_step(self, model, optimizer, scheduler, max_norm: float | None) -> float:
        """Clip, step, advance the schedule, zero the gradients; returns the pre-clip grad norm."""
        return self.step_reading(model, optimizer, scheduler, max_norm, None)[0]

    def step_reading(self, model, optimizer, scheduler, max_norm: float | None,
                     totals: torch.Tensor | None) -> tuple[float, list[float]]:
        """optimizer_step, reading `totals` (the step's figures, left on the device) to the host
        together with the gradient norm: the one host synchronisation of a training step, where
        the step must know whether the norm is finite anyway."""
        limit = max_norm if max_norm is not None else float("inf")
        norm = torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], limit)
        if hasattr(norm, "full_tensor"):  # a DTensor under FSDP2
            norm = norm.full_tensor()
        norm = norm.detach().reshape(1).to(torch.float64)
        values = (norm if totals is None else torch.cat([totals.to(norm.device), norm])).tolist()
        grad_norm = values.pop()
        if math.isfinite(grad_norm):  # a NaN/Inf step leaves the parameters as they were
            optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        return grad_norm, values

    def save_checkpoint(self, model, optimizer, path) -> None:
        """Model and optimizer state under `path`; every rank calls it and writes its part.

        torch.distributed.checkpoint stores tensors by fully qualified name with their sharding,
        so a checkpoint loads into any world size and into single, DDP or FSDP alike. A frozen
        base (PEFT) is not saved: it is reloaded from its source, so only what trains is.
        """
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

        options = StateDictOptions(ignore_frozen_params=True)
        model_state, optim_state = get_state_dict(model, optimizer, options=options)
        model_state = self._without_frozen_aliases(model, model_state)
        dcp.save({"model": model_state, "optimizer": optim_state}, checkpoint_id=str(path))

    def _without_frozen_aliases(self, model: torch.nn.Module, model_state: dict) -> dict:
        """ignore_frozen_params misses a frozen parameter's second name: a tied lm_head.weight
        (the frozen embedding under PEFT) would be saved whole in every checkpoint."""
        frozen = {n for n, p in self.unwrap(model).named_parameters(remove_duplicate=False) if not p.requires_grad}
        return {k: v for k, v in model_state.items() if k not in frozen}

    def load_checkpoint(self, model, optimizer, path, trainer_state: dict) -> None:
        if trainer_state.get("strategy") == "deepspeed":
            raise ConfigError(
                f"resume: {path} was saved by DeepSpeed (strategy=zero*); resume it with the same strategy and "
                "world size, or export it with `python -m ftdist.export` and start a new run from the export"
            )
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

        model_state, optim_state = get_state_dict(model, optimizer, options=StateDictOptions(ignore_frozen_params=True))
        state = {"model": self._without_frozen_aliases(model, model_state), "optimizer": optim_state}
        # DCP fills exactly the keys asked for (it raises on any missing from the checkpoint);
        # strict=False then only tolerates the frozen base, which was never saved.
        dcp.load(state, checkpoint_id=str(path))
        options = StateDictOptions(ignore_frozen_params=True, strict=False)
        set_state_dict(
            model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"], options=options
        )

    def full_state_dict(self, model: torch.nn.Module, trainable_only: bool = False) -> dict | None:
        """The unsharded state dict on CPU on rank 0 (None elsewhere); every rank must call it.

        trainable_only keeps only parameters that train (PEFT adapters): a 70B base is never
        gathered to save an adapter.
        """
        module = self.unwrap(model)
        if trainable_only:
            names = {n for n, p in module.named_parameters() if p.requires_grad}
            return {k: v.detach().cpu() for k, v in module.state_dict().items() if k in names}
        return {k: v.detach().cpu() for k, v in module.state_dict().items()}

    def unwrap(self, model: torch.nn.Module) -> torch.nn.Module:
        return model

    def accumulating(self, model: torch.nn.Module):
        """The context of every micro-batch of a global batch but the last: the backend keeps
        accumulating their gradients. What that takes differs: DDP skips the all-reduce, FSDP
        reduce-scatters as usual (or holds whole gradients under accumulate_unsharded), DeepSpeed
        marks a non-boundary micro-step. One process: nothing."""
        return contextlib.nullcontext()

    @property
    def grad_reduction_factor(self) -> float:
        """Multiply the loss by this so the reduced gradient is a sum over ranks, not a mean."""
        return 1.0

    def all_reduce_sum(self, values: list[float]) -> list[float]:
        return list(values)

    def all_reduce_sum_(self, t: torch.Tensor) -> torch.Tensor:
        """Sum `t` over ranks in place, on its device (nothing read to the host)."""
        return t

    def all_reduce_max(self, values: list[float]) -> list[float]:
        return list(values)

    def broadcast_object(self, obj):
        return obj

    def all_gather_object(self, obj) -> list:
        return [obj]

    def barrier(self) -> None:
        pass

    def shutdown(self) -> None:
        pass

    # --- what it costs: class-level, from the config and the model's storage -----------------

    @classmethod
    def planned_world_size(cls, cfg: FtdistConfig) -> int:
        """Ranks this strategy runs on the cluster cfg.cluster describes."""
        return 1

    @classmethod
    def describe(cls, cfg: FtdistConfig) -> str:
        return cfg.strategy.name

    @classmethod
    def layout(cls, cfg: FtdistConfig, world: int) -> Layout:
        return replicated("one process")

    @classmethod
    def state_bytes(cls, cfg: FtdistConfig, m: ModelState) -> dict[str, float]:
        """Full (unsharded) bytes of parameters, adapters, gradients and optimizer state, in the
        dtypes this strategy keeps them. torch AdamW's two states take the parameter's dtype: an
        fp32 model under bf16 compute trains at 4+4+8 bytes a parameter, a bf16 model in pure
        bf16 at 2+2+4, with no fp32 master."""
        return {"parameters": m.base_bytes, "lora": m.adapter_bytes, "gradients": m.trainable_bytes,
                "optimizer": 2 * m.trainable_bytes}

    @classmethod
    def rank_state_bytes(cls, cfg: FtdistConfig, m: ModelState, world: int, rank: int | None = None) -> dict:
        """`rank`'s share of each part of state_bytes, wherever it lives (None: the rank that
        holds most; the same on every rank where the layout splits evenly)."""
        full = cls.state_bytes(cfg, m)
        return {part: full[part] / shards for part, (shards, _) in cls.layout(cfg, world).placement().items()}

    @classmethod
    def communication_bytes(cls, cfg: FtdistConfig, m: ModelState, world: int) -> tuple[float, str]:
        """GPU bytes of the buffers collectives use while training, and what they are."""
        return 0.0, "none (one process)"

    @classmethod
    def loading(cls, cfg: FtdistConfig, m: ModelState) -> Loading:
        """Memory while ftdist.model.loading loads the model for this strategy."""
        if cfg.peft.method == "qlora":
            return Loading(0.0, 0.0, "each weight is quantized on the GPU as it loads")
        whole = m.loaded_bytes
        return Loading(whole, whole, "every rank loads the whole model into CPU memory, then moves it to its GPU")

    @classmethod
    def memory_changes(cls, cfg: FtdistConfig) -> list[tuple[str, dict[str, object]]]:
        """Changes of strategy that need less GPU memory on the same GPUs, cheapest first, as
        (why, overrides): ftdist.plan tries those not already in effect."""
        return [("offload to CPU memory", {"strategy.name": "fsdp", "strategy.cpu_offload": True})]

    @classmethod
    def sharding_change(cls, cfg: FtdistConfig) -> dict[str, object]:
        """Overrides under which more GPUs share this run's state instead of replicating it."""
        return {"strategy.name": "fsdp"}

    @classmethod
    def units(cls, num_layers: int) -> int | None:
        """How many units the strategy wraps the model in (None: it does not)."""
        return None

    @classmethod
    def render_overrides(cls, overrides: dict[str, object]) -> list[str]:
        """A suggested change as command-line overrides."""
        return [f"{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in overrides.items()]


class DistributedStrategy(Strategy):
    """A process group (torchrun's env:// or a one-process group) and the collectives on it."""

    def __init__(self, cfg: StrategyConfig):
        self.cfg = cfg
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.device = pick_device(self.local_rank)
        init_process_group(cfg, self.device)
        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()
        self.backend = dist.get_backend()

    @classmethod
    def planned_world_size(cls, cfg: FtdistConfig) -> int:
        return cfg.cluster.nodes * cfg.cluster.gpus_per_node

    def all_reduce_sum(self, values: list[float]) -> list[float]:
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.tolist()

    def all_reduce_sum_(self, t: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(t)
        return t

    def all_reduce_max(self, values: list[float]) -> list[float]:
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return t.tolist()

    def broadcast_object(self, obj):
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def all_gather_object(self, obj) -> list:
        out = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        dist.barrier()

    def shutdown(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()
