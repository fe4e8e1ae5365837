#!/usr/bin/env bash
# Multi-node training without Slurm: run this same command on every node.
#
#   HEAD_ADDR=node0.cluster NNODES=2 GPUS_PER_NODE=8 launch/multinode.sh +experiment=llama8b_full_zero3 data.path=...
#
# torchrun's c10d rendezvous on HEAD_ADDR:PORT assigns node ranks (no NODE_RANK needed) and every
# node must be able to reach that address. Environment:
#   HEAD_ADDR      address of one node every node can reach (required)
#   NNODES         number of nodes (required)
#   GPUS_PER_NODE  processes per node (default: the visible GPU count, or 1 on CPU)
#   PORT           rendezvous port on HEAD_ADDR (default 29400)
#   RUN_ID         rendezvous id shared by the nodes of one job (default ftdist)
#   PYTHON         interpreter with torch and ftdist installed (default: this checkout's
#                  .venv/bin/python where it exists, as the README's install makes it, else python3)
set -euo pipefail
: "${HEAD_ADDR:?set HEAD_ADDR to an address of one node that every node can reach}"
: "${NNODES:?set NNODES to the number of nodes}"
REPO_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [[ -z "${PYTHON:-}" ]]; then
  # A shell that never activated the venv has a python3 without torch: use the venv directly.
  if [[ -x "$REPO_DIR/.venv/bin/python" ]]; then PYTHON="$REPO_DIR/.venv/bin/python"; else PYTHON=python3; fi
fi
# find_spec, not import: a one-line answer in well under a second, before torchrun starts.
if ! "$PYTHON" -c 'import importlib.util as u, sys; sys.exit(not (u.find_spec("torch") and u.find_spec("ftdist")))' \
    2>/dev/null; then
  echo "launch/multinode.sh: PYTHON=$PYTHON cannot import torch and ftdist; run 'source .venv/bin/activate'" \
    "or set PYTHON=/path/to/venv/bin/python" >&2
  exit 2
fi
if [[ -z "${GPUS_PER_NODE:-}" ]]; then
  GPUS_PER_NODE=$("$PYTHON" -c 'import torch; print(max(torch.cuda.device_count(), 1))')
fi
exec "$PYTHON" -m torch.distributed.run \
  --nnodes "$NNODES" --nproc_per_node "$GPUS_PER_NODE" \
  --rdzv_backend c10d --rdzv_endpoint "$HEAD_ADDR:${PORT:-29400}" --rdzv_id "${RUN_ID:-ftdist}" \
  -m ftdist.train "$@"
