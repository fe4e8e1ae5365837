"""Packing benchmark: efficiency on a real variable-length instruction mix, and real-token
throughput packed vs padded, measured side by side (alternating blocks of steps) in one run.

    python benchmarks/packing.py [--steps 12] [--max-seq-len 2048] [--attn sdpa|flex_attention]
                                 [--pad-to auto|longest|bucket|max] [--bucket 256] [--warmup auto|step|shapes]

The mix: GSM8K train, the self-instruct seed tasks, the user-oriented instructions and
text-davinci-003's answers to them (../shared/datasets, or $FTDIST_DATASETS). Prints one JSON
object.

Batch width (--pad-to), for both layouts: `longest` pads each micro-batch to its own longest
example (padded) or row (packed), so the width changes nearly every step; `bucket` rounds that
up to a multiple of --bucket (at most max_seq_len); `max` pads to max_seq_len. On a GPU a new
shape costs kernel selection (sdpa) or an inductor compile (flex_attention), so there the
default is `bucket`, and every distinct shape the timed steps will see is run once, untimed,
before timing (--warmup shapes). On CPU the defaults are `longest` and one untimed step per
layout (--warmup step), as in the figures of benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

from ftdist.config import DataConfig, FtdistConfig, ModelConfig, TinyModelSpec, TrainConfig
from ftdist.constants import IGNORE_INDEX
from ftdist.data.loader import Batch
from ftdist.data.packing import PAD_DOCUMENT, pack_documents
from ftdist.data.prepare import prepare_data
from ftdist.model.loading import load_model
from ftdist.parallel.base import Strategy
from ftdist.trainer import Trainer

DATASETS = Path(os.environ.get("FTDIST_DATASETS", Path(__file__).resolve().parents[2] / "shared" / "datasets"))
# A small Llama (about 13M parameters with this vocabulary): big enough that attention and
# matmuls, not Python overhead, dominate a step.
MODEL = TinyModelSpec(hidden_size=384, num_layers=6, num_heads=6, num_kv_heads=2, intermediate_size=1024)


def instruction_mix() -> list[dict]:
    rows = []
    for line in (DATASETS / "gsm8k" / "train.jsonl").read_text().splitlines():
        r = json.loads(line)
        rows.append({"prompt": r["question"], "response": r["answer"]})
    for name in ("seed_tasks.jsonl", "user_oriented_instructions.jsonl"):
        for line in (DATASETS / "self_instruct" / name).read_text().splitlines():
            r = json.loads(line)
            for inst in r["instances"]:
                if inst["output"].strip():
                    rows.append({"prompt": r["instruction"], "input": inst["input"], "response": inst["output"]})
    for line in (DATASETS / "self_instruct" / "text-davinci-003_predictions.jsonl").read_text().splitlines():
        r = json.loads(line)
        if r["response"].strip():
            rows.append({"prompt": r["prompt"], "response": r["response"]})
    return rows


def padded_width(width: int, pad_to: str, bucket: int, max_seq_len: int) -> int:
    """The batch width for a micro-batch whose longest item has `width` tokens."""
    if pad_to == "longest":
        return width
    if pad_to == "max":
        return max(width, max_seq_len)
    return max(width, min(-(-width // bucket) * bucket, max_seq_len))


def widen(batch: Batch, width: int, pad_token_id: int) -> Batch:
    """`batch` right-padded to `width` columns: pad ids, no attention, no label, padding document."""
    extra = width - batch.input_ids.size(1)
    if extra <= 0:
        return batch

    def pad(t, value):
        return None if t is None else torch.nn.functional.pad(t, (0, extra), value=value)

    return Batch(
        input_ids=pad(batch.input_ids, pad_token_id),
        attention_mask=pad(batch.attention_mask, 0),
        labels=pad(batch.labels, IGNORE_INDEX),
        num_tokens=batch.num_tokens,
        num_label_tokens=batch.num_label_tokens,
        position_ids=pad(batch.position_ids, 0),
        document_ids=pad(batch.document_ids, PAD_DOCUMENT),
        num_documents=batch.num_documents,
        segments=batch.segments,
    )


class BenchTrainer(Trainer):
    """The framework's trainer, with the batch width of --pad-to."""

    pad_to = "longest"
    bucket = 256

    def collate_items(self, examples, items):
        batch = super().collate_items(examples, items)
        width = padded_width(batch.input_ids.size(1), self.pad_to, self.bucket, self.cfg.data.max_seq_len)
        return widen(batch, width, self.tokenizer.pad_token_id)

    def warm_up(self, batches: list[Batch]) -> None:
        """One untimed forward, backward and optimizer step on each batch (the step counter,
        and so the data order of the timed steps, is left as it is)."""
        for batch in batches:
            self.model.train()
            self.forward_backward([batch])
            self.optimizer_step()


def build_trainer(packing: bool, micro: int, max_seq_len: int, data_path: str, run_dir: Path, attn: str,
                  pad_to: str = "longest", bucket: int = 256, prepared=None):
    """A trainer for one layout; `prepared` (train examples, report) from an earlier call skips
    tokenizing the mix again (prepare_data does not depend on packing)."""
    cfg = FtdistConfig(
        model=ModelConfig(tiny=MODEL, attn_implementation=attn),
        data=DataConfig(path=data_path, max_seq_len=max_seq_len, packing=packing, val_fraction=0.0),
        train=TrainConfig(lr=1e-4, micro_batch_size=micro, warmup_steps=0, progress_bar=False),
        output_dir=str(run_dir),
    )
    cfg.data.fields.input = "input"
    strategy = Strategy(cfg.strategy)
    loaded = load_model(cfg.model, strategy.device)
    if prepared is None:
        train, _, report = prepare_data(cfg.data, loaded.tokenizer, cfg.seed)
    else:
        train, report = prepared
    trainer = BenchTrainer(cfg, strategy, loaded.model, loaded.tokenizer, train, [], run_dir)
    trainer.pad_to, trainer.bucket = pad_to, bucket
    return trainer, report


def relax_recompile_limit(limit: int = 64) -> None:
    """Let flex_attention's compiled kernel see every warm-up shape without falling back to eager
    (dynamo's default allows 8 recompiles of one function)."""
    import torch._dynamo

    for name in ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit", "accumulated_cache_size_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, max(getattr(torch._dynamo.config, name), limit))


def dynamo_graphs() -> int:
    """Graphs torch.compile built in this process (flex_attention and its masks; 0 under sdpa)."""
    try:
        from torch._dynamo.utils import counters

        return int(counters["stats"]["unique_graphs"])
    except Exception:  # noqa: BLE001 - a diagnostic only
        return -1


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=12, help="timed steps per layout")
    parser.add_argument("--block", type=int, default=3, help="steps per alternation block")
    parser.add_argument("--max-seq-len", type=int, default=2048)
    parser.add_argument("--padded-micro", type=int, default=8, help="examples per padded micro-batch")
    parser.add_argument("--packed-micro", type=int, default=2, help="rows per packed micro-batch")
    parser.add_argument("--attn", default="sdpa", help="attention backend (flex_attention on GPU)")
    parser.add_argument("--pad-to", default="auto", choices=["auto", "longest", "bucket", "max"],
                        help="batch width of both layouts (auto: bucket on CUDA, longest on CPU)")
    parser.add_argument("--bucket", type=int, default=256, help="width multiple for --pad-to bucket")
    parser.add_argument("--warmup", default="auto", choices=["auto", "step", "shapes"],
                        help="untimed warm-up: one step per layout, or every distinct batch shape of the timed "
                        "steps (auto: shapes on CUDA, step on CPU)")
    args = parser.parse_args()
    if not DATASETS.exists():
        sys.exit(f"{DATASETS} is absent: the benchmark reads ../shared/datasets (or set FTDIST_DATASETS)")
    cuda = torch.cuda.is_available()
    pad_to = args.pad_to if args.pad_to != "auto" else ("bucket" if cuda else "longest")
    warmup = args.warmup if args.warmup != "auto" else ("shapes" if cuda else "step")
    relax_recompile_limit()
    torch.manual_seed(0)
    t_setup = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "mix.jsonl"
        data.write_text("\n".join(json.dumps(r) for r in instruction_mix()) + "\n")
        common = (args.max_seq_len, str(data), Path(tmp), args.attn, pad_to, args.bucket)
        padded, report = build_trainer(False, args.padded_micro, *common)
        packed, _ = build_trainer(True, args.packed_micro, *common, prepared=(padded.train_examples, report))
        lengths = [len(e.input_ids) for e in packed.train_examples]
        rows = pack_documents(lengths, args.max_seq_len, seed=0)
        row_fill = sum(lengths) / (len(rows) * args.max_seq_len)
        setup_s = time.perf_counter() - t_setup

        layouts = (("padded", padded), ("packed", packed))
        blocks = -(-args.steps // args.block)
        timed_steps = blocks * args.block
        t_warm = time.perf_counter()
        warmup_steps = {}
        shapes = {}
        for name, trainer in layouts:
            if warmup == "step":  # one untimed step; the timed steps follow it
                trainer.train_step()
                warmup_steps[name] = 1
            seen = {}
            for step in range(trainer.step, trainer.step + timed_steps):
                for batch in trainer.step_batches(step):
                    seen.setdefault(tuple(batch.input_ids.shape), batch)
            shapes[name] = sorted(seen)
            if warmup == "shapes":
                trainer.warm_up([b.to(trainer.device) for b in seen.values()])
                warmup_steps[name] = len(seen)
        sync()
        warmup_s = time.perf_counter() - t_warm

        totals = {"padded": [0.0, 0.0, 0.0, 0.0], "packed": [0.0, 0.0, 0.0, 0.0]}
        step_s = {"padded": [], "packed": []}  # every timed step, in order: shows any slow outlier
        done = 0
        while done < args.steps:  # A A A B B B A A A ...: both see the same machine load
            for name, trainer in layouts:
                for _ in range(args.block):
                    sync()
                    t0 = time.perf_counter()
                    record = trainer.train_step()
                    sync()
                    dt = time.perf_counter() - t0
                    acc = totals[name]
                    acc[0] += record["tokens"]
                    acc[1] += dt
                    acc[2] += record["tokens"] / record["packing_efficiency"]  # slots
                    acc[3] += record["documents"]
                    step_s[name].append(round(dt, 4))
            done += args.block
    result = {
        "benchmark": "packing",
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "torch": torch.__version__,
        "attn_implementation": args.attn,
        "bf16_autocast": packed.bf16,
        "model_params_m": round(sum(p.numel() for p in packed.model.parameters()) / 1e6, 1),
        "max_seq_len": args.max_seq_len,
        "documents": len(lengths),
        "mean_document_tokens": round(sum(lengths) / len(lengths), 1),
        "truncated": report.truncated,
        "packing_efficiency": round(row_fill, 4),
        "timed_steps_each": done,
        "pad_to": pad_to,
        "bucket": args.bucket if pad_to == "bucket" else None,
        "padded_micro": args.padded_micro,
        "packed_micro": args.packed_micro,
        "warmup": warmup,
        "warmup_steps": warmup_steps,
        "distinct_shapes": {name: ["x".join(map(str, s)) for s in v] for name, v in shapes.items()},
        "setup_s": round(setup_s, 1),
        "warmup_s": round(warmup_s, 1),
        "dynamo_unique_graphs": dynamo_graphs(),
        "peak_mem_gb": round(torch.cuda.max_memory_allocated() / 1e9, 2) if cuda else None,
    }
    for name, (tokens, seconds, slots, docs) in totals.items():
        result[f"{name}_tokens_per_s"] = round(tokens / seconds, 1)
        result[f"{name}_slot_efficiency"] = round(tokens / slots, 4)
        result[f"{name}_documents_per_s"] = round(docs / seconds, 2)
    result["throughput_ratio_packed_over_padded"] = round(
        result["packed_tokens_per_s"] / result["padded_tokens_per_s"], 3
    )
    result["step_s"] = step_s
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
