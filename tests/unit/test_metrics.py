"""FLOPs per token against a count made from the model's own layer shapes."""

from __future__ import annotations

import pytest
import torch

from ftdist.config import ModelConfig, PeftConfig, TinyModelSpec
from ftdist.metrics import train_flops_per_token
from ftdist.model.loading import load_model


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
    model = load_model(ModelConfig(tiny=TinyModelSpec()), torch.device("cpu")).model
    assert train_flops_per_token(model) == 6 * linear_weights(model)


@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_adapters_add_weight_gradients_only_for_what_trains(tiny_model_dir, method):
    if method == "qlora":
        pytest.importorskip("bitsandbytes")
    model = load_model(ModelConfig(tiny=TinyModelSpec()), torch.device("cpu"), PeftConfig(method=method, r=4)).model
    adapters = sum(p.numel() for p in model.parameters() if p.requires_grad)
    # The 4-bit base counts as the weights it stands for, not its packed storage.
    assert train_flops_per_token(model) == 4 * linear_weights(model) + 2 * adapters
