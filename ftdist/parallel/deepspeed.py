"""DeepSpeed ZeRO stages 1-3, optionally offloaded to CPU, behind the Strategy interface.

DeepSpeed's JSON config is generated from this run's config (`deepspeed_config`), so batch
geometry, clipping and precision have one source. The trainer keeps its own loss
normalisation: each micro-batch loss is already divided by the global label-token count, so
DeepSpeed must not divide by gradient_accumulation_steps again (`scale_wrt_gas=False`).

Accumulation boundaries come from the trainer's contract, not DeepSpeed's micro-step counter:
every micro-batch but the last runs inside `accumulating`, which marks it as not a boundary. The
boundary `engine.step()` (reduction where pending, clipping, optimizer, schedule) runs in
`optimizer_step`, once per global step.

Checkpoints are DeepSpeed's own (`engine.save_checkpoint`): each rank writes its optimizer
partition, in the layout DeepSpeed's tools (zero_to_fp32.py, ds_to_universal) read. They
resume only into the same data-parallel world size and ZeRO stage (`check_same_layout`).

DeepSpeedStrategy's class methods size each stage (ftdist.plan) without importing DeepSpeed:
its dtypes and fp32 master, the partitions (ZeRO-2's uneven ones: `zero_gradient_partitions`),
its default buckets, and zero.Init's loading.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
from pathlib import Path

import torch
import torch.distributed as dist

from ftdist.compat import library_error, require_attr
from ftdist.config import ConfigError, FtdistConfig, StrategyConfig, TrainConfig
from ftdist.model_memory import ModelState, compute_bytes
from ftdist.parallel.base import DistributedStrategy, Layout, Loading

log = logging.getLogger("ftdist")

QUIET_STEPS = 2**31 - 1  # steps_per_print: DeepSpeed's own progress lines never print
# Each ftdist checkpoint directory holds one DeepSpeed checkpoint, always under this tag.
CHECKPOINT_TAG = "deepspeed"
SHM_COMM_OP = "deepspeed_shm_comm"  # the NAME of DeepSpeed's ShareMemCommBuilder
# DeepSpeed's defaults, in elements: zero_section does not set them.
REDUCE_BUCKET = 500_000_000
ALLGATHER_BUCKET = 500_000_000
MAX_LIVE_PARAMETERS = 1_000_000_000  # stage3_max_live_parameters


def _import_deepspeed():
    from ftdist.console import pin_deepspeed_accelerator

    pin_deepspeed_accelerator()  # before DeepSpeed's first import, which detects and warns
    try:
        import deepspeed
        from deepspeed.accelerator import get_accelerator
    except ImportError as e:
        raise ConfigError(f"strategy=zero* needs DeepSpeed: pip install 'ftdist[deepspeed]' ({e})") from e
    if get_accelerator().device_name() == "cpu":
        skip_shm_comm_build(deepspeed)
    return deepspeed


def skip_shm_comm_build(deepspeed) -> None:
    """On CPU DeepSpeed JIT-compiles a shared-memory all-reduce (over a minute on 2 cores) that
    only its inference all-reduce uses; training collectives go through gloo. Its communication
    layer builds the op only where `deepspeed.ops.__compatible_ops__` marks it compatible, so
    ftdist marks it not: a private table, whose key must exist (else the mark does nothing)."""
    needed_for = "ftdist marks DeepSpeed's CPU shared-memory all-reduce op unbuildable, to skip its minute-long JIT build"
    ops = require_attr(deepspeed.ops, "__compatible_ops__", "deepspeed", needed_for)
    if SHM_COMM_OP not in ops:
        raise library_error("deepspeed", f"deepspeed.ops.__compatible_ops__ has no {SHM_COMM_OP!r}", needed_for)
    ops[SHM_COMM_OP] = False


def zero_section(cfg: StrategyConfig) -> dict:
    zero: dict = {"stage": cfg.zero_stage}
    if cfg.zero_stage >= 2:
        zero["contiguous_gradients"] = True
    if cfg.zero_stage == 3:
        # Saving gathers the partitioned weights layer by layer onto rank 0 (never a whole
        # model on one device); overlap_comm prefetches the next layer during compute.
        zero["stage3_gather_16bit_weights_on_model_save"] = True
        zero["overlap_comm"] = True
    if cfg.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if cfg.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    return zero


def zero_gradient_partitions(groups: list[list[int]], world: int) -> list[int]:
    """Elements of ZeRO-2's gradient partition buffer on each rank (contiguous_gradients, which
    zero_section sets). Each group is flattened, padded to a multiple of 2 x world and cut
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


def deepspeed_config(strategy: StrategyConfig, train: TrainConfig, world_size: int, bf16: bool) -> dict:
    """DeepSpeed's config dict for this run (a pure function of the run's config)."""
    micro, accum = train.micro_batch_size, train.grad_accum_steps
    config: dict = {
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": accum,
        "train_batch_size": micro * accum * world_size,
        "gradient_clipping": float(train.max_grad_norm) if train.max_grad_norm is not None else 0.0,
        "bf16": {"enabled": bool(bf16)},
        "fp16": {"enabled": False},
        "zero_optimization": zero_section(strategy),
        "steps_per_print": QUIET_STEPS,
        "wall_clock_breakdown": False,
    }
    if bf16:
        # Sum gradients over ranks in fp32: a bf16 sum over many ranks loses precision.
        config["communication_data_type"] = "fp32"
    if strategy.optimizer == "torch":
        # The trainer's torch.optim.AdamW: ZeRO partitions its state; no DeepSpeed op is built,
        # even where the optimizer state is offloaded to CPU.
        config["zero_allow_untested_optimizer"] = True
        config["zero_force_ds_cpu_optimizer"] = False
    else:
        config["optimizer"] = {
            "type": "AdamW",
            "params": {
                "lr": train.lr,
                "betas": [train.adam_beta1, train.adam_beta2],
                "eps": train.adam_eps,
                "weight_decay": train.weight_decay,
            },
        }
    return config


def check_same_layout(saved: dict, world_size: int, zero_stage: int, path) -> None:
    """A DeepSpeed checkpoint holds one optimizer partition per rank, cut for its ZeRO stage:
    DeepSpeed cannot re-cut it for another world size or stage (that takes a conversion to a
    universal checkpoint), so refuse up front with what to do instead."""
    if saved.get("strategy") != "deepspeed":
        raise ConfigError(
            f"resume: {path} was saved by strategy {saved.get('strategy')!r}, not DeepSpeed; resume it with "
            "that strategy, or export it with `python -m ftdist.export` and start a new run from the export"
        )
    if saved["world_size"] != world_size or saved["zero_stage"] != zero_stage:
        raise ConfigError(
            f"resume: {path} was saved by DeepSpeed ZeRO-{saved['zero_stage']} on world size {saved['world_size']}, "
            f"this run is ZeRO-{zero_stage} on world size {world_size}; DeepSpeed's optimizer partitions do not "
            f"reshard: resume with {saved['world_size']} ranks and strategy.zero_stage={saved['zero_stage']}, or "
            "export the checkpoint with `python -m ftdist.export` and start a new run from the export"
        )


def load_trained_module_state(src: dict, dst: torch.nn.Module) -> None:
    """Load a module state saved without its frozen parameters (PEFT: the base is reloaded from
    its source), strictly otherwise: any other missing or unexpected key is an error."""
    result = dst.load_state_dict(src, strict=False)
    frozen = {n for n, p in dst.named_parameters() if not p.requires_grad}
    missing = set(result.missing_keys) - frozen
    if missing or result.unexpected_keys:
        raise RuntimeError(
            f"DeepSpeed checkpoint does not match the model: missing {sorted(missing)}, "
            f"unexpected {sorted(result.unexpected_keys)}"
        )


def is_zero_init_model(model: torch.nn.Module) -> bool:
    """True where zero.Init partitioned the parameters as they loaded (ZeRO-3)."""
    return any(hasattr(p, "ds_id") for p in model.parameters())


class DeepSpeedStrategy(DistributedStrategy):
    def __init__(self, cfg: StrategyConfig):
        self.deepspeed = _import_deepspeed()
        logging.getLogger("DeepSpeed").setLevel(logging.WARNING)  # its INFO lines repeat per rank
        super().__init__(cfg)
        # DeepSpeed reads LOCAL_RANK itself; a plain `python -m` run (one process) has none.
        os.environ.setdefault("LOCAL_RANK", str(self.local_rank))
        # DeepSpeed's CPU accelerator counts the processes per node from LOCAL_SIZE (its own
        # launcher sets it); without it ZeRO-3 ran `numactl --hardware` in a subprocess at every
        # gradient reduction, and subprocess's catch_warnings reset Python's once-per-location
        # warning memory, so torch's FutureWarnings came back every step.
        os.environ.setdefault("LOCAL_SIZE", os.environ.get("LOCAL_WORLD_SIZE", "1"))
        # DeepSpeed's communication layer wraps the process group made above.
        self.deepspeed.init_distributed(dist_backend=self.backend, dist_init_required=False)
        self.shards_parameters = cfg.zero_stage == 3
        self.handles_mixed_precision = False
        self._accumulating = False
        self._hf_ds_config = None  # transformers holds only a weakref: it must live here
        self._save_fp32_master = False

    # --- loading ------------------------------------------------------------------------------

    def loading_context(self, bf16: bool = False):
        """ZeRO-3: from_pretrained loads under deepspeed.zero.Init, so each rank materializes
        only its partition. zero.Init fixes the parameter dtype now: bf16 partitions where this
        run computes in bf16 (pass it), else fp32 (then bf16 runs under the trainer's autocast)."""
        if self.cfg.zero_stage != 3:
            return contextlib.nullcontext()
        try:
            from transformers.integrations.deepspeed import HfDeepSpeedConfig
        except ImportError as e:
            raise ConfigError(f"strategy=zero3 needs transformers' DeepSpeed integration (and accelerate): {e}") from e
        # Batch sizes do not matter to zero.Init; the defaults satisfy DeepSpeed's config check.
        config = deepspeed_config(self.cfg, TrainConfig(), self.world_size, bf16)
        self._hf_ds_config = HfDeepSpeedConfig(config)
        return contextlib.nullcontext()

    # --- training -----------------------------------------------------------------------------

    def _engine_bf16(self, model: torch.nn.Module, bf16: bool) -> bool:
        """Whether DeepSpeed itself runs bf16. Under ZeRO-3 zero.Init fixed the partitions'
        dtype at load (whatever from_pretrained was asked for)."""
        if not is_zero_init_model(model):
            return bf16  # DeepSpeed casts the model and keeps fp32 master weights
        partitions_bf16 = next(model.parameters()).dtype == torch.bfloat16
        if partitions_bf16 and not bf16:
            raise ConfigError("ZeRO-3 loaded bf16 partitions but train.mixed_precision resolves to fp32 compute")
        if bf16 and not partitions_bf16:
            log.warning("ZeRO-3 partitioned the model in fp32 at load: bf16 compute runs under autocast")
        return bf16 and partitions_bf16

    def prepare(self, model, make_optimizer, make_scheduler, train: TrainConfig, bf16: bool):
        engine_bf16 = self._engine_bf16(model, bf16)
        loaded_dtype = next(model.parameters()).dtype
        config = deepspeed_config(self.cfg, train, self.world_size, engine_bf16)
        if self.is_main:
            log.info("deepspeed config: %s", json.dumps(config, sort_keys=True))
        if self.cfg.optimizer == "torch":
            extra = {"optimizer": make_optimizer(model)}
        else:
            # DeepSpeed builds its Adam from the config, over the trainer's parameter groups
            # (which parameters are weight-decayed is the trainer's rule).
            groups = make_optimizer(model).param_groups
            extra = {"model_parameters": [{"params": g["params"], "weight_decay": g["weight_decay"]} for g in groups]}
        # A callable schedule is built over DeepSpeed's basic optimizer and stepped by DeepSpeed
        # at each boundary that updated the weights: once per global step.
        engine, optimizer, _, scheduler = self.deepspeed.initialize(
            model=model, config=config, lr_scheduler=make_scheduler, **extra
        )
        self.handles_mixed_precision = engine_bf16
        # Stages 1/2 cast an fp32 model to bf16 for compute; the fp32 master weights are the
        # trained model (ZeRO-3 saves in the dtype zero.Init partitioned it in).
        self._save_fp32_master = engine_bf16 and self.cfg.zero_stage < 3 and loaded_dtype == torch.float32
        return engine, optimizer, scheduler

    def prepare_frozen(self, model, train: TrainConfig, bf16: bool):
        """ZeRO-3: an engine with no optimizer over the partitions zero.Init made at load, so each
        rank holds 1/world of the weights and gathers a layer for its forward. Stages 1 and 2
        replicate parameters anyway: a plain module, in the dtype the policy's engine computes in."""
        model.requires_grad_(False)
        engine_bf16 = self._engine_bf16(model, bf16)
        if not is_zero_init_model(model):
            model = model.to(self.device)
            return (model.to(torch.bfloat16) if engine_bf16 else model).eval()
        config = deepspeed_config(self.cfg, train, self.world_size, engine_bf16)
        config.pop("optimizer", None)
        engine, *_ = self.deepspeed.initialize(model=model, config=config)
        engine.eval()  # DeepSpeedEngine.eval returns None, unlike nn.Module.eval
        return engine

    @contextlib.contextmanager
    def accumulating(self, model):
        # Not engine.no_sync (ZeRO 2/3 forbid it): only marks these micro-batches as not a
        # boundary, so DeepSpeed accumulates (and, in stages 2/3, reduces as it goes).
        self._accumulating = True
        model.set_gradient_accumulation_boundary(False)
        try:
            yield
        finally:
            self._accumulating = False
            model.set_gradient_accumulation_boundary(True)

    def backward(self, model, loss: torch.Tensor) -> None:
        model.backward(loss, scale_wrt_gas=False)  # the trainer normalised the loss already
        if self._accumulating:
            model.step()  # DeepSpeed's micro-step bookkeeping; no update off a boundary

    def step_reading(self, model, optimizer, scheduler, max_norm: float | None,
                     totals: torch.Tensor | None) -> tuple[float, list[float]]:
        # Clipping to max_norm is in the config (gradient_clipping); this step applies it. The
        # engine reads its overflow flag and norm to the host itself.
        model.step()
        if not model.was_step_applied():
            # DeepSpeed discarded the update (NaN/Inf gradients: parameters and optimizer state
            # untouched) and, with it, its schedule step. The other strategies count a skipped
            # step as one of train.max_steps, so the lr stays a function of the step everywhere.
            scheduler.step()
        norm = model.get_global_grad_norm()  # before clipping, over all ranks' partitions
        if norm is None:
            raise RuntimeError("DeepSpeed computed no gradient norm (zero_optimization.compute_grad_norm=false?)")
        return float(norm), ([] if totals is None else totals.tolist())

    @property
    def grad_reduction_factor(self) -> float:
        return float(self.world_size)  # DeepSpeed averages gradients over data-parallel ranks

    # --- checkpoints --------------------------------------------------------------------------

    def save_checkpoint(self, model, optimizer, path) -> None:
        """DeepSpeed's checkpoint under `path`; a collective every rank calls. Its files name
        each other relative to the directory given at load time (and `latest` holds only the
        tag), so ftdist's rename of step_N.partial to step_N does not break them."""
        try:
            model.save_checkpoint(str(path), tag=CHECKPOINT_TAG, exclude_frozen_parameters=True)
        except Exception:
            # DeepSpeed's save ends in one barrier, with no collective between its writes and it
            # (read in 0.19.8's engine.save_checkpoint). A rank whose write raised (disk full)
            # joins that barrier here, where the others wait for it; ftdist's vote comes next.
            dist.barrier()
            raise

    def load_checkpoint(self, model, optimizer, path, trainer_state: dict) -> None:
        check_same_layout(trainer_state, self.world_size, self.cfg.zero_stage, path)
        if not (Path(path) / CHECKPOINT_TAG).is_dir():
            raise ConfigError(f"resume: {path} holds no DeepSpeed checkpoint (no {CHECKPOINT_TAG}/ directory)")
        # Restores the schedule too (the trainer's object, given to deepspeed.initialize); the
        # trainer then loads the same saved state into it again, which changes nothing.
        loaded, _ = model.load_checkpoint(
            str(path),
            tag=CHECKPOINT_TAG,
            load_optimizer_states=True,
            load_lr_scheduler_states=True,
            custom_load_fn=load_trained_module_state,
        )
        if loaded is None:
            raise ConfigError(f"resume: DeepSpeed could not load the checkpoint in {path}")

    # --- evaluation and saving ----------------------------------------------------------------

    def unwrap(self, model: torch.nn.Module) -> torch.nn.Module:
        return model.module if isinstance(model, self.deepspeed.DeepSpeedEngine) else model

    def full_state_dict(self, model, trainable_only: bool = False) -> dict | None:
        module = self.unwrap(model)
        if self.cfg.zero_stage == 3:
            # Gathers one module's partitions at a time onto rank 0, moving each to CPU.
            consolidate = require_attr(
                model, "_zero3_consolidated_16bit_state_dict", "deepspeed", "ftdist saves ZeRO-3 weights through it"
            )
            state = consolidate(exclude_frozen_parameters=trainable_only)
        elif self._save_fp32_master:
            state = self._fp32_master_state_dict(module)
        else:
            state = module.state_dict() if self.is_main else None  # full weights on every rank
        if state is None:
            return None
        if trainable_only:
            names = {n for n, p in module.named_parameters() if p.requires_grad}
            state = {k: v for k, v in state.items() if k in names}
        return {k: v.detach().cpu() for k, v in state.items()}

    def _fp32_master_state_dict(self, module: torch.nn.Module) -> dict | None:
        """module.state_dict() with each trained parameter replaced by its fp32 master copy
        (assembled from the optimizer's partitions: a collective on every rank)."""
        from deepspeed.utils import safe_get_full_fp32_param

        master = {p.data_ptr(): safe_get_full_fp32_param(p) for p in module.parameters() if p.requires_grad}
        if not self.is_main:
            return None
        # Keyed by storage, so tied parameters (embedding and head) stay one tensor.
        return {k: master.get(v.data_ptr(), v) for k, v in module.state_dict().items()}

    # --- what it costs ------------------------------------------------------------------------

    @classmethod
    def describe(cls, cfg: FtdistConfig) -> str:
        s = cfg.strategy
        return f"zero{s.zero_stage}" + ("_offload" if s.offload_params or s.offload_optimizer else "")

    @classmethod
    def layout(cls, cfg: FtdistConfig, world: int) -> Layout:
        s = cfg.strategy
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

    @classmethod
    def state_bytes(cls, cfg: FtdistConfig, m: ModelState) -> dict[str, float]:
        """Parameters and gradients in the engine dtype (bf16 when bf16 is on), and an fp32 master
        partition beside Adam's fp32 states: 2+2+4+8 = 16 bytes a parameter (the ZeRO paper's)."""
        engine = compute_bytes(cfg)
        return {
            "parameters": m.base_compute_bytes if engine == 2 else m.base_bytes,
            "lora": m.adapter_bytes * engine / 4,
            "gradients": m.trainable * engine,
            # An fp32 master partition always: DeepSpeed 0.19's ZeRO-3 means to share it with fp32
            # partitions, but compares a device name (str) with a torch.device, which never matches
            # (measured: tests/dist/test_plan_model_state.py).
            "optimizer": m.trainable * 12,
        }

    @classmethod
    def rank_state_bytes(cls, cfg: FtdistConfig, m: ModelState, world: int, rank: int | None = None) -> dict:
        out = super().rank_state_bytes(cfg, m, world, rank)
        if cfg.strategy.zero_stage == 2:
            # Uneven: each rank's buffer holds the parameters straddling its slice whole.
            buffers = zero_gradient_partitions(m.optimizer_groups, world)
            elements = max(buffers) if rank is None else buffers[rank]
            out["gradients"] = elements * (cls.state_bytes(cfg, m)["gradients"] / max(m.trainable, 1))
        return out

    @classmethod
    def communication_bytes(cls, cfg: FtdistConfig, m: ModelState, world: int) -> tuple[float, str]:
        act = compute_bytes(cfg)
        reduce = 4 if act == 2 else 0  # deepspeed_config's communication_data_type fp32 under bf16
        grad_bucket = min(REDUCE_BUCKET, m.trainable) * (act + reduce)
        if cfg.strategy.zero_stage == 3:
            layer = m.layer_gather_bytes / act  # elements (no 4-bit weights under DeepSpeed)
            live = min(MAX_LIVE_PARAMETERS, max(m.largest_param, layer) + layer)
            return live * act + grad_bucket, ("largest module (or layer) + next layer all-gathered "
                                              "(stage3_max_live_parameters 1e9); reduce bucket 5e8 elements")
        gather_bucket = min(ALLGATHER_BUCKET, m.trainable) * act
        return grad_bucket + gather_bucket, "reduce bucket and all-gather bucket (5e8 elements each)"

    @classmethod
    def loading(cls, cfg: FtdistConfig, m: ModelState) -> Loading:
        if cfg.strategy.zero_stage == 3:
            return Loading(0.0, 0.0, "zero.Init partitions each tensor as it loads")  # see loading_context
        return super().loading(cfg, m)

    @classmethod
    def memory_changes(cls, cfg: FtdistConfig) -> list[tuple[str, dict[str, object]]]:
        if cfg.strategy.zero_stage == 3:
            return [("offload to CPU memory", {"strategy.name": "deepspeed", "strategy.zero_stage": 3,
                                               "strategy.offload_optimizer": True, "strategy.offload_params": True})]
        return [("offload to CPU memory", {"strategy.offload_optimizer": True})]

    @classmethod
    def sharding_change(cls, cfg: FtdistConfig) -> dict[str, object]:
        return {}

    @classmethod
    def render_overrides(cls, overrides: dict[str, object]) -> list[str]:
        # ZeRO-3 with both offloads is a shipped preset: name it rather than its four keys.
        if overrides.get("strategy.offload_params") and overrides.get("strategy.zero_stage") == 3:
            rest = {k: v for k, v in overrides.items() if not k.startswith("strategy.")}
            return ["strategy=zero3_offload", *super().render_overrides(rest)]
        return super().render_overrides(overrides)
