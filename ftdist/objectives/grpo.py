"""Group Relative Policy Optimization (Shao et al. 2024, DeepSeekMath) with the aggregations of
DAPO (Yu et al. 2025) and Dr. GRPO (Liu et al. 2025): the policy-optimization stage of RLHF.

Each step, every prompt of the global batch gets `objective.group_size` sampled completions
(rollout.py), scored by `objective.rewards` (rewards.py). A completion's advantage is its reward
relative to its group's: minus the group mean, divided by the group's (or the batch's) standard
deviation, or not (`scale_rewards`). The loss is PPO's clipped surrogate on each completion
token, plus `beta` x the k3 estimate of KL to a reference model; `loss_type` says how token
losses are averaged (README: "Policy optimization" has the formulas and their sources).

The trainer's contract holds: `loss` returns a sum over units whose global count is known before
the first forward (sequences for grpo and dr_grpo, completion tokens for dapo), so accumulation
and world size do not change the step. A group never straddles micro-batches or ranks, so group
statistics are local; the batch's standard deviation and the logged metrics are all-reduced.

With `iterations` > 1 a generation batch serves that many optimizer steps: the log-probs of the
policy that sampled it are kept ("old"), and later steps weight each token by its ratio to them.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from dataclasses import dataclass, replace

import torch

from ftdist.config import ConfigError
from ftdist.constants import IGNORE_INDEX
from ftdist.data.example import Example
from ftdist.data.loader import Batch, collate, to_device
from ftdist.data.prepare import prepare_data
from ftdist.eval.generation import generation_metrics
from ftdist.model.lm_head import shifted_targets
from ftdist.objectives.base import EvalContext, Forward, ObjectiveLoss, TrainingContext, loss_pass
from ftdist.objectives.preference import disable_dropout
from ftdist.objectives.reference import reference_mode, without_adapters
from ftdist.objectives.rewards import RewardFunctions, check_reward_specs
from ftdist.objectives.rollout import Sampling, sample_completions
from ftdist.objectives.sft import SFTObjective, describe_generation

log = logging.getLogger(__name__)

STD_EPS = 1e-4  # added to a standard deviation before dividing by it (a group of equal rewards has 0)


@dataclass
class PromptBatch:
    """A micro-batch before its rollout: the training set's indices of its prompts."""

    indices: list[int]


@dataclass
class RolloutBatch:
    """A micro-batch of completions: each prompt's group of rows (prompt + completion, labels on
    the completion), their advantages, and where needed the sampling policy's and the
    reference's log-probs of each completion token ([B, T], aligned with token_logps)."""

    rows: Batch
    advantages: torch.Tensor  # [B]
    completion_tokens: int
    old_logps: torch.Tensor | None = None
    ref_logps: torch.Tensor | None = None

    @property
    def num_tokens(self) -> int:
        return self.rows.num_tokens

    @property
    def num_documents(self) -> int:
        return self.rows.num_documents

    @property
    def num_sequences(self) -> int:
        return self.rows.input_ids.size(0)

    @property
    def slots(self) -> int:
        return self.rows.slots

    @property
    def document_lengths(self) -> list[int]:
        return self.rows.document_lengths

    def to(self, device: torch.device) -> RolloutBatch:
        return replace(self, rows=self.rows.to(device), advantages=to_device(self.advantages, device),
                       old_logps=to_device(self.old_logps, device), ref_logps=to_device(self.ref_logps, device))


def completion_mask(rows: Batch) -> torch.Tensor:
    """[B, T] bool: positions whose next token is a completion token (where token_logps scores it)."""
    return shifted_targets(rows.labels) != IGNORE_INDEX


def token_losses(logps, old_logps, advantages, ref_logps, epsilon: float, epsilon_high: float, beta: float):
    """Per-token loss [B, T], KL estimate (k3; 0 where beta is 0) and whether the clip was active.

    loss = -min(r A, clip(r, 1 - eps, 1 + eps_high) A) + beta (exp(q - p) - (q - p) - 1), with
    r = exp(p - p_old), p the policy's log-prob, q the reference's. With old = p.detach() the
    ratio is 1 and the gradient is A grad p, GRPO's on-policy step."""
    ratio = torch.exp(logps - old_logps)
    a = advantages[:, None]
    clipped_ratio = ratio.clamp(1 - epsilon, 1 + epsilon_high)
    loss = -torch.minimum(ratio * a, clipped_ratio * a)
    clipped = ((ratio < 1 - epsilon) & (a < 0)) | ((ratio > 1 + epsilon_high) & (a > 0))
    kl = torch.zeros_like(logps)
    if beta:
        d = ref_logps - logps
        kl = torch.exp(d) - d - 1
        loss = loss + beta * kl
    return loss, kl, clipped


def aggregate(per_token: torch.Tensor, mask: torch.Tensor, loss_type: str, max_new_tokens: int) -> torch.Tensor:
    """The micro-batch's share of the step's loss as a SUM over its units (loss_units)."""
    m = mask.to(per_token.dtype)
    masked = per_token * m
    if loss_type == "grpo":  # each sequence's token mean, summed over sequences
        return (masked.sum(1) / m.sum(1).clamp(min=1)).sum()
    if loss_type == "dapo":  # summed over tokens; the trainer divides by the global batch's token count
        return masked.sum()
    if loss_type == "dr_grpo":  # a constant length: every sequence divided by max_new_tokens
        return masked.sum() / max_new_tokens
    raise ValueError(f"objective.loss_type={loss_type!r}")


def group_advantages(rewards: torch.Tensor, group_size: int, scale: str, batch_std: float | None) -> torch.Tensor:
    """Reward minus its group's mean, over the group's std (unbiased), the batch's, or nothing."""
    groups = rewards.view(-1, group_size)
    centred = groups - groups.mean(1, keepdim=True)
    if scale == "group":
        centred = centred / (group_std(groups)[:, None] + STD_EPS)
    elif scale == "batch":
        centred = centred / (batch_std + STD_EPS)
    return centred.reshape(-1)


def group_std(groups: torch.Tensor) -> torch.Tensor:
    return groups.std(1) if groups.size(1) > 1 else torch.zeros(groups.size(0), dtype=groups.dtype)


class GRPOObjective:
    name = "grpo"
    unit = "prompts"
    sum_keys = ("completion_tokens", "kl_sum", "clipped_tokens", "entropy_sum")

    def __init__(self, cfg, tokenizer):
        self.cfg, self.tokenizer = cfg, tokenizer
        o = cfg.objective
        self.options = o
        self.sampling = Sampling(o.group_size, o.max_new_tokens, o.temperature, o.top_p, cfg.seed)
        self.epsilon_high = o.epsilon if o.epsilon_high is None else o.epsilon_high
        # Held-out evaluation is SFT's (NLL of the reference responses, generation metrics) plus rewards.
        self.sft = SFTObjective(cfg, tokenizer)
        self.task_metric, self.summary_extra_metrics = self.sft.task_metric, self.sft.summary_extra_metrics
        self.reference_mode = reference_mode(cfg) if o.beta > 0 else None
        self.loads_reference_model = self.reference_mode == "model"
        self.updates_per_batch = o.iterations  # the trainer's optimizer steps per sampler batch
        self.reference_forwards = 0  # no-grad forwards per micro-batch this step (old and reference log-probs)
        self.rewards: RewardFunctions | None = None
        self.rollout: tuple[int, list[RolloutBatch]] | None = None  # (first step it serves, its micro-batches)
        self.step_metrics: dict = {}
        self.root_ran = False  # whether a forward has gone through the (sharded) root module
        self.load_reward_model = None  # from the TrainingContext (ftdist.score.load_reward_model)

    @staticmethod
    def check_config(cfg) -> None:
        """Before launch: every reward names something that exists (ConfigError otherwise)."""
        check_reward_specs(list(cfg.objective.rewards))

    def setup(self, ctx: TrainingContext) -> None:
        self.model, self.strategy, self.logits = ctx.model, ctx.strategy, ctx.logits
        self.train_examples = ctx.train_examples
        self.load_reward_model = ctx.load_reward_model
        # As TRL: with dropout the trained forward would not be the policy that sampled.
        disable_dropout(ctx.strategy.unwrap(ctx.model))
        policy = ctx.logits.bind(ctx.model).token_logps
        t = self.options.temperature
        if self.reference_mode == "model":
            if ctx.reference_model is None:
                raise RuntimeError("grpo: beta > 0 with reference=model needs the frozen reference model, and none was given")
            disable_dropout(ctx.reference_model)
            reference = ctx.logits.bind(ctx.reference_model).token_logps
            self.reference_logps = lambda rows: reference(rows, t)
        elif self.reference_mode == "adapter":
            peft_model = ctx.strategy.unwrap(ctx.model)
            self.reference_logps = lambda rows: without_adapters(peft_model, lambda b: policy(b, t), rows)

    def reward_functions(self, device: torch.device, load_reward_model=None) -> RewardFunctions:
        if self.rewards is None:  # a reward model loads once, on first use
            self.rewards = RewardFunctions(list(self.options.rewards), self.options.reward_weights, device,
                                           self.tokenizer, load_reward_model or self.load_reward_model)
        return self.rewards

    # --- data -----------------------------------------------------------------------------

    def prepare_data(self, tokenizer):
        """The run's rows as SFT reads them, but a row may be a prompt alone (data.responses=optional)."""
        data = dataclasses.replace(self.cfg.data, responses="optional")
        return prepare_data(data, tokenizer, self.cfg.seed)

    def make_items(self, examples: list[Example]) -> list[list[int]]:
        """One prompt per item: examples that have one (a chat row's earlier turns split per turn
        do not: they are counted in the data report's turn_examples, and said here)."""
        items = [[i] for i, e in enumerate(examples) if e.prompt_ids is not None]
        if len(items) < len(examples):
            log.info("grpo: %d of %d examples are earlier turns of conversations (no prompt to sample for); "
                     "set data.turns=last or whole to make every row one prompt", len(examples) - len(items), len(examples))
        return items

    def item_length(self, examples: list[Example], item: list[int]) -> int:
        return self.sft.item_length(examples, item)

    def collate(self, examples: list[Example], items: list[list[int]]) -> PromptBatch:
        return PromptBatch([item[0] for item in items])

    def padding_batch(self) -> Batch:
        return self.sft.padding_batch()

    # --- rollouts -------------------------------------------------------------------------

    def prepare_step(self, batches: list[PromptBatch], step: int) -> list[RolloutBatch]:
        """The step's prompt micro-batches -> their rollouts: sampled, scored, with advantages.
        Every rank calls it with the same number of micro-batches (sharded models generate
        together). With iterations > 1, steps after a generation reuse its rollouts."""
        first = step - step % self.options.iterations
        if self.rollout is not None and self.rollout[0] == first:
            self.reference_forwards = 0
            self.step_metrics["rollout_s"] = 0.0  # nothing generated: the metrics are the reused batch's
            return self.rollout[1]
        t0 = time.perf_counter()
        if self.strategy.shards_parameters and not self.root_ran:
            # FSDP2 initialises its state from the first forward, which must be the root's: a
            # PeftModel's generate enters below it (the first step of a resumed run generates first).
            with torch.no_grad():
                self.logits.bind(self.model)(self.padding_batch().to(self.strategy.device))
            self.root_ran = True
        model = self.strategy.unwrap(self.model)
        completions = [self.generate(model, b, step // self.options.iterations) for b in batches]
        prompts = [i for b in batches for i in b.indices]
        flat = [c for part in completions for c in part]
        rewards, per_reward = self.score(prompts, flat)
        advantages = self.advantages(rewards, per_reward, flat)
        g = self.options.group_size
        rollouts, at = [], 0
        for b, part in zip(batches, completions, strict=True):
            rollouts.append(self.rollout_batch(b.indices, part, advantages[at:at + len(b.indices) * g]))
            at += len(b.indices) * g
        self.reference_forwards = int(self.options.iterations > 1) + int(self.reference_mode is not None)
        rollouts = [self.with_logps(r) for r in rollouts]
        self.rollout = (first, rollouts)
        self.step_metrics["rollout_s"] = time.perf_counter() - t0
        return rollouts

    def generate(self, model, batch: PromptBatch, data_step: int) -> list[list[int]]:
        """group_size completions (token ids) per prompt, group by group."""
        examples = self.train_examples
        with self.logits.precision():  # sampled in the precision the loss computes in
            return sample_completions(model, self.tokenizer, [examples[i].prompt_ids for i in batch.indices], batch.indices,
                                      data_step, self.sampling, self.strategy.device, self.strategy.shards_parameters)

    def score(self, prompts: list[int], completions: list[list[int]]) -> tuple[torch.Tensor, dict[str, list[float]]]:
        """Each completion's weighted reward (and each reward function's values), in order."""
        owners = [i for i in prompts for _ in range(self.options.group_size)]
        texts = [self.tokenizer.decode(c, skip_special_tokens=True) for c in completions]
        total, per_reward = self.reward_values(self.train_examples, owners, completions, texts, self.strategy.device)
        return torch.tensor(total, dtype=torch.float64), per_reward

    def reward_values(self, examples: list[Example], owners: list[int], completions: list[list[int]], texts: list[str],
                      device: torch.device, load_reward_model=None) -> tuple[list[float], dict[str, list[float]]]:
        """The rewards of completions (token ids, and their text): completions[k] answers the
        prompt of examples[owners[k]], whose reference it is compared with. Reward functions get
        each prompt decoded (special tokens dropped); a reward model with the policy's tokenizer
        gets the prompt and completion ids as they are."""
        prompts = {i: self.tokenizer.decode(examples[i].prompt_ids, skip_special_tokens=True) for i in set(owners)}
        sequences = [examples[i].prompt_ids + c for i, c in zip(owners, completions, strict=True)]
        return self.reward_functions(device, load_reward_model).score(
            [prompts[i] for i in owners], texts, [examples[i].reference for i in owners], sequences)

    def advantages(self, rewards: torch.Tensor, per_reward: dict[str, list[float]], completions) -> torch.Tensor:
        """Advantages of this rank's completions; the step's rollout metrics, over all ranks."""
        g = self.options.group_size
        groups = rewards.view(-1, g)
        stds = group_std(groups)
        lengths = [len(c) for c in completions]
        clipped = sum(n >= self.options.max_new_tokens for n in lengths)
        totals = self.strategy.all_reduce_sum([
            len(lengths), float(rewards.sum()), float((rewards ** 2).sum()), groups.size(0), float((stds < 1e-8).sum()),
            float(stds.sum()), sum(lengths), clipped, *(sum(v) for v in per_reward.values()),
        ])
        n, s, s2, n_groups, flat_groups, std_sum, length_sum, n_clipped, *reward_sums = totals
        (longest,) = self.strategy.all_reduce_max([max(lengths, default=0)])
        batch_var = (s2 - s * s / n) / max(n - 1, 1)
        self.step_metrics = {
            "reward": s / n, "reward_std": std_sum / n_groups, "frac_reward_zero_std": flat_groups / n_groups,
            **{f"rewards/{name}/mean": v / n for name, v in zip(per_reward, reward_sums, strict=True)},
            "completion_length": length_sum / n, "completion_length_max": int(longest),
            "completions_clipped_ratio": n_clipped / n,
        }
        return group_advantages(rewards, g, self.options.scale_rewards, math.sqrt(max(batch_var, 0.0))).float()

    def rollout_batch(self, indices: list[int], completions: list[list[int]], advantages: torch.Tensor) -> RolloutBatch:
        g = self.options.group_size
        examples = []
        for row, completion in enumerate(completions):
            prompt = self.train_examples[indices[row // g]].prompt_ids
            examples.append(Example(prompt + completion, [IGNORE_INDEX] * len(prompt) + completion))
        rows = collate(examples, self.tokenizer.pad_token_id)
        return RolloutBatch(rows, advantages, sum(len(c) for c in completions))

    @torch.no_grad()
    def with_logps(self, rollout: RolloutBatch) -> RolloutBatch:
        """The sampling policy's log-probs (iterations > 1) and the reference's (beta > 0)."""
        device = self.strategy.device
        rows = rollout.rows.to(device)
        old = ref = None
        if self.options.iterations > 1:
            old = self.logits.bind(self.model).token_logps(rows, self.options.temperature)
        if self.reference_mode is not None:
            ref = self.reference_logps(rows)
        return replace(rollout, old_logps=old, ref_logps=ref)

    # --- checkpoint ---------------------------------------------------------------------------

    def state_dict(self) -> dict | None:
        """What a resumed run cannot regenerate: with iterations > 1, the current generation
        batch's rollouts (the policy that sampled them is gone by the next step). Per rank."""
        if self.rollout is None or self.options.iterations == 1:
            return None
        first, batches = self.rollout
        return {"first_step": first, "world_size": self.strategy.world_size, "batches": [
            {"input_ids": b.rows.input_ids.cpu(), "attention_mask": b.rows.attention_mask.cpu(),
             "labels": b.rows.labels.cpu(), "advantages": b.advantages.cpu(), "completion_tokens": b.completion_tokens,
             "old_logps": b.old_logps.cpu(), "ref_logps": None if b.ref_logps is None else b.ref_logps.cpu()}
            for b in batches], "step_metrics": self.step_metrics}

    def load_state_dict(self, state: dict, step: int) -> None:
        if step % self.options.iterations == 0 or state["first_step"] != step - step % self.options.iterations:
            return  # the next step generates anew
        if state["world_size"] != self.strategy.world_size:
            raise ConfigError(
                f"resume at step {step}: inside a generation batch (objective.iterations={self.options.iterations}) "
                f"saved by {state['world_size']} ranks, resumed on {self.strategy.world_size}; its rollouts are per rank "
                "(resume on as many ranks, or from a checkpoint at a multiple of objective.iterations)")
        device = self.strategy.device
        batches = [RolloutBatch(Batch.from_tensors(b["input_ids"], b["attention_mask"], b["labels"]), b["advantages"],
                                b["completion_tokens"], b["old_logps"], b["ref_logps"]).to(device) for b in state["batches"]]
        self.rollout = (state["first_step"], batches)
        self.step_metrics = dict(state["step_metrics"])

    # --- loss -----------------------------------------------------------------------------

    def loss_count(self, batch: RolloutBatch) -> int:
        return batch.completion_tokens if self.options.loss_type == "dapo" else batch.num_sequences

    def loss(self, forward: Forward, batch: RolloutBatch) -> ObjectiveLoss:
        o = self.options
        rows = batch.rows
        mask = completion_mask(rows)
        entropy = torch.zeros(rows.labels.shape, dtype=torch.float32, device=rows.labels.device)
        logps = forward.token_logps(rows, o.temperature, entropy)
        old = logps.detach() if batch.old_logps is None else batch.old_logps
        per_token, kl, clipped = token_losses(logps, old, batch.advantages, batch.ref_logps, o.epsilon,
                                              self.epsilon_high, o.beta)
        m = mask.float()
        return ObjectiveLoss(aggregate(per_token, mask, o.loss_type, o.max_new_tokens), sums={
            "completion_tokens": m.sum(), "kl_sum": (kl.detach() * m).sum(), "clipped_tokens": (clipped * m).sum(),
            "entropy_sum": (entropy * m).sum(),
        })

    def train_metrics(self, count: float, sums: dict[str, float]) -> dict:
        tokens = max(sums["completion_tokens"], 1.0)
        return {
            **self.step_metrics,
            "completion_tokens": int(sums["completion_tokens"]),
            "kl": sums["kl_sum"] / tokens,
            "clip_ratio": sums["clipped_tokens"] / tokens,
            "entropy": sums["entropy_sum"] / tokens,
        }

    # --- evaluation -----------------------------------------------------------------------

    def evaluate(self, ctx: EvalContext, with_generation: bool) -> dict:
        """eval_loss: the NLL of the held-out reference responses (how far the policy moved from
        them); with generation, the generation metrics and the rewards of greedy completions."""
        loss_sum, count, _ = loss_pass(self.sft, ctx)
        record = {"eval_loss": loss_sum / max(count, 1.0), "eval_label_tokens": int(count)}
        gen = ctx.cfg.eval.generation
        if not (with_generation and gen.samples > 0):
            return record
        means, total, records = generation_metrics(
            ctx.model, ctx.tokenizer, ctx.examples, gen, ctx.strategy, ctx.record_path("generations"),
            reasoning_close=ctx.cfg.data.reasoning_tags[1],
        )
        if total:
            record.update(means)
            record["generation_n"] = total
            record.update(ctx.strategy.broadcast_object(self.heldout_rewards(ctx, records) if ctx.strategy.is_main else None))
        return record

    def heldout_rewards(self, ctx: EvalContext, records: list[dict]) -> dict:
        """eval_reward and eval_rewards/<name>/mean of the greedy completions (on rank 0, which holds the records)."""
        # The records keep text: each response is encoded again, closed by eos as it was generated.
        eos = [self.tokenizer.eos_token_id] if self.tokenizer.eos_token_id is not None else []
        ids = [self.tokenizer(r["response"], add_special_tokens=False)["input_ids"] + eos for r in records]
        total, per_reward = self.reward_values(ctx.examples, [r["index"] for r in records], ids,
                                               [r["response"] for r in records], ctx.strategy.device,
                                               ctx.load_reward_model)
        n = len(records)
        return {"eval_reward": sum(total) / n, **{f"eval_rewards/{k}/mean": sum(v) / n for k, v in per_reward.items()}}

    def describe_eval(self, record: dict) -> str:
        reward = f", reward {record['eval_reward']:.3f}" if "eval_reward" in record else ""
        return f"eval_loss {record['eval_loss']:.4f}{reward}{describe_generation(record, self.cfg.eval.generation.metrics)}"
