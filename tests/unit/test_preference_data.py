"""data.format=preference: rows -> pairs whose prompts are the same tokens and whose labels fall
exactly on the responses; bad rows of their own kinds; truncation that keeps pairs whole."""

from __future__ import annotations

import json

import pytest
from chat_formats import WEATHER_TOOL, family_tokenizer
from helpers import segments, token_ids

from ftdist.config import DataConfig, DataFields
from ftdist.constants import IGNORE_INDEX
from ftdist.data.example import PLAIN_PROMPT
from ftdist.data.formats import RowEncoder
from ftdist.data.preference import Pair
from ftdist.data.prepare import prepare_data
from ftdist.data.sources import BadRow, DataError

ROW = {"prompt": "Name a colour.", "chosen": "Blue.", "rejected": "A dog."}


def encode(tok, row, **data) -> Pair:
    cfg = DataConfig(path="unused", format="preference", max_seq_len=256, **data)
    (pair,) = RowEncoder(cfg, tok)(row).examples
    return pair


def test_plain_template_pair(plain_tokenizer):
    tok = plain_tokenizer
    pair = encode(tok, ROW)
    prompt = [tok.bos_token_id] + token_ids(tok, PLAIN_PROMPT.format(prompt=ROW["prompt"]))
    for sequence, text in ((pair.chosen, "Blue."), (pair.rejected, "A dog.")):
        response = token_ids(tok, text) + [tok.eos_token_id]
        assert sequence.input_ids == prompt + response
        assert sequence.labels == [IGNORE_INDEX] * len(prompt) + response
    assert pair.chosen.prompt_ids == pair.rejected.prompt_ids == prompt


def test_chat_template_strings_label_the_response_and_its_end_token(tiny_tokenizer):
    pair = encode(tiny_tokenizer, ROW)
    for sequence, text in ((pair.chosen, "Blue."), (pair.rejected, "A dog.")):
        ids, labels = segments(tiny_tokenizer, [("<|bos|><|user|>Name a colour.<|end|><|assistant|>", False),
                                                (f"{text}<|end|>", True)])
        assert (sequence.input_ids, sequence.labels) == (ids, labels)


def test_prompt_tokens_are_shared_even_where_a_joint_tokenization_would_merge(plain_tokenizer):
    """A prompt ending mid-word: tokenized together with each response, the boundary tokens would
    differ between chosen and rejected; tokenized apart, both start with the same prompt ids."""
    tok = plain_tokenizer
    row = {"prompt": "Complete the word: hel", "chosen": "lo", "rejected": "p"}
    pair = encode(tok, row)
    n = len(pair.chosen.prompt_ids)
    assert pair.chosen.input_ids[:n] == pair.rejected.input_ids[:n] == pair.chosen.prompt_ids


def test_message_rows_train_only_the_assistant_turns_after_the_prompt(tiny_tokenizer):
    row = {
        "prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                   {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Colour?"}],
        "chosen": {"role": "assistant", "content": "Blue."},
        "rejected": [{"role": "assistant", "content": "Dog."}],
    }
    pair = encode(tiny_tokenizer, row)
    head = "<|bos|><|system|>Be brief.<|end|><|user|>Hi<|end|><|assistant|>Hello.<|end|><|user|>Colour?<|end|><|assistant|>"
    for sequence, text in ((pair.chosen, "Blue."), (pair.rejected, "Dog.")):
        assert (sequence.input_ids, sequence.labels) == segments(tiny_tokenizer, [(head, False), (f"{text}<|end|>", True)])


def test_a_tool_using_response_labels_calls_and_answer_not_the_tool_result():
    tok = family_tokenizer("qwen2_5")
    call = {"id": "call00001", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}
    row = {
        "prompt": [{"role": "user", "content": "Weather in Paris?"}],
        "tools": [WEATHER_TOOL],
        "chosen": [{"role": "assistant", "tool_calls": [call]},
                   {"role": "tool", "tool_call_id": "call00001", "content": '{"temp": 20}'},
                   {"role": "assistant", "content": "It is 20 C."}],
        "rejected": "I cannot know that.",
    }
    pair = encode(tok, row)
    text = tok.decode(pair.chosen.input_ids)
    labelled = tok.decode([t for t in pair.chosen.labels if t != IGNORE_INDEX])
    assert '"name": "get_weather"' in labelled and "It is 20 C.<|im_end|>" in labelled
    assert '{"temp": 20}' in text and '{"temp": 20}' not in labelled
    assert labelled.count("<|im_end|>") == 2  # both assistant turns end with their token
    assert text.endswith("It is 20 C.<|im_end|>")  # not the newline the template puts after it
    n = len(pair.chosen.prompt_ids)
    assert pair.rejected.input_ids[:n] == pair.chosen.input_ids[:n]
    assert tok.decode([t for t in pair.rejected.labels if t != IGNORE_INDEX]) == "I cannot know that.<|im_end|>"


@pytest.mark.parametrize(("row", "kind"), [
    ({"prompt": "p", "chosen": "same", "rejected": "same"}, "same_responses"),
    ({"prompt": "p", "chosen": "a"}, "missing_field"),
    ({"prompt": "p", "chosen": "a", "rejected": 3}, "wrong_type"),
    ({"prompt": "p", "chosen": "a", "rejected": "  "}, "empty_response"),
    ({"prompt": " ", "chosen": "a", "rejected": "b"}, "empty_prompt"),
    ({"prompt": [{"role": "user", "content": "p"}], "chosen": [{"role": "user", "content": "a"}], "rejected": "b"},
     "bad_response"),
    ({"prompt": [{"role": "wizard", "content": "p"}], "chosen": "a", "rejected": "b"}, "bad_message"),
])
def test_bad_pairs_are_bad_rows_of_named_kinds(tiny_tokenizer, row, kind):
    with pytest.raises(BadRow) as caught:
        encode(tiny_tokenizer, row)
    assert caught.value.kind == kind


def test_message_prompts_need_the_chat_template(plain_tokenizer):
    with pytest.raises(DataError, match="list of messages: it needs the chat template"):
        encode(plain_tokenizer, {"prompt": [{"role": "user", "content": "p"}], "chosen": "a", "rejected": "b"})


def test_renamed_fields(tiny_tokenizer):
    pair = encode(tiny_tokenizer, {"q": "Name a colour.", "good": "Blue.", "bad": "A dog."},
                  fields=DataFields(prompt="q", chosen="good", rejected="bad"))
    assert pair.chosen.input_ids == encode(tiny_tokenizer, ROW).chosen.input_ids


def test_prepare_counts_every_row_and_truncates_pairs_whole(tiny_tokenizer, tmp_path):
    long = "word " * 40
    rows = [
        ROW,
        {"prompt": "p", "chosen": "x", "rejected": "x"},  # same_responses
        {"prompt": "Tell me.", "chosen": long + "end one", "rejected": long + "end two"},  # same after truncation
        {"prompt": "Tell me.", "chosen": "short", "rejected": long},  # the rejected one is cut
        "not an object",
    ]
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = DataConfig(path=str(path), format="preference", max_seq_len=24, val_fraction=0.0, on_bad_row="skip")
    train, val, report = prepare_data(cfg, tiny_tokenizer, seed=0)
    assert report.bad_rows == {"same_responses": 1, "not_an_object": 1}
    assert report.dropped_no_labels == 1 and report.truncated == 1
    assert len(train) == report.train_examples == 2 and val == []
    assert report.train_rows == sum(report.bad_rows.values()) + report.dropped_no_labels + report.train_examples
    assert all(len(s.input_ids) <= 24 for p in train for s in (p.chosen, p.rejected))
    assert report.train_tokens == sum(len(p) for p in train)
    with pytest.raises(DataError, match=r"pairs.jsonl:2: same_responses"):
        prepare_data(DataConfig(path=str(path), format="preference", max_seq_len=24), tiny_tokenizer, seed=0)
