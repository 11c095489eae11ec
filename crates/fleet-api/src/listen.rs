//! Where the API listens: sockets handed over by systemd (`fleet.socket`), a unix socket or
//! TCP address bound here, and TLS for TCP.

use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use rustix::net::AddressFamily;
use tokio::net::{TcpListener, UnixListener};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls::ServerConfig;
use tokio_rustls::rustls::server::WebPkiClientVerifier;

use crate::ServeError;
use crate::pem;

/// First file descriptor systemd passes (`SD_LISTEN_FDS_START`).
const LISTEN_FDS_START: RawFd = 3;

/// Socket activation hands its descriptors over once per process.
static ACTIVATION_TAKEN: AtomicBool = AtomicBool::new(false);

/// A bound, listening socket the server accepts API connections on.
pub struct Listener {
    pub(crate) socket: Socket,
    pub(crate) tls: Option<TlsAcceptor>,
}

pub(crate) enum Socket {
    Unix(UnixListener),
    Tcp(TcpListener),
}

impl std::fmt::Debug for Listener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Listener({}{})",
            self.describe(),
            if self.tls.is_some() { ", tls" } else { "" }
        )
    }
}

impl Listener {
    pub fn unix(listener: UnixListener) -> Listener {
        Listener {
            socket: Socket::Unix(listener),
            tls: None,
        }
    }

    pub fn tcp(listener: TcpListener) -> Listener {
        Listener {
            socket: Socket::Tcp(listener),
            tls: None,
        }
    }

    /// Serves TLS on this listener (TCP only).
    pub fn with_tls(mut self, tls: TlsConfig) -> Result<Listener, ServeError> {
        if matches!(self.socket, Socket::Unix(_)) {
            return Err(ServeError::TlsOnUnix);
        }
        self.tls = Some(TlsAcceptor::from(tls.0));
        Ok(self)
    }

    /// This listener without TLS, to be wrapped again with new certificates (fleetd's
    /// SIGHUP).
    pub fn without_tls(mut self) -> Listener {
        self.tls = None;
        self
    }

    pub fn is_tcp(&self) -> bool {
        matches!(self.socket, Socket::Tcp(_))
    }

    /// The TCP address, for TCP listeners.
    pub fn tcp_addr(&self) -> Option<std::net::SocketAddr> {
        match &self.socket {
            Socket::Tcp(l) => l.local_addr().ok(),
            Socket::Unix(_) => None,
        }
    }

    /// `unix:/path` or `tcp:addr`, for logs.
    pub fn describe(&self) -> String {
        match &self.socket {
            Socket::Unix(l) => match l
                .local_addr()
                .ok()
                .and_then(|a| a.as_pathname().map(Path::to_path_buf))
            {
                Some(p) => format!("unix:{}", p.display()),
                None => "unix:(unnamed)".to_string(),
            },
            Socket::Tcp(l) => match l.local_addr() {
                Ok(a) => format!("tcp:{a}"),
                Err(_) => "tcp:(unknown)".to_string(),
            },
        }
    }
}

/// Binds a unix socket at `path`, readable and writable by owner and group only (0660), as
/// `fleet.socket` creates it. A stale socket file nobody listens on is replaced; a live one
/// is an error. Must run inside a Tokio runtime.
pub fn bind_unix(path: &Path) -> Result<Listener, ServeError> {
    let bind_err = |source| ServeError::BindUnix {
        path: path.to_path_buf(),
        source,
    };
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if !meta.file_type().is_socket() {
            return Err(bind_err(std::io::Error::new(
                std::io::ErrorKind::AlreadyExists,
                "a file that is not a socket is in the way",
            )));
        }
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(ServeError::UnixInUse(path.to_path_buf()));
        }
        std::fs::remove_file(path).map_err(bind_err)?;
    }
    let listener = UnixListener::bind(path).map_err(bind_err)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660)).map_err(bind_err)?;
    Ok(Listener::unix(listener))
}

/// Binds a TCP address such as `127.0.0.1:49153` or `[::]:49153`.
pub async fn bind_tcp(addr: &str) -> Result<Listener, ServeError> {
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|source| ServeError::BindTcp {
            addr: addr.to_string(),
            source,
        })?;
    Ok(Listener::tcp(listener))
}

/// The listening sockets systemd passed to this process (`LISTEN_PID`, `LISTEN_FDS`, from
/// descriptor 3 on), unix and TCP; empty when there are none for this process. They are taken
/// once: a second call fails. Must run inside a Tokio runtime.
pub fn listeners_from_systemd() -> Result<Vec<Listener>, ServeError> {
    let pid = std::env::var("LISTEN_PID").ok();
    let fds = std::env::var("LISTEN_FDS").ok();
    let (Some(pid), Some(fds)) = (pid, fds) else {
        return Ok(Vec::new());
    };
    if pid.trim().parse::<u32>().ok() != Some(std::process::id()) {
        return Ok(Vec::new());
    }
    let count: RawFd = fds
        .trim()
        .parse()
        .map_err(|_| ServeError::Activation(format!("LISTEN_FDS={fds:?} is not a number")))?;
    if !(0..=1024).contains(&count) {
        return Err(ServeError::Activation(format!(
            "LISTEN_FDS={count} is out of range"
        )));
    }
    if ACTIVATION_TAKEN.swap(true, Ordering::SeqCst) {
        return Err(ServeError::Activation(
            "the passed sockets were already taken".into(),
        ));
    }
    (LISTEN_FDS_START..LISTEN_FDS_START + count)
        .map(activated_listener)
        .collect()
}

/// Takes ownership of one descriptor passed by systemd.
#[allow(unsafe_code)]
fn take_fd(fd: RawFd) -> Result<OwnedFd, ServeError> {
    // Probe first: owning (and later closing) a descriptor that is not open would be an IO
    // safety violation. fcntl(F_GETFD) on a closed descriptor only reports EBADF.
    // SAFETY: the borrow lives only for this one fcntl call and nothing closes `fd` meanwhile
    // (the descriptors are ours alone, see below).
    if let Err(e) = rustix::io::fcntl_getfd(unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) }) {
        return Err(ServeError::Activation(format!("descriptor {fd}: {e}")));
    }
    // SAFETY: systemd passes descriptors LISTEN_FDS_START..+LISTEN_FDS to this process (we
    // checked LISTEN_PID), nothing else in this process owns them, they are open (checked
    // above), and ACTIVATION_TAKEN guarantees each is claimed at most once.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn activated_listener(fd: RawFd) -> Result<Listener, ServeError> {
    let owned = take_fd(fd)?;
    let err = |what: &str, e: rustix::io::Errno| {
        ServeError::Activation(format!("descriptor {fd}: {what}: {e}"))
    };
    rustix::io::fcntl_setfd(&owned, rustix::io::FdFlags::CLOEXEC)
        .map_err(|e| err("set close-on-exec", e))?;
    if !rustix::net::sockopt::socket_acceptconn(&owned).map_err(|e| err("not a socket", e))? {
        return Err(ServeError::Activation(format!(
            "descriptor {fd} is not a listening socket (Accept=yes is not supported)"
        )));
    }
    let family = rustix::net::getsockname(&owned)
        .map_err(|e| err("getsockname", e))?
        .address_family();
    let io_err = |e: std::io::Error| ServeError::Activation(format!("descriptor {fd}: {e}"));
    if family == AddressFamily::UNIX {
        let std_listener = std::os::unix::net::UnixListener::from(owned);
        std_listener.set_nonblocking(true).map_err(io_err)?;
        Ok(Listener::unix(
            UnixListener::from_std(std_listener).map_err(io_err)?,
        ))
    } else if family == AddressFamily::INET || family == AddressFamily::INET6 {
        let std_listener = std::net::TcpListener::from(owned);
        std_listener.set_nonblocking(true).map_err(io_err)?;
        Ok(Listener::tcp(
            TcpListener::from_std(std_listener).map_err(io_err)?,
        ))
    } else {
        Err(ServeError::Activation(format!(
            "descriptor {fd}: unsupported address family {family:?}"
        )))
    }
}

/// Certificate files of a TLS listener.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// PEM: the server's certificate, then its chain.
    pub cert_file: PathBuf,
    /// PEM: the server's private key.
    pub key_file: PathBuf,
    /// PEM: when set, clients must present a certificate signed by one of these CAs.
    pub client_ca_file: Option<PathBuf>,
}

/// A loaded TLS server configuration, for [`Listener::with_tls`].
#[derive(Clone)]
pub struct TlsConfig(pub(crate) Arc<ServerConfig>);

impl std::fmt::Debug for TlsConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TlsConfig")
    }
}

/// Reads certificate, key and (optionally) client CA files.
pub fn load_tls(files: &TlsFiles) -> Result<TlsConfig, ServeError> {
    let certs = pem::read_certs("certificate", &files.cert_file)?;
    let key = pem::read_key(&files.key_file)?;
    let provider = Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| ServeError::Tls(e.to_string()))?;
    let builder = match &files.client_ca_file {
        Some(ca) => {
            let roots = pem::read_roots("client CA", ca)?;
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .map_err(|e| ServeError::Tls(e.to_string()))?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let mut config = builder
        .with_single_cert(certs, key)
        .map_err(|e| ServeError::Tls(format!("certificate and key do not fit: {e}")))?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(TlsConfig(Arc::new(config)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn unix_socket_is_0660_and_stale_files_are_replaced() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("fleet.sock");
        let first = bind_unix(&path).expect("bind");
        let mode = std::fs::metadata(&path).expect("stat").permissions().mode() & 0o777;
        assert_eq!(mode, 0o660);
        // a live socket is not taken over
        assert!(matches!(bind_unix(&path), Err(ServeError::UnixInUse(_))));
        drop(first);
        // a stale one is
        let _second = bind_unix(&path).expect("rebind over stale socket");
        // a regular file is never removed
        let file = dir.path().join("plain");
        std::fs::write(&file, "x").expect("write");
        assert!(matches!(bind_unix(&file), Err(ServeError::BindUnix { .. })));
        assert_eq!(std::fs::read_to_string(&file).expect("read"), "x");
    }

    #[tokio::test]
    async fn passed_descriptors_become_listeners() {
        use std::os::fd::IntoRawFd;
        let dir = tempfile::tempdir().expect("tempdir");
        let unix = std::os::unix::net::UnixListener::bind(dir.path().join("s")).expect("bind unix");
        let l = activated_listener(unix.into_raw_fd()).expect("unix listener");
        assert!(!l.is_tcp() && l.describe().ends_with("/s"), "{l:?}");
        let tcp = std::net::TcpListener::bind("127.0.0.1:0").expect("bind tcp");
        let addr = tcp.local_addr().expect("addr");
        let l = activated_listener(tcp.into_raw_fd()).expect("tcp listener");
        assert_eq!(l.tcp_addr(), Some(addr));
        // a connected socket (Accept=yes style) is refused
        let (a, _b) = std::os::unix::net::UnixStream::pair().expect("pair");
        let err = activated_listener(a.into_raw_fd()).expect_err("not listening");
        assert!(err.to_string().contains("not a listening socket"), "{err}");
    }

    #[test]
    fn activation_is_ignored_without_env() {
        // the test runner sets no LISTEN_PID for this process
        if std::env::var("LISTEN_PID").is_err() {
            assert!(listeners_from_systemd().expect("no activation").is_empty());
        }
    }

    #[test]
    fn tls_file_errors_name_the_file() {
        let files = TlsFiles {
            cert_file: "/nonexistent/cert.pem".into(),
            key_file: "/nonexistent/key.pem".into(),
            client_ca_file: None,
        };
        let err = load_tls(&files).expect_err("missing files");
        assert!(err.to_string().contains("/nonexistent/cert.pem"), "{err}");
    }
}
