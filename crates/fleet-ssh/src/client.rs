//! Connecting: address parsing, the connection deadline, the russh handler that checks host keys
//! and serves forwarded agent channels, and public-key authentication (identity file, agent).

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use russh::client::{self, Handle, Msg};
use russh::keys::agent::AgentIdentity;
use russh::keys::agent::client::AgentClient;
use russh::keys::{HashAlg, PrivateKeyWithHashAlg, PublicKey, PublicKeyOrCertificate};
use russh::{Channel, ChannelOpenFailure, Preferred};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::time::Instant;

use crate::error::SshError;
use crate::known_hosts::{self, KnownHosts, Verdict};
use crate::session::Session;
use crate::{NewHostPolicy, SshConfig};

/// Splits `"host"`, `"host:port"`, `"[v6]:port"`, `"[v6]"` or a bare IPv6 address.
pub(crate) fn split_host_port(addr: &str, default_port: u16) -> Result<(String, u16), SshError> {
    let invalid = |reason: &str| SshError::InvalidAddress {
        addr: addr.to_string(),
        reason: reason.to_string(),
    };
    let parse_port = |p: &str| {
        p.parse::<u16>()
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| invalid("port must be a number from 1 to 65535"))
    };
    let (host, port) = if let Some(rest) = addr.strip_prefix('[') {
        let (host, after) = rest.split_once(']').ok_or_else(|| invalid("missing ']'"))?;
        match after {
            "" => (host, default_port),
            _ => match after.strip_prefix(':') {
                Some(p) => (host, parse_port(p)?),
                None => return Err(invalid("unexpected text after ']'")),
            },
        }
    } else {
        match addr.matches(':').count() {
            0 => (addr, default_port),
            1 => {
                let (h, p) = addr.split_once(':').unwrap_or((addr, ""));
                (h, parse_port(p)?)
            }
            _ => (addr, default_port),
        }
    };
    if host.is_empty() {
        return Err(invalid("empty host"));
    }
    Ok((host.to_string(), port))
}

/// `host:port`, bracketing IPv6 hosts, for messages.
pub(crate) fn display_addr(host: &str, port: u16) -> String {
    if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

/// A deadline that can be paused while the user answers a prompt.
struct Deadline {
    state: Mutex<(bool, Instant)>,
    changed: tokio::sync::Notify,
    timeout: Duration,
}

impl Deadline {
    fn new(timeout: Duration) -> Deadline {
        Deadline {
            state: Mutex::new((false, Instant::now() + timeout)),
            changed: tokio::sync::Notify::new(),
            timeout,
        }
    }

    fn pause(&self) {
        if let Ok(mut st) = self.state.lock() {
            st.0 = true;
        }
        self.changed.notify_one();
    }

    /// Resumes with a fresh full timeout.
    fn resume(&self) {
        if let Ok(mut st) = self.state.lock() {
            *st = (false, Instant::now() + self.timeout);
        }
        self.changed.notify_one();
    }

    async fn expired(&self) {
        loop {
            let (paused, at) = match self.state.lock() {
                Ok(st) => *st,
                Err(_) => return,
            };
            if paused {
                self.changed.notified().await;
                continue;
            }
            if Instant::now() >= at {
                return;
            }
            tokio::select! {
                _ = tokio::time::sleep_until(at) => {}
                _ = self.changed.notified() => {}
            }
        }
    }
}

/// What the handler needs to check a host key.
struct HostCheck {
    file: PathBuf,
    known: KnownHosts,
    /// Names the host may be recorded under.
    names: Vec<String>,
    /// The name a newly trusted key is recorded under.
    store_name: String,
    policy: NewHostPolicy,
}

/// Errors raised inside the russh handler.
#[derive(Debug)]
pub(crate) enum HandlerError {
    Russh(russh::Error),
    Rejected(SshError),
}

impl From<russh::Error> for HandlerError {
    fn from(e: russh::Error) -> Self {
        HandlerError::Russh(e)
    }
}

/// The russh client handler of one connection.
pub(crate) struct ClientHandler {
    host: String,
    check: Option<HostCheck>,
    deadline: Arc<Deadline>,
    /// Set when agent channels from the server should reach the local agent.
    agent_forward_to: Option<PathBuf>,
}

impl ClientHandler {
    async fn check_key(&mut self, key: &PublicKey) -> Result<bool, HandlerError> {
        let Some(check) = self.check.as_mut() else {
            return Ok(true);
        };
        let algorithm = known_hosts::algo_string(key);
        let fingerprint = known_hosts::fingerprint(key);
        match check.known.check(&check.names, key) {
            Verdict::Known => Ok(true),
            Verdict::Mismatch { line } => {
                eprint!(
                    "{}",
                    known_hosts::mismatch_warning(&algorithm, &fingerprint, &check.file, line)
                );
                Err(HandlerError::Rejected(SshError::HostKeyMismatch {
                    host: self.host.clone(),
                    algorithm,
                    fingerprint,
                    file: check.file.clone(),
                    line,
                }))
            }
            Verdict::Revoked { line } => {
                eprintln!(
                    "Host key for {} is marked as revoked in {}:{line}.",
                    self.host,
                    check.file.display()
                );
                Err(HandlerError::Rejected(SshError::HostKeyRevoked {
                    host: self.host.clone(),
                    file: check.file.clone(),
                    line,
                }))
            }
            Verdict::Unknown => {
                let trusted = match check.policy {
                    NewHostPolicy::Accept => true,
                    NewHostPolicy::Reject => false,
                    NewHostPolicy::Ask => {
                        self.deadline.pause();
                        let answer =
                            ask_to_trust(&check.store_name, &algorithm, &fingerprint).await;
                        self.deadline.resume();
                        answer
                    }
                };
                if !trusted {
                    eprintln!("Host key verification failed.");
                    return Err(HandlerError::Rejected(SshError::UntrustedHost {
                        host: self.host.clone(),
                        algorithm,
                        fingerprint,
                    }));
                }
                match known_hosts::append(&check.file, &check.store_name, key) {
                    Ok(()) => eprintln!(
                        "Warning: Permanently added '{}' ({algorithm}) to the list of known hosts.",
                        check.store_name
                    ),
                    Err(e) => {
                        tracing::debug!("appending to {}: {e}", check.file.display());
                        eprintln!(
                            "Failed to add the host to the list of known hosts ({}).",
                            check.file.display()
                        );
                    }
                }
                // A re-key later in this connection must find the key known.
                check.known.insert(&check.store_name, key.clone());
                Ok(true)
            }
        }
    }
}

/// fleet's interactive question; anything but "yes" or "y" refuses.
async fn ask_to_trust(name: &str, algorithm: &str, fingerprint: &str) -> bool {
    eprint!(
        "{}",
        known_hosts::trust_prompt(name, algorithm, fingerprint)
    );
    let mut stdin = crate::stdin::reader().await;
    let answer = stdin.read_line().await.unwrap_or_default();
    matches!(answer.trim().to_ascii_lowercase().as_str(), "yes" | "y")
}

impl client::Handler for ClientHandler {
    type Error = HandlerError;

    async fn check_server_key(
        &mut self,
        server_public_key: &PublicKeyOrCertificate,
    ) -> Result<bool, Self::Error> {
        match server_public_key {
            PublicKeyOrCertificate::PublicKey { key, .. } => self.check_key(key).await,
            PublicKeyOrCertificate::Certificate(_) => {
                Err(HandlerError::Rejected(SshError::HostCertificate {
                    host: self.host.clone(),
                }))
            }
        }
    }

    async fn server_channel_open_agent_forward(
        &mut self,
        channel: Channel<Msg>,
        reply: client::ChannelOpenHandle,
        _session: &mut client::Session,
    ) -> Result<(), Self::Error> {
        let Some(socket) = self.agent_forward_to.clone() else {
            reply
                .reject(ChannelOpenFailure::AdministrativelyProhibited)
                .await;
            return Ok(());
        };
        match tokio::net::UnixStream::connect(&socket).await {
            Ok(mut agent) => {
                reply.accept().await;
                tokio::spawn(async move {
                    let mut stream = channel.into_stream();
                    if let Err(e) = tokio::io::copy_bidirectional(&mut stream, &mut agent).await {
                        tracing::debug!("forwarded agent channel ended: {e}");
                    }
                });
            }
            Err(e) => {
                tracing::warn!("cannot reach ssh-agent at {}: {e}", socket.display());
                reply.reject(ChannelOpenFailure::ConnectFailed).await;
            }
        }
        Ok(())
    }
}

/// Connects over TCP to `addr` ("host" or "host:port"), checks the host key and authenticates.
pub(crate) async fn connect(addr: &str, cfg: &SshConfig) -> Result<Session, SshError> {
    let (host, port) = split_host_port(addr, cfg.port)?;
    let shown = display_addr(&host, port);
    ensure_auth_method(cfg)?;
    let deadline = Arc::new(Deadline::new(cfg.timeout));
    let attempt = async {
        let tcp = tokio::net::TcpStream::connect((host.as_str(), port))
            .await
            .map_err(|source| SshError::Connect {
                addr: shown.clone(),
                source,
            })?;
        let _ = tcp.set_nodelay(true);
        // fleet records hosts under the address it actually reached; match the name typed too.
        let peer = tcp
            .peer_addr()
            .map(|a| known_hosts::host_port_name(&a.ip().to_string(), port))
            .unwrap_or_else(|_| known_hosts::host_port_name(&host, port));
        let mut names = vec![peer.clone()];
        let typed = known_hosts::host_port_name(&host, port);
        if typed != peer {
            names.push(typed);
        }
        handshake(tcp, &shown, names, peer, cfg, deadline.clone()).await
    };
    tokio::select! {
        r = attempt => r,
        _ = deadline.expired() => Err(SshError::Timeout { addr: shown }),
    }
}

/// Connects to `addr` through a direct-tcpip channel of `via` (fleet's tunnelled client for
/// `fleetctl --tunnel X ssh MACHINE`). The target's key is checked under the name given.
pub(crate) async fn connect_via(
    via: &Session,
    addr: &str,
    cfg: &SshConfig,
) -> Result<Session, SshError> {
    let (host, port) = split_host_port(addr, cfg.port)?;
    let shown = display_addr(&host, port);
    ensure_auth_method(cfg)?;
    let deadline = Arc::new(Deadline::new(cfg.timeout));
    let attempt = async {
        let stream = via.open_tcp(&host, port).await?;
        let name = known_hosts::host_port_name(&host, port);
        handshake(
            stream,
            &shown,
            vec![name.clone()],
            name,
            cfg,
            deadline.clone(),
        )
        .await
    };
    tokio::select! {
        r = attempt => r,
        _ = deadline.expired() => Err(SshError::Timeout { addr: shown }),
    }
}

fn ensure_auth_method(cfg: &SshConfig) -> Result<(), SshError> {
    if cfg.identity_file.is_none() && cfg.agent_socket.is_none() {
        return Err(SshError::NoAuthMethod);
    }
    Ok(())
}

async fn handshake<S>(
    stream: S,
    shown: &str,
    names: Vec<String>,
    store_name: String,
    cfg: &SshConfig,
    deadline: Arc<Deadline>,
) -> Result<Session, SshError>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let mut preferred = Preferred::default();
    let check = if cfg.strict_host_key_checking {
        let file = known_hosts::expand_tilde(&cfg.known_hosts_file);
        let known = KnownHosts::load(&file)?;
        let algorithms = known.algorithms_for(&names, &known_hosts::default_host_key_algorithms());
        if !algorithms.is_empty() {
            preferred.key = algorithms.into();
        }
        Some(HostCheck {
            file,
            known,
            names,
            store_name,
            policy: cfg.new_host,
        })
    } else {
        None
    };
    let config = Arc::new(client::Config {
        preferred,
        nodelay: true,
        ..Default::default()
    });
    let handler = ClientHandler {
        host: shown.to_string(),
        check,
        deadline,
        agent_forward_to: if cfg.forward_agent {
            cfg.agent_socket.clone()
        } else {
            None
        },
    };
    let mut handle = client::connect_stream(config, stream, handler)
        .await
        .map_err(|e| match e {
            HandlerError::Rejected(e) => e,
            HandlerError::Russh(source) => SshError::Handshake {
                addr: shown.to_string(),
                source: Box::new(source),
            },
        })?;
    authenticate(&mut handle, cfg, shown).await?;
    Ok(Session::new(handle, shown.to_string(), cfg.forward_agent))
}

/// The RSA signature hash to use with this server: the best it announces, else legacy SHA-1.
async fn rsa_hash(handle: &Handle<ClientHandler>, key: &PublicKey) -> Option<HashAlg> {
    if !key.algorithm().is_rsa() {
        return None;
    }
    handle
        .best_supported_rsa_hash()
        .await
        .ok()
        .flatten()
        .flatten()
}

async fn authenticate(
    handle: &mut Handle<ClientHandler>,
    cfg: &SshConfig,
    shown: &str,
) -> Result<(), SshError> {
    let handshake_err = |source: russh::Error| SshError::Handshake {
        addr: shown.to_string(),
        source: Box::new(source),
    };
    let mut tried = Vec::new();
    if let Some(path) = &cfg.identity_file {
        let key = load_identity(path)?;
        let hash = rsa_hash(handle, key.public_key()).await;
        let result = handle
            .authenticate_publickey(
                cfg.user.clone(),
                PrivateKeyWithHashAlg::new(Arc::new(key), hash),
            )
            .await
            .map_err(handshake_err)?;
        if result.success() {
            return Ok(());
        }
        tried.push(format!("identity file {}", path.display()));
    }
    if let Some(socket) = &cfg.agent_socket {
        let agent_err = |source| SshError::Agent {
            socket: socket.clone(),
            source: Box::new(source),
        };
        let mut agent = AgentClient::connect_uds(socket).await.map_err(agent_err)?;
        let identities = agent.request_identities().await.map_err(agent_err)?;
        let mut offered = 0;
        for identity in identities {
            let AgentIdentity::PublicKey { key, .. } = identity else {
                continue;
            };
            offered += 1;
            let hash = rsa_hash(handle, &key).await;
            let label = format!(
                "agent key {} {}",
                key.algorithm().as_str(),
                known_hosts::fingerprint(&key)
            );
            let result = handle
                .authenticate_publickey_with(cfg.user.clone(), key, hash, &mut agent)
                .await;
            match result {
                Ok(r) if r.success() => return Ok(()),
                Ok(_) => tried.push(label),
                Err(e) => tried.push(format!("{label} (agent error: {e})")),
            }
        }
        if offered == 0 {
            tried.push(format!("ssh-agent at {} (holds no keys)", socket.display()));
        }
    }
    Err(SshError::AuthFailed {
        user: cfg.user.clone(),
        addr: shown.to_string(),
        tried: tried.join(", "),
    })
}

/// Loads an unencrypted private key (OpenSSH, PKCS#1 or PKCS#8 PEM).
fn load_identity(path: &Path) -> Result<russh::keys::PrivateKey, SshError> {
    russh::keys::load_secret_key(path, None).map_err(|e| SshError::IdentityFile {
        path: path.to_path_buf(),
        reason: match e {
            russh::keys::Error::KeyIsEncrypted => {
                "the key is encrypted; add it to ssh-agent instead".to_string()
            }
            other => other.to_string(),
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses() {
        let check = |addr: &str, expected: Option<(&str, u16)>| {
            let got = split_host_port(addr, 22).ok();
            assert_eq!(
                got,
                expected.map(|(h, p)| (h.to_string(), p)),
                "address {addr:?}"
            );
        };
        check("10.0.0.1", Some(("10.0.0.1", 22)));
        check("10.0.0.1:2222", Some(("10.0.0.1", 2222)));
        check("node.example.com:22", Some(("node.example.com", 22)));
        check("[::1]:2200", Some(("::1", 2200)));
        check("[::1]", Some(("::1", 22)));
        check("fe80::1", Some(("fe80::1", 22)));
        check("10.0.0.1:", None);
        check("10.0.0.1:0", None);
        check("10.0.0.1:70000", None);
        check("10.0.0.1:ssh", None);
        check(":22", None);
        check("", None);
        check("[::1", None);
        check("[::1]x", None);
        assert_eq!(display_addr("::1", 22), "[::1]:22");
        assert_eq!(display_addr("h", 2), "h:2");
    }

    #[tokio::test(start_paused = true)]
    async fn deadline_pauses_and_restarts() {
        let d = Deadline::new(Duration::from_secs(10));
        tokio::time::advance(Duration::from_secs(9)).await;
        d.pause();
        // While paused, time passing does not expire it.
        let paused = tokio::time::timeout(Duration::from_secs(60), d.expired()).await;
        assert!(paused.is_err(), "a paused deadline must not expire");
        d.resume();
        let start = Instant::now();
        d.expired().await;
        assert_eq!(start.elapsed(), Duration::from_secs(10));
    }
}
