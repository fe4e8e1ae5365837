"""A tiny Llama and its tokenizer, built locally with no download and cached on disk.

The cache holds an ordinary Hugging Face model directory (config, safetensors weights,
tokenizer with a chat template), so everything downstream goes through the same
`from_pretrained` path as a real model. Concurrent builders (torchrun ranks, parallel tests)
each write a private temp directory and rename it into place; the first rename wins and the
others discard theirs, so all readers see one complete directory.

A spec with `sft_task` is warm-started before it is saved: a short supervised fine-tuning run on
that synthetic task (`warm_start`), so a preference demo can start from a model that already
writes the task's format.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from ftdist.config import TinyModelSpec
from ftdist.data import synthetic
from ftdist.data.synthetic import tokenizer_corpus

SPECIAL_TOKENS = ["<|pad|>", "<|bos|>", "<|end|>", "<|system|>", "<|user|>", "<|assistant|>"]

# Turns are delimited by special tokens, so a prefix of the conversation always tokenizes to
# a prefix of the ids (the property response-only label masking relies on).
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def cache_root() -> Path:
    return Path(os.environ.get("FTDIST_CACHE", Path.home() / ".cache" / "ftdist"))


def spec_dir(spec: TinyModelSpec) -> Path:
    # The key covers the spec and the code that builds from it (this module and the corpus the
    # tokenizer learns from; for a warm start, also the code that turns rows into examples and
    # losses), so a changed build never reuses a stale cache entry.
    digest = hashlib.sha256(json.dumps(dataclasses.asdict(spec), sort_keys=True).encode())
    for source in build_sources(spec):
        digest.update(source.read_bytes())
    return cache_root() / "tiny" / digest.hexdigest()[:16]


def build_sources(spec: TinyModelSpec) -> list[Path]:
    sources = [Path(__file__), Path(synthetic.__file__)]
    if spec.sft_task is not None:
        package = Path(synthetic.__file__).parents[1]
        sources += [package / "data" / name for name in ("formats.py", "chat.py", "prepare.py", "loader.py")]
        sources.append(package / "objectives" / "sft.py")
    return sources


def build_tokenizer(vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    # GPT-2 style byte-level BPE: every input is representable, and common words (with their
    # leading space) become single tokens, which keeps the demo's sequences short.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(tokenizer_corpus(), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<|pad|>",
        bos_token="<|bos|>",
        eos_token="<|end|>",
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_model(spec: TinyModelSpec, tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_kv_heads,
        max_position_embeddings=spec.max_position_embeddings,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(spec.seed)
    return LlamaForCausalLM(config)


def ensure_tiny_model(spec: TinyModelSpec) -> str:
    """Path of the cached tiny model directory for `spec`, building it on first use."""
    final = spec_dir(spec)
    if (final / "done").exists():
        return str(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".build-", dir=final.parent))
    try:
        build_into(tmp, spec)
        try:
            os.rename(tmp, final)
        except OSError:
            if not (final / "done").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return str(final)


# What save_pretrained writes for the model itself; the tokenizer's files come on top.
MODEL_FILES = ("config.json", "model.safetensors")


def build_into(directory: Path, spec: TinyModelSpec) -> None:
    """Write the tiny model and tokenizer into `directory`, then its `done` marker.

    Under an initialized process group, transformers' save_pretrained writes on global rank 0
    only: a rank-1 builder left a directory of tokenizer files alone, which could win the rename
    and be cached for good (every later run: "no config.json there"). There the build runs in a
    child process, which has no process group."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        code = "import sys, json; from pathlib import Path; from ftdist.config import TinyModelSpec; "
        code += "from ftdist.model.tiny import build_into; build_into(Path(sys.argv[1]), TinyModelSpec(**json.loads(sys.argv[2])))"
        subprocess.run([sys.executable, "-c", code, str(directory), json.dumps(dataclasses.asdict(spec))], check=True)
        return
    tokenizer = build_tokenizer(spec.vocab_size)
    model = build_model(spec, tokenizer)
    if spec.sft_task is not None:
        warm_start(model, tokenizer, spec)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    missing = [name for name in MODEL_FILES if not (directory / name).is_file()]
    if missing:
        raise RuntimeError(f"tiny model build in {directory}: save_pretrained wrote no {', '.join(missing)}")
    (directory / "done").write_text("complete\n")


WARM_START_SEQ_LEN = 128  # every synthetic task's examples fit; none is truncated
WARM_START_WARMUP_STEPS = 20


def warm_start(model, tokenizer, spec: TinyModelSpec) -> None:
    """Train `model` in place for spec.sft_steps steps of SFT on synthetic:<spec.sft_task>, fp32
    on the CPU in this process, each step on fresh rows, from seeds in `spec` alone."""
    import torch.nn.functional as F

    from ftdist.config import DataConfig
    from ftdist.constants import IGNORE_INDEX
    from ftdist.data.loader import collate
    from ftdist.data.prepare import prepare_data

    # Straight to stderr: this runs while ftdist.train checks the model, before its logging is set
    # up, and a silent minute or two on first use looks like a hang.
    print(f"ftdist: building the tiny model: warm start, {spec.sft_steps} steps of SFT on synthetic:{spec.sft_task} "
          f"(once, then cached under {cache_root()})", file=sys.stderr, flush=True)
    data = DataConfig(path=f"synthetic:{spec.sft_task}", max_seq_len=WARM_START_SEQ_LEN, val_fraction=0.0,
                      num_synthetic_rows=spec.sft_steps * spec.sft_batch_size, cache=False)
    examples, _, _ = prepare_data(data, tokenizer, spec.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=spec.sft_lr, betas=(0.9, 0.95), weight_decay=0.01)
    warmup = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / WARM_START_WARMUP_STEPS))
    model.train()
    for start in range(0, len(examples), spec.sft_batch_size):
        batch = collate(examples[start:start + spec.sft_batch_size], tokenizer.pad_token_id)
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        # sft_loss_sum's computation, written out: model building must not import ftdist.objectives
        # (whose DPO reference loads models: an import cycle).
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), batch.labels[:, 1:].flatten(), ignore_index=IGNORE_INDEX,
                               reduction="sum") / batch.num_label_tokens
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        warmup.step()
        optimizer.zero_grad(set_to_none=True)
    model.eval()
