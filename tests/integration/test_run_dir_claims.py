"""README claims about one run's directory, checked against independent computations.

One single-process run (module fixture, ~25 s) sized by epochs rather than max_steps, with a
checkpoint after every step and checkpoint.keep=2: 285 training examples in global batches of
57, so train.epochs=1.5 is 7.5 steps of data, i.e. 8 steps, and steps 1-5 are exactly the
first epoch (every example once). Its metrics.jsonl, summary.json and checkpoints are then
compared with what the data and the config say they must be. Then the run is resumed in ways
that must be refused, and what it left must survive the refusal.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import FAST, REPO, read_metrics, run_env, run_train, worker_config
from omegaconf import OmegaConf

from ftdist.checkpoint import resolve_resume

TRAIN_EXAMPLES = 285  # 300 synthetic rows, 5% held out
MICRO = 57
EPOCHS = 1.5
STEPS = 8  # ceil(1.5 * 285 / 57) = ceil(7.5)
RUN = [
    *FAST, "train.max_steps=null", f"train.epochs={EPOCHS}", f"train.micro_batch_size={MICRO}",
    "checkpoint.every_steps=1", "checkpoint.keep=2",
]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("claims") / "run"
    run_train([*RUN, f"output_dir={out}"])
    return out


@pytest.fixture(scope="module")
def data(run_dir):
    """The run's train and validation examples, prepared again from its config."""
    from ftdist.data.prepare import prepare_data
    from ftdist.model.loading import load_tokenizer

    cfg = worker_config(run_dir, RUN)
    train, val, _ = prepare_data(cfg.data, load_tokenizer(cfg.model), cfg.seed)
    assert len(train) == TRAIN_EXAMPLES
    return train, val


def label_tokens(examples) -> int:
    """Tokens that carry a loss: labels shifted by one, as next-token prediction uses them."""
    return sum(sum(1 for x in e.labels[1:] if x != -100) for e in examples)


def test_keep_leaves_only_the_newest_checkpoints(run_dir):
    names = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert names == [f"step_{STEPS - 1:08d}", f"step_{STEPS:08d}"]
    assert resolve_resume("auto", run_dir) == run_dir / "checkpoints" / f"step_{STEPS:08d}"


def test_epochs_set_the_number_of_steps(run_dir):
    train, _ = read_metrics(run_dir)
    assert STEPS == math.ceil(EPOCHS * TRAIN_EXAMPLES / MICRO)
    assert [r["step"] for r in train] == list(range(1, STEPS + 1))
    assert json.loads((run_dir / "summary.json").read_text())["steps"] == STEPS


def test_epoch_and_total_tokens_fields(run_dir, data):
    train_lines, _ = read_metrics(run_dir)
    examples, _ = data
    assert len(train_lines) == STEPS
    running = 0
    for line in train_lines:
        assert line["epoch"] == pytest.approx(line["step"] * MICRO / TRAIN_EXAMPLES, abs=1e-12)
        running += line["tokens"]
        assert line["total_tokens"] == running
    # Steps 1-5 are the first epoch: every training example exactly once.
    first_epoch = train_lines[: TRAIN_EXAMPLES // MICRO]
    assert first_epoch[-1]["epoch"] == 1.0
    assert sum(r["tokens"] for r in first_epoch) == sum(len(e.input_ids) for e in examples)
    assert sum(r["label_tokens"] for r in first_epoch) == label_tokens(examples)


def test_every_lines_lr_is_lr_times_the_schedule_at_its_step(run_dir):
    t = OmegaConf.load(run_dir / "config.yaml").train
    assert (t.schedule, t.warmup_steps) == ("cosine", 2)
    train, _ = read_metrics(run_dir)
    expected = []
    for s in range(STEPS):  # step s + 1 trains with the lr of schedule index s
        if s < t.warmup_steps:
            expected.append(t.lr * (s + 1) / t.warmup_steps)
        else:
            progress = (s - t.warmup_steps) / (STEPS - t.warmup_steps)
            expected.append(t.lr * (t.min_lr_ratio + (1 - t.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))))
    assert len(train) == len(expected)
    for line, lr in zip(train, expected, strict=True):
        assert line["lr"] == pytest.approx(lr, rel=1e-12), line["step"]


def test_eval_label_tokens_count_the_validation_sets_label_tokens(run_dir, data):
    _, evals = read_metrics(run_dir)
    _, val = data
    assert [r["step"] for r in evals] == [0, STEPS]  # at the start and the end
    assert all(r["eval_label_tokens"] == label_tokens(val) for r in evals)


def test_summary_agrees_with_the_last_metrics_lines(run_dir):
    summary = json.loads((run_dir / "summary.json").read_text())
    train, evals = read_metrics(run_dir)
    assert summary["final_loss"] == train[-1]["loss"]
    assert summary["final_eval_loss"] == evals[-1]["eval_loss"]
    assert summary["total_tokens"] == train[-1]["total_tokens"] == sum(r["tokens"] for r in train)


def test_checkpoint_records_a_fingerprint_of_the_training_data(run_dir, data):
    examples, _ = data
    state = torch.load(run_dir / "checkpoints" / f"step_{STEPS:08d}" / "trainer.pt", weights_only=False)
    # Independently: unpacked, item i is example i alone (packing off).
    h = hashlib.sha256()
    for e in examples:
        h.update(len(e.input_ids).to_bytes(8, "little", signed=True))
        h.update(b"".join(x.to_bytes(8, "little", signed=True) for x in e.input_ids))
        h.update(b"".join(x.to_bytes(8, "little", signed=True) for x in e.labels))
    for i in range(len(examples)):
        h.update((1).to_bytes(8, "little", signed=True) + i.to_bytes(8, "little", signed=True))
    assert state["train_data_sha256"] == h.hexdigest()


# --- refused resumes --------------------------------------------------------------------------------


def snapshot(run_dir: Path) -> dict[str, bytes]:
    return {str(p.relative_to(run_dir)): p.read_bytes() for p in sorted(run_dir.rglob("*")) if p.is_file()}


KEPT = ("checkpoints/", "metrics.jsonl", "summary.json", "final/")


@pytest.fixture(scope="module")
def refused(run_dir, tmp_path_factory):
    """A copy of the run, resumed with another global batch, then with other data of the same
    size (loss on the prompt too: same examples, other labels). Both must exit 2. The run is
    finished, so resume=auto would leave it alone: each names its last checkpoint."""
    target = tmp_path_factory.mktemp("refused") / "run"
    shutil.copytree(run_dir, target)
    before = snapshot(target)
    last = f"resume={target}/checkpoints/step_{STEPS:08d}"
    overrides = {
        "batch": [*RUN, "train.micro_batch_size=19", f"output_dir={target}", last],
        "data": [*RUN, "data.train_on_prompt=true", f"output_dir={target}", last],
    }
    procs = {name: run_train(o, check=False) for name, o in overrides.items()}
    return target, before, procs


def test_refused_resume_with_another_global_batch_keeps_the_run_and_its_checkpoints(refused):
    target, before, procs = refused
    proc = procs["batch"]
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "global_batch_size=57" in proc.stderr and "this run has 19" in proc.stderr
    after = snapshot(target)
    kept = {k: v for k, v in before.items() if k.startswith(KEPT)}
    assert any(k.startswith("checkpoints/") for k in kept) and any(k.startswith("final/") for k in kept)
    assert {k: after.get(k) for k in kept} == kept  # every file there, byte for byte
    assert resolve_resume("auto", target).name == f"step_{STEPS:08d}"


def test_refused_resume_with_other_data_of_the_same_size_names_what_differs(refused):
    target, before, procs = refused
    proc = procs["data"]
    assert proc.returncode == 2, proc.stderr[-3000:]
    message = proc.stderr.strip().splitlines()[-1]
    assert "ConfigError" in message and "other training data" in message, message
    assert f"same number of items ({TRAIN_EXAMPLES})" in message and "sha256" in message, message
    after = snapshot(target)
    assert all(after.get(k) == v for k, v in before.items() if k.startswith(KEPT))


def test_refused_resume_keeps_the_runs_config_and_data_report(refused):
    """A resumed run's config.yaml and data_report.json replace the old ones only once its
    checkpoint is accepted: a refused one leaves them describing the run that wrote them."""
    target, before, _ = refused
    after = snapshot(target)
    assert after["config.yaml"] == before["config.yaml"]
    assert after["data_report.json"] == before["data_report.json"]


# --- PEFT checkpoints and --cfg job -------------------------------------------------------------------


def test_lora_checkpoint_holds_only_the_adapters(tmp_path):
    """peft=lora under the DCP strategies (single here; DDP and FSDP share the save code):
    the model part of the checkpoint is the LoRA weights and nothing of the frozen base."""
    from torch.distributed.checkpoint import FileSystemReader

    cfg = worker_config(tmp_path, [*FAST, "peft=lora", "train.max_steps=1"])
    from helpers import WorkerRun

    with WorkerRun(cfg) as w:
        loaded = w.load()
        trainer = w.trainer(loaded, tmp_path)
        trainer.train_step()
        path = trainer.checkpoint()
        trained = {n for n, p in w.strategy.unwrap(trainer.model).named_parameters() if p.requires_grad}
    keys = FileSystemReader(str(path / "model_optimizer")).read_metadata().state_dict_metadata.keys()
    model_keys = {k.removeprefix("model.") for k in keys if k.startswith("model.")}
    assert model_keys, sorted(keys)[:10]
    assert all("lora_A" in k or "lora_B" in k for k in model_keys), sorted(model_keys)[:10]
    assert model_keys == trained
    # The optimizer state is that of the adapters too (Adam's moments per LoRA weight).
    optim = {k for k in keys if k.startswith("optimizer.state.")}
    assert optim and all("lora_" in k for k in optim), sorted(optim)[:10]


def test_cfg_job_prints_the_config_and_writes_nothing(tmp_path):
    out = tmp_path / "never"
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    proc = subprocess.run(
        [sys.executable, "-m", "ftdist.train", "+experiment=tiny_cpu", "train.max_steps=17", f"output_dir={out}",
         "--cfg", "job"],
        check=False, cwd=cwd, env={**run_env(), "PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    printed = OmegaConf.create(proc.stdout)
    assert printed.train.max_steps == 17 and printed.experiment_name == "tiny_cpu"
    assert printed.output_dir == str(out)
    assert not out.exists()
    assert list(cwd.iterdir()) == []  # no Hydra outputs/ either
