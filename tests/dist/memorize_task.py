"""A task the tiny model learns in 60 steps, and its runs, shared by test_exact_match and
test_strategy_variants: each run is launched once per pytest session (a launch of 2 ranks costs
far more than its 60 steps).

The task: six "Where does NAME live?" -> city pairs, repeated. The validation file holds those six
and two questions never trained on, so a trained model scores neither 0 nor 1 on exact match.

Run as a script (`python memorize_task.py overrides...`, under torchrun for 2 ranks), this file
trains through ftdist's CLI with probes, and each rank writes probes.rank{r}.json at the end:
the training forwards of the first decoder block's MLP, whether that block's parameters are
sharded again when the second block starts, and what DeepSpeed's ZeRO-3 optimizer offloads.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from helpers import FAST, REPO, run_env

SEEN = [
    ("Where does Ana live?", "Lisbon"),
    ("Where does Ben Meyer live?", "Berlin"),
    ("Where does Chloe Dubois Costa live?", "Paris"),
    ("Where does David live?", "Rome"),
    ("Where does Elena Novak live?", "Prague"),
    ("Where does Farid Haddad Berg live?", "Cairo"),
]
UNSEEN = [("Where does Grace Kim live?", "Seoul"), ("Where does Hugo live?", "Oslo")]
# Unseen at 1 and 4; the 8th row lies past eval.generation.samples and must not be evaluated. Names
# of 1-3 words: every chunk of generation (3 prompts, however split over ranks) is left-padded.
VALIDATION = [SEEN[0], UNSEEN[0], SEEN[1], SEEN[2], UNSEEN[1], SEEN[3], SEEN[4], SEEN[5]]
SAMPLES, MAX_NEW_TOKENS, STEPS = 7, 8, 60
# Two ranks split 7 prompts 4 + 3; in chunks of 3, rank 1 runs a filler chunk under sharding.
EVAL = [f"eval.generation.samples={SAMPLES}", f"eval.generation.max_new_tokens={MAX_NEW_TOKENS}", "eval.generation.batch_size=3"]
# Global batch 8 in every run: one process x 8, or 2 ranks x 4 (one micro-batch per step).
RUNS = {  # name: (overrides, nproc)
    "single": (["train.micro_batch_size=8"], None),
    "fsdp": (["strategy=fsdp", "train.micro_batch_size=4"], 2),
    "fsdp_checkpointing": (["strategy=fsdp", "train.micro_batch_size=4", "model.gradient_checkpointing=true"], 2),
    "fsdp_no_reshard": (["strategy=fsdp", "train.micro_batch_size=4", "strategy.reshard_after_forward=false"], 2),
    "zero3": (["strategy=zero3", "train.micro_batch_size=4"], 2),
    "zero3_offload": (["strategy=zero3_offload", "train.micro_batch_size=4"], 2),
}

_launched: dict[str, tuple[Path, list[str]]] = {}


def _write_jsonl(path: Path, pairs) -> None:
    path.write_text("".join(json.dumps({"prompt": p, "response": r}) + "\n" for p, r in pairs))


def task_run(name: str, tmp_path_factory) -> tuple[Path, list[str]]:
    """(output_dir, the run's overrides) of run `name`, launched on first request."""
    if name in _launched:
        return _launched[name]
    root = tmp_path_factory.mktemp(f"memorize_{name}")
    _write_jsonl(root / "train.jsonl", SEEN * 20)
    _write_jsonl(root / "val.jsonl", VALIDATION)
    overrides, nproc = RUNS[name]
    overrides = [
        *FAST, f"data.path={root / 'train.jsonl'}", f"data.validation_path={root / 'val.jsonl'}",
        f"train.max_steps={STEPS}", *EVAL, *overrides,
    ]
    out = root / "run"
    launcher = [sys.executable]
    if nproc is not None:
        launcher += ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    # Run as a script, this file needs the repository and tests/ (helpers) on its path.
    path = os.pathsep.join(p for p in (str(REPO), str(REPO / "tests"), os.environ.get("PYTHONPATH")) if p)
    proc = subprocess.run(
        [*launcher, __file__, *overrides, f"output_dir={out}"],
        check=False, cwd=REPO, env={**run_env(), "PYTHONPATH": path}, capture_output=True, text=True, timeout=600,
    )
    if proc.returncode != 0:
        raise AssertionError(f"{name} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    _launched[name] = (out, overrides)
    return _launched[name]


def probes(run_dir: Path, nproc: int = 2) -> list[dict]:
    return [json.loads((run_dir / f"probes.rank{r}.json").read_text()) for r in range(nproc)]


# --- inside each rank ---------------------------------------------------------------------------


def install_probes(trainer) -> dict:
    from torch.distributed.tensor import DTensor

    model = trainer.strategy.unwrap(trainer.model)
    modules = dict(model.named_modules())
    name = next(n for n in modules if n.endswith("layers.0"))
    first, second = modules[name], modules[name[: -len("0")] + "1"]
    seen = {"train_forwards_block0_mlp": 0, "block0_sharded_at_block1": []}

    def count(module, args):
        if module.training:
            seen["train_forwards_block0_mlp"] += 1

    def sharded(module, args):
        if module.training:
            seen["block0_sharded_at_block1"].append(all(isinstance(p, DTensor) for p in first.parameters()))

    # transformers checkpoints a block's forward, not its __call__, so hooks on the block itself
    # stay outside the recompute: count its MLP, which the recompute calls again.
    first.mlp.register_forward_pre_hook(count)
    second.register_forward_pre_hook(sharded)
    optimizer = getattr(trainer.model, "optimizer", None)  # DeepSpeed's ZeRO optimizer
    for flag in ("offload_optimizer", "offload_param"):
        seen[flag] = getattr(optimizer, flag, None)
    return seen


def cli_with_probes() -> None:
    """`python -m ftdist.train` as users run it, with install_probes on every rank."""
    import ftdist.train as entry
    from ftdist.trainer import Trainer

    fit = Trainer.fit

    def probed_fit(self, *args, **kwargs):
        seen = install_probes(self)
        summary = fit(self, *args, **kwargs)
        (self.run_dir / f"probes.rank{self.strategy.rank}.json").write_text(json.dumps(seen))
        return summary

    Trainer.fit = probed_fit
    entry.cli()


if __name__ == "__main__":
    cli_with_probes()
