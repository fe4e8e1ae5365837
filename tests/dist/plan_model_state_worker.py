"""Launched by torchrun from test_plan_model_state.py: build a run as ftdist.train's run() does,
take one training step, and write what this rank holds beside what ftdist.plan predicts: once
just after loading (before the strategy shards), and once with gradients after a step. Where the
objective loads a second, frozen model (DPO's reference=model), its bytes are counted apart: with
the policy's just after loading, and alone once the strategy has placed it.

usage: torchrun --nproc_per_node 2 plan_model_state_worker.py OUT_DIR override ...
"""

from __future__ import annotations

import functools
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for helpers and memory_probe

from helpers import WorkerRun, worker_config, worker_main
from memory_probe import measure_frozen, measure_loaded, measure_model_state

from ftdist.plan import predicted_loading, predicted_model_state
from ftdist.model.loading import load_reference_model
from ftdist.trainer import Trainer, use_bf16


def main(out_dir: Path, overrides: list[str]) -> None:
    cfg = worker_config(out_dir, overrides)
    # Before loading: under ZeRO-3, transformers builds every later model inside zero.Init.
    world, rank = int(os.environ["WORLD_SIZE"]), int(os.environ["RANK"])
    predicted = predicted_model_state(cfg, world, rank=rank)
    loading = predicted_loading(cfg, world)
    predicted["loaded"] = loading["host_rank0"] if rank == 0 else loading["host_other_rank"]
    with WorkerRun(cfg) as run:
        strategy = run.strategy
        loaded = run.load()
        reference = None
        if predicted["reference"]:
            with strategy.loading_context(bf16=use_bf16(cfg, strategy.device)):  # as ftdist.train loads it
                reference = load_reference_model(cfg, strategy)
        # Both are held until the trainer prepares them.
        loaded_bytes = measure_loaded(loaded.model) + (measure_loaded(reference) if reference is not None else 0)
        trainer = Trainer(cfg, strategy, loaded.model, loaded.tokenizer, run.train, run.val, out_dir,
                          reference_model=reference)
        # prepare_frozen placed the reference in place (FSDP2 shards it, ZeRO-3 wraps its partitions).
        reference_bytes = measure_frozen(reference) if reference is not None else 0
        trainer.train_step()  # optimizer state now exists; the step freed the gradients
        # The first of the step's micro-batches, as the trainer runs it: gradients held between
        # micro-batches (DDP and ZeRO-1 unreduced, FSDP sharded unless accumulate_unsharded).
        batches = trainer.step_batches(trainer.step)
        assert len(batches) > 1, "measure mid-accumulation: set train.grad_accum_steps > 1"
        first = batches[0].to(trainer.device)
        forward = trainer.logits.bind(trainer.model)
        with strategy.accumulating(trainer.model):
            strategy.backward(trainer.model, trainer.objective.loss(forward, first).loss_sum)
        accumulating = measure_model_state(trainer.model, trainer.optimizer, strategy)
        # The rest of the step (its micro-batches once more; accumulating onto the first is harmless
        # here): the gradients as reduced on the last micro-batch.
        trainer.forward_backward(batches)
        reduced = measure_model_state(trainer.model, trainer.optimizer, strategy)
        # What the plan sizes is the larger of the two.
        measured = {part: max(accumulating[part], reduced[part]) for part in reduced}
        measured["loaded"] = loaded_bytes
        measured["reference"] = reference_bytes
        if reference is not None:  # after its forwards: anything the strategy keeps gathered shows here
            measured["reference_after_step"] = measure_frozen(reference)
        record = {"rank": strategy.rank, "world_size": strategy.world_size, "measured": measured, "predicted": predicted}
        (out_dir / f"rank{strategy.rank}.json").write_text(json.dumps(record) + "\n")
        strategy.barrier()


if __name__ == "__main__":
    worker_main(main)
