"""DPO (Rafailov et al. 2023) and its loss family against a reference model: sigmoid (DPO),
ipo (Azar et al. 2023), hinge (SLiC, Zhao et al. 2023), robust (Chowdhury et al. 2024), with an
optional NLL term on the chosen response (RPO, Pang et al. 2024). Formulas: README.

Where reference log-probabilities come from is `objective.reference` (reference.py): the policy
with its adapters disabled, a frozen copy sharded like the policy, or a cache computed before
the first step. The three give the same numbers; they differ in memory and time.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

from ftdist.constants import IGNORE_INDEX
from ftdist.objectives.base import TrainingContext
from ftdist.objectives.preference import (
    PairBatch,
    PreferenceObjective,
    disable_dropout,
    log_sigmoid_smoothed,
    mean_token_logps,
    sequence_logps,
)
from ftdist.objectives.reference import reference_mode, use_precomputed, without_adapters

log = logging.getLogger(__name__)


class DPOObjective(PreferenceObjective):
    name = "dpo"

    def __init__(self, cfg, tokenizer):
        super().__init__(cfg, tokenizer)
        self.mode = reference_mode(cfg)
        # A second model is loaded for reference=model, and for precomputed from another checkpoint.
        self.loads_reference_model = self.mode == "model" or (
            self.mode == "precomputed" and cfg.objective.reference_path is not None)
        self.reference_forward = None  # batch -> the reference's token log-probs; None once all are precomputed
        self.reference_forwards = 0 if self.mode == "precomputed" else 1

    def setup(self, ctx: TrainingContext) -> None:
        super().setup(ctx)
        policy = ctx.logits.bind(ctx.model).token_logps
        if self.loads_reference_model and ctx.reference_model is None:
            # Never fall back to the policy: its own log-ratios are 0 forever, a loss stuck at ln 2.
            raise RuntimeError(f"dpo: reference={self.mode} needs the frozen reference model, and none was given")
        if ctx.reference_model is not None:
            disable_dropout(ctx.reference_model)
            self.reference_forward = ctx.logits.bind(ctx.reference_model).token_logps
        elif self.cfg.peft.method != "none":  # adapter, or precomputed from the adapter-disabled base
            peft_model = ctx.strategy.unwrap(ctx.model)
            self.reference_forward = lambda batch: without_adapters(peft_model, policy, batch)
        else:  # precomputed from the starting weights: the policy itself, before its first step
            self.reference_forward = policy
        if self.mode == "precomputed":
            use_precomputed(self, ctx)
            self.reference_forward = None  # every pair carries its reference log-probs now
        if ctx.strategy.is_main:
            log.info("dpo: reference log-probs from %s", self.describe_reference())

    def describe_reference(self) -> str:
        o = self.cfg.objective
        return {
            "adapter": "the policy with its adapters disabled (its base model)",
            "model": f"a frozen copy of {o.reference_path or 'the starting weights'}, placed like the policy",
            "precomputed": f"a pass over the data before training ({o.reference_path or 'the starting weights'}), cached",
        }[self.mode]

    @torch.no_grad()
    def reference_logps(self, batch: PairBatch) -> torch.Tensor:
        if batch.reference_logps is not None:
            return batch.reference_logps
        if self.reference_forward is None:
            if not (batch.labels != IGNORE_INDEX).any():  # a padding batch (sharded evaluation): nothing to refer to
                return torch.zeros(2 * batch.num_pairs, device=batch.labels.device)
            raise RuntimeError("dpo: a batch without precomputed reference log-probs and no reference forward")
        return sequence_logps(self.reference_forward(batch), batch)

    def pair_losses(self, batch, logps, reference):
        o = self.options
        ratios = logps - reference
        chosen, rejected = ratios[0::2], ratios[1::2]
        delta = chosen - rejected
        if o.loss_type == "sigmoid":
            losses = log_sigmoid_smoothed(o.beta * delta, o.label_smoothing)
        elif o.loss_type == "robust":
            losses = (-(1 - o.label_smoothing) * F.logsigmoid(o.beta * delta)
                      + o.label_smoothing * F.logsigmoid(-o.beta * delta)) / (1 - 2 * o.label_smoothing)
        elif o.loss_type == "hinge":
            losses = torch.relu(1 - o.beta * delta)
        elif o.loss_type == "ipo":
            # Per-token log-ratios, as the IPO authors' reported runs and TRL use them.
            mean = mean_token_logps(ratios, batch)
            losses = (mean[0::2] - mean[1::2] - 1 / (2 * o.beta)) ** 2
        else:
            raise ValueError(f"objective.loss_type={o.loss_type!r}")
        if o.sft_weight:
            losses = losses - o.sft_weight * mean_token_logps(logps, batch)[0::2]
        return losses, o.beta * chosen, o.beta * rejected
