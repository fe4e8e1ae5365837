"""README claims about `python -m ftdist.plan`, each against a count made by hand from the
architecture's shapes (never by asking the plan the same question twice)."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest

from ftdist.constants import GIB
from ftdist.model_memory import model_state
from ftdist.plan import compose_plan_config, main, memory

REPO = Path(__file__).resolve().parents[2]
EXPERIMENTS = sorted((REPO / "conf" / "experiment").glob("*.yaml"))


def llama_counts(h: int, inter: int, layers: int, heads: int, kv_heads: int, vocab: int) -> dict[str, int]:
    """Parameter counts of a Llama without biases or tied embeddings: one decoder layer, the root
    (embeddings, final norm, head), the largest single tensor, and the whole model."""
    kv = kv_heads * (h // heads)
    linears = {"q": h * h, "k": h * kv, "v": h * kv, "o": h * h, "gate": h * inter, "up": h * inter, "down": inter * h}
    layer = sum(linears.values()) + 2 * h  # + input and post-attention RMSNorm
    root = vocab * h + h + vocab * h
    return {"layer": layer, "root": root, "largest": max([*linears.values(), vocab * h]),
            "total": layers * layer + root, "linear": layers * sum(linears.values())}


# --- communication ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def llama_dirs(tmp_path_factory):
    """Two tiny Llama configs saved locally (model=hf): one where a decoder layer is the largest
    FSDP unit, one where the root (a 1000-token vocabulary's embeddings and head) is."""
    from transformers import LlamaConfig

    out = {}
    for vocab in (100, 1000):
        path = tmp_path_factory.mktemp(f"llama_v{vocab}")
        LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, vocab_size=vocab, tie_word_embeddings=False).save_pretrained(path)
        out[vocab] = str(path)
    return out


def tiny_communication(path: str, strategy: str, *extra: str) -> tuple[float, int]:
    cfg = compose_plan_config(["model=hf", f"model.name_or_path={path}", f"strategy={strategy}",
                               "cluster.gpus_per_node=2", *extra])
    mem = memory(cfg, model_state(cfg))
    return mem["gpu"]["communication"], mem["world"]


def test_tiny_llama_counts_match_the_built_model(llama_dirs):
    # The hand counts below rest on these; the model built on the meta device must agree.
    for vocab, path in llama_dirs.items():
        cfg = compose_plan_config(["model=hf", f"model.name_or_path={path}", "peft=none"])
        n = llama_counts(64, 128, 2, 4, 2, vocab)
        assert model_state(cfg).census.total == n["total"] == (73_984 + 12_864 if vocab == 100 else 73_984 + 128_064)


@pytest.mark.parametrize("vocab", [100, 1000])
@pytest.mark.parametrize("precision", ["bf16", "fp32"])
def test_communication_fsdp_is_root_plus_two_layers_and_one_units_unsharded_gradients(llama_dirs, vocab, precision):
    # bf16: a bf16 model under bf16 compute, gathered in bf16, gradients reduced in fp32 (2 + 4
    # bytes an element unsharded); fp32: an fp32 model with no autocast, 4 bytes throughout.
    extra = ["train.mixed_precision=bf16"] if precision == "bf16" else ["model.dtype=fp32", "train.mixed_precision=none"]
    n = llama_counts(64, 128, 2, 4, 2, vocab)
    act, grad = (2, 2 + 4) if precision == "bf16" else (4, 4)
    expected = (n["root"] + 2 * n["layer"]) * act + max(n["root"], n["layer"]) * grad
    comm, world = tiny_communication(llama_dirs[vocab], "fsdp", *extra)
    assert world == 2 and comm == expected
    if (vocab, precision) == (100, "bf16"):
        assert comm == (12_864 + 2 * 36_992) * 2 + 36_992 * 6 == 395_648


@pytest.mark.parametrize("vocab", [100, 1000])
def test_communication_ddp_is_a_second_copy_of_the_gradients(llama_dirs, vocab):
    n = llama_counts(64, 128, 2, 4, 2, vocab)
    comm, _ = tiny_communication(llama_dirs[vocab], "ddp", "train.mixed_precision=bf16")
    assert comm == n["total"] * 2  # bf16 model: one bf16 gradient per parameter
    comm32, _ = tiny_communication(llama_dirs[vocab], "ddp", "model.dtype=fp32")
    assert comm32 == n["total"] * 4
    # One process has no buckets.
    one = compose_plan_config(["model=hf", f"model.name_or_path={llama_dirs[vocab]}", "strategy=ddp",
                               "cluster.gpus_per_node=1"])
    assert memory(one, model_state(one))["gpu"]["communication"] == 0


@pytest.mark.parametrize("vocab", [100, 1000])
@pytest.mark.parametrize("strategy", ["zero1", "zero2", "zero3"])
def test_communication_deepspeed_default_buckets_on_a_tiny_model(llama_dirs, vocab, strategy):
    # Below DeepSpeed's 5e8-element buckets the buckets hold the whole model: a reduce bucket of
    # bf16 gradients with their fp32 reduce copy, and (ZeRO-1/2) a bf16 all-gather bucket; ZeRO-3
    # instead keeps the largest module (or a layer) and the next layer gathered.
    n = llama_counts(64, 128, 2, 4, 2, vocab)
    comm, _ = tiny_communication(llama_dirs[vocab], strategy, "train.mixed_precision=bf16")
    reduce = n["total"] * (2 + 4)
    if strategy == "zero3":
        assert comm == (max(n["largest"], n["layer"]) + n["layer"]) * 2 + reduce
    else:
        assert comm == reduce + n["total"] * 2


@pytest.mark.parametrize(("experiment", "strategy", "expected"), [
    # 8B and 70B exceed both 5e8-element buckets: 5e8 x (2 + 4) reduce + 5e8 x 2 gather.
    ("llama8b_full_zero3", "zero2", 5e8 * 6 + 5e8 * 2),
    # 8B ZeRO-3: the embedding (128256 x 4096) is the largest module, plus one decoder layer.
    ("llama8b_full_zero3", "zero3", (128_256 * 4096 + llama_counts(4096, 14336, 32, 32, 8, 128_256)["layer"]) * 2
     + 5e8 * 6),
    # 70B ZeRO-3: embedding + layer exceed stage3_max_live_parameters (1e9), which caps them.
    ("llama70b_full_zero3", "zero3", 1e9 * 2 + 5e8 * 6),
])
def test_communication_deepspeed_default_buckets_cap_large_models(experiment, strategy, expected):
    cfg = compose_plan_config([f"+experiment={experiment}", f"strategy={strategy}"])
    assert memory(cfg, model_state(cfg))["gpu"]["communication"] == expected


# --- the order of suggestions -----------------------------------------------------------------


def plan_of(*overrides: str) -> dict:
    return main([*overrides, "plan.json=true"])


def gpu_need(*overrides: str) -> float:
    """GiB a GPU needs under these overrides: training or loading, whichever is more."""
    p = plan_of(*overrides)
    return max(p["per_gpu_gb"], p["loading"]["gpu_gb"])


def budget_between(fix: float, earlier: list[float]) -> float:
    assert fix < min(earlier), "the setup does not separate the fix from the cheaper changes"
    return (fix + min(earlier)) / 2


L8_DDP_LORA = ["+experiment=llama8b_lora_fsdp", "strategy=ddp", "peft=lora"]


def test_suggestion_checkpointing_comes_first():
    base = [*L8_DDP_LORA, "cluster.gpus_per_node=1", "model.gradient_checkpointing=false",
            "train.micro_batch_size=4", "train.grad_accum_steps=2"]
    ckpt = gpu_need(*base, "model.gradient_checkpointing=true")
    budget = budget_between(ckpt, [gpu_need(*base)])
    # A smaller micro-batch would fit too: checkpointing is chosen because it is tried first.
    assert gpu_need(*base, "model.gradient_checkpointing=true", "train.micro_batch_size=1",
                    "train.grad_accum_steps=8") < budget
    sug = plan_of(*base, f"cluster.gpu_mem_gb={budget}")["suggestion"]
    assert sug["change"] == "activation checkpointing"
    assert sug["overrides"] == ["model.gradient_checkpointing=true"]


def test_suggestion_smaller_micro_batch_keeps_the_global_batch():
    base = ["+experiment=llama8b_lora_fsdp", "model.gradient_checkpointing=true", "train.micro_batch_size=4",
            "train.grad_accum_steps=2"]  # FSDP + LoRA on 8 ranks
    micro2 = gpu_need(*base, "train.micro_batch_size=2", "train.grad_accum_steps=4")
    budget = budget_between(micro2, [gpu_need(*base)])
    plan = plan_of(*base, f"cluster.gpu_mem_gb={budget}")
    assert not plan["fits"] and plan["world_size"] == 8
    sug = plan["suggestion"]
    assert sug["overrides"] == ["train.micro_batch_size=2", "train.grad_accum_steps=4"]
    assert sug["change"] == "micro-batch 2 with 4 accumulation steps (same global batch)"
    micro = int(next(o for o in sug["overrides"] if o.startswith("train.micro_batch_size=")).split("=")[1])
    accum = int(next(o for o in sug["overrides"] if o.startswith("train.grad_accum_steps=")).split("=")[1])
    assert micro * accum * plan["world_size"] == 4 * 2 * 8


def test_suggestion_shards_ddp_with_fsdp_before_offload():
    # Full fine-tuning of a bf16 8B under DDP on 8 GPUs: each replica holds 2 + 2 + 4 bytes a
    # parameter plus a second gradient copy; FSDP2 over the same 8 ranks shards the first three.
    base = ["+experiment=llama8b_lora_fsdp", "strategy=ddp", "peft=none", "model.gradient_checkpointing=true",
            "train.micro_batch_size=1"]
    fsdp = gpu_need(*base, "strategy=fsdp")
    budget = budget_between(fsdp, [gpu_need(*base)])
    # CPU offload would fit too (less GPU memory): FSDP is chosen because it is tried first.
    assert gpu_need(*base, "strategy=fsdp", "strategy.cpu_offload=true") < fsdp
    sug = plan_of(*base, f"cluster.gpu_mem_gb={budget}")["suggestion"]
    assert sug["change"] == "shard with FSDP2" and sug["overrides"] == ["strategy.name=fsdp"]


def test_suggestion_offloads_under_fsdp_for_single():
    base = ["+experiment=llama8b_lora_fsdp", "strategy=single", "peft=none", "model.gradient_checkpointing=true",
            "train.micro_batch_size=1"]
    offload = gpu_need(*base, "strategy=fsdp", "strategy.cpu_offload=true")
    budget = budget_between(offload, [gpu_need(*base)])
    sug = plan_of(*base, f"cluster.gpu_mem_gb={budget}")["suggestion"]
    assert sug["change"] == "offload to CPU memory"
    assert sug["overrides"] == ["strategy.name=fsdp", "strategy.cpu_offload=true"]


def test_suggestion_more_nodes_when_offload_exceeds_host_memory():
    # Full fine-tuning of a bf16 8B under FSDP on one node of 2 GPUs, with 48 GiB of host memory:
    # offloading its ~60 GiB of state does not fit the host, so the cheapest fix is a second node.
    base = ["+experiment=llama8b_lora_fsdp", "peft=none", "model.gradient_checkpointing=true",
            "train.micro_batch_size=1", "cluster.gpus_per_node=2", "cluster.cpu_mem_gb=48"]
    offloaded = plan_of(*base, "strategy.cpu_offload=true")
    assert offloaded["fits_cpu"] is False
    two = gpu_need(*base, "cluster.nodes=2")
    budget = budget_between(two, [gpu_need(*base)])
    plan = plan_of(*base, f"cluster.gpu_mem_gb={budget}")
    assert plan["fits"] is False and plan["suggestion"]["change"] == "2 nodes"
    assert plan["suggestion"]["overrides"] == ["cluster.nodes=2"]


# --- ZeRO-2's uneven gradient partitions ------------------------------------------------------


def test_zero2_on_64_ranks_70b_gradients_are_uneven_2_91_not_2_05():
    plan = main(["+experiment=llama70b_full_zero3", "strategy=zero2", "cluster.nodes=8", "plan.json=true"])
    n = llama_counts(8192, 28672, 80, 64, 8, 128_256)
    assert plan["world_size"] == 64 and plan["params"]["trainable"] == n["total"] == 70_553_706_496
    even = n["total"] * 2 / 64 / GIB  # bf16 gradients split evenly
    assert round(even, 2) == 2.05
    assert round(plan["breakdown_gb"]["gradients"], 2) == 2.91
    # By hand: the optimizer's two groups (matrices in module order, then norms), each padded to
    # a multiple of 2 x 64 and cut in 64 equal slices; a rank's buffer holds every parameter that
    # overlaps its slice, whole.
    h, inter, kv, vocab = 8192, 28672, 1024, 128_256
    matrices = [vocab * h, *[h * h, h * kv, h * kv, h * h, h * inter, h * inter, inter * h] * 80, vocab * h]
    norms = [h] * (2 * 80 + 1)
    held = [0] * 64
    for sizes in (matrices, norms):
        slice_len = math.ceil(sum(sizes) / 128) * 128 // 64
        starts = [sum(sizes[:i]) for i in range(len(sizes))]
        for rank in range(64):
            lo, hi = rank * slice_len, (rank + 1) * slice_len
            held[rank] += sum(n for a, n in zip(starts, sizes) if a < hi and a + n > lo)
    assert plan["breakdown_gb"]["gradients"] == pytest.approx(max(held) * 2 / GIB, rel=1e-12)
    assert max(held) > 1.4 * n["total"] / 64


# --- NF4 quantization constants ---------------------------------------------------------------


def test_quant_constants_are_about_0_016_bytes_a_quantized_weight():
    plan = main(["+experiment=llama8b_lora_fsdp", "peft=qlora", "plan.json=true"])
    # Every nn.Linear but the head is quantized: 7 per layer, 32 layers.
    n = llama_counts(4096, 14336, 32, 32, 8, 128_256)
    tensors = 7 * 32
    assert n["linear"] == 6_979_321_856
    # An 8-bit absmax per 64 weights, an fp32 scale per 256 absmaxes (every 8B linear divides
    # evenly), and per tensor the NF4 code (16 fp32) and the 8-bit code for the absmaxes
    # (256 fp32 + an fp32 offset).
    by_hand = n["linear"] // 64 + 4 * (n["linear"] // (64 * 256)) + tensors * (16 * 4 + 256 * 4 + 4)
    assert plan["breakdown_gb"]["quant_constants"] * GIB == by_hand == 111_000_448  # replicated on all 8 ranks
    # Without the code tables (0.2 MiB in all) it is exactly 1/64 + 4/(64 x 256) a weight; with
    # them, still 0.016 to three places.
    blocks_only = by_hand - tensors * (16 * 4 + 256 * 4 + 4)
    assert blocks_only / n["linear"] == 1 / 64 + 4 / (64 * 256) == 0.015869140625
    assert round(by_hand / n["linear"], 3) == 0.016


# --- shipped experiments ----------------------------------------------------------------------

LAUNCH = re.compile(r"python -m ftdist|torchrun|launch/|sbatch|ftdist\.slurm")
HARDWARE = re.compile(r"\bGPUs?\b|\bCPU\b|\d+ ?GB")


def comment_lines(path: Path) -> list[str]:
    return [line for line in path.read_text().splitlines() if line.lstrip().startswith("#")]


def test_experiments_are_all_checked():
    assert {p.stem for p in EXPERIMENTS} >= {"tiny_cpu", "llama70b_qlora", "llama8b_full_zero3",
                                             "llama70b_full_zero3", "llama8b_lora_fsdp"}


@pytest.mark.parametrize("path", EXPERIMENTS, ids=lambda p: p.stem)
def test_every_experiment_comment_names_its_hardware(path):
    assert any(HARDWARE.search(line) for line in comment_lines(path)), f"{path.name}: no hardware in its comments"


@pytest.mark.parametrize("path", EXPERIMENTS, ids=lambda p: p.stem)
def test_every_experiment_comment_has_a_launch_line(path):
    assert any(LAUNCH.search(line) for line in comment_lines(path)), f"{path.name}: no launch line in its comments"
