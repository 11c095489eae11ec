#!/bin/bash
# down.sh: stop and remove every resource of cluster $FH_CLUSTER (default "fleet"), and no
# other cluster's. Safe to run twice, after a crash, or after a partial up.
# shellcheck source=lib.sh
. "$(dirname "$0")/lib.sh"
fh_require_root
fh_check_lock
fh_down
fh_leftovers >&2 || fh_die "leftovers after down (see above)"
