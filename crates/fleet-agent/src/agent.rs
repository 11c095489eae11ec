//! The agent's loop: one event enum, one `select!`.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use fleet_registry::{
    EtcdRegistry, GlobalRecord, LeaseKeeper, MachineRecord, RegistryError, ScheduleRecord,
    StateRecord, WatchEvent, keys,
};
use fleet_scheduler::Machine;
use fleet_systemd::{SystemdState, UnitEvent, UnitManager, WatchSet};
use fleet_unit::{Requirements, TargetState, UnitFile, UnitHash, UnitName};
use futures_util::StreamExt;
use futures_util::stream;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use crate::desired::{Desired, desired_units};

/// systemd jobs (StartUnit, StopUnit), body reads and state writes kept in flight at once.
const JOBS_IN_FLIGHT: usize = 32;
/// Most systemd state changes published as one batch (the loop turns between batches).
const MAX_BATCH: usize = 512;

#[derive(Debug, Clone)]
pub struct AgentConfig {
    pub machine_id: String,
    pub public_ip: String,
    /// Configured metadata (fleet's `metadata`); API-set metadata is merged over it.
    pub metadata: BTreeMap<String, String>,
    pub agent_ttl: Duration,
    pub units_directory: PathBuf,
    pub disable_watches: bool,
    pub version: String,
}

/// Counters fleetd exports as metrics.
#[derive(Debug, Default)]
pub struct AgentStats {
    pub reconciles: AtomicU64,
    pub tasks: AtomicU64,
    pub task_failures: AtomicU64,
    pub state_writes: AtomicU64,
    pub reloads: AtomicU64,
}

enum Event {
    Watch(WatchEvent),
    WatchClosed,
    Systemd(UnitEvent),
    SystemdClosed,
    LeaseLost,
    Tick,
    Shutdown,
}

/// What the agent has done with a unit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Current {
    hash: UnitHash,
    state: TargetState,
}

struct Agent {
    registry: EtcdRegistry,
    systemd: Arc<dyn UnitManager>,
    cfg: AgentConfig,
    stats: Arc<AgentStats>,
    record: MachineRecord,
    lease: LeaseKeeper,
    mirror: BTreeMap<String, Vec<u8>>,
    synced: bool,
    /// A daemon-reload failed (or a start failed after one was skipped): the next converge
    /// makes one, whatever its batch holds.
    reload_owed: bool,
    requirements: HashMap<(UnitName, UnitHash), Requirements>,
    current: BTreeMap<String, Current>,
    systemd_states: BTreeMap<String, SystemdState>,
    published: BTreeMap<String, StateRecord>,
    watching: WatchSet,
    refused_globals: BTreeMap<UnitName, String>,
    /// Units taken over from a previous fleetd, with the file text found on disk, until the
    /// first reconcile compares that text with what the registry wants (by content, not by
    /// hash: a file written from API options may hash differently once re-read).
    adopted: BTreeMap<String, String>,
    /// States whose last write (or withdrawal) failed: retried on every tick.
    unsent: std::collections::BTreeSet<String>,
}

/// Runs the agent until `shutdown` is cancelled. Then, if `purge` is set, it stops and
/// unloads its units and withdraws the machine (fleet's purge, on SIGTERM), so its units move
/// elsewhere; if not (a configuration reload), it leaves everything running for its successor.
///
/// Fails before doing anything when this machine ID is registered by another fleetd.
pub async fn run(
    registry: EtcdRegistry,
    systemd: Arc<dyn UnitManager>,
    cfg: AgentConfig,
    stats: Arc<AgentStats>,
    shutdown: CancellationToken,
    purge: Arc<std::sync::atomic::AtomicBool>,
) -> Result<(), RegistryError> {
    let token = agent_token(&cfg.units_directory);
    let record = MachineRecord {
        version: 1,
        id: cfg.machine_id.clone(),
        public_ip: cfg.public_ip.clone(),
        metadata: cfg.metadata.clone(),
        agent_version: cfg.version.clone(),
        token,
    };
    let lease = tokio::select! {
        l = register(&registry, &record, cfg.agent_ttl) => l?,
        _ = shutdown.cancelled() => return Ok(()),
    };
    info!(machine = %cfg.machine_id, "machine registered");
    let watching = WatchSet::new();
    let mut agent = Agent {
        registry,
        systemd,
        cfg,
        stats,
        record,
        lease,
        mirror: BTreeMap::new(),
        synced: false,
        reload_owed: false,
        requirements: HashMap::new(),
        current: BTreeMap::new(),
        systemd_states: BTreeMap::new(),
        published: BTreeMap::new(),
        watching,
        refused_globals: BTreeMap::new(),
        adopted: BTreeMap::new(),
        unsent: Default::default(),
    };
    agent.adopt().await;
    agent.run(shutdown, purge).await;
    Ok(())
}

/// Registers the machine, retrying while etcd cannot be reached.
async fn register(
    registry: &EtcdRegistry,
    record: &MachineRecord,
    ttl: Duration,
) -> Result<LeaseKeeper, RegistryError> {
    let mut wait = Duration::from_millis(500);
    loop {
        match registry.register_machine(record, ttl).await {
            Ok(lease) => return Ok(lease),
            Err(e @ RegistryError::DuplicateMachine { .. }) => return Err(e),
            Err(e) => {
                warn!(error = %e, "registering machine failed; retrying in {wait:?}");
                tokio::time::sleep(wait).await;
                // short: a machine that is not registered once etcd is back looks dead to
                // the engine, which moves its units; one attempt costs one request
                wait = (wait * 2).min(Duration::from_secs(2)).min(ttl / 2);
            }
        }
    }
}

/// A random token kept beside the units directory (in /run: a node's reboot forgets it), so
/// a restarted fleetd recognizes its own registration (see `EtcdRegistry::register_machine`).
fn agent_token(units_directory: &std::path::Path) -> String {
    let dir = units_directory.parent().unwrap_or(units_directory);
    let path = dir.join("agent-token");
    if let Ok(t) = std::fs::read_to_string(&path) {
        let t = t.trim().to_string();
        if !t.is_empty() {
            return t;
        }
    }
    let token = uuid::Uuid::new_v4().simple().to_string();
    let _ = std::fs::create_dir_all(dir);
    if let Err(e) = std::fs::write(&path, &token) {
        warn!(path = %path.display(), error = %e, "cannot store agent token");
    }
    token
}

impl Agent {
    /// Takes over the units a previous fleetd left in the units directory, keeping them as
    /// they are; the first reconcile then removes only those no longer wanted here.
    async fn adopt(&mut self) {
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
        for name in names {
            let path = self.cfg.units_directory.join(&name);
            let Ok(text) = std::fs::read_to_string(&path) else {
                continue;
            };
            let Ok(file) = UnitFile::parse(&text) else {
                continue;
            };
            let running = states.get(&name).is_some_and(|s| {
                matches!(
                    s.active_state.as_str(),
                    "active" | "activating" | "reloading"
                )
            });
            let state = if running {
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

    async fn run(mut self, shutdown: CancellationToken, purge: Arc<std::sync::atomic::AtomicBool>) {
        let poll = self.cfg.disable_watches.then_some(Duration::from_secs(2));
        let mut watch = self.registry.watch_agent(&self.cfg.machine_id, poll);
        let mut signals = self.subscribe().await;
        // Adopted units: publish their states under this fleetd's lease (the records a
        // previous fleetd wrote die with its lease).
        self.refresh_states(None).await;
        let mut tick = tokio::time::interval(Duration::from_secs(5));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut deadline: Option<tokio::time::Instant> = None;
        loop {
            let event = {
                let soon = async {
                    match deadline {
                        Some(d) => tokio::time::sleep_until(d).await,
                        None => std::future::pending().await,
                    }
                };
                let sys = async {
                    match signals.as_mut() {
                        Some(rx) => rx
                            .recv()
                            .await
                            .map(Event::Systemd)
                            .unwrap_or(Event::SystemdClosed),
                        // no subscription (it failed): try again in a while
                        None => {
                            tokio::time::sleep(Duration::from_secs(5)).await;
                            Event::SystemdClosed
                        }
                    }
                };
                tokio::select! {
                    _ = shutdown.cancelled() => Event::Shutdown,
                    ev = watch.recv() => ev.map(Event::Watch).unwrap_or(Event::WatchClosed),
                    ev = sys => ev,
                    _ = self.lease.lost() => Event::LeaseLost,
                    _ = tick.tick() => Event::Tick,
                    _ = soon => { deadline = None; Event::Tick }
                }
            };
            match event {
                Event::Shutdown => {
                    if purge.load(Ordering::SeqCst) {
                        self.purge().await;
                    }
                    return;
                }
                Event::Watch(ev) => {
                    if self.apply_watch(ev) && deadline.is_none() {
                        deadline = Some(tokio::time::Instant::now() + Duration::from_millis(30));
                    }
                }
                Event::WatchClosed => {
                    watch = self.registry.watch_agent(&self.cfg.machine_id, poll);
                    self.synced = false;
                }
                Event::Systemd(UnitEvent::Changed(change)) => {
                    // take every change already queued, and publish them as one batch
                    let mut changed = Vec::new();
                    let mut resync = None;
                    let mut next = Some(change);
                    while let Some(change) = next.take() {
                        if let Some(s) = change.state {
                            self.systemd_states.insert(change.name.clone(), s);
                            changed.push(change.name);
                        }
                        if changed.len() >= MAX_BATCH {
                            break; // the rest stays queued for the next turn of the loop
                        }
                        match signals.as_mut().map(|rx| rx.try_recv()) {
                            Some(Ok(UnitEvent::Changed(c))) => next = Some(c),
                            Some(Ok(UnitEvent::Resync(reason))) => resync = Some(reason),
                            _ => {}
                        }
                    }
                    changed.sort();
                    changed.dedup();
                    self.publish_all(&changed).await;
                    if let Some(reason) = resync {
                        debug!(?reason, "re-reading unit states");
                        self.refresh_states(None).await;
                    }
                }
                Event::Systemd(UnitEvent::Resync(reason)) => {
                    debug!(?reason, "re-reading unit states");
                    self.refresh_states(None).await;
                }
                Event::SystemdClosed => {
                    warn!("systemd subscription ended; subscribing again");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    signals = self.subscribe().await;
                    self.refresh_states(None).await;
                }
                Event::LeaseLost => self.reregister(&shutdown).await,
                Event::Tick => {
                    if !self.unsent.is_empty() {
                        self.retry_unsent().await;
                    }
                    // after a change, and periodically: does what runs match what is wanted?
                    // (a reconcile that could not finish is simply tried at the next tick)
                    if self.synced {
                        self.reconcile().await;
                    }
                }
            }
        }
    }

    async fn subscribe(&self) -> Option<mpsc::Receiver<UnitEvent>> {
        match self.systemd.subscribe(self.watching.clone()).await {
            Ok(rx) => Some(rx),
            Err(e) => {
                error!(error = %e, "cannot subscribe to systemd signals");
                None
            }
        }
    }

    /// Updates the mirror; returns whether what we must run may have changed.
    fn apply_watch(&mut self, ev: WatchEvent) -> bool {
        match ev {
            WatchEvent::Snapshot { kvs, .. } => {
                self.mirror = kvs.into_iter().collect();
                self.synced = true;
                true
            }
            WatchEvent::Put { key, value, .. } => {
                self.mirror.insert(key, value);
                true
            }
            WatchEvent::Delete { key, .. } => {
                self.mirror.remove(&key);
                true
            }
            WatchEvent::Disconnected => {
                // desired state unknown from now on: keep everything as it is
                warn!("lost etcd; keeping units as they are until it is back");
                self.synced = false;
                false
            }
        }
    }

    async fn requirements_of(
        &mut self,
        name: &UnitName,
        hash: UnitHash,
    ) -> Result<Requirements, RegistryError> {
        if let Some(r) = self.requirements.get(&(name.clone(), hash)) {
            return Ok(r.clone());
        }
        let file = self.registry.body(&hash).await?;
        let req = match Requirements::from_unit(name, &file) {
            Ok((r, _)) => r,
            Err(e) => {
                warn!(unit = %name, error = %e, "invalid requirements; treating as none");
                Requirements::default()
            }
        };
        self.requirements.insert((name.clone(), hash), req.clone());
        Ok(req)
    }

    /// Brings systemd in line with the mirror. Returns false when it could not finish (etcd
    /// error reading a body) and should be tried again.
    async fn reconcile(&mut self) -> bool {
        let keys = self.registry.keys().clone();
        let mut scheduled = BTreeMap::new();
        let mut globals = BTreeMap::new();
        let mut metadata = self.cfg.metadata.clone();
        let sched_dir = keys.schedule_dir(&self.cfg.machine_id);
        let meta_dir = keys.metadata_dir(&self.cfg.machine_id);
        let mut entries: Vec<(bool, UnitName, UnitHash, TargetState)> = Vec::new();
        // Records this agent cannot read (a newer format during an upgrade, damage): a unit
        // it already runs under that name keeps running as it is; nothing new is started.
        let mut unreadable: Vec<UnitName> = Vec::new();
        for (k, v) in &self.mirror {
            if let Some(name) = k.strip_prefix(&sched_dir) {
                let Ok(name) = UnitName::parse(name) else {
                    warn!(key = %k, "skipping schedule record with an invalid unit name");
                    continue;
                };
                match serde_json_decode::<ScheduleRecord>(v) {
                    Ok(rec) => entries.push((false, name, rec.hash, rec.desired_state)),
                    Err(()) => {
                        warn!(key = %k, "schedule record not understood; leaving the unit as it is");
                        unreadable.push(name);
                    }
                }
            } else if let Some(name) = keys.strip(keys::GLOBAL, k) {
                let Ok(name) = UnitName::parse(name) else {
                    warn!(key = %k, "skipping global record with an invalid unit name");
                    continue;
                };
                match serde_json_decode::<GlobalRecord>(v) {
                    Ok(rec) => entries.push((true, name, rec.hash, rec.desired_state)),
                    Err(()) => {
                        warn!(key = %k, "global record not understood; leaving the unit as it is");
                        unreadable.push(name);
                    }
                }
            } else if let Some(key) = k.strip_prefix(&meta_dir) {
                metadata.insert(key.to_string(), String::from_utf8_lossy(v).into_owned());
            }
        }
        for (global, name, hash, state) in entries {
            let req = match self.requirements_of(&name, hash).await {
                Ok(r) => r,
                Err(e) if e.is_unavailable() => {
                    warn!(unit = %name, error = %e, "cannot read unit body; will retry");
                    return false;
                }
                Err(e) => {
                    // a body missing or damaged for good: this unit cannot be (re)written,
                    // but it must not hold up every other unit of this machine
                    warn!(unit = %name, error = %e, "unusable unit body; leaving the unit as it is");
                    unreadable.push(name);
                    continue;
                }
            };
            if global {
                globals.insert(name, (hash, state, req));
            } else {
                scheduled.insert(name, (hash, state, req));
            }
        }
        let machine = Machine {
            id: self.cfg.machine_id.clone(),
            metadata,
        };
        let (mut desired, refused) = desired_units(&machine, &scheduled, &globals);
        for name in unreadable {
            if let Some(cur) = self.current.get(name.as_str()) {
                desired.insert(
                    name,
                    Desired {
                        hash: cur.hash,
                        state: cur.state,
                    },
                );
            }
        }
        self.resolve_adopted(&desired).await;
        if refused != self.refused_globals {
            for (name, reason) in &refused {
                info!(unit = %name, %reason, "global unit does not run on this machine");
            }
            self.refused_globals = refused;
        }
        self.stats.reconciles.fetch_add(1, Ordering::Relaxed);
        self.converge(desired).await
    }

    /// For units taken over at start: when the file on disk says exactly what the registry's
    /// body says, the unit is the one wanted, whatever its hash computed from disk.
    async fn resolve_adopted(&mut self, desired: &BTreeMap<UnitName, Desired>) {
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
            match self.registry.body(&d.hash).await {
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

    /// Runs the tasks that take systemd from `current` to `desired`.
    async fn converge(&mut self, desired: BTreeMap<UnitName, Desired>) -> bool {
        let desired: BTreeMap<String, Desired> = desired
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect();
        let mut complete = true;
        let mut files_changed = false;
        let mut stale_removed = 0;
        let mut touched: Vec<String> = Vec::new();
        // 1. units no longer wanted here, or whose body changed: stop and remove
        let stale: Vec<(String, Current)> = self
            .current
            .iter()
            .filter(|(n, c)| desired.get(*n).is_none_or(|d| d.hash != c.hash))
            .map(|(n, c)| (n.clone(), *c))
            .collect();
        for (name, cur) in &stale {
            if cur.state == TargetState::Launched {
                self.task("stop", name, self.systemd.stop(name).await);
            }
        }
        if !stale.is_empty() {
            // one DisableUnitFiles for the whole batch (systemd pays ~30 ms per call)
            let names: Vec<String> = stale.iter().map(|(n, _)| n.clone()).collect();
            self.task(
                "unload",
                &names.join(" "),
                self.systemd.remove_units(&names).await,
            );
            files_changed = true;
            stale_removed = stale.len();
        }
        for (name, _) in stale {
            self.current.remove(&name);
            self.watching.remove(&name);
            self.systemd_states.remove(&name);
            self.unpublish(&name).await;
        }
        // 2. units to write
        let mut written: Vec<(String, bool)> = Vec::new();
        let new: Vec<(&String, &Desired)> = desired
            .iter()
            .filter(|(name, _)| !self.current.contains_key(*name))
            .collect();
        let reads: Vec<_> = new
            .iter()
            .map(|(_, d)| self.registry.body(&d.hash))
            .collect();
        let bodies: Vec<_> = stream::iter(reads).buffered(JOBS_IN_FLIGHT).collect().await;
        for ((name, d), body) in new.into_iter().zip(bodies) {
            let file = match body {
                Ok(f) => f,
                Err(e) => {
                    warn!(unit = %name, error = %e, "cannot read unit body; will retry");
                    complete = false;
                    continue;
                }
            };
            if self.task(
                "load",
                name,
                self.systemd.write_unit(name, &file.serialize()).await,
            ) {
                self.watching.insert(name.clone());
                self.current.insert(
                    name.clone(),
                    Current {
                        hash: d.hash,
                        state: TargetState::Loaded,
                    },
                );
                written.push((name.clone(), file.has_section("Install")));
                files_changed = true;
                touched.push(name.clone());
            } else {
                complete = false;
            }
        }
        // New unit files that are only to be started need no daemon-reload: systemd loads a
        // unit it has not loaded (or found missing) from disk when the StartUnit comes (it
        // notices the new link in its units directory). A reload (~0.1-0.4 s with hundreds of
        // units) is still made for removed or replaced files, units to be only loaded, and
        // [Install] sections; and if such a start fails, a reload and one more try follow.
        let start_loads_them = written.iter().all(|(name, install)| {
            !install
                && desired
                    .get(name)
                    .is_some_and(|d| d.state == TargetState::Launched)
        });
        let reload_skipped =
            files_changed && stale_removed == 0 && start_loads_them && !self.reload_owed;
        if ((files_changed && !reload_skipped) || self.reload_owed) && !self.reload().await {
            complete = false;
        }
        for (name, install) in &written {
            if *install {
                self.task("enable", name, self.systemd.enable(name).await);
            }
        }
        // 3. start / stop to the desired state: the jobs of a batch are queued concurrently
        // (systemd runs them as they come; only the D-Bus round trips overlap)
        let moves: Vec<(String, TargetState, Current)> = desired
            .iter()
            .filter_map(|(name, d)| {
                let cur = self.current.get(name).copied()?;
                match (d.state, cur.state) {
                    (TargetState::Launched, s) if s != TargetState::Launched => {
                        Some((name.clone(), TargetState::Launched, cur))
                    }
                    (TargetState::Loaded, TargetState::Launched) => {
                        Some((name.clone(), TargetState::Loaded, cur))
                    }
                    _ => None,
                }
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
        if reload_skipped && results.iter().any(Result::is_err) && self.reload().await {
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
    async fn reload(&mut self) -> bool {
        self.stats.reloads.fetch_add(1, Ordering::Relaxed);
        match self.systemd.reload().await {
            Ok(()) => {
                self.reload_owed = false;
                true
            }
            Err(e) => {
                warn!(error = %e, "daemon-reload failed");
                self.reload_owed = true;
                false
            }
        }
    }

    /// Logs a task's outcome; true when it succeeded.
    fn task(&self, what: &str, unit: &str, result: Result<(), fleet_systemd::Error>) -> bool {
        self.stats.tasks.fetch_add(1, Ordering::Relaxed);
        match result {
            Ok(()) => {
                info!(unit, task = what, "agent task done");
                true
            }
            Err(e) => {
                self.stats.task_failures.fetch_add(1, Ordering::Relaxed);
                warn!(unit, task = what, error = %e, "agent task failed");
                false
            }
        }
    }

    /// Reads states from systemd (all managed units, or `only`) and publishes what changed.
    async fn refresh_states(&mut self, only: Option<&[String]>) {
        let names: Vec<String> = match only {
            Some(n) => n.to_vec(),
            None => self.current.keys().cloned().collect(),
        };
        if names.is_empty() {
            return;
        }
        match self.systemd.states(&names).await {
            Ok(states) => {
                for (name, s) in states {
                    if self.current.contains_key(&name) {
                        self.systemd_states.insert(name, s);
                    }
                }
            }
            Err(e) => warn!(error = %e, "cannot read unit states"),
        }
        self.publish_all(&names).await;
    }

    /// Publishes the state of one managed unit if it differs from what was published.
    async fn publish(&mut self, name: &str) {
        self.publish_all(std::slice::from_ref(&name.to_string()))
            .await;
    }

    /// Publishes the states of managed units that differ from what was published, up to
    /// [`JOBS_IN_FLIGHT`] writes at a time (a burst of starts reports hundreds at once).
    async fn publish_all(&mut self, names: &[String]) {
        let records: Vec<StateRecord> = names
            .iter()
            .filter_map(|name| {
                let (cur, sys) = (self.current.get(name)?, self.systemd_states.get(name)?);
                let rec = StateRecord {
                    version: 1,
                    name: name.clone(),
                    machine_id: self.cfg.machine_id.clone(),
                    hash: cur.hash.to_string(),
                    load_state: sys.load_state.clone(),
                    active_state: sys.active_state.clone(),
                    sub_state: sys.sub_state.clone(),
                    agent_state: cur.state,
                };
                (self.published.get(name) != Some(&rec)).then_some(rec)
            })
            .collect();
        let writes: Vec<_> = records
            .iter()
            .map(|rec| {
                self.registry
                    .publish_state(&rec.name, &self.cfg.machine_id, Some(rec), &self.lease)
            })
            .collect();
        // etcd out of reach: the first write that says so ends the batch (the rest would each
        // wait for its own timeout); what was not written is retried at a later tick
        let mut results = Vec::with_capacity(writes.len());
        let mut writing = stream::iter(writes).buffered(JOBS_IN_FLIGHT);
        while let Some(r) = writing.next().await {
            let unreachable = r.as_ref().is_err_and(|e| e.is_unavailable());
            results.push(r);
            if unreachable {
                break;
            }
        }
        drop(writing);
        let mut results = results.into_iter();
        for rec in records {
            match results.next() {
                Some(Ok(())) => {
                    self.stats.state_writes.fetch_add(1, Ordering::Relaxed);
                    self.published.insert(rec.name.clone(), rec);
                }
                Some(Err(e)) => {
                    debug!(unit = %rec.name, error = %e, "publishing state failed; will retry");
                    self.unsent.insert(rec.name);
                }
                None => {
                    self.unsent.insert(rec.name);
                }
            }
        }
    }

    async fn unpublish(&mut self, name: &str) {
        if !self.published.contains_key(name) && !self.unsent.contains(name) {
            return;
        }
        let withdrawn = self
            .registry
            .publish_state(name, &self.cfg.machine_id, None, &self.lease);
        match withdrawn.await {
            Ok(()) => {
                self.published.remove(name);
                self.unsent.remove(name);
            }
            Err(e) => {
                debug!(unit = name, error = %e, "withdrawing state failed; will retry");
                self.unsent.insert(name.to_string());
            }
        }
    }

    /// Retries the state writes that failed: publish what is still managed, withdraw the rest.
    async fn retry_unsent(&mut self) {
        let names: Vec<String> = std::mem::take(&mut self.unsent).into_iter().collect();
        let (managed, gone): (Vec<String>, Vec<String>) = names
            .into_iter()
            .partition(|n| self.current.contains_key(n));
        for name in &managed {
            self.published.remove(name);
        }
        self.publish_all(&managed).await;
        for name in gone {
            self.unpublish(&name).await;
        }
    }

    /// etcd says the lease is gone (it expired while this machine could not reach etcd):
    /// register again and publish every state again under the new lease. Units keep
    /// running meanwhile.
    async fn reregister(&mut self, shutdown: &CancellationToken) {
        warn!("machine lease lost; registering again");
        let lease = tokio::select! {
            l = register(&self.registry, &self.record, self.cfg.agent_ttl) => l,
            _ = shutdown.cancelled() => return,
        };
        match lease {
            Ok(l) => {
                self.lease = l;
                self.published.clear();
                let names: Vec<String> = self.current.keys().cloned().collect();
                for n in names {
                    self.publish(&n).await;
                }
                info!("machine registered again");
            }
            Err(e) => {
                error!(error = %e, "cannot register again; shutting down the agent");
                shutdown.cancel();
            }
        }
    }

    /// fleet's purge: stop and unload every unit, withdraw states and presence.
    async fn purge(mut self) {
        info!("agent shutting down: stopping and unloading its units");
        let names: Vec<(String, Current)> =
            self.current.iter().map(|(n, c)| (n.clone(), *c)).collect();
        for (name, cur) in &names {
            if cur.state == TargetState::Launched {
                self.task("stop", name, self.systemd.stop(name).await);
            }
        }
        let all: Vec<String> = names.iter().map(|(n, _)| n.clone()).collect();
        if !all.is_empty() {
            self.task(
                "unload",
                &all.join(" "),
                self.systemd.remove_units(&all).await,
            );
        }
        if !names.is_empty() {
            let _ = self.systemd.reload().await;
        }
        for (name, _) in &names {
            self.unpublish(name).await;
        }
        self.registry
            .withdraw_machine(&self.cfg.machine_id, self.lease)
            .await;
    }
}

fn serde_json_decode<T: for<'de> serde::Deserialize<'de>>(v: &[u8]) -> Result<T, ()> {
    serde_json::from_slice(v).map_err(|_| ())
}
