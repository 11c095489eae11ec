//! The rule an agent applies to decide whether a global unit runs on its own machine.

use fleet_unit::TargetState;

use crate::words::metadata_phrase;
use crate::{Machine, Unit};

/// Whether global `unit` runs on `machine`, given `others_on_machine`: the units scheduled to
/// that machine and the global units already accepted there. Err gives the reason.
///
/// The unit must be global and not inactive, the machine must have its MachineMetadata, and
/// neither the unit's Conflicts nor any other unit's Conflicts may match the other's name.
pub fn global_unit_runs_here(
    machine: &Machine,
    unit: &Unit,
    others_on_machine: &[&Unit],
) -> Result<(), String> {
    if !unit.requirements.global {
        return Err(format!("{} is not a global unit", unit.name));
    }
    if unit.desired == TargetState::Inactive {
        return Err("target state inactive".to_string());
    }
    if !unit.requirements.metadata_satisfied_by(&machine.metadata) {
        return Err(format!(
            "machine {} does not have metadata {}",
            machine.id,
            metadata_phrase(&unit.requirements.metadata)
        ));
    }
    for other in others_on_machine {
        if other.name == unit.name {
            continue;
        }
        if unit.requirements.conflicts_with(other.name.as_str())
            || other.requirements.conflicts_with(unit.name.as_str())
        {
            return Err(format!(
                "conflicts with {} on machine {}",
                other.name, machine.id
            ));
        }
    }
    Ok(())
}

/// Decides every global unit for one machine, the way [`crate::reconcile`] counts them:
/// `scheduled` are the units scheduled to this machine (they always win); global units are
/// considered in name order, each against the scheduled units and the globals accepted
/// before it. Returns one verdict per global unit, in name order.
pub fn global_units_for_machine<'a>(
    machine: &Machine,
    globals: &[&'a Unit],
    scheduled: &[&'a Unit],
) -> Vec<(&'a Unit, Result<(), String>)> {
    let mut sorted: Vec<&Unit> = globals.to_vec();
    sorted.sort_by(|a, b| a.name.cmp(&b.name));
    sorted.dedup_by(|a, b| a.name == b.name);
    let mut present: Vec<&Unit> = scheduled.to_vec();
    let mut out = Vec::with_capacity(sorted.len());
    for g in sorted {
        let verdict = global_unit_runs_here(machine, g, &present);
        if verdict.is_ok() {
            present.push(g);
        }
        out.push((g, verdict));
    }
    out
}
