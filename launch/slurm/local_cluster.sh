#!/usr/bin/env bash
# A real SLURM cluster on this machine, from Debian's packages, for dqt's tests and for trying
# the batch scripts: munged (as user munge), slurmctld and slurmd (as root); by default one node
# with this machine's CPUs; ProctrackType=proctrack/linuxproc, TaskPlugin=task/none. Config,
# state, spool and logs live under $DQT_SLURM_DIR (default /tmp/dqt-slurm), nothing in /etc is
# touched, and the daemons are stopped by the process ids they recorded at start.
#
#   launch/slurm/local_cluster.sh install   # apt-get install slurmctld slurmd slurm-client munge
#   launch/slurm/local_cluster.sh start     # idempotent; prints the line to eval:
#   eval "$(launch/slurm/local_cluster.sh env)"   # export SLURM_CONF for sbatch/squeue/scontrol
#   launch/slurm/local_cluster.sh status    # exit 0 when every daemon runs and the nodes are up
#   launch/slurm/local_cluster.sh stop      # cancel the jobs, stop the daemons by their pids
#
# Needs root (munged runs as its own user; slurmd runs jobs as their submitter). Environment:
#   DQT_SLURM_DIR        state directory (default /tmp/dqt-slurm; munge must be able to enter it)
#   DQT_SLURMCTLD_PORT   slurmctld's port (default 16817; not SLURM's 6817, so a system SLURM
#                        can coexist)
#   DQT_SLURMD_PORT      the first slurmd's port (default 16818; node i uses this + i - 1)
#   DQT_SLURM_NODES      nodes, each a slurmd of its own on this machine sharing its CPUs
#                        (default 1): a multi-node cluster for multi-node jobs
set -euo pipefail

DIR=${DQT_SLURM_DIR:-/tmp/dqt-slurm}
CTLD_PORT=${DQT_SLURMCTLD_PORT:-16817}
SLURMD_PORT=${DQT_SLURMD_PORT:-16818}
NODES=${DQT_SLURM_NODES:-1}
CONF=$DIR/slurm.conf
MUNGE_SOCKET=$DIR/munge/munge.socket
PACKAGES=(slurmctld slurmd slurm-client munge)

die() { echo "local_cluster: $*" >&2; exit 1; }
log() { echo "local_cluster: $*" >&2; }

need_root() {
  [[ $(id -u) == 0 ]] || die "needs root (munged runs as user munge, slurmd as root); run it with sudo"
}

need_packages() {
  local missing=() exe
  for exe in munged slurmctld slurmd sbatch srun scontrol sinfo; do
    command -v "$exe" >/dev/null || missing+=("$exe")
  done
  ((${#missing[@]} == 0)) || die "missing ${missing[*]}: run '$0 install' (apt-get install ${PACKAGES[*]})"
}

# Node names: this machine's name for one node, <name>-n1 ... <name>-nN for several.
node_names() {
  local host i
  host=$(hostname -s)
  if ((NODES == 1)); then echo "$host"; else for ((i = 1; i <= NODES; i++)); do echo "$host-n$i"; done; fi
}

pidfile() {  # the pid file a daemon writes: munged, slurmctld, or slurmd:<node>
  case $1 in
    munged) echo "$DIR/munge/munged.pid" ;;
    slurmctld) echo "$DIR/run/slurmctld.pid" ;;
    slurmd:*) echo "$DIR/run/slurmd-${1#slurmd:}.pid" ;;
  esac
}

daemons() {  # in start order
  echo munged
  echo slurmctld
  local n
  for n in $(node_names); do echo "slurmd:$n"; done
}

# the pid recorded by a daemon, if that process is alive and is that program
live_pid() {
  local f pid
  f=$(pidfile "$1")
  [[ -s $f ]] || return 1
  pid=$(tr -dc 0-9 <"$f")
  [[ -n $pid && -d /proc/$pid ]] || return 1
  [[ $(cat "/proc/$pid/comm" 2>/dev/null) == "${1%%:*}"* ]] || return 1
  echo "$pid"
}

wait_for() {  # wait_for SECONDS COMMAND...: until COMMAND succeeds
  local deadline=$((SECONDS + $1))
  shift
  until "$@" >/dev/null 2>&1; do
    ((SECONDS < deadline)) || return 1
    sleep 0.2
  done
}

write_conf() {
  local host cpus tmp=$CONF.partial i=0 n
  host=$(hostname -s)
  cpus=$(($(nproc) / NODES))
  ((cpus >= 1)) || cpus=1
  {
    cat <<CONF
# written by launch/slurm/local_cluster.sh: $NODES node(s) on this machine
ClusterName=dqt-local
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire: how long a job credential lives, and so how long SLURM holds a requeued job
# before it may start again on the node that revoked it (default 120 s)
AuthInfo=socket=$MUNGE_SOCKET,cred_expire=10
StateSaveLocation=$DIR/ctld
SlurmdSpoolDir=$DIR/spool/%n
SlurmctldPidFile=$(pidfile slurmctld)
SlurmdPidFile=$DIR/run/slurmd-%n.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd-%n.log
JobCompType=jobcomp/filetxt
JobCompLoc=$DIR/log/jobcomp.txt
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/builtin
SchedulerParameters=sched_interval=2
MpiDefault=none
ReturnToService=2
SlurmdParameters=config_overrides
# scancel, scontrol requeue and preemption SIGTERM a job; it has this long to checkpoint
KillWait=60
MinJobAge=3600
InactiveLimit=0
SlurmctldTimeout=60
SlurmdTimeout=300
CONF
    for n in $(node_names); do
      echo "NodeName=$n NodeHostname=$host NodeAddr=127.0.0.1 Port=$((SLURMD_PORT + i)) CPUs=$cpus State=UNKNOWN"
      i=$((i + 1))
    done
    echo "PartitionName=debug Nodes=$(node_names | paste -sd,) Default=YES MaxTime=INFINITE State=UP"
  } >"$tmp"
  mv "$tmp" "$CONF"
}

start_munged() {
  live_pid munged >/dev/null && return
  mkdir -p "$DIR/munge"
  chown munge:munge "$DIR/munge"
  chmod 0755 "$DIR/munge"  # clients (slurm, jobs) connect to the socket in here
  if [[ ! -s $DIR/munge/munge.key ]]; then
    dd if=/dev/urandom of="$DIR/munge/munge.key.partial" bs=1024 count=1 status=none
    chown munge:munge "$DIR/munge/munge.key.partial"
    chmod 0400 "$DIR/munge/munge.key.partial"
    mv "$DIR/munge/munge.key.partial" "$DIR/munge/munge.key"
  fi
  rm -f "$MUNGE_SOCKET" "$MUNGE_SOCKET.lock"
  runuser -u munge -- munged --socket="$MUNGE_SOCKET" --key-file="$DIR/munge/munge.key" \
    --pid-file="$(pidfile munged)" --log-file="$DIR/munge/munged.log" \
    --seed-file="$DIR/munge/munged.seed" \
    || die "munged did not start; see $DIR/munge/munged.log"
  wait_for 10 bash -c "munge -n -S '$MUNGE_SOCKET' | unmunge -S '$MUNGE_SOCKET'" \
    || die "munged does not answer on $MUNGE_SOCKET; see $DIR/munge/munged.log"
}

start_slurmctld() {
  live_pid slurmctld >/dev/null && return
  rm -rf "$DIR/ctld"  # a cold start is a fresh cluster: no jobs or node state from before
  mkdir -p "$DIR/ctld"
  slurmctld -f "$CONF" || die "slurmctld did not start; see $DIR/log/slurmctld.log"
  wait_for 20 scontrol ping || die "slurmctld does not answer on port $CTLD_PORT; see $DIR/log/slurmctld.log"
}

start_slurmd() {  # start_slurmd NODE
  live_pid "slurmd:$1" >/dev/null && return
  rm -rf "$DIR/spool/$1"
  mkdir -p "$DIR/spool/$1"
  slurmd -f "$CONF" -N "$1" || die "slurmd for node $1 did not start; see $DIR/log/slurmd-$1.log"
}

nodes_up() {
  local states
  states=$(sinfo -h -N -o %T 2>/dev/null) || return 1
  [[ $(grep -cE '^(idle|mixed|allocated)' <<<"$states") == "$NODES" ]]
}

cmd_start() {
  need_root
  need_packages
  [[ $NODES =~ ^[1-9][0-9]*$ ]] || die "DQT_SLURM_NODES must be a positive integer, got '$NODES'"
  # jobs reach the nodes, and torchrun's rendezvous the first node, through this machine
  getent hosts "$(hostname -s)" >/dev/null \
    || die "this machine's name '$(hostname -s)' does not resolve; add it to /etc/hosts"
  mkdir -p "$DIR/run" "$DIR/log" "$DIR/spool"
  chmod 0755 "$DIR"
  write_conf
  export SLURM_CONF=$CONF
  start_munged
  start_slurmctld
  local n
  for n in $(node_names); do start_slurmd "$n"; done
  wait_for 30 nodes_up || die "nodes did not come up: $(sinfo -h -N -o '%N %T %E' 2>&1); see $DIR/log/"
  local d summary=""
  for d in $(daemons); do summary+=" $d $(live_pid "$d"),"; done
  log "up:${summary%,}; $NODES node(s) x $(($(nproc) / NODES > 0 ? $(nproc) / NODES : 1)) CPU(s)"
  echo "export SLURM_CONF=$CONF"
}

cmd_stop() {
  need_root
  export SLURM_CONF=$CONF
  if live_pid slurmctld >/dev/null; then
    local jobs
    jobs=$(squeue -h -o %A 2>/dev/null || true)
    if [[ -n $jobs ]]; then
      log "cancelling jobs: $(echo $jobs)"
      scancel $jobs 2>/dev/null || true
      wait_for 90 bash -c '[[ -z $(squeue -h -o %A) ]]' || log "jobs still listed: $(squeue -h 2>&1)"
    fi
  fi
  local d pid stop_order
  stop_order=$(daemons | tac)  # slurmd(s), slurmctld, munged
  for d in $stop_order; do
    if pid=$(live_pid "$d"); then
      kill -TERM "$pid" 2>/dev/null || true
      if ! wait_for 15 bash -c "[[ ! -d /proc/$pid ]]"; then
        log "$d ($pid) ignored SIGTERM; sending SIGKILL"
        kill -KILL "$pid" 2>/dev/null || true
      fi
      log "stopped $d ($pid)"
    fi
    rm -f "$(pidfile "$d")"
  done
}

cmd_status() {
  export SLURM_CONF=$CONF
  local ok=0 d pid
  for d in $(daemons); do
    if pid=$(live_pid "$d"); then echo "$d: running (pid $pid)"; else echo "$d: stopped"; ok=1; fi
  done
  if ((ok == 0)) && nodes_up; then
    sinfo -N -o "%N %T %C"
  else
    ok=1
  fi
  return $ok
}

cmd_install() {
  need_root
  local guard="" rc=0
  # Debian's postinst scripts would start the system's own munged (and try slurmd); this
  # cluster uses its own config, key and socket, so keep the system services from starting.
  if [[ ! -e /usr/sbin/policy-rc.d ]]; then
    printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
    chmod +x /usr/sbin/policy-rc.d
    guard=1
  fi
  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${PACKAGES[@]}" >/dev/null; } || rc=$?
  [[ -z $guard ]] || rm -f /usr/sbin/policy-rc.d
  ((rc == 0)) || die "apt-get install ${PACKAGES[*]} failed ($rc)"
}

case ${1:-} in
  start) cmd_start ;;
  stop) cmd_stop ;;
  status) cmd_status ;;
  env) echo "export SLURM_CONF=$CONF" ;;
  install) cmd_install ;;
  *) echo "usage: $0 install|start|stop|status|env" >&2; exit 2 ;;
esac
