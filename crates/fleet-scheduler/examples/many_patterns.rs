//! Times reconciles of a cluster where one unit declares many `Conflicts` patterns that each
//! have to be matched against every unit name (no literal prefix to narrow them).
//!
//! `cargo run --release -p fleet-scheduler --example many_patterns -- [NAMES] [PATTERNS]`
//! (defaults 2000 and 9000: the second security review's unit; fleet-unit now refuses more
//! than 256 patterns per unit, which the scheduler does not check itself)

use std::time::Instant;

use fleet_scheduler::{Machine, Snapshot, Unit, reconcile};
use fleet_unit::{Requirements, TargetState, UnitName};

fn unit(name: &str, requirements: Requirements) -> Option<Unit> {
    Some(Unit {
        name: UnitName::parse(name).ok()?,
        desired: TargetState::Launched,
        requirements,
        placement: None,
    })
}

fn main() {
    let mut args = std::env::args().skip(1);
    let names: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(2000);
    let patterns: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(9000);
    let machines = (0..3)
        .map(|i| Machine {
            id: format!("{i:032x}"),
            ..Default::default()
        })
        .collect();
    let mut units: Vec<Unit> = (0..names)
        .filter_map(|i| unit(&format!("u{i:05}.service"), Requirements::default()))
        .collect();
    let hostile = Requirements {
        conflicts: (0..patterns).map(|i| format!("*-{i}.service")).collect(),
        ..Default::default()
    };
    units.extend(unit("hostile.service", hostile));
    let snapshot = Snapshot { machines, units };
    for run in 0..3 {
        let start = Instant::now();
        let plan = reconcile(&snapshot);
        println!(
            "run {run}: {names} names, {patterns} patterns: reconcile {:?} ({} decisions)",
            start.elapsed(),
            plan.decisions.len()
        );
    }
}
