//! A lease kept alive in the background, and told apart from a lost one: [`LeaseKeeper`] on
//! etcd, and [`Lease`], the store-neutral handle the agent and the engine hold; and the
//! timing of at-most-once units, which follows from how leases are kept ([`AtMostOnce`]).

use std::time::Duration;

use tokio::time::Instant;

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
    /// When the last refresh etcd accepted was sent (see [`Lease::renewed`]).
    renewed: watch::Receiver<Instant>,
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
        // taken before the request: etcd starts the lease's ttl after it, never before
        let sent = Instant::now();
        let resp = client.lease_client().grant(secs, None).await?;
        let id = resp.id();
        let (tx, lost) = watch::channel(false);
        let (renewed_tx, renewed) = watch::channel(sent);
        let task = tokio::spawn(keep(
            client.clone(),
            id,
            Duration::from_secs(secs.unsigned_abs()),
            Signals {
                lost: tx,
                renewed: renewed_tx,
            },
            health,
        ));
        Ok(LeaseKeeper {
            id,
            lost,
            renewed,
            task,
        })
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

/// What the keeper tells the lease's holder.
struct Signals {
    lost: watch::Sender<bool>,
    renewed: watch::Sender<Instant>,
}

async fn keep(client: Client, id: i64, ttl: Duration, signals: Signals, health: Health) {
    let Signals { lost, renewed } = signals;
    let period = ttl / 3;
    let patience = period.max(Duration::from_secs(1));
    let mut last_ok = Instant::now();
    let mut warned = false;
    // after a failed refresh, try again soon (another etcd member may answer: a request
    // that met a member without a leader or a dead connection fails fast), doubling the
    // pause back up to the period
    let first_retry = (period / 8).max(Duration::from_millis(100));
    let mut pause = period;
    let mut stream: Option<KeepAlive> = None;
    loop {
        tokio::time::sleep(pause).await;
        // a refresh etcd accepts restarts the ttl at some moment after it was sent: the
        // send time is the safe one to count from (at-most-once units do)
        let sent = Instant::now();
        // refreshes go out on one kept-open stream (etcd counts a stream as one request,
        // however many refreshes it carries); an answer of ttl 0 (the lease is gone) or a
        // broken stream is told apart from a failed request by asking etcd for the
        // lease's time to live
        let attempt = tokio::time::timeout(patience, async {
            match refresh(&client, id, &mut stream).await {
                Ok(true) => Ok(true),
                // (-1: the lease is gone; 0 is a live lease in its last second, etcd
                // rounds down)
                outcome => match client.lease_client().time_to_live(id, None).await {
                    Ok(t) if t.ttl() < 0 => Ok(false),
                    _ => Err(match outcome {
                        Err(e) => e,
                        Ok(_) => {
                            etcd_client::Error::LeaseKeepAliveError("refresh not accepted".into())
                        }
                    }),
                },
            }
        })
        .await;
        if !matches!(attempt, Ok(Ok(true))) {
            // a refresh that failed or timed out may still be answered later: that answer
            // must never be taken for a later refresh's (the `renewed` clock would count
            // from a send etcd did not answer), so the stream goes and the next refresh
            // opens a new one
            stream = None;
        }
        match attempt {
            Ok(Ok(true)) => {
                last_ok = Instant::now();
                let _ = renewed.send(sent);
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

/// A lease's open keep-alive stream: where refreshes are sent, and where their answers come
/// back, one per refresh and in order.
type KeepAlive = (etcd_client::LeaseKeeper, etcd_client::LeaseKeepAliveStream);

/// Sends one refresh and reads its answer, on `stream` if it is open, else on a new stream
/// left open for the next refreshes. `Ok(false)`: etcd answered with a ttl of 0 or less
/// (the lease may be gone); an error: the stream broke or could not be opened, and is
/// closed.
async fn refresh(
    client: &Client,
    id: i64,
    stream: &mut Option<KeepAlive>,
) -> Result<bool, etcd_client::Error> {
    let Some((keeper, answers)) = stream else {
        // opening the stream sends the first refresh and reads its answer; etcd-client
        // reports an answer of ttl 0 as an error
        let opened = client.lease_client().keep_alive(id).await?;
        *stream = Some(opened);
        return Ok(true);
    };
    let outcome = async {
        keeper.keep_alive().await?;
        match answers.message().await? {
            Some(answer) => Ok(answer.ttl() > 0),
            None => Err(etcd_client::Error::LeaseKeepAliveError(
                "keep-alive stream closed".into(),
            )),
        }
    }
    .await;
    if outcome.is_err() {
        *stream = None;
    }
    outcome
}

/// A lease as the agent and the engine see it, whatever store granted it: an ID to write
/// under, and a signal that it is gone. Dropping it stops its refreshing (the lease then
/// expires after its ttl); the store's `withdraw`/`resign` revoke it at once.
#[derive(Debug)]
pub struct Lease {
    id: i64,
    lost: watch::Receiver<bool>,
    renewed: watch::Receiver<Instant>,
    /// The etcd keeper refreshing it (none for an in-memory lease).
    keeper: Option<LeaseKeeper>,
}

impl Lease {
    /// A lease whose loss is signalled through `lost` and whose refreshes through `renewed`
    /// (the in-memory store's).
    pub fn new(id: i64, lost: watch::Receiver<bool>, renewed: watch::Receiver<Instant>) -> Lease {
        Lease {
            id,
            lost,
            renewed,
            keeper: None,
        }
    }

    /// When the last refresh the store accepted was sent, on this process's monotonic clock
    /// (the grant's request for a lease never refreshed). The store restarted the lease's
    /// ttl at some moment after that, so the lease lives at least a ttl past it (measured
    /// by the store's clock).
    pub fn renewed(&self) -> watch::Receiver<Instant> {
        self.renewed.clone()
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
            renewed: k.renewed.clone(),
            keeper: Some(k),
        }
    }
}

/// How much faster or slower than real time any clock involved may run (this machine's
/// monotonic clock, the etcd leader's, the engine's): 1 %, twenty times what NTP may slew a
/// clock (500 ppm).
pub const CLOCK_RATE_MARGIN: f64 = 0.01;

/// What may delay the agent's stop beyond its deadline: the timer's wake-up, a busy
/// runtime, the D-Bus round trip of StopUnit.
pub const STOP_LATENCY_MARGIN: Duration = Duration::from_secs(1);

/// The timing of at-most-once units (`[X-Fleet] AtMostOnce=true`), derived from `agent_ttl`
/// so that the copy on a machine cut off from etcd has stopped before the engine starts
/// another one elsewhere.
///
/// Write T for the lease's ttl (whole seconds, as etcd takes it), ρ for
/// [`CLOCK_RATE_MARGIN`], L for [`STOP_LATENCY_MARGIN`], and s for the moment (real time)
/// the agent sent the last refresh etcd accepted ([`Lease::renewed`]).
///
/// - The old copy. The agent starts stopping its at-most-once units when its monotonic clock
///   has counted B (`stop_after`) since s; the unit then has S (`stop_allowance`) to stop.
///   Its clock may run slow by ρ, so the copy has stopped by real time
///   s + (B + S) / (1 - ρ) + L.
/// - The lease. etcd restarted the ttl when it handled that refresh, after s; its leader
///   counts T on its own clock (a new leader only extends leases), so the lease expires,
///   and the machine's record vanishes, no earlier than s + T / (1 + ρ).
/// - The new copy. The engine learns of the expiry after it happened, then counts W
///   (`start_after`) on its own clock before it writes the unit's new placement: not before
///   real time s + T / (1 + ρ) + W / (1 + ρ). The new copy starts later still.
///
/// No overlap therefore needs s + (B + S) / (1 - ρ) + L ≤ s + (T + W) / (1 + ρ), that is
/// W ≥ (1 + ρ) ((B + S) / (1 - ρ) + L) - T. With B = 3T/4 (two refreshes, each every T/3,
/// and their retries, missed) and S = T/2 this is W = 0.275 T + 1.01 s, rounded up to the
/// millisecond: 2.387 s at T = 5 s, 9.268 s at fleet's default T = 30 s.
///
/// Such a unit is down, when its machine is cut off, from the agent's stop (B after s) until
/// the new copy starts: at most (T - B) + W plus the engine's and the new agent's reaction
/// (etcd reports an expiry up to 0.5 s late, then a reconcile, a schedule write, a
/// StartUnit): about 0.525 T + 1 s + that reaction, 3.6 s + ~1 s at T = 5 s.
///
/// A machine whose lease was lost and which registers again keeps its at-most-once units
/// stopped for `hold_after_rejoin` (T): an engine that decided to move them from a view
/// without the new registration has written that decision by then, and the agent sees it
/// before starting anything.
///
/// What the bound cannot cover: a unit that takes longer than S to stop (its
/// `TimeoutStopSec` must fit in S), a fleetd that is itself dead or frozen while its
/// machine is cut off (nothing stops the unit then), and clocks outside ρ; and every fleetd
/// must use the same `agent_ttl`, since the engine derives W from its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AtMostOnce {
    /// The lease's ttl, T.
    pub ttl: Duration,
    /// B: the agent stops its at-most-once units once no refresh sent this long ago or
    /// later has been accepted.
    pub stop_after: Duration,
    /// S: how long the stop may take.
    pub stop_allowance: Duration,
    /// W: after the engine sees a machine's lease expire, how long it waits before it places
    /// that machine's at-most-once units elsewhere.
    pub start_after: Duration,
    /// H: how long a machine that lost its lease and registered again keeps its at-most-once
    /// units stopped.
    pub hold_after_rejoin: Duration,
}

impl AtMostOnce {
    /// The timing for an `agent_ttl` (see the type's documentation for the reasoning).
    pub fn for_ttl(agent_ttl: Duration) -> AtMostOnce {
        // the ttl etcd is given: whole seconds, at least one (as `LeaseKeeper` grants it)
        let ttl = Duration::from_secs(agent_ttl.as_secs().max(1));
        let stop_after = ttl * 3 / 4;
        let stop_allowance = ttl / 2;
        let rho = CLOCK_RATE_MARGIN;
        let old_stopped = (stop_after + stop_allowance).as_secs_f64() / (1.0 - rho)
            + STOP_LATENCY_MARGIN.as_secs_f64();
        let wait = ((1.0 + rho) * old_stopped - ttl.as_secs_f64()).max(0.0);
        // rounded up to the millisecond, and finite whatever the ttl
        let start_after = Duration::from_millis((wait * 1000.0).ceil().min(1e15) as u64);
        AtMostOnce {
            ttl,
            stop_after,
            stop_allowance,
            start_after,
            hold_after_rejoin: ttl,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The old copy has surely stopped before the engine may start the new one, with every
    /// clock at the worst end of its margin.
    #[test]
    fn at_most_once_waits_until_the_old_copy_has_stopped() {
        // (agent_ttl, W)
        let cases = [
            (Duration::from_secs(1), Duration::from_millis(1286)),
            (Duration::from_millis(1500), Duration::from_millis(1286)),
            (Duration::from_secs(5), Duration::from_millis(2387)),
            (Duration::from_secs(30), Duration::from_millis(9268)),
            (
                Duration::from_secs(86_400),
                Duration::from_millis(23_782_829),
            ),
        ];
        for (agent_ttl, want) in cases {
            let t = AtMostOnce::for_ttl(agent_ttl);
            assert_eq!(t.start_after, want, "{agent_ttl:?}");
            assert!(t.stop_after < t.ttl, "{agent_ttl:?}: B within the ttl");
            assert!(
                t.stop_after > t.ttl / 3 * 2,
                "{agent_ttl:?}: B leaves room for two refreshes"
            );
            let rho = CLOCK_RATE_MARGIN;
            let stopped = (t.stop_after + t.stop_allowance).as_secs_f64() / (1.0 - rho)
                + STOP_LATENCY_MARGIN.as_secs_f64();
            let started = (t.ttl + t.start_after).as_secs_f64() / (1.0 + rho);
            assert!(stopped <= started, "{agent_ttl:?}: {stopped} > {started}");
        }
    }
}
