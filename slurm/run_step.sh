# --- the job step (slurm/run_step.sh, shared by train.sbatch and array.sbatch) ---
# Set before this: PYTHON, NPROC_PER_NODE, RDZV_PORT (empty: from the job id), MAX_RESTARTS,
# REQUEUE, RUN_DIR, OVERRIDES (array), REQUEUE_ID.
mkdir -p "$RUN_DIR"
# Collective timeouts come from strategy.timeout_s (the process group's timeout). On NCCL a hung
# collective aborts the communicator and dumps PyTorch's flight recorder (the last collectives of
# each rank) under RUN_DIR/flight_recorder, which tells which rank stopped where.
export TORCH_NCCL_ASYNC_ERROR_HANDLING="${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}"
export TORCH_FR_BUFFER_SIZE="${TORCH_FR_BUFFER_SIZE:-20000}"  # older torch: TORCH_NCCL_TRACE_BUFFER_SIZE
export TORCH_NCCL_DUMP_ON_TIMEOUT="${TORCH_NCCL_DUMP_ON_TIMEOUT:-1}"
export TORCH_FR_DUMP_TEMP_FILE="${TORCH_FR_DUMP_TEMP_FILE:-$RUN_DIR/flight_recorder/rank_}"
export NCCL_DEBUG="${NCCL_DEBUG:-WARN}"
mkdir -p "$RUN_DIR/flight_recorder"
HEAD_NODE=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
# Two jobs sharing a node must not share a rendezvous port.
RDZV_PORT="${RDZV_PORT:-$((20000 + SLURM_JOB_ID % 20000))}"
echo "ftdist: job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}) on $SLURM_JOB_NODELIST:" \
  "$SLURM_JOB_NUM_NODES node(s) x $NPROC_PER_NODE process(es), rendezvous $HEAD_NODE:$RDZV_PORT, run dir $RUN_DIR"

STEP_PID=""
forward_preemption() {
  echo "ftdist: USR1 (time limit or preemption ahead): asking the run to checkpoint and stop"
  # srun passes the signal to every process of the step; torchrun ignores it (below) and the
  # workers' handlers checkpoint at the next step.
  [[ -n "$STEP_PID" ]] && kill -USR1 "$STEP_PID" 2>/dev/null
}
trap forward_preemption USR1

# A marker left by an earlier start must not requeue this one.
rm -f "$RUN_DIR/preempted.json"
srun --ntasks-per-node=1 --kill-on-bad-exit=1 \
  bash -c 'trap "" USR1; exec "$@"' ftdist-node \
  "$PYTHON" -m torch.distributed.run \
    --nnodes "$SLURM_JOB_NUM_NODES" --nproc_per_node "$NPROC_PER_NODE" \
    --rdzv_backend c10d --rdzv_endpoint "$HEAD_NODE:$RDZV_PORT" --rdzv_id "$SLURM_JOB_ID" \
    --max_restarts "$MAX_RESTARTS" \
    -m ftdist.train "${OVERRIDES[@]}" output_dir="$RUN_DIR" resume=auto &
STEP_PID=$!
# `wait` returns early when the trap runs; wait again until the step has really ended.
while :; do
  wait "$STEP_PID"
  rc=$?
  kill -0 "$STEP_PID" 2>/dev/null || break
done

# Preempted workers exit 75 and rank 0 leaves preempted.json (torchrun itself then exits 1).
if [[ $rc -eq 75 || -f "$RUN_DIR/preempted.json" ]]; then
  if [[ "$REQUEUE" == 1 ]]; then
    echo "ftdist: checkpointed after USR1; requeueing $REQUEUE_ID to resume"
    scontrol requeue "$REQUEUE_ID" && exit 0
    echo "ftdist: scontrol requeue $REQUEUE_ID failed" >&2
  fi
  echo "ftdist: checkpointed and stopped; submit the same job script again to resume" >&2
  exit 75
fi
echo "ftdist: run ended with exit code $rc"
exit "$rc"
