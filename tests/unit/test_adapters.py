"""QLoRA's 4-bit base against the same weights dequantized: logits and adapter gradients agree.

The check runs after an eval-mode forward on purpose: bitsandbytes would otherwise repack the
weights for CPU inference and silently drop gradients through the frozen base from then on.
"""

from __future__ import annotations

import torch

from ftdist.config import ModelConfig, PeftConfig, TinyModelSpec
from ftdist.model.loading import load_model


def _loss_and_adapter_grads(model, ids):
    model.zero_grad(set_to_none=True)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return loss.detach(), grads


def test_qlora_matches_its_dequantized_weights(tiny_model_dir):
    import bitsandbytes as bnb

    peft = PeftConfig(method="qlora", r=4, dropout=0.0)
    torch.manual_seed(0)
    qlora = load_model(ModelConfig(tiny=TinyModelSpec()), torch.device("cpu"), peft).model
    torch.manual_seed(0)
    reference = load_model(ModelConfig(tiny=TinyModelSpec()), torch.device("cpu"), PeftConfig(method="lora", r=4, dropout=0.0)).model
    # Give the reference the 4-bit model's weights, dequantized, and the same adapters.
    quantized = {n: m for n, m in qlora.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    assert quantized, "peft=qlora loaded no 4-bit layer"
    ref_modules = dict(reference.named_modules())
    with torch.no_grad():
        for name, module in quantized.items():
            dense = bnb.functional.dequantize_4bit(module.weight.data, module.weight.quant_state)
            ref_modules[name].weight.copy_(dense.to(torch.float32))
        for (n, p), (rn, rp) in zip(qlora.named_parameters(), reference.named_parameters()):
            assert n == rn
            if p.requires_grad:
                p.normal_(0, 0.02)  # lora_B starts at zero: make the adapters matter
                rp.copy_(p)
    ids = torch.randint(10, 500, (2, 24), generator=torch.Generator().manual_seed(0))
    qlora.eval()
    with torch.no_grad():
        qlora(input_ids=ids)  # an evaluation pass first, as the trainer does at step 0
    qlora.train()
    reference.train()
    loss_q, grads_q = _loss_and_adapter_grads(qlora, ids)
    loss_r, grads_r = _loss_and_adapter_grads(reference, ids)
    torch.testing.assert_close(loss_q, loss_r, rtol=1e-5, atol=1e-6)
    assert grads_q.keys() == grads_r.keys()
    for name in grads_q:
        torch.testing.assert_close(grads_q[name], grads_r[name], rtol=1e-4, atol=1e-6, msg=name)
