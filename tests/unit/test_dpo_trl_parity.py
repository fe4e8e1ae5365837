"""ftdist's DPO against TRL's DPOTrainer (trl 1.16): the same tiny model, the same pairs as the
same token ids, and the same reference, a perturbed copy of the policy (a reference equal to the
policy would give loss ln 2 and zero rewards at step 1 in both, which proves little). Step 1's
loss, rewards/* and logps/* and its gradient norm agree, and so do those of steps 2 and 3,
after AdamW steps with the same hyperparameters.

ftdist runs as users run it (python -m ftdist.train); TRL in this process. Each step's batch is
all the pairs, so neither framework's sampling order matters.

Conventions checked here rather than assumed:
- tokens: TRL tokenizes prompt + response as one text and takes the completion where it departs
  from the prompt's tokens; ftdist tokenizes the prompt apart from each response. They give the
  same ids where the prompt ends on a token boundary (the chat template's <|assistant|>, the plain
  template's "\n"); `trl_pairs == ftdist_pairs` below checks it for every pair.
- plain template: TRL adds no template of its own; it is handed ftdist's rendering of the prompt
  (bos included, as text) and appends eos to each response, as ftdist does.
- ipo: both divide each log-ratio by its response's token count (TRL's comment: confirmed with
  the IPO authors; the paper's Eq. 17 uses sequence log-ratios).
- rewards/*, logps/*: TRL logs the mean over the step's pairs; ftdist too (one micro-batch here).

Two options differ by convention and are not compared (measured on these pairs, chat, sigmoid,
beta 0.25, step 1, ftdist vs TRL):
- objective.sft_weight against TRL's loss_type=["sigmoid", "sft"], loss_weights=[1, w]: ftdist
  averages each chosen response's per-token NLL, then over pairs (RPO's length-normalized NLL);
  TRL averages over all chosen tokens of the batch. Equal only where the chosen responses have
  the same length: w=1 gives loss 7.43827 vs 7.43856, grad_norm 12.294 vs 12.153.
- objective.label_smoothing with loss_type=sigmoid is conservative DPO (Mitchell 2023); TRL 1.16
  applies label_smoothing to robust and exo_pair only and ignores it under sigmoid: 0.2 gives loss
  0.70018 vs TRL's unsmoothed 0.70382.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import shutil

import pytest
import torch
from helpers import read_metrics, run_train

if importlib.util.find_spec("trl") is None:
    # trl is a dev dependency (pyproject): CI has it, a checkout without it skips.
    if os.environ.get("CI") == "true":
        pytest.fail("trl is not installed (pip install -e '.[dev]')", pytrace=False)
    pytest.skip("trl is not installed", allow_module_level=True)

PAIRS = 6
# Step 1 compares the forward (loss, rewards/*, logps/*) and the backward (grad_norm); step 2
# also AdamW's first update, lr * g / (|g| + eps) whatever the betas; step 3 its betas too.
STEPS = 3
LR = 1e-3
METRICS = ("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
           "logps/chosen", "logps/rejected")
# (template, loss_type, beta): TRL's loss_type names; betas away from both defaults (0.1).
CASES = [("chat", "sigmoid", 0.25), ("chat", "ipo", 0.5), ("plain", "hinge", 0.3)]


# json_preference's records all encode to 25 tokens with the tiny tokenizer; these two give
# responses of other lengths, within a pair and across pairs, so that what IPO divides by (each
# response's own token count) and how padding is placed are tested too.
UNEVEN_ROWS = [
    {"prompt": "Extract name, age, city and job as JSON: Ana Silva is 30 years old and works as a nurse in Lisbon.",
     "chosen": '{"name": "Ana Silva", "age": 30, "city": "Lisbon", "job": "nurse"}',
     "rejected": '{"name": "Ana Silva", "age": 30}'},
    {"prompt": "Extract name, age, city and job as JSON: Meet Ben Meyer, a 41-year-old pilot from Berlin.",
     "chosen": 'Here it is: {"name": "Ben Meyer", "age": 41, "city": "Berlin", "job": "pilot"}',
     "rejected": '{"name": "Ben Meyer", "age": 41, "city": "Berlin", "job": "pilot", "hobby": "chess, on Sundays"}'},
]


@pytest.fixture(scope="module")
def pairs_path(tmp_path_factory):
    from ftdist.data.synthetic import generate_rows

    rows = generate_rows("json_preference", PAIRS - len(UNEVEN_ROWS), seed=0) + UNEVEN_ROWS
    path = tmp_path_factory.mktemp("pairs") / "pairs.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.fixture(scope="module")
def reference_dir(tiny_model_dir, tmp_path_factory):
    """The tiny model with seeded noise on every weight, of its initialization's scale (std 0.02):
    a reference whose log-ratios against the policy are of order one nat."""
    from safetensors.torch import load_file, save_file

    out = tmp_path_factory.mktemp("reference") / "model"
    shutil.copytree(tiny_model_dir, out)
    weights = load_file(out / "model.safetensors")
    g = torch.Generator().manual_seed(1)
    perturbed = {name: w + 0.02 * torch.randn(w.shape, generator=g) for name, w in weights.items()}
    save_file(perturbed, out / "model.safetensors", metadata={"format": "pt"})
    return out


def ftdist_overrides(pairs_path, reference_dir, out_dir, template: str, loss_type: str, beta: float) -> list[str]:
    # One global batch of all pairs; the optimizer TRL's Trainer builds from the config below:
    # torch AdamW, constant lr, no warmup, no weight decay, no clipping (a norm limit of null).
    return [
        "model=tiny", "data=preference", f"data.path={pairs_path}", f"data.template={template}",
        "data.max_seq_len=128", "data.val_fraction=0", "objective=dpo", f"objective.loss_type={loss_type}",
        f"objective.beta={beta}", "objective.reference=model", f"objective.reference_path={reference_dir}",
        f"train.max_steps={STEPS}", f"train.micro_batch_size={PAIRS}", "train.grad_accum_steps=1", f"train.lr={LR}",
        "train.schedule=constant", "train.warmup_steps=0", "train.weight_decay=0", "train.adam_beta1=0.9",
        "train.adam_beta2=0.95", "train.adam_eps=1e-8", "train.max_grad_norm=null", "train.mixed_precision=none",
        "train.eval_every_steps=null", "train.progress_bar=false", "eval.generation.samples=0",
        f"output_dir={out_dir}",
    ]


def ftdist_pairs(overrides: list[str]) -> list[tuple]:
    """(prompt ids, chosen ids, rejected ids) of each pair, as ftdist's data pipeline builds them."""
    from ftdist.config import compose, load_config
    from ftdist.constants import IGNORE_INDEX
    from ftdist.data.prepare import prepare_data
    from ftdist.model.loading import load_tokenizer

    cfg = load_config(compose(overrides))
    train, _, _ = prepare_data(cfg.data, load_tokenizer(cfg.model), cfg.seed)
    out = []
    for pair in train:
        prompt_len = len(pair.chosen.input_ids) - sum(label != IGNORE_INDEX for label in pair.chosen.labels)
        # Every response token is labelled and no prompt token is: TRL's completion mask.
        for sequence in (pair.chosen, pair.rejected):
            assert all(label == IGNORE_INDEX for label in sequence.labels[:prompt_len])
            assert sequence.labels[prompt_len:] == sequence.input_ids[prompt_len:]
        prompt = pair.chosen.input_ids[:prompt_len]
        assert pair.rejected.input_ids[:prompt_len] == prompt
        out.append((prompt, pair.chosen.input_ids[prompt_len:], pair.rejected.input_ids[prompt_len:]))
    return sorted(out)


def trl_rows(pairs_path, template: str, tokenizer) -> list[dict]:
    """The rows as a TRL user hands them over: conversational under the chat template; under the
    plain template, prompt text rendered as ftdist renders it (TRL has no template of its own)."""
    from ftdist.data.example import PLAIN_PROMPT

    rows = [json.loads(line) for line in pairs_path.read_text().splitlines()]
    if template == "chat":
        return [{"prompt": [{"role": "user", "content": r["prompt"]}],
                 "chosen": [{"role": "assistant", "content": r["chosen"]}],
                 "rejected": [{"role": "assistant", "content": r["rejected"]}]} for r in rows]
    return [{"prompt": tokenizer.bos_token + PLAIN_PROMPT.format(prompt=r["prompt"]), "chosen": r["chosen"],
             "rejected": r["rejected"]} for r in rows]


def run_trl(model_dir, reference_dir, rows: list[dict], out_dir, loss_type: str, beta: float):
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    load = lambda d: AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32, attn_implementation="sdpa")
    config = DPOConfig(
        output_dir=str(out_dir), loss_type=[loss_type], beta=beta, max_steps=STEPS, per_device_train_batch_size=PAIRS,
        gradient_accumulation_steps=1, learning_rate=LR, lr_scheduler_type="constant", warmup_steps=0,
        weight_decay=0.0, adam_beta1=0.9, adam_beta2=0.95, adam_epsilon=1e-8, optim="adamw_torch",
        # HF clips only when max_grad_norm > 0 but then reports no norm; a limit far above the
        # norm scales the gradients by exactly 1 and reports it.
        max_grad_norm=1e9, max_length=128, use_cpu=True, bf16=False, fp16=False, logging_steps=1,
        save_strategy="no", report_to="none", disable_tqdm=True, dataloader_num_workers=0, seed=0,
    )
    trainer = DPOTrainer(model=load(model_dir), ref_model=load(reference_dir), args=config,
                         train_dataset=Dataset.from_list(rows), processing_class=AutoTokenizer.from_pretrained(model_dir))
    trainer.train()
    pairs = sorted((r["prompt_ids"], r["chosen_ids"], r["rejected_ids"]) for r in trainer.train_dataset)
    steps = [record for record in trainer.state.log_history if "loss" in record]
    return pairs, steps


def tolerances(step: int, beta: float, trl_record: dict) -> tuple[float, float]:
    """(rel, floor): the relative tolerance of `step`'s metrics, and the fp32 floor under which
    differences are rounding: absolute for loss and rewards/*, relative for grad_norm.

    loss and rewards/* come from log-ratios, differences of fp32 sums of ~180 nats, so their error
    is a few ulps of those sums times beta (measured at step 1: under 1e-7 x beta x |logps|); the
    gradient inherits it through each pair's weight (measured: under 5e-6 relative). From step 2
    on AdamW's update, lr * m / (sqrt(v) + eps), enlarges last-bit differences in near-zero
    gradient elements: by step 3 the grad norm differs by up to 1e-4 relative, as much as TRL
    against itself with eager attention instead of sdpa (2e-5), and the rest by under 1e-5
    relative or 3e-6 x beta x |logps|."""
    scale = 1e-5 if step == 1 else 1e-4
    logps = max(abs(trl_record["logps/chosen"]), abs(trl_record["logps/rejected"]))
    return scale, scale / 10 * beta * logps


@pytest.mark.parametrize("template,loss_type,beta", CASES)
def test_dpo_matches_trl(tiny_model_dir, pairs_path, reference_dir, tmp_path, template, loss_type, beta):
    from transformers import AutoTokenizer

    overrides = ftdist_overrides(pairs_path, reference_dir, tmp_path / "ftdist", template, loss_type, beta)
    rows = trl_rows(pairs_path, template, AutoTokenizer.from_pretrained(tiny_model_dir))
    trl_pairs, trl_steps = run_trl(tiny_model_dir, reference_dir, rows, tmp_path / "trl", loss_type, beta)
    assert trl_pairs == ftdist_pairs(overrides)

    run_train(overrides)
    ftdist_steps, _ = read_metrics(tmp_path / "ftdist")
    assert len(ftdist_steps) == len(trl_steps) == STEPS
    first = ftdist_steps[0]
    # Not the trivial point a reference equal to the policy gives.
    assert abs(first["loss"] - math.log(2)) > 1e-3 and abs(first["rewards/margins"]) > 1e-3
    for step, (ours, theirs) in enumerate(zip(ftdist_steps, trl_steps, strict=True), start=1):
        rel, floor = tolerances(step, beta, theirs)
        for key in METRICS:
            assert ours[key] == pytest.approx(theirs[key], rel=rel, abs=floor), (step, key, ours, theirs)
        assert ours["grad_norm"] == pytest.approx(theirs["grad_norm"], rel=max(rel, floor)), (step, ours, theirs)
