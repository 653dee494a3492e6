#!/usr/bin/env bash
# A one-node SLURM cluster on this machine, for the `slurm` tests and for trying configs/launch/slurm.sbatch and
# `gpo-trl sweep --emit-slurm` by hand. Needs root (slurmd runs as root; jobs run as the submitting user).
#
#   scripts/local_slurm.sh start    # installs slurm-wlm + munge with apt-get if missing, starts munged/slurmctld/slurmd
#   scripts/local_slurm.sh status   # exit 0 when the node answers and is idle or allocated
#   scripts/local_slurm.sh stop     # stops what `start` started (munged only if `start` started it)
#   scripts/local_slurm.sh env      # prints `export SLURM_CONF=...`: eval "$(scripts/local_slurm.sh env)"
#
# Every file (slurm.conf, state, spool, logs, pids) lives in $GPO_SLURM_DIR (default /tmp/gpo-slurm). Client commands
# (sbatch, squeue, scontrol, srun) find the cluster through SLURM_CONF=$GPO_SLURM_DIR/slurm.conf; jobs inherit it.
# Idempotent: `start` on a running cluster only checks it; concurrent calls are serialised by a lock.
set -euo pipefail

DIR=${GPO_SLURM_DIR:-/tmp/gpo-slurm}
CONF=$DIR/slurm.conf
NODE=$(hostname -s)

say() { echo "local_slurm: $*" >&2; }
fail() { say "$*"; exit 1; }

install_packages() {
    command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v munged >/dev/null && return 0
    [ "$(id -u)" -eq 0 ] || fail "slurm-wlm/munge are not installed and installing them needs root"
    command -v apt-get >/dev/null || fail "slurm-wlm/munge are not installed and there is no apt-get to install them"
    say "installing slurm-wlm and munge with apt-get"
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -qq slurm-wlm munge >"$DIR/apt.log" 2>&1 \
        || { apt-get update -qq >>"$DIR/apt.log" 2>&1 && apt-get install -y -qq slurm-wlm munge >>"$DIR/apt.log" 2>&1; } \
        || fail "apt-get install slurm-wlm munge failed; see $DIR/apt.log"
}

munge_works() { munge -n 2>/dev/null | unmunge >/dev/null 2>&1; }

start_munge() {
    munge_works && return 0
    mkdir -p /run/munge /var/log/munge /var/lib/munge
    chown munge:munge /run/munge /var/log/munge /var/lib/munge
    if [ ! -s /etc/munge/munge.key ]; then
        mkdir -p /etc/munge
        mungekey --create --keyfile /etc/munge/munge.key >/dev/null 2>&1 \
            || dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 2>/dev/null
        chown munge:munge /etc/munge/munge.key && chmod 400 /etc/munge/munge.key
    fi
    local runner=(runuser -u munge --)
    command -v runuser >/dev/null || runner=(su -s /bin/sh munge -c)
    daemon "${runner[@]}" /usr/sbin/munged --force
    touch "$DIR/started-munged"
    for _ in $(seq 50); do munge_works && return 0; sleep 0.1; done
    fail "munged did not start"
}

write_conf() {
    # The node as slurmd sees it (CPUs, sockets, cores, threads), with RealMemory 90% of the total: a node whose
    # configured memory exceeds what slurmd finds is drained.
    local hardware memory
    hardware=$(slurmd -C | head -n 1 | tr ' ' '\n' | grep -E '^(CPUs|Boards|SocketsPerBoard|CoresPerSocket|ThreadsPerCore)=' | tr '\n' ' ')
    memory=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 * 9 / 10 ))
    cat >"$CONF" <<EOF
# Written by scripts/local_slurm.sh: a one-node cluster for tests.
ClusterName=gpo
SlurmctldHost=$NODE
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
JobRequeue=1
ReturnToService=2
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2

InactiveLimit=0
KillWait=30
MinJobAge=300
SlurmctldTimeout=30
SlurmdTimeout=60
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.pid
SlurmctldLogFile=$DIR/slurmctld.log
SlurmdLogFile=$DIR/slurmd.log
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPort=${GPO_SLURMCTLD_PORT:-6817}
SlurmdPort=${GPO_SLURMD_PORT:-6818}
JobCompType=jobcomp/none
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
NodeName=$NODE ${hardware}RealMemory=$memory State=UNKNOWN
PartitionName=debug Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
EOF
}

# Daemons get no terminal output and not the lock's descriptor (held open, it would block every later call).
daemon() { "$@" </dev/null >>"$DIR/daemons.out" 2>&1 9>&-; }

alive() { [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

node_ready() {
    local state
    state=$(SLURM_CONF=$CONF sinfo -h -n "$NODE" -o %t 2>/dev/null) || return 1
    case $state in idle*|alloc*|mix*|comp*) return 0;; *) return 1;; esac
}

start() {
    mkdir -p "$DIR/state" "$DIR/spool"
    install_packages
    start_munge
    if alive "$DIR/slurmctld.pid" && alive "$DIR/slurmd.pid" && node_ready; then
        say "already running ($CONF)"; return 0
    fi
    [ -f "$CONF" ] || write_conf
    alive "$DIR/slurmctld.pid" || daemon slurmctld -f "$CONF" || fail "slurmctld did not start; see $DIR/slurmctld.log"
    alive "$DIR/slurmd.pid" || daemon slurmd -f "$CONF" || fail "slurmd did not start; see $DIR/slurmd.log"
    for _ in $(seq 120); do
        if node_ready; then say "running: export SLURM_CONF=$CONF"; return 0; fi
        sleep 0.5
    done
    fail "node $NODE did not become idle in 60 s: $(SLURM_CONF=$CONF sinfo -h -N -o '%N %t %E' 2>&1); see $DIR/*.log"
}

stop() {
    local pid name
    for name in slurmd slurmctld; do
        if alive "$DIR/$name.pid"; then
            pid=$(cat "$DIR/$name.pid")
            kill "$pid"
            for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        fi
    done
    if [ -f "$DIR/started-munged" ] && [ -s /run/munge/munged.pid ]; then
        kill "$(cat /run/munge/munged.pid)" 2>/dev/null || true
        rm -f "$DIR/started-munged"
    fi
    say "stopped"
}

status() {
    if alive "$DIR/slurmctld.pid" && alive "$DIR/slurmd.pid" && node_ready; then
        SLURM_CONF=$CONF sinfo -N; return 0
    fi
    say "not running"; return 1
}

mkdir -p "$DIR"
exec 9>"$DIR/.lock"
flock 9
case ${1:-} in
    start) start;;
    stop) stop;;
    status) status;;
    env) echo "export SLURM_CONF=$CONF";;
    *) echo "usage: $0 start|stop|status|env" >&2; exit 2;;
esac
