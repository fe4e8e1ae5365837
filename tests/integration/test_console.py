"""What a person sees on the console: a readable run, each library warning once, and every
genuine problem still shown, whichever rank meets it.

Before ftdist.console, the 20-step ZeRO-3 run below printed 175 lines here: torch's two
deprecation FutureWarnings (two lines each) on every step from both ranks, and DeepSpeed's
'Setting accelerator to CPU' from each rank.
"""

from __future__ import annotations

import collections
import re
import subprocess
import sys
import textwrap

from helpers import FAST, REPO, run_env, run_train

# A line a person reads past: ftdist's ~8 INFO lines, the library warnings that remain (once
# each) and the save's progress bar. 175 before; 11 measured after.
MAX_LINES = 25
WARNING_LINE = re.compile(r" WARNING (?:\[rank \d+\] )?py\.warnings: (\w+: .*) \(\S+:\d+\)$")


def console_lines(proc) -> list[str]:
    return (proc.stdout + proc.stderr).splitlines()


def warning_texts(lines: list[str]) -> list[str]:
    return [m.group(1) for line in lines if (m := WARNING_LINE.search(line))]


def test_zero3_run_on_two_ranks_prints_each_library_warning_once(tmp_path):
    out = tmp_path / "run"
    proc = run_train([*FAST, "strategy=zero3", "train.max_steps=20", f"output_dir={out}"], nproc=2)
    lines = console_lines(proc)
    assert len(lines) <= MAX_LINES, "\n".join(lines)
    texts = warning_texts(lines)
    assert texts, "the run's torch FutureWarnings no longer show at all: check the test still sees them"
    assert [t for t, n in collections.Counter(texts).items() if n > 1] == []
    assert not any("Setting accelerator" in line for line in lines)
    assert sum("step 20: eval_loss" in line for line in lines) == 1  # ftdist's own lines stay
    # Rank 0 shows a warning both ranks meet, so it reaches train.log too.
    log = (out / "train.log").read_text()
    assert all(t in log for t in texts)


def test_single_process_checkpoints_and_final_save_do_not_repeat_library_lines(tmp_path):
    out = tmp_path / "run"
    proc = run_train([*FAST, "train.max_steps=4", "checkpoint.every_steps=1", f"output_dir={out}"])
    lines = console_lines(proc)
    assert sum("checkpoint saved" in line for line in lines) == 4
    assert sum("torch.distributed is disabled" in line for line in lines) <= 1
    assert sum("Setting accelerator" in line for line in lines) <= 1
    assert not any("gemm_4bit_forward" in line for line in lines)
    assert len(lines) <= MAX_LINES, "\n".join(lines)


WORKER = """
import logging, os, sys, warnings
from pathlib import Path

from ftdist.config import StrategyConfig
from ftdist.parallel import build_strategy
from ftdist.train import setup_logging

strategy = build_strategy(StrategyConfig(name="ddp"))
setup_logging(Path(sys.argv[1]), strategy.is_main)
for _ in range(3):
    warnings.warn("both ranks meet this", FutureWarning)
    with warnings.catch_warnings():  # as subprocess does: Python forgets what it has shown
        pass
if strategy.rank == 1:
    warnings.warn("only rank 1 meets this")
    logging.getLogger("ftdist").warning("an ftdist warning on rank 1")
    logging.getLogger("somelib").error("a library error on rank 1")
    logging.getLogger("somelib").error("a library error on rank 1")
strategy.barrier()
strategy.shutdown()
"""


def test_a_warning_only_rank_1_meets_still_shows_once(tmp_path):
    """Once per job must not mean rank 0 only: what rank 1 alone meets is shown, by rank 1, once;
    ftdist's own warnings and every error show on any rank, never de-duplicated."""
    worker = tmp_path / "console_worker.py"
    worker.write_text(textwrap.dedent(WORKER))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(worker), str(tmp_path)]
    proc = subprocess.run(cmd, cwd=REPO, env=run_env(), capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-4000:]
    lines = console_lines(proc)
    assert warning_texts(lines).count("FutureWarning: both ranks meet this") == 1
    rank1_only = [line for line in lines if "only rank 1 meets this" in line]
    assert len(rank1_only) == 1 and "[rank 1]" in rank1_only[0] and "UserWarning" in rank1_only[0]
    assert sum("[rank 1] ftdist: an ftdist warning on rank 1" in line for line in lines) == 1
    assert sum("ERROR [rank 1] somelib: a library error on rank 1" in line for line in lines) == 2
