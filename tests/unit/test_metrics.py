"""FLOPs, MFU: against counts made by hand from the tiny model's known dimensions, and against
a count made from the model's own layer shapes."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from helpers import random_examples

from ftdist.config import DataConfig, FtdistConfig, ModelConfig, PeftConfig, TinyModelSpec, TrainConfig
from ftdist.data.loader import collate
from ftdist.data.packing import collate_packed
from ftdist.data.prepare import Example
from ftdist.metrics import GPU_PEAK_FLOPS, TrainFlops, gpu_peak_flops, mfu, train_flops_per_token
from ftdist.model.loading import load_model

# The tiny Llama (TinyModelSpec defaults): width 128, 4 layers, 4 query heads and 2 KV heads of
# 32, MLP 384, output head tied to the 922-token embedding table.
HIDDEN, LAYERS, HEADS, KV_HEADS, HEAD_DIM, MLP = 128, 4, 4, 2, 32, 384
LAYER_LINEARS = [  # (in, out) of every linear in a decoder layer
    (HIDDEN, HEADS * HEAD_DIM),  # q_proj
    (HIDDEN, KV_HEADS * HEAD_DIM),  # k_proj
    (HIDDEN, KV_HEADS * HEAD_DIM),  # v_proj
    (HEADS * HEAD_DIM, HIDDEN),  # o_proj
    (HIDDEN, MLP),  # gate_proj
    (HIDDEN, MLP),  # up_proj
    (MLP, HIDDEN),  # down_proj
]
# Packed rows of documents; the padded layout puts each document in its own row.
ROWS = [[5, 3], [7], [2, 4, 1]]
LENGTHS = [n for row in ROWS for n in row]


def tiny_model(peft: PeftConfig | None = None):
    model = load_model(ModelConfig(tiny=TinyModelSpec()), torch.device("cpu"), peft).model
    assert model.config.tie_word_embeddings
    return model


def one_process_trainer(tokenizer, tmp_path, steps: int):
    """A single-process Trainer on the tiny model, batches of 4 random examples, `steps` steps."""
    from ftdist.parallel.base import Strategy
    from ftdist.trainer import Trainer

    cfg = FtdistConfig(
        model=ModelConfig(tiny=TinyModelSpec()),
        data=DataConfig(path="unused", max_seq_len=128),
        train=TrainConfig(micro_batch_size=4, grad_accum_steps=1, max_steps=steps),
        output_dir=str(tmp_path),
    )
    examples = random_examples(4 * steps + 4, seed=3)
    return Trainer(cfg, Strategy(cfg.strategy), tiny_model(), tokenizer, examples, examples[:2], tmp_path)


def hand_matmul_params(vocab: int) -> int:
    # The embedding lookup does no matmul; the tied head (vocab x hidden) does, once.
    return LAYERS * sum(i * o for i, o in LAYER_LINEARS) + vocab * HIDDEN


def hand_attention_flops(lengths: list[int]) -> int:
    """Per layer and document of L tokens, forward: token i scores i keys (itself included),
    L(L+1)/2 pairs; QK^T and AV each cost 2 x heads x head_dim FLOPs a pair. Backward: twice
    the forward."""
    forward = sum(LAYERS * 2 * 2 * HEADS * HEAD_DIM * n * (n + 1) // 2 for n in lengths)
    return 3 * forward


def documents(lengths: list[int]) -> list[Example]:
    return [Example(input_ids=list(range(3, 3 + n)), labels=list(range(3, 3 + n))) for n in lengths]


def step_flops(model, layout: str) -> float:
    flops = TrainFlops.of(model)
    if layout == "packed":
        batch = collate_packed([documents(row) for row in ROWS], pad_token_id=0)
        assert batch.input_ids.shape == (3, 8)
    else:
        batch = collate(documents(LENGTHS), pad_token_id=0)
        assert batch.input_ids.shape == (6, 7)  # padding is not work: only real tokens count
    assert sorted(batch.document_lengths) == sorted(LENGTHS)
    return flops.step(batch.document_lengths)


@pytest.mark.parametrize("layout", ["packed", "padded"])
def test_full_fine_tuning_step_flops_by_hand(tiny_model_dir, layout):
    model = tiny_model()
    n = hand_matmul_params(model.config.vocab_size)
    expected = 6 * n * sum(LENGTHS) + hand_attention_flops(LENGTHS)
    assert step_flops(model, layout) == expected
    if model.config.vocab_size == 922:  # the arithmetic spelled out once
        assert n == 4 * (2 * 128 * 128 + 2 * 128 * 64 + 3 * 128 * 384) + 922 * 128 == 904_448
    assert hand_attention_flops(LENGTHS) == 3 * 4 * 2 * 2 * 128 * (15 + 6 + 28 + 3 + 10 + 1)


@pytest.mark.parametrize("method", ["lora", "dora", "qlora"])
@pytest.mark.parametrize("layout", ["packed", "padded"])
def test_adapter_step_flops_by_hand(tiny_model_dir, method, layout):
    """4 N_frozen + 6 N_adapter: frozen weights pass activation gradients back but get none."""
    r = 4
    model = tiny_model(PeftConfig(method=method, r=r))
    frozen = hand_matmul_params(model.config.vocab_size)  # all-linear adapts all but the head
    adapter = LAYERS * sum(r * (i + o) for i, o in LAYER_LINEARS)  # A: in x r, B: r x out
    expected = (4 * frozen + 6 * adapter) * sum(LENGTHS) + hand_attention_flops(LENGTHS)
    assert step_flops(model, layout) == expected


def linear_weights(model) -> int:
    """in x out over every nn.Linear-like layer (the output head included), counted by shape."""
    total = 0
    for module in model.modules():
        base = getattr(module, "base_layer", None)
        if base is not None:
            continue  # a peft wrapper: its base layer and adapters are visited on their own
        if hasattr(module, "in_features") and hasattr(module, "out_features"):
            total += module.in_features * module.out_features
    return total


def test_full_fine_tuning_is_six_flops_per_parameter(tiny_model_dir):
    model = tiny_model()
    assert train_flops_per_token(model) == 6 * linear_weights(model)


@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_adapters_add_weight_gradients_only_for_what_trains(tiny_model_dir, method):
    model = tiny_model(PeftConfig(method=method, r=4))
    adapters = sum(p.numel() for p in model.parameters() if p.requires_grad)
    # The 4-bit base counts as the weights it stands for, not its packed storage.
    assert train_flops_per_token(model) == 4 * linear_weights(model) + 2 * adapters


def test_mfu_divides_by_every_device_peak():
    # 3e12 FLOPs in 1.5 s on 2 devices of 4e12 FLOP/s: 3 / 12 of what they could do.
    assert mfu(3e12, 1.5, 2, 4e12) == pytest.approx(0.25)


@pytest.mark.parametrize(
    ("name", "key"),
    [
        ("NVIDIA H100 80GB HBM3", "H100"),
        ("NVIDIA H200", "H200"),
        ("NVIDIA A100-SXM4-80GB", "A100"),
        ("NVIDIA L40S", "L40S"),
        ("NVIDIA L4", "L4"),
        ("NVIDIA A10G", "A10G"),
        ("NVIDIA GeForce RTX 4090", "4090"),
        ("Tesla V100-SXM2-16GB", "V100"),
    ],
)
def test_known_gpu_names_get_their_datasheet_peak(name, key):
    assert gpu_peak_flops(name) == GPU_PEAK_FLOPS[key]


def test_unknown_gpu_has_no_peak_and_is_warned_about_once(caplog):
    name = "NVIDIA Imaginary Accelerator Z9"
    with caplog.at_level(logging.WARNING, logger="ftdist.metrics"):
        assert gpu_peak_flops(name) is None
        assert gpu_peak_flops(name) is None
    warnings = [r for r in caplog.records if name in r.getMessage()]
    assert len(warnings) == 1 and "mfu is logged as null" in warnings[0].getMessage()
    # A name that merely contains a known key is not that GPU (an L40 is no L4).
    assert gpu_peak_flops("NVIDIA L40") is None
    assert mfu(3e12, 1.5, 2, None) is None


def test_train_line_of_an_unknown_gpu_logs_mfu_null(tiny_model_dir, tiny_tokenizer, tmp_path, caplog):
    trainer = one_process_trainer(tiny_tokenizer, tmp_path, steps=1)
    name = "NVIDIA Imaginary Accelerator Z10"
    with caplog.at_level(logging.WARNING, logger="ftdist.metrics"):
        trainer.peak_flops = gpu_peak_flops(name)  # what device_peak_flops gives on such a GPU
    record = trainer.train_step()
    assert record["mfu"] is None and record["tokens"] > 0
    trainer.metrics.write(record)
    trainer.metrics.close()
    (line,) = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert '"mfu": null' in line and json.loads(line)["mfu"] is None
    assert sum(name in r.getMessage() for r in caplog.records) == 1


def test_a_step_beating_a_peak_measured_under_load_raises_it_with_one_warning(
    tiny_model_dir, tiny_tokenizer, tmp_path, caplog, monkeypatch
):
    """A CPU peak measured while other processes held the cores is too low; a step then seems to
    beat the hardware (mfu 1.54-1.72 was logged). The step proves the peak higher: it is raised
    to the step's rate, the step logs 1.0, and a warning says so, once."""
    from ftdist import metrics

    monkeypatch.setattr(metrics, "_impossible_mfu_warned", set())
    monkeypatch.setattr(metrics, "_cpu_peak_cache", dict(metrics._cpu_peak_cache))
    trainer = one_process_trainer(tiny_tokenizer, tmp_path, steps=3)
    trainer.peak_flops = 1.0  # a start-up measure under load, at its extreme: any step beats it
    with caplog.at_level(logging.WARNING, logger="ftdist.metrics"):
        records = [trainer.train_step() for _ in range(3)]
    assert all(0 < r["mfu"] <= 1.0 for r in records)
    assert records[0]["mfu"] == 1.0 and trainer.peak_flops > 1.0
    assert metrics._cpu_peak_cache[torch.get_num_threads()] == trainer.peak_flops  # later trainers start from it
    warned = [r.getMessage() for r in caplog.records if "mfu" in r.getMessage()]
    assert len(warned) == 1 and "> 1" in warned[0] and "raised to" in warned[0]


def test_a_step_beating_a_gpu_datasheet_peak_is_logged_as_computed_and_warned(caplog, monkeypatch):
    """A datasheet peak is not a measurement: beating it means the FLOP count is wrong, so the
    figure stays (evidence), announced once, and the peak is not changed."""
    from ftdist import metrics
    from ftdist.metrics import checked_mfu

    monkeypatch.setattr(metrics, "_impossible_mfu_warned", set())
    gpu = torch.device("cuda", 0)
    with caplog.at_level(logging.WARNING, logger="ftdist.metrics"):
        assert checked_mfu(3e12, 1.0, 2, 1e12, gpu) == (pytest.approx(1.5), 1e12)
        assert checked_mfu(4e12, 1.0, 2, 1e12, gpu) == (pytest.approx(2.0), 1e12)
        assert checked_mfu(1e12, 1.0, 2, 1e12, gpu) == (pytest.approx(0.5), 1e12)
    warned = [r.getMessage() for r in caplog.records]
    assert len(warned) == 1 and "mfu 1.50 > 1" in warned[0] and "FLOP count" in warned[0]
    assert checked_mfu(3e12, 1.0, 2, None, gpu) == (None, None)  # unknown GPU: no peak, no figure
