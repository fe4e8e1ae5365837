"""Running ftdist the way users do (subprocess, torchrun) and reading what it wrote."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# Small and fast: a few hundred synthetic rows, no generation, no progress bar.
FAST = [
    "+experiment=tiny_cpu",
    "data.num_synthetic_rows=300",
    "eval.exact_match_samples=0",
    "train.eval_every_steps=null",
    "train.progress_bar=false",
    "train.warmup_steps=2",
]


def free_port() -> int:
    """A TCP port free on this machine now (for rendezvous and daemons started by tests)."""
    import socket

    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def run_env() -> dict:
    # One thread per process: two ranks on two cores, and results that do not depend on load.
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def train_cmd(nproc: int | None, overrides: list[str]) -> list[str]:
    if nproc is None:
        return [sys.executable, "-m", "ftdist.train", *overrides]
    return [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
        "-m", "ftdist.train", *overrides,
    ]


def run_train(overrides: list[str], nproc: int | None = None, check: bool = True, timeout: int = 600):
    proc = subprocess.run(
        train_cmd(nproc, overrides), cwd=REPO, env=run_env(), capture_output=True, text=True, timeout=timeout
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"training failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return proc


def read_metrics(run_dir: Path) -> tuple[list[dict], list[dict]]:
    lines = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return [r for r in lines if "loss" in r], [r for r in lines if "eval_loss" in r]


def random_examples(n: int, seed: int = 0, lo: int = 3, hi: int = 40) -> list:
    import torch

    from ftdist.data.prepare import Example

    g = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        length = rng.randint(lo, hi)
        ids = torch.randint(10, 800, (length,), generator=g).tolist()
        prompt = rng.randint(1, length - 1)
        out.append(Example(ids, [-100] * prompt + ids[prompt:]))
    return out


def assert_same_final_weights(expected_run: Path, actual_run: Path, rtol: float = 1e-4, atol: float = 1e-5) -> None:
    """Two runs' final/model.safetensors hold the same tensors (names, dtypes, values)."""
    import torch
    from safetensors.torch import load_file

    a = load_file(Path(expected_run) / "final" / "model.safetensors")
    b = load_file(Path(actual_run) / "final" / "model.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        assert b[name].dtype == a[name].dtype, name
        torch.testing.assert_close(b[name], a[name], rtol=rtol, atol=atol, msg=name)
