#!/usr/bin/env bash
# Every GPU check in one run, from the repo root, finishing within TOTAL_S (default 580 s):
#   1. install the wheels the GPU machine lacks (.whl/: hydra-core, omegaconf, antlr4, bitsandbytes)
#   2. versions: nvidia-smi, python, torch, transformers, peft, triton, bitsandbytes (+ a 4-bit smoke test)
#   3. the CUDA tests: FTDIST_TEST_GPU=1 pytest -m gpu tests/gpu
#      (never yet run on a GPU: test_cuda_flex_training.py (flex backward vs per-document sdpa,
#      packed flex training vs sdpa), test_cuda_sliding_window.py (flash/flex/sdpa keep a sliding
#      window per packed document), test_qlora_loading.py (FSDP+QLoRA loading into CPU memory),
#      test_cuda_scoring.py (a classifier's packed documents score as each alone in bf16 under
#      sdpa and flex; the QLoRA scoring head trains in fp32 on the 4-bit base))
#   4. benchmarks/packing.py on the GPU, sdpa then flex_attention (bucketed padded baseline, warmed shapes)
#   5. benchmarks/gpu_adapters.py: Llama-3.1-8B LoRA and QLoRA on one GPU
#   6. benchmarks/gpu_adapters.py --objective dpo --methods qlora: DPO QLoRA on Llama-3.1-8B, the
#      reference being the policy with its adapters disabled (never yet run on a GPU): tokens/s,
#      pairs/s, MFU, peak memory, and the loss of step 1, which must be ln 2 (0.693147) up to
#      bf16 noise. A step is one 4096-token row of packed pairs: as many token slots as step 5's
#      2 rows of 2048, so the two runs' tokens/s and memory compare.
#   7. vLLM parity (tests/gpu/test_vllm_parity.py, never yet run on a GPU): a merged export of a tiny
#      LoRA run served by vLLM gives ftdist.generate's greedy text. vLLM pins its own torch, so it
#      gets its own venv ($VLLM_VENV, default /tmp/vllm_venv): from FTDIST_VLLM_PYTHON if set, else
#      installed from wheels carried in .whl/vllm/ (vllm and everything it pins), else from the
#      package registry where the machine reaches one; without any, the step says so and skips.
#      ONLY=vllm runs the environment steps and this step alone (a session lent a GPU for it).
#   8. ONLY=speed (issue 21; a session lent a GPU for it runs this mode alone): the environment
#      steps, tests/gpu/test_cuda_kernels.py (the bf16 chunked head; Liger-Kernel against eager
#      where `pip install 'ftdist[liger]'` put it in .whl/ or the registry), then
#      benchmarks/gpu_adapters.py on Llama-3.1-8B, packed 4096-token rows, micro-batch 1: full
#      fine-tuning (bf16), LoRA and QLoRA, each eager (model.loss_chunk_tokens=0, no compile) and
#      optimized (chunked head, train.compile, Liger where installed), into speed_eager.json and
#      speed_optimized.json. Targets: full >= 40% MFU, LoRA >= 30%, QLoRA >= 25% (mfu_with_attention).
#      Then LoRA at 8 micro-batches of 1 row per step (the one-host-read step; compare its
#      tokens/s with the micro-batch-1 run), and the tiny demo under bf16 autocast (fp32 logits
#      now: goal >= 95% held-out exact match, where bf16 logits stalled at 2%).
#   9. ONLY=grpo (issue 22): the environment steps, then the GRPO demo's two commands (SFT of the
#      tiny model left part-way, then +experiment=tiny_grpo_cpu) on the GPU: held-out exact match
#      before and after, mean rollout seconds and completion tokens per rollout second. vLLM
#      rollouts (objective.rollout=vllm) are not implemented yet: nothing of theirs to measure.
# DPO's other checks are CPU tests, run by the ordinary suite and not here: tests/unit/test_dpo.py,
# test_dpo_trl_parity.py, test_objectives.py, test_preference_data.py, test_plan_dpo.py,
# tests/dist/test_dpo_strategies.py, test_dpo_self_instruct.py (gloo), tests/integration/
# test_dpo_demo.py, test_dpo_resume.py.
# Each step has its own timeout, cut so the later steps keep their share. Writes to $OUT (8 files):
# gpu_checks.log (everything), env.txt, pytest.log, packing_sdpa.json, packing_flex.json,
# gpu_adapters.json, gpu_dpo.json, vllm.log. Needs .whl/ and .data/ (the packing mix) carried into the repo root.
#
#   bash benchmarks/gpu_checks.sh

set -u
OUT=${OUT:-/tmp/ftdist_gpu_out}
TOTAL_S=${TOTAL_S:-580}
mkdir -p "$OUT"
exec > >(tee -a "$OUT/gpu_checks.log") 2>&1
TEE_PID=$!
START=$SECONDS

export PYTHONUNBUFFERED=1
export FTDIST_CACHE=${FTDIST_CACHE:-/tmp/ftdist_cache}
export FTDIST_DATASETS=${FTDIST_DATASETS:-$PWD/.data}
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE=disabled
export TOKENIZERS_PARALLELISM=false

# seconds for a step: its planned share, less if the run is late, always leaving `reserve` s
# for the steps after it (at least 10 s)
budget() {
    local planned=$1 reserve=$2
    local left=$((TOTAL_S - (SECONDS - START) - reserve))
    ((left < planned)) && planned=$left
    ((planned < 10)) && planned=10
    echo "$planned"
}

step() { echo; echo "=== [$((SECONDS - START)) s] $*"; }

# Planned shares: pytest 200, packing 45 + 75, LoRA/QLoRA 150, DPO 90 = 560 s, leaving about 20 s
# of TOTAL_S for the wheels and the environment. Each reserve is the later shares less a little
# slack, which the last steps can spare when the earlier ones finish early (they mostly do).

step "install wheels into /tmp/site"
wheels=()
for pattern in hydra_core omegaconf antlr4_python3_runtime bitsandbytes; do
    for w in .whl/${pattern}-*.whl; do [[ -e $w ]] && wheels+=("$w"); done
done
echo "${wheels[@]}"
timeout 60 python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site "${wheels[@]}" || echo "pip install FAILED (rc $?)"
export PYTHONPATH=/tmp/site:$PWD

step "environment"
{
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,power.limit --format=csv
    python3 --version
    timeout 60 python3 - <<'EOF'
import importlib
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
for name in ("transformers", "peft", "accelerate", "triton", "hydra", "omegaconf", "bitsandbytes"):
    try:
        mod = importlib.import_module(name)
        print(name, getattr(mod, "__version__", "?"), mod.__file__)
    except Exception as e:  # noqa: BLE001
        print(name, "IMPORT FAILED:", type(e).__name__, e)
try:
    import ftdist.train  # hydra, omegaconf, and the conf/ directory beside the package

    print("ftdist.train imports from", ftdist.train.__file__, "conf", ftdist.train.CONF_DIR)
    import bitsandbytes as bnb

    print("device", torch.cuda.get_device_name(), torch.cuda.get_device_capability())
    w = torch.randn(256, 256, device="cuda", dtype=torch.bfloat16)
    q, state = bnb.functional.quantize_4bit(w, quant_type="nf4", compress_statistics=True, quant_storage=torch.bfloat16)
    err = (bnb.functional.dequantize_4bit(q, state) - w).abs().mean().item()
    print(f"bnb nf4 round trip on cuda: mean abs error {err:.4f} (about 0.07 expected)")
except Exception as e:  # noqa: BLE001
    print("CHECK FAILED:", type(e).__name__, e)
EOF
} 2>&1 | tee "$OUT/env.txt"

if [[ ${ONLY:-} == speed ]]; then
step "speed: liger wheel (optional), CUDA kernel tests"
for w in .whl/liger_kernel-*.whl; do
    [[ -e $w ]] && timeout 60 python3 -m pip install -q --no-index --no-deps --target /tmp/site "$w"
done
FTDIST_TEST_GPU=1 timeout -k 5 "$(budget 60 490)" python3 -m pytest -q -rA -m gpu tests/gpu/test_cuda_kernels.py \
    -p no:cacheprovider 2>&1 | tee "$OUT/pytest_kernels.log"
LIGER=$(python3 -c "import liger_kernel" 2>/dev/null && echo --liger)
step "speed: eager, full / LoRA / QLoRA, 4096-token rows"
t=$(budget 150 340)
timeout -k 5 "$t" python3 benchmarks/gpu_adapters.py --methods full,lora,qlora --seq-len 4096 --micro 1 \
    --loss-chunk-tokens 0 --budget-s $((t - 10)) > "$OUT/speed_eager.json"
echo "speed eager: rc $? (timeout ${t} s)"
step "speed: optimized (chunked head, compile ${LIGER:-, no liger})"
t=$(budget 170 170)
timeout -k 5 "$t" python3 benchmarks/gpu_adapters.py --methods full,lora,qlora --seq-len 4096 --micro 1 \
    --compile $LIGER --max-micro-search 16 --budget-s $((t - 10)) > "$OUT/speed_optimized.json"
echo "speed optimized: rc $? (timeout ${t} s)"
step "speed: LoRA, 8 micro-batches per step"
timeout -k 5 "$(budget 70 100)" python3 benchmarks/gpu_adapters.py --methods lora --seq-len 4096 --micro 1 \
    --accum 8 --steps 3 --warmup-steps 1 --budget-s 70 > "$OUT/speed_accum8.json"
step "speed: the tiny demo under bf16 autocast"
timeout -k 5 "$(budget 100 0)" python3 -m ftdist.train +experiment=tiny_cpu train.mixed_precision=bf16 \
    train.progress_bar=false output_dir="$OUT/demo_bf16" 2>&1 | grep -E "held-out exact match|summary|Error" \
    | tee "$OUT/demo_bf16.log"
python3 - "$OUT" <<'EOF2'
import json, sys
from pathlib import Path
for name in ("speed_eager.json", "speed_optimized.json", "speed_accum8.json"):
    try:
        runs = json.loads((Path(sys.argv[1]) / name).read_text())["runs"]
    except Exception as e:  # noqa: BLE001
        print(name, "-> no result:", e)
        continue
    for r in runs:
        print(name, json.dumps({k: r.get(k) for k in ("method", "tokens_per_s", "mfu", "mfu_with_attention",
                                                      "peak_mem_gb", "compiled_graphs", "error")}))
EOF2
fi

if [[ ${ONLY:-} == grpo ]]; then
step "grpo: the CPU demo's two commands on the GPU (SFT part-way, then GRPO with exact_match)"
rm -rf /tmp/grpo-sft /tmp/grpo-demo
timeout -k 5 "$(budget 200 300)" python3 -m ftdist.train +experiment=tiny_cpu data.path=synthetic:json_teacher \
    train.max_steps=1000 train.progress_bar=false output_dir=/tmp/grpo-sft 2>&1 | tail -3
timeout -k 5 "$(budget 250 40)" python3 -m ftdist.train +experiment=tiny_grpo_cpu model.name_or_path=/tmp/grpo-sft/final \
    train.progress_bar=false output_dir=/tmp/grpo-demo 2>&1 | tail -3
cp /tmp/grpo-demo/metrics.jsonl "$OUT/grpo_metrics.jsonl" 2>/dev/null
python3 - /tmp/grpo-demo <<'EOF2'
import json, sys
from pathlib import Path
run = Path(sys.argv[1])
lines = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()] if (run / "metrics.jsonl").is_file() else []
train = [r for r in lines if "loss" in r]
if train:
    print("grpo on gpu:", json.dumps({"steps": len(train), "mean_rollout_s": sum(r["rollout_s"] for r in train) / len(train),
          "mean_tokens_per_s": sum(r["tokens_per_s"] for r in train) / len(train),
          "completion_tokens_per_rollout_s": sum(r["completion_tokens"] for r in train) / sum(r["rollout_s"] for r in train)}))
summary = run / "summary.json"
print("summary:", summary.read_text() if summary.is_file() else "none")
EOF2
fi

if [[ ${ONLY:-} != vllm && ${ONLY:-} != speed && ${ONLY:-} != grpo ]]; then
step "pytest -m gpu tests/gpu"
t=$(budget 200 340)
FTDIST_TEST_GPU=1 timeout -k 5 "$t" python3 -m pytest -q -rA -m gpu tests/gpu -p no:cacheprovider \
    --ignore=tests/gpu/test_vllm_parity.py 2>&1 \
    | tee "$OUT/pytest.log"
echo "pytest: rc ${PIPESTATUS[0]} (timeout ${t} s)"

step "packing benchmark, sdpa"
t=$(budget 45 295)
timeout -k 5 "$t" python3 benchmarks/packing.py --steps 12 --attn sdpa --pad-to bucket --bucket 256 \
    > "$OUT/packing_sdpa.json"
echo "packing sdpa: rc $? (timeout ${t} s)"

step "packing benchmark, flex_attention"
t=$(budget 75 220)
timeout -k 5 "$t" python3 benchmarks/packing.py --steps 12 --attn flex_attention --pad-to bucket --bucket 256 \
    > "$OUT/packing_flex.json"
echo "packing flex: rc $? (timeout ${t} s)"

step "LoRA / QLoRA on Llama-3.1-8B"
t=$(budget 150 85)
timeout -k 5 "$t" python3 benchmarks/gpu_adapters.py --budget-s $((t - 10)) > "$OUT/gpu_adapters.json"
echo "gpu_adapters: rc $? (timeout ${t} s)"

step "DPO QLoRA on Llama-3.1-8B"
t=$(budget 90 0)
timeout -k 5 "$t" python3 benchmarks/gpu_adapters.py --objective dpo --methods qlora --micro 1 \
    --budget-s $((t - 10)) > "$OUT/gpu_dpo.json"
echo "gpu_dpo: rc $? (timeout ${t} s)"
fi

if [[ ${ONLY:-} != speed && ${ONLY:-} != grpo ]]; then
step "vLLM parity: its own venv, then tests/gpu/test_vllm_parity.py"
VLLM_VENV=${VLLM_VENV:-/tmp/vllm_venv}
VLLM_VERSION=0.33.0  # pinned, never "latest": the version this check was written against
if [[ -z ${FTDIST_VLLM_PYTHON:-} ]]; then
    t=$(budget 240 60)
    python3 -m venv "$VLLM_VENV"
    if compgen -G ".whl/vllm/*.whl" > /dev/null; then
        timeout -k 5 "$t" "$VLLM_VENV/bin/pip" install -q --no-index --find-links .whl/vllm "vllm==$VLLM_VERSION"
    else
        timeout -k 5 "$t" "$VLLM_VENV/bin/pip" install -q "vllm==$VLLM_VERSION"
    fi
    echo "vllm install: rc $? (timeout ${t} s)"
    export FTDIST_VLLM_PYTHON=$VLLM_VENV/bin/python
fi
"$FTDIST_VLLM_PYTHON" -c "import vllm, torch; print('vllm', vllm.__version__, 'torch', torch.__version__)" \
    || echo "vllm: not importable from $FTDIST_VLLM_PYTHON; test_vllm_parity skips"
t=$(budget 150 0)
FTDIST_TEST_GPU=1 timeout -k 5 "$t" python3 -m pytest -q -rA -m gpu tests/gpu/test_vllm_parity.py \
    -p no:cacheprovider 2>&1 | tee "$OUT/vllm.log"
echo "vllm parity: rc ${PIPESTATUS[0]} (timeout ${t} s)"

step "summary"
python3 - "$OUT" <<'EOF'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
keep_packing = ("device", "attn_implementation", "pad_to", "distinct_shapes", "warmup_s", "dynamo_unique_graphs",
                "padded_tokens_per_s", "packed_tokens_per_s", "padded_slot_efficiency", "packed_slot_efficiency",
                "throughput_ratio_packed_over_padded", "step_s")
keep_adapters = ("method", "strategy", "objective", "tokens_per_s", "pairs_per_s", "mfu", "peak_flops_used",
                 "peak_mem_gb", "load_peak_mem_gb", "model_load_s", "strategy_prepare_s", "step_s", "loss_first_last",
                 "loss_step1", "loss_step1_minus_ln2", "row_fill", "error")  # DPO's only in gpu_dpo.json
for name in ("packing_sdpa.json", "packing_flex.json", "gpu_adapters.json", "gpu_dpo.json"):
    path = out / name
    try:
        data = json.loads(path.read_text())
    except Exception as e:  # noqa: BLE001
        print(name, "-> no result:", type(e).__name__, str(e)[:200])
        continue
    if "runs" in data:
        for run in data["runs"]:
            print(name, json.dumps({k: run[k] for k in keep_adapters if k in run}))
    else:
        print(name, json.dumps({k: data[k] for k in keep_packing if k in data}))
EOF
grep -E "passed|failed|error" "$OUT/pytest.log" | tail -3
grep -E "passed|failed|skipped|error" "$OUT/vllm.log" | tail -3
fi
echo "total: $((SECONDS - START)) s"
exec >&- 2>&-
wait "$TEE_PID" 2>/dev/null || sleep 1  # the log is complete before the machine collects $OUT
