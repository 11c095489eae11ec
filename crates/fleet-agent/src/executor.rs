//! Carries out a [`Plan`]: unit files, one `daemon-reload`, systemd jobs, then the states of
//! what it touched. The decisions are `plan.rs`'s; this module only does them, in order,
//! many at once where the order does not matter.

use std::collections::{BTreeMap, HashMap, HashSet};

use fleet_unit::{TargetState, UnitFile, UnitHash, UnitName};
use futures_util::StreamExt;
use futures_util::stream;
use tokio::time::Instant;
use tracing::{debug, info, warn};

use crate::agent::{Agent, JOBS_IN_FLIGHT, jobs_mut};
use crate::desired::Desired;
use crate::faults::Fault;
use crate::plan::{Current, Plan, Reload, plan, reload_rule};

impl Agent {
    /// Runs the tasks that take systemd from `current` to `desired`. Returns false when it
    /// could not finish (a body unreadable, a task failed) and should be tried again.
    pub(crate) async fn converge(&mut self, desired: BTreeMap<UnitName, Desired>) -> bool {
        let mut desired: BTreeMap<String, Desired> = desired
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect();
        let now = Instant::now();
        let failing: Vec<String> = self.faults.names().cloned().collect();
        for name in failing {
            if !desired.contains_key(&name) && !self.current.contains_key(&name) {
                // neither wanted nor here any more (its file was never written)
                self.faults.clear(&name);
                self.publisher.withdraw(&name, &self.lease).await;
                continue;
            }
            let same_body = |f: &Fault| desired.get(&name).is_none_or(|d| d.hash == f.hash);
            let hold =
                self.faults.waiting(&name, now) && self.faults.get(&name).is_some_and(same_body);
            if hold {
                // not yet tried again: stays exactly as it is (a new body is tried at once)
                match self.current.get(&name) {
                    Some(c) => {
                        desired.insert(
                            name,
                            Desired {
                                hash: c.hash,
                                state: c.state,
                            },
                        );
                    }
                    None => {
                        desired.remove(&name);
                    }
                }
            }
        }
        // a unit whose start or stop systemd has not answered yet stays as it is: it gets no
        // second job, and its file stays, until the answer is in; then it is reconciled again
        for name in &self.pending {
            if let Some(c) = self.current.get(name) {
                let held = Desired {
                    hash: c.hash,
                    state: c.state,
                };
                if desired.get(name) != Some(&held) {
                    desired.insert(name.clone(), held);
                    self.held = true;
                }
            }
        }
        let plan = plan(&self.current, &desired);
        self.execute(plan, &desired).await
    }

    async fn execute(&mut self, plan: Plan, desired: &BTreeMap<String, Desired>) -> bool {
        let begun = Instant::now();
        let (n_unload, n_load, n_moves) = (plan.unload.len(), plan.load.len(), plan.moves.len());
        let mut outcome = Outcome {
            complete: true,
            ..Outcome::default()
        };
        let mut touched: Vec<String> = Vec::new();
        // 1. units no longer wanted here, or whose body changed: stop and remove. One whose
        // stop or removal fails stays, file and all (fleet forgot it, still running): it is
        // retried later, and its state says why it is still there.
        let mut kept: HashSet<String> = HashSet::new();
        for (name, launched) in &plan.unload {
            if *launched {
                let r = self.systemd.stop(name).await;
                if let Err(reason) = self.attempt("stop", name, r) {
                    outcome.failed(name, fault_hash(desired, &self.current, name), reason);
                    kept.insert(name.clone());
                }
            }
        }
        let removing: Vec<String> = plan
            .unload
            .iter()
            .map(|(n, _)| n.clone())
            .filter(|n| !kept.contains(n))
            .collect();
        if !removing.is_empty() {
            // one DisableUnitFiles for the whole batch (systemd pays ~30 ms per call)
            let r = self.systemd.remove_units(&removing).await;
            let mut failures = Vec::new();
            if let Err(e) = r {
                // which units failed is unknown: each is removed on its own, and only those
                // whose own removal fails are kept
                warn!(error = %e, units = %removing.join(" "), "removing unit files failed; removing them one by one");
                for name in &removing {
                    let r = self.systemd.remove_unit(name).await;
                    if let Err(reason) = self.attempt("unload", name, r) {
                        failures.push((name.clone(), reason));
                    }
                }
            } else {
                self.attempt("unload", &removing.join(" "), Ok(()))
                    .unwrap_or_default();
            }
            for (name, reason) in failures {
                let hash = fault_hash(desired, &self.current, &name);
                if let Some(c) = self.current.get_mut(&name) {
                    // stopped, not yet removed
                    c.state = TargetState::Loaded;
                    outcome.failed(&name, hash, reason);
                }
                kept.insert(name);
            }
        }
        for (name, _) in &plan.unload {
            if kept.contains(name) {
                touched.push(name.clone());
                continue;
            }
            self.current.remove(name);
            self.watching.remove(name);
            self.systemd_states.remove(name);
            self.faults.clear(name);
            self.publisher.withdraw(name, &self.lease).await;
        }
        // 2. unit files to write (not over a unit that is still there with another body):
        // bodies read together, in as few requests as the store can, then written and
        // linked together (one LinkUnitFiles for the batch)
        let load: Vec<(String, UnitHash)> = plan
            .load
            .into_iter()
            .filter(|(n, _)| !kept.contains(n))
            .collect();
        let t_unload = begun.elapsed();
        let hashes: Vec<UnitHash> = load.iter().map(|(_, h)| *h).collect();
        let (bodies, refused) = self.read_bodies(&hashes).await;
        let mut written: Vec<(String, bool)> = Vec::new();
        let mut files = Vec::with_capacity(load.len());
        for (name, hash) in &load {
            if let Some(e) = refused.get(hash) {
                warn!(unit = %name, error = %e, "cannot read unit body; will retry");
                outcome.failed(name, Some(*hash), format!("cannot read unit body: {e}"));
                continue;
            }
            let Some(file) = bodies.get(hash) else {
                warn!(unit = %name, %hash, "unit body missing or unreadable; will retry");
                outcome.complete = false;
                continue;
            };
            files.push((name, hash, file));
        }
        let contents: Vec<(String, String)> = files
            .iter()
            .map(|(name, _, file)| ((*name).clone(), file.serialize()))
            .collect();
        let t_bodies = begun.elapsed();
        let results = self.systemd.write_units(&contents).await;
        let t_written = begun.elapsed();
        for ((name, hash, file), r) in files.into_iter().zip(results) {
            match self.attempt("load", name, r) {
                Ok(()) => {
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
                    outcome.succeeded(name);
                }
                Err(reason) => outcome.failed(name, Some(*hash), reason),
            }
        }
        let launched = |n: &str| {
            desired
                .get(n)
                .is_some_and(|d| d.state == TargetState::Launched)
        };
        let reload = reload_rule(plan.unload.len(), &written, launched, self.reload_owed);
        if reload == Reload::Now && !self.reload().await {
            outcome.complete = false;
        }
        for (name, install) in &written {
            if *install {
                let r = self.systemd.enable(name).await;
                self.task("enable", name, r);
            }
        }
        // 3. start / stop to the desired state: the jobs of a batch are queued concurrently
        // (systemd runs them as they come; only the D-Bus round trips overlap); a unit whose
        // file could not be written, or that is still there with its old body, has no job
        let moves: Vec<(String, TargetState, Current)> = plan
            .moves
            .into_iter()
            .filter(|m| !kept.contains(&m.unit) && !outcome.failed.contains_key(&m.unit))
            .filter_map(|m| {
                let cur = self.current.get(&m.unit).copied()?;
                Some((m.unit, m.to, cur))
            })
            .collect();
        // the fence may have gone up since the reconcile read it (body reads and D-Bus calls
        // took time): no at-most-once unit starts while it is up
        let moves = if self.fence.is_fenced() {
            let guarded = self.fence.units();
            moves
                .into_iter()
                .filter(|(name, to, _)| *to != TargetState::Launched || !guarded.contains(name))
                .collect()
        } else {
            moves
        };
        let t_reloaded = begun.elapsed();
        // queued, not awaited: the loop goes on (the next batch's files, signals, states)
        // while systemd answers; a unit with a job in flight is held as it is by every
        // converge until its answer is in (`jobs_done`). Each call is a task of its own, so
        // that it finishes (and gives its place among the manager's calls in flight back)
        // while the loop is busy elsewhere.
        let skipped = reload == Reload::Skipped;
        for (name, to, cur) in moves {
            let systemd = self.systemd.clone();
            self.pending.insert(name.clone());
            let unit = name.clone();
            let call = tokio::spawn(async move {
                if to == TargetState::Launched {
                    systemd.start(&unit).await
                } else {
                    systemd.stop(&unit).await
                }
            });
            jobs_mut(&mut self.jobs).push(Box::pin(async move {
                let result = call.await.unwrap_or_else(|e| {
                    // the task died: said as this unit's failure, retried like one
                    Err(fleet_systemd::Error::Io {
                        action: "queueing a systemd job for",
                        path: name.clone().into(),
                        source: std::io::Error::other(e),
                    })
                });
                JobDone {
                    name,
                    to,
                    cur,
                    result,
                    reload_skipped: skipped,
                }
            }));
        }
        let t_jobs = begun.elapsed();
        // 4. what failed waits for its retry and says why; what succeeded is fine again
        let now = Instant::now();
        for (name, (hash, reason)) in &outcome.failed {
            let Some(hash) = hash.or_else(|| self.current.get(name).map(|c| c.hash)) else {
                continue;
            };
            if self.faults.record(name, hash, reason.clone(), now) {
                warn!(unit = %name, %reason, "unit left as it is; will retry");
                self.publisher.forget(name);
            }
            touched.push(name.clone());
        }
        for name in &outcome.ok {
            // a unit whose job is in flight recovers (or not) when its answer comes
            if self.pending.contains(name) {
                continue;
            }
            if !outcome.failed.contains_key(name) && self.faults.clear(name) {
                info!(unit = %name, "unit recovered from its failure");
                self.publisher.forget(name);
                touched.push(name.clone());
            }
        }
        // the states of units with a job in flight are read once it is answered
        touched.retain(|n| !self.pending.contains(n));
        if !touched.is_empty() {
            touched.sort();
            touched.dedup();
            self.refresh_states(Some(&touched)).await;
        }
        let ms = |d: std::time::Duration| d.as_secs_f64() * 1e3;
        if n_unload + n_load + n_moves == 0 {
            return outcome.complete && outcome.failed.is_empty();
        }
        info!(
            prep_ms = ms(self.batch_prep),
            unload = n_unload,
            load = n_load,
            moves = n_moves,
            unload_ms = ms(t_unload),
            bodies_ms = ms(t_bodies - t_unload),
            write_ms = ms(t_written - t_bodies),
            reload_ms = ms(t_reloaded - t_written),
            queue_ms = ms(t_jobs - t_reloaded),
            in_flight = self.pending.len(),
            states_ms = ms(begun.elapsed() - t_jobs),
            "agent batch"
        );
        outcome.complete && outcome.failed.is_empty()
    }

    /// Takes in the answers to queued starts and stops: the unit's new state, or its failure
    /// (held until its retry, with why); a start that failed without a daemon-reload is tried
    /// once more after one. Returns whether a converge held a unit meanwhile, so a reconcile
    /// is due.
    pub(crate) async fn jobs_done(&mut self, mut done: Vec<JobDone>) -> bool {
        for d in &done {
            self.pending.remove(&d.name);
        }
        let retry =
            |d: &JobDone| d.reload_skipped && d.to == TargetState::Launched && d.result.is_err();
        if done.iter().any(retry) && self.reload().await {
            let again: Vec<usize> = (0..done.len()).filter(|&i| retry(&done[i])).collect();
            let retries: Vec<_> = again
                .iter()
                .map(|&i| {
                    debug!(unit = %done[i].name, "start failed without a daemon-reload; trying again after one");
                    self.systemd.start(&done[i].name)
                })
                .collect();
            let retried: Vec<_> = stream::iter(retries)
                .buffered(JOBS_IN_FLIGHT)
                .collect()
                .await;
            for (i, r) in again.into_iter().zip(retried) {
                done[i].result = r;
            }
        }
        let now = Instant::now();
        let guarded = self.fence.units();
        let mut started_guarded = false;
        let mut touched = Vec::with_capacity(done.len());
        for d in done {
            let what = if d.to == TargetState::Launched {
                "start"
            } else {
                "stop"
            };
            match self.attempt(what, &d.name, d.result) {
                Ok(()) => {
                    if self
                        .current
                        .get(&d.name)
                        .is_some_and(|c| c.hash == d.cur.hash)
                    {
                        self.current.insert(
                            d.name.clone(),
                            Current {
                                state: d.to,
                                ..d.cur
                            },
                        );
                    }
                    started_guarded |= d.to == TargetState::Launched && guarded.contains(&d.name);
                    if self.faults.clear(&d.name) {
                        info!(unit = %d.name, "unit recovered from its failure");
                        self.publisher.forget(&d.name);
                    }
                }
                Err(reason) => {
                    if self.faults.record(&d.name, d.cur.hash, reason.clone(), now) {
                        warn!(unit = %d.name, %reason, "unit left as it is; will retry");
                        self.publisher.forget(&d.name);
                    }
                }
            }
            touched.push(d.name);
        }
        touched.sort();
        touched.dedup();
        // What is known is published now; systemd is not asked: during a burst it answers a
        // state query only after the jobs queued before it (seconds), and its signals bring
        // each started unit's state anyway. A unit none has reported on yet is asked about at
        // the next tick, if no signal came by then (a start of a unit already running sends
        // none).
        for name in &touched {
            if !self.systemd_states.contains_key(name) {
                self.unconfirmed.insert(name.clone());
            }
        }
        self.publish_all(&touched).await;
        if started_guarded && self.fence.is_fenced() {
            // fenced while the start was in flight: it stops again
            self.fenced().await;
        }
        std::mem::take(&mut self.held)
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
        self.attempt(what, unit, result).is_ok()
    }

    /// The bodies of a batch by hash, and those etcd refuses to give (with why). A refused
    /// batch is read again body by body, so one body that cannot be read (a permission on
    /// its key) keeps no other unit from being written. A store that cannot be reached
    /// leaves both maps short: those units are tried at the next converge.
    async fn read_bodies(
        &self,
        hashes: &[UnitHash],
    ) -> (HashMap<UnitHash, UnitFile>, HashMap<UnitHash, String>) {
        if hashes.is_empty() {
            return Default::default();
        }
        match self.store.bodies(hashes).await {
            Ok(b) => return (b, HashMap::new()),
            Err(e) if e.is_refused() => {
                warn!(error = %e, "reading unit bodies refused; reading them one by one");
            }
            Err(e) => {
                warn!(error = %e, "cannot read unit bodies; will retry");
                return Default::default();
            }
        }
        let reads: Vec<_> = hashes.iter().map(|h| self.store.body(h)).collect();
        let results: Vec<_> = stream::iter(reads).buffered(JOBS_IN_FLIGHT).collect().await;
        let (mut bodies, mut refused) = (HashMap::new(), HashMap::new());
        for (h, r) in hashes.iter().zip(results) {
            match r {
                Ok(f) => {
                    bodies.insert(*h, f);
                }
                Err(e) if !e.is_unavailable() => {
                    refused.insert(*h, e.to_string());
                }
                Err(_) => {}
            }
        }
        (bodies, refused)
    }

    /// As [`Agent::task`], with the failure as a reason users read (`stop failed: ...`).
    pub(crate) fn attempt(
        &self,
        what: &str,
        unit: &str,
        result: Result<(), fleet_systemd::Error>,
    ) -> Result<(), String> {
        self.metrics.agent_task(what);
        match result {
            Ok(()) => {
                info!(unit, task = what, "agent task done");
                Ok(())
            }
            Err(e) => {
                self.metrics.agent_task_failure(what);
                warn!(unit, task = what, error = %e, "agent task failed");
                Err(format!("{what} failed: {e}"))
            }
        }
    }
}

/// systemd's answer to a queued start or stop.
pub(crate) struct JobDone {
    name: String,
    /// `Launched`: a start; `Loaded`: a stop.
    to: TargetState,
    /// What the unit was when the job was queued.
    cur: Current,
    result: Result<(), fleet_systemd::Error>,
    /// The batch skipped its daemon-reload (a failed start gets one, and one more try).
    reload_skipped: bool,
}

/// What one converge did, unit by unit.
#[derive(Default)]
struct Outcome {
    /// Units a task failed for: the body concerned (when known) and why.
    failed: BTreeMap<String, (Option<UnitHash>, String)>,
    /// Units a task succeeded for.
    ok: Vec<String>,
    /// False when something was left undone for want of the registry (tried again later).
    complete: bool,
}

impl Outcome {
    fn failed(&mut self, unit: &str, hash: Option<UnitHash>, reason: String) {
        self.failed.insert(unit.to_string(), (hash, reason));
    }

    fn succeeded(&mut self, unit: &str) {
        self.ok.push(unit.to_string());
    }
}

/// The body a stop's or removal's failure records: the one wanted (the new one when the body
/// changed), else the one here. A fault is held, not retried before its backoff, while the
/// body it records is the one wanted.
fn fault_hash(
    desired: &BTreeMap<String, Desired>,
    current: &BTreeMap<String, Current>,
    name: &str,
) -> Option<UnitHash> {
    desired
        .get(name)
        .map(|d| d.hash)
        .or_else(|| current.get(name).map(|c| c.hash))
}
