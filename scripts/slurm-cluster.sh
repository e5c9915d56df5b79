#!/usr/bin/env bash
# A real one-node SLURM cluster (with accounting) on this machine, for the `slurm` tests.
#
#   scripts/slurm-cluster.sh start   # install what is missing (Debian packages), start, wait idle
#   scripts/slurm-cluster.sh stop    # stop exactly the daemons `start` started (PID files)
#   scripts/slurm-cluster.sh status
#   NB_SLURM_ACCOUNTING=0 scripts/slurm-cluster.sh start   # no slurmdbd: sacct cannot answer
#
# Needs root and Debian/Ubuntu (apt). No systemd: the daemons run in the background with PID
# files under $STATE (default /run/normbench-slurm). The cluster is named nbtest; its node is
# `hostname -s` with the machine's CPUs, partition `debug`.
set -euo pipefail

STATE=${NB_SLURM_STATE:-/run/normbench-slurm}
ACCOUNTING=${NB_SLURM_ACCOUNTING:-1}
CLUSTER=nbtest
DBPASS=nbtest-slurmdbd
PACKAGES=(munge slurmctld slurmd slurm-client slurmdbd mariadb-server)
HOST=$(hostname -s)
ETC=/etc/slurm
LOG=/var/log/slurm

say() { echo "slurm-cluster: $*" >&2; }

wait_for() {  # wait_for SECONDS DESCRIPTION COMMAND...
    local seconds=$1 what=$2; shift 2
    local deadline=$((SECONDS + seconds))
    until "$@" >/dev/null 2>&1; do
        if ((SECONDS >= deadline)); then
            say "timed out after ${seconds}s waiting for $what"
            return 1
        fi
        sleep 0.5
    done
}

install_missing() {
    local missing=()
    for pkg in "${PACKAGES[@]}"; do
        dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" \
            || missing+=("$pkg")
    done
    ((${#missing[@]} == 0)) && return 0
    say "installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

accounting_conf() {
    if [[ $ACCOUNTING == 0 ]]; then
        echo "AccountingStorageType=accounting_storage/none"
    else
        printf '%s\n' "AccountingStorageType=accounting_storage/slurmdbd" "AccountingStorageHost=localhost"
    fi
}

task_plugin() {
    # memory limits (and OUT_OF_MEMORY) need cgroups: v1's memory controller works without
    # systemd; elsewhere jobs run unconfined
    if [[ -w /sys/fs/cgroup/memory ]]; then echo task/cgroup; else echo task/none; fi
}

write_configs() {
    local cpus mem
    cpus=$(nproc)
    mem=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 * 8 / 10 ))  # 80% in MiB
    mkdir -p "$ETC" "$LOG" /var/lib/slurm/slurmctld /var/lib/slurm/slurmd "$STATE"
    mkdir -p "$STATE/mysql" "$STATE/munge"
    chown slurm:slurm "$STATE" "$LOG" /var/lib/slurm /var/lib/slurm/slurmctld /var/lib/slurm/slurmd
    chown mysql:mysql "$STATE/mysql"
    chown munge:munge "$STATE/munge"
    cat >"$ETC/slurm.conf" <<CONF
# written by normbench scripts/slurm-cluster.sh
ClusterName=$CLUSTER
SlurmctldHost=$HOST
SlurmUser=slurm
AuthType=auth/munge
# a requeued job (a time-out) may start again after this many seconds (default 120)
AuthInfo=cred_expire=5
StateSaveLocation=/var/lib/slurm/slurmctld
SlurmdSpoolDir=/var/lib/slurm/slurmd
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd.pid
SlurmctldLogFile=$LOG/slurmctld.log
SlurmdLogFile=$LOG/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=$(task_plugin)
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU_Memory
DefMemPerCPU=$((mem / cpus))
MpiDefault=none
$(accounting_conf)
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
ReturnToService=2
KillWait=5
MinJobAge=300
SchedulerParameters=sched_interval=2
NodeName=$HOST CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=$HOST Default=YES MaxTime=INFINITE State=UP
CONF
    printf '%s\n' "CgroupPlugin=cgroup/v1" "ConstrainRAMSpace=yes" "ConstrainSwapSpace=yes" \
        "AllowedSwapSpace=0" >"$ETC/cgroup.conf"
    cat >"$ETC/slurmdbd.conf" <<CONF
AuthType=auth/munge
DbdHost=localhost
SlurmUser=slurm
LogFile=$LOG/slurmdbd.log
PidFile=$STATE/slurmdbd.pid
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageUser=slurm
StoragePass=$DBPASS
StorageLoc=slurm_acct_db
CONF
    chown slurm:slurm "$ETC/slurmdbd.conf"
    chmod 600 "$ETC/slurmdbd.conf"
}

pidfile() {  # where each daemon started here writes its PID (a folder its user can write)
    case $1 in
        mariadbd) echo "$STATE/mysql/mariadbd.pid" ;;
        munged) echo "$STATE/munge/munged.pid" ;;
        *) echo "$STATE/$1.pid" ;;
    esac
}

running() {  # running NAME: its PID file names a live process
    local file pid
    file=$(pidfile "$1")
    [[ -s $file ]] && pid=$(cat "$file") && kill -0 "$pid" 2>/dev/null
}

start_mariadb() {
    running mariadbd && return 0
    mkdir -p /run/mysqld && chown mysql:mysql /run/mysqld
    [[ -d /var/lib/mysql/mysql ]] || mariadb-install-db --user=mysql >/dev/null
    mariadbd --user=mysql --bind-address=127.0.0.1 --pid-file="$(pidfile mariadbd)" \
        --socket=/run/mysqld/mysqld.sock >"$LOG/mariadbd.log" 2>&1 &
    wait_for 60 "mariadb" mysqladmin ping
    mysql -u root <<SQL
CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY '$DBPASS';
GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';
FLUSH PRIVILEGES;
SQL
}

start_munge() {
    running munged && return 0
    mkdir -p /run/munge && chown munge:munge /run/munge
    [[ -s /etc/munge/munge.key ]] || { mungekey --create 2>/dev/null || create-munge-key -f; }
    chown munge:munge /etc/munge/munge.key && chmod 400 /etc/munge/munge.key
    # munged daemonizes itself; its PID file is written by it
    runuser -u munge -- munged --force --pid-file="$(pidfile munged)"
    wait_for 20 "munged" test -s "$(pidfile munged)"
    wait_for 20 "munge credentials" bash -c "munge -n | unmunge"
}

start_slurm() {
    if [[ $ACCOUNTING != 0 ]]; then
        if ! running slurmdbd; then
            slurmdbd
            wait_for 60 "slurmdbd" sacctmgr -n show cluster
        fi
        sacctmgr -n show cluster format=cluster | grep -qw "$CLUSTER" \
            || sacctmgr -i add cluster "$CLUSTER" >/dev/null
    fi
    running slurmctld || slurmctld
    wait_for 60 "slurmctld" scontrol ping
    running slurmd || slurmd
    wait_for 90 "the node to be idle" bash -c "sinfo -h -N -o %T | grep -qx idle"
}

start() {
    local t0=$SECONDS
    [[ $(id -u) == 0 ]] || { say "start needs root"; exit 1; }
    install_missing
    local t1=$SECONDS
    write_configs
    [[ $ACCOUNTING == 0 ]] || start_mariadb
    start_munge
    start_slurm
    say "up: node $HOST idle (install $((t1 - t0)) s, start $((SECONDS - t1)) s)"
}

stop() {
    # only the daemons whose PID files this script keeps: SIGTERM to all (slurmd first), then
    # wait up to 30 s for each, SIGKILL for one that is still there
    local name file pid pids=()
    for name in slurmd slurmctld slurmdbd munged mariadbd; do
        file=$(pidfile "$name")
        [[ -s $file ]] || continue
        pid=$(cat "$file")
        if kill -0 "$pid" 2>/dev/null; then
            kill -TERM "$pid"
            pids+=("$name:$pid")
        fi
        rm -f "$file"
    done
    local deadline=$((SECONDS + 30))
    for entry in "${pids[@]}"; do
        name=${entry%%:*} pid=${entry#*:}
        while kill -0 "$pid" 2>/dev/null && ((SECONDS < deadline)); do sleep 0.2; done
        if kill -0 "$pid" 2>/dev/null; then
            say "$name ($pid) ignored SIGTERM for 30 s; SIGKILL"
            kill -KILL "$pid"
        fi
    done
    say "stopped"
}

status() {
    local name
    for name in mariadbd munged slurmdbd slurmctld slurmd; do
        if running "$name"; then echo "$name: running ($(cat "$(pidfile "$name")"))"; else echo "$name: stopped"; fi
    done
    sinfo -h -N -o "%N %T" 2>/dev/null || true
}

case ${1:-} in
    start) start ;;
    stop) stop ;;
    status) status ;;
    *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
