"""ftdist.plan's per-rank bytes of parameters, gradients and optimizer state equal what each of 2
gloo ranks holds after a training step (local storage: DDP replicas, FSDP2 DTensor shards,
DeepSpeed ZeRO-3 partitions, bitsandbytes 4-bit storage and its quantization constants), and its
bytes in memory just after loading equal what each rank holds then (FSDP: rank 0 the whole model,
rank 1 nothing; FSDP + QLoRA: every rank the whole quantized base; DDP: every rank everything).
Under DPO with reference=model, the frozen reference's bytes on each rank equal the plan's too
(FSDP2: half of it each), and rank 0 holds both whole models after loading."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import FAST, REPO, run_env

WORKER = Path(__file__).with_name("plan_model_state_worker.py")
STEP = [*FAST, "train.max_steps=2", "train.micro_batch_size=2", "train.grad_accum_steps=2", "train.save_final=false"]
LAYOUTS = {
    "single": ["strategy=single"],
    "ddp": ["strategy=ddp"],
    "fsdp": ["strategy=fsdp"],
    "fsdp_accumulate_unsharded": ["strategy=fsdp", "strategy.accumulate_unsharded=true"],
    "zero1": ["strategy=zero1"],
    "zero2": ["strategy=zero2"],  # uneven: straddling parameters count on both ranks
    "zero3": ["strategy=zero3"],
    "zero3_offload": ["strategy=zero3_offload"],  # partitions in CPU memory: counted where they are
    "fsdp_lora": ["strategy=fsdp", "peft=lora", "peft.dropout=0"],
    "fsdp_qlora": ["strategy=fsdp", "peft=qlora", "peft.dropout=0"],
    # DPO's frozen reference, sharded 1/2 like the policy, loaded on rank 0 beside the policy.
    "fsdp_dpo_reference_model": ["strategy=fsdp", "objective=dpo", "objective.reference=model", "data=preference",
                                 "data.path=synthetic:json_preference", "data.max_seq_len=128"],
}


def measure(tmp_path: Path, overrides: list[str], nproc: int) -> list[dict]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           str(WORKER), str(tmp_path), *STEP, *overrides]
    proc = subprocess.run(cmd, cwd=REPO, env=run_env(), capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, f"{proc.stdout[-2000:]}\n{proc.stderr[-6000:]}"
    return [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(nproc)]


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_predicted_model_state_matches_each_rank(tmp_path, layout):
    nproc = 1 if layout == "single" else 2
    ranks = measure(tmp_path, LAYOUTS[layout], nproc)
    parts = ["parameters", "gradients", "optimizer"] + (["quant_constants"] if "qlora" in layout else [])
    for record in ranks:
        assert record["world_size"] == nproc
        for part in parts:
            measured, predicted = record["measured"][part], record["predicted"][part]
            assert measured > 0, (layout, part, record)
            assert predicted == measured, (layout, part, record)  # bytes, exactly
        if not layout.startswith("zero3"):  # on CPU, zero.Init's partitions are in the memory the plan calls the GPU's
            measured, predicted = record["measured"]["loaded"], record["predicted"]["loaded"]
            assert predicted == measured, (layout, "loaded", record)
        if "reference" in layout:
            measured, predicted = record["measured"]["reference"], record["predicted"]["reference"]
            assert measured > 0 and predicted == measured, (layout, "reference", record)
            # A frozen model never runs backward: after a step its root is resharded like its blocks.
            assert record["measured"]["reference_after_step"] == measured, (layout, "reference after a step", record)
    if layout.startswith("fsdp"):
        loaded = [r["measured"]["loaded"] for r in sorted(ranks, key=lambda r: r["rank"])]
        assert loaded[0] > 0 and (loaded[1] == loaded[0] if "qlora" in layout else loaded[1] == 0), loaded
    print(json.dumps({layout: ranks}))
