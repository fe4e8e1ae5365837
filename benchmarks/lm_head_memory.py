"""Peak host memory of one loss step (forward and backward through the LM head and the
cross-entropy) with full logits against the chunked head (ftdist/model/lm_head.py), on CPU.

Llama 3's head by default: vocabulary 128,256, hidden size 4,096, 8,192 tokens (a micro-batch
of 2 x 4,096), fp32. Each variant runs in its own process: it allocates the hidden states, the
head's weight and the targets, notes its resident memory, runs one forward and backward, and
reports how far above that its peak went (ru_maxrss), so the inputs do not count and the weight's
gradient (vocabulary x hidden, the same for every variant) does.

    .venv/bin/python benchmarks/lm_head_memory.py            # about 24 GB free needed
    .venv/bin/python benchmarks/lm_head_memory.py --tokens 2048   # smaller machines
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def child(args) -> None:
    import torch
    import torch.nn.functional as F

    from ftdist.model import lm_head

    torch.manual_seed(0)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    hidden = torch.randn(args.tokens, args.hidden, dtype=dtype).mul_(0.5).requires_grad_()  # in place: no temporary
    weight = torch.randn(args.vocab, args.hidden, dtype=dtype).mul_(0.02).requires_grad_()
    target = torch.randint(0, args.vocab, (args.tokens,))
    baseline = rss_bytes()
    started = time.perf_counter()
    chunk = None
    if args.variant == "full_logits":  # what the loss did before: every logit at once, then fp32 cross-entropy
        logits = F.linear(hidden, weight)
        loss = F.cross_entropy(logits.float(), target, reduction="sum")
    else:
        chunk = 0 if args.variant == "one_chunk" else lm_head.chunk_tokens_for(args.chunk, args.vocab)
        loss = -lm_head.label_logps(hidden, weight, None, target, chunk).sum()
    loss.backward()
    seconds = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({
        "variant": args.variant, "chunk_tokens": chunk, "loss": loss.item(), "seconds": round(seconds, 2),
        "peak_above_inputs_gb": round((peak - baseline) / 1e9, 3),
        "weight_grad_gb": round(weight.numel() * weight.element_size() / 1e9, 3),
        "full_logits_fp32_gb": round(args.tokens * args.vocab * 4 / 1e9, 3),
    }))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vocab", type=int, default=128_256)
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--chunk", type=int, default=None, help="tokens per chunk (default: model.loss_chunk_tokens' auto)")
    parser.add_argument("--variant", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.variant:
        child(args)
        return
    common = ["--vocab", str(args.vocab), "--hidden", str(args.hidden), "--tokens", str(args.tokens),
              "--dtype", args.dtype] + ([] if args.chunk is None else ["--chunk", str(args.chunk)])
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"))
    results = {}
    for variant in ("full_logits", "one_chunk", "chunked"):
        done = subprocess.run([sys.executable, __file__, *common, "--variant", variant], env=env,
                              capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(f"{variant} failed:\n{done.stderr[-3000:]}")
        results[variant] = json.loads(done.stdout.strip().splitlines()[-1])
    full, chunked = results["full_logits"], results["chunked"]
    print(json.dumps({
        "vocab": args.vocab, "hidden": args.hidden, "tokens": args.tokens, "dtype": args.dtype,
        **results,
        "full_over_chunked_peak": round(full["peak_above_inputs_gb"] / chunked["peak_above_inputs_gb"], 2),
        "same_loss_rel": abs(full["loss"] - chunked["loss"]) / abs(full["loss"]),
    }, indent=1))


if __name__ == "__main__":
    main()
