"""Where the loss goes in chat rows, checked per published chat format and against TRL.

ftdist labels a chat row by rendering it with the model's chat template (ftdist/data/chat.py).
These tests check the outcome, not the algorithm: for each model family of tests/chat_formats.py
(Llama 3.1, Qwen2.5, Qwen3, Mistral v3, Gemma 3) and each sample conversation the format
supports, the text every assistant turn must produce in that published format is written out
literally below (EXPECTED), and the labelled tokens of every example must be exactly those texts,
run by run, in order: the assistant's tokens and the turn's end-of-turn token, nothing of the
prompt, and none of the template's layout after the end-of-turn token.

TRL is the reference implementation of assistant-only loss (`assistant_only_loss=True`: a
training template with `{% generation %}` blocks and `return_assistant_tokens_mask`). Where TRL
ships a training template for a family (Qwen2.5, Qwen3, Gemma 3, and Llama 3.0 but not 3.1),
its labels are computed with TRL's own functions and compared with ftdist's, token for token;
every difference is asserted exactly and explained where it is asserted. TRL has no Mistral
template.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from chat_formats import (
    FAMILIES,
    MULTI_TURN,
    REASONING_FIELD,
    REASONING_INLINE,
    TOOL_USE,
    TOOL_USE_TWO_CALLS,
    family_tokenizer,
)

from ftdist.config import DataConfig
from ftdist.constants import IGNORE_INDEX
from ftdist.data.chat import show_labels
from ftdist.data.example import Example
from ftdist.data.formats import RowEncoder
from ftdist.data.sources import BadRow, DataError

SAMPLES = {
    "multi_turn": {"messages": MULTI_TURN},
    "reasoning_field": {"messages": REASONING_FIELD},
    "reasoning_inline": {"messages": REASONING_INLINE},
    "tool_use": TOOL_USE,
    "tool_use_two_calls": TOOL_USE_TWO_CALLS,
}

# --- What each published format makes the model produce ------------------------------------------
#
# EXPECTED[family][sample] = (data.turns the row is trained with under data.turns=auto,
#                             [labelled texts of example 1, of example 2, ...])
# or REJECTED where the published format has no rendering of the conversation.
# The texts are written from the published formats, not from ftdist's output.

REJECTED = "template_error"

THINK_4 = "<think>\nTwo and two make four.\n</think>\n\n"
THINK_6 = "<think>\nThree and three make six.\n</think>\n\n"
EMPTY_THINK = "<think>\n\n</think>\n\n"
# Qwen's tool-call blocks (Qwen2.5 and Qwen3 share them), one JSON object per <tool_call>.
QWEN_PARIS_CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
QWEN_ROME_CALLS = (
    '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome"}}\n</tool_call>\n'
    '<tool_call>\n{"name": "get_time", "arguments": {"city": "Rome"}}\n</tool_call>'
)
# Mistral v3's tool calls: [TOOL_CALLS] and one JSON list of {name, arguments, id}.
MISTRAL_PARIS_CALL = '[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Paris"}, "id": "call00001"}]'
MISTRAL_ROME_CALLS = (
    '[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Rome"}, "id": "call00002"}, '
    '{"name": "get_time", "arguments": {"city": "Rome"}, "id": "call00003"}]'
)

EXPECTED = {
    # Llama 3.1: "<|start_header_id|>assistant<|end_header_id|>\n\n" is the prompt; the answer ends
    # with <|eot_id|>. No reasoning field (reasoning_content is not rendered; inline <think> is
    # plain content). A tool call is a bare JSON object with "parameters", one per turn.
    "llama3": {
        "multi_turn": ("whole", [["Hello.<|eot_id|>", "4.<|eot_id|>"]]),
        "reasoning_field": ("whole", [["4.<|eot_id|>", "6.<|eot_id|>"]]),
        "reasoning_inline": ("whole", [[THINK_4 + "4.<|eot_id|>", THINK_6 + "6.<|eot_id|>"]]),
        "tool_use": ("whole", [['{"name": "get_weather", "parameters": {"city": "Paris"}}<|eot_id|>',
                                "It is 20 C.<|eot_id|>"]]),
        "tool_use_two_calls": REJECTED,  # Llama 3.1 has one tool call per assistant turn
    },
    # Qwen2.5 (ChatML): the prompt ends "<|im_start|>assistant\n"; the answer ends with <|im_end|>,
    # and the "\n" the template writes after it is layout the model never generates.
    "qwen2_5": {
        "multi_turn": ("whole", [["Hello.<|im_end|>", "4.<|im_end|>"]]),
        "reasoning_field": ("whole", [["4.<|im_end|>", "6.<|im_end|>"]]),
        "reasoning_inline": ("whole", [[THINK_4 + "4.<|im_end|>", THINK_6 + "6.<|im_end|>"]]),
        "tool_use": ("whole", [[QWEN_PARIS_CALL + "<|im_end|>", "It is 20 C.<|im_end|>"]]),
        "tool_use_two_calls": ("whole", [[QWEN_ROME_CALLS + "<|im_end|>", "25 C, 9:00.<|im_end|>"]]),
    },
    # Qwen3: the final assistant turn always carries a think block (empty without reasoning),
    # and turns before the last user query lose theirs. A conversation with two assistant turns
    # therefore renders its first turn differently once the second follows, so it is trained
    # turn by turn, each turn in the context the model sees at inference (where the earlier
    # turn has no think block).
    "qwen3": {
        "multi_turn": ("per_turn", [[EMPTY_THINK + "Hello.<|im_end|>"], [EMPTY_THINK + "4.<|im_end|>"]]),
        "reasoning_field": ("per_turn", [[THINK_4 + "4.<|im_end|>"], [THINK_6 + "6.<|im_end|>"]]),
        "reasoning_inline": ("per_turn", [[THINK_4 + "4.<|im_end|>"], [THINK_6 + "6.<|im_end|>"]]),
        # Both assistant turns follow the last real user query, but the tool-call turn has no
        # reasoning and is not last once the answer follows, so it loses its empty think block.
        "tool_use": ("per_turn", [[EMPTY_THINK + QWEN_PARIS_CALL + "<|im_end|>"],
                                  [EMPTY_THINK + "It is 20 C.<|im_end|>"]]),
        "tool_use_two_calls": ("per_turn", [[EMPTY_THINK + QWEN_ROME_CALLS + "<|im_end|>"],
                                            [EMPTY_THINK + "25 C, 9:00.<|im_end|>"]]),
    },
    # Mistral v3: the answer is what follows [/INST] (or [/TOOL_RESULTS]) up to and including
    # </s>. The leading space is SentencePiece's word-start marker of the answer's first token, so
    # it belongs to the answer. The system message is prepended to the LAST user message, so with
    # a system message and two user turns the first turn renders differently once the second
    # user turn exists: per_turn. Tool calls: [TOOL_CALLS] and a JSON list with 9-character ids.
    "mistral": {
        "multi_turn": ("per_turn", [[" Hello.</s>"], [" 4.</s>"]]),
        "reasoning_field": ("whole", [[" 4.</s>", " 6.</s>"]]),
        "reasoning_inline": ("whole", [[" " + THINK_4 + "4.</s>", " " + THINK_6 + "6.</s>"]]),
        "tool_use": ("whole", [[MISTRAL_PARIS_CALL + "</s>", " It is 20 C.</s>"]]),
        "tool_use_two_calls": ("whole", [[MISTRAL_ROME_CALLS + "</s>", " 25 C, 9:00.</s>"]]),
    },
    # Gemma 3: the prompt ends "<start_of_turn>model\n"; the answer ends with <end_of_turn>, and the
    # "\n" after it is layout. No tool format (the template rejects tool conversations).
    "gemma3": {
        "multi_turn": ("whole", [["Hello.<end_of_turn>", "4.<end_of_turn>"]]),
        "reasoning_field": ("whole", [["4.<end_of_turn>", "6.<end_of_turn>"]]),
        "reasoning_inline": ("whole", [[THINK_4 + "4.<end_of_turn>", THINK_6 + "6.<end_of_turn>"]]),
        "tool_use": REJECTED,
        "tool_use_two_calls": REJECTED,
    },
}

# The assistant's own words in each sample (content, reasoning, call arguments): text that may
# appear in a trained example only inside its labelled runs (or in the context of a later turn).
ASSISTANT_TEXT = {
    "multi_turn": ["Hello.", "4."],
    "reasoning_field": ["Two and two make four.", "4.", "Three and three make six.", "6."],
    "reasoning_inline": ["Two and two make four.", "4.", "Three and three make six.", "6."],
    "tool_use": ['{"city": "Paris"}', "It is 20 C."],
    "tool_use_two_calls": ['{"city": "Rome"}', "25 C, 9:00."],
}


# --- helpers ---------------------------------------------------------------------------------------


def encode(tok, row, **data):
    cfg = DataConfig(path="x.jsonl", max_seq_len=2048, format="chat", **{"turns": "auto", **data})
    return RowEncoder(cfg, tok)(row)


def runs(example, labelled: bool = True) -> list[list[int]]:
    """The token ids of each maximal run of labelled (or unlabelled) tokens, in order."""
    out, previous = [], None
    for token, label in zip(example.input_ids, example.labels):
        on = label != IGNORE_INDEX
        if on == labelled:
            if previous != on:
                out.append([])
            out[-1].append(token)
        previous = on
    return out


def labelled_texts(tok, example) -> list[str]:
    return [tok.decode(ids) for ids in runs(example)]


def unlabelled_texts(tok, example) -> list[str]:
    return [tok.decode(ids) for ids in runs(example, labelled=False)]


def render(tok, messages, tools=None, template=None, **kwargs) -> str:
    return tok.apply_chat_template(messages, tools=tools, chat_template=template, tokenize=False, **kwargs)


def supported():
    return [(f, s) for f in FAMILIES for s in SAMPLES if EXPECTED[f][s] != REJECTED]


# --- 1. exactly the assistant's tokens and each turn's end-of-turn token ------------------------


@pytest.mark.parametrize(("family", "sample"), supported())
def test_labels_are_exactly_the_assistant_text_of_the_published_format(family, sample):
    tok = family_tokenizer(family)
    row = SAMPLES[sample]
    turns, expected = EXPECTED[family][sample]
    enc = encode(tok, row)

    assert enc.turns == turns
    assert [labelled_texts(tok, ex) for ex in enc.examples] == expected
    assistant = [i for i, m in enumerate(row["messages"]) if m["role"] == "assistant"]
    # Each example is the conversation as the template renders it: the whole row, or (per_turn)
    # the row up to the turn it trains, i.e. that turn's inference context plus the turn.
    ends = [len(row["messages"])] if turns == "whole" else [i + 1 for i in assistant]
    assert len(enc.examples) == len(ends)
    for example, end, texts in zip(enc.examples, ends, expected):
        assert tok.decode(example.input_ids) == render(tok, row["messages"][:end], row.get("tools"))
        # Labels are the input ids themselves where the loss applies (not shifted).
        assert all(label in (IGNORE_INDEX, token) for token, label in zip(example.input_ids, example.labels))
        # Every turn ends on the family's end-of-turn token (eos), so the model learns to stop.
        ends_of_runs = [ids[-1] for ids in runs(example)]
        assert ends_of_runs == [tok.eos_token_id] * len(texts)
        # The labelled ids are the plain tokenization of the expected texts: each run starts and
        # ends on a token boundary of the rendering (no token straddles prompt and answer).
        assert runs(example) == [tok(text, add_special_tokens=False)["input_ids"] for text in texts]
        # None of the trained turns' own words is left outside the labels, and nothing of the
        # prompt is inside them (checked above by exact equality).
        trained = "".join(texts)
        for outside in unlabelled_texts(tok, example):
            leaked = [w for w in ASSISTANT_TEXT[sample] if w in outside and w in trained]
            assert not leaked, (outside, leaked)

    reasoning = 2 if sample.startswith("reasoning") else 0
    # reasoning_content reaches the rendering only in Qwen3's format; inline <think> is content.
    hidden = reasoning if sample == "reasoning_field" and family != "qwen3" else 0
    assert (enc.reasoning_turns, enc.reasoning_not_rendered) == (reasoning, hidden)


@pytest.mark.parametrize(("family", "sample"), [(f, s) for f in FAMILIES for s in SAMPLES if EXPECTED[f][s] == REJECTED])
def test_conversations_the_format_cannot_express_are_bad_rows(family, sample):
    # Gemma 3 has no tool format; Llama 3.1 makes one tool call per turn. A row the template
    # rejects is a bad row (counted or fatal per data.on_bad_row), never trained in a made-up format.
    with pytest.raises(BadRow) as info:
        encode(family_tokenizer(family), SAMPLES[sample])
    assert info.value.kind == "template_error"


@pytest.mark.parametrize("sample", ["multi_turn", "reasoning_field", "tool_use"])
def test_qwen3_multi_turn_rows_are_not_an_extension_of_their_turns(sample):
    # Why auto chose per_turn above: forcing whole is refused, because the whole rendering drops
    # the earlier turn's think block that its own rendering (as the last turn) has.
    with pytest.raises(BadRow) as info:
        encode(family_tokenizer("qwen3"), SAMPLES[sample], turns="whole")
    assert info.value.kind == "not_extension"


# --- 2. reasoning --------------------------------------------------------------------------------


@pytest.mark.parametrize("sample", ["reasoning_field", "reasoning_inline"])
@pytest.mark.parametrize("turns", ["auto", "per_turn"])
def test_qwen3_reasoning_is_labelled_only_with_train_on_reasoning(sample, turns):
    tok = family_tokenizer("qwen3")
    on = encode(tok, SAMPLES[sample], turns=turns, train_on_reasoning=True)
    off = encode(tok, SAMPLES[sample], turns=turns, train_on_reasoning=False)
    assert on.turns == off.turns == "per_turn"
    assert [labelled_texts(tok, ex) for ex in on.examples] == [
        ["<think>\nTwo and two make four.\n</think>\n\n4.<|im_end|>"],
        ["<think>\nThree and three make six.\n</think>\n\n6.<|im_end|>"],
    ]
    assert [labelled_texts(tok, ex) for ex in off.examples] == [["4.<|im_end|>"], ["6.<|im_end|>"]]
    # Off, the reasoning is still in the input (the model reads it), only without loss, and the
    # examples are the same tokens either way.
    assert [ex.input_ids for ex in off.examples] == [ex.input_ids for ex in on.examples]
    # (the last unlabelled run is the "\n" after <|im_end|>; the one before it ends the prompt)
    assert unlabelled_texts(tok, off.examples[0])[-2:] == [
        "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n" + THINK_4, "\n"]
    assert unlabelled_texts(tok, off.examples[1])[-2].endswith("And 3+3?<|im_end|>\n<|im_start|>assistant\n" + THINK_6)
    # The second turn's context is the inference one: Qwen3 drops the first turn's reasoning.
    assert "<|im_start|>assistant\n4.<|im_end|>" in tok.decode(on.examples[1].input_ids)
    assert "Two and two" not in tok.decode(on.examples[1].input_ids)
    assert (on.reasoning_turns, on.reasoning_not_rendered) == (off.reasoning_turns, off.reasoning_not_rendered) == (2, 0)


def test_qwen3_empty_think_block_is_reasoning_too():
    # The empty think block Qwen3 puts in the last turn is unlabelled with train_on_reasoning=false.
    tok = family_tokenizer("qwen3")
    off = encode(tok, SAMPLES["tool_use"], train_on_reasoning=False)
    assert [labelled_texts(tok, ex) for ex in off.examples] == [[QWEN_PARIS_CALL + "<|im_end|>"],
                                                                 ["It is 20 C.<|im_end|>"]]


@pytest.mark.parametrize("train_on_reasoning", [True, False])
def test_llama3_does_not_render_reasoning_content_and_trains_the_answer_alone(train_on_reasoning):
    tok = family_tokenizer("llama3")
    enc = encode(tok, SAMPLES["reasoning_field"], train_on_reasoning=train_on_reasoning)
    assert enc.turns == "whole"
    assert (enc.reasoning_turns, enc.reasoning_not_rendered) == (2, 2)
    (example,) = enc.examples
    assert labelled_texts(tok, example) == ["4.<|eot_id|>", "6.<|eot_id|>"]
    assert "two make four" not in tok.decode(example.input_ids)


def test_mistral_inline_reasoning_off_keeps_the_word_start_space_labelled():
    # Mistral renders " " + content: the space is the answer's first token (SentencePiece's
    # word-start marker), before <think>. With train_on_reasoning=false only the think block and
    # the whitespace after it lose the loss, so the space stays labelled on its own.
    tok = family_tokenizer("mistral")
    enc = encode(tok, SAMPLES["reasoning_inline"], train_on_reasoning=False)
    assert [labelled_texts(tok, ex) for ex in enc.examples] == [[" ", "4.</s>", " ", "6.</s>"]]


# --- 3. agreement with TRL --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trl_sft():
    """TRL's functions that its SFTTrainer uses for assistant_only_loss=True."""
    pytest.importorskip("trl")
    import trl
    from trl.chat_template_utils import get_training_chat_template, has_generation_markers
    from trl.data_utils import _tokenize

    return {"dir": Path(trl.__file__).parent / "chat_templates", "training_template": get_training_chat_template,
            "has_generation_markers": has_generation_markers, "tokenize": _tokenize}


def published_tokenizer(trl_sft, family, published):
    """The family tokenizer with TRL's copy of the published template, as a real checkpoint has."""
    tok = family_tokenizer(family)
    tok.chat_template = (trl_sft["dir"] / published).read_text()
    return tok


def trl_labels(trl_sft, tok, row) -> tuple[list[int], list[int]]:
    """(input_ids, labels) as TRL 1.16's SFTTrainer computes them with assistant_only_loss=True,
    for a tokenizer whose chat_template is a published one TRL recognizes. Each step is TRL's own
    code or a line-for-line copy (trl/trainer/sft_trainer.py):
    - __init__, lines 941-944: a template without generation markers is swapped for
      `get_training_chat_template(tokenizer)`; one with them is used as it is;
    - tokenize_fn, conversational language-modeling case, lines 1372-1379:
      `_tokenize(processing_class, example["messages"], return_assistant_tokens_mask=True,
      chat_template=..., tools=...)` (trl/data_utils.py);
    - build_labels, lines 1419-1424: token id where the assistant mask is 1, else -100."""
    template = None if trl_sft["has_generation_markers"](tok.chat_template) else trl_sft["training_template"](tok)
    out = trl_sft["tokenize"](tok, row["messages"], return_assistant_tokens_mask=True, chat_template=template,
                              tools=row.get("tools"))
    assert 1 in out["assistant_masks"]  # TRL raises a RuntimeError otherwise
    return out["input_ids"], [t if m else IGNORE_INDEX for t, m in zip(out["input_ids"], out["assistant_masks"])]


def with_training_template(trl_sft, family, published):
    """The family tokenizer with TRL's training template (with {% generation %} blocks)."""
    tok = published_tokenizer(trl_sft, family, published)
    tok.chat_template = trl_sft["training_template"](tok)
    return tok


WHOLE_ROWS = ["multi_turn", "reasoning_field", "reasoning_inline"]


@pytest.mark.parametrize("sample", SAMPLES)
def test_qwen2_5_trl_labels_also_the_newline_before_and_after_each_turn(trl_sft, sample):
    tok = family_tokenizer("qwen2_5")
    (ours,) = encode(tok, SAMPLES[sample]).examples
    ids, labels = trl_labels(trl_sft, published_tokenizer(trl_sft, "qwen2_5", "qwen2_5.jinja"), SAMPLES[sample])
    assert ids == ours.input_ids  # same rendering, same tokens
    # TRL's qwen2_5_training.jinja opens {% generation %} after "<|im_start|>assistant", before the
    # "\n" that ends the generation prompt, and closes it after the "\n" that follows <|im_end|>.
    # So TRL also trains, for every assistant turn, the "\n" the model is given at inference and
    # the "\n" it never generates (it stops at <|im_end|>). ftdist trains neither. Everything
    # else is labelled identically.
    ours_runs = labelled_texts(tok, ours)
    assert labelled_texts(tok, Example(ids, labels)) == ["\n" + text + "\n" for text in ours_runs]
    differ = [i for i, (a, b) in enumerate(zip(labels, ours.labels)) if a != b]
    assert [tok.decode([ids[i]]) for i in differ] == ["\n"] * (2 * len(ours_runs))
    assert all(ours.labels[i] == IGNORE_INDEX for i in differ)


@pytest.mark.parametrize("sample", WHOLE_ROWS)
def test_gemma3_trl_labels_also_the_newline_after_end_of_turn(trl_sft, sample):
    tok = family_tokenizer("gemma3")
    (ours,) = encode(tok, SAMPLES[sample]).examples
    ids, labels = trl_labels(trl_sft, published_tokenizer(trl_sft, "gemma3", "gemma3.jinja"), SAMPLES[sample])
    assert ids == ours.input_ids
    # gemma3_training.jinja puts "<end_of_turn>\n" inside {% generation %}: TRL trains the "\n"
    # after the end-of-turn token, a token the model never produces (it stops at <end_of_turn>).
    ours_runs = labelled_texts(tok, ours)
    assert labelled_texts(tok, Example(ids, labels)) == [text + "\n" for text in ours_runs]
    differ = [i for i, (a, b) in enumerate(zip(labels, ours.labels)) if a != b]
    assert [tok.decode([ids[i]]) for i in differ] == ["\n"] * len(ours_runs)


@pytest.mark.parametrize("sample", ["tool_use", "tool_use_two_calls"])
def test_gemma3_tool_rows_rejected_by_both(trl_sft, sample):
    from jinja2.exceptions import TemplateError

    tok = published_tokenizer(trl_sft, "gemma3", "gemma3.jinja")
    with pytest.raises(TemplateError, match="alternate"):  # TRL: the published alternation check
        trl_labels(trl_sft, tok, SAMPLES[sample])
    with pytest.raises(BadRow) as info:  # ftdist: our template's explicit rejection, a bad row
        encode(family_tokenizer("gemma3"), SAMPLES[sample])
    assert info.value.kind == "template_error"


# Qwen3 rows with a single assistant turn, where TRL's training template and the published one
# render the same text (they differ only in the think blocks of earlier turns).
QWEN3_SINGLE_TURN = {
    "multi_turn": {"messages": MULTI_TURN[:3]},
    "reasoning_field": {"messages": REASONING_FIELD[:2]},
    "reasoning_inline": {"messages": REASONING_INLINE[:2]},
    "tool_use": {"tools": TOOL_USE["tools"], "messages": TOOL_USE["messages"][:3]},
    "tool_use_two_calls": {"tools": TOOL_USE_TWO_CALLS["tools"], "messages": TOOL_USE_TWO_CALLS["messages"][:2]},
}


@pytest.mark.parametrize("sample", QWEN3_SINGLE_TURN)
def test_qwen3_single_turn_rows_match_trl_but_for_the_newline_after_im_end(trl_sft, sample):
    tok = family_tokenizer("qwen3")
    row = QWEN3_SINGLE_TURN[sample]
    enc = encode(tok, row)
    (ours,) = enc.examples
    ids, labels = trl_labels(trl_sft, published_tokenizer(trl_sft, "qwen3", "qwen3.jinja"), row)
    assert ids == ours.input_ids
    # qwen3_training.jinja's {% generation %} starts where ftdist's does (after the generation
    # prompt "<|im_start|>assistant\n", think block included) but ends after the "\n" that
    # follows <|im_end|>: one extra labelled "\n", at the very end.
    (text,) = labelled_texts(tok, ours)
    assert labelled_texts(tok, Example(ids, labels)) == [text + "\n"]
    assert labels[:-1] == ours.labels[:-1] and ours.labels[-1] == IGNORE_INDEX != labels[-1]
    assert tok.decode([ids[-1]]) == "\n"


@pytest.mark.parametrize("sample", SAMPLES)
def test_qwen3_multi_turn_rows_differ_from_trl_in_the_earlier_turns_context(trl_sft, sample):
    tok = family_tokenizer("qwen3")
    row = SAMPLES[sample]
    last = encode(tok, row).examples[-1]
    ids, labels = trl_labels(trl_sft, published_tokenizer(trl_sft, "qwen3", "qwen3.jinja"), row)
    theirs = Example(ids, labels)
    # TRL's qwen3_training.jinja renders every assistant turn with its think block, so it can
    # label all turns in one pass; the published template (and so the model at inference) drops
    # the think block of turns before the last user query. ftdist trains each turn in its
    # inference context instead. The last turn's labels agree (but for TRL's trailing "\n"); the
    # earlier turn is trained by both, but TRL also trains it with its think block in its context.
    first = {"multi_turn": "Hello.", "reasoning_field": "4.", "reasoning_inline": "4.",
             "tool_use": QWEN_PARIS_CALL, "tool_use_two_calls": QWEN_ROME_CALLS}[sample]
    first_think = THINK_4 if sample.startswith("reasoning") else EMPTY_THINK
    ours_text, trl_text = tok.decode(last.input_ids), tok.decode(ids)
    assert trl_text == ours_text.replace(
        "<|im_start|>assistant\n" + first + "<|im_end|>", "<|im_start|>assistant\n" + first_think + first + "<|im_end|>"
    )
    assert labelled_texts(tok, theirs)[-1] == labelled_texts(tok, last)[-1] + "\n"
    assert labelled_texts(tok, theirs)[0] == first_think + first + "<|im_end|>\n"
    assert len(labelled_texts(tok, theirs)) == 2


def test_llama3_1_has_no_trl_training_template(trl_sft):
    # TRL ships a training template for Llama 3.0 only; its SFTTrainer cannot patch 3.1's.
    tok = published_tokenizer(trl_sft, "llama3", "llama3_1.jinja")
    with pytest.raises(ValueError, match="patching is not supported"):
        trl_sft["training_template"](tok)


@pytest.mark.parametrize("sample", WHOLE_ROWS)
def test_llama3_0_labels_equal_trl_token_for_token(trl_sft, sample):
    # With the Llama 3.0 template TRL recognizes (no generation blocks) ftdist and TRL label the
    # same tokens: llama3_training.jinja's {% generation %} covers content + <|eot_id|> exactly.
    tok = published_tokenizer(trl_sft, "llama3", "llama3.jinja")
    (ours,) = encode(tok, SAMPLES[sample]).examples
    ids, labels = trl_labels(trl_sft, tok, SAMPLES[sample])
    assert (ids, labels) == (ours.input_ids, ours.labels)
    # And the same texts as Llama 3.1 (our template), whose rendering differs only in the prompt.
    assert labelled_texts(tok, ours) == EXPECTED["llama3"][sample][1][0]


def test_llama3_0_tool_rows_trl_trains_an_empty_turn_ftdist_refuses(trl_sft):
    # The published Llama 3.0 template ignores tool_calls: TRL silently trains the tool-call turn
    # as a bare <|eot_id|> (and the tool result as a "tool" turn). ftdist checks that every call
    # is rendered and stops with a DataError naming the template.
    tok = published_tokenizer(trl_sft, "llama3", "llama3.jinja")
    ids, labels = trl_labels(trl_sft, tok, TOOL_USE)
    assert labelled_texts(tok, Example(ids, labels)) == ["<|eot_id|>", "It is 20 C.<|eot_id|>"]
    with pytest.raises(DataError, match="left out the tool call to 'get_weather'"):
        encode(tok, TOOL_USE)


# ftdist with TRL's training template as the tokenizer's template: the {% generation %} path.
TRAINING_TEMPLATE_CASES = [
    ("llama3", "llama3.jinja", s) for s in WHOLE_ROWS
] + [("qwen3", "qwen3.jinja", s) for s in SAMPLES] + [("gemma3", "gemma3.jinja", s) for s in WHOLE_ROWS]


@pytest.mark.parametrize(("family", "published", "sample"), TRAINING_TEMPLATE_CASES)
def test_generation_blocks_path_equals_trl(trl_sft, family, published, sample):
    row = SAMPLES[sample]
    ids, labels = trl_labels(trl_sft, published_tokenizer(trl_sft, family, published), row)
    tok = with_training_template(trl_sft, family, published)
    enc = encode(tok, row)
    # TRL's training templates are prefix-preserving (Qwen3's keeps every think block), so every
    # row is one whole example, labelled by the template's mask inside each turn, as TRL does.
    assert enc.turns == "whole"
    (ours,) = enc.examples
    assert (ours.input_ids, ours.labels) == (ids, labels)


@pytest.mark.parametrize("sample", SAMPLES)
def test_generation_blocks_path_qwen2_5_leaves_the_generation_prompt_newline_unlabelled(trl_sft, sample):
    row = SAMPLES[sample]
    ids, labels = trl_labels(trl_sft, published_tokenizer(trl_sft, "qwen2_5", "qwen2_5.jinja"), row)
    tok = with_training_template(trl_sft, "qwen2_5", "qwen2_5.jinja")
    (ours,) = encode(tok, row).examples
    assert ours.input_ids == ids
    # ftdist applies the template's mask only inside each turn, which starts after the generation
    # prompt "<|im_start|>assistant\n": the template's leading "\n" is the model's input at
    # inference, so it stays unlabelled. The "\n" after <|im_end|> is inside the turn and inside
    # the mask, so (unlike with the plain template) it is labelled: the mask decides there.
    trl_runs = labelled_texts(tok, Example(ids, labels))
    assert [text[0] for text in trl_runs] == ["\n"] * len(trl_runs)
    assert labelled_texts(tok, ours) == [text[1:] for text in trl_runs]
    assert labelled_texts(tok, ours) == [text + "\n" for text in EXPECTED["qwen2_5"][sample][1][0]]


def test_generation_blocks_path_follows_the_mask_inside_the_turn(trl_sft):
    # With TRL's own templates the mask and ftdist's turn span coincide, so the agreement above
    # does not show that ftdist reads the mask. Here the think block is moved out of Qwen3's
    # {% generation %} block: TRL (which uses a template with markers as it is) then trains the
    # answer alone, and ftdist must follow the mask the same way.
    tok = with_training_template(trl_sft, "qwen3", "qwen3.jinja")
    think = "{{- '<think>\\n' + reasoning_content.strip('\\n') + '\\n</think>\\n\\n' }}\n"
    opened = "{%- generation %}\n        "
    combined = "{{- '<think>\\n' + reasoning_content.strip('\\n') + '\\n</think>\\n\\n' + content.lstrip('\\n') }}"
    assert tok.chat_template.count(opened + combined) == 1
    tok.chat_template = tok.chat_template.replace(opened + combined, think + opened + "{{- content.lstrip('\\n') }}")
    row = SAMPLES["reasoning_field"]
    ids, labels = trl_labels(trl_sft, tok, row)
    assert labelled_texts(tok, Example(ids, labels)) == ["4.<|im_end|>\n", "6.<|im_end|>\n"]
    (ours,) = encode(tok, row).examples
    assert (ours.input_ids, ours.labels) == (ids, labels)


# --- 4. a readable rendering --------------------------------------------------------------------------


def test_show_labels_of_a_qwen2_5_tool_use_row():
    tok = family_tokenizer("qwen2_5")
    (example,) = encode(tok, TOOL_USE).examples
    shown = show_labels(tok, example)
    print(shown)  # pytest -s shows where the loss goes
    assert shown.count("[[") == shown.count("]]") == 2
    assert (
        "<|im_start|>user\nWeather in Paris?<|im_end|>\n<|im_start|>assistant\n"
        "[[" + QWEN_PARIS_CALL + "<|im_end|>]]\n"
        "<|im_start|>user\n<tool_response>\n{\"temp\": 20}\n</tool_response><|im_end|>\n"
        "<|im_start|>assistant\n[[It is 20 C.<|im_end|>]]\n"
    ) in shown
    assert shown.endswith("[[It is 20 C.<|im_end|>]]\n")
    # Without the marks it is the row as the template renders it.
    assert shown.replace("[[", "").replace("]]", "") == render(tok, TOOL_USE["messages"], TOOL_USE["tools"])
