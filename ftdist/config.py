"""Typed configuration schemas, one dataclass per config group.

The root schema is registered in Hydra's ConfigStore as ``ftdist_schema``; ``conf/config.yaml``
lists it first in its defaults, so every group file and every command-line override is merged
into a struct-mode typed config: an unknown key or a wrong type fails at compose time, before
any model or data is touched. Cross-field rules live in ``validate`` and are checked right after
composition, with messages that name the offending key.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException


class ConfigError(ValueError):
    """A configuration value or combination that cannot work; the message names the key."""


@dataclass
class TinyModelSpec:
    """A small Llama built locally (no download), random-init or warm-started, and cached on disk."""

    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2
    intermediate_size: int = 384
    max_position_embeddings: int = 4096
    vocab_size: int = 1024  # target size of the locally trained byte-level BPE tokenizer
    seed: int = 0
    # Warm start: before caching, train the random-init model for sft_steps steps of supervised
    # fine-tuning on synthetic:<sft_task> (e.g. json_extraction), so a preference demo starts
    # from a model that already writes the task's format. None: the random-init model.
    sft_task: str | None = None
    sft_steps: int = 0
    sft_lr: float = 3.0e-3
    sft_batch_size: int = 32

    def __post_init__(self):
        if self.sft_steps < 0 or (self.sft_task is None) != (self.sft_steps == 0):
            raise ConfigError(f"model.tiny.sft_task={self.sft_task!r} with model.tiny.sft_steps={self.sft_steps}: "
                              "a warm start needs both a task and a positive number of steps, no warm start neither")


@dataclass
class ModelConfig:
    # A local directory or a hub name for from_pretrained; unused when `tiny` is set.
    name_or_path: str | None = None
    # A known architecture (see ftdist/model/architectures.py, e.g. llama-3.1-8b): its config is
    # known without a download, which dry_run uses to build the model on the meta device.
    architecture: str | None = None
    # Set by model=tiny: build (once) and load a tiny local Llama instead of name_or_path.
    tiny: TinyModelSpec | None = None
    tokenizer: str | None = None  # defaults to the model's own tokenizer
    dtype: str = "fp32"  # parameter dtype: fp32 | bf16
    # auto: flash_attention_2 where flash-attn and CUDA are present, else sdpa (exact document
    # masks when packing) | flash_attention_2 | flex_attention | sdpa | eager
    attn_implementation: str = "auto"
    gradient_checkpointing: bool = False
    trust_remote_code: bool = False
    # The LM head and the loss computed chunk by chunk in fp32, never the whole logits at once
    # (ftdist/model/lm_head.py): null (auto) sizes chunks to 256 MB of fp32 logits; 0 turns
    # chunking off (one chunk, still fp32); N: N tokens per chunk.
    loss_chunk_tokens: int | None = None
    # Liger-Kernel's Triton kernels (CUDA only, pip install 'ftdist[liger]'): RMSNorm, RoPE and
    # SwiGLU patched into the model, and its fused linear cross-entropy as the LM-head loss.
    liger: bool = False


@dataclass
class DataFields:
    """Names of the row fields each format reads."""

    prompt: str = "prompt"
    response: str = "response"
    input: str | None = None  # optional context appended to the prompt (instruction)
    messages: str = "messages"  # chat: list of messages (role, content, tool_calls, reasoning_content)
    tools: str | None = "tools"  # chat: the row's tool list (JSON-schema function specs), handed to the template
    text: str = "text"  # text: plain causal LM
    chosen: str = "chosen"  # preference: the preferred response (a string or assistant message(s))
    rejected: str = "rejected"  # preference: the dispreferred response
    label: str = "label"  # classification: the row's class (a string or an integer)


@dataclass
class DataConfig:
    # Local .jsonl/.json/.parquet/.csv/.tsv file, a hub dataset name, or synthetic:NAME (demo tasks).
    path: str = MISSING
    format: str = "instruction"  # instruction | chat | text | preference | classification
    fields: DataFields = field(default_factory=DataFields)
    split: str = "train"  # split name for hub datasets
    columns: list[str] | None = None  # names of a header-less .csv/.tsv file's columns, in order (else its first line)
    validation_path: str | None = None  # a separate validation file; else val_fraction
    val_fraction: float = 0.05  # seeded fraction held out when validation_path is unset
    max_val_examples: int | None = None  # cap on held-out rows (keeps evaluation cheap)
    max_seq_len: int = MISSING
    template: str = "auto"  # auto (chat template if the tokenizer has one) | chat | plain
    # A Jinja chat template file that replaces the tokenizer's for this run (saved with final/).
    chat_template: str | None = None
    chat_template_kwargs: dict[str, Any] = field(default_factory=dict)  # e.g. {enable_thinking: false}
    # How a conversation becomes examples: whole (rendered once, every assistant turn labelled),
    # per_turn (one example per assistant turn, its context as at inference), last (the final
    # turn only), auto (whole where the template renders the conversation as the extension of
    # its turns, per_turn for the rows where it does not).
    turns: str = "auto"
    train_on_reasoning: bool = True  # reasoning (reasoning_content, <think>...</think>) carries the loss
    reasoning_tags: list[str] = field(default_factory=lambda: ["<think>", "</think>"])  # open, close
    system_prompt: str | None = None  # a system message for rows that have none (chat template only)
    train_on_prompt: bool = False
    # Whether a row needs a response: required (SFT, evaluation) | optional (objective=grpo sets it:
    # an instruction row without its response field, or a chat row not ending with an assistant
    # message, becomes a prompt alone, to sample completions for).
    responses: str = "required"
    on_bad_row: str = "error"  # error | skip (skipped rows are counted and reported)
    num_synthetic_rows: int = 4000  # rows generated for synthetic:NAME sources
    # Pack several documents into each row of max_seq_len tokens (documents never attend to
    # each other). micro_batch_size then counts packed rows.
    packing: bool = False
    packing_window: int = 2000  # documents bin-packed together; larger is fuller, less random
    # Prepared examples are written once to a memory-mapped cache keyed by the source, the
    # tokenizer and every setting above that changes tokens; later runs (and every rank) map it.
    cache: bool = True
    cache_dir: str | None = None  # default $FTDIST_CACHE/data; on a cluster, a shared filesystem
    num_proc: int = 0  # processes that tokenize a cold build; 0: one per CPU core this process may use (at most 8)
    dedupe: bool = False  # drop exact duplicate rows (whitespace and case normalised), counted in the report


@dataclass
class StrategyConfig:
    name: str = "single"  # single | ddp | fsdp | deepspeed
    backend: str = "auto"  # auto (nccl on CUDA, else gloo) | gloo | nccl
    timeout_s: int = 600  # process-group timeout
    # Every rank must check in within this many seconds of joining the process group, or the
    # run stops naming the ranks that did not (instead of hanging in the first collective).
    preflight_timeout_s: int = 60
    # fsdp (FSDP2 fully_shard per decoder block, then the root)
    reshard_after_forward: bool = True  # free gathered blocks after forward (ZeRO-3-like)
    cpu_offload: bool = False  # sharded parameters, gradients and optimizer state live on CPU
    # Under gradient accumulation, reduce-scatter only on the last micro-batch: less traffic, but
    # every rank holds unsharded fp32-reduce gradients of all trained parameters until then (a
    # full model's worth under full fine-tuning). Off: reduce-scatter every micro-batch, so
    # gradients stay sharded; worth turning on where only adapters train.
    accumulate_unsharded: bool = False
    # deepspeed
    zero_stage: int = 3  # 1 | 2 | 3
    offload_optimizer: bool = False  # optimizer state (and its step) on CPU
    offload_params: bool = False  # parameters on CPU between uses (stage 3 only)
    # torch: torch.optim.AdamW (no op build) | deepspeed: DeepSpeed's fused/CPU Adam
    optimizer: str = "torch"


@dataclass
class PeftConfig:
    method: str = "none"  # none | lora | qlora (4-bit NF4 base + LoRA) | dora
    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    # Module names to adapt; all-linear: every linear layer but the output head.
    target_modules: list[str] = field(default_factory=lambda: ["all-linear"])
    # qlora: storage dtype of the packed 4-bit weights; auto: the dtype FSDP shards (model.dtype
    # where it is bf16, else bf16), so FSDP2 can treat them as ordinary parameters.
    quant_storage: str = "auto"


@dataclass
class TrainConfig:
    lr: float = 2e-5
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    schedule: str = "cosine"  # cosine | linear | constant (after warmup)
    warmup_steps: int = 0
    min_lr_ratio: float = 0.1  # final lr as a fraction of lr, for cosine and linear
    max_steps: int | None = None  # optimizer steps; else derived from epochs
    epochs: float = 1.0
    micro_batch_size: int = 1
    grad_accum_steps: int = 1
    max_grad_norm: float | None = 1.0  # null disables clipping
    mixed_precision: str = "auto"  # auto (bf16 autocast on CUDA with bf16) | bf16 | none
    log_every_steps: int = 1
    eval_every_steps: int | None = None  # null: evaluate only at the start and the end
    eval_at_start: bool = True
    eval_batch_size: int = 8
    save_final: bool = True
    progress_bar: bool = True
    # A NaN/Inf loss or gradient norm on any rank: raise (stop the run) | skip (leave the
    # parameters unchanged, count the step in metrics as skipped_steps).
    on_nonfinite: str = "raise"
    # torch.compile each decoder block before sharding (ftdist/model/compile.py).
    compile: bool = False
    # End this invocation after this many steps of the run (a checkpoint is written, no final
    # eval or export) while the schedule stays that of max_steps: rerun to continue. For jobs in
    # time slices, and for checking that a resume is exact.
    stop_after_steps: int | None = None


@dataclass
class CheckpointConfig:
    every_steps: int | None = None  # null: no periodic checkpoints (preemption still saves one)
    keep: int = 2  # newest complete checkpoints kept; older ones are deleted by rank 0


@dataclass
class GenerationEvalConfig:
    """Task metrics of greedy (or seeded sampled) generations on held-out instruction/chat rows."""

    # exact_match | normalized_match | numeric_answer | token_f1 | json_valid | regex:PATTERN
    # (ftdist/eval/metrics.py says what each compares)
    metrics: list[str] = field(default_factory=lambda: ["exact_match"])
    samples: int = 0  # held-out rows generated for; 0 disables generation metrics
    max_new_tokens: int = 64
    batch_size: int = 32
    do_sample: bool = False  # false: greedy; true: sampled with temperature/top_p from `seed`
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 0
    # Also generate at every train.eval_every_steps eval (they always run at step 0 and at the end).
    every_eval: bool = False


@dataclass
class LmEvalConfig:
    """lm-evaluation-harness on base and tuned models (pip install 'ftdist[eval]')."""

    tasks: list[str] = field(default_factory=list)  # empty: not run
    include_path: str | None = None  # a directory of task YAML files (local tasks, offline)
    num_fewshot: int | None = None
    limit: int | None = None  # documents per task; null: all
    batch_size: int = 8


@dataclass
class EvalConfig:
    """Held-out evaluation: the objective's metrics, generation metrics, forgetting, the report."""

    generation: GenerationEvalConfig = field(default_factory=GenerationEvalConfig)
    # What `ftdist.eval RUN_DIR` evaluates as the tuned model: null is RUN_DIR/final (else its
    # newest checkpoint); or a checkpoint step_N, a final/, or any Hugging Face model directory.
    checkpoint: str | None = None
    compare_base: bool = True  # also evaluate the base model (model.*), side by side
    # General text the user trusts (any data source: .jsonl/.json/.parquet/.csv/.tsv, hub):
    # perplexity of base and tuned models on it measures forgetting.
    reference_data: str | None = None
    reference_field: str = "text"  # the column holding each document's text
    reference_max_docs: int | None = None  # the first N documents; null: all
    # Stop with exit code 5 when the tuned model's perplexity on reference_data exceeds the
    # base's by more than this fraction (0.1: 10%).
    max_forgetting: float | None = None
    at_end: bool = False  # a training run ends with the whole ftdist.eval (report, forgetting gate)
    report_generations: int = 5  # generations shown in report.md/html (all are in generations.jsonl)
    lm_eval: LmEvalConfig = field(default_factory=LmEvalConfig)


@dataclass
class TrackingConfig:
    backend: str = "none"  # none: metrics.jsonl and the console only | wandb: also Weights & Biases
    project: str = "ftdist"
    entity: str | None = None
    run_name: str | None = None  # default: experiment_name and the run directory's name
    group: str | None = None
    tags: list[str] = field(default_factory=list)
    # online | offline | disabled; null leaves it to WANDB_MODE (wandb's default: online).
    mode: str | None = None


@dataclass
class SlurmConfig:
    """How `python -m ftdist.slurm` renders and submits the sbatch job (see slurm/)."""

    nodes: int = 1
    gpus_per_node: int = 0  # 0: a CPU job (no --gpus-per-node)
    # torchrun processes per node; null: gpus_per_node, or 1 on a CPU job
    procs_per_node: int | None = None
    cpus_per_task: int | None = None  # CPUs for each node's one task (torchrun and its workers)
    mem: str | None = None  # per node, e.g. 200G; null: the partition's default
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    time: str = "04:00:00"  # Slurm's formats: MM, HH:MM:SS, D-HH, D-HH:MM:SS
    job_name: str | None = None  # default: experiment_name
    # Slurm sends USR1 to the batch script this many seconds before the time limit; the run
    # checkpoints at its next step and the job is requeued (needs a step shorter than this).
    signal_seconds: int = 300
    requeue: bool = True
    max_restarts: int = 0  # torchrun restarts of failed workers inside one allocation
    port: int | None = None  # rendezvous port on the first node; null: derived from the job id
    python: str | None = None  # interpreter on the nodes; null: the one running ftdist.slurm
    setup: list[str] = field(default_factory=list)  # shell lines run first (module load, venv)
    env: dict[str, str] = field(default_factory=dict)  # extra environment for the job
    sbatch_args: list[str] = field(default_factory=list)  # more #SBATCH options, e.g. --exclusive
    array_parallelism: int | None = None  # sweeps: at most this many array tasks at once
    dry_run: bool = False  # print the script; write and submit nothing


@dataclass
class ClusterConfig:
    """The hardware `python -m ftdist.plan` sizes a run for (training reads WORLD_SIZE instead)."""

    nodes: int = 1
    gpus_per_node: int = 8
    gpu_mem_gb: float = 80.0  # memory of one GPU, GiB (2^30 bytes: a GPU sold as 80 GB holds 80 GiB)
    gpu: str = "h100"  # peak FLOP/s from ftdist.metrics.GPU_PEAK_FLOPS (h100, h200, a100, l40s, ...)
    cpu_mem_gb: float = 1024.0  # host memory per node, GB: the bound on offloaded state


@dataclass
class ObjectiveConfig:
    """What the model is trained to do (ftdist/objectives/): sft (supervised fine-tuning: loss
    on the responses), or preference optimization on chosen/rejected pairs (data.format=
    preference): dpo against a reference model, reference-free simpo and orpo; a scoring head
    instead of the LM head: classification (data.format=classification) and reward (a
    Bradley-Terry reward model on preference pairs). Each option belongs to the objectives
    OBJECTIVE_OPTIONS lists; setting it for another is an error."""

    name: str = "sft"
    # dpo: sigmoid | ipo | hinge | robust; grpo: grpo | dapo | dr_grpo (formulas in the README)
    loss_type: str = "sigmoid"
    # dpo: KL strength; simpo: reward scale; orpo: weight of the odds-ratio term; grpo: weight of
    # the k3 KL penalty to the reference (0: no reference model)
    beta: float = 0.1
    label_smoothing: float = 0.0  # dpo sigmoid/robust and simpo: assumed rate of flipped labels, in [0, 0.5)
    sft_weight: float = 0.0  # dpo: weight of an NLL term on the chosen response (RPO)
    gamma: float = 0.5  # simpo: target reward margin
    # dpo: where reference log-probs come from. adapter: the policy with its adapters disabled
    # (PEFT only); model: a frozen copy sharded like the policy; precomputed: one pass before
    # training, cached; auto: adapter under PEFT, else model.
    reference: str = "auto"
    reference_path: str | None = None  # dpo: the reference's weights (default: the starting weights)
    reference_cache: str | None = None  # dpo precomputed: the cache file (default: output_dir/reference_logps.pt)
    # classification: the label set and its order (class i is labels[i]); default: the sorted
    # labels of the training split. A label outside the set is a bad row (unknown_label).
    labels: list[Any] | None = None
    # classification: per-class loss weights. none | auto (n / (classes x count of the class) on
    # the training split, as scikit-learn's "balanced") | a list, one weight per class.
    class_weights: Any = "none"
    # reward: the name of a row field holding a per-pair margin m (loss -log sigmoid(r_c - r_r - m)).
    margin: str | None = None
    center_rewards: float = 0.0  # reward: coefficient c of c * mean((r_c + r_r)^2), keeps scores near 0
    # grpo (policy optimization with group-relative advantages; README "Policy optimization"):
    group_size: int = 8  # completions sampled per prompt
    max_new_tokens: int = 256  # completion length cap (completions_clipped_ratio counts those that hit it)
    temperature: float = 1.0  # sampling temperature; the loss's log-probs use the same one
    top_p: float = 1.0
    scale_rewards: str = "group"  # advantage = reward - group mean, divided by the group's std | batch's | none
    epsilon: float = 0.2  # clip range below 1 for the importance ratio
    epsilon_high: float | None = None  # clip range above 1 (DAPO's clip-higher); null: epsilon
    iterations: int = 1  # optimizer steps per generation batch (importance ratios against the sampling policy)
    # Reward functions: exact_match | numeric_answer | json_valid | format:REGEX | reward_model:PATH |
    # a dotted path to fn(prompts, completions, references) -> list[float]. Summed with reward_weights.
    rewards: list[str] = field(default_factory=list)
    reward_weights: list[float] | None = None  # one per reward; null: all 1
    rollout: str = "hf"  # hf: Hugging Face generation under the run's strategy (vllm: not yet)


@dataclass
class PlanConfig:
    """Options of `python -m ftdist.plan` (see ftdist/plan.py)."""

    json: bool = False  # print one JSON object instead of the report
    mfu: float = 0.4  # model FLOPs utilisation assumed for the step-time estimate
    workspace_gb: float = 2.0  # CUDA context, cuBLAS/NCCL workspaces and allocator slack per GPU


@dataclass
class FtdistConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    peft: PeftConfig = field(default_factory=PeftConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    slurm: SlurmConfig = field(default_factory=SlurmConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    plan: PlanConfig = field(default_factory=PlanConfig)
    # auto: continue from the newest complete checkpoint in output_dir/checkpoints (a fresh
    # start if there is none) | none: always start fresh | PATH: that checkpoint directory.
    resume: str = "auto"
    # With resume=none: an output_dir holding a previous run that cannot be resumed is taken
    # over, its files moved aside to <output_dir>.replaced-<time> (never deleted). Without it,
    # such a directory is refused.
    overwrite: bool = False
    seed: int = 0
    output_dir: str = MISSING
    experiment_name: str = "default"
    # Build the model on the meta device (no weights, no download), print parameter counts,
    # the sharding plan and a per-rank memory estimate, and exit.
    dry_run: bool = False


GROUP_SCHEMAS = {
    "model": ModelConfig,
    "data": DataConfig,
    "strategy": StrategyConfig,
    "peft": PeftConfig,
    "train": TrainConfig,
    "objective": ObjectiveConfig,
    "tracking": TrackingConfig,
    "slurm": SlurmConfig,
}


def register_schemas() -> None:
    cs = ConfigStore.instance()
    cs.store(name="ftdist_schema", node=FtdistConfig)
    for group, schema in GROUP_SCHEMAS.items():
        cs.store(group=group, name="schema", node=schema)
    # Used by conf/hydra/launcher/slurm.yaml to map slurm.* onto submitit's fields.
    OmegaConf.register_new_resolver("ftdist_minutes", slurm_time_minutes, replace=True)
    OmegaConf.register_new_resolver("ftdist_gpus", lambda gpus: int(gpus) or None, replace=True)


def slurm_time_minutes(time: str) -> int:
    """Slurm's time formats (MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS) in whole minutes, rounded up."""
    days, _, rest = str(time).rpartition("-")
    parts = [int(p) for p in rest.split(":")]
    if days:  # D-HH[:MM[:SS]]
        parts += [0] * (3 - len(parts))
        h, m, sec = parts
        h += 24 * int(days)
    elif len(parts) == 3:
        h, m, sec = parts
    else:  # MM or MM:SS
        h, (m, sec) = 0, (parts + [0])[:2]
    return h * 60 + m + (1 if sec else 0)


# --- validation -------------------------------------------------------------------------------

CHOICES = {
    "model.dtype": ("fp32", "bf16"),
    "model.attn_implementation": ("auto", "flash_attention_2", "flex_attention", "sdpa", "eager"),
    "data.format": ("instruction", "chat", "text", "preference", "classification"),
    "data.template": ("auto", "chat", "plain"),
    "data.turns": ("auto", "whole", "per_turn", "last"),
    "data.on_bad_row": ("error", "skip"),
    "data.responses": ("required", "optional"),
    "strategy.name": ("single", "ddp", "fsdp", "deepspeed"),
    "strategy.backend": ("auto", "gloo", "nccl"),
    "strategy.zero_stage": (1, 2, 3),
    "strategy.optimizer": ("torch", "deepspeed"),
    "peft.method": ("none", "lora", "qlora", "dora"),
    "peft.quant_storage": ("auto", "bf16", "fp32", "uint8"),
    "train.schedule": ("cosine", "linear", "constant"),
    "train.mixed_precision": ("auto", "bf16", "none"),
    "train.on_nonfinite": ("raise", "skip"),
    "tracking.backend": ("none", "wandb"),
    "tracking.mode": (None, "online", "offline", "disabled"),
    "objective.loss_type": ("sigmoid", "ipo", "hinge", "robust", "grpo", "dapo", "dr_grpo"),
    "objective.scale_rewards": ("group", "batch", "none"),
    "objective.rollout": ("hf",),
    "objective.reference": ("auto", "adapter", "model", "precomputed"),
}

# The options each built-in objective reads (ObjectiveConfig); any other set away from its
# default is a mistake worth stopping for (beta under sft, gamma under dpo).
PREFERENCE_OBJECTIVES = ("dpo", "simpo", "orpo")
PAIR_OBJECTIVES = (*PREFERENCE_OBJECTIVES, "reward")  # trained on data.format=preference
OBJECTIVE_OPTIONS = {
    "sft": (),
    "classification": ("labels", "class_weights"),
    "reward": ("margin", "center_rewards"),
    "dpo": ("loss_type", "beta", "label_smoothing", "sft_weight", "reference", "reference_path", "reference_cache"),
    "simpo": ("beta", "gamma", "label_smoothing"),
    "orpo": ("beta",),
    "grpo": ("loss_type", "beta", "reference", "reference_path", "group_size", "max_new_tokens", "temperature",
             "top_p", "scale_rewards", "epsilon", "epsilon_high", "iterations", "rewards", "reward_weights", "rollout"),
}
DPO_LOSSES = ("sigmoid", "ipo", "hinge", "robust")
GRPO_LOSSES = ("grpo", "dapo", "dr_grpo")

POSITIVE = (
    "data.max_seq_len",
    "data.num_synthetic_rows",
    "data.packing_window",
    "train.micro_batch_size",
    "train.grad_accum_steps",
    "train.log_every_steps",
    "train.eval_batch_size",
    "eval.generation.max_new_tokens",
    "eval.generation.batch_size",
    "eval.lm_eval.batch_size",
    "strategy.timeout_s",
    "strategy.preflight_timeout_s",
    "peft.r",
    "checkpoint.keep",
    "slurm.nodes",
    "cluster.nodes",
    "cluster.gpus_per_node",
    "cluster.gpu_mem_gb",
    "cluster.cpu_mem_gb",
)


def _get(cfg: Any, dotted: str) -> Any:
    node = cfg
    for part in dotted.split("."):
        node = getattr(node, part)
    return node


def validate(cfg: FtdistConfig) -> None:
    """Cross-field checks on a composed config; raises ConfigError naming the key."""
    for key in ("data.path", "data.max_seq_len", "output_dir"):
        if _get(cfg, key) == MISSING:  # a schema object built in code, not through Hydra
            raise ConfigError(f"{key} must be set (e.g. {key}=...)")
    for key, allowed in CHOICES.items():
        value = _get(cfg, key)
        if value not in allowed:
            raise ConfigError(f"{key}={value!r} is not one of {', '.join(map(str, allowed))}")
    for key in POSITIVE:
        value = _get(cfg, key)
        if value is None or value <= 0:
            raise ConfigError(f"{key} must be a positive integer (got {value!r})")
    t = cfg.train
    if t.lr < 0:
        raise ConfigError(f"train.lr must be >= 0 (got {t.lr})")
    if t.max_steps is not None and t.max_steps < 0:
        raise ConfigError(f"train.max_steps must be >= 0 (got {t.max_steps})")
    if t.max_steps is None and t.epochs <= 0:
        raise ConfigError("train.epochs must be > 0 when train.max_steps is unset")
    if t.warmup_steps < 0:
        raise ConfigError(f"train.warmup_steps must be >= 0 (got {t.warmup_steps})")
    if not 0.0 <= t.min_lr_ratio <= 1.0:
        raise ConfigError(f"train.min_lr_ratio must be in [0, 1] (got {t.min_lr_ratio})")
    if t.max_grad_norm is not None and t.max_grad_norm <= 0:
        raise ConfigError(f"train.max_grad_norm must be > 0 or null (got {t.max_grad_norm})")
    if cfg.checkpoint.every_steps is not None and cfg.checkpoint.every_steps <= 0:
        raise ConfigError(f"checkpoint.every_steps must be > 0 or null (got {cfg.checkpoint.every_steps})")
    if t.eval_every_steps is not None and t.eval_every_steps <= 0:
        raise ConfigError(f"train.eval_every_steps must be > 0 or null (got {t.eval_every_steps})")
    d = cfg.data
    if d.validation_path is None and not 0.0 <= d.val_fraction < 1.0:
        raise ConfigError(f"data.val_fraction must be in [0, 1) (got {d.val_fraction})")
    if d.max_val_examples is not None and d.max_val_examples <= 0:
        raise ConfigError(f"data.max_val_examples must be > 0 or null (got {d.max_val_examples})")
    if d.num_proc < 0:
        raise ConfigError(f"data.num_proc must be >= 0 (0: one per CPU core) (got {d.num_proc})")
    if len(d.reasoning_tags) != 2 or not all(isinstance(t, str) and t.strip() for t in d.reasoning_tags):
        raise ConfigError(f"data.reasoning_tags must be two non-empty strings, open and close (got {list(d.reasoning_tags)})")
    if d.chat_template is not None and not os.path.isfile(os.path.expanduser(d.chat_template)):
        raise ConfigError(f"data.chat_template={d.chat_template}: file not found (working directory: {os.getcwd()})")
    m = cfg.model
    if m.tiny is None and not m.name_or_path:
        raise ConfigError("model.name_or_path must be set (a local path or hub name), or use model=tiny")
    if m.tiny is not None and d.max_seq_len > m.tiny.max_position_embeddings:
        raise ConfigError(
            f"data.max_seq_len={d.max_seq_len} exceeds model.tiny.max_position_embeddings="
            f"{m.tiny.max_position_embeddings}"
        )
    validate_eval(cfg.eval)
    validate_objective(cfg)
    validate_parallel(cfg)
    validate_slurm(cfg)
    validate_plan(cfg)


def validate_eval(e: EvalConfig) -> None:
    from ftdist.eval.metrics import check_metric_specs

    g = e.generation
    if g.samples < 0:
        raise ConfigError(f"eval.generation.samples must be >= 0 (got {g.samples})")
    try:
        check_metric_specs(g.metrics)
    except ValueError as err:
        raise ConfigError(f"eval.generation.metrics: {err}") from None
    if g.temperature <= 0 or not 0 < g.top_p <= 1:
        raise ConfigError(f"eval.generation.temperature must be > 0 and top_p in (0, 1] (got {g.temperature}, {g.top_p})")
    for key in ("reference_max_docs", "lm_eval.limit", "lm_eval.num_fewshot"):
        value = _get(e, key)
        if value is not None and value < (0 if key == "lm_eval.num_fewshot" else 1):
            raise ConfigError(f"eval.{key} must be {'>= 0' if key == 'lm_eval.num_fewshot' else '> 0'} or null (got {value})")
    if e.max_forgetting is not None and e.max_forgetting < 0:
        raise ConfigError(f"eval.max_forgetting must be >= 0 or null (got {e.max_forgetting})")
    if e.max_forgetting is not None and e.reference_data is None:
        raise ConfigError("eval.max_forgetting needs eval.reference_data (the text whose perplexity it gates on)")
    if e.report_generations < 0:
        raise ConfigError(f"eval.report_generations must be >= 0 (got {e.report_generations})")


FORMAT_WHAT = {"preference": "chosen/rejected pairs", "classification": "labelled texts"}


def validate_objective(cfg: FtdistConfig) -> None:
    """Options of the chosen objective, and what it needs of the data and the model."""
    o, name = cfg.objective, cfg.objective.name
    if name not in OBJECTIVE_OPTIONS:  # registered from outside (register_objective): its own checks
        return
    defaults = ObjectiveConfig()
    for option in ObjectiveConfig.__dataclass_fields__:
        if option != "name" and option not in OBJECTIVE_OPTIONS[name] and getattr(o, option) != getattr(defaults, option):
            users = [n for n, opts in OBJECTIVE_OPTIONS.items() if option in opts]
            raise ConfigError(f"objective.{option} applies to objective={'|'.join(users)}, not objective={name}")
    wanted = {"classification": "classification", **dict.fromkeys(PAIR_OBJECTIVES, "preference")}.get(name)
    if wanted is not None and cfg.data.format != wanted:
        raise ConfigError(f"objective={name} trains on {FORMAT_WHAT[wanted]}: it needs data.format={wanted}")
    if wanted is None and cfg.data.format in FORMAT_WHAT:
        users = "classification" if cfg.data.format == "classification" else "|".join(PAIR_OBJECTIVES)
        raise ConfigError(f"data.format={cfg.data.format} holds {FORMAT_WHAT[cfg.data.format]}: train them with "
                          f"objective={users}, not objective={name}")
    if cfg.data.responses != "required" and name != "grpo":
        raise ConfigError(f"data.responses={cfg.data.responses}: rows without a response are prompts to sample "
                          f"completions for (objective=grpo); objective={name} needs every row's response")
    if name == "classification":
        validate_classification(cfg)
        return
    if name == "grpo":
        validate_grpo(cfg)
        return
    if name == "reward":
        if o.center_rewards < 0:
            raise ConfigError(f"objective.center_rewards must be >= 0 (got {o.center_rewards})")
        return
    preference = name in PREFERENCE_OBJECTIVES
    if not preference:
        return
    if cfg.data.train_on_prompt:
        raise ConfigError("data.train_on_prompt=true: a preference pair's two sequences share their prompt, "
                          "so only the responses carry a loss")
    if name == "dpo" and o.loss_type not in DPO_LOSSES:
        raise ConfigError(f"objective.loss_type={o.loss_type!r} is a grpo loss; objective=dpo takes {' | '.join(DPO_LOSSES)}")
    if o.beta <= 0:
        raise ConfigError(f"objective.beta must be > 0 (got {o.beta})")
    if not 0.0 <= o.label_smoothing < 0.5:
        raise ConfigError(f"objective.label_smoothing must be in [0, 0.5) (got {o.label_smoothing})")
    if o.label_smoothing and name == "dpo" and o.loss_type not in ("sigmoid", "robust"):
        raise ConfigError(f"objective.label_smoothing applies to loss_type=sigmoid|robust, not {o.loss_type}")
    if o.sft_weight < 0:
        raise ConfigError(f"objective.sft_weight must be >= 0 (got {o.sft_weight})")
    if o.reference == "adapter" and cfg.peft.method == "none":
        raise ConfigError("objective.reference=adapter runs the policy with its adapters disabled: it needs "
                          "peft=lora|dora|qlora (with peft=none use reference=model or precomputed)")
    if o.reference_path is not None:
        if o.reference == "adapter" or (o.reference == "auto" and cfg.peft.method != "none"):
            raise ConfigError("objective.reference_path names a reference model to load; objective.reference="
                              f"{o.reference} with peft={cfg.peft.method} uses the adapter-disabled policy instead "
                              "(set objective.reference=model or precomputed)")
        if not os.path.isdir(os.path.expanduser(o.reference_path)):
            raise ConfigError(f"objective.reference_path={o.reference_path}: no such model directory "
                              f"(working directory: {os.getcwd()})")


def validate_grpo(cfg: FtdistConfig) -> None:
    """The grpo options; its reward specs are checked by the objective (objectives.check_objective)."""
    o = cfg.objective
    if cfg.data.format not in ("instruction", "chat"):
        raise ConfigError(f"objective=grpo samples completions to prompts: it needs data.format=instruction|chat "
                          f"(got {cfg.data.format})")
    if o.loss_type not in GRPO_LOSSES:
        raise ConfigError(f"objective.loss_type={o.loss_type!r} is a dpo loss; objective=grpo takes "
                          f"{' | '.join(GRPO_LOSSES)}")
    for key in ("group_size", "max_new_tokens", "iterations"):
        if getattr(o, key) <= 0:
            raise ConfigError(f"objective.{key} must be a positive integer (got {getattr(o, key)})")
    if o.group_size < 2 and o.scale_rewards != "none":
        raise ConfigError(f"objective.group_size={o.group_size}: a group of one has no spread to be relative to "
                          "(use group_size >= 2)")
    if o.temperature <= 0:
        raise ConfigError(f"objective.temperature must be > 0 (got {o.temperature}): rollouts are sampled")
    if not 0.0 < o.top_p <= 1.0:
        raise ConfigError(f"objective.top_p must be in (0, 1] (got {o.top_p})")
    if not 0.0 < o.epsilon < 1.0:
        raise ConfigError(f"objective.epsilon must be in (0, 1) (got {o.epsilon})")
    if o.epsilon_high is not None and o.epsilon_high <= 0:
        raise ConfigError(f"objective.epsilon_high must be > 0 or null (got {o.epsilon_high})")
    if o.beta < 0:
        raise ConfigError(f"objective.beta must be >= 0 (got {o.beta})")
    if o.reference == "precomputed":
        raise ConfigError("objective.reference=precomputed: grpo's completions are new every step, so reference "
                          "log-probs cannot be computed ahead (use adapter or model)")
    if o.reference == "adapter" and cfg.peft.method == "none":
        raise ConfigError("objective.reference=adapter needs peft=lora|dora|qlora (with peft=none use reference=model)")
    if not o.rewards:
        raise ConfigError("objective=grpo needs objective.rewards, e.g. objective.rewards=[exact_match]")
    if o.reward_weights is not None and len(o.reward_weights) != len(o.rewards):
        raise ConfigError(f"objective.reward_weights has {len(o.reward_weights)} weights for {len(o.rewards)} "
                          f"rewards (objective.rewards={list(o.rewards)})")
    if cfg.data.packing:
        raise ConfigError("data.packing=true with objective=grpo: rollouts are padded rows of one prompt and its "
                          "completion (packing them is not supported yet)")
    if cfg.data.train_on_prompt:
        raise ConfigError("data.train_on_prompt=true with objective=grpo: only the sampled completions carry a loss")


def validate_classification(cfg: FtdistConfig) -> None:
    o = cfg.objective
    if o.labels is not None:
        names = [str(label) for label in o.labels]
        if len(names) < 2:
            raise ConfigError(f"objective.labels needs at least two classes (got {list(o.labels)})")
        if len(set(names)) != len(names):
            raise ConfigError(f"objective.labels has a class twice: {list(o.labels)}")
    weights = o.class_weights
    if isinstance(weights, str):
        if weights not in ("none", "auto"):
            raise ConfigError(f"objective.class_weights={weights!r}: use none, auto or a list of weights, one per class")
    else:
        values = list(weights)
        if not all(isinstance(w, (int, float)) and not isinstance(w, bool) and w > 0 for w in values):
            raise ConfigError(f"objective.class_weights must be positive numbers (got {values})")
        if o.labels is None:
            raise ConfigError("objective.class_weights as a list needs objective.labels: the weights follow the "
                              "classes' order, which must be fixed")
        if len(values) != len(o.labels):
            raise ConfigError(f"objective.class_weights has {len(values)} weights for {len(o.labels)} classes "
                              f"(objective.labels={list(o.labels)})")
    if cfg.data.train_on_prompt:
        raise ConfigError("data.train_on_prompt applies to language-model objectives; a classifier has no prompt")


# What a strategy or PEFT method needs installed: (applies, what, package, module, pip extra).
def _needed_packages(cfg: FtdistConfig) -> list[tuple[str, str, str, str]]:
    s, p = cfg.strategy, cfg.peft
    needed = [
        (s.name == "deepspeed", "strategy=zero*", "DeepSpeed", "deepspeed", "deepspeed"),
        (p.method == "qlora", "peft=qlora", "bitsandbytes", "bitsandbytes", "bnb"),
        (cfg.model.liger, "model.liger=true", "Liger-Kernel", "liger_kernel", "liger"),
    ]
    return [n[1:] for n in needed if n[0] and not cfg.dry_run]


def check_packages_import(cfg: FtdistConfig) -> None:
    """Import what the run needs (validate only looks the packages up, quietly): a package that is
    present but broken (a wheel for another CUDA, a half-removed install) fails here with its own
    message, before data and model load. Importing prints the packages' own start-up lines."""
    import importlib

    for what, package, module, extra in _needed_packages(cfg):
        try:
            importlib.import_module(module)
        except ImportError as e:
            raise ConfigError(f"{what} needs {package} (import {module}: {e}): pip install 'ftdist[{extra}]'") from None


def validate_parallel(cfg: FtdistConfig) -> None:
    """Strategy x PEFT combinations that cannot work, rejected before anything launches."""
    import importlib.util

    s, p = cfg.strategy, cfg.peft
    for what, package, module, extra in _needed_packages(cfg):
        if importlib.util.find_spec(module) is None:
            raise ConfigError(f"{what} needs {package}, which is not installed: pip install 'ftdist[{extra}]'")
    if p.method == "qlora" and s.name == "deepspeed":
        raise ConfigError(
            "peft=qlora with strategy=zero*: DeepSpeed ZeRO cannot partition bitsandbytes 4-bit weights; "
            "use strategy=fsdp (FSDP2 shards them), ddp or single, or peft=lora with DeepSpeed"
        )
    if s.offload_params and not (s.name == "deepspeed" and s.zero_stage == 3):
        raise ConfigError("strategy.offload_params=true needs DeepSpeed ZeRO stage 3 (strategy=zero3_offload)")
    if s.offload_optimizer and s.name != "deepspeed":
        raise ConfigError("strategy.offload_optimizer=true is a DeepSpeed option; with FSDP use strategy.cpu_offload")
    if s.accumulate_unsharded and s.name != "fsdp":
        raise ConfigError("strategy.accumulate_unsharded=true is an FSDP option (DDP and ZeRO-1 always accumulate "
                          "unreduced gradients; ZeRO-2/3 always reduce every micro-batch)")
    if s.cpu_offload and s.name != "fsdp":
        raise ConfigError("strategy.cpu_offload=true is an FSDP option; with DeepSpeed use strategy=zero3_offload")
    if p.method != "none" and (p.alpha <= 0 or not 0.0 <= p.dropout < 1.0):
        raise ConfigError(f"peft.alpha must be > 0 and peft.dropout in [0, 1) (got {p.alpha}, {p.dropout})")
    if p.method != "none" and not p.target_modules:
        raise ConfigError("peft.target_modules is empty: name modules to adapt, or all-linear")


SLURM_TIME = re.compile(r"^(\d+-)?\d+(:\d+){0,2}$")


def validate_slurm(cfg: FtdistConfig) -> None:
    sl = cfg.slurm
    if sl.gpus_per_node < 0:
        raise ConfigError(f"slurm.gpus_per_node must be >= 0 (got {sl.gpus_per_node})")
    for key in ("procs_per_node", "cpus_per_task", "array_parallelism", "port"):
        value = getattr(sl, key)
        if value is not None and value <= 0:
            raise ConfigError(f"slurm.{key} must be > 0 or null (got {value})")
    if sl.signal_seconds < 0 or sl.max_restarts < 0:
        raise ConfigError("slurm.signal_seconds and slurm.max_restarts must be >= 0")
    if not SLURM_TIME.match(sl.time):
        raise ConfigError(f"slurm.time={sl.time!r} is not a Slurm time (MM, HH:MM:SS, D-HH or D-HH:MM:SS)")


def validate_plan(cfg: FtdistConfig) -> None:
    if not 0.0 < cfg.plan.mfu <= 1.0:
        raise ConfigError(f"plan.mfu must be in (0, 1] (got {cfg.plan.mfu})")
    if cfg.plan.workspace_gb < 0:
        raise ConfigError(f"plan.workspace_gb must be >= 0 (got {cfg.plan.workspace_gb})")
    from ftdist.metrics import GPU_PEAK_FLOPS

    if cfg.cluster.gpu.upper() not in GPU_PEAK_FLOPS:
        known = ", ".join(sorted(k.lower() for k in GPU_PEAK_FLOPS))
        raise ConfigError(f"cluster.gpu={cfg.cluster.gpu!r} is not a known GPU; known: {known}")


def slurm_procs_per_node(sl: SlurmConfig) -> int:
    return sl.procs_per_node or max(sl.gpus_per_node, 1)


# --- command-line pre-check -------------------------------------------------------------------


def _schema_fields(schema: type) -> dict[str, type | None]:
    """Each field of a schema, mapped to the schema it nests (through Optional) or None for a leaf."""
    hints = typing.get_type_hints(schema)
    out: dict[str, type | None] = {}
    for f in dataclasses.fields(schema):
        tp = hints[f.name]
        out[f.name] = next((c for c in (tp, *typing.get_args(tp)) if dataclasses.is_dataclass(c)), None)
    return out


def check_override_keys(overrides: list[str], groups: tuple[str, ...] = ("experiment",)) -> None:
    """Reject `key=value` overrides whose key the schema does not have, naming the valid keys.

    Hydra rejects them too, but its message does not list the valid keys; this runs first.
    Group selections (`model=tiny`, `+experiment=x`), deletions and hydra.* keys are left to Hydra.
    """
    for raw in overrides:
        if "=" not in raw or raw.startswith(("hydra.", "~", "--")):
            continue
        key = raw.split("=", 1)[0].lstrip("+")
        if key.startswith(("hydra.", "hydra/")):
            continue
        parts = key.split(".")
        if len(parts) == 1 and (parts[0] in GROUP_SCHEMAS or parts[0] in groups):
            continue  # a group choice
        schema: type | None = FtdistConfig
        path: list[str] = []
        for part in parts:
            fields = _schema_fields(schema)
            if part not in fields:
                where = ".".join(path) or "the top level"
                raise ConfigError(
                    f"unknown config key '{key}': '{part}' is not a key of {where}. "
                    f"Valid keys there: {', '.join(sorted(fields))}"
                )
            path.append(part)
            schema = fields[part]
            if schema is None:
                break


def check_known_keys(dcfg: DictConfig, schema: type = FtdistConfig, prefix: str = "") -> None:
    """Reject keys the schema lacks in a composed config.

    Struct mode stops most of them, but Hydra's force-add (`+train.lrr=1`) gets through and
    OmegaConf.to_object would then drop the key silently.
    """
    fields = _schema_fields(schema)
    for key in dcfg:
        full = f"{prefix}{key}"
        if key not in fields:
            raise ConfigError(
                f"unknown config key '{full}'. Valid keys of {prefix.rstrip('.') or 'the top level'}: "
                f"{', '.join(sorted(fields))}"
            )
        nested = fields[key]
        value = dcfg._get_node(key)
        if nested is not None and isinstance(value, DictConfig) and not value._is_none():
            check_known_keys(value, nested, f"{full}.")


# What a dry run puts in data.path when it is unset: it reads no data, so a shipped experiment
# (data.path=???) sizes without one.
DRY_RUN_NO_DATA = "(unset: dry run reads no data)"


def load_config(dcfg: DictConfig) -> FtdistConfig:
    """The typed, checked config of a composed Hydra config: every check, in one place."""
    check_known_keys(dcfg)
    if dcfg.get("dry_run") and OmegaConf.is_missing(dcfg.data, "path"):
        dcfg = copy.deepcopy(dcfg)
        dcfg.data.path = DRY_RUN_NO_DATA
    missing = sorted(OmegaConf.missing_keys(dcfg))
    if missing:
        raise ConfigError(f"required keys not set: {', '.join(missing)} (set them, e.g. {missing[0]}=...)")
    try:
        cfg = OmegaConf.to_object(dcfg)
    except OmegaConfBaseException as e:  # an interpolation that does not resolve, a wrong type
        raise ConfigError(hydra_error_message(e)) from None
    validate(cfg)
    return cfg


# --- composing a command line -----------------------------------------------------------------

CONF_DIR = str(Path(__file__).resolve().parents[1] / "conf")


def compose(overrides: list[str], hydra_node: bool = False) -> DictConfig:
    """The composed (unresolved) Hydra config of `ftdist.train OVERRIDES`; with hydra_node, the
    `hydra` node too (Hydra's own settings), which is otherwise left out.

    Hydra's own errors (an unknown group option, a value of the wrong type, a sweep without -m)
    come back as a one-line ConfigError; Hydra would print a block and exit 1.
    """
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.errors import HydraException

    register_schemas()
    check_override_keys(overrides)
    try:
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            return hydra_compose(config_name="config", overrides=overrides, return_hydra_config=hydra_node)
    except (HydraException, OmegaConfBaseException) as e:
        raise ConfigError(hydra_error_message(e)) from None


def expand_sweep(overrides: list[str]) -> list[list[str]]:
    """Every combination of a multirun's comma-separated overrides, in Hydra's order."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from ftdist.compat import require_attr, require_private

    needed_for = "ftdist expands a multirun's overrides with Hydra's own sweeper"
    sweeper = require_private("hydra._internal.core_plugins.basic_sweeper", "BasicSweeper", "hydra-core", needed_for)
    parsed = OverridesParser.create().parse_overrides(overrides)
    return require_attr(sweeper, "split_arguments", "hydra-core", needed_for)(parsed, max_batch_size=None)[0]


def command_line_runs(overrides: list[str], multirun: bool) -> list[list[str]]:
    """The overrides of every run a command line starts (each combination of a -m sweep), keys
    checked against the schema first; a sweep value Hydra cannot parse is a one-line ConfigError."""
    from hydra.errors import HydraException

    check_override_keys(overrides)
    try:
        return expand_sweep(overrides) if multirun else [overrides]
    except HydraException as e:
        raise ConfigError(hydra_error_message(e)) from None


def _one_line(text: str) -> str:
    lines = [line.strip() for line in str(text).splitlines()]
    return "; ".join(line for line in lines if line and not line.startswith("See https://hydra.cc"))


def hydra_error_message(e: Exception) -> str:
    """One line for an error Hydra or OmegaConf raised while composing, naming the override."""
    from hydra.errors import MissingConfigException, OverrideParseException

    text = str(e)
    if isinstance(e, OverrideParseException) and e.override not in text:
        return f"cannot parse override {e.override!r}: {_one_line(text)}"
    if isinstance(e, MissingConfigException) and e.missing_cfg_file and e.options is not None:
        group, _, name = e.missing_cfg_file.rpartition("/")
        options = [o for o in e.options if o != "schema"]  # the typed schema, stored in every group
        return f"{group}={name}: config group '{group}' has no option '{name}'. Valid options: {', '.join(options)}"
    if text.startswith("Ambiguous value for argument '"):
        override = text.split("'")[1]
        return (f"{override}: a comma-separated value is a sweep; add -m (--multirun) to run one job per value "
                "(or write a list as key=[a,b], a string as key='a,b')")
    cause = e.__cause__
    if text.startswith("Error merging override ") and isinstance(cause, OmegaConfBaseException):
        override = text.removeprefix("Error merging override ")
        return f"{override}: {_one_line(str(cause).splitlines()[0])}"
    return _one_line(text.split("\nConfig search path:")[0])
