"""Conversations -> labelled examples, rendered exactly as the model's chat template renders them.

Where the loss goes is found in the rendered text, not guessed from roles. For assistant message
i, the conversation before it rendered with the generation prompt (what the model is given at
inference) must be the start of the conversation rendered up to and including it; the text in
between is what the model has to produce, and carries the loss. Characters map to tokens through
the fast tokenizer's offsets, so a token that straddles a boundary is still labelled.

`data.turns` chooses how a conversation becomes examples:
- whole: one example, the conversation rendered once, every assistant turn labelled. Valid only
  where the conversation rendered up to each assistant turn is the start of the whole rendering
  (the template renders a conversation as the extension of its turns). Templates of reasoning
  models break this: they drop the reasoning of earlier turns.
- per_turn: one example per assistant turn, its context rendered as at inference, loss on that
  turn only.
- last: the final assistant turn only, as per_turn renders it.
- auto: whole where the row has the property, per_turn where it does not.

A template with `{% generation %}` blocks marks the assistant's tokens itself; its mask
(`return_assistant_tokens_mask`) replaces the text difference inside each trained turn.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

from ftdist.config import CHOICES
from ftdist.constants import IGNORE_INDEX
from ftdist.data.example import Encoded, Example
from ftdist.data.sources import BadRow, DataError

TURNS = CHOICES["data.turns"]  # the config's list; checked again here for a DataConfig built in code
CHAT_TEMPLATE_FILE = "chat_template.jinja"  # a run directory's copy of data.chat_template
GENERATION_BLOCK = re.compile(r"\{%-?\s*generation\s*-?%\}")


@dataclass
class _Turn:
    index: int  # message index of the assistant turn
    before: str  # conversation before it, with the generation prompt
    upto: str  # conversation up to and including it


class ChatEncoder:
    """Renders checked conversations with `tokenizer`'s chat template and labels them per `cfg`."""

    def __init__(self, cfg, tokenizer):
        if cfg.turns not in TURNS:
            raise DataError(f"data.turns={cfg.turns!r} is not one of {', '.join(TURNS)}")
        if not getattr(tokenizer, "is_fast", False):
            raise DataError("chat data needs a fast tokenizer (labels are placed through its character offsets); "
                            f"{type(tokenizer).__name__} is not one")
        self.cfg = cfg
        self.tok = tokenizer
        template = tokenizer.chat_template
        self.generation_blocks = isinstance(template, str) and bool(GENERATION_BLOCK.search(template))
        self.open_tag, self.close_tag = cfg.reasoning_tags
        # Control tokens a turn can end with: whitespace the template puts after them is layout the
        # model never produces (generation stops at the token), so it carries no loss.
        self.end_markers = tuple(t.content for t in tokenizer.added_tokens_decoder.values() if t.content.strip())

    def render(self, messages: list[dict], tools: list | None, generation_prompt: bool = False) -> str:
        from jinja2 import TemplateError, TemplateSyntaxError

        try:
            return self.tok.apply_chat_template(
                messages, tools=tools, tokenize=False, add_generation_prompt=generation_prompt,
                **dict(self.cfg.chat_template_kwargs),
            )
        except TemplateSyntaxError as e:  # the template itself is broken: every row would fail
            raise DataError(f"the chat template does not compile: {e.message} (template line {e.lineno})") from None
        except TemplateError as e:
            # Only what the template raises on purpose (raise_exception: role order, a missing
            # system turn) says this row is wrong. Any other error, jinja's subclasses included
            # (an undefined variable), is a bug of the template, the tokenizer or ftdist: it propagates.
            if type(e) is not TemplateError:
                raise
            raise BadRow("template_error", f"the chat template rejected the messages: {e}") from None

    def tokenize(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        return encode_text(self.tok, text)

    def prompt_alone(self, messages: list[dict], tools: list | None) -> Example:
        """A conversation awaiting the assistant (data.responses=optional): the ids a reply is
        generated from, nothing labelled, no reference."""
        ids = self.tokenize(self.render(messages, tools, generation_prompt=True))[0]
        return Example(ids, [IGNORE_INDEX] * len(ids), list(ids), None)

    def encode(self, messages: list[dict], tools: list | None) -> Encoded:
        assistant = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
        if not assistant:
            raise BadRow("no_assistant_turn", f"the {len(messages)} messages have no assistant turn")
        for i in assistant:
            if not messages[i].get("content", "").strip() and "tool_calls" not in messages[i]:
                raise BadRow("empty_response", f"assistant message {i + 1} has no content and no tool calls")
        last = assistant[-1]
        reference = _answer(messages[last], self.close_tag)
        full = self.render(messages, tools)
        if self.cfg.train_on_prompt:  # every token is labelled: no turn needs locating
            ids, _ = self.tokenize(full)
            prompt_ids = self.tokenize(self.render(messages[:last], tools, generation_prompt=True))[0]
            return Encoded([Example(ids, list(ids), prompt_ids, reference)], "whole")
        turns = [self._turn(messages, tools, i, full) for i in (assistant if self.cfg.turns != "last" else [last])]
        _check_tools_rendered(full, tools, turns, messages)
        extension = [t for t in turns if not full.startswith(t.upto)]
        if self.cfg.turns == "whole" and extension:
            raise BadRow("not_extension", f"the chat template renders this conversation differently from its "
                                          f"turns (at assistant message {extension[0].index + 1}); data.turns=auto "
                                          "or per_turn trains it turn by turn")
        mode = "whole" if self.cfg.turns in ("whole", "auto") and not extension else (
            "last" if self.cfg.turns == "last" else "per_turn")
        if mode == "whole":
            example, hidden = self._example(messages, tools, full, turns)
            examples = [example]
        else:
            examples, hidden = [], 0
            for turn in turns:
                example, h = self._example(messages[: turn.index + 1], tools, turn.upto, [turn])
                examples.append(example)
                hidden += h
        # Generation (exact match) starts from the last turn's inference context.
        examples[-1].prompt_ids = self.tokenize(turns[-1].before)[0]
        examples[-1].reference = reference
        reasoning = sum(_has_reasoning(messages[t.index], self.open_tag, self.close_tag) for t in turns)
        return Encoded(examples, mode, reasoning_turns=reasoning, reasoning_not_rendered=hidden)

    def _turn(self, messages: list[dict], tools: list | None, i: int, full: str | None = None) -> _Turn:
        """`full`: the whole conversation's rendering where the caller has it; it is `upto` when
        turn i is the last message (one rendering fewer)."""
        before = self.render(messages[:i], tools, generation_prompt=True)
        upto = full if full is not None and i + 1 == len(messages) else self.render(messages[: i + 1], tools)
        if not upto.startswith(before):
            raise DataError(
                f"the chat template starts assistant message {i + 1} differently at inference (the conversation "
                "before it with the generation prompt) and in training (the conversation up to it), so the "
                "assistant's tokens cannot be located. Use a chat template whose generation prompt is the start "
                "of the assistant turn it renders (data.chat_template=PATH), or data.train_on_prompt=true"
            )
        return _Turn(i, before, upto)

    def _example(self, messages: list[dict], tools: list | None, text: str, turns: list[_Turn]) -> tuple[Example, int]:
        """`text` (a rendering of `messages`) labelled on `turns`; and how many of those turns'
        reasoning the template left out of the rendering."""
        ids, offsets = self.tokenize(text)
        turn_spans = [(len(t.before), len(t.upto)) for t in turns]
        if self.generation_blocks:
            # The template's own marks decide, inside the trained turns only (per_turn: the last one).
            marks = self._generation_mask(messages, tools, ids)
            labelled = [a and b for a, b in zip(_overlapping(offsets, turn_spans), marks)]
        else:
            labelled = _overlapping(offsets, [self._trimmed(text, s, e) for s, e in turn_spans])
        hidden = 0
        for turn, (start, end) in zip(turns, turn_spans):
            region = self._reasoning_region(text, start, end, messages[turn.index])
            if region is None:
                hidden += _has_reasoning(messages[turn.index], self.open_tag, self.close_tag)
            elif not self.cfg.train_on_reasoning:
                labelled = [on and not region[0] <= s < region[1] for on, (s, _) in zip(labelled, offsets)]
        labels = [t if on else IGNORE_INDEX for t, on in zip(ids, labelled)]
        return Example(ids, labels), hidden

    def _trimmed(self, text: str, start: int, end: int) -> tuple[int, int]:
        """A turn's characters less the layout whitespace a template puts after a closing control
        token (Qwen's newline after <|im_end|>): generation stops at the token, so the model never
        produces what follows it."""
        body = text[start:end]
        stripped = body.rstrip()
        if len(stripped) < len(body) and stripped.endswith(self.end_markers):
            end = start + len(stripped)
        return start, end

    def _generation_mask(self, messages: list[dict], tools: list | None, ids: list[int]) -> list[bool]:
        out = self.tok.apply_chat_template(
            messages, tools=tools, tokenize=True, return_dict=True, return_assistant_tokens_mask=True,
            **dict(self.cfg.chat_template_kwargs),
        )
        if list(out["input_ids"]) != ids:
            raise DataError("the tokenizer tokenizes the chat template's rendering differently with "
                            "return_assistant_tokens_mask; its {% generation %} mask cannot be used")
        return [bool(m) for m in out["assistant_masks"]]

    def _reasoning_region(self, text: str, start: int, end: int, message: dict) -> tuple[int, int] | None:
        """Characters of the turn's reasoning block (tags and the whitespace after them included),
        or None where the rendering shows none."""
        body = text[start:end]
        close = body.find(self.close_tag)
        if close >= 0:
            opened = body.rfind(self.open_tag, 0, close)
            stop = close + len(self.close_tag)
            stop += len(body[stop:]) - len(body[stop:].lstrip())
            return start + max(opened, 0), start + stop
        reasoning = message.get("reasoning_content", "").strip()
        if reasoning and reasoning in body:  # a template that renders reasoning without tags
            at = body.index(reasoning)
            return start + at, start + at + len(reasoning)
        return None


def _check_tools_rendered(full: str, tools: list | None, turns: list[_Turn], messages: list[dict]) -> None:
    """A template that ignores tools or tool calls would train the model on turns without them."""
    for t in turns:
        rendered = t.upto[len(t.before):]
        for call in messages[t.index].get("tool_calls", []):
            if call["function"]["name"] not in rendered:
                raise DataError(
                    f"the chat template left out the tool call to {call['function']['name']!r} of assistant "
                    f"message {t.index + 1} (it does not render tool_calls); use a template that does "
                    "(data.chat_template=PATH)"
                )
    for tool in tools or []:
        if tool["function"]["name"] not in full:
            raise DataError(f"the chat template left out the row's tool {tool['function']['name']!r} (it does not "
                            "render the tools list); use a template that does (data.chat_template=PATH)")


def encode_text(tokenizer, text: str) -> tuple[list[int], list[tuple[int, int]]]:
    """Ids and character offsets of `text`, no special tokens added: what
    `tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)` returns, straight
    from the fast tokenizer's backend where no truncation or padding is set on it (transformers'
    wrapper costs as much as the tokenization itself on short rows)."""
    backend = getattr(tokenizer, "backend_tokenizer", None) if getattr(tokenizer, "is_fast", False) else None
    if (backend is not None and backend.truncation is None and backend.padding is None
            and backend.encode_special_tokens == bool(getattr(tokenizer, "split_special_tokens", False))):
        enc = backend.encode(text, add_special_tokens=False)
        return enc.ids, enc.offsets
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=bool(getattr(tokenizer, "is_fast", False)))
    return enc["input_ids"], [tuple(o) for o in enc.get("offset_mapping", [])]


def _overlapping(offsets: list[tuple[int, int]], spans: list[tuple[int, int]]) -> list[bool]:
    """Per token: does it overlap any character span (a token straddling a boundary counts)."""
    if len(spans) == 1:  # the common case (one trained turn), without a generator per token
        (start, end), = spans
        return [s < end and e > start for s, e in offsets]
    return [any(s < end and e > start for start, end in spans) for s, e in offsets]


def _has_reasoning(message: dict, open_tag: str, close_tag: str) -> bool:
    content = message.get("content", "")
    return bool(message.get("reasoning_content", "").strip()) or (close_tag in content and open_tag in content)


def _answer(message: dict, close_tag: str) -> str | None:
    """The final answer of an assistant message (its reasoning left out): the exact-match reference."""
    return strip_reasoning(message.get("content", ""), close_tag).strip() or None


def strip_reasoning(text: str, close_tag: str | None) -> str:
    """A generated response without the reasoning block before its answer."""
    return text.split(close_tag)[-1] if close_tag and close_tag in text else text


def show_labels(tokenizer, example: Example, open_mark: str = "[[", close_mark: str = "]]") -> str:
    """The example's text with every run of labelled tokens wrapped in marks, for a reader to check."""
    out, inside = [], False
    for token, label in zip(example.input_ids, example.labels):
        on = label != IGNORE_INDEX
        if on != inside:
            out.append(open_mark if on else close_mark)
            inside = on
        out.append(tokenizer.decode([token]))
    return "".join(out) + (close_mark if inside else "")


def use_chat_template_file(tokenizer, path: str | None):
    """Replace `tokenizer`'s chat template with the file's (data.chat_template); the tokenizer
    then saves it with final/, so the served model renders conversations as it was trained."""
    if path is not None:
        try:
            with open(os.path.expanduser(path), encoding="utf-8") as f:
                tokenizer.chat_template = f.read()
        except OSError as e:
            raise DataError(f"data.chat_template={path}: cannot read it: {e.strerror}") from None
    return tokenizer
