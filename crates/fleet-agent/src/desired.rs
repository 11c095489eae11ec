//! What this machine must run: its schedule plus the global units that may run here.
//! Pure functions, so reading the watched records and the global-unit rule are testable
//! without etcd or systemd.

use std::collections::BTreeMap;

use fleet_registry::{GlobalRecord, ScheduleRecord, keys};
use fleet_scheduler::{Machine, Unit, global_unit_runs_here};
use fleet_unit::{Requirements, TargetState, UnitHash, UnitName};
use tracing::warn;

/// One unit the watched records ask for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Wanted {
    pub global: bool,
    pub name: UnitName,
    pub hash: UnitHash,
    pub state: TargetState,
}

/// What the agent's watch says, decoded.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Watched {
    /// Units scheduled here and global units, in key order.
    pub wanted: Vec<Wanted>,
    /// Units whose record this agent cannot read (a newer format during an upgrade, damage):
    /// a unit it already runs under that name keeps running as it is; nothing new starts.
    pub unreadable: Vec<UnitName>,
    /// The configured metadata with the API-set metadata merged over it.
    pub metadata: BTreeMap<String, String>,
}

/// Decodes the agent's mirror (`schedule/<machine>/`, `global/`, `metadata/<machine>/`).
pub fn read_watched(
    keys: &keys::Keys,
    machine_id: &str,
    configured: &BTreeMap<String, String>,
    mirror: &BTreeMap<String, Vec<u8>>,
) -> Watched {
    let sched_dir = keys.schedule_dir(machine_id);
    let meta_dir = keys.metadata_dir(machine_id);
    let mut out = Watched {
        metadata: configured.clone(),
        ..Watched::default()
    };
    for (k, v) in mirror {
        if let Some(name) = k.strip_prefix(&sched_dir) {
            let Ok(name) = UnitName::parse(name) else {
                warn!(key = %k, "skipping schedule record with an invalid unit name");
                continue;
            };
            match serde_json::from_slice::<ScheduleRecord>(v) {
                Ok(rec) => out.wanted.push(Wanted {
                    global: false,
                    name,
                    hash: rec.hash,
                    state: rec.desired_state,
                }),
                Err(_) => {
                    warn!(key = %k, "schedule record not understood; leaving the unit as it is");
                    out.unreadable.push(name);
                }
            }
        } else if let Some(name) = keys.strip(keys::GLOBAL, k) {
            let Ok(name) = UnitName::parse(name) else {
                warn!(key = %k, "skipping global record with an invalid unit name");
                continue;
            };
            match serde_json::from_slice::<GlobalRecord>(v) {
                Ok(rec) => out.wanted.push(Wanted {
                    global: true,
                    name,
                    hash: rec.hash,
                    state: rec.desired_state,
                }),
                Err(_) => {
                    warn!(key = %k, "global record not understood; leaving the unit as it is");
                    out.unreadable.push(name);
                }
            }
        } else if let Some(key) = k.strip_prefix(&meta_dir) {
            out.metadata
                .insert(key.to_string(), String::from_utf8_lossy(v).into_owned());
        }
    }
    out
}

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

#[cfg(test)]
mod tests {
    use super::*;

    fn hash(n: u32) -> UnitHash {
        fleet_unit::UnitFile::parse(&format!("[Service]\nExecStart=/bin/sleep {n}\n"))
            .expect("unit")
            .hash()
    }

    fn json(hash: UnitHash, state: &str) -> Vec<u8> {
        format!("{{\"version\":1,\"hash\":\"{hash}\",\"desiredState\":\"{state}\"}}").into_bytes()
    }

    #[test]
    fn reads_what_the_agent_watches() {
        let keys = keys::Keys::new("/p/");
        let mirror: BTreeMap<String, Vec<u8>> = [
            (keys.schedule("m1", "a.service"), json(hash(1), "launched")),
            (keys.schedule("m1", "b.service"), b"not json".to_vec()),
            (keys.schedule("m1", "bad name"), json(hash(1), "launched")),
            (keys.global("g.service"), json(hash(2), "loaded")),
            (keys.metadata("m1", "disk"), b"ssd".to_vec()),
        ]
        .into_iter()
        .collect();
        let configured = BTreeMap::from([("region".to_string(), "east".to_string())]);
        let w = read_watched(&keys, "m1", &configured, &mirror);
        let name = |s: &str| UnitName::parse(s).expect("name");
        assert_eq!(
            w.wanted,
            vec![
                Wanted {
                    global: true,
                    name: name("g.service"),
                    hash: hash(2),
                    state: TargetState::Loaded,
                },
                Wanted {
                    global: false,
                    name: name("a.service"),
                    hash: hash(1),
                    state: TargetState::Launched,
                },
            ]
        );
        assert_eq!(w.unreadable, vec![name("b.service")]);
        assert_eq!(
            w.metadata,
            BTreeMap::from([
                ("disk".to_string(), "ssd".to_string()),
                ("region".to_string(), "east".to_string()),
            ])
        );
    }

    #[test]
    fn inactive_units_are_not_desired_and_conflicting_globals_give_way() {
        let machine = Machine {
            id: "m1".into(),
            metadata: BTreeMap::new(),
        };
        let name = |s: &str| UnitName::parse(s).expect("name");
        let req = |text: &str| {
            let file = fleet_unit::UnitFile::parse(text).expect("unit");
            Requirements::from_unit(&name("x.service"), &file)
                .expect("requirements")
                .0
        };
        let scheduled = BTreeMap::from([
            (name("a.service"), (hash(1), TargetState::Launched, req(""))),
            (
                name("off.service"),
                (hash(2), TargetState::Inactive, req("")),
            ),
        ]);
        let globals = BTreeMap::from([(
            name("g.service"),
            (
                hash(3),
                TargetState::Launched,
                req("[X-Fleet]\nGlobal=true\nConflicts=a.service\n"),
            ),
        )]);
        let (desired, refused) = desired_units(&machine, &scheduled, &globals);
        assert_eq!(desired.keys().collect::<Vec<_>>(), [&name("a.service")]);
        assert_eq!(refused.keys().collect::<Vec<_>>(), [&name("g.service")]);
    }
}
