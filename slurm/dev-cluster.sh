#!/usr/bin/env bash
# dev-cluster.sh -- the project's one-node SLURM 22.05 cluster for tests and demos, on Debian 12
# (bookworm) without systemd (containers, CI machines, microVMs). Runs as root.
#
#   bash slurm/dev-cluster.sh start    install packages (apt, once) + configure + start daemons + wait idle
#   bash slurm/dev-cluster.sh stop     stop the daemons this script started (by PID file), keep state
#   bash slurm/dev-cluster.sh clean    stop + delete state and logs (the next start is from scratch)
#   bash slurm/dev-cluster.sh status   daemons and sinfo; exit 0 only when every daemon runs
#   bash slurm/dev-cluster.sh restart  stop + start
#
# Every command is idempotent: start on a running cluster checks it and returns in ~1 s; stop on a
# stopped one does nothing. What it builds:
#   - munged, slurmctld, slurmd on this host (127.0.0.1), no cgroups, no systemd units
#   - partitions `debug` (default) and `gpu`, both on this node
#   - fake GPUs: GRES gpu:N whose File= entries are symlinks to /dev/null, so `--gpus-per-node=1`
#     schedules and the job sees CUDA_VISIBLE_DEVICES, while torch sees no CUDA (jobs fall back to CPU)
#   - accounting: a private MariaDB on 127.0.0.1:3307 + slurmdbd, so `sacct` works; submitit reads
#     job states through sacct (without it a cancelled job's state is UNKNOWN and result() hangs)
#   - AuthInfo=cred_expire=10: a requeued (preempted / timed-out) job restarts after ~11 s, not ~120 s
#
# Environment knobs (all optional):
#   SLURM_DEV_ACCOUNTING=1   1: MariaDB + slurmdbd (sacct works -> submitit sees job states)
#                            0: no accounting (sacct fails; submitit still gets results via pickles)
#   SLURM_DEV_GPUS=2         number of fake GPUs (GRES gpu, device files are symlinks to /dev/null)
#   SLURM_DEV_CPUS=<nproc>   CPUs advertised by the node; > nproc oversubscribes (config_overrides)
#   SLURM_DEV_INSTALL=1      0: never call apt-get (packages must already be there)
#   SLURM_DEV_CRED_EXPIRE=10 seconds a requeued job waits before it may restart (SLURM default 120)
#   SLURM_DEV_TIMEOUT=60     seconds to wait for the node to become idle
#   SLURM_DEV_SMOKE=1        run 'srun true' once the node is idle (creates one job record)
#
# Files: /etc/slurm/{slurm,gres,slurmdbd}.conf (generated), state under /var/spool/slurm-dev,
# logs under /var/log/slurm-dev, pid files under /run/slurm-dev. Timings on a 2-core machine:
# packages ~15 s (once), start from a clean state 3-7 s, already running ~1 s, stop ~2 s.
set -euo pipefail

ACCOUNTING=${SLURM_DEV_ACCOUNTING:-1}
NGPUS=${SLURM_DEV_GPUS:-2}
INSTALL=${SLURM_DEV_INSTALL:-1}
CRED_EXPIRE=${SLURM_DEV_CRED_EXPIRE:-10}
WAIT_TIMEOUT=${SLURM_DEV_TIMEOUT:-60}
REAL_CPUS=$(nproc --all)
NCPUS=${SLURM_DEV_CPUS:-$REAL_CPUS}

CLUSTER=devcluster
HOST=$(hostname -s)
ETC=/etc/slurm
STATE=/var/spool/slurm-dev          # slurmctld + slurmd state, private MariaDB datadir
RUN=/run/slurm-dev                  # pid files of the slurm daemons
DBRUN=/run/slurm-dev-mysql          # pid file + socket of the private MariaDB
LOG=/var/log/slurm-dev
FAKEGPU=/var/lib/slurm-dev-fakegpu  # fake GPU "device files"
DB_PORT=3307                        # private MariaDB, 127.0.0.1 only
DB_PASS=slurmdev

log() { printf '[slurm-dev %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }
[ "$(id -u)" = 0 ] || die "must run as root"

# ---------------------------------------------------------------- helpers
running() {  # running <pid>: alive and not a zombie (daemons are re-parented to PID 1,
               # which may reap them only seconds later; kill -0 succeeds on zombies)
  local st
  st=$(awk '{print $3}' /proc/"$1"/stat 2>/dev/null) || return 1
  [ -n "$st" ] && [ "$st" != Z ] && [ "$st" != X ]
}
pid_alive() {  # pid_alive <pidfile> <comm>: true if the pid in the file is running and is <comm>
  local f=$1 comm=$2 pid
  [ -s "$f" ] || return 1
  pid=$(cat "$f" 2>/dev/null) || return 1
  [ -n "$pid" ] && running "$pid" && [ "$(cat /proc/"$pid"/comm 2>/dev/null)" = "$comm" ]
}
wait_for() {  # wait_for <seconds> <description> <command...>
  local t=$1 what=$2; shift 2
  local end=$((SECONDS + t))
  until "$@" >/dev/null 2>&1; do
    [ $SECONDS -lt $end ] || die "timeout after ${t}s waiting for $what"
    sleep 0.2
  done
}
stop_pidfile() {  # stop_pidfile <pidfile> <comm> <name>
  local f=$1 comm=$2 name=$3 pid i
  if pid_alive "$f" "$comm"; then
    pid=$(cat "$f"); log "stopping $name (pid $pid)"
    kill -TERM "$pid" 2>/dev/null || true
    for i in $(seq 1 150); do running "$pid" || break; sleep 0.1; done
    if running "$pid"; then log "$name did not exit after 15 s, SIGKILL"; kill -KILL "$pid" || true; fi
  fi
  rm -f "$f"
}

# ---------------------------------------------------------------- install
install_pkgs() {
  local pkgs=(munge slurmctld slurmd slurm-client)
  [ "$ACCOUNTING" = 1 ] && pkgs+=(slurmdbd mariadb-server)
  local missing=() p
  for p in "${pkgs[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
  [ ${#missing[@]} -eq 0 ] && return 0
  [ "$INSTALL" = 1 ] || die "missing packages: ${missing[*]} (SLURM_DEV_INSTALL=0)"
  log "apt-get install ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  # policy-rc.d (exit 101) in Docker-like images keeps postinst from starting services;
  # without it invoke-rc.d would try to start them via /etc/init.d -- harmless, we stop nothing we did not start.
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

# ---------------------------------------------------------------- config
write_config() {
  local memtotal_mb realmem
  memtotal_mb=$(awk '/^MemTotal:/ {print int($2/1024)}' /proc/meminfo)
  realmem=$(( memtotal_mb * 95 / 100 ))            # a bit below the real value
  mkdir -p "$ETC" "$STATE/ctld" "$STATE/d" "$RUN" "$LOG" "$FAKEGPU"
  chown slurm:slurm "$STATE/ctld" "$LOG" "$RUN"
  local gres_node="" gres_lines=""
  if [ "$NGPUS" -gt 0 ]; then
    local i
    for i in $(seq 0 $((NGPUS - 1))); do ln -sfn /dev/null "$FAKEGPU/nvidia$i"; done
    gres_node="Gres=gpu:$NGPUS"
    gres_lines="NodeName=$HOST Name=gpu File=$FAKEGPU/nvidia[0-$((NGPUS - 1))]"
  fi
  local overrides=""
  [ "$NCPUS" -gt "$REAL_CPUS" ] && overrides="SlurmdParameters=config_overrides"
  local acct
  if [ "$ACCOUNTING" = 1 ]; then
    acct="AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStoragePort=6819
AccountingStorageTRES=gres/gpu"
  else
    acct="AccountingStorageType=accounting_storage/none"
  fi
  cat > "$ETC/slurm.conf.new" <<EOF
# generated by slurm/dev-cluster.sh -- single-node dev cluster, no cgroups, no systemd
ClusterName=$CLUSTER
# explicit 127.0.0.1: works even if the hostname does not resolve
SlurmctldHost=$HOST(127.0.0.1)
AuthType=auth/munge
CredType=cred/munge
# a requeued job may restart only cred_expire s after requeue (SLURM default 120 s)
AuthInfo=cred_expire=$CRED_EXPIRE
SlurmUser=slurm
SlurmdUser=root
SlurmctldPort=6817
SlurmdPort=6818
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/d
SlurmctldPidFile=$RUN/slurmctld.pid
SlurmdPidFile=$RUN/slurmd.pid
SlurmctldLogFile=$LOG/slurmctld.log
SlurmdLogFile=$LOG/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
# container friendly: no cgroup plugins at all
ProctrackType=proctrack/linuxproc
TaskPlugin=task/affinity
JobAcctGatherType=jobacct_gather/none
MpiDefault=none
SwitchType=switch/none
$overrides
SchedulerType=sched/backfill
SchedulerParameters=batch_sched_delay=0,sched_interval=2,bf_interval=5
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU_Memory
DefMemPerCPU=1024
ReturnToService=2
MessageTimeout=10
SlurmctldTimeout=30
SlurmdTimeout=60
InactiveLimit=0
MinJobAge=300
KillWait=5
Waittime=0
$acct
JobCompType=jobcomp/none
GresTypes=gpu
NodeName=$HOST NodeAddr=127.0.0.1 NodeHostname=$HOST CPUs=$NCPUS RealMemory=$realmem $gres_node State=UNKNOWN
PartitionName=debug Nodes=$HOST Default=YES MaxTime=INFINITE State=UP
PartitionName=gpu Nodes=$HOST Default=NO MaxTime=INFINITE State=UP
EOF
  printf 'AutoDetect=off\n%s\n' "$gres_lines" > "$ETC/gres.conf.new"
  CONFIG_CHANGED=0
  cmp -s "$ETC/slurm.conf.new" "$ETC/slurm.conf" && cmp -s "$ETC/gres.conf.new" "$ETC/gres.conf" || CONFIG_CHANGED=1
  mv "$ETC/slurm.conf.new" "$ETC/slurm.conf"; mv "$ETC/gres.conf.new" "$ETC/gres.conf"
  if [ "$ACCOUNTING" = 1 ]; then
    cat > "$ETC/slurmdbd.conf" <<EOF
AuthType=auth/munge
DbdHost=localhost
DbdPort=6819
SlurmUser=slurm
LogFile=$LOG/slurmdbd.log
PidFile=$RUN/slurmdbd.pid
DebugLevel=info
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$DB_PORT
StorageUser=slurm
StoragePass=$DB_PASS
StorageLoc=slurm_acct_db
EOF
    chown slurm:slurm "$ETC/slurmdbd.conf"; chmod 600 "$ETC/slurmdbd.conf"
  fi
}

# ---------------------------------------------------------------- daemons
start_munge() {
  [ -s /etc/munge/munge.key ] || { log "creating munge key"; mungekey --create --keyfile=/etc/munge/munge.key; }
  chown munge:munge /etc/munge /etc/munge/munge.key; chmod 700 /etc/munge; chmod 400 /etc/munge/munge.key
  mkdir -p /run/munge /var/log/munge /var/lib/munge
  chown munge:munge /run/munge /var/log/munge /var/lib/munge; chmod 755 /run/munge
  if pid_alive /run/munge/munged.pid munged; then log "munged already running (pid $(cat /run/munge/munged.pid))"; else
    log "starting munged"; rm -f /run/munge/munged.pid
    runuser -u munge -- /usr/sbin/munged    # daemonizes, writes /run/munge/munged.pid
    wait_for 10 "munged pid file" test -s /run/munge/munged.pid
    cp /run/munge/munged.pid "$RUN/munged.pid"   # remember that this one is ours (stop only ours)
  fi
  wait_for 20 munged bash -c 'munge -n | unmunge'
}
start_mariadb() {
  local dd=$STATE/mysql
  if [ ! -d "$dd/mysql" ]; then
    log "initializing private MariaDB datadir $dd"
    mkdir -p "$dd"; chown mysql:mysql "$dd"
    mariadb-install-db --user=mysql --datadir="$dd" --skip-test-db --auth-root-authentication-method=socket >"$LOG/mariadb-install.log" 2>&1
  fi
  mkdir -p "$DBRUN"; chown mysql:mysql "$DBRUN"
  if pid_alive "$DBRUN/mysqld.pid" mariadbd; then log "mariadbd already running"; else
    log "starting mariadbd (127.0.0.1:$DB_PORT)"
    setsid /usr/sbin/mariadbd --no-defaults --user=mysql --datadir="$dd" --pid-file="$DBRUN/mysqld.pid" \
      --socket="$DBRUN/mysqld.sock" --bind-address=127.0.0.1 --port=$DB_PORT \
      --innodb-buffer-pool-size=128M --innodb-lock-wait-timeout=900 --log-error="$dd/mariadb.err" \
      </dev/null >/dev/null 2>&1 &
  fi
  wait_for 60 mariadbd mariadb-admin --no-defaults --socket="$DBRUN/mysqld.sock" ping
  mariadb --no-defaults --socket="$DBRUN/mysqld.sock" -e "CREATE DATABASE IF NOT EXISTS slurm_acct_db;
    CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY '$DB_PASS';
    CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY '$DB_PASS';
    GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1'; GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';"
}
start_slurmdbd() {
  if pid_alive "$RUN/slurmdbd.pid" slurmdbd; then log "slurmdbd already running"; else
    log "starting slurmdbd"; /usr/sbin/slurmdbd
  fi
  wait_for 60 slurmdbd sacctmgr -n list cluster
  sacctmgr -n list cluster format=cluster | grep -qw "$CLUSTER" || sacctmgr -i add cluster "$CLUSTER" >/dev/null
}
start_slurmctld() {
  if [ "$CONFIG_CHANGED" = 1 ] && pid_alive "$RUN/slurmctld.pid" slurmctld; then
    log "slurm.conf/gres.conf changed: restarting slurmctld + slurmd"
    stop_pidfile "$RUN/slurmd.pid" slurmd slurmd; stop_pidfile "$RUN/slurmctld.pid" slurmctld slurmctld
  fi
  if pid_alive "$RUN/slurmctld.pid" slurmctld; then log "slurmctld already running"
  else log "starting slurmctld"; /usr/sbin/slurmctld; fi
  wait_for 30 slurmctld bash -c 'scontrol ping | grep -q UP'
}
SLURMD_T0=""
start_slurmd() {
  if pid_alive "$RUN/slurmd.pid" slurmd; then log "slurmd already running"; else
    log "starting slurmd"; SLURMD_T0=$(date +%s); /usr/sbin/slurmd; fi
}
node_state() { sinfo -h -N -n "$HOST" -o %T 2>/dev/null | head -1; }
slurmd_registered() {  # after a (re)start slurmctld may report the node idle from saved state
  [ -z "$SLURMD_T0" ] && return 0   # before the new slurmd registered: compare SlurmdStartTime
  local t; t=$(scontrol show node "$HOST" 2>/dev/null | grep -o 'SlurmdStartTime=[^ ]*' | cut -d= -f2)
  [ -n "$t" ] && [ "$t" != None ] && [ "$(date -d "$t" +%s 2>/dev/null || echo 0)" -ge $((SLURMD_T0 - 1)) ]
}
wait_idle() {
  local end=$((SECONDS + WAIT_TIMEOUT)) s resumed=0
  while :; do
    s=$(node_state)
    case "$s" in
      idle|mixed|allocated) if slurmd_registered; then log "node $HOST is $s"; return 0; fi ;;
      drain*|down*|inval*)  # stale state from an earlier config: resume once
        if [ $resumed = 0 ]; then log "node $HOST is $s ($(sinfo -h -N -n "$HOST" -o %E)), resuming"
          scontrol update nodename="$HOST" state=resume || true; resumed=1; fi ;;
    esac
    [ $SECONDS -lt $end ] || { sinfo -N -l >&2; tail -5 "$LOG/slurmd.log" >&2; die "node not idle after ${WAIT_TIMEOUT}s (state '$s')"; }
    sleep 0.2
  done
}

do_start() {
  local t0=$SECONDS
  install_pkgs
  local t1=$SECONDS
  write_config
  start_munge
  if [ "$ACCOUNTING" = 1 ]; then start_mariadb; start_slurmdbd; fi
  start_slurmctld
  start_slurmd
  wait_idle
  if [ "${SLURM_DEV_SMOKE:-1}" = 1 ] && [ "$(node_state)" = idle ]; then  # end-to-end: munge cred -> slurmd -> slurmstepd -> task
    srun --immediate=30 -t 1 -J slurm-dev-smoke true || die "smoke test 'srun true' failed"
  fi
  log "ready: packages $((t1 - t0))s, configure+daemons+node idle $((SECONDS - t1))s"
  sinfo
}
do_stop() {
  if pid_alive "$RUN/slurmctld.pid" slurmctld && pid_alive "$RUN/slurmd.pid" slurmd; then
    local ids; ids=$(squeue -h -o %A 2>/dev/null | tr '\n' ' ')
    if [ -n "${ids// /}" ]; then  # jobs of this dev cluster only: cancel so their slurmstepd/tasks exit
      log "cancelling jobs: $ids"; scancel --full $ids 2>/dev/null || true
      local end=$((SECONDS + 20)); while [ -n "$(squeue -h -o %A 2>/dev/null)" ] && [ $SECONDS -lt $end ]; do sleep 0.5; done
    fi
  fi
  stop_pidfile "$RUN/slurmd.pid" slurmd slurmd
  stop_pidfile "$RUN/slurmctld.pid" slurmctld slurmctld
  stop_pidfile "$RUN/slurmdbd.pid" slurmdbd slurmdbd
  stop_pidfile "$DBRUN/mysqld.pid" mariadbd mariadbd
  stop_pidfile "$RUN/munged.pid" munged munged   # only a munged this script started
  # slurmstepd processes of jobs that were still running exit when slurmd is gone / their job ends
}
do_clean() {
  do_stop
  log "removing $STATE $LOG $RUN $DBRUN $FAKEGPU"
  rm -rf "$STATE" "$LOG" "$RUN" "$DBRUN" "$FAKEGPU"
}
do_status() {  # exit 0 only when every daemon of this cluster runs and the node answers
  local f rc=0
  for f in /run/munge/munged.pid:munged "$DBRUN/mysqld.pid:mariadbd" "$RUN/slurmdbd.pid:slurmdbd" \
           "$RUN/slurmctld.pid:slurmctld" "$RUN/slurmd.pid:slurmd"; do
    if pid_alive "${f%%:*}" "${f##*:}"; then echo "${f##*:}: running (pid $(cat "${f%%:*}"))"
    else
      echo "${f##*:}: stopped"
      case "${f##*:}" in mariadbd|slurmdbd) [ "$ACCOUNTING" = 1 ] && rc=3 ;; *) rc=3 ;; esac
    fi
  done
  sinfo 2>/dev/null || rc=3
  return $rc
}

case "${1:-start}" in
  start) do_start ;;
  stop) do_stop ;;
  clean) do_clean ;;
  restart) do_stop; do_start ;;
  status) do_status ;;
  *) echo "usage: $0 {start|stop|clean|restart|status}" >&2; exit 2 ;;
esac
