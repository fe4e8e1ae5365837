"""On CUDA: bf16 autocast trains with the losses of fp32 within bf16 tolerance, and DDP picks
nccl. Run with FTDIST_TEST_GPU=1 on a machine with a GPU."""

from __future__ import annotations

import pytest
import torch
from helpers import FAST, read_metrics, run_train

pytestmark = pytest.mark.gpu


@pytest.fixture(autouse=True)
def need_cuda():
    if not torch.cuda.is_available():
        pytest.fail("FTDIST_TEST_GPU=1 but no CUDA device is visible")


def test_bf16_autocast_matches_fp32_on_cuda(tmp_path):
    common = [*FAST, "train.max_steps=20", "train.micro_batch_size=8"]
    run_train([*common, "train.mixed_precision=none", f"output_dir={tmp_path}/fp32"])
    run_train([*common, "train.mixed_precision=auto", f"output_dir={tmp_path}/bf16"])
    fp32, _ = read_metrics(tmp_path / "fp32")
    bf16, _ = read_metrics(tmp_path / "bf16")
    for a, b in zip(fp32, bf16, strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=3e-2), (a["step"], a["loss"], b["loss"])
    assert all(r["peak_mem_gb"] > 0 and 0 < r["mfu"] < 1 for r in bf16)


def test_ddp_uses_nccl_on_cuda(tmp_path):
    run_train([*FAST, "train.max_steps=3", "strategy=ddp", f"output_dir={tmp_path}"], nproc=1)
    assert "nccl" in (tmp_path / "train.log").read_text()
