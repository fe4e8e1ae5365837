"""Generation on held-out prompts and its metrics (ftdist.eval.metrics), sharded or not.

Used at the start and end of training (and every eval with eval.generation.every_eval), by
`python -m ftdist.eval` for base and tuned models, and by `python -m ftdist.generate`.
Greedy by default; sampled with eval.generation.do_sample, from a seed, so a rerun gives the
same text.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import torch
import torch.distributed as dist

from ftdist.config import GenerationEvalConfig
from ftdist.data.chat import strip_reasoning
from ftdist.data.prepare import Example
from ftdist.eval.metrics import score_response


def left_pad(prompts: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    # Left padding keeps every prompt's last token at the same column, where generation starts.
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, p in enumerate(prompts):
        ids[row, width - len(p) :] = torch.tensor(p)
        mask[row, width - len(p) :] = 1
    return ids, mask


def stop_ids(model, tokenizer) -> list[int]:
    ids = {tokenizer.eos_token_id}
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids.update(gen_eos if isinstance(gen_eos, list) else [gen_eos])
    return sorted(i for i in ids if i is not None)


def sampling_kwargs(gen: GenerationEvalConfig) -> dict:
    if not gen.do_sample:
        # Greedy: say so explicitly, or a model's generation_config.json could turn sampling on.
        return {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}
    return {"do_sample": True, "temperature": gen.temperature, "top_p": gen.top_p, "top_k": None}


@torch.no_grad()
def generate_responses(
    model, tokenizer, prompts: list[list[int]], gen: GenerationEvalConfig, device, synced_chunks: int | None = None
) -> list[str]:
    """One response per prompt (token ids), in order. synced_chunks: under sharded parameters,
    run exactly that many generate calls in lock-step with the other ranks (padding with a
    repeated prompt) and sync each one. Sampling draws from a generator seeded with
    gen.seed, so the same call gives the same text."""
    out: list[str] = []
    chunks = [prompts[i : i + gen.batch_size] for i in range(0, len(prompts), gen.batch_size)]
    extra = {}
    if synced_chunks is not None:
        filler = [prompts[0] if prompts else [tokenizer.pad_token_id]]
        chunks += [filler] * (synced_chunks - len(chunks))
        extra["synced_gpus"] = True
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices, enabled=gen.do_sample), root_gathered(model):
        if gen.do_sample:
            torch.manual_seed(gen.seed)
        for chunk in chunks:
            ids, mask = left_pad(chunk, tokenizer.pad_token_id)
            generated = model.generate(
                input_ids=ids.to(device),
                attention_mask=mask.to(device),
                max_new_tokens=gen.max_new_tokens,
                use_cache=True,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=stop_ids(model, tokenizer),
                **sampling_kwargs(gen),
                **extra,
            )
            new_tokens = generated[:, ids.shape[1] :]
            out.extend(tokenizer.batch_decode(new_tokens, skip_special_tokens=True))
    return out[: len(prompts)]


@contextlib.contextmanager
def root_gathered(model):
    """An FSDP2 root's own parameters (embeddings, final norm, LM head) gathered for the whole
    generate: its hooks gather them around the root's forward, and a PeftModel's generate
    never calls that forward (it calls the wrapped model's), so they would stay sharded."""
    from torch.distributed.fsdp import FSDPModule

    if not isinstance(model, FSDPModule):
        yield
        return
    model.unshard()
    try:
        yield
    finally:
        model.reshard()


def generation_metrics(
    model, tokenizer, examples: list[Example], gen: GenerationEvalConfig, strategy, record_to: Path | None = None,
    reasoning_close: str | None = None,
) -> tuple[dict[str, float], int, list[dict]]:
    """(mean of each metric, rows generated for, every rank's records in example order) over the
    first `gen.samples` held-out examples that have a prompt and a reference, summed over ranks.

    reasoning_close: where a response opens with reasoning closed by this tag (</think>), only
    the answer after it is scored against the reference (which never holds reasoning).

    The records (returned on rank 0, and written to `record_to` by rank 0 where given) are one
    per evaluated example: `index` (position in `examples`), `prompt`, `reference`, `response`
    (the generated text), `match` (exact match) and `scores` (every metric), so a figure can be
    read example by example and checked."""
    usable = [(i, e) for i, e in enumerate(examples) if e.prompt_ids is not None and e.reference is not None]
    usable = usable[: gen.samples]
    mine = usable[strategy.rank :: strategy.world_size]
    records: list[dict] = []
    synced = None
    if strategy.shards_parameters:
        most = len(usable[0 :: strategy.world_size])  # rank 0 always has the most
        synced = -(-most // gen.batch_size)
    if mine or synced:
        texts = generate_responses(model, tokenizer, [e.prompt_ids for _, e in mine], gen, strategy.device, synced)
        for t, (i, e) in zip(texts, mine):
            answer = strip_reasoning(t, reasoning_close)
            scores = score_response(gen.metrics, answer, e.reference)
            records.append({
                "index": i, "prompt": tokenizer.decode(e.prompt_ids), "reference": e.reference, "response": t,
                "match": answer.strip() == e.reference.strip(), "scores": scores,
            })
    sums = [sum(r["scores"][m] for r in records) for m in gen.metrics]
    *totals, total = strategy.all_reduce_sum([*sums, len(mine)])
    means = {m: s / total for m, s in zip(gen.metrics, totals, strict=True)} if total else {}
    records = gather_records(records, strategy)
    if record_to is not None and strategy.is_main:
        write_jsonl(Path(record_to), records)
    return means, int(total), records


def gather_records(records: list[dict], strategy) -> list[dict]:
    """Every rank's records on rank 0, in example order (an empty list on the other ranks)."""
    if strategy.world_size > 1:
        # Every rank takes part in the gather; rank 0 alone receives.
        gathered = [None] * strategy.world_size if strategy.is_main else None
        dist.gather_object(records, gathered, dst=0)
        records = [r for part in gathered or [] for r in part]
    return sorted(records, key=lambda r: r["index"]) if strategy.is_main else []


def write_jsonl(path: Path, records: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
