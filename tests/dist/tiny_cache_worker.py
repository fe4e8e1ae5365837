"""torchrun worker: rank 1 alone builds the tiny model into an empty cache while rank 0 waits,
the case where transformers' save_pretrained (rank 0 writes, others skip) once left a cached
directory without weights. Prints the directory's file names as JSON."""

import json

import torch.distributed as dist

from ftdist.config import TinyModelSpec
from ftdist.model.tiny import ensure_tiny_model

dist.init_process_group("gloo")
path = ensure_tiny_model(TinyModelSpec(hidden_size=32, num_layers=1, intermediate_size=64)) if dist.get_rank() == 1 else None
dist.barrier()
if dist.get_rank() == 1:
    from pathlib import Path

    print(json.dumps({"path": path, "files": sorted(p.name for p in Path(path).iterdir())}))
dist.destroy_process_group()
