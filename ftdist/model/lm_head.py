"""The language-model head as ftdist's losses use it: label log-probabilities in fp32, chunk by chunk.

A causal LM's last layer maps every position's hidden state to logits over the vocabulary. The
losses only need one number per position: the log-probability of the next token. Materialising
all the logits first costs tokens x vocabulary floats (for Llama 3, 128,256 per token: 2 GB in
fp32 for a 4,096-token row, and as much again for their gradient), the largest activation of a
step. `install` patches the model's output-embedding module so that, while a target is set
(`targets`), its forward returns those per-position log-probabilities instead, computed over
chunks of `chunk_tokens` positions (ChunkedLabelLogps): the forward keeps one log-sum-exp per
position, and the backward recomputes each chunk's logits, turns them into that chunk's
gradient and adds its weight gradient into one buffer. The parameters keep their names and
their module (no wrapper): checkpoints, export, FSDP2 and ZeRO-3 hooks see the model as it
was. With no target set (generation, classification heads) the module is the plain linear
layer it always was.

The logits are computed in fp32 with autocast off. Under bf16 autocast, an fp32 weight is used
as it is and the hidden states are cast up. A bf16 weight (bf16 parameters, FSDP mixed
precision) is multiplied with fp32 accumulation and fp32 output where the device has that
(CUDA's out_dtype matmul), else in bf16 and cast up. Rounding the logits to bf16 costs about
3 significant digits, enough to stall the tiny demo at 2% exact match.
"""

from __future__ import annotations

import contextlib
import functools

import torch
import torch.nn.functional as F

from ftdist.constants import IGNORE_INDEX

# Auto chunk size: chunks whose fp32 logits take at most this many bytes (a 128,256-token
# vocabulary gives 523-token chunks; a tiny one, one chunk for any batch).
AUTO_CHUNK_BYTES = 256 * 2**20
MIN_AUTO_CHUNK = 256


def chunk_tokens_for(setting: int | None, vocab_size: int) -> int:
    """model.loss_chunk_tokens -> positions per chunk; 0 means one chunk however many positions."""
    if setting is None:
        return max(MIN_AUTO_CHUNK, AUTO_CHUNK_BYTES // (4 * vocab_size))
    return setting


# Model types whose forward returns lm_head(hidden) as the logits, unchanged: others scale or
# soft-cap them after the head (Gemma 2/3, Cohere, Granite), so their losses take the full logits.
EXACT_HEAD_TYPES = frozenset({
    "llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "phi3", "gemma", "olmo", "olmo2",
    "ministral", "smollm3",
})


def install_in(model: torch.nn.Module, setting: int | None, liger: bool = False) -> torch.nn.Module | None:
    """Patch the LM head of the causal LM inside `model` (under any wrapper: DDP, a DeepSpeed
    engine, PEFT) for model.loss_chunk_tokens=`setting`; None where its logits are not the plain
    head's output (a scoring model, a model that changes logits after the head)."""
    from transformers import PreTrainedModel

    for module in model.modules():
        if isinstance(module, PreTrainedModel):
            if getattr(module.config, "model_type", None) not in EXACT_HEAD_TYPES:
                return None
            return install(module, chunk_tokens_for(setting, module.config.vocab_size), liger)
    return None


def install(model: torch.nn.Module, chunk_tokens: int, liger: bool = False) -> torch.nn.Module | None:
    """Patch `model`'s output embedding (lm_head) to compute label log-probs while a target is
    set; returns the patched module, or None where the model has no linear output embedding."""
    get = getattr(model, "get_output_embeddings", None)
    head = get() if get is not None else None
    if not isinstance(head, torch.nn.Linear):  # a scoring model, or a head ftdist does not know
        return None
    if getattr(head, "ftdist_chunk_tokens", None) is None:
        head.forward = functools.partial(_head_forward, head, head.forward)
    head.ftdist_chunk_tokens = chunk_tokens
    head.ftdist_liger = liger  # Liger-Kernel's fused linear cross-entropy instead of the chunks below
    head.ftdist_target, head.ftdist_temperature, head.ftdist_entropy = None, 1.0, None
    return head


@contextlib.contextmanager
def targets(head: torch.nn.Module, target: torch.Tensor, temperature: float = 1.0, entropy: torch.Tensor | None = None):
    """While inside, `head`'s forward returns the log-probability of `target` [B, T] at each
    position (0 where the target is IGNORE_INDEX) instead of logits, under logits / temperature
    (policy optimization scores completions under the distribution it sampled them from). Where
    `entropy` (a [B, T] fp32 tensor) is given, it is filled with each position's entropy, without
    gradient (0 where the target is ignored)."""
    head.ftdist_target, head.ftdist_temperature, head.ftdist_entropy = target, temperature, entropy
    try:
        yield
    finally:
        head.ftdist_target, head.ftdist_temperature, head.ftdist_entropy = None, 1.0, None


def shifted_targets(labels: torch.Tensor) -> torch.Tensor:
    """Position t predicts token t+1: labels [B, T] -> targets [B, T], the last position ignored."""
    ignored = torch.full_like(labels[:, :1], IGNORE_INDEX)
    return torch.cat([labels[:, 1:], ignored], dim=1)


def _head_forward(head: torch.nn.Linear, linear_forward, hidden: torch.Tensor) -> torch.Tensor:
    target = head.ftdist_target
    if target is None:
        return linear_forward(hidden)
    if target.shape != hidden.shape[:-1]:
        raise RuntimeError(f"lm_head: targets of shape {tuple(target.shape)} for hidden states {tuple(hidden.shape)}")
    bias, entropy = head.bias, head.ftdist_entropy
    if head.ftdist_temperature != 1.0:  # (h W^T + b) / T, by scaling what goes in: autograd sees it
        hidden = hidden / head.ftdist_temperature
        bias = None if bias is None else bias / head.ftdist_temperature
    if head.ftdist_liger and entropy is None:  # Liger's kernel gives no entropy: the chunks below do
        from ftdist.model.liger import fused_label_logps

        h = hidden.reshape(-1, hidden.size(-1))
        return fused_label_logps(h, head.weight, bias, target.reshape(-1), IGNORE_INDEX).reshape(target.shape)
    return label_logps(hidden, head.weight, bias, target, head.ftdist_chunk_tokens, entropy)


def label_logps(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, target: torch.Tensor,
                chunk_tokens: int, entropy: torch.Tensor | None = None) -> torch.Tensor:
    """[..., T] log p(target) under logits = hidden @ weight.T + bias, in fp32; 0 where ignored.
    entropy: a tensor shaped like target, filled with each position's entropy (no gradient)."""
    shape = target.shape
    h = hidden.reshape(-1, hidden.size(-1))
    t = target.reshape(-1)
    chunk = h.size(0) if chunk_tokens <= 0 else chunk_tokens
    flat_entropy = None if entropy is None else entropy.view(-1)
    return ChunkedLabelLogps.apply(h, weight, bias, t, max(chunk, 1), flat_entropy).reshape(shape)


class ChunkedLabelLogps(torch.autograd.Function):
    """Label log-probs chunk by chunk, keeping per position only its log-sum-exp for backward.

    The backward recomputes each chunk's logits and turns them into the gradient there:
    d logp(t) / d logits = onehot(t) - softmax(logits), scaled by the incoming gradient. Each
    chunk's weight gradient is added into one buffer, so a step holds one weight-sized
    gradient and one chunk of logits, whatever the number of chunks (checkpointing each chunk
    through autograd would hold a second weight-sized gradient while summing them)."""

    @staticmethod
    def forward(ctx, h, weight, bias, target, chunk, entropy=None):
        ignored = target == IGNORE_INDEX
        safe = target.masked_fill(ignored, 0)
        out = torch.empty(h.size(0), dtype=torch.float32, device=h.device)
        lse = torch.empty_like(out)
        for a in range(0, h.size(0), chunk):
            logits = fp32_logits(h[a:a + chunk], weight, bias)
            lse[a:a + chunk] = torch.logsumexp(logits, dim=-1)
            out[a:a + chunk] = logits.gather(-1, safe[a:a + chunk, None]).squeeze(-1) - lse[a:a + chunk]
            if entropy is not None:  # H = lse - sum(p * logits), while this chunk's logits exist
                entropy[a:a + chunk] = lse[a:a + chunk] - (logits.softmax(-1) * logits).sum(-1)
            del logits
        out.masked_fill_(ignored, 0.0)
        if entropy is not None:
            entropy.masked_fill_(ignored, 0.0)
        ctx.save_for_backward(h, weight, bias, safe, ignored, lse)
        ctx.chunk = chunk
        return out

    @staticmethod
    def backward(ctx, grad_out):
        h, weight, bias, safe, ignored, lse = ctx.saved_tensors
        chunk = ctx.chunk
        g = grad_out.float().masked_fill(ignored, 0.0)
        need_h, need_w, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[1], bias is not None and ctx.needs_input_grad[2]
        grad_h = torch.empty_like(h) if need_h else None
        # A low-precision weight's gradient is summed over the chunks in fp32, then cast once:
        # rounding to bf16 after every chunk would lose what autograd's single matmul keeps.
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        grad_b = torch.zeros(weight.size(0), dtype=torch.float32, device=h.device) if need_b else None
        for a in range(0, h.size(0), chunk):
            h_c, g_c = h[a:a + chunk], g[a:a + chunk]
            # d(logit_t - lse)/d logits = onehot(t) - softmax: the gradient is g * (onehot - p).
            grad_logits = fp32_logits(h_c, weight, bias).sub_(lse[a:a + chunk, None]).exp_().mul_(-g_c[:, None])
            grad_logits.scatter_add_(-1, safe[a:a + chunk, None], g_c[:, None])
            with torch.autocast(h.device.type, enabled=False):
                g_logits = grad_logits.to(weight.dtype)
                if need_h:
                    grad_h[a:a + chunk] = (g_logits @ weight).to(h.dtype)
                if need_w:  # in fp32 straight into the buffer: no weight-sized temporary
                    grad_w.addmm_(grad_logits.t(), h_c.float())
            if need_b:
                grad_b += grad_logits.sum(0)
            del grad_logits, g_logits
        grad_w = None if grad_w is None else grad_w.to(weight.dtype)
        return grad_h, grad_w, None if grad_b is None else grad_b.to(bias.dtype), None, None, None


def fp32_logits(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    with torch.autocast(h.device.type, enabled=False):
        if weight.dtype == torch.float32:
            return F.linear(h.float(), weight, bias)
        h = h.to(weight.dtype)
        if h.is_cuda:  # low-precision inputs, fp32 accumulation and output: no rounding of the logits
            logits = torch.mm(h, weight.t(), out_dtype=torch.float32)
            return logits if bias is None else logits + bias.float()
        return F.linear(h, weight, bias).float()


def logits_label_logps(logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0,
                       entropy: torch.Tensor | None = None) -> torch.Tensor:
    """The same log-probs from full logits [B, T, V] and unshifted labels [B, T]: for models
    whose head is not a plain linear layer, and the independent computation tests compare with."""
    target = shifted_targets(labels)
    logp = (logits.float() / temperature).log_softmax(-1)
    ignored = target == IGNORE_INDEX
    if entropy is not None:
        with torch.no_grad():
            entropy.copy_(-(logp.exp() * logp).sum(-1).masked_fill(ignored, 0.0))
    return logp.gather(-1, target.masked_fill(ignored, 0).unsqueeze(-1)).squeeze(-1).masked_fill(ignored, 0.0)
