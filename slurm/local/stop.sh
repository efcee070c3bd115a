#!/usr/bin/env bash
# Stop the local SLURM cluster that slurm/local/start.sh started: its jobs, then slurmd(s), slurmctld, munged, and
# (of a multi-node cluster) the network namespaces, veth pairs and bridge recorded in STATE_DIR/net/created.
# Usage: slurm/local/stop.sh [STATE_DIR]   (default: $TUMORSYNTH_SLURM_DIR or /tmp/tumorsynth-slurm)
# Only the daemons named by the pid files in STATE_DIR/run are stopped, and only if each is that daemon of this
# state folder (its binary, run with this folder's slurm.conf or munged pid file: common.sh); a pid file naming any
# other process is ignored. The state folder is checked as start.sh checks it. Running it twice is harmless.
set -euo pipefail

export PATH=$PATH:/usr/sbin:/sbin  # munged, slurmctld and slurmd live in sbin
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
DIR=${1:-${TUMORSYNTH_SLURM_DIR:-/tmp/tumorsynth-slurm}}
DIR=$(realpath -m -s -- "$DIR")
export SLURM_CONF=$DIR/slurm.conf
# shellcheck source=slurm/local/common.sh
source "$HERE/common.sh"
if [[ ! -e $DIR && ! -L $DIR ]]; then
  echo "stop.sh: no state folder $DIR: nothing to stop"
  exit 0
fi
check_state_dir
# shellcheck source=slurm/local/nodes.sh
source "$HERE/nodes.sh"
SLURMDS=(slurmd)
for pidfile in "$DIR"/run/slurmd-*.pid; do [[ -f $pidfile ]] && SLURMDS+=("$(basename "$pidfile" .pid)"); done

# Cancel the jobs first (bounded wait) so none is requeued or left half-run when the cluster starts again.
if daemon_pid slurmctld >/dev/null && [[ -f $SLURM_CONF ]]; then
  jobs=$(timeout 5 squeue -h -o %A 2>/dev/null | sort -u | tr '\n' ' ') || jobs=""
  if [[ -n ${jobs// /} ]]; then
    # shellcheck disable=SC2086
    timeout 10 scancel --quiet $jobs 2>/dev/null || true
    for _ in $(seq 40); do
      [[ -z $(timeout 5 squeue -h -o %i 2>/dev/null) ]] && break
      sleep 0.5
    done
  fi
fi

# stop_all NAME...: SIGTERM the named daemons together, wait up to 10 s for them to exit, SIGKILL the stragglers
# (each checked again first: its pid may have been reused meanwhile).
stop_all() {
  local name pid pids=() names=()
  for name in "$@"; do
    if pid=$(daemon_pid "$name"); then kill -TERM "$pid"; pids+=("$pid"); names+=("$name"); fi
  done
  for _ in $(seq 100); do
    local running=0
    for i in "${!pids[@]}"; do is_daemon "${names[$i]}" "${pids[$i]}" && running=1; done
    (( running )) || break
    sleep 0.1
  done
  for i in "${!pids[@]}"; do
    if is_daemon "${names[$i]}" "${pids[$i]}"; then
      echo "stop.sh: ${names[$i]} (${pids[$i]}) ignored SIGTERM for 10 s, killing it" >&2
      kill -KILL "${pids[$i]}" 2>/dev/null || true
    fi
    echo "stop.sh: stopped ${names[$i]} (${pids[$i]})"
  done
  for name in "$@"; do rm -f "$DIR/run/$name.pid"; done
}
stop_all "${SLURMDS[@]}" slurmctld
stop_all munged  # last: the slurm daemons authenticate through it until they are gone
net_down
echo "stop.sh: local SLURM cluster in $DIR is stopped"
