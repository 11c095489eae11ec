#!/bin/bash
# node.sh COMMAND [I] [ARGS...]: operate on node I (1-based) of cluster $FH_CLUSTER (default "fleet")
#   info                      key=value facts: bridge, etcd endpoint, ssh config, bin dir, ...
#   list                      one line per node: name ip state pid1 nspawn-pid link
#   exec I CMD...             run CMD inside node I (nsenter into all its namespaces)
#   ssh I CMD...              run CMD inside node I over ssh as root (harness key, strict host key)
#   ip I | pid I | dir I | machine-id I
#   start I                   boot node I (keeps its upper dir: machine-id, host key, files)
#   stop I                    graceful stop (SIGTERM to nspawn = halt)
#   poweroff I                systemctl poweroff inside the node, wait until it is gone
#   kill I                    SIGKILL the node's PID 1 (a crash)
#   restart I                 stop + start
#   destroy I                 stop and delete node I completely
#   partition I | heal I      host end of the node's veth down / up
#   freeze I | thaw I         freeze / thaw every process of the node (a hung machine)
#   block-etcd I | unblock-etcd I   iptables REJECT of the etcd ports inside node I
#   fleetd-stop I | fleetd-start I | fleetd-restart I   systemctl on fleet.service
#   fleetd-kill I             SIGKILL fleet.service's main process (systemd restarts it)
#   journal I [ARGS...]       the node's journal from the host (works when it is down)
#   leftovers                 what this cluster left behind; exit 1 if anything
# With an etcd cluster (FH_ETCD_MEMBERS > 1), K = member number (1-based):
#   etcd-kill K | etcd-start K          SIGKILL member K / start it again (keeps its data)
#   etcd-freeze K | etcd-thaw K         SIGSTOP / SIGCONT member K (a hung etcd)
#   etcd-isolate K [eJ|nI]...           drop traffic between member K and members eJ / nodes nI
#                                       (none given: every other member); etcd-heal K undoes it
#   etcd-leader                         the leader's member number (exit 1: no leader)
#   etcd-pid K                          member K's pid
# shellcheck source=lib.sh
. "$(dirname "$0")/lib.sh"
fh_require_root
cmd=${1:-}; shift || true
case "$cmd" in
  info|list|leftovers|etcd-leader|"") ;;
  etcd-*) fh_check_member "${1:-}"; k=$1; shift ;;
  *) fh_check_index "${1:-}"; i=$1; shift ;;
esac
# fh_cmd I CMD...: run CMD inside node I, do not replace this shell
fh_cmd() { ( fh_exec "$@" ); }
fh_block() { # fh_block I -I|-D
  local p h ns; ns=$(fh_netns "$1")
  for h in $FH_ETCD_HOSTS; do
    for p in $FH_ETCD_PORTS; do
      local rule=(OUTPUT -p tcp -d "$h" --dport "$p" -j REJECT --reject-with tcp-reset)
      if ip netns exec "$ns" iptables -w -C "${rule[@]}" 2>/dev/null; then
        [ "$2" = -D ] && ip netns exec "$ns" iptables -w -D "${rule[@]}"
      else
        [ "$2" = -I ] && ip netns exec "$ns" iptables -w -I "${rule[@]}"
      fi
    done
  done
  return 0
}
fh_freeze() { # fh_freeze I 1|0: write cgroup.freeze, wait for cgroup.events to agree
  local c; c=$(fh_cg2_dir "$1")
  [ -w "$c/cgroup.freeze" ] || fh_die "node$1: no $c/cgroup.freeze (node not running?)"
  echo "$2" >"$c/cgroup.freeze"
  for _ in $(seq 200); do grep -qx "frozen $2" "$c/cgroup.events" && return 0; sleep 0.05; done
  fh_die "node$1: cgroup.events never said frozen $2"
}
case "$cmd" in
  info)      fh_info ;;
  list)
    for i in $(fh_node_indices); do
      st=down; l=$(fh_leader_pid "$i") && st=$(nsenter -t "$l" -a systemctl is-system-running 2>/dev/null)
      printf '%-6s %-14s %-10s pid1=%-7s nspawn=%-7s link=%s\n' "$(fh_name "$i")" "$(fh_ip "$i")" "${st:-?}" \
        "${l:--}" "$(fh_nspawn_pid "$i" || echo -)" "$(cat /sys/class/net/"$(fh_hostif "$i")"/operstate 2>/dev/null || echo none)"
    done ;;
  exec)      fh_exec "$i" "$@" ;;
  ssh)       exec ssh -F "$FH_SSH_CONFIG" "root@$(fh_ip "$i")" "$@" ;;
  ip)        fh_ip "$i" ;;
  pid)       fh_leader_pid "$i" ;;
  dir)       fh_dir "$i" ;;
  machine-id) cat "$(fh_dir "$i")/machine-id" ;;
  start)     fh_ensure_host; fh_node_up "$i" && fh_node_wait "$i" >/dev/null ;;
  stop)      fh_node_stop "$i" ;;
  poweroff)  np=$(fh_nspawn_pid "$i") || exit 0
             fh_cmd "$i" systemctl poweroff
             for _ in $(seq 600); do fh_running "$np" || exit 0; sleep 0.05; done
             fh_die "node$i: still running 30s after poweroff" ;;
  kill)      fh_node_kill "$i" ;;
  restart)   fh_node_stop "$i"; fh_ensure_host; fh_node_up "$i" && fh_node_wait "$i" >/dev/null ;;
  destroy)   fh_node_destroy "$i" ;;
  partition) fh_node_partition "$i" ;;
  heal)      fh_node_heal "$i" ;;
  freeze)    fh_freeze "$i" 1 ;;
  thaw)      fh_freeze "$i" 0 ;;
  block-etcd)   fh_block "$i" -I ;;
  unblock-etcd) fh_block "$i" -D ;;
  fleetd-stop)    fh_cmd "$i" systemctl stop fleet.service ;;
  fleetd-start)   fh_cmd "$i" systemctl start fleet.service ;;
  fleetd-restart) fh_cmd "$i" systemctl restart fleet.service ;;
  fleetd-kill)    fh_cmd "$i" systemctl kill --kill-who=main --signal=SIGKILL fleet.service ;;
  journal)   exec journalctl -D "$(fh_dir "$i")/upper/var/log/journal" --no-pager "$@" ;;
  leftovers) fh_leftovers ;;
  etcd-kill)    fh_member_kill "$k" ;;
  etcd-start)   fh_member_start "$k" && fh_member_wait "$k" ;;
  etcd-freeze)  fh_member_signal "$k" STOP ;;
  etcd-thaw)    fh_member_signal "$k" CONT ;;
  etcd-isolate) fh_member_isolate "$k" "$@" ;;
  etcd-heal)    fh_member_heal "$k" ;;
  etcd-leader)  fh_member_leader ;;
  etcd-pid)     fh_member_pid "$k" ;;
  *) sed -n '2,31p' "$0" >&2; exit 2 ;;
esac
