"""Shared fixtures: the tiny local model/tokenizer (built once per machine, cached on disk)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
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
    """A file of ../shared/datasets. CI always lays that folder beside the clone, so there its
    absence is a failure; a developer's checkout without it skips the test."""
    path = SHARED_DATASETS / relative
    if not path.exists():
        message = f"{path} is absent (../shared/datasets is not beside the checkout)"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    return path


def nvidia_smi_problem() -> str | None:
    """Why the GPU tests cannot run here, or None when nvidia-smi lists a GPU."""
    if shutil.which("nvidia-smi") is None:
        return "nvidia-smi not found"
    try:
        proc = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"nvidia-smi failed: {e}"
    if proc.returncode != 0 or "GPU" not in proc.stdout:
        return f"nvidia-smi -L exited {proc.returncode} listing no GPU"
    return None


# The CPU suite hides CUDA from this process (above), so the `gpu` tests cannot run in it: they
# are taken out of this session and, where nvidia-smi works, run in a second pytest with CUDA
# visible once the CPU suite is done. Elsewhere one line says that they did not run.
_deferred_gpu_tests: list[str] = []


def pytest_collection_modifyitems(config, items):
    if os.environ.get("FTDIST_TEST_GPU") == "1":
        return
    gpu = [item for item in items if "gpu" in item.keywords]
    if gpu:
        items[:] = [item for item in items if "gpu" not in item.keywords]
        config.hook.pytest_deselected(items=gpu)
        _deferred_gpu_tests.extend(item.nodeid for item in gpu)


def pytest_sessionfinish(session, exitstatus):
    if not _deferred_gpu_tests or nvidia_smi_problem() is not None:
        return
    env = {**os.environ, "FTDIST_TEST_GPU": "1"}
    env.pop("CUDA_VISIBLE_DEVICES", None)  # set empty above for this process only
    print(f"\nftdist: running the {len(_deferred_gpu_tests)} gpu tests with CUDA visible", flush=True)
    gpu_run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *_deferred_gpu_tests],
        cwd=REPO, env=env, check=False,
    )
    if gpu_run.returncode != 0 and session.exitstatus == 0:
        session.exitstatus = gpu_run.returncode


def pytest_terminal_summary(terminalreporter):
    problem = nvidia_smi_problem() if _deferred_gpu_tests else None
    if problem is not None:
        terminalreporter.write_line(
            f"ftdist: the {len(_deferred_gpu_tests)} gpu tests did not run ({problem}); "
            "they run where nvidia-smi lists a GPU, or with FTDIST_TEST_GPU=1"
        )
