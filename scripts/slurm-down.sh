#!/usr/bin/env bash
# Stop the one-node SLURM started by scripts/slurm-up.sh.
#
# Cancels all jobs first (job steps outlive slurmd), then stops only the daemons whose PID
# files slurm-up.sh wrote under $SMD_SLURM_DIR (default /tmp/smd-slurm): slurmd, slurmctld
# and, unless --keep-munge is given, munged if slurm-up.sh started it. Safe to run twice.
set -uo pipefail

STATE=${SMD_SLURM_DIR:-/tmp/smd-slurm}
KEEP_MUNGE=0
[ "${1:-}" = --keep-munge ] && KEEP_MUNGE=1

log() { echo "slurm-down: $*" >&2; }

alive() {
    local pid=$1 state
    [ -n "$pid" ] && [ -r "/proc/$pid/stat" ] || return 1
    state=$(sed -E 's/^[0-9]+ \(.*\) ([A-Za-z]).*/\1/' "/proc/$pid/stat" 2>/dev/null) || return 1
    [ "$state" != Z ] && [ "$state" != X ]
}
pid_of() { [ -s "$1" ] && tr -dc '0-9' <"$1" || true; }

CTLD_PID=$(pid_of "$STATE/slurmctld.pid")
if alive "$CTLD_PID" && command -v scancel >/dev/null 2>&1; then
    jobs=$(squeue -h -o %i 2>/dev/null | tr '\n' ' ')
    # shellcheck disable=SC2086  # one argument per job id
    [ -n "${jobs// /}" ] && scancel --quiet $jobs 2>/dev/null
    # Bounded wait for the jobs (and their CG state) to go away before slurmd stops.
    for _ in $(seq 40); do
        [ -z "$(squeue -h -o %i 2>/dev/null)" ] && break
        sleep 0.5
    done
    left=$(squeue -h -o %i 2>/dev/null | wc -l)
    [ "$left" -gt 0 ] && log "warning: $left job(s) still listed after cancelling"
fi

stop() {  # name, pid file
    local name=$1 file=$2 pid
    pid=$(pid_of "$file")
    if ! alive "$pid"; then
        rm -f "$file"
        return 0
    fi
    # A recycled PID would be somebody else's process: check the command name first.
    if ! grep -q "$name" "/proc/$pid/comm" 2>/dev/null; then
        log "pid $pid in $file is not $name; leaving it alone"
        rm -f "$file"
        return 0
    fi
    kill -TERM "$pid" 2>/dev/null
    for _ in $(seq 100); do alive "$pid" || break; sleep 0.1; done
    if alive "$pid"; then
        log "$name (pid $pid) ignored SIGTERM for 10 s; sending SIGKILL"
        kill -KILL "$pid" 2>/dev/null
        for _ in $(seq 50); do alive "$pid" || break; sleep 0.1; done
    fi
    rm -f "$file"
    log "stopped $name (pid $pid)"
}

stop slurmd "$STATE/slurmd.pid"
stop slurmctld "$STATE/slurmctld.pid"
[ "$KEEP_MUNGE" = 1 ] || stop munged "$STATE/munged.pid"
exit 0
