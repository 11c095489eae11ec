//! The error type of every fallible operation in this crate; each variant names what failed.

use std::io;
use std::path::PathBuf;

/// Everything that can go wrong while connecting, authenticating or using a session.
///
/// Messages start lowercase and name the host (`host:port`), file or socket involved. Where fleet
/// had a message of its own, ours begins with fleet's words.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SshError {
    /// The address given to [`crate::connect`] could not be split into host and port.
    #[error("invalid SSH address {addr:?}: {reason}")]
    InvalidAddress { addr: String, reason: String },

    /// The TCP connection could not be made (refused, unreachable, name not resolved).
    #[error("failed to connect to {addr}: {source}")]
    Connect {
        addr: String,
        #[source]
        source: io::Error,
    },

    /// Connecting, the handshake or authentication took longer than `SshConfig::timeout`
    /// (time spent waiting for the user to answer the new-host prompt is not counted).
    #[error("timed out while initiating SSH connection to {addr}")]
    Timeout { addr: String },

    /// The SSH protocol failed during the handshake.
    #[error("SSH handshake with {addr} failed: {source}")]
    Handshake {
        addr: String,
        #[source]
        source: Box<russh::Error>,
    },

    /// The host presented a key different from the one recorded for it. A warning naming the
    /// file has already been printed to stderr, as fleet did.
    #[error(
        "host key mismatch for {host}: the {algorithm} key {fingerprint} differs from the one in {}:{line}",
        file.display()
    )]
    HostKeyMismatch {
        host: String,
        algorithm: String,
        fingerprint: String,
        file: PathBuf,
        line: usize,
    },

    /// The host presented a key listed as `@revoked`.
    #[error("host key for {host} is revoked in {}:{line}", file.display())]
    HostKeyRevoked {
        host: String,
        file: PathBuf,
        line: usize,
    },

    /// The host is not in the known-hosts file and the user (or the policy) did not trust it.
    #[error(
        "unauthorized host {host}: host key verification failed ({algorithm} key {fingerprint})"
    )]
    UntrustedHost {
        host: String,
        algorithm: String,
        fingerprint: String,
    },

    /// The server offered a certificate although none was asked for.
    #[error("host {host} presented a certificate; only plain host keys are supported")]
    HostCertificate { host: String },

    /// The known-hosts file exists but could not be read.
    #[error("failed to read known hosts file {}: {source}", file.display())]
    KnownHostsRead {
        file: PathBuf,
        #[source]
        source: io::Error,
    },

    /// Neither an agent socket nor an identity file is configured.
    #[error(
        "SSH_AUTH_SOCK environment variable is not set. Verify ssh-agent is running, or pass an identity file"
    )]
    NoAuthMethod,

    /// The ssh-agent could not be reached or did not answer.
    #[error("failed to use ssh-agent at {}: {source}", socket.display())]
    Agent {
        socket: PathBuf,
        #[source]
        source: Box<russh::keys::Error>,
    },

    /// The identity file could not be read or decoded (encrypted keys are refused).
    #[error("failed to load identity file {}: {reason}", path.display())]
    IdentityFile { path: PathBuf, reason: String },

    /// The server accepted none of the keys offered.
    #[error("unable to authenticate as {user} on {addr}: no key was accepted (tried {tried})")]
    AuthFailed {
        user: String,
        addr: String,
        tried: String,
    },

    /// A channel (session, unix socket or TCP forward) could not be opened or used.
    #[error("failed to open {what} on {addr}: {source}")]
    Channel {
        addr: String,
        what: String,
        #[source]
        source: Box<russh::Error>,
    },

    /// A request on an open channel (exec, pty, shell) failed or was refused.
    #[error("{what} on {addr} failed: {reason}")]
    Request {
        addr: String,
        what: String,
        reason: String,
    },

    /// The remote command ended without reporting an exit status or signal.
    #[error("remote command {command:?} on {addr} exited without an exit status")]
    NoExitStatus { addr: String, command: String },

    /// Local I/O failed (terminal, stdout, a local socket); `what` says which.
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: io::Error,
    },
}

impl SshError {
    pub(crate) fn io(what: impl Into<String>, source: io::Error) -> SshError {
        SshError::Io {
            what: what.into(),
            source,
        }
    }
}
