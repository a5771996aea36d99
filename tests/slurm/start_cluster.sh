#!/usr/bin/env bash
# Start a one-node Slurm cluster on this machine for tests/test_slurm.py (CI, as root).
#
# Installs Debian's slurmctld, slurmd, slurm-client and munge when they are missing,
# writes /etc/slurm/slurm.conf (only if absent or written by this script before),
# starts munged, slurmctld and slurmd by hand (no systemd), and waits until the node
# is idle. Daemon pids and logs live in $MEGAPEER_SLURM_STATE; stop_cluster.sh ends them.
# Measured facts behind the settings: shared/notes/megatron-core-on-cpu.md.
set -euo pipefail

STATE=${MEGAPEER_SLURM_STATE:-/var/tmp/megapeer-slurm}
CONF=/etc/slurm/slurm.conf
MARK="# written by megapeer tests/slurm/start_cluster.sh"

if [ "$(id -u)" != 0 ]; then
    echo "start_cluster.sh: must run as root (it installs packages and starts daemons)" >&2
    exit 1
fi

if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null \
        || ! command -v sbatch >/dev/null || ! command -v munged >/dev/null; then
    echo "installing slurmctld slurmd slurm-client munge"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq slurmctld slurmd slurm-client munge >/dev/null
fi

if [ -f "$CONF" ] && ! grep -qF "$MARK" "$CONF"; then
    echo "start_cluster.sh: $CONF exists and was not written by this script; not touching it" >&2
    exit 1
fi

# A cluster already started by this script is stopped first, so each run starts clean.
if [ -f "$STATE/slurmctld.pid" ] || [ -f "$STATE/slurmd.pid" ]; then
    bash "$(dirname "$0")/stop_cluster.sh"
fi

mkdir -p "$STATE"/{ctld,spool,log} /etc/slurm
HOST=$(hostname -s)
CPUS=$(nproc)
MEM_MB=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 * 9 / 10 ))

cat > "$CONF" <<EOF
$MARK
ClusterName=megapeer-ci
SlurmctldHost=$HOST
SlurmUser=root
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
JobAcctGatherType=jobacct_gather/none
MailProg=/bin/true
ReturnToService=2
# ranks get SIGTERM, then this many seconds to save a checkpoint before SIGKILL
KillWait=60
# finished jobs stay visible to 'scontrol show job' for this long (no accounting here)
MinJobAge=600
SchedulerParameters=sched_interval=2
# a requeued job waits the credential lifetime before it starts again (default 120 s)
AuthInfo=cred_expire=20
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/spool
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
NodeName=$HOST NodeAddr=127.0.0.1 CPUs=$CPUS RealMemory=$MEM_MB State=UNKNOWN
PartitionName=debug Nodes=$HOST Default=YES MaxTime=INFINITE State=UP
EOF

# munge: key from the package (made here if missing), socket dir owned by munge.
if [ ! -s /etc/munge/munge.key ]; then
    mungekey --create --force
fi
chown munge:munge /etc/munge/munge.key
chmod 600 /etc/munge/munge.key
mkdir -p /run/munge /var/lib/munge /var/log/munge
chown munge:munge /run/munge /var/lib/munge /var/log/munge
chmod 755 /run/munge
if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
    rm -f /run/munge/munged.pid /run/munge/munge.socket.2
    runuser -u munge -- /usr/sbin/munged --force
    for _ in $(seq 50); do
        munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && break
        sleep 0.1
    done
    cp /run/munge/munged.pid "$STATE/munged.pid"
fi
munge -n | unmunge >/dev/null || { echo "munged is not answering" >&2; exit 1; }

# -c: clear any saved job state; -i: ignore saved state errors.
slurmctld -c -i
slurmd
for _ in $(seq 120); do
    state=$(sinfo -h -n "$HOST" -o %t 2>/dev/null || true)
    case "$state" in
        idle*) break ;;
        down*|drain*) scontrol update NodeName="$HOST" State=RESUME 2>/dev/null || true ;;
    esac
    sleep 0.5
done
state=$(sinfo -h -n "$HOST" -o %t 2>/dev/null || true)
if [ "${state%%[*~#]}" != idle ]; then
    echo "start_cluster.sh: node $HOST is '$state', not idle; logs in $STATE/log" >&2
    tail -n 20 "$STATE/log/slurmctld.log" "$STATE/log/slurmd.log" >&2 || true
    exit 1
fi
sinfo
echo "Slurm is up (state and logs in $STATE)"
