"""What a row becomes: examples (token ids and labels), documents to classify, and how a chat row
was split into examples."""

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
class Document:
    """A text to classify (data.format=classification): its token ids and its class."""

    input_ids: list[int]
    label: str  # the class's name as the row gave it (an integer label as its decimal string)
    target: int  # the class's index in the run's label set
    truncated: bool = False  # cut to data.max_seq_len (by the tokenizer, at encoding)

    @property
    def labels(self) -> list[int]:
        """What fingerprints hash beside the ids (checkpoint.train_data_fingerprint): the class."""
        return [self.target]


@dataclass
class Encoded:
    """The examples of one row, in order."""

    examples: list[Example]
    turns: str | None = None  # chat rows: whole | per_turn | last (how data.turns applied to the row)
    reasoning_turns: int = 0  # trained assistant turns whose message carries reasoning
    reasoning_not_rendered: int = 0  # of those, turns whose reasoning the chat template left out
