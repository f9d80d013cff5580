#!/usr/bin/env bash
# A one-node SLURM cluster on localhost, for tests/cluster/test_slurm.py (Debian, as root).
#
#   tests/cluster/slurm.sh install   apt-get install slurm-wlm munge (Debian's packages)
#   tests/cluster/slurm.sh start     write the configuration under $SLURM_TEST_DIR, start munged,
#                                    slurmctld and slurmd, wait until the node is idle
#   tests/cluster/slurm.sh check     health check: munge round trip, controller up, node idle,
#                                    a batch job runs and is recorded in the job-completion log
#   tests/cluster/slurm.sh stop      cancel the cluster's jobs, stop the daemons that `start`
#                                    started (by their recorded pids) and remove $SLURM_TEST_DIR
#   tests/cluster/slurm.sh up        install + start + check
#   tests/cluster/slurm.sh logs      print the end of the daemons' logs (for failed CI runs)
#
# Everything lives in $SLURM_TEST_DIR (default /tmp/pipeline-slurm): slurm.conf, the munge socket,
# state, spool, logs and the job-completion log (jobcomp.txt). /etc/slurm/slurm.conf becomes a link
# to that slurm.conf (`stop` removes it; `start` refuses to replace a file that is not its link):
# clients must find the configuration without SLURM_CONF, because the executor plugin's job step
# clears every SLURM_* variable before its nested srun. Otherwise /etc is only touched to create
# a munge key when the package did not. No systemd is needed: the daemons are started by hand.
set -euo pipefail

DIR=${SLURM_TEST_DIR:-/tmp/pipeline-slurm}
CONF=$DIR/slurm.conf
SYSTEM_CONF=/etc/slurm/slurm.conf
MUNGE_SOCKET=$DIR/munge/munge.socket
PORT=${SLURM_TEST_PORT:-6817}  # slurmctld; slurmd listens on PORT+1
STARTED=$DIR/started           # "name pid" of every daemon this script started

say() { printf 'slurm.sh: %s\n' "$*" >&2; }
die() { say "error: $*"; exit 1; }
need_root() { [ "$(id -u)" = 0 ] || die "run as root (the daemons run as root and munge)"; }

install_packages() {
    need_root
    command -v apt-get >/dev/null || die "apt-get not found: this script installs Debian's slurm-wlm"
    if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v munged >/dev/null; then
        say "slurm-wlm and munge are already installed"
        return
    fi
    local t0=$SECONDS
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends slurm-wlm munge >/dev/null
    say "installed slurm-wlm and munge in $((SECONDS - t0)) s"
}

# Is the daemon `name` recorded in $STARTED still running under that pid?
alive() {
    local name=$1 pid
    pid=$(awk -v n="$name" '$1 == n {print $2}' "$STARTED" 2>/dev/null)
    [ -n "$pid" ] && [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$name" ]
}

record() {  # record NAME PIDFILE: remember the pid a daemon wrote after forking
    local name=$1 pidfile=$2 i
    for i in $(seq 50); do
        if [ -s "$pidfile" ] && [ "$(cat "/proc/$(cat "$pidfile")/comm" 2>/dev/null)" = "$name" ]; then
            echo "$name $(cat "$pidfile")" >>"$STARTED"
            return
        fi
        sleep 0.1
    done
    die "$name did not start; its log: $(ls "$DIR"/log/"$name"*.log "$DIR"/munge/munged.log 2>/dev/null | head -1)"
}

write_config() {
    local cpus mem
    cpus=$(nproc)
    mem=$(slurmd -C | sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p')
    [ -n "$mem" ] || die "slurmd -C did not report the memory of this machine"
    cat >"$CONF" <<EOF
# One-node test cluster written by tests/cluster/slurm.sh.
ClusterName=pipelinetest
SlurmctldHost=$(hostname -s)(127.0.0.1)
SlurmctldPort=$PORT
SlurmdPort=$((PORT + 1))
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$MUNGE_SOCKET
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
# No cgroups in a container: track processes through /proc, no task binding.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
# Cores and memory are consumable: several jobs share the node, each within its request.
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=1000
SchedulerType=sched/backfill
ReturnToService=2
# Finished jobs stay visible to squeue for 5 minutes: the executor plugin's squeue status
# command needs MinJobAge >= 3 x its init-seconds-before-status-checks.
MinJobAge=300
KillWait=5
# No slurmdbd: sacct has no data; every finished job is appended to a text file instead.
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/filetxt
JobCompLoc=$DIR/jobcomp.txt
NodeName=localhost NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=main Nodes=localhost Default=YES MaxTime=INFINITE State=UP
EOF
}

ours() { [ -L "$SYSTEM_CONF" ] && [ "$(readlink "$SYSTEM_CONF")" = "$CONF" ]; }

start_cluster() {
    need_root
    command -v slurmctld >/dev/null || die "slurmctld not found: run '$0 install' first"
    if [ -f "$STARTED" ] && alive slurmctld && alive slurmd && alive munged; then
        say "already running (state in $DIR)"
        return
    fi
    [ ! -e "$STARTED" ] || die "$DIR holds a cluster that is not fully running: run '$0 stop' first"
    if [ -e "$SYSTEM_CONF" ] && ! ours; then
        die "$SYSTEM_CONF exists and is not this script's link: this machine has a SLURM configuration; not replacing it"
    fi
    local t0=$SECONDS
    mkdir -p "$DIR"/{state,spool,log,munge}
    chmod 0755 "$DIR"
    : >"$STARTED"
    write_config
    mkdir -p "$(dirname "$SYSTEM_CONF")"
    ln -sfn "$CONF" "$SYSTEM_CONF"

    if [ ! -s /etc/munge/munge.key ]; then
        say "creating the munge key /etc/munge/munge.key"
        mungekey --create --keyfile=/etc/munge/munge.key
    fi
    chown munge:munge /etc/munge/munge.key
    chmod 0400 /etc/munge/munge.key
    chown munge:munge "$DIR/munge"
    chmod 0755 "$DIR/munge"
    runuser -u munge -- munged --socket="$MUNGE_SOCKET" --pid-file="$DIR/munge/munged.pid" \
        --log-file="$DIR/munge/munged.log" --seed-file="$DIR/munge/munged.seed" \
        || die "munged failed: $(tail -3 "$DIR/munge/munged.log" 2>/dev/null)"
    record munged "$DIR/munge/munged.pid"

    slurmctld -i -f "$CONF" || die "slurmctld failed: $(tail -5 "$DIR/log/slurmctld.log" 2>/dev/null)"
    record slurmctld "$DIR/slurmctld.pid"
    slurmd -N localhost -f "$CONF" || die "slurmd failed: $(tail -5 "$DIR/log/slurmd.log" 2>/dev/null)"
    record slurmd "$DIR/slurmd.pid"

    local i state=""
    for i in $(seq 60); do
        state=$(sinfo -h -N -n localhost -o %T 2>/dev/null || true)
        [ "$state" = idle ] && break
        sleep 0.5
    done
    [ "$state" = idle ] || die "node localhost is '${state:-unknown}', not idle, after 30 s; see $DIR/log"
    say "started munged, slurmctld and slurmd in $((SECONDS - t0)) s (configuration: $SYSTEM_CONF -> $CONF)"
}

check_cluster() {
    ours || die "no cluster configured by this script ($SYSTEM_CONF is not a link to $CONF): run '$0 start' first"
    munge -S "$MUNGE_SOCKET" -n | unmunge -S "$MUNGE_SOCKET" >/dev/null || die "munge round trip failed"
    scontrol ping | grep -q UP || die "slurmctld does not answer: $(scontrol ping 2>&1)"
    local state
    state=$(sinfo -h -N -n localhost -o %T)
    [ "$state" = idle ] || [ "$state" = mixed ] || die "node localhost is '$state'"
    local out job
    out=$(srun --job-name=health-check --mem=100 sh -c 'echo "job $SLURM_JOB_ID ran on $(hostname)"' 2>&1) \
        || die "health-check job failed: $out"
    job=$(echo "$out" | sed -n 's/^job \([0-9]*\) ran on .*/\1/p')
    [ -n "$job" ] || die "health-check job wrote: $out"
    local i
    for i in $(seq 20); do
        grep -q "JobId=$job .*JobState=COMPLETED" "$DIR/jobcomp.txt" 2>/dev/null && break
        sleep 0.25
    done
    grep -q "JobId=$job .*JobState=COMPLETED" "$DIR/jobcomp.txt" \
        || die "job $job is missing from the job-completion log $DIR/jobcomp.txt"
    say "healthy: munge, slurmctld, node localhost ($(sinfo -h -N -n localhost -o '%c CPUs, %m MB')); job $job completed"
}

stop_cluster() {
    if [ ! -f "$STARTED" ]; then
        say "nothing to stop: $STARTED does not exist"
        if ours; then rm -f "$SYSTEM_CONF"; fi
        rm -rf "$DIR"
        return
    fi
    if alive slurmctld; then  # every job of this private cluster is the test's
        scancel --full --state=RUNNING,PENDING 2>/dev/null || true
    fi
    local name pid i
    for name in slurmd slurmctld munged; do
        alive "$name" || continue
        pid=$(awk -v n="$name" '$1 == n {print $2}' "$STARTED")
        kill -TERM "$pid"
        for i in $(seq 100); do
            [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$name" ] || break
            sleep 0.1
        done
        if [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$name" ]; then
            say "$name ($pid) did not stop in 10 s; killing it"
            kill -KILL "$pid"
        fi
        say "stopped $name ($pid)"
    done
    if ours; then rm -f "$SYSTEM_CONF"; fi
    rm -rf "$DIR"
}

show_logs() {
    local f
    for f in "$DIR"/log/slurmctld.log "$DIR"/log/slurmd.log "$DIR"/munge/munged.log "$DIR"/jobcomp.txt; do
        [ -f "$f" ] || continue
        echo "==> $f <=="
        tail -n 40 "$f"
    done
}

case ${1:-} in
    install) install_packages ;;
    start) start_cluster ;;
    check) check_cluster ;;
    stop) stop_cluster ;;
    up) install_packages; start_cluster; check_cluster ;;
    logs) show_logs ;;
    *) sed -n '2,20p' "$0" >&2; exit 2 ;;
esac
