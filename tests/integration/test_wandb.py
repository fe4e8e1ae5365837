"""tracking=wandb in offline mode: the run under output_dir holds the logged steps.

The offline run file is read back record by record with wandb's own reader, so the test checks
what W&B would upload, not only that a file appeared.
"""

from __future__ import annotations

import json
import subprocess

import pytest
import wandb  # noqa: F401 - a core dependency: missing fails here, never skips
from helpers import FAST, REPO, read_metrics, run_env, train_cmd


def wandb_records(run_file) -> list[bytes]:
    """The protobuf records of a .wandb file: a 7-byte header (":W&B", magic, version), then a
    LevelDB-style log of 32 KiB blocks whose records carry crc32, length, kind (full, first,
    middle, last). wandb no longer ships a Python reader for it."""
    data, block, pos = run_file.read_bytes(), 32768, 7
    assert data[:4] == b":W&B"
    out, pending = [], b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        length, kind = int.from_bytes(data[pos + 4 : pos + 6], "little"), data[pos + 6]
        chunk = data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind == 1:
            out.append(chunk)
        elif kind == 2:
            pending = chunk
        elif kind == 3:
            pending += chunk
        elif kind == 4:
            out.append(pending + chunk)
    return out


def history_rows(run_file) -> list[dict]:
    from wandb.proto import wandb_internal_pb2

    rows = []
    for data in wandb_records(run_file):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(data)
        if record.WhichOneof("record_type") == "history":
            rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item})
    return rows


def config_items(run_file) -> dict:
    from wandb.proto import wandb_internal_pb2

    items = {}
    for data in wandb_records(run_file):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(data)
        kind = record.WhichOneof("record_type")
        updates = record.config.update if kind == "config" else record.run.config.update if kind == "run" else []
        items.update({item.key: json.loads(item.value_json) for item in updates})
    return items


def test_offline_wandb_run_holds_every_logged_step(tmp_path):
    out = tmp_path / "run"
    env = {**run_env(), "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    env.pop("WANDB_API_KEY", None)
    overrides = [*FAST, "tracking=wandb", "tracking.tags=[ci]", "train.max_steps=3", f"output_dir={out}"]
    proc = subprocess.run(train_cmd(None, overrides), cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    runs = list((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, list((out / "wandb").iterdir())
    (run_file,) = runs[0].glob("run-*.wandb")
    rows = history_rows(run_file)
    train, evals = read_metrics(out)
    logged_train = [r for r in rows if "loss" in r]
    assert [r["_step"] for r in logged_train] == [r["step"] for r in train] == [1, 2, 3]
    for ours, theirs in zip(train, logged_train):
        assert theirs["loss"] == pytest.approx(ours["loss"]) and theirs["tokens"] == ours["tokens"]
    assert [r["eval_loss"] for r in rows if "eval_loss" in r] == pytest.approx([r["eval_loss"] for r in evals])
    config = config_items(run_file)  # the resolved config, as the run used it
    assert config["train"]["max_steps"] == 3 and config["tracking"]["tags"] == ["ci"]
