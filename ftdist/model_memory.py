"""What a model holds in memory whatever the strategy: its parameters' storage (4-bit weights and
their NF4 constants included), its trained parameters and optimizer groups, the activations a
micro-batch saves for backward, and what the objective adds (objective_shape): preference pairs,
a frozen reference model where the run loads one (DPO, GRPO), GRPO's rollout and its KV cache.

The model is built on the meta device (shapes and dtypes, no storage, nothing downloaded) with the
adapters training uses, so every count is the real module tree's. How a strategy splits, casts and
places these bytes is the strategy's own fact (ftdist/parallel); ftdist.plan adds them up. This
module imports neither, so both can use its types.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch

from ftdist.config import FtdistConfig
from ftdist.constants import DTYPES
from ftdist.optim import decay_groups

NF4_BLOCK = 64  # weights per absmax
NF4_NESTED_BLOCK = 256  # absmaxes per fp32 scale (double quantization)
NF4_CODE_BYTES = 16 * 4  # the NF4 code table, fp32
NESTED_CODE_BYTES = 256 * 4 + 4  # the 8-bit dynamic code for the absmaxes, fp32, and its offset
# Per parameter of a large weight: 4 bits, an 8-bit absmax per 64 weights, an fp32 scale per 256 absmaxes.
NF4_BYTES_PER_PARAM = 0.5 + 1 / NF4_BLOCK + 4 / (NF4_BLOCK * NF4_NESTED_BLOCK)
LOSS_BYTES_PER_LOGIT = 8  # the loss upcasts the logits to fp32, and their gradient is fp32 too


def nf4_constant_bytes(numel: int) -> int:
    """QuantState bytes of one NF4 weight with double quantization (bitsandbytes' layout). They are
    plain attributes, not parameters, so FSDP does not shard them: every rank holds all of them."""
    blocks = math.ceil(numel / NF4_BLOCK)
    return blocks + 4 * math.ceil(blocks / NF4_NESTED_BLOCK) + NF4_CODE_BYTES + NESTED_CODE_BYTES


def nf4_bytes_per_param(numel: int) -> float:
    """Packed 4-bit weight plus its constants, per parameter (-> NF4_BYTES_PER_PARAM for large weights)."""
    return (numel / 2 + nf4_constant_bytes(numel)) / numel


@dataclass
class Census:
    """Parameter counts of a built (meta) model."""

    total: int  # base model parameters; a 4-bit weight counts as one parameter
    trainable: int
    adapter: int  # parameters peft added
    num_layers: int
    adapted_in_features: int  # summed input width of the adapted linears of one layer
    adapted_modules: int  # adapted linears per layer


@dataclass
class ModelState:
    """The module tree's storage, full (unsharded): what every strategy's cost model starts from."""

    config: object
    census: Census
    base_bytes: float  # base weights as stored, 4-bit ones packed (numel / 2)
    base_compute_bytes: float  # the same in the compute dtype 16-bit weights are gathered in
    quant_constant_bytes: float
    adapter_bytes: float
    trainable: int
    trainable_bytes: float  # trained parameters in their stored dtype
    layer_gather_bytes: float  # largest decoder layer, as all-gathered
    root_gather_bytes: float  # embeddings, final norm, head, as all-gathered
    unit_stored_bytes: float  # largest FSDP unit (a layer, or the root) as stored: fully_shard moves it whole
    layer_trainable: int  # largest unit's trained parameters
    root_trainable: int
    largest_param: int
    optimizer_groups: list[list[int]]  # trained parameters' sizes, in the optimizer's groups and order
    matmul_params: int  # per-token matmul parameters (ftdist.metrics' FLOPs count)
    flops_per_token: float
    reference: ModelState | None = None  # the objective's frozen reference model, where the run loads one

    @property
    def loaded_bytes(self) -> float:
        """The whole model as loaded, before any strategy shards it."""
        return self.base_bytes + self.adapter_bytes + self.quant_constant_bytes


def build_meta_model(cfg: FtdistConfig):
    """(hf config, model with adapters, ids of the weights QLoRA stores in 4 bits, decoder layers,
    ids of the base model's parameters)."""
    from ftdist.console import quiet_library_hints
    from ftdist.model.adapters import apply_adapters
    from ftdist.model.loading import auto_model_class

    quiet_library_hints()  # before apply_adapters imports peft, and peft bitsandbytes
    from ftdist.model.architectures import model_config

    config = model_config(cfg.model)
    head = planned_head(cfg)
    if head is not None:
        head.configure(config)
    with torch.device("meta"):
        model = auto_model_class(head is not None).from_config(
            config, dtype=DTYPES[cfg.model.dtype], trust_remote_code=cfg.model.trust_remote_code
        )
    quantized = quantized_weights(model) if cfg.peft.method == "qlora" else set()
    layers = decoder_layers(model)
    base_ids = {id(p) for p in model.parameters()}
    # Adapters on meta too: a 70B's LoRA alone is ~200M parameters.
    with torch.device("meta"):
        model = apply_adapters(model, cfg.peft, scoring=head is not None)
    return config, model, quantized, layers, base_ids


def planned_head(cfg: FtdistConfig):
    """The scoring head a classification or reward run trains in place of the LM head (no LM
    head's weights, no vocabulary-wide logits), or None. The planner reads no data: without
    objective.labels a classifier is sized with two classes (the head is hidden x classes)."""
    from ftdist.objectives import score_head

    return score_head(cfg, [str(label) for label in cfg.objective.labels or ("class_0", "class_1")])


def quantized_weights(model: torch.nn.Module) -> set[int]:
    # transformers' bitsandbytes integration quantizes every nn.Linear but the output head (a
    # scoring head is left out too: ftdist.model.adapters.quantization_config).
    from ftdist.model.heads import HEAD_NAMES

    heads = {model.get_output_embeddings(), *(getattr(model, name, None) for name in HEAD_NAMES)}
    return {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Linear) and m not in heads}


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The repeated blocks (model.architectures.decoder_blocks), or where the model declares no
    block class, the longest ModuleList: strategies that do not wrap per block still run it."""
    from ftdist.model.architectures import decoder_blocks

    layers = decoder_blocks(model)
    if not layers:
        lists = [m for m in model.modules() if isinstance(m, torch.nn.ModuleList)]
        layers = list(max(lists, key=len)) if lists else []
    return layers


def take_census(model, quantized: set[int], layers, base_ids: set[int]) -> Census:
    params = list(model.parameters())
    adapted = [m for m in layers[0].modules() if hasattr(m, "lora_A")] if layers else []
    return Census(
        total=sum(p.numel() for p in params if id(p) in base_ids),
        trainable=sum(p.numel() for p in params if p.requires_grad),
        adapter=sum(p.numel() for p in params if id(p) not in base_ids),
        num_layers=len(layers),
        adapted_in_features=sum(m.in_features for m in adapted),
        adapted_modules=len(adapted),
    )


def model_state(cfg: FtdistConfig, built=None) -> ModelState:
    """The storage of the configured model, built on the meta device (or from build_meta_model's
    result, when the caller has one), and of the reference model the objective loads beside it."""
    state = _storage(cfg, built)
    if reference_model_use(cfg) is not None:
        state.reference = _storage(reference_config(cfg))
    return state


def _storage(cfg: FtdistConfig, built=None) -> ModelState:
    from ftdist.metrics import matmul_params, train_flops_per_token

    config, model, quantized, layers, base_ids = built or build_meta_model(cfg)
    act = compute_bytes(cfg)

    def stored(p) -> float:
        return p.numel() / 2 if id(p) in quantized else p.numel() * p.element_size()

    def gathered(p) -> float:
        # FSDP's MixedPrecisionPolicy gathers floating weights in bf16; packed 4-bit data stays as is.
        return p.numel() / 2 if id(p) in quantized else p.numel() * min(p.element_size(), act)

    params = list(model.parameters())
    layer_ids = {id(p) for layer in layers for p in layer.parameters()}
    root = [p for p in params if id(p) not in layer_ids]
    per_layer = [list(layer.parameters()) for layer in layers] or [[]]
    biggest = max(per_layer, key=lambda ps: sum(gathered(p) for p in ps))
    trainable = [p for p in params if p.requires_grad]
    return ModelState(
        config=config,
        census=take_census(model, quantized, layers, base_ids),
        base_bytes=sum(stored(p) for p in params if id(p) in base_ids),
        base_compute_bytes=sum(gathered(p) for p in params if id(p) in base_ids),
        quant_constant_bytes=sum(nf4_constant_bytes(p.numel()) for p in params if id(p) in quantized),
        adapter_bytes=sum(stored(p) for p in params if id(p) not in base_ids),
        trainable=sum(p.numel() for p in trainable),
        trainable_bytes=sum(stored(p) for p in trainable),
        layer_gather_bytes=sum(gathered(p) for p in biggest),
        root_gather_bytes=sum(gathered(p) for p in root),
        unit_stored_bytes=max(sum(stored(p) for p in ps) for ps in [root, *per_layer]),
        layer_trainable=sum(p.numel() for p in biggest if p.requires_grad),
        root_trainable=sum(p.numel() for p in root if p.requires_grad),
        largest_param=max(p.numel() for p in params),
        optimizer_groups=[[p.numel() for p in group] for group in decay_groups(trainable)],
        matmul_params=matmul_params(model),
        flops_per_token=train_flops_per_token(model),
    )


# --- what an objective adds: pairs, a reference, a rollout --------------------------------------


@dataclass(frozen=True)
class Rollout:
    """GRPO's generation of one micro-batch's completions (Hugging Face generate, a KV cache):
    micro_batch_size x group_size sequences at once, each of up to prompt + max_new_tokens tokens.
    The planner reads no data, so data.max_seq_len bounds the prompt."""

    rows: int
    prompt_tokens: int
    new_tokens: int

    @property
    def tokens(self) -> int:
        return self.prompt_tokens + self.new_tokens


@dataclass(frozen=True)
class ObjectiveShape:
    """What the objective adds to the run SFT would size; the planner reads it only from here."""

    rows: int  # a training micro-batch's rows, at their largest
    row_tokens: int
    sequence_tokens: int  # one sequence's longest: what causal attention spans
    reference: str | None = None  # adapter | model | precomputed; None: the objective has none
    rollout: Rollout | None = None  # generation before training, taking turns with it


def objective_shape(cfg: FtdistConfig) -> ObjectiveShape:
    """Preference objectives hold whole pairs (ftdist.objectives.preference): unpacked, each pair
    is two rows, chosen and rejected; packed, each item is one row of up to 2 x data.max_seq_len
    tokens. DPO has a reference. GRPO trains on its rollout's rows, and has a reference where
    objective.beta > 0 (its KL penalty)."""
    o, rows, seq = cfg.objective, cfg.train.micro_batch_size, cfg.data.max_seq_len
    if o.name == "grpo":
        r = Rollout(rows * o.group_size, seq, o.max_new_tokens)
        return ObjectiveShape(r.rows, r.tokens, r.tokens, _resolved_reference(cfg) if o.beta > 0 else None, r)
    reference = _resolved_reference(cfg) if o.name == "dpo" else None
    if cfg.data.format != "preference":
        return ObjectiveShape(rows, seq, seq, reference)
    pairs = (rows, 2 * seq) if cfg.data.packing else (2 * rows, seq)
    return ObjectiveShape(*pairs, seq, reference)


def _resolved_reference(cfg: FtdistConfig) -> str:
    from ftdist.objectives.reference import reference_mode

    return reference_mode(cfg)


def micro_batch_shape(cfg: FtdistConfig) -> tuple[int, int]:
    """(rows, tokens per row) of a training micro-batch at its largest."""
    shape = objective_shape(cfg)
    return shape.rows, shape.row_tokens


def objective_reference(cfg: FtdistConfig) -> str | None:
    """objective.reference as the objective resolves it (adapter, model or precomputed); None for
    objectives with no reference."""
    return objective_shape(cfg).reference


def reference_model_use(cfg: FtdistConfig) -> str | None:
    """When the run holds a second, frozen model: "training" (reference=model), "before training"
    (precomputed from objective.reference_path: loaded for the pass, then freed), or None."""
    mode = objective_reference(cfg)
    if mode == "model":
        return "training"
    if mode == "precomputed" and cfg.objective.reference_path is not None:
        return "before training"
    return None


def reference_config(cfg: FtdistConfig) -> FtdistConfig:
    """cfg as ftdist.model.loading's load_reference_model loads the reference: the policy's starting base
    (4-bit under qlora; its "parameters" part, adapters not counted), or objective.reference_path
    as saved, with no quantization (sized as the policy's architecture: a checkpoint of the same
    model). Nothing of it trains."""
    c = copy.deepcopy(cfg)
    if cfg.objective.reference_path is not None:
        c.peft.method = "none"
    return c


def reference_forward_each_micro_batch(cfg: FtdistConfig) -> bool:
    """Whether each training micro-batch also runs the reference's no-grad forward."""
    return objective_reference(cfg) in ("adapter", "model")


def compute_bytes(cfg: FtdistConfig) -> int:
    # bf16 where the model is bf16 or autocast runs (auto: bf16 on a bf16 GPU, the target here).
    return 2 if cfg.model.dtype == "bf16" or cfg.train.mixed_precision != "none" else 4


def activation_bytes(cfg: FtdistConfig, config, c: Census) -> float:
    """Saved activations of one micro-batch, a rough count of the tensors autograd keeps, and its
    logits (a reference forward's come and go before the policy's forward)."""
    h, inter, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    heads, kv = config.num_attention_heads, kv_width(config)
    rows, seq = micro_batch_shape(cfg)
    tokens, act = rows * seq, compute_bytes(cfg)
    # Per token and layer, as counted with saved-tensor hooks on transformers' Llama (sdpa):
    # 8h + 2kv + 4I (norm inputs and outputs and the projections' 2-D views, q, k, v, attention
    # output with no T x T matrix, MLP gate, up, activation, product). LoRA keeps its r-wide
    # hidden and, with dropout, its own dropped copy of each adapted input and a 1-byte mask.
    per_token = 8 * h + 2 * kv + 4 * inter + c.adapted_modules * cfg.peft.r
    masks = 0
    if cfg.peft.dropout > 0:
        per_token += c.adapted_in_features
        masks = c.adapted_in_features
    per_layer = tokens * (per_token * act + masks)
    if cfg.model.attn_implementation == "eager":
        per_layer += rows * heads * seq * seq * 2 * act  # scores and probabilities
    if cfg.model.gradient_checkpointing:  # layer inputs kept, one layer recomputed at a time
        saved = layers * tokens * h * act + per_layer
    else:
        saved = layers * per_layer
    # A reference forward (DPO's, GRPO's) runs apart from the policy's, under no_grad (DPO's
    # first in the loss, ftdist.objectives.preference): its logits and their fp32 log-softmax are
    # freed before the policy's forward saves anything, so its peak (the same logits, nothing
    # saved) stays below the policy's and adds nothing.
    # A scoring head outputs num_labels scores per position, not the vocabulary.
    width = config.num_labels if planned_head(cfg) is not None else config.vocab_size
    return saved + tokens * width * (act + LOSS_BYTES_PER_LOGIT)


def kv_width(config) -> int:
    """Key (or value) features per token and layer: key/value heads x head_dim."""
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return (getattr(config, "num_key_value_heads", None) or heads) * head_dim


def kv_cache_bytes(config, rows: int, positions: int, element_bytes: int) -> int:
    """What a DynamicCache holds for `rows` sequences of `positions` tokens: each layer's keys
    and values, [rows, key/value heads, positions, head_dim] each."""
    return 2 * config.num_hidden_layers * kv_width(config) * rows * positions * element_bytes


def rollout_bytes(cfg: FtdistConfig, config) -> dict[str, int]:
    """GPU bytes of the objective's generation at its peak, the last decode step, by part (none
    where it generates nothing): the KV cache of every position of every row, and that step's
    logits (the model's, and generate's fp32 copy it samples from). The prefill's no-grad working
    set, one layer's over the prompts, is below what training saves for the same rows."""
    rollout = objective_shape(cfg).rollout
    if rollout is None:
        return {}
    act = compute_bytes(cfg)
    return {"kv_cache": kv_cache_bytes(config, rollout.rows, rollout.tokens, act),
            "logits": rollout.rows * config.vocab_size * (act + 4)}
