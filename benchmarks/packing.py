"""Packing benchmark: efficiency on a real variable-length instruction mix, and real-token
throughput packed vs padded, measured side by side (alternating blocks of steps) in one run.

    python benchmarks/packing.py [--steps 12] [--max-seq-len 2048] [--json-only]

The mix: GSM8K train, the self-instruct seed tasks, the user-oriented instructions and
text-davinci-003's answers to them (../shared/datasets). Prints one JSON object.
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
from ftdist.data.packing import pack_documents
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


def build_trainer(packing: bool, micro: int, max_seq_len: int, data_path: str, run_dir: Path, attn: str):
    cfg = FtdistConfig(
        model=ModelConfig(tiny=MODEL, attn_implementation=attn),
        data=DataConfig(path=data_path, max_seq_len=max_seq_len, packing=packing, val_fraction=0.0),
        train=TrainConfig(lr=1e-4, micro_batch_size=micro, warmup_steps=0, progress_bar=False),
        output_dir=str(run_dir),
    )
    cfg.data.fields.input = "input"
    strategy = Strategy(cfg.strategy)
    loaded = load_model(cfg.model, strategy.device)
    train, _, report = prepare_data(cfg.data, loaded.tokenizer, cfg.seed)
    return Trainer(cfg, strategy, loaded.model, loaded.tokenizer, train, [], run_dir), report


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=12, help="timed steps per layout")
    parser.add_argument("--block", type=int, default=3, help="steps per alternation block")
    parser.add_argument("--max-seq-len", type=int, default=2048)
    parser.add_argument("--padded-micro", type=int, default=8, help="examples per padded micro-batch")
    parser.add_argument("--packed-micro", type=int, default=2, help="rows per packed micro-batch")
    parser.add_argument("--attn", default="sdpa", help="attention backend (flex_attention on GPU)")
    args = parser.parse_args()
    if not DATASETS.exists():
        sys.exit(f"{DATASETS} is absent: the benchmark reads ../shared/datasets")
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "mix.jsonl"
        data.write_text("\n".join(json.dumps(r) for r in instruction_mix()) + "\n")
        padded, report = build_trainer(False, args.padded_micro, args.max_seq_len, str(data), Path(tmp), args.attn)
        packed, _ = build_trainer(True, args.packed_micro, args.max_seq_len, str(data), Path(tmp), args.attn)
        lengths = [len(e.input_ids) for e in packed.train_examples]
        rows = pack_documents(lengths, args.max_seq_len, seed=0)
        row_fill = sum(lengths) / (len(rows) * args.max_seq_len)

        totals = {"padded": [0.0, 0.0, 0.0, 0.0], "packed": [0.0, 0.0, 0.0, 0.0]}
        for trainer in (padded, packed):  # warm-up step each, untimed
            trainer.train_step()
        done = 0
        while done < args.steps:  # A A A B B B A A A ...: both see the same machine load
            for name, trainer in (("padded", padded), ("packed", packed)):
                for _ in range(args.block):
                    t0 = time.perf_counter()
                    record = trainer.train_step()
                    dt = time.perf_counter() - t0
                    acc = totals[name]
                    acc[0] += record["tokens"]
                    acc[1] += dt
                    acc[2] += record["tokens"] / record["packing_efficiency"]  # slots
                    acc[3] += record["documents"]
            done += args.block
    result = {
        "benchmark": "packing",
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "attn_implementation": args.attn,
        "model_params_m": round(sum(p.numel() for p in packed.model.parameters()) / 1e6, 1),
        "max_seq_len": args.max_seq_len,
        "documents": len(lengths),
        "mean_document_tokens": round(sum(lengths) / len(lengths), 1),
        "truncated": report.truncated,
        "packing_efficiency": round(row_fill, 4),
        "timed_steps_each": done,
    }
    for name, (tokens, seconds, slots, docs) in totals.items():
        result[f"{name}_tokens_per_s"] = round(tokens / seconds, 1)
        result[f"{name}_slot_efficiency"] = round(tokens / slots, 4)
        result[f"{name}_documents_per_s"] = round(docs / seconds, 2)
    result["throughput_ratio_packed_over_padded"] = round(
        result["packed_tokens_per_s"] / result["padded_tokens_per_s"], 3
    )
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
