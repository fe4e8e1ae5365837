"""Chat rows: data.turns modes, {% generation %} masks, reasoning, tool calls, system prompts.

Expected ids and labels are built from hand-written strings in the tiny tokenizer's chat format,
tokenized piece by piece (every piece boundary below sits at a special token or a tag), so a
mistake in the encoder's rendering, splitting or masking cannot cancel out.
"""

from __future__ import annotations

import json

import pytest
from helpers import segments
from helpers import token_ids as ids

from ftdist.config import ConfigError, DataConfig, compose, load_config
from ftdist.data.chat import show_labels
from ftdist.data.formats import RowEncoder
from ftdist.data.prepare import prepare_data
from ftdist.data.sources import BadRow, DataError

# The tiny format, with the reasoning of assistant turns before the last user message left out
# and an (empty when absent) <think> block on every later one, as Qwen3's template does; reasoning
# comes from reasoning_content or from a <think> block at the start of the content.
DROPS_EARLIER_REASONING = (
    "{{ bos_token }}{% set ns = namespace(last_user=-1) %}"
    "{% for m in messages %}{% if m.role == 'user' %}{% set ns.last_user = loop.index0 %}{% endif %}{% endfor %}"
    "{% for m in messages %}{% set content = m.content %}{% set reasoning = m.reasoning_content or '' %}"
    "{% if '</think>' in content %}{% set reasoning = content.split('</think>')[0].split('<think>')[-1] %}"
    "{% set content = content.split('</think>')[-1] %}{% endif %}<|{{ m.role }}|>"
    "{% if m.role == 'assistant' and loop.index0 > ns.last_user %}<think>{{ reasoning }}</think>{% endif %}"
    "{{ content }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
# The tiny format with tools and tool calls rendered.
WITH_TOOLS = (
    "{{ bos_token }}{% if tools %}<|system|>tools:{% for t in tools %} {{ t.function.name }}{% endfor %}<|end|>{% endif %}"
    "{% for m in messages %}<|{{ m.role }}|>{% if m.content %}{{ m.content }}{% endif %}"
    "{% for c in m.tool_calls or [] %}<call>{{ c.function.name }} {{ c.function.arguments | tojson }}</call>{% endfor %}"
    "<|end|>{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
# The tiny format with the assistant's content (not its end-of-turn token) in a generation block.
WITH_GENERATION = (
    "{{ bos_token }}{% for m in messages %}<|{{ m.role }}|>"
    "{% if m.role == 'assistant' %}{% generation %}{{ m.content }}{% endgeneration %}{% else %}{{ m.content }}{% endif %}"
    "<|end|>{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)

TWO_TURNS = [
    {"role": "user", "content": "Capital of Peru?"},
    {"role": "assistant", "content": "Lima.", "reasoning_content": "recall"},
    {"role": "user", "content": "And of Ireland?"},
    {"role": "assistant", "content": "<think>recall again</think>Dublin."},
]
TOOLS = [{"type": "function", "function": {"name": "weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
TOOL_ROW = {
    "tools": TOOLS,
    "messages": [
        {"role": "user", "content": "Weather in Oslo?"},
        {"role": "assistant", "content": None,
         "tool_calls": [{"type": "function", "id": "c1", "function": {"name": "weather", "arguments": '{"city": "Oslo"}'}}]},
        {"role": "tool", "tool_call_id": "c1", "content": '{"temp": 3}'},
        {"role": "assistant", "content": "It is 3 C."},
    ],
}


def make_cfg(**kw) -> DataConfig:
    kw.setdefault("max_seq_len", 512)
    kw.setdefault("format", "chat")
    kw.setdefault("path", "unused.jsonl")
    return DataConfig(**kw)


def assert_example(tok, example, parts) -> None:
    expected_ids, expected_labels = segments(tok, parts)
    assert example.input_ids == expected_ids, show_labels(tok, example)
    assert example.labels == expected_labels, show_labels(tok, example)


@pytest.fixture()
def reasoning_tok(plain_tokenizer):
    plain_tokenizer.chat_template = DROPS_EARLIER_REASONING
    return plain_tokenizer


# --- data.turns -----------------------------------------------------------------------------

TURN1_CONTEXT = "<|bos|><|user|>Capital of Peru?<|end|><|assistant|>"
TURN2_CONTEXT = TURN1_CONTEXT + "Lima.<|end|><|user|>And of Ireland?<|end|><|assistant|>"


def test_per_turn_renders_each_turn_as_at_inference(reasoning_tok):
    encoded = RowEncoder(make_cfg(turns="per_turn"), reasoning_tok)({"messages": TWO_TURNS})
    assert encoded.turns == "per_turn" and len(encoded.examples) == 2
    first, second = encoded.examples
    # Turn 1 is the last turn of its own context, so it keeps its reasoning ...
    assert_example(reasoning_tok, first, [(TURN1_CONTEXT, False), ("<think>recall</think>Lima.<|end|>", True)])
    # ... and in turn 2's context it is rendered without it, as the template does at inference.
    assert_example(reasoning_tok, second, [(TURN2_CONTEXT, False), ("<think>recall again</think>Dublin.<|end|>", True)])
    assert first.prompt_ids is None and first.reference is None  # exact match: the last turn only
    assert second.prompt_ids == ids(reasoning_tok, TURN2_CONTEXT) and second.reference == "Dublin."


def test_auto_goes_per_turn_only_where_the_template_breaks_the_extension(reasoning_tok):
    encoder = RowEncoder(make_cfg(turns="auto"), reasoning_tok)
    assert encoder({"messages": TWO_TURNS}) == RowEncoder(make_cfg(turns="per_turn"), reasoning_tok)(
        {"messages": TWO_TURNS})
    single = encoder({"messages": TWO_TURNS[:2]})
    assert single.turns == "whole" and len(single.examples) == 1


def test_whole_refuses_a_row_the_template_does_not_render_as_its_turns(reasoning_tok):
    with pytest.raises(BadRow, match="assistant message 2") as info:
        RowEncoder(make_cfg(turns="whole"), reasoning_tok)({"messages": TWO_TURNS})
    assert info.value.kind == "not_extension"


def test_last_trains_the_final_turn_only(reasoning_tok):
    encoded = RowEncoder(make_cfg(turns="last"), reasoning_tok)({"messages": TWO_TURNS})
    assert encoded.turns == "last" and len(encoded.examples) == 1
    assert_example(reasoning_tok, encoded.examples[0],
                   [(TURN2_CONTEXT, False), ("<think>recall again</think>Dublin.<|end|>", True)])


def test_whole_labels_every_turn_where_the_extension_holds(tiny_tokenizer):
    encoded = RowEncoder(make_cfg(turns="whole"), tiny_tokenizer)({"messages": TWO_TURNS})
    assert encoded.turns == "whole"
    # The tiny template ignores reasoning_content (counted) and renders inline <think> as text.
    assert (encoded.reasoning_turns, encoded.reasoning_not_rendered) == (2, 1)
    assert_example(tiny_tokenizer, encoded.examples[0], [
        ("<|bos|><|user|>Capital of Peru?<|end|><|assistant|>", False), ("Lima.<|end|>", True),
        ("<|user|>And of Ireland?<|end|><|assistant|>", False), ("<think>recall again</think>Dublin.<|end|>", True),
    ])


# --- reasoning ------------------------------------------------------------------------------


def test_train_on_reasoning_false_leaves_the_reasoning_block_unlabelled(reasoning_tok):
    encoded = RowEncoder(make_cfg(turns="per_turn", train_on_reasoning=False), reasoning_tok)({"messages": TWO_TURNS})
    first, second = encoded.examples
    assert_example(reasoning_tok, first, [(TURN1_CONTEXT + "<think>recall</think>", False), ("Lima.<|end|>", True)])
    assert_example(reasoning_tok, second,
                   [(TURN2_CONTEXT + "<think>recall again</think>", False), ("Dublin.<|end|>", True)])
    assert (encoded.reasoning_turns, encoded.reasoning_not_rendered) == (2, 0)


def test_custom_reasoning_tags(plain_tokenizer):
    plain_tokenizer.chat_template = DROPS_EARLIER_REASONING.replace("<think>", "[R]").replace("</think>", "[/R]")
    encoded = RowEncoder(make_cfg(turns="last", train_on_reasoning=False, reasoning_tags=["[R]", "[/R]"]),
                         plain_tokenizer)({"messages": TWO_TURNS[:2]})
    assert_example(plain_tokenizer, encoded.examples[0], [(TURN1_CONTEXT + "[R]recall[/R]", False), ("Lima.<|end|>", True)])


# --- {% generation %} masks -----------------------------------------------------------------


def test_generation_blocks_decide_which_tokens_carry_the_loss(plain_tokenizer):
    plain_tokenizer.chat_template = WITH_GENERATION
    conversation = [m for m in TWO_TURNS[:3]] + [{"role": "assistant", "content": "Dublin."}]
    encoded = RowEncoder(make_cfg(), plain_tokenizer)({"messages": conversation})
    # The template leaves <|end|> outside its generation blocks, so it carries no loss here.
    assert_example(plain_tokenizer, encoded.examples[0], [
        ("<|bos|><|user|>Capital of Peru?<|end|><|assistant|>", False), ("Lima.", True),
        ("<|end|><|user|>And of Ireland?<|end|><|assistant|>", False), ("Dublin.", True), ("<|end|>", False),
    ])


# --- tool calls -----------------------------------------------------------------------------


def test_tool_calls_and_answers_carry_the_loss_tool_results_and_tools_do_not(plain_tokenizer):
    plain_tokenizer.chat_template = WITH_TOOLS
    encoded = RowEncoder(make_cfg(), plain_tokenizer)(TOOL_ROW)
    print(show_labels(plain_tokenizer, encoded.examples[0]))
    assert encoded.turns == "whole"
    assert_example(plain_tokenizer, encoded.examples[0], [
        ("<|bos|><|system|>tools: weather<|end|><|user|>Weather in Oslo?<|end|><|assistant|>", False),
        ('<call>weather {"city": "Oslo"}</call><|end|>', True),
        ('<|tool|>{"temp": 3}<|end|><|assistant|>', False),
        ("It is 3 C.<|end|>", True),
    ])


def test_a_template_that_drops_tool_calls_is_an_error(tiny_tokenizer):
    with pytest.raises(DataError, match="left out the tool call to 'weather' of assistant message 2"):
        RowEncoder(make_cfg(), tiny_tokenizer)({"messages": TOOL_ROW["messages"]})


def call(name="weather", arguments='{"city": "Oslo"}', **extra):
    return {"type": "function", "function": {"name": name, "arguments": arguments}, **extra}


def tool_row(calls, result=None, tools=TOOLS):
    messages = [{"role": "user", "content": "Weather?"}, {"role": "assistant", "tool_calls": calls}]
    messages.append(result or {"role": "tool", "content": "3"})
    messages.append({"role": "assistant", "content": "3 C."})
    return {"messages": messages, "tools": tools}


BAD_TOOL_ROWS = [
    (tool_row([call(arguments='{"city": ')]), "bad_tool_arguments", "arguments are not valid JSON"),
    (tool_row([call(arguments="[1]")]), "bad_tool_arguments", "arguments must be a JSON object, got array"),
    (tool_row([call(name="")]), "bad_tool_call", "message 2 tool call 1 has no function name"),
    (tool_row([{"type": "function"}]), "bad_tool_call", "has no function name"),
    (tool_row([]), "bad_tool_call", "tool_calls must be a non-empty list"),
    (tool_row("weather"), "bad_tool_call", "tool_calls must be a non-empty list, got string"),
    (tool_row([call(name="stocks")]), "unknown_tool", "calls 'stocks', which is not in the row's tools (weather)"),
    (tool_row([call(id="a")], {"role": "tool", "tool_call_id": "b", "content": "3"}), "bad_tool_result",
     "answers tool_call_id 'b'"),
    ({"messages": [{"role": "user", "content": "x"}, {"role": "tool", "content": "3"},
                   {"role": "assistant", "content": "y"}]}, "bad_tool_result", "message 2 is a tool result with no"),
    (tool_row([call()], tools="[{"), "bad_tools", "the tools string is not valid JSON"),
    (tool_row([call()], tools=[{"description": "no name"}]), "bad_tools", "tool 1 has no function name"),
    ({"messages": [{"role": "user", "content": "x", "tool_calls": [call()]}, {"role": "assistant", "content": "y"}]},
     "bad_tool_call", "only assistant messages call tools"),
    ({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": None}]},
     "bad_message", "message 2 has no 'content' and no tool_calls"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}, {"role": "assistant", "content": "y"}]},
     "bad_message", "content part of type 'image_url'"),
]


@pytest.mark.parametrize("row, kind, detail", BAD_TOOL_ROWS)
def test_malformed_tool_use_is_a_bad_row_of_its_own_kind(plain_tokenizer, row, kind, detail):
    plain_tokenizer.chat_template = WITH_TOOLS
    with pytest.raises(BadRow) as info:
        RowEncoder(make_cfg(), plain_tokenizer)(row)
    assert info.value.kind == kind
    assert detail in info.value.detail


def test_tool_arguments_as_object_or_string_and_text_parts_render_the_same(plain_tokenizer):
    plain_tokenizer.chat_template = WITH_TOOLS
    encoder = RowEncoder(make_cfg(), plain_tokenizer)
    as_object = tool_row([call(arguments={"city": "Oslo"})])
    as_parts = tool_row([call()])
    as_parts["messages"][0]["content"] = [{"type": "text", "text": "Weath"}, {"type": "text", "text": "er?"}]
    assert encoder(as_object) == encoder(tool_row([call()])) == encoder(as_parts)


def test_bad_tool_rows_are_reported_with_file_and_line(tmp_path, plain_tokenizer):
    plain_tokenizer.chat_template = WITH_TOOLS
    path = tmp_path / "train.jsonl"
    rows = [TOOL_ROW, tool_row([call(arguments="{oops")]), TOOL_ROW, tool_row([call(name="stocks")])]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(DataError, match=r"train\.jsonl:2: bad_tool_arguments: message 2 tool call 1 \(weather\)"):
        prepare_data(make_cfg(path=str(path), val_fraction=0.0), plain_tokenizer, seed=0)
    train, _, report = prepare_data(make_cfg(path=str(path), val_fraction=0.0, on_bad_row="skip"), plain_tokenizer, 0)
    assert report.bad_rows == {"bad_tool_arguments": 1, "unknown_tool": 1} and len(train) == 2
    assert report.bad_row_examples["unknown_tool"].startswith(f"{path}:4: ")


# --- report ---------------------------------------------------------------------------------


def test_report_counts_rows_each_way_and_every_example(tmp_path, reasoning_tok):
    path = tmp_path / "train.jsonl"
    rows = [{"messages": TWO_TURNS}] * 3 + [{"messages": TWO_TURNS[:2]}] * 2
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    train, _, report = prepare_data(make_cfg(path=str(path), val_fraction=0.0), reasoning_tok, seed=0)
    assert report.turns == {"per_turn": 3, "whole": 2}
    assert report.turn_examples == 3 and report.train_examples == len(train) == 8
    assert report.train_rows + report.turn_examples == report.train_examples


# --- system prompt and template file --------------------------------------------------------


def test_system_prompt_is_added_to_rows_without_one(tiny_tokenizer):
    encoder = RowEncoder(make_cfg(system_prompt="Be brief."), tiny_tokenizer)
    added = encoder({"messages": TWO_TURNS[:2]}).examples[0]
    assert tiny_tokenizer.decode(added.input_ids).startswith("<|bos|><|system|>Be brief.<|end|><|user|>Capital")
    own = [{"role": "system", "content": "Mine."}] + TWO_TURNS[:2]
    kept = encoder({"messages": own}).examples[0]
    assert tiny_tokenizer.decode(kept.input_ids).startswith("<|bos|><|system|>Mine.<|end|><|user|>")
    instruction = RowEncoder(make_cfg(format="instruction", system_prompt="Be brief."), tiny_tokenizer)
    assert tiny_tokenizer.decode(instruction({"prompt": "p", "response": "r"}).examples[0].input_ids) == (
        "<|bos|><|system|>Be brief.<|end|><|user|>p<|end|><|assistant|>r<|end|>")


def test_system_prompt_without_a_chat_template_is_an_error(plain_tokenizer):
    with pytest.raises(DataError, match="data.system_prompt needs the chat template"):
        RowEncoder(make_cfg(format="instruction", system_prompt="x"), plain_tokenizer)


def test_chat_template_file_must_exist(tmp_path):
    with pytest.raises(ConfigError, match="data.chat_template=.*nope.jinja: file not found"):
        load_config(compose(["model=tiny", "data=chat", "data.path=x.jsonl", f"output_dir={tmp_path}",
                             f"data.chat_template={tmp_path}/nope.jinja"]))


@pytest.mark.parametrize("key, value, message", [
    ("data.turns", "each", "data.turns='each' is not one of auto, whole, per_turn, last"),
    ("data.reasoning_tags", "[x]", "data.reasoning_tags must be two non-empty strings"),
])
def test_bad_chat_keys_are_config_errors(tmp_path, key, value, message):
    with pytest.raises(ConfigError, match=message):
        load_config(compose(["model=tiny", "data=chat", "data.path=x.jsonl", f"output_dir={tmp_path}",
                             f"{key}={value}"]))


def test_chat_template_kwargs_reach_the_template(tmp_path, plain_tokenizer):
    cfg = load_config(compose(["model=tiny", "data=chat", "data.path=x.jsonl", f"output_dir={tmp_path}",
                               "+data.chat_template_kwargs.enable_thinking=false"]))
    plain_tokenizer.chat_template = (
        "{{ bos_token }}{% if enable_thinking is defined and not enable_thinking %}<|system|>no thinking<|end|>{% endif %}"
        + DROPS_EARLIER_REASONING.removeprefix("{{ bos_token }}")
    )
    example = RowEncoder(cfg.data, plain_tokenizer)({"messages": TWO_TURNS[:2]}).examples[0]
    assert plain_tokenizer.decode(example.input_ids).startswith("<|bos|><|system|>no thinking<|end|><|user|>")
