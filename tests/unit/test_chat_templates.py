"""The test chat templates (tests/assets/chat_templates) render like the published ones.

tests/chat_formats.py gives ftdist's chat tests a local tokenizer per model family, with a chat
template written for the tests. A test that trusts such a template is only as good as its match
with the real format, so every template is checked here against an independent rendering:
- Llama 3.1, Qwen2.5, Qwen3 and Gemma 3: TRL ships copies of the published templates
  (trl/chat_templates/*.jinja); both templates render every sample conversation and every prefix
  of it that a training or generation step would render, and must agree character for character;
- Mistral v0.3: TRL has no copy, so the expected strings are written out below from Mistral's
  own documentation of its v3 tokenizer (see MISTRAL_SOURCES).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
from chat_formats import (
    FAMILIES,
    FAMILY_TOKENS,
    MULTI_TURN,
    REASONING_FIELD,
    REASONING_INLINE,
    SYSTEM,
    TOOL_USE,
    TOOL_USE_TWO_CALLS,
    WEATHER_TOOL,
    family_tokenizer,
    template_path,
)
from jinja2.exceptions import TemplateError

SAMPLES = {
    "multi_turn": (MULTI_TURN, None),
    "reasoning_field": (REASONING_FIELD, None),
    "reasoning_inline": (REASONING_INLINE, None),
    "tool_use": (TOOL_USE["messages"], TOOL_USE["tools"]),
    "tool_use_two_calls": (TOOL_USE_TWO_CALLS["messages"], TOOL_USE_TWO_CALLS["tools"]),
}

# TRL's file name of each family's published template, and the samples the published format can
# render (Llama 3.1 has one tool call per turn; Gemma 3 has no tool format).
PUBLISHED = {
    "llama3": ("llama3_1.jinja", ("multi_turn", "reasoning_field", "reasoning_inline", "tool_use")),
    "qwen2_5": ("qwen2_5.jinja", tuple(SAMPLES)),
    "qwen3": ("qwen3.jinja", tuple(SAMPLES)),
    "gemma3": ("gemma3.jinja", ("multi_turn", "reasoning_field", "reasoning_inline")),
}


def published_template(family: str) -> str:
    # Located without importing trl (slow, and not needed to read a file).
    spec = importlib.util.find_spec("trl")
    if spec is None or spec.origin is None:
        pytest.skip("trl (dev extra) is not installed: no copies of the published templates")
    return (Path(spec.origin).parent / "chat_templates" / PUBLISHED[family][0]).read_text()


def render(tok, messages, tools=None, template=None, **kwargs) -> str:
    return tok.apply_chat_template(messages, tools=tools, chat_template=template, tokenize=False, **kwargs)


def rendered_prefixes(messages):
    """(prefix, add_generation_prompt) for each assistant turn: the prompt before it, which
    generation renders, and the conversation up to and including it, which training renders."""
    for i, message in enumerate(messages):
        if message["role"] == "assistant":
            yield messages[:i], True
            yield messages[: i + 1], False


def assert_renders_like_published(family, messages, tools=None, **kwargs):
    tok = family_tokenizer(family)
    published = published_template(family)
    for prefix, generation_prompt in rendered_prefixes(messages):
        options = dict(kwargs, add_generation_prompt=generation_prompt)
        ours = render(tok, prefix, tools, **options)
        theirs = render(tok, prefix, tools, published, **options)
        assert ours == theirs, f"{len(prefix)} messages, {options}"


# --- The family tokenizers --------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_family_tokenizer_has_the_family_tokens(family):
    tok = family_tokenizer(family)
    tokens = FAMILY_TOKENS[family]
    for token in tokens.special + tokens.plain:
        assert len(tok(token, add_special_tokens=False)["input_ids"]) == 1, token
    # Special tokens are dropped when decoding without them; plain added ones are kept.
    assert set(tokens.special) <= set(tok.all_special_tokens)
    assert not set(tokens.plain) & set(tok.all_special_tokens)
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == (tokens.bos, tokens.eos, tokens.pad)
    assert tok.chat_template == template_path(family).read_text()


def test_family_tokens_are_the_documented_ones():
    expected = {
        "llama3": ("<|begin_of_text|>", "<|eot_id|>"),
        "qwen2_5": (None, "<|im_end|>"),
        "qwen3": (None, "<|im_end|>"),
        "mistral": ("<s>", "</s>"),
        "gemma3": ("<bos>", "<end_of_turn>"),
    }
    assert {family: (t.bos, t.eos) for family, t in FAMILY_TOKENS.items()} == expected
    assert {"<think>", "</think>", "<tool_response>"} <= set(FAMILY_TOKENS["qwen3"].plain)


def test_family_tokenizer_returns_independent_copies():
    first = family_tokenizer("qwen3")
    first.chat_template = "changed"
    first.add_tokens(["<only-in-first>"])
    second = family_tokenizer("qwen3")
    assert second.chat_template == template_path("qwen3").read_text()
    assert "<only-in-first>" not in second.get_vocab()


# --- Llama 3.1, Qwen2.5, Qwen3, Gemma 3: against TRL's copies of the published templates ---------


@pytest.mark.parametrize(
    ("family", "sample"), [(family, sample) for family, (_, samples) in PUBLISHED.items() for sample in samples]
)
def test_renders_like_published(family, sample):
    messages, tools = SAMPLES[sample]
    assert_renders_like_published(family, messages, tools)
    if family == "qwen3":
        assert_renders_like_published(family, messages, tools, enable_thinking=False)


# Inputs that take the published templates' less common branches.
EDGE_CASES = {
    # Qwen3: reasoning and content on a tool-calling turn after the last user query, both kept.
    "reasoning_with_tool_calls": (
        [
            {"role": "user", "content": "Weather in Paris?"},
            {
                "role": "assistant",
                "reasoning_content": "Ask the tool.",
                "content": "Checking.",
                "tool_calls": [
                    {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}
                ],
            },
            {"role": "tool", "content": '{"temp": 20}'},
            {"role": "assistant", "reasoning_content": "It said 20.", "content": "It is 20 C."},
        ],
        [WEATHER_TOOL],
        {},
    ),
    # Qwen3: a user turn that only wraps a tool response is not a query, so the turns around it
    # keep their reasoning.
    "tool_response_in_user_turn": (
        [
            {"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "reasoning_content": "Ask.", "content": "Checking."},
            {"role": "user", "content": '<tool_response>\n{"temp": 20}\n</tool_response>'},
            {"role": "assistant", "reasoning_content": "It said 20.", "content": "It is 20 C."},
        ],
        None,
        {},
    ),
    # Arguments given as JSON text rather than a dict.
    "string_arguments": (
        [
            SYSTEM,
            {"role": "user", "content": "Weather in Paris?"},
            {
                "role": "assistant",
                "tool_calls": [{"function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}],
            },
            {"role": "tool", "content": "sunny"},
            {"role": "assistant", "content": "Sunny."},
        ],
        [WEATHER_TOOL],
        {},
    ),
    # Whitespace around contents: Llama 3.1 and Gemma 3 trim it, Qwen keeps it.
    "padded_contents": (
        [
            {"role": "system", "content": " You are terse.\n"},
            {"role": "user", "content": "\n Hi! "},
            {"role": "assistant", "content": " Hello.\n\n"},
        ],
        None,
        {},
    ),
    # Llama 3.1's other placement of the tool list, and its date option.
    "llama_options": (
        TOOL_USE["messages"],
        TOOL_USE["tools"],
        {"tools_in_user_message": False, "date_string": "01 Jan 2025"},
    ),
}


@pytest.mark.parametrize(
    ("case", "family"),
    [
        (case, family)
        for case, (_, tools, _) in EDGE_CASES.items()
        for family in PUBLISHED
        if family != "gemma3" or tools is None
    ],
)
def test_edge_cases_render_like_published(case, family):
    messages, tools, kwargs = EDGE_CASES[case]
    assert_renders_like_published(family, messages, tools, **kwargs)


def test_qwen3_reasoning_placement():
    """Spelled out, so that a change in TRL's copy cannot make both sides wrong together."""
    text = render(family_tokenizer("qwen3"), REASONING_FIELD)
    assert text == (
        "<|im_start|>user\nWhat is 2+2?<|im_end|>\n"
        "<|im_start|>assistant\n4.<|im_end|>\n"
        "<|im_start|>user\nAnd 3+3?<|im_end|>\n"
        "<|im_start|>assistant\n<think>\nThree and three make six.\n</think>\n\n6.<|im_end|>\n"
    )
    prompt = render(family_tokenizer("qwen3"), REASONING_FIELD[:1], add_generation_prompt=True, enable_thinking=False)
    assert prompt.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")


def test_llama3_rejects_parallel_tool_calls_like_published():
    messages, tools = SAMPLES["tool_use_two_calls"]
    tok = family_tokenizer("llama3")
    for template in (None, published_template("llama3")):
        with pytest.raises(TemplateError, match="single tool"):
            render(tok, messages, tools, template)


def test_gemma3_rejects_tool_conversations():
    tok = family_tokenizer("gemma3")
    for sample in ("tool_use", "tool_use_two_calls"):
        messages, tools = SAMPLES[sample]
        # The published template rejects them too (its role-alternation check trips on the tool
        # turn) ...
        with pytest.raises(TemplateError):
            render(tok, messages, tools, published_template("gemma3"))
        with pytest.raises(TemplateError, match="no tool-calling format"):
            render(tok, messages, tools)
        # ... but renders a prefix with a tool call as an empty model turn, and ignores a tool
        # list: ours rejects both (a deliberate difference, see gemma3.jinja).
        with pytest.raises(TemplateError, match="no tool-calling format"):
            render(tok, messages[:-2], tools)
    with pytest.raises(TemplateError, match="no tool-calling format"):
        render(tok, MULTI_TURN, [WEATHER_TOOL])


# --- Mistral: against Mistral's documented renderings --------------------------------------------

# The format of Mistral's tokenizer v3 (Mistral-7B-Instruct-v0.3), as documented by Mistral:
MISTRAL_SOURCES = (
    # The basic chat string of tokenizer v3:
    "https://github.com/mistralai/cookbook/blob/main/concept-deep-dive/tokenization/templates.md",
    # The tool-calling strings of tokenizer v3 (the calculator example used below):
    "https://github.com/mistralai/cookbook/blob/main/concept-deep-dive/tokenization/tool_calling.md",
    # The ground truth those pages refer to; InstructTokenizerV3 puts a system prompt and the tool
    # list on the LAST user message:
    "https://github.com/mistralai/mistral-common/blob/main/src/mistral_common/tokens/tokenizers/instruct.py",
)
# The strings below were also confirmed (once, not in this suite) with mistral-common 1.13.1:
# MistralTokenizer.v3().encode_chat_completion(...).text, reading "▁" as " " and <0x0A> as "\n".
# Spaces after [INST], [TOOL_CALLS], [TOOL_RESULTS], [AVAILABLE_TOOLS], [/INST] and
# [/TOOL_RESULTS] are SentencePiece's word-start marker on the text that follows.

CALCULATOR_TOOL = {
    "type": "function",
    "function": {
        "name": "calculator",
        "description": "Performs mathematical calculations",
        "parameters": {
            "type": "object",
            "properties": {
                "operation": {"type": "string", "description": "The operation to be done in python format."}
            },
            "required": ["operation"],
        },
    },
}
CALCULATOR_CHAT = [
    {"role": "user", "content": "What's 2+2?"},
    {
        "role": "assistant",
        "tool_calls": [
            {
                "type": "function",
                "id": "VvvODy9mT",
                "function": {"name": "calculator", "arguments": {"operation": "2+2", "format": "celsius"}},
            }
        ],
    },
    {"role": "tool", "tool_call_id": "VvvODy9mT", "content": "4"},
    {"role": "assistant", "content": "2+2=4"},
]
# tool_calling.md, "Tokenizer V3": the four "String Representation" blocks, one per message.
CALCULATOR_RENDERINGS = [
    '<s>[AVAILABLE_TOOLS] [{"type": "function", "function": {"name": "calculator", "description": "Performs mathematical calculations", "parameters": {"type": "object", "properties": {"operation": {"type": "string", "description": "The operation to be done in python format."}}, "required": ["operation"]}}}][/AVAILABLE_TOOLS][INST] What\'s 2+2?[/INST]',
    '[TOOL_CALLS] [{"name": "calculator", "arguments": {"operation": "2+2", "format": "celsius"}, "id": "VvvODy9mT"}]</s>',
    '[TOOL_RESULTS] {"content": 4, "call_id": "VvvODy9mT"}[/TOOL_RESULTS]',
    " 2+2=4</s>",
]


def test_mistral_renders_the_documented_tool_calling_example():
    tok = family_tokenizer("mistral")
    for end in range(1, len(CALCULATOR_CHAT) + 1):
        expected = "".join(CALCULATOR_RENDERINGS[:end])
        assert render(tok, CALCULATOR_CHAT[:end], [CALCULATOR_TOOL]) == expected
        # The format has no generation prompt: a prompt ends with [/INST] or [/TOOL_RESULTS].
        assert render(tok, CALCULATOR_CHAT[:end], [CALCULATOR_TOOL], add_generation_prompt=True) == expected


def test_mistral_multi_turn():
    tok = family_tokenizer("mistral")
    # The system prompt goes on the last user message (mistral-common, InstructTokenizerV3).
    assert render(tok, MULTI_TURN) == (
        "<s>[INST] Hi![/INST] Hello.</s>[INST] You are terse.\n\nWhat is 2+2?[/INST] 4.</s>"
    )
    assert render(tok, MULTI_TURN[:2]) == "<s>[INST] You are terse.\n\nHi![/INST]"
    assert render(tok, MULTI_TURN[:3]) == "<s>[INST] You are terse.\n\nHi![/INST] Hello.</s>"


WEATHER_SPEC_JSON = (
    '{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city.", '
    '"parameters": {"type": "object", "properties": {"city": {"type": "string", "description": "City name"}}, '
    '"required": ["city"]}}}'
)
TIME_SPEC_JSON = (
    '{"type": "function", "function": {"name": "get_time", "description": "Local time in a city.", '
    '"parameters": {"type": "object", "properties": {"city": {"type": "string", "description": "City name"}}, '
    '"required": ["city"]}}}'
)


def test_mistral_tool_use():
    tok = family_tokenizer("mistral")
    assert render(tok, TOOL_USE["messages"], TOOL_USE["tools"]) == (
        f"<s>[AVAILABLE_TOOLS] [{WEATHER_SPEC_JSON}][/AVAILABLE_TOOLS]"
        "[INST] You are terse.\n\nWeather in Paris?[/INST]"
        '[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Paris"}, "id": "call00001"}]</s>'
        '[TOOL_RESULTS] {"content": {"temp": 20}, "call_id": "call00001"}[/TOOL_RESULTS]'
        " It is 20 C.</s>"
    )
    assert render(tok, TOOL_USE_TWO_CALLS["messages"], TOOL_USE_TWO_CALLS["tools"]) == (
        f"<s>[AVAILABLE_TOOLS] [{WEATHER_SPEC_JSON}, {TIME_SPEC_JSON}][/AVAILABLE_TOOLS]"
        "[INST] Weather and time in Rome?[/INST]"
        '[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Rome"}, "id": "call00002"}, '
        '{"name": "get_time", "arguments": {"city": "Rome"}, "id": "call00003"}]</s>'
        '[TOOL_RESULTS] {"content": {"temp": 25}, "call_id": "call00002"}[/TOOL_RESULTS]'
        '[TOOL_RESULTS] {"content": {"time": "9:00"}, "call_id": "call00003"}[/TOOL_RESULTS]'
        " 25 C, 9:00.</s>"
    )


def test_mistral_tool_results_that_are_not_json_objects():
    tok = family_tokenizer("mistral")
    call = {"role": "assistant", "tool_calls": [{"id": "abcdefghi", "function": {"name": "f", "arguments": {}}}]}
    # mistral-common: json.dumps({"content": <json.loads(content), else content>, "call_id": ...}).
    for content, rendered in (("sunny", '"sunny"'), ("-3", "-3"), ("2.5", "2.5"), ("true", "true"), ("04", '"04"')):
        chat = [
            {"role": "user", "content": "q"},
            call,
            {"role": "tool", "tool_call_id": "abcdefghi", "content": content},
        ]
        assert render(tok, chat).endswith(
            f'[TOOL_RESULTS] {{"content": {rendered}, "call_id": "abcdefghi"}}[/TOOL_RESULTS]'
        )


@pytest.mark.parametrize(
    ("messages", "error"),
    [
        ([{"role": "assistant", "content": "Hi."}], "alternate"),
        ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], "alternate"),
        ([{"role": "user", "content": "a"}, SYSTEM], "Only user, assistant and tool"),
        (
            [
                {"role": "user", "content": "a"},
                {"role": "assistant", "tool_calls": [{"id": "short", "function": {"name": "f", "arguments": {}}}]},
            ],
            "9 characters",
        ),
        (
            [
                {"role": "user", "content": "a"},
                {
                    "role": "assistant",
                    "content": "b",
                    "tool_calls": [{"id": "abcdefghi", "function": {"name": "f", "arguments": {}}}],
                },
            ],
            "either content or tool calls",
        ),
    ],
)
def test_mistral_rejects_what_mistral_common_rejects(messages, error):
    with pytest.raises(TemplateError, match=error):
        render(family_tokenizer("mistral"), messages)
