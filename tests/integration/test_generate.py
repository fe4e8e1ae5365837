"""`python -m ftdist.generate` on a real LoRA run: its responses are a plain greedy decode of the
trained model (computed here without ftdist's loading, encoding or generation code), the same
merged or not, and the ones the run's own generation eval wrote for its validation rows; bad
input is one line and exit code 2."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from helpers import LORA_GENERATION_STEPS, REPO, lora_generation_run, run_env, write_jsonl

from ftdist.constants import EXIT_BAD_INPUT
from ftdist.generate import main

STEPS = LORA_GENERATION_STEPS
MAX_NEW = 24  # the run's eval.generation.max_new_tokens


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    """A LoRA run whose validation rows are a file of its own, generated for at its end."""
    return lora_generation_run(tmp_path_factory)


@pytest.fixture(scope="module")
def generated(lora_run):
    """ftdist.generate RUN --file val.jsonl, run as a user runs it."""
    out = lora_run / "generated.jsonl"
    proc = subprocess.run(
        [sys.executable, "-m", "ftdist.generate", str(lora_run / "run"), "--file", str(lora_run / "val.jsonl"),
         "--out", str(out)],
        cwd=REPO, env=run_env(), capture_output=True, text=True, timeout=300, check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads(line) for line in out.read_text().splitlines()]


def generate_in_process(argv, capsys) -> list[dict]:
    capsys.readouterr()
    assert main(argv) == 0
    return [json.loads(line) for line in capsys.readouterr().out.splitlines()]


@torch.no_grad()
def greedy_reference(final, rows) -> list[tuple[str, str]]:
    """(rendered prompt, response) per row: base + adapter through peft, the prompt rendered with
    final/'s chat template, argmax token by token with no cache, no batching and no padding."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(final)
    base_path = json.loads((final / "adapter_config.json").read_text())["base_model_name_or_path"]
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_path), final).eval()
    stop = {tokenizer.eos_token_id, model.generation_config.eos_token_id} - {None}
    out = []
    for row in rows:
        text = tokenizer.apply_chat_template([{"role": "user", "content": row["prompt"]}], tokenize=False,
                                             add_generation_prompt=True)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        new: list[int] = []
        for _ in range(MAX_NEW):
            token = int(model(input_ids=torch.tensor([ids + new])).logits[0, -1].argmax())
            if token in stop:
                break
            new.append(token)
        out.append((tokenizer.decode(ids), tokenizer.decode(new, skip_special_tokens=True)))
    return out


def test_generate_is_a_greedy_decode_of_base_plus_adapter(lora_run, generated):
    rows = [json.loads(line) for line in (lora_run / "val.jsonl").read_text().splitlines()]
    expected = greedy_reference(lora_run / "run" / "final", rows)
    assert [g["index"] for g in generated] == list(range(len(rows)))
    assert [(g["prompt"], g["response"]) for g in generated] == expected
    assert any(response.strip() for _, response in expected)  # something was generated


def test_merge_gives_the_same_text(lora_run, generated, capsys):
    capsys.readouterr()
    assert main([str(lora_run / "run" / "final"), "--file", str(lora_run / "val.jsonl"), "--merge"]) == 0
    out, err = capsys.readouterr()
    assert "merge check: max |logits(merged" in err  # it did merge (export's check, kept off stdout)
    assert [json.loads(line) for line in out.splitlines()] == generated


def test_training_generations_are_reproduced_from_final(lora_run, generated):
    """The run's last generation eval (the live model at its last step) wrote, for each
    validation row, the same prompt and response ftdist.generate gives from final/."""
    records = [json.loads(line) for line in
               (lora_run / "run" / "eval" / f"generations_step_{STEPS:08d}.jsonl").read_text().splitlines()]
    assert [r["index"] for r in records] == list(range(len(generated)))
    assert [(r["prompt"], r["response"]) for r in records] == [(g["prompt"], g["response"]) for g in generated]


def test_prompt_flag_and_prompt_rows_encode_as_validation_rows(lora_run, generated, capsys):
    """--prompt TEXT, and a row with its prompt alone, render as the run's rows with a response."""
    rows = [json.loads(line) for line in (lora_run / "val.jsonl").read_text().splitlines()][:2]
    prompts = lora_run / "prompts.jsonl"
    write_jsonl(prompts, [{"prompt": r["prompt"]} for r in rows])
    run = str(lora_run / "run")
    by_flag = generate_in_process([run, "--prompt", rows[0]["prompt"], "--prompt", rows[1]["prompt"]], capsys)
    by_file = generate_in_process([run, "--file", str(prompts)], capsys)
    assert by_flag == by_file == generated[:2]


def test_bad_input_is_one_line_and_exit_2(lora_run, tmp_path, capsys):
    """A missing model, a malformed row (named by file:line), a classifier's directory."""
    from transformers import AutoModelForSequenceClassification, LlamaConfig

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "fine"}\n{"prompt": 3}\n')
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"prompt": "fine"}\n{"prompt": \n')
    classifier = tmp_path / "classifier"
    config = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_labels=2)
    AutoModelForSequenceClassification.from_config(config).save_pretrained(classifier)
    run = str(lora_run / "run")
    cases = [
        ([str(tmp_path / "missing"), "--prompt", "hi"], str(tmp_path / "missing")),
        ([run, "--file", str(bad)], f"{bad}:2"),
        ([run, "--file", str(broken)], f"{broken}:2"),
        ([str(classifier), "--prompt", "hi"], "ftdist.score"),
    ]
    for argv, named in cases:
        capsys.readouterr()
        code = main(argv)
        out, err = capsys.readouterr()
        lines = [line for line in err.splitlines() if line.strip()]
        assert code == EXIT_BAD_INPUT, (argv, err)
        assert len(lines) == 1 and lines[0].startswith("ftdist.generate: ") and named in lines[0], err
        assert out == ""
