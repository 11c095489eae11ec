//! Carries out a [`Plan`]: unit files, one `daemon-reload`, systemd jobs, then the states of
//! what it touched. The decisions are `plan.rs`'s; this module only does them, in order,
//! many at once where the order does not matter.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use fleet_unit::{TargetState, UnitFile, UnitHash};
use futures_util::StreamExt;
use futures_util::stream;
use tokio::time::Instant;
use tracing::{debug, info, warn};

use crate::agent::{Agent, JOBS_IN_FLIGHT};
use crate::desired::Desired;
use crate::faults::Fault;
use crate::plan::{Current, Plan, Reload, plan, reload_rule};

impl Agent {
    /// Runs the tasks that take systemd from `current` to `desired`: for every unit, or for
    /// the units in `scope` only (which must hold every failing unit; `desired` then says
    /// what those units want). Returns false when it could not finish (a body unreadable, a
    /// task failed) and should be tried again.
    pub(crate) async fn converge(
        &mut self,
        mut desired: BTreeMap<String, Desired>,
        scope: Option<&BTreeSet<String>>,
    ) -> bool {
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
        let plan = match scope {
            None => plan(&self.current, &desired),
            Some(scope) => {
                let current: BTreeMap<String, Current> = scope
                    .iter()
                    .filter_map(|n| Some((n.clone(), *self.current.get(n)?)))
                    .collect();
                plan(&current, &desired)
            }
        };
        self.execute(plan, &desired).await
    }

    async fn execute(&mut self, plan: Plan, desired: &BTreeMap<String, Desired>) -> bool {
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
                let r = stopped(self.systemd.stop(name).await);
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
        let results = self.systemd.write_units(&contents).await;
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
        let guarded = self.guarded();
        let moves: Vec<(String, TargetState, Current)> = moves
            .into_iter()
            .filter(|(name, to, _)| *to != TargetState::Launched || !guarded.contains(name))
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
        for (r, (_, to, _)) in results.iter_mut().zip(&moves) {
            if *to == TargetState::Loaded {
                *r = stopped(std::mem::replace(r, Ok(())));
            }
        }
        if reload == Reload::Skipped && results.iter().any(Result::is_err) && self.reload().await {
            let guarded = self.guarded();
            let again: Vec<usize> = (0..moves.len())
                .filter(|&i| results[i].is_err() && moves[i].1 == TargetState::Launched)
                .filter(|&i| !guarded.contains(&moves[i].0))
                .collect();
            for &i in &again {
                debug!(unit = %moves[i].0, "start failed without a daemon-reload; trying again after one");
            }
            let retried = self
                .start_all(again.iter().map(|&i| moves[i].0.as_str()))
                .await;
            for (i, r) in again.into_iter().zip(retried) {
                results[i] = r;
            }
        }
        // a start systemd answers "not found" although the unit's file is here: the file was
        // never linked (its fleetd was killed between writing a batch's files and linking
        // them), or its link is gone. Linked again, then one more try
        let unfound: Vec<usize> = (0..moves.len())
            .filter(|&i| {
                moves[i].1 == TargetState::Launched
                    && results[i]
                        .as_ref()
                        .is_err_and(fleet_systemd::Error::is_no_such_unit)
            })
            .collect();
        if !unfound.is_empty() {
            let names: Vec<String> = unfound.iter().map(|&i| moves[i].0.clone()).collect();
            let mut retried = self.relink_and_start(&names).await;
            for (i, name) in unfound.into_iter().zip(names) {
                if let Some(r) = retried.remove(&name) {
                    results[i] = r;
                }
            }
        }
        for ((name, to, cur), result) in moves.into_iter().zip(results) {
            let what = if to == TargetState::Launched {
                "start"
            } else {
                "stop"
            };
            match self.attempt(what, &name, result) {
                Ok(()) => {
                    self.current
                        .insert(name.clone(), Current { state: to, ..cur });
                    outcome.succeeded(&name);
                    touched.push(name);
                }
                Err(reason) => {
                    outcome.failed(&name, Some(cur.hash), reason);
                    touched.push(name);
                }
            }
        }
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
            if !outcome.failed.contains_key(name) && self.faults.clear(name) {
                info!(unit = %name, "unit recovered from its failure");
                self.publisher.forget(name);
                touched.push(name.clone());
            }
        }
        if !touched.is_empty() {
            touched.sort();
            touched.dedup();
            self.refresh_states(Some(&touched)).await;
        }
        outcome.complete && outcome.failed.is_empty()
    }

    /// Links the files of `names` (units systemd cannot find) again, as they are on disk,
    /// enables those with an `[Install]` section, makes one `daemon-reload` (systemd
    /// remembers a unit it did not find until then), and starts them: each unit's outcome,
    /// the first failure of the way for those that did not get as far as their start.
    async fn relink_and_start(
        &mut self,
        names: &[String],
    ) -> BTreeMap<String, Result<(), fleet_systemd::Error>> {
        info!(units = %names.join(" "), "systemd cannot find these units although their files are here; linking them again");
        let mut outcome = BTreeMap::new();
        let mut files = Vec::new();
        for name in names {
            match self.systemd.read_unit(name).await {
                Ok(text) => files.push((name.clone(), text)),
                Err(e) => {
                    if matches!(&e, fleet_systemd::Error::Io { source, .. } if source.kind() == std::io::ErrorKind::NotFound)
                    {
                        // its file is gone too: written afresh when the start is tried again
                        self.current.remove(name);
                        self.watching.remove(name);
                        self.systemd_states.remove(name);
                    }
                    outcome.insert(name.clone(), Err(e));
                }
            }
        }
        let linked = self.systemd.write_units(&files).await;
        let mut start = Vec::new();
        for ((name, text), r) in files.into_iter().zip(linked) {
            match r {
                Ok(()) => {
                    let install = UnitFile::parse(&text).is_ok_and(|f| f.has_section("Install"));
                    start.push((name, install));
                }
                Err(e) => {
                    outcome.insert(name, Err(e));
                }
            }
        }
        if start.is_empty() {
            return outcome;
        }
        for (name, install) in &start {
            self.attempt("load", name, Ok(())).unwrap_or_default();
            if *install {
                let r = self.systemd.enable(name).await;
                self.task("enable", name, r);
            }
        }
        self.reload().await;
        // the fence may have gone up meanwhile: an at-most-once unit keeps its "not found"
        // answer, and a later reconcile tries it again
        let guarded = self.guarded();
        start.retain(|(n, _)| !guarded.contains(n));
        let started = self.start_all(start.iter().map(|(n, _)| n.as_str())).await;
        outcome.extend(start.into_iter().map(|(n, _)| n).zip(started));
        outcome
    }

    /// Starts `names` together (the D-Bus round trips overlap, [`JOBS_IN_FLIGHT`] at a
    /// time): each one's outcome, in order.
    async fn start_all(
        &self,
        names: impl Iterator<Item = &str>,
    ) -> Vec<Result<(), fleet_systemd::Error>> {
        let jobs: Vec<_> = names.map(|n| self.systemd.start(n)).collect();
        stream::iter(jobs).buffered(JOBS_IN_FLIGHT).collect().await
    }

    /// The at-most-once units no start may reach now: those the fence guards while it is up.
    fn guarded(&self) -> BTreeSet<String> {
        if self.fence.is_fenced() {
            self.fence.units()
        } else {
            BTreeSet::new()
        }
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

/// A stop's outcome, where systemd not knowing the unit (`NoSuchUnit`: not loaded, e.g. a
/// stopped unit whose link is gone, collected) counts as done: nothing of it runs.
pub(crate) fn stopped(r: Result<(), fleet_systemd::Error>) -> Result<(), fleet_systemd::Error> {
    match r {
        Err(e) if e.is_no_such_unit() => Ok(()),
        r => r,
    }
}
