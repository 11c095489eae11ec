//! fleet's scheduling rules as a pure function: a cluster [`Snapshot`] in, a [`Plan`] out.
//!
//! The model:
//! - A [`Machine`] is an ID and its metadata. A [`Unit`] is a name, a desired
//!   [`TargetState`], its [`Requirements`] (`[X-Fleet]`) and the machine it is scheduled to now.
//! - [`reconcile`] returns decisions (schedule unit U on machine M, unschedule U from M) and,
//!   for every unit that should run but cannot be placed, the reason in words.
//! - Global units are never placed by the engine: each agent decides for its own machine with
//!   [`global_unit_runs_here`] (or [`global_units_for_machine`] for all of them at once).
//!
//! The rules (fleet v1.0's engine, made deterministic and churn-free):
//! - A unit whose desired state is inactive is unscheduled; loaded and launched units want a
//!   machine.
//! - A placed unit stays where it is unless a rule forces a move: its machine left, its
//!   MachineID/MachineMetadata no longer match, its MachineOf target is elsewhere, it conflicts
//!   with a unit kept there, or a unit there replaces it.
//! - A new placement goes to the eligible machine with the fewest units (scheduled units plus
//!   global units running there), ties broken by machine ID.
//! - Eligible: MachineID (full or 8-character short ID), MachineMetadata (AND across keys, OR
//!   within a key), MachineOf (the machine every target is on; a follower is unschedulable
//!   while its target is not scheduled; MachineOf cycles are refused), Conflicts in both
//!   directions (also against global units running there), not replaced by a unit there.
//! - Replaces: a unit may be placed on a machine holding a unit it replaces; the replaced unit
//!   (and units that follow it there) is unscheduled and placed elsewhere. Of units that
//!   replace each other in a circle (two or more) only one is scheduled: the first by name
//!   among those already placed, else the first by name. A unit placed in this pass is never
//!   pushed off again in the same pass (so every pass terminates).
//! - Global units run on every machine whose metadata matches, unless they conflict with a
//!   unit scheduled there or with a global unit (first by name) already running there:
//!   scheduled units win over global ones.
//! - Same snapshot, same plan: units are handled by MachineOf depth, then by name; the input
//!   order of machines and units does not matter.

pub mod fasthash;
mod global;
mod patterns;
mod reconcile;
mod words;

use std::collections::BTreeMap;

use fleet_unit::{Requirements, TargetState, UnitName};

pub use global::{global_unit_runs_here, global_units_for_machine};

/// A machine in the cluster.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Machine {
    pub id: String,
    pub metadata: BTreeMap<String, String>,
}

/// A unit known to the cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unit {
    pub name: UnitName,
    pub desired: TargetState,
    pub requirements: Requirements,
    /// Machine ID the unit is scheduled to now (None for global or unscheduled units).
    pub placement: Option<String>,
}

/// Everything the scheduler looks at, read at one moment.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Snapshot {
    pub machines: Vec<Machine>,
    pub units: Vec<Unit>,
}

/// One change to the schedule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    Schedule { unit: UnitName, machine: String },
    Unschedule { unit: UnitName, machine: String },
}

/// What one reconcile decided.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Plan {
    /// All unschedules first, then all schedules, each in processing order.
    pub decisions: Vec<Decision>,
    /// Units that should run but cannot be placed, with the reason (lowercase, no period).
    pub unplaceable: BTreeMap<UnitName, String>,
    /// Why each unschedule decision was made (e.g. `target state inactive`).
    pub unschedule_reasons: BTreeMap<UnitName, String>,
}

/// Computes the decisions that bring the schedule in line with the snapshot.
pub fn reconcile(snapshot: &Snapshot) -> Plan {
    reconcile::run(snapshot)
}
