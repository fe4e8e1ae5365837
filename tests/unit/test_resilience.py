"""Preemption signals set the flag the trainer all-reduces each step, and the attention backend
choice on CPU (README: "Preemption" and the `model.attn_implementation` table)."""

from __future__ import annotations

import os
import signal
import time

import pytest
import torch

from ftdist.config import ConfigError
from ftdist.model.attention import DOCUMENT_SDPA, resolve_attn_implementation
from ftdist.resilience import PreemptionFlag, injected_fault


def wait_for(flag: PreemptionFlag) -> bool:
    # Python runs signal handlers between bytecodes of the main thread: give it a few.
    for _ in range(100):
        if flag.requested:
            return True
        time.sleep(0.01)
    return flag.requested


@pytest.mark.parametrize("sig", [signal.SIGUSR1, signal.SIGTERM])
def test_preemption_signal_sets_the_flag_and_restore_brings_back_the_previous_handler(sig):
    previous = signal.getsignal(sig)
    flag = PreemptionFlag().install()
    try:
        assert not flag.requested
        os.kill(os.getpid(), sig)
        assert wait_for(flag)
        os.kill(os.getpid(), sig)  # a second notice changes nothing (and does not kill us)
        assert flag.requested
    finally:
        flag.restore()
    assert signal.getsignal(sig) == previous


def test_injected_fault_matches_only_its_step_and_rank(monkeypatch):
    monkeypatch.delenv("FTDIST_INJECT_FAULT", raising=False)
    assert injected_fault(3, 1) is None
    monkeypatch.setenv("FTDIST_INJECT_FAULT", "nan:3:1")
    assert injected_fault(3, 1) == "nan"
    assert injected_fault(3, 0) is None and injected_fault(2, 1) is None


def test_attn_auto_is_document_sdpa_on_cpu():
    """auto without flash-attn and CUDA is sdpa: ftdist's per-document sdpa, registered with
    transformers under its own name so from_pretrained can select it."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    name = resolve_attn_implementation("auto", torch.device("cpu"))
    assert name == DOCUMENT_SDPA == resolve_attn_implementation("sdpa", torch.device("cpu"))
    assert name in ALL_ATTENTION_FUNCTIONS


def test_attn_eager_is_kept_on_cpu():
    assert resolve_attn_implementation("eager", torch.device("cpu")) == "eager"


@pytest.mark.parametrize(
    "requested,names",
    [("flash_attention_2", ["flash_attention_2", "flash-attn", "CUDA"]), ("flex_attention", ["flex_attention", "CPU"])],
)
def test_attn_backends_that_cannot_run_on_cpu_are_config_errors(requested, names):
    with pytest.raises(ConfigError) as err:
        resolve_attn_implementation(requested, torch.device("cpu"))
    message = str(err.value)
    assert all(n in message for n in names), message
    assert "model.attn_implementation" in message
