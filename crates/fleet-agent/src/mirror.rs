//! The agent's watched keys, decoded once, when their event arrives: this machine's
//! schedule, the global units and the API-set metadata. A record is never decoded again at
//! each reconcile, and each unit's `[X-Fleet]` requirements are kept with its record (a body
//! never changes under a hash), so the cache is exactly as large as what is watched.

use std::collections::BTreeMap;
use std::sync::Arc;

use fleet_registry::{GlobalRecord, ScheduleRecord, keys};
use fleet_unit::{Requirements, TargetState, UnitHash, UnitName};
use tracing::warn;

/// One decoded schedule or global record.
#[derive(Debug, Clone)]
pub(crate) enum Entry {
    Readable {
        hash: UnitHash,
        state: TargetState,
        /// The body's requirements, once read (`None`: not read yet, or its body could not
        /// be used; read again at the next pass that needs it).
        req: Option<Arc<Requirements>>,
    },
    /// A record this agent cannot read (a newer format, damage): the unit it names is left
    /// as it is.
    Unreadable,
}

impl Entry {
    pub(crate) fn req(&self) -> Option<&Requirements> {
        match self {
            Entry::Readable { req: Some(r), .. } => Some(r),
            _ => None,
        }
    }
}

/// What one event changed in the mirror.
#[derive(Debug)]
pub(crate) enum Change {
    /// A schedule record of this machine, with the entry it replaced.
    Scheduled { name: UnitName, old: Option<Entry> },
    /// A global record or the metadata: every unit's eligibility may change.
    Global,
    /// A key the agent does not use (an invalid unit name, logged).
    Nothing,
}

/// Which part of the mirror a key belongs to.
enum Kind<'a> {
    Schedule(&'a str),
    Global(&'a str),
    Metadata(&'a str),
}

/// The decoded watched keys.
#[derive(Debug)]
pub(crate) struct Mirror {
    sched_dir: String,
    meta_dir: String,
    keys: keys::Keys,
    pub(crate) schedule: BTreeMap<UnitName, Entry>,
    pub(crate) globals: BTreeMap<UnitName, Entry>,
    /// API-set metadata (merged over the configured metadata by its user).
    pub(crate) metadata: BTreeMap<String, String>,
}

impl Mirror {
    pub(crate) fn new(keys: &keys::Keys, machine_id: &str) -> Mirror {
        Mirror {
            sched_dir: keys.schedule_dir(machine_id),
            meta_dir: keys.metadata_dir(machine_id),
            keys: keys.clone(),
            schedule: BTreeMap::new(),
            globals: BTreeMap::new(),
            metadata: BTreeMap::new(),
        }
    }

    fn kind<'a>(&self, key: &'a str) -> Option<Kind<'a>> {
        if let Some(name) = key.strip_prefix(&self.sched_dir) {
            Some(Kind::Schedule(name))
        } else if let Some(name) = self.keys.strip(keys::GLOBAL, key) {
            Some(Kind::Global(name))
        } else {
            key.strip_prefix(&self.meta_dir).map(Kind::Metadata)
        }
    }

    /// Replaces everything with a fresh listing, keeping the requirements already read of
    /// units whose body did not change.
    pub(crate) fn replace(&mut self, kvs: impl IntoIterator<Item = (String, Vec<u8>)>) {
        let old_schedule = std::mem::take(&mut self.schedule);
        let old_globals = std::mem::take(&mut self.globals);
        self.metadata.clear();
        for (k, v) in kvs {
            self.put(&k, &v);
        }
        for (new, old) in [
            (&mut self.schedule, old_schedule),
            (&mut self.globals, old_globals),
        ] {
            for (name, entry) in new.iter_mut() {
                if let Some(prev) = old.get(name) {
                    carry_requirements(prev, entry);
                }
            }
        }
    }

    /// Decodes one put.
    pub(crate) fn put(&mut self, key: &str, value: &[u8]) -> Change {
        let Some(kind) = self.kind(key) else {
            return Change::Nothing;
        };
        let (name, global) = match kind {
            Kind::Metadata(k) => {
                self.metadata
                    .insert(k.to_string(), String::from_utf8_lossy(value).into_owned());
                return Change::Global;
            }
            Kind::Schedule(name) => (name, false),
            Kind::Global(name) => (name, true),
        };
        let what = if global { "global" } else { "schedule" };
        let Ok(name) = UnitName::parse(name) else {
            warn!(key, "skipping {what} record with an invalid unit name");
            return Change::Nothing;
        };
        let decoded = if global {
            serde_json::from_slice::<GlobalRecord>(value).map(|r| (r.hash, r.desired_state))
        } else {
            serde_json::from_slice::<ScheduleRecord>(value).map(|r| (r.hash, r.desired_state))
        };
        let mut entry = match decoded {
            Ok((hash, state)) => Entry::Readable {
                hash,
                state,
                req: None,
            },
            Err(_) => {
                warn!(
                    key,
                    "{what} record not understood; leaving the unit as it is"
                );
                Entry::Unreadable
            }
        };
        let part = if global {
            &mut self.globals
        } else {
            &mut self.schedule
        };
        if let Some(prev) = part.get(&name) {
            carry_requirements(prev, &mut entry);
        }
        let old = part.insert(name.clone(), entry);
        if global {
            Change::Global
        } else {
            Change::Scheduled { name, old }
        }
    }

    /// Decodes one delete.
    pub(crate) fn delete(&mut self, key: &str) -> Change {
        match self.kind(key) {
            Some(Kind::Metadata(k)) => {
                self.metadata.remove(k);
                Change::Global
            }
            Some(Kind::Global(name)) => {
                self.globals.remove(name);
                Change::Global
            }
            Some(Kind::Schedule(name)) => match UnitName::parse(name) {
                Ok(name) => {
                    let old = self.schedule.remove(&name);
                    Change::Scheduled { name, old }
                }
                Err(_) => Change::Nothing,
            },
            None => Change::Nothing,
        }
    }

    /// The entry of `name` in the schedule (`global: false`) or among the global units.
    pub(crate) fn entry_mut(&mut self, global: bool, name: &str) -> Option<&mut Entry> {
        if global {
            self.globals.get_mut(name)
        } else {
            self.schedule.get_mut(name)
        }
    }
}

/// Keeps the requirements `prev` knew when `next` names the same body.
fn carry_requirements(prev: &Entry, next: &mut Entry) {
    if let (
        Entry::Readable {
            hash: h0,
            req: Some(r),
            ..
        },
        Entry::Readable {
            hash: h1,
            req: slot,
            ..
        },
    ) = (prev, next)
        && h0 == h1
    {
        *slot = Some(r.clone());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::desired::tests::{hash, json};

    fn readable_with_req(m: &Mirror, name: &str) -> bool {
        m.schedule.get(name).and_then(Entry::req).is_some()
    }

    #[test]
    fn requirements_stay_with_their_body_only() {
        let keys = keys::Keys::new("/p/");
        let mut m = Mirror::new(&keys, "m1");
        let key = keys.schedule("m1", "a.service");
        assert!(matches!(
            m.put(&key, &json(hash(1), "launched")),
            Change::Scheduled { old: None, .. }
        ));
        if let Some(Entry::Readable { req, .. }) = m.entry_mut(false, "a.service") {
            *req = Some(Arc::new(Requirements::default()));
        }
        // a new desired state, the same body: still known
        m.put(&key, &json(hash(1), "loaded"));
        assert!(readable_with_req(&m, "a.service"));
        // a listing with the same body keeps it too
        m.replace([(key.clone(), json(hash(1), "launched"))]);
        assert!(readable_with_req(&m, "a.service"));
        // another body: read again
        let change = m.put(&key, &json(hash(2), "launched"));
        assert!(matches!(
            change,
            Change::Scheduled {
                old: Some(Entry::Readable { .. }),
                ..
            }
        ));
        assert!(!readable_with_req(&m, "a.service"));
        // damage: unreadable, named
        m.put(&key, b"{");
        assert!(matches!(
            m.schedule.get("a.service"),
            Some(Entry::Unreadable)
        ));
        // another machine's schedule, invalid names: nothing
        assert!(matches!(
            m.put(
                &keys.schedule("m2", "b.service"),
                &json(hash(1), "launched")
            ),
            Change::Nothing
        ));
        assert!(matches!(
            m.put(&keys.schedule("m1", "bad name"), &json(hash(1), "launched")),
            Change::Nothing
        ));
        assert!(matches!(
            m.put(&keys.metadata("m1", "disk"), b"ssd"),
            Change::Global
        ));
        assert!(matches!(
            m.delete(&key),
            Change::Scheduled { old: Some(_), .. }
        ));
        assert!(m.schedule.is_empty());
    }
}
