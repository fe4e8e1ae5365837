"""Rollouts for policy optimization: sampled completions to prompts, reproducible by construction.

Each completion is a function of (seed, data step, the prompt's index in the training set, its
number in the group) and of the weights, nothing else: not the world size, the micro-batch it
landed in, or the rows generated beside it. Batched sampling from one random generator cannot
give that (a row's draws depend on how many rows came before it), so sampling here is
Gumbel-max with counter-based noise: at each position, every vocabulary entry gets Gumbel
noise hashed from (row key, position, token id), and the argmax of logits / temperature plus
that noise is a draw from softmax(logits / temperature) (top-p applied first). Hugging Face's
`generate` runs greedy decoding over those perturbed scores, so it keeps its KV cache, stop
tokens and, under sharded parameters, `synced_gpus` lock-step; a resumed run regenerates the
same completions from the same weights.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ftdist.eval.generation import left_pad, root_gathered, stop_ids

# splitmix64's constants (Steele et al. 2014), as signed 64-bit integers: torch has no uint64
# arithmetic, and int64 multiplication wraps the same way.
_GOLDEN = 0x9E3779B97F4A7C15 - 2**64
_MIX1 = 0xBF58476D1CE4E5B9 - 2**64
_MIX2 = 0x94D049BB133111EB - 2**64


def _shift_right(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Logical right shift of int64 (>> is arithmetic on signed integers)."""
    return (x >> bits) & ((1 << (64 - bits)) - 1)


def splitmix64(x: torch.Tensor) -> torch.Tensor:
    x = x + _GOLDEN
    x = (x ^ _shift_right(x, 30)) * _MIX1
    x = (x ^ _shift_right(x, 27)) * _MIX2
    return x ^ _shift_right(x, 31)


def row_keys(seed: int, data_step: int, prompt_index: list[int], sample: list[int], device) -> torch.Tensor:
    """One 64-bit key per completion from (seed, data step, prompt index, sample number)."""
    key = torch.full((len(prompt_index),), seed, dtype=torch.int64, device=device)
    for part in (torch.full_like(key, data_step), torch.tensor(prompt_index, device=device),
                 torch.tensor(sample, device=device)):
        key = splitmix64(key ^ splitmix64(part))
    return key


def gumbel_noise(keys: torch.Tensor, position: int, vocab: int) -> torch.Tensor:
    """[rows, vocab] standard Gumbel noise, a pure function of (key, position, token id)."""
    ids = torch.arange(vocab, dtype=torch.int64, device=keys.device)
    bits = splitmix64(splitmix64(keys ^ splitmix64(torch.tensor(position, device=keys.device)))[:, None] ^ ids)
    u = (_shift_right(bits, 11).double() + 0.5) / 2.0**53  # 53 random bits -> (0, 1)
    return -torch.log(-torch.log(u))


def top_p_filter(scores: torch.Tensor, top_p: float) -> torch.Tensor:
    """-inf outside the smallest set of tokens whose probability reaches top_p (the first always kept)."""
    if top_p >= 1.0:
        return scores
    ordered, order = scores.sort(dim=-1, descending=True)
    before = ordered.softmax(-1).cumsum(-1) - ordered.softmax(-1)  # mass of the tokens ranked above
    drop = torch.zeros_like(scores, dtype=torch.bool).scatter(-1, order, before >= top_p)
    return scores.masked_fill(drop, float("-inf"))


class SeededSampling:
    """A logits processor for `generate(do_sample=False)`: scores -> logits / T (top-p filtered)
    plus the rows' Gumbel noise at this position, so the greedy pick is a seeded sample."""

    def __init__(self, keys: torch.Tensor, prompt_width: int, temperature: float, top_p: float):
        self.keys, self.prompt_width, self.temperature, self.top_p = keys, prompt_width, temperature, top_p

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        position = input_ids.shape[1] - self.prompt_width
        scores = top_p_filter(scores.float() / self.temperature, self.top_p)
        return scores + gumbel_noise(self.keys, position, scores.shape[-1]).to(scores.dtype)


@dataclass
class Sampling:
    group_size: int
    max_new_tokens: int
    temperature: float
    top_p: float
    seed: int


@torch.no_grad()
def sample_completions(model, tokenizer, prompts: list[list[int]], prompt_index: list[int], data_step: int,
                       sampling: Sampling, device, synced: bool) -> list[list[int]]:
    """group_size completions (token ids, stop token included where one was generated) for each
    prompt, group by group in prompt order. synced: parameters are sharded, so every rank runs
    this call together (the same number of prompts on each) and generate keeps them in step."""
    g = sampling.group_size
    rows = [p for p in prompts for _ in range(g)]
    keys = row_keys(sampling.seed, data_step, [i for i in prompt_index for _ in range(g)], list(range(g)) * len(prompts),
                    device)
    ids, mask = left_pad(rows, tokenizer.pad_token_id)
    stops = stop_ids(model, tokenizer)
    was_training = model.training
    model.eval()
    try:
        with root_gathered(model):
            out = model.generate(
                input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=sampling.max_new_tokens,
                do_sample=False, temperature=None, top_p=None, top_k=None, use_cache=True,
                pad_token_id=tokenizer.pad_token_id, eos_token_id=stops,
                logits_processor=[SeededSampling(keys, ids.shape[1], sampling.temperature, sampling.top_p)],
                **({"synced_gpus": True} if synced else {}),
            )
    finally:
        model.train(was_training)
    return [cut_at_stop(row, stops) for row in out[:, ids.shape[1]:].tolist()]


def cut_at_stop(tokens: list[int], stops: list[int]) -> list[int]:
    """A generated row up to and including its first stop token (what follows is padding)."""
    for i, t in enumerate(tokens):
        if t in stops:
            return tokens[: i + 1]
    return tokens
