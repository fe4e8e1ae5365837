"""Shared fixtures: the tiny local model/tokenizer (built once per machine, cached on disk)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# The suite is a CPU suite (gloo, fp32, exact comparisons) even on a machine with GPUs; tests
# that need CUDA are marked `gpu` and run only with FTDIST_TEST_GPU=1.
if os.environ.get("FTDIST_TEST_GPU") != "1":
    os.environ["CUDA_VISIBLE_DEVICES"] = ""

REPO = Path(__file__).resolve().parents[1]
SHARED_DATASETS = REPO.parent / "shared" / "datasets"


@pytest.fixture(scope="session")
def tiny_model_dir() -> str:
    from ftdist.config import TinyModelSpec
    from ftdist.model.tiny import ensure_tiny_model

    return ensure_tiny_model(TinyModelSpec())


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_model_dir):
    """A byte-level BPE tokenizer with a chat template."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture()
def plain_tokenizer(tiny_model_dir):
    """The same tokenizer without a chat template (exercises the plain instruction template)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    tok.chat_template = None
    return tok


def shared_dataset(relative: str) -> Path:
    path = SHARED_DATASETS / relative
    if not path.exists():
        pytest.skip(f"{path} is absent (../shared/datasets is not beside the checkout)")
    return path


def pytest_collection_modifyitems(config, items):
    if os.environ.get("FTDIST_TEST_GPU") == "1":
        return
    skip = pytest.mark.skip(reason="CUDA test: run with FTDIST_TEST_GPU=1 on a GPU machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
