#!/usr/bin/env bash
# The one launcher every slurm/*.sbatch file ends in (`exec bash slurm/launch.sh CONFIG "$@"`), running
# as the job's batch script: it sets up the rendezvous, starts one srun task per GPU running
# launch/train.py, turns the batch shell's SIGUSR2 into a checkpoint on every rank (exit 85) and then
# requeues the job, once, from the batch shell; the requeued job resumes its run. See slurm/README.md.
#
# Environment: RUN_ROOT (runs), RUN_NAME (<config>-<job id>), SWEEP_TASKS (launch/sweep.py: the directory of
# the array tasks' override files), CONFIG_FILE (a run's own config in place of configs/CONFIG.yaml:
# launch/branch.py --submit gives the branch's branch.yaml), PYTHON (.venv/bin/python, relative to the
# repository), MAX_REQUEUES (20), DRY_RUN=1 (print the plan and the srun command, start nothing);
# MLFLOW_TRACKING_URI and everything else of the submitting shell reach the ranks (sbatch exports it).
#
# srun with one task per GPU, not one torchrun/deepspeed launcher per node: SLURM then knows every rank.
# It signals each rank itself (a SIGUSR2 kills DeepSpeed's per-node launcher and leaves its ranks
# running; torchrun's agent does not handle it either), ends the step as soon as one rank fails
# (--kill-on-bad-exit), writes one log per rank, and gives each rank SLURM_PROCID/SLURM_LOCALID, which
# trainer/distributed.py reads: no second rendezvous layer.
set -euo pipefail

CONFIG=${1:?usage: launch.sh CONFIG [section.key=value ...]}
shift
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO"
EXIT_PREEMPTED=85                # launch/train.py: checkpoint written after a stop signal
EXIT_HUNG=86                     # trainer/watchdog.py: no step within train.hang_timeout_s; stacks in RUN_DIR/hang
EXIT_BAD_NODE=87                 # trainer/preflight.py: nodes to exclude listed in RUN_DIR/exclude_nodes
SIGUSR2_DEATH=$((128 + 12))      # a rank killed by SIGUSR2 before its handler was installed
LAUNCH_LOG=""

log() {
  local line
  line="[launch $(date '+%F %T')] $*"
  echo "$line"
  [[ -z "$LAUNCH_LOG" ]] || echo "$line" >>"$LAUNCH_LOG"
}

if [[ -z "${SLURM_JOB_ID:-}" ]]; then
  echo "error: launch.sh runs as a SLURM batch script: sbatch slurm/$CONFIG.sbatch [section.key=value ...]" >&2
  echo "       (a plan without SLURM: SLURM_NTASKS=16 python launch/train.py --config $CONFIG --dry-run)" >&2
  exit 2
fi

# A stop signal may come before srun runs (during the pre-flight check): remember it, act after.
STOP_SIGNAL=""
SRUN_PID=""
on_signal() {
  if [[ $1 == TERM ]]; then
    # scancel, the time limit or SLURM's own preemption: SLURM signals every rank itself and decides
    # the job's fate; the ranks checkpoint, and we only wait for them.
    STOP_SIGNAL=TERM
    log "SIGTERM: the ranks got it from SLURM too; waiting for their checkpoint (no requeue from here)"
    return
  fi
  [[ $STOP_SIGNAL == TERM ]] || STOP_SIGNAL=USR2
  if [[ -n "$SRUN_PID" ]]; then
    log "SIGUSR2: forwarding it to srun ($SRUN_PID), which signals every rank: checkpoint, then exit $EXIT_PREEMPTED"
    kill -USR2 "$SRUN_PID" 2>/dev/null || log "srun had already exited"
  else
    log "SIGUSR2 before the ranks started: not starting them"
  fi
}
trap 'on_signal USR2' USR2
trap 'on_signal TERM' TERM

# A task of a sweep's job array (launch/sweep.py): its own overrides, one per line, follow the array's.
if [[ -n "${SWEEP_TASKS:-}" && -n "${SLURM_ARRAY_TASK_ID:-}" ]]; then
  TASK_FILE="$SWEEP_TASKS/$SLURM_ARRAY_TASK_ID.args"
  if [[ ! -f "$TASK_FILE" ]]; then
    echo "error: sweep array task $SLURM_ARRAY_TASK_ID has no $TASK_FILE (SWEEP_TASKS=$SWEEP_TASKS)" >&2
    exit 2
  fi
  mapfile -t TASK_ARGS <"$TASK_FILE"
  set -- "$@" "${TASK_ARGS[@]}"
fi

PYTHON=${PYTHON:-.venv/bin/python}
MAX_REQUEUES=${MAX_REQUEUES:-20}
RESTARTS=${SLURM_RESTART_COUNT:-0}
RUN_ROOT=${RUN_ROOT:-runs}
# What scontrol acts on. An array task's own id, not SLURM_JOB_ID: the array's last task has the array's
# id as its SLURM_JOB_ID, and `scontrol requeue <array id>` requeues every task of the array.
JOB=$SLURM_JOB_ID
[[ -z "${SLURM_ARRAY_JOB_ID:-}" ]] || JOB="${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}"
RUN_NAME=${RUN_NAME:-$CONFIG-$SLURM_JOB_ID}   # the job id survives requeues: the same run dir resumes
for arg in "$@"; do  # an explicit override wins, as it does in the trainer
  case $arg in
    train.run_name=*) RUN_NAME=${arg#*=} ;;
    train.output_dir=*) RUN_ROOT=${arg#*=} ;;
  esac
done
[[ $RUN_ROOT == /* ]] || RUN_ROOT="$REPO/$RUN_ROOT"
RUN_DIR="$RUN_ROOT/$RUN_NAME"
RESUME_HINT="to resume: ${CONFIG_FILE:+CONFIG_FILE=$CONFIG_FILE }RUN_NAME=$RUN_NAME sbatch slurm/$CONFIG.sbatch $*"

# Rendezvous: rank 0 runs on the allocation's first node. Its NodeAddr, not its name: node names need
# not resolve (they do not on the local test cluster). The port derives from the job id, so two jobs
# sharing a node do not collide, and a requeued job gets the same one.
FIRST_NODE=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
MASTER_ADDR=$(scontrol show node "$FIRST_NODE" | sed -n 's/.*NodeAddr=\([^ ]*\).*/\1/p')
export MASTER_ADDR=${MASTER_ADDR:-$FIRST_NODE}
export MASTER_PORT=$((20000 + SLURM_JOB_ID % 20000))
# trainer/distributed.py prefers RANK/WORLD_SIZE over SLURM's variables: values leaked from the
# submitting shell (sbatch exports its environment) would give every rank the same rank.
unset RANK WORLD_SIZE LOCAL_RANK LOCAL_WORLD_SIZE
# Without --ntasks/--ntasks-per-node srun starts one task per node: say so to the trainer's plan too.
export SLURM_NTASKS=${SLURM_NTASKS:-${SLURM_NNODES:-1}}
export OMP_NUM_THREADS=${SLURM_CPUS_PER_TASK:-1}
export PYTHONUNBUFFERED=1                                  # rank logs readable while it runs
# A failed or hung collective aborts the process instead of blocking until the time limit; with
# --kill-on-bad-exit that ends the step (NCCL_ASYNC_ERROR_HANDLING is the pre-2.2 name).
export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}
export NCCL_ASYNC_ERROR_HANDLING=${NCCL_ASYNC_ERROR_HANDLING:-1}
export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
# DeepSpeed JIT-compiles its ops at first use: cache them in the venv, as the Makefile does.
PY_PREFIX=$(cd "$(dirname "$PYTHON")/.." 2>/dev/null && pwd || true)
if [[ -z "${TORCH_EXTENSIONS_DIR:-}" && -f "$PY_PREFIX/pyvenv.cfg" ]]; then
  export TORCH_EXTENSIONS_DIR="$PY_PREFIX/torch_extensions"
fi

if [[ -n "${CONFIG_FILE:-}" && ! -f "$CONFIG_FILE" ]]; then
  echo "error: CONFIG_FILE=$CONFIG_FILE is not a file" >&2
  exit 2
fi
ARGS=(launch/train.py --config "${CONFIG_FILE:-$CONFIG}" "train.output_dir=$RUN_ROOT" "train.run_name=$RUN_NAME" "$@")
# SLURM 22.05's srun no longer takes --cpus-per-task from the job's environment: pass it on. Every task
# sees all GPUs of its node and picks cuda:SLURM_LOCALID itself (trainer/distributed.py), so no GPU
# binding here: with one GPU per task visible, every local rank but 0 would name a missing device.
SRUN=(srun --kill-on-bad-exit=1 --cpus-per-task="${SLURM_CPUS_PER_TASK:-1}"
      --output="$RUN_DIR/logs/rank%t.log" --open-mode=append)

if [[ -z "${DRY_RUN:-}" ]]; then
  mkdir -p "$RUN_DIR/logs"
  LAUNCH_LOG="$RUN_DIR/logs/launch.log"
fi
log "job $JOB (restart $RESTARTS of at most $MAX_REQUEUES) on $SLURM_JOB_NODELIST: $SLURM_NTASKS tasks," \
    "$OMP_NUM_THREADS CPUs each; MASTER_ADDR=$MASTER_ADDR MASTER_PORT=$MASTER_PORT"
log "run dir $RUN_DIR; python $PYTHON; MLflow ${MLFLOW_TRACKING_URI:-from the config}"

# Pre-flight in the batch shell: a bad config or override fails here in ~2 s with its message in the
# job log, before any rank starts; it also prints the plan (world size from SLURM_NTASKS).
set +e
"$PYTHON" "${ARGS[@]}" --dry-run
rc=$?
set -e
if [[ $rc -ne 0 ]]; then
  log "the config does not resolve (exit $rc): not starting the ranks, not requeueing"
  exit "$rc"
fi
if [[ -n "${DRY_RUN:-}" ]]; then
  log "DRY_RUN: would run: ${SRUN[*]} $PYTHON ${ARGS[*]}"
  exit 0
fi

# srun's own messages (one line per rank that did not exit 0) go to logs/srun.log, then to this log.
SRUN_LOG="$RUN_DIR/logs/srun.log"
SRUN_FROM=$(($(stat -c %s "$SRUN_LOG" 2>/dev/null || echo 0) + 1))  # this segment's part of it
if [[ -z "$STOP_SIGNAL" ]]; then
  log "starting: ${SRUN[*]} $PYTHON ${ARGS[*]}"
  "${SRUN[@]}" "$PYTHON" "${ARGS[@]}" 2>>"$SRUN_LOG" &
  SRUN_PID=$!
  # `wait` returns early when a trapped signal arrives: wait again until srun has really exited.
  while :; do
    rc=0
    wait "$SRUN_PID" || rc=$?
    kill -0 "$SRUN_PID" 2>/dev/null || break
  done
  tail -c "+$SRUN_FROM" "$SRUN_LOG" >&2 || true
else
  rc=$EXIT_PREEMPTED
fi

# srun exits with the highest task status, a task killed by signal N counting as 128+N. Once one rank
# exits nonzero, --kill-on-bad-exit SIGTERMs the others, and one that is not handling SIGTERM (still
# starting, or tearing down after its checkpoint) dies of it: srun says 143 whatever the cause. The
# cause is the first rank that exited by itself, in srun's report: "n1: task 0: Exited with exit code 85"
# (or "tasks 0-7: ..." for several).
if ((rc > 128)); then
  first=$(tail -c "+$SRUN_FROM" "$SRUN_LOG" |
          sed -n 's/.* tasks\{0,1\} [0-9,-]*: Exited with exit code \([0-9]*\)$/\1/p') || true
  first=${first%%$'\n'*}
  if [[ -n "$first" && "$first" != 0 ]]; then
    log "srun exited $rc: ranks were terminated after one exited $first on its own"
    rc=$first
  fi
fi

if [[ $rc -eq 0 ]]; then
  log "done: $(grep -a '^val_top1=' "$RUN_DIR/logs/rank0.log" | tail -n 1)"
  exit 0
fi
# Rank 0 writes RUN_DIR/FINISHED when the last step, evaluation and export are done: a signal or a
# rank dying in teardown after that must not requeue a finished run.
if [[ -f "$RUN_DIR/FINISHED" ]]; then
  log "the run had finished ($(cat "$RUN_DIR/FINISHED")); srun exited $rc in teardown: not requeueing"
  exit 0
fi
if [[ $rc -eq $EXIT_BAD_NODE && -s "$RUN_DIR/exclude_nodes" ]]; then
  # ExcNodeList can only change while the job is pending: requeue, then (this shell ignoring the
  # SIGTERM the requeue sends, within SLURM's KillWait) exclude the nodes while it waits to restart.
  bad_nodes=$(tr -d '[:space:]' < "$RUN_DIR/exclude_nodes")
  log "pre-flight failed on node(s) $bad_nodes (see $RUN_DIR/logs/): excluding them from job $JOB and requeueing"
  if ((RESTARTS < MAX_REQUEUES)); then
    trap '' TERM
    scontrol requeue "$JOB" || log "scontrol requeue failed; $RESUME_HINT"
    for _ in $(seq 50); do
      if scontrol update JobId="$JOB" ExcNodeList="$bad_nodes" 2>/dev/null; then
        log "job $JOB requeued with ExcNodeList=$bad_nodes"
        break
      fi
      sleep 0.2
    done
    exit "$EXIT_PREEMPTED"
  fi
  rc=$EXIT_PREEMPTED
fi
if [[ $rc -eq $EXIT_HUNG ]]; then
  log "a rank hung (no optimizer step within its timeout; every rank's stacks in $RUN_DIR/hang/): requeueing like a preemption"
  rc=$EXIT_PREEMPTED
fi
# A rank killed by SIGUSR2 itself was still starting (no handler yet): nothing lost since the last
# checkpoint, so that counts as stopped too.
if [[ $rc -ne $EXIT_PREEMPTED && ! ($rc -eq $SIGUSR2_DEATH && $STOP_SIGNAL == USR2) ]]; then
  log "the trainer failed (exit $rc; 2 bad input, 3 non-finite loss, 4 replicas differ): not requeueing; see $RUN_DIR/logs/"
  exit "$rc"
fi
# From here on the ranks stopped on our signal; their last complete checkpoint is what a rerun resumes.
if [[ $STOP_SIGNAL == TERM ]]; then
  log "stopped by SIGTERM (exit $rc): not requeueing; $RESUME_HINT"
  exit "$EXIT_PREEMPTED"
fi
if ((RESTARTS >= MAX_REQUEUES)); then
  log "stopped (exit $rc) after $RESTARTS requeues, MAX_REQUEUES=$MAX_REQUEUES: not requeueing; $RESUME_HINT"
  exit "$EXIT_PREEMPTED"
fi
log "stopped (exit $rc): requeueing job $JOB (restart $((RESTARTS + 1)) of at most $MAX_REQUEUES)"
trap - TERM  # SLURM ends this shell right after the requeue
scontrol requeue "$JOB" || log "scontrol requeue failed; $RESUME_HINT"
exit "$EXIT_PREEMPTED"
