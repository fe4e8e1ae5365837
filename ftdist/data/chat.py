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

import json
import os
import re
from dataclasses import dataclass
from typing import Any

from ftdist.constants import IGNORE_INDEX
from ftdist.data.example import Encoded, Example
from ftdist.data.sources import BadRow, DataError

ROLES = ("system", "user", "assistant", "tool")
TURNS = ("auto", "whole", "per_turn", "last")
# Names datasets use for an assistant's reasoning; transformers reads all three the same way.
REASONING_KEYS = ("reasoning_content", "reasoning", "thinking")
CHAT_TEMPLATE_FILE = "chat_template.jinja"  # a run directory's copy of data.chat_template
GENERATION_BLOCK = re.compile(r"\{%-?\s*generation\s*-?%\}")


def type_name(value: Any) -> str:
    names = {dict: "object", list: "array", str: "string", bool: "boolean", int: "number",
             float: "number", type(None): "null"}
    return names.get(type(value), type(value).__name__)


# --- checking a row's messages and tools (each failure is a BadRow of a stable kind) ----------


def conversation(messages: Any, tools: Any, messages_field: str, system_prompt: str | None) -> tuple[list, list | None]:
    """The row's messages and tools as the template receives them, or BadRow."""
    if not isinstance(messages, list):
        raise BadRow("wrong_type", f"field '{messages_field}' must be a list of messages, got {type_name(messages)}")
    tools = _tools(tools)
    names = {t["function"]["name"] for t in tools} if tools else None
    checked = [_message(m, i, names) for i, m in enumerate(messages)]
    _check_tool_results(checked)
    if system_prompt and not any(m["role"] == "system" for m in checked):
        checked.insert(0, {"role": "system", "content": system_prompt})
    return checked, tools


def _message(message: Any, index: int, tool_names: set[str] | None) -> dict:
    where = f"message {index + 1}"
    if not isinstance(message, dict):
        raise BadRow("bad_message", f"{where} is a {type_name(message)}, not an object with role and content")
    role = message.get("role")
    if role is None:
        raise BadRow("bad_message", f"{where} has no 'role'")
    if role not in ROLES:
        raise BadRow("bad_message", f"{where} has role {role!r}; expected one of {', '.join(ROLES)}")
    out: dict[str, Any] = {"role": role}
    calls = message.get("tool_calls")
    if calls is not None and role != "assistant":
        raise BadRow("bad_tool_call", f"{where} has tool_calls but role {role!r}; only assistant messages call tools")
    if calls is not None:
        out["tool_calls"] = _tool_calls(calls, where, tool_names)
    content = _content(message.get("content"), where, role)
    if content is None and "tool_calls" not in out:
        raise BadRow("bad_message", f"{where} has no 'content'" + (" and no tool_calls" if role == "assistant" else ""))
    if content is not None:
        out["content"] = content
    reasoning = next((message[k] for k in REASONING_KEYS if message.get(k) is not None), None)
    if reasoning is not None:
        if role != "assistant" or not isinstance(reasoning, str):
            raise BadRow("bad_message", f"{where}: reasoning must be a string on an assistant message")
        out["reasoning_content"] = reasoning
    if role == "tool":
        for key in ("tool_call_id", "name"):
            if message.get(key) is not None:
                out[key] = str(message[key])
    # Only these keys reach the template, so a row's extra keys cannot change the rendering.
    return out


def _content(content: Any, where: str, role: str) -> str | None:
    if content is None or isinstance(content, str):
        return content
    if isinstance(content, list):  # OpenAI-style content parts; text only
        texts = []
        for part in content:
            if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                kind = part.get("type") if isinstance(part, dict) else type_name(part)
                raise BadRow("bad_message", f"{where} has a content part of type {kind!r}; only text parts are read")
            texts.append(part["text"])
        return "".join(texts)
    if role == "tool" and isinstance(content, dict):
        return json.dumps(content, ensure_ascii=False)  # a structured tool result, rendered as its JSON
    raise BadRow("bad_message", f"{where} content must be a string, got {type_name(content)}")


def _tools(tools: Any) -> list | None:
    """A row's tool list as JSON-schema function specs ({"type": "function", "function": {...}})."""
    if tools is None:
        return None
    if isinstance(tools, str):  # datasets often store the list as a JSON string
        try:
            tools = json.loads(tools)
        except json.JSONDecodeError as e:
            raise BadRow("bad_tools", f"the tools string is not valid JSON: {e.msg} (column {e.colno})") from None
    if not isinstance(tools, list):
        raise BadRow("bad_tools", f"tools must be a list of function specs, got {type_name(tools)}")
    out = []
    for i, tool in enumerate(tools):
        spec = tool.get("function", tool) if isinstance(tool, dict) else None
        if not isinstance(spec, dict) or not isinstance(spec.get("name"), str) or not spec["name"]:
            raise BadRow("bad_tools", f"tool {i + 1} has no function name")
        out.append({"type": "function", "function": spec})
    return out or None


def _tool_calls(calls: Any, where: str, tool_names: set[str] | None) -> list[dict]:
    if not isinstance(calls, list) or not calls:
        raise BadRow("bad_tool_call", f"{where}: tool_calls must be a non-empty list, got {type_name(calls)}")
    out = []
    for n, call in enumerate(calls, 1):
        at = f"{where} tool call {n}"
        fn = call.get("function", call) if isinstance(call, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise BadRow("bad_tool_call", f"{at} has no function name")
        if tool_names is not None and fn["name"] not in tool_names:
            raise BadRow("unknown_tool", f"{at} calls {fn['name']!r}, which is not in the row's tools "
                                         f"({', '.join(sorted(tool_names))})")
        args = fn.get("arguments", {})
        if isinstance(args, str):
            try:
                args = json.loads(args) if args.strip() else {}
            except json.JSONDecodeError as e:
                raise BadRow("bad_tool_arguments", f"{at} ({fn['name']}): arguments are not valid JSON: "
                                                   f"{e.msg} (column {e.colno})") from None
        if not isinstance(args, dict):
            raise BadRow("bad_tool_arguments", f"{at} ({fn['name']}): arguments must be a JSON object, "
                                               f"got {type_name(args)}")
        # Templates serialize arguments themselves (`| tojson`); a dict renders once, not as a string in a string.
        normal = {"type": "function", "function": {"name": fn["name"], "arguments": args}}
        if isinstance(call, dict) and call.get("id") is not None:
            normal["id"] = str(call["id"])
        out.append(normal)
    return out


def _check_tool_results(messages: list[dict]) -> None:
    """Each tool message answers a call of the assistant message before its run of tool messages."""
    calls: list[dict] = []
    for i, m in enumerate(messages):
        if m["role"] == "assistant":
            calls = m.get("tool_calls", [])
        elif m["role"] == "tool":
            if not calls:
                raise BadRow("bad_tool_result", f"message {i + 1} is a tool result with no assistant tool call before it")
            ids = {c["id"] for c in calls if "id" in c}
            if "tool_call_id" in m and ids and m["tool_call_id"] not in ids:
                raise BadRow("bad_tool_result", f"message {i + 1} answers tool_call_id {m['tool_call_id']!r}, "
                                                f"which no call before it has ({', '.join(sorted(ids))})")
        else:
            calls = []


# --- rendering and labelling ---------------------------------------------------------------


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
        enc = self.tok(text, add_special_tokens=False, return_offsets_mapping=True)
        return enc["input_ids"], [tuple(o) for o in enc["offset_mapping"]]

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
        turns = [self._turn(messages, tools, i) for i in (assistant if self.cfg.turns != "last" else [last])]
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

    def _turn(self, messages: list[dict], tools: list | None, i: int) -> _Turn:
        before = self.render(messages[:i], tools, generation_prompt=True)
        upto = self.render(messages[: i + 1], tools)
        if not upto.startswith(before):
            raise DataError(
                f"the chat template starts assistant message {i + 1} differently at inference (the conversation "
                "before it with the generation prompt) and in training (the conversation up to it), so the "
                "assistant's tokens cannot be located. Use a template with {% generation %} blocks around "
                "assistant content that keeps this property (data.chat_template=PATH), or data.train_on_prompt=true"
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


def _overlapping(offsets: list[tuple[int, int]], spans: list[tuple[int, int]]) -> list[bool]:
    """Per token: does it overlap any character span (a token straddling a boundary counts)."""
    return [any(s < end and e > start for start, end in spans) for s, e in offsets]


def _has_reasoning(message: dict, open_tag: str, close_tag: str) -> bool:
    content = message.get("content", "")
    return bool(message.get("reasoning_content", "").strip()) or (close_tag in content and open_tag in content)


def _answer(message: dict, close_tag: str) -> str | None:
    """The final answer of an assistant message (its reasoning left out): the exact-match reference."""
    content = message.get("content", "")
    if close_tag in content:
        content = content.split(close_tag)[-1]
    return content.strip() or None


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
