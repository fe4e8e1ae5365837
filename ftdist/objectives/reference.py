"""DPO's reference model: which one (`objective.reference`), and the cache of precomputed log-probs.

- adapter: the policy's own forward with its PEFT adapters disabled, which is the base model
  (LoRA and DoRA start as the identity), so QLoRA-DPO holds one 4-bit base, not two;
- model: a frozen second model (objective.reference_path, or the starting weights), placed by
  the strategy's `prepare_frozen` (sharded under FSDP2 and ZeRO-3);
- precomputed: one pass over the train and validation pairs before the first step, with the
  reference above, saved to a cache file. The cache is keyed by a fingerprint of the pairs' tokens
  and of the reference (its weight files, dtype, quantization, precision); a cache whose key
  differs is refused, never silently used or overwritten.
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

import numpy as np
import torch

from ftdist.config import ConfigError, FtdistConfig
from ftdist.data.loader import eval_shard
from ftdist.data.packing import example_lengths

log = logging.getLogger(__name__)

CACHE_FILE = "reference_logps.pt"
CACHE_FORMAT = 2  # 2: pairs hashed as checkpoint.hash_examples does (the tokenized cache hashes them in bulk)


def reference_mode(cfg: FtdistConfig) -> str:
    mode = cfg.objective.reference
    if mode == "auto":
        return "adapter" if cfg.peft.method != "none" else "model"
    return mode


def without_adapters(peft_model: torch.nn.Module, forward, batch) -> torch.Tensor:
    """`forward` (the policy's token_logps) with its adapters off: the base model's."""
    disable = getattr(peft_model, "disable_adapter", None)
    if disable is None:
        raise ConfigError("objective.reference=adapter: the policy has no PEFT adapters to disable (peft=none)")
    with torch.no_grad(), disable():
        return forward(batch)


def cache_path(cfg: FtdistConfig, run_dir: Path) -> Path:
    return Path(os.path.expanduser(cfg.objective.reference_cache)) if cfg.objective.reference_cache else run_dir / CACHE_FILE


def cache_key(cfg: FtdistConfig, train: list, val: list, bf16: bool) -> dict:
    """What the cached log-probs depend on: the pairs' tokens and the reference's identity."""
    from ftdist.checkpoint import hash_examples
    from ftdist.model.loading import resolve_model_path

    source = cfg.objective.reference_path or resolve_model_path(cfg.model)
    weights = []
    if os.path.isdir(source):  # a hub name has no local files to stat; its name stands for it
        for entry in sorted(Path(source).iterdir()):
            if entry.suffix in (".safetensors", ".bin", ".json") and entry.is_file():
                st = entry.stat()
                weights.append([entry.name, st.st_size, st.st_mtime_ns])
    data = hashlib.sha256()
    for pairs in (train, val):
        data.update(np.int64(len(pairs)).tobytes())
        hash_examples(data, pairs)
    quantized = cfg.peft.method == "qlora" and cfg.objective.reference_path is None
    return {
        "format": CACHE_FORMAT,
        "data_sha256": data.hexdigest(),
        "reference": os.path.abspath(source) if os.path.isdir(source) else source,
        "weight_files": weights,
        "dtype": cfg.model.dtype,
        "quantization": {"method": "nf4", "quant_storage": cfg.peft.quant_storage} if quantized else None,
        "bf16": bf16,
        "attn_implementation": cfg.model.attn_implementation,
    }


def use_precomputed(objective, ctx) -> None:
    """Give every train and validation pair its reference log-probs: from the cache where its key
    matches, else computed now (all ranks) and saved by rank 0; a cache with another key is refused."""
    cfg, strategy = objective.cfg, ctx.strategy
    # Rank 0's view decides: on nodes with their own copies of the weights, file times may differ.
    key = strategy.broadcast_object(cache_key(cfg, ctx.train_examples, ctx.val_examples, ctx.bf16))
    path = cache_path(cfg, ctx.run_dir)
    cached = strategy.broadcast_object(_read_cache(path) if strategy.is_main else None)
    if cached is not None:
        stale = [k for k in key if cached["key"].get(k) != key[k]]
        if stale:
            raise ConfigError(
                f"objective.reference=precomputed: the cache {path} was computed for another "
                f"{', '.join(stale)} than this run's; delete it to compute it again, or point "
                "objective.reference_cache at another file"
            )
        log.info("dpo: reference log-probs of %d train and %d validation pairs from %s",
                 len(ctx.train_examples), len(ctx.val_examples), path)
        train, val = cached["train"], cached["val"]
    else:
        train, val = (_compute(objective, ctx, pairs) for pairs in (ctx.train_examples, ctx.val_examples))
        if strategy.is_main:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(path.name + ".tmp")
            torch.save({"key": key, "train": train, "val": val}, tmp)
            os.replace(tmp, path)  # a crash mid-write leaves no half cache to be trusted later
            log.info("dpo: computed reference log-probs of %d train and %d validation pairs; cached in %s",
                     len(ctx.train_examples), len(ctx.val_examples), path)
        strategy.barrier()
    for pairs, values in ((ctx.train_examples, train), (ctx.val_examples, val)):
        attach(pairs, values)


def attach(pairs, values: torch.Tensor) -> None:
    """Set each pair's reference log-probs from `values` [N, 2]. Memory-mapped pairs
    (ftdist.data.columns) are made on access, so they take the whole array at once."""
    if len(pairs) != len(values):
        raise ValueError(f"{len(values)} reference log-prob rows for {len(pairs)} pairs")
    if hasattr(pairs, "reference_logps"):
        pairs.reference_logps = values.numpy().astype(np.float64)
        return
    for pair, (chosen, rejected) in zip(pairs, values.tolist(), strict=True):
        pair.reference_logps = (chosen, rejected)


def _read_cache(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        cached = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 (any failure to read is a damaged file: say which, do not guess)
        raise ConfigError(f"objective.reference=precomputed: cannot read the cache {path}: {e}") from None
    if not isinstance(cached, dict) or not {"key", "train", "val"} <= set(cached):
        raise ConfigError(f"objective.reference=precomputed: {path} is not a reference log-prob cache")
    return cached


@torch.no_grad()
def _compute(objective, ctx, pairs: list) -> torch.Tensor:
    """[N, 2] reference log-probs of `pairs`, each rank computing a share (unpacked: a pair's
    numbers do not depend on what it shares a row with), gathered on every rank."""
    from ftdist.objectives.preference import collate_pairs, sequence_logps

    strategy = ctx.strategy
    batch_size = objective.cfg.train.eval_batch_size
    lengths = example_lengths(pairs)
    mine, padding = eval_shard(lengths, strategy.rank, strategy.world_size, batch_size, strategy.shards_parameters)
    out: dict[int, tuple[float, float]] = {}
    for idx in mine:
        batch = collate_pairs([[pairs[i]] for i in idx], objective.pad_token_id, packed=False).to(strategy.device)
        logps = sequence_logps(objective.reference_forward(batch), batch).tolist()
        for j, i in enumerate(idx):
            out[i] = (logps[2 * j], logps[2 * j + 1])
    for _ in range(padding):
        objective.reference_forward(objective.padding_batch().to(strategy.device))
    merged: dict[int, tuple[float, float]] = {}
    for part in strategy.all_gather_object(out):
        merged.update(part)
    return torch.tensor([merged[i] for i in range(len(pairs))], dtype=torch.float64).reshape(len(pairs), 2)

