#!/bin/bash
# systemd-tests.sh [FILTER...]: run fleet-systemd's tests against a real systemd. They need
# systemd as PID 1, so on the host they are #[ignore]d; this builds them, boots a one-node
# harness cluster (FH_CLUSTER, default "fsdtest"), runs the test binary inside the node with
# --ignored, and removes the cluster. Prints libtest's own output (its "test result:" line
# says how many ran). Root; used by ./test. Arguments are passed to the test binary.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
export FH_CLUSTER=${FH_CLUSTER:-fsdtest}
H=functional/harness
# shellcheck source=harness/lib.sh
. "$H/lib.sh"
fh_require_root

# the test binary, as cargo reports it
exe=$(cargo test -p fleet-systemd --test systemd --no-run --message-format=json 2>/dev/null |
  sed -n 's/.*"executable":"\([^"]*\)".*/\1/p' | tail -n 1)
{ [ -n "$exe" ] && [ -x "$exe" ]; } || { echo "systemd-tests: building fleet-systemd's tests failed" >&2;
  cargo test -p fleet-systemd --test systemd --no-run; exit 1; }
# the fleetd the node runs (nothing to do when ./test built it already)
cargo build -q -p fleetd -p fleetctl || exit 1
bin=$(cd "${CARGO_TARGET_DIR:-target}/debug" && pwd)

# hold the cluster's lock for the whole run, as the Rust harness does
mkdir -p "$FH_ROOT"
exec 9>"$FH_LOCK"
flock -w 600 9 || fh_die "cluster $FH_CLUSTER is in use (lock $FH_LOCK)"
export FH_LOCK_HELD=1
# shellcheck disable=SC2317 # run by the EXIT trap
cleanup() { "$H/down.sh" >/dev/null 2>&1 || "$H/down.sh"; rm -f "$FH_LOCK"; }
trap cleanup EXIT

# The binary and its directory are bound into the node read-only: the node's root is an
# overlay of the host's /, which shows no other mount (a target dir may live on one).
dir=$(dirname "$exe")
FH_BIN_DIR=$bin FH_NSPAWN_ARGS="${FH_NSPAWN_ARGS:-} --bind-ro=$dir:/opt/fleet-systemd-tests" \
  "$H/up.sh" 1 >/dev/null || { echo "systemd-tests: the node did not come up" >&2; exit 1; }
# root's user manager, for the test of fleetd as a user service (its own bus under /run/user/0)
"$H/node.sh" exec 1 loginctl enable-linger root
for _ in $(seq 100); do "$H/node.sh" exec 1 test -S /run/user/0/bus && break; sleep 0.1; done
"$H/node.sh" exec 1 env XDG_RUNTIME_DIR=/run/user/0 \
  "/opt/fleet-systemd-tests/$(basename "$exe")" --ignored --test-threads 1 "$@"
