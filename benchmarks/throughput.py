"""Throughput benchmark: tokens/s and MFU of ftdist's own training path on CPU, one process and
two ranks under DDP.

    python benchmarks/throughput.py [--steps 8] [--warmup-steps 1] [--modes single,ddp]
                                    [--hidden 512] [--layers 8] [--max-seq-len 512] [--global-rows 4]

Each mode is a real run, `python -m ftdist.train` (or `torchrun --nproc_per_node 2 -m
ftdist.train strategy=ddp`), on GSM8K train (../shared/datasets, or $FTDIST_DATASETS) packed
into rows of --max-seq-len tokens; the figures come from its metrics.jsonl. The model is a
random-init Llama (width 512, 8 layers, 8 heads, MLP 1408: 25.7M matmul parameters) with the
tiny local byte-level BPE tokenizer (922 tokens). Both modes train the same global batch:
one process with all the cores as threads, or one rank per core with one thread each.

`mfu` is what metrics.jsonl logs: 6N FLOPs per real token plus the causal attention term over
each packed document (ftdist/metrics.py), over the fp32 matmul peak each rank measures at
start-up with its own threads (under DDP the two ranks' probes share the cores, so that
per-rank peak depends on how the probes overlap). `mfu_vs_machine_peak` divides the same
achieved FLOP/s by the whole machine's peak (a matmul on all --cores threads), probed by the
benchmark before and after each run: the figure to compare across modes. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from ftdist.config import TinyModelSpec
from ftdist.metrics import measure_cpu_peak_flops
from ftdist.model.tiny import ensure_tiny_model

ROOT = Path(__file__).resolve().parents[1]
DATASETS = Path(os.environ.get("FTDIST_DATASETS", ROOT.parent / "shared" / "datasets"))
PEAK_LINE = re.compile(r"mfu: FLOPs per step over ([0-9.e+]+) FLOP/s per device")


def model_spec(args) -> TinyModelSpec:
    return TinyModelSpec(
        hidden_size=args.hidden, num_layers=args.layers, num_heads=args.hidden // 64,
        num_kv_heads=args.hidden // 64, intermediate_size=args.intermediate, max_position_embeddings=4096,
    )


def overrides(args, spec: TinyModelSpec, world: int, out: Path) -> list[str]:
    return [
        f"data.path={DATASETS / 'gsm8k' / 'train.jsonl'}",
        "data.fields.prompt=question", "data.fields.response=answer",
        f"data.max_seq_len={args.max_seq_len}", "data.packing=true", "data.val_fraction=0",
        f"model.tiny.hidden_size={spec.hidden_size}", f"model.tiny.num_layers={spec.num_layers}",
        f"model.tiny.num_heads={spec.num_heads}", f"model.tiny.num_kv_heads={spec.num_kv_heads}",
        f"model.tiny.intermediate_size={spec.intermediate_size}",
        f"train.max_steps={args.warmup_steps + args.steps}", f"train.micro_batch_size={args.global_rows // world}",
        "train.warmup_steps=0", "train.lr=3e-4", "train.mixed_precision=none", "train.progress_bar=false",
        f"output_dir={out}",
    ]


def probe_peak(threads: int) -> float:
    """The fp32 matmul peak with `threads` threads, measured now in a fresh process."""
    code = (
        f"import torch; torch.set_num_threads({threads}); from ftdist.metrics import measure_cpu_peak_flops; "
        "print(measure_cpu_peak_flops())"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    return float(out.stdout.strip().splitlines()[-1])


def run_mode(mode: str, args, spec: TinyModelSpec, tmp: Path, cores: int) -> dict:
    world = 2 if mode == "ddp" else 1
    threads = max(1, cores // world)
    out = tmp / mode
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false"}
    if mode == "ddp":
        launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "ftdist.train", "strategy=ddp"]
    else:
        launcher = [sys.executable, "-m", "ftdist.train"]
    peak_before = probe_peak(cores)
    t0 = time.perf_counter()
    proc = subprocess.run(launcher + overrides(args, spec, world, out), env=env, cwd=ROOT, capture_output=True, text=True,
                          check=False)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"{mode} run failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    peak_after = probe_peak(cores)
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in lines if "loss" in r and r["step"] > args.warmup_steps]
    seconds = [r["tokens"] / r["tokens_per_s"] for r in steps]
    tokens = sum(r["tokens"] for r in steps)
    trainer_peak = float(PEAK_LINE.search((out / "train.log").read_text()).group(1))
    # Step FLOPs = mfu x dt x world x peak, so the step-time-weighted MFU is the run's MFU.
    run_mfu = sum(r["mfu"] * s for r, s in zip(steps, seconds)) / sum(seconds)
    achieved = run_mfu * trainer_peak * world
    machine_peak = (peak_before + peak_after) / 2
    return {
        "world_size": world,
        "threads_per_rank": threads,
        "timed_steps": len(steps),
        "tokens_per_step": round(tokens / len(steps)),
        "step_s": [round(s, 2) for s in seconds],
        "tokens_per_s": round(tokens / sum(seconds), 1),
        "mfu": round(run_mfu, 4),
        "trainer_peak_gflops_per_rank": round(trainer_peak / 1e9, 1),
        "achieved_gflops_total": round(achieved / 1e9, 1),
        "machine_peak_gflops_before_after": [round(peak_before / 1e9, 1), round(peak_after / 1e9, 1)],
        "mfu_vs_machine_peak": round(achieved / machine_peak, 4),
        "final_loss": round(steps[-1]["loss"], 4),
        "run_wall_s": round(wall, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=8, help="timed optimizer steps per mode")
    parser.add_argument("--warmup-steps", type=int, default=1, help="untimed steps first")
    parser.add_argument("--modes", default="single,ddp")
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--intermediate", type=int, default=1408)
    parser.add_argument("--max-seq-len", type=int, default=512)
    parser.add_argument("--global-rows", type=int, default=4, help="packed rows per optimizer step, all ranks")
    parser.add_argument("--cores", type=int, default=os.cpu_count())
    args = parser.parse_args()
    if not (DATASETS / "gsm8k" / "train.jsonl").exists():
        sys.exit(f"{DATASETS}/gsm8k is absent: the benchmark reads ../shared/datasets (or set FTDIST_DATASETS)")
    spec = model_spec(args)
    ensure_tiny_model(spec)  # built once here, not by two racing ranks inside the timed runs
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for mode in args.modes.split(","):
            results[mode] = run_mode(mode, args, spec, Path(tmp), args.cores)
    layer = 4 * spec.hidden_size**2 + 3 * spec.hidden_size * spec.intermediate_size
    print(json.dumps({
        "benchmark": "throughput",
        "device": "cpu",
        "cores": args.cores,
        "torch": torch.__version__,
        "model": {"hidden": spec.hidden_size, "layers": spec.num_layers, "heads": spec.num_heads,
                  "intermediate": spec.intermediate_size, "matmul_params_m_excl_head": round(spec.num_layers * layer / 1e6, 1)},
        "data": "gsm8k train, packed",
        "max_seq_len": args.max_seq_len,
        "global_rows": args.global_rows,
        "this_process_peak_gflops": round(measure_cpu_peak_flops() / 1e9, 1),
        **results,
    }, indent=1))


if __name__ == "__main__":
    main()
