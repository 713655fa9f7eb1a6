#!/usr/bin/env bash
# A real SLURM cluster on this one machine, for trying the sbatch files and for tests/test_slurm.py:
# munged, slurmctld and two slurmd (nodes n1, n2), everything bound to 127.0.0.1, all state under DIR.
#
#   slurm/local_cluster.sh start  [DIR]   # idempotent; prints the `export SLURM_CONF=...` line to use
#   slurm/local_cluster.sh status [DIR]
#   slurm/local_cluster.sh stop   [DIR]   # cancels this cluster's jobs, then stops the daemons it started
#
# DIR defaults to /tmp/vmlp-slurm. Knobs for `start` (environment; read when DIR has no slurm.conf yet):
#   PORT_BASE=17000   slurmctld listens on PORT_BASE, slurmd n1/n2 on PORT_BASE+1/+2
#   NODE_CPUS=2       CPUs each node declares (slurmd takes them from slurm.conf, not from the hardware)
#   NODE_GPUS=0       N > 0 declares N emulated GPUs per node (gres gpu, counted only, no devices): lets
#                     `sbatch --test-only` check the GPU headers as shipped; jobs still run on the CPU
#   FIRST_JOB_ID=1    first job id (MASTER_PORT in launch.sh derives from it: offsets two clusters)
# Needs slurm-wlm and munge (Debian packages, see scripts/setup_env.sh). Stops daemons only by the PIDs
# recorded in DIR/pids/, after checking that each PID still runs the daemon this script started.
set -euo pipefail

ACTION=${1:-}
DIR=${2:-/tmp/vmlp-slurm}
case "$ACTION" in start|stop|status) ;; *) echo "usage: $0 {start|stop|status} [DIR]" >&2; exit 2 ;; esac
# slurm.conf values are space/comma separated: a DIR with those characters cannot be written into it.
[[ "$DIR" =~ ^[A-Za-z0-9_./-]+$ ]] || { echo "error: DIR '$DIR' must match [A-Za-z0-9_./-]+" >&2; exit 2; }
mkdir -p "$DIR"
DIR=$(cd "$DIR" && pwd)
CONF="$DIR/etc/slurm.conf"
export SLURM_CONF="$CONF"  # without it the clients look for /etc/slurm and DNS SRV records
DAEMONS=(munged slurmctld slurmd-n1 slurmd-n2)

log() { echo "[local_cluster $(date +%H:%M:%S)] $*"; }

need() {
  local missing=()
  for b in munged slurmctld slurmd sbatch srun scontrol squeue sinfo scancel; do
    command -v "$b" >/dev/null || [[ -x /usr/sbin/$b ]] || missing+=("$b")
  done
  if [[ ${#missing[@]} -gt 0 ]]; then
    echo "error: missing ${missing[*]}: install the Debian packages slurm-wlm and munge" \
      "(scripts/setup_env.sh does, as root)" >&2
    exit 1
  fi
}

bin() { command -v "$1" 2>/dev/null || echo "/usr/sbin/$1"; }

# The recorded PID of a daemon if that process is still the one we started (its command line names
# our DIR), else nothing: a stale PID reused by another process is never signalled.
live_pid() {
  local f="$DIR/pids/$1.pid" pid
  [[ -f "$f" ]] || return 0
  pid=$(cat "$f")
  if [[ "$(tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null)" == *"$DIR/"* ]]; then
    echo "$pid"
  fi
}

write_config() {
  local port_base=${PORT_BASE:-17000} cpus=${NODE_CPUS:-2} gpus=${NODE_GPUS:-0} first=${FIRST_JOB_ID:-1}
  local host user gres="" node
  host=$(hostname -s)
  user=$(id -un)
  mkdir -p "$DIR"/{etc,state,log,pids,munge,spool/n1,spool/n2}
  chmod 755 "$DIR/munge"  # munged refuses a socket directory others can write to; clients must reach it
  if [[ ! -f "$DIR/munge/munge.key" ]]; then
    head -c 1024 /dev/urandom >"$DIR/munge/munge.key"
    chmod 400 "$DIR/munge/munge.key"
  fi
  [[ "$gpus" -gt 0 ]] && gres=" Gres=gpu:$gpus"
  cat >"$CONF" <<EOF
# Written by slurm/local_cluster.sh: two emulated nodes on one machine, all on 127.0.0.1.
ClusterName=vmlp-local
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$port_base
SlurmUser=$user
SlurmdUser=$user
AuthType=auth/munge
CredType=cred/munge
# cred_expire=5 (Slurm's minimum): a requeued job may start again ~5 s after it ended (default 120 s)
AuthInfo=socket=$DIR/munge/munge.socket.2,cred_expire=5
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool/%n
SlurmctldPidFile=$DIR/pids/slurmctld.internal.pid
SlurmdPidFile=$DIR/pids/slurmd-%n.internal.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd-%n.log
PlugStackConfig=$DIR/etc/plugstack.conf
# No cgroups in a container: track processes by parent PID and bind nothing.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SwitchType=switch/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
# Node resources come from this file, not from the hardware (two "nodes" share 2 cores).
SlurmdParameters=config_overrides
SchedulerParameters=bf_interval=1,sched_interval=2
ReturnToService=2
FirstJobId=$first
# Finished jobs stay visible to scontrol for an hour (no slurmdbd here, so no sacct).
MinJobAge=3600
KillWait=10
InactiveLimit=0
# Listen on the configured addresses (127.0.0.1), not on every interface.
CommunicationParameters=NoInAddrAny,NoCtldInAddrAny
$( [[ "$gpus" -gt 0 ]] && echo "GresTypes=gpu" )
EOF
  for node in n1 n2; do
    echo "NodeName=$node NodeHostname=$host NodeAddr=127.0.0.1 Port=$((port_base + ${node#n}))" \
      "CPUs=$cpus RealMemory=1024${gres} State=UNKNOWN" >>"$CONF"
  done
  echo "PartitionName=debug Nodes=n1,n2 Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO" >>"$CONF"
  : >"$DIR/etc/plugstack.conf"  # not the system's /etc/slurm/plugstack.conf
  : >"$DIR/etc/gres.conf"
  if [[ "$gpus" -gt 0 ]]; then
    # slurmd wants a character device per GPU; /dev/null stands in (nothing opens it: TaskPlugin=task/none).
    mkdir -p "$DIR/dev"
    for ((i = 0; i < gpus; i++)); do ln -sfn /dev/null "$DIR/dev/gpu$i"; done
    echo "Name=gpu File=$DIR/dev/gpu[0-$((gpus - 1))]" >"$DIR/etc/gres.conf"
  fi
  log "wrote $CONF (ports $port_base-$((port_base + 2)), $cpus CPUs and $gpus GPUs per node)"
}

# Run one daemon in the foreground of its own session (a Ctrl-C in the caller's terminal must not
# reach it), with its output in DIR/log, and record its PID.
spawn() {
  local name=$1; shift
  setsid "$@" >>"$DIR/log/$name.out" 2>&1 </dev/null &
  echo $! >"$DIR/pids/$name.pid"
}

wait_for() {  # wait_for SECONDS DESCRIPTION COMMAND...
  local secs=$1 what=$2; shift 2
  local end=$((SECONDS + secs))
  until "$@" >/dev/null 2>&1; do
    if ((SECONDS >= end)); then
      echo "error: $what not ready after ${secs}s; logs in $DIR/log/" >&2
      tail -n 5 "$DIR"/log/*.log "$DIR"/log/*.out >&2 2>/dev/null || true
      return 1
    fi
    sleep 0.3
  done
}

nodes_up() { [[ $(sinfo -h -N -o '%T' | grep -cE '^(idle|mixed|allocated)') -eq 2 ]]; }

start() {
  need
  local any_running=""
  for d in "${DAEMONS[@]}"; do [[ -n $(live_pid "$d") ]] && any_running=1; done
  if [[ ! -f "$CONF" ]]; then
    write_config
  elif [[ -z "$any_running" ]]; then
    log "reusing $CONF (delete $DIR to change ports or node shape)"
  fi
  local sock="$DIR/munge/munge.socket.2"
  if [[ -z $(live_pid munged) ]]; then
    rm -f "$sock" "$sock.lock"
    spawn munged "$(bin munged)" -F --force --socket="$sock" --key-file="$DIR/munge/munge.key" \
      --pid-file="$DIR/munge/munged.pid" --log-file="$DIR/log/munged.log" --seed-file="$DIR/munge/munged.seed"
    wait_for 10 munged test -S "$sock"
  fi
  if [[ -z $(live_pid slurmctld) ]]; then
    spawn slurmctld "$(bin slurmctld)" -D -f "$CONF"
    wait_for 30 slurmctld scontrol ping
  fi
  for node in n1 n2; do
    [[ -n $(live_pid "slurmd-$node") ]] || spawn "slurmd-$node" "$(bin slurmd)" -D -N "$node" -f "$CONF"
  done
  wait_for 30 "nodes n1 n2" nodes_up
  # A node that was down (e.g. after a restart) comes back only when told so.
  scontrol update nodename=n1,n2 state=resume >/dev/null 2>&1 || true
  log "up: $(sinfo -h -o '%P %D nodes %T' | tr '\n' ' ')"
  echo "export SLURM_CONF=$CONF"
}

stop() {
  if [[ -n $(live_pid slurmctld) ]]; then
    local jobs
    jobs=$(squeue -h -o %A 2>/dev/null | tr '\n' ' ')
    if [[ -n "${jobs// /}" ]]; then
      log "cancelling jobs $jobs"
      scancel $jobs 2>/dev/null || true
      local end=$((SECONDS + 30))
      while [[ -n $(squeue -h -o %A 2>/dev/null) ]] && ((SECONDS < end)); do sleep 0.5; done
    fi
  fi
  # slurmd first (they report to slurmctld), munged last (everyone authenticates through it).
  local group
  for group in "slurmd-n1 slurmd-n2" slurmctld munged; do
    stop_daemons $group
  done
}

# A zombie (exited, not yet reaped) has an empty command line: it counts as stopped.
any_alive() {
  local p
  for p in "$@"; do [[ -n $(tr -d '\0' <"/proc/$p/cmdline" 2>/dev/null) ]] && return 0; done
  return 1
}

stop_daemons() {
  local d pid pids=() names=()
  for d in "$@"; do
    pid=$(live_pid "$d")
    rm -f "$DIR/pids/$d.pid"
    [[ -n "$pid" ]] || continue
    kill -TERM "$pid" 2>/dev/null || true
    pids+=("$pid"); names+=("$d")
  done
  [[ ${#pids[@]} -gt 0 ]] || return 0
  local end=$((SECONDS + 10))
  while any_alive "${pids[@]}" && ((SECONDS < end)); do sleep 0.2; done
  for pid in "${pids[@]}"; do
    if any_alive "$pid"; then
      log "pid $pid did not stop in 10 s: SIGKILL"
      kill -KILL "$pid" 2>/dev/null || true
    fi
  done
  log "stopped ${names[*]} (${pids[*]})"
}

status() {
  local d pid rc=0
  for d in "${DAEMONS[@]}"; do
    pid=$(live_pid "$d")
    if [[ -n "$pid" ]]; then echo "$d: running (pid $pid)"; else echo "$d: stopped"; rc=3; fi
  done
  if [[ $rc -eq 0 ]]; then
    sinfo -N -o '%N %T %c %G' 2>/dev/null || true
    squeue 2>/dev/null || true
    echo "export SLURM_CONF=$CONF"
  fi
  return $rc
}

"$ACTION"
