//! The agent's loop: one event enum, one `select!`. The decisions are in `desired.rs` and
//! `plan.rs`; carrying them out in `executor.rs`; states in `publish.rs`; taking over a
//! predecessor's units in `adopt.rs`.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use fleet_metrics::Metrics;
use fleet_registry::{AgentStore, AtMostOnce, Lease, MachineRecord, RegistryError, WatchEvent};
use fleet_scheduler::Machine;
use fleet_systemd::{StateChange, SystemdState, UnitEvent, UnitManager, WatchSet};
use fleet_unit::{Requirements, TargetState, UnitHash, UnitName};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use crate::desired::{Candidate, Desired, desired_units};
use crate::faults::Faults;
use crate::fence::Fence;
use crate::mirror::{Change, Entry, Mirror};
use crate::plan::Current;
use crate::publish::Publisher;

/// systemd jobs (StartUnit, StopUnit), body reads and state writes kept in flight at once.
pub(crate) const JOBS_IN_FLIGHT: usize = 32;
/// Most systemd state changes published as one batch (the loop turns between batches).
const MAX_BATCH: usize = 512;
/// How long after a watch event the agent reconciles (a burst of events makes one).
const DEBOUNCE: Duration = Duration::from_millis(30);
/// How long after a watch event that follows a quiet spell (no reconcile for [`DEBOUNCE`])
/// the agent reconciles: a single unit scheduled here is not held for a burst that is not
/// coming; a burst's later events are gathered for [`DEBOUNCE`] as ever.
const PROMPT: Duration = Duration::from_millis(2);
/// How often the agent compares what runs with what is wanted, unit by unit (the full pass),
/// and retries failed writes.
const TICK: Duration = Duration::from_secs(5);

#[derive(Debug, Clone)]
pub struct AgentConfig {
    pub machine_id: String,
    pub public_ip: String,
    /// Configured metadata (fleet's `metadata`); API-set metadata is merged over it.
    pub metadata: BTreeMap<String, String>,
    pub agent_ttl: Duration,
    /// Where the unit files go; the agent's registration token is kept beside it.
    pub units_directory: PathBuf,
    pub disable_watches: bool,
    pub version: String,
}

enum Event {
    Watch(WatchEvent),
    WatchClosed,
    Systemd(UnitEvent),
    SystemdClosed,
    LeaseLost,
    /// The guard of at-most-once units fenced them, or lifted the fence.
    Fence,
    /// The periodic tick: a full pass.
    Tick,
    /// A reconcile is due after a watch event (or the fence lifted).
    Due,
    /// A held passing state has lasted long enough to be written.
    Flush,
    Shutdown,
}

pub(crate) struct Agent {
    pub(crate) store: Arc<dyn AgentStore>,
    pub(crate) systemd: Arc<dyn UnitManager>,
    pub(crate) cfg: AgentConfig,
    pub(crate) metrics: Metrics,
    /// What this machine registers (again, after its lease is lost).
    record: MachineRecord,
    /// The lease the machine record and the unit states are held under.
    pub(crate) lease: Lease,
    /// Stops the at-most-once units when `lease` goes unrenewed (replaced with the lease).
    pub(crate) fence: Fence,
    /// The fence's [`Fence::raised`] when this agent last looked: when it has moved on, the
    /// guard stopped the at-most-once units, even if the fence is down again by now.
    fences_seen: u64,
    /// The watched keys, decoded: this machine's schedule, the global units, its metadata,
    /// with the requirements of the bodies read so far.
    mirror: Mirror,
    /// Units whose schedule record changed since the last reconcile: unless something
    /// touched every unit (`full_next`), a reconcile looks at these (and the failing ones)
    /// only, so that a unit scheduled here costs the same with 10 or 1,000 units running.
    changed: BTreeSet<UnitName>,
    /// The next reconcile must look at every unit: a listing, a global unit or the metadata
    /// changed, a change touched a global unit's eligibility (`Conflicts`), the fence moved,
    /// or the last reconcile did not finish. The periodic tick always does.
    full_next: bool,
    /// Whether reconciles may look at the changed units only (false: every reconcile is a
    /// full pass, the reference the tests compare with).
    incremental: bool,
    /// The scheduled units whose body says `AtMostOnce=true` (kept unit by unit, so that a
    /// partial reconcile hands the fence the same set as a full pass).
    at_most_once_wanted: BTreeSet<String>,
    /// Whether `mirror` is a fresh snapshot: only then does the agent act on it ("unknown is
    /// not empty": while disconnected, nothing is stopped).
    synced: bool,
    /// A daemon-reload failed (or a start failed after one was skipped): the next converge
    /// makes one, whatever its batch holds.
    pub(crate) reload_owed: bool,
    /// What this agent has done with each unit it manages.
    pub(crate) current: BTreeMap<String, Current>,
    /// systemd's last word on each managed unit.
    pub(crate) systemd_states: BTreeMap<String, SystemdState>,
    pub(crate) publisher: Publisher,
    /// The units whose systemd signals the subscription reports (the managed ones).
    pub(crate) watching: WatchSet,
    /// Global units that do not run here, with why (logged when it changes).
    refused_globals: BTreeMap<UnitName, String>,
    /// Units taken over from a previous fleetd, with the file text found on disk, until the
    /// first reconcile compares that text with what the registry wants (by content, not by
    /// hash: a file written from API options may hash differently once re-read).
    pub(crate) adopted: BTreeMap<String, String>,
    /// Units a task failed for: kept as they are until their retry is due, their reason
    /// published with their state.
    pub(crate) faults: Faults,
}

/// Runs the agent until `shutdown` is cancelled. Then, if `purge` is set, it stops and
/// unloads its units and withdraws the machine (fleet's purge, on SIGTERM), so its units move
/// elsewhere; if not (a configuration reload), it leaves everything running for its successor.
///
/// Fails before doing anything when this machine ID is registered by another fleetd.
pub async fn run(
    store: Arc<dyn AgentStore>,
    systemd: Arc<dyn UnitManager>,
    cfg: AgentConfig,
    metrics: Metrics,
    shutdown: CancellationToken,
    purge: Arc<AtomicBool>,
) -> Result<(), RegistryError> {
    run_with(store, systemd, cfg, metrics, shutdown, purge, true).await
}

/// [`run`], choosing whether reconciles may look at the changed units only (`incremental`)
/// or always at every unit (the tests' reference).
pub(crate) async fn run_with(
    store: Arc<dyn AgentStore>,
    systemd: Arc<dyn UnitManager>,
    cfg: AgentConfig,
    metrics: Metrics,
    shutdown: CancellationToken,
    purge: Arc<AtomicBool>,
    incremental: bool,
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
        l = register(store.as_ref(), &record, cfg.agent_ttl) => l?,
        _ = shutdown.cancelled() => return Ok(()),
    };
    info!(machine = %cfg.machine_id, "machine registered");
    let fence = Fence::new(
        &lease,
        AtMostOnce::for_ttl(cfg.agent_ttl),
        systemd.clone(),
        BTreeSet::new(),
        None,
    );
    let mirror = Mirror::new(store.keys(), &cfg.machine_id);
    let mut agent = Agent {
        publisher: Publisher::new(store.clone(), cfg.machine_id.clone()),
        store,
        systemd,
        cfg,
        metrics,
        record,
        lease,
        fences_seen: fence.raised(),
        fence,
        mirror,
        changed: BTreeSet::new(),
        full_next: true,
        incremental,
        at_most_once_wanted: BTreeSet::new(),
        synced: false,
        reload_owed: false,
        current: BTreeMap::new(),
        systemd_states: BTreeMap::new(),
        watching: WatchSet::new(),
        refused_globals: BTreeMap::new(),
        adopted: BTreeMap::new(),
        faults: Faults::default(),
    };
    agent.adopt().await;
    agent.run(shutdown, purge).await;
    Ok(())
}

/// Registers the machine, retrying while the registry cannot be reached.
async fn register(
    store: &dyn AgentStore,
    record: &MachineRecord,
    ttl: Duration,
) -> Result<Lease, RegistryError> {
    let mut wait = Duration::from_millis(500);
    loop {
        match store.register_machine(record, ttl).await {
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
/// a restarted fleetd recognizes its own registration (see `AgentStore::register_machine`).
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
    async fn run(mut self, shutdown: CancellationToken, purge: Arc<AtomicBool>) {
        let poll = self.cfg.disable_watches.then_some(Duration::from_secs(2));
        let mut watch = self.store.watch_agent(&self.cfg.machine_id, poll);
        let mut signals = self.subscribe().await;
        // Adopted units: publish their states under this fleetd's lease (the records a
        // previous fleetd wrote die with its lease).
        self.refresh_states(None).await;
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut deadline: Option<tokio::time::Instant> = None;
        let mut last_reconcile: Option<tokio::time::Instant> = None;
        loop {
            let event = {
                let soon = async {
                    match deadline {
                        Some(d) => tokio::time::sleep_until(d).await,
                        None => std::future::pending().await,
                    }
                };
                let flush_at = self.publisher.next_flush();
                let flush = async {
                    match flush_at {
                        Some(at) => tokio::time::sleep_until(at).await,
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
                // (in this order when several are ready, not at random: what the agent does
                // then depends only on what happened, which the incremental reconciles'
                // equivalence test relies on; a lost lease and the fence come first)
                tokio::select! {
                    biased;
                    _ = shutdown.cancelled() => Event::Shutdown,
                    _ = self.lease.lost() => Event::LeaseLost,
                    _ = self.fence.changed() => Event::Fence,
                    ev = watch.recv() => ev.map(Event::Watch).unwrap_or(Event::WatchClosed),
                    ev = sys => ev,
                    _ = tick.tick() => Event::Tick,
                    _ = soon => { deadline = None; Event::Due }
                    _ = flush => Event::Flush,
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
                        let quiet = last_reconcile.is_none_or(|t| t.elapsed() >= DEBOUNCE);
                        let wait = if quiet { PROMPT } else { DEBOUNCE };
                        deadline = Some(tokio::time::Instant::now() + wait);
                    }
                }
                Event::WatchClosed => {
                    watch = self.store.watch_agent(&self.cfg.machine_id, poll);
                    self.synced = false;
                }
                Event::Systemd(UnitEvent::Changed(change)) => {
                    self.state_changes(change, signals.as_mut()).await;
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
                Event::Fence => {
                    self.full_next = true;
                    let raised = self.fence.raised();
                    let missed = raised != self.fences_seen;
                    self.fences_seen = raised;
                    if self.fence.is_fenced() {
                        self.fenced().await;
                    } else if missed {
                        // raised and lifted since the last look: the guard stopped them
                        self.mark_stopped_by_guard();
                    }
                    if !self.fence.is_fenced() && self.synced && deadline.is_none() {
                        // lifted: start again what must run
                        deadline = Some(tokio::time::Instant::now() + DEBOUNCE);
                    }
                }
                Event::Flush => self.publisher.flush_held(&self.lease).await,
                Event::Tick | Event::Due => {
                    if self.publisher.has_unsent() {
                        self.retry_unsent().await;
                    }
                    // after a change, and periodically (every unit): does what runs match
                    // what is wanted? (a reconcile that could not finish is simply tried at
                    // the next tick)
                    if self.synced {
                        self.reconcile(matches!(event, Event::Tick)).await;
                        last_reconcile = Some(tokio::time::Instant::now());
                    }
                }
            }
        }
    }

    /// Takes every state change already queued after `first`, and publishes them as one
    /// batch (of at most [`MAX_BATCH`]; the rest waits for the next turn of the loop).
    async fn state_changes(
        &mut self,
        first: StateChange,
        mut signals: Option<&mut mpsc::Receiver<UnitEvent>>,
    ) {
        let mut changed = Vec::new();
        let mut resync = None;
        let mut next = Some(first);
        while let Some(change) = next.take() {
            if let Some(s) = change.state {
                self.systemd_states.insert(change.name.clone(), s);
                changed.push(change.name);
            }
            if changed.len() >= MAX_BATCH {
                break;
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
                self.mirror.replace(kvs);
                self.synced = true;
                self.full_next = true;
                true
            }
            WatchEvent::Put { key, value, .. } => {
                let change = self.mirror.put(&key, &value);
                self.note(change);
                true
            }
            WatchEvent::Delete { key, .. } => {
                let change = self.mirror.delete(&key);
                self.note(change);
                true
            }
            // (each event stands alone for an agent: one key per unit)
            WatchEvent::Through { .. } => false,
            WatchEvent::Disconnected => {
                // desired state unknown from now on: keep everything as it is
                warn!("lost etcd; keeping units as they are until it is back");
                self.synced = false;
                false
            }
        }
    }

    /// Records what an event changed for the next reconcile.
    fn note(&mut self, change: Change) {
        match change {
            Change::Scheduled { name, old } => {
                // the version a global unit's eligibility was last decided with
                if self.touches_globals(name.as_str(), old.as_ref().and_then(Entry::req)) {
                    self.full_next = true;
                }
                self.changed.insert(name);
            }
            Change::Global => self.full_next = true,
            Change::Nothing => {}
        }
    }

    /// Whether the scheduled unit `name` (with `req`) may bear on a global unit's eligibility
    /// here: it is named as one, or it is in conflict with one either way (the rule's only
    /// use of the other units). A global unit whose requirements are not known counts as
    /// touched.
    fn touches_globals(&self, name: &str, req: Option<&Requirements>) -> bool {
        self.mirror.globals.iter().any(|(g, entry)| {
            g.as_str() == name
                || match entry {
                    Entry::Readable {
                        req: Some(greq), ..
                    } => {
                        greq.conflicts_with(name)
                            || req.is_some_and(|r| r.conflicts_with(g.as_str()))
                    }
                    Entry::Readable { req: None, .. } => true,
                    Entry::Unreadable => false,
                }
        })
    }

    /// Learns the requirements of `missing` (`(global, name, hash)`, in key order), their
    /// bodies read in a few requests rather than one after the other (a burst brings
    /// hundreds at once), then one by one what that did not bring. A body that cannot be used
    /// leaves its entry without requirements (the unit is left as it is); an error when the
    /// registry cannot be reached.
    async fn learn_requirements(
        &mut self,
        missing: Vec<(bool, UnitName, UnitHash)>,
    ) -> Result<(), RegistryError> {
        let mut bodies = HashMap::new();
        if missing.len() >= 2 {
            let mut hashes: Vec<UnitHash> = missing.iter().map(|(_, _, h)| *h).collect();
            hashes.sort_unstable();
            hashes.dedup();
            if let Ok(b) = self.store.bodies(&hashes).await {
                bodies = b;
            }
        }
        for (global, name, hash) in missing {
            let req = match bodies.get(&hash) {
                Some(file) => requirements(&name, file),
                None => match self.store.body(&hash).await {
                    Ok(file) => requirements(&name, &file),
                    Err(e) if e.is_unavailable() => {
                        warn!(unit = %name, error = %e, "cannot read unit body; will retry");
                        return Err(e);
                    }
                    Err(e) => {
                        // a body missing or damaged for good: this unit cannot be
                        // (re)written, but it must not hold up every other unit of this machine
                        warn!(unit = %name, error = %e, "unusable unit body; leaving the unit as it is");
                        continue;
                    }
                },
            };
            if let Some(Entry::Readable { req: slot, .. }) =
                self.mirror.entry_mut(global, name.as_str())
            {
                *slot = Some(Arc::new(req));
            }
        }
        Ok(())
    }

    /// Brings systemd in line with the mirror: with `full` (the periodic tick), or when a
    /// change may bear on every unit (`full_next`), by a pass over every unit; otherwise over
    /// the units whose records changed since the last reconcile, and the failing ones. Both
    /// decide the same: after a reconcile that finished, every other unit already is where
    /// its unchanged record wants it. Returns false when it could not finish (a registry
    /// error reading a body) and should be tried again (then by a full pass).
    async fn reconcile(&mut self, full: bool) -> bool {
        let changed = std::mem::take(&mut self.changed);
        let full = std::mem::take(&mut self.full_next)
            || full
            || !self.incremental
            || !self.adopted.is_empty()
            // (fenced: `fenced` asked for one already; this one is for good measure)
            || self.fence.is_fenced();
        let complete = if full {
            self.reconcile_all().await
        } else {
            self.reconcile_changed(changed).await
        };
        if !complete {
            self.full_next = true;
        }
        complete
    }

    /// The full pass: every unit of the mirror.
    async fn reconcile_all(&mut self) -> bool {
        let missing: Vec<(bool, UnitName, UnitHash)> = (self.mirror.globals.iter())
            .map(|(n, e)| (true, n, e))
            .chain(self.mirror.schedule.iter().map(|(n, e)| (false, n, e)))
            .filter_map(|(global, name, entry)| match entry {
                Entry::Readable {
                    hash, req: None, ..
                } => Some((global, name.clone(), *hash)),
                _ => None,
            })
            .collect();
        if self.learn_requirements(missing).await.is_err() {
            return false;
        }
        let mut metadata = self.cfg.metadata.clone();
        metadata.extend((self.mirror.metadata.iter()).map(|(k, v)| (k.clone(), v.clone())));
        let machine = Machine {
            id: self.cfg.machine_id.clone(),
            metadata,
        };
        let mut unreadable: Vec<String> = Vec::new();
        let mut at_most_once_wanted = BTreeSet::new();
        let (desired, refused) = {
            let mut scheduled = Vec::with_capacity(self.mirror.schedule.len());
            let mut globals = Vec::with_capacity(self.mirror.globals.len());
            for (global, part) in [(true, &self.mirror.globals), (false, &self.mirror.schedule)] {
                for (name, entry) in part {
                    match entry {
                        Entry::Readable {
                            hash,
                            state,
                            req: Some(req),
                        } => {
                            if req.at_most_once && !global {
                                at_most_once_wanted.insert(name.to_string());
                            }
                            let c = Candidate {
                                name,
                                hash: *hash,
                                state: *state,
                                requirements: req,
                            };
                            if global {
                                globals.push(c);
                            } else {
                                scheduled.push(c);
                            }
                        }
                        // a record not understood, or a body that cannot be used
                        _ => unreadable.push(name.to_string()),
                    }
                }
            }
            desired_units(&machine, &scheduled, &globals)
        };
        let mut desired: BTreeMap<String, Desired> = desired
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect();
        // what cannot be read stays as it is: never stopped because of a record we do not
        // understand
        for name in unreadable {
            if let Some(cur) = self.current.get(&name) {
                let keep = Desired {
                    hash: cur.hash,
                    state: cur.state,
                };
                desired.insert(name, keep);
            }
        }
        // at-most-once units wanted here, and those still here that were (unreadable now)
        self.at_most_once_wanted = at_most_once_wanted;
        let at_most_once = self.at_most_once_units();
        // fenced: at-most-once units stay loaded, not running (recorded before any start)
        let fenced = self.fence.set_units(at_most_once.clone());
        if fenced {
            for (name, d) in desired.iter_mut() {
                if d.state == TargetState::Launched && at_most_once.contains(name.as_str()) {
                    d.state = TargetState::Loaded;
                }
            }
        }
        self.resolve_adopted(&desired).await;
        if refused != self.refused_globals {
            for (name, reason) in &refused {
                info!(unit = %name, %reason, "global unit does not run on this machine");
            }
            self.refused_globals = refused;
        }
        let complete = self.converge(desired, None).await;
        if !fenced && self.fence.is_fenced() {
            // fenced while this converge ran: what it started after the guard's stops must
            // stop too
            self.fenced().await;
        }
        complete
    }

    /// The partial pass: the units in `changed` and the failing ones, the others being where
    /// their unchanged records want them. Falls back to the full pass when one of them bears
    /// on a global unit.
    async fn reconcile_changed(&mut self, changed: BTreeSet<UnitName>) -> bool {
        let mut scope: BTreeSet<String> = changed.iter().map(UnitName::to_string).collect();
        scope.extend(self.faults.names().cloned());
        if scope
            .iter()
            .any(|n| self.mirror.globals.contains_key(n.as_str()))
        {
            return self.reconcile_all().await;
        }
        let missing: Vec<(bool, UnitName, UnitHash)> = scope
            .iter()
            .filter_map(|n| match self.mirror.schedule.get_key_value(n.as_str()) {
                Some((
                    name,
                    Entry::Readable {
                        hash, req: None, ..
                    },
                )) => Some((false, name.clone(), *hash)),
                _ => None,
            })
            .collect();
        if self.learn_requirements(missing).await.is_err() {
            return false;
        }
        let mut desired: BTreeMap<String, Desired> = BTreeMap::new();
        for name in &scope {
            self.at_most_once_wanted.remove(name);
            match self.mirror.schedule.get(name.as_str()) {
                Some(Entry::Readable {
                    hash,
                    state,
                    req: Some(req),
                }) => {
                    if self.touches_globals(name, Some(req)) {
                        return self.reconcile_all().await;
                    }
                    if req.at_most_once {
                        self.at_most_once_wanted.insert(name.clone());
                    }
                    if *state != TargetState::Inactive {
                        let d = Desired {
                            hash: *hash,
                            state: *state,
                        };
                        desired.insert(name.clone(), d);
                    }
                }
                // a record not understood, or a body that cannot be used: left as it is
                Some(_) => {
                    if let Some(cur) = self.current.get(name) {
                        let keep = Desired {
                            hash: cur.hash,
                            state: cur.state,
                        };
                        desired.insert(name.clone(), keep);
                    }
                }
                None => {}
            }
        }
        let at_most_once = self.at_most_once_units();
        let fenced = self.fence.set_units(at_most_once.clone());
        if fenced {
            // raised since this reconcile began: the next one looks at every unit
            self.full_next = true;
            for (name, d) in desired.iter_mut() {
                if d.state == TargetState::Launched && at_most_once.contains(name.as_str()) {
                    d.state = TargetState::Loaded;
                }
            }
        }
        let complete = self.converge(desired, Some(&scope)).await;
        if !fenced && self.fence.is_fenced() {
            self.fenced().await;
        }
        complete
    }

    /// The at-most-once units wanted here, and those still here that were (their record or
    /// body unreadable now, or replaced by one that is not at-most-once).
    fn at_most_once_units(&self) -> BTreeSet<String> {
        let mut units: BTreeSet<String> = self
            .fence
            .units()
            .into_iter()
            .filter(|n| self.current.contains_key(n))
            .collect();
        units.extend(self.at_most_once_wanted.iter().cloned());
        units
    }

    /// The guard fenced the at-most-once units (and stopped them): none of them runs, as far
    /// as this agent is concerned, until the fence is lifted and a reconcile starts them.
    async fn fenced(&mut self) {
        // it changes what runs behind the reconciles' back
        self.full_next = true;
        let mut stopped = Vec::new();
        for name in self.fence.units() {
            let launched = self
                .current
                .get(&name)
                .is_some_and(|c| c.state == TargetState::Launched);
            if !launched {
                continue;
            }
            let r = crate::executor::stopped(self.systemd.stop(&name).await);
            // a failed stop leaves it launched: a reconcile stops it again, and the guard
            // retries its own stops meanwhile
            if self.task("stop", &name, r)
                && let Some(cur) = self.current.get_mut(&name)
            {
                cur.state = TargetState::Loaded;
            }
            stopped.push(name);
        }
        if !stopped.is_empty() {
            self.refresh_states(Some(&stopped)).await;
        }
    }

    /// The guard stopped the at-most-once units while this agent did not look: they are
    /// loaded, not launched, so that a reconcile starts them again.
    fn mark_stopped_by_guard(&mut self) {
        self.full_next = true;
        for name in self.fence.units() {
            if let Some(cur) = self.current.get_mut(&name)
                && cur.state == TargetState::Launched
            {
                cur.state = TargetState::Loaded;
            }
        }
    }

    /// The registry says the lease is gone (it expired while this machine could not reach
    /// etcd): register again and publish every state again under the new lease. Units keep
    /// running meanwhile, except the at-most-once ones: the engine may be moving them, so
    /// they stop first, whether or not registering again succeeds.
    async fn reregister(&mut self, shutdown: &CancellationToken) {
        warn!("machine lease lost; registering again");
        self.fence.raise();
        self.fences_seen = self.fence.raised();
        self.fenced().await;
        let lease = tokio::select! {
            l = register(self.store.as_ref(), &self.record, self.cfg.agent_ttl) => l,
            _ = shutdown.cancelled() => return,
        };
        match lease {
            Ok(l) => {
                // the engine may be moving this machine's at-most-once units: they stay
                // stopped until its decision is surely visible
                let timing = AtMostOnce::for_ttl(self.cfg.agent_ttl);
                self.fence = Fence::new(
                    &l,
                    timing,
                    self.systemd.clone(),
                    self.fence.units(),
                    Some(timing.hold_after_rejoin),
                );
                self.lease = l;
                self.fences_seen = self.fence.raised();
                // (stopped above; one whose stop failed is tried again)
                self.fenced().await;
                self.publisher.forget_all();
                let names: Vec<String> = self.reported_units();
                for n in names {
                    self.publish_all(std::slice::from_ref(&n)).await;
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
                let r = crate::executor::stopped(self.systemd.stop(name).await);
                self.task("stop", name, r);
            }
        }
        let all: Vec<String> = names.iter().map(|(n, _)| n.clone()).collect();
        if !all.is_empty() {
            let r = self.systemd.remove_units(&all).await;
            self.task("unload", &all.join(" "), r);
        }
        if !names.is_empty() {
            let _ = self.systemd.reload().await;
        }
        for (name, _) in &names {
            self.publisher.withdraw(name, &self.lease).await;
        }
        self.store
            .withdraw_machine(&self.cfg.machine_id, self.lease)
            .await;
    }
}

/// A unit's `[X-Fleet]` requirements; invalid ones (logged) count as none.
fn requirements(name: &UnitName, file: &fleet_unit::UnitFile) -> Requirements {
    match Requirements::from_unit(name, file) {
        Ok((r, _)) => r,
        Err(e) => {
            warn!(unit = %name, error = %e, "invalid requirements; treating as none");
            Requirements::default()
        }
    }
}
