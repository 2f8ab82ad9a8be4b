#!/usr/bin/env bash
# A real single-node SLURM cluster on this machine, from Debian's packages, for dqt's tests and
# for trying the batch scripts: munged (as user munge), slurmctld and slurmd (as root), one node
# with this machine's CPUs, ProctrackType=proctrack/linuxproc, TaskPlugin=task/none. State,
# spool, config and logs live under $DQT_SLURM_DIR (default /tmp/dqt-slurm); nothing in /etc is
# touched. Daemons are stopped by the process ids they recorded at start.
#
#   launch/slurm/local_cluster.sh install   # apt-get install slurmctld slurmd slurm-client munge
#   launch/slurm/local_cluster.sh start     # idempotent; prints the SLURM_CONF line to export
#   eval "$(launch/slurm/local_cluster.sh env)"   # export SLURM_CONF for sbatch/squeue/scontrol
#   launch/slurm/local_cluster.sh status    # exit 0 when munged, slurmctld, slurmd run and the node is up
#   launch/slurm/local_cluster.sh stop      # cancel jobs, stop the daemons by their recorded pids
#
# Needs root (munged runs as its own user; slurmd runs jobs as their submitter).
# Environment: DQT_SLURM_DIR, DQT_SLURMCTLD_PORT (16817), DQT_SLURMD_PORT (16818).
set -euo pipefail

DIR=${DQT_SLURM_DIR:-/tmp/dqt-slurm}
CTLD_PORT=${DQT_SLURMCTLD_PORT:-16817}
SLURMD_PORT=${DQT_SLURMD_PORT:-16818}
CONF=$DIR/slurm.conf
MUNGE_SOCKET=$DIR/munge/munge.socket
PACKAGES=(slurmctld slurmd slurm-client munge)
# daemon name -> pid file (each daemon writes its own) and the executable it must be
declare -A PIDFILE=([slurmd]=$DIR/run/slurmd.pid [slurmctld]=$DIR/run/slurmctld.pid
                    [munged]=$DIR/munge/munged.pid)

die() { echo "local_cluster: $*" >&2; exit 1; }
log() { echo "local_cluster: $*" >&2; }

need_root() {
  [[ $(id -u) == 0 ]] || die "needs root (munged runs as user munge, slurmd as root); run it with sudo"
}

need_packages() {
  local missing=()
  for exe in munged slurmctld slurmd sbatch srun scontrol sinfo; do
    command -v "$exe" >/dev/null || missing+=("$exe")
  done
  ((${#missing[@]} == 0)) || die "missing ${missing[*]}: run '$0 install' (apt-get install ${PACKAGES[*]})"
}

# the pid recorded for a daemon, if that process is alive and is that daemon
live_pid() {
  local f=${PIDFILE[$1]} pid
  [[ -s $f ]] || return 1
  pid=$(tr -dc 0-9 <"$f")
  [[ -n $pid && -d /proc/$pid ]] || return 1
  [[ $(cat "/proc/$pid/comm" 2>/dev/null) == "$1"* ]] || return 1
  echo "$pid"
}

wait_for() {  # wait_for SECONDS DESCRIPTION COMMAND...
  local deadline=$((SECONDS + $1)) what=$2
  shift 2
  until "$@" >/dev/null 2>&1; do
    ((SECONDS < deadline)) || return 1
    sleep 0.2
  done
}

write_conf() {
  local host cpus tmp
  host=$(hostname -s)
  cpus=$(nproc)
  tmp=$CONF.partial
  cat >"$tmp" <<CONF
# written by launch/slurm/local_cluster.sh: one node, this machine's CPUs
ClusterName=dqt-local
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$MUNGE_SOCKET
StateSaveLocation=$DIR/ctld
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=${PIDFILE[slurmctld]}
SlurmdPidFile=${PIDFILE[slurmd]}
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
JobCompType=jobcomp/filetxt
JobCompLoc=$DIR/log/jobcomp.txt
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/builtin
MpiDefault=none
ReturnToService=2
# a job SIGTERMed by scancel/scontrol requeue/preemption gets this long to checkpoint before SIGKILL
KillWait=60
MinJobAge=3600
InactiveLimit=0
SlurmctldTimeout=60
SlurmdTimeout=300
NodeName=$host NodeAddr=127.0.0.1 CPUs=$cpus State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP
CONF
  mv "$tmp" "$CONF"
}

start_munged() {
  if live_pid munged >/dev/null; then return; fi
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
    --pid-file="${PIDFILE[munged]}" --log-file="$DIR/munge/munged.log" \
    --seed-file="$DIR/munge/munged.seed" \
    || die "munged did not start; see $DIR/munge/munged.log"
  wait_for 10 munged bash -c "munge -n -S '$MUNGE_SOCKET' | unmunge -S '$MUNGE_SOCKET'" \
    || die "munged does not answer on $MUNGE_SOCKET; see $DIR/munge/munged.log"
}

start_slurmctld() {
  if live_pid slurmctld >/dev/null; then return; fi
  rm -rf "$DIR/ctld"  # a cold start is a fresh cluster: no jobs or node state from before
  mkdir -p "$DIR/ctld"
  slurmctld -f "$CONF" || die "slurmctld did not start; see $DIR/log/slurmctld.log"
  wait_for 20 slurmctld scontrol ping \
    || die "slurmctld does not answer on port $CTLD_PORT; see $DIR/log/slurmctld.log"
}

start_slurmd() {
  if live_pid slurmd >/dev/null; then return; fi
  rm -rf "$DIR/spool"
  mkdir -p "$DIR/spool"
  slurmd -f "$CONF" || die "slurmd did not start; see $DIR/log/slurmd.log"
}

node_up() { [[ $(sinfo -h -N -o %T 2>/dev/null) =~ ^(idle|mixed|allocated) ]]; }

cmd_start() {
  need_root
  need_packages
  # jobs reach the node, and torchrun's rendezvous the first node, by its name
  getent hosts "$(hostname -s)" >/dev/null \
    || die "this machine's name '$(hostname -s)' does not resolve; add it to /etc/hosts"
  mkdir -p "$DIR/run" "$DIR/log"
  chmod 0755 "$DIR"
  write_conf
  export SLURM_CONF=$CONF
  start_munged
  start_slurmctld
  start_slurmd
  wait_for 30 node node_up || die "node did not come up: $(sinfo -h -N -o '%T %E' 2>&1); see $DIR/log/slurmd.log"
  log "up: munged $(live_pid munged), slurmctld $(live_pid slurmctld), slurmd $(live_pid slurmd); $(nproc) CPUs on $(hostname -s)"
  echo "export SLURM_CONF=$CONF"
}

cmd_stop() {
  need_root
  export SLURM_CONF=$CONF
  if live_pid slurmctld >/dev/null && live_pid slurmd >/dev/null; then
    local jobs
    jobs=$(squeue -h -o %A 2>/dev/null || true)
    if [[ -n $jobs ]]; then
      log "cancelling jobs: $(echo $jobs)"
      scancel $jobs 2>/dev/null || true
      wait_for 90 jobs bash -c '[[ -z $(squeue -h -o %A) ]]' || log "jobs still listed: $(squeue -h 2>&1)"
    fi
  fi
  local name pid
  for name in slurmd slurmctld munged; do
    if pid=$(live_pid "$name"); then
      kill -TERM "$pid" 2>/dev/null || true
      if ! wait_for 15 "$name" bash -c "[[ ! -d /proc/$pid ]]"; then
        log "$name ($pid) ignored SIGTERM; sending SIGKILL"
        kill -KILL "$pid" 2>/dev/null || true
      fi
      log "stopped $name ($pid)"
    fi
    rm -f "${PIDFILE[$name]}"
  done
}

cmd_status() {
  export SLURM_CONF=$CONF
  local ok=0 name pid
  for name in munged slurmctld slurmd; do
    if pid=$(live_pid "$name"); then echo "$name: running (pid $pid)"; else echo "$name: stopped"; ok=1; fi
  done
  if ((ok == 0)) && node_up; then
    sinfo -N -o "%N %T %C"
  else
    ok=1
  fi
  return $ok
}

cmd_install() {
  need_root
  local guard=""
  # Debian's postinst scripts would start the system's own munged/slurmd; this cluster uses
  # its own config, key and socket, so keep the system services from starting.
  if [[ ! -e /usr/sbin/policy-rc.d ]]; then
    printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
    chmod +x /usr/sbin/policy-rc.d
    guard=1
  fi
  local rc=0
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${PACKAGES[@]}" >/dev/null || rc=$?
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
