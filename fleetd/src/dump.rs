//! SIGUSR1: fleetd writes its agent's state to stdout as one line of JSON, in the shape
//! fleet v1.0 printed (`Agent`, `UnitStatePublisher`, `UnitStateGenerator`).
//!
//! fleet marshalled its agent's in-memory caches. Ours are read from the registry, where the
//! agent keeps them: what it did with each unit (its `agentState`) and the unit states it
//! published, both for this machine only. The agent publishes at once, so `ToPublish` is
//! always empty.

use std::collections::BTreeMap;

use fleet_registry::{Registry, StateRecord};
use serde::Serialize;

#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
struct Dump {
    agent: AgentDump,
    unit_state_publisher: PublisherDump,
    unit_state_generator: GeneratorDump,
}

#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
struct AgentDump {
    cache: AgentCache,
}

#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
struct AgentCache {
    /// Unit name to what the agent brought it to: `inactive`, `loaded` or `launched`.
    target_states: BTreeMap<String, String>,
}

#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
struct PublisherDump {
    cache: BTreeMap<String, UnitState>,
    to_publish: BTreeMap<String, UnitState>,
}

/// fleet's `unit.UnitState`, field for field.
#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
struct UnitState {
    load_state: String,
    active_state: String,
    sub_state: String,
    #[serde(rename = "MachineID")]
    machine_id: String,
    unit_hash: String,
    unit_name: String,
}

#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
struct GeneratorDump {
    /// The units whose systemd state the agent follows.
    subscribed: Vec<String>,
}

/// The dump of `machine_id`'s agent from the registry's unit states (all machines'; only
/// this machine's are used).
pub fn render(machine_id: &str, states: &[StateRecord]) -> String {
    let ours: Vec<&StateRecord> = states
        .iter()
        .filter(|s| s.machine_id == machine_id)
        .collect();
    let dump = Dump {
        agent: AgentDump {
            cache: AgentCache {
                target_states: ours
                    .iter()
                    .map(|s| (s.name.clone(), s.agent_state.as_str().to_string()))
                    .collect(),
            },
        },
        unit_state_publisher: PublisherDump {
            cache: ours
                .iter()
                .map(|s| {
                    let state = UnitState {
                        load_state: s.load_state.clone(),
                        active_state: s.active_state.clone(),
                        sub_state: s.sub_state.clone(),
                        machine_id: s.machine_id.clone(),
                        unit_hash: s.hash.clone(),
                        unit_name: s.name.clone(),
                    };
                    (s.name.clone(), state)
                })
                .collect(),
            to_publish: BTreeMap::new(),
        },
        unit_state_generator: GeneratorDump {
            subscribed: ours
                .iter()
                .map(|s| s.name.clone())
                .collect::<std::collections::BTreeSet<_>>()
                .into_iter()
                .collect(),
        },
    };
    // plain strings and maps of them: serializing cannot fail
    serde_json::to_string(&dump).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"))
}

/// Reads the registry and renders the dump.
pub async fn collect(registry: &dyn Registry, machine_id: &str) -> anyhow::Result<String> {
    let states = registry.unit_states().await?;
    Ok(render(machine_id, &states))
}

#[cfg(test)]
mod tests {
    use super::*;
    use fleet_unit::TargetState;

    fn state(name: &str, machine: &str, agent: TargetState, sub: &str) -> StateRecord {
        StateRecord {
            version: 1,
            name: name.into(),
            machine_id: machine.into(),
            hash: format!("hash-of-{name}"),
            load_state: "loaded".into(),
            active_state: if sub == "running" {
                "active"
            } else {
                "inactive"
            }
            .into(),
            sub_state: sub.into(),
            agent_state: agent,
            reason: None,
        }
    }

    /// Before, SIGUSR1 did nothing (it killed fleetd: no handler). fleet printed its agent's
    /// state in this shape.
    #[test]
    fn fleets_shape_for_this_machine_only() {
        let states = [
            state("web.service", "m1", TargetState::Launched, "running"),
            state("db.service", "m2", TargetState::Launched, "running"),
            state("batch.service", "m1", TargetState::Loaded, "dead"),
        ];
        let got: serde_json::Value = serde_json::from_str(&render("m1", &states)).expect("JSON");
        let want = serde_json::json!({
            "Agent": {"Cache": {"TargetStates": {
                "batch.service": "loaded",
                "web.service": "launched",
            }}},
            "UnitStatePublisher": {
                "Cache": {
                    "batch.service": {
                        "LoadState": "loaded", "ActiveState": "inactive", "SubState": "dead",
                        "MachineID": "m1", "UnitHash": "hash-of-batch.service",
                        "UnitName": "batch.service",
                    },
                    "web.service": {
                        "LoadState": "loaded", "ActiveState": "active", "SubState": "running",
                        "MachineID": "m1", "UnitHash": "hash-of-web.service",
                        "UnitName": "web.service",
                    },
                },
                "ToPublish": {},
            },
            "UnitStateGenerator": {"Subscribed": ["batch.service", "web.service"]},
        });
        assert_eq!(got, want);
        // one line, fields in fleet's order
        let text = render("m1", &states);
        assert!(!text.contains('\n'));
        assert!(
            text.starts_with(r#"{"Agent":{"Cache":{"TargetStates":{"#),
            "{text}"
        );
        assert_eq!(
            render("m3", &states),
            r#"{"Agent":{"Cache":{"TargetStates":{}}},"UnitStatePublisher":{"Cache":{},"ToPublish":{}},"UnitStateGenerator":{"Subscribed":[]}}"#
        );
    }
}
