//! How the client reaches fleetd: one byte stream per request, from a [`Connector`].
//!
//! The built-in connectors dial a unix socket or a TCP address; `fleetctl --tunnel` plugs in
//! its own (a stream over SSH) through the same trait. TLS, when the endpoint is `https`, is
//! layered on top of whatever stream the connector yields.

use std::io;
use std::path::PathBuf;

use async_trait::async_trait;
use tokio::io::{AsyncRead, AsyncWrite};

/// A bidirectional byte stream to fleetd.
pub trait Stream: AsyncRead + AsyncWrite + Send + Unpin {}

impl<T: AsyncRead + AsyncWrite + Send + Unpin> Stream for T {}

/// Opens connections to fleetd's API.
#[async_trait]
pub trait Connector: Send + Sync {
    /// A new connection; called once per request.
    async fn connect(&self) -> io::Result<Box<dyn Stream>>;

    /// What is dialed, as Go printed it after `dial`: `unix /var/run/fleet.sock`,
    /// `tcp 10.0.0.1:49153`.
    fn target(&self) -> String;

    /// What the user should check when [`Connector::connect`] fails.
    fn hint(&self) -> String {
        format!(
            "is fleetd running and serving its API at {}?",
            self.target()
        )
    }
}

/// Dials a unix socket (`unix:///var/run/fleet.sock`).
#[derive(Debug, Clone)]
pub struct UnixConnector {
    pub path: PathBuf,
}

#[async_trait]
impl Connector for UnixConnector {
    async fn connect(&self) -> io::Result<Box<dyn Stream>> {
        Ok(Box::new(tokio::net::UnixStream::connect(&self.path).await?))
    }

    fn target(&self) -> String {
        format!("unix {}", self.path.display())
    }

    fn hint(&self) -> String {
        "is fleetd running? check 'systemctl status fleet.socket fleet.service'".to_string()
    }
}

/// Dials a TCP address (`host:port`).
#[derive(Debug, Clone)]
pub struct TcpConnector {
    pub addr: String,
}

#[async_trait]
impl Connector for TcpConnector {
    async fn connect(&self) -> io::Result<Box<dyn Stream>> {
        let s = tokio::net::TcpStream::connect(&self.addr).await?;
        let _ = s.set_nodelay(true);
        Ok(Box::new(s))
    }

    fn target(&self) -> String {
        format!("tcp {}", self.addr)
    }
}

/// An OS error as Go printed it: `connect: no such file or directory`.
pub(crate) fn go_dial_reason(e: &io::Error) -> String {
    match e.raw_os_error() {
        Some(code) => {
            let text = io::Error::from_raw_os_error(code).to_string();
            let text = match text.rfind(" (os error") {
                Some(at) => &text[..at],
                None => &text,
            };
            let mut chars = text.chars();
            let lowered = match chars.next() {
                Some(first) => first.to_lowercase().chain(chars).collect(),
                None => String::new(),
            };
            format!("connect: {lowered}")
        }
        None => e.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn unix_dial_errors_read_like_go() {
        let c = UnixConnector {
            path: "/nonexistent/fleet.sock".into(),
        };
        let err = c.connect().await.err().expect("no such socket");
        assert_eq!(go_dial_reason(&err), "connect: no such file or directory");
        assert_eq!(c.target(), "unix /nonexistent/fleet.sock");
    }
}
