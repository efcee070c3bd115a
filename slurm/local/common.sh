# Sourced by start.sh and stop.sh, which run as root on a state folder whose path anyone can guess
# (/tmp/tumorsynth-slurm): what another user could have put there in advance (the folder itself, a symlink where a
# file is written, a pid file naming someone else's process) is refused or ignored, never followed or killed.
# Expects DIR (the state folder, symlinks not resolved) to be set.

# root_only PATH [sticky-ok]: PATH (followed) belongs to root and no one else may write it; with sticky-ok, a sticky
# folder that others may write (such as /tmp) is fine too: they can neither rename nor remove what root owns in it.
root_only() {
  local uid mode
  read -r uid mode < <(stat -L -c '%u %a' -- "$1" 2>/dev/null) || return 1
  (( uid == 0 )) || return 1
  (( (8#$mode & 8#022) == 0 )) && return 0
  [[ ${2:-} == sticky-ok ]] && (( 8#$mode & 8#1000 ))
}

refuse() {
  echo "$(basename "$0"): $*; refusing to use it (remove it, or name another state folder)" >&2
  exit 1
}

# check_state_dir [create]: DIR must be a real folder that only root may write, below folders that only root may
# change; each subfolder must be one too, and none of the files start.sh or the daemons write may be a symbolic link.
# With create, the missing folders down to DIR are made (0755), each checked before the next is made inside it.
check_state_dir() {
  local path="" part sub file parts
  IFS=/ read -ra parts <<<"${DIR#/}"
  root_only / || refuse "/ may be written by users other than root"
  for part in "${parts[@]}"; do
    path+=/$part
    if [[ ${1:-} == create && ! -e $path && ! -L $path ]]; then
      mkdir -m 0755 -- "$path" 2>/dev/null || true  # fails if it appeared meanwhile: then it is checked as found
    fi
    [[ $path == "$DIR" ]] && break
    if [[ -L $path && $(stat -c %u -- "$path") != 0 ]]; then refuse "$path is a symbolic link of another user"; fi
    root_only "$path" sticky-ok || refuse "$path (above the state folder) may be changed by users other than root"
  done
  [[ -L $DIR ]] && refuse "$DIR is a symbolic link"
  [[ -d $DIR ]] || refuse "$DIR is not a folder"
  root_only "$DIR" || refuse "$DIR (uid $(stat -c %u -- "$DIR"), mode $(stat -c %a -- "$DIR")) is not root's alone"
  for sub in munge run log state spool net tmp; do
    if [[ -L $DIR/$sub ]] || { [[ -e $DIR/$sub ]] && ! { [[ -d $DIR/$sub ]] && root_only "$DIR/$sub"; }; }; then
      refuse "$DIR/$sub is not a folder that only root may write"
    fi
  done
  for file in slurm.conf env.sh nodes munge/munge.key munge/munged.seed munge/munge.socket run/munged.pid \
              run/slurmctld.pid run/slurmd.pid log/munged.log log/slurmctld.log log/slurmd.log net/created net/hosts \
              "$DIR"/run/slurmd-*.pid "$DIR"/log/slurmd-*.log; do
    file=${file#"$DIR"/}
    [[ -L $DIR/$file ]] && refuse "$DIR/$file is a symbolic link"
  done
  return 0
}

# daemon_pid NAME: the pid in DIR/run/NAME.pid, if that process runs the NAME binary (slurmd for a node's
# slurmd-ts-nI) with this state folder (its config file, or munged's pid file, among its arguments); status 1 otherwise.
daemon_pid() {
  local pid
  pid=$(cat -- "$DIR/run/$1.pid" 2>/dev/null) || return 1
  is_daemon "$1" "$pid" && echo "$pid"
}

# is_daemon NAME PID: PID is this state folder's NAME daemon (a name alone proves nothing: any process can take one).
is_daemon() {
  local name=$1 pid=$2 binary exe arg token
  [[ $pid =~ ^[0-9]+$ ]] || return 1
  binary=$(command -v "${name%%-*}") || return 1
  exe=$(readlink -- "/proc/$pid/exe" 2>/dev/null) || return 1
  [[ ${exe% (deleted)} == "$(readlink -f -- "$binary")" ]] || return 1
  if [[ $name == munged ]]; then token=--pid-file=$DIR/run/munged.pid; else token=$DIR/slurm.conf; fi
  while IFS= read -r -d '' arg; do
    [[ $arg == "$token" ]] && return 0
  done 2>/dev/null <"/proc/$pid/cmdline"
  return 1
}
