# Sourced by start.sh and stop.sh: the compute nodes of a multi-node local cluster (start.sh --nodes N, N > 1).
# Node i is a network namespace ts-n<i> holding one end of a veth pair (eth0, SUBNET.(10+i)/24); the other end
# (ts-v<i>) hangs on the bridge ts-br0 (SUBNET.1/24), where slurmctld listens. The namespaces get no default route,
# so nothing they send can leave the /24. Each slurmd runs in its namespace under a UTS namespace of its own (its
# hostname is its node name) and a mount namespace in which STATE_DIR/net/hosts is bind-mounted over /etc/hosts
# (the machine's /etc/hosts is never changed). Everything created is first appended to STATE_DIR/net/created, which
# is what stop.sh removes, and only that.
# Expects DIR (the state folder) and, for node_* and net_up, SUBNET (three octets, e.g. 10.213.57) to be set.

BRIDGE=ts-br0
CREATED=$DIR/net/created

node_name() { echo "ts-n$1"; }

# record KIND NAME: note something about to be created (so that a start that dies half-way is still undone).
record() { echo "$1 $2" >>"$CREATED"; }

# ours KIND NAME: whether this state folder created it.
ours() { [[ -f $CREATED ]] && grep -qxF -- "$1 $2" "$CREATED"; }

# subnet_free: no address or route of this machine lies in SUBNET.0/24 other than our bridge's.
subnet_free() {
  local line
  while read -r line; do
    [[ $line == *" dev $BRIDGE "* || $line == *" dev $BRIDGE" ]] && continue
    [[ -n $line ]] && { echo "start.sh: $SUBNET.0/24 is in use on this machine: $line" >&2; return 1; }
  done < <(ip -4 route show table all | grep -E "(^| )$SUBNET\.[0-9]+(/| |$)" || true)
  if ip -4 -o addr show | grep -v " $BRIDGE " | grep -qE " inet $SUBNET\."; then
    echo "start.sh: an interface other than $BRIDGE has an address in $SUBNET.0/24" >&2
    return 1
  fi
}

# net_up NODES: the bridge, and per node its namespace, veth pair and address; existing parts of ours are kept,
# a part of the same name that we did not create is refused.
net_up() {
  local n=$1 i ns veth
  install -d -m 0755 "$DIR/net"
  subnet_free || return 1
  if ! ip link show "$BRIDGE" >/dev/null 2>&1; then
    record link "$BRIDGE"
    ip link add "$BRIDGE" type bridge
  fi
  ours link "$BRIDGE" || { echo "start.sh: bridge $BRIDGE exists and is not this state folder's" >&2; return 1; }
  ip addr replace "$SUBNET.1/24" dev "$BRIDGE"
  ip link set "$BRIDGE" up
  for i in $(seq "$n"); do
    ns=$(node_name "$i") veth=ts-v$i
    if ! ip netns list | grep -qE "^$ns( |$)"; then
      record netns "$ns"
      ip netns add "$ns"
    fi
    ours netns "$ns" || { echo "start.sh: network namespace $ns exists and is not this state folder's" >&2; return 1; }
    if ! ip link show "$veth" >/dev/null 2>&1; then
      record link "$veth"
      ip link add "$veth" type veth peer name eth0 netns "$ns"
    fi
    ours link "$veth" || { echo "start.sh: interface $veth exists and is not this state folder's" >&2; return 1; }
    ip link set "$veth" master "$BRIDGE" up
    ip -n "$ns" link set lo up
    ip -n "$ns" addr replace "$SUBNET.$((10 + i))/24" dev eth0
    ip -n "$ns" link set eth0 up
  done
  { printf '127.0.0.1\tlocalhost\n%s.1\t%s\n' "$SUBNET" "$(hostname -s)"
    for i in $(seq "$n"); do printf '%s.%d\t%s\n' "$SUBNET" $((10 + i)) "$(node_name "$i")"; done
  } | put "$DIR/net/hosts" 0644
}

# node_start I: slurmd of node I, in its namespaces (see the top of this file).
node_start() {
  local ns
  ns=$(node_name "$1")
  install -d -m 0755 "$DIR/spool/$ns" "$DIR/spool/$ns/tmp" "$DIR/tmp"
  # nsenter, not `ip netns exec`: that mounts a fresh /sys without /sys/fs/cgroup, which slurmd needs. The node's
  # own spool/NODE/tmp is mounted on STATE_DIR/tmp (slurm.conf's TmpFS): the PMIx plugin's per-step folders there
  # would collide between nodes on a shared /tmp.
  # shellcheck disable=SC2016  # expanded by the inner shell
  nsenter --net="/run/netns/$ns" -- unshare --uts --mount --propagation private -- sh -c \
    'mount --bind "$1" /etc/hosts && mount --bind "$2" "$3" && hostname "$4" && exec slurmd -f "$5" -N "$4"' \
    sh "$DIR/net/hosts" "$DIR/spool/$ns/tmp" "$DIR/tmp" "$ns" "$SLURM_CONF"
}

# node_kill I: SIGKILL every process in node I's namespace (its slurmd and whatever it runs), as a crash would.
node_kill() {
  local ns pid
  ns=$(node_name "$1")
  ours netns "$ns" || return 0
  for pid in $(ip netns pids "$ns" 2>/dev/null); do kill -KILL "$pid" 2>/dev/null || true; done
}

# net_down: kill what still runs in our namespaces, then remove every namespace and link we recorded, newest first.
net_down() {
  local kind name i
  [[ -f $CREATED ]] || return 0
  while read -r kind name; do
    [[ $kind == netns ]] || continue
    for i in $(ip netns pids "$name" 2>/dev/null); do kill -KILL "$i" 2>/dev/null || true; done
  done <"$CREATED"
  tac "$CREATED" | while read -r kind name; do
    case $kind in
      netns) ip netns delete "$name" 2>/dev/null && echo "stop.sh: removed network namespace $name" || true ;;
      link) ip link delete "$name" 2>/dev/null && echo "stop.sh: removed interface $name" || true ;;
    esac
  done
  rm -f "$CREATED"
}
