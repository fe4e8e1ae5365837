"""Surviving the cluster: preemption signals, non-finite steps, and test fault injection.

A scheduler preempts a job with SIGTERM (Slurm, Kubernetes) or a chosen signal ahead of time
(Slurm's --signal=USR1@60). Only the signalled ranks see it, so the flag is all-reduced every
step and all ranks stop at the same step, checkpoint together and exit with EXIT_PREEMPTED,
which the Slurm layer requeues.
"""

from __future__ import annotations

import logging
import os
import signal

log = logging.getLogger("ftdist")

PREEMPTED_MARKER = "preempted.json"  # in output_dir while a preempted run awaits its resume
PREEMPTION_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class Preempted(Exception):
    """Raised after the preemption checkpoint is written; the entry point exits EXIT_PREEMPTED."""


class NonFiniteError(RuntimeError):
    """A NaN or Inf loss or gradient norm with train.on_nonfinite=raise."""


class PreemptionFlag:
    """Set by SIGTERM/SIGUSR1; the previous handlers come back on restore()."""

    def __init__(self):
        self.requested = False
        self._previous: dict = {}

    def _handle(self, signum, frame):
        if not self.requested:
            log.warning("received %s: checkpointing at the end of this step, then exiting", signal.Signals(signum).name)
        self.requested = True

    def install(self) -> PreemptionFlag:
        for sig in PREEMPTION_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()


# --- fault injection (tests) -----------------------------------------------------------------
# FTDIST_INJECT_FAULT="KIND:STEP:RANK" makes rank RANK misbehave at optimizer step STEP (1-based):
#   nan      its loss for that step becomes NaN
#   sigterm  it sends itself SIGTERM after that step (a preemption notice to one rank)
#   crash    it dies at that step, in the first attempt only (TORCHELASTIC_RESTART_COUNT 0)
#   stall    (STEP 0) it never checks in at the preflight after joining the process group
# The tests use it to exercise the real handling code under torchrun; it is inert when unset.


def injected_fault(step: int, rank: int) -> str | None:
    spec = os.environ.get("FTDIST_INJECT_FAULT")
    if not spec:
        return None
    kind, at_step, at_rank = spec.split(":")
    if int(at_step) != step or int(at_rank) != rank:
        return None
    if kind == "crash" and os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") != "0":
        return None
    return kind
