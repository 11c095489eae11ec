//! fleetctl's SSH layer: connect to a machine, check its host key against fleet's known-hosts
//! file, run commands or an interactive shell, and carry tunnelled API/etcd streams.
//!
//! Built on `russh`. It covers what fleet's `ssh/` package and `fleetctl fd-forward` did, plus
//! identity-file authentication (fleet only used ssh-agent).
//!
//! # API
//!
//! - [`SshConfig`]: user, port, timeout, host-key policy, known-hosts file, identity file, agent
//!   socket, agent forwarding. `SshConfig::default()` matches fleetctl's flag defaults.
//! - [`connect`]`(host, &cfg) -> Session`: TCP connect, host-key check, authentication, all
//!   within `cfg.timeout` (the time a user spends answering the new-host prompt excluded).
//! - [`Session::exec`] / [`Session::exec_capture`]: a remote command without a PTY, output
//!   streamed to ours or captured, exit status returned.
//! - [`Session::execute`]: fleet's `Execute` for `status` and `journal`: `shell(Some(cmd))`
//!   when stdin is a terminal, else `exec(cmd)`.
//! - [`Session::shell`]: `fleetctl ssh`'s interactive session (PTY and raw mode when stdin is a
//!   terminal). [`Session::run`] is the general form with caller-supplied I/O.
//! - [`Session::open_unix_socket`] / [`Session::open_tcp`]: an [`SshStream`] to a remote unix
//!   socket (`direct-streamlocal@openssh.com`) or TCP port (`direct-tcpip`), for `--tunnel`.
//! - [`Session::connect_via`]: a second connection tunnelled through this one (`--tunnel` with
//!   `fleetctl ssh`).
//! - [`fd_forward`] / [`forward_unix_socket`]: `fleetctl fd-forward SOCKET`.
//! - [`known_hosts`]: the known-hosts format, usable on its own.
//!
//! # Authentication
//!
//! Public keys only. The identity file is tried first when set (unencrypted OpenSSH, PKCS#1 or
//! PKCS#8 key: ed25519, ECDSA or RSA), then every key held by the agent at `agent_socket`
//! (default `$SSH_AUTH_SOCK`). With neither, [`connect`] fails before dialling with fleet's
//! "SSH_AUTH_SOCK environment variable is not set" message.
//!
//! # Host keys
//!
//! With `strict_host_key_checking` (the default) the server's key is looked up in
//! `known_hosts_file` (OpenSSH format: wildcards, `!` negation, hashed `|1|` names,
//! `[host]:port` for non-default ports, `@revoked`). The host matches under the address actually
//! reached (what fleet recorded) or under the name given. A matching entry with the same key
//! accepts; matching entries with other keys abort with fleet's "REMOTE HOST IDENTIFICATION HAS
//! CHANGED" warning on stderr, naming the file and line, and [`SshError::HostKeyMismatch`]. An
//! unknown host is handled by [`NewHostPolicy`]: fleet's yes/no prompt (default), accept, or
//! reject; an accepted key is appended under the address reached (directories created 0700,
//! file 0600). With `strict_host_key_checking = false` no check is made and the file is never
//! read or written. Only the key types recorded for a known host are offered during key
//! exchange, so a server with several host keys shows the recorded one.
//!
//! # Exit codes
//!
//! The remote exit status is returned as is; a command killed by a signal yields 128 + the
//! signal number (fleet's behaviour via Go's SSH library); a channel that closes without either
//! is [`SshError::NoExitStatus`].
//!
//! # Wiring into fleetctl
//!
//! - Flags: `--ssh-username` → `user`, `--ssh-port` → `port`, `--ssh-timeout` → `timeout`,
//!   `--strict-host-key-checking` → `strict_host_key_checking`, `--known-hosts-file` →
//!   `known_hosts_file`, `-A/--forward-agent` → `forward_agent`.
//! - `fleetctl ssh MACHINE [CMD...]`: `shell(None)` / `shell(Some(cmd))`. fleet's `Execute`
//!   also served `status` and `journal`: they call `execute(cmd)` (a PTY when stdin is a
//!   terminal, so Ctrl-C reaches `journalctl -f`; no PTY and no stdin otherwise); `exec` is
//!   for callers that never want a PTY or stdin.
//! - `--tunnel HOST` for the API: `connect(HOST)`, then one `open_unix_socket(path)` (or
//!   `open_tcp`) per HTTP connection; for etcd, `open_tcp(host, port)`. fleet ran
//!   `fleetctl fd-forward` remotely instead; the direct channel needs no fleetctl on the host.
//! - `--tunnel HOST ssh MACHINE`: `connect(HOST)` then `connect_via(MACHINE)`.
//! - fleet prefixed these errors with `Failed building SSH client: `, `Unable to SSH to remote
//!   host: ` and so on; those prefixes belong to fleetctl.

mod client;
mod error;
mod fdforward;
pub mod known_hosts;
mod session;
mod stdin;
mod terminal;

use std::path::PathBuf;
use std::time::Duration;

pub use error::SshError;
pub use fdforward::{fd_forward, forward_unix_socket};
pub use session::{DEFAULT_TERM, PtyRequest, Session, SshStream};
pub use terminal::RawMode;

/// fleetctl's default known-hosts file, before `~` expansion.
pub const DEFAULT_KNOWN_HOSTS_FILE: &str = "~/.fleetctl/known_hosts";

/// fleetctl's default SSH user.
pub const DEFAULT_USER: &str = "core";

/// fleetctl's default `--ssh-timeout`.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);

/// What to do with a host that has no entry in the known-hosts file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum NewHostPolicy {
    /// fleet's behaviour: print the fingerprint and ask "Are you sure you want to continue
    /// connecting (yes/no)?" on stderr, reading the answer from stdin; trust on "yes"/"y".
    #[default]
    Ask,
    /// Trust on first use without asking (OpenSSH's `accept-new`).
    Accept,
    /// Refuse unknown hosts.
    Reject,
}

/// How to connect. `Default` gives fleetctl's defaults.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SshConfig {
    /// Remote user (`--ssh-username`, default `core`).
    pub user: String,
    /// Port used when the address has none (`--ssh-port`, default 22).
    pub port: u16,
    /// Limit for connecting, the handshake and authentication (`--ssh-timeout`, default 10 s).
    pub timeout: Duration,
    /// Check host keys against `known_hosts_file` (`--strict-host-key-checking`, default true).
    pub strict_host_key_checking: bool,
    /// Known-hosts file (`--known-hosts-file`); a leading `~/` is expanded when used.
    pub known_hosts_file: PathBuf,
    /// Private key to authenticate with, tried before the agent's keys.
    pub identity_file: Option<PathBuf>,
    /// ssh-agent socket; default `$SSH_AUTH_SOCK` when set and non-empty. Used for
    /// authentication and as the target of forwarded agent connections.
    pub agent_socket: Option<PathBuf>,
    /// Ask the server to forward agent connections back to `agent_socket` (`-A`).
    pub forward_agent: bool,
    /// Handling of hosts missing from the known-hosts file.
    pub new_host: NewHostPolicy,
}

impl Default for SshConfig {
    fn default() -> Self {
        SshConfig {
            user: DEFAULT_USER.to_string(),
            port: known_hosts::DEFAULT_SSH_PORT,
            timeout: DEFAULT_TIMEOUT,
            strict_host_key_checking: true,
            known_hosts_file: known_hosts::expand_tilde(DEFAULT_KNOWN_HOSTS_FILE.as_ref()),
            identity_file: None,
            agent_socket: std::env::var_os("SSH_AUTH_SOCK")
                .filter(|s| !s.is_empty())
                .map(PathBuf::from),
            forward_agent: false,
            new_host: NewHostPolicy::default(),
        }
    }
}

/// Connects to `host` (`"host"`, `"host:port"`, `"[v6addr]:port"`; `cfg.port` when no port is
/// given), verifies its host key and authenticates. See the crate docs for the policies.
pub async fn connect(host: &str, cfg: &SshConfig) -> Result<Session, SshError> {
    client::connect(host, cfg).await
}

/// Compile-time checks that the public types and futures can move between tasks, as fleetctl's
/// tunnel connectors and spawned commands need.
#[allow(dead_code)]
fn _static_assertions() {
    fn send_sync<T: Send + Sync>() {}
    fn stream<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send>() {}
    fn send<T: Send>(_: &T) {}
    send_sync::<Session>();
    send_sync::<SshError>();
    send_sync::<SshConfig>();
    stream::<SshStream>();
    let cfg = SshConfig::default();
    send(&connect("h", &cfg));
    send(&fd_forward(std::path::Path::new("/s")));
    let _ = |s: &Session| {
        send(&s.exec("x"));
        send(&s.exec_capture("x"));
        send(&s.shell(None));
        send(&s.execute("x"));
        send(&s.open_unix_socket("/s"));
        send(&s.open_tcp("h", 1));
        send(&s.connect_via("h", &cfg));
    };
}
