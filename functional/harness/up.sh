#!/bin/bash
# up.sh [N]: fresh cluster $FH_CLUSTER (default "fleet"): leftovers of an earlier run of the
# same cluster are removed first, then the bridge, etcd and nodes 1..N (default 3) come up.
# Prints one line per node. FH_BIN_DIR names the directory holding fleetd and fleetctl.
# shellcheck source=lib.sh
FH_FRESH=1 . "$(dirname "$0")/lib.sh"
N=${1:-3}
fh_check_index "$N"
fh_require_root
fh_check_lock
t0=$(date +%s.%N)
fh_down
fh_ensure_host
fh_etcd_start
fh_ssh_setup
for i in $(seq 1 "$N"); do
  fh_node_up "$i" || fh_die "node$i: setup failed"
done
rc=0
for i in $(seq 1 "$N"); do
  if st=$(fh_node_wait "$i"); then
    printf '%-6s %-14s %-9s machine-id=%s\n' "$(fh_name "$i")" "$(fh_ip "$i")" "$st" "$(cat "$(fh_dir "$i")/machine-id")"
  else
    rc=1
  fi
done
echo "$N" >"$FH_STATE/nodes"
printf 'cluster %s: %d nodes up in %.1fs, etcd at %s\n' "$FH_CLUSTER" "$N" \
  "$(awk -v a="$(date +%s.%N)" -v b="$t0" 'BEGIN{print a-b}')" "$FH_ETCD_ENDPOINTS"
exit $rc
