//! `--tunnel`: reach fleet's API or etcd through an SSH connection to a cluster machine.
//!
//! A local listener on 127.0.0.1 accepts connections and relays each one through its own SSH
//! channel to the real target (a TCP address or a unix socket as seen from the tunnel host).
//! The etcd driver is simply pointed at the local address. The API driver takes an
//! [`SshConnector`] instead, so the endpoint (and TLS server name) stays the real one. (fleet
//! ran `fleetctl fd-forward` remotely to reach the API socket; a `direct-streamlocal` channel
//! does the same without needing fleetctl on the remote host.)

use std::sync::Arc;

use anyhow::Context as _;
use fleet_ssh::{Session, SshStream};
use tokio::net::TcpListener;

/// Where a tunnelled connection goes, as seen from the tunnel host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    Tcp { host: String, port: u16 },
    Unix { path: String },
}

/// Dials fleet's API through the tunnel: one SSH channel per request.
pub struct SshConnector {
    pub session: Arc<Session>,
    pub target: Target,
}

#[async_trait::async_trait]
impl fleet_client::Connector for SshConnector {
    async fn connect(&self) -> std::io::Result<Box<dyn fleet_client::Stream>> {
        open(&self.session, &self.target)
            .await
            .map(|s| Box::new(s) as Box<dyn fleet_client::Stream>)
            .map_err(std::io::Error::other)
    }

    fn target(&self) -> String {
        match &self.target {
            Target::Tcp { host, port } => {
                format!("tcp {host}:{port} via ssh {}", self.session.addr())
            }
            Target::Unix { path } => format!("unix {path} via ssh {}", self.session.addr()),
        }
    }

    fn hint(&self) -> String {
        format!("is fleetd serving its API on {}?", self.session.addr())
    }
}

async fn open(session: &Session, target: &Target) -> Result<SshStream, fleet_ssh::SshError> {
    match target {
        Target::Tcp { host, port } => session.open_tcp(host, *port).await,
        Target::Unix { path } => session.open_unix_socket(path).await,
    }
}

/// Starts relaying connections to a new local port to `target` through `session`; returns the
/// local address (`127.0.0.1:port`). The relay lives as long as the runtime.
pub async fn forward(session: Arc<Session>, target: Target) -> anyhow::Result<String> {
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .context("binding a local port for the tunnel")?;
    let local = listener.local_addr()?.to_string();
    tokio::spawn(async move {
        loop {
            let Ok((mut conn, _)) = listener.accept().await else {
                return;
            };
            let session = session.clone();
            let target = target.clone();
            tokio::spawn(async move {
                match open(&session, &target).await {
                    Ok(mut remote) => {
                        let _ = tokio::io::copy_bidirectional(&mut conn, &mut remote).await;
                    }
                    Err(e) => tracing::warn!("tunnel through {}: {e}", session.addr()),
                }
            });
        }
    });
    Ok(local)
}

/// Splits an `http(s)://host:port[/...]` URL into scheme, host and port (default 2379 for
/// etcd URLs without a port).
pub fn split_url(url: &str, default_port: u16) -> Option<(String, String, u16)> {
    let (scheme, rest) = url.split_once("://")?;
    let authority = rest.split('/').next().unwrap_or("");
    let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
        let (host, after) = v6.split_once(']')?;
        let port = match after.strip_prefix(':') {
            Some(p) => p.parse().ok()?,
            None => default_port,
        };
        (host.to_string(), port)
    } else {
        match authority.rsplit_once(':') {
            Some((h, p)) => (h.to_string(), p.parse().ok()?),
            None => (authority.to_string(), default_port),
        }
    };
    if host.is_empty() {
        return None;
    }
    Some((scheme.to_string(), host, port))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_urls() {
        let check = |url: &str, want: Option<(&str, &str, u16)>| {
            let got = split_url(url, 2379);
            let want = want.map(|(s, h, p)| (s.to_string(), h.to_string(), p));
            assert_eq!(got, want, "{url}");
        };
        check("http://127.0.0.1:2379", Some(("http", "127.0.0.1", 2379)));
        check(
            "https://etcd.example:4001/",
            Some(("https", "etcd.example", 4001)),
        );
        check("http://etcd", Some(("http", "etcd", 2379)));
        check("http://[::1]:2380", Some(("http", "::1", 2380)));
        check("http://:2379", None);
        check("etcd:2379", None);
        check("http://h:port", None);
    }
}
