//! What this machine must run: its schedule plus the global units that may run here.
//! A pure function, so the global-unit rule is testable without etcd or systemd.

use std::collections::BTreeMap;

use fleet_scheduler::{Machine, Unit, global_unit_runs_here};
use fleet_unit::{Requirements, TargetState, UnitHash, UnitName};

/// One unit this machine must have: its body and whether it must run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Desired {
    pub hash: UnitHash,
    pub state: TargetState,
}

/// Units scheduled here (with their requirements) plus eligible global units. Units whose
/// desired state is inactive are not desired. Returns the reasons global units do not run
/// here, for the log.
pub fn desired_units(
    machine: &Machine,
    scheduled: &BTreeMap<UnitName, (UnitHash, TargetState, Requirements)>,
    globals: &BTreeMap<UnitName, (UnitHash, TargetState, Requirements)>,
) -> (BTreeMap<UnitName, Desired>, BTreeMap<UnitName, String>) {
    let mut out = BTreeMap::new();
    let mut refused = BTreeMap::new();
    let as_unit = |name: &UnitName, state: TargetState, req: &Requirements| Unit {
        name: name.clone(),
        desired: state,
        requirements: req.clone(),
        placement: Some(machine.id.clone()),
    };
    let mut here: Vec<Unit> = Vec::new();
    for (name, (hash, state, req)) in scheduled {
        if *state == TargetState::Inactive {
            continue;
        }
        out.insert(
            name.clone(),
            Desired {
                hash: *hash,
                state: *state,
            },
        );
        here.push(as_unit(name, *state, req));
    }
    // Globals in name order; each one admitted is then an "other" for the next (so two
    // conflicting globals: the first by name runs).
    for (name, (hash, state, req)) in globals {
        if *state == TargetState::Inactive {
            continue;
        }
        let unit = as_unit(name, *state, req);
        let others: Vec<&Unit> = here.iter().collect();
        match global_unit_runs_here(machine, &unit, &others) {
            Ok(()) => {
                out.insert(
                    name.clone(),
                    Desired {
                        hash: *hash,
                        state: *state,
                    },
                );
                here.push(unit);
            }
            Err(reason) => {
                refused.insert(name.clone(), reason);
            }
        }
    }
    (out, refused)
}
