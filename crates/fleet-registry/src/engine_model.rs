//! The engine's decoded mirror, kept up to date one key at a time: a watch event decodes the
//! one record it carries and updates the snapshot in place, so a reconcile after a change
//! pays for that change, neither decoding nor copying every unit again.
//! [`EngineModel::snapshot`] equals [`crate::engine_snapshot`] of the same keys (a property
//! test holds them together).

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use tracing::warn;

use crate::keys::{self, Keys};
use crate::model::{MachineRecord, MachineView, ScheduleRecord, UnitRecord, decode};
use crate::roles::EngineSnapshot;

/// The engine's keys, decoded, and the snapshot made of them. Only records that changed are
/// decoded again; the snapshot is shared, not copied, with the reconcile that reads it.
#[derive(Debug, Clone)]
pub struct EngineModel {
    keys: Keys,
    leader_key: String,
    /// `units/<name>` by the rest of its key; `None`: present but unreadable.
    units: BTreeMap<String, Option<UnitRecord>>,
    /// Whether `snap.units` lags `units`: it is rebuilt from them once, at the next
    /// [`EngineModel::snapshot`]. Kept in place, each new unit shifted every unit after it
    /// in the vector (O(units) a change: a burst of U creations cost O(U²) moves).
    units_stale: bool,
    /// How many readable records carry each name (a record may name another key's unit).
    named: HashMap<String, usize>,
    /// `machines/<…>` by the rest of its key (readable ones only).
    machines: BTreeMap<String, MachineRecord>,
    /// `metadata/<id>/<key>`: machine → key → value.
    metadata: BTreeMap<String, BTreeMap<String, String>>,
    /// `schedule/<machine>/<unit>`: unit → `<machine>/` → its record (`None`: unreadable).
    /// The inner key sorts machines as their etcd keys sort.
    schedule: BTreeMap<String, BTreeMap<String, Option<ScheduleRecord>>>,
    /// Each unit's strays (see [`EngineSnapshot::strays`]).
    strays: BTreeMap<String, Vec<String>>,
    snap: Arc<EngineSnapshot>,
    /// While a fresh listing is decoded, machines are put together once, at its end.
    loading: bool,
}

impl EngineModel {
    pub fn new(keys: &Keys) -> EngineModel {
        EngineModel {
            keys: keys.clone(),
            leader_key: keys.leader(),
            units: BTreeMap::new(),
            units_stale: false,
            named: HashMap::new(),
            machines: BTreeMap::new(),
            metadata: BTreeMap::new(),
            schedule: BTreeMap::new(),
            strays: BTreeMap::new(),
            snap: Arc::new(EngineSnapshot::default()),
            loading: false,
        }
    }

    /// An empty model of the same keys.
    pub fn clone_empty(&self) -> EngineModel {
        EngineModel::new(&self.keys)
    }

    /// Forgets everything and decodes a fresh listing.
    pub fn reset<'a>(&mut self, kvs: impl IntoIterator<Item = (&'a String, &'a Vec<u8>)>) {
        *self = EngineModel::new(&self.keys);
        self.loading = true;
        for (k, v) in kvs {
            self.put(k, v);
        }
        self.loading = false;
        self.refresh_machines();
    }

    /// Whether any engine holds the leader key.
    pub fn has_leader(&self) -> bool {
        self.snap.leader.is_some()
    }

    /// What the engine decides from, at `revision`. Shared: the next change copies it only
    /// if the caller still holds it then.
    pub fn snapshot(&mut self, revision: i64) -> Arc<EngineSnapshot> {
        if self.snap.revision != revision {
            Arc::make_mut(&mut self.snap).revision = revision;
        }
        if self.units_stale {
            // readable records in key order, as a full decode lists them
            Arc::make_mut(&mut self.snap).units = self.units.values().flatten().cloned().collect();
            self.units_stale = false;
        }
        self.snap.clone()
    }

    /// `key` now holds `value`.
    pub fn put(&mut self, key: &str, value: &[u8]) {
        self.change(key, Some(value));
    }

    /// `key` is gone.
    pub fn delete(&mut self, key: &str) {
        self.change(key, None);
    }

    fn change(&mut self, key: &str, value: Option<&[u8]>) {
        let text = |v: &[u8]| String::from_utf8_lossy(v).into_owned();
        if key == self.leader_key {
            Arc::make_mut(&mut self.snap).leader = value.map(text);
        } else if let Some(name) = self.keys.strip(keys::UNITS, key) {
            let rec = value.map(|v| {
                decode::<UnitRecord>(key, v)
                    .map_err(|e| warn!(error = %e, "skipping unit record"))
                    .ok()
            });
            self.set_unit(name, rec);
        } else if let Some(rest) = self.keys.strip(keys::MACHINES, key) {
            let rec = value.and_then(|v| {
                decode::<MachineRecord>(key, v)
                    .map_err(|e| warn!(error = %e, "skipping machine record"))
                    .ok()
            });
            let unreadable = &mut Arc::make_mut(&mut self.snap).unreadable_machines;
            if value.is_some() && rec.is_none() {
                unreadable.insert(rest.to_string());
            } else {
                unreadable.remove(rest);
            }
            match rec {
                Some(m) => self.machines.insert(rest.to_string(), m),
                None => self.machines.remove(rest),
            };
            self.refresh_machines();
        } else if let Some(rest) = self.keys.strip(keys::METADATA, key) {
            let Some((id, k)) = rest.split_once('/') else {
                return;
            };
            match value {
                Some(v) => {
                    self.metadata
                        .entry(id.to_string())
                        .or_default()
                        .insert(k.to_string(), text(v));
                }
                None => {
                    if let Some(m) = self.metadata.get_mut(id) {
                        m.remove(k);
                        if m.is_empty() {
                            self.metadata.remove(id);
                        }
                    }
                }
            }
            self.refresh_machines();
        } else if let Some(rest) = self.keys.strip(keys::SCHEDULE, key) {
            let Some((machine, unit)) = rest.split_once('/') else {
                return;
            };
            let dir = format!("{machine}/");
            match value {
                Some(v) => {
                    let rec = decode::<ScheduleRecord>(key, v)
                        .map_err(|e| warn!(error = %e, "schedule record not understood"))
                        .ok();
                    self.schedule
                        .entry(unit.to_string())
                        .or_default()
                        .insert(dir, rec);
                }
                None => {
                    if let Some(on) = self.schedule.get_mut(unit) {
                        on.remove(&dir);
                        if on.is_empty() {
                            self.schedule.remove(unit);
                        }
                    }
                }
            }
            self.refresh_schedule(unit);
        } else if let Some(name) = self.keys.strip(keys::PLACEMENT, key) {
            let snap = Arc::make_mut(&mut self.snap);
            match value {
                Some(v) => snap.placements.insert(name.to_string(), text(v)),
                None => snap.placements.remove(name),
            };
            // the placement decides which of two schedule records is meant
            if self.schedule.contains_key(name) {
                self.refresh_schedule(name);
            }
        } else if let Some(name) = self.keys.strip(keys::REASONS, key) {
            let snap = Arc::make_mut(&mut self.snap);
            match value {
                Some(v) => snap.reasons.insert(name.to_string(), text(v)),
                None => snap.reasons.remove(name),
            };
        }
    }

    /// `units/<key>` now holds `rec` (`Some(None)`: unreadable; `None`: deleted).
    fn set_unit(&mut self, key: &str, rec: Option<Option<UnitRecord>>) {
        let mut touched = vec![key.to_string()];
        if let Some(Some(old)) = self.units.get(key) {
            let name = old.name.to_string();
            if let Some(n) = self.named.get_mut(&name) {
                *n -= 1;
                if *n == 0 {
                    self.named.remove(&name);
                }
            }
            touched.push(name);
        }
        match rec {
            None => {
                self.units.remove(key);
            }
            Some(rec) => {
                if let Some(r) = &rec {
                    *self.named.entry(r.name.to_string()).or_default() += 1;
                    touched.push(r.name.to_string());
                }
                self.units.insert(key.to_string(), rec);
            }
        }
        self.units_stale = true;
        let snap = Arc::make_mut(&mut self.snap);
        // a key is unreadable while no readable record carries its name
        for name in touched {
            if self.units.contains_key(&name) && !self.named.contains_key(&name) {
                snap.unreadable.insert(name);
            } else {
                snap.unreadable.remove(&name);
            }
        }
    }

    /// Machines as the engine sees them: every record with its API-set metadata over it
    /// (a few thousand at most: rebuilt whole).
    fn refresh_machines(&mut self) {
        if self.loading {
            return;
        }
        let mut machines: Vec<MachineView> = self
            .machines
            .values()
            .map(|m| {
                let mut metadata = m.metadata.clone();
                if let Some(o) = self.metadata.get(&m.id) {
                    metadata.extend(o.iter().map(|(k, v)| (k.clone(), v.clone())));
                }
                MachineView {
                    id: m.id.clone(),
                    public_ip: m.public_ip.clone(),
                    metadata,
                    version: m.agent_version.clone(),
                }
            })
            .collect();
        machines.sort_by(|a, b| a.id.cmp(&b.id));
        Arc::make_mut(&mut self.snap).machines = machines;
    }

    /// Where `unit` is scheduled, and its strays, from its schedule records and placement.
    fn refresh_schedule(&mut self, unit: &str) {
        let snap = Arc::make_mut(&mut self.snap);
        let placed = snap.placements.get(unit);
        let mut chosen: Option<(&str, &ScheduleRecord)> = None;
        let mut strays = Vec::new();
        for (dir, rec) in self.schedule.get(unit).into_iter().flatten() {
            let machine = dir.strip_suffix('/').unwrap_or(dir);
            let Some(rec) = rec else {
                strays.push(machine.to_string());
                continue;
            };
            chosen = match chosen {
                Some((old, old_rec)) if !keep_later(placed, old, machine) => {
                    strays.push(machine.to_string());
                    Some((old, old_rec))
                }
                Some((old, _)) => {
                    strays.push(old.to_string());
                    Some((machine, rec))
                }
                None => Some((machine, rec)),
            };
        }
        match chosen {
            Some((m, rec)) => {
                let entry = (m.to_string(), rec.clone());
                snap.schedules.insert(unit.to_string(), entry);
            }
            None => {
                snap.schedules.remove(unit);
            }
        }
        let had = self.strays.contains_key(unit);
        if strays.is_empty() {
            self.strays.remove(unit);
        } else {
            self.strays.insert(unit.to_string(), strays);
        }
        if had || self.strays.contains_key(unit) {
            // strays are rare (an interrupted write, damage): their list is rebuilt whole
            let mut all: Vec<(String, String)> = self
                .strays
                .iter()
                .flat_map(|(u, ms)| ms.iter().map(move |m| (u.clone(), m.clone())))
                .collect();
            sort_strays(&mut all);
            snap.strays = all;
        }
    }
}

/// A unit scheduled on two machines (an interrupted write): of the one met first (`old`)
/// and the one met later (in key order), the placement says which is meant.
pub(crate) fn keep_later(placed: Option<&String>, old: &str, later: &str) -> bool {
    placed.is_some_and(|p| p == later && p != old)
}

/// Strays in the order of their schedule keys (`<machine>/<unit>`), whatever order they
/// were found in.
pub(crate) fn sort_strays(strays: &mut [(String, String)]) {
    strays.sort_by(|(u1, m1), (u2, m2)| {
        let a = m1.bytes().chain(std::iter::once(b'/')).chain(u1.bytes());
        let b = m2.bytes().chain(std::iter::once(b'/')).chain(u2.bytes());
        a.cmp(b)
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::encode;
    use fleet_unit::{TargetState, UnitFile, UnitName};
    use proptest::prelude::*;

    const UNITS: [&str; 3] = ["a.service", "b.service", "a-b.service"];
    /// Machine IDs whose keys sort otherwise than the IDs alone ('-' sorts before '/').
    const MACHINES: [&str; 4] = ["m1", "m1-x", "m10", "m2"];

    /// One change: which key (kind, unit, machine), which value (`None`: a delete).
    #[derive(Debug, Clone)]
    struct Change {
        kind: usize,
        unit: usize,
        machine: usize,
        value: Option<usize>,
    }

    fn changes() -> impl Strategy<Value = Vec<Change>> {
        let change = (
            0..7usize,
            0..3usize,
            0..4usize,
            prop::option::weighted(0.7, 0..4usize),
        )
            .prop_map(|(kind, unit, machine, value)| Change {
                kind,
                unit,
                machine,
                value,
            });
        prop::collection::vec(change, 0..60)
    }

    fn hash(n: usize) -> fleet_unit::UnitHash {
        UnitFile::parse(&format!("[Service]\nExecStart=/bin/sleep {n}\n"))
            .expect("file")
            .hash()
    }

    fn state(n: usize) -> TargetState {
        [
            TargetState::Inactive,
            TargetState::Loaded,
            TargetState::Launched,
        ][n % 3]
    }

    /// The key and value of a change; value variant 3 is never readable.
    fn render(keys: &Keys, c: &Change) -> (String, Option<Vec<u8>>) {
        let unit = UNITS[c.unit];
        let machine = MACHINES[c.machine];
        let garbage = b"{not json".to_vec();
        let (key, value) = match c.kind {
            0 => {
                let v = c.value.map(|v| match v {
                    3 => garbage,
                    // variant 2: a record whose name is another unit's
                    v => encode(&UnitRecord {
                        version: 1,
                        name: UnitName::parse(UNITS[(c.unit + v / 2) % 3]).expect("name"),
                        hash: hash(v),
                        desired_state: state(v + c.machine),
                        global: c.machine == 3,
                    }),
                });
                (keys.unit(unit), v)
            }
            1 => {
                let v = c.value.map(|v| match v {
                    3 => garbage,
                    v => encode(&MachineRecord {
                        version: 1,
                        id: machine.to_string(),
                        public_ip: format!("10.0.0.{v}"),
                        metadata: BTreeMap::from([("k".to_string(), format!("{v}"))]),
                        agent_version: "1".into(),
                        token: String::new(),
                    }),
                });
                (keys.machine(machine), v)
            }
            2 => (
                keys.metadata(machine, ["k", "region"][c.unit % 2]),
                c.value.map(|v| format!("meta{v}").into_bytes()),
            ),
            3 => {
                let v = c.value.map(|v| match v {
                    3 => garbage,
                    v => encode(&ScheduleRecord {
                        version: 1,
                        hash: hash(v),
                        desired_state: state(v),
                    }),
                });
                (keys.schedule(machine, unit), v)
            }
            4 => (
                keys.placement(unit),
                c.value.map(|_| machine.as_bytes().to_vec()),
            ),
            5 => (
                keys.reason(unit),
                c.value.map(|v| format!("reason {v}").into_bytes()),
            ),
            _ => (keys.leader(), c.value.map(|_| machine.as_bytes().to_vec())),
        };
        (key, value)
    }

    proptest! {
        /// After any sequence of puts and deletes (unreadable records, a unit on two
        /// machines, metadata of absent machines included), the model updated change by
        /// change is what a full decode of the same keys gives.
        #[test]
        fn incremental_model_equals_a_full_decode(changes in changes(), reset_at in 0..60usize) {
            let keys = Keys::new("/fleet/");
            let mut mirror: BTreeMap<String, Vec<u8>> = BTreeMap::new();
            let mut model = EngineModel::new(&keys);
            for (i, c) in changes.iter().enumerate() {
                let (key, value) = render(&keys, c);
                match value {
                    Some(v) => {
                        model.put(&key, &v);
                        mirror.insert(key, v);
                    }
                    None => {
                        model.delete(&key);
                        mirror.remove(&key);
                    }
                }
                if i == reset_at {
                    model.reset(mirror.iter());
                }
                let rev = i as i64 + 1;
                let full = crate::decode::engine_snapshot(&keys, rev, mirror.iter());
                prop_assert_eq!(&*model.snapshot(rev), &full);
            }
        }
    }
}
