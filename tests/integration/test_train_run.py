"""End to end through the real entry point: run directory contents, final/ reload, real data,
and bad input failing before the model loads."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import shared_dataset
from helpers import FAST, concurrently, read_metrics, run_train
from transformers import AutoModelForCausalLM

from ftdist.config import compose
from ftdist.model.loading import resolve_model_path
from ftdist.train import run


def test_in_process_run_and_final_reload(tmp_path):
    dcfg = compose([*FAST, "train.max_steps=4", f"output_dir={tmp_path}"])
    trainer, summary = run(dcfg, output_dir=str(tmp_path))
    assert summary["steps"] == 4
    for name in ("config.yaml", "metrics.jsonl", "train.log", "data_report.json", "summary.json"):
        assert (tmp_path / name).exists(), name
    assert "max_steps: 4" in (tmp_path / "config.yaml").read_text()

    trained = trainer.strategy.unwrap(trainer.model).eval()
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "final").eval()
    ids = torch.tensor([trainer.val_examples[0].input_ids])
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, trained(input_ids=ids).logits, rtol=0, atol=1e-6)
    # ...and it is the trained model, not the initial one it started from.
    initial = AutoModelForCausalLM.from_pretrained(resolve_model_path(trainer.cfg.model))
    w = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(initial.state_dict()[w], reloaded.state_dict()[w])


def test_eval_loss_is_token_weighted_mean_over_validation_set(tmp_path):
    dcfg = compose([*FAST, "train.max_steps=1", "train.eval_batch_size=3", f"output_dir={tmp_path}"])
    trainer, _ = run(dcfg, output_dir=str(tmp_path))
    model = trainer.strategy.unwrap(trainer.model).eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for ex in trainer.val_examples:  # one example at a time: no padding at all
            logits = model(input_ids=torch.tensor([ex.input_ids])).logits[0, :-1]
            labels = torch.tensor(ex.labels[1:])
            keep = labels != -100
            total += torch.nn.functional.cross_entropy(logits[keep], labels[keep], reduction="sum").item()
            count += int(keep.sum())
    _, evals = read_metrics(tmp_path)
    assert evals[-1]["eval_loss"] == pytest.approx(total / count, rel=1e-5)


def test_trains_on_real_gsm8k(tmp_path):
    path = shared_dataset("gsm8k/test.jsonl")
    run_train(
        [
            *FAST, f"data.path={path}", "data.format=instruction", "data.fields.prompt=question",
            "data.fields.response=answer", "data.max_seq_len=512", "train.max_steps=3", "train.micro_batch_size=2",
            f"output_dir={tmp_path}",
        ]
    )
    train, evals = read_metrics(tmp_path)
    assert [r["step"] for r in train] == [1, 2, 3]
    report = json.loads((tmp_path / "data_report.json").read_text())
    assert report["rows_read"] == 1319 and report["bad_rows"] == {}


def test_bad_row_fails_before_model_load_naming_file_and_line(tmp_path):
    data = tmp_path / "bad.jsonl"
    data.write_text('{"prompt": "a", "response": "b"}\n{"prompt": "c"}\n')
    proc = run_train([*FAST, f"data.path={data}", f"output_dir={tmp_path}/run"], check=False)
    assert proc.returncode == 2
    assert f"{data}:2" in proc.stderr and "missing_field" in proc.stderr
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_skip_mode_counts_bad_rows_in_output_dir(tmp_path):
    data = tmp_path / "mixed.jsonl"
    good = [json.dumps({"prompt": f"say {i}", "response": f"ok {i}"}) for i in range(20)]
    data.write_text("\n".join(good + ["{not json", '{"prompt": "x", "response": ""}', '{"prompt": 3, "response": "y"}']) + "\n")
    run_train([*FAST, f"data.path={data}", "data.on_bad_row=skip", "train.max_steps=1", f"output_dir={tmp_path}/run"])
    report = json.loads((tmp_path / "run" / "data_report.json").read_text())
    kinds = set(report["bad_rows"]) | set(report["val_bad_rows"])
    merged = {k: report["bad_rows"].get(k, 0) + report["val_bad_rows"].get(k, 0) for k in kinds}
    assert merged == {"invalid_json": 1, "empty_response": 1, "wrong_type": 1}
    assert "invalid_json" in (tmp_path / "run" / "train.log").read_text()


def test_any_local_hf_model_directory_trains(tmp_path, tiny_model_dir):
    # model=hf is the path for real models: a local directory (or hub name) via from_pretrained.
    run_train(
        [
            *FAST, "model=hf", f"model.name_or_path={tiny_model_dir}", "model.dtype=fp32",
            "model.gradient_checkpointing=true", "train.max_steps=2", f"output_dir={tmp_path}",
        ]
    )
    train, _ = read_metrics(tmp_path)
    assert [r["step"] for r in train] == [1, 2]
    assert f"name_or_path: {tiny_model_dir}" in (tmp_path / "config.yaml").read_text()


def test_packing_keeps_eval_loss_and_fills_rows_on_gsm8k(tmp_path):
    # The acceptance run: lr 0, one step, packed vs unpacked on GSM8K test.
    path = shared_dataset("gsm8k/test.jsonl")
    common = [
        *FAST, f"data.path={path}", "data.fields.prompt=question", "data.fields.response=answer",
        "data.max_seq_len=2048", "train.lr=0", "train.max_steps=1", "train.micro_batch_size=4",
    ]
    concurrently(  # independent one-process runs: both at once
        lambda: run_train([*common, "data.packing=false", f"output_dir={tmp_path}/padded"]),
        lambda: run_train([*common, "data.packing=true", f"output_dir={tmp_path}/packed"]),
    )
    padded_train, padded_eval = read_metrics(tmp_path / "padded")
    packed_train, packed_eval = read_metrics(tmp_path / "packed")
    assert packed_eval[-1]["eval_loss"] == pytest.approx(padded_eval[-1]["eval_loss"], rel=1e-4)
    assert packed_train[0]["packing_efficiency"] >= 0.95
    assert packed_train[0]["documents"] > 4  # several documents per packed row
