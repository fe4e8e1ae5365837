"""Local tokenizers in the chat formats of five published model families, and sample chats.

Tests of ftdist's chat-data handling need the real formats (Llama 3.1, Qwen2.5, Qwen3 with
reasoning, Mistral v0.3 with tool calls, Gemma 3) without downloading a model. Each family's
tokenizer here is the repo's tiny byte-level BPE plus that family's control tokens, with a chat
template written for these tests under tests/assets/chat_templates/. The templates are checked
against the published renderings by tests/unit/test_chat_templates.py.

The sample conversations are plain data (lists of dicts in the messages format that
`apply_chat_template` takes); their strings are short because the tiny BPE spends many tokens on
words it never saw.
"""

from __future__ import annotations

import copy
import functools
from dataclasses import dataclass
from pathlib import Path

FAMILIES = ("llama3", "qwen2_5", "qwen3", "mistral", "gemma3")

TEMPLATES_DIR = Path(__file__).resolve().parent / "assets" / "chat_templates"


def template_path(family: str) -> Path:
    if family not in FAMILIES:
        raise ValueError(f"unknown chat family {family!r}; known: {', '.join(FAMILIES)}")
    return TEMPLATES_DIR / f"{family}.jinja"


@dataclass(frozen=True)
class FamilyTokens:
    """A family's added tokens and the roles some of them play, as in the real tokenizer."""

    special: tuple[str, ...]  # control tokens: never split, dropped by skip_special_tokens
    plain: tuple[str, ...]  # added (never split) but not special, so decoding keeps them
    bos: str | None
    eos: str
    pad: str


_QWEN_SPECIAL = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")

FAMILY_TOKENS = {
    "llama3": FamilyTokens(
        special=(
            "<|begin_of_text|>",
            "<|end_of_text|>",
            "<|start_header_id|>",
            "<|end_header_id|>",
            "<|eot_id|>",
            "<|eom_id|>",
            "<|python_tag|>",
            "<|finetune_right_pad_id|>",
        ),
        plain=(),
        bos="<|begin_of_text|>",
        # The instruct tokenizer's eos: every turn, and so every response, ends with it.
        eos="<|eot_id|>",
        pad="<|finetune_right_pad_id|>",
    ),
    "qwen2_5": FamilyTokens(
        special=_QWEN_SPECIAL,
        plain=("<tool_call>", "</tool_call>"),
        bos=None,
        eos="<|im_end|>",
        pad="<|endoftext|>",
    ),
    "qwen3": FamilyTokens(
        special=_QWEN_SPECIAL,
        plain=("<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>", "<think>", "</think>"),
        bos=None,
        eos="<|im_end|>",
        pad="<|endoftext|>",
    ),
    "mistral": FamilyTokens(
        special=(
            "<unk>",
            "<s>",
            "</s>",
            "[INST]",
            "[/INST]",
            "[TOOL_CALLS]",
            "[AVAILABLE_TOOLS]",
            "[/AVAILABLE_TOOLS]",
            "[TOOL_RESULTS]",
            "[/TOOL_RESULTS]",
        ),
        plain=(),
        bos="<s>",
        eos="</s>",
        # The real tokenizer has no pad token; the tiny tokenizer's own one stands in.
        pad="<|pad|>",
    ),
    "gemma3": FamilyTokens(
        special=("<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>", "<start_of_image>"),
        plain=(),
        bos="<bos>",
        # The real tokenizer's eos_token is <eos>, but a chat turn ends with <end_of_turn> and
        # generation stops there (its generation config lists both ids). As the eos of these
        # tests it is the token that closes every assistant turn, which is what a response
        # label must end with for the model to learn to stop.
        eos="<end_of_turn>",
        pad="<pad>",
    ),
}


def family_tokenizer(family: str):
    """A transformers fast tokenizer in `family`'s chat format (a fresh copy on every call).

    The tiny tokenizer is built once and cached on disk; the family's version is built once per
    process. Each call returns a deep copy of that, so a test may change its copy (padding
    side, template, added tokens) without affecting any other test.
    """
    return copy.deepcopy(_cached_family_tokenizer(family))


@functools.cache  # an lru_cache without a size limit
def _cached_family_tokenizer(family: str):
    from tokenizers import AddedToken
    from transformers import AutoTokenizer

    from ftdist.config import TinyModelSpec
    from ftdist.model.tiny import ensure_tiny_model

    chat_template = template_path(family).read_text()
    tokens = FAMILY_TOKENS[family]
    tok = AutoTokenizer.from_pretrained(ensure_tiny_model(TinyModelSpec()))
    tok.add_special_tokens(
        {"extra_special_tokens": [AddedToken(t, special=True, normalized=False) for t in tokens.special]}
    )
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in tokens.plain])
    tok.bos_token = tokens.bos
    tok.eos_token = tokens.eos
    tok.pad_token = tokens.pad
    tok.chat_template = chat_template
    return tok


# --- Sample conversations -------------------------------------------------------------------

SYSTEM = {"role": "system", "content": "You are terse."}

MULTI_TURN = [
    SYSTEM,
    {"role": "user", "content": "Hi!"},
    {"role": "assistant", "content": "Hello."},
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "4."},
]

# Reasoning in the `reasoning_content` field, as chat datasets with reasoning traces carry it.
REASONING_FIELD = [
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "reasoning_content": "Two and two make four.", "content": "4."},
    {"role": "user", "content": "And 3+3?"},
    {"role": "assistant", "reasoning_content": "Three and three make six.", "content": "6."},
]

# The same reasoning written inline, at the start of the assistant content.
REASONING_INLINE = [
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "<think>\nTwo and two make four.\n</think>\n\n4."},
    {"role": "user", "content": "And 3+3?"},
    {"role": "assistant", "content": "<think>\nThree and three make six.\n</think>\n\n6."},
]


def _function(name: str, description: str, params: dict[str, str]) -> dict:
    properties = {key: {"type": "string", "description": text} for key, text in params.items()}
    return {
        "type": "function",
        "function": {
            "name": name,
            "description": description,
            "parameters": {"type": "object", "properties": properties, "required": list(params)},
        },
    }


WEATHER_TOOL = _function("get_weather", "Weather in a city.", {"city": "City name"})
TIME_TOOL = _function("get_time", "Local time in a city.", {"city": "City name"})


def _call(call_id: str, name: str, **arguments) -> dict:
    # Mistral's format needs call ids of 9 characters; the other formats ignore them.
    return {"type": "function", "id": call_id, "function": {"name": name, "arguments": arguments}}


TOOL_USE = {
    "tools": [WEATHER_TOOL],
    "messages": [
        SYSTEM,
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "tool_calls": [_call("call00001", "get_weather", city="Paris")]},
        {"role": "tool", "tool_call_id": "call00001", "content": '{"temp": 20}'},
        {"role": "assistant", "content": "It is 20 C."},
    ],
}

TOOL_USE_TWO_CALLS = {
    "tools": [WEATHER_TOOL, TIME_TOOL],
    "messages": [
        {"role": "user", "content": "Weather and time in Rome?"},
        {
            "role": "assistant",
            "tool_calls": [
                _call("call00002", "get_weather", city="Rome"),
                _call("call00003", "get_time", city="Rome"),
            ],
        },
        {"role": "tool", "tool_call_id": "call00002", "content": '{"temp": 25}'},
        {"role": "tool", "tool_call_id": "call00003", "content": '{"time": "9:00"}'},
        {"role": "assistant", "content": "25 C, 9:00."},
    ],
}
