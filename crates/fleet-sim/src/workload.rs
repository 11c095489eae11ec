//! What the simulation submits: a deterministic mix of plain units, template instances, a
//! few global units, units that conflict in groups and units bound by `MachineMetadata`,
//! and the metadata each simulated machine carries.

use std::collections::BTreeMap;

use anyhow::{Context, Result};
use fleet_unit::{UnitFile, UnitName};

/// What constrains a unit, for the invariant checks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A plain unit with a body of its own.
    Plain,
    /// An instance of the `sim-app@.service` template (bodies shared).
    Instance,
    /// An instance of `sim-ssd@.service`: `MachineMetadata=disk=ssd`.
    Ssd,
    /// `sim-spread-<group>-<n>.service`, with `Conflicts=sim-spread-<group>-*.service`: no
    /// two of a group on one machine.
    Spread { group: usize },
    /// `Global=true`, on every machine (with `ssd_only`: every machine with `disk=ssd`).
    Global { ssd_only: bool },
}

/// One unit to launch.
#[derive(Debug, Clone)]
pub struct Planned {
    pub name: UnitName,
    pub file: UnitFile,
    pub kind: Kind,
}

/// Everything submitted: templates (submitted, never launched) and the units launched.
#[derive(Debug, Clone)]
pub struct Workload {
    pub templates: Vec<(UnitName, UnitFile)>,
    pub units: Vec<Planned>,
}

const SERVICE: &str = "[Service]\nExecStart=/bin/sleep infinity\n";
const APP_TEMPLATE: &str =
    "[Unit]\nDescription=sim app %i\n\n[Service]\nExecStart=/bin/sleep infinity\n";
const SSD_TEMPLATE: &str = "[Unit]\nDescription=sim ssd %i\n\n[Service]\nExecStart=/bin/sleep infinity\n\n[X-Fleet]\nMachineMetadata=disk=ssd\n";

/// The metadata of simulated machine `index`: half of them have `disk=ssd`.
pub fn machine_metadata(index: usize) -> BTreeMap<String, String> {
    let disk = if index.is_multiple_of(2) {
        "ssd"
    } else {
        "hdd"
    };
    BTreeMap::from([
        ("disk".to_string(), disk.to_string()),
        ("rack".to_string(), format!("r{}", index % 10)),
    ])
}

/// How many units of a conflict group: at most half the machines, so that a group still
/// fits after the kills.
fn spread_group_size(machines: usize) -> usize {
    (machines / 2).min(8)
}

fn unit(name: &str, text: &str) -> Result<(UnitName, UnitFile)> {
    let name = UnitName::parse(name).with_context(|| format!("unit name {name}"))?;
    let file = UnitFile::parse(text).with_context(|| format!("unit file of {name}"))?;
    Ok((name, file))
}

/// `units` units for `machines` machines: 3 global units (one for `disk=ssd` only), then of
/// the rest 5 % in conflict groups (with 4 machines or more), 10 % `MachineMetadata`, 40 %
/// template instances and the others plain.
pub fn plan(units: usize, machines: usize) -> Result<Workload> {
    let mut planned = Vec::with_capacity(units);
    let globals = units.min(3);
    for g in 0..globals {
        let ssd_only = g == 2;
        let mut text =
            format!("[Unit]\nDescription=sim global {g}\n\n{SERVICE}\n[X-Fleet]\nGlobal=true\n");
        if ssd_only {
            text.push_str("MachineMetadata=disk=ssd\n");
        }
        let (name, file) = unit(&format!("sim-global-{g}.service"), &text)?;
        planned.push(Planned {
            name,
            file,
            kind: Kind::Global { ssd_only },
        });
    }
    let rest = units - globals;
    let group = spread_group_size(machines);
    let spread = if group >= 2 { rest * 5 / 100 } else { 0 };
    let ssd = rest * 10 / 100;
    let instances = rest * 40 / 100;
    let plain = rest - spread - ssd - instances;
    for n in 0..spread {
        let k = n / group;
        let text = format!(
            "[Unit]\nDescription=sim spread {k} {n}\n\n{SERVICE}\n[X-Fleet]\nConflicts=sim-spread-{k}-*.service\n"
        );
        let (name, file) = unit(&format!("sim-spread-{k}-{n}.service"), &text)?;
        planned.push(Planned {
            name,
            file,
            kind: Kind::Spread { group: k },
        });
    }
    let (app, app_file) = unit("sim-app@.service", APP_TEMPLATE)?;
    let (ssd_t, ssd_file) = unit("sim-ssd@.service", SSD_TEMPLATE)?;
    for n in 0..ssd {
        let (name, _) = unit(&format!("sim-ssd@{n}.service"), SSD_TEMPLATE)?;
        planned.push(Planned {
            name,
            file: ssd_file.clone(),
            kind: Kind::Ssd,
        });
    }
    for n in 0..instances {
        let (name, _) = unit(&format!("sim-app@{n}.service"), APP_TEMPLATE)?;
        planned.push(Planned {
            name,
            file: app_file.clone(),
            kind: Kind::Instance,
        });
    }
    for n in 0..plain {
        let text = format!("[Unit]\nDescription=sim plain {n}\n\n{SERVICE}");
        let (name, file) = unit(&format!("sim-plain-{n}.service"), &text)?;
        planned.push(Planned {
            name,
            file,
            kind: Kind::Plain,
        });
    }
    Ok(Workload {
        templates: vec![(app, app_file), (ssd_t, ssd_file)],
        units: planned,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_mix_adds_up_and_every_unit_parses() {
        let w = plan(2000, 50).expect("plan");
        assert_eq!(w.units.len(), 2000);
        let count = |f: &dyn Fn(&Kind) -> bool| w.units.iter().filter(|u| f(&u.kind)).count();
        assert_eq!(count(&|k| matches!(k, Kind::Global { .. })), 3);
        assert_eq!(count(&|k| matches!(k, Kind::Spread { .. })), 99);
        assert_eq!(count(&|k| *k == Kind::Ssd), 199);
        assert_eq!(count(&|k| *k == Kind::Instance), 798);
        let mut names: Vec<&str> = w.units.iter().map(|u| u.name.as_str()).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), 2000, "names repeat");
        // too few machines for a conflict group: none
        let small = plan(100, 3).expect("plan");
        assert!(
            !small
                .units
                .iter()
                .any(|u| matches!(u.kind, Kind::Spread { .. }))
        );
        assert_eq!(plan(2, 10).expect("plan").units.len(), 2);
    }
}
