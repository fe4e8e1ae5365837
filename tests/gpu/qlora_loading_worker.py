"""Launched by torchrun (1 process) from test_qlora_loading.py on a CUDA machine: load a QLoRA
model for FSDP with CPU offload as ftdist.train does, and record where its weights are, the GPU
memory while loading and while sharding, ftdist.plan's prediction, and a few training losses.

usage: torchrun --nproc_per_node 1 qlora_loading_worker.py OUT_DIR override ...
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for helpers

from helpers import WorkerRun, worker_config, worker_main

from ftdist.constants import GIB
from ftdist.model.loading import resolve_model_path
from ftdist.model_memory import model_state
from ftdist.plan import predicted_loading


def gpu_quantized_reference(model_path: str, name: str, like, device: str = "cuda") -> bool:
    """Whether the loaded 4-bit weight `name` is bitwise what bitsandbytes makes of the checkpoint's
    weight on the GPU (the quantization the loader must have used, not the CPU's)."""
    import bitsandbytes as bnb
    from safetensors import safe_open

    with safe_open(str(Path(model_path) / "model.safetensors"), framework="pt") as f:
        weight = f.get_tensor(name).to(device)
    packed, state = bnb.functional.quantize_4bit(
        weight, blocksize=like.blocksize, compress_statistics=True, quant_type="nf4", quant_storage=like.quant_storage
    )
    # Compared as bytes: packed 4-bit data read as bf16 holds NaN patterns, and NaN != NaN.
    same_data = torch.equal(packed.cpu().view(torch.uint8), like.data.view(torch.uint8))
    return bool(same_data and torch.equal(state.absmax.cpu(), like.quant_state.absmax))


def main(out_dir: Path, overrides: list[str]) -> None:
    cfg = worker_config(out_dir, overrides)
    m = model_state(cfg)
    predicted = predicted_loading(cfg, 1, m)
    with WorkerRun(cfg) as run:
        torch.cuda.reset_peak_memory_stats()
        loaded = run.load()
        load_peak = torch.cuda.max_memory_allocated()
        params = dict(loaded.model.named_parameters())
        quantized = {n: p for n, p in params.items() if type(p).__name__ == "Params4bit"}
        first = next(iter(quantized))
        checkpoint_name = first.replace("base_model.model.", "").replace(".base_layer", "")
        record = {
            "devices": sorted({p.device.type for p in params.values()}),
            "quantized": len(quantized),
            "gpu_quantized": gpu_quantized_reference(resolve_model_path(cfg.model), checkpoint_name, quantized[first]),
            "loaded_bytes": sum(p.numel() * p.element_size() for p in params.values()),
            "load_peak": load_peak,
            "allocated_after_load": torch.cuda.memory_allocated(),
        }
        torch.cuda.reset_peak_memory_stats()
        trainer = run.trainer(loaded, out_dir)
        record["shard_peak"] = torch.cuda.max_memory_allocated()
        record["losses"] = [trainer.train_step()["loss"] for _ in range(3)]
        record["predicted_load_gpu_without_workspace"] = predicted["gpu"] - cfg.plan.workspace_gb * GIB
        record["unit_stored_bytes"] = m.unit_stored_bytes
        record["whole_model_bytes"] = m.base_bytes + m.adapter_bytes + m.quant_constant_bytes
        (out_dir / "record.json").write_text(json.dumps(record) + "\n")


if __name__ == "__main__":
    worker_main(main)
