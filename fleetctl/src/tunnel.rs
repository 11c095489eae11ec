//! `--tunnel`: reach fleet's API or etcd through an SSH connection to a cluster machine.
//!
//! Every connection is its own SSH channel, opened in this process, to the real target (a TCP
//! address or a unix socket as seen from the tunnel host): the API driver takes an
//! [`SshConnector`], the etcd driver an [`SshDialer`]. No local port or socket is ever opened,
//! so other local users cannot ride the tunnel, and endpoints (and TLS server names) stay the
//! real ones. (fleet ran `fleetctl fd-forward` remotely to reach the API socket; a
//! `direct-streamlocal` channel does the same without needing fleetctl on the remote host.)

use std::sync::Arc;

use fleet_ssh::{Session, SshStream};

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

/// Dials etcd through the tunnel: one `direct-tcpip` channel per connection etcd-client opens.
pub struct SshDialer {
    pub session: Arc<Session>,
}

#[async_trait::async_trait]
impl fleet_registry::Dialer for SshDialer {
    async fn dial(
        &self,
        host: &str,
        port: u16,
    ) -> std::io::Result<Box<dyn fleet_registry::DialStream>> {
        tracing::debug!("dialing etcd {host}:{port} via ssh {}", self.session.addr());
        self.session
            .open_tcp(host, port)
            .await
            .map(|s| Box::new(s) as Box<dyn fleet_registry::DialStream>)
            .map_err(std::io::Error::other)
    }
}
