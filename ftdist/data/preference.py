"""Preference rows -> pairs: one prompt, a chosen and a rejected response, each a labelled sequence.

A row has `data.fields.prompt`, `data.fields.chosen` and `data.fields.rejected`. Either all
are strings, rendered as the instruction format renders a prompt and its response (the chat
template's one-turn conversation, or the plain template), or the prompt is a conversation (a
list of messages) and each response the assistant message(s) that follow it: a string, one
message, or a list of messages (assistant turns, with tool results between them).

The prompt is rendered and tokenized once, apart from the responses, so both sequences of a
pair start with the very same prompt tokens: no token straddling the prompt's end can merge
differently with the two responses. Only the responses carry labels (the end-of-turn token
included); a pair whose two responses encode to the same tokens teaches nothing and is a bad
row of its own kind (`same_responses`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from ftdist.constants import IGNORE_INDEX
from ftdist.data.example import PLAIN_PROMPT, Encoded, Example
from ftdist.data.messages import conversation, row_field, type_name
from ftdist.data.sources import BadRow, DataError


@dataclass
class Pair:
    """Both sequences of one preference pair: prompt + response, labelled on the response."""

    chosen: Example
    rejected: Example
    # Reference log-probabilities of the chosen and rejected responses, where they were
    # precomputed (objective.reference=precomputed); None otherwise.
    reference_logps: tuple[float, float] | None = None
    margin: float | None = None  # reward models: the row's objective.margin field, where set

    @property
    def input_ids(self) -> list[int]:
        """Both sequences' ids, for fingerprints: chosen then rejected."""
        return self.chosen.input_ids + self.rejected.input_ids

    @property
    def labels(self) -> list[int]:
        return self.chosen.labels + self.rejected.labels

    def __len__(self) -> int:
        return len(self.chosen.input_ids) + len(self.rejected.input_ids)


def encode_pair(encoder, row: dict) -> Encoded:
    """The pair of `row`; `encoder` is the data.RowEncoder (its tokenizer, bos/eos and chat encoder)."""
    encoded = _encode_pair(encoder, row)
    if encoder.margin_field is not None:
        encoded.examples[0].margin = pair_margin(row, encoder.margin_field)
    return encoded


def pair_margin(row: dict, name: str) -> float:
    value = row_field(row, name)
    if isinstance(value, str):
        try:
            value = float(value)  # CSV and TSV cells are text
        except ValueError:
            pass
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise BadRow("bad_margin", f"field '{name}' (objective.margin) must be a finite number, got {value!r}")
    return float(value)


def _encode_pair(encoder, row: dict) -> Encoded:
    fields = encoder.fields
    prompt_ids, responses, labels, plain = encode_responses(encoder, row, [fields.chosen, fields.rejected])
    return _pair(prompt_ids, responses, labels, row[fields.chosen] if plain else None)


def encode_scored(encoder, row: dict, response_field: str) -> list[int]:
    """The token ids of one prompt + response, exactly as one sequence of a training pair: what a
    reward model scores (ftdist.score)."""
    prompt_ids, responses, labels, _ = encode_responses(encoder, row, [response_field])
    if not any(label != IGNORE_INDEX for label in labels[0]):
        raise BadRow("empty_response", "the response renders to no token the model produces")
    return prompt_ids + responses[0]


def encode_responses(encoder, row: dict, names: list[str]) -> tuple[list[int], list[list[int]], list[list[int]], bool]:
    """(prompt ids, each named response's ids, their labels, whether the plain template rendered
    them) for the row's prompt and the responses in fields `names`, each after the same prompt ids."""
    fields = encoder.fields
    prompt = row_field(row, fields.prompt)
    values = [row_field(row, name) for name in names]
    if isinstance(prompt, list):
        if encoder.chat is None:
            raise DataError(f"field '{fields.prompt}' is a list of messages: it needs the chat template "
                            f"(data.template=auto|chat with a tokenizer that has one)")
        tools = row.get(fields.tools) if fields.tools else None
        return (*_chat_responses(encoder, prompt, list(zip(names, values)), tools), False)
    if not isinstance(prompt, str):
        raise BadRow("wrong_type", f"field '{fields.prompt}' must be a string or a list of messages, got {type_name(prompt)}")
    if not prompt.strip():
        raise BadRow("empty_prompt", f"field '{fields.prompt}' is empty")
    context = row.get(fields.input) if fields.input else None
    if isinstance(context, str) and context.strip():
        prompt = f"{prompt}\n\n{context}"
    if encoder.chat is not None:
        return (*_chat_responses(encoder, [{"role": "user", "content": prompt}], list(zip(names, values)), None), False)
    prompt_ids = encoder.bos + encoder.ids(PLAIN_PROMPT.format(prompt=prompt))
    responses = []
    for name, value in zip(names, values):
        if not isinstance(value, str):
            raise BadRow("wrong_type", f"field '{name}' must be a string with data.template=plain, got {type_name(value)}")
        if not value.strip():
            raise BadRow("empty_response", f"field '{name}' is empty")
        ids = encoder.ids(value) + [encoder.eos]
        responses.append(ids)
    return prompt_ids, responses, [list(r) for r in responses], True


def _chat_responses(encoder, prompt: list, responses: list[tuple[str, Any]], tools: Any):
    """(prompt ids, response ids, labels) of each (field name, value) after a message-list prompt."""
    chat = encoder.chat
    turns = [(name, _response_messages(value, name)) for name, value in responses]
    # Each side is checked as the whole conversation it is (tool results answer calls, tools exist).
    conversations = [conversation(prompt + msgs, tools, encoder.fields.prompt, encoder.cfg.system_prompt)
                     for _, msgs in turns]
    first, checked_tools = conversations[0]
    start = len(first) - len(turns[0][1])
    before = chat.render(first[:start], checked_tools, generation_prompt=True)
    prompt_ids, _ = chat.tokenize(before)
    ids_out, labels = [], []
    for (name, _), (conv, _) in zip(turns, conversations):
        ids, lab = _chat_response(chat, conv, start, checked_tools, before, name)
        ids_out.append(ids)
        labels.append(lab)
    return prompt_ids, ids_out, labels


def _chat_response(chat, conv: list[dict], start: int, tools, before: str, name: str) -> tuple[list[int], list[int]]:
    """Token ids of the response text (the conversation rendered after `before`) and their labels:
    the assistant turns, not the tool results between them nor layout after an end-of-turn token."""
    full = chat.render(conv, tools)
    if not full.startswith(before):
        raise BadRow("not_extension", f"the chat template renders prompt + '{name}' differently from the prompt "
                                      "with its generation prompt; the response cannot be located")
    text = full[len(before):]
    ids, offsets = chat.tokenize(text)
    spans = []
    for i in range(start, len(conv)):
        if conv[i]["role"] != "assistant":
            continue
        turn = chat._turn(conv, tools, i, full)
        s, e = chat._trimmed(turn.upto, len(turn.before), len(turn.upto))
        spans.append((s - len(before), e - len(before)))
    # The last turn's trailing layout (Qwen's newline after <|im_end|>) is not part of the response.
    end = spans[-1][1]
    keep = [i for i, (s, _) in enumerate(offsets) if s < end]
    ids, offsets = [ids[i] for i in keep], [offsets[i] for i in keep]
    labels = [t if any(s < e2 and e > s2 for s2, e2 in spans) else IGNORE_INDEX for t, (s, e) in zip(ids, offsets)]
    return ids, labels


def _response_messages(value: Any, name: str) -> list:
    if isinstance(value, str):
        if not value.strip():
            raise BadRow("empty_response", f"field '{name}' is empty")
        return [{"role": "assistant", "content": value}]
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, list) or not value:
        raise BadRow("wrong_type", f"field '{name}' must be a string, a message or a non-empty list of messages, "
                                   f"got {type_name(value) if value != [] else 'an empty list'}")
    roles = [m.get("role") if isinstance(m, dict) else None for m in value]
    if roles[0] != "assistant" or roles[-1] != "assistant" or any(r not in ("assistant", "tool") for r in roles):
        raise BadRow("bad_response", f"field '{name}' must be assistant turns (with tool results between them), "
                                     f"starting and ending with an assistant message; got roles {roles}")
    return value


def _pair(prompt_ids: list[int], responses: list[list[int]], labels: list[list[int]], reference: str | None) -> Encoded:
    if responses[0] == responses[1]:
        raise BadRow("same_responses", "chosen and rejected are the same response (nothing to prefer)")
    if not any(label != IGNORE_INDEX for label in labels[0]) or not any(label != IGNORE_INDEX for label in labels[1]):
        raise BadRow("empty_response", "a response renders to no token the model produces")
    masked = [IGNORE_INDEX] * len(prompt_ids)
    chosen, rejected = (
        Example(prompt_ids + ids, masked + lab, list(prompt_ids), reference)
        for ids, lab in zip(responses, labels)
    )
    return Encoded([Pair(chosen, rejected)])


