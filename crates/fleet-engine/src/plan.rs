//! From the registry's view to the scheduler's snapshot, and from the scheduler's plan back to
//! registry writes. Pure functions: all of the engine's decisions are testable without etcd.

use std::collections::{BTreeMap, HashSet};

use fleet_registry::{EngineOp, EngineSnapshot, UnitRecord};
use fleet_scheduler::fasthash::{FastMap, FastSet};
use fleet_scheduler::{Decision, Machine, Plan, Snapshot, Unit};
use fleet_unit::{Requirements, UNIT_NAME_MAX};

/// Builds the scheduler's input. Global units are left out (agents run them); a unit whose
/// requirements cannot be read, or whose name systemd cannot load (256 bytes, stored by
/// fleet v1.0), gets its error as its reason in the returned map.
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
        if !rec.name.is_runnable() {
            invalid.insert(
                rec.name.to_string(),
                format!("unit name exceeds maximum length ({UNIT_NAME_MAX}): destroy the unit"),
            );
            continue;
        }
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
    // (hashed, not ordered: these are only looked up, and a reconcile at 100,000 units
    // builds and probes them for every unit)
    let mut records: FastMap<&str, &UnitRecord> = FastMap::default();
    records.reserve(snap.units.len());
    records.extend(snap.units.iter().map(|u| (u.name.as_str(), u)));
    let mut ops = Vec::new();
    let mut frozen: FastSet<&str> = FastSet::default();
    for d in &plan.decisions {
        if let Decision::Unschedule { unit, machine } = d
            && held.contains(machine)
        {
            frozen.insert(unit.as_str());
        }
    }
    // (the units decided about; the loops below skip them)
    let mut touched: FastSet<&str> = FastSet::default();
    touched.reserve(plan.decisions.len());
    for d in &plan.decisions {
        match d {
            Decision::Unschedule { unit, machine } => {
                if frozen.contains(unit.as_str()) {
                    continue;
                }
                touched.insert(unit.as_str());
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
                touched.insert(unit.as_str());
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
        if touched.contains(name.as_str()) {
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
    }
    // Schedule keys beside the real one, or unreadable ones.
    for (unit, machine) in &snap.strays {
        ops.push(EngineOp::DropSchedule {
            unit: unit.clone(),
            machine: machine.clone(),
        });
    }
    // Placements without a schedule record (left over by an interrupted write).
    for (name, machine) in &snap.placements {
        if !snap.schedules.contains_key(name) && !touched.contains(name.as_str()) {
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
    let scheduled_now: HashSet<&str> = ops
        .iter()
        .filter_map(|op| match op {
            EngineOp::Schedule { unit, .. } => Some(unit.as_str()),
            _ => None,
        })
        .collect();
    let clear: Vec<EngineOp> = snap
        .reasons
        .keys()
        .filter(|u| !wanted.contains_key(*u) && !scheduled_now.contains(u.as_str()))
        .map(|u| EngineOp::ClearReason { unit: u.clone() })
        .collect();
    ops.extend(clear);
    ops
}

#[cfg(test)]
#[allow(clippy::field_reassign_with_default)] // snapshots built up field by field read best
mod tests {
    use super::*;
    use fleet_registry::MachineView;
    use fleet_testutil::records;
    use fleet_unit::{TargetState, UnitFile, UnitName};

    fn rec(name: &str, desired: TargetState) -> UnitRecord {
        let file = UnitFile::parse("[Service]\nExecStart=/bin/true\n").expect("file");
        records::unit(name, file.hash(), desired)
    }

    fn machine(id: &str) -> MachineView {
        MachineView {
            id: id.into(),
            public_ip: String::new(),
            metadata: Default::default(),
            version: String::new(),
        }
    }

    fn placed(snap: &mut EngineSnapshot, unit: &str, m: &str) {
        let r = snap.units.iter().find(|u| u.name.as_str() == unit).cloned();
        let (hash, desired) = r.map(|r| (r.hash, r.desired_state)).unwrap_or((
            UnitFile::parse("").expect("empty").hash(),
            TargetState::Launched,
        ));
        snap.schedules
            .insert(unit.into(), (m.into(), records::schedule(hash, desired)));
        snap.placements.insert(unit.into(), m.into());
    }

    fn run(snap: &EngineSnapshot, held: &[&str]) -> Vec<EngineOp> {
        let (s, invalid) = to_scheduler_snapshot(snap, |_| Ok(Requirements::default()));
        let plan = fleet_scheduler::reconcile(&s);
        let held = held.iter().map(|s| s.to_string()).collect();
        diff(snap, &plan, &invalid, &held)
    }

    #[test]
    fn a_new_unit_is_scheduled_once() {
        let mut snap = EngineSnapshot::default();
        snap.machines = vec![machine("m1")];
        snap.units = vec![rec("a.service", TargetState::Launched)];
        let ops = run(&snap, &[]);
        assert!(
            matches!(&ops[..], [EngineOp::Schedule { unit, machine, .. }] if unit == "a.service" && machine == "m1"),
            "{ops:?}"
        );
        placed(&mut snap, "a.service", "m1");
        assert_eq!(run(&snap, &[]), vec![], "nothing to do once placed");
    }

    #[test]
    fn a_desired_state_change_is_passed_to_the_machine() {
        let mut snap = EngineSnapshot::default();
        snap.machines = vec![machine("m1")];
        snap.units = vec![rec("a.service", TargetState::Launched)];
        placed(&mut snap, "a.service", "m1");
        snap.units[0].desired_state = TargetState::Loaded;
        let ops = run(&snap, &[]);
        assert!(
            matches!(
                &ops[..],
                [EngineOp::Schedule {
                    desired: TargetState::Loaded,
                    ..
                }]
            ),
            "{ops:?}"
        );
    }

    #[test]
    fn destroyed_units_are_unscheduled_and_reasons_cleared() {
        let mut snap = EngineSnapshot::default();
        snap.machines = vec![machine("m1")];
        placed(&mut snap, "gone.service", "m1");
        snap.reasons.insert("old.service".into(), "whatever".into());
        let ops = run(&snap, &[]);
        assert!(ops.contains(&EngineOp::Unschedule {
            unit: "gone.service".into(),
            machine: "m1".into()
        }));
        assert!(ops.contains(&EngineOp::ClearReason {
            unit: "old.service".into()
        }));
    }

    #[test]
    fn units_on_held_machines_stay() {
        let mut snap = EngineSnapshot::default();
        snap.machines = vec![machine("m1")];
        snap.units = vec![rec("a.service", TargetState::Launched)];
        placed(&mut snap, "a.service", "m2"); // m2 absent
        assert_eq!(run(&snap, &["m2"]), vec![], "held machine keeps its unit");
        let ops = run(&snap, &[]);
        assert!(
            ops.iter()
                .any(|op| matches!(op, EngineOp::Schedule { machine, .. } if machine == "m1")),
            "{ops:?}"
        );
    }

    #[test]
    fn unplaceable_units_get_a_reason_once() {
        let mut snap = EngineSnapshot::default();
        snap.units = vec![rec("a.service", TargetState::Launched)];
        let ops = run(&snap, &[]);
        let reason = match &ops[..] {
            [EngineOp::SetReason { unit, reason }] if unit == "a.service" => reason.clone(),
            other => panic!("{other:?}"),
        };
        assert!(!reason.is_empty());
        snap.reasons.insert("a.service".into(), reason);
        assert_eq!(
            run(&snap, &[]),
            vec![],
            "the same reason is not written again"
        );
    }

    #[test]
    fn invalid_requirements_become_the_reason() {
        let mut snap = EngineSnapshot::default();
        snap.machines = vec![machine("m1")];
        snap.units = vec![rec("a.service", TargetState::Launched)];
        let (s, invalid) = to_scheduler_snapshot(&snap, |_| Err("bad [X-Fleet]".into()));
        assert!(s.units.is_empty());
        let plan = fleet_scheduler::reconcile(&s);
        let ops = diff(&snap, &plan, &invalid, &HashSet::new());
        assert_eq!(
            ops,
            vec![EngineOp::SetReason {
                unit: "a.service".into(),
                reason: "bad [X-Fleet]".into()
            }]
        );
    }

    /// A unit fleet v1.0 stored under a 256-byte name: never scheduled (no node could load
    /// it), and the reason says what to do.
    #[test]
    fn names_systemd_cannot_load_are_not_scheduled() {
        let long = format!("{}.service", "a".repeat(248));
        let mut snap = EngineSnapshot::default();
        snap.machines = vec![machine("m1")];
        let mut r = rec("a.service", TargetState::Launched);
        r.name = UnitName::parse_stored(&long).expect("stored name");
        snap.units = vec![r];
        let (s, _) = to_scheduler_snapshot(&snap, |_| Ok(Requirements::default()));
        assert!(s.units.is_empty());
        assert_eq!(
            run(&snap, &[]),
            vec![EngineOp::SetReason {
                unit: long,
                reason: "unit name exceeds maximum length (255): destroy the unit".into(),
            }]
        );
    }

    /// A unit replaced in place (`--replace`: new body, same record key) stays on its machine
    /// and that machine is told the new body; only when the new options rule the machine out
    /// does it move.
    #[test]
    fn a_replaced_unit_stays_unless_its_new_options_forbid_the_machine() {
        let mut snap = EngineSnapshot::default();
        let mut m2 = machine("m2");
        m2.metadata.insert("role".into(), "db".into());
        snap.machines = vec![machine("m1"), m2];
        snap.units = vec![rec("a.service", TargetState::Launched)];
        placed(&mut snap, "a.service", "m1");
        for (text, want) in [
            ("[Service]\nExecStart=/bin/sleep 2\n", "m1"),
            (
                "[Service]\nExecStart=/bin/sleep 3\n[X-Fleet]\nMachineMetadata=role=db\n",
                "m2",
            ),
        ] {
            let file = UnitFile::parse(text).expect("file");
            snap.units[0].hash = file.hash();
            let name = snap.units[0].name.clone();
            let (s, invalid) = to_scheduler_snapshot(&snap, |_| {
                Requirements::from_unit(&name, &file)
                    .map(|(r, _)| r)
                    .map_err(|e| e.to_string())
            });
            let plan = fleet_scheduler::reconcile(&s);
            let ops = diff(&snap, &plan, &invalid, &HashSet::new());
            let scheduled: Vec<_> = ops
                .iter()
                .filter_map(|op| match op {
                    EngineOp::Schedule { machine, hash, .. } => Some((machine.as_str(), *hash)),
                    _ => None,
                })
                .collect();
            assert_eq!(scheduled, [(want, file.hash())], "{text}: {ops:?}");
            let moved = ops
                .iter()
                .any(|op| matches!(op, EngineOp::Unschedule { .. }));
            assert_eq!(moved, want != "m1", "{text}: {ops:?}");
        }
    }
}
