"""GRPO test support: a reward that varies on any text, and a training entry point whose
completions are fixed (a function of the prompt and the sample number, not of the model), so
runs on different world sizes can be compared on the loss alone.

    python tests/dist/grpo_support.py OVERRIDES...          (also under torchrun)
"""

from __future__ import annotations

import sys


def vowel_share(prompts: list[str], completions: list[str], references: list) -> list[float]:
    """The share of a completion's characters that are vowels: a reward that differs between
    any two random completions, so advantages and gradients are never all zero."""
    return [sum(c in "aeiou" for c in text) / max(len(text), 1) for text in completions]


def fixed_generate(self, model, batch, data_step: int) -> list[list[int]]:
    """Completion j of a prompt: its reference response cut by 3 j tokens, the first one whole
    and closed by the stop token (exact match 1, the others 0)."""
    out = []
    for i in batch.indices:
        reference = self.tokenizer(self.train_examples[i].reference, add_special_tokens=False)["input_ids"]
        for j in range(self.options.group_size):
            cut = reference[: max(1, len(reference) - 3 * j)]
            out.append((cut + [self.tokenizer.eos_token_id] if j == 0 else cut)[: self.options.max_new_tokens])
    return out


if __name__ == "__main__":
    from ftdist.objectives.grpo import GRPOObjective
    from ftdist.train import cli

    GRPOObjective.generate = fixed_generate
    sys.argv = ["ftdist.train", *sys.argv[1:]]
    cli()
