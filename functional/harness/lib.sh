# shellcheck shell=bash
# lib.sh: settings and functions of the multi-node cluster harness (sourced, never run).
#
# A cluster = one etcd on a host bridge + N nodes. Each node is a `systemd-nspawn --boot`
# container running the host's own systemd as PID 1 over an overlay of `/` with a private
# upper dir, in its own network namespace on the bridge, with sshd and fleetd installed.
#
# Everything is namespaced by the cluster name (FH_CLUSTER, default "fleet") so several
# clusters can live on one host. For cluster C, node I:
#   state (tmpfs)   /var/lib/fleet-fh/C             node dir  /var/lib/fleet-fh/C/nodeI
#   bridge          C0 (alias fleet-fh:C)           subnet    $FH_NET.0/$FH_PREFIXLEN, bridge $FH_NET.1
#   netns, veth     C-nI (host end, alias fleet-fh:C)   node IP   $FH_NET.(10+I), on eth0
#   nspawn machine  C-nodeI (hostname nodeI)        cgroups   /sys/fs/cgroup/*/fleet-fh-C/nodeI
#   etcd            clients on $FH_BRIDGE_IP:$FH_ETCD_PORTS, peer $FH_BRIDGE_IP:$FH_ETCD_PEER_PORT
# The default cluster "fleet" is bridge fleet0 172.18.0.1/16, nodes 172.18.0.11..., etcd at
# http://172.18.0.1:2379 (and :4001). See Documentation/functional-harness.md.

set -o pipefail

HARNESS_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
FH_PROJECT=$(cd "$HARNESS_DIR/../.." && pwd)

: "${FH_CLUSTER:=fleet}"
if ! [[ $FH_CLUSTER =~ ^[a-z][a-z0-9]{0,7}$ ]]; then
  printf '[harness] ERROR: FH_CLUSTER=%q: want 1-8 chars of [a-z0-9], starting with a letter\n' "$FH_CLUSTER" >&2
  exit 2
fi
: "${FH_ROOT:=/var/lib/fleet-fh}"              # parent of every cluster's state dir
FH_STATE=$FH_ROOT/$FH_CLUSTER                   # tmpfs; all of this cluster's state lives in it
# A test process holds this lock (flock) while its cluster lives; it passes FH_LOCK_HELD=1
# to the scripts it runs. up.sh and down.sh refuse to touch a cluster someone else holds.
FH_LOCK=$FH_ROOT/$FH_CLUSTER.lock
# A running cluster's settings win over defaults (not over the caller's own values),
# except in up.sh, which starts afresh.
if [ "${FH_FRESH:-0}" != 1 ] && [ -f "$FH_STATE/settings" ]; then
  while IFS='=' read -r k v; do
    case $k in FH_NET|FH_PREFIXLEN|FH_ETCD_PORTS|FH_ETCD_PEER_PORT|FH_BIN_DIR|FH_INSTALL_FLEET|FH_ETCD_MEMBERS)
      [ -z "${!k:-}" ] && printf -v "$k" '%s' "$v" ;;
    esac
  done <"$FH_STATE/settings"
fi
: "${FH_STATE_SIZE:=4g}"                        # tmpfs size limit (not reserved)
FH_BRIDGE=${FH_CLUSTER}0
FH_ALIAS=fleet-fh:$FH_CLUSTER                   # marks links as ours
# FH_NET: the first three octets of the cluster's subnet; FH_PREFIXLEN: its length.
# Default cluster: 172.18.0.0/16 (what fleet's functional tests assumed). Others: a /24 in
# 172.20.0.0-172.31.255.0 derived from the name (172.19 is the shared harness's); `up`
# refuses a subnet that overlaps any address on the host.
if [ -z "${FH_NET:-}" ]; then
  if [ "$FH_CLUSTER" = fleet ]; then FH_NET=172.18.0; : "${FH_PREFIXLEN:=16}"; else
    h=$(printf '%s' "$FH_CLUSTER" | cksum | cut -d' ' -f1)
    FH_NET=172.$((20 + h % 12)).$((h / 12 % 256))
  fi
fi
: "${FH_PREFIXLEN:=24}"
[[ $FH_NET =~ ^[0-9]+\.[0-9]+\.[0-9]+$ ]] || { echo "[harness] ERROR: FH_NET=$FH_NET: want three octets" >&2; exit 2; }
FH_BRIDGE_IP=$FH_NET.1
: "${FH_ETCD_PORTS:=2379 4001}"                 # client ports, on the bridge address only
: "${FH_ETCD_PEER_PORT:=2380}"
: "${FH_ETCD_ARGS:=}"                           # extra etcd arguments (e.g. --enable-v2=true for fleet v1.0)
FH_ETCD_PORT=${FH_ETCD_PORTS%% *}
# FH_ETCD_MEMBERS: 1 (default) = one etcd on the bridge address; 2..7 = an etcd cluster whose
# member K lives in its own netns C-eK at $FH_NET.(1+K) (on the bridge, like a node), so it
# can be killed, frozen or cut off from chosen members and nodes on its own.
: "${FH_ETCD_MEMBERS:=1}"
[[ $FH_ETCD_MEMBERS =~ ^[1-7]$ ]] || { echo "[harness] ERROR: FH_ETCD_MEMBERS=$FH_ETCD_MEMBERS: want 1..7" >&2; exit 2; }
fh_member_ip() { echo "$FH_NET.$((1 + $1))"; }
fh_member_ns() { echo "$FH_CLUSTER-e$1"; }        # netns and host end of its veth
fh_member_dir() { echo "$FH_ETCD_DIR/e$1"; }
if [ "$FH_ETCD_MEMBERS" = 1 ]; then
  FH_ETCD_HOSTS=$FH_BRIDGE_IP
else
  FH_ETCD_HOSTS=$(for k in $(seq "$FH_ETCD_MEMBERS"); do fh_member_ip "$k"; done | tr '\n' ' ')
  FH_ETCD_HOSTS=${FH_ETCD_HOSTS% }
fi
FH_ETCD_ENDPOINT=http://${FH_ETCD_HOSTS%% *}:$FH_ETCD_PORT
FH_ETCD_ENDPOINTS=$(for h in $FH_ETCD_HOSTS; do printf 'http://%s:%s,' "$h" "$FH_ETCD_PORT"; done)
FH_ETCD_ENDPOINTS=${FH_ETCD_ENDPOINTS%,}
: "${FH_BOOT_TIMEOUT:=120}"
FH_CGROUP_NAME=fleet-fh-$FH_CLUSTER
: "${FH_BIN_DIR:=$FH_PROJECT/bin}"              # dir with fleetd + fleetctl, bound at /opt/fleet/bin
# 0: nodes get no fleet from the harness (no units, fleet.conf, /opt/fleet/bin or fleetctl
# link); a test installs it itself, e.g. from the Debian package (functional/tests/package.rs)
: "${FH_INSTALL_FLEET:=1}"
: "${FH_UNITS_DIR:=$FH_PROJECT/fleetd/units}"   # fleet.socket + fleet.service
: "${FH_NSPAWN_ARGS:=}"                         # extra nspawn args
# fleetd configuration of the nodes (read when a node is first prepared):
#   FH_METADATA_<I>     metadata of node I, e.g. "region=us-east,az=1"
#   FH_FLEET_CONF       extra lines appended to every node's /etc/fleet/fleet.conf
#   FH_FLEET_ENV        KEY=VALUE lines, the Environment= of fleet.service on every node
#   FH_FLEET_TCP_PORT   if set, fleet.socket also listens on this TCP port (API over HTTP)
# Units that must never run inside a node (they exist on the host image).
: "${FH_MASK_UNITS:=etcd.service etcd2.service postgresql.service postgresql@.service \
getty@.service console-getty.service serial-getty@.service systemd-timesyncd.service \
apt-daily.timer apt-daily-upgrade.timer dpkg-db-backup.timer e2scrub_all.timer \
e2scrub_reap.service fstrim.timer man-db.timer systemd-pstore.service \
systemd-networkd.service systemd-networkd.socket systemd-resolved.service \
systemd-networkd-wait-online.service}"

FH_SSH_DIR=$FH_STATE/ssh
FH_SSH_KEY=$FH_SSH_DIR/id_ed25519
FH_KNOWN_HOSTS=$FH_SSH_DIR/known_hosts
FH_SSH_CONFIG=$FH_SSH_DIR/config
FH_NODE_SSH_DIR=/etc/fleet-harness/ssh          # FH_SSH_DIR, bound read-only into every node

# fleetctl's SSH settings for a cluster's nodes: root, the harness key, the harness known
# hosts (every node's host key). With them `fleetctl status/journal/ssh` work from any node
# (fleetctl's default user is core, and it would want an ssh-agent).
# shellcheck disable=SC2120 # ./cluster passes the host's ssh dir
fh_fleetctl_ssh_env() {
  local d=${1:-$FH_NODE_SSH_DIR}
  printf 'FLEETCTL_SSH_USERNAME=root\nFLEETCTL_SSH_IDENTITY=%s/id_ed25519\nFLEETCTL_KNOWN_HOSTS_FILE=%s/known_hosts\n' "$d" "$d"
}
FH_ETCD_DIR=$FH_STATE/etcd
FH_NSPAWN_RUN=/run/systemd/nspawn
FH_NSPAWN_TMPFS=fh-nspawn                        # same source name as the shared harness uses

fh_log() { printf '[harness %s %s] %s\n' "$FH_CLUSTER" "$(date +%H:%M:%S)" "$*" >&2; }
fh_die() { fh_log "ERROR: $*"; exit 1; }

# die when another process holds this cluster (a running test)
fh_check_lock() {
  [ "${FH_LOCK_HELD:-0}" = 1 ] && return 0
  if [ -e "$FH_LOCK" ] && ! flock -n "$FH_LOCK" true; then
    fh_die "cluster $FH_CLUSTER is in use by a running test (it holds $FH_LOCK); wait for it, or pick another FH_CLUSTER"
  fi
  return 0
}

fh_require_root() { [ "$(id -u)" = 0 ] || fh_die "must run as root (the harness mounts, creates namespaces and boots containers)"; }

fh_check_index() { { [[ $1 =~ ^[1-9][0-9]{0,2}$ ]] && [ "$1" -le 200 ]; } || fh_die "bad node number '$1' (want 1..200)"; }
fh_name()    { echo "node$1"; }                       # hostname inside the node
fh_machine() { echo "$FH_CLUSTER-node$1"; }           # nspawn machine name (host-unique)
fh_ip()      { echo "$FH_NET.$((10 + $1))"; }
fh_dir()     { echo "$FH_STATE/node$1"; }
fh_netns()   { echo "$FH_CLUSTER-n$1"; }
fh_hostif()  { echo "$FH_CLUSTER-n$1"; }              # host end of the veth (<=15 chars)

# cgroup hierarchies this cluster has a directory in (whichever exist on the host)
fh_cg_roots() {
  local h
  if [ "$(stat -fc %T /sys/fs/cgroup)" = cgroup2fs ]; then
    echo "/sys/fs/cgroup/$FH_CGROUP_NAME"; return
  fi
  for h in systemd unified memory pids; do
    [ -d "/sys/fs/cgroup/$h" ] && echo "/sys/fs/cgroup/$h/$FH_CGROUP_NAME"
  done
}

# the cgroup v2 directory of node I (cgroup.kill, cgroup.freeze)
fh_cg2_dir() {
  if [ "$(stat -fc %T /sys/fs/cgroup)" = cgroup2fs ]; then
    echo "/sys/fs/cgroup/$FH_CGROUP_NAME/$(fh_name "$1")"
  else
    echo "/sys/fs/cgroup/unified/$FH_CGROUP_NAME/$(fh_name "$1")"
  fi
}

# is some link of this name ours (alias marks it)?
fh_link_ours() { [ "$(cat "/sys/class/net/$1/ifalias" 2>/dev/null)" = "$FH_ALIAS" ]; }

# fh_spawn PIDFILE LOGFILE "CGROUP-DIRS" CMD...: start CMD detached (new session,
# stdin /dev/null, cwd /) inside the given cgroups; PIDFILE gets CMD's pid.
# (setsid forks when its caller leads a process group, so the spawned shell writes
# its own $$ and then execs: the pid file always names the real daemon.)
fh_spawn() {
  local pidfile=$1 log=$2 cgs=$3; shift 3
  rm -f "$pidfile"
  # shellcheck disable=SC2016 # the script is expanded by the bash that runs it
  ( cd / && setsid -f bash -c '
      pidfile=$1; cgs=$2; shift 2
      for c in $cgs; do echo $$ > "$c/cgroup.procs" || exit 1; done
      echo $$ > "$pidfile.tmp" && mv "$pidfile.tmp" "$pidfile"
      exec "$@"' fh-spawn "$pidfile" "$cgs" "$@" </dev/null >>"$log" 2>&1 )
  for _ in $(seq 100); do [ -s "$pidfile" ] && return 0; sleep 0.05; done
  return 1
}

# is pid $1 alive with $2 in its argv (guards against pid reuse)?
fh_pid_alive() {
  local pid=$1 needle=$2
  [ -n "$pid" ] && [ -r "/proc/$pid/cmdline" ] || return 1
  [[ "$(tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null) " == *"$needle"* ]]
}

# is pid $1 still running (neither gone nor a zombie)? Our daemons are reparented to the
# host's PID 1, which may reap late: a zombie counts as dead.
fh_running() {
  local st
  st=$(cut -d' ' -f3 "/proc/$1/stat" 2>/dev/null) || return 1
  [ -n "$st" ] && [ "$st" != Z ] && [ "$st" != X ]
}

fh_nspawn_pid() {
  local d pid; d=$(fh_dir "$1")
  pid=$(cat "$d/nspawn.pid" 2>/dev/null) || return 1
  fh_pid_alive "$pid" "systemd-nspawn" && fh_pid_alive "$pid" "--directory=$d/root " && echo "$pid"
}

# host pid of the node's PID 1 (systemd), the target for nsenter
fh_leader_pid() {
  local np c
  np=$(fh_nspawn_pid "$1") || return 1
  for c in $(pgrep -P "$np"); do
    [ "$(cat /proc/"$c"/comm 2>/dev/null)" = systemd ] && { echo "$c"; return 0; }
  done
  return 1
}

# fh_exec I CMD...: run CMD inside node I (all its namespaces) with a clean environment
# (PATH of the node; FLEETCTL_* and TERM pass through). Replaces the calling shell.
fh_exec() {
  local i=$1 l v; shift
  local envs=(PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/root LANG=C.UTF-8)
  mapfile -t -O 3 envs < <(fh_fleetctl_ssh_env)   # the caller's FLEETCTL_* below win
  l=$(fh_leader_pid "$i") || fh_die "node $i of cluster $FH_CLUSTER is not running"
  for v in $(compgen -e); do [[ $v == FLEETCTL_* || $v == TERM ]] && envs+=("$v=${!v}"); done
  exec nsenter -t "$l" -a -- env -i "${envs[@]}" "$@"
}

# fh_overlap A/LEN B/LEN: do the two IPv4 networks overlap?
fh_overlap() {
  local a=${1%/*} al=${1#*/} b=${2%/*} bl=${2#*/} l x y
  l=$(( al < bl ? al : bl ))
  IFS=. read -r a1 a2 a3 a4 <<<"$a"; IFS=. read -r b1 b2 b3 b4 <<<"$b"
  x=$(( (a1 << 24) | (a2 << 16) | (a3 << 8) | a4 )); y=$(( (b1 << 24) | (b2 << 16) | (b3 << 8) | b4 ))
  [ "$l" = 0 ] || [ $(( (x ^ y) >> (32 - l) )) = 0 ]
}

# refuse to take over a bridge or subnet someone else uses
fh_check_conflicts() {
  local out
  if ip link show "$FH_BRIDGE" >/dev/null 2>&1 && ! fh_link_ours "$FH_BRIDGE"; then
    fh_die "link $FH_BRIDGE exists and is not this harness's (alias '$(cat "/sys/class/net/$FH_BRIDGE/ifalias" 2>/dev/null)'); pick another FH_CLUSTER"
  fi
  out=$(ip -4 -o addr show)
  while read -r _ dev _ addr _; do
    [ "$dev" = "$FH_BRIDGE" ] && continue
    fh_overlap "$addr" "$FH_BRIDGE_IP/$FH_PREFIXLEN" &&
      fh_die "subnet $FH_NET.0/$FH_PREFIXLEN overlaps $addr on $dev; set FH_NET or pick another FH_CLUSTER"
  done <<<"$out"
  return 0
}

fh_ensure_host() {
  fh_require_root
  local t
  for t in systemd-nspawn nsenter ip etcd curl ssh ssh-keygen iptables; do
    command -v "$t" >/dev/null || fh_die "missing tool: $t (run ./test or ./build once: they install it)"
  done
  [ -x /usr/sbin/sshd ] || fh_die "openssh-server is not installed on the host: nodes would have no sshd"
  fh_check_conflicts
  # the host-wide pieces are set up and torn down under one host lock: a cluster coming up
  # while another goes down must not lose the nspawn tmpfs between its mount and its nodes
  local lockfd
  mkdir -p "$(dirname "$FH_ROOT")"
  exec {lockfd}>"$FH_ROOT.host.lock"
  flock "$lockfd"
  mkdir -p "$FH_STATE"
  mountpoint -q "$FH_STATE" || mount -t tmpfs -o "size=$FH_STATE_SIZE,mode=0755" "fh-$FH_CLUSTER" "$FH_STATE"
  # ~7 inotify instances per node; the default 128 per user breaks the ~21st node.
  # The first cluster up saves the old values; the last one down restores them.
  if [ "${FH_TUNE_SYSCTL:-1}" = 1 ]; then
    [ -f "$FH_ROOT/sysctl.orig" ] || sysctl fs.inotify.max_user_instances fs.inotify.max_user_watches \
      | tr -d ' ' >"$FH_ROOT/sysctl.orig"
    [ "$(sysctl -n fs.inotify.max_user_instances)" -ge 8192 ] || sysctl -qw fs.inotify.max_user_instances=8192
    [ "$(sysctl -n fs.inotify.max_user_watches)" -ge 524288 ] || sysctl -qw fs.inotify.max_user_watches=524288
  fi
  # nspawn keeps /run/systemd/nspawn/propagate/<machine>; on a host whose /run is not a
  # tmpfs it refuses to delete it ("can't allow that"), so give it a tmpfs (shared by all).
  mkdir -p "$FH_NSPAWN_RUN"
  mountpoint -q "$FH_NSPAWN_RUN" || mount -t tmpfs -o mode=0755,size=16m "$FH_NSPAWN_TMPFS" "$FH_NSPAWN_RUN"
  exec {lockfd}>&-
  # A bridge without an address of its own takes its ports' lowest MAC and changes it when
  # a port with a lower one joins; a node that learnt the old MAC for the bridge's IP (when
  # it was another node's veth) then has its frames to the host dropped until its ARP entry
  # ages out (CI: node2 lost etcd as node3 came up). So: a fixed, locally administered MAC
  # from the subnet (02:66:68 + FH_NET's three octets), unique among the host's clusters.
  local mac o1 o2 o3
  IFS=. read -r o1 o2 o3 <<<"$FH_NET"
  mac=$(printf '02:66:68:%02x:%02x:%02x' "$((10#$o1))" "$((10#$o2))" "$((10#$o3))")
  if ! ip link show "$FH_BRIDGE" >/dev/null 2>&1; then
    ip link add "$FH_BRIDGE" address "$mac" type bridge
  fi
  ip link set "$FH_BRIDGE" address "$mac"
  ip link set "$FH_BRIDGE" alias "$FH_ALIAS"
  # (no "| grep -q" with pipefail: grep's early exit can SIGPIPE ip -> false negative)
  [[ $(ip -o addr show dev "$FH_BRIDGE") == *" $FH_BRIDGE_IP/$FH_PREFIXLEN "* ]] ||
    ip addr add "$FH_BRIDGE_IP/$FH_PREFIXLEN" dev "$FH_BRIDGE"
  ip link set "$FH_BRIDGE" up
  for t in $(fh_cg_roots); do mkdir -p "$t"; done
  # the settings later node.sh calls use (see the top of this file)
  printf 'FH_NET=%s\nFH_PREFIXLEN=%s\nFH_ETCD_PORTS=%s\nFH_ETCD_PEER_PORT=%s\nFH_BIN_DIR=%s\nFH_INSTALL_FLEET=%s\nFH_ETCD_MEMBERS=%s\n' \
    "$FH_NET" "$FH_PREFIXLEN" "$FH_ETCD_PORTS" "$FH_ETCD_PEER_PORT" "$FH_BIN_DIR" "$FH_INSTALL_FLEET" "$FH_ETCD_MEMBERS" >"$FH_STATE/settings"
}

# key=value facts about the cluster (for the Rust API and users)
fh_info() {
  printf 'cluster=%s\nstate=%s\nbridge=%s\nbridge_ip=%s\netcd_endpoint=%s\netcd_endpoints=%s\netcd_members=%s\n' \
    "$FH_CLUSTER" "$FH_STATE" "$FH_BRIDGE" "$FH_BRIDGE_IP" "$FH_ETCD_ENDPOINT" "$FH_ETCD_ENDPOINTS" "$FH_ETCD_MEMBERS"
  printf 'ssh_config=%s\nssh_key=%s\nknown_hosts=%s\nbin_dir=%s\nnodes=%s\n' \
    "$FH_SSH_CONFIG" "$FH_SSH_KEY" "$FH_KNOWN_HOSTS" "$FH_BIN_DIR" "$(cat "$FH_STATE/nodes" 2>/dev/null || echo 0)"
}

fh_etcd_pid() {
  local pid; pid=$(cat "$FH_ETCD_DIR/etcd.pid" 2>/dev/null) || return 1
  fh_pid_alive "$pid" "--data-dir $FH_ETCD_DIR/data" && echo "$pid"
}

fh_etcd_start() {
  if [ "$FH_ETCD_MEMBERS" != 1 ]; then fh_members_start; return; fi
  if fh_etcd_pid >/dev/null; then return 0; fi
  mkdir -p "$FH_ETCD_DIR"
  local p urls="" cg=""
  for p in $FH_ETCD_PORTS; do urls="$urls,http://$FH_BRIDGE_IP:$p"; done
  urls=${urls#,}
  for p in $(fh_cg_roots); do mkdir -p "$p/etcd"; cg="$cg $p/etcd"; done
  # shellcheck disable=SC2086 # FH_ETCD_ARGS: extra arguments, split on spaces
  fh_spawn "$FH_ETCD_DIR/etcd.pid" "$FH_ETCD_DIR/etcd.log" "$cg" \
    etcd --name "fh-$FH_CLUSTER" --data-dir "$FH_ETCD_DIR/data" \
      --listen-client-urls "$urls" --advertise-client-urls "$FH_ETCD_ENDPOINT" \
      --listen-peer-urls "http://$FH_BRIDGE_IP:$FH_ETCD_PEER_PORT" \
      --initial-advertise-peer-urls "http://$FH_BRIDGE_IP:$FH_ETCD_PEER_PORT" \
      --initial-cluster "fh-$FH_CLUSTER=http://$FH_BRIDGE_IP:$FH_ETCD_PEER_PORT" \
      --initial-cluster-state new --logger=zap --log-outputs=stderr $FH_ETCD_ARGS || fh_die "etcd spawn failed"
  for _ in $(seq 200); do
    curl -fsS --max-time 1 "$FH_ETCD_ENDPOINT/version" >/dev/null 2>&1 && return 0
    fh_etcd_pid >/dev/null || break
    sleep 0.05
  done
  tail -20 "$FH_ETCD_DIR/etcd.log" >&2
  fh_die "etcd did not come up at $FH_ETCD_ENDPOINT"
}

# (its data is thrown away with the state dir, so no graceful shutdown: SIGKILL)
fh_etcd_stop() {
  local pid k
  for k in $(fh_member_indices); do fh_member_kill "$k" || true; fh_member_net_del "$k"; done
  pid=$(fh_etcd_pid) || return 0
  kill -KILL "$pid"
  for _ in $(seq 100); do fh_running "$pid" || return 0; sleep 0.05; done
  kill -KILL "$pid" 2>/dev/null || true
}

# --- an etcd cluster (FH_ETCD_MEMBERS > 1) ---

# member numbers with any trace: a state dir, a netns, a host link
fh_member_indices() {
  {
    fh_names_in "$FH_ETCD_DIR" | sed -n "s|^e||p"
    fh_names_in /run/netns | sed -n "s/^$FH_CLUSTER-e//p"
    fh_names_in /sys/class/net | sed -n "s/^$FH_CLUSTER-e//p"
  } | grep -E '^[0-9]+$' | sort -n | uniq
}

fh_check_member() { { [[ $1 =~ ^[1-7]$ ]] && [ "$1" -le "$FH_ETCD_MEMBERS" ]; } || fh_die "bad etcd member '$1' (want 1..$FH_ETCD_MEMBERS)"; }

fh_member_pid() {
  local pid; pid=$(cat "$(fh_member_dir "$1")/etcd.pid" 2>/dev/null) || return 1
  fh_pid_alive "$pid" "--data-dir $(fh_member_dir "$1")/data" && echo "$pid"
}

# netns + veth like a node's: eth0 (in C-eK) <-> C-eK (host end, on the bridge)
fh_member_net() {
  local k=$1 ns ip
  ns=$(fh_member_ns "$k"); ip=$(fh_member_ip "$k")
  [ -e "/run/netns/$ns" ] || ip netns add "$ns"
  ip link show "$ns" >/dev/null 2>&1 || ip link add "$ns" type veth peer name eth0 netns "$ns"
  fh_link_ours "$ns" || ip link set "$ns" alias "$FH_ALIAS"
  ip link set "$ns" master "$FH_BRIDGE" up
  ip -n "$ns" link set lo up
  ip -n "$ns" link set eth0 up
  [[ $(ip -n "$ns" -o addr show dev eth0) == *" $ip/$FH_PREFIXLEN "* ]] || ip -n "$ns" addr add "$ip/$FH_PREFIXLEN" dev eth0
}

fh_member_net_del() {
  local ns; ns=$(fh_member_ns "$1")
  [ -e "/run/netns/$ns" ] && ip netns del "$ns"
  if ip link show "$ns" >/dev/null 2>&1 && fh_link_ours "$ns"; then ip link del "$ns"; fi
  return 0
}

# start member K (again): its data dir survives a kill, so a restarted member rejoins
fh_member_start() {
  local k=$1 d ip p urls="" cg="" initial="" j
  fh_member_pid "$k" >/dev/null && return 0
  d=$(fh_member_dir "$k"); ip=$(fh_member_ip "$k")
  mkdir -p "$d"
  fh_member_net "$k"
  for p in $FH_ETCD_PORTS; do urls="$urls,http://$ip:$p"; done
  for j in $(seq "$FH_ETCD_MEMBERS"); do initial="$initial,e$j=http://$(fh_member_ip "$j"):$FH_ETCD_PEER_PORT"; done
  for p in $(fh_cg_roots); do mkdir -p "$p/etcd-e$k"; cg="$cg $p/etcd-e$k"; done
  # shellcheck disable=SC2086 # FH_ETCD_ARGS: extra arguments, split on spaces
  fh_spawn "$d/etcd.pid" "$d/etcd.log" "$cg" \
    nsenter "--net=/run/netns/$(fh_member_ns "$k")" -- \
    etcd --name "e$k" --data-dir "$d/data" \
      --listen-client-urls "${urls#,}" --advertise-client-urls "http://$ip:$FH_ETCD_PORT" \
      --listen-peer-urls "http://$ip:$FH_ETCD_PEER_PORT" \
      --initial-advertise-peer-urls "http://$ip:$FH_ETCD_PEER_PORT" \
      --initial-cluster "${initial#,}" --initial-cluster-token "fh-$FH_CLUSTER" \
      --initial-cluster-state new --logger=zap --log-outputs=stderr $FH_ETCD_ARGS || fh_die "etcd member e$k: spawn failed"
}

fh_member_healthy() { curl -fsS --max-time 1 "http://$(fh_member_ip "$1"):$FH_ETCD_PORT/health" 2>/dev/null | grep -q '"health":"true"'; }

# every member, then wait until each one says it is healthy (it has a leader)
fh_members_start() {
  local k ok
  for k in $(seq "$FH_ETCD_MEMBERS"); do fh_member_start "$k"; done
  for _ in $(seq 300); do
    ok=1
    for k in $(seq "$FH_ETCD_MEMBERS"); do fh_member_healthy "$k" || { ok=0; break; }; done
    [ "$ok" = 1 ] && return 0
    sleep 0.1
  done
  for k in $(seq "$FH_ETCD_MEMBERS"); do fh_log "member e$k:"; tail -5 "$(fh_member_dir "$k")/etcd.log" >&2; done
  fh_die "etcd cluster of $FH_ETCD_MEMBERS members did not become healthy"
}

# wait until member K is healthy again (after a start or a thaw)
fh_member_wait() {
  for _ in $(seq 300); do fh_member_healthy "$1" && return 0; sleep 0.1; done
  fh_die "etcd member e$1 not healthy after 30s"
}

fh_member_kill() {
  local pid; pid=$(fh_member_pid "$1") || return 0
  kill -CONT "$pid" 2>/dev/null; kill -KILL "$pid"
  for _ in $(seq 100); do fh_running "$pid" || return 0; sleep 0.05; done
  # (no fh_die: teardown goes on, and its cgroup.kill takes what is left)
  fh_log "etcd member e$1 (pid $pid) still running 5s after SIGKILL"
  return 1
}

# fh_member_signal K STOP|CONT: freeze / thaw a member (a hung process, sockets kept open)
fh_member_signal() {
  local pid; pid=$(fh_member_pid "$1") || fh_die "etcd member e$1 is not running"
  kill "-$2" "$pid"
}

# the member number of the current leader (none: exit 1)
fh_member_leader() {
  local k st
  for k in $(seq "$FH_ETCD_MEMBERS"); do
    st=$(ETCDCTL_API=3 etcdctl --endpoints="http://$(fh_member_ip "$k"):$FH_ETCD_PORT" --command-timeout=1s \
      endpoint status -w simple 2>/dev/null) || continue
    # fields: endpoint, id, version, db size, is leader, is learner, ...
    [ "$(echo "$st" | cut -d, -f5 | tr -d ' ')" = true ] && { echo "$k"; return 0; }
  done
  return 1
}

# fh_member_isolate K [eJ|nI]...: drop all traffic between member K and the given members
# (eJ) and nodes (nI); with none given, from every other member (a minority partition).
# Rules live in chain FH-ISOLATE of the member's own netns.
fh_member_isolate() {
  local k=$1 ns t a addrs=() j; shift
  ns=$(fh_member_ns "$k")
  if [ $# = 0 ]; then
    for j in $(seq "$FH_ETCD_MEMBERS"); do [ "$j" != "$k" ] && set -- "$@" "e$j"; done
  fi
  for t in "$@"; do
    case $t in
      e[1-7]) fh_check_member "${t#e}"; addrs+=("$(fh_member_ip "${t#e}")") ;;
      n[0-9]*) fh_check_index "${t#n}"; addrs+=("$(fh_ip "${t#n}")") ;;
      *) fh_die "etcd-isolate: bad target '$t' (want eJ for a member, nI for a node)" ;;
    esac
  done
  ip netns exec "$ns" iptables -w -N FH-ISOLATE 2>/dev/null || true
  for c in INPUT OUTPUT; do
    ip netns exec "$ns" iptables -w -C "$c" -j FH-ISOLATE 2>/dev/null || ip netns exec "$ns" iptables -w -I "$c" -j FH-ISOLATE
  done
  for a in "${addrs[@]}"; do
    ip netns exec "$ns" iptables -w -A FH-ISOLATE -s "$a" -j DROP
    ip netns exec "$ns" iptables -w -A FH-ISOLATE -d "$a" -j DROP
  done
}

fh_member_heal() { ip netns exec "$(fh_member_ns "$1")" iptables -w -F FH-ISOLATE 2>/dev/null || true; }

fh_ssh_setup() {
  mkdir -p "$FH_SSH_DIR"; chmod 700 "$FH_SSH_DIR"
  [ -f "$FH_SSH_KEY" ] || ssh-keygen -q -t ed25519 -N '' -C "fleet-fh-$FH_CLUSTER" -f "$FH_SSH_KEY"
  touch "$FH_KNOWN_HOSTS"
  [ -f "$FH_SSH_CONFIG" ] && return 0
  cat >"$FH_SSH_CONFIG" <<EOF
Host $FH_NET.*
  User root
  IdentityFile $FH_SSH_KEY
  IdentitiesOnly yes
  UserKnownHostsFile $FH_KNOWN_HOSTS
  StrictHostKeyChecking yes
  BatchMode yes
  LogLevel ERROR
  ConnectTimeout 5
EOF
}

# fh_put ROOT PATH [MODE] <content : write a file into a node root from the host.
# The old entry is removed first so that a symlink in the lower layer (e.g. a
# host /etc/resolv.conf -> /run/...) is never followed to a HOST path.
fh_put() {
  local r=$1 p=$2 mode=${3:-644} dir
  dir=$(dirname "$p")
  fh_no_symlink_dirs "$r" "$dir"
  mkdir -p "$r$dir"
  rm -f "$r$p"
  cat >"$r$p" && chmod "$mode" "$r$p"
}

# refuse when any component of DIR inside node root R is a symlink (it could lead out of R)
fh_no_symlink_dirs() {
  local r=$1 dir=$2 p=""
  local IFS=/
  for c in $dir; do
    [ -z "$c" ] && continue
    p="$p/$c"
    [ -L "$r$p" ] && fh_die "refusing to write below symlinked dir $p of node root $r"
  done
  return 0
}

# fh_link ROOT PATH TARGET: symlink PATH -> TARGET inside the node root
fh_link() {
  fh_no_symlink_dirs "$1" "$(dirname "$2")"
  mkdir -p "$1$(dirname "$2")"
  ln -sfn "$3" "$1$2"
}

# fleetd, installed the way a user deploys it: the project's unit files enabled in
# /etc/systemd/system, /etc/fleet/fleet.conf, a drop-in with FLEET_* environment,
# the binaries at /opt/fleet/bin (bound read-only from the host), fleetctl on PATH.
fh_node_fleet() {
  local i=$1 r=$2 ip md var kv
  ip=$(fh_ip "$i")
  { [ -f "$FH_UNITS_DIR/fleet.socket" ] && [ -f "$FH_UNITS_DIR/fleet.service" ]; } ||
    fh_die "no fleet.socket/fleet.service in $FH_UNITS_DIR"
  fh_put "$r" /etc/systemd/system/fleet.socket <"$FH_UNITS_DIR/fleet.socket"
  fh_put "$r" /etc/systemd/system/fleet.service <"$FH_UNITS_DIR/fleet.service"
  fh_link "$r" /etc/systemd/system/sockets.target.wants/fleet.socket /etc/systemd/system/fleet.socket
  fh_link "$r" /etc/systemd/system/multi-user.target.wants/fleet.service /etc/systemd/system/fleet.service
  var=FH_METADATA_$i; md=${!var:-}
  {
    printf '# written by the fleet cluster harness (cluster %s)\n' "$FH_CLUSTER"
    printf 'etcd_servers=%s\n' "$FH_ETCD_ENDPOINTS"
    printf 'public_ip=%s\n' "$ip"
    [ -n "$md" ] && printf 'metadata=%s\n' "$md"
    [ -n "${FH_FLEET_CONF:-}" ] && printf '%s\n' "$FH_FLEET_CONF"
  } | fh_put "$r" /etc/fleet/fleet.conf
  {
    printf '# written by the fleet cluster harness (cluster %s)\n[Service]\n' "$FH_CLUSTER"
    while IFS= read -r kv; do
      [ -n "$kv" ] && printf 'Environment="%s"\n' "$kv"
    done <<<"${FH_FLEET_ENV:-}"
  } | fh_put "$r" /etc/systemd/system/fleet.service.d/10-harness.conf
  if [ -n "${FH_FLEET_TCP_PORT:-}" ]; then
    printf '[Socket]\nListenStream=%s\n' "$FH_FLEET_TCP_PORT" | fh_put "$r" /etc/systemd/system/fleet.socket.d/10-tcp.conf
  fi
  fh_link "$r" /usr/local/bin/fleetctl /opt/fleet/bin/fleetctl
}

# Create (once) the node's private root: overlay of / with a tmpfs upper dir.
fh_node_prepare() {
  local i=$1 d r name ip mid u
  d=$(fh_dir "$i"); r=$d/root; name=$(fh_name "$i"); ip=$(fh_ip "$i")
  mkdir -p "$d/upper" "$d/work" "$r"
  # Remount on every (re)start: overlayfs caches lower dentries, so a host file
  # replaced by a new inode stays stale until remount.
  if mountpoint -q "$r" && ! fh_nspawn_pid "$i" >/dev/null; then umount "$r" || umount -l "$r"; fi
  mountpoint -q "$r" || mount -t overlay "fh-$(fh_machine "$i")" -o "lowerdir=/,upperdir=$d/upper,workdir=$d/work" "$r"
  [ -f "$d/prepared" ] && return 0
  mid=$(od -An -N16 -tx1 /dev/urandom | tr -d ' \n')
  printf '%s\n' "$mid" | fh_put "$r" /etc/machine-id 444
  printf '%s\n' "$name" | fh_put "$r" /etc/hostname
  printf '127.0.0.1 localhost\n%s %s\n' "$ip" "$name" | fh_put "$r" /etc/hosts
  printf '# UNCONFIGURED FSTAB (fleet harness node)\n' | fh_put "$r" /etc/fstab
  # no nameserver: the host's resolver is unreachable from the bridge and every
  # lookup would hang ~20s; with none, glibc tries 127.0.0.1:53 and fails at once
  printf '# fleet harness node: no DNS\noptions timeout:1 attempts:1\n' | fh_put "$r" /etc/resolv.conf
  for u in $FH_MASK_UNITS; do fh_link "$r" "/etc/systemd/system/$u" /dev/null; done
  # small but persistent journal (the upper dir lives in RAM); readable after the node
  # died: journalctl -D $d/upper/var/log/journal
  printf '[Journal]\nStorage=persistent\nSystemMaxUse=16M\nSystemMaxFileSize=4M\nRuntimeMaxUse=16M\n' |
    fh_put "$r" /etc/systemd/journald.conf.d/fleet-harness.conf
  # sshd: per-node host key, root login with the harness key
  rm -f "$r"/etc/ssh/ssh_host_*
  ssh-keygen -q -t ed25519 -N '' -C "root@$name" -f "$r/etc/ssh/ssh_host_ed25519_key"
  printf 'HostKey /etc/ssh/ssh_host_ed25519_key\nPermitRootLogin prohibit-password\nUseDNS no\nListenAddress %s\nListenAddress 127.0.0.1\n' "$ip" |
    fh_put "$r" /etc/ssh/sshd_config.d/fleet-harness.conf
  fh_put "$r" /root/.ssh/authorized_keys 600 <"$FH_SSH_KEY.pub"
  chmod 700 "$r/root/.ssh"
  # fleetctl in the node reaches the other nodes (status, journal, ssh) as root with the
  # harness key and known hosts, bound at $FH_NODE_SSH_DIR; login shells get the same
  # settings from /etc/environment, `node.sh exec` from fh_exec
  fh_fleetctl_ssh_env | fh_put "$r" /etc/environment
  sed -i "/^$ip /d;/^$name /d" "$FH_KNOWN_HOSTS"
  echo "$ip $(cut -d' ' -f1,2 "$r/etc/ssh/ssh_host_ed25519_key.pub")" >>"$FH_KNOWN_HOSTS"
  if [ "$FH_INSTALL_FLEET" = 1 ]; then fh_node_fleet "$i" "$r"; fi
  echo "$mid" >"$d/machine-id"; echo "$ip" >"$d/ip"
  touch "$d/prepared"
}

# netns + veth pair: eth0 (in the netns) <-> C-nI (host end, enslaved to the bridge)
fh_node_net() {
  local i=$1 ns hif ip
  ns=$(fh_netns "$i"); hif=$(fh_hostif "$i"); ip=$(fh_ip "$i")
  [ -e "/run/netns/$ns" ] || ip netns add "$ns"
  if ! ip link show "$hif" >/dev/null 2>&1; then
    ip link add "$hif" type veth peer name eth0 netns "$ns"
  fi
  fh_link_ours "$hif" || ip link set "$hif" alias "$FH_ALIAS"
  ip link set "$hif" master "$FH_BRIDGE" up
  ip -n "$ns" link set lo up
  ip -n "$ns" link set eth0 up
  [[ $(ip -n "$ns" -o addr show dev eth0) == *" $ip/$FH_PREFIXLEN "* ]] || ip -n "$ns" addr add "$ip/$FH_PREFIXLEN" dev eth0
  ip -n "$ns" route replace default via "$FH_BRIDGE_IP" dev eth0
}

# start the container in the background; returns at once
fh_node_launch() {
  local i=$1 d mid cgs c
  d=$(fh_dir "$i"); mid=$(cat "$d/machine-id")
  if fh_nspawn_pid "$i" >/dev/null; then return 0; fi
  local bind=()
  if [ "$FH_INSTALL_FLEET" = 1 ]; then
    [ -x "$FH_BIN_DIR/fleetd" ] || fh_die "no fleetd in FH_BIN_DIR=$FH_BIN_DIR (build it first)"
    bind=(--bind-ro="$FH_BIN_DIR:/opt/fleet/bin")
  fi
  cgs=""
  for c in $(fh_cg_roots); do
    mkdir -p "$c/$(fh_name "$i")"; cgs="$cgs $c/$(fh_name "$i")"
  done
  # The launcher moves itself into the node's own cgroups first: with --keep-unit nspawn
  # uses the cgroup it was started in and never talks to a (non-existent) host systemd.
  # The binaries' DIRECTORY is bound (not the files): a rebuilt binary is a new inode,
  # which a directory bind shows at once while a file bind would pin the old one.
  date +%s.%N >"$d/launched_at"
  # shellcheck disable=SC2086
  fh_spawn "$d/nspawn.pid" "$d/console.log" "$cgs" \
    systemd-nspawn --directory="$d/root" --boot --machine="$(fh_machine "$i")" --hostname="$(fh_name "$i")" \
      --uuid="$mid" --capability=CAP_NET_ADMIN --register=no --keep-unit \
      --network-namespace-path="/run/netns/$(fh_netns "$i")" \
      "${bind[@]}" --bind-ro="$FH_SSH_DIR:$FH_NODE_SSH_DIR" \
      --console=read-only --link-journal=no --resolv-conf=off --timezone=off $FH_NSPAWN_ARGS
}

# wait until the node's systemd reports running (or degraded: printed, then failed units)
fh_node_wait() {
  local i=$1 end st="" l
  end=$(( $(date +%s) + FH_BOOT_TIMEOUT ))
  while [ "$(date +%s)" -lt "$end" ]; do
    if l=$(fh_leader_pid "$i"); then
      st=$(nsenter -t "$l" -a -- systemctl is-system-running 2>/dev/null)
      case "$st" in
        running) echo "$st"; return 0 ;;
        degraded)
          echo "$st"
          fh_log "node$i degraded: $(nsenter -t "$l" -a -- systemctl --failed --plain --no-legend 2>/dev/null | tr '\n' ';')"
          return 0 ;;
      esac
    elif ! fh_nspawn_pid "$i" >/dev/null; then
      fh_log "node$i: nspawn exited"; tail -20 "$(fh_dir "$i")/console.log" >&2; return 1
    fi
    sleep 0.1
  done
  fh_log "node$i: boot timeout (state: ${st:-unknown})"; return 1
}

fh_node_up() {
  fh_node_prepare "$1" && fh_node_net "$1" && fh_node_launch "$1"
}

# graceful stop: SIGTERM to nspawn makes it send SIGRTMIN+3 (halt) to the node's systemd
fh_node_stop() {
  local i=$1 timeout=${2:-30} np
  np=$(fh_nspawn_pid "$i") || return 0
  kill -TERM "$np" 2>/dev/null
  for _ in $(seq $((timeout * 20))); do fh_running "$np" || return 0; sleep 0.05; done
  fh_log "node$i: graceful stop timed out, killing"
  fh_node_kill "$i"
}

# hard kill (a crash, a power cut): SIGKILL every process of the node at once, nspawn
# included (cgroup v2 cgroup.kill); without cgroup.kill, its PID 1 and nspawn
fh_node_kill() {
  local i=$1 np l cg
  np=$(fh_nspawn_pid "$i") || np=""
  cg=$(fh_cg2_dir "$i")
  if [ -w "$cg/cgroup.kill" ]; then
    echo 1 >"$cg/cgroup.kill"
  else
    l=$(fh_leader_pid "$i") && kill -KILL "$l"
    [ -n "$np" ] && kill -KILL "$np" 2>/dev/null
  fi
  for _ in $(seq 200); do
    { [ -z "$np" ] || ! fh_running "$np"; } &&
      { [ ! -e "$cg/cgroup.events" ] || grep -qx 'populated 0' "$cg/cgroup.events"; } && return 0
    sleep 0.02
  done
  fh_log "node$i: processes left 4s after kill"
  return 1
}

# remove an (empty) cgroup directory tree, deepest first
fh_cg_rmtree() {
  [ -d "$1" ] || return 0
  find "$1" -depth -type d -exec rmdir {} \; 2>/dev/null
  [ ! -d "$1" ]
}

# umount everything at and below $1, deepest first
fh_umount_tree() {
  local m
  findmnt -rn -o TARGET -R "$1" 2>/dev/null | sort -r | while read -r m; do
    umount "$m" 2>/dev/null || umount -l "$m"
  done
}

fh_node_destroy() {
  local i=$1 d c
  d=$(fh_dir "$i")
  # a frozen node cannot halt: thaw first
  c=$(fh_cg2_dir "$i"); [ -w "$c/cgroup.freeze" ] && echo 0 >"$c/cgroup.freeze"
  if [ "${FH_FAST_DOWN:-1}" = 1 ]; then fh_node_kill "$i"; else fh_node_stop "$i" 20; fi
  [ -d "$d/root" ] && fh_umount_tree "$d/root"
  [ -e "/run/netns/$(fh_netns "$i")" ] && ip netns del "$(fh_netns "$i")"
  if ip link show "$(fh_hostif "$i")" >/dev/null 2>&1 && fh_link_ours "$(fh_hostif "$i")"; then
    ip link del "$(fh_hostif "$i")"
  fi
  for c in $(fh_cg_roots); do fh_cg_rmtree "$c/$(fh_name "$i")" || fh_log "cgroup $c/$(fh_name "$i") not removed"; done
  rm -rf "$FH_NSPAWN_RUN/propagate/$(fh_machine "$i")"
  [ -f "$FH_KNOWN_HOSTS" ] && sed -i "/^$(fh_ip "$i") /d" "$FH_KNOWN_HOSTS"
  rm -rf "$d"
}

# fh_names_in DIR: the names in DIR, one a line (none if DIR is missing)
fh_names_in() {
  local f
  for f in "$1"/*; do [ -e "$f" ] || [ -L "$f" ] && echo "${f##*/}"; done
  return 0
}

# node numbers that have any trace: a state dir, a netns, a host link
fh_node_indices() {
  {
    fh_names_in "$FH_STATE" | sed -n "s|^node||p"
    fh_names_in /run/netns | sed -n "s/^$FH_CLUSTER-n//p"
    fh_names_in /sys/class/net | sed -n "s/^$FH_CLUSTER-n//p"
  } | grep -E '^[0-9]+$' | sort -n | uniq
}

# other systemd-nspawn processes on the host (any cluster, any harness)?
# (zombies do not count: the host's PID 1 may reap our killed nspawns late)
fh_any_nspawn() { ps -eo stat=,comm= | awk '$2 == "systemd-nspawn" && $1 !~ /^Z/ { f = 1 } END { exit !f }'; }

# tear down this cluster only; safe twice, after a crash and after a partial up
fh_down() {
  local i c pids
  for i in $(fh_node_indices); do fh_node_destroy "$i" & done
  wait
  fh_etcd_stop
  # anything still alive in our cgroups is ours (etcd children, leaked node processes)
  c=$(dirname "$(fh_cg2_dir 1)")
  [ -w "$c/cgroup.kill" ] && echo 1 >"$c/cgroup.kill" 2>/dev/null
  for i in $(seq 40); do
    pids=$(cat "$c"/cgroup.procs "$c"/*/cgroup.procs 2>/dev/null)
    [ -z "$pids" ] && break
    sleep 0.05
  done
  for c in $(fh_cg_roots); do fh_cg_rmtree "$c" || fh_log "could not remove cgroup $c"; done
  if [ -d "$FH_STATE" ]; then
    fh_umount_tree "$FH_STATE"
    rmdir "$FH_STATE" 2>/dev/null || rm -rf "$FH_STATE"
  fi
  if ip link show "$FH_BRIDGE" >/dev/null 2>&1 && fh_link_ours "$FH_BRIDGE"; then ip link del "$FH_BRIDGE"; fi
  # a lock file nobody holds any more (its test process died); a holder removes its own
  [ "${FH_LOCK_HELD:-0}" != 1 ] && [ -e "$FH_LOCK" ] && flock -n "$FH_LOCK" rm -f "$FH_LOCK"
  # host-wide pieces: only when no other nspawn (of any cluster or harness) runs and no
  # other cluster of ours is there (one coming up has its state dir before its nodes run);
  # under the host lock fh_ensure_host takes
  local lockfd
  exec {lockfd}>"$FH_ROOT.host.lock"
  flock "$lockfd"
  if ! fh_any_nspawn && ! ls -d "$FH_ROOT"/*/ >/dev/null 2>&1; then
    if [ -f "$FH_ROOT/sysctl.orig" ]; then
      while read -r kv; do sysctl -qw "$kv"; done <"$FH_ROOT/sysctl.orig"
      rm -f "$FH_ROOT/sysctl.orig"
    fi
    if [ "$(findmnt -rn -o SOURCE "$FH_NSPAWN_RUN")" = "$FH_NSPAWN_TMPFS" ]; then umount "$FH_NSPAWN_RUN"; fi
    rmdir "$FH_NSPAWN_RUN/propagate" "$FH_NSPAWN_RUN/locks" "$FH_NSPAWN_RUN" 2>/dev/null
  fi
  exec {lockfd}>&-
  rmdir "$FH_ROOT" 2>/dev/null
  return 0
}

# network partition of one node (host side of its veth: link down = silent drop)
fh_node_partition() { ip link set "$(fh_hostif "$1")" down; }
# (flush ARP caches: an INCOMPLETE entry left from the partition delays the first
# packets after heal by up to ~1s otherwise)
fh_node_heal() {
  ip link set "$(fh_hostif "$1")" master "$FH_BRIDGE" up
  ip -n "$(fh_netns "$1")" neigh flush dev eth0
  ip neigh flush to "$(fh_ip "$1")" dev "$FH_BRIDGE"
}

# leftovers of this cluster, one line each; exit 1 if any
fh_leftovers() {
  local bad=0 out p l
  out=$(findmnt -rn -o TARGET,SOURCE | grep -E "^$FH_STATE( |/)| fh-$FH_CLUSTER(-| |$)")
  [ -n "$out" ] && { echo "mounts: $(echo "$out" | tr '\n' ';')"; bad=1; }
  out=$(fh_names_in /run/netns | grep -E "^$FH_CLUSTER-[ne][0-9]+$")
  [ -n "$out" ] && { echo "netns: $(echo "$out" | tr '\n' ' ')"; bad=1; }
  out=$(for l in $(fh_names_in /sys/class/net); do
    [[ $l =~ ^($FH_CLUSTER-[ne][0-9]+|$FH_BRIDGE)$ ]] || fh_link_ours "$l" && echo "$l"
  done)
  [ -n "$out" ] && { echo "links: $(echo "$out" | tr '\n' ' ')"; bad=1; }
  out=$(ip -4 -o addr show | grep " $FH_BRIDGE_IP/")
  [ -n "$out" ] && { echo "address: $FH_BRIDGE_IP"; bad=1; }
  for p in $(fh_cg_roots); do [ -d "$p" ] && { echo "cgroup: $p"; bad=1; }; done
  # shellcheck disable=SC2009 # pgrep -f takes one pattern and no fixed strings
  out=$(ps -eo pid=,args= | grep -F -e "$FH_STATE/" -e "fh-$FH_CLUSTER " | grep -v -e grep -e leftovers)
  [ -n "$out" ] && { echo "processes: $(echo "$out" | tr '\n' ';')"; bad=1; }
  [ -e "$FH_STATE" ] && { echo "state dir: $FH_STATE"; bad=1; }
  [ "${FH_LOCK_HELD:-0}" != 1 ] && [ -e "$FH_LOCK" ] && { echo "lock file: $FH_LOCK"; bad=1; }
  out=$(fh_names_in "$FH_NSPAWN_RUN/propagate" | grep -E "^$FH_CLUSTER-node[0-9]+$")
  [ -n "$out" ] && { echo "nspawn propagate dirs: $(echo "$out" | tr '\n' ' ')"; bad=1; }
  if ! fh_any_nspawn && [ "$(findmnt -rn -o SOURCE "$FH_NSPAWN_RUN")" = "$FH_NSPAWN_TMPFS" ]; then
    echo "mount: $FH_NSPAWN_RUN (no nspawn runs any more)"; bad=1
  fi
  for p in $FH_ETCD_PORTS $FH_ETCD_PEER_PORT; do
    out=$(ss -Hltn "src $FH_BRIDGE_IP:$p" 2>/dev/null)
    [ -n "$out" ] && { echo "port bound: $FH_BRIDGE_IP:$p"; bad=1; }
  done
  return $bad
}
