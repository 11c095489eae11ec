//! The key layout under the registry prefix. One function per kind of key, so that the
//! layout is written down in exactly one place.
//!
//! | key | value | written by | lifetime |
//! |---|---|---|---|
//! | `units/<name>` | [`crate::UnitRecord`] | clients | until destroyed |
//! | `bodies/<sha1>` | unit file text | clients, create-only | shared by units with equal bodies |
//! | `global/<name>` | [`crate::GlobalRecord`] | clients, with `units/<name>` | until destroyed |
//! | `schedule/<machine>/<name>` | [`crate::ScheduleRecord`] | engine (fenced) | until unscheduled |
//! | `placement/<name>` | machine ID | engine (fenced), with the schedule key | until unscheduled |
//! | `reasons/<name>` | why the unit cannot be placed | engine (fenced) | until placed |
//! | `machines/<id>` | [`crate::MachineRecord`] | agent | its lease (`agent_ttl`) |
//! | `metadata/<id>/<key>` | value | API (PATCH machines) | persistent |
//! | `states/<name>/<machine>` | [`crate::StateRecord`] | agent | its lease |
//! | `leader` | engine leader's machine ID | engine election | engine lease |

pub const UNITS: &str = "units/";
pub const BODIES: &str = "bodies/";
pub const GLOBAL: &str = "global/";
pub const SCHEDULE: &str = "schedule/";
pub const PLACEMENT: &str = "placement/";
pub const REASONS: &str = "reasons/";
pub const MACHINES: &str = "machines/";
pub const METADATA: &str = "metadata/";
pub const STATES: &str = "states/";
pub const LEADER: &str = "leader";

/// Key builder bound to one prefix (always ending in `/`).
#[derive(Debug, Clone)]
pub struct Keys {
    prefix: String,
}

impl Keys {
    pub fn new(prefix: &str) -> Keys {
        let mut prefix = prefix.to_string();
        if !prefix.ends_with('/') {
            prefix.push('/');
        }
        Keys { prefix }
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// `<prefix><kind>` — the range of one kind of key.
    pub fn dir(&self, kind: &str) -> String {
        format!("{}{kind}", self.prefix)
    }

    pub fn unit(&self, name: &str) -> String {
        format!("{}{UNITS}{name}", self.prefix)
    }
    pub fn body(&self, hash: &str) -> String {
        format!("{}{BODIES}{hash}", self.prefix)
    }
    pub fn global(&self, name: &str) -> String {
        format!("{}{GLOBAL}{name}", self.prefix)
    }
    pub fn schedule_dir(&self, machine: &str) -> String {
        format!("{}{SCHEDULE}{machine}/", self.prefix)
    }
    pub fn schedule(&self, machine: &str, name: &str) -> String {
        format!("{}{SCHEDULE}{machine}/{name}", self.prefix)
    }
    pub fn placement(&self, name: &str) -> String {
        format!("{}{PLACEMENT}{name}", self.prefix)
    }
    pub fn reason(&self, name: &str) -> String {
        format!("{}{REASONS}{name}", self.prefix)
    }
    pub fn machine(&self, id: &str) -> String {
        format!("{}{MACHINES}{id}", self.prefix)
    }
    pub fn metadata_dir(&self, id: &str) -> String {
        format!("{}{METADATA}{id}/", self.prefix)
    }
    pub fn metadata(&self, id: &str, key: &str) -> String {
        format!("{}{METADATA}{id}/{key}", self.prefix)
    }
    pub fn states_dir(&self, name: &str) -> String {
        format!("{}{STATES}{name}/", self.prefix)
    }
    pub fn state(&self, name: &str, machine: &str) -> String {
        format!("{}{STATES}{name}/{machine}", self.prefix)
    }
    pub fn leader(&self) -> String {
        format!("{}{LEADER}", self.prefix)
    }

    /// The part of `key` after `<prefix><kind>`, if `key` is of that kind.
    pub fn strip<'a>(&self, kind: &str, key: &'a str) -> Option<&'a str> {
        key.strip_prefix(self.prefix.as_str())?.strip_prefix(kind)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_under_the_prefix() {
        let k = Keys::new("/_coreos.com/fleet");
        assert_eq!(k.unit("a.service"), "/_coreos.com/fleet/units/a.service");
        assert_eq!(
            k.schedule("m1", "a.service"),
            "/_coreos.com/fleet/schedule/m1/a.service"
        );
        assert_eq!(
            k.state("a.service", "m1"),
            "/_coreos.com/fleet/states/a.service/m1"
        );
        assert_eq!(k.strip(UNITS, &k.unit("x.service")), Some("x.service"));
        assert_eq!(k.strip(UNITS, &k.body("abc")), None);
    }
}
