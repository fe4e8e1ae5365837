"""Bad input gets one line on stderr, exit code 2 and nothing left behind; the other failures get
their own exit codes (3 non-finite, 4 preflight, 75 preempted), each asserted exactly.

Every command runs as users run it (a subprocess); most stop while composing or checking the
config, in seconds. A missing optional package is simulated by a package of that name, first on
PYTHONPATH, whose import raises ImportError (what a missing or broken install does).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import FAST, REPO, free_port, read_metrics, run_env, run_train

from ftdist.constants import EXIT_BAD_INPUT, EXIT_NONFINITE, EXIT_PREEMPTED, EXIT_PREFLIGHT


def run_module(module: str, args: list[str], env: dict | None = None, timeout: int = 300):
    return subprocess.run(
        [sys.executable, "-m", module, *args], cwd=REPO, env={**run_env(), **(env or {})},
        capture_output=True, text=True, timeout=timeout, check=False,
    )


def assert_one_line_error(proc, *expected: str, code: int = EXIT_BAD_INPUT) -> str:
    """Exit code `code`, exactly one non-empty stderr line, naming every `expected` piece."""
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == code, proc.stderr[-3000:]
    assert len(lines) == 1, proc.stderr[-3000:]
    for piece in expected:
        assert piece in lines[0], lines[0]
    return lines[0]


def fake_missing_package(root: Path, name: str) -> dict:
    """Environment in which `import name` raises ImportError, as where it is not installed."""
    package = root / "fake_packages" / name
    package.mkdir(parents=True)
    (package / "__init__.py").write_text(f'raise ImportError("No module named {name}")\n')
    return {"PYTHONPATH": str(root / "fake_packages")}


# --- unknown group options, wrong types, sweeps without -m: every command ----------------------


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("+experiment=nope", ["experiment=nope", "config group 'experiment' has no option 'nope'", "tiny_cpu"]),
        ("model=nope", ["config group 'model' has no option 'nope'", "Valid options: hf, llama3_70b, llama3_8b, tiny"]),
        ("strategy=nope", ["config group 'strategy' has no option", "ddp, fsdp, single, zero1, zero2, zero3, zero3_offload"]),
        ("train.lr=abc", ["train.lr=abc", "could not be converted to Float"]),
        ("train.lr=1e-5,2e-5", ["train.lr=1e-5,2e-5", "add -m (--multirun)"]),
    ],
)
def test_train_bad_override_is_one_line_exit_2_and_no_run_dir(tmp_path, override, expected):
    proc = run_module("ftdist.train", [override, f"output_dir={tmp_path}/run"])
    line = assert_one_line_error(proc, *expected)
    assert line.startswith("ftdist: ConfigError: ")
    assert "schema" not in line  # the typed schema stored in every group is not an option
    assert not (tmp_path / "run").exists()


def test_train_sweep_checks_every_run_before_any_starts(tmp_path):
    proc = run_module("ftdist.train", ["-m", *FAST, "train.lr=1e-4,abc", f"output_dir={tmp_path}/sweep"])
    assert_one_line_error(proc, "train.lr=abc", "could not be converted to Float")
    assert not (tmp_path / "sweep").exists()  # run 0 (train.lr=1e-4) did not start either


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["+experiment=nope"], ["config group 'experiment' has no option 'nope'"]),
        (["+experiment=tiny_cpu", "slurm.nodes=abc"], ["slurm.nodes=abc", "could not be converted to Integer"]),
        (["+experiment=tiny_cpu", "train.lr=1e-5,2e-5"], ["train.lr=1e-5,2e-5", "add -m (--multirun)"]),
        (["-m", "+experiment=tiny_cpu", "train.lr=[1"], ["cannot parse override 'train.lr=[1'"]),
    ],
)
def test_slurm_bad_override_is_one_line_exit_2(tmp_path, args, expected):
    proc = run_module("ftdist.slurm", [*args, "slurm.dry_run=true", f"output_dir={tmp_path}/run"])
    assert_one_line_error(proc, "ftdist.slurm: ConfigError: ", *expected)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("override", ["+experiment=nope", "model=nope"])
def test_plan_unknown_group_option_is_one_line_exit_2(override):
    proc = run_module("ftdist.plan", [override])
    assert_one_line_error(proc, "ftdist: ConfigError: ", "has no option 'nope'", "Valid options: ")


def test_export_missing_source_is_one_line_exit_2(tmp_path):
    proc = run_module("ftdist.export", [str(tmp_path / "nope"), "--out", str(tmp_path / "out")])
    assert_one_line_error(proc, "ftdist.export: ConfigError: ", f"{tmp_path / 'nope'}: no such run directory")
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


def test_export_takes_no_overrides_one_line_exit_2(tmp_path):
    proc = run_module("ftdist.export", [str(tmp_path), "--out", str(tmp_path / "out"), "model=nope"])
    assert_one_line_error(proc, "ftdist.export: ", "unrecognized arguments: model=nope")
    assert not (tmp_path / "out").exists()


# --- the model: config.json read before data and weights ---------------------------------------


def model_dir(root: Path, name: str, config: dict) -> Path:
    path = root / name
    path.mkdir()
    (path / "config.json").write_text(json.dumps(config))
    return path


def test_model_needing_remote_code_is_named(tmp_path):
    path = model_dir(tmp_path, "custom", {
        "model_type": "my_custom_lm",
        "auto_map": {"AutoConfig": "configuration_my.MyConfig", "AutoModelForCausalLM": "modeling_my.MyLM"},
    })
    proc = run_train([*FAST, "model=hf", f"model.name_or_path={path}", f"output_dir={tmp_path}/run"], check=False)
    assert_one_line_error(proc, f"model.name_or_path='{path}'", "my_custom_lm", "model.trust_remote_code=true")
    assert not (tmp_path / "run").exists()


def test_unknown_model_type_is_named(tmp_path):
    path = model_dir(tmp_path, "nope", {"model_type": "nope"})
    proc = run_train([*FAST, "model=hf", f"model.name_or_path={path}", f"output_dir={tmp_path}/run"], check=False)
    assert_one_line_error(proc, f"model.name_or_path='{path}'", "model_type 'nope'", "does not know")
    assert not (tmp_path / "run").exists()


def test_attention_backend_the_model_class_lacks_is_named(tmp_path):
    from transformers import BloomConfig

    path = tmp_path / "bloom"  # BloomForCausalLM has no sdpa attention in transformers
    BloomConfig(n_layer=1, hidden_size=32, n_head=2).save_pretrained(path)
    proc = run_train([*FAST, "model=hf", f"model.name_or_path={path}", "model.attn_implementation=sdpa",
                      f"output_dir={tmp_path}/run"], check=False)
    assert_one_line_error(proc, "model.attn_implementation=sdpa", "BloomForCausalLM", "it supports eager")
    assert not (tmp_path / "run").exists()


def test_flash_attention_without_flash_attn_fails_before_the_data(tmp_path):
    data = tmp_path / "bad.jsonl"  # a bad row too: the model check comes first, before any data is read
    data.write_text('{"prompt": "a"}\n')
    proc = run_train([*FAST, f"data.path={data}", "model.attn_implementation=flash_attention_2",
                      f"output_dir={tmp_path}/run"], check=False)
    assert_one_line_error(proc, "model.attn_implementation=flash_attention_2 needs the flash-attn package")
    assert not (tmp_path / "run").exists()


# --- optional packages -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("package", "overrides", "expected"),
    [
        ("bitsandbytes", ["peft=qlora"], ["peft=qlora needs bitsandbytes", "pip install 'ftdist[bnb]'"]),
        ("deepspeed", ["strategy=zero3"], ["strategy=zero* needs DeepSpeed", "pip install 'ftdist[deepspeed]'"]),
    ],
)
def test_missing_optional_package_names_the_pip_extra(tmp_path, package, overrides, expected):
    env = fake_missing_package(tmp_path, package)
    proc = run_module("ftdist.train", [*FAST, *overrides, f"output_dir={tmp_path}/run"], env=env)
    assert_one_line_error(proc, *expected, f"No module named {package}")
    assert not (tmp_path / "run").exists()


# --- W&B: set up before the data and the model -------------------------------------------------


def wandb_env() -> dict:
    return {"WANDB_MODE": "offline", "WANDB_SILENT": "true"}


def test_wandb_not_importable_fails_before_the_model_loads(tmp_path):
    env = {**wandb_env(), **fake_missing_package(tmp_path, "wandb")}
    proc = run_module("ftdist.train", [*FAST, "tracking=wandb", f"output_dir={tmp_path}/run"], env=env)
    assert_one_line_error(proc, "tracking=wandb needs the wandb package", "pip install wandb")
    assert not (tmp_path / "run").exists()


def test_wandb_init_failure_is_one_line_and_leaves_nothing(tmp_path):
    proc = run_module("ftdist.train", [*FAST, "tracking=wandb", "tracking.project=myteam/finetune",
                                       f"output_dir={tmp_path}/run"], env=wandb_env())
    assert_one_line_error(proc, "tracking=wandb: wandb.init failed", "tracking.project='myteam/finetune'",
                          "Invalid project name")
    assert not (tmp_path / "run").exists()


# --- metrics.jsonl cut mid-line by a killed run ------------------------------------------------


def test_resume_drops_a_half_written_metrics_line(tmp_path):
    out = tmp_path / "run"
    common = [*FAST, "train.max_steps=4", "checkpoint.every_steps=2", f"output_dir={out}"]
    run_train([*common, "train.stop_after_steps=2"])
    metrics = out / "metrics.jsonl"
    complete = len(metrics.read_text().splitlines())
    with metrics.open("a") as f:
        f.write('{"step": 3, "loss": 1.23')  # killed while writing step 3's line
    proc = run_train(common)
    assert f"{metrics}:{complete + 1}: not a complete JSON line" in proc.stderr
    lines = metrics.read_text().splitlines()
    assert all(json.loads(line) for line in lines)  # valid JSONL again
    train, _ = read_metrics(out)
    assert [r["step"] for r in train] == [1, 2, 3, 4]


# --- exit codes other than bad input -----------------------------------------------------------


def test_non_finite_loss_with_raise_exits_3(tmp_path):
    proc = run_module("ftdist.train", [*FAST, "train.max_steps=4", "train.on_nonfinite=raise", f"output_dir={tmp_path}/run"],
                      env={"FTDIST_INJECT_FAULT": "nan:2:0"})
    assert proc.returncode == EXIT_NONFINITE == 3, proc.stderr[-3000:]
    assert "ftdist: NonFiniteError: " in proc.stderr and "Traceback" not in proc.stderr


def test_preempted_run_exits_75(tmp_path):
    proc = run_module("ftdist.train", [*FAST, "train.max_steps=4", f"output_dir={tmp_path}/run"],
                      env={"FTDIST_INJECT_FAULT": "sigterm:2:0"})
    assert proc.returncode == EXIT_PREEMPTED == 75, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert (tmp_path / "run" / "checkpoints" / "step_00000002").is_dir()


def test_rank_that_never_joins_exits_4(tmp_path):
    """Two ranks started with env:// variables (no torchrun, whose own exit code is 1 for any
    failed worker): rank 1 never checks in; rank 0 names it and exits 4."""
    port = free_port()
    base = {**run_env(), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": "2",
            "LOCAL_WORLD_SIZE": "2", "FTDIST_INJECT_FAULT": "stall:0:1"}
    cmd = [sys.executable, "-m", "ftdist.train", *FAST, "strategy=ddp", "strategy.preflight_timeout_s=5",
           f"output_dir={tmp_path}/run"]
    ranks = [
        subprocess.Popen(cmd, cwd=REPO, env={**base, "RANK": str(r), "LOCAL_RANK": str(r)},
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for r in range(2)
    ]
    try:
        _, err = ranks[0].communicate(timeout=180)
    finally:
        for p in ranks:
            if p.poll() is None:
                os.kill(p.pid, 9)
            p.communicate()
    assert ranks[0].returncode == EXIT_PREFLIGHT == 4, err[-3000:]
    assert "PreflightError: preflight: rank(s) [1] of 2 did not check in within 5 s" in err
    assert "Traceback" not in err
