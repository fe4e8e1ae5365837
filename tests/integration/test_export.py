"""`python -m ftdist.export`: checkpoints of real runs (single, FSDP, ZeRO-3, LoRA, QLoRA) become
Hugging Face models and PEFT adapters that load and compute what the run trained.

Each run saves a checkpoint at its last step, so its final/ (written by the trainer from the
live model) is the independent reference the export, read from the checkpoint alone, must equal.
"""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest
import torch
from helpers import FAST, REPO, concurrently, read_metrics, run_env, run_train
from safetensors.torch import load_file

from ftdist import export as export_mod
from ftdist.data.loader import collate
from ftdist.data.prepare import prepare_data
from ftdist.model.loading import load_tokenizer, resolve_model_path
from ftdist.objectives.sft import sft_loss_sum

STEPS = ["train.max_steps=2", "checkpoint.every_steps=2", "train.micro_batch_size=4"]


def train(root, name, overrides, nproc=None):
    run_dir = root / name
    run_train([*FAST, *STEPS, *overrides, f"output_dir={run_dir}"], nproc=nproc)
    return run_dir


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return tmp_path_factory.mktemp("export_runs")


@pytest.fixture(scope="module")
def one_process_runs(runs):
    """The single, LoRA and QLoRA runs: independent one-process runs (one core each), trained at
    once (helpers.concurrently) the first time a test needs one of them."""
    one_process = {"single": [], "lora": ["peft=lora"], "qlora": ["peft=qlora", "peft.dropout=0"]}
    dirs = concurrently(*(lambda name=name, o=o: train(runs, name, o) for name, o in one_process.items()))
    return dict(zip(one_process, dirs, strict=True))


@pytest.fixture(scope="module")
def single_run(one_process_runs):
    return one_process_runs["single"]


@pytest.fixture(scope="module")
def lora_run(one_process_runs):
    return one_process_runs["lora"]


@pytest.fixture(scope="module")
def qlora_run(one_process_runs):
    return one_process_runs["qlora"]


def assert_export_equals_final(out, run_dir):
    from transformers import AutoModelForCausalLM

    exported = load_file(out / "model.safetensors")
    final = load_file(run_dir / "final" / "model.safetensors")
    assert exported.keys() == final.keys()
    for name, value in final.items():
        assert exported[name].numel() > 0 and exported[name].abs().max() > 0, name
        assert torch.equal(exported[name], value), name
    model, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert model.lm_head.weight is model.model.embed_tokens.weight  # re-tied on load
    for name, value in model.state_dict().items():
        assert torch.equal(value, final.get(name, final["model.embed_tokens.weight"])), name


# --- full fine-tuning: one process, FSDP, ZeRO-3 ------------------------------------------------


def last_checkpoint(run_dir):
    # The run directory itself would export final/, the reference these tests compare with.
    return run_dir / "checkpoints" / "step_00000002"


def test_single_process_export_equals_final(single_run, tmp_path):
    out = export_mod.export(last_checkpoint(single_run), tmp_path / "hf")
    assert_export_equals_final(out, single_run)
    assert (out / "tokenizer.json").is_file() and (out / "config.json").is_file()
    assert not (tmp_path / "hf.partial").exists()


def test_dtype_bf16_casts_every_weight(single_run, tmp_path):
    checkpoint = single_run / "checkpoints" / "step_00000002"
    out = export_mod.export(checkpoint, tmp_path / "bf16", dtype_name="bf16")
    exported, final = load_file(out / "model.safetensors"), load_file(single_run / "final" / "model.safetensors")
    for name, value in final.items():
        assert torch.equal(exported[name], value.to(torch.bfloat16)), name


def test_fsdp_checkpoint_export_equals_final(runs, tmp_path):
    run_dir = train(runs, "fsdp", ["strategy=fsdp"], nproc=2)
    assert_export_equals_final(export_mod.export(last_checkpoint(run_dir), tmp_path / "hf"), run_dir)


def test_zero3_checkpoint_export_equals_final(runs, tmp_path):
    run_dir = train(runs, "zero3", ["strategy=zero3"], nproc=2)
    assert (last_checkpoint(run_dir) / "model_optimizer" / "latest").is_file()  # DeepSpeed's format
    assert_export_equals_final(export_mod.export(last_checkpoint(run_dir), tmp_path / "hf"), run_dir)


# --- adapters ------------------------------------------------------------------------------------


def load_base(run_dir, quantized: bool):
    from transformers import AutoModelForCausalLM

    from ftdist.model.adapters import keep_4bit_weights_trainable, quantization_config

    cfg = export_mod.read_run_config(run_dir)
    quant = quantization_config(cfg.peft, torch.float32) if quantized else None
    base = AutoModelForCausalLM.from_pretrained(resolve_model_path(cfg.model), quantization_config=quant)
    keep_4bit_weights_trainable(base)
    return base


def val_batch(run_dir):
    cfg = export_mod.read_run_config(run_dir)
    tokenizer = load_tokenizer(cfg.model, resolve_model_path(cfg.model))
    _, val, _ = prepare_data(cfg.data, tokenizer, cfg.seed)
    return collate(val, tokenizer.pad_token_id)


@torch.no_grad()
def logits(model, batch):
    return model.eval()(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits.float()


def adapted_logits(run_dir, adapter_dir, batch, quantized):
    from peft import PeftModel

    return logits(PeftModel.from_pretrained(load_base(run_dir, quantized), adapter_dir), batch)


@pytest.mark.parametrize("name", ["lora", "qlora"])
def test_adapter_export_equals_final_adapter(request, name, tmp_path):
    run_dir = request.getfixturevalue(f"{name}_run")
    out = export_mod.export(last_checkpoint(run_dir), tmp_path / "adapter")
    exported = load_file(out / "adapter_model.safetensors")
    final = load_file(run_dir / "final" / "adapter_model.safetensors")
    assert exported.keys() == final.keys() and any("lora_B" in k for k in final)
    for key, value in final.items():
        assert exported[key].abs().max() > 0 and torch.equal(exported[key], value), key
    assert not (out / "model.safetensors").exists()  # never the base


def test_lora_adapter_export_reproduces_eval_loss(lora_run, tmp_path):
    out = export_mod.export(last_checkpoint(lora_run), tmp_path / "adapter")
    batch = val_batch(lora_run)
    loss = sft_loss_sum(adapted_logits(lora_run, out, batch, quantized=False), batch.labels).item()
    _, evals = read_metrics(lora_run)
    assert loss / batch.num_label_tokens == pytest.approx(evals[-1]["eval_loss"], rel=1e-5)


def merged_vs_adapted(run_dir, tmp_path, quantized, dtype_name):
    """max |logits(merged export) - logits(base + exported adapter)| on the validation set."""
    from transformers import AutoModelForCausalLM

    adapter = export_mod.export(last_checkpoint(run_dir), tmp_path / "adapter")
    merged_dir = export_mod.export(last_checkpoint(run_dir), tmp_path / "merged", merge_adapter=True,
                                   dtype_name=dtype_name)
    assert not (merged_dir / "adapter_config.json").exists()
    merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32)
    batch = val_batch(run_dir)
    return (logits(merged, batch) - adapted_logits(run_dir, adapter, batch, quantized)).abs().max().item()


def test_lora_merge_equals_base_plus_adapter(lora_run, tmp_path):
    assert merged_vs_adapted(lora_run, tmp_path, quantized=False, dtype_name=None) < 1e-4  # fp32 run


@pytest.mark.parametrize("dtype_name, tolerance", [("fp32", 1e-4), (None, 2e-2)])
def test_qlora_merge_equals_4bit_base_plus_adapter(qlora_run, tmp_path, dtype_name, tolerance):
    # Merged into dequantized NF4 weights: measured ~1e-6 in fp32 and ~6e-3 in bf16 (the default),
    # where merging into the original base instead would differ by ~0.2 (below).
    assert merged_vs_adapted(qlora_run, tmp_path, quantized=True, dtype_name=dtype_name) < tolerance
    if dtype_name is None:
        config = (tmp_path / "merged" / "config.json").read_text()
        assert '"dtype": "bfloat16"' in config and "quantization_config" not in config


def test_qlora_merge_into_original_base_would_be_caught(qlora_run, tmp_path):
    # The check's teeth: the adapter on the unquantized base is not the model that trained.
    from peft import PeftModel

    adapter = export_mod.export(qlora_run, tmp_path / "adapter")
    batch = val_batch(qlora_run)
    naive = logits(PeftModel.from_pretrained(load_base(qlora_run, False), adapter).merge_and_unload(), batch)
    assert (naive - adapted_logits(qlora_run, adapter, batch, quantized=True)).abs().max() > 0.05


def test_failed_merge_check_writes_nothing(lora_run, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(export_mod.MERGE_TOLERANCE, torch.float32, 0.0)
    code = export_mod.main([str(lora_run), "--out", str(tmp_path / "merged"), "--merge"])
    assert code == export_mod.EXIT_MERGE_MISMATCH
    assert "MergeMismatch" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())  # neither merged/ nor merged.partial/


# --- a run's final/ (checkpoints are off by default) --------------------------------------------


def default_run(run_dir, where):
    """What a run with checkpoints off leaves: config.yaml and final/, no checkpoints/."""
    where.mkdir()
    shutil.copy(run_dir / "config.yaml", where)
    shutil.copytree(run_dir / "final", where / "final")
    return where


@pytest.mark.parametrize("name", ["lora", "qlora"])
def test_merge_of_final_equals_base_plus_final_adapter(request, name, tmp_path):
    from transformers import AutoModelForCausalLM

    run_dir = request.getfixturevalue(f"{name}_run")
    source = default_run(run_dir, tmp_path / "run")
    merged_dir = export_mod.export(source, tmp_path / "merged", merge_adapter=True, dtype_name="fp32")
    batch = val_batch(run_dir)
    merged = logits(AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32), batch)
    # Independently: peft's own loader on final/, over the base as the run trained on it.
    reference = adapted_logits(run_dir, run_dir / "final", batch, quantized=name == "qlora")
    assert (merged - reference).abs().max() < 1e-4  # measured ~1e-6 (fp32)
    base = logits(load_base(run_dir, quantized=name == "qlora"), batch)
    assert (reference - base).abs().max() > 1e-3  # the adapter moved the logits: the check has teeth


def test_final_adapter_export_is_final_adapter(lora_run, tmp_path):
    out = export_mod.export(lora_run / "final", tmp_path / "adapter")  # named directly, beside checkpoints/
    exported = load_file(out / "adapter_model.safetensors")
    final = load_file(lora_run / "final" / "adapter_model.safetensors")
    assert exported.keys() == final.keys() and all(torch.equal(exported[k], v) for k, v in final.items())


def test_run_directory_with_final_exports_final_not_its_checkpoint(lora_run, tmp_path):
    # As a preempted run leaves it once resumed and finished: a stale checkpoint beside final/.
    run = default_run(lora_run, tmp_path / "run")
    stale = last_checkpoint(run)
    shutil.copytree(last_checkpoint(lora_run), stale)
    (stale / "model_optimizer" / ".metadata").unlink()  # reading this checkpoint would fail
    out = export_mod.export(run, tmp_path / "adapter")
    exported = load_file(out / "adapter_model.safetensors")
    final = load_file(lora_run / "final" / "adapter_model.safetensors")
    assert all(torch.equal(exported[k], v) for k, v in final.items())


def test_full_final_is_copied_or_converted(single_run, tmp_path):
    source = default_run(single_run, tmp_path / "run")
    assert_export_equals_final(export_mod.export(source, tmp_path / "copy", merge_adapter=True), single_run)
    out = export_mod.export(source / "final", tmp_path / "bf16", dtype_name="bf16")
    exported, final = load_file(out / "model.safetensors"), load_file(single_run / "final" / "model.safetensors")
    assert exported.keys() == final.keys()
    assert all(torch.equal(exported[k], v.to(torch.bfloat16)) for k, v in final.items())


def one_line_error(argv, capsys) -> str:
    assert export_mod.main(argv) == export_mod.EXIT_BAD_INPUT
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


def test_bad_final_is_one_line_naming_path_and_what_is_missing(lora_run, tmp_path, capsys):
    orphan = tmp_path / "orphan" / "final"  # final/ outside its run directory
    shutil.copytree(lora_run / "final", orphan)
    line = one_line_error([str(orphan), "--out", str(tmp_path / "a"), "--merge"], capsys)
    assert f"{orphan.parent / 'config.yaml'}: no config.yaml" in line
    run = default_run(lora_run, tmp_path / "run")
    (run / "final" / "adapter_model.safetensors").unlink()  # a final/ cut short
    line = one_line_error([str(run), "--out", str(tmp_path / "a"), "--merge"], capsys)
    assert f"{run / 'final'}: no adapter_model.safetensors" in line
    other_r = default_run(lora_run, tmp_path / "other_r")
    config = other_r / "config.yaml"
    config.write_text(config.read_text().replace("r: 16", "r: 8", 1))
    line = one_line_error([str(other_r / "final"), "--out", str(tmp_path / "a"), "--merge"], capsys)
    assert "adapter_model.safetensors: " in line and "r=8" in line and str(config) in line
    full = default_run(lora_run, tmp_path / "full")
    (full / "config.yaml").write_text((full / "config.yaml").read_text().replace("method: lora", "method: none", 1))
    line = one_line_error([str(full), "--out", str(tmp_path / "a")], capsys)
    assert f"{full / 'final'}: no config.json (peft.method=none" in line
    assert not (tmp_path / "a").exists() and not (tmp_path / "a.partial").exists()


# --- bad input -------------------------------------------------------------------------------


def test_missing_path_is_one_line_and_exit_2(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "ftdist.export", str(tmp_path / "nope"), "--out", str(tmp_path / "out")],
        cwd=REPO, env=run_env(), capture_output=True, text=True, timeout=120, check=False,
    )
    assert proc.returncode == 2, proc.stderr
    expected = f"ftdist.export: ConfigError: {tmp_path / 'nope'}: no such run directory, checkpoint or final/"
    assert proc.stderr.strip().splitlines() == [expected]


def test_run_config_with_unknown_key_or_wrong_type_is_one_line_naming_the_key(tmp_path):
    from omegaconf import OmegaConf

    from ftdist.config import ConfigError, compose

    saved = OmegaConf.to_container(compose(["+experiment=tiny_cpu", f"output_dir={tmp_path}"]), resolve=True)
    for key, value, named in (("lrr", 1, "unknown config key 'train.lrr'"), ("lr", "abc", "full_key: train.lr")):
        (tmp_path / "config.yaml").write_text(OmegaConf.to_yaml({**saved, "train": {**saved["train"], key: value}}))
        with pytest.raises(ConfigError) as e:
            export_mod.read_run_config(tmp_path)
        assert str(e.value).startswith(f"{tmp_path / 'config.yaml'}: not an ftdist run config: ")
        assert named in str(e.value) and "\n" not in str(e.value)


def test_partial_checkpoint_and_missing_config_exit_2(single_run, tmp_path, capsys):
    partial = tmp_path / "run" / "checkpoints" / "step_00000002.partial"  # a save cut short
    shutil.copytree(single_run / "checkpoints" / "step_00000002", partial)
    shutil.copy(single_run / "config.yaml", tmp_path / "run")
    assert export_mod.main([str(partial), "--out", str(tmp_path / "a")]) == 2
    assert "incomplete checkpoint" in capsys.readouterr().err
    assert export_mod.main([str(tmp_path / "run"), "--out", str(tmp_path / "a")]) == 2  # nothing complete
    assert "no model_optimizer" in capsys.readouterr().err
    orphan = tmp_path / "elsewhere" / "checkpoints" / "step_00000002"
    shutil.copytree(single_run / "checkpoints" / "step_00000002", orphan)
    assert export_mod.main([str(orphan), "--out", str(tmp_path / "b")]) == 2
    assert "no config.yaml" in capsys.readouterr().err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
