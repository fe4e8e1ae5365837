"""Formats: tokens and labels checked token by token against an independent construction.

The expected sequences are built from hand-written strings in the tiny tokenizer's chat format
(`<|bos|><|user|>...<|end|><|assistant|>...<|end|>`), tokenized piece by piece, so a mistake in
the encoder's template rendering or its prefix-based masking cannot cancel out.
"""

from __future__ import annotations

import pytest
from helpers import segments
from helpers import token_ids as ids

from ftdist.config import DataConfig, DataFields
from ftdist.constants import IGNORE_INDEX as IGNORE
from ftdist.data.formats import PLAIN_PROMPT, Example, RowEncoder
from ftdist.data.sources import BadRow, DataError

PROMPT = "Extract the city: Ana lives in Lisbon."
RESPONSE = '{"city": "Lisbon"}'


def make_cfg(**kw) -> DataConfig:
    kw.setdefault("max_seq_len", 256)
    return DataConfig(path="unused.jsonl", **kw)


def encode_one(encoder: RowEncoder, row) -> Example:
    """The row's only example (each row here makes one)."""
    encoded = encoder(row)
    assert len(encoded.examples) == 1
    return encoded.examples[0]


# --- instruction ----------------------------------------------------------------------------


def test_instruction_with_chat_template_labels_exactly_the_response(tiny_tokenizer):
    tok = tiny_tokenizer
    ex = encode_one(RowEncoder(make_cfg(), tok), {"prompt": PROMPT, "response": RESPONSE})
    prompt_text = f"<|bos|><|user|>{PROMPT}<|end|><|assistant|>"
    n_prompt = len(ids(tok, prompt_text))
    assert ex.input_ids == ids(tok, prompt_text + RESPONSE + "<|end|>")
    assert ex.labels[:n_prompt] == [IGNORE] * n_prompt
    assert ex.labels[n_prompt:] == ex.input_ids[n_prompt:]
    assert tok.decode(ex.input_ids[n_prompt:]) == RESPONSE + "<|end|>"
    assert ex.prompt_ids == ex.input_ids[:n_prompt]
    assert ex.reference == RESPONSE


def test_instruction_plain_template_without_chat_template(plain_tokenizer):
    tok = plain_tokenizer
    ex = encode_one(RowEncoder(make_cfg(), tok), {"prompt": PROMPT, "response": RESPONSE})
    prompt_ids = [tok.bos_token_id] + ids(tok, f"### Instruction:\n{PROMPT}\n\n### Response:\n")
    n_prompt = len(prompt_ids)
    assert ex.input_ids[:n_prompt] == prompt_ids
    assert ex.input_ids[-1] == tok.eos_token_id
    assert ex.labels == [IGNORE] * n_prompt + ex.input_ids[n_prompt:]
    assert tok.decode(ex.input_ids[n_prompt:]) == RESPONSE + tok.eos_token
    assert ex.prompt_ids == prompt_ids
    assert ex.reference == RESPONSE


def test_template_plain_overrides_a_chat_template(tiny_tokenizer):
    ex = encode_one(RowEncoder(make_cfg(template="plain"), tiny_tokenizer), {"prompt": PROMPT, "response": RESPONSE})
    assert tiny_tokenizer.decode(ex.prompt_ids) == "<|bos|>" + PLAIN_PROMPT.format(prompt=PROMPT)


@pytest.mark.parametrize("context, expected", [("Lisbon is in Portugal.", "\n\nLisbon is in Portugal."),
                                               (None, ""), ("", ""), ("MISSING", "")])
def test_instruction_input_field_is_appended_when_present(tiny_tokenizer, context, expected):
    row = {"prompt": PROMPT, "response": RESPONSE}
    if context != "MISSING":
        row["context"] = context
    ex = encode_one(RowEncoder(make_cfg(fields=DataFields(input="context")), tiny_tokenizer), row)
    assert ex.prompt_ids == ids(tiny_tokenizer, f"<|bos|><|user|>{PROMPT}{expected}<|end|><|assistant|>")


def test_instruction_uses_configured_field_names(tiny_tokenizer):
    cfg = make_cfg(fields=DataFields(prompt="question", response="answer"))
    ex = encode_one(RowEncoder(cfg, tiny_tokenizer), {"question": PROMPT, "answer": RESPONSE})
    assert ex.reference == RESPONSE


@pytest.mark.parametrize("template", ["auto", "plain"])
def test_train_on_prompt_labels_every_instruction_token(tiny_tokenizer, template):
    ex = encode_one(RowEncoder(make_cfg(template=template, train_on_prompt=True), tiny_tokenizer), 
        {"prompt": PROMPT, "response": RESPONSE})
    assert ex.labels == ex.input_ids
    assert ex.prompt_ids == ex.input_ids[: len(ex.prompt_ids)]


def test_template_chat_without_one_is_an_error(plain_tokenizer):
    with pytest.raises(DataError, match="data.template=chat but the tokenizer has no chat_template"):
        RowEncoder(make_cfg(template="chat"), plain_tokenizer)


# --- chat -----------------------------------------------------------------------------------

CONVERSATION = [
    {"role": "system", "content": "Answer briefly."},
    {"role": "user", "content": "Capital of Peru?"},
    {"role": "assistant", "content": "Lima."},
    {"role": "user", "content": "And of Ireland?"},
    {"role": "assistant", "content": "Dublin."},
]


def test_chat_labels_every_assistant_turn_and_nothing_else(tiny_tokenizer):
    tok = tiny_tokenizer
    ex = encode_one(RowEncoder(make_cfg(format="chat"), tok), {"messages": CONVERSATION})
    expected_ids, expected_labels = segments(tok, [
        ("<|bos|><|system|>Answer briefly.<|end|><|user|>Capital of Peru?<|end|><|assistant|>", False),
        ("Lima.<|end|>", True),
        ("<|user|>And of Ireland?<|end|><|assistant|>", False),
        ("Dublin.<|end|>", True),
    ])
    assert ex.input_ids == expected_ids
    assert ex.labels == expected_labels
    labelled = [t for t, label in zip(ex.input_ids, ex.labels) if label != IGNORE]
    assert tok.decode(labelled) == "Lima.<|end|>Dublin.<|end|>"
    assert tok.decode(ex.prompt_ids).endswith("And of Ireland?<|end|><|assistant|>")
    assert ex.prompt_ids == ex.input_ids[: len(ex.prompt_ids)]
    assert ex.reference == "Dublin."


def test_chat_train_on_prompt_labels_everything(tiny_tokenizer):
    ex = encode_one(RowEncoder(make_cfg(format="chat", train_on_prompt=True), tiny_tokenizer), {"messages": CONVERSATION})
    assert ex.labels == ex.input_ids


def test_chat_extra_message_keys_do_not_change_the_rendering(tiny_tokenizer):
    encoder = RowEncoder(make_cfg(format="chat"), tiny_tokenizer)
    extra = [dict(m, name="x", weight=1) for m in CONVERSATION]
    assert encode_one(encoder, {"messages": extra}) == encode_one(encoder, {"messages": CONVERSATION})


def test_chat_format_needs_a_chat_template(plain_tokenizer):
    with pytest.raises(DataError, match="data.format=chat needs a tokenizer with a chat_template"):
        RowEncoder(make_cfg(format="chat"), plain_tokenizer)


def test_template_that_breaks_the_prefix_property_is_an_error(plain_tokenizer):
    tok = plain_tokenizer  # a fresh copy per test, safe to modify
    # The message count at the start differs between a conversation and its prefix.
    tok.chat_template = (
        "{{ messages|length }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}"
    )
    encoder = RowEncoder(make_cfg(format="chat"), tok)
    with pytest.raises(DataError, match="starts assistant message 3 differently at inference"):
        encode_one(encoder, {"messages": CONVERSATION})
    # With every token labelled no mask is needed, so the same template is usable.
    encode_one(RowEncoder(make_cfg(format="chat", train_on_prompt=True), tok), {"messages": CONVERSATION})


def test_template_exception_is_a_bad_row(plain_tokenizer):
    plain_tokenizer.chat_template = "{{ raise_exception('roles must alternate') }}"
    with pytest.raises(BadRow, match="roles must alternate") as info:
        encode_one(RowEncoder(make_cfg(format="chat"), plain_tokenizer), {"messages": CONVERSATION})
    assert info.value.kind == "template_error"


# --- text -----------------------------------------------------------------------------------


def test_text_is_bos_text_eos_all_labelled(tiny_tokenizer):
    tok = tiny_tokenizer
    ex = encode_one(RowEncoder(make_cfg(format="text"), tok), {"text": "The quick brown fox."})
    assert ex.input_ids == [tok.bos_token_id] + ids(tok, "The quick brown fox.") + [tok.eos_token_id]
    assert ex.labels == ex.input_ids
    assert ex.prompt_ids is None and ex.reference is None


# --- malformed rows -------------------------------------------------------------------------

BAD_ROWS = [
    ("instruction", ["a", "list"], "not_an_object", "row is a JSON array, not an object"),
    ("instruction", {"prompt": "p", "answer": "a"}, "missing_field",
     "row has no field 'response' (fields: prompt, answer)"),
    ("instruction", {"prompt": "p", "response": None}, "missing_field", "no field 'response'"),
    ("instruction", {"prompt": "p", "response": 3}, "wrong_type", "field 'response' must be a string, got number"),
    ("instruction", {"prompt": "p", "response": "  "}, "empty_response", "field 'response' is empty"),
    ("instruction", {"prompt": "", "response": "r"}, "empty_response", "field 'prompt' is empty"),
    ("text", {"text": ""}, "empty_response", "field 'text' is empty"),
    ("text", {"text": ["a"]}, "wrong_type", "field 'text' must be a string, got array"),
    ("chat", {"messages": "hi"}, "wrong_type", "field 'messages' must be a list of messages, got string"),
    ("chat", {"messages": []}, "no_assistant_turn", "no assistant turn"),
    ("chat", {"messages": [{"role": "user", "content": "hi"}]}, "no_assistant_turn", "no assistant turn"),
    ("chat", {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": ""}]},
     "empty_response", "assistant message 2 has no content and no tool calls"),
    ("chat", {"messages": [{"role": "user"}]}, "bad_message", "message 1 has no 'content'"),
    ("chat", {"messages": [{"content": "x"}]}, "bad_message", "message 1 has no 'role'"),
    ("chat", {"messages": [{"role": "user", "content": "x"}, {"role": "bot", "content": "y"}]},
     "bad_message", "message 2 has role 'bot'"),
    ("chat", {"messages": [{"role": "user", "content": 5}]}, "bad_message", "content must be a string, got number"),
    ("chat", {"messages": ["hello"]}, "bad_message", "message 1 is a string"),
]


@pytest.mark.parametrize("fmt, row, kind, detail", BAD_ROWS)
def test_malformed_rows_raise_bad_row_of_a_named_kind(tiny_tokenizer, fmt, row, kind, detail):
    with pytest.raises(BadRow) as info:
        encode_one(RowEncoder(make_cfg(format=fmt), tiny_tokenizer), row)
    assert info.value.kind == kind
    assert detail in info.value.detail


def test_optional_input_of_wrong_type_is_a_bad_row(tiny_tokenizer):
    encoder = RowEncoder(make_cfg(fields=DataFields(input="context")), tiny_tokenizer)
    with pytest.raises(BadRow, match="field 'context' must be a string, got number"):
        encode_one(encoder, {"prompt": "p", "response": "r", "context": 1})


def test_template_error_that_is_not_the_templates_own_propagates(plain_tokenizer):
    # An undefined variable is jinja's error (a TemplateError subclass), not the template
    # rejecting the row on purpose: a bug to fix, not a bad row to count.
    plain_tokenizer.chat_template = "{{ nothing.here }}"
    with pytest.raises(Exception) as info:
        encode_one(RowEncoder(make_cfg(format="chat"), plain_tokenizer), {"messages": CONVERSATION})
    assert not isinstance(info.value, (BadRow, DataError))
    assert type(info.value).__name__ == "UndefinedError"


def test_any_other_exception_while_rendering_propagates(plain_tokenizer):
    plain_tokenizer.chat_template = "{{ messages[0]['content'] + 1 }}"  # str + int: a TypeError
    with pytest.raises(TypeError):
        encode_one(RowEncoder(make_cfg(format="chat"), plain_tokenizer), {"messages": CONVERSATION})


def test_template_that_does_not_compile_is_a_data_error_not_a_bad_row(plain_tokenizer):
    plain_tokenizer.chat_template = "{% for m in messages %}{{ m.content }}"  # no endfor
    with pytest.raises(DataError, match="chat template does not compile"):
        encode_one(RowEncoder(make_cfg(format="chat"), plain_tokenizer), {"messages": CONVERSATION})
