"""What a row becomes: examples (token ids and labels), and how a chat row was split into them."""

from __future__ import annotations

from dataclasses import dataclass

# The plain template (data.template=plain): what precedes a response.
PLAIN_PROMPT = "### Instruction:\n{prompt}\n\n### Response:\n"


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]  # same length as input_ids; IGNORE_INDEX where no loss; not shifted
    # The ids the model is given to generate the (last) response, generation prompt included;
    # None for text and for the earlier turns of a conversation split per turn. Not truncated:
    # it is what generation starts from.
    prompt_ids: list[int] | None = None
    reference: str | None = None  # the (last) response text, for exact-match evaluation


@dataclass
class Encoded:
    """The examples of one row, in order."""

    examples: list[Example]
    turns: str | None = None  # chat rows: whole | per_turn | last (how data.turns applied to the row)
    reasoning_turns: int = 0  # trained assistant turns whose message carries reasoning
    reasoning_not_rendered: int = 0  # of those, turns whose reasoning the chat template left out
