"""Chat data as users have it, trained end to end: a Qwen3-format template given as a file on the
tiny tokenizer, multi-turn and tool-use conversations, data.turns=auto."""

from __future__ import annotations

import json
from pathlib import Path

from helpers import FAST, read_metrics
from transformers import AutoTokenizer

from ftdist.checkpoint import complete_checkpoints
from ftdist.config import compose
from ftdist.data.chat import show_labels
from ftdist.export import export
from ftdist.train import run

TEMPLATE = Path(__file__).resolve().parents[1] / "assets" / "chat_templates" / "qwen3.jinja"
TOOLS = [{"type": "function", "function": {"name": "weather", "description": "Weather in a city",
          "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
CITIES = ["Oslo", "Lima", "Rome", "Kyiv", "Riga", "Riga"]


def single(city: str) -> dict:
    return {"messages": [{"role": "user", "content": f"Where is {city}?"},
                         {"role": "assistant", "content": f"{city} is a capital.", "reasoning_content": "easy"}]}


def two_turns(city: str) -> dict:
    return {"messages": [{"role": "user", "content": f"Name {city}."}, {"role": "assistant", "content": city},
                         {"role": "user", "content": "Again?"}, {"role": "assistant", "content": f"{city}!"}]}


def tool_use(city: str) -> dict:
    return {"tools": TOOLS, "messages": [
        {"role": "user", "content": f"Weather in {city}?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"type": "function", "id": "c1", "function": {"name": "weather", "arguments": json.dumps({"city": city})}}]},
        {"role": "tool", "tool_call_id": "c1", "content": '{"temp": 3}'},
        {"role": "assistant", "content": f"{city}: 3 C."},
    ]}


def test_multi_turn_and_tool_chats_train_with_a_qwen3_template_per_turn_where_needed(tmp_path):
    rows = [make(c) for make in (single, two_turns, tool_use) for c in CITIES]
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    val = tmp_path / "val.jsonl"
    val.write_text("".join(json.dumps(make("Baku")) + "\n" for make in (single, two_turns, tool_use)))
    run_dir = tmp_path / "run"
    dcfg = compose([
        *FAST, "data=chat", f"data.path={data}", f"data.validation_path={val}", f"data.chat_template={TEMPLATE}",
        "data.max_seq_len=1024", "data.packing=true", "train.micro_batch_size=2", "train.max_steps=3",
        "train.eval_every_steps=3", "eval.generation.samples=1", "eval.generation.max_new_tokens=4", "checkpoint.every_steps=3",
        f"output_dir={run_dir}",
    ])
    trainer, summary = run(dcfg, output_dir=str(run_dir))
    assert summary["steps"] == 3

    # Qwen3's template drops the <think> block of assistant turns that are not the last one, so
    # every conversation with two assistant turns goes per_turn, one-turn ones stay whole.
    report = json.loads((run_dir / "data_report.json").read_text())
    n = len(CITIES)
    assert report["turns"] == {"whole": n, "per_turn": 2 * n}
    assert report["turn_examples"] == 2 * n and report["train_examples"] == 5 * n
    assert report["val_turns"] == {"whole": 1, "per_turn": 2} and report["val_examples"] == 5
    assert report["reasoning_turns"] == n and report["reasoning_not_rendered"] == 0
    train, evals = read_metrics(run_dir)
    assert len(train) == 3 and all(r["loss"] > 0 for r in train) and evals[-1]["generation_n"] == 1

    # The tool-use row's second turn, as the model sees it at inference: the call it made (without
    # the think block Qwen3 drops from earlier turns), the tool's result, then its answer. The tiny
    # tokenizer has no <|im_end|> token (it is text here), so the newline the template writes after
    # it is what ends the turn and is labelled too; with Qwen's tokenizer it is not (test_chat_formats).
    tok = trainer.tokenizer
    second = trainer.train_examples[-1]
    shown = show_labels(tok, second)
    print(shown)
    labelled = shown.split("[[")[1:]
    assert len(labelled) == 1 and labelled[0] == "<think>\n\n</think>\n\nRiga: 3 C.<|im_end|>\n]]"
    assert '<tool_call>\n{"name": "weather", "arguments": {"city": "Riga"}}\n</tool_call><|im_end|>' in shown
    assert "<tool_response>\n{\"temp\": 3}\n</tool_response>" in shown.split("[[")[0]
    first = trainer.train_examples[-2]
    assert show_labels(tok, first).split("[[")[1] == (
        '<think>\n\n</think>\n\n<tool_call>\n{"name": "weather", "arguments": {"city": "Riga"}}\n</tool_call>'
        "<|im_end|>\n]]"
    )

    # The template trained with is the one final/ serves with, and the run keeps a copy, which an
    # export from a checkpoint uses (data.chat_template may be a relative path, or gone).
    assert AutoTokenizer.from_pretrained(run_dir / "final").chat_template == TEMPLATE.read_text()
    assert (run_dir / "chat_template.jinja").read_text() == TEMPLATE.read_text()
    exported = export(complete_checkpoints(run_dir)[-1], tmp_path / "exported")
    assert AutoTokenizer.from_pretrained(exported).chat_template == TEMPLATE.read_text()
