"""The training loop: accumulate, clip, step, evaluate, log, save.

What is trained for is the objective's (ftdist/objectives/): examples, micro-batches, the loss,
its metrics and the evaluation pass. This loop holds no objective-specific branch.

Loss normalisation is the invariant everything here protects: the loss of an optimizer step is
the sum of the objective's unit losses (label tokens for SFT) over the whole global batch (every
micro-batch on every rank) divided by that batch's unit count, which is all-reduced before the
first forward. Each micro-batch contributes `loss_sum / global_count` to the gradient, so
unequal lengths, accumulation splits and world sizes all give the same gradient.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import json
import logging
import math
import os
import random
import resource
import signal
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from ftdist.checkpoint import FORMAT_VERSION, checkpoint_dir, load_checkpoint, save_checkpoint, train_data_fingerprint
from ftdist.config import ConfigError, FtdistConfig
from ftdist.data.loader import GlobalBatchSampler, to_device
from ftdist.metrics import TrainFlops, checked_mfu, device_peak_flops, peak_memory_gb
from ftdist.model.compile import compile_blocks, compiled_graphs
from ftdist.model.forward import ModelForward
from ftdist.objectives import build_objective
from ftdist.objectives.base import EvalContext, MicroBatch, Objective, TrainingContext
from ftdist.optim import build_optimizer, lr_multiplier
from ftdist.parallel.base import Strategy
from ftdist.resilience import PREEMPTED_MARKER, NonFiniteError, Preempted, PreemptionFlag, injected_fault
from ftdist.score import load_reward_model
from ftdist.tracking import MetricsWriter, WandbTracker

log = logging.getLogger("ftdist")

# What forward_backward totals for every objective; its other keys are the objective's metrics.
SHARED_TOTALS = ("loss_sum", "count", "tokens", "slots", "documents", "flops")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def use_bf16(cfg: FtdistConfig, device: torch.device) -> bool:
    mode = cfg.train.mixed_precision
    if mode == "auto":
        # Only where bf16 is fast: on CPUs without bf16 units autocast is ~80x slower.
        return device.type == "cuda" and torch.cuda.is_bf16_supported()
    return mode == "bf16"


class Trainer:
    def __init__(
        self,
        cfg: FtdistConfig,
        strategy: Strategy,
        model: torch.nn.Module,
        tokenizer,
        train_examples: list,
        val_examples: list,
        run_dir: Path,
        tracker: WandbTracker | None = None,  # W&B on rank 0: tracking.start_wandb, before the model loads
        objective: Objective | None = None,  # default: the one cfg.objective names
        reference_model: torch.nn.Module | None = None,  # a frozen second model the objective asked for (DPO)
    ):
        self.cfg = cfg
        self.strategy = strategy
        self.tokenizer = tokenizer
        self.train_examples = train_examples
        self.val_examples = val_examples
        self.run_dir = run_dir
        self.device = strategy.device
        self.objective = objective if objective is not None else build_objective(cfg, tokenizer)
        t = cfg.train
        # Items are what the sampler orders and a micro-batch holds: single examples, or packed
        # rows of several. Each item is a list of example indices.
        self.train_items = self.objective.make_items(train_examples)
        self.val_items = self.objective.make_items(val_examples)
        self.global_batch_size = t.micro_batch_size * t.grad_accum_steps * strategy.world_size
        self.sampler = GlobalBatchSampler(len(self.train_items), self.global_batch_size, cfg.seed)
        # Optimizer steps per global batch of items: 1, but for an objective that reuses a batch
        # for several updates (GRPO's iterations over one generation batch).
        self.updates_per_batch = getattr(self.objective, "updates_per_batch", 1)
        self.total_steps = (
            t.max_steps
            if t.max_steps is not None
            else math.ceil(t.epochs * len(self.train_items) / self.global_batch_size) * self.updates_per_batch
        )
        self.flops = TrainFlops.of(model)
        self.flops_per_token = self.flops.per_token  # matmul part only (benchmarks read it)
        self.peak_flops = device_peak_flops(self.device)
        self.bf16 = use_bf16(cfg, self.device)
        self.logits = ModelForward(model, strategy, self.bf16, cfg.model.loss_chunk_tokens, cfg.model.liger)
        if cfg.train.compile:  # before the strategy wraps or shards the blocks
            compile_blocks(model, packed=cfg.data.packing)
        self.model, self.optimizer, self.scheduler = strategy.prepare(
            model,
            lambda m: build_optimizer(m, cfg),
            lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_multiplier(s, cfg, self.total_steps)),
            cfg.train,
            self.bf16,
        )
        if reference_model is not None:
            reference_model = strategy.prepare_frozen(reference_model, cfg.train, self.bf16)
        # Before any checkpoint loads: what the objective binds to (DPO's precomputed reference
        # log-probs) is the starting model's.
        self.objective.setup(TrainingContext(
            model=self.model, strategy=strategy, logits=self.logits, reference_model=reference_model, bf16=self.bf16,
            train_examples=train_examples, val_examples=val_examples, run_dir=run_dir,
            load_reward_model=load_reward_model,
        ))
        self.metrics = MetricsWriter(run_dir, enabled=strategy.is_main, tracker=tracker)
        self.step = 0
        self.total_tokens = 0
        self.skipped_steps = 0
        self.checkpointed_step = -1
        self.preemption = PreemptionFlag()
        self.history: list[dict] = []
        self.eval_history: list[dict] = []
        self.carried: dict = {}  # summary figures of earlier invocations (restore_checkpoint_state)

    # --- training ---------------------------------------------------------------------------

    def collate_items(self, examples: list, items: list[list[int]]) -> MicroBatch:
        return self.objective.collate(examples, items)

    def forward_backward(self, batches: list[MicroBatch]) -> dict:
        """Accumulate this rank's gradients for one global batch; returns global totals (and
        the objective's train metrics)."""
        return self.totals_of(self.accumulate(batches).tolist())

    def accumulate(self, batches: list[MicroBatch]) -> torch.Tensor:
        """Forward and backward over this rank's micro-batches of one global batch, leaving the
        global totals on the device: SHARED_TOTALS, then the objective's sum_keys (float64).

        Nothing is read to the host here, so the device never waits on Python: the loss
        normaliser is a device tensor, losses and metric sums accumulate on the device, and
        the step reads all of it at once with the gradient norm (Strategy.step_reading)."""
        strategy, objective = self.strategy, self.objective
        forwards = getattr(objective, "reference_forwards", 0)  # no-grad forwards beyond the trained one
        counts = strategy.all_reduce_sum_(to_device(torch.tensor([
            sum(objective.loss_count(b) for b in batches),
            sum(b.num_tokens for b in batches),
            sum(b.slots for b in batches),
            sum(b.num_documents for b in batches),
            sum(self.flops.step(b.document_lengths) + forwards * self.flops.forward(b.document_lengths) for b in batches),
        ], dtype=torch.float64), self.device))  # pinned, non-blocking on a GPU: no wait on the queue
        # A global batch with nothing to learn contributes no gradient; avoid dividing by zero.
        scale = strategy.grad_reduction_factor / counts[0].clamp(min=1.0)
        forward = self.logits.bind(self.model)
        sums = torch.zeros(1 + len(objective.sum_keys), dtype=torch.float64, device=self.device)  # loss, then sum_keys
        for i, batch in enumerate(batches):
            batch = batch.to(self.device)
            last = i == len(batches) - 1
            # Gradients are reduced across ranks once, on the last micro-batch.
            with contextlib.nullcontext() if last else strategy.accumulating(self.model):
                out = objective.loss(forward, batch)
                micro_loss = out.loss_sum
                if injected_fault(self.step + 1, strategy.rank) == "nan":
                    micro_loss = micro_loss * float("nan")
                strategy.backward(self.model, micro_loss * scale)
            sums[0] += micro_loss.detach().to(torch.float64)
            for j, key in enumerate(objective.sum_keys, start=1):
                sums[j] += torch.as_tensor(out.sums[key], dtype=torch.float64, device=self.device)
        loss_sum, objective_sums = strategy.all_reduce_sum_(sums).split([1, len(objective.sum_keys)])
        count, tokens, slots, documents, flops = counts.unbind()
        return torch.stack([loss_sum[0], count, tokens, slots, documents, flops, *objective_sums.unbind()])

    def totals_of(self, values: list[float]) -> dict:
        """accumulate's totals, read to the host, as named figures and the objective's metrics."""
        shared = dict(zip(SHARED_TOTALS, values[: len(SHARED_TOTALS)], strict=True))
        sums = dict(zip(self.objective.sum_keys, values[len(SHARED_TOTALS):], strict=True))
        return {**shared, **self.objective.train_metrics(shared["count"], sums)}

    def step_batches(self, step: int) -> list[MicroBatch]:
        micro = self.sampler.rank_micro_batches(
            step // self.updates_per_batch, self.strategy.rank, self.strategy.world_size, self.cfg.train.micro_batch_size
        )
        batches = [self.collate_items(self.train_examples, [self.train_items[j] for j in idx]) for idx in micro]
        # An on-policy objective turns the step's items (prompts) into what it trains on (its
        # rollouts) before the step's counts are taken: they depend on what was generated.
        prepare = getattr(self.objective, "prepare_step", None)
        return batches if prepare is None else prepare(batches, step)

    def optimizer_step(self, totals: torch.Tensor | None = None) -> tuple[float, float, list[float]]:
        """Clip, step, advance the schedule; returns (grad_norm before clipping, lr used, the
        values of `totals`, read with the norm).

        Strategies leave the parameters unchanged when the norm is not finite."""
        lr = self.scheduler.get_last_lr()[0]
        grad_norm, values = self.strategy.step_reading(
            self.model, self.optimizer, self.scheduler, self.cfg.train.max_grad_norm, totals)
        return grad_norm, lr, values

    def check_finite(self, loss: float, grad_norm: float) -> None:
        """Loss and norm are global (all-reduced), so every rank takes the same decision."""
        if math.isfinite(loss) and math.isfinite(grad_norm):
            return
        if self.cfg.train.on_nonfinite == "raise":
            raise NonFiniteError(
                f"step {self.step}: non-finite loss {loss} or gradient norm {grad_norm}; "
                "resume from the last checkpoint, or set train.on_nonfinite=skip"
            )
        self.skipped_steps += 1
        log.warning("step %d: non-finite loss %s / grad norm %s: step skipped, parameters unchanged", self.step, loss, grad_norm)

    def train_step(self) -> dict:
        t0 = time.perf_counter()
        self.model.train()
        grad_norm, lr, values = self.optimizer_step(self.accumulate(self.step_batches(self.step)))
        totals = self.totals_of(values)
        tokens = totals["tokens"]
        self.step += 1
        self.check_finite(totals["loss_sum"], grad_norm)
        self.total_tokens += int(tokens)
        dt = time.perf_counter() - t0
        step_mfu, self.peak_flops = checked_mfu(totals["flops"], dt, self.strategy.world_size, self.peak_flops, self.device)
        objective_metrics = {k: v for k, v in totals.items() if k not in SHARED_TOTALS}
        return {
            "step": self.step,
            "loss": totals["loss_sum"] / max(totals["count"], 1.0),
            "lr": lr,
            "grad_norm": grad_norm,
            "tokens": int(tokens),
            **objective_metrics,
            "total_tokens": self.total_tokens,
            "documents": int(totals["documents"]),
            "packing_efficiency": tokens / max(totals["slots"], 1.0),
            "tokens_per_s": tokens / dt,
            "step_flops": totals["flops"],  # model FLOPs of the global step, attention included
            "mfu": step_mfu,
            "peak_mem_gb": peak_memory_gb(self.device),
            "epoch": self.sampler.epoch_at(self.step // self.updates_per_batch),
            "skipped_steps": self.skipped_steps,
            **({"compiled_graphs": compiled_graphs()} if self.cfg.train.compile else {}),
        }

    # --- evaluation -------------------------------------------------------------------------

    @torch.no_grad()
    def evaluate(self, with_generation: bool) -> dict:
        """The objective's evaluation pass over the validation set: an eval line."""
        model = self.strategy.unwrap(self.model)
        was_training = model.training
        model.eval()
        ctx = EvalContext(
            model=model,
            forward=self.logits.bind(model),
            strategy=self.strategy,
            tokenizer=self.tokenizer,
            examples=self.val_examples,
            items=self.val_items,
            batch_size=self.cfg.train.eval_batch_size,
            step=self.step,
            run_dir=self.run_dir,
            cfg=self.cfg,
            load_reward_model=load_reward_model,
        )
        record = {"step": self.step, **self.objective.evaluate(ctx, with_generation)}
        model.train(was_training)
        return record

    def _log_eval(self, record: dict) -> None:
        self.eval_history.append(record)
        self.metrics.write(record)
        log.info("step %d: %s", record["step"], self.objective.describe_eval(record))

    # --- the whole run ----------------------------------------------------------------------

    def fit(self, resume_from: Path | None = None, on_resumed: Callable[[], None] | None = None) -> dict:
        """Train to total_steps (from a checkpoint where given); raises Preempted after saving
        a checkpoint when a preemption signal reached any rank. on_resumed runs once the
        checkpoint has been accepted (a refused one must leave the run directory as it was)."""
        cfg = self.cfg
        has_val = len(self.val_examples) > 0
        if resume_from is not None:
            load_checkpoint(self, resume_from)
            if on_resumed is not None:
                on_resumed()
            if self.strategy.is_main:
                (self.run_dir / PREEMPTED_MARKER).unlink(missing_ok=True)
            self.metrics.truncate_after(self.step)  # lines the interrupted run wrote past the checkpoint
        log.info(
            "training %d steps: global batch %d = %d ranks x %d accum x %d micro; %d train / %d val %s",
            self.total_steps, self.global_batch_size, self.strategy.world_size, cfg.train.grad_accum_steps,
            cfg.train.micro_batch_size, len(self.train_examples), len(self.val_examples),
            getattr(self.objective, "unit", "examples"),
        )
        if self.peak_flops is not None:  # None: an unknown GPU, already warned about
            log.info("mfu: FLOPs per step over %.4g FLOP/s per device (%s)", self.peak_flops, self.device.type)
        if has_val and cfg.train.eval_at_start and self.step == 0:
            self._log_eval(self.evaluate(with_generation=True))
        self.preemption.install()
        try:
            self._train_loop(has_val)
        finally:
            self.preemption.restore()
        if self.step < self.total_steps:  # stopped by train.stop_after_steps, checkpoint written
            return {**self.summary(), **self.host_memory(), "complete": False}
        if has_val:
            self._log_eval(self.evaluate(with_generation=True))
        return {**self.summary(), **self.host_memory(), "complete": True}

    def host_memory(self) -> dict:
        """Each rank's peak resident host memory (GB) in this invocation, in rank order: what the
        data, model copies and optimizer cost on the host, where ranks of a node share its RAM."""
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9  # ru_maxrss is in KiB on Linux
        return {"host_peak_rss_gb_per_rank": [round(x, 3) for x in self.strategy.all_gather_object(rss)]}

    def _train_loop(self, has_val: bool) -> None:
        cfg = self.cfg
        start = time.perf_counter()
        bar = self._progress_bar()
        stop_at = self.cfg.train.stop_after_steps
        while self.step < self.total_steps:
            if stop_at is not None and self.step >= stop_at:
                self.checkpoint()
                log.info("stopping at step %d (train.stop_after_steps); rerun to continue", self.step)
                break
            record = self.train_step()
            record["elapsed_s"] = time.perf_counter() - start
            self.history.append(record)
            if self.step % cfg.train.log_every_steps == 0 or self.step == self.total_steps:
                self.metrics.write(record)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{record['loss']:.4f}", tok_s=f"{record['tokens_per_s']:.0f}", refresh=False)
            every = cfg.train.eval_every_steps
            if has_val and every and self.step % every == 0 and self.step < self.total_steps:
                self._log_eval(self.evaluate(with_generation=cfg.eval.generation.every_eval))
            self._after_step()
        if bar is not None:
            bar.close()

    def _after_step(self) -> None:
        """Periodic checkpoint, injected faults, and the per-step preemption vote."""
        fault = injected_fault(self.step, self.strategy.rank)
        if fault == "crash":
            log.error("injected crash at step %d", self.step)
            os._exit(1)
        if fault == "sigterm":
            os.kill(os.getpid(), signal.SIGTERM)
        every = self.cfg.checkpoint.every_steps
        if every and self.step % every == 0:
            self.checkpoint()
        # Only the signalled ranks know: every rank stops at this step if any rank was told.
        (stop,) = self.strategy.all_reduce_max([float(self.preemption.requested)])
        if stop:
            path = self.checkpoint()
            if self.strategy.is_main:
                # torchrun reports any worker exit as its own failure (exit 1); this marker is
                # how a wrapper (the Slurm layer) tells a preemption from a crash.
                (self.run_dir / PREEMPTED_MARKER).write_text(json.dumps({"step": self.step, "checkpoint": str(path)}))
            self.strategy.barrier()  # every rank leaves together (see train.run)
            raise Preempted(f"preempted at step {self.step}; resume with resume=auto")

    # --- checkpoint state -------------------------------------------------------------------

    def checkpoint(self) -> Path:
        """A checkpoint of the current step, written once however many reasons ask for it."""
        if self.checkpointed_step != self.step:
            save_checkpoint(self)
            self.checkpointed_step = self.step
        return checkpoint_dir(self.run_dir, self.step)

    def checkpoint_state(self) -> dict:
        return {
            "format": FORMAT_VERSION,
            "step": self.step,
            "total_tokens": self.total_tokens,
            "skipped_steps": self.skipped_steps,
            "scheduler": self.scheduler.state_dict(),
            "world_size": self.strategy.world_size,
            "strategy": self.cfg.strategy.name,
            "zero_stage": self.cfg.strategy.zero_stage,
            "global_batch_size": self.global_batch_size,
            "num_train_items": len(self.train_items),
            "train_data_sha256": self.train_data_sha256,
            "seed": self.cfg.seed,
            "summary_carry": self.summary_carry(),
        }

    @functools.cached_property
    def train_data_sha256(self) -> str:
        return train_data_fingerprint(self.train_examples, self.train_items)

    def check_resumable(self, state: dict, path: Path) -> None:
        """The data order is a function of (seed, global batch, items): all must match."""
        now = {"seed": self.cfg.seed, "global_batch_size": self.global_batch_size, "num_train_items": len(self.train_items)}
        for key, value in now.items():
            if state[key] != value:
                raise ConfigError(
                    f"resume: {path} was saved with {key}={state[key]}, this run has {value}; "
                    "the remaining batches would differ (keep seed, batch sizes x ranks and data, or resume=none)"
                )
        saved = state.get("train_data_sha256")
        if saved is None:  # written before checkpoints carried it
            log.warning("resume: %s predates training-data fingerprints; not checking that the data is the same", path)
        elif saved != self.train_data_sha256:
            raise ConfigError(
                f"resume: {path} was saved with other training data: the same number of items "
                f"({len(self.train_items)}) but their token ids, labels or packing differ (train data sha256 "
                f"{saved[:12]}..., this run {self.train_data_sha256[:12]}...); the remaining batches would differ "
                "(keep data.* and the tokenizer, or resume=none)"
            )

    def restore_checkpoint_state(self, state: dict) -> None:
        self.step = self.checkpointed_step = state["step"]
        self.total_tokens = state["total_tokens"]
        self.skipped_steps = state["skipped_steps"]
        self.scheduler.load_state_dict(state["scheduler"])
        self.carried = dict(state.get("summary_carry", {}))  # absent in checkpoints written before it

    def _progress_bar(self):
        if not (self.strategy.is_main and self.cfg.train.progress_bar):
            return None
        import sys

        from tqdm import tqdm

        # In a log file (no terminal) a bar redrawn every second buries everything else.
        interval = 1.0 if sys.stderr.isatty() else 60.0
        return tqdm(total=self.total_steps, initial=self.step, desc="train", unit="step", mininterval=interval)

    def summary_carry(self) -> dict:
        """The figures summary.json reports about the whole run that a resumed invocation cannot
        measure again, as plain floats (trainer.pt loads with weights_only=True): the base model's
        task metric (step 0; exact match for SFT), and the last train and eval losses so far."""
        carry = dict(self.carried)
        for task in self.summary_metrics:
            at_start = [r for r in self.eval_history if r["step"] == 0 and task in r]
            if at_start and f"{task}_before" not in carry:
                carry[f"{task}_before"] = float(at_start[0][task])
        if self.history:
            carry["final_loss"] = float(self.history[-1]["loss"])
        if self.eval_history:
            carry["final_eval_loss"] = float(self.eval_history[-1]["eval_loss"])
        return carry

    @property
    def summary_metrics(self) -> tuple[str, ...]:
        """Eval metrics summary.json reports before (step 0) and after training: the objective's
        task metric and any it adds (summary_extra_metrics)."""
        task = self.objective.task_metric
        return ((task,) if task else ()) + tuple(getattr(self.objective, "summary_extra_metrics", ()))

    def summary(self) -> dict:
        """The whole run's figures (earlier invocations' carried in checkpoints), but
        mean_tokens_per_s: this invocation's steps over its own training time."""
        carry = self.summary_carry()
        out = {"steps": self.step, "total_tokens": self.total_tokens}
        if "final_loss" in carry:
            out["final_loss"] = carry["final_loss"]
        if self.history:
            # total_tokens also counts steps run before a resume: not over this invocation's time.
            tokens = sum(r["tokens"] for r in self.history)
            out["mean_tokens_per_s"] = tokens / max(self.history[-1]["elapsed_s"], 1e-9)
        if "final_eval_loss" in carry:
            out["final_eval_loss"] = carry["final_eval_loss"]
        out.update(getattr(self.objective, "summary_details", dict)())
        for task in self.summary_metrics:
            measured = [r for r in self.eval_history if task in r]
            after = measured[1:] if measured and measured[0]["step"] == 0 else measured  # [0]: "before"
            if f"{task}_before" in carry and after:
                out[f"{task}_before"] = carry[f"{task}_before"]
                out[f"{task}_after"] = after[-1][task]
        return out

    def release_model(self) -> None:
        """Drop the trained model and optimizer (after save_final), so a following evaluation
        (eval.at_end) loads its models into the memory they held."""
        self.model = self.optimizer = self.scheduler = None
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def save_final(self) -> Path | None:
        """The trained model in Hugging Face format, by the code `ftdist.export` uses (rank 0
        writes; every rank waits)."""
        from ftdist.export import write_adapter, write_full_model

        final = self.run_dir / "final"
        is_peft = self.cfg.peft.method != "none"
        # Every rank takes part in gathering sharded weights; rank 0 alone writes them.
        state = self.strategy.full_state_dict(self.model, trainable_only=is_peft)
        if self.strategy.is_main:
            model = self.strategy.unwrap(self.model)
            if is_peft:
                write_adapter(model, state, final, self.tokenizer, getattr(self.objective, "head", None))
            else:
                write_full_model(model, state, final, self.tokenizer)
        self.strategy.barrier()
        return final
