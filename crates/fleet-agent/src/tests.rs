//! The agent's loop against in-memory twins of the registry ([`MemoryStore`]) and of systemd
//! ([`FakeUnitManager`]), in paused time: one test per invariant of ARCHITECTURE.md the agent
//! owns, and regression tests for fixes that had none.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use fleet_metrics::Metrics;
use fleet_registry::{MemoryStore, RegistryError, StateRecord};
use fleet_systemd::SystemdState;
use fleet_systemd::fake::{Call, FakeUnitManager};
use fleet_testutil::records::{self, body};
use fleet_unit::{TargetState, UnitFile, UnitName};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::{AgentConfig, run};

mod incremental;

const TTL: Duration = Duration::from_secs(10);
const M1: &str = "m1";

/// An empty store, an idle systemd and a scratch directory for the units.
fn twins() -> (MemoryStore, FakeUnitManager, tempfile::TempDir) {
    (
        MemoryStore::default(),
        FakeUnitManager::new(),
        tempfile::tempdir().expect("dir"),
    )
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
    let rec = records::schedule(file.hash(), s);
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
    let (store, systemd, dir) = twins();
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
    let (store, systemd, dir) = twins();
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
    let (store, systemd, dir) = twins();
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
    let (store, systemd, dir) = twins();
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

/// A first agent ran `a.service` and was killed (nothing purged), then the unit's link went
/// (systemd reloaded); with `stopped`, the unit had ended before, and systemd forgot it.
async fn left_unlinked(
    store: &MemoryStore,
    systemd: &FakeUnitManager,
    dir: &tempfile::TempDir,
    stopped: bool,
) {
    let first = Agent::start(store, systemd, dir);
    schedule(store, M1, "a.service", &body(1), TargetState::Launched).await;
    eventually("started", || active(systemd, "a.service")).await;
    first.stop(false).await;
    if stopped {
        systemd
            .set_state("a.service", SystemdState::new("loaded", "inactive", "dead"))
            .await;
    }
    systemd.unlink("a.service").await;
}

/// A fleetd killed between writing a unit's file and linking it left a file systemd cannot
/// find. Its successor adopted it as loaded and its start failed at every retry (regression:
/// 11 of 300 units stayed down in a chaos run); now a start that systemd answers "not found"
/// while the file is here links the file again, reloads once and starts it.
#[tokio::test(start_paused = true)]
async fn a_unit_file_left_unlinked_by_a_killed_fleetd_is_linked_and_started() {
    let (store, systemd, dir) = twins();
    left_unlinked(&store, &systemd, &dir, true).await;
    let reloads = systemd.reload_count();
    systemd.clear_calls();
    let second = Agent::start(&store, &systemd, &dir);
    eventually("started again", || active(&systemd, "a.service")).await;
    assert_eq!(
        systemd.calls(),
        vec![
            Call::Start("a.service".into()),
            Call::WriteUnit("a.service".into()),
            Call::Reload,
            Call::Start("a.service".into()),
        ],
    );
    assert_eq!(systemd.reload_count(), reloads + 1);
    second.stop(false).await;
}

/// A unit whose link is gone while it runs: adopted as running, then stopped and started
/// again by fleet, it is linked again at that start (systemd refuses to start a unit it
/// knows only as not found).
#[tokio::test(start_paused = true)]
async fn a_running_unit_whose_link_is_gone_starts_again_after_a_stop() {
    let (store, systemd, dir) = twins();
    left_unlinked(&store, &systemd, &dir, false).await;
    let second = Agent::start(&store, &systemd, &dir);
    idle(Duration::from_secs(5)).await;
    assert!(active(&systemd, "a.service"), "adopted, not restarted");
    schedule(&store, M1, "a.service", &body(1), TargetState::Loaded).await;
    eventually("stopped", || !active(&systemd, "a.service")).await;
    schedule(&store, M1, "a.service", &body(1), TargetState::Launched).await;
    eventually("started again", || active(&systemd, "a.service")).await;
    second.stop(false).await;
}

/// A unit whose file went behind fleet's back while it was stopped (and systemd forgot it):
/// its next start finds neither unit nor file, and the file is written afresh.
#[tokio::test(start_paused = true)]
async fn a_unit_whose_file_is_gone_is_written_again_at_its_next_start() {
    let (store, systemd, dir) = twins();
    let agent = Agent::start(&store, &systemd, &dir);
    schedule(&store, M1, "a.service", &body(1), TargetState::Launched).await;
    eventually("started", || active(&systemd, "a.service")).await;
    schedule(&store, M1, "a.service", &body(1), TargetState::Loaded).await;
    eventually("stopped", || !active(&systemd, "a.service")).await;
    fleet_systemd::UnitManager::remove_unit(&systemd, "a.service")
        .await
        .expect("remove");
    systemd.collect("a.service").await;
    schedule(&store, M1, "a.service", &body(1), TargetState::Launched).await;
    eventually("written and started again", || {
        active(&systemd, "a.service") && systemd.file("a.service").is_some()
    })
    .await;
    agent.stop(false).await;
}

/// A running unit whose link went, which then ended and which systemd forgot: its stop is
/// answered "not loaded", which means nothing runs (it used to fail at every retry, and a
/// destroyed unit's file stayed for good); started again, it is linked again.
#[tokio::test(start_paused = true)]
async fn a_stop_of_a_unit_systemd_forgot_is_done_and_it_starts_again() {
    let (store, systemd, dir) = twins();
    left_unlinked(&store, &systemd, &dir, false).await;
    let agent = Agent::start(&store, &systemd, &dir);
    idle(Duration::from_secs(5)).await;
    // it ends by itself, and systemd collects it
    systemd
        .set_state(
            "a.service",
            SystemdState::new("not-found", "inactive", "dead"),
        )
        .await;
    systemd.collect("a.service").await;
    schedule(&store, M1, "a.service", &body(1), TargetState::Loaded).await;
    eventually("stopped, no failure said", || {
        state_of(&store, "a.service").is_some_and(|s| s.reason.is_none())
            && !systemd
                .calls()
                .iter()
                .all(|c| !matches!(c, Call::Stop(n) if n == "a.service"))
    })
    .await;
    idle(Duration::from_secs(10)).await;
    assert!(state_of(&store, "a.service").is_some_and(|s| s.reason.is_none()));
    schedule(&store, M1, "a.service", &body(1), TargetState::Launched).await;
    eventually("started again", || active(&systemd, "a.service")).await;
    agent.stop(false).await;
}

/// The same left behind for a unit that still runs (its link gone, systemd reloaded) and is
/// no longer wanted here: its successor adopts it as running, so it is stopped and removed.
#[tokio::test(start_paused = true)]
async fn a_running_unit_left_unlinked_and_no_longer_wanted_is_stopped() {
    let (store, systemd, dir) = twins();
    left_unlinked(&store, &systemd, &dir, false).await;
    store.delete(&store.keys().schedule(M1, "a.service"));
    let second = Agent::start(&store, &systemd, &dir);
    eventually("stopped and removed", || {
        !active(&systemd, "a.service") && systemd.file("a.service").is_none()
    })
    .await;
    second.stop(false).await;
}

/// The agent's lease lost (the registry away for a whole ttl): it registers again and
/// publishes every state again, keeping its units running.
#[tokio::test(start_paused = true)]
async fn a_lost_lease_is_replaced_and_states_published_again() {
    let (store, systemd, dir) = twins();
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
    let (store, systemd, dir) = twins();
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
    let (store, systemd, dir) = twins();
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

fn at_most_once_body(n: u32) -> UnitFile {
    UnitFile::parse(&format!(
        "[Service]\nExecStart=/bin/sleep {n}\n[X-Fleet]\nAtMostOnce=true\n"
    ))
    .expect("unit")
}

/// An at-most-once unit stops once the machine's lease has gone unrenewed for
/// `AtMostOnce::stop_after` (a plain unit runs on: unknown is not empty), and starts again
/// once the same lease is refreshed (it never expired: the engine moved nothing).
#[tokio::test(start_paused = true)]
async fn an_at_most_once_unit_stops_when_the_lease_goes_unrenewed() {
    let (store, systemd, dir) = (
        MemoryStore::default(),
        FakeUnitManager::new(),
        tempfile::tempdir().expect("dir"),
    );
    let timing = fleet_registry::AtMostOnce::for_ttl(TTL);
    let agent = Agent::start(&store, &systemd, &dir);
    schedule(&store, M1, "plain.service", &body(1), TargetState::Launched).await;
    let once = at_most_once_body(2);
    schedule(&store, M1, "once.service", &once, TargetState::Launched).await;
    eventually("both started", || {
        active(&systemd, "plain.service") && active(&systemd, "once.service")
    })
    .await;
    let lease = store.lease_of(&store.keys().machine(M1));
    store.set_reachable(false);
    let cut = tokio::time::Instant::now();
    eventually("at-most-once unit stopped", || {
        !active(&systemd, "once.service")
    })
    .await;
    // within B of the cut (the last refresh came at most ttl/3 before it)
    let stopped = cut.elapsed();
    assert!(stopped <= timing.stop_after, "{stopped:?}");
    assert!(stopped + TTL / 3 >= timing.stop_after, "{stopped:?}");
    assert!(active(&systemd, "plain.service"));
    // back before the lease expired: the same lease, refreshed; the unit runs again
    tokio::time::sleep_until(cut + timing.stop_after + Duration::from_millis(500)).await;
    assert!(!active(&systemd, "once.service"));
    store.set_reachable(true);
    eventually("at-most-once unit started again", || {
        active(&systemd, "once.service")
    })
    .await;
    assert_eq!(store.lease_of(&store.keys().machine(M1)), lease);
    assert!(active(&systemd, "plain.service"));
    assert_eq!(
        count(
            &systemd,
            |c| matches!(c, Call::Stop(n) if n == "plain.service")
        ),
        0
    );
    agent.stop(false).await;
}

/// A machine whose lease expired keeps its at-most-once units stopped after it registers
/// again, for `hold_after_rejoin`: the engine may be moving them. Then it runs what its
/// schedule still says (here: the engine moved one, and kept the other).
#[tokio::test(start_paused = true)]
async fn after_a_lost_lease_at_most_once_units_wait_before_starting_again() {
    let (store, systemd, dir) = (
        MemoryStore::default(),
        FakeUnitManager::new(),
        tempfile::tempdir().expect("dir"),
    );
    let timing = fleet_registry::AtMostOnce::for_ttl(TTL);
    let agent = Agent::start(&store, &systemd, &dir);
    schedule(
        &store,
        M1,
        "moved.service",
        &at_most_once_body(1),
        TargetState::Launched,
    )
    .await;
    schedule(
        &store,
        M1,
        "kept.service",
        &at_most_once_body(2),
        TargetState::Launched,
    )
    .await;
    eventually("started", || {
        active(&systemd, "moved.service") && active(&systemd, "kept.service")
    })
    .await;
    store.set_reachable(false);
    idle(TTL * 3).await;
    assert!(!active(&systemd, "moved.service") && !active(&systemd, "kept.service"));
    // meanwhile the engine moved one of them elsewhere
    store.delete(&store.keys().schedule(M1, "moved.service"));
    systemd.clear_calls();
    store.set_reachable(true);
    eventually("registered again", || {
        store.get(&store.keys().machine(M1)).is_some()
    })
    .await;
    let back = tokio::time::Instant::now();
    eventually("kept unit started again", || {
        active(&systemd, "kept.service")
    })
    .await;
    assert!(
        back.elapsed() + Duration::from_millis(100) >= timing.hold_after_rejoin,
        "started {:?} after registering again",
        back.elapsed()
    );
    assert_eq!(
        count(
            &systemd,
            |c| matches!(c, Call::Start(n) if n == "moved.service")
        ),
        0
    );
    assert!(!active(&systemd, "moved.service"));
    agent.stop(false).await;
}

fn new_agent() -> (MemoryStore, FakeUnitManager, tempfile::TempDir) {
    (
        MemoryStore::default(),
        FakeUnitManager::new(),
        tempfile::tempdir().expect("dir"),
    )
}

/// A StopUnit that fails used to orphan the unit: its file was removed and the agent forgot
/// it while it kept running (a restarted fleetd then had nothing to adopt). Now it stays,
/// file and all, its state says why, and the stop is tried again (here by the fleetd that
/// follows, which adopts it).
#[tokio::test(start_paused = true)]
async fn a_failed_stop_keeps_the_unit_retries_and_says_why() {
    let (store, systemd, dir) = new_agent();
    let agent = Agent::start(&store, &systemd, &dir);
    schedule(&store, M1, "a.service", &body(1), TargetState::Launched).await;
    eventually("started", || active(&systemd, "a.service")).await;
    systemd.inject_error(
        "StopUnit",
        "org.freedesktop.DBus.Error.TimedOut",
        "stop timed out",
    );
    store.delete(&store.keys().schedule(M1, "a.service"));
    eventually("the failure reported", || {
        state_of(&store, "a.service")
            .and_then(|s| s.reason)
            .is_some_and(|r| r.starts_with("stop failed: ") && r.contains("stop timed out"))
    })
    .await;
    assert!(active(&systemd, "a.service"), "still running");
    assert!(systemd.file("a.service").is_some(), "its file is kept");
    // fleetd restarts before the retry: its successor adopts the unit, and stops it
    agent.stop(false).await;
    let agent = Agent::start(&store, &systemd, &dir);
    eventually("stopped and removed by the successor", || {
        !active(&systemd, "a.service") && systemd.file("a.service").is_none()
    })
    .await;
    eventually("its state withdrawn", || {
        state_of(&store, "a.service").is_none()
    })
    .await;
    agent.stop(false).await;
}

/// A unit file the agent cannot write (/run full or read-only) is reported in that unit's
/// state with the reason, the other units of the batch run, and the write is tried again.
#[tokio::test(start_paused = true)]
async fn a_unit_file_it_cannot_write_is_reported_and_retried() {
    let (store, systemd, dir) = new_agent();
    let agent = Agent::start(&store, &systemd, &dir);
    eventually("registered", || {
        store.get(&store.keys().machine(M1)).is_some()
    })
    .await;
    // the first file written (a.service, in name order) fails
    systemd.inject_error(
        "LinkUnitFiles",
        "org.freedesktop.DBus.Error.Failed",
        "no space left on device",
    );
    schedule(&store, M1, "a.service", &body(1), TargetState::Launched).await;
    schedule(&store, M1, "b.service", &body(2), TargetState::Launched).await;
    eventually("b started", || active(&systemd, "b.service")).await;
    eventually("a's failure reported", || {
        state_of(&store, "a.service").is_some_and(|s| {
            s.agent_state == TargetState::Inactive
                && s.hash == body(1).hash().to_string()
                && s.reason.as_deref().is_some_and(|r| {
                    r.starts_with("load failed: ") && r.contains("no space left on device")
                })
        })
    })
    .await;
    assert!(state_of(&store, "b.service").is_some_and(|s| s.reason.is_none()));
    eventually("a written and started at a retry", || {
        active(&systemd, "a.service")
    })
    .await;
    eventually("a's reason gone", || {
        state_of(&store, "a.service")
            .is_some_and(|s| s.reason.is_none() && s.agent_state == TargetState::Launched)
    })
    .await;
    agent.stop(false).await;
}

/// One key etcd refuses for good (a permission, an oversized value) used to abort every
/// reconcile of the agent, so no other unit of its machine started or stopped.
#[tokio::test(start_paused = true)]
async fn a_refused_key_does_not_stall_the_other_units() {
    let (store, systemd, dir) = new_agent();
    let agent = Agent::start(&store, &systemd, &dir);
    let refused = store.keys().body(&body(1).hash().to_string());
    store.refuse_key(&refused, true);
    schedule(&store, M1, "a.service", &body(1), TargetState::Launched).await;
    schedule(&store, M1, "b.service", &body(2), TargetState::Launched).await;
    eventually("b started", || active(&systemd, "b.service")).await;
    assert!(!active(&systemd, "a.service"));
    store.refuse_key(&refused, false);
    eventually("a started once its body can be read", || {
        active(&systemd, "a.service")
    })
    .await;
    agent.stop(false).await;
}

/// A body refused only when its file is to be written (its requirements were read before):
/// the batch read of the bodies fails whole, as in etcd, and the bodies are read again one by
/// one, so the other unit of the batch still starts and the refused one says why.
#[tokio::test(start_paused = true)]
async fn a_body_refused_in_a_batch_does_not_stall_the_others() {
    let (store, systemd, dir) = new_agent();
    let agent = Agent::start(&store, &systemd, &dir);
    schedule(&store, M1, "a.service", &body(1), TargetState::Inactive).await;
    schedule(&store, M1, "b.service", &body(2), TargetState::Inactive).await;
    idle(Duration::from_secs(2)).await;
    let refused = store.keys().body(&body(1).hash().to_string());
    store.refuse_key(&refused, true);
    schedule(&store, M1, "a.service", &body(1), TargetState::Launched).await;
    schedule(&store, M1, "b.service", &body(2), TargetState::Launched).await;
    eventually("b started", || active(&systemd, "b.service")).await;
    assert!(!active(&systemd, "a.service"));
    eventually("a says why", || {
        state_of(&store, "a.service")
            .and_then(|s| s.reason)
            .is_some_and(|r| r.contains("cannot read unit body"))
    })
    .await;
    store.refuse_key(&refused, false);
    eventually("a started once its body can be read", || {
        active(&systemd, "a.service")
    })
    .await;
    agent.stop(false).await;
}

/// An [`AgentStore`](fleet_registry::AgentStore) that counts how the agent reads unit bodies
/// (one by one: `body`, or several at once: `bodies`) and how it publishes unit states (one
/// by one: `publish_state`, or in a transaction: `publish_states`).
#[derive(Default)]
struct CountingStore {
    inner: MemoryStore,
    one_by_one: std::sync::atomic::AtomicUsize,
    together: std::sync::atomic::AtomicUsize,
    states_one_by_one: std::sync::atomic::AtomicUsize,
    states_together: std::sync::atomic::AtomicUsize,
    /// Held by a test, it stalls the agent in its next `bodies` request.
    bodies_gate: tokio::sync::Mutex<()>,
    /// Held by a test, it stalls the agent in its next state write.
    states_gate: tokio::sync::Mutex<()>,
    /// Every state record written, in order: (unit, active state).
    written: std::sync::Mutex<Vec<(String, String)>>,
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
        drop(self.bodies_gate.lock().await);
        fleet_registry::AgentStore::bodies(&self.inner, hashes).await
    }
    async fn publish_state(
        &self,
        name: &str,
        machine_id: &str,
        state: Option<&StateRecord>,
        lease: &fleet_registry::Lease,
    ) -> fleet_registry::Result<()> {
        if let Some(s) = state {
            self.states_one_by_one
                .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            self.written
                .lock()
                .expect("lock")
                .push((name.to_string(), s.active_state.clone()));
        }
        drop(self.states_gate.lock().await);
        self.inner
            .publish_state(name, machine_id, state, lease)
            .await
    }
    async fn publish_states(
        &self,
        machine_id: &str,
        states: &[StateRecord],
        lease: &fleet_registry::Lease,
    ) -> fleet_registry::Result<()> {
        self.states_together
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        self.written.lock().expect("lock").extend(
            states
                .iter()
                .map(|s| (s.name.clone(), s.active_state.clone())),
        );
        drop(self.states_gate.lock().await);
        self.inner.publish_states(machine_id, states, lease).await
    }
}

impl CountingStore {
    fn count(c: &std::sync::atomic::AtomicUsize) -> usize {
        c.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// The active states written for `unit`, in order.
    fn written_for(&self, unit: &str) -> Vec<String> {
        self.written
            .lock()
            .expect("lock")
            .iter()
            .filter(|(n, _)| n == unit)
            .map(|(_, s)| s.clone())
            .collect()
    }

    /// [`CountingStore::run_agent`], once its machine is registered.
    async fn run_registered_agent(
        self: &Arc<Self>,
        systemd: &FakeUnitManager,
        dir: &tempfile::TempDir,
    ) -> (CancellationToken, JoinHandle<Result<(), RegistryError>>) {
        let running = self.run_agent(systemd, dir);
        let store = &self.inner;
        eventually("registered", || {
            store.get(&store.keys().machine(M1)).is_some()
        })
        .await;
        running
    }

    /// Runs an agent on `M1` over this store; cancel the token to stop it.
    fn run_agent(
        self: &Arc<Self>,
        systemd: &FakeUnitManager,
        dir: &tempfile::TempDir,
    ) -> (CancellationToken, JoinHandle<Result<(), RegistryError>>) {
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
            self.clone(),
            Arc::new(systemd.clone()),
            cfg,
            Metrics::new(),
            shutdown.clone(),
            Arc::new(AtomicBool::new(false)),
        ));
        (shutdown, task)
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
        ..Default::default()
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

/// A burst of units started on the machine publishes its states in a few transactions (one
/// per batch of signals), not one etcd write per unit.
#[tokio::test(start_paused = true)]
async fn publishes_the_states_of_a_burst_together() {
    let (systemd, dir) = (FakeUnitManager::new(), tempfile::tempdir().expect("dir"));
    let counting = Arc::new(CountingStore::default());
    let store = counting.inner.clone();
    let (shutdown, task) = counting.run_registered_agent(&systemd, &dir).await;
    let names: Vec<String> = (0..60).map(|i| format!("burst{i}.service")).collect();
    for (i, name) in names.iter().enumerate() {
        schedule(&store, M1, name, &body(i as u32), TargetState::Launched).await;
    }
    eventually("every state of the burst published active", || {
        names.iter().all(|n| {
            state_of(&store, n).is_some_and(|s| {
                s.active_state == "active" && s.agent_state == TargetState::Launched
            })
        })
    })
    .await;
    let (one_by_one, together) = (
        CountingStore::count(&counting.states_one_by_one),
        CountingStore::count(&counting.states_together),
    );
    assert_eq!(one_by_one, 0, "states written one by one");
    assert!(
        (1..=6).contains(&together),
        "{together} state transactions for 60 units"
    );
    shutdown.cancel();
    task.await.expect("agent task").expect("agent");
}

/// A state key etcd refuses fails its batch's transaction; the batch is then written state
/// by state, so the other units' states are published and the refused one is retried.
#[tokio::test(start_paused = true)]
async fn a_refused_state_key_does_not_keep_the_others_unpublished() {
    let (store, systemd, dir) = new_agent();
    let refused = store.keys().state("a.service", M1);
    store.refuse_key(&refused, true);
    let agent = Agent::start(&store, &systemd, &dir);
    schedule(&store, M1, "a.service", &body(1), TargetState::Launched).await;
    schedule(&store, M1, "b.service", &body(2), TargetState::Launched).await;
    schedule(&store, M1, "c.service", &body(3), TargetState::Launched).await;
    eventually("b's and c's states published", || {
        ["b.service", "c.service"]
            .iter()
            .all(|n| state_of(&store, n).is_some_and(|s| s.active_state == "active"))
    })
    .await;
    assert!(active(&systemd, "a.service"));
    assert!(state_of(&store, "a.service").is_none());
    store.refuse_key(&refused, false);
    eventually("a's state published once its key is writable", || {
        state_of(&store, "a.service").is_some_and(|s| s.active_state == "active")
    })
    .await;
    agent.stop(false).await;
}

/// Regression: the lease was gone before the guard's deadline (the registry said so at the
/// first refresh after a short cut), the guard's signal ended and it stopped guarding
/// without fencing; the units were stopped only once registering again succeeded. Here that
/// fails (another fleetd took the machine ID meanwhile) and the agent ends: its
/// at-most-once unit must not run on while the engine moves it.
#[tokio::test(start_paused = true)]
async fn a_lost_lease_stops_at_most_once_units_even_when_registering_again_fails() {
    let (store, systemd, dir) = twins();
    let agent = Agent::start(&store, &systemd, &dir);
    schedule(&store, M1, "plain.service", &body(1), TargetState::Launched).await;
    let once = at_most_once_body(2);
    schedule(&store, M1, "once.service", &once, TargetState::Launched).await;
    eventually("both started", || {
        active(&systemd, "plain.service") && active(&systemd, "once.service")
    })
    .await;
    let lease = store.lease_of(&store.keys().machine(M1)).expect("lease");
    store.expire_lease(lease);
    let mut other = records::machine(M1);
    other.token = "another fleetd".into();
    store.put(
        &store.keys().machine(M1),
        serde_json::to_vec(&other).expect("json"),
    );
    eventually("the agent gave up", || agent.task.is_finished()).await;
    assert!(
        !active(&systemd, "once.service"),
        "at-most-once unit runs on"
    );
    assert!(
        active(&systemd, "plain.service"),
        "plain units are left running"
    );
}

/// Regression: a StopUnit that failed while fenced was forgotten (the unit recorded as
/// stopped, never tried again) and the unit ran on. The guard tries again within the stop
/// allowance S.
#[tokio::test(start_paused = true)]
async fn a_failed_fence_stop_is_tried_again_within_the_stop_allowance() {
    let (store, systemd, dir) = twins();
    let timing = fleet_registry::AtMostOnce::for_ttl(TTL);
    let agent = Agent::start(&store, &systemd, &dir);
    schedule(
        &store,
        M1,
        "once.service",
        &at_most_once_body(2),
        TargetState::Launched,
    )
    .await;
    eventually("started", || active(&systemd, "once.service")).await;
    // the guard's stop and the agent's both fail
    systemd.fail_stops("once.service", 2);
    store.set_reachable(false);
    let cut = tokio::time::Instant::now();
    eventually("stopped", || !active(&systemd, "once.service")).await;
    let took = cut.elapsed();
    assert!(
        took <= timing.stop_after + timing.stop_allowance,
        "stopped {took:?} after the cut"
    );
    agent.stop(false).await;
}

/// A failed stop of a unit whose body changed waits for its backoff like any other failure
/// (its fault records the body wanted): another unit's change does not retry it at once.
#[tokio::test(start_paused = true)]
async fn a_failed_stop_for_a_new_body_waits_for_its_retry() {
    let (store, systemd, dir) = new_agent();
    let agent = Agent::start(&store, &systemd, &dir);
    schedule(&store, M1, "a.service", &body(1), TargetState::Launched).await;
    eventually("started", || active(&systemd, "a.service")).await;
    systemd.inject_error(
        "StopUnit",
        "org.freedesktop.DBus.Error.TimedOut",
        "stop timed out",
    );
    // the new body in the store (bodies are stored by hash)
    let other: UnitName = "other.service".parse().expect("name");
    store
        .create_unit(&other, &body(2), TargetState::Inactive)
        .await
        .expect("create");
    schedule(&store, M1, "a.service", &body(2), TargetState::Launched).await;
    eventually("the failure reported", || {
        state_of(&store, "a.service")
            .and_then(|s| s.reason)
            .is_some_and(|r| r.starts_with("stop failed: "))
    })
    .await;
    let stops = |systemd: &FakeUnitManager| {
        count(systemd, |c| matches!(c, Call::Stop(n) if n == "a.service"))
    };
    assert_eq!(stops(&systemd), 1);
    schedule(&store, M1, "b.service", &body(3), TargetState::Launched).await;
    eventually("b started", || active(&systemd, "b.service")).await;
    assert_eq!(
        stops(&systemd),
        1,
        "a's stop was retried before its backoff"
    );
    agent.stop(false).await;
}

/// Regression: a fence raised and lifted while the agent was busy (here stalled in a state
/// write) looked like no fence at all: the guard had stopped the at-most-once unit, the
/// agent still counted it as running and never started it again.
#[tokio::test(start_paused = true)]
async fn a_fence_raised_and_lifted_unseen_still_restarts_the_unit() {
    let (store, systemd, dir) = (
        Arc::new(CountingStore::default()),
        FakeUnitManager::new(),
        tempfile::tempdir().expect("dir"),
    );
    let timing = fleet_registry::AtMostOnce::for_ttl(TTL);
    let (shutdown, task) = store.run_agent(&systemd, &dir);
    let once = at_most_once_body(2);
    schedule(
        &store.inner,
        M1,
        "once.service",
        &once,
        TargetState::Launched,
    )
    .await;
    eventually("started", || active(&systemd, "once.service")).await;
    idle(Duration::from_secs(1)).await;
    // the agent stalls in the state write of a new unit
    let gate = store.states_gate.lock().await;
    schedule(
        &store.inner,
        M1,
        "plain.service",
        &body(1),
        TargetState::Launched,
    )
    .await;
    idle(Duration::from_millis(100)).await;
    // meanwhile the lease goes unrenewed (the guard stops the unit), then is refreshed
    store.inner.set_reachable(false);
    idle(timing.stop_after + Duration::from_millis(100)).await;
    assert!(!active(&systemd, "once.service"));
    store.inner.set_reachable(true);
    idle(TTL / 3 + Duration::from_millis(100)).await;
    drop(gate);
    eventually("started again", || active(&systemd, "once.service")).await;
    shutdown.cancel();
    task.await.expect("agent task").expect("agent");
}

/// Regression: the agent read the fence before its body reads and D-Bus calls, and started
/// an at-most-once unit the guard had fenced meanwhile (stopping it only afterwards). The
/// fence is read again just before the jobs.
#[tokio::test(start_paused = true)]
async fn no_at_most_once_unit_starts_once_fenced_during_a_converge() {
    let (store, systemd, dir) = (
        Arc::new(CountingStore::default()),
        FakeUnitManager::new(),
        tempfile::tempdir().expect("dir"),
    );
    let timing = fleet_registry::AtMostOnce::for_ttl(TTL);
    let (shutdown, task) = store.run_agent(&systemd, &dir);
    idle(Duration::from_secs(1)).await;
    // the agent stalls reading the body of a new at-most-once unit to write its file
    let gate = store.bodies_gate.lock().await;
    let once = at_most_once_body(2);
    schedule(
        &store.inner,
        M1,
        "once.service",
        &once,
        TargetState::Launched,
    )
    .await;
    idle(Duration::from_millis(100)).await;
    store.inner.set_reachable(false);
    idle(timing.stop_after + Duration::from_millis(100)).await;
    // back, but no refresh accepted yet: still fenced when the converge goes on
    store.inner.set_reachable(true);
    drop(gate);
    idle(Duration::from_millis(10)).await;
    assert_eq!(
        count(
            &systemd,
            |c| matches!(c, Call::Start(n) if n == "once.service")
        ),
        0,
        "started while fenced"
    );
    eventually("started once the fence is lifted", || {
        active(&systemd, "once.service")
    })
    .await;
    shutdown.cancel();
    task.await.expect("agent task").expect("agent");
}

/// When removing a batch's unit files fails, each is removed on its own: only a unit whose
/// own removal fails is kept (here none: the failure was a passing one).
#[tokio::test(start_paused = true)]
async fn a_failed_batch_removal_keeps_only_the_units_that_fail_alone() {
    let (store, systemd, dir) = new_agent();
    let agent = Agent::start(&store, &systemd, &dir);
    schedule(&store, M1, "a.service", &body(1), TargetState::Launched).await;
    schedule(&store, M1, "b.service", &body(2), TargetState::Launched).await;
    eventually("started", || {
        active(&systemd, "a.service") && active(&systemd, "b.service")
    })
    .await;
    systemd.inject_error(
        "DisableUnitFiles",
        "org.freedesktop.DBus.Error.Failed",
        "passing failure",
    );
    store.delete(&store.keys().schedule(M1, "a.service"));
    store.delete(&store.keys().schedule(M1, "b.service"));
    eventually("both withdrawn, neither kept as failing", || {
        for unit in ["a.service", "b.service"] {
            let reason = state_of(&store, unit).and_then(|s| s.reason);
            assert!(
                !reason
                    .as_deref()
                    .is_some_and(|r| r.starts_with("unload failed")),
                "{unit} kept: {reason:?}"
            );
        }
        state_of(&store, "a.service").is_none() && state_of(&store, "b.service").is_none()
    })
    .await;
    agent.stop(false).await;
}

/// The states written for one unit started by an agent whose systemd takes `latency` to
/// start it.
async fn states_written_for_a_start_taking(latency: Duration) -> Vec<String> {
    let systemd = FakeUnitManager::with_knobs(fleet_systemd::fake::Knobs {
        start_latency: latency,
        ..Default::default()
    });
    let dir = tempfile::tempdir().expect("dir");
    let counting = Arc::new(CountingStore::default());
    let store = counting.inner.clone();
    let (shutdown, task) = counting.run_registered_agent(&systemd, &dir).await;
    schedule(&store, M1, "a.service", &body(1), TargetState::Launched).await;
    eventually("a.service published active", || {
        state_of(&store, "a.service").is_some_and(|s| s.active_state == "active")
    })
    .await;
    shutdown.cancel();
    task.await.expect("agent task").expect("agent");
    counting.written_for("a.service")
}

/// A start that completes within the hold writes its unit's state once (a burst of starts
/// wrote "activating" then "active" for each unit: some 40 % of all state writes); one that
/// lasts longer shows "activating" meanwhile, as fleet v1.0 did within a second.
#[tokio::test(start_paused = true)]
async fn a_passing_state_is_written_only_once_it_has_lasted() {
    assert_eq!(
        states_written_for_a_start_taking(Duration::from_millis(300)).await,
        ["active"]
    );
    assert_eq!(
        states_written_for_a_start_taking(Duration::from_secs(4)).await,
        ["activating", "active"]
    );
}

/// The publisher's holds, each from its own moment: due in the order they began, a hold
/// replaced by a lasting state never written, one replaced by another passing state
/// written (the newer) when the first would have been due.
#[tokio::test(start_paused = true)]
async fn held_states_come_due_in_the_order_their_holds_began() {
    use crate::publish::{HOLD, Publisher};
    let counting = Arc::new(CountingStore::default());
    let lease =
        fleet_registry::AgentStore::register_machine(counting.as_ref(), &records::machine(M1), TTL)
            .await
            .expect("register");
    let mut publisher = Publisher::new(counting.clone(), M1.into());
    let rec = |unit: &str, active: &str| StateRecord {
        active_state: active.into(),
        ..records::state(unit, M1, body(1).hash())
    };
    assert_eq!(publisher.next_flush(), None);
    let t0 = tokio::time::Instant::now();
    publisher
        .publish(vec![rec("a", "activating"), rec("b", "activating")], &lease)
        .await;
    tokio::time::advance(HOLD / 2).await;
    publisher
        .publish(vec![rec("c", "deactivating"), rec("b", "active")], &lease)
        .await;
    publisher.publish(vec![rec("a", "reloading")], &lease).await;
    assert_eq!(counting.written_for("b"), ["active"]);
    assert_eq!(publisher.next_flush(), Some(t0 + HOLD));
    tokio::time::advance(HOLD / 2).await;
    publisher.flush_held(&lease).await;
    assert_eq!(counting.written_for("a"), ["reloading"]);
    assert!(counting.written_for("c").is_empty());
    assert_eq!(publisher.next_flush(), Some(t0 + HOLD + HOLD / 2));
    tokio::time::advance(HOLD / 2).await;
    publisher.flush_held(&lease).await;
    assert_eq!(counting.written_for("c"), ["deactivating"]);
    assert_eq!(counting.written_for("b"), ["active"]);
    assert_eq!(publisher.next_flush(), None);
}
