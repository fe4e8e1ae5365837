"""What a run prints: ftdist's own lines, and each library warning once per job.

Left alone, libraries bury the progress of a run. torch's deprecation FutureWarnings came back
every step (Python shows a warning once per code location, but any `warnings.catch_warnings()`
block, such as the one in `subprocess`, clears that memory), every rank printed the same
lines, and loggers with a handler of their own (huggingface_hub, datasets) printed each line
twice: their handler, then root's. `install` sets this policy on the handlers of a run:

- Python warnings go through logging (logger `py.warnings`), one line each, so they reach
  train.log too.
- A library's log record or a Python warning is shown once per job: by rank 0 where rank 0
  meets it too (other ranks wait briefly for rank 0's claim in the process group's store), else
  by the first rank that meets it. So a warning that only rank 1 meets still shows, once.
- ERRORs, and every record of ftdist's own loggers, always show, on every rank that logs them.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import sys
import warnings
from datetime import timedelta

# Loggers that libraries give a console handler of their own: their records are re-routed to
# root's handlers, so each prints once, formatted like ftdist's, and lands in train.log.
LIBRARY_ROOT_LOGGERS = ("transformers", "huggingface_hub", "datasets", "DeepSpeed")
# Its one warning, at import, says the optional `kernels` package's CPU kernel for 4-bit
# *inference* (gemv) is missing; ftdist trains through dequantize + matmul and never calls it.
# Errors from it still show.
QUIET_LOGGERS = {"bitsandbytes.backends.cpu.ops": logging.ERROR}
# How long a rank other than 0 waits for rank 0 to claim a message before claiming it itself.
# Ranks run the same code, so rank 0 normally meets the same warning within milliseconds.
RANK0_GRACE = timedelta(seconds=2)
# torch.distributed.checkpoint says it saves from one process when no process group exists: in a
# single-process run that is exactly what ftdist asks of it. Under torchrun it is not ignored.
SINGLE_PROCESS_DCP = "torch.distributed is disabled, unavailable or uninitialized"
ONCE_KEY = "ftdist_once_key"  # LogRecord attribute: what makes two records "the same message"


def install(handlers: list[logging.Handler], is_main: bool) -> None:
    """The console policy for this process, on the root logger's `handlers`."""
    once = OncePerJob(job_store(), is_main)
    for handler in handlers:
        handler.addFilter(once)
    route_warnings_to_logging()
    adopt_library_loggers()
    quiet_library_hints()
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        warnings.filterwarnings("ignore", message=SINGLE_PROCESS_DCP, category=UserWarning)


def quiet_library_hints() -> None:
    """Loggers whose warnings say nothing about an ftdist run (see QUIET_LOGGERS); also for
    commands without a run (`ftdist.plan`, dry runs) that build a model and so import peft,
    which imports bitsandbytes."""
    for name, level in QUIET_LOGGERS.items():
        logging.getLogger(name).setLevel(level)


def pin_deepspeed_accelerator() -> None:
    """Where torch sees no GPU, ftdist runs on CPU, and says so in its run line. DeepSpeed would
    detect the same and warn 'Setting accelerator to CPU' at each import, on every rank (its own
    handler, on stdout): telling it the answer skips the detection. Must run before DeepSpeed is
    first imported (transformers imports it when saving a model)."""
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")


def job_store():
    """The process group's key-value store, shared by every rank of the job (None without one)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return None
    return dist.PrefixStore("ftdist/console", dist.distributed_c10d._get_default_store())


class OncePerJob(logging.Filter):
    """Passes a library record the first time the job meets its message (see the module doc).

    One instance filters every handler: the first handler to see a record decides, and the
    decision rides on the record, so the console and train.log agree.
    """

    def __init__(self, store, is_main: bool):
        super().__init__()
        self.store = store
        self.is_main = is_main
        self.seen: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.ERROR or record.name.partition(".")[0] == "ftdist":
            return True
        decided = getattr(record, "_ftdist_shown", None)
        if decided is None:
            decided = self.first_in_job(getattr(record, ONCE_KEY, f"{record.name}: {record.getMessage()}"))
            record._ftdist_shown = decided
        return decided

    def first_in_job(self, text: str) -> bool:
        key = hashlib.sha1(text.encode()).hexdigest()
        if key in self.seen:
            return False
        self.seen.add(key)
        if self.store is None:
            return True
        if not self.is_main and self.claimed_within_grace(key):
            return False
        return self.store.add(key, 1) == 1  # 1: no rank had claimed it

    def claimed_within_grace(self, key: str) -> bool:
        try:
            self.store.wait([key], RANK0_GRACE)
        except RuntimeError:  # DistStoreError: nobody claimed it in time
            return False
        return True


def route_warnings_to_logging() -> None:
    """Python warnings become one-line records of the `py.warnings` logger (as
    logging.captureWarnings does, but with the warning's text as the key for OncePerJob, so the
    same deprecation from another call site or another step is the same message)."""
    warnings.showwarning = show_warning


def show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    text = f"{category.__name__}: {message}"
    logging.getLogger("py.warnings").warning("%s (%s:%d)", text, filename, lineno, extra={ONCE_KEY: text})


def adopt_library_loggers() -> None:
    """Root's handlers print the libraries' records (once, filtered); their own handlers go."""
    for name in LIBRARY_ROOT_LOGGERS:
        logger = logging.getLogger(name)
        for handler in [h for h in logger.handlers if isinstance(h, logging.StreamHandler)]:
            logger.removeHandler(handler)
        logger.propagate = True


class OneLineParser(argparse.ArgumentParser):
    """argparse for ftdist's command-line tools: a usage error is one line naming the tool
    (argparse prints the whole usage first), exit code 2 like every bad input."""

    def __init__(self, *args, tool: str, **kwargs):
        super().__init__(*args, **kwargs)
        self.tool = tool

    def error(self, message: str):
        from ftdist.constants import EXIT_BAD_INPUT

        print(f"{self.tool}: usage: {message} ({self.prog} --help)", file=sys.stderr)
        sys.exit(EXIT_BAD_INPUT)
