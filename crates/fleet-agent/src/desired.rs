//! What this machine must run: its schedule plus the global units that may run here.
//! Pure functions, so reading the watched records and the global-unit rule are testable
//! without etcd or systemd.

use std::collections::BTreeMap;

use fleet_registry::keys;
use fleet_scheduler::{Machine, Unit, global_unit_runs_here};
use fleet_unit::{Requirements, TargetState, UnitHash, UnitName};

use crate::mirror::{Entry, Mirror};

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
    let mut decoded = Mirror::new(keys, machine_id);
    decoded.replace(mirror.iter().map(|(k, v)| (k.clone(), v.clone())));
    let mut out = Watched {
        metadata: configured.clone(),
        ..Watched::default()
    };
    out.metadata.extend(decoded.metadata);
    // in key order: `global/` sorts before `schedule/`
    for (global, part) in [(true, decoded.globals), (false, decoded.schedule)] {
        for (name, entry) in part {
            match entry {
                Entry::Readable { hash, state, .. } => out.wanted.push(Wanted {
                    global,
                    name,
                    hash,
                    state,
                }),
                Entry::Unreadable => out.unreadable.push(name),
            }
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

/// One unit a watched record asks for, with its requirements.
#[derive(Debug, Clone, Copy)]
pub struct Candidate<'a> {
    pub name: &'a UnitName,
    pub hash: UnitHash,
    pub state: TargetState,
    pub requirements: &'a Requirements,
}

/// Units scheduled here (with their requirements) plus eligible global units (`globals` in
/// name order). Units whose desired state is inactive are not desired. Returns the reasons
/// global units do not run here, for the log.
pub fn desired_units(
    machine: &Machine,
    scheduled: &[Candidate<'_>],
    globals: &[Candidate<'_>],
) -> (BTreeMap<UnitName, Desired>, BTreeMap<UnitName, String>) {
    let mut out = BTreeMap::new();
    let mut refused = BTreeMap::new();
    let as_unit = |c: &Candidate<'_>| Unit {
        name: c.name.clone(),
        desired: c.state,
        requirements: c.requirements.clone(),
        placement: Some(machine.id.clone()),
    };
    let desired = |c: &Candidate<'_>| Desired {
        hash: c.hash,
        state: c.state,
    };
    let mut here: Vec<&Candidate<'_>> = Vec::new();
    for c in scheduled {
        if c.state == TargetState::Inactive {
            continue;
        }
        out.insert(c.name.clone(), desired(c));
        here.push(c);
    }
    // Globals in name order; each one admitted is then an "other" for the next (so two
    // conflicting globals: the first by name runs).
    for g in globals {
        if g.state == TargetState::Inactive {
            continue;
        }
        // only the units in conflict with it either way can keep it off this machine (the
        // rule's only use of the others): the rest are not copied into scheduler units
        let others: Vec<Unit> = here
            .iter()
            .filter(|o| in_conflict(o.name, o.requirements, g.name, g.requirements))
            .map(|o| as_unit(o))
            .collect();
        let others: Vec<&Unit> = others.iter().collect();
        match global_unit_runs_here(machine, &as_unit(g), &others) {
            Ok(()) => {
                out.insert(g.name.clone(), desired(g));
                here.push(g);
            }
            Err(reason) => {
                refused.insert(g.name.clone(), reason);
            }
        }
    }
    (out, refused)
}

/// Whether two units may not share a machine (a `Conflicts` glob of either matches the
/// other's name).
pub(crate) fn in_conflict(
    a: &UnitName,
    ra: &Requirements,
    b: &UnitName,
    rb: &Requirements,
) -> bool {
    ra.conflicts_with(b.as_str()) || rb.conflicts_with(a.as_str())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// The hash of a small body numbered `n` (shared with the mirror's tests).
    pub(crate) fn hash(n: u32) -> UnitHash {
        fleet_unit::UnitFile::parse(&format!("[Service]\nExecStart=/bin/sleep {n}\n"))
            .expect("unit")
            .hash()
    }

    /// A schedule or global record of `hash` in desired state `state`.
    pub(crate) fn json(hash: UnitHash, state: &str) -> Vec<u8> {
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
        let (a, off, g) = (name("a.service"), name("off.service"), name("g.service"));
        let (plain, spread) = (
            req(""),
            req("[X-Fleet]\nGlobal=true\nConflicts=a.service\n"),
        );
        let c = |name, n, state, requirements| Candidate {
            name,
            hash: hash(n),
            state,
            requirements,
        };
        let scheduled = [
            c(&a, 1, TargetState::Launched, &plain),
            c(&off, 2, TargetState::Inactive, &plain),
        ];
        let globals = [c(&g, 3, TargetState::Launched, &spread)];
        let (desired, refused) = desired_units(&machine, &scheduled, &globals);
        assert_eq!(desired.keys().collect::<Vec<_>>(), [&name("a.service")]);
        assert_eq!(refused.keys().collect::<Vec<_>>(), [&name("g.service")]);
        assert_eq!(
            refused.get("g.service").map(String::as_str),
            Some("conflicts with a.service on machine m1")
        );
        // a conflict either way, with an admitted global unit too; the first by name is named
        let (b, h, k) = (name("b.service"), name("h.service"), name("k.service"));
        let shy = req("[X-Fleet]\nConflicts=h.service\n");
        let (global, h_req) = (
            req("[X-Fleet]\nGlobal=true\n"),
            req("[X-Fleet]\nGlobal=true\nConflicts=k.service\n"),
        );
        let scheduled = [
            c(&a, 1, TargetState::Launched, &plain),
            c(&b, 2, TargetState::Launched, &shy),
        ];
        let globals = [
            c(&h, 3, TargetState::Launched, &h_req),
            c(&k, 4, TargetState::Launched, &global),
        ];
        let (desired, refused) = desired_units(&machine, &scheduled, &globals);
        // h gave way to b, so k runs
        assert_eq!(desired.keys().collect::<Vec<_>>(), [&a, &b, &k]);
        assert_eq!(
            refused.get("h.service").map(String::as_str),
            Some("conflicts with b.service on machine m1")
        );
        // without b, h runs and k gives way to it
        let (desired, refused) = desired_units(&machine, &scheduled[..1], &globals);
        assert_eq!(desired.keys().collect::<Vec<_>>(), [&a, &h]);
        assert_eq!(
            refused.get("k.service").map(String::as_str),
            Some("conflicts with h.service on machine m1")
        );
    }
}
