"""Task metrics by greedy generation: exact match of the generated response.

Used by the demo to compare the base model with the fine-tuned one, and available for any
instruction or chat data (`eval.exact_match_samples=N`).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.distributed as dist

from ftdist.config import EvalConfig
from ftdist.data.chat import strip_reasoning
from ftdist.data.prepare import Example


def _left_pad(prompts: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    # Left padding keeps every prompt's last token at the same column, where generation starts.
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, p in enumerate(prompts):
        ids[row, width - len(p) :] = torch.tensor(p)
        mask[row, width - len(p) :] = 1
    return ids, mask


def _stop_ids(model, tokenizer) -> list[int]:
    ids = {tokenizer.eos_token_id}
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids.update(gen_eos if isinstance(gen_eos, list) else [gen_eos])
    return sorted(i for i in ids if i is not None)


@torch.no_grad()
def generate_responses(
    model, tokenizer, prompts: list[list[int]], cfg: EvalConfig, device, synced_chunks: int | None = None
) -> list[str]:
    """Greedy responses. synced_chunks: under sharded parameters, run exactly that many generate
    calls in lock-step with the other ranks (padding with a repeated prompt) and sync each one."""
    out: list[str] = []
    chunks = [prompts[i : i + cfg.batch_size] for i in range(0, len(prompts), cfg.batch_size)]
    extra = {}
    if synced_chunks is not None:
        filler = [prompts[0] if prompts else [tokenizer.pad_token_id]]
        chunks += [filler] * (synced_chunks - len(chunks))
        extra["synced_gpus"] = True
    for chunk in chunks:
        ids, mask = _left_pad(chunk, tokenizer.pad_token_id)
        generated = model.generate(
            input_ids=ids.to(device),
            attention_mask=mask.to(device),
            max_new_tokens=cfg.max_new_tokens,
            do_sample=False,
            use_cache=True,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=_stop_ids(model, tokenizer),
            **extra,
        )
        new_tokens = generated[:, ids.shape[1] :]
        out.extend(tokenizer.batch_decode(new_tokens, skip_special_tokens=True))
    return out[: len(prompts)]


def exact_match(
    model, tokenizer, examples: list[Example], cfg: EvalConfig, strategy, record_to: Path | None = None,
    reasoning_close: str | None = None,
) -> tuple[float, float]:
    """(correct, total) over the first `cfg.exact_match_samples` examples, summed over ranks.

    reasoning_close: where a response opens with reasoning closed by this tag (</think>), only
    the answer after it is compared with the reference (which never holds reasoning).

    record_to: rank 0 writes there one JSON line per evaluated example, in example order:
    `index` (position in `examples`), `prompt`, `reference`, `response` (the generated text) and
    `match`, so a score can be read example by example and checked."""
    usable = [(i, e) for i, e in enumerate(examples) if e.prompt_ids is not None and e.reference is not None]
    usable = usable[: cfg.exact_match_samples]
    mine = usable[strategy.rank :: strategy.world_size]
    records: list[dict] = []
    synced = None
    if strategy.shards_parameters:
        most = len(usable[0 :: strategy.world_size])  # rank 0 always has the most
        synced = -(-most // cfg.batch_size)
    if mine or synced:
        texts = generate_responses(model, tokenizer, [e.prompt_ids for _, e in mine], cfg, strategy.device, synced)
        records = [
            {
                "index": i,
                "prompt": tokenizer.decode(e.prompt_ids),
                "reference": e.reference,
                "response": t,
                "match": strip_reasoning(t, reasoning_close).strip() == e.reference.strip(),
            }
            for t, (i, e) in zip(texts, mine)
        ]
    correct = sum(r["match"] for r in records)
    total_correct, total = strategy.all_reduce_sum([correct, len(mine)])
    if record_to is not None:
        _write_records(records, Path(record_to), strategy)
    return total_correct, total


def _write_records(records: list[dict], path: Path, strategy) -> None:
    if strategy.world_size > 1:
        # Every rank takes part in the gather; rank 0 alone receives and writes.
        gathered = [None] * strategy.world_size if strategy.is_main else None
        dist.gather_object(records, gathered, dst=0)
        records = [r for part in gathered or [] for r in part]
    if strategy.is_main:
        path.parent.mkdir(parents=True, exist_ok=True)
        lines = [json.dumps(r) + "\n" for r in sorted(records, key=lambda r: r["index"])]
        path.write_text("".join(lines))
