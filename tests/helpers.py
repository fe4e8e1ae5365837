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
    "eval.generation.samples=0",
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
        train_cmd(nproc, overrides), check=False, cwd=REPO, env=run_env(), capture_output=True, text=True, timeout=timeout
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"training failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return proc


def concurrently(*calls):
    """Call each of `calls` (functions of no arguments, each waiting on its own subprocesses) at
    the same time and return their results in order; an exception from one is raised once all are
    done. For independent single-process runs: each uses one core (OMP_NUM_THREADS=1, see
    run_env), so two at a time use both cores of a 2-core machine, and what they compute does not
    depend on load. A one-process run beside a 2-rank run helps too: the 2-rank run leaves part
    of the second core idle (launcher, start-up, waits in collectives). Not for two 2-rank runs."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=len(calls)) as pool:
        futures = [pool.submit(call) for call in calls]
        return [future.result() for future in futures]


_SHARED_RUNS: dict[tuple, Path] = {}


def shared_run(tmp_path_factory, overrides: list[str], nproc: int | None = None) -> Path:
    """The run directory of `overrides` (without output_dir), trained once per test session:
    a later call, from any module, whose overrides compose to the same config gets the same
    directory (training is deterministic on CPU). Callers only read it."""
    from omegaconf import OmegaConf

    from ftdist.config import compose

    key = (nproc, OmegaConf.to_yaml(compose([*overrides, "output_dir=shared"])))
    if key not in _SHARED_RUNS:
        out = tmp_path_factory.mktemp("shared_run") / "run"
        run_train([*overrides, f"output_dir={out}"], nproc=nproc)
        _SHARED_RUNS[key] = out
    return _SHARED_RUNS[key]


LORA_GENERATION_STEPS = 30


def lora_generation_run(tmp_path_factory) -> Path:
    """A directory holding train.jsonl, val.jsonl (6 rows) and run/: a LoRA run of
    LORA_GENERATION_STEPS steps, checkpointed at its end, that generated for every validation row
    at its start and end (24 new tokens, batches of 4). Trained once per test session; callers
    only read run/ (ftdist.generate and ftdist.eval tests share it)."""
    from ftdist.data.synthetic import generate_rows

    root = tmp_path_factory.getbasetemp() / "lora_generation"
    if not (root / "run" / "summary.json").is_file():
        root.mkdir(exist_ok=True)
        write_jsonl(root / "train.jsonl", generate_rows("json_extraction", 300, seed=0))
        write_jsonl(root / "val.jsonl", generate_rows("json_extraction", 6, seed=1))
        run_train([*FAST, "peft=lora", f"train.max_steps={LORA_GENERATION_STEPS}", f"data.path={root / 'train.jsonl'}",
                   f"data.validation_path={root / 'val.jsonl'}", "eval.generation.samples=6",
                   "eval.generation.max_new_tokens=24", "eval.generation.batch_size=4",
                   f"checkpoint.every_steps={LORA_GENERATION_STEPS}", f"output_dir={root / 'run'}"])
    return root


def train_beside(train, two_rank: list[str], one_process: list[str]) -> None:
    """train(name) for every name, each one-process run beside a 2-rank run (a 2-rank run leaves
    part of the second core idle: start-up, the launcher, collectives); the rest one at a time."""
    for i, name in enumerate(two_rank):
        if i < len(one_process):
            concurrently(lambda a=name: train(a), lambda b=one_process[i]: train(b))
        else:
            train(name)
    for name in one_process[len(two_rank):]:
        train(name)


def step_gradients(trainer, batches) -> tuple[dict, float]:
    """(gradient of every parameter that has one, loss) of one accumulated step over `batches`."""
    trainer.model.zero_grad(set_to_none=True)
    totals = trainer.forward_backward(batches)
    grads = {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}
    return grads, totals["loss_sum"] / totals["count"]


def packed_padded_accumulated(trainer, examples: list) -> list[tuple[dict, float]]:
    """step_gradients of one global batch three ways: its packed rows (trainer("packed", True)),
    its examples as one padded micro-batch, and as three accumulated ones (trainer(name, False)).
    A packed step must hold several examples, some sharing a row."""
    packed = trainer("packed", True)
    items = packed.sampler.global_indices(0)
    step = [i for item in items for i in packed.train_items[item]]
    assert len(step) > 4 and any(len(packed.train_items[item]) > 1 for item in items)
    padded, accumulated = trainer("padded", False), trainer("accumulated", False)
    return [
        step_gradients(packed, packed.step_batches(0)),
        step_gradients(padded, [padded.collate_items(examples, [[i] for i in step])]),
        step_gradients(accumulated, [accumulated.collate_items(examples, [[i] for i in step[k::3]]) for k in range(3)]),
    ]


def write_jsonl(path: Path, rows: list) -> str:
    """Rows are dicts (written as JSON) or raw strings (written as they are); returns the path."""
    Path(path).write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


def random_pairs(n: int, seed: int = 0, margins: bool = False) -> list:
    """Preference pairs with a shared prompt and responses of different lengths (random token
    ids); with margins, pair i carries margin (i % 3) / 2."""
    import torch

    from ftdist.constants import IGNORE_INDEX
    from ftdist.data.example import Example
    from ftdist.data.preference import Pair

    g = torch.Generator().manual_seed(seed)
    pairs = []
    for i in range(n):
        prompt = torch.randint(10, 800, (3 + i % 5,), generator=g).tolist()
        sequences = []
        for length in (2 + (i * 3) % 7, 4 + (i * 5) % 6):
            response = torch.randint(10, 800, (length,), generator=g).tolist()
            sequences.append(Example(prompt + response, [IGNORE_INDEX] * len(prompt) + response, list(prompt)))
        pairs.append(Pair(*sequences, margin=(i % 3) * 0.5 if margins else None))
    return pairs


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


# --- torchrun workers (tests/dist/*_worker.py, tests/gpu/*_worker.py) -----------------------------


def worker_config(out_dir: Path, overrides: list[str]):
    """The typed config a worker's run uses, composed as ftdist.train composes it."""
    from ftdist.config import compose, load_config

    return load_config(compose([*overrides, f"output_dir={out_dir}"]))


class WorkerRun:
    """ftdist.train's set-up inside a torchrun worker: strategy, seed, data; the strategy is shut
    down on leaving. `load()` loads the model as ftdist.train does."""

    def __init__(self, cfg):
        self.cfg = cfg

    def __enter__(self):
        from ftdist.data.prepare import prepare_data
        from ftdist.model.loading import load_tokenizer
        from ftdist.parallel import build_strategy
        from ftdist.trainer import seed_everything

        cfg = self.cfg
        self.strategy = build_strategy(cfg.strategy)
        try:
            seed_everything(cfg.seed)
            self.train, self.val, _ = prepare_data(cfg.data, load_tokenizer(cfg.model), cfg.seed)
        except BaseException:
            self.strategy.shutdown()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.strategy.shutdown()

    def load(self):
        from ftdist.model.loading import load_model
        from ftdist.trainer import use_bf16

        cfg, strategy = self.cfg, self.strategy
        with strategy.loading_context(bf16=use_bf16(cfg, strategy.device)):
            return load_model(cfg.model, strategy.device, cfg.peft, strategy)

    def trainer(self, loaded, out_dir: Path):
        from ftdist.trainer import Trainer

        return Trainer(self.cfg, self.strategy, loaded.model, loaded.tokenizer, self.train, self.val, out_dir)


def worker_main(main) -> None:
    """`python WORKER.py OUT_DIR override ...` under torchrun: main(OUT_DIR, overrides)."""
    out = Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    main(out, sys.argv[2:])
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # Skip interpreter teardown, as ftdist.train does: torch's C++ objects destroyed in
        # arbitrary order at exit sometimes aborted a finished rank ("terminate called without an
        # active exception", SIGABRT; seen in CI for plan_model_state_worker.py).
        from ftdist.train import exit_now

        exit_now(0)


def in_process_trainer(tmp_path, model, tokenizer, examples, packing: bool, micro: int, attn: str = "sdpa"):
    """A single-process Trainer over `examples` (its first 5 as validation), built in this process
    for step-level comparisons (packed against padded, with and without sliding windows)."""
    from ftdist.config import DataConfig, FtdistConfig, ModelConfig, TinyModelSpec, TrainConfig
    from ftdist.parallel.base import Strategy
    from ftdist.trainer import Trainer

    cfg = FtdistConfig(
        model=ModelConfig(tiny=TinyModelSpec(), attn_implementation=attn),
        data=DataConfig(path="unused", max_seq_len=128, packing=packing),
        train=TrainConfig(micro_batch_size=micro, grad_accum_steps=1),
        output_dir=str(tmp_path),
    )
    return Trainer(cfg, Strategy(cfg.strategy), model, tokenizer, examples, examples[:5], tmp_path)


def token_ids(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def segments(tok, parts: list[tuple[str, bool]]) -> tuple[list[int], list[int]]:
    """Expected (input_ids, labels) from (text, labelled) pieces, each tokenized apart: where a
    special token or a tag delimits every piece boundary, that equals tokenizing the whole."""
    from ftdist.constants import IGNORE_INDEX

    input_ids, labels = [], []
    for text, labelled in parts:
        piece = token_ids(tok, text)
        input_ids += piece
        labels += piece if labelled else [IGNORE_INDEX] * len(piece)
    return input_ids, labels
