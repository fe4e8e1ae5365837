"""Data preparation at scale: today's path against the tokenized cache, side by side in one run.

Builds a 100,000-row instruction file from ../shared/datasets/gsm8k/train.jsonl (GSM8K's 7,473
questions cycled, each copy's question marked " (variant k)" so no two rows are equal), then
runs each of these as its own process, one after another, and prints one JSON object:

- `before_cache`: the preparation code of commit e3a07f3 (before the cache), taken with
  `git archive` and run from its own directory: what every rank did before this change;
- `in_process`: today's code with data.cache=false (one process, Python lists);
- `cold_build`: data.cache=true on an empty cache directory (data.num_proc workers);
- `warm_start`: the same again, a cache hit: the time until the first training micro-batch
  is collated, counted from the start of the process (imports included) and from the call;
- `packing_1m`: the warm entry's document lengths repeated to 1,000,000 documents, packed into
  rows of data.max_seq_len (pack_documents, as a packed run does), twice (the same rows: it is
  deterministic per seed), then saved and read back as the cache keeps packed rows;
- `ddp_2_ranks`: `torchrun --nproc_per_node 2 -m ftdist.train ... train.max_steps=2` with
  data.val_fraction=0, another key than the children's, so the run builds its own entry (local
  rank 0 builds, rank 1 waits): wall time and each rank's peak RSS (summary.json); and the same
  run with the pre-cache code (`--skip-old-run` leaves it out: both ranks tokenize everything).

Each figure is the process's own: wall seconds and peak resident memory (ru_maxrss). Run it
on an idle machine; the ratios are what to compare.

    .venv/bin/python benchmarks/data_prep.py [--rows 100000] [--workdir /tmp/ftdist-data-prep]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BEFORE_CACHE = "e3a07f3"  # the last commit before the tokenized cache
MAX_SEQ_LEN = 1024
SEED = 0


def shared_datasets() -> Path:
    return Path(os.environ.get("FTDIST_DATASETS", REPO.parent / "shared" / "datasets"))


def make_rows(path: Path, n: int) -> None:
    source = [json.loads(line) for line in (shared_datasets() / "gsm8k" / "train.jsonl").read_text().splitlines()
              if line.strip()]
    with open(path, "w") as f:
        for i in range(n):
            row = source[i % len(source)]
            f.write(json.dumps({"prompt": f"{row['question']} (variant {i // len(source)})",
                                "response": row["answer"]}) + "\n")


# --- what each child process runs ------------------------------------------------------------


def child(args) -> None:
    """Prepare the data (and, with --first-batch, make the items and collate the first
    micro-batch as the trainer would); print the timings and this process's peak RSS."""
    started = time.monotonic()
    from transformers import AutoTokenizer

    import ftdist
    from ftdist.config import DataConfig, DataFields
    from ftdist.data.prepare import prepare_data

    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    settings = dict(path=args.data, format="instruction", fields=DataFields(), max_seq_len=MAX_SEQ_LEN,
                    val_fraction=0.01, max_val_examples=200)
    if args.cache is not None:  # today's code; the code before the cache has none of these keys
        settings.update(cache=args.cache == "on", cache_dir=args.cache_dir)
    imported = time.monotonic()
    train, val, report = prepare_data(DataConfig(**settings), tokenizer, SEED)
    prepared = time.monotonic()
    out = {"ftdist": str(Path(ftdist.__file__).parent), "train_examples": len(train), "val_examples": len(val),
           "train_tokens": report.train_tokens, "import_s": round(imported - started, 2),
           "prepare_s": round(prepared - imported, 2)}
    if args.first_batch:
        from ftdist.data.packing import collate_packed, packed_items

        items = packed_items(train, MAX_SEQ_LEN, SEED, 2000)
        batch = collate_packed([[train[i] for i in item] for item in items[:8]], tokenizer.pad_token_id)
        done = time.monotonic()
        out.update(items=len(items), first_batch_tokens=int(batch.attention_mask.sum()),
                   data_to_first_batch_s=round(done - imported, 2), process_to_first_batch_s=round(done - started, 2))
    out["peak_rss_gb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6, 3)  # KiB -> GB
    print(json.dumps(out))


def pack_child(args) -> None:
    """Pack a million documents with the lengths of the cached data; time it and the packed rows'
    round trip through the file the cache keeps them in."""
    import tempfile

    import numpy as np

    from ftdist.data.cache import open_entry
    from ftdist.data.packing import load_rows, pack_documents, save_rows

    entry = next(p.parent for p in Path(args.cache_dir).glob("*/meta.json"))
    lengths = np.resize(open_entry(entry)[0].lengths, 1_000_000)
    started = time.monotonic()
    rows = pack_documents(lengths, MAX_SEQ_LEN, SEED, 2000)
    packed = time.monotonic()
    again = pack_documents(lengths, MAX_SEQ_LEN, SEED, 2000)
    other = pack_documents(lengths, MAX_SEQ_LEN, SEED + 1, 2000)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "rows.npz"
        t0 = time.monotonic()
        save_rows(path, rows)
        t1 = time.monotonic()
        loaded = load_rows(path)
        t2 = time.monotonic()
    print(json.dumps({
        "documents": len(lengths), "tokens": int(lengths.sum()), "rows": len(rows),
        "row_fill": round(float(lengths.sum()) / (len(rows) * MAX_SEQ_LEN), 4),
        "pack_s": round(packed - started, 2), "same_rows_again": again == rows, "other_seed_differs": other != rows,
        "save_s": round(t1 - t0, 2), "load_s": round(t2 - t1, 2), "loaded_equal": loaded == rows,
        "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6, 3)}))


def run_child(extra: list[str], pythonpath: Path | None = None) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    if pythonpath is not None:
        env["PYTHONPATH"] = str(pythonpath)
    started = time.monotonic()
    done = subprocess.run([sys.executable, __file__, "--child", *extra], env=env, capture_output=True, text=True)
    wall = time.monotonic() - started
    if done.returncode != 0:
        raise SystemExit(f"child {extra} failed:\n{done.stderr[-3000:]}")
    out = json.loads(done.stdout.strip().splitlines()[-1])
    out["wall_s"] = round(wall, 2)
    return out


def run_training(data: Path, workdir: Path, name: str, cache_dir: Path | None, pythonpath: Path | None) -> dict:
    """A 2-rank DDP run of 2 steps; peak RSS of its largest process from the wrapper's
    RUSAGE_CHILDREN (torchrun waits for its ranks, so they count), per rank from summary.json."""
    run_dir = workdir / name
    shutil.rmtree(run_dir, ignore_errors=True)
    overrides = ["model=tiny", "data=instruction", f"data.path={data}", f"data.max_seq_len={MAX_SEQ_LEN}",
                 "data.val_fraction=0", "strategy=ddp", "train.max_steps=2", "train.micro_batch_size=4",
                 "train.eval_at_start=false", "train.save_final=false", f"output_dir={run_dir}"]
    if cache_dir is not None:
        overrides.append(f"data.cache_dir={cache_dir}")
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "ftdist.train", *overrides]
    wrapper = ("import json, resource, subprocess, sys; rc = subprocess.call(sys.argv[1:]); "
               "print(json.dumps({'rc': rc, 'max_rss_kb': resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}))")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    if pythonpath is not None:
        env["PYTHONPATH"] = str(pythonpath)
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-c", wrapper, *command], env=env, capture_output=True, text=True, cwd=workdir)
    wall = time.monotonic() - started
    result = json.loads(done.stdout.strip().splitlines()[-1])
    if result["rc"] != 0:
        raise SystemExit(f"training run {name} failed:\n{done.stderr[-3000:]}")
    out = {"wall_s": round(wall, 2), "largest_process_peak_rss_gb": round(result["max_rss_kb"] / 1e6, 3)}
    summary = json.loads((run_dir / "summary.json").read_text())
    if "host_peak_rss_gb_per_rank" in summary:
        out["host_peak_rss_gb_per_rank"] = summary["host_peak_rss_gb_per_rank"]
    log = (run_dir / "train.log").read_text() if (run_dir / "train.log").is_file() else ""
    out["data_log"] = [line.split("] ", 1)[-1] for line in log.splitlines() if "data: " in line and "cache" in line][:2]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/ftdist-data-prep"))
    parser.add_argument("--skip-old-run", action="store_true", help="leave out the 2-rank run of the pre-cache code")
    parser.add_argument("--only-packing", action="store_true",
                        help="only the packing_1m case (on the cache a full run left in --workdir)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--tokenizer", help=argparse.SUPPRESS)
    parser.add_argument("--cache", choices=["on", "off"], help=argparse.SUPPRESS)
    parser.add_argument("--cache-dir", help=argparse.SUPPRESS)
    parser.add_argument("--first-batch", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--pack", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        pack_child(args) if args.pack else child(args)
        return

    workdir = args.workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("FTDIST_CACHE", str(workdir / "ftdist-cache"))  # the tiny model lives here
    data = workdir / f"gsm8k_{args.rows}.jsonl"
    if not data.is_file():
        make_rows(data, args.rows)
    from ftdist.config import TinyModelSpec
    from ftdist.model.tiny import ensure_tiny_model

    tokenizer = ensure_tiny_model(TinyModelSpec(hidden_size=128, num_layers=4, num_heads=4, num_kv_heads=2,
                                                intermediate_size=384, max_position_embeddings=4096, vocab_size=1024))
    old = workdir / "before-cache"
    if not (old / "ftdist").is_dir():
        old.mkdir(exist_ok=True)
        archive = subprocess.run(["git", "-C", str(REPO), "archive", BEFORE_CACHE, "ftdist", "conf"], check=True,
                                 capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(old)], input=archive, check=True)
    cache_dir = workdir / "cache"
    if args.only_packing:
        print(json.dumps({"packing_1m": run_child(["--pack", "--cache-dir", str(cache_dir)])}, indent=1))
        return
    shutil.rmtree(cache_dir, ignore_errors=True)
    common = ["--data", str(data), "--tokenizer", tokenizer]
    results: dict = {"rows": args.rows, "cpus": len(os.sched_getaffinity(0)), "max_seq_len": MAX_SEQ_LEN}
    results["before_cache"] = run_child(common, pythonpath=old)
    if not results["before_cache"]["ftdist"].startswith(str(old)):
        raise SystemExit(f"the pre-cache child imported {results['before_cache']['ftdist']}, not {old}")
    results["in_process"] = run_child([*common, "--cache", "off"])
    results["cold_build"] = run_child([*common, "--cache", "on", "--cache-dir", str(cache_dir)])
    results["warm_start"] = run_child([*common, "--cache", "on", "--cache-dir", str(cache_dir), "--first-batch"])
    results["packing_1m"] = run_child(["--pack", "--cache-dir", str(cache_dir)])
    results["ddp_2_ranks"] = run_training(data, workdir, "run-cached", cache_dir, None)
    if not args.skip_old_run:
        results["ddp_2_ranks_before_cache"] = run_training(data, workdir, "run-before-cache", None, old)
    base = results["before_cache"]["prepare_s"]
    results["ratios"] = {
        "cold_build_speedup_vs_before_cache": round(base / results["cold_build"]["prepare_s"], 2),
        "in_process_speedup_vs_before_cache": round(base / results["in_process"]["prepare_s"], 2),
        "peak_rss_before_cache_over_warm_start": round(
            results["before_cache"]["peak_rss_gb"] / results["warm_start"]["peak_rss_gb"], 2),
    }
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
