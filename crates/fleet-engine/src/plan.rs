//! From the registry's view to the scheduler's snapshot, and from the scheduler's plan back to
//! registry writes. Pure functions: all of the engine's decisions are testable without etcd.

use std::collections::{BTreeMap, BTreeSet, HashSet};

use fleet_registry::{EngineOp, EngineSnapshot, UnitRecord};
use fleet_scheduler::{Decision, Machine, Plan, Snapshot, Unit};
use fleet_unit::Requirements;

/// Builds the scheduler's input. Global units are left out (agents run them); a unit whose
/// requirements cannot be read gets its error as its reason in the returned map.
pub fn to_scheduler_snapshot(
    snap: &EngineSnapshot,
    mut requirements: impl FnMut(&UnitRecord) -> Result<Requirements, String>,
) -> (Snapshot, BTreeMap<String, String>) {
    let machines = snap
        .machines
        .iter()
        .map(|m| Machine {
            id: m.id.clone(),
            metadata: m.metadata.clone(),
        })
        .collect();
    let mut invalid = BTreeMap::new();
    let mut units = Vec::with_capacity(snap.units.len());
    for rec in snap.units.iter().filter(|u| !u.global) {
        match requirements(rec) {
            Ok(req) => units.push(Unit {
                name: rec.name.clone(),
                desired: rec.desired_state,
                requirements: req,
                placement: snap
                    .schedules
                    .get(rec.name.as_str())
                    .map(|(m, _)| m.clone()),
            }),
            Err(e) => {
                invalid.insert(rec.name.to_string(), e);
            }
        }
    }
    (Snapshot { machines, units }, invalid)
}

/// The registry writes that take the cluster from `snap` to what `plan` says.
///
/// `held` are machines absent from the snapshot whose units must not move yet (a new
/// leader's grace period): decisions taking units off them are dropped.
pub fn diff(
    snap: &EngineSnapshot,
    plan: &Plan,
    invalid: &BTreeMap<String, String>,
    held: &HashSet<String>,
) -> Vec<EngineOp> {
    let records: BTreeMap<&str, &UnitRecord> =
        snap.units.iter().map(|u| (u.name.as_str(), u)).collect();
    let mut ops = Vec::new();
    let mut frozen: BTreeSet<&str> = BTreeSet::new();
    for d in &plan.decisions {
        if let Decision::Unschedule { unit, machine } = d
            && held.contains(machine)
        {
            frozen.insert(unit.as_str());
        }
    }
    let mut touched: BTreeSet<String> = BTreeSet::new();
    for d in &plan.decisions {
        match d {
            Decision::Unschedule { unit, machine } => {
                if frozen.contains(unit.as_str()) {
                    continue;
                }
                touched.insert(unit.to_string());
                ops.push(EngineOp::Unschedule {
                    unit: unit.to_string(),
                    machine: machine.clone(),
                });
            }
            Decision::Schedule { unit, machine } => {
                if frozen.contains(unit.as_str()) {
                    continue;
                }
                let Some(rec) = records.get(unit.as_str()) else {
                    continue;
                };
                touched.insert(unit.to_string());
                ops.push(EngineOp::Schedule {
                    unit: unit.to_string(),
                    machine: machine.clone(),
                    hash: rec.hash,
                    desired: rec.desired_state,
                });
            }
        }
    }
    // Units that stay where they are but whose desired state changed: tell their machine.
    for (name, (machine, sched)) in &snap.schedules {
        if touched.contains(name) {
            continue;
        }
        match records.get(name.as_str()) {
            Some(rec) if !rec.global => {
                if rec.desired_state != sched.desired_state || rec.hash != sched.hash {
                    ops.push(EngineOp::Schedule {
                        unit: name.clone(),
                        machine: machine.clone(),
                        hash: rec.hash,
                        desired: rec.desired_state,
                    });
                }
            }
            // destroyed, or a global unit (never scheduled): take it off its machine
            _ => ops.push(EngineOp::Unschedule {
                unit: name.clone(),
                machine: machine.clone(),
            }),
        }
        touched.insert(name.clone());
    }
    // Placements without a schedule record (left over by an interrupted write).
    for (name, machine) in &snap.placements {
        if !snap.schedules.contains_key(name) && !touched.contains(name) {
            ops.push(EngineOp::Unschedule {
                unit: name.clone(),
                machine: machine.clone(),
            });
        }
    }
    // Reasons: say why for every unit that cannot be placed, and only for those.
    let mut wanted: BTreeMap<String, String> = invalid.clone();
    for (unit, reason) in &plan.unplaceable {
        if !frozen.contains(unit.as_str()) {
            wanted.insert(unit.to_string(), reason.clone());
        }
    }
    for (unit, reason) in &wanted {
        if snap.reasons.get(unit) != Some(reason) {
            ops.push(EngineOp::SetReason {
                unit: unit.clone(),
                reason: reason.clone(),
            });
        }
    }
    let scheduled_now: HashSet<String> = ops
        .iter()
        .filter_map(|op| match op {
            EngineOp::Schedule { unit, .. } => Some(unit.clone()),
            _ => None,
        })
        .collect();
    for unit in snap.reasons.keys() {
        if !wanted.contains_key(unit) && !scheduled_now.contains(unit) {
            ops.push(EngineOp::ClearReason { unit: unit.clone() });
        }
    }
    ops
}
