//! A lease kept alive in the background, and told apart from a lost one: [`LeaseKeeper`] on
//! etcd, and [`Lease`], the store-neutral handle the agent and the engine hold.

use std::time::{Duration, Instant};

use etcd_client::Client;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::{debug, warn};

use crate::etcd::health::Health;

/// A granted lease refreshed every ttl/3. `lost()` resolves once etcd says the lease is
/// gone, and only then: while etcd cannot be reached (lost quorum, a partition) the lease
/// is unknown, not lost. etcd extends every lease when a new leader takes over, so after
/// an outage the same lease usually lives on, and keeping it means nothing churns: no
/// machine record rewritten, no state record republished, no leadership change. (Giving
/// up after a ttl without refresh made every agent register anew after a quorum loss while
/// its old lease, no longer refreshed, expired and took the machine record with it: the
/// engine then moved units off machines that were fine.)
#[derive(Debug)]
pub struct LeaseKeeper {
    id: i64,
    lost: watch::Receiver<bool>,
    task: JoinHandle<()>,
}

impl LeaseKeeper {
    pub async fn grant(client: &Client, ttl: Duration) -> Result<LeaseKeeper, etcd_client::Error> {
        LeaseKeeper::grant_watched(client, ttl, Health::none()).await
    }

    /// Like [`LeaseKeeper::grant`]; a failed refresh also tells `health` (the registry's
    /// monitor of dead etcd members).
    pub(crate) async fn grant_watched(
        client: &Client,
        ttl: Duration,
        health: Health,
    ) -> Result<LeaseKeeper, etcd_client::Error> {
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
            health,
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

async fn keep(client: Client, id: i64, ttl: Duration, lost: watch::Sender<bool>, health: Health) {
    let period = ttl / 3;
    let patience = period.max(Duration::from_secs(1));
    let mut last_ok = Instant::now();
    let mut warned = false;
    // after a failed refresh, try again soon (another etcd member may answer: a request
    // that met a member without a leader or a dead connection fails fast), doubling the
    // pause back up to the period
    let first_retry = (period / 8).max(Duration::from_millis(100));
    let mut pause = period;
    loop {
        tokio::time::sleep(pause).await;
        // etcd-client's keep_alive sends one refresh and reads its answer; an answer of ttl
        // 0 (the lease is gone) comes back as an error, told apart from a failed request
        // by asking etcd for the lease's time to live
        let attempt = tokio::time::timeout(patience, async {
            match client.lease_client().keep_alive(id).await {
                Ok(_) => Ok(true),
                // (-1: the lease is gone; 0 is a live lease in its last second, etcd
                // rounds down)
                Err(e) => match client.lease_client().time_to_live(id, None).await {
                    Ok(t) if t.ttl() < 0 => Ok(false),
                    _ => Err(e),
                },
            }
        })
        .await;
        match attempt {
            Ok(Ok(true)) => {
                last_ok = Instant::now();
                pause = period;
                continue;
            }
            Ok(Ok(false)) => {
                warn!(lease = id, "lease expired");
                let _ = lost.send(true);
                return;
            }
            Ok(Err(e)) => {
                debug!(lease = id, error = %e, "lease refresh failed");
                health.suspect();
            }
            Err(_) => {
                debug!(lease = id, "lease refresh timed out");
                health.suspect();
            }
        }
        pause = if pause >= period {
            first_retry
        } else {
            (pause * 2).min(period)
        };
        // once the lease may have expired, a pace between the two: a machine that was cut
        // off learns soon after it heals that its lease is gone (and registers again before
        // the engine moves more than it must), for one cheap request every 2 s at most
        if last_ok.elapsed() >= ttl {
            pause = period.min(Duration::from_secs(2)).max(first_retry);
        }
        if last_ok.elapsed() >= ttl && !warned {
            warn!(
                lease = id,
                "lease not refreshed for a whole ttl; etcd is out of reach, still trying"
            );
            warned = true;
        } else if last_ok.elapsed() < ttl {
            warned = false;
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
