//! The agent's decisions, as pure functions: from what this machine runs (`current`) and
//! what it must run (`desired`) to the tasks that take it there, and when those tasks need a
//! `daemon-reload`. No IO: the executor (`executor.rs`) carries a plan out.

use std::collections::BTreeMap;

use fleet_unit::{TargetState, UnitHash};

use crate::desired::Desired;

/// What the agent has done with a unit: the body it wrote and the state it brought it to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Current {
    pub hash: UnitHash,
    pub state: TargetState,
}

/// A start or a stop.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Move {
    pub unit: String,
    /// `Launched`: start it; `Loaded`: stop it.
    pub to: TargetState,
}

/// The tasks of one converge, in the order they run.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan {
    /// Units no longer wanted here, or whose body changed: `(unit, launched)`. The launched
    /// ones are stopped first; then all of their files go in one batch.
    pub unload: Vec<(String, bool)>,
    /// Unit files to write (new units and changed bodies), with the body wanted.
    pub load: Vec<(String, UnitHash)>,
    /// Starts and stops, by unit name, run together after the files are in place. A move of
    /// a unit in `load` applies only if its file was written.
    pub moves: Vec<Move>,
}

impl Plan {
    pub fn is_empty(&self) -> bool {
        self.unload.is_empty() && self.load.is_empty() && self.moves.is_empty()
    }
}

/// The tasks that take `current` to `desired`.
pub fn plan(current: &BTreeMap<String, Current>, desired: &BTreeMap<String, Desired>) -> Plan {
    let unload: Vec<(String, bool)> = current
        .iter()
        .filter(|(n, c)| desired.get(*n).is_none_or(|d| d.hash != c.hash))
        .map(|(n, c)| (n.clone(), c.state == TargetState::Launched))
        .collect();
    let mut load = Vec::new();
    let mut moves = Vec::new();
    for (name, d) in desired {
        // the state the unit is in once the files are in place: a file just written is loaded
        let state = match current.get(name) {
            Some(c) if c.hash == d.hash => c.state,
            _ => {
                load.push((name.clone(), d.hash));
                TargetState::Loaded
            }
        };
        let to = match (d.state, state) {
            (TargetState::Launched, s) if s != TargetState::Launched => TargetState::Launched,
            (TargetState::Loaded, TargetState::Launched) => TargetState::Loaded,
            _ => continue,
        };
        moves.push(Move {
            unit: name.clone(),
            to,
        });
    }
    Plan {
        unload,
        load,
        moves,
    }
}

/// Whether a batch makes a `daemon-reload`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reload {
    /// Nothing on disk changed and none is owed.
    None,
    /// One reload, after the files and before the jobs.
    Now,
    /// Only new files of units to be started: systemd loads a unit it has not loaded from
    /// disk when the StartUnit comes, so no reload; if such a start fails, one reload and one
    /// more try follow.
    Skipped,
}

/// The reload rule of one batch: `unloaded` files removed, `written` files written (with
/// whether each has an `[Install]` section), `launched(unit)` whether a written unit is to
/// be started, `owed` whether an earlier reload failed.
///
/// A reload (~0.1-0.4 s with hundreds of units) is made for removed or replaced files, units
/// only to be loaded, `[Install]` sections, and when one is owed; never more than one by
/// this rule (a start systemd cannot find makes one more: see `executor.rs`).
pub fn reload_rule(
    unloaded: usize,
    written: &[(String, bool)],
    launched: impl Fn(&str) -> bool,
    owed: bool,
) -> Reload {
    let files_changed = unloaded > 0 || !written.is_empty();
    let start_loads_them = written
        .iter()
        .all(|(name, install)| !install && launched(name));
    if owed {
        Reload::Now
    } else if !files_changed {
        Reload::None
    } else if unloaded == 0 && start_loads_them {
        Reload::Skipped
    } else {
        Reload::Now
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hash(body: &str) -> UnitHash {
        fleet_unit::UnitFile::parse(body).expect("unit").hash()
    }

    fn h(n: u8) -> UnitHash {
        hash(&format!("[Service]\nExecStart=/bin/sleep {n}\n"))
    }

    fn state(s: &str) -> TargetState {
        match s {
            "launched" => TargetState::Launched,
            "loaded" => TargetState::Loaded,
            _ => TargetState::Inactive,
        }
    }

    /// `units`: (name, current as "hash state" or "", desired as "hash state" or "").
    fn check(units: &[(&str, &str, &str)], expected: Plan) {
        let parse = |s: &str| {
            let (n, st) = s.split_once(' ')?;
            Some((h(n.parse().ok()?), state(st)))
        };
        let mut current = BTreeMap::new();
        let mut desired = BTreeMap::new();
        for (name, cur, want) in units {
            if let Some((hash, state)) = parse(cur) {
                current.insert(name.to_string(), Current { hash, state });
            }
            if let Some((hash, state)) = parse(want) {
                desired.insert(name.to_string(), Desired { hash, state });
            }
        }
        assert_eq!(plan(&current, &desired), expected, "{units:?}");
    }

    fn mv(unit: &str, to: &str) -> Move {
        Move {
            unit: unit.into(),
            to: state(to),
        }
    }

    #[test]
    fn plans() {
        // nothing to do
        check(&[], Plan::default());
        check(
            &[("a.service", "1 launched", "1 launched")],
            Plan::default(),
        );
        check(&[("a.service", "1 loaded", "1 loaded")], Plan::default());
        // new units: written, then started if wanted running
        check(
            &[
                ("a.service", "", "1 launched"),
                ("b.service", "", "2 loaded"),
            ],
            Plan {
                load: vec![("a.service".into(), h(1)), ("b.service".into(), h(2))],
                moves: vec![mv("a.service", "launched")],
                ..Plan::default()
            },
        );
        // state changes only
        check(
            &[
                ("a.service", "1 loaded", "1 launched"),
                ("b.service", "2 launched", "2 loaded"),
            ],
            Plan {
                moves: vec![mv("a.service", "launched"), mv("b.service", "loaded")],
                ..Plan::default()
            },
        );
        // no longer wanted: stopped if running, unloaded
        check(
            &[
                ("a.service", "1 launched", ""),
                ("b.service", "2 loaded", ""),
            ],
            Plan {
                unload: vec![("a.service".into(), true), ("b.service".into(), false)],
                ..Plan::default()
            },
        );
        // a changed body: unloaded, written again, started again
        check(
            &[("a.service", "1 launched", "2 launched")],
            Plan {
                unload: vec![("a.service".into(), true)],
                load: vec![("a.service".into(), h(2))],
                moves: vec![mv("a.service", "launched")],
            },
        );
        // a changed body of a unit to be only loaded: no move
        check(
            &[("a.service", "1 launched", "2 loaded")],
            Plan {
                unload: vec![("a.service".into(), true)],
                load: vec![("a.service".into(), h(2))],
                moves: vec![],
            },
        );
    }

    #[test]
    fn reloads() {
        let launched = |n: &str| n.starts_with('l');
        let w = |names: &[(&str, bool)]| {
            names
                .iter()
                .map(|(n, i)| (n.to_string(), *i))
                .collect::<Vec<_>>()
        };
        // (files removed, files written with [Install]?, a reload owed, the rule's answer)
        type Case = (usize, Vec<(String, bool)>, bool, Reload);
        let cases: &[Case] = &[
            (0, w(&[]), false, Reload::None),
            (0, w(&[]), true, Reload::Now),
            // only new units to start: systemd loads them on StartUnit
            (
                0,
                w(&[("l1", false), ("l2", false)]),
                false,
                Reload::Skipped,
            ),
            // ... unless a reload is owed anyway
            (0, w(&[("l1", false)]), true, Reload::Now),
            // a unit only to be loaded, an [Install] section, a removed file: one reload
            (0, w(&[("l1", false), ("x", false)]), false, Reload::Now),
            (0, w(&[("l1", true)]), false, Reload::Now),
            (1, w(&[]), false, Reload::Now),
            (3, w(&[("l1", false)]), false, Reload::Now),
        ];
        for (unloaded, written, owed, want) in cases {
            assert_eq!(
                reload_rule(*unloaded, written, launched, *owed),
                *want,
                "{unloaded} {written:?} {owed}"
            );
        }
    }
}
