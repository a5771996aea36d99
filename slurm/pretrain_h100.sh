#!/bin/bash
# Multi-node pretraining on H100 nodes, pre-emptible and self-requeueing.
#
#   sbatch [sbatch options] slurm/pretrain_h100.sh CONFIG.yaml [dotted.key=value ...]
#   sbatch --array=0-N slurm/pretrain_h100.sh --array-file FILE   (tools/ablate.py --slurm)
#
# Submit from the repository root. One srun task per rank (no torchrun): Slurm's
# signals reach every rank directly. A requeued or pre-empted job resumes from
# <run_dir>/checkpoints/latest. Environment switches (all optional) and the reasons
# for each default: docs/slurm.md.
#
#SBATCH --job-name=megapeer
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --exclusive
#SBATCH --time=04:00:00
#SBATCH --requeue
#SBATCH --signal=B:USR1@300
#SBATCH --open-mode=append
#SBATCH --output=slurm/logs/%x-%j.out
# Partition: the cluster's default; choose one with `sbatch -p NAME` or SBATCH_PARTITION.
set -euo pipefail

say() { echo "[megapeer $(date '+%F %T')] $*"; }

if [ -z "${SLURM_JOB_ID:-}" ]; then
    echo "submit with sbatch: sbatch slurm/pretrain_h100.sh CONFIG.yaml [key=value ...]" >&2
    exit 2
fi
cd "${MEGAPEER_REPO:-$SLURM_SUBMIT_DIR}"

# ---- signals -------------------------------------------------------------------------
# USR1 (--signal=B:USR1@secs, ahead of the time limit): pass it to every rank; they save
# a checkpoint at the next step boundary and exit 0, then this script requeues the job.
# TERM (scancel, scontrol requeue, pre-emption, time limit): Slurm signals the ranks
# itself, and decides itself whether the job comes back; this script must not requeue.
# Traps are set first: an untrapped USR1 would end this script.
GOT_USR1=0
GOT_TERM=0
SIGNALS=0
on_usr1() { GOT_USR1=1; SIGNALS=$((SIGNALS + 1))
            say "USR1: asking the ranks to checkpoint and stop"
            scancel --signal=USR1 "$SLURM_JOB_ID" || true; }
on_term() { GOT_TERM=1; SIGNALS=$((SIGNALS + 1))
            say "TERM: the ranks save and stop; Slurm decides about requeueing"; }
trap on_usr1 USR1
trap on_term TERM

# ---- arguments: CONFIG [overrides], or one line of an array file per array task --------
if [ "${1:-}" = "--array-file" ]; then
    [ -n "${2:-}" ] && [ -n "${SLURM_ARRAY_TASK_ID:-}" ] || {
        echo "--array-file FILE needs a job array (sbatch --array=...)" >&2; exit 2; }
    ARGS_FILE=$(sed -n "$((SLURM_ARRAY_TASK_ID + 1))p" "$2")
    [ -n "$ARGS_FILE" ] || { echo "$2 has no line for array task $SLURM_ARRAY_TASK_ID" >&2; exit 2; }
    mapfile -t ARGS < "$ARGS_FILE"      # one argument per line: CONFIG, then overrides
    set -- "${ARGS[@]}"
fi
[ $# -ge 1 ] || { echo "usage: sbatch slurm/pretrain_h100.sh CONFIG.yaml [key=value ...]" >&2; exit 2; }
CONFIG=$1
shift
OVERRIDES=("$@")

if [ -n "${MEGAPEER_PYTHON:-}" ]; then PY=$MEGAPEER_PYTHON
elif [ -x .venv/bin/python ]; then PY=.venv/bin/python
else PY=python3; fi

# ---- layout: GPUs, ranks per node, CPUs per rank -------------------------------------
first_number() { local v=${1##*:}; v=${v%%(*}; echo "${v:-0}"; }   # "h100:8" / "8(x2)" -> 8
GPUS=${MEGAPEER_GPUS_PER_NODE:-$(first_number "${SLURM_GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-0}}")}
NPROC=${MEGAPEER_NPROC_PER_NODE:-$(first_number "${SLURM_NTASKS_PER_NODE:-${SLURM_TASKS_PER_NODE:-1}}")}
NNODES=${SLURM_JOB_NUM_NODES:-1}
WORLD=$((NNODES * NPROC))
CPUS_NODE=$(first_number "${SLURM_CPUS_ON_NODE:-$NPROC}")
CPT=${MEGAPEER_CPUS_PER_TASK:-$(( CPUS_NODE / NPROC > 0 ? CPUS_NODE / NPROC : 1 ))}
RESTART=${SLURM_RESTART_COUNT:-0}

export MASTER_ADDR=${MEGAPEER_MASTER_ADDR:-$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)}
# A port from the job id and attempt, so a requeued attempt never meets its predecessor's.
export MASTER_PORT=${MEGAPEER_MASTER_PORT:-$((20000 + (SLURM_JOB_ID % 4000) * 10 + RESTART % 10))}
export WORLD_SIZE=$WORLD            # the config is validated for this world size
export PYTHONUNBUFFERED=1
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$CPT}
if [ "$GPUS" -gt 0 ]; then
    # NCCL / CUDA defaults; a value already in the environment wins. docs/slurm.md.
    export CUDA_DEVICE_MAX_CONNECTIONS=${CUDA_DEVICE_MAX_CONNECTIONS:-1}
    export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}
    export TORCH_NCCL_AVOID_RECORD_STREAMS=${TORCH_NCCL_AVOID_RECORD_STREAMS:-1}
    export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
    export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}
fi

# ---- progress: finished already? where does the run live? ---------------------------
progress() { "$PY" -m megapeer.ablate.progress --config "$CONFIG" "${OVERRIDES[@]}"; }
PRC=0
PROGRESS=$(progress) || PRC=$?
case $PRC in
    0) say "run already finished ($PROGRESS): nothing to do"; exit 0 ;;
    10) ;;
    *) say "cannot read the config (status $PRC): not starting"; exit 2 ;;
esac
read -r STEP TOTAL RUN_DIR <<< "$PROGRESS"

LOG_DIR=${MEGAPEER_LOG_DIR:-$RUN_DIR/logs/${SLURM_JOB_NAME}-${SLURM_JOB_ID}}
mkdir -p "$LOG_DIR"
say "job $SLURM_JOB_ID attempt $((RESTART + 1)) on $SLURM_JOB_NODELIST: $NNODES node(s) x" \
    "$NPROC rank(s), $GPUS GPU(s)/node, $CPT CPU(s)/rank, master $MASTER_ADDR:$MASTER_PORT"
say "config $CONFIG ${OVERRIDES[*]:-}"
say "run $RUN_DIR at step $STEP of $TOTAL; rank logs in $LOG_DIR"
{ echo "# attempt $((RESTART + 1)) $(date '+%F %T')"
  env | grep -E '^(SLURM|NCCL|CUDA|TORCH|PYTORCH|MASTER|WORLD|OMP|MEGAPEER)_' | sort; } \
    >> "$LOG_DIR/env.txt"

# ---- run -----------------------------------------------------------------------------
if [ "$GOT_USR1$GOT_TERM" != 00 ]; then
    say "signalled before the ranks started"
    [ "$GOT_TERM" = 1 ] && exit 1
    scontrol requeue "$SLURM_JOB_ID"
    exit 0
fi
srun --kill-on-bad-exit=1 --nodes="$NNODES" --ntasks="$WORLD" --ntasks-per-node="$NPROC" \
     --cpus-per-task="$CPT" --open-mode=append --output="$LOG_DIR/rank-%t.log" \
     "$PY" -u -m megapeer.train --config "$CONFIG" --resume auto "${OVERRIDES[@]}" &
SRUN=$!
while :; do        # `wait` returns early (status > 128) when a trapped signal arrives
    SEEN=$SIGNALS
    wait "$SRUN" && RC=0 || RC=$?
    [ "$RC" -gt 128 ] && [ "$SIGNALS" != "$SEEN" ] || break
done
say "ranks exited with status $RC"

PRC=0
PROGRESS=$(progress) || PRC=$?
read -r STEP TOTAL RUN_DIR <<< "$PROGRESS"
say "progress: step $STEP of $TOTAL"
if [ "$PRC" = 0 ]; then
    say "run finished"
    exit 0
fi
if [ "$GOT_TERM" = 1 ]; then
    exit "$RC"
fi
MAX=${MEGAPEER_MAX_RESTARTS:-50}
if [ "$GOT_USR1" = 1 ] || { [ "$RC" = 0 ] && [ "${MEGAPEER_REQUEUE_UNFINISHED:-1}" = 1 ]; }; then
    if [ "$RESTART" -ge "$MAX" ]; then
        say "not requeueing: $RESTART restarts already (MEGAPEER_MAX_RESTARTS=$MAX)"
        exit 1
    fi
    say "run not finished: requeueing job $SLURM_JOB_ID"
    scontrol requeue "$SLURM_JOB_ID"
    exit 0
fi
say "ranks failed (status $RC) before the run finished: not requeueing"
exit "$RC"
