# shellcheck shell=bash disable=SC2034 # the package lists are used by the scripts that source this
# packages.sh: what a fresh Debian machine lacks, installed through apt (sourced by ./build,
# ./test and ./cluster). Silent when everything is present.

# to build fleetd and fleetctl (etcd-client's build runs protoc)
FH_BUILD_PACKAGES="build-essential pkg-config protobuf-compiler libprotobuf-dev ca-certificates curl"
# what only ./test needs: its gates (shellcheck of the shell scripts), the checks of
# ./build --deb's package (lintian; man-db renders the man pages with man -l), and the
# headless browser of functional/tests/dashboard.rs (chromium)
FH_CHECK_PACKAGES="shellcheck lintian man-db chromium"
# to run the integration and functional tests, and the local cluster
FH_RUN_PACKAGES="etcd-server etcd-client systemd systemd-container dbus dbus-user-session openssh-server \
openssh-client iptables iproute2 util-linux procps curl"

# fh_ensure_packages PKG...: install the missing ones (one apt-get update first)
fh_ensure_packages() {
  local missing=() p rc policy=/usr/sbin/policy-rc.d made=0
  for p in "$@"; do
    [[ $(dpkg-query -W -f='${Status}' "$p" 2>/dev/null) == "install ok installed" ]] || missing+=("$p")
  done
  [ ${#missing[@]} = 0 ] && return 0
  if [ "$(id -u)" != 0 ]; then
    echo "missing packages: ${missing[*]}; run as root, or: sudo apt-get install ${missing[*]}" >&2
    return 1
  fi
  command -v apt-get >/dev/null || { echo "missing packages (${missing[*]}) and no apt-get" >&2; return 1; }
  echo "installing ${missing[*]}" >&2
  # Newly installed services (etcd, sshd) must not start on the host: the harness runs its
  # own etcd and each node its own sshd. policy-rc.d tells invoke-rc.d not to start them.
  # (The install runs in a subshell that removes the file again on any exit, also under the
  # caller's set -e or an interrupt: a leftover would stop every service start on the host.)
  if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' >"$policy" && chmod 755 "$policy" && made=1
  fi
  (
    [ $made = 1 ] && trap 'rm -f "$policy"' EXIT INT TERM
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq &&
      apt-get install -y -qq --no-install-recommends -o Dpkg::Use-Pty=0 "${missing[@]}" >/dev/null
  ) && rc=0 || rc=$?
  [ $made = 1 ] && rm -f "$policy"
  [ $rc = 0 ] || echo "apt-get install ${missing[*]} failed" >&2
  return $rc
}

# fh_ensure_rust [COMPONENT...]: cargo on PATH (a rustup toolchain if the machine has none),
# with the rustup components named (e.g. rustfmt clippy) where rustup manages the toolchain
fh_ensure_rust() {
  local c missing=()
  [ -x "$HOME/.cargo/bin/cargo" ] && case ":$PATH:" in *":$HOME/.cargo/bin:"*) ;; *) PATH=$HOME/.cargo/bin:$PATH ;; esac
  if ! command -v cargo >/dev/null; then
    echo "no cargo: installing a stable Rust toolchain with rustup" >&2
    curl -sSf --proto '=https' --tlsv1.2 https://sh.rustup.rs | sh -s -- -y -q --profile minimal >&2 || return 1
    PATH=$HOME/.cargo/bin:$PATH
  fi
  for c in "$@"; do
    case $c in
      rustfmt) cargo fmt --version >/dev/null 2>&1 || missing+=(rustfmt) ;;
      clippy) cargo clippy --version >/dev/null 2>&1 || missing+=(clippy) ;;
      *) missing+=("$c") ;;
    esac
  done
  [ ${#missing[@]} = 0 ] && return 0
  if command -v rustup >/dev/null; then
    echo "installing Rust components ${missing[*]}" >&2
    rustup component add "${missing[@]}" >&2 && return 0
  fi
  echo "missing Rust components: ${missing[*]} (rustup component add ${missing[*]})" >&2
  return 1
}
