//! What the agent and the engine need from a store, as traits with no etcd type in them:
//! implemented by [`crate::EtcdRegistry`] (what fleetd runs) and [`crate::MemoryStore`] (its
//! in-memory twin for the agent's and the engine's loop tests).
//!
//! Both stores keep fleet's key layout ([`Keys`]) and deliver the same [`WatchEvent`]s, so
//! the agent and the engine decode what they watch the same way whichever store serves them.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::Duration;

use async_trait::async_trait;
use fleet_unit::{TargetState, UnitFile, UnitHash};
use tokio::sync::mpsc;

use crate::keys::Keys;
use crate::lease::Lease;
use crate::model::{
    MachineRecord, MachineView, RECORD_VERSION, ScheduleRecord, StateRecord, UnitRecord, encode,
};
use crate::{Result, WatchEvent};

/// One engine decision, written by [`EngineStore::apply`].
#[derive(Debug, Clone, PartialEq)]
pub enum EngineOp {
    /// (Re)write `schedule/<machine>/<unit>` and `placement/<unit>`, clear the reason.
    Schedule {
        unit: String,
        machine: String,
        hash: UnitHash,
        desired: TargetState,
    },
    /// Remove the unit from the machine it was placed on.
    Unschedule {
        unit: String,
        machine: String,
    },
    /// Remove one machine's schedule key of a unit, leaving its placement alone (strays).
    DropSchedule {
        unit: String,
        machine: String,
    },
    SetReason {
        unit: String,
        reason: String,
    },
    ClearReason {
        unit: String,
    },
}

impl EngineOp {
    /// The engine task this write is, by fleet v1.0's task type names (its metrics label
    /// them lowercased); `None` for the reason writes, which fleet did not have.
    pub fn task_type(&self) -> Option<&'static str> {
        match self {
            EngineOp::Schedule { .. } => Some("AttemptScheduleUnit"),
            EngineOp::Unschedule { .. } | EngineOp::DropSchedule { .. } => Some("UnscheduleUnit"),
            EngineOp::SetReason { .. } | EngineOp::ClearReason { .. } => None,
        }
    }
}

/// One key write of an engine decision.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Write {
    Put(String, Vec<u8>),
    Delete(String),
}

/// The key writes of `ops`, one group per decision (a store never splits a group between
/// transactions). Every store writes decisions through this, so they agree on what a
/// decision changes.
pub(crate) fn engine_writes(keys: &Keys, ops: &[EngineOp]) -> Vec<Vec<Write>> {
    // a unit that moves is unscheduled and scheduled in one batch: its placement key is then
    // only overwritten (etcd refuses a put and a delete of one key in one txn)
    let moving: HashSet<&str> = ops
        .iter()
        .filter_map(|op| match op {
            EngineOp::Schedule { unit, .. } => Some(unit.as_str()),
            _ => None,
        })
        .collect();
    // likewise a unit that gets a reason in this batch keeps its reason key out of its
    // schedule write, and a stray overwritten by a schedule write is not also deleted
    let reasoned: HashSet<&str> = ops
        .iter()
        .filter_map(|op| match op {
            EngineOp::SetReason { unit, .. } => Some(unit.as_str()),
            _ => None,
        })
        .collect();
    let scheduled_to: HashSet<(&str, &str)> = ops
        .iter()
        .filter_map(|op| match op {
            EngineOp::Schedule { unit, machine, .. } => Some((unit.as_str(), machine.as_str())),
            _ => None,
        })
        .collect();
    ops.iter()
        .map(|op| match op {
            EngineOp::Unschedule { unit, machine } if moving.contains(unit.as_str()) => {
                vec![Write::Delete(keys.schedule(machine, unit))]
            }
            EngineOp::DropSchedule { unit, machine }
                if scheduled_to.contains(&(unit.as_str(), machine.as_str())) =>
            {
                vec![]
            }
            EngineOp::Schedule { unit, .. } if reasoned.contains(unit.as_str()) => {
                let mut g = op_writes(keys, op);
                g.truncate(2); // schedule + placement, without the reason delete
                g
            }
            _ => op_writes(keys, op),
        })
        .filter(|g| !g.is_empty())
        .collect()
}

fn op_writes(keys: &Keys, op: &EngineOp) -> Vec<Write> {
    match op {
        EngineOp::Schedule {
            unit,
            machine,
            hash,
            desired,
        } => {
            let rec = ScheduleRecord {
                version: RECORD_VERSION,
                hash: *hash,
                desired_state: *desired,
            };
            vec![
                Write::Put(keys.schedule(machine, unit), encode(&rec)),
                Write::Put(keys.placement(unit), machine.as_bytes().to_vec()),
                Write::Delete(keys.reason(unit)),
            ]
        }
        EngineOp::Unschedule { unit, machine } => vec![
            Write::Delete(keys.schedule(machine, unit)),
            Write::Delete(keys.placement(unit)),
        ],
        EngineOp::SetReason { unit, reason } => {
            vec![Write::Put(keys.reason(unit), reason.as_bytes().to_vec())]
        }
        EngineOp::ClearReason { unit } => vec![Write::Delete(keys.reason(unit))],
        EngineOp::DropSchedule { unit, machine } => {
            vec![Write::Delete(keys.schedule(machine, unit))]
        }
    }
}

/// What the engine decides from: units, machines, placements and reasons at one revision.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct EngineSnapshot {
    pub revision: i64,
    pub units: Vec<UnitRecord>,
    pub machines: Vec<MachineView>,
    /// unit name → (machine, what that machine was told)
    pub schedules: BTreeMap<String, (String, ScheduleRecord)>,
    /// (unit, machine) schedule keys beside the one in `schedules` (a unit on two machines
    /// after an interrupted write) or unreadable ones: to be removed.
    pub strays: Vec<(String, String)>,
    pub placements: BTreeMap<String, String>,
    pub reasons: BTreeMap<String, String>,
    pub leader: Option<String>,
    /// Units whose `units/` record exists but cannot be read (a newer fleetd's value,
    /// damage): they are not destroyed units, and the engine leaves their placement as it
    /// is until the record reads again.
    pub unreadable: std::collections::BTreeSet<String>,
    /// Machines whose `machines/` record exists (its lease holds) but cannot be read: they
    /// are not gone, so the units scheduled there stay (at-most-once ones too); nothing new
    /// is placed there, as their metadata is unknown.
    pub unreadable_machines: std::collections::BTreeSet<String>,
}

impl EngineOp {
    /// The unit the decision is about.
    pub fn unit(&self) -> &str {
        match self {
            EngineOp::Schedule { unit, .. }
            | EngineOp::Unschedule { unit, .. }
            | EngineOp::DropSchedule { unit, .. }
            | EngineOp::SetReason { unit, .. }
            | EngineOp::ClearReason { unit } => unit,
        }
    }
}

/// Proof of engine leadership: the lease, the leader key's create revision (whose key it is)
/// and its current mod revision, the fence every decision write compares.
#[derive(Debug)]
pub struct Leadership {
    pub lease: Lease,
    pub create_revision: i64,
    /// The leader key's mod revision that decision writes require. The leader moves it
    /// ([`EngineStore::refence`]) after a write whose outcome it does not know, so that such
    /// a write, should it land later, fails instead of undoing decisions made since.
    pub fence: i64,
}

/// What the agent does with the registry: presence under a lease, a watch of its own schedule,
/// the global units and its metadata, unit bodies, and its unit states under its lease.
#[async_trait]
pub trait AgentStore: Send + Sync {
    /// The key layout of what [`AgentStore::watch_agent`] delivers.
    fn keys(&self) -> &Keys;
    /// Registers a machine under a new lease. A record of the same ID with another token is
    /// another fleetd: waits up to one ttl for it to vanish, then fails with
    /// [`crate::RegistryError::DuplicateMachine`].
    async fn register_machine(&self, rec: &MachineRecord, ttl: Duration) -> Result<Lease>;
    /// Withdraws a machine's presence at once (its lease is revoked).
    async fn withdraw_machine(&self, id: &str, lease: Lease);
    /// List-watch of `schedule/<machine>/`, `global/` and `metadata/<machine>/`. With
    /// `poll`, re-lists every interval instead of watching.
    fn watch_agent(&self, machine_id: &str, poll: Option<Duration>) -> mpsc::Receiver<WatchEvent>;
    /// The unit file stored under `hash`.
    async fn body(&self, hash: &UnitHash) -> Result<UnitFile>;
    /// The unit files stored under `hashes`, in as few requests as the store can (a burst
    /// schedules hundreds of new units on a machine at once). Bodies that are missing or
    /// unreadable are left out of the map (`body` says why); fails only as a whole.
    async fn bodies(&self, hashes: &[UnitHash]) -> Result<HashMap<UnitHash, UnitFile>> {
        let mut out = HashMap::new();
        for h in hashes {
            match self.body(h).await {
                Ok(f) => {
                    out.insert(*h, f);
                }
                Err(e) if e.is_unavailable() => return Err(e),
                Err(_) => {}
            }
        }
        Ok(out)
    }
    /// Publishes (Some) or withdraws (None) one unit state of this machine.
    async fn publish_state(
        &self,
        name: &str,
        machine_id: &str,
        state: Option<&StateRecord>,
        lease: &Lease,
    ) -> Result<()>;
    /// Publishes the states of several units of this machine (each `states/<unit>/<machine>`
    /// under `lease`) in as few requests as the store can: a burst of starts reports hundreds
    /// at once. All or nothing per request: when it fails, some of the states may have been
    /// written (an earlier request) and none of the failed request's were; a caller that
    /// needs to know which writes them one by one ([`AgentStore::publish_state`]).
    async fn publish_states(
        &self,
        machine_id: &str,
        states: &[StateRecord],
        lease: &Lease,
    ) -> Result<()> {
        for s in states {
            self.publish_state(&s.name, machine_id, Some(s), lease)
                .await?;
        }
        Ok(())
    }
}

/// What the engine does with the registry: leader election, a mirror of its keys, unit
/// bodies, and fenced writes of its decisions.
#[async_trait]
pub trait EngineStore: Send + Sync {
    /// The key layout of what [`EngineStore::watch_engine`] delivers.
    fn keys(&self) -> &Keys;
    /// Tries to become the engine leader. `Ok(None)` when someone else leads.
    async fn campaign(&self, machine_id: &str, ttl: Duration) -> Result<Option<Leadership>>;
    /// Gives up leadership at once, so another engine takes over quickly.
    async fn resign(&self, leadership: Leadership);
    /// Writes the leader key again (same value, same lease) while it is still this
    /// leadership's: its new mod revision, the fence of the writes to come. A decision write
    /// still in flight with the old fence then fails whole, whenever it reaches the store.
    /// [`crate::RegistryError::NotLeader`] when the key is no longer ours.
    async fn refence(&self, leadership: &Leadership) -> Result<i64>;
    /// List-watch of the engine's keys ([`crate::engine_ranges`]): what a leader mirrors.
    fn watch_engine(&self, poll: Option<Duration>) -> mpsc::Receiver<WatchEvent>;
    /// List-watch of the leader key alone: all a candidate that does not lead follows.
    fn watch_leader(&self, poll: Option<Duration>) -> mpsc::Receiver<WatchEvent>;
    /// The bodies of the given hashes (those it has; the rest are missing from the map).
    async fn unit_bodies(&self, hashes: &[UnitHash]) -> Result<HashMap<UnitHash, UnitFile>>;
    /// Writes decisions, fenced on the leader key: a deposed leader's writes fail as a whole
    /// ([`crate::RegistryError::NotLeader`]). Returns the revision of the last write that
    /// changed something (0 when none did: a write of deletes of keys already gone makes no
    /// revision and no watch event, so the engine must not wait to see it come back).
    async fn apply(&self, leadership: &Leadership, ops: &[EngineOp]) -> Result<i64>;
    /// Writes each batch (at most [`ENGINE_OPS_PER_TXN`] decisions, a unit's decisions never
    /// split between batches) as one fenced transaction, several in flight at once where the
    /// store allows; the outcome of each batch, in order. A batch refused (one of its keys)
    /// fails alone.
    async fn apply_batches(
        &self,
        leadership: &Leadership,
        batches: &[Vec<EngineOp>],
    ) -> Vec<Result<i64>> {
        let mut out = Vec::with_capacity(batches.len());
        for b in batches {
            out.push(self.apply(leadership, b).await);
        }
        out
    }
}

/// How many decisions one engine transaction carries: a decision writes at most 3 keys, so
/// a batch stays within the etcd transaction limit (128 operations by default) with room to
/// spare.
pub const ENGINE_OPS_PER_TXN: usize = 40;
