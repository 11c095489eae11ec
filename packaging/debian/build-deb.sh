#!/bin/bash
# build-deb.sh [BINDIR [OUTDIR]]: the Debian package of fleet from what ./build made in
# BINDIR (default bin/: fleetd, fleetctl, man/, completions/, fleet.conf) and the files
# beside this script, written to OUTDIR (default BINDIR); prints the path of the .deb.
# Called by ./build --deb, and by functional/tests/package.rs with the debug binaries. dpkg-deb alone: the package is simple enough that debhelper
# would add a build dependency and a debian/ tree without saving any work.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
bin=$(cd "${1:-$root/bin}" && pwd)
outdir=$(cd "${2:-$bin}" && pwd)
for f in fleetd fleetctl man/fleetctl.1 man/fleetd.8 man/fleet.conf.5 completions/bash/fleetctl \
  completions/zsh/_fleetctl fleet.conf; do
  [ -e "$bin/$f" ] || { echo "build-deb.sh: $bin/$f is missing; run ./build first" >&2; exit 1; }
done

pkg=fleet
version=$("$bin/fleetd" --version | sed -n 's/^fleetd version //p')
[ -n "$version" ] || { echo "build-deb.sh: cannot read fleetd's version" >&2; exit 1; }
arch=$(dpkg --print-architecture)
maintainer=${DEB_MAINTAINER:-fleet maintainers <fleet@example.org>}
# the date of the last commit, so that the same tree gives the same package
when=$(git -C "$root" log -1 --format=%ct 2>/dev/null || date +%s)
out=$outdir/${pkg}_${version}_${arch}.deb

stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
chmod 0755 "$stage"
umask 022
doc=$stage/usr/share/doc/$pkg

install -d "$stage/DEBIAN" "$stage/usr/bin" "$stage/usr/lib/fleet" "$doc" \
  "$stage/usr/share/man/man1" "$stage/usr/share/man/man5" "$stage/usr/share/man/man8" \
  "$stage/lib/systemd/system" "$stage/etc/fleet" \
  "$stage/usr/share/bash-completion/completions" "$stage/usr/share/zsh/vendor-completions"

for b in fleetd fleetctl; do
  install -m 0755 "$bin/$b" "$stage/usr/bin/$b"
  strip --strip-unneeded --remove-section=.comment --remove-section=.note "$stage/usr/bin/$b"
done
install -m 0755 "$here/stop-keeping-units" "$stage/usr/lib/fleet/stop-keeping-units"

# the harness runs fleetd from /opt/fleet/bin; a Debian package installs it in /usr/bin
sed 's|^ExecStart=/opt/fleet/bin/fleetd|ExecStart=/usr/bin/fleetd|' \
  "$root/fleetd/units/fleet.service" >"$stage/lib/systemd/system/fleet.service"
grep -q '^ExecStart=/usr/bin/fleetd' "$stage/lib/systemd/system/fleet.service" || {
  echo "build-deb.sh: fleetd/units/fleet.service has no ExecStart=/opt/fleet/bin/fleetd to rewrite" >&2
  exit 1
}
install -m 0644 "$root/fleetd/units/fleet.socket" "$stage/lib/systemd/system/fleet.socket"
chmod 0644 "$stage/lib/systemd/system/fleet.service"

for page in "$bin"/man/*.[158]; do
  name=$(basename "$page")
  gzip -9n <"$page" >"$stage/usr/share/man/man${name##*.}/$name.gz"
done
install -m 0644 "$bin/completions/bash/fleetctl" "$stage/usr/share/bash-completion/completions/fleetctl"
install -m 0644 "$bin/completions/zsh/_fleetctl" "$stage/usr/share/zsh/vendor-completions/_fleetctl"
install -m 0644 "$bin/fleet.conf" "$stage/etc/fleet/fleet.conf"

install -m 0644 "$here/copyright" "$doc/copyright"
{
  printf '%s (%s) unstable; urgency=medium\n\n' "$pkg" "$version"
  printf '  * fleetd and fleetctl %s, built from this repository by ./build --deb.\n\n' "$version"
  printf ' -- %s  %s\n' "$maintainer" "$(date -u -R -d "@$when")"
} | gzip -9n >"$doc/changelog.gz"

for s in postinst prerm postrm; do
  install -m 0755 "$here/$s" "$stage/DEBIAN/$s"
done
echo /etc/fleet/fleet.conf >"$stage/DEBIAN/conffiles"

# shared library dependencies, as dpkg-shlibdeps finds them (it wants a debian/control)
shlibs=$(
  cd "$stage" && mkdir debian && printf 'Source: %s\n\nPackage: %s\nArchitecture: any\n' "$pkg" "$pkg" >debian/control &&
    dpkg-shlibdeps -O usr/bin/fleetd usr/bin/fleetctl 2>/dev/null | sed -n 's/^shlibs:Depends=//p'
  rm -rf debian
)
[ -n "$shlibs" ] || { echo "build-deb.sh: dpkg-shlibdeps found no dependencies" >&2; exit 1; }

size=$(du -sk --exclude=DEBIAN "$stage" | cut -f1)
cat >"$stage/DEBIAN/control" <<CONTROL
Package: $pkg
Version: $version
Architecture: $arch
Maintainer: $maintainer
Installed-Size: $size
Depends: $shlibs, systemd
Suggests: etcd-server
Section: admin
Priority: optional
Homepage: https://github.com/coreos/fleet
Description: cluster-wide init system on etcd and systemd
 fleet ties together systemd and etcd into one init system for a cluster of
 machines: units submitted with fleetctl are scheduled onto machines and run by
 their systemd, and moved when a machine leaves.
 .
 This package holds fleetd, the daemon every machine runs (started by
 fleet.socket and fleet.service), and fleetctl, the command-line client.
CONTROL

(cd "$stage" && find . -path ./DEBIAN -prune -o -type f -printf '%P\0' | LC_ALL=C sort -z |
  xargs -0 md5sum >DEBIAN/md5sums)
chmod 0644 "$stage/DEBIAN/control" "$stage/DEBIAN/conffiles" "$stage/DEBIAN/md5sums"
find "$stage" -exec touch -h -d "@$when" {} +
SOURCE_DATE_EPOCH=$when dpkg-deb --root-owner-group -Zxz --build "$stage" "$out" >/dev/null
echo "$out"
