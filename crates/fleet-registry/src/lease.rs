//! A lease kept alive in the background, and told apart from a lost one: [`LeaseKeeper`] on
//! etcd, and [`Lease`], the store-neutral handle the agent and the engine hold.

use std::time::{Duration, Instant};

use etcd_client::Client;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::{debug, warn};

/// A granted lease refreshed every ttl/3. `lost()` resolves once etcd says the lease is
/// gone, or no refresh succeeded for a whole ttl (then it has expired on etcd's side too).
#[derive(Debug)]
pub struct LeaseKeeper {
    id: i64,
    lost: watch::Receiver<bool>,
    task: JoinHandle<()>,
}

impl LeaseKeeper {
    pub async fn grant(client: &Client, ttl: Duration) -> Result<LeaseKeeper, etcd_client::Error> {
        // etcd takes an i64 of seconds; a ttl beyond it (never from fleet-config) saturates
        let secs = i64::try_from(ttl.as_secs().max(1)).unwrap_or(i64::MAX);
        let resp = client.lease_client().grant(secs, None).await?;
        let id = resp.id();
        let (tx, lost) = watch::channel(false);
        let task = tokio::spawn(keep(
            client.clone(),
            id,
            Duration::from_secs(secs.unsigned_abs()),
            tx,
        ));
        Ok(LeaseKeeper { id, lost, task })
    }

    pub fn id(&self) -> i64 {
        self.id
    }

    pub fn is_lost(&self) -> bool {
        *self.lost.borrow()
    }

    /// Resolves when the lease is lost (immediately if it already is).
    pub async fn lost(&self) {
        let mut rx = self.lost.clone();
        let _ = rx.wait_for(|l| *l).await;
    }

    /// Stops refreshing and revokes the lease, so what it holds vanishes at once.
    pub async fn revoke(self, client: &Client) {
        self.task.abort();
        if let Err(e) = client.lease_client().revoke(self.id).await {
            debug!(lease = self.id, error = %e, "lease revoke failed");
        }
    }
}

impl Drop for LeaseKeeper {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn keep(client: Client, id: i64, ttl: Duration, lost: watch::Sender<bool>) {
    let period = ttl / 3;
    let mut last_ok = Instant::now();
    loop {
        tokio::time::sleep(period).await;
        let attempt = tokio::time::timeout(period.max(Duration::from_secs(1)), async {
            let (mut keeper, mut stream) = client.lease_client().keep_alive(id).await?;
            keeper.keep_alive().await?;
            stream.message().await
        })
        .await;
        match attempt {
            Ok(Ok(Some(resp))) if resp.ttl() > 0 => last_ok = Instant::now(),
            Ok(Ok(Some(_))) => {
                warn!(lease = id, "lease expired");
                let _ = lost.send(true);
                return;
            }
            Ok(Ok(None)) => debug!(lease = id, "lease refresh stream ended without an answer"),
            Ok(Err(e)) => debug!(lease = id, error = %e, "lease refresh failed"),
            Err(_) => debug!(lease = id, "lease refresh timed out"),
        }
        if last_ok.elapsed() >= ttl {
            warn!(
                lease = id,
                "lease not refreshed for a whole ttl; treating it as lost"
            );
            let _ = lost.send(true);
            return;
        }
    }
}

/// A lease as the agent and the engine see it, whatever store granted it: an ID to write
/// under, and a signal that it is gone. Dropping it stops its refreshing (the lease then
/// expires after its ttl); the store's `withdraw`/`resign` revoke it at once.
#[derive(Debug)]
pub struct Lease {
    id: i64,
    lost: watch::Receiver<bool>,
    /// The etcd keeper refreshing it (none for an in-memory lease).
    keeper: Option<LeaseKeeper>,
}

impl Lease {
    /// A lease whose loss is signalled through `lost` (the in-memory store's).
    pub fn new(id: i64, lost: watch::Receiver<bool>) -> Lease {
        Lease {
            id,
            lost,
            keeper: None,
        }
    }

    pub fn id(&self) -> i64 {
        self.id
    }

    pub fn is_lost(&self) -> bool {
        *self.lost.borrow()
    }

    /// Resolves when the lease is lost (immediately if it already is).
    pub async fn lost(&self) {
        let mut rx = self.lost.clone();
        let _ = rx.wait_for(|l| *l).await;
    }

    /// The etcd keeper, to revoke the lease.
    pub(crate) fn into_keeper(self) -> Option<LeaseKeeper> {
        self.keeper
    }
}

impl From<LeaseKeeper> for Lease {
    fn from(k: LeaseKeeper) -> Lease {
        Lease {
            id: k.id,
            lost: k.lost.clone(),
            keeper: Some(k),
        }
    }
}
