//! The values stored in etcd (records, JSON with a `version` field) and the views clients get.

use std::collections::BTreeMap;
use std::sync::Arc;

use fleet_unit::{Requirements, TargetState, UnitFile, UnitHash, UnitName};
use serde::{Deserialize, Serialize};

/// Format version of every record this code writes. Readers accept this version and skip
/// (with a log line) records of a version they do not know.
pub const RECORD_VERSION: u32 = 1;

fn v1() -> u32 {
    RECORD_VERSION
}

/// `units/<name>`: what the user asked for.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct UnitRecord {
    #[serde(default = "v1")]
    pub version: u32,
    pub name: UnitName,
    pub hash: UnitHash,
    pub desired_state: TargetState,
    #[serde(default)]
    pub global: bool,
}

impl UnitRecord {
    /// The record of unit `name` with the body `file`: global when its `[X-Fleet]` says so
    /// (a unit whose requirements do not parse is not).
    pub(crate) fn new(name: &UnitName, file: &UnitFile, desired: TargetState) -> UnitRecord {
        UnitRecord {
            version: RECORD_VERSION,
            name: name.clone(),
            hash: file.hash(),
            desired_state: desired,
            global: Requirements::is_global(name, file),
        }
    }

    /// What goes to `global/<name>` for a global unit; nothing for the others.
    pub(crate) fn global_record(&self) -> Option<GlobalRecord> {
        self.global.then_some(GlobalRecord {
            version: RECORD_VERSION,
            hash: self.hash,
            desired_state: self.desired_state,
        })
    }
}

/// `global/<name>`: the part of a global unit every agent needs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct GlobalRecord {
    #[serde(default = "v1")]
    pub version: u32,
    pub hash: UnitHash,
    pub desired_state: TargetState,
}

/// `schedule/<machine>/<name>`: what one machine must run, written by the engine.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ScheduleRecord {
    #[serde(default = "v1")]
    pub version: u32,
    pub hash: UnitHash,
    pub desired_state: TargetState,
}

/// `machines/<id>`: a live machine, kept under its agent's lease.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MachineRecord {
    #[serde(default = "v1")]
    pub version: u32,
    pub id: String,
    #[serde(default)]
    pub public_ip: String,
    #[serde(default)]
    pub metadata: BTreeMap<String, String>,
    #[serde(default)]
    pub agent_version: String,
    /// Random per fleetd installation on a node (kept in /run): tells a restarted fleetd
    /// its own stale registration apart from a second fleetd with the same machine ID.
    #[serde(default)]
    pub token: String,
}

/// `states/<name>/<machine>`: what systemd on that machine says about the unit.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct StateRecord {
    #[serde(default = "v1")]
    pub version: u32,
    pub name: String,
    pub machine_id: String,
    pub hash: String,
    pub load_state: String,
    pub active_state: String,
    pub sub_state: String,
    /// What the agent has done with the unit: `loaded` or `launched`.
    pub agent_state: TargetState,
    /// Why the agent cannot bring the unit to its desired state (a unit file it cannot
    /// write, a stop that failed), while it keeps trying. Not in fleet v1.0's records, and
    /// left out when there is none, so a record without a problem reads as fleet's did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// A unit as clients see it.
#[derive(Debug, Clone, PartialEq)]
pub struct UnitView {
    pub name: UnitName,
    /// Shared: a body is immutable (named by its hash) and many units have the same one, so
    /// views, the registry's body cache and listings' chunks hold it without copying.
    pub file: Arc<UnitFile>,
    pub hash: UnitHash,
    pub desired: TargetState,
    pub global: bool,
    /// Machine the engine placed it on (never set for global units).
    pub machine_id: Option<String>,
    /// What the unit's machine reports having done (fleet's `currentState`).
    pub current: TargetState,
    /// Why the engine cannot place the unit now, if it cannot; else why its machine cannot
    /// bring it to its desired state, if that machine says so.
    pub reason: Option<String>,
}

/// A machine as clients see it: its own record with API-set metadata merged over it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MachineView {
    pub id: String,
    pub public_ip: String,
    pub metadata: BTreeMap<String, String>,
    pub version: String,
}

/// fleet's current state of a unit: `inactive` unless placed and reported by its machine
/// for the unit's present body (`hash`), then whatever that machine's agent says it did. A
/// report about another body (the old version of a replaced unit) says nothing about this one.
pub fn current_state(
    machine: Option<&str>,
    state: Option<&StateRecord>,
    hash: &UnitHash,
) -> TargetState {
    match (machine, state) {
        (Some(m), Some(s)) if s.machine_id == m && reports_hash(s, hash) => s.agent_state,
        _ => TargetState::Inactive,
    }
}

/// Whether `state` is a report about the body `hash`.
pub fn reports_hash(state: &StateRecord, hash: &UnitHash) -> bool {
    state.hash.parse::<UnitHash>().is_ok_and(|h| h == *hash)
}

/// Decodes a JSON record, naming the key when it is malformed.
pub(crate) fn decode<T: for<'de> Deserialize<'de>>(key: &str, value: &[u8]) -> crate::Result<T> {
    serde_json::from_slice(value).map_err(|e| crate::RegistryError::BadValue {
        key: key.to_string(),
        reason: e.to_string(),
    })
}

pub(crate) fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    // Serializing these plain structs cannot fail (string keys, no custom serializers).
    serde_json::to_vec(value).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(machine: &str, hash: &UnitHash, agent: TargetState) -> StateRecord {
        StateRecord {
            version: 1,
            name: "a.service".into(),
            machine_id: machine.into(),
            hash: hash.to_string(),
            load_state: "loaded".into(),
            active_state: "active".into(),
            sub_state: "running".into(),
            agent_state: agent,
            reason: None,
        }
    }

    #[test]
    fn current_state_needs_the_units_body_and_machine() {
        let (old, new) = (UnitHash::of(b"old"), UnitHash::of(b"new"));
        let launched = state("m1", &new, TargetState::Launched);
        assert_eq!(
            current_state(Some("m1"), Some(&launched), &new),
            TargetState::Launched
        );
        // the old version's report (a replaced unit not yet reloaded) is not the unit's state
        let stale = state("m1", &old, TargetState::Launched);
        assert_eq!(
            current_state(Some("m1"), Some(&stale), &new),
            TargetState::Inactive
        );
        assert_eq!(
            current_state(Some("m2"), Some(&launched), &new),
            TargetState::Inactive
        );
        assert_eq!(
            current_state(None, Some(&launched), &new),
            TargetState::Inactive
        );
        let mut garbled = launched.clone();
        garbled.hash = "nonsense".into();
        assert_eq!(
            current_state(Some("m1"), Some(&garbled), &new),
            TargetState::Inactive
        );
        assert!(reports_hash(&launched, &new));
        assert!(!reports_hash(&stale, &new));
    }
}
