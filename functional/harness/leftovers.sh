#!/bin/bash
# leftovers.sh: print what cluster $FH_CLUSTER left behind (mounts, netns, links, address,
# cgroups, processes, state, nspawn dirs, bound etcd ports), one line each; exit 1 if any.
# shellcheck source=lib.sh
. "$(dirname "$0")/lib.sh"
fh_leftovers
