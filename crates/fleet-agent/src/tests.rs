//! The agent's loop against in-memory twins of the registry ([`MemoryStore`]) and of systemd
//! ([`FakeUnitManager`]), in paused time: one test per invariant of ARCHITECTURE.md the agent
//! owns, and regression tests for fixes that had none.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use fleet_metrics::Metrics;
use fleet_registry::{MemoryStore, RegistryError, ScheduleRecord, StateRecord};
use fleet_systemd::SystemdState;
use fleet_systemd::fake::{Call, FakeUnitManager};
use fleet_unit::{TargetState, UnitFile, UnitName};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::{AgentConfig, run};

const TTL: Duration = Duration::from_secs(10);
const M1: &str = "m1";

fn body(n: u32) -> UnitFile {
    UnitFile::parse(&format!("[Service]\nExecStart=/bin/sleep {n}\n")).expect("unit")
}

/// A running agent of machine `m1`.
struct Agent {
    shutdown: CancellationToken,
    purge: Arc<AtomicBool>,
    task: JoinHandle<Result<(), RegistryError>>,
}

impl Agent {
    fn start(store: &MemoryStore, systemd: &FakeUnitManager, dir: &tempfile::TempDir) -> Agent {
        Agent::start_with(store, systemd, dir, Metrics::new())
    }

    fn start_with(
        store: &MemoryStore,
        systemd: &FakeUnitManager,
        dir: &tempfile::TempDir,
        metrics: Metrics,
    ) -> Agent {
        let cfg = AgentConfig {
            machine_id: M1.into(),
            public_ip: "10.0.0.1".into(),
            metadata: BTreeMap::new(),
            agent_ttl: TTL,
            units_directory: dir.path().join("units"),
            disable_watches: false,
            version: "1.0.0".into(),
        };
        let shutdown = CancellationToken::new();
        let purge = Arc::new(AtomicBool::new(false));
        let task = tokio::spawn(run(
            Arc::new(store.clone()),
            Arc::new(systemd.clone()),
            cfg,
            metrics,
            shutdown.clone(),
            purge.clone(),
        ));
        Agent {
            shutdown,
            purge,
            task,
        }
    }

    /// Stops the agent; with `purge`, as on SIGTERM.
    async fn stop(self, purge: bool) {
        self.purge.store(purge, std::sync::atomic::Ordering::SeqCst);
        self.shutdown.cancel();
        self.task.await.expect("agent task").expect("agent");
    }
}

/// Waits (in paused time) until `cond` holds; fails after a minute of virtual time.
async fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    let held =
        fleet_testutil::eventually(Duration::from_secs(60), || std::future::ready(cond())).await;
    assert!(held, "never happened: {what}");
}

/// Lets the agent run for `d` of virtual time.
async fn idle(d: Duration) {
    tokio::time::sleep(d).await;
}

/// Creates `name` and schedules it on `machine`, as fleetctl and the engine would.
async fn schedule(store: &MemoryStore, machine: &str, name: &str, file: &UnitFile, s: TargetState) {
    let unit: UnitName = name.parse().expect("name");
    if store.unit(&unit).await.expect("unit").is_none() {
        store.create_unit(&unit, file, s).await.expect("create");
    }
    let rec = ScheduleRecord {
        version: 1,
        hash: file.hash(),
        desired_state: s,
    };
    store.put(
        &store.keys().schedule(machine, name),
        serde_json::to_vec(&rec).expect("json"),
    );
}

fn state_of(store: &MemoryStore, unit: &str) -> Option<StateRecord> {
    let v = store.get(&store.keys().state(unit, M1))?;
    serde_json::from_slice(&v).ok()
}

fn active(systemd: &FakeUnitManager, unit: &str) -> bool {
    matches!(
        futures_util::FutureExt::now_or_never(
            fleet_systemd::UnitManager::states(systemd, &[unit.to_string()])
        ),
        Some(Ok(s)) if s.get(unit).is_some_and(|s| s.active_state == "active")
    )
}

fn count(systemd: &FakeUnitManager, f: impl Fn(&Call) -> bool) -> usize {
    systemd.calls().iter().filter(|c| f(c)).count()
}

#[tokio::test(start_paused = true)]
async fn runs_its_schedule_with_one_reload_per_batch() {
    let (store, systemd, dir) = (
        MemoryStore::default(),
        FakeUnitManager::new(),
        tempfile::tempdir().expect("dir"),
    );
    let agent = Agent::start(&store, &systemd, &dir);
    eventually("registered", || {
        store.get(&store.keys().machine(M1)).is_some()
    })
    .await;
    // one unit only to be loaded makes the batch need a reload: exactly one
    for n in 1..=5 {
        schedule(
            &store,
            M1,
            &format!("u{n}.service"),
            &body(n),
            TargetState::Launched,
        )
        .await;
    }
    schedule(&store, M1, "loaded.service", &body(9), TargetState::Loaded).await;
    eventually("five started", || {
        (1..=5).all(|n| active(&systemd, &format!("u{n}.service")))
    })
    .await;
    eventually("states published", || {
        (1..=5).all(|n| {
            state_of(&store, &format!("u{n}.service")).is_some_and(|s| s.active_state == "active")
        })
    })
    .await;
    assert_eq!(systemd.reload_count(), 1, "{:?}", systemd.calls());
    let calls = systemd.calls();
    let reload_at = calls
        .iter()
        .position(|c| *c == Call::Reload)
        .expect("a reload");
    assert!(
        calls[..reload_at]
            .iter()
            .all(|c| matches!(c, Call::WriteUnit(_)))
    );
    assert!(
        calls[reload_at + 1..]
            .iter()
            .all(|c| matches!(c, Call::Start(_)))
    );
    assert_eq!(
        state_of(&store, "loaded.service").map(|s| s.agent_state),
        Some(TargetState::Loaded)
    );
    // a batch of units only to be started needs none (systemd loads them on StartUnit)
    schedule(&store, M1, "u6.service", &body(6), TargetState::Launched).await;
    eventually("u6 started", || active(&systemd, "u6.service")).await;
    assert_eq!(systemd.reload_count(), 1);
    agent.stop(false).await;
}

/// Unknown is not empty: while the registry is out of reach (even past the lease), nothing
/// is stopped; once it answers again with the same schedule, nothing is restarted.
#[tokio::test(start_paused = true)]
async fn unknown_is_not_empty() {
    let (store, systemd, dir) = (
        MemoryStore::default(),
        FakeUnitManager::new(),
        tempfile::tempdir().expect("dir"),
    );
    let agent = Agent::start(&store, &systemd, &dir);
    schedule(&store, M1, "a.service", &body(1), TargetState::Launched).await;
    eventually("started", || active(&systemd, "a.service")).await;
    systemd.clear_calls();
    store.set_reachable(false);
    idle(TTL * 3).await;
    assert!(active(&systemd, "a.service"));
    assert_eq!(
        systemd.calls(),
        vec![],
        "the agent touched systemd while the registry was away"
    );
    store.set_reachable(true);
    eventually("registered again", || {
        store.get(&store.keys().machine(M1)).is_some()
    })
    .await;
    eventually("state published again", || {
        state_of(&store, "a.service").is_some()
    })
    .await;
    idle(Duration::from_secs(20)).await;
    assert_eq!(
        systemd.calls(),
        vec![],
        "the unit was restarted after the registry came back"
    );
    // what the test would see if the agent acted on an empty view: the unit goes
    store.delete(&store.keys().schedule(M1, "a.service"));
    eventually("stopped once unscheduled", || {
        !active(&systemd, "a.service")
    })
    .await;
    agent.stop(false).await;
}

/// Regression (77df6a7): a schedule record this agent cannot read leaves the unit running
/// as it is, and does not hold up other units.
#[tokio::test(start_paused = true)]
async fn unreadable_records_leave_units_running() {
    let (store, systemd, dir) = (
        MemoryStore::default(),
        FakeUnitManager::new(),
        tempfile::tempdir().expect("dir"),
    );
    let agent = Agent::start(&store, &systemd, &dir);
    schedule(&store, M1, "a.service", &body(1), TargetState::Launched).await;
    eventually("started", || active(&systemd, "a.service")).await;
    systemd.clear_calls();
    store.put(
        &store.keys().schedule(M1, "a.service"),
        "{\"from\": \"a newer fleet\"",
    );
    store.put(&store.keys().schedule(M1, "new.service"), "not json");
    schedule(&store, M1, "b.service", &body(2), TargetState::Launched).await;
    eventually("b started", || active(&systemd, "b.service")).await;
    idle(Duration::from_secs(20)).await;
    assert!(active(&systemd, "a.service"));
    assert_eq!(
        count(&systemd, |c| matches!(
            c,
            Call::Stop(_) | Call::RemoveUnit(_)
        )),
        0,
        "{:?}",
        systemd.calls()
    );
    assert!(systemd.file("new.service").is_none());
    agent.stop(false).await;
}

/// A restarted fleetd adopts its units without restarting them, and (regression, a6b8caf)
/// publishes their states under its own lease: the killed one's records expire with its.
#[tokio::test(start_paused = true)]
async fn a_restarted_fleetd_adopts_and_republishes_its_units() {
    let (store, systemd, dir) = (
        MemoryStore::default(),
        FakeUnitManager::new(),
        tempfile::tempdir().expect("dir"),
    );
    let first = Agent::start(&store, &systemd, &dir);
    schedule(&store, M1, "a.service", &body(1), TargetState::Launched).await;
    schedule(&store, M1, "b.service", &body(2), TargetState::Loaded).await;
    eventually("published", || {
        state_of(&store, "a.service").is_some() && state_of(&store, "b.service").is_some()
    })
    .await;
    let old_lease = store.lease_of(&store.keys().machine(M1)).expect("lease");
    first.stop(false).await; // as killed: nothing purged
    store.expire_lease(old_lease);
    assert!(state_of(&store, "a.service").is_none());
    systemd.clear_calls();
    let second = Agent::start(&store, &systemd, &dir);
    eventually("states published again", || {
        state_of(&store, "a.service").is_some_and(|s| s.active_state == "active")
            && state_of(&store, "b.service").is_some()
    })
    .await;
    idle(Duration::from_secs(20)).await;
    assert_eq!(systemd.calls(), vec![], "adopted units were touched");
    assert_eq!(systemd.reload_count(), 1);
    let new_lease = store.lease_of(&store.keys().state("a.service", M1));
    assert!(new_lease.is_some() && new_lease != Some(old_lease));
    second.stop(false).await;
}

/// The agent's lease lost (the registry away for a whole ttl): it registers again and
/// publishes every state again, keeping its units running.
#[tokio::test(start_paused = true)]
async fn a_lost_lease_is_replaced_and_states_published_again() {
    let (store, systemd, dir) = (
        MemoryStore::default(),
        FakeUnitManager::new(),
        tempfile::tempdir().expect("dir"),
    );
    let agent = Agent::start(&store, &systemd, &dir);
    schedule(&store, M1, "a.service", &body(1), TargetState::Launched).await;
    eventually("published", || state_of(&store, "a.service").is_some()).await;
    let lease = store.lease_of(&store.keys().machine(M1)).expect("lease");
    store.expire_lease(lease);
    eventually("registered again", || {
        store
            .lease_of(&store.keys().machine(M1))
            .is_some_and(|l| l != lease)
    })
    .await;
    eventually("published again", || {
        state_of(&store, "a.service").is_some()
    })
    .await;
    assert_eq!(count(&systemd, |c| matches!(c, Call::Stop(_))), 0);
    agent.stop(false).await;
}

/// State is event-driven: a change systemd reports is published without a reconcile, and
/// only when it changed.
#[tokio::test(start_paused = true)]
async fn states_follow_systemd_signals() {
    let (store, systemd, dir) = (
        MemoryStore::default(),
        FakeUnitManager::new(),
        tempfile::tempdir().expect("dir"),
    );
    let agent = Agent::start(&store, &systemd, &dir);
    schedule(&store, M1, "a.service", &body(1), TargetState::Launched).await;
    eventually("published", || {
        state_of(&store, "a.service").is_some_and(|s| s.active_state == "active")
    })
    .await;
    systemd
        .set_state("a.service", SystemdState::new("loaded", "failed", "failed"))
        .await;
    eventually("failure published", || {
        state_of(&store, "a.service").is_some_and(|s| s.active_state == "failed")
    })
    .await;
    agent.stop(false).await;
}

/// SIGTERM (purge): units stopped and unloaded, states and presence withdrawn at once.
#[tokio::test(start_paused = true)]
async fn purge_stops_unloads_and_withdraws() {
    let (store, systemd, dir) = (
        MemoryStore::default(),
        FakeUnitManager::new(),
        tempfile::tempdir().expect("dir"),
    );
    let metrics = Metrics::new();
    let agent = Agent::start_with(&store, &systemd, &dir, metrics.clone());
    schedule(&store, M1, "a.service", &body(1), TargetState::Launched).await;
    eventually("published", || state_of(&store, "a.service").is_some()).await;
    agent.stop(true).await;
    assert!(!active(&systemd, "a.service"));
    assert!(systemd.file("a.service").is_none());
    assert!(state_of(&store, "a.service").is_none());
    assert!(store.get(&store.keys().machine(M1)).is_none());
    // tasks are counted by type where they happen
    let text = metrics.encode();
    for line in [
        "fleet_agent_task_count_total{type=\"load\"} 1",
        "fleet_agent_task_count_total{type=\"start\"} 1",
        "fleet_agent_task_count_total{type=\"stop\"} 1",
        "fleet_agent_task_count_total{type=\"unload\"} 1",
    ] {
        assert!(text.contains(line), "missing {line:?} in\n{text}");
    }
}

/// An [`AgentStore`](fleet_registry::AgentStore) that counts how the agent reads unit bodies:
/// one by one (`body`) or several at once (`bodies`).
struct CountingStore {
    inner: MemoryStore,
    one_by_one: std::sync::atomic::AtomicUsize,
    together: std::sync::atomic::AtomicUsize,
}

#[async_trait::async_trait]
impl fleet_registry::AgentStore for CountingStore {
    fn keys(&self) -> &fleet_registry::keys::Keys {
        self.inner.keys()
    }
    async fn register_machine(
        &self,
        rec: &fleet_registry::MachineRecord,
        ttl: Duration,
    ) -> fleet_registry::Result<fleet_registry::Lease> {
        self.inner.register_machine(rec, ttl).await
    }
    async fn withdraw_machine(&self, id: &str, lease: fleet_registry::Lease) {
        self.inner.withdraw_machine(id, lease).await
    }
    fn watch_agent(
        &self,
        machine_id: &str,
        poll: Option<Duration>,
    ) -> tokio::sync::mpsc::Receiver<fleet_registry::WatchEvent> {
        self.inner.watch_agent(machine_id, poll)
    }
    async fn body(&self, hash: &fleet_unit::UnitHash) -> fleet_registry::Result<UnitFile> {
        self.one_by_one
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        self.inner.body(hash).await
    }
    async fn bodies(
        &self,
        hashes: &[fleet_unit::UnitHash],
    ) -> fleet_registry::Result<std::collections::HashMap<fleet_unit::UnitHash, UnitFile>> {
        self.together
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        fleet_registry::AgentStore::bodies(&self.inner, hashes).await
    }
    async fn publish_state(
        &self,
        name: &str,
        machine_id: &str,
        state: Option<&StateRecord>,
        lease: &fleet_registry::Lease,
    ) -> fleet_registry::Result<()> {
        self.inner
            .publish_state(name, machine_id, state, lease)
            .await
    }
}

/// A burst of units scheduled on the machine at once: the agent reads their bodies in one
/// request, not one request per unit after the other.
#[tokio::test(start_paused = true)]
async fn reads_the_bodies_of_a_burst_together() {
    let (store, systemd, dir) = (
        MemoryStore::default(),
        FakeUnitManager::new(),
        tempfile::tempdir().expect("tempdir"),
    );
    let names: Vec<String> = (0..40).map(|i| format!("burst{i}.service")).collect();
    for (i, name) in names.iter().enumerate() {
        schedule(&store, M1, name, &body(i as u32), TargetState::Launched).await;
    }
    let counting = Arc::new(CountingStore {
        inner: store.clone(),
        one_by_one: Default::default(),
        together: Default::default(),
    });
    let cfg = AgentConfig {
        machine_id: M1.into(),
        public_ip: "10.0.0.1".into(),
        metadata: BTreeMap::new(),
        agent_ttl: TTL,
        units_directory: dir.path().join("units"),
        disable_watches: false,
        version: "1.0.0".into(),
    };
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(run(
        counting.clone(),
        Arc::new(systemd.clone()),
        cfg,
        Metrics::new(),
        shutdown.clone(),
        Arc::new(AtomicBool::new(false)),
    ));
    eventually("every unit of the burst active", || {
        names.iter().all(|n| active(&systemd, n))
    })
    .await;
    let load = |c: &std::sync::atomic::AtomicUsize| c.load(std::sync::atomic::Ordering::SeqCst);
    // one read for their requirements, one for their files (a cache hit on etcd)
    assert_eq!(
        (load(&counting.one_by_one), load(&counting.together)),
        (0, 2),
        "body reads (one by one, together)"
    );
    shutdown.cancel();
    task.await.expect("agent task").expect("agent");
}

/// A unit scheduled on an idle machine (one `fleetctl start`) is started within a few
/// milliseconds, not held for the burst debounce.
#[tokio::test(start_paused = true)]
async fn a_unit_scheduled_after_a_quiet_spell_starts_promptly() {
    let (store, systemd, dir) = (
        MemoryStore::default(),
        FakeUnitManager::new(),
        tempfile::tempdir().expect("dir"),
    );
    let agent = Agent::start(&store, &systemd, &dir);
    eventually("registered", || {
        store.get(&store.keys().machine(M1)).is_some()
    })
    .await;
    idle(Duration::from_secs(1)).await;
    schedule(
        &store,
        M1,
        "single.service",
        &body(1),
        TargetState::Launched,
    )
    .await;
    idle(Duration::from_millis(5)).await;
    assert!(active(&systemd, "single.service"), "{:?}", systemd.calls());
    agent.stop(false).await;
}
