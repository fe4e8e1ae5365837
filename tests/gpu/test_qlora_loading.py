"""On CUDA: FSDP + QLoRA loads the 4-bit base into CPU memory, quantized on the GPU, and the GPU
never holds more than one FSDP unit of it while fully_shard shards and offloads it (the old way,
each rank quantized the whole base onto its GPU: 39 GiB for 70B). Run with FTDIST_TEST_GPU=1."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import FAST, REPO, run_env

pytestmark = pytest.mark.gpu
WORKER = Path(__file__).with_name("qlora_loading_worker.py")
# 16 quantized layers, so one unit is a small part of the whole.
MODEL = ["model.tiny.num_layers=16", "model.tiny.hidden_size=512", "model.tiny.intermediate_size=1536"]


def test_fsdp_qlora_loads_into_cpu_memory_and_shards_one_unit_at_a_time(tmp_path):
    if not torch.cuda.is_available():
        pytest.fail("FTDIST_TEST_GPU=1 but no CUDA device is visible")
    overrides = [*FAST, *MODEL, "strategy=fsdp", "strategy.cpu_offload=true", "peft=qlora", "peft.dropout=0",
                 "train.micro_batch_size=4", "train.save_final=false"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1",
           str(WORKER), str(tmp_path), *overrides]
    proc = subprocess.run(cmd, cwd=REPO, env=run_env(), capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, f"{proc.stdout[-2000:]}\n{proc.stderr[-6000:]}"
    r = json.loads((tmp_path / "record.json").read_text())
    print(json.dumps(r))
    assert r["devices"] == ["cpu"] and r["quantized"] == 16 * 7
    assert r["gpu_quantized"], "the 4-bit weights are not what bitsandbytes makes on the GPU"
    # Loading: one weight at a time passes through the GPU (fp32 in, 4-bit out).
    largest_weight = 512 * 1536 * 4
    assert r["load_peak"] <= 3 * largest_weight and r["allocated_after_load"] < largest_weight
    # Sharding with offload: one unit whole on the GPU at a time (+ one parameter's shard in flight).
    assert r["shard_peak"] <= r["predicted_load_gpu_without_workspace"] + largest_weight
    assert r["shard_peak"] < r["whole_model_bytes"] / 3
    assert all(math.isfinite(loss) for loss in r["losses"]) and r["losses"][-1] < r["losses"][0]
