#!/usr/bin/env bash
# Stop the local SLURM cluster that slurm/local/start.sh started: its jobs, then slurmd, slurmctld, munged.
# Usage: slurm/local/stop.sh [STATE_DIR]   (default: $TUMORSYNTH_SLURM_DIR or /tmp/tumorsynth-slurm)
# Only the daemons named by the pid files in STATE_DIR/run are stopped; running it twice is harmless.
set -euo pipefail

DIR=${1:-${TUMORSYNTH_SLURM_DIR:-/tmp/tumorsynth-slurm}}
DIR=$(realpath -m "$DIR")
export SLURM_CONF=$DIR/slurm.conf

pid_of() {  # the pid of daemon NAME from its pid file, if that process is alive and is that daemon
  local pid
  pid=$(cat "$DIR/run/$1.pid" 2>/dev/null) || return 1
  [[ -n $pid ]] && kill -0 "$pid" 2>/dev/null && [[ $(cat "/proc/$pid/comm" 2>/dev/null) == "$1"* ]] && echo "$pid"
}

# Cancel the jobs first (bounded wait) so none is requeued or left half-run when the cluster starts again.
if pid_of slurmctld >/dev/null && pid_of slurmd >/dev/null && [[ -f $SLURM_CONF ]]; then
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

# stop_all NAME...: SIGTERM the named daemons together, wait up to 10 s for them to exit, SIGKILL the stragglers.
stop_all() {
  local name pid pids=() names=()
  for name in "$@"; do
    if pid=$(pid_of "$name"); then kill -TERM "$pid"; pids+=("$pid"); names+=("$name"); fi
  done
  for _ in $(seq 100); do
    local running=0
    for pid in "${pids[@]}"; do kill -0 "$pid" 2>/dev/null && running=1; done
    (( running )) || break
    sleep 0.1
  done
  for i in "${!pids[@]}"; do
    if kill -0 "${pids[$i]}" 2>/dev/null; then
      echo "stop.sh: ${names[$i]} (${pids[$i]}) ignored SIGTERM for 10 s, killing it" >&2
      kill -KILL "${pids[$i]}" 2>/dev/null || true
    fi
    echo "stop.sh: stopped ${names[$i]} (${pids[$i]})"
  done
  for name in "$@"; do rm -f "$DIR/run/$name.pid"; done
}
stop_all slurmd slurmctld
stop_all munged  # last: the slurm daemons authenticate through it until they are gone
echo "stop.sh: local SLURM cluster in $DIR is stopped"
