//! Adoption: a restarted fleetd takes over the units its predecessor left in the units
//! directory, keeping them as they are, instead of restarting them.

use std::collections::BTreeMap;
use std::time::Duration;

use fleet_systemd::SystemdState;
use fleet_unit::{TargetState, UnitFile};
use tracing::{info, warn};

use crate::agent::Agent;
use crate::desired::Desired;
use crate::plan::Current;

impl Agent {
    /// Takes over the units a previous fleetd left in the units directory, keeping them as
    /// they are; the first reconcile then removes only those no longer wanted here.
    pub(crate) async fn adopt(&mut self) {
        let names = match self.systemd.unit_file_names().await {
            Ok(n) => n,
            Err(e) => {
                warn!(error = %e, "cannot list the units directory");
                return;
            }
        };
        if names.is_empty() {
            return;
        }
        let mut states = BTreeMap::new();
        for attempt in 1..=3 {
            match self.systemd.states(&names).await {
                Ok(s) => {
                    states = s;
                    break;
                }
                Err(e) => {
                    warn!(error = %e, attempt, "cannot read the states of units to adopt");
                    if attempt < 3 {
                        tokio::time::sleep(Duration::from_secs(1)).await;
                    }
                }
            }
        }
        for name in names {
            let Ok(text) = self.systemd.read_unit(&name).await else {
                continue;
            };
            let Ok(file) = UnitFile::parse(&text) else {
                continue;
            };
            let state = if states.get(&name).is_some_and(runs) {
                TargetState::Launched
            } else {
                TargetState::Loaded
            };
            info!(unit = %name, ?state, "adopting unit left by a previous fleetd");
            self.current.insert(
                name.clone(),
                Current {
                    hash: file.hash(),
                    state,
                },
            );
            self.adopted.insert(name.clone(), text.clone());
            self.watching.insert(name.clone());
            if let Some(s) = states.get(&name) {
                self.systemd_states.insert(name, s.clone());
            }
        }
    }

    /// For units taken over at start: when the file on disk says exactly what the registry's
    /// body says, the unit is the one wanted, whatever its hash computed from disk (a file
    /// written from API options may hash differently once re-read).
    pub(crate) async fn resolve_adopted(&mut self, desired: &BTreeMap<String, Desired>) {
        if self.adopted.is_empty() {
            return;
        }
        for (name, d) in desired {
            let Some(text) = self.adopted.get(name.as_str()) else {
                continue;
            };
            let Some(cur) = self.current.get(name.as_str()).copied() else {
                continue;
            };
            if cur.hash == d.hash {
                continue;
            }
            match self.store.body(&d.hash).await {
                Ok(body) if body.serialize() == *text => {
                    self.current.insert(
                        name.to_string(),
                        Current {
                            hash: d.hash,
                            ..cur
                        },
                    );
                }
                Ok(_) => {}
                // not now: keep the unit and compare at the next reconcile
                Err(_) => return,
            }
        }
        self.adopted.clear();
    }
}

/// Whether systemd runs a unit in state `s`: such a unit is adopted as launched. (One whose
/// link is gone, `not-found`, may still run; it is stopped if it is not wanted here.)
fn runs(s: &SystemdState) -> bool {
    matches!(
        s.active_state.as_str(),
        "active" | "activating" | "reloading"
    )
}
