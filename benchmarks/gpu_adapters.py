"""Full fine-tuning, LoRA and QLoRA on one GPU: Llama-3.1-8B architecture, random init, packed rows.

    python benchmarks/gpu_adapters.py [--methods full,lora,qlora] [--strategy fsdp|single] [--objective sft|dpo]
                                      [--seq-len 2048] [--micro 2] [--warmup-steps 3] [--steps 5]
                                      [--compile] [--liger] [--loss-chunk-tokens N] [--no-grad-ckpt]
    python benchmarks/gpu_adapters.py --tiny       # the same code on CPU with a small config

Prints one JSON object: per method, real tokens/s, MFU, peak memory and model load time.
`full` trains every parameter in bf16 (model.dtype=bf16, so AdamW's states are bf16 too: 8B
parameters, gradients and two moments take 64 GB). `--compile` compiles the decoder blocks
(train.compile), `--liger` applies Liger-Kernel (model.liger), `--loss-chunk-tokens` sets
model.loss_chunk_tokens (default: auto; 0: one chunk). `mfu` counts 4N + 2N_trainable per token
as before; `mfu_with_attention` adds the attention scores of every packed document, as the
trainer's train lines do (step_flops).

--objective dpo trains DPO (sigmoid loss, beta 0.1) on random preference pairs instead: a
shared prompt and two responses of different lengths (synthetic_pairs), labels on the
responses, whole pairs packed into rows of 2 x --seq-len as data.packing packs them. The
reference is the policy with its adapters disabled (objective.reference=adapter), so QLoRA
holds one 4-bit base. Its FLOPs per token add the reference's forward (2N); pairs/s and
the loss of step 1 are reported too. That loss must be ln 2: the adapters start as the identity
(LoRA's B is zero), so policy and reference agree and every pair's margin is 0. Anything else
means the reference is not the policy's base.

What runs is ftdist's own code wherever a random-init model allows it: the architecture's
config (ftdist.model.architectures), the attention backend choice, the bitsandbytes config of
peft=qlora (NF4, double quantization, bf16 storage: ftdist.model.adapters.quantization_config),
gradient checkpointing and the LoRA adapters (ftdist.model.loading.finish_model), the strategy
(strategy=fsdp with a one-process group by default: FSDP2 per decoder block, bf16 compute,
fp32 reduction), packing and the Trainer's own train_step, whose tokens/s, MFU (ftdist.metrics:
4N + 2N_trainable FLOPs per token, attention scores and the recomputation of gradient
checkpointing not counted) and peak memory (torch.cuda.max_memory_allocated) are reported.
Only the weights are made here instead of read from disk: the model is built directly on the
GPU in bf16 and initialised there (a CPU init of 8B parameters takes minutes), and for QLoRA
each linear layer but the head is then quantized on the GPU into a bitsandbytes Linear4bit
built from the same BitsAndBytesConfig, as transformers does while loading.

Each method runs in its own process (clean memory, and one failure does not hide the other);
if strategy=fsdp fails, the method is retried with strategy=single and both outcomes reported.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from types import SimpleNamespace

import torch

ARCHITECTURE = "llama-3.1-8b"
# --tiny: the 8B config's shape rules (GQA, RoPE scaling, untied head) at a CPU-friendly size.
TINY_OVERRIDES = {
    "hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2,
    "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 1024,
}
RESULT_MARKER = "GPU_ADAPTERS_RESULT "
# DPO's loss when policy and reference agree: -log sigmoid(0).
DPO_LOSS_AT_START = 0.6931471805599453


def model_config(tiny: bool):
    from ftdist.model.architectures import architecture_config

    config = architecture_config(ARCHITECTURE)
    if tiny:
        for key, value in TINY_OVERRIDES.items():
            setattr(config, key, value)
        config.head_dim = config.hidden_size // config.num_attention_heads
    return config


def quantize_linears(model: torch.nn.Module, quant, device: torch.device) -> int:
    """Replace every nn.Linear but the output head by a bitsandbytes Linear4bit holding the same
    weight, quantized on `device` with the settings of `quant` (a BitsAndBytesConfig)."""
    import bitsandbytes as bnb

    head = model.get_output_embeddings()
    names = [n for n, m in model.named_modules() if type(m) is torch.nn.Linear and m is not head]
    for name in names:
        old = model.get_submodule(name)
        new = bnb.nn.Linear4bit(
            old.in_features, old.out_features, old.bias is not None, quant.bnb_4bit_compute_dtype,
            compress_statistics=quant.bnb_4bit_use_double_quant, quant_type=quant.bnb_4bit_quant_type,
            quant_storage=quant.bnb_4bit_quant_storage, device="meta",
        )
        new.weight = bnb.nn.Params4bit(
            old.weight.data, requires_grad=False, compress_statistics=quant.bnb_4bit_use_double_quant,
            quant_type=quant.bnb_4bit_quant_type, quant_storage=quant.bnb_4bit_quant_storage, module=new,
        ).to(device)  # quantizes
        if old.bias is not None:
            new.bias = torch.nn.Parameter(old.bias.data, requires_grad=False)
        new.requires_grad_(False)
        model.set_submodule(name, new)
        del old
    # What transformers sets on a model it loaded in 4 bits; peft reads it to wrap Linear4bit.
    model.is_loaded_in_4bit = True
    return len(names)


def build_model(cfg, device: torch.device, tiny: bool):
    """The random-init model on `device`, quantized for qlora, finished by ftdist (adapters...)."""
    from transformers import AutoModelForCausalLM

    from ftdist.constants import DTYPES
    from ftdist.model.adapters import quantization_config
    from ftdist.model.attention import resolve_attn_implementation
    from ftdist.model.loading import finish_model

    dtype = DTYPES[cfg.model.dtype]
    attn = resolve_attn_implementation(cfg.model.attn_implementation, device)
    config = model_config(tiny)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=attn)
    quant = quantization_config(cfg.peft, dtype)
    quantized = 0
    if quant is not None:
        quantized = quantize_linears(model, quant, device)
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    model = finish_model(model, cfg.model, cfg.peft, quantized=quant is not None)
    return model, quantized


def synthetic_examples(rows: int, seq_len: int, vocab: int, seed: int = 0) -> list:
    """Documents of 128..seq_len tokens (about two per packed row), a fifth of each a prompt."""
    from ftdist.data.prepare import Example

    rng = random.Random(seed)
    g = torch.Generator().manual_seed(seed)
    out, total = [], 0
    while total < rows * seq_len * 1.3:  # enough for `rows` nearly full packed rows
        n = rng.randint(128, seq_len)
        ids = torch.randint(10, vocab, (n,), generator=g).tolist()
        prompt = n // 5
        out.append(Example(ids, [-100] * prompt + ids[prompt:]))
        total += n
    return out


def synthetic_pairs(rows: int, seq_len: int, vocab: int, seed: int = 0) -> list:
    """Preference pairs filling about `rows` packed rows of 2 x seq_len: a prompt of
    seq_len/16..seq_len/4 tokens shared by two responses of seq_len/16..seq_len/2 tokens and
    different lengths (about two pairs a row); labels on the responses only, as
    ftdist.data.preference encodes a pair."""
    from ftdist.data.preference import Pair
    from ftdist.data.prepare import Example

    rng = random.Random(seed)
    g = torch.Generator().manual_seed(seed)
    tokens = lambda n: torch.randint(10, vocab, (n,), generator=g).tolist()
    out, total = [], 0
    while total < rows * 2 * seq_len * 1.3:  # enough for `rows` nearly full packed rows
        prompt = tokens(rng.randint(seq_len // 16, seq_len // 4))
        lengths = rng.sample(range(seq_len // 16, seq_len // 2 + 1), 2)  # distinct
        chosen, rejected = (
            Example(prompt + ids, [-100] * len(prompt) + ids, list(prompt)) for ids in map(tokens, lengths)
        )
        out.append(Pair(chosen, rejected))
        total += len(out[-1])
    return out


def dpo_figures(records: list[dict], timed: list[dict], seconds: float, seq_len: int, micro: int) -> dict:
    """What a DPO run reports beyond the SFT figures: pairs/s, and the loss of step 1 against ln 2."""
    pairs = sum(r["pairs"] for r in timed)
    # Against full rows, not the trainer's packing_efficiency: a micro-batch of one row has no
    # padding however short the row.
    slots = len(timed) * micro * 2 * seq_len
    first = records[0]["loss"]
    return {
        "objective": "dpo",
        "reference": "adapter (the policy with its adapters disabled)",
        "packed_row_len": 2 * seq_len,
        "pairs_timed": int(pairs),
        "pairs_per_s": round(pairs / seconds, 2),
        "row_fill": round(sum(r["tokens"] for r in timed) / slots, 4),
        "loss_step1": round(first, 6),
        "loss_step1_minus_ln2": float(f"{first - DPO_LOSS_AT_START:.3g}"),
        "rewards_margin_last": round(records[-1]["rewards/margins"], 4),
        "rewards_accuracy_last": round(records[-1]["rewards/accuracies"], 4),
    }


def largest_micro_batch(trainer, examples: list, limit: int) -> dict:
    """After the timed steps: the most packed rows one micro-batch can hold, doubling from 1 until
    a forward and backward runs out of device memory (or `limit` rows pass). Gradients are dropped
    after each try; the optimizer never steps."""
    from ftdist.data.packing import pack_documents

    items = pack_documents([len(e) if hasattr(e, "chosen") else len(e.input_ids) for e in examples],
                           trainer.cfg.data.max_seq_len * (2 if hasattr(examples[0], "chosen") else 1), 0, 2000)
    fits, rows = 0, 1
    while rows <= min(limit, len(items)):
        try:
            trainer.accumulate([trainer.collate_items(examples, items[:rows])]).tolist()
            fits = rows
        except torch.cuda.OutOfMemoryError:
            break
        finally:
            trainer.optimizer.zero_grad(set_to_none=True)
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        rows *= 2
    return {"largest_micro_batch_rows": fits, "largest_micro_batch_limit": min(limit, len(items))}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_one(args) -> dict:
    """One method under one strategy, in this process; returns its result record."""
    from ftdist.config import (
        DataConfig,
        FtdistConfig,
        ModelConfig,
        ObjectiveConfig,
        PeftConfig,
        StrategyConfig,
        TrainConfig,
    )
    from ftdist.parallel import build_strategy
    from ftdist.trainer import Trainer

    t_start = time.perf_counter()
    dpo = args.objective == "dpo"
    cfg = FtdistConfig(
        model=ModelConfig(
            architecture=ARCHITECTURE, dtype="bf16", attn_implementation=args.attn,
            gradient_checkpointing=not args.no_grad_ckpt, loss_chunk_tokens=args.loss_chunk_tokens, liger=args.liger,
        ),
        data=DataConfig(
            path="synthetic:random-tokens", format="preference" if dpo else "instruction",
            max_seq_len=args.seq_len, packing=True, val_fraction=0.0,
        ),
        # Explicit rather than auto: what is measured is the adapter-disabled reference.
        objective=ObjectiveConfig(name="dpo", reference="adapter") if dpo else ObjectiveConfig(),
        peft=PeftConfig(method="none" if args.child == "full" else args.child),
        strategy=StrategyConfig(name=args.strategy),
        train=TrainConfig(lr=1e-4, micro_batch_size=args.micro, grad_accum_steps=args.accum, warmup_steps=0,
                          progress_bar=False, max_steps=10**6, compile=args.compile),
        output_dir=tempfile.mkdtemp(prefix="ftdist_gpu_adapters_"),
    )
    torch.manual_seed(0)
    strategy = build_strategy(cfg.strategy)
    try:
        device = strategy.device
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        sync(device)
        t0 = time.perf_counter()
        model, quantized = build_model(cfg, device, args.tiny)
        sync(device)
        build_s = time.perf_counter() - t0
        mem_after_build = torch.cuda.memory_allocated(device) / 1e9 if device.type == "cuda" else None
        total_params = sum(p.numel() for p in model.parameters())
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        steps = args.warmup_steps + args.steps
        make_examples = synthetic_pairs if dpo else synthetic_examples
        examples = make_examples((steps + 1) * args.micro * args.accum, args.seq_len, model.config.vocab_size)
        tokenizer = SimpleNamespace(pad_token_id=0)  # collation needs nothing else
        t0 = time.perf_counter()
        trainer = Trainer(cfg, strategy, model, tokenizer, examples, [], Path(cfg.output_dir))
        sync(device)
        prepare_s = time.perf_counter() - t0
        load_peak = torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" else None
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        records = []
        for i in range(steps):
            sync(device)
            t0 = time.perf_counter()
            record = trainer.train_step()
            sync(device)
            record["wall_s"] = time.perf_counter() - t0
            records.append(record)
            pairs = f" ({record['pairs']} pairs)" if dpo else ""
            print(
                f"[{args.child}/{args.strategy}] step {i + 1}/{steps}{' (warm-up)' if i < args.warmup_steps else ''}: "
                f"loss {record['loss']:.4f}, {record['tokens']} tokens{pairs} in {record['wall_s']:.3f} s",
                file=sys.stderr, flush=True,
            )
        peak_mem_gb = (round(torch.cuda.max_memory_allocated(device) / 1e9, 2) if device.type == "cuda"
                       else round(records[-1]["peak_mem_gb"], 2))  # the timed steps', before the search below
        largest = largest_micro_batch(trainer, examples, args.max_micro_search) if args.max_micro_search else {}
        timed = records[args.warmup_steps :]
        tokens = sum(r["tokens"] for r in timed)
        seconds = sum(r["wall_s"] for r in timed)
        step_flops = sum(r["step_flops"] for r in timed)
        tokens_per_s = tokens / seconds
        # DPO's no-grad reference forward is model FLOPs too (2N a token), as ftdist.metrics counts it.
        reference_forwards = getattr(trainer.objective, "reference_forwards", 0)
        flops_per_token = trainer.flops_per_token + reference_forwards * trainer.flops.forward_per_token
        if dpo:
            first = records[0]["loss"]
            print(
                f"[{args.child}/{args.strategy}] DPO step 1 loss {first:.6f}, ln 2 = {DPO_LOSS_AT_START:.6f} "
                f"(policy = reference at step 1): difference {first - DPO_LOSS_AT_START:.2e}",
                file=sys.stderr, flush=True,
            )
        return {
            "method": args.child,
            "strategy": args.strategy,
            "world_size": strategy.world_size,
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "architecture": ARCHITECTURE + (" (tiny overrides)" if args.tiny else ""),
            "params_total_stored": total_params,
            "params_trainable": trainable,
            "linear_layers_4bit": quantized,
            "seq_len": args.seq_len,
            "micro_batch_rows": args.micro,
            "grad_accum_steps": args.accum,
            "attn_implementation": trainer.logits.attn_implementation,
            "bf16": trainer.bf16,
            "gradient_checkpointing": not args.no_grad_ckpt,
            "warmup_steps": args.warmup_steps,
            "timed_steps": len(timed),
            "tokens_timed": int(tokens),
            "tokens_per_s": round(tokens_per_s, 1),
            "flops_per_token": flops_per_token,
            "peak_flops_used": trainer.peak_flops,
            "mfu": None if trainer.peak_flops is None  # a GPU without a known peak: no guessed MFU
            else round(flops_per_token * tokens_per_s / strategy.world_size / trainer.peak_flops, 4),
            "mfu_with_attention": None if trainer.peak_flops is None
            else round(step_flops / seconds / strategy.world_size / trainer.peak_flops, 4),
            "compile": args.compile,
            "compiled_graphs": records[-1].get("compiled_graphs"),
            "liger": args.liger,
            "loss_chunk_tokens": args.loss_chunk_tokens,
            "step_s": [round(r["wall_s"], 3) for r in timed],
            "loss_first_last": [round(records[0]["loss"], 4), round(records[-1]["loss"], 4)],
            "peak_mem_gb": peak_mem_gb,
            "load_peak_mem_gb": None if load_peak is None else round(load_peak, 2),
            "mem_after_build_gb": None if mem_after_build is None else round(mem_after_build, 2),
            "model_load_s": round(build_s, 2),
            "strategy_prepare_s": round(prepare_s, 2),
            "process_s": round(time.perf_counter() - t_start, 1),
            **largest,
            **(dpo_figures(records, timed, seconds, args.seq_len, args.micro) if dpo else {}),
        }
    finally:
        strategy.shutdown()


def child_main(args) -> None:
    try:
        result = run_one(args)
    except Exception as e:  # noqa: BLE001 - reported to the parent, which carries on
        traceback.print_exc()
        result = {"method": args.child, "strategy": args.strategy, "error": f"{type(e).__name__}: {e}"[:2000]}
    print(RESULT_MARKER + json.dumps(result), flush=True)


def run_child(method: str, strategy: str, args, timeout: float) -> dict:
    cmd = [
        sys.executable, str(Path(__file__).resolve()), "--child", method, "--strategy", strategy,
        "--seq-len", str(args.seq_len), "--micro", str(args.micro), "--accum", str(args.accum),
        "--warmup-steps", str(args.warmup_steps),
        "--steps", str(args.steps), "--attn", args.attn, "--objective", args.objective,
        *(["--tiny"] if args.tiny else []), *(["--compile"] if args.compile else []),
        *(["--liger"] if args.liger else []), *(["--no-grad-ckpt"] if args.no_grad_ckpt else []),
        *([] if args.loss_chunk_tokens is None else ["--loss-chunk-tokens", str(args.loss_chunk_tokens)]),
        "--max-micro-search", str(args.max_micro_search),
    ]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, check=False, stdout=subprocess.PIPE, stderr=None, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"method": method, "strategy": strategy, "error": f"timed out after {timeout:.0f} s"}
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(RESULT_MARKER)]
    if not lines:
        return {
            "method": method, "strategy": strategy,
            "error": f"exit {proc.returncode} without a result after {time.perf_counter() - t0:.0f} s "
            f"(stdout tail: {proc.stdout[-500:]!r})",
        }
    return json.loads(lines[-1][len(RESULT_MARKER):])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--methods", default="lora,qlora")
    parser.add_argument("--strategy", default="fsdp", choices=["fsdp", "single"])
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--micro", type=int, default=2, help="packed rows per micro-batch")
    parser.add_argument("--accum", type=int, default=1, help="micro-batches per optimizer step (train.grad_accum_steps)")
    parser.add_argument("--objective", default="sft", choices=["sft", "dpo"],
                        help="dpo: random preference pairs, packed into rows of 2 x --seq-len, adapter reference")
    parser.add_argument("--warmup-steps", type=int, default=3)
    parser.add_argument("--steps", type=int, default=5, help="timed steps")
    parser.add_argument("--attn", default="sdpa", help="model.attn_implementation (sdpa: per-document sdpa)")
    parser.add_argument("--tiny", action="store_true", help="a small config (CPU test of the same code)")
    parser.add_argument("--compile", action="store_true", help="train.compile=true: compiled decoder blocks")
    parser.add_argument("--liger", action="store_true", help="model.liger=true: Liger-Kernel (pip install 'ftdist[liger]')")
    parser.add_argument("--loss-chunk-tokens", type=int, default=None, help="model.loss_chunk_tokens (default auto)")
    parser.add_argument("--no-grad-ckpt", action="store_true", help="model.gradient_checkpointing=false")
    parser.add_argument("--max-micro-search", type=int, default=0,
                        help="after the timed steps, double the rows of one micro-batch up to this many until "
                             "out of memory: the largest that fits (0: skip)")
    parser.add_argument("--budget-s", type=float, default=200, help="wall-clock budget for all methods")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child_main(args)
        return
    if not args.tiny and not torch.cuda.is_available():
        sys.exit("gpu_adapters.py needs a CUDA device (or --tiny to test the code on CPU)")
    deadline = time.perf_counter() + args.budget_s
    methods = [m for m in args.methods.split(",") if m]
    runs = []
    for i, method in enumerate(methods):
        left = deadline - time.perf_counter()
        share = left / (len(methods) - i)  # what is left, split over the methods still to run
        result = run_child(method, args.strategy, args, timeout=max(share, 30))
        runs.append(result)
        print(RESULT_MARKER + json.dumps(result), file=sys.stderr, flush=True)  # kept even if this process is killed
        if "error" in result and args.strategy != "single":
            left = deadline - time.perf_counter()
            if left > 45 * (len(methods) - i):
                runs.append(run_child(method, "single", args, timeout=left / (len(methods) - i)))
                print(RESULT_MARKER + json.dumps(runs[-1]), file=sys.stderr, flush=True)
    out = {
        "benchmark": "gpu_adapters",
        "torch": torch.__version__,
        "peak_flops_note": "MFU against ftdist.metrics.GPU_PEAK_FLOPS (dense bf16, no sparsity): H200/H100 989e12",
        "runs": runs,
    }
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
