"""Values more than one module must agree on, defined once.

Exit codes are the public contract of every ftdist command (README: "Exit codes"); wrappers
such as slurm/run_step.sh test for them by number.
"""

from __future__ import annotations

import torch

# Labels at this value carry no loss: torch's cross_entropy default, and transformers'.
IGNORE_INDEX = -100

# model.dtype, export --dtype and the planner's sizing name parameter dtypes so.
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}

GIB = 2**30  # memory is reported in GiB everywhere (a GPU sold as 80 GB holds 80 GiB)

EXIT_MERGE_MISMATCH = 1  # export: the merged model's logits differ from the adapter's
EXIT_BAD_INPUT = 2  # a config, data or file the user must fix; the message names it
EXIT_NONFINITE = 3  # a NaN/Inf loss or gradient with train.on_nonfinite=raise
EXIT_PREFLIGHT = 4  # some ranks never joined the process group
# The tuned model's perplexity on eval.reference_data rose more than eval.max_forgetting
# (ftdist.eval, and ftdist.train with eval.at_end=true): a gate a pipeline can test for.
EXIT_FORGETTING = 5
# A checkpoint could not be written (disk full, quota, I/O error): not requeued as 75 would be,
# since the next attempt would fail the same way until someone frees space.
EXIT_CHECKPOINT_WRITE = 6
EXIT_PREEMPTED = 75  # EX_TEMPFAIL: "try again later"; distinct from errors (1) and bad input (2)
