//! At-most-once units (`[X-Fleet] AtMostOnce=true`): stopped once this machine's lease has
//! gone unrenewed for [`AtMostOnce::stop_after`], by a task of their own, so that neither a
//! busy agent loop nor an etcd out of reach delays the stop. The timing and why it is safe:
//! [`fleet_registry::AtMostOnce`].
//!
//! A lease the store says is gone (its refreshes end) fences at once, for good. A stop that
//! fails while fenced is tried again every S/4, not after the agent's fault backoff.
//!
//! While fenced, the agent starts none of them; once a refresh of the lease is accepted
//! again (the lease never expired, so the engine never moved anything), they may run again.
//! A machine that lost its lease and registered again stays fenced for
//! [`AtMostOnce::hold_after_rejoin`] first.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use fleet_registry::{AtMostOnce, Lease};
use fleet_systemd::UnitManager;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tracing::{debug, info, warn};

/// What the agent and the guard task share. The agent records the units and reads `fenced`
/// under one lock, and the guard sets `fenced` and reads the units under it: a unit the
/// agent decided to start before the fence is one the guard stops, and the agent checks
/// again after its starts (see `Agent::reconcile`).
#[derive(Debug, Default)]
struct Shared {
    /// The at-most-once units this agent manages (it may have started them).
    units: BTreeSet<String>,
    fenced: bool,
    /// How many times a fence went up: a fence raised and lifted between two turns of the
    /// agent's loop leaves `fenced` as it was, and this tells the agent its units stopped.
    raised: u64,
}

/// The guard of this machine's at-most-once units, for one lease.
pub(crate) struct Fence {
    shared: Arc<Mutex<Shared>>,
    changes: watch::Receiver<bool>,
    task: JoinHandle<()>,
}

impl Fence {
    /// Guards `lease`'s renewals. With `hold`, starts fenced and stays so at least that long
    /// (a machine that lost its lease and registered again).
    pub(crate) fn new(
        lease: &Lease,
        timing: AtMostOnce,
        systemd: Arc<dyn UnitManager>,
        units: BTreeSet<String>,
        hold: Option<std::time::Duration>,
    ) -> Fence {
        let fenced = hold.is_some();
        let shared = Arc::new(Mutex::new(Shared {
            units,
            fenced,
            raised: u64::from(fenced),
        }));
        let (tx, changes) = watch::channel(fenced);
        let state = match hold {
            Some(h) => State::Fenced {
                after: None,
                until: Some(Instant::now() + h),
            },
            None => State::Open,
        };
        let task = tokio::spawn(guard(
            lease.renewed(),
            timing,
            systemd,
            shared.clone(),
            tx,
            state,
        ));
        Fence {
            shared,
            changes,
            task,
        }
    }

    fn lock(&self) -> MutexGuard<'_, Shared> {
        lock(&self.shared)
    }

    /// Whether at-most-once units must not run now.
    pub(crate) fn is_fenced(&self) -> bool {
        self.lock().fenced
    }

    /// Records the at-most-once units the agent manages, and says, under the same lock,
    /// whether they must not run.
    pub(crate) fn set_units(&self, units: BTreeSet<String>) -> bool {
        let mut s = self.lock();
        s.units = units;
        s.fenced
    }

    pub(crate) fn units(&self) -> BTreeSet<String> {
        self.lock().units.clone()
    }

    /// How many times the fence went up (see [`Shared::raised`]).
    pub(crate) fn raised(&self) -> u64 {
        self.lock().raised
    }

    /// Fences now, for good: the agent learnt that the lease is gone (the guard, which may
    /// not have run yet, fences too once it sees the lease's refreshes end).
    pub(crate) fn raise(&self) {
        let mut s = self.lock();
        if !s.fenced {
            s.fenced = true;
            s.raised += 1;
        }
    }

    /// Resolves when the guard fences or lifts the fence (never, once its task is gone).
    pub(crate) async fn changed(&mut self) {
        if self.changes.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

impl Drop for Fence {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn lock(shared: &Mutex<Shared>) -> MutexGuard<'_, Shared> {
    // the data stays consistent whatever a panicking holder did: two plain fields
    shared.lock().unwrap_or_else(PoisonError::into_inner)
}

#[derive(Debug, Clone, Copy)]
enum State {
    /// Refreshes are accepted; fence at the last one's send time + B.
    Open,
    /// Lift the fence once a refresh sent after `after` is accepted, `until` has passed, and
    /// the last refresh is less than B old.
    Fenced {
        after: Option<Instant>,
        until: Option<Instant>,
    },
}

async fn guard(
    mut renewed: watch::Receiver<Instant>,
    timing: AtMostOnce,
    systemd: Arc<dyn UnitManager>,
    shared: Arc<Mutex<Shared>>,
    tx: watch::Sender<bool>,
    mut state: State,
) {
    let b = timing.stop_after;
    // the refreshes ended: the lease is gone (its keeper learnt so), it is never lifted
    let mut closed = false;
    // units whose stop failed while fenced: tried again every `retry` until they stop
    let mut unstopped: BTreeSet<String> = BTreeSet::new();
    let retry = (timing.stop_allowance / 4).max(std::time::Duration::from_millis(100));
    loop {
        let last = *renewed.borrow_and_update();
        let now = Instant::now();
        match state {
            State::Open if closed || now >= last + b => {
                let units = {
                    let mut s = lock(&shared);
                    if !s.fenced {
                        s.fenced = true;
                        s.raised += 1;
                    }
                    s.units.clone()
                };
                let _ = tx.send(true);
                let why = if closed {
                    "machine lease gone"
                } else {
                    "machine lease not refreshed in time"
                };
                if units.is_empty() {
                    debug!("{why}; no at-most-once unit here");
                } else {
                    warn!(
                        units = units.len(),
                        "{why}; stopping its at-most-once units"
                    );
                    unstopped = stop_all(&systemd, &units, timing).await;
                }
                state = State::Fenced {
                    after: Some(last),
                    until: None,
                };
                continue;
            }
            State::Open => {
                tokio::select! {
                    r = renewed.changed() => closed = r.is_err(),
                    _ = tokio::time::sleep_until(last + b) => {}
                }
            }
            State::Fenced { after, until } => {
                let refreshed = after.is_none_or(|a| last > a) && now < last + b;
                let held = until.is_some_and(|u| now < u);
                if !closed && refreshed && !held {
                    let any = {
                        let mut s = lock(&shared);
                        s.fenced = false;
                        !s.units.is_empty()
                    };
                    let _ = tx.send(false);
                    if any {
                        info!("machine lease refreshed; at-most-once units may run again");
                    }
                    unstopped.clear();
                    state = State::Open;
                    continue;
                }
                if closed && unstopped.is_empty() {
                    // fenced for good, every unit stopped: nothing left to do
                    return;
                }
                // during the hold, wake at its end; after it, only a refresh can lift it
                let wake = until.unwrap_or(now);
                let again = now + retry;
                tokio::select! {
                    r = renewed.changed(), if !closed => closed = r.is_err(),
                    _ = tokio::time::sleep_until(wake), if held => {}
                    _ = tokio::time::sleep_until(again), if !unstopped.is_empty() => {
                        // (not the agent's fault backoff: the stop is due within S)
                        let units = lock(&shared).units.clone();
                        let left: BTreeSet<String> =
                            unstopped.intersection(&units).cloned().collect();
                        unstopped = stop_all(&systemd, &left, timing).await;
                    }
                }
                if !held && now >= last + b {
                    // the hold is over but the lease is stale: a refresh sent later is needed
                    state = State::Fenced {
                        after: Some(last),
                        until: None,
                    };
                }
            }
        }
    }
}

/// Stops `units` (StopUnit queues the job; systemd carries it out, within the unit's
/// `TimeoutStopSec`), all at once (the D-Bus client bounds its calls in flight), each request
/// bounded by the stop allowance. Returns those whose stop failed.
async fn stop_all(
    systemd: &Arc<dyn UnitManager>,
    units: &BTreeSet<String>,
    timing: AtMostOnce,
) -> BTreeSet<String> {
    let mut stops = tokio::task::JoinSet::new();
    for name in units.clone() {
        let systemd = systemd.clone();
        stops.spawn(async move {
            let r = tokio::time::timeout(timing.stop_allowance, systemd.stop(&name)).await;
            match r {
                Ok(Ok(())) => {
                    info!(unit = %name, "at-most-once unit stopped");
                    None
                }
                Ok(Err(e)) if e.is_no_such_unit() => {
                    // not loaded (its file not written yet): nothing runs, nothing to retry
                    debug!(unit = %name, "at-most-once unit not loaded; nothing to stop");
                    None
                }
                Ok(Err(e)) => {
                    warn!(unit = %name, error = %e, "cannot stop at-most-once unit; trying again");
                    Some(name)
                }
                Err(_) => {
                    warn!(unit = %name, "stopping at-most-once unit timed out; trying again");
                    Some(name)
                }
            }
        });
    }
    let mut failed = BTreeSet::new();
    while let Some(r) = stops.join_next().await {
        if let Ok(Some(name)) = r {
            failed.insert(name);
        }
    }
    failed
}
