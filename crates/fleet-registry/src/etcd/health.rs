//! Keeps dead etcd members out of the client's balancer.
//!
//! etcd-client spreads requests over every endpoint with a power-of-two-choices balancer that
//! prefers the endpoint with the fewest requests in flight. A killed member refuses
//! connections at once, so it never has a request in flight and is picked *more* often than
//! the live ones: with one member of three dead, most requests failed until it came back
//! (lease refreshes included, so machines lost their leases with quorum intact). Once a
//! request fails, the monitor tries a TCP connection to every endpoint, takes those that
//! refuse out of the balancer (never the last one), and puts each back once it accepts
//! connections again. It costs nothing while requests succeed: no probe, no etcd request.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use etcd_client::Client;
use tokio::sync::watch;
use tracing::{info, warn};

/// How long a probe waits for a TCP connection.
const PROBE_TIMEOUT: Duration = Duration::from_millis(500);
/// How often endpoints taken out are probed again.
const RECHECK: Duration = Duration::from_secs(1);

/// The registry's handle on its monitor; clones share it. The monitor ends when the last
/// handle is dropped.
#[derive(Debug, Clone)]
pub(crate) struct Health {
    wake: Option<Arc<watch::Sender<u64>>>,
}

impl Health {
    /// No monitor: one endpoint (nothing to choose from), or connections opened by a dialer
    /// (`--tunnel`: a TCP probe would not go where the requests go).
    pub(crate) fn none() -> Health {
        Health { wake: None }
    }

    /// Watches `endpoints` of `client` from now on.
    pub(crate) fn spawn(client: Client, endpoints: Vec<String>) -> Health {
        let (tx, rx) = watch::channel(0u64);
        tokio::spawn(monitor(client, endpoints, rx));
        Health {
            wake: Some(Arc::new(tx)),
        }
    }

    /// A request failed in a way a dead endpoint explains: probe the endpoints now.
    pub(crate) fn suspect(&self) {
        if let Some(w) = &self.wake {
            w.send_modify(|n| *n = n.wrapping_add(1));
        }
    }
}

async fn monitor(client: Client, endpoints: Vec<String>, mut wake: watch::Receiver<u64>) {
    let mut removed: HashSet<String> = HashSet::new();
    loop {
        let woken = if removed.is_empty() {
            wake.changed().await
        } else {
            match tokio::time::timeout(RECHECK, wake.changed()).await {
                Ok(r) => r,
                Err(_) => Ok(()),
            }
        };
        if woken.is_err() {
            return; // the registry is gone
        }
        let mut probes = tokio::task::JoinSet::new();
        for e in &endpoints {
            let e = e.clone();
            probes.spawn(async move {
                let up = accepts(&e).await;
                (e, up)
            });
        }
        let mut results = Vec::with_capacity(endpoints.len());
        while let Some(r) = probes.join_next().await {
            if let Ok(r) = r {
                results.push(r);
            }
        }
        for (endpoint, up) in &results {
            let (endpoint, up) = (endpoint, *up);
            if !up && !removed.contains(endpoint) && removed.len() + 1 < endpoints.len() {
                if client.remove_endpoint(endpoint).await.is_ok() {
                    warn!(
                        %endpoint,
                        "etcd endpoint refuses connections; not using it until it accepts them"
                    );
                    removed.insert(endpoint.clone());
                }
            } else if up
                && removed.contains(endpoint)
                && client.add_endpoint(endpoint).await.is_ok()
            {
                info!(%endpoint, "etcd endpoint accepts connections again; using it");
                removed.remove(endpoint);
            }
        }
    }
}

/// Whether a TCP connection to the endpoint's address succeeds within [`PROBE_TIMEOUT`].
async fn accepts(endpoint: &str) -> bool {
    let Some((host, port)) = crate::endpoint_host_port(endpoint) else {
        return true; // not ours to judge: leave it in
    };
    matches!(
        tokio::time::timeout(
            PROBE_TIMEOUT,
            tokio::net::TcpStream::connect((host.as_str(), port))
        )
        .await,
        Ok(Ok(_))
    )
}
