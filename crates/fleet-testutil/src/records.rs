//! Record builders for tests: each returns a valid record with plain defaults, so a test
//! names only what it is about and changes the rest with struct update syntax, e.g.
//! `MachineRecord { public_ip: "10.0.0.9".into(), ..records::machine("m1") }`.

use std::collections::BTreeMap;
use std::fmt::Display;

use fleet_registry::{MachineRecord, ScheduleRecord, StateRecord, UnitRecord};
use fleet_unit::{TargetState, UnitFile, UnitHash, UnitName};

/// The body of a unit that sleeps `n` seconds: a different body (and hash) for every `n`.
pub fn body(n: u32) -> UnitFile {
    UnitFile::parse(&format!("[Service]\nExecStart=/bin/sleep {n}\n")).expect("unit file")
}

/// A unit name, checked.
pub fn name(s: &str) -> UnitName {
    UnitName::parse(s).expect("valid unit name")
}

/// A unit file, parsed.
pub fn file(text: &str) -> UnitFile {
    UnitFile::parse(text).expect("valid unit file")
}

/// `machines/<id>`: public IP 10.0.0.1, no metadata, agent version 1.0.0, token `token-<id>`.
pub fn machine(id: &str) -> MachineRecord {
    MachineRecord {
        version: 1,
        id: id.into(),
        public_ip: "10.0.0.1".into(),
        metadata: BTreeMap::new(),
        agent_version: "1.0.0".into(),
        token: format!("token-{id}"),
    }
}

/// `states/<unit>/<machine>`: loaded, active, running, launched, for the body `hash` (a
/// [`UnitHash`], or any text for a record that names a hash badly).
pub fn state(unit: &str, machine: &str, hash: impl Display) -> StateRecord {
    StateRecord {
        version: 1,
        name: unit.into(),
        machine_id: machine.into(),
        hash: hash.to_string(),
        load_state: "loaded".into(),
        active_state: "active".into(),
        sub_state: "running".into(),
        agent_state: TargetState::Launched,
        reason: None,
    }
}

/// `schedule/<machine>/<unit>`: run the body `hash` in state `desired`.
pub fn schedule(hash: UnitHash, desired: TargetState) -> ScheduleRecord {
    ScheduleRecord {
        version: 1,
        hash,
        desired_state: desired,
    }
}

/// `units/<name>`: a unit that is not global.
pub fn unit(name: &str, hash: UnitHash, desired: TargetState) -> UnitRecord {
    UnitRecord {
        version: 1,
        name: self::name(name),
        hash,
        desired_state: desired,
        global: false,
    }
}
