"""`fsize_limited_rank.py RANK BYTES -m ftdist.train ...`, as torchrun's worker script: on rank
RANK no file may grow past BYTES, then the rest of the arguments run under python (exec).

RLIMIT_FSIZE with SIGXFSZ ignored makes a write past the limit fail with EFBIG, through the
same paths as a full disk's ENOSPC (an OSError from write(), or torch's short-write
RuntimeError), and on that one rank only: the case where the others wrote their part and wait.
Both the limit and the ignored signal survive exec.
"""

import os
import resource
import signal
import sys

rank, limit = sys.argv[1], int(sys.argv[2])
if os.environ.get("RANK") == rank:
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
os.execv(sys.executable, [sys.executable, *sys.argv[3:]])
