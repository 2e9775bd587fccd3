# ---- distrain job body, shared by every template (inlined by `distrain slurm submit`) ----
# Signals: Slurm sends USR1 to this batch shell `grace` seconds before the time limit
# (--signal=B:USR1@grace), and USR1 (if asked) then TERM on preemption. The trap forwards
# them to the training processes, which save a checkpoint at the next step boundary and
# exit; then the job requeues itself and the next start resumes (resume=auto).
set -uo pipefail

# One id per run: an array task's is <array job>_<task>, which is also what requeue needs.
if [ -n "${SLURM_ARRAY_JOB_ID:-}" ]; then
  export DISTRAIN_RUN_ID="${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}"
else
  export DISTRAIN_RUN_ID="$SLURM_JOB_ID"
fi
# Rendezvous on the first node; the port is derived from the job id so that jobs sharing a
# node do not collide. The same on every node, so evaluating it here is right.
DISTRAIN_HEAD=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
export DISTRAIN_HEAD
export DISTRAIN_PORT=$(( 20000 + SLURM_JOB_ID % 20000 ))

log_environment() {
  echo "=== distrain job $DISTRAIN_RUN_ID (slurm job $SLURM_JOB_ID) SLURM_RESTART_COUNT=${SLURM_RESTART_COUNT:-0}" \
       "on $(hostname) at $(date -u +%FT%TZ); head $DISTRAIN_HEAD:$DISTRAIN_PORT"
  # In Python, not a sed over the listing: a sed sees one line of a multi-line value (a private key).
  echo "--- printenv (sorted; secrets masked by name and by value shape, on every line)"
  "$DISTRAIN_PYTHON" -I {{env_mask}} || echo "(not shown: the masking helper failed)"
  echo "--- pip freeze"
  "$DISTRAIN_PYTHON" -m pip freeze 2>&1
  if command -v nvidia-smi >/dev/null 2>&1; then
    echo "--- nvidia-smi"
    nvidia-smi 2>&1
  fi
  echo "--- start $(date -u +%FT%TZ)"
}

# Runs on every node (srun ships the function text, so $SLURM_NODEID expands on the node).
# DISTRAIN_FORWARD=children: accelerate's and torchrun's launchers neither forward SIGUSR1 nor
# survive it, so the launcher ignores USR1 and the signals go to its children, the training
# processes. (On TERM, torchrun's agent also passes TERM on and kills the workers 30 s later.)
# DISTRAIN_FORWARD=self: the command handles the signals itself.
node_task() {
  task_args
  if [ "$DISTRAIN_FORWARD" = children ]; then
    (trap '' USR1; launch "${TASK_ARGS[@]}") &
  else
    launch "${TASK_ARGS[@]}" &
  fi
  NODE_PID=$! NODE_SIGNAL=""
  forward() {
    NODE_SIGNAL=$1
    if [ "$DISTRAIN_FORWARD" = children ]; then pkill "-$1" -P "$NODE_PID"; else kill "-$1" "$NODE_PID"; fi
  }
  trap 'forward USR1' USR1
  trap 'forward TERM' TERM
  local rc
  while :; do  # wait returns early when a trapped signal arrives
    wait "$NODE_PID"; rc=$?
    kill -0 "$NODE_PID" 2>/dev/null || break
  done
  # The launcher reports a worker that stopped on a signal as a plain failure (1): say which
  # signal it was (138 USR1, 143 TERM), so the batch shell knows to requeue.
  if [ -n "$NODE_SIGNAL" ] && [ "$rc" -ne 0 ]; then
    rc=$(( 128 + $(kill -l "$NODE_SIGNAL") ))
  fi
  return "$rc"
}

requeue() {
  if scontrol show job "$DISTRAIN_RUN_ID" 2>/dev/null | grep -q 'JobState=CANCELLED'; then
    echo "=== job was cancelled: not requeueing"
    return
  fi
  echo "=== $(date -u +%T) requeueing $DISTRAIN_RUN_ID; the next start resumes from the newest checkpoint"
  scontrol requeue "$DISTRAIN_RUN_ID" \
    || echo "=== scontrol requeue failed (a preempting scheduler requeues the job itself)"
}

run_job() {
  log_environment
  DISTRAIN_SIGNAL=""
  srun --nodes="$SLURM_JOB_NUM_NODES" --ntasks="$SLURM_JOB_NUM_NODES" --ntasks-per-node=1 \
       --cpus-per-task="$SLURM_CPUS_PER_TASK" --kill-on-bad-exit=1 \
       bash -c "$(declare -f task_args launch node_task); node_task" &
  SRUN_PID=$!
  on_signal() {
    DISTRAIN_SIGNAL=$1
    echo "=== $(date -u +%T) got SIG$1: forwarding it to the training processes"
    kill "-$1" "$SRUN_PID" 2>/dev/null
  }
  trap 'on_signal USR1' USR1
  trap 'on_signal TERM' TERM
  local rc
  while :; do
    wait "$SRUN_PID"; rc=$?
    kill -0 "$SRUN_PID" 2>/dev/null || break
  done
  trap - USR1 TERM
  echo "=== $(date -u +%T) training exited with code $rc"
  # Non-zero after a signal to this shell or to the nodes (preemption may signal only the
  # job steps): the run saved and stopped early (or died); run it again from its newest
  # checkpoint. Zero: it finished before the signal took effect.
  if [ "$rc" -ne 0 ] && { [ -n "$DISTRAIN_SIGNAL" ] || [ "$rc" -eq 138 ] || [ "$rc" -eq 143 ]; }; then
    requeue
  fi
  exit "$rc"
}
