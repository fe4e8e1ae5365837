"""Deploy check on CUDA: a merged export of a LoRA run, served by vLLM, gives the same greedy text
as `ftdist.generate` on the same prompts. Never yet run on a GPU.

vLLM pins its own torch, so it lives in its own virtual environment: FTDIST_VLLM_PYTHON names that
environment's interpreter (benchmarks/gpu_checks.sh step 7 builds it); without it, this
interpreter is tried. Skipped where CUDA is absent or that interpreter cannot import vllm.
Both sides run fp32 (FTDIST_VLLM_DTYPE to change it) so that kernels' rounding cannot flip an
argmax between two near-equal tokens.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from helpers import FAST, REPO, run_env, run_train, write_jsonl

from ftdist.data.synthetic import generate_rows

pytestmark = pytest.mark.gpu

MAX_NEW = 24
VLLM_PYTHON = os.environ.get("FTDIST_VLLM_PYTHON", sys.executable)
DTYPE = os.environ.get("FTDIST_VLLM_DTYPE", "float32")
# vLLM's interpreter sees its own packages only: not what PYTHONPATH adds for ftdist's.
VLLM_ENV = {**{k: v for k, v in os.environ.items() if k != "PYTHONPATH"}, "TOKENIZERS_PARALLELISM": "false"}

# Runs in vLLM's interpreter: {"model", "prompts" (token ids), "max_tokens", "dtype"} on stdin,
# the greedy texts and the model's rendering of one user turn as JSON on stdout.
VLLM_SCRIPT = r"""
import json, sys
from vllm import LLM, SamplingParams
job = json.load(sys.stdin)
llm = LLM(model=job["model"], dtype=job["dtype"], enforce_eager=True, seed=0, gpu_memory_utilization=0.3)
params = SamplingParams(temperature=0, max_tokens=job["max_tokens"])
outs = llm.generate([{"prompt_token_ids": ids} for ids in job["prompts"]], params)
rendered = llm.get_tokenizer().apply_chat_template(job["messages"], tokenize=False, add_generation_prompt=True)
print("VLLM_RESULT " + json.dumps({"texts": [o.outputs[0].text for o in outs], "rendered": rendered}))
"""


def vllm_problem() -> str | None:
    if not torch.cuda.is_available():
        return "no CUDA device"
    proc = subprocess.run([VLLM_PYTHON, "-c", "import vllm"], capture_output=True, text=True, timeout=120,
                          check=False, env=VLLM_ENV)
    if proc.returncode != 0:
        return f"{VLLM_PYTHON} cannot import vllm ({(proc.stderr.strip().splitlines() or ['?'])[-1]})"
    return None


@pytest.fixture(scope="module")
def merged_export(tmp_path_factory):
    problem = vllm_problem()
    if problem is not None:
        pytest.skip(problem)
    root = tmp_path_factory.mktemp("vllm")
    run_train([*FAST, "peft=lora", "train.max_steps=60", f"output_dir={root / 'run'}"])
    proc = subprocess.run(
        [sys.executable, "-m", "ftdist.export", str(root / "run"), "--out", str(root / "merged"), "--merge",
         "--dtype", "fp32"],
        cwd=REPO, env=run_env(), capture_output=True, text=True, timeout=300, check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return root


def test_vllm_greedy_text_equals_ftdist_generate(merged_export, capsys):
    from ftdist.generate import find_target, main, prompt_encoder

    merged = merged_export / "merged"
    rows = [{"prompt": r["prompt"]} for r in generate_rows("json_extraction", 4, seed=7)]
    prompts = write_jsonl(merged_export / "prompts.jsonl", rows)
    capsys.readouterr()
    assert main([str(merged), "--file", prompts, "--max-new-tokens", str(MAX_NEW), "--device", "cuda"]) == 0
    ours = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    target = find_target(merged, merge_adapter=False)
    encode = prompt_encoder(target.data, target.tokenizer)
    job = {"model": str(merged), "prompts": [encode(r) for r in rows], "max_tokens": MAX_NEW, "dtype": DTYPE,
           "messages": [{"role": "user", "content": rows[0]["prompt"]}]}
    proc = subprocess.run([VLLM_PYTHON, "-c", VLLM_SCRIPT], input=json.dumps(job), capture_output=True, text=True,
                          timeout=600, check=False, env=VLLM_ENV)
    result = next((line for line in proc.stdout.splitlines() if line.startswith("VLLM_RESULT ")), None)
    assert proc.returncode == 0 and result is not None, proc.stderr[-4000:]
    served = json.loads(result.removeprefix("VLLM_RESULT "))
    # vLLM renders a conversation with the chat template the export carries: the run's.
    assert served["rendered"] == ours[0]["prompt"] == target.tokenizer.decode(job["prompts"][0])
    assert [o["response"] for o in ours] == served["texts"]
    assert any(t.strip() for t in served["texts"])
