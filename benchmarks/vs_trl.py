"""ftdist against TRL's SFTTrainer: the same model, data, batches, order and optimizer, trained
in alternating blocks of steps in one process; tokens/s ratio and per-step loss difference.

    python benchmarks/vs_trl.py [--block 3] [--blocks 4] [--micro 8] [--max-seq-len 512] [--lr 3e-4]

Needs `pip install trl` (benchmark only; tested with trl 1.16.0, transformers 5.24).

Model: a random-init Llama (width 384, 6 layers, 6 query / 2 KV heads, MLP 1024; the tiny
local byte-level BPE tokenizer, 922 tokens) saved once with save_pretrained; each framework
loads that directory with from_pretrained, so both start from identical weights. Data: GSM8K
train (../shared/datasets, or $FTDIST_DATASETS) as question -> answer pairs, tokenized once by
ftdist; TRL gets the same `input_ids` and `labels` as a pre-tokenized dataset, in the exact
order ftdist's sampler draws them (TRL's sampler is made sequential), so step s of each
framework trains on the same batch. Both unpacked, right-padded to the longest example of each
micro-batch, fp32, sdpa, AdamW (betas 0.9/0.95, eps 1e-8, no weight decay), constant lr, no
warmup, clip 1.0, one process. Packing is left out: TRL packs (bfd) padding-free, which keeps
documents apart only under FlashAttention, not on CPU.

Order: TRL trains --block steps, then (from a callback, off TRL's clock) ftdist trains
--block steps, and so on: both see the same machine load. The first step of each framework is
left out of the timing. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from ftdist.config import DataConfig, FtdistConfig, ModelConfig, TinyModelSpec, TrainConfig
from ftdist.data.prepare import prepare_data
from ftdist.model.loading import load_model
from ftdist.model.tiny import ensure_tiny_model
from ftdist.parallel.base import Strategy
from ftdist.trainer import Trainer

DATASETS = Path(os.environ.get("FTDIST_DATASETS", Path(__file__).resolve().parents[2] / "shared" / "datasets"))
MODEL = TinyModelSpec(hidden_size=384, num_layers=6, num_heads=6, num_kv_heads=2, intermediate_size=1024)


def build_ftdist(args, run_dir: Path) -> Trainer:
    cfg = FtdistConfig(
        model=ModelConfig(tiny=MODEL, attn_implementation="sdpa"),
        data=DataConfig(path=str(DATASETS / "gsm8k" / "train.jsonl"), max_seq_len=args.max_seq_len, val_fraction=0.0),
        train=TrainConfig(
            lr=args.lr, weight_decay=0.0, adam_beta1=0.9, adam_beta2=0.95, adam_eps=1e-8, schedule="constant",
            warmup_steps=0, max_steps=args.block * args.blocks, micro_batch_size=args.micro, grad_accum_steps=1,
            max_grad_norm=1.0, mixed_precision="none", progress_bar=False,
        ),
        output_dir=str(run_dir),
    )
    cfg.data.fields.prompt, cfg.data.fields.response = "question", "answer"
    strategy = Strategy(cfg.strategy)
    loaded = load_model(cfg.model, strategy.device)
    train, _, _ = prepare_data(cfg.data, loaded.tokenizer, cfg.seed)
    run_dir.mkdir(parents=True, exist_ok=True)
    return Trainer(cfg, strategy, loaded.model, loaded.tokenizer, train, [], run_dir)


def build_trl(args, ftdist: Trainer, run_dir: Path, callback):
    from datasets import Dataset
    from torch.utils.data import SequentialSampler
    from transformers import AutoModelForCausalLM, PrinterCallback
    from trl import SFTConfig, SFTTrainer

    class InOrderSFTTrainer(SFTTrainer):
        """SFTTrainer drawing the dataset in the order given: ftdist's batches, step by step."""

        def _get_train_sampler(self, *a, **k):
            return SequentialSampler(self.train_dataset)

        def training_step(self, *a, **k):
            loss = super().training_step(*a, **k)
            self.step_losses.append(loss.item())
            return loss

    steps = args.block * args.blocks
    order = [i for s in range(steps) for i in ftdist.sampler.global_indices(s)]
    examples = [ftdist.train_examples[i] for i in order]
    dataset = Dataset.from_dict({"input_ids": [e.input_ids for e in examples], "labels": [e.labels for e in examples]})
    config = SFTConfig(
        output_dir=str(run_dir), max_steps=steps, per_device_train_batch_size=args.micro, gradient_accumulation_steps=1,
        learning_rate=args.lr, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, adam_beta1=0.9,
        adam_beta2=0.95, adam_epsilon=1e-8, optim="adamw_torch", max_grad_norm=1.0, max_length=args.max_seq_len,
        packing=False, padding_free=False, use_cpu=True, bf16=False, fp16=False, logging_steps=1,
        save_strategy="no", report_to="none", disable_tqdm=True, dataloader_num_workers=0, seed=ftdist.cfg.seed,
    )
    model_dir = ensure_tiny_model(MODEL)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="sdpa")
    trainer = InOrderSFTTrainer(model=model, args=config, train_dataset=dataset, processing_class=ftdist.tokenizer,
                                callbacks=[callback])
    trainer.step_losses = []
    trainer.remove_callback(PrinterCallback)  # its log lines would break the one-JSON-object output
    return trainer


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--block", type=int, default=3, help="steps per framework per block")
    parser.add_argument("--blocks", type=int, default=4, help="blocks per framework")
    parser.add_argument("--micro", type=int, default=8, help="examples per step (one process, no accumulation)")
    parser.add_argument("--max-seq-len", type=int, default=512)
    parser.add_argument("--lr", type=float, default=3e-4)
    args = parser.parse_args()
    if not (DATASETS / "gsm8k" / "train.jsonl").exists():
        sys.exit(f"{DATASETS}/gsm8k is absent: the benchmark reads ../shared/datasets (or set FTDIST_DATASETS)")
    from transformers import TrainerCallback

    torch.manual_seed(0)
    runs = {"ftdist": {"s": [], "loss": [], "tokens": []}, "trl": {"s": []}}

    class Alternate(TrainerCallback):
        """Times TRL's steps; after each block of them, trains ftdist's next block off TRL's clock."""

        def on_step_begin(self, *a, **k):
            if not hasattr(self, "t"):
                self.t = time.perf_counter()  # the first step: the clock starts at its batch

        def on_step_end(self, targs, state, control, **k):
            runs["trl"]["s"].append(time.perf_counter() - self.t)
            if state.global_step % args.block == 0:
                for _ in range(args.block):
                    t0 = time.perf_counter()
                    record = ftdist.train_step()
                    runs["ftdist"]["s"].append(time.perf_counter() - t0)
                    runs["ftdist"]["loss"].append(record["loss"])
                    runs["ftdist"]["tokens"].append(record["tokens"])
            self.t = time.perf_counter()

    with tempfile.TemporaryDirectory() as tmp:
        ftdist = build_ftdist(args, Path(tmp) / "ftdist")
        trl_trainer = build_trl(args, ftdist, Path(tmp) / "trl", Alternate())
        trl_trainer.train()
    import transformers
    import trl

    trl_losses = trl_trainer.step_losses
    tokens = runs["ftdist"]["tokens"]  # identical batches: the same real tokens per step
    timed = slice(1, None)
    rate = {name: sum(tokens[timed]) / sum(r["s"][timed]) for name, r in runs.items()}
    diffs = [abs(a - b) for a, b in zip(runs["ftdist"]["loss"], trl_losses)]
    print(json.dumps({
        "benchmark": "vs_trl",
        "device": "cpu",
        "threads": torch.get_num_threads(),
        "torch": torch.__version__, "transformers": transformers.__version__, "trl": trl.__version__,
        "model_params_m": round(sum(p.numel() for p in trl_trainer.model.parameters()) / 1e6, 1),
        "data": "gsm8k train, unpacked, right-padded per micro-batch",
        "steps_each": len(tokens), "block": args.block, "micro": args.micro, "max_seq_len": args.max_seq_len,
        "real_tokens_per_step": tokens,
        "step_s": {name: [round(s, 2) for s in r["s"]] for name, r in runs.items()},
        "tokens_per_s": {name: round(v, 1) for name, v in rate.items()},
        "ftdist_over_trl_tokens_per_s": round(rate["ftdist"] / rate["trl"], 3),
        # Step s has the same batch in both: the median of paired time ratios shrugs off one slow step.
        "median_paired_trl_over_ftdist_step_time": round(
            statistics.median(t / f for f, t in zip(runs["ftdist"]["s"][timed], runs["trl"]["s"][timed])), 3
        ),
        "loss": {"ftdist": [round(x, 5) for x in runs["ftdist"]["loss"]], "trl": [round(x, 5) for x in trl_losses]},
        "max_abs_loss_diff": round(max(diffs), 6),
        "mean_abs_loss_diff": round(statistics.mean(diffs), 6),
    }, indent=1))


if __name__ == "__main__":
    main()
