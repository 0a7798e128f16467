#!/usr/bin/env bash
# A real one-node Slurm for the tests: Debian's slurmctld + slurmd with auth/none (no munge).
#
#   bash scripts/slurm_test_cluster.sh start   # install if missing (root), start, wait until idle
#   bash scripts/slurm_test_cluster.sh stop    # cancel its jobs, stop both daemons by their PIDs
#
# Everything lives in $MEGAMIX_SLURM_DIR (default /tmp/megamix-slurm): slurm.conf rendered from
# slurm/test_cluster.conf.in, state, spool, logs and the daemons' PID files.  Clients find the
# cluster through SLURM_CONF, which `start` prints as an export line.  Test machines only: the
# cluster trusts anyone who can reach its ports.
set -euo pipefail
cd "$(dirname "$0")/.."

dir="${MEGAMIX_SLURM_DIR:-/tmp/megamix-slurm}"
conf="$dir/slurm.conf"
cpus="${MEGAMIX_SLURM_CPUS:-8}"
ctld_port="${MEGAMIX_SLURM_PORT:-6817}"

install_slurm() {
    command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v sbatch >/dev/null && return
    if [[ $(id -u) != 0 ]]; then
        echo "slurm_test_cluster: Slurm is not installed and installing it needs root" >&2
        exit 1
    fi
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    # The packages' own services stay off: we start the daemons ourselves with our config.
    apt-get install -y -qq --no-install-recommends slurmctld slurmd slurm-client >/dev/null
}

wait_for_exit() {  # PID, seconds
    local pid=$1 deadline=$((SECONDS + $2))
    while kill -0 "$pid" 2>/dev/null; do
        ((SECONDS < deadline)) || return 1
        sleep 0.2
    done
}

start() {
    install_slurm
    if [[ -f $dir/slurmctld.pid ]] && kill -0 "$(cat "$dir/slurmctld.pid")" 2>/dev/null; then
        echo "slurm_test_cluster: already running (stop it first)" >&2
        exit 1
    fi
    local host addr
    host=$(hostname -s)
    addr=$(getent hosts "$host" | awk '{print $1; exit}')
    mkdir -p "$dir/state" "$dir/spool"
    sed -e "s|@HOST@|$host|g" -e "s|@ADDR@|${addr:-127.0.0.1}|g" -e "s|@DIR@|$dir|g" \
        -e "s|@CPUS@|$cpus|g" -e "s|@CTLD_PORT@|$ctld_port|g" -e "s|@SLURMD_PORT@|$((ctld_port + 1))|g" \
        slurm/test_cluster.conf.in >"$conf"
    export SLURM_CONF=$conf
    slurmctld -c -f "$conf"  # -c: start from a clean state; daemonizes and writes its PID file
    slurmd -f "$conf"
    local deadline=$((SECONDS + 60)) state=""
    while ((SECONDS < deadline)); do
        state=$(sinfo -h -N -o %t 2>/dev/null || true)
        [[ $state == idle ]] && break
        if [[ $state == drain* || $state == down* ]]; then
            scontrol update nodename="$host" state=resume 2>/dev/null || true
        fi
        sleep 0.5
    done
    if [[ $state != idle ]]; then
        echo "slurm_test_cluster: node not idle after 60 s (state '$state'); see $dir/*.log" >&2
        stop
        exit 1
    fi
    echo "export SLURM_CONF=$conf"
}

stop() {
    export SLURM_CONF=$conf
    if [[ -f $conf ]]; then
        scancel --user="$(id -un)" 2>/dev/null || true
    fi
    # slurmd first, so no new job steps start; each daemon by the PID it wrote.
    local name pid
    for name in slurmd slurmctld; do
        [[ -f $dir/$name.pid ]] || continue
        pid=$(cat "$dir/$name.pid")
        if kill "$pid" 2>/dev/null && ! wait_for_exit "$pid" 20; then
            kill -9 "$pid" 2>/dev/null || true
        fi
        rm -f "$dir/$name.pid"
    done
}

case "${1:-}" in
    start) start ;;
    stop) stop ;;
    *) echo "usage: $0 start|stop   (state in \$MEGAMIX_SLURM_DIR, default /tmp/megamix-slurm)" >&2; exit 2 ;;
esac
