//! Keeps dead etcd members out of the client's balancer.
//!
//! etcd-client spreads requests over every endpoint with a power-of-two-choices balancer that
//! prefers the endpoint with the fewest requests in flight. A killed member refuses
//! connections at once, so it never has a request in flight and is picked *more* often than
//! the live ones: with one member of three dead, most requests failed until it came back
//! (lease refreshes included, so machines lost their leases with quorum intact). A member
//! cut off from the others accepts connections but cannot serve: requests to it hang until
//! they time out. Once a request fails, the monitor asks every endpoint for its status (one
//! maintenance request each, to that member alone), takes out of the balancer those that do
//! not answer in time or have no leader (never the last one), and puts each back once it
//! answers with a leader again. It costs nothing while requests succeed.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use etcd_client::{Client, ConnectOptions};
use tokio::sync::watch;
use tracing::{info, warn};

/// How long a probe waits for a member's status.
const PROBE_TIMEOUT: Duration = Duration::from_millis(800);
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
    pub(crate) fn spawn(client: Client, endpoints: Vec<String>, opts: ConnectOptions) -> Health {
        let (tx, rx) = watch::channel(0u64);
        tokio::spawn(monitor(client, endpoints, opts, rx));
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

async fn monitor(
    client: Client,
    endpoints: Vec<String>,
    opts: ConnectOptions,
    mut wake: watch::Receiver<u64>,
) {
    // one client per member, to ask that member alone (connected lazily, kept)
    let mut probes_of: Vec<(String, Option<Client>)> =
        endpoints.iter().map(|e| (e.clone(), None)).collect();
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
        for (e, c) in probes_of.iter_mut() {
            if c.is_none() {
                *c = Client::connect([e.as_str()], Some(opts.clone())).await.ok();
            }
            let (e, c) = (e.clone(), c.clone());
            probes.spawn(async move {
                let up = match c {
                    Some(c) => serves(c).await,
                    None => false,
                };
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
                        "etcd member does not answer or has no leader; not using it until it does"
                    );
                    removed.insert(endpoint.clone());
                }
            } else if up
                && removed.contains(endpoint)
                && client.add_endpoint(endpoint).await.is_ok()
            {
                info!(%endpoint, "etcd member answers with a leader again; using it");
                removed.remove(endpoint);
            }
        }
    }
}

/// Whether the member answers its status within [`PROBE_TIMEOUT`] and knows a leader.
async fn serves(mut c: Client) -> bool {
    matches!(
        tokio::time::timeout(PROBE_TIMEOUT, c.status()).await,
        Ok(Ok(s)) if s.leader() != 0
    )
}
