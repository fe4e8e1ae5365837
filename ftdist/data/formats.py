"""Formats: one row -> its examples (input_ids and labels, unshifted, -100 where no loss), per `data.format`.

- instruction: prompt (+ optional input) and response, rendered with the tokenizer's chat
  template (as a one-turn conversation, see chat.py) or a plain "### Instruction / ### Response"
  template;
- chat: a list of messages (system, user, assistant with optional reasoning and tool calls,
  tool results) and an optional tools list (checked in messages.py), rendered with the chat
  template (chat.py);
- text: bos + text + eos, every token labelled;
- preference: a prompt and a chosen and a rejected response, rendered as instruction or chat
  rows are (preference.py); one Pair per row;
- classification: a text and its class (classification.py); one Document per row.
"""

from __future__ import annotations

from typing import Any

from ftdist.config import CHOICES, DataConfig
from ftdist.constants import IGNORE_INDEX
from ftdist.data.chat import ChatEncoder, encode_text
from ftdist.data.classification import encode_document
from ftdist.data.example import PLAIN_PROMPT, Encoded, Example
from ftdist.data.messages import conversation, row_field, type_name
from ftdist.data.preference import encode_pair
from ftdist.data.sources import BadRow, DataError

__all__ = ["Encoded", "Example", "RowEncoder", "uses_chat_template"]

FORMATS = CHOICES["data.format"]



def uses_chat_template(cfg: DataConfig, tokenizer) -> bool:
    """Whether rows render through the chat template; raises DataError when that cannot work."""
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if cfg.format == "chat":
        if cfg.template == "plain":
            raise DataError("data.format=chat renders with the chat template; data.template=plain cannot apply")
        if not has_template:
            raise DataError("data.format=chat needs a tokenizer with a chat_template, and this one has none")
        return True
    if cfg.format in ("text", "classification"):
        return False
    if cfg.template == "chat" and not has_template:
        raise DataError("data.template=chat but the tokenizer has no chat_template; use data.template=plain")
    return cfg.template == "chat" or (cfg.template == "auto" and has_template)


class RowEncoder:
    """Encodes one row for `cfg.format`; raises BadRow for a malformed row."""

    def __init__(self, cfg: DataConfig, tokenizer, label_index: dict[str, int] | None = None,
                 margin_field: str | None = None):
        if cfg.format not in FORMATS:
            raise DataError(f"data.format={cfg.format!r} is not one of {', '.join(FORMATS)}")
        if cfg.format == "classification" and label_index is None:
            raise ValueError("data.format=classification: the encoder needs the run's label set")
        self.label_index = label_index  # classification: class name -> index
        self.margin_field = margin_field  # preference rows for a reward model: a per-pair margin
        if cfg.format == "preference" and cfg.train_on_prompt:
            raise DataError("data.train_on_prompt=true: preference pairs share their prompt, so only responses carry a loss")
        self.cfg = cfg
        self.fields = cfg.fields
        self.tok = tokenizer
        self.chat = ChatEncoder(cfg, tokenizer) if uses_chat_template(cfg, tokenizer) else None
        if cfg.system_prompt and self.chat is None:
            raise DataError(f"data.system_prompt needs the chat template; data.format={cfg.format} with "
                            f"template {self.template_name} has no system turn to put it in")
        # Rows are tokenized without special tokens and bos/eos are placed explicitly, so the
        # result is the same whether or not this tokenizer adds bos by itself.
        self.bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
        if self.chat is None and cfg.format != "classification" and tokenizer.eos_token_id is None:
            raise DataError("the tokenizer has no eos_token; the plain and text formats end every example with it")
        self.eos = tokenizer.eos_token_id

    @property
    def template_name(self) -> str:
        return "chat" if self.chat else ("none" if self.cfg.format in ("text", "classification") else "plain")

    def __call__(self, value: Any) -> Encoded:
        if not isinstance(value, dict):
            raise BadRow("not_an_object", f"row is a JSON {type_name(value)}, not an object")
        if self.cfg.format == "text":
            return Encoded([self.text(value)])
        if self.cfg.format == "chat":
            return self.chat_row(value)
        if self.cfg.format == "preference":
            return encode_pair(self, value)
        if self.cfg.format == "classification":
            return encode_document(self, value, self.label_index)
        return self.instruction(value)

    def ids(self, text: str) -> list[int]:
        return encode_text(self.tok, text)[0]

    # --- formats ---------------------------------------------------------------------------

    def text(self, row: dict) -> Example:
        text = _text_field(row, self.fields.text)
        input_ids = self.bos + self.ids(text) + [self.eos]
        return Example(input_ids, list(input_ids))

    def instruction(self, row: dict) -> Encoded:
        prompt = _text_field(row, self.fields.prompt)
        context = _optional_text_field(row, self.fields.input)
        if context:
            prompt = f"{prompt}\n\n{context}"
        if self.cfg.responses == "optional" and row.get(self.fields.response) is None:
            return Encoded([self.prompt_alone(prompt)])
        response = _text_field(row, self.fields.response)
        if self.chat:
            messages, _ = conversation([{"role": "user", "content": prompt}, {"role": "assistant", "content": response}],
                                       None, self.fields.prompt, self.cfg.system_prompt)
            return self.chat.encode(messages, None)
        # Prompt and response are tokenized apart so no token straddles the boundary and the
        # label mask falls exactly on the response.
        prompt_ids = self.bos + self.ids(PLAIN_PROMPT.format(prompt=prompt))
        response_ids = self.ids(response) + [self.eos]
        prompt_labels = list(prompt_ids) if self.cfg.train_on_prompt else [IGNORE_INDEX] * len(prompt_ids)
        return Encoded([Example(prompt_ids + response_ids, prompt_labels + response_ids, prompt_ids, response)])

    def prompt_alone(self, prompt: str) -> Example:
        """An instruction row without a response (data.responses=optional): its prompt, as a
        response would follow it, with nothing labelled and no reference."""
        if self.chat:
            messages, _ = conversation([{"role": "user", "content": prompt}], None, self.fields.prompt,
                                       self.cfg.system_prompt)
            return self.chat.prompt_alone(messages, None)
        prompt_ids = self.bos + self.ids(PLAIN_PROMPT.format(prompt=prompt))
        return Example(prompt_ids, [IGNORE_INDEX] * len(prompt_ids), prompt_ids, None)

    def chat_row(self, row: dict) -> Encoded:
        tools = row.get(self.fields.tools) if self.fields.tools else None
        messages, tools = conversation(row_field(row, self.fields.messages), tools, self.fields.messages,
                                       self.cfg.system_prompt)
        if self.cfg.responses == "optional" and messages and messages[-1]["role"] != "assistant":
            return Encoded([self.chat.prompt_alone(messages, tools)])
        return self.chat.encode(messages, tools)


# --- field access (each failure is a BadRow of a stable kind) -------------------------------


def _text_field(row: dict, name: str) -> str:
    value = row_field(row, name)
    if not isinstance(value, str):
        raise BadRow("wrong_type", f"field '{name}' must be a string, got {type_name(value)}")
    if not value.strip():
        raise BadRow("empty_response", f"field '{name}' is empty")
    return value


def _optional_text_field(row: dict, name: str | None) -> str:
    """The optional context field: absent, null or empty all mean "no context"."""
    if not name or row.get(name) is None:
        return ""
    value = row[name]
    if not isinstance(value, str):
        raise BadRow("wrong_type", f"field '{name}' must be a string, got {type_name(value)}")
    return value.strip() and value
