"""The chunked LM head (ftdist.model.lm_head): label log-probs, losses and gradients equal those
of full fp32 logits, for any chunk size, through the model, under adapters, and for models whose
logits are not the head's plain output."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import random_examples

from ftdist.config import StrategyConfig
from ftdist.constants import IGNORE_INDEX
from ftdist.data.loader import collate
from ftdist.data.packing import collate_packed
from ftdist.model import lm_head
from ftdist.model.forward import ModelForward
from ftdist.objectives.sft import sft_loss_sum
from ftdist.parallel import build_strategy


def independent_logps(hidden, weight, bias, target):
    """Full logits in float64, log-softmax, pick the target: the reference numbers."""
    logits = F.linear(hidden.double(), weight.double(), None if bias is None else bias.double())
    logp = logits.log_softmax(-1)
    ignored = target == IGNORE_INDEX
    return logp.gather(-1, target.masked_fill(ignored, 0).unsqueeze(-1)).squeeze(-1).masked_fill(ignored, 0.0)


def assert_relative(got: torch.Tensor, want: torch.Tensor, tol: float, what: str = "") -> None:
    """||got - want|| <= tol * ||want||: relative error of the whole tensor."""
    err = (got.double() - want.double()).norm().item()
    assert err <= tol * want.double().norm().item(), f"{what}: relative error {err / want.double().norm().item():.3g}"


@pytest.mark.parametrize("chunk", [1, 7, 40, 1000])
@pytest.mark.parametrize("with_bias", [False, True])
def test_chunked_label_logps_and_gradients_equal_the_unchunked_path(chunk, with_bias):
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(3, 13, 16, generator=g, requires_grad=True)
    weight = torch.randn(50, 16, generator=g, requires_grad=True)
    bias = torch.randn(50, generator=g, requires_grad=True) if with_bias else None
    target = torch.randint(0, 50, (3, 13), generator=g)
    target[0, :4] = IGNORE_INDEX
    target[2, -1] = IGNORE_INDEX
    upstream = torch.randn(3, 13, generator=g)  # a gradient that weighs positions differently
    params = [hidden, weight] + ([bias] if with_bias else [])

    whole = lm_head.label_logps(hidden, weight, bias, target, 0)  # one chunk: all logits at once, fp32
    whole_grads = torch.autograd.grad((whole * upstream).sum(), params)
    got = lm_head.label_logps(hidden, weight, bias, target, chunk)
    got_grads = torch.autograd.grad((got * upstream).sum(), params)
    assert got.dtype == torch.float32 and got.shape == (3, 13)
    assert (got[target == IGNORE_INDEX] == 0).all()
    assert_relative(got, whole, 1e-6, "log-probs")
    for a, b, name in zip(got_grads, whole_grads, ("hidden", "weight", "bias")):
        assert_relative(a, b, 1e-6, name)
    # And both are the float64 computation's numbers, to fp32 precision.
    want = independent_logps(hidden, weight, bias, target)
    torch.testing.assert_close(got.detach().double(), want.detach(), rtol=1e-5, atol=1e-5)
    for a, b in zip(got_grads, torch.autograd.grad((want * upstream.double()).sum(), params)):
        assert_relative(a, b, 1e-5)


def test_auto_chunks_hold_at_most_256_mb_of_logits():
    assert lm_head.chunk_tokens_for(None, 128_256) == 523  # Llama 3's vocabulary
    assert lm_head.chunk_tokens_for(None, 1024) == 65536  # a tiny vocabulary: one chunk
    assert lm_head.chunk_tokens_for(0, 128_256) == 0 and lm_head.chunk_tokens_for(64, 128_256) == 64


def tiny_model(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)


def grads_of(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("packed", [False, True])
def test_sft_loss_and_gradients_through_the_model_equal_the_full_logits(tiny_model_dir, packed):
    strategy = build_strategy(StrategyConfig(name="single"))
    examples = random_examples(6, seed=3, hi=30)
    batch = collate_packed([examples[:3], examples[3:]], 0) if packed else collate(examples, 0)

    # Each document alone through the full logits: no padding, no neighbours.
    reference = tiny_model(tiny_model_dir)
    want = sum(sft_loss_sum(reference(input_ids=torch.tensor([e.input_ids])).logits, torch.tensor([e.labels]))
               for e in examples)
    want.backward()
    want_grads = grads_of(reference)

    for chunk in (0, 5):
        model = tiny_model(tiny_model_dir)
        forward = ModelForward(model, strategy, bf16=False, loss_chunk_tokens=chunk).bind(model)
        got = -forward.token_logps(batch).sum()
        assert_relative(got, want, 1e-6, f"loss, chunk {chunk}")
        got.backward()
        got_grads = grads_of(model)
        assert got_grads.keys() == want_grads.keys()
        for name in want_grads:
            assert_relative(got_grads[name], want_grads[name], 1e-5, name)
        # Outside token_logps the head is the plain linear layer: generation sees logits.
        with torch.no_grad():
            plain = forward(batch)
        assert plain.shape == (*batch.input_ids.shape, model.config.vocab_size)


def test_a_lora_model_and_its_adapter_free_base_through_the_chunked_head(tiny_model_dir):
    from ftdist.config import PeftConfig
    from ftdist.model.adapters import apply_adapters
    from ftdist.objectives.reference import without_adapters

    strategy = build_strategy(StrategyConfig(name="single"))
    batch = collate(random_examples(4, seed=5), 0)
    base = tiny_model(tiny_model_dir)
    with torch.no_grad():
        want_base = lm_head.logits_label_logps(base(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits,
                                               batch.labels)
    model = apply_adapters(tiny_model(tiny_model_dir), PeftConfig(method="lora", r=4, alpha=8, dropout=0.0))
    with torch.no_grad():  # LoRA starts as a no-op (B = 0): give it something to change
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.2, generator=torch.Generator().manual_seed(len(name)))
    forward = ModelForward(model, strategy, bf16=False, loss_chunk_tokens=3).bind(model)
    got = forward.token_logps(batch)
    with torch.no_grad():
        full = lm_head.logits_label_logps(forward(batch), batch.labels)
    torch.testing.assert_close(got, full, rtol=1e-6, atol=1e-6)
    assert not torch.allclose(got, want_base)  # the adapters change the numbers...
    torch.testing.assert_close(without_adapters(model, forward.token_logps, batch), want_base, rtol=1e-6, atol=1e-6)
    (-got.sum()).backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if p.requires_grad)


def test_bf16_autocast_computes_the_loss_from_fp32_logits(tiny_model_dir):
    """Under autocast the head's matmul would round the logits to bf16; the chunked head takes
    the (bf16-computed) hidden states and the fp32 weight and keeps the logits in fp32."""
    strategy = build_strategy(StrategyConfig(name="single"))
    batch = collate(random_examples(3, seed=7), 0)
    model = tiny_model(tiny_model_dir)
    forward = ModelForward(model, strategy, bf16=True, loss_chunk_tokens=4).bind(model)
    got = forward.token_logps(batch)
    assert got.dtype == torch.float32
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        hidden = model.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).last_hidden_state
        bf16_logits = model.lm_head(hidden)
    assert bf16_logits.dtype == torch.bfloat16  # what the loss used to see
    target = lm_head.shifted_targets(batch.labels)
    want = independent_logps(hidden.float(), model.lm_head.weight, None, target)
    torch.testing.assert_close(got.detach().double(), want, rtol=1e-5, atol=1e-5)
    rounded = lm_head.logits_label_logps(bf16_logits, batch.labels).double()
    assert (rounded - want).abs().max() > 10 * (got.detach().double() - want).abs().max()


def test_models_that_change_logits_after_the_head_take_the_full_logits():
    from transformers import Gemma2Config, Gemma2ForCausalLM

    torch.manual_seed(0)
    config = Gemma2Config(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=2, num_key_value_heads=1, head_dim=16, final_logit_softcapping=5.0)
    model = Gemma2ForCausalLM(config).eval()
    assert lm_head.install_in(model, 4) is None  # soft-capped after the head: not patched
    strategy = build_strategy(StrategyConfig(name="single"))
    batch = collate(random_examples(2, seed=1, hi=20), 0)
    batch.input_ids.clamp_(max=96)
    batch.labels.masked_fill_(batch.labels > 96, 96)
    forward = ModelForward(model, strategy, bf16=False, loss_chunk_tokens=4).bind(model)
    with torch.no_grad():
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        assert logits.abs().max() <= 5.0  # the soft cap applied
        torch.testing.assert_close(forward.token_logps(batch), lm_head.logits_label_logps(logits, batch.labels))


def test_liger_without_the_package_is_refused_before_launch():
    import importlib.util

    from ftdist.config import ConfigError, compose, load_config

    if importlib.util.find_spec("liger_kernel") is not None:
        pytest.skip("liger-kernel is installed here")
    with pytest.raises(ConfigError, match=r"model.liger=true needs Liger-Kernel, which is not installed: "
                                          r"pip install 'ftdist\[liger\]'"):
        load_config(compose(["+experiment=tiny_cpu", "model.liger=true"]))
