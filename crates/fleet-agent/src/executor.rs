//! Carries out a [`Plan`]: unit files, one `daemon-reload`, systemd jobs, then the states of
//! what it touched. The decisions are `plan.rs`'s; this module only does them, in order,
//! many at once where the order does not matter.

use std::collections::BTreeMap;

use fleet_unit::{TargetState, UnitHash, UnitName};
use futures_util::StreamExt;
use futures_util::stream;
use tracing::{debug, info, warn};

use crate::agent::{Agent, JOBS_IN_FLIGHT};
use crate::desired::Desired;
use crate::plan::{Current, Plan, Reload, plan, reload_rule};

impl Agent {
    /// Runs the tasks that take systemd from `current` to `desired`. Returns false when it
    /// could not finish (a body unreadable, a task failed) and should be tried again.
    pub(crate) async fn converge(&mut self, desired: BTreeMap<UnitName, Desired>) -> bool {
        let desired: BTreeMap<String, Desired> = desired
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect();
        let plan = plan(&self.current, &desired);
        self.execute(plan, &desired).await
    }

    async fn execute(&mut self, plan: Plan, desired: &BTreeMap<String, Desired>) -> bool {
        let mut complete = true;
        let mut touched: Vec<String> = Vec::new();
        // 1. units no longer wanted here, or whose body changed: stop and remove
        for (name, launched) in &plan.unload {
            if *launched {
                let r = self.systemd.stop(name).await;
                self.task("stop", name, r);
            }
        }
        if !plan.unload.is_empty() {
            // one DisableUnitFiles for the whole batch (systemd pays ~30 ms per call)
            let names: Vec<String> = plan.unload.iter().map(|(n, _)| n.clone()).collect();
            let r = self.systemd.remove_units(&names).await;
            self.task("unload", &names.join(" "), r);
        }
        for (name, _) in &plan.unload {
            self.current.remove(name);
            self.watching.remove(name);
            self.systemd_states.remove(name);
            self.publisher.withdraw(name, &self.lease).await;
        }
        // 2. unit files to write: bodies read together (in as few requests as the store
        // can), then written
        let hashes: Vec<UnitHash> = plan.load.iter().map(|(_, h)| *h).collect();
        let bodies = if hashes.is_empty() {
            Ok(Default::default())
        } else {
            self.store.bodies(&hashes).await
        };
        let mut written: Vec<(String, bool)> = Vec::new();
        let mut files = Vec::with_capacity(plan.load.len());
        for (name, hash) in &plan.load {
            let file = match &bodies {
                Ok(b) => match b.get(hash) {
                    Some(f) => f.clone(),
                    None => {
                        warn!(unit = %name, %hash, "unit body missing or unreadable; will retry");
                        complete = false;
                        continue;
                    }
                },
                Err(e) => {
                    warn!(unit = %name, error = %e, "cannot read unit body; will retry");
                    complete = false;
                    continue;
                }
            };
            files.push((name, hash, file));
        }
        // written and linked together (one LinkUnitFiles for the batch)
        let contents: Vec<(String, String)> = files
            .iter()
            .map(|(name, _, file)| ((*name).clone(), file.serialize()))
            .collect();
        let results = self.systemd.write_units(&contents).await;
        for ((name, hash, file), r) in files.into_iter().zip(results) {
            if self.task("load", name, r) {
                self.watching.insert(name.clone());
                self.current.insert(
                    name.clone(),
                    Current {
                        hash: *hash,
                        state: TargetState::Loaded,
                    },
                );
                written.push((name.clone(), file.has_section("Install")));
                touched.push(name.clone());
            } else {
                complete = false;
            }
        }
        let launched = |n: &str| {
            desired
                .get(n)
                .is_some_and(|d| d.state == TargetState::Launched)
        };
        let reload = reload_rule(plan.unload.len(), &written, launched, self.reload_owed);
        if reload == Reload::Now && !self.reload().await {
            complete = false;
        }
        for (name, install) in &written {
            if *install {
                let r = self.systemd.enable(name).await;
                self.task("enable", name, r);
            }
        }
        // 3. start / stop to the desired state: the jobs of a batch are queued concurrently
        // (systemd runs them as they come; only the D-Bus round trips overlap); a unit whose
        // file could not be written has no job
        let moves: Vec<(String, TargetState, Current)> = plan
            .moves
            .into_iter()
            .filter_map(|m| {
                let cur = self.current.get(&m.unit).copied()?;
                Some((m.unit, m.to, cur))
            })
            .collect();
        let jobs: Vec<_> = moves
            .iter()
            .map(|(name, to, _)| {
                if *to == TargetState::Launched {
                    self.systemd.start(name)
                } else {
                    self.systemd.stop(name)
                }
            })
            .collect();
        let mut results: Vec<Result<(), fleet_systemd::Error>> =
            stream::iter(jobs).buffered(JOBS_IN_FLIGHT).collect().await;
        if reload == Reload::Skipped && results.iter().any(Result::is_err) && self.reload().await {
            let again: Vec<usize> = (0..moves.len())
                .filter(|&i| results[i].is_err() && moves[i].1 == TargetState::Launched)
                .collect();
            let retries: Vec<_> = again
                .iter()
                .map(|&i| {
                    debug!(unit = %moves[i].0, "start failed without a daemon-reload; trying again after one");
                    self.systemd.start(&moves[i].0)
                })
                .collect();
            let retried: Vec<_> = stream::iter(retries)
                .buffered(JOBS_IN_FLIGHT)
                .collect()
                .await;
            for (i, r) in again.into_iter().zip(retried) {
                results[i] = r;
            }
        }
        for ((name, to, cur), result) in moves.into_iter().zip(results) {
            let what = if to == TargetState::Launched {
                "start"
            } else {
                "stop"
            };
            if self.task(what, &name, result) {
                self.current
                    .insert(name.clone(), Current { state: to, ..cur });
                touched.push(name);
            } else {
                complete = false;
            }
        }
        if !touched.is_empty() {
            touched.sort();
            touched.dedup();
            self.refresh_states(Some(&touched)).await;
        }
        complete
    }

    /// One daemon-reload; false (logged, and owed to the next converge) when it failed.
    pub(crate) async fn reload(&mut self) -> bool {
        let r = self.systemd.reload().await;
        match r {
            Ok(()) => {
                self.metrics.agent_task("reload");
                self.reload_owed = false;
                true
            }
            Err(e) => {
                self.metrics.agent_task("reload");
                self.metrics.agent_task_failure("reload");
                warn!(error = %e, "daemon-reload failed");
                self.reload_owed = true;
                false
            }
        }
    }

    /// Logs a task's outcome and counts it by type; true when it succeeded.
    pub(crate) fn task(
        &self,
        what: &str,
        unit: &str,
        result: Result<(), fleet_systemd::Error>,
    ) -> bool {
        self.metrics.agent_task(what);
        match result {
            Ok(()) => {
                info!(unit, task = what, "agent task done");
                true
            }
            Err(e) => {
                self.metrics.agent_task_failure(what);
                warn!(unit, task = what, error = %e, "agent task failed");
                false
            }
        }
    }
}
