#!/usr/bin/env bash
# Start a real one-node SLURM on loopback for tests and local trials (Debian/Ubuntu, root).
#
# Idempotent: installs Debian's slurmctld, slurmd, slurm-client and munge only when sbatch
# is absent, writes /etc/slurm/slurm.conf, starts munged (as user munge), slurmctld and
# slurmd unless they already run with the same configuration, and waits (bounded) for the
# node to accept jobs. State, spool, logs and PID files live under $SMD_SLURM_DIR.
# Stop everything it started with scripts/slurm-down.sh.
#
# Environment:
#   SMD_SLURM_DIR    state folder (default /tmp/smd-slurm)
#   SMD_SLURM_CPUS   CPUs the node advertises (default: max(nproc, 4)); more than exist lets
#                    several one-core jobs run at once (SlurmdParameters=config_overrides)
#   SMD_SLURM_MEM_MB RealMemory of the node (default: 80 % of MemAvailable)
#   SMD_SLURM_WAIT   seconds to wait for the node to come up (default 60)
#   SMD_SLURM_FORCE  1: replace an /etc/slurm/slurm.conf this script did not write
set -euo pipefail

STATE=${SMD_SLURM_DIR:-/tmp/smd-slurm}
WAIT=${SMD_SLURM_WAIT:-60}
CONF=/etc/slurm/slurm.conf

log() { echo "slurm-up: $*" >&2; }
die() { log "ERROR: $*"; exit 1; }

[ "$(id -u)" = 0 ] || die "must run as root (installs packages, starts daemons)"

# A process is alive only if it exists and is not a zombie: killed daemons linger as
# zombies for a few seconds, and kill -0 succeeds on them.
alive() {
    local pid=$1 state
    [ -n "$pid" ] && [ -r "/proc/$pid/stat" ] || return 1
    state=$(sed -E 's/^[0-9]+ \(.*\) ([A-Za-z]).*/\1/' "/proc/$pid/stat" 2>/dev/null) || return 1
    [ "$state" != Z ] && [ "$state" != X ]
}
# The PID in a pid file, if that process is alive and is the named daemon (PIDs recycle).
pid_of() {
    local pid
    pid=$( { [ -s "$1" ] && tr -dc '0-9' <"$1"; } || true)
    if [ -n "${2:-}" ] && [ -n "$pid" ] && ! grep -qx "$2" "/proc/$pid/comm" 2>/dev/null; then
        pid=
    fi
    echo "$pid"
}

# --- install ------------------------------------------------------------------------------
if ! command -v sbatch >/dev/null 2>&1 || ! command -v slurmctld >/dev/null 2>&1 \
    || ! command -v slurmd >/dev/null 2>&1 || ! command -v munged >/dev/null 2>&1; then
    command -v apt-get >/dev/null 2>&1 || die "sbatch is absent and apt-get is not available"
    log "installing slurmctld slurmd slurm-client munge"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >/dev/null || apt-get update
    # Not the slurm-wlm meta-package: it pulls in ~43 packages.
    apt-get install -y -qq --no-install-recommends slurmctld slurmd slurm-client munge >/dev/null
fi

# --- configuration ------------------------------------------------------------------------
HOST=$(hostname -s)
NPROC=$(nproc)
CPUS=${SMD_SLURM_CPUS:-$(( NPROC > 4 ? NPROC : 4 ))}
AVAIL_MB=$(awk '/^MemAvailable:/ {print int($2 / 1024)}' /proc/meminfo)
# Free memory drifts between calls; keep the value already configured so that a second call
# finds the same configuration and leaves the running daemons alone.
OLD_MEM_MB=
if [ -f "$CONF" ] && grep -q 'smd-dist scripts/slurm-up.sh' "$CONF"; then
    OLD_MEM_MB=$(sed -nE 's/^NodeName=.* RealMemory=([0-9]+).*/\1/p' "$CONF" | head -n1)
fi
if [ -n "${SMD_SLURM_MEM_MB:-}" ]; then
    MEM_MB=$SMD_SLURM_MEM_MB
elif [ -n "$OLD_MEM_MB" ] && [ "$OLD_MEM_MB" -le "$AVAIL_MB" ]; then
    MEM_MB=$OLD_MEM_MB
else
    MEM_MB=$(( AVAIL_MB * 8 / 10 / 512 * 512 ))
fi

mkdir -p "$STATE"/ctld "$STATE"/d "$STATE"/log /etc/slurm
chmod 755 "$STATE"

NEW_CONF=$(cat <<EOF
# Written by smd-dist scripts/slurm-up.sh: a one-node SLURM on loopback, no cgroups,
# no accounting. State under $STATE.
ClusterName=smd
SlurmctldHost=$HOST(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
# Without it a job with no --mem takes the whole node and jobs run one at a time.
DefMemPerCPU=512
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
ReturnToService=2
# Start submitted jobs at once rather than in batches every few seconds.
SchedulerParameters=batch_sched_delay=0,sched_min_interval=0
KillWait=5
MailProg=/bin/true
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/d
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd.log
SlurmctldPort=6817
SlurmdPort=6818
# Lets the node advertise more CPUs than it has without being marked INVAL.
SlurmdParameters=config_overrides
NodeName=$HOST NodeAddr=127.0.0.1 CPUs=$CPUS RealMemory=$MEM_MB State=UNKNOWN
PartitionName=debug Nodes=$HOST Default=YES MaxTime=INFINITE State=UP
EOF
)

CTLD_PID=$(pid_of "$STATE/slurmctld.pid" slurmctld)
SLURMD_PID=$(pid_of "$STATE/slurmd.pid" slurmd)
if [ -f "$CONF" ] && [ "$(cat "$CONF")" = "$NEW_CONF" ]; then
    CONF_CHANGED=0
else
    CONF_CHANGED=1
fi

if [ "$CONF_CHANGED" = 1 ] && { alive "$CTLD_PID" || alive "$SLURMD_PID"; }; then
    log "configuration changed: restarting the daemons started from $STATE"
    bash "$(dirname "$0")/slurm-down.sh" --keep-munge
    CTLD_PID=; SLURMD_PID=
fi
if [ "$CONF_CHANGED" = 1 ]; then
    if [ -f "$CONF" ] && ! grep -q 'smd-dist scripts/slurm-up.sh' "$CONF"; then
        # Somebody else's SLURM: never overwrite it unless asked to.
        [ "${SMD_SLURM_FORCE:-0}" = 1 ] \
            || die "$CONF exists and was not written by this script; set SMD_SLURM_FORCE=1 to replace it (a copy is kept as $CONF.before-smd)"
        cp "$CONF" "$CONF.before-smd"
    fi
    printf '%s\n' "$NEW_CONF" >"$CONF"
    log "wrote $CONF (node $HOST, CPUs=$CPUS, RealMemory=${MEM_MB}MB)"
fi

# --- munge --------------------------------------------------------------------------------
if munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1; then
    log "munged already running"
else
    mkdir -p /run/munge /var/log/munge /var/lib/munge
    chown munge:munge /run/munge /var/log/munge /var/lib/munge
    chmod 0755 /run/munge
    [ -s /etc/munge/munge.key ] || die "/etc/munge/munge.key is missing (reinstall munge)"
    # As root munged refuses to start ("PRNG seed dir is insecure").
    runuser -u munge -- munged --force
    for _ in $(seq 50); do
        munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1 && break
        sleep 0.1
    done
    munge -n </dev/null | unmunge >/dev/null 2>&1 || die "munged did not start"
    cp /run/munge/munged.pid "$STATE/munged.pid" 2>/dev/null \
        || pgrep -u munge -n munged >"$STATE/munged.pid"
    log "started munged (pid $(pid_of "$STATE/munged.pid"))"
fi

# --- slurmctld, slurmd --------------------------------------------------------------------
if alive "$CTLD_PID"; then
    log "slurmctld already running (pid $CTLD_PID)"
else
    # -c: start from a clean state, with no jobs left from an earlier run.
    slurmctld -c -f "$CONF"
    for _ in $(seq 50); do alive "$(pid_of "$STATE/slurmctld.pid")" && break; sleep 0.1; done
    alive "$(pid_of "$STATE/slurmctld.pid")" \
        || die "slurmctld did not start; see $STATE/log/slurmctld.log"
    log "started slurmctld (pid $(pid_of "$STATE/slurmctld.pid"))"
fi
if alive "$SLURMD_PID"; then
    log "slurmd already running (pid $SLURMD_PID)"
else
    slurmd -N "$HOST" -f "$CONF"
    for _ in $(seq 50); do alive "$(pid_of "$STATE/slurmd.pid")" && break; sleep 0.1; done
    alive "$(pid_of "$STATE/slurmd.pid")" || die "slurmd did not start; see $STATE/log/slurmd.log"
    log "started slurmd (pid $(pid_of "$STATE/slurmd.pid"))"
fi

# --- wait for the node --------------------------------------------------------------------
deadline=$(( $(date +%s) + WAIT ))
state=
while :; do
    state=$(sinfo -h -n "$HOST" -o %T 2>/dev/null | head -n1 || true)
    case "$state" in
        idle*|mix*|alloc*|comp*) break ;;
        down*|drain*)
            # A node left down by an earlier, unclean stop comes back on request.
            scontrol update NodeName="$HOST" State=RESUME >/dev/null 2>&1 || true ;;
    esac
    if [ "$(date +%s)" -ge "$deadline" ]; then
        die "node $HOST not ready after ${WAIT}s (state '${state:-unknown}'); logs in $STATE/log"
    fi
    sleep 0.5
done
log "node $HOST is $state; partition debug, $CPUS CPUs, ${MEM_MB} MB (sinfo, squeue, sbatch ready)"
