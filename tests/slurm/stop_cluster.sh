#!/usr/bin/env bash
# Stop the cluster started by start_cluster.sh: cancel its jobs, then end slurmd,
# slurmctld and munged by the pids it recorded (nothing else is touched).
set -uo pipefail

STATE=${MEGAPEER_SLURM_STATE:-/var/tmp/megapeer-slurm}

# Jobs first (their ranks get SIGTERM, then SIGKILL after KillWait), so no job step
# outlives slurmd.
if [ -f "$STATE/slurmctld.pid" ] && command -v scancel >/dev/null; then
    scancel --quiet --user=root 2>/dev/null || true
    for _ in $(seq 90); do
        [ -z "$(squeue -h -o %i 2>/dev/null)" ] && break
        sleep 1
    done
    scancel --quiet --full --signal=KILL --user=root 2>/dev/null || true
fi

stop_pid() {  # stop_pid NAME PIDFILE: SIGTERM, wait up to 20 s, then SIGKILL
    local name=$1 file=$2 pid
    [ -f "$file" ] || return 0
    pid=$(cat "$file" 2>/dev/null)
    rm -f "$file"
    [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null || return 0
    kill "$pid" 2>/dev/null
    for _ in $(seq 200); do
        kill -0 "$pid" 2>/dev/null || { echo "stopped $name ($pid)"; return 0; }
        sleep 0.1
    done
    kill -9 "$pid" 2>/dev/null
    echo "killed $name ($pid)"
}

stop_pid slurmd "$STATE/slurmd.pid"
stop_pid slurmctld "$STATE/slurmctld.pid"
stop_pid munged "$STATE/munged.pid"
exit 0
