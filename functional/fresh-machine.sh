#!/bin/bash
# fresh-machine.sh [--rebuild]: prove that ./build and ./test install everything they need on
# a minimal Debian 12 that has nothing but a Rust toolchain added.
#
# It builds (once, then cached in $FRESH_CACHE) a `debootstrap --variant=minbase bookworm`
# root, puts a throw-away overlay on it, copies this working tree in (without target/ and
# bin/), binds the host's Rust toolchain read-only, and in a chroot there (private mount and
# PID namespaces; the host's network, for Debian's packages and Rust crates) runs:
#   ./build, then bin/fleetd --version      (the build packages, a release build)
#   ./test --packages                      (the packages of the test suite and the cluster)
# and checks that etcd, sshd and systemd-nspawn are then installed. --rebuild makes a new
# cached root. Root; takes minutes. Not part of ./test (too slow); run it before resolving an
# issue that touches packages or build steps.
set -euo pipefail
cd "$(dirname "$0")/.."
top=$PWD
# shellcheck source=harness/packages.sh
. functional/harness/packages.sh
[ "$(id -u)" = 0 ] || { echo "fresh-machine.sh needs root (debootstrap, mounts, chroot)" >&2; exit 1; }
: "${FRESH_CACHE:=/var/cache/fleet-fresh-machine}"
cache=$FRESH_CACHE/bookworm-minbase
# (--one-file-system: a debootstrap killed halfway may have left /proc or /sys mounted in it)
[ "${1:-}" = --rebuild ] && rm -rf --one-file-system "$cache"
t0=$SECONDS
log() { printf '[fresh-machine %4ss] %s\n' "$((SECONDS - t0))" "$*" >&2; }

fh_ensure_packages debootstrap debian-archive-keyring
fh_ensure_rust
sysroot=$(rustc --print sysroot)
[ -x "$sysroot/bin/cargo" ] || { echo "no cargo in the toolchain $sysroot" >&2; exit 1; }

# the Debian mirror this host's apt uses for bookworm itself (deb822 stanzas or one-line
# sources; not the security archive, not third-party repositories)
mirror() {
  local f u
  for f in /etc/apt/sources.list.d/*.sources; do
    [ -f "$f" ] || continue
    u=$(awk -v RS= '/(^|\n)Suites:[^\n]*[ \t]bookworm([ \t]|\n|$)/ && /(^|\n)Types:[^\n]*deb([ \t]|\n|$)/ {
          if (match($0, /(^|\n)URIs:[ \t]*[^ \t\n]+/)) { s = substr($0, RSTART, RLENGTH); sub(/^\n?URIs:[ \t]*/, "", s); print s; exit } }' "$f")
    [ -n "$u" ] && { echo "$u"; return; }
  done
  awk '$1 == "deb" && $2 !~ /^\[/ && $3 == "bookworm" { print $2; exit }
       $1 == "deb" && $2 ~ /^\[/ && $4 == "bookworm" { print $3; exit }' /etc/apt/sources.list 2>/dev/null
}

if [ ! -f "$cache/.complete" ]; then
  rm -rf --one-file-system "$cache"; mkdir -p "$cache"
  m=$(mirror)
  log "debootstrap --variant=minbase bookworm${m:+ from $m}"
  debootstrap --variant=minbase bookworm "$cache" ${m:+"$m"} >"$FRESH_CACHE/debootstrap.log" 2>&1 ||
    { tail -20 "$FRESH_CACHE/debootstrap.log" >&2; exit 1; }
  apt-get -qq clean -o RootDir="$cache" 2>/dev/null || true
  touch "$cache/.complete"
  log "cached the root in $cache ($(du -sh "$cache" | cut -f1))"
else
  log "using the cached root $cache"
fi

# a throw-away overlay on the cached root, removed on exit
work=$(mktemp -d /var/tmp/fleet-fresh.XXXXXX)
root=$work/root
# shellcheck disable=SC2317 # run by the EXIT trap
cleanup() {
  mountpoint -q "$root" && umount "$root"
  rm -rf "$work"
}
trap cleanup EXIT
mkdir -p "$work/upper" "$work/work" "$root"
mount -t overlay fleet-fresh -o "lowerdir=$cache,upperdir=$work/upper,workdir=$work/work" "$root"
mkdir -p "$root/src"
tar -C "$top" --exclude=./target --exclude=./bin --exclude=./.git -cf - . | tar -C "$root/src" -xf -
log "copied the tree to the container's /src"

# In the container: only what a new user has (root, bash, a Rust toolchain on PATH).
# shellcheck disable=SC2016 # expanded in the container
script='set -e
cd /src
echo "--- ./build"; ./build
echo "--- bin/fleetd --version"; bin/fleetd --version
echo "--- ./test --packages"; ./test --packages
echo "--- installed:"
missing=0
for t in etcd /usr/sbin/sshd systemd-nspawn; do
  if p=$(command -v "$t"); then echo "  $p"; else echo "  MISSING: $t"; missing=1; fi
done
exit $missing'
# A chroot in private mount and PID namespaces (no systemd needed on the host): the mounts
# below vanish with the namespace; the host's resolv.conf for DNS.
cp -L /etc/resolv.conf "$root/etc/resolv.conf"
# This host's trusted CAs go along (where a network inspects TLS, its CA is part of the
# machine image, not of the project): cargo is pointed at them; the root's own
# ca-certificates package is still installed by ./build.
ca=()
for f in "${SSL_CERT_FILE:-}" /etc/ssl/certs/ca-certificates.crt; do
  if [ -n "$f" ] && [ -f "$f" ]; then
    cp -L "$f" "$root/etc/fresh-machine-host-ca.crt"
    ca=(CARGO_HTTP_CAINFO=/etc/fresh-machine-host-ca.crt SSL_CERT_FILE=/etc/fresh-machine-host-ca.crt)
    break
  fi
done
mkdir -p "$root/opt/rust"
rc=0
# shellcheck disable=SC2016 # expanded by the inner shell
unshare --mount --pid --fork --propagation private --mount-proc="$root/proc" \
  bash -c 'set -e; root=$1 sysroot=$2 script=$3; shift 3
    mount --rbind /dev "$root/dev"
    mount -t sysfs -o ro sysfs "$root/sys"
    mount -t tmpfs tmpfs "$root/tmp"
    mount --bind "$sysroot" "$root/opt/rust"
    mount -o remount,bind,ro "$root/opt/rust"
    exec chroot "$root" /usr/bin/env -i HOME=/root CARGO_HOME=/root/.cargo LANG=C.UTF-8 \
      PATH=/opt/rust/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin "$@" \
      bash -c "$script"' fresh "$root" "$sysroot" "$script" "${ca[@]}" || rc=$?
if [ $rc = 0 ]; then log "PASSED: ./build and ./test's packages on a minimal Debian 12"; else log "FAILED (exit $rc)"; fi
exit $rc
