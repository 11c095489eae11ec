//! Adoption: a restarted fleetd takes over the units its predecessor left in the units
//! directory, keeping them as they are, instead of restarting them.

use std::collections::{BTreeMap, BTreeSet};
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
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        }
        let mut files = Vec::with_capacity(names.len());
        for name in names {
            let Ok(text) = self.systemd.read_unit(&name).await else {
                continue;
            };
            let Ok(file) = UnitFile::parse(&text) else {
                continue;
            };
            files.push((name, text, file));
        }
        let files = self.link_unlinked(files, &states).await;
        for (name, text, file) in files {
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

    /// Files systemd has never heard of (`not-found`): their fleetd was killed between
    /// writing a batch's files and linking them. Taken as they were, their starts would
    /// fail at every retry, since nothing would link them: they are linked now, their text
    /// written again, and one `daemon-reload` is owed before the first jobs (the state just
    /// read left systemd remembering them as not found). Their states stay as read: a unit
    /// can still run once its link is gone (and is then stopped if it is not wanted here).
    /// One that cannot be linked is not adopted unless it runs: the first reconcile writes
    /// it afresh if it is wanted here (a running one is adopted as before, so that it is
    /// stopped if it is not wanted).
    async fn link_unlinked(
        &mut self,
        files: Vec<(String, String, UnitFile)>,
        states: &BTreeMap<String, SystemdState>,
    ) -> Vec<(String, String, UnitFile)> {
        let unlinked: Vec<(String, String)> = files
            .iter()
            .filter(|(name, ..)| {
                states
                    .get(name)
                    .is_some_and(|s| s.load_state == "not-found")
            })
            .map(|(name, text, _)| (name.clone(), text.clone()))
            .collect();
        if unlinked.is_empty() {
            return files;
        }
        let names: Vec<&str> = unlinked.iter().map(|(n, _)| n.as_str()).collect();
        info!(units = %names.join(" "), "linking unit files a previous fleetd wrote but did not link");
        let results = self.systemd.write_units(&unlinked).await;
        let mut failed = BTreeSet::new();
        for ((name, _), r) in unlinked.iter().zip(results) {
            if let Err(e) = r {
                warn!(unit = %name, error = %e, "cannot link a unit file left by a previous fleetd");
                if !states.get(name).is_some_and(runs) {
                    failed.insert(name.clone());
                }
            }
        }
        self.reload_owed = true;
        files
            .into_iter()
            .filter(|(name, ..)| !failed.contains(name))
            .collect()
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

/// Whether systemd runs a unit in state `s`: such a unit is adopted as launched.
fn runs(s: &SystemdState) -> bool {
    matches!(
        s.active_state.as_str(),
        "active" | "activating" | "reloading"
    )
}
