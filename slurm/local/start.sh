#!/usr/bin/env bash
# Start (or confirm) a private SLURM cluster for development and tests: munged, slurmctld, slurmd.
# Usage: slurm/local/start.sh [--nodes N] [STATE_DIR]   (default: $TUMORSYNTH_SLURM_DIR or /tmp/tumorsynth-slurm)
# With --nodes N > 1, N compute nodes ts-n1 … ts-nN, each a slurmd in its own network and UTS namespace on a private
# bridge (nodes.sh); the default, one node, is this machine itself.
# Everything it generates (slurm.conf, munge key/socket, state, spool, logs, pid files) lives in STATE_DIR.
# Clients find the cluster through SLURM_CONF: `source STATE_DIR/env.sh`. Stop it with slurm/local/stop.sh.
# STATE_DIR is made root's (0755) if missing; an existing one must be root's alone, below folders only root may
# change, and hold no symlink where a file is written (common.sh): anyone can create /tmp/tumorsynth-slurm first.
# Files are written through fresh temporary files renamed into place, and munged gets a fresh key (0400) each start.
set -euo pipefail

if [[ $(id -u) -ne 0 ]]; then
  echo "start.sh: must run as root (the local cluster runs slurmd/slurmctld/munged as root)" >&2
  exit 1
fi

export PATH=$PATH:/usr/sbin:/sbin  # munged, slurmctld and slurmd live in sbin
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
NODES=1
if [[ ${1:-} == --nodes ]]; then NODES=${2:-}; shift 2 || true; fi
[[ $NODES =~ ^[1-9][0-9]?$ ]] || { echo "start.sh: --nodes takes a number from 1 to 99, got '$NODES'" >&2; exit 1; }
DIR=${1:-${TUMORSYNTH_SLURM_DIR:-/tmp/tumorsynth-slurm}}
DIR=$(realpath -m -s -- "$DIR")  # absolute, symlinks kept: check_state_dir refuses them rather than following
# shellcheck source=slurm/local/common.sh
source "$HERE/common.sh"
check_state_dir create  # before anything is installed, written or started
# A multi-node cluster's slurmctld takes other default ports, so that it can run beside the single-node one.
CTLD_PORT=${TUMORSYNTH_SLURMCTLD_PORT:-$(( NODES > 1 ? 16827 : 16817 ))}
SLURMD_PORT=${TUMORSYNTH_SLURMD_PORT:-$(( NODES > 1 ? 16828 : 16818 ))}
SUBNET=${TUMORSYNTH_SLURM_SUBNET:-10.213.57}  # multi-node only: the nodes' private /24
PORTS=${TUMORSYNTH_SLURM_STEP_PORTS:-19000-19999}  # multi-node only: ports SLURM reserves per step (MASTER_PORT)
WAIT_S=${TUMORSYNTH_SLURM_WAIT_S:-30}

# --- packages: slurm-wlm (slurmctld, slurmd, clients, basic plugins incl. mpi_pmix), munge, libpmix2 ----------
pmix_plugin() { compgen -G "/usr/lib/*/slurm-wlm/mpi_pmix.so" >/dev/null; }
if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v munged >/dev/null \
   || ! command -v sbatch >/dev/null || ! pmix_plugin; then
  echo "start.sh: installing slurm-wlm, munge, libpmix2 with apt-get"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm slurm-wlm-basic-plugins munge libpmix2 >/dev/null
fi
pmix_plugin || { echo "start.sh: slurm's mpi_pmix plugin is still missing" >&2; exit 1; }

export SLURM_CONF=$DIR/slurm.conf
# alive NAME: the daemon whose pid file STATE_DIR/run/NAME.pid names is running (and is that daemon).
alive() { daemon_pid "$1" >/dev/null; }
# all_slurmd / any_slurmd: every node's slurmd is alive / some node's is.
all_slurmd() { local d; for d in "${SLURMDS[@]}"; do alive "$d" || return 1; done; }
any_slurmd() { local d; for d in "${SLURMDS[@]}"; do alive "$d" && return 0; done; return 1; }
MUNGE_SOCKET=$DIR/munge/munge.socket
if (( NODES > 1 )); then
  # shellcheck source=slurm/local/nodes.sh
  source "$HERE/nodes.sh"
  SLURMDS=()
  for i in $(seq "$NODES"); do SLURMDS+=("slurmd-$(node_name "$i")"); done
  NODE=ts-n[1-$NODES]
  CTLD_ADDR=$SUBNET.1 PER_NODE=-%n
else
  SLURMDS=(slurmd)
  NODE=$(hostname -s)
  CTLD_ADDR=127.0.0.1 PER_NODE=""
fi
if [[ -f $DIR/nodes && $(cat "$DIR/nodes") != "$NODES" ]] && { alive slurmctld 2>/dev/null || alive munged; }; then
  echo "start.sh: $DIR runs a $(cat "$DIR/nodes")-node cluster; stop it first (slurm/local/stop.sh $DIR)" >&2
  exit 1
fi

# put PATH MODE: stdin into PATH through a fresh temporary file (mktemp: O_EXCL) renamed over it, so that whatever is
# at PATH (a symlink, a planted file) is replaced, never written through.
put() {
  local tmp
  tmp=$(mktemp -- "$1.XXXXXX")
  cat >"$tmp"
  chmod "$2" -- "$tmp"
  mv -f -T -- "$tmp" "$1"
}
responsive() { [[ $(timeout 5 scontrol ping 2>/dev/null) == *" is UP"* ]] && timeout 5 sinfo -h >/dev/null 2>&1; }
finish() {
  echo "export SLURM_CONF=$SLURM_CONF" | put "$DIR/env.sh" 0644
  echo "export SLURM_CONF=$SLURM_CONF"
}
fail() {
  echo "start.sh: $*" >&2
  for log in "$DIR"/log/*.log; do [[ -f $log ]] && { echo "--- $log" >&2; tail -n 25 "$log" >&2; }; done
  "$HERE/stop.sh" "$DIR" >&2 || true  # leave no half-started cluster behind
  exit 1
}

if alive munged && alive slurmctld && all_slurmd && responsive; then
  echo "start.sh: local SLURM cluster already running in $DIR"
  finish
  exit 0
fi

install -d -m 0755 "$DIR" "$DIR/munge" "$DIR/run" "$DIR/log" "$DIR/state" "$DIR/spool"
if (( NODES > 1 )); then net_up "$NODES" || fail "could not set up the nodes' network"; fi
echo "$NODES" | put "$DIR/nodes" 0644

# --- slurm.conf: regenerated only while no slurm daemon of ours runs --------------------------------------
if ! alive slurmctld && ! any_slurmd; then
  MEM_MIB=$(( $(awk '/^MemTotal:/ {print $2}' /proc/meminfo) / 1024 ))
  REAL_MEM=$(( MEM_MIB - (MEM_MIB / 20 > 512 ? MEM_MIB / 20 : 512) ))
  if (( NODES > 1 )); then
    KIND="$NODES-node cluster in network namespaces (slurm/local/nodes.sh)"
    REAL_MEM=$(( REAL_MEM / NODES )) SLURMD_TIMEOUT=10  # a killed node is declared down within ~10 s
    NODE_LINES=$(echo "TmpFS=$DIR/tmp"; echo "MpiParams=ports=$PORTS"; for i in $(seq "$NODES"); do
      echo "NodeName=$(node_name "$i") NodeAddr=$SUBNET.$((10 + i)) CPUs=$(nproc) RealMemory=$REAL_MEM State=UNKNOWN"
    done)
  else
    KIND="single-node cluster" SLURMD_TIMEOUT=60
    NODE_LINES="NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$(nproc) RealMemory=$REAL_MEM State=UNKNOWN"
  fi
  put "$SLURM_CONF" 0644 <<EOF
# Generated by slurm/local/start.sh: a private $KIND (no cgroups, no accounting).
ClusterName=tumorsynth
SlurmctldHost=$(hostname -s)($CTLD_ADDR)
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$MUNGE_SOCKET,cred_expire=10
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool${PER_NODE:+/%n}
SlurmctldPidFile=$DIR/run/slurmctld.pid
SlurmdPidFile=$DIR/run/slurmd$PER_NODE.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd$PER_NODE.log
SlurmctldDebug=info
SlurmdDebug=info
MailProg=/bin/true
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=1,bf_interval=1
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=1024
JobRequeue=1
ReturnToService=2
MinJobAge=300
KillWait=5
SlurmdTimeout=$SLURMD_TIMEOUT
$NODE_LINES
PartitionName=debug Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
EOF
fi

# --- munged: a private instance (own key, socket, pid and log file) ---------------------------------------
if ! alive munged; then
  head -c 1024 /dev/urandom | put "$DIR/munge/munge.key" 0400  # fresh: a key found here may be someone else's
  rm -f "$MUNGE_SOCKET" "$MUNGE_SOCKET.lock"
  munged --key-file="$DIR/munge/munge.key" --socket="$MUNGE_SOCKET" --pid-file="$DIR/run/munged.pid" \
    --log-file="$DIR/log/munged.log" --seed-file="$DIR/munge/munged.seed" || fail "munged did not start"
fi
for _ in $(seq 50); do [[ -S $MUNGE_SOCKET ]] && break; sleep 0.1; done
munge -n -S "$MUNGE_SOCKET" | unmunge -S "$MUNGE_SOCKET" >/dev/null || fail "munge credential round trip failed"

# --- slurmctld, slurmd -------------------------------------------------------------------------------------
alive slurmctld || slurmctld -f "$SLURM_CONF" || fail "slurmctld did not start"
if (( NODES > 1 )); then
  for i in $(seq "$NODES"); do alive "${SLURMDS[$((i - 1))]}" || node_start "$i" || fail "slurmd of node $i did not start"; done
else
  alive slurmd || slurmd -f "$SLURM_CONF" || fail "slurmd did not start"
fi

# --- wait (bounded, polling) until every node is usable; resume those that came up down/drained ------------
deadline=$(( SECONDS + WAIT_S ))
state=unknown
while (( SECONDS < deadline )); do
  states=$(timeout 5 sinfo -h -N -n "$NODE" -o "%N %T" 2>/dev/null) || states=""
  ready=0
  while read -r name node_state; do
    case $node_state in
      idle|mixed|allocated|completing) ready=$(( ready + 1 )) ;;
      down*|drain*|fail*) timeout 5 scontrol update nodename="$name" state=resume 2>/dev/null || true ;;
    esac
  done <<<"$states"
  state=$(awk '{print $2}' <<<"$states" | sort -u | paste -sd,)
  (( ready == NODES )) && break
  sleep 0.5
done
(( ready == NODES )) || fail "node $NODE not ready after ${WAIT_S}s (state: ${state:-none})"
alive munged && alive slurmctld && all_slurmd || fail "a daemon exited during startup"

echo "start.sh: local SLURM cluster up in $DIR (node $NODE: $state)"
finish
