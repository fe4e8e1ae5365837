"""The tiny model cache is complete whichever rank of a process group builds it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from helpers import run_env

WORKER = Path(__file__).with_name("tiny_cache_worker.py")


def test_a_rank_other_than_0_builds_a_complete_tiny_model(tmp_path):
    from transformers import AutoModelForCausalLM

    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(WORKER)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**run_env(), "FTDIST_CACHE": str(tmp_path)},
                          timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    built = json.loads(proc.stdout.strip().splitlines()[-1])
    assert {"config.json", "model.safetensors", "tokenizer.json", "done"} <= set(built["files"]), built
    model = AutoModelForCausalLM.from_pretrained(built["path"])
    assert model.config.hidden_size == 32 and model.config.num_hidden_layers == 1
