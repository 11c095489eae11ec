//! Publishing unit states: `states/<unit>/<machine>` under the agent's lease, written only
//! when a state changed, many at once, and retried when a write failed. A passing state
//! (activating, deactivating, reloading) is written only once it has lasted [`HOLD`]: a
//! start that completes sooner writes its unit's state once, not twice.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use fleet_registry::{AgentStore, Lease, StateRecord};
use fleet_unit::TargetState;
use futures_util::StreamExt;
use futures_util::stream;
use tracing::{debug, warn};

use crate::agent::{Agent, JOBS_IN_FLIGHT};

/// The most states one transaction publishes (etcd takes at most 128 operations in one).
pub(crate) const STATES_PER_TXN: usize = 100;

/// How long a passing state waits before it is written: what fleet v1.0 showed was at most a
/// second old too (it read systemd's states once a second). At 100,000 units started in a
/// burst the "activating" of every start was some 40 % of all state writes, each one a put
/// that etcd applies alone (and checks against the machine's lease).
pub(crate) const HOLD: Duration = Duration::from_secs(1);

/// A state systemd passes through on the way to another (a job in progress).
fn passing(rec: &StateRecord) -> bool {
    matches!(
        rec.active_state.as_str(),
        "activating" | "deactivating" | "reloading"
    )
}

/// What was published, and what could not be.
pub(crate) struct Publisher {
    store: Arc<dyn AgentStore>,
    machine_id: String,
    /// The last record written for each unit: an unchanged state is not written again.
    published: BTreeMap<String, StateRecord>,
    /// States whose last write (or withdrawal) failed: retried on every tick.
    unsent: BTreeSet<String>,
    /// Passing states not written yet, with when each unit's first one came; written once
    /// [`HOLD`] has passed since (by [`Publisher::flush_held`]) unless a later state
    /// replaces them.
    held: BTreeMap<String, (StateRecord, Instant)>,
    /// The units held, in the order their hold began (so the earliest is first; an entry
    /// whose unit is no longer held since that moment is skipped when it comes up).
    held_order: VecDeque<(Instant, String)>,
}

impl Publisher {
    pub(crate) fn new(store: Arc<dyn AgentStore>, machine_id: String) -> Publisher {
        Publisher {
            store,
            machine_id,
            published: BTreeMap::new(),
            unsent: BTreeSet::new(),
            held: BTreeMap::new(),
            held_order: VecDeque::new(),
        }
    }

    /// Whether `name` is held since `since`.
    fn held_since(&self, name: &str, since: Instant) -> bool {
        self.held.get(name).is_some_and(|(_, s)| *s == since)
    }

    /// When the first held state is due ([`Publisher::flush_held`]).
    pub(crate) fn next_flush(&mut self) -> Option<Instant> {
        while let Some((since, name)) = self.held_order.front() {
            if self.held_since(name, *since) {
                return Some(*since + HOLD);
            }
            self.held_order.pop_front();
        }
        None
    }

    /// Writes the held states that have lasted [`HOLD`].
    pub(crate) async fn flush_held(&mut self, lease: &Lease) {
        let now = Instant::now();
        let mut records = Vec::new();
        while let Some((since, _)) = self.held_order.front() {
            if *since + HOLD > now {
                break;
            }
            let Some((since, name)) = self.held_order.pop_front() else {
                break;
            };
            if self.held_since(&name, since)
                && let Some((rec, _)) = self.held.remove(&name)
            {
                records.push(rec);
            }
        }
        self.write(records, lease).await;
    }

    /// Writes the records that differ from what was published ([`Publisher::write`]); a
    /// passing state is held instead, until it has lasted [`HOLD`].
    pub(crate) async fn publish(&mut self, records: Vec<StateRecord>, lease: &Lease) {
        let now = Instant::now();
        let mut now_due = Vec::with_capacity(records.len());
        for rec in records {
            // a new state replaces a held one; a held one's clock keeps running
            let since = self.held.remove(&rec.name).map(|(_, since)| since);
            if self.published.get(&rec.name) == Some(&rec) {
                continue;
            }
            if passing(&rec) {
                let since = since.unwrap_or_else(|| {
                    self.held_order.push_back((now, rec.name.clone()));
                    now
                });
                if since + HOLD > now {
                    self.held.insert(rec.name.clone(), (rec, since));
                    continue;
                }
            }
            now_due.push(rec);
        }
        self.write(now_due, lease).await;
    }

    /// Writes `records` in transactions of up to [`STATES_PER_TXN`] states (a burst of
    /// starts reports hundreds at once), so a batch costs one etcd write, not one per unit. A
    /// transaction etcd refuses (one key it will not take: a permission, a value too large)
    /// is written again state by state, so that key alone stays unsent and retried, and the
    /// others are published.
    async fn write(&mut self, records: Vec<StateRecord>, lease: &Lease) {
        let mut chunks = records.chunks(STATES_PER_TXN);
        while let Some(chunk) = chunks.next() {
            let result = self
                .store
                .publish_states(&self.machine_id, chunk, lease)
                .await;
            let reachable = match result {
                Ok(()) => {
                    for rec in chunk {
                        self.published.insert(rec.name.clone(), rec.clone());
                    }
                    true
                }
                Err(e) if e.is_refused() => {
                    debug!(error = %e, "publishing states refused; writing them one by one");
                    self.publish_one_by_one(chunk, lease).await
                }
                Err(e) => {
                    debug!(error = %e, "publishing states failed; will retry");
                    self.unsent.extend(chunk.iter().map(|r| r.name.clone()));
                    false
                }
            };
            if !reachable {
                // the registry out of reach: the rest would each wait for its own timeout;
                // what was not written is retried at a later tick
                for rec in chunks.by_ref().flatten() {
                    self.unsent.insert(rec.name.clone());
                }
            }
        }
    }

    /// Writes records one by one, up to [`JOBS_IN_FLIGHT`] at a time; false when the registry
    /// turned out to be out of reach (the first write that says so ends the batch).
    async fn publish_one_by_one(&mut self, records: &[StateRecord], lease: &Lease) -> bool {
        let writes: Vec<_> = records
            .iter()
            .map(|rec| {
                self.store
                    .publish_state(&rec.name, &self.machine_id, Some(rec), lease)
            })
            .collect();
        let mut results = Vec::with_capacity(writes.len());
        let mut reachable = true;
        let mut writing = stream::iter(writes).buffered(JOBS_IN_FLIGHT);
        while let Some(r) = writing.next().await {
            let unreachable = r.as_ref().is_err_and(|e| e.is_unavailable());
            results.push(r);
            if unreachable {
                reachable = false;
                break;
            }
        }
        drop(writing);
        let mut results = results.into_iter();
        for rec in records {
            match results.next() {
                Some(Ok(())) => {
                    self.published.insert(rec.name.clone(), rec.clone());
                }
                Some(Err(e)) => {
                    debug!(unit = %rec.name, error = %e, "publishing state failed; will retry");
                    self.unsent.insert(rec.name.clone());
                }
                None => {
                    self.unsent.insert(rec.name.clone());
                }
            }
        }
        reachable
    }

    /// Withdraws the state of a unit no longer managed here (if it was ever published).
    pub(crate) async fn withdraw(&mut self, name: &str, lease: &Lease) {
        self.held.remove(name);
        if !self.published.contains_key(name) && !self.unsent.contains(name) {
            return;
        }
        let withdrawn = self
            .store
            .publish_state(name, &self.machine_id, None, lease);
        match withdrawn.await {
            Ok(()) => {
                self.published.remove(name);
                self.unsent.remove(name);
            }
            Err(e) => {
                debug!(unit = name, error = %e, "withdrawing state failed; will retry");
                self.unsent.insert(name.to_string());
            }
        }
    }

    pub(crate) fn has_unsent(&self) -> bool {
        !self.unsent.is_empty()
    }

    /// The units whose last write failed, forgetting that they did.
    pub(crate) fn take_unsent(&mut self) -> Vec<String> {
        std::mem::take(&mut self.unsent).into_iter().collect()
    }

    /// Forgets what was published for `name`, so its state is written again.
    pub(crate) fn forget(&mut self, name: &str) {
        self.published.remove(name);
    }

    /// Forgets everything published (a new lease holds none of it).
    pub(crate) fn forget_all(&mut self) {
        self.published.clear();
    }
}

impl Agent {
    /// Reads states from systemd (all managed units, or `only`) and publishes what changed.
    pub(crate) async fn refresh_states(&mut self, only: Option<&[String]>) {
        let names: Vec<String> = match only {
            Some(n) => n.to_vec(),
            None => self.reported_units(),
        };
        if names.is_empty() {
            return;
        }
        match self.systemd.states(&names).await {
            Ok(states) => {
                for (name, s) in states {
                    if self.current.contains_key(&name) {
                        self.systemd_states.insert(name, s);
                    }
                }
            }
            Err(e) => warn!(error = %e, "cannot read unit states"),
        }
        self.publish_all(&names).await;
    }

    /// The units whose states this agent publishes: those it manages, and those it could not
    /// write (their state says why).
    pub(crate) fn reported_units(&self) -> Vec<String> {
        let mut names: Vec<String> = self.current.keys().cloned().collect();
        names.extend(
            self.faults
                .names()
                .filter(|n| !self.current.contains_key(*n))
                .cloned(),
        );
        names
    }

    /// Publishes the states of managed units that differ from what was published.
    pub(crate) async fn publish_all(&mut self, names: &[String]) {
        let records: Vec<StateRecord> = names
            .iter()
            .filter_map(|name| {
                let fault = self.faults.get(name);
                let reason = fault.map(|f| f.reason.clone());
                let Some(cur) = self.current.get(name) else {
                    // never written here: what systemd would say of a unit without a file
                    let f = fault?;
                    return Some(StateRecord {
                        version: 1,
                        name: name.clone(),
                        machine_id: self.cfg.machine_id.clone(),
                        hash: f.hash.to_string(),
                        load_state: "not-found".into(),
                        active_state: "inactive".into(),
                        sub_state: "dead".into(),
                        agent_state: TargetState::Inactive,
                        reason,
                    });
                };
                let sys = self.systemd_states.get(name)?;
                Some(StateRecord {
                    version: 1,
                    name: name.clone(),
                    machine_id: self.cfg.machine_id.clone(),
                    hash: cur.hash.to_string(),
                    load_state: sys.load_state.clone(),
                    active_state: sys.active_state.clone(),
                    sub_state: sys.sub_state.clone(),
                    agent_state: cur.state,
                    reason,
                })
            })
            .collect();
        self.publisher.publish(records, &self.lease).await;
    }

    /// Retries the state writes that failed: publish what is still managed, withdraw the rest.
    pub(crate) async fn retry_unsent(&mut self) {
        let names = self.publisher.take_unsent();
        let reported = self.reported_units();
        let (managed, gone): (Vec<String>, Vec<String>) =
            names.into_iter().partition(|n| reported.contains(n));
        for name in &managed {
            self.publisher.forget(name);
        }
        self.publish_all(&managed).await;
        for name in gone {
            self.publisher.withdraw(&name, &self.lease).await;
        }
    }
}
