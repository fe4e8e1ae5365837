"""peak_mem_gb on CPU is the process's peak resident memory in GB (1e9 bytes, as on CUDA), read
independently here from the kernel's own figure (VmHWM in /proc/self/status, in KiB)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ftdist.metrics import peak_memory_gb


def vm_hwm_gb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024 / 1e9
    pytest.fail("/proc/self/status has no VmHWM line")


def test_cpu_peak_memory_is_the_peak_rss_in_gb():
    block = torch.ones(64 * 2**20)  # 256 MiB touched, so the peak is at least that
    reported = peak_memory_gb(torch.device("cpu"))
    assert reported == pytest.approx(vm_hwm_gb(), rel=0.01)
    assert reported >= block.numel() * 4 / 1e9
