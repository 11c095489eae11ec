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
//!
//! A watch already open on a member it takes out would stay there, and a member cut off from
//! the others delivers no events (nor an error) until the watch breaks: the monitor tells the
//! list-watches ([`Health::members_out`]), which list again and watch on the members left.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use etcd_client::{Client, ConnectOptions};
use tokio::sync::watch;
use tracing::{info, warn};

/// How long a probe waits for a connection to a member and its status.
const PROBE_TIMEOUT: Duration = Duration::from_millis(800);
/// How often endpoints taken out are probed again.
const RECHECK: Duration = Duration::from_secs(1);

/// The registry's handle on its monitor; clones share it. The monitor ends when the last
/// handle is dropped.
#[derive(Debug, Clone)]
pub(crate) struct Health {
    wake: Option<Arc<watch::Sender<u64>>>,
    /// Counts the members taken out; list-watches restart when it changes.
    out: Option<watch::Receiver<u64>>,
}

impl Health {
    /// No monitor: one endpoint (nothing to choose from), or connections opened by a dialer
    /// (`--tunnel`: a TCP probe would not go where the requests go).
    pub(crate) fn none() -> Health {
        Health {
            wake: None,
            out: None,
        }
    }

    /// Watches `endpoints` of `client` from now on.
    pub(crate) fn spawn(client: Client, endpoints: Vec<String>, opts: ConnectOptions) -> Health {
        let (tx, rx) = watch::channel(0u64);
        let (out_tx, out_rx) = watch::channel(0u64);
        tokio::spawn(monitor(client, endpoints, opts, rx, out_tx));
        Health {
            wake: Some(Arc::new(tx)),
            out: Some(out_rx),
        }
    }

    /// Changes each time a member is taken out of the balancer (none without a monitor).
    pub(crate) fn members_out(&self) -> Option<watch::Receiver<u64>> {
        self.out.clone()
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
    out: watch::Sender<u64>,
) {
    let mut removed: HashSet<String> = HashSet::new();
    // rounds in a row each removed member has answered well: it comes back after two
    let mut good: HashMap<String, u32> = HashMap::new();
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
        // every member at once, each over a connection of its own made for this round (and
        // closed after it), the whole probe bounded by PROBE_TIMEOUT
        let mut probes = tokio::task::JoinSet::new();
        for e in &endpoints {
            let (e, opts) = (e.clone(), opts.clone());
            probes.spawn(async move {
                let up = tokio::time::timeout(PROBE_TIMEOUT, serves(&e, opts))
                    .await
                    .unwrap_or(false);
                (e, up)
            });
        }
        let mut up: HashSet<String> = HashSet::new();
        while let Some(r) = probes.join_next().await {
            if let Ok((e, true)) = r {
                up.insert(e);
            }
        }
        if up.is_empty() {
            // nobody serves (a lost quorum, an election): no member is better than another,
            // so nothing changes; members taken out earlier (dead ones) stay out, so that
            // the first request after the quorum returns does not meet them
            good.clear();
            continue;
        }
        if !endpoints
            .iter()
            .any(|e| up.contains(e) && !removed.contains(e))
        {
            // every member still in has failed: those that serve come back now, whatever
            // their count of good rounds, so the balancer is never left without one
            for endpoint in &endpoints {
                if up.contains(endpoint)
                    && removed.contains(endpoint)
                    && client.add_endpoint(endpoint).await.is_ok()
                {
                    info!(%endpoint, "etcd member answers with a leader again; using it");
                    removed.remove(endpoint);
                    good.remove(endpoint);
                }
            }
        }
        for endpoint in &endpoints {
            let serving = up.contains(endpoint);
            if !serving && !removed.contains(endpoint) {
                // (never the last: at least one member of `up` is in by now)
                if client.remove_endpoint(endpoint).await.is_ok() {
                    warn!(
                        %endpoint,
                        "etcd member does not answer or has no leader; not using it until it does"
                    );
                    removed.insert(endpoint.clone());
                    // watches open on it would see nothing more: they start again elsewhere
                    out.send_modify(|n| *n = n.wrapping_add(1));
                }
                good.remove(endpoint);
            } else if serving && removed.contains(endpoint) {
                let n = good.entry(endpoint.clone()).or_insert(0);
                *n += 1;
                if *n >= 2 && client.add_endpoint(endpoint).await.is_ok() {
                    info!(%endpoint, "etcd member answers with a leader again; using it");
                    removed.remove(endpoint);
                    good.remove(endpoint);
                }
            } else if !serving {
                good.remove(endpoint);
            }
        }
    }
}

/// Whether the member answers its status and knows a leader.
async fn serves(endpoint: &str, opts: ConnectOptions) -> bool {
    let Ok(mut c) = Client::connect([endpoint], Some(opts)).await else {
        return false;
    };
    matches!(c.status().await, Ok(s) if s.leader() != 0)
}
