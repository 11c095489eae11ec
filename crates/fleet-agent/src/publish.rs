//! Publishing unit states: `states/<unit>/<machine>` under the agent's lease, written only
//! when a state changed, many at once, and retried when a write failed.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use fleet_registry::{AgentStore, Lease, StateRecord};
use fleet_unit::TargetState;
use futures_util::StreamExt;
use futures_util::stream;
use tracing::{debug, warn};

use crate::agent::{Agent, JOBS_IN_FLIGHT};

/// The most states one transaction publishes (etcd takes at most 128 operations in one).
pub(crate) const STATES_PER_TXN: usize = 100;

/// What was published, and what could not be.
pub(crate) struct Publisher {
    store: Arc<dyn AgentStore>,
    machine_id: String,
    /// The last record written for each unit: an unchanged state is not written again.
    published: BTreeMap<String, StateRecord>,
    /// States whose last write (or withdrawal) failed: retried on every tick.
    unsent: BTreeSet<String>,
}

impl Publisher {
    pub(crate) fn new(store: Arc<dyn AgentStore>, machine_id: String) -> Publisher {
        Publisher {
            store,
            machine_id,
            published: BTreeMap::new(),
            unsent: BTreeSet::new(),
        }
    }

    /// Writes the records that differ from what was published: in transactions of up to
    /// [`STATES_PER_TXN`] states (a burst of starts reports hundreds at once), so a batch
    /// costs one etcd write, not one per unit. A transaction etcd refuses (one key it will
    /// not take: a permission, a value too large) is written again state by state, so that
    /// key alone stays unsent and retried, and the others are published.
    pub(crate) async fn publish(&mut self, records: Vec<StateRecord>, lease: &Lease) {
        let records: Vec<StateRecord> = records
            .into_iter()
            .filter(|rec| self.published.get(&rec.name) != Some(rec))
            .collect();
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
