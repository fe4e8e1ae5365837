"""Formats: one row -> input_ids and labels (unshifted, -100 where no loss), per `data.format`.

- instruction: prompt (+ optional input) and response, rendered with the tokenizer's chat
  template or a plain "### Instruction / ### Response" template;
- chat: a list of {role, content} messages rendered with the chat template;
- text: bos + text + eos, every token labelled.

Response-only labels under a chat template rest on one property: the conversation up to an
assistant turn, rendered with the generation prompt, tokenizes to a prefix of the conversation
including that turn. The tokens in between are the assistant's. This works for any template
that has the property and is checked on every row, so a template without it fails loudly
instead of training on a wrong mask.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ftdist.config import DataConfig
from ftdist.constants import IGNORE_INDEX
from ftdist.data.sources import BadRow, DataError

ROLES = ("system", "user", "assistant")
PLAIN_PROMPT = "### Instruction:\n{prompt}\n\n### Response:\n"


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]  # same length as input_ids; IGNORE_INDEX where no loss; not shifted
    # The ids the model is given to generate the (last) response, generation prompt included;
    # None for text. Not truncated: it is what generation starts from.
    prompt_ids: list[int] | None = None
    reference: str | None = None  # the (last) response text, for exact-match evaluation


def uses_chat_template(cfg: DataConfig, tokenizer) -> bool:
    """Whether rows render through the chat template; raises DataError when that cannot work."""
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if cfg.format == "chat":
        if cfg.template == "plain":
            raise DataError("data.format=chat renders with the chat template; data.template=plain cannot apply")
        if not has_template:
            raise DataError("data.format=chat needs a tokenizer with a chat_template, and this one has none")
        return True
    if cfg.format == "text":
        return False
    if cfg.template == "chat" and not has_template:
        raise DataError("data.template=chat but the tokenizer has no chat_template; use data.template=plain")
    return cfg.template == "chat" or (cfg.template == "auto" and has_template)


class RowEncoder:
    """Encodes one row for `cfg.format`; raises BadRow for a malformed row."""

    def __init__(self, cfg: DataConfig, tokenizer):
        if cfg.format not in ("instruction", "chat", "text"):
            raise DataError(f"data.format={cfg.format!r} is not one of instruction, chat, text")
        self.cfg = cfg
        self.fields = cfg.fields
        self.tok = tokenizer
        self.chat = uses_chat_template(cfg, tokenizer)
        # Rows are tokenized without special tokens and bos/eos are placed explicitly, so the
        # result is the same whether or not this tokenizer adds bos by itself.
        self.bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
        if not self.chat and tokenizer.eos_token_id is None:
            raise DataError("the tokenizer has no eos_token; the plain and text formats end every example with it")
        self.eos = tokenizer.eos_token_id

    @property
    def template_name(self) -> str:
        return "chat" if self.chat else ("none" if self.cfg.format == "text" else "plain")

    def __call__(self, value: Any) -> Example:
        if not isinstance(value, dict):
            raise BadRow("not_an_object", f"row is a JSON {_type_name(value)}, not an object")
        if self.cfg.format == "text":
            return self.text(value)
        if self.cfg.format == "chat":
            return self.chat_row(value)
        return self.instruction(value)

    def ids(self, text: str) -> list[int]:
        return self.tok(text, add_special_tokens=False)["input_ids"]

    # --- formats ---------------------------------------------------------------------------

    def text(self, row: dict) -> Example:
        text = _text_field(row, self.fields.text)
        input_ids = self.bos + self.ids(text) + [self.eos]
        return Example(input_ids, list(input_ids))

    def instruction(self, row: dict) -> Example:
        prompt = _text_field(row, self.fields.prompt)
        response = _text_field(row, self.fields.response)
        context = _optional_text_field(row, self.fields.input)
        if context:
            prompt = f"{prompt}\n\n{context}"
        if self.chat:
            return self.encode_chat([{"role": "user", "content": prompt}, {"role": "assistant", "content": response}])
        # Prompt and response are tokenized apart so no token straddles the boundary and the
        # label mask falls exactly on the response.
        prompt_ids = self.bos + self.ids(PLAIN_PROMPT.format(prompt=prompt))
        response_ids = self.ids(response) + [self.eos]
        prompt_labels = list(prompt_ids) if self.cfg.train_on_prompt else [IGNORE_INDEX] * len(prompt_ids)
        return Example(prompt_ids + response_ids, prompt_labels + response_ids, prompt_ids, response)

    def chat_row(self, row: dict) -> Example:
        messages = _field(row, self.fields.messages)
        if not isinstance(messages, list):
            raise BadRow("wrong_type", f"field '{self.fields.messages}' must be a list of messages, "
                                       f"got {_type_name(messages)}")
        return self.encode_chat([_message(m, i) for i, m in enumerate(messages)])

    # --- chat-template rendering -----------------------------------------------------------

    def render(self, messages: list[dict], add_generation_prompt: bool = False) -> list[int]:
        from jinja2 import TemplateError, TemplateSyntaxError

        try:
            text = self.tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
        except TemplateSyntaxError as e:  # the template itself is broken: every row would fail
            raise DataError(f"the tokenizer's chat template does not compile: {e.message} (template line {e.lineno})")
        except TemplateError as e:
            # Only what the template raises on purpose (raise_exception: role order, a missing
            # system turn) says this row is wrong. Any other error, jinja's subclasses included
            # (an undefined variable), is a bug of the template, the tokenizer or ftdist: it propagates.
            if type(e) is not TemplateError:
                raise
            raise BadRow("template_error", f"the chat template rejected the messages: {e}") from None
        return self.ids(text)

    def encode_chat(self, messages: list[dict]) -> Example:
        turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
        if not turns:
            raise BadRow("no_assistant_turn", f"the {len(messages)} messages have no assistant turn")
        last = turns[-1]
        if not messages[last]["content"].strip():
            raise BadRow("empty_response", f"the last assistant message (message {last + 1}) is empty")
        input_ids = self.render(messages)
        prompt_ids = self.render(messages[:last], add_generation_prompt=True)
        if self.cfg.train_on_prompt:
            return Example(input_ids, list(input_ids), prompt_ids, messages[last]["content"])
        labels = [IGNORE_INDEX] * len(input_ids)
        for i in turns:
            before = prompt_ids if i == last else self.render(messages[:i], add_generation_prompt=True)
            upto = self.render(messages[: i + 1])
            _check_prefix(before, upto, i, "the conversation before it (with the generation prompt)")
            _check_prefix(upto, input_ids, i, "the conversation up to it")
            labels[len(before):len(upto)] = upto[len(before):]
        return Example(input_ids, labels, prompt_ids, messages[last]["content"])


def _check_prefix(prefix: list[int], whole: list[int], turn: int, what: str) -> None:
    if whole[: len(prefix)] != prefix:
        raise DataError(
            f"the tokenizer's chat template breaks the prefix property at assistant message {turn + 1}: "
            f"{what} does not tokenize to a prefix of the longer conversation, so the assistant's "
            "tokens cannot be located for response-only labels. Use data.train_on_prompt=true, or "
            "data.template=plain for instruction data."
        )


# --- field access (each failure is a BadRow of a stable kind) -------------------------------


def _type_name(value: Any) -> str:
    names = {dict: "object", list: "array", str: "string", bool: "boolean", int: "number",
             float: "number", type(None): "null"}
    return names.get(type(value), type(value).__name__)


def _field(row: dict, name: str) -> Any:
    if name not in row or row[name] is None:
        fields = ", ".join(map(str, row)) or "none"
        raise BadRow("missing_field", f"row has no field '{name}' (fields: {fields})")
    return row[name]


def _text_field(row: dict, name: str) -> str:
    value = _field(row, name)
    if not isinstance(value, str):
        raise BadRow("wrong_type", f"field '{name}' must be a string, got {_type_name(value)}")
    if not value.strip():
        raise BadRow("empty_response", f"field '{name}' is empty")
    return value


def _optional_text_field(row: dict, name: str | None) -> str:
    """The optional context field: absent, null or empty all mean "no context"."""
    if not name or row.get(name) is None:
        return ""
    value = row[name]
    if not isinstance(value, str):
        raise BadRow("wrong_type", f"field '{name}' must be a string, got {_type_name(value)}")
    return value.strip() and value


def _message(message: Any, index: int) -> dict:
    where = f"message {index + 1}"
    if not isinstance(message, dict):
        raise BadRow("bad_message", f"{where} is a {_type_name(message)}, not an object with role and content")
    for key in ("role", "content"):
        if key not in message or message[key] is None:
            raise BadRow("bad_message", f"{where} has no '{key}'")
    if message["role"] not in ROLES:
        raise BadRow("bad_message", f"{where} has role {message['role']!r}; expected one of {', '.join(ROLES)}")
    if not isinstance(message["content"], str):
        raise BadRow("bad_message", f"{where} content must be a string, got {_type_name(message['content'])}")
    # Only role and content go to the template, so extra keys cannot change the rendering.
    return {"role": message["role"], "content": message["content"]}
