//! From listed keys and values to records: shared by every store, so the etcd registry and
//! the in-memory store read the same bytes the same way. Malformed records are logged and
//! skipped, never fatal.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use fleet_unit::UnitFile;

use tracing::warn;

use crate::keys::{self, Keys};
use crate::model::{
    MachineRecord, MachineView, ScheduleRecord, StateRecord, UnitRecord, UnitView, current_state,
    decode, reports_hash,
};
use crate::roles::EngineSnapshot;
use crate::watch::KeyRange;

pub(crate) fn units(keys: &Keys, kvs: &[(String, Vec<u8>)]) -> Vec<UnitRecord> {
    kvs.iter()
        .filter(|(k, _)| keys.strip(keys::UNITS, k).is_some())
        .filter_map(|(k, v)| match decode::<UnitRecord>(k, v) {
            Ok(u) => Some(u),
            Err(e) => {
                warn!(error = %e, "skipping unit record");
                None
            }
        })
        .collect()
}

/// Machines present, with their API-set metadata merged over what their agents registered.
pub(crate) fn machines(keys: &Keys, kvs: &[(String, Vec<u8>)]) -> Vec<MachineView> {
    let mut overrides: BTreeMap<String, BTreeMap<String, String>> = BTreeMap::new();
    for (k, v) in kvs {
        if let Some((id, key)) = keys
            .strip(keys::METADATA, k)
            .and_then(|rest| rest.split_once('/'))
        {
            overrides
                .entry(id.to_string())
                .or_default()
                .insert(key.to_string(), String::from_utf8_lossy(v).into_owned());
        }
    }
    let mut out: Vec<MachineView> = kvs
        .iter()
        .filter(|(k, _)| keys.strip(keys::MACHINES, k).is_some())
        .filter_map(|(k, v)| match decode::<MachineRecord>(k, v) {
            Ok(m) => Some(m),
            Err(e) => {
                warn!(error = %e, "skipping machine record");
                None
            }
        })
        .map(|m| {
            let mut metadata = m.metadata;
            if let Some(o) = overrides.get(&m.id) {
                metadata.extend(o.iter().map(|(k, v)| (k.clone(), v.clone())));
            }
            MachineView {
                id: m.id,
                public_ip: m.public_ip,
                metadata,
                version: m.agent_version,
            }
        })
        .collect();
    out.sort_by(|a, b| a.id.cmp(&b.id));
    out
}

/// Plain-text values under `kind` (placements, reasons), by the rest of their key.
pub(crate) fn strings(
    keys: &Keys,
    kind: &str,
    kvs: &[(String, Vec<u8>)],
) -> BTreeMap<String, String> {
    kvs.iter()
        .filter_map(|(k, v)| {
            let name = keys.strip(kind, k)?;
            Some((name.to_string(), String::from_utf8_lossy(v).into_owned()))
        })
        .collect()
}

pub(crate) fn states(keys: &Keys, kvs: &[(String, Vec<u8>)]) -> Vec<StateRecord> {
    kvs.iter()
        .filter(|(k, _)| keys.strip(keys::STATES, k).is_some())
        .filter_map(|(k, v)| decode::<StateRecord>(k, v).ok())
        .collect()
}

/// What clients see of units besides their records and bodies, from one listing: where the
/// engine placed each, why it could not, and what the machines report.
pub(crate) struct UnitContext {
    placements: BTreeMap<String, String>,
    reasons: BTreeMap<String, String>,
    states: HashMap<(String, String), StateRecord>,
}

impl UnitContext {
    pub(crate) fn read(keys: &Keys, kvs: &[(String, Vec<u8>)]) -> UnitContext {
        UnitContext {
            placements: strings(keys, keys::PLACEMENT, kvs),
            reasons: strings(keys, keys::REASONS, kvs),
            states: states(keys, kvs)
                .into_iter()
                .map(|s| ((s.name.clone(), s.machine_id.clone()), s))
                .collect(),
        }
    }

    /// A unit as clients see it: its current state is what its machine reports.
    /// (`file`: a body shared with a cache, or one of its own.)
    pub(crate) fn view(&self, u: UnitRecord, file: impl Into<Arc<UnitFile>>) -> UnitView {
        let name = u.name.to_string();
        let machine = self.placements.get(&name).cloned();
        let state = machine
            .as_ref()
            .and_then(|m| self.states.get(&(name.clone(), m.clone())));
        UnitView {
            current: current_state(machine.as_deref(), state, &u.hash),
            name: u.name,
            file: file.into(),
            hash: u.hash,
            desired: u.desired_state,
            global: u.global,
            machine_id: machine,
            // the engine's reason first; else the machine's, about this very body
            reason: self.reasons.get(&name).cloned().or_else(|| {
                state
                    .filter(|s| reports_hash(s, &u.hash))
                    .and_then(|s| s.reason.clone())
            }),
        }
    }
}

/// What clients see of units besides their records and bodies, looked up per unit in keys
/// sorted by key (a listing's chunk): the same views as [`UnitContext`]'s, without building
/// maps of every placement, reason and state first.
pub(crate) struct SortedContext<'a> {
    keys: &'a Keys,
    kvs: &'a [(String, Vec<u8>)],
    /// The key being looked up (one buffer for every lookup).
    key: String,
}

impl<'a> SortedContext<'a> {
    pub(crate) fn new(keys: &'a Keys, kvs: &'a [(String, Vec<u8>)]) -> SortedContext<'a> {
        SortedContext {
            keys,
            kvs,
            key: String::new(),
        }
    }

    /// The value of `kind`'s key for `name` (and `machine`, for states).
    fn find(&mut self, kind: &str, name: &str, machine: Option<&str>) -> Option<&'a [u8]> {
        self.key.clear();
        self.key.push_str(self.keys.prefix());
        self.key.push_str(kind);
        self.key.push_str(name);
        if let Some(m) = machine {
            self.key.push('/');
            self.key.push_str(m);
        }
        let kvs = self.kvs;
        let i = kvs
            .binary_search_by(|(k, _)| k.as_str().cmp(self.key.as_str()))
            .ok()?;
        kvs.get(i).map(|(_, v)| v.as_slice())
    }

    /// A unit as clients see it (as [`UnitContext::view`]).
    pub(crate) fn view(&mut self, u: UnitRecord, file: impl Into<Arc<UnitFile>>) -> UnitView {
        let name = u.name.as_str();
        let machine = self
            .find(keys::PLACEMENT, name, None)
            .map(|v| String::from_utf8_lossy(v).into_owned());
        let state = match &machine {
            Some(m) => self
                .find(keys::STATES, name, Some(m))
                .and_then(|v| decode::<StateRecord>("", v).ok())
                // (as UnitContext: a record counts for the unit and machine it names)
                .filter(|s| s.name == name && &s.machine_id == m),
            None => None,
        };
        let reason = self
            .find(keys::REASONS, name, None)
            .map(|v| String::from_utf8_lossy(v).into_owned());
        UnitView {
            current: current_state(machine.as_deref(), state.as_ref(), &u.hash),
            file: file.into(),
            hash: u.hash,
            desired: u.desired_state,
            global: u.global,
            machine_id: machine,
            // the engine's reason first; else the machine's, about this very body
            reason: reason.or_else(|| {
                state
                    .filter(|s| reports_hash(s, &u.hash))
                    .and_then(|s| s.reason)
            }),
            name: u.name,
        }
    }
}

/// The key ranges the engine mirrors (list-watch) and decides from. The engine's own writes
/// (`placement/`, `reasons/`, `schedule/`, adjacent in key order) are one range, so one
/// write's events arrive together and the mirror never holds half of a decision.
pub fn engine_ranges(keys: &Keys) -> Vec<KeyRange> {
    let mut r: Vec<KeyRange> = [keys::UNITS, keys::MACHINES, keys::METADATA]
        .iter()
        .map(|k| KeyRange::prefix(keys.dir(k)))
        .collect();
    r.push(KeyRange::between(
        keys.dir(keys::PLACEMENT),
        // just past every key under schedule/ ('0' follows '/')
        format!("{}schedule0", keys.prefix()),
    ));
    r.push(KeyRange::prefix(keys.leader()));
    r
}

/// The key ranges an agent watches: its own schedule, the global units and its API-set
/// metadata (never the whole unit tree).
pub fn agent_ranges(keys: &Keys, machine_id: &str) -> Vec<KeyRange> {
    [
        keys.schedule_dir(machine_id),
        keys.dir(keys::GLOBAL),
        keys.metadata_dir(machine_id),
    ]
    .into_iter()
    .map(KeyRange::prefix)
    .collect()
}

/// Decodes a mirror of [`engine_ranges`] into what the engine decides from.
pub fn engine_snapshot<'a>(
    keys: &Keys,
    revision: i64,
    kvs: impl Iterator<Item = (&'a String, &'a Vec<u8>)>,
) -> EngineSnapshot {
    let owned: Vec<(String, Vec<u8>)> = kvs.map(|(k, v)| (k.clone(), v.clone())).collect();
    let placements = strings(keys, keys::PLACEMENT, &owned);
    let mut schedules: BTreeMap<String, (String, ScheduleRecord)> = BTreeMap::new();
    let mut strays = Vec::new();
    for (k, v) in &owned {
        let Some(rest) = keys.strip(keys::SCHEDULE, k) else {
            continue;
        };
        let Some((machine, unit)) = rest.split_once('/') else {
            continue;
        };
        let rec = match decode::<ScheduleRecord>(k, v) {
            Ok(r) => r,
            Err(e) => {
                // unreadable: the engine removes it like any other stray
                warn!(error = %e, "schedule record not understood");
                strays.push((unit.to_string(), machine.to_string()));
                continue;
            }
        };
        // A unit scheduled on two machines (an interrupted write): the placement says which
        // one is meant; the other is a stray to remove.
        let keep_new = match schedules.get(unit) {
            None => true,
            Some((m, _)) => crate::engine_model::keep_later(placements.get(unit), m, machine),
        };
        if keep_new {
            if let Some((old, _)) = schedules.insert(unit.to_string(), (machine.to_string(), rec)) {
                strays.push((unit.to_string(), old));
            }
        } else {
            strays.push((unit.to_string(), machine.to_string()));
        }
    }
    crate::engine_model::sort_strays(&mut strays);
    let leader_key = keys.leader();
    let units = units(keys, &owned);
    let read: std::collections::BTreeSet<&str> = units.iter().map(|u| u.name.as_str()).collect();
    let unreadable = owned
        .iter()
        .filter_map(|(k, _)| keys.strip(keys::UNITS, k))
        .filter(|name| !read.contains(name))
        .map(str::to_string)
        .collect();
    let machines = machines(keys, &owned);
    let unreadable_machines = owned
        .iter()
        .filter_map(|(k, v)| {
            let id = keys.strip(keys::MACHINES, k)?;
            decode::<MachineRecord>(k, v)
                .is_err()
                .then(|| id.to_string())
        })
        .collect();
    EngineSnapshot {
        revision,
        units,
        machines,
        schedules,
        strays,
        placements,
        reasons: strings(keys, keys::REASONS, &owned),
        leader: owned
            .iter()
            .find(|(k, _)| *k == leader_key)
            .map(|(_, v)| String::from_utf8_lossy(v).into_owned()),
        unreadable,
        unreadable_machines,
    }
}

#[cfg(test)]
mod tests {
    use fleet_unit::{TargetState, UnitFile, UnitName, UnitOption};

    use super::*;
    use crate::model::encode;

    fn state(name: &str, machine: &str, hash: &str, reason: Option<&str>) -> StateRecord {
        StateRecord {
            version: 1,
            name: name.into(),
            machine_id: machine.into(),
            hash: hash.into(),
            load_state: "loaded".into(),
            active_state: "active".into(),
            sub_state: "running".into(),
            agent_state: TargetState::Launched,
            reason: reason.map(str::to_string),
        }
    }

    #[test]
    fn views_looked_up_in_sorted_keys_are_those_of_the_context() {
        let keys = Keys::new("/fleet/");
        let file = UnitFile::from_options(vec![UnitOption::new("Service", "ExecStart", "/x")]);
        let hash = file.hash().to_string();
        let other = UnitFile::from_options(vec![]).hash().to_string();
        let s = |n: &str, m: &str, h: &str, r: Option<&str>| {
            (keys.state(n, m), encode(&state(n, m, h, r)))
        };
        let mut kvs = vec![
            // running where placed
            (keys.placement("a.service"), b"m1".to_vec()),
            s("a.service", "m1", &hash, None),
            // a state from another machine than its placement's: not shown
            (keys.placement("b.service"), b"m2".to_vec()),
            s("b.service", "m1", &hash, None),
            // the engine's reason wins over the machine's
            (keys.placement("c.service"), b"m1".to_vec()),
            s("c.service", "m1", &hash, Some("cannot write")),
            (keys.reason("c.service"), b"no room".to_vec()),
            // the machine's reason, about this body; none about another body
            (keys.placement("d.service"), b"m1".to_vec()),
            s("d.service", "m1", &hash, Some("cannot write")),
            (keys.placement("e.service"), b"m1".to_vec()),
            s("e.service", "m1", &other, Some("old body")),
            // unplaced, with a reason; a state record that does not decode
            (keys.reason("f.service"), b"no machine".to_vec()),
            (keys.placement("g.service"), b"m1".to_vec()),
            (keys.state("g.service", "m1"), b"{".to_vec()),
            // a record under another unit's key
            (keys.placement("h.service"), b"m1".to_vec()),
            (
                keys.state("h.service", "m1"),
                encode(&state("a.service", "m1", &hash, None)),
            ),
            // a name that is another's with more after it
            (keys.placement("a.service-b.service"), b"m3".to_vec()),
            s("a.service-b.service", "m3", &hash, None),
        ];
        kvs.sort();
        let names = [
            "a.service",
            "b.service",
            "c.service",
            "d.service",
            "e.service",
            "f.service",
            "g.service",
            "h.service",
            "a.service-b.service",
            "z.service",
        ];
        let wanted = UnitContext::read(&keys, &kvs);
        let mut sorted = SortedContext::new(&keys, &kvs);
        let file = Arc::new(file);
        for n in names {
            let rec = UnitRecord::new(
                &UnitName::parse(n).expect("a valid name"),
                &file,
                TargetState::Launched,
            );
            assert_eq!(
                sorted.view(rec.clone(), file.clone()),
                wanted.view(rec, file.clone()),
                "{n}"
            );
        }
        // (and the cases are what they say)
        let rec = |n: &str| {
            UnitRecord::new(
                &UnitName::parse(n).expect("a valid name"),
                &file,
                TargetState::Launched,
            )
        };
        let a = sorted.view(rec("a.service"), file.clone());
        assert_eq!(
            (a.current, a.machine_id.as_deref()),
            (TargetState::Launched, Some("m1"))
        );
        assert_eq!(
            sorted
                .view(rec("c.service"), file.clone())
                .reason
                .as_deref(),
            Some("no room")
        );
        assert_eq!(
            sorted
                .view(rec("d.service"), file.clone())
                .reason
                .as_deref(),
            Some("cannot write")
        );
        assert_eq!(sorted.view(rec("e.service"), file.clone()).reason, None);
    }
}
