#!/usr/bin/env bash
# A SLURM cluster on this machine, for the `slurm` tests and for trying configs/launch/slurm.sbatch and
# `gpo-trl sweep --emit-slurm` by hand. Needs root (slurmd runs as root; jobs run as the submitting user).
#
#   scripts/local_slurm.sh start    # installs slurm-wlm + munge with apt-get if missing, starts munged/slurmctld/slurmd
#   scripts/local_slurm.sh status   # exit 0 when every node answers and is idle or allocated
#   scripts/local_slurm.sh stop     # stops what `start` started (munged only if `start` started it)
#   scripts/local_slurm.sh env      # prints `export SLURM_CONF=...`: eval "$(scripts/local_slurm.sh env)"
#
# Every file (slurm.conf, state, spool, logs, pids) lives in $GPO_SLURM_DIR (default /tmp/gpo-slurm). Client commands
# (sbatch, squeue, scontrol, srun) find the cluster through SLURM_CONF=$GPO_SLURM_DIR/slurm.conf; jobs inherit it.
# Idempotent: `start` on a running cluster only checks it; concurrent calls are serialised by a lock.
#
# GPO_SLURM_NODES=2: two nodes on this one host (two slurmd, each with half the CPUs, on ports P and P+1), for
# `sbatch --nodes 2`. The second node needs a name that resolves to this host (srun and the ranks' rendezvous use
# node names as host names): $GPO_SLURM_NODE2, else another name of 127.0.0.1 in /etc/hosts. Another cluster on the
# same machine needs its own GPO_SLURM_DIR, GPO_SLURMCTLD_PORT (default 6817) and GPO_SLURMD_PORT (default 6818).
set -euo pipefail

DIR=${GPO_SLURM_DIR:-/tmp/gpo-slurm}
CONF=$DIR/slurm.conf
NODE=$(hostname -s)
NODES=${GPO_SLURM_NODES:-1}

say() { echo "local_slurm: $*" >&2; }
fail() { say "$*"; exit 1; }

install_packages() {
    command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v munged >/dev/null && return 0
    [ "$(id -u)" -eq 0 ] || fail "slurm-wlm/munge are not installed and installing them needs root"
    command -v apt-get >/dev/null || fail "slurm-wlm/munge are not installed and there is no apt-get to install them"
    say "installing slurm-wlm and munge with apt-get"
    export DEBIAN_FRONTEND=noninteractive
    local log=$DIR/apt.log
    apt-get install -y -qq slurm-wlm munge >"$log" 2>&1 \
        || { apt-get update -qq >>"$log" 2>&1 && apt-get install -y -qq slurm-wlm munge >>"$log" 2>&1; } \
        || fail "apt-get install slurm-wlm munge failed; see $DIR/apt.log"
}

# Daemons get no terminal output and not the lock's descriptor (held open, it would block every later call).
daemon() { "$@" </dev/null >>"$DIR/daemons.out" 2>&1 9>&-; }

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

second_node() {  # another name of this host, for a second slurmd
    if [ -n "${GPO_SLURM_NODE2:-}" ]; then echo "$GPO_SLURM_NODE2"; return; fi
    awk -v me="$NODE" '$1 == "127.0.0.1" { for (i = 2; i <= NF; i++) if ($i != me && $i !~ /localhost/) print $i }' \
        /etc/hosts | head -n 1
}

node_names() {
    if [ "$NODES" -eq 1 ]; then echo "$NODE"; return; fi
    [ "$NODES" -eq 2 ] || fail "GPO_SLURM_NODES must be 1 or 2, got $NODES"
    local other
    other=$(second_node)
    [ -n "$other" ] || fail "GPO_SLURM_NODES=2 needs a second name of this host: none in /etc/hosts besides $NODE" \
        "and localhost (set GPO_SLURM_NODE2 to one that resolves here)"
    echo "$NODE $other"
}

write_conf() {
    # One node: as slurmd sees it (CPUs, sockets, cores, threads). Two: half the CPUs each. RealMemory 90% of the
    # total, shared: a node whose configured memory exceeds what slurmd finds is drained.
    local hardware memory names name port
    memory=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 * 9 / 10 / NODES ))
    if [ "$NODES" -eq 1 ]; then
        hardware=$(slurmd -C | head -n 1 | tr ' ' '\n' \
            | grep -E '^(CPUs|Boards|SocketsPerBoard|CoresPerSocket|ThreadsPerCore)=' | tr '\n' ' ')
    else
        hardware="CPUs=$(( $(nproc) / 2 > 0 ? $(nproc) / 2 : 1 )) "
    fi
    names=$(node_names)
    cat >"$CONF" <<EOF
# Written by scripts/local_slurm.sh: a cluster of $NODES node(s) on this host, for tests.
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
InactiveLimit=0
KillWait=30
MinJobAge=300
SlurmctldTimeout=30
SlurmdTimeout=60
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd-%n.pid
SlurmctldLogFile=$DIR/slurmctld.log
SlurmdLogFile=$DIR/slurmd-%n.log
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool-%n
SlurmctldPort=${GPO_SLURMCTLD_PORT:-6817}
JobCompType=jobcomp/none
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
EOF
    port=${GPO_SLURMD_PORT:-6818}
    for name in $names; do
        echo "NodeName=$name NodeAddr=127.0.0.1 Port=$port ${hardware}RealMemory=$memory State=UNKNOWN" >>"$CONF"
        port=$((port + 1))
    done
    echo "PartitionName=debug Nodes=$(echo $names | tr ' ' ',') Default=YES MaxTime=INFINITE State=UP" >>"$CONF"
}

alive() { [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

configured_nodes() { sed -n 's/^NodeName=\([^ ]*\) .*/\1/p' "$CONF" 2>/dev/null; }

all_alive() {
    alive "$DIR/slurmctld.pid" || return 1
    local name
    for name in $(configured_nodes); do alive "$DIR/slurmd-$name.pid" || return 1; done
}

nodes_ready() {  # every node idle, allocated or mixed
    local states
    states=$(SLURM_CONF=$CONF sinfo -h -N -o %t 2>/dev/null) || return 1
    [ -n "$states" ] && ! echo "$states" | grep -qvE '^(idle|alloc|mix|comp)'
}

start() {
    mkdir -p "$DIR/state"
    install_packages
    start_munge
    if [ -f "$CONF" ] && [ "$(configured_nodes | wc -l)" -eq "$NODES" ] && all_alive && nodes_ready; then
        say "already running ($CONF)"; return 0
    fi
    stop_daemons  # whatever part of an earlier cluster still runs (perhaps with another number of nodes)
    write_conf
    daemon slurmctld -f "$CONF" || fail "slurmctld did not start; see $DIR/slurmctld.log"
    local name
    for name in $(configured_nodes); do
        daemon slurmd -f "$CONF" -N "$name" || fail "slurmd ($name) did not start; see $DIR/slurmd-$name.log"
    done
    for _ in $(seq 120); do
        if nodes_ready; then say "running ($NODES node(s)): export SLURM_CONF=$CONF"; return 0; fi
        sleep 0.5
    done
    fail "the nodes did not become idle in 60 s: $(SLURM_CONF=$CONF sinfo -h -N -o '%N %t %E' 2>&1); see $DIR/*.log"
}

stop_pid() {
    local pid
    alive "$1" || return 0
    pid=$(cat "$1")
    kill "$pid"
    for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.1; done
}

stop_daemons() {
    local name
    for name in $(configured_nodes); do stop_pid "$DIR/slurmd-$name.pid"; done
    stop_pid "$DIR/slurmctld.pid"
}

stop() {
    stop_daemons
    # munged only if `start` started it, and no other SLURM still runs on this machine
    if [ -f "$DIR/started-munged" ] && [ -s /run/munge/munged.pid ] && ! pgrep -x slurmctld >/dev/null; then
        kill "$(cat /run/munge/munged.pid)" 2>/dev/null || true
    fi
    rm -f "$DIR/started-munged"
    say "stopped"
}

status() {
    if [ -f "$CONF" ] && all_alive && nodes_ready; then
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
