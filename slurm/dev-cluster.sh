#!/usr/bin/env bash
# dev-cluster.sh -- the project's SLURM 22.05 dev cluster for tests and demos, on Debian 12 (bookworm)
# without systemd (containers, CI machines, microVMs). Runs as root. One node by default; with
# SLURM_DEV_NODES=N (N > 1) N real slurmd nodes, each in its own network and UTS namespace.
#
#   bash slurm/dev-cluster.sh start    install packages (apt, once) + configure + start daemons + wait idle
#   bash slurm/dev-cluster.sh stop     stop the daemons this script started (by PID file), keep state;
#                                      multi-node: also delete its namespaces, veths and bridge
#   bash slurm/dev-cluster.sh clean    stop + delete state and logs (the next start is from scratch)
#   bash slurm/dev-cluster.sh status   daemons and sinfo; exit 0 only when every daemon runs
#   bash slurm/dev-cluster.sh restart  stop + start
#   bash slurm/dev-cluster.sh node-down devnode2   multi-node: kill that node's slurmd and every process
#                                      in its namespace (a crash); SLURM marks it DOWN after SlurmdTimeout
#   bash slurm/dev-cluster.sh node-up devnode2     multi-node: start its slurmd again, wait until it is idle
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
# With SLURM_DEV_NODES=N (N > 1), instead of the one slurmd on this host:
#   - a Linux bridge br-slurmdev with 10.77.0.1/24 on the host; slurmctld and slurmdbd are reached at
#     that address (from the host too), so the nodes' slurmd and their jobs reach them
#   - nodes devnode1..devnodeN: network namespace slurmdev-devnodeK with lo and eth0 10.77.0.(10+K)/24
#     (a veth to the bridge; default route via 10.77.0.1, which forwards nowhere), a UTS namespace
#     with hostname devnodeK, and its own slurmd (-N devnodeK; spool dir, pid file, log per node).
#     The nodes share this machine's filesystem (as a cluster shares NFS) and munged's socket
#   - /etc/hosts lines "10.77.0.1K devnodeK # slurm-dev" so node names resolve (removed by stop)
#   - every node advertises the machine's CPUs, memory and fake GPUs (oversubscribed N times)
#   - SlurmdTimeout=20: a dead node is DOWN 20-30 s after it died (its requeueable batch jobs are
#     requeued onto the other nodes); ReturnToService=2: it comes back when its slurmd registers
#   Switching between node counts: stop, then start with the other SLURM_DEV_NODES (start alone
#   also works: it stops the old nodes and regenerates the config).
#
# Environment knobs (all optional):
#   SLURM_DEV_NODES=1        number of nodes; > 1: one network + UTS namespace per node (see above)
#   SLURM_DEV_SUBNET=10.77.0 multi-node: the bridge's /24 (host .1, node K .(10+K)); must be unused here
#   SLURM_DEV_SLURMD_TIMEOUT=20  multi-node: seconds without an answer before a node is DOWN
#   SLURM_DEV_ACCOUNTING=1   1: MariaDB + slurmdbd (sacct works -> submitit sees job states)
#                            0: no accounting (sacct fails; submitit still gets results via pickles)
#   SLURM_DEV_GPUS=2         number of fake GPUs per node (GRES gpu, device files are symlinks to /dev/null)
#   SLURM_DEV_CPUS=<nproc>   CPUs advertised by each node; > nproc oversubscribes (config_overrides)
#   SLURM_DEV_INSTALL=1      0: never call apt-get (packages must already be there)
#   SLURM_DEV_CRED_EXPIRE=10 seconds a requeued job waits before it may restart (SLURM default 120)
#   SLURM_DEV_TIMEOUT=60     seconds to wait for the nodes to become idle
#   SLURM_DEV_SMOKE=1        run 'srun -N<nodes> true' once the nodes are idle (creates one job record)
#
# Files: /etc/slurm/{slurm,gres,slurmdbd}.conf (generated), state under /var/spool/slurm-dev
# (multi-node: slurmd spool dirs under nodes/<node>), logs under /var/log/slurm-dev (slurmd-<node>.log),
# pid files under /run/slurm-dev (slurmd-<node>.pid; `nodes` holds the node count last started).
# Timings on a 2-core machine: packages ~15 s (once), start from a clean state 3-7 s, already running
# ~1 s, stop ~2 s; 3 nodes: see slurm/README.md.
set -euo pipefail

NNODES=${SLURM_DEV_NODES:-1}
SUBNET=${SLURM_DEV_SUBNET:-10.77.0}
MN_SLURMD_TIMEOUT=${SLURM_DEV_SLURMD_TIMEOUT:-20}
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
# multi-node (SLURM_DEV_NODES > 1); every name below is created by this script and removed by stop
BRIDGE=br-slurmdev
BR_ADDR=$SUBNET.1                   # the host's address on the bridge: slurmctld, slurmdbd
NODE_PREFIX=devnode                 # node K: devnodeK, address $SUBNET.(10+K)
NS_PREFIX=slurmdev-                 # network namespace of node X: slurmdev-X
VETH_PREFIX=vsd-                    # host end of node X's veth: vsd-X (interface names: 15 chars at most)
HOSTS_TAG="# slurm-dev"             # marks the /etc/hosts lines this script wrote

log() { printf '[slurm-dev %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }
[ "$(id -u)" = 0 ] || die "must run as root"
case "$NNODES" in ''|*[!0-9]*|0) die "SLURM_DEV_NODES must be a whole number from 1 to 99, not '$NNODES'" ;; esac
[ "$NNODES" -le 99 ] || die "SLURM_DEV_NODES must be a whole number from 1 to 99, not '$NNODES'"
[[ $SUBNET =~ ^[0-9]{1,3}\.[0-9]{1,3}\.[0-9]{1,3}$ ]] || die "SLURM_DEV_SUBNET must be the first three numbers of an IPv4 /24 (e.g. 10.77.0), not '$SUBNET'"

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
multi() { [ "$NNODES" -gt 1 ]; }
node_list() {  # the slurmd nodes of a cluster of $NNODES nodes
  if multi; then local k; for k in $(seq 1 "$NNODES"); do echo "$NODE_PREFIX$k"; done; else echo "$HOST"; fi
}
node_addr() { echo "$SUBNET.$((10 + ${1#"$NODE_PREFIX"}))"; }   # node_addr devnodeK
slurmd_pidfile() { if multi; then echo "$RUN/slurmd-$1.pid"; else echo "$RUN/slurmd.pid"; fi; }
slurmd_logfile() { if multi; then echo "$LOG/slurmd-$1.log"; else echo "$LOG/slurmd.log"; fi; }
started_nodes() { cat "$RUN/nodes" 2>/dev/null || echo 1; }   # node count of the cluster last started

# ---------------------------------------------------------------- install
install_pkgs() {
  local pkgs=(munge slurmctld slurmd slurm-client)
  [ "$ACCOUNTING" = 1 ] && pkgs+=(slurmdbd mariadb-server)
  multi && pkgs+=(iproute2)
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
  echo "$NNODES" > "$RUN/nodes"
  local gres_node="" gres_files=""
  if [ "$NGPUS" -gt 0 ]; then
    local i
    for i in $(seq 0 $((NGPUS - 1))); do ln -sfn /dev/null "$FAKEGPU/nvidia$i"; done
    gres_node="Gres=gpu:$NGPUS"
    gres_files="Name=gpu File=$FAKEGPU/nvidia[0-$((NGPUS - 1))]"
  fi
  local overrides=""
  [ "$NCPUS" -gt "$REAL_CPUS" ] && overrides="SlurmdParameters=config_overrides"
  # what differs between one node on 127.0.0.1 and N namespaced nodes behind the bridge
  local title ctld acct_host slurmd_files slurmd_timeout nodes part_nodes n
  if multi; then
    title="$NNODES-node dev cluster (one network + UTS namespace per node), no cgroups, no systemd"
    ctld="# the bridge address: the nodes' slurmd (in their own network namespaces) reach it
SlurmctldHost=$HOST($BR_ADDR)"
    acct_host=$BR_ADDR
    # %n: the node name (slurmd -N), so every node has its own spool dir, pid file and log
    slurmd_files="SlurmdSpoolDir=$STATE/nodes/%n
SlurmctldPidFile=$RUN/slurmctld.pid
SlurmdPidFile=$RUN/slurmd-%n.pid
SlurmctldLogFile=$LOG/slurmctld.log
SlurmdLogFile=$LOG/slurmd-%n.log"
    slurmd_timeout=$MN_SLURMD_TIMEOUT
    nodes=""
    for n in $(node_list); do
      mkdir -p "$STATE/nodes/$n"
      nodes+="NodeName=$n NodeAddr=$(node_addr "$n") NodeHostname=$n CPUs=$NCPUS RealMemory=$realmem $gres_node State=UNKNOWN"$'\n'
    done
    nodes=${nodes%$'\n'}
    part_nodes="$NODE_PREFIX[1-$NNODES]"
  else
    title="single-node dev cluster, no cgroups, no systemd"
    ctld="# explicit 127.0.0.1: works even if the hostname does not resolve
SlurmctldHost=$HOST(127.0.0.1)"
    acct_host=localhost
    slurmd_files="SlurmdSpoolDir=$STATE/d
SlurmctldPidFile=$RUN/slurmctld.pid
SlurmdPidFile=$RUN/slurmd.pid
SlurmctldLogFile=$LOG/slurmctld.log
SlurmdLogFile=$LOG/slurmd.log"
    slurmd_timeout=60
    nodes="NodeName=$HOST NodeAddr=127.0.0.1 NodeHostname=$HOST CPUs=$NCPUS RealMemory=$realmem $gres_node State=UNKNOWN"
    part_nodes=$HOST
  fi
  local acct
  if [ "$ACCOUNTING" = 1 ]; then
    acct="AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=$acct_host
AccountingStoragePort=6819
AccountingStorageTRES=gres/gpu"
  else
    acct="AccountingStorageType=accounting_storage/none"
  fi
  cat > "$ETC/slurm.conf.new" <<EOF
# generated by slurm/dev-cluster.sh -- $title
ClusterName=$CLUSTER
$ctld
AuthType=auth/munge
CredType=cred/munge
# a requeued job may restart only cred_expire s after requeue (SLURM default 120 s)
AuthInfo=cred_expire=$CRED_EXPIRE
SlurmUser=slurm
SlurmdUser=root
SlurmctldPort=6817
SlurmdPort=6818
StateSaveLocation=$STATE/ctld
$slurmd_files
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
SlurmdTimeout=$slurmd_timeout
InactiveLimit=0
MinJobAge=300
KillWait=5
Waittime=0
$acct
JobCompType=jobcomp/none
GresTypes=gpu
$nodes
PartitionName=debug Nodes=$part_nodes Default=YES MaxTime=INFINITE State=UP
PartitionName=gpu Nodes=$part_nodes Default=NO MaxTime=INFINITE State=UP
EOF
  printf 'AutoDetect=off\n%s\n' "${gres_files:+NodeName=$part_nodes $gres_files}" > "$ETC/gres.conf.new"
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

# ---------------------------------------------------------------- multi-node network
set_hosts() {  # set_hosts <n>: the /etc/hosts lines of nodes 1..n (0: none), other lines untouched
  local tmp k; tmp=$(mktemp)
  grep -v " $HOSTS_TAG\$" /etc/hosts > "$tmp" || true
  for k in $(seq 1 "$1"); do echo "$SUBNET.$((10 + k)) $NODE_PREFIX$k $HOSTS_TAG" >> "$tmp"; done
  # rewritten in place, not renamed over: /etc/hosts is often a bind mount (containers)
  cmp -s "$tmp" /etc/hosts || cat "$tmp" > /etc/hosts
  rm -f "$tmp"
}
net_up() {  # the bridge, and per node a namespace with lo + eth0 (veth to the bridge); idempotent
  if ! ip link show "$BRIDGE" >/dev/null 2>&1; then
    local used
    used=$(ip -o -4 addr show | awk -v p="$SUBNET." 'index($4, p) == 1 {print $2}' | sort -u | tr '\n' ' ')
    [ -z "$used" ] || die "$SUBNET.0/24 is already in use here ($used): choose another SLURM_DEV_SUBNET"
    log "creating bridge $BRIDGE ($BR_ADDR/24) and $NNODES node namespaces"
    ip link add "$BRIDGE" type bridge
  fi
  ip addr replace "$BR_ADDR/24" dev "$BRIDGE"
  ip link set "$BRIDGE" up
  local n ns veth
  for n in $(node_list); do
    ns=$NS_PREFIX$n veth=$VETH_PREFIX$n
    [ -e "/run/netns/$ns" ] || ip netns add "$ns"
    if ! ip -n "$ns" link show eth0 >/dev/null 2>&1; then
      ip link del "$veth" 2>/dev/null || true
      ip link add "$veth" type veth peer name eth0 netns "$ns"
    fi
    ip link set "$veth" master "$BRIDGE" up
    ip -n "$ns" link set lo up
    ip -n "$ns" addr replace "$(node_addr "$n")/24" dev eth0
    ip -n "$ns" link set eth0 up
    # "which address is mine" probes (a UDP connect to a public address: Ray, Dask) then pick eth0
    ip -n "$ns" route replace default via "$BR_ADDR" dev eth0
  done
  set_hosts "$NNODES"
}
kill_ns() {  # kill_ns <namespace> <TERM|KILL>: every process in the network namespace (KILL: at once)
  local ns=$1 sig=$2 pids i
  pids=$(ip netns pids "$ns" 2>/dev/null | tr '\n' ' ')
  [ -n "${pids// /}" ] || return 0
  log "$ns: SIG$sig to $pids"
  kill -"$sig" $pids 2>/dev/null || true
  for i in $(seq 1 30); do
    [ -n "$(ip netns pids "$ns" 2>/dev/null)" ] || return 0
    sleep 0.1
  done
  pids=$(ip netns pids "$ns" 2>/dev/null | tr '\n' ' ')
  [ -z "${pids// /}" ] || { log "$ns: SIGKILL to $pids"; kill -KILL $pids 2>/dev/null || true; sleep 0.2; }
}
net_down() {  # every namespace (and what still runs in it), veth and bridge of this script
  local f ns veth
  for f in /run/netns/"$NS_PREFIX"*; do
    [ -e "$f" ] || continue
    ns=${f##*/}
    kill_ns "$ns" TERM
    log "deleting namespace $ns"; ip netns del "$ns"
  done
  for veth in $(ip -o link show 2>/dev/null | awk -F': ' '{print $2}' | cut -d@ -f1 | grep "^$VETH_PREFIX" || true); do
    ip link del "$veth" 2>/dev/null || true
  done
  if ip link show "$BRIDGE" >/dev/null 2>&1; then log "deleting bridge $BRIDGE"; ip link del "$BRIDGE"; fi
  if [ -e "$RUN/iptables-forward" ]; then
    iptables -D FORWARD -i "$BRIDGE" -o "$BRIDGE" -j ACCEPT 2>/dev/null || true; rm -f "$RUN/iptables-forward"
  fi
  grep -q " $HOSTS_TAG\$" /etc/hosts 2>/dev/null && set_hosts 0
  return 0
}
node_reaches() {  # node_reaches <from> <to>: a TCP connection from one node to the other's slurmd
  ip netns exec "$NS_PREFIX$1" timeout 3 bash -c "exec 3<>/dev/tcp/$(node_addr "$2")/6818" 2>/dev/null
}
check_bridge() {  # traffic between nodes crosses the bridge; br_netfilter + iptables FORWARD may drop it
  [ "$NNODES" -ge 2 ] || return 0
  node_reaches "${NODE_PREFIX}1" "${NODE_PREFIX}2" && return 0
  if [ "$(cat /proc/sys/net/bridge/bridge-nf-call-iptables 2>/dev/null)" = 1 ] && command -v iptables >/dev/null; then
    log "node traffic is filtered (net.bridge.bridge-nf-call-iptables=1, iptables FORWARD): accepting $BRIDGE -> $BRIDGE"
    iptables -C FORWARD -i "$BRIDGE" -o "$BRIDGE" -j ACCEPT 2>/dev/null || iptables -I FORWARD -i "$BRIDGE" -o "$BRIDGE" -j ACCEPT
    touch "$RUN/iptables-forward"
    node_reaches "${NODE_PREFIX}1" "${NODE_PREFIX}2" && return 0
  fi
  die "${NODE_PREFIX}1 cannot reach ${NODE_PREFIX}2 ($(node_addr "${NODE_PREFIX}2"):6818) across $BRIDGE (firewall?)"
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
  grep -qw "$CLUSTER" <<<"$(sacctmgr -n list cluster format=cluster)" || sacctmgr -i add cluster "$CLUSTER" >/dev/null
}
stop_slurmds() {  # every slurmd this script started: the host's and the namespaced nodes'
  local f n
  stop_pidfile "$RUN/slurmd.pid" slurmd slurmd
  for f in "$RUN"/slurmd-*.pid; do
    [ -e "$f" ] || continue
    n=${f#"$RUN"/slurmd-}; stop_pidfile "$f" slurmd "slurmd ${n%.pid}"
  done
}
any_slurmd_alive() {
  local f
  for f in "$RUN"/slurmd.pid "$RUN"/slurmd-*.pid; do pid_alive "$f" slurmd && return 0; done
  return 1
}
start_slurmctld() {
  if [ "$CONFIG_CHANGED" = 1 ] && pid_alive "$RUN/slurmctld.pid" slurmctld; then
    log "slurm.conf/gres.conf changed: restarting slurmctld + slurmd"
    stop_slurmds; stop_pidfile "$RUN/slurmctld.pid" slurmctld slurmctld
  fi
  if pid_alive "$RUN/slurmctld.pid" slurmctld; then log "slurmctld already running"
  else log "starting slurmctld"; /usr/sbin/slurmctld; fi
  wait_for 30 slurmctld bash -c 'scontrol ping | grep -q UP'
}
declare -A SLURMD_T0=()   # node -> when this run started its slurmd
start_slurmd() {  # start_slurmd <node>: on this host, or (multi-node) in the node's namespaces
  local n=$1
  if pid_alive "$(slurmd_pidfile "$n")" slurmd; then
    if multi; then log "slurmd $n already running"; else log "slurmd already running"; fi
    return 0
  fi
  SLURMD_T0[$n]=$(date +%s)
  if multi; then
    log "starting slurmd $n ($(node_addr "$n"), namespace $NS_PREFIX$n)"
    # joins the node's network namespace, plus a UTS namespace of its own for the hostname; slurmd
    # daemonizes inside both, and so do its slurmstepd and the jobs' processes. nsenter, not
    # `ip netns exec`: that one remounts /sys in a new mount namespace, without /sys/fs/cgroup, and
    # slurmd 22.05 then fails ("Unable to initialize cgroup plugin")
    nsenter --net="/run/netns/$NS_PREFIX$n" unshare --uts sh -c "hostname $n && exec /usr/sbin/slurmd -N $n" ||
      die "slurmd $n did not start: $(tail -3 "$(slurmd_logfile "$n")" 2>/dev/null | tr '\n' ' ')"
  else
    log "starting slurmd"; /usr/sbin/slurmd
  fi
}
node_state() { sinfo -h -N -n "$1" -o %T 2>/dev/null | sed -n 1p; }   # sed reads it all: no SIGPIPE under pipefail
slurmd_registered() {  # slurmd_registered <node>: after a (re)start slurmctld may report the node idle
  local t0=${SLURMD_T0[$1]:-}   # from saved state before the new slurmd registered: compare SlurmdStartTime
  [ -z "$t0" ] && return 0
  local t; t=$(scontrol show node "$1" 2>/dev/null | grep -o 'SlurmdStartTime=[^ ]*' | cut -d= -f2)
  [ -n "$t" ] && [ "$t" != None ] && [ "$(date -d "$t" +%s 2>/dev/null || echo 0)" -ge $((t0 - 1)) ]
}
wait_idle() {  # wait_idle <node>...: every node idle (or busy) and registered by the slurmd started now
  local end=$((SECONDS + WAIT_TIMEOUT)) s n left=("$@") pending
  local -A resumed=()
  while :; do
    pending=()
    for n in "${left[@]}"; do
      s=$(node_state "$n")
      case "$s" in
        idle|mixed|allocated) if slurmd_registered "$n"; then log "node $n is $s"; continue; fi ;;
        drain*|down*|inval*)  # stale state from an earlier config, or a node that was down: resume once
          if [ -z "${resumed[$n]:-}" ]; then log "node $n is $s ($(sinfo -h -N -n "$n" -o %E)), resuming"
            scontrol update nodename="$n" state=resume 2>/dev/null || true; resumed[$n]=1; fi ;;
      esac
      pending+=("$n")
    done
    [ ${#pending[@]} -eq 0 ] && return 0
    left=("${pending[@]}")
    [ $SECONDS -lt $end ] || {
      sinfo -N -l >&2; for n in "${left[@]}"; do tail -5 "$(slurmd_logfile "$n")" >&2 || true; done
      die "node(s) ${left[*]} not idle after ${WAIT_TIMEOUT}s (state '$s')"; }
    sleep 0.2
  done
}
all_idle() { local n; for n in "$@"; do [ "$(node_state "$n")" = idle ] || return 1; done; }

do_start() {
  local t0=$SECONDS
  install_pkgs
  local t1=$SECONDS was; was=$(started_nodes)
  if [ "$was" != "$NNODES" ]; then   # the other shape may still run: its slurmd(s), namespaces, bridge
    log "node count $was -> $NNODES: new config; stopping whatever still runs of the old one"
    # slurmctld first: its slurmdbd connection goes to the bridge address, and once that is gone
    # its shutdown hangs until SIGKILL
    stop_slurmds; stop_pidfile "$RUN/slurmctld.pid" slurmctld slurmctld; net_down
  fi
  write_config
  start_munge
  multi && net_up
  if [ "$ACCOUNTING" = 1 ]; then start_mariadb; start_slurmdbd; fi
  start_slurmctld
  local nodes n; mapfile -t nodes < <(node_list)
  for n in "${nodes[@]}"; do start_slurmd "$n"; done
  wait_idle "${nodes[@]}"
  multi && check_bridge
  if [ "${SLURM_DEV_SMOKE:-1}" = 1 ] && all_idle "${nodes[@]}"; then  # end-to-end: munge cred -> slurmd -> slurmstepd -> task
    srun --immediate=30 -t 1 -N "$NNODES" -J slurm-dev-smoke true || die "smoke test 'srun -N$NNODES true' failed"
  fi
  log "ready: packages $((t1 - t0))s, configure+daemons+node idle $((SECONDS - t1))s"
  if multi; then sinfo -N; else sinfo; fi
}
do_stop() {
  if pid_alive "$RUN/slurmctld.pid" slurmctld && any_slurmd_alive; then
    local ids; ids=$(squeue -h -o %A 2>/dev/null | tr '\n' ' ')
    if [ -n "${ids// /}" ]; then  # jobs of this dev cluster only: cancel so their slurmstepd/tasks exit
      log "cancelling jobs: $ids"; scancel --full $ids 2>/dev/null || true
      local end=$((SECONDS + 20)); while [ -n "$(squeue -h -o %A 2>/dev/null)" ] && [ $SECONDS -lt $end ]; do sleep 0.5; done
    fi
  fi
  stop_slurmds
  stop_pidfile "$RUN/slurmctld.pid" slurmctld slurmctld
  stop_pidfile "$RUN/slurmdbd.pid" slurmdbd slurmdbd
  stop_pidfile "$DBRUN/mysqld.pid" mariadbd mariadbd
  stop_pidfile "$RUN/munged.pid" munged munged   # only a munged this script started
  # slurmstepd processes of jobs that were still running exit when slurmd is gone / their job ends.
  # Multi-node: what still runs in the node namespaces, the namespaces, veths, bridge, /etc/hosts
  # lines -- last, since slurmctld's shutdown hangs once the bridge address it talks to is gone
  net_down
}
do_clean() {
  do_stop
  log "removing $STATE $LOG $RUN $DBRUN $FAKEGPU"
  rm -rf "$STATE" "$LOG" "$RUN" "$DBRUN" "$FAKEGPU"
}
do_status() {  # exit 0 only when every daemon of this cluster runs and the node answers
  NNODES=$(started_nodes)
  local f rc=0 n
  local daemons=(/run/munge/munged.pid:munged "$DBRUN/mysqld.pid:mariadbd" "$RUN/slurmdbd.pid:slurmdbd"
                 "$RUN/slurmctld.pid:slurmctld")
  for n in $(node_list); do daemons+=("$(slurmd_pidfile "$n"):slurmd"); done
  for f in "${daemons[@]}"; do
    local name=${f##*:} pf=${f%:*}
    if multi && [ "$name" = slurmd ]; then n=${pf##*/slurmd-}; name="slurmd ${n%.pid}"; fi
    if pid_alive "$pf" "${f##*:}"; then echo "$name: running (pid $(cat "$pf"))"
    else
      echo "$name: stopped"
      case "$name" in mariadbd|slurmdbd) [ "$ACCOUNTING" = 1 ] && rc=3 ;; *) rc=3 ;; esac
    fi
  done
  if multi; then
    for n in $(node_list); do
      if [ -e "/run/netns/$NS_PREFIX$n" ]; then echo "namespace $NS_PREFIX$n: $(node_addr "$n")"
      else echo "namespace $NS_PREFIX$n: missing"; rc=3; fi
    done
    sinfo -N 2>/dev/null || rc=3
  else
    sinfo 2>/dev/null || rc=3
  fi
  return $rc
}
node_cmd_check() {  # node_cmd_check <node>: a node of the running multi-node cluster
  NNODES=$(started_nodes)
  multi || die "node-down/node-up need a multi-node cluster (SLURM_DEV_NODES=3 bash $0 start); this one has 1 node"
  [ -n "${1:-}" ] || die "which node? one of: $(node_list | tr '\n' ' ')"
  # a here-string, not a pipe: under pipefail `grep -q` closing the pipe early fails the writer (SIGPIPE)
  grep -qx -- "$1" <<<"$(node_list)" || die "unknown node '$1': one of $(node_list | tr '\n' ' ')"
  [ -e "/run/netns/$NS_PREFIX$1" ] || die "namespace $NS_PREFIX$1 is missing: start the cluster first"
}
do_node_down() {  # a crash: SIGKILL to the node's slurmd, slurmstepd and job processes
  node_cmd_check "${1:-}"
  log "node $1 down: SIGKILL to every process in $NS_PREFIX$1 (slurmd, slurmstepd, tasks)"
  kill_ns "$NS_PREFIX$1" KILL
  rm -f "$(slurmd_pidfile "$1")"
  log "slurmctld marks $1 DOWN ~$((MN_SLURMD_TIMEOUT * 3 / 2)) s from now (SlurmdTimeout=$MN_SLURMD_TIMEOUT + a ping cycle); its requeueable batch jobs then go back to the queue"
}
do_node_up() {
  node_cmd_check "${1:-}"
  start_slurmd "$1"
  wait_idle "$1"
}

case "${1:-start}" in
  start) do_start ;;
  stop) do_stop ;;
  clean) do_clean ;;
  restart) do_stop; do_start ;;
  status) do_status ;;
  node-down) do_node_down "${2:-}" ;;
  node-up) do_node_up "${2:-}" ;;
  *) echo "usage: $0 {start|stop|clean|restart|status|node-down <node>|node-up <node>}" >&2; exit 2 ;;
esac
