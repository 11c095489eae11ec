//! The engine against the in-memory store, one event at a time (`Engine::handle`) or through
//! its loop, in paused time: fencing, step-down on a refused write, deciding only from a
//! view that holds its own last write, holding placements for one agent_ttl after a
//! leadership change, and debouncing.

use std::sync::Arc;
use std::time::Duration;

use fleet_metrics::Metrics;
use fleet_registry::{EngineStore, MachineRecord, MemoryStore, WatchEvent};
use fleet_testutil::records::{self, body};
use fleet_unit::{TargetState, UnitFile, UnitName};

use crate::EngineConfig;
use crate::engine::{Engine, Event};

const TTL: Duration = Duration::from_secs(30);

fn config(id: &str) -> EngineConfig {
    EngineConfig {
        machine_id: id.into(),
        reconcile_interval: Duration::from_secs(2),
        agent_ttl: TTL,
        disable_watches: false,
        campaign_spread: Duration::ZERO,
    }
}

/// A machine present, as its agent registers it (without a lease: it stays).
fn add_machine(store: &MemoryStore, id: &str) {
    let rec = MachineRecord {
        token: id.into(),
        ..records::machine(id)
    };
    store.put(
        &store.keys().machine(id),
        serde_json::to_vec(&rec).expect("json"),
    );
}

async fn create(store: &MemoryStore, name: &str, n: u32) {
    let unit: UnitName = name.parse().expect("name");
    store
        .create_unit(&unit, &body(n), TargetState::Launched)
        .await
        .expect("create");
}

fn placement(store: &MemoryStore, unit: &str) -> Option<String> {
    store
        .get(&store.keys().placement(unit))
        .map(|v| String::from_utf8_lossy(&v).into_owned())
}

/// Feeds the engine every event its watch has delivered so far.
async fn drain(engine: &mut Engine) {
    while let Some(ev) = engine.delivered() {
        engine.handle(Event::Watch(ev)).await;
    }
}

/// Feeds the engine the first `n` events its watch has delivered, and no more.
async fn deliver(engine: &mut Engine, n: usize) {
    for _ in 0..n {
        let ev = engine.delivered().expect("an event delivered");
        engine.handle(Event::Watch(ev)).await;
    }
}

/// Handles every event that is ready now (watch events, and ticks already due).
async fn settle(engine: &mut Engine) {
    let never = tokio_util::sync::CancellationToken::new();
    while let Ok(ev) = tokio::time::timeout(Duration::ZERO, engine.next_event(&never)).await {
        engine.handle(ev).await;
    }
}

/// Syncs the engine, lets it win the election, and syncs it again (its election comes back
/// through the watch before it decides anything).
async fn elect(engine: &mut Engine) {
    drain(engine).await;
    engine.handle(Event::Tick).await;
    assert!(engine.is_leader());
    drain(engine).await;
}

/// A store with machine m1 and unit a.service, and an engine of m1 that leads and placed it.
async fn leading() -> (MemoryStore, Engine, Metrics) {
    let store = MemoryStore::default();
    add_machine(&store, "m1");
    create(&store, "a.service", 1).await;
    let metrics = Metrics::new();
    let mut engine = Engine::new(Arc::new(store.clone()), config("m1"), metrics.clone());
    elect(&mut engine).await;
    engine.handle(Event::Tick).await;
    assert_eq!(placement(&store, "a.service").as_deref(), Some("m1"));
    drain(&mut engine).await;
    (store, engine, metrics)
}

/// [`leading`], once the new leader's hold (one `agent_ttl`) is over and it has reconciled.
async fn leading_past_the_hold() -> (MemoryStore, Engine) {
    let (store, mut engine, _) = leading().await;
    tokio::time::sleep(TTL).await;
    drain(&mut engine).await;
    engine.handle(Event::Tick).await;
    (store, engine)
}

/// Every engine write is fenced, and a refused write makes the engine step down: another
/// engine won the leader key meanwhile, before this one's mirror showed it.
#[tokio::test(start_paused = true)]
async fn a_refused_write_steps_down_and_writes_nothing() {
    let (store, mut engine, metrics) = leading().await;
    store.delete(&store.keys().leader());
    let other = store
        .campaign("m2", TTL)
        .await
        .expect("campaign")
        .expect("m2 leads");
    create(&store, "b.service", 2).await;
    // the engine learns of b.service, not (yet) of the new leader
    let unit_key = store.keys().unit("b.service");
    let value = store.get(&unit_key).expect("unit record");
    engine
        .handle(Event::Watch(WatchEvent::Put {
            key: unit_key,
            value,
            revision: store.revision(),
        }))
        .await;
    let before = store.revision();
    engine.handle(Event::Tick).await;
    assert!(!engine.is_leader(), "the engine did not step down");
    assert_eq!(store.revision(), before, "a deposed leader wrote");
    assert_eq!(placement(&store, "b.service"), None);
    assert!(
        metrics
            .encode()
            .contains("fleet_engine_task_failure_count_total{type=\"attemptscheduleunit\"} 1"),
        "{}",
        metrics.encode()
    );
    // its resignation does not touch the new leader's key
    tokio::task::yield_now().await;
    assert_eq!(
        store.get(&store.keys().leader()),
        Some(b"m2".to_vec()),
        "{other:?}"
    );
}

/// The leader key gone from the mirror (deleted, expired): the engine steps down before
/// deciding anything.
#[tokio::test(start_paused = true)]
async fn a_leader_key_no_longer_ours_steps_down() {
    let (store, mut engine, _) = leading().await;
    store.delete(&store.keys().leader());
    store.put(&store.keys().leader(), "m9");
    create(&store, "b.service", 2).await;
    drain(&mut engine).await;
    let before = store.revision();
    engine.handle(Event::Tick).await;
    assert!(!engine.is_leader());
    assert_eq!(store.revision(), before);
}

/// A reconcile never decides from a view older than its own last write: until the write
/// comes back through the watch, a tick decides nothing (else a.service, missing from the
/// stale mirror's placements, would be placed again).
#[tokio::test(start_paused = true)]
async fn never_decides_from_a_view_without_its_own_last_write() {
    let store = MemoryStore::default();
    add_machine(&store, "m1");
    add_machine(&store, "m2");
    create(&store, "a.service", 1).await;
    let mut engine = Engine::new(Arc::new(store.clone()), config("m1"), Metrics::new());
    elect(&mut engine).await;
    engine.handle(Event::Tick).await;
    let placed = placement(&store, "a.service").expect("placed");
    let written = store.revision();
    // the engine's own write has not been read back: ticks change nothing
    for _ in 0..3 {
        engine.handle(Event::Tick).await;
    }
    assert_eq!(store.revision(), written);
    drain(&mut engine).await;
    engine.handle(Event::Tick).await;
    assert_eq!(store.revision(), written, "a settled cluster is rewritten");
    assert_eq!(placement(&store, "a.service"), Some(placed));
}

fn schedule_on(store: &MemoryStore, unit: &str, machine: &str, n: u32) {
    let rec = records::schedule(body(n).hash(), TargetState::Launched);
    store.put(
        &store.keys().schedule(machine, unit),
        serde_json::to_vec(&rec).expect("json"),
    );
    store.put(&store.keys().placement(unit), machine);
}

/// A new leader keeps units on machines it has not seen yet for one agent_ttl (they may be
/// re-registering after an etcd blip), and moves them once that time has passed.
#[tokio::test(start_paused = true)]
async fn a_new_leader_holds_placements_for_one_agent_ttl() {
    let store = MemoryStore::default();
    add_machine(&store, "m1");
    create(&store, "a.service", 1).await;
    schedule_on(&store, "a.service", "m2", 1); // m2 is not (yet) back
    let mut engine = Engine::new(Arc::new(store.clone()), config("m1"), Metrics::new());
    elect(&mut engine).await;
    engine.handle(Event::Tick).await;
    tokio::time::sleep(TTL - Duration::from_secs(1)).await;
    drain(&mut engine).await;
    engine.handle(Event::Tick).await;
    assert_eq!(placement(&store, "a.service").as_deref(), Some("m2"));
    tokio::time::sleep(Duration::from_secs(2)).await;
    drain(&mut engine).await;
    engine.handle(Event::Tick).await;
    assert_eq!(placement(&store, "a.service").as_deref(), Some("m1"));
}

/// A machine the leader saw leave has left: its units move at once, grace period or not.
#[tokio::test(start_paused = true)]
async fn a_machine_seen_leaving_is_not_held() {
    let store = MemoryStore::default();
    add_machine(&store, "m1");
    let metrics = Metrics::new();
    let mut engine = Engine::new(Arc::new(store.clone()), config("m1"), metrics.clone());
    elect(&mut engine).await;
    add_machine(&store, "m2");
    create(&store, "a.service", 1).await;
    schedule_on(&store, "a.service", "m2", 1);
    drain(&mut engine).await;
    engine.handle(Event::Tick).await;
    assert_eq!(placement(&store, "a.service").as_deref(), Some("m2"));
    store.delete(&store.keys().machine("m2"));
    drain(&mut engine).await;
    engine.handle(Event::Tick).await;
    assert_eq!(placement(&store, "a.service").as_deref(), Some("m1"));
    // counted as fleet's engine did: a unit taken off a machine that went away
    let text = metrics.encode();
    for line in [
        "fleet_engine_reconcile_failure_count_total{type=\"machine_away\"} 1",
        "fleet_engine_task_count_total{type=\"unscheduleunit\"} 1",
    ] {
        assert!(text.contains(line), "missing {line:?} in\n{text}");
    }
}

/// A unit whose record cannot be read (a newer fleetd's value, damage) is not a destroyed
/// one: the engine leaves it placed where it is, schedule key and all.
#[tokio::test(start_paused = true)]
async fn an_unreadable_unit_record_leaves_the_unit_placed() {
    let (store, mut engine, _metrics) = leading().await;
    let schedule_key = store.keys().schedule("m1", "a.service");
    assert!(store.get(&schedule_key).is_some());
    store.put(
        &store.keys().unit("a.service"),
        "{\"version\": 99, \"name\": 7}",
    );
    drain(&mut engine).await;
    engine.handle(Event::Tick).await;
    drain(&mut engine).await;
    engine.handle(Event::Tick).await;
    assert_eq!(placement(&store, "a.service").as_deref(), Some("m1"));
    assert!(
        store.get(&schedule_key).is_some(),
        "the unit was unscheduled"
    );
}

/// A unit taken off a machine that is still there but can no longer run it counts as
/// fleet's `run` failure; a failure to read or write is not one of fleet's types.
#[tokio::test(start_paused = true)]
async fn a_unit_its_machine_can_no_longer_run_counts_as_a_run_failure() {
    let store = MemoryStore::default();
    add_machine(&store, "m1");
    add_machine(&store, "m2");
    let unit: UnitName = "pinned.service".parse().expect("name");
    let file =
        UnitFile::parse("[Service]\nExecStart=/bin/true\n[X-Fleet]\nMachineID=m2\n").expect("unit");
    store
        .create_unit(&unit, &file, TargetState::Launched)
        .await
        .expect("create");
    // placed on m1 before its options said m2 (an older version of the unit)
    let rec = records::schedule(file.hash(), TargetState::Launched);
    store.put(
        &store.keys().schedule("m1", "pinned.service"),
        serde_json::to_vec(&rec).expect("json"),
    );
    store.put(&store.keys().placement("pinned.service"), "m1");
    let metrics = Metrics::new();
    let mut engine = Engine::new(Arc::new(store.clone()), config("m1"), metrics.clone());
    elect(&mut engine).await;
    engine.handle(Event::Tick).await;
    assert_eq!(placement(&store, "pinned.service").as_deref(), Some("m2"));
    let text = metrics.encode();
    assert!(
        text.contains("fleet_engine_reconcile_failure_count_total{type=\"run\"} 1"),
        "{text}"
    );
    assert!(!text.contains("type=\"machine_away\"} 1"), "{text}");
}

/// A unit that cannot be placed gets the scheduler's reason, and counts as a schedule
/// failure of every reconcile (fleet's `reconcile_failure_count{type="schedule"}`).
#[tokio::test(start_paused = true)]
async fn unplaceable_units_get_a_reason_and_count_as_schedule_failures() {
    let store = MemoryStore::default();
    add_machine(&store, "m1");
    let unit: UnitName = "pinned.service".parse().expect("name");
    let file =
        UnitFile::parse("[Service]\nExecStart=/bin/true\n[X-Fleet]\nMachineID=m9\n").expect("unit");
    store
        .create_unit(&unit, &file, TargetState::Launched)
        .await
        .expect("create");
    let metrics = Metrics::new();
    let mut engine = Engine::new(Arc::new(store.clone()), config("m1"), metrics.clone());
    elect(&mut engine).await;
    engine.handle(Event::Tick).await;
    assert!(store.get(&store.keys().reason("pinned.service")).is_some());
    assert_eq!(placement(&store, "pinned.service"), None);
    let text = metrics.encode();
    assert!(
        text.contains("fleet_engine_reconcile_failure_count_total{type=\"schedule\"} 1"),
        "{text}"
    );
}

/// A change after a quiet spell (one `fleetctl start` into an idle cluster) is reconciled
/// within a few milliseconds, not held for the burst debounce: a single unit is placed as
/// soon as it is created.
#[tokio::test(start_paused = true)]
async fn a_change_after_a_quiet_spell_is_placed_promptly() {
    let (store, mut engine, _) = leading().await;
    let never = tokio_util::sync::CancellationToken::new();
    // whatever is pending runs, then nothing happens for a while
    let quiet_until = tokio::time::Instant::now() + Duration::from_millis(500);
    while let Ok(ev) = tokio::time::timeout_at(quiet_until, engine.next_event(&never)).await {
        engine.handle(ev).await;
    }
    create(&store, "single.service", 7).await;
    drain(&mut engine).await;
    assert!(engine.reconcile_pending());
    let started = tokio::time::Instant::now();
    let ev = engine.next_event(&never).await;
    assert!(matches!(ev, Event::Tick));
    assert!(
        started.elapsed() <= Duration::from_millis(5),
        "reconciled {:?} after the change",
        started.elapsed()
    );
    engine.handle(ev).await;
    assert_eq!(placement(&store, "single.service").as_deref(), Some("m1"));
}

/// A burst of watch events makes one reconcile, shortly after, not one per event.
#[tokio::test(start_paused = true)]
async fn a_burst_of_changes_makes_one_reconcile() {
    let (store, mut engine, metrics) = leading().await;
    settle(&mut engine).await;
    // the engine is busy (a reconcile just ran): what comes now is gathered for DEBOUNCE
    let never = tokio_util::sync::CancellationToken::new();
    while engine.reconcile_pending() {
        let ev = engine.next_event(&never).await;
        engine.handle(ev).await;
        drain(&mut engine).await;
    }
    let reconciles = |m: &Metrics| {
        m.encode()
            .lines()
            .find_map(|l| {
                l.strip_prefix("fleet_engine_reconcile_count_total ")?
                    .parse::<u64>()
                    .ok()
            })
            .unwrap_or(0)
    };
    let before = reconciles(&metrics);
    for n in 0..20 {
        create(&store, &format!("u{n}.service"), n + 10).await;
    }
    let written = store.revision();
    drain(&mut engine).await;
    assert!(engine.reconcile_pending());
    assert_eq!(store.revision(), written, "a watch event made a reconcile");
    assert_eq!(reconciles(&metrics), before);
    // the debounce deadline comes before the interval's next tick
    let started = tokio::time::Instant::now();
    let ev = engine.next_event(&never).await;
    assert!(matches!(ev, Event::Tick));
    assert_eq!(started.elapsed(), Duration::from_millis(50));
    engine.handle(ev).await;
    assert_eq!(reconciles(&metrics), before + 1);
    assert!(!engine.reconcile_pending());
    let placed = (0..20)
        .filter(|n| placement(&store, &format!("u{n}.service")).is_some())
        .count();
    assert_eq!(placed, 20);
    // tasks counted by fleet's task type where they are written; one duration per reconcile
    let text = metrics.encode();
    for line in [
        "fleet_engine_task_count_total{type=\"attemptscheduleunit\"} 21".to_string(),
        format!(
            "fleet_engine_reconcile_duration_second_count {}",
            before + 1
        ),
    ] {
        assert!(text.contains(&line), "missing {line:?} in\n{text}");
    }
}

/// The loop as fleetd runs it: two engines, one leads and schedules; when it shuts down it
/// resigns and the other takes over.
#[tokio::test(start_paused = true)]
async fn the_loop_elects_one_leader_and_hands_over_on_shutdown() {
    let store = MemoryStore::default();
    add_machine(&store, "m1");
    create(&store, "a.service", 1).await;
    let start = |id: &str| {
        let shutdown = tokio_util::sync::CancellationToken::new();
        let task = tokio::spawn(crate::run(
            Arc::new(store.clone()),
            config(id),
            Metrics::new(),
            shutdown.clone(),
        ));
        (shutdown, task)
    };
    let (stop1, one) = start("e1");
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (stop2, two) = start("e2");
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(store.get(&store.keys().leader()), Some(b"e1".to_vec()));
    assert_eq!(placement(&store, "a.service").as_deref(), Some("m1"));
    stop1.cancel();
    one.await.expect("engine 1");
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(store.get(&store.keys().leader()), Some(b"e2".to_vec()));
    stop2.cancel();
    two.await.expect("engine 2");
    assert_eq!(store.get(&store.keys().leader()), None);
}

/// Creates `name` with `AtMostOnce=true` (body `n`) and schedules it on `machine`.
async fn at_most_once_on(store: &MemoryStore, name: &str, machine: &str, n: u32) {
    let unit: UnitName = name.parse().expect("name");
    let file = UnitFile::parse(&format!(
        "[Service]\nExecStart=/bin/sleep {n}\n[X-Fleet]\nAtMostOnce=true\n"
    ))
    .expect("unit");
    store
        .create_unit(&unit, &file, TargetState::Launched)
        .await
        .expect("create");
    let rec = records::schedule(file.hash(), TargetState::Launched);
    store.put(
        &store.keys().schedule(machine, name),
        serde_json::to_vec(&rec).expect("json"),
    );
    store.put(&store.keys().placement(name), machine);
}

/// An at-most-once unit on a machine that left moves only `AtMostOnce::start_after` after
/// the engine saw it leave (its old copy may still be stopping); a plain unit moves at once,
/// as in fleet. The engine reconciles when the wait ends, without waiting for a tick.
#[tokio::test(start_paused = true)]
async fn an_at_most_once_unit_moves_only_after_its_old_copy_has_stopped() {
    let wait = fleet_registry::AtMostOnce::for_ttl(TTL).start_after;
    assert_eq!(wait, Duration::from_millis(9268));
    let store = MemoryStore::default();
    add_machine(&store, "m1");
    let mut engine = Engine::new(Arc::new(store.clone()), config("m1"), Metrics::new());
    elect(&mut engine).await;
    add_machine(&store, "m2");
    create(&store, "plain.service", 1).await;
    schedule_on(&store, "plain.service", "m2", 1);
    at_most_once_on(&store, "once.service", "m2", 2).await;
    drain(&mut engine).await;
    engine.handle(Event::Tick).await;
    assert_eq!(placement(&store, "once.service").as_deref(), Some("m2"));
    store.delete(&store.keys().machine("m2"));
    drain(&mut engine).await;
    engine.handle(Event::Tick).await;
    drain(&mut engine).await;
    assert_eq!(placement(&store, "plain.service").as_deref(), Some("m1"));
    assert_eq!(placement(&store, "once.service").as_deref(), Some("m2"));
    assert!(
        store
            .get(&store.keys().schedule("m2", "once.service"))
            .is_some()
    );
    // ticks during the wait change nothing
    tokio::time::sleep(wait - Duration::from_millis(10)).await;
    settle(&mut engine).await;
    assert_eq!(placement(&store, "once.service").as_deref(), Some("m2"));
    // the loop's next event is the end of the wait, before the interval's tick
    let never = tokio_util::sync::CancellationToken::new();
    let started = tokio::time::Instant::now();
    let ev = engine.next_event(&never).await;
    assert!(matches!(ev, Event::Tick));
    assert_eq!(started.elapsed(), Duration::from_millis(10));
    engine.handle(ev).await;
    assert_eq!(placement(&store, "once.service").as_deref(), Some("m1"));
    assert!(
        store
            .get(&store.keys().schedule("m2", "once.service"))
            .is_none()
    );
}

/// A machine back before the wait is over keeps its at-most-once unit; when it leaves
/// again, the wait starts again from then.
#[tokio::test(start_paused = true)]
async fn a_machine_back_within_the_wait_keeps_its_at_most_once_unit() {
    let wait = fleet_registry::AtMostOnce::for_ttl(TTL).start_after;
    let store = MemoryStore::default();
    add_machine(&store, "m1");
    let mut engine = Engine::new(Arc::new(store.clone()), config("m1"), Metrics::new());
    elect(&mut engine).await;
    add_machine(&store, "m2");
    at_most_once_on(&store, "once.service", "m2", 2).await;
    drain(&mut engine).await;
    engine.handle(Event::Tick).await;
    store.delete(&store.keys().machine("m2"));
    drain(&mut engine).await;
    engine.handle(Event::Tick).await;
    tokio::time::sleep(wait / 2).await;
    add_machine(&store, "m2");
    drain(&mut engine).await;
    engine.handle(Event::Tick).await;
    store.delete(&store.keys().machine("m2"));
    drain(&mut engine).await;
    engine.handle(Event::Tick).await;
    // past the first absence's wait, within the second's
    tokio::time::sleep(wait / 2 + Duration::from_secs(1)).await;
    engine.handle(Event::Tick).await;
    drain(&mut engine).await;
    assert_eq!(placement(&store, "once.service").as_deref(), Some("m2"));
    tokio::time::sleep(wait).await;
    engine.handle(Event::Tick).await;
    assert_eq!(placement(&store, "once.service").as_deref(), Some("m1"));
}

/// Turns the engine a few times: what its watch delivered, then a reconcile.
async fn turn(engine: &mut Engine, times: usize) {
    for _ in 0..times {
        drain(engine).await;
        engine.handle(Event::Tick).await;
    }
    drain(engine).await;
}

/// One key etcd refuses for good (a permission on it, a value too large) used to fail every
/// write of the engine, so no other unit was placed or moved; likewise one body it would not
/// let the engine read stopped every reconcile.
#[tokio::test(start_paused = true)]
async fn a_refused_key_does_not_stall_the_other_units() {
    let (store, mut engine, _metrics) = leading().await;
    let refused_write = store.keys().schedule("m1", "b.service");
    store.refuse_key(&refused_write, true);
    create(&store, "b.service", 2).await;
    create(&store, "c.service", 3).await;
    turn(&mut engine, 3).await;
    assert_eq!(placement(&store, "c.service").as_deref(), Some("m1"));
    assert_eq!(placement(&store, "b.service"), None);
    let refused_read = store.keys().body(&body(4).hash().to_string());
    store.refuse_key(&refused_read, true);
    create(&store, "d.service", 4).await;
    create(&store, "e.service", 5).await;
    turn(&mut engine, 3).await;
    assert_eq!(placement(&store, "e.service").as_deref(), Some("m1"));
    let reason = store
        .get(&store.keys().reason("d.service"))
        .map(|v| String::from_utf8_lossy(&v).into_owned())
        .unwrap_or_default();
    assert!(reason.contains("cannot be read"), "{reason:?}");
    // once etcd lets them, both are placed (b after its wait)
    store.refuse_key(&refused_write, false);
    store.refuse_key(&refused_read, false);
    tokio::time::sleep(Duration::from_secs(31)).await;
    turn(&mut engine, 3).await;
    assert_eq!(placement(&store, "b.service").as_deref(), Some("m1"));
    assert_eq!(placement(&store, "d.service").as_deref(), Some("m1"));
}

/// The ranges of the watches opened since the first `skip`.
fn watches_since(store: &MemoryStore, skip: usize) -> Vec<Vec<fleet_registry::KeyRange>> {
    store.watches_opened().into_iter().skip(skip).collect()
}

/// A candidate that does not lead follows the leader key and nothing else: no mirror, no
/// body reads, no watch of the engine's keys, whatever changes in the cluster. It mirrors
/// only once it wins, and drops the mirror when it steps down.
#[tokio::test(start_paused = true)]
async fn a_candidate_that_does_not_lead_mirrors_nothing() {
    let (store, mut leader, _) = leading().await;
    let leader_only = vec![fleet_registry::KeyRange::prefix(store.keys().leader())];
    let engine_ranges = fleet_registry::engine_ranges(store.keys());
    let opened = store.watches_opened().len();
    let reads = store.body_reads();
    let mut candidate = Engine::new(Arc::new(store.clone()), config("m2"), Metrics::new());
    for n in 0..5 {
        create(&store, &format!("c{n}.service"), n + 20).await;
        settle(&mut leader).await;
        turn(&mut candidate, 2).await;
        assert!(!candidate.is_leader());
        assert!(!candidate.has_model(), "a candidate holds a mirror");
    }
    assert_eq!(watches_since(&store, opened), vec![leader_only.clone()]);
    // (the leader read the new units' bodies; the candidate read none)
    let leader_reads = store.body_reads() - reads;
    assert!(leader_reads >= 1);
    // the leader goes: the candidate wins, then lists the engine's keys
    leader.handle(Event::Shutdown).await;
    let opened = store.watches_opened().len();
    turn(&mut candidate, 1).await;
    assert!(candidate.is_leader());
    assert_eq!(watches_since(&store, opened), vec![engine_ranges]);
    turn(&mut candidate, 1).await;
    assert!(candidate.has_model());
    // stepping down drops the mirror and follows the leader key alone again
    let opened = store.watches_opened().len();
    candidate.step_down();
    assert!(!candidate.has_model());
    assert_eq!(watches_since(&store, opened), vec![leader_only]);
}

/// A new leader decides only from a listing made after its election: what changed while it
/// did not lead (and did not watch) is in it, and nothing is written before it came.
#[tokio::test(start_paused = true)]
async fn a_new_leader_lists_before_deciding() {
    let store = MemoryStore::default();
    add_machine(&store, "m1");
    store.put(&store.keys().leader(), "m9");
    let mut engine = Engine::new(Arc::new(store.clone()), config("m1"), Metrics::new());
    turn(&mut engine, 2).await;
    assert!(!engine.is_leader());
    // changes the candidate does not watch
    create(&store, "a.service", 1).await;
    schedule_on(&store, "a.service", "m1", 1);
    create(&store, "b.service", 2).await;
    store.delete(&store.keys().leader());
    drain(&mut engine).await;
    engine.handle(Event::Tick).await;
    assert!(engine.is_leader());
    assert!(!engine.has_model());
    // ticks before its listing came decide nothing
    let elected = store.revision();
    for _ in 0..3 {
        engine.handle(Event::Tick).await;
    }
    assert_eq!(store.revision(), elected, "a leader wrote before listing");
    drain(&mut engine).await;
    engine.handle(Event::Tick).await;
    assert_eq!(placement(&store, "a.service").as_deref(), Some("m1"));
    assert_eq!(placement(&store, "b.service").as_deref(), Some("m1"));
}

/// A burst's decisions go to etcd several units per fenced transaction (within etcd's limit
/// of operations per transaction), not one transaction per unit.
#[tokio::test(start_paused = true)]
async fn a_burst_is_written_in_a_few_transactions() {
    let (store, mut engine, _) = leading().await;
    settle(&mut engine).await;
    let before = store.engine_txns();
    for n in 0..100 {
        create(&store, &format!("u{n}.service"), n + 10).await;
    }
    drain(&mut engine).await;
    engine.handle(Event::Tick).await;
    let placed = (0..100)
        .filter(|n| placement(&store, &format!("u{n}.service")).is_some())
        .count();
    assert_eq!(placed, 100);
    let per_txn = fleet_registry::ENGINE_OPS_PER_TXN as u64;
    assert_eq!(store.engine_txns() - before, 100u64.div_ceil(per_txn));
}

/// Machines m1 and m2 and an at-most-once unit `once.service` running on m1 whose options now
/// name m2; and how long a move of it between two live machines waits.
async fn at_most_once_bound_elsewhere() -> (MemoryStore, Duration) {
    let timing = fleet_registry::AtMostOnce::for_ttl(TTL);
    let store = MemoryStore::default();
    add_machine(&store, "m1");
    add_machine(&store, "m2");
    let unit: UnitName = "once.service".parse().expect("name");
    let file = UnitFile::parse(
        "[Service]\nExecStart=/bin/true\n[X-Fleet]\nMachineID=m2\nAtMostOnce=true\n",
    )
    .expect("unit");
    store
        .create_unit(&unit, &file, TargetState::Launched)
        .await
        .expect("create");
    let rec = records::schedule(file.hash(), TargetState::Launched);
    store.put(
        &store.keys().schedule("m1", "once.service"),
        serde_json::to_vec(&rec).expect("json"),
    );
    store.put(&store.keys().placement("once.service"), "m1");
    (store, timing.start_after + timing.ttl)
}

/// Regression: an at-most-once unit moved between two live machines (here its options now
/// name another machine) was taken off one and placed on the other in one write, so the new
/// machine could start it before the old one stopped it. It is taken off first, and placed
/// elsewhere only once the old copy has surely stopped.
#[tokio::test(start_paused = true)]
async fn an_at_most_once_unit_moves_between_live_machines_in_two_steps() {
    let (store, hold) = at_most_once_bound_elsewhere().await;
    let mut engine = Engine::new(Arc::new(store.clone()), config("m1"), Metrics::new());
    elect(&mut engine).await;
    engine.handle(Event::Tick).await;
    let on = |m: &str| {
        store
            .get(&store.keys().schedule(m, "once.service"))
            .is_some()
    };
    assert!(!on("m1"), "still scheduled on the machine it leaves");
    assert!(!on("m2"), "placed on the new machine in the same write");
    // reconciles during the wait place it nowhere
    tokio::time::sleep(hold - Duration::from_millis(10)).await;
    turn(&mut engine, 3).await;
    assert!(!on("m2") && !on("m1"));
    // the loop's next event is the end of the wait
    let never = tokio_util::sync::CancellationToken::new();
    tokio::time::sleep(Duration::from_millis(10)).await;
    settle(&mut engine).await;
    let ev = engine.next_event(&never).await;
    engine.handle(ev).await;
    assert!(on("m2"));
    assert_eq!(placement(&store, "once.service").as_deref(), Some("m2"));
}

/// Regression: a leader that died between the two steps of an at-most-once move left the unit
/// unscheduled, and the next leader placed it at once, while the old copy might still be
/// stopping. A new leader holds the at-most-once units it finds unscheduled as moving since its
/// election; one created after its first reconcile is placed at once.
#[tokio::test(start_paused = true)]
async fn a_new_leader_finishes_a_half_done_at_most_once_move_only_after_the_wait() {
    let timing = fleet_registry::AtMostOnce::for_ttl(TTL);
    let hold = timing.start_after + timing.ttl;
    let store = MemoryStore::default();
    add_machine(&store, "m1");
    add_machine(&store, "m2");
    // what the old leader left: taken off its machine, not yet placed elsewhere
    let create_once = |name: &'static str| {
        let store = store.clone();
        async move {
            let unit: UnitName = name.parse().expect("name");
            let file =
                UnitFile::parse("[Service]\nExecStart=/bin/true\n[X-Fleet]\nAtMostOnce=true\n")
                    .expect("unit");
            store
                .create_unit(&unit, &file, TargetState::Launched)
                .await
                .expect("create");
        }
    };
    create_once("half.service").await;
    create(&store, "plain.service", 3).await;
    let mut engine = Engine::new(Arc::new(store.clone()), config("m1"), Metrics::new());
    elect(&mut engine).await;
    engine.handle(Event::Tick).await;
    assert!(placement(&store, "plain.service").is_some());
    assert_eq!(placement(&store, "half.service"), None, "placed at once");
    create_once("new.service").await;
    drain(&mut engine).await;
    engine.handle(Event::Tick).await;
    assert!(
        placement(&store, "new.service").is_some(),
        "a new unit waited"
    );
    assert_eq!(placement(&store, "half.service"), None);
    tokio::time::sleep(hold).await;
    settle(&mut engine).await;
    engine.handle(Event::Tick).await;
    assert!(placement(&store, "half.service").is_some());
}

/// Regression: a machine whose record could not be read (a newer fleetd's format, damage)
/// counted as gone, so its units, at-most-once ones included, moved while it ran them. Its
/// record is there: the units stay, and nothing new is placed on it.
#[tokio::test(start_paused = true)]
async fn a_machine_whose_record_cannot_be_read_keeps_its_units() {
    let wait = fleet_registry::AtMostOnce::for_ttl(TTL).start_after;
    let store = MemoryStore::default();
    add_machine(&store, "m1");
    let mut engine = Engine::new(Arc::new(store.clone()), config("m1"), Metrics::new());
    elect(&mut engine).await;
    add_machine(&store, "m2");
    create(&store, "plain.service", 1).await;
    schedule_on(&store, "plain.service", "m2", 1);
    at_most_once_on(&store, "once.service", "m2", 2).await;
    turn(&mut engine, 1).await;
    store.put(&store.keys().machine("m2"), "{not a machine record");
    turn(&mut engine, 1).await;
    tokio::time::sleep(wait + TTL).await;
    settle(&mut engine).await;
    engine.handle(Event::Tick).await;
    assert_eq!(placement(&store, "plain.service").as_deref(), Some("m2"));
    assert_eq!(placement(&store, "once.service").as_deref(), Some("m2"));
    // once it is really gone, they move
    store.delete(&store.keys().machine("m2"));
    turn(&mut engine, 1).await;
    assert_eq!(placement(&store, "plain.service").as_deref(), Some("m1"));
}

/// Regression: the moves of a term outlived its step down, so an engine that led again kept
/// its old start of a two-step move instead of adopting the move afresh at its new election,
/// and placed the unit before the hold from that election was over.
#[tokio::test(start_paused = true)]
async fn a_leader_elected_again_waits_from_its_new_election() {
    let (store, hold) = at_most_once_bound_elsewhere().await;
    let mut engine = Engine::new(Arc::new(store.clone()), config("m1"), Metrics::new());
    elect(&mut engine).await;
    engine.handle(Event::Tick).await;
    assert_eq!(placement(&store, "once.service"), None, "step one");
    tokio::time::sleep(hold / 2).await;
    engine.step_down();
    drain(&mut engine).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    drain(&mut engine).await;
    engine.handle(Event::Tick).await;
    assert!(engine.is_leader(), "elected again");
    drain(&mut engine).await;
    engine.handle(Event::Tick).await;
    // past the first term's hold, within the second's
    tokio::time::sleep(hold / 2).await;
    drain(&mut engine).await;
    engine.handle(Event::Tick).await;
    assert_eq!(placement(&store, "once.service"), None, "placed early");
    tokio::time::sleep(hold / 2).await;
    settle(&mut engine).await;
    engine.handle(Event::Tick).await;
    assert_eq!(placement(&store, "once.service").as_deref(), Some("m2"));
}

/// Regression: every listing (each poll with `disable_watches`, every relist) restarted the
/// wait of at-most-once units on a machine that left, so they never moved. A listing keeps
/// the absences of machines still absent.
#[tokio::test(start_paused = true)]
async fn a_listing_does_not_restart_the_at_most_once_wait() {
    let wait = fleet_registry::AtMostOnce::for_ttl(TTL).start_after;
    let store = MemoryStore::default();
    add_machine(&store, "m1");
    let mut engine = Engine::new(Arc::new(store.clone()), config("m1"), Metrics::new());
    elect(&mut engine).await;
    add_machine(&store, "m2");
    at_most_once_on(&store, "once.service", "m2", 2).await;
    turn(&mut engine, 1).await;
    store.delete(&store.keys().machine("m2"));
    turn(&mut engine, 1).await;
    tokio::time::sleep(wait / 2).await;
    // a relist: the watch breaks and lists again
    store.set_reachable(false);
    store.set_reachable(true);
    turn(&mut engine, 1).await;
    assert_eq!(placement(&store, "once.service").as_deref(), Some("m2"));
    tokio::time::sleep(wait / 2 + Duration::from_millis(10)).await;
    turn(&mut engine, 1).await;
    assert_eq!(placement(&store, "once.service").as_deref(), Some("m1"));
}

/// Regression: while an at-most-once unit waited, the end of its wait stood in for the
/// prompt reconcile of every other change: a unit created meanwhile waited for a tick.
#[tokio::test(start_paused = true)]
async fn a_change_during_an_at_most_once_wait_is_placed_promptly() {
    let store = MemoryStore::default();
    add_machine(&store, "m1");
    let mut engine = Engine::new(Arc::new(store.clone()), config("m1"), Metrics::new());
    elect(&mut engine).await;
    add_machine(&store, "m2");
    at_most_once_on(&store, "once.service", "m2", 2).await;
    turn(&mut engine, 1).await;
    store.delete(&store.keys().machine("m2"));
    turn(&mut engine, 1).await;
    let never = tokio_util::sync::CancellationToken::new();
    let quiet_until = tokio::time::Instant::now() + Duration::from_millis(500);
    while let Ok(ev) = tokio::time::timeout_at(quiet_until, engine.next_event(&never)).await {
        engine.handle(ev).await;
    }
    create(&store, "single.service", 7).await;
    drain(&mut engine).await;
    let started = tokio::time::Instant::now();
    let ev = engine.next_event(&never).await;
    assert!(matches!(ev, Event::Tick));
    assert!(
        started.elapsed() <= Duration::from_millis(5),
        "reconciled {:?} after the change",
        started.elapsed()
    );
    engine.handle(ev).await;
    assert_eq!(placement(&store, "single.service").as_deref(), Some("m1"));
    assert_eq!(placement(&store, "once.service").as_deref(), Some("m2"));
}

/// Regression: a stored unit whose `AtMostOnce` is not a boolean (fleet v1.0 took it for an
/// unknown key) was invalid to the engine after an upgrade, which took it off its machine.
/// It stays placed, as an ordinary unit.
#[tokio::test(start_paused = true)]
async fn a_stored_non_boolean_at_most_once_keeps_the_unit_placed() {
    let store = MemoryStore::default();
    add_machine(&store, "m1");
    let unit: UnitName = "old.service".parse().expect("name");
    let file = UnitFile::parse("[Service]\nExecStart=/bin/true\n[X-Fleet]\nAtMostOnce=maybe\n")
        .expect("unit");
    store
        .create_unit(&unit, &file, TargetState::Launched)
        .await
        .expect("create");
    let rec = records::schedule(file.hash(), TargetState::Launched);
    store.put(
        &store.keys().schedule("m1", "old.service"),
        serde_json::to_vec(&rec).expect("json"),
    );
    store.put(&store.keys().placement("old.service"), "m1");
    let mut engine = Engine::new(Arc::new(store.clone()), config("m1"), Metrics::new());
    elect(&mut engine).await;
    turn(&mut engine, 2).await;
    assert_eq!(placement(&store, "old.service").as_deref(), Some("m1"));
    assert!(store.get(&store.keys().reason("old.service")).is_none());
}

/// How many engines campaign after the leader died, with the candidates' `campaign_spread`.
async fn campaigns_after_the_leader_dies(spread: Duration) -> u64 {
    let store = MemoryStore::default();
    add_machine(&store, "m1");
    let mut engines = Vec::new();
    for n in 0..20 {
        let shutdown = tokio_util::sync::CancellationToken::new();
        let cfg = EngineConfig {
            campaign_spread: spread,
            ..config(&format!("e{n}"))
        };
        let task = tokio::spawn(crate::run(
            Arc::new(store.clone()),
            cfg,
            Metrics::new(),
            shutdown.clone(),
        ));
        engines.push((shutdown, task));
    }
    tokio::time::sleep(Duration::from_secs(5)).await;
    let key = store.keys().leader();
    let first = store.get(&key).expect("a leader");
    // the leader's machine dies: its engine ends where it is, its lease expires
    let index: usize = String::from_utf8_lossy(&first[1..])
        .parse()
        .expect("engine index");
    engines[index].1.abort();
    let lease = store.lease_of(&key).expect("the leader key's lease");
    let before = store.campaigns();
    store.expire_lease(lease);
    tokio::time::sleep(Duration::from_secs(5)).await;
    let campaigns = store.campaigns() - before;
    let second = store.get(&key).expect("a new leader");
    assert_ne!(second, first, "no other engine took over");
    for (shutdown, task) in engines {
        shutdown.cancel();
        let _ = task.await;
    }
    campaigns
}

/// Regression (1,000 x 100,000 in fleet-sim): when the leader died, every candidate
/// campaigned the moment its key went, a thousand lease grants and transactions in one
/// burst on etcd. Each candidate now waits its own delay within the spread, and the first
/// winner's key reaches the others before their turn: one campaign.
#[tokio::test(start_paused = true)]
async fn candidates_spread_their_campaigns_when_the_leader_dies() {
    assert_eq!(
        campaigns_after_the_leader_dies(Duration::from_secs(1)).await,
        1
    );
}

/// Regression (fleet-sim, 1,000 x 100,000): a new leader asked for a body once per unit,
/// though many units share one (a template's instances), and the registry searched a list
/// for each: seconds at 100,000 units. It asks for each body once.
#[tokio::test(start_paused = true)]
async fn a_new_leader_asks_for_each_body_once() {
    let store = MemoryStore::default();
    add_machine(&store, "m1");
    for n in 0..50 {
        create(&store, &format!("u{n}.service"), n % 5).await;
    }
    let mut engine = Engine::new(Arc::new(store.clone()), config("m1"), Metrics::new());
    elect(&mut engine).await;
    let before = store.bodies_asked();
    engine.handle(Event::Tick).await;
    assert_eq!(store.bodies_asked() - before, 5, "bodies asked for");
    let placed = (0..50)
        .filter(|n| placement(&store, &format!("u{n}.service")).is_some())
        .count();
    assert_eq!(placed, 50);
}

/// Regression (fleet-sim, 100,000 units): the leader reconciled its whole mirror at every
/// tick of the interval though nothing had changed, a second or more of CPU each time, and
/// a machine that left waited behind such a reconcile. A tick with nothing new since a
/// reconcile that left nothing to do reconciles nothing; a change is reconciled as ever.
#[tokio::test(start_paused = true)]
async fn a_tick_with_nothing_new_does_not_reconcile_again() {
    let (store, mut engine, metrics) = leading().await;
    let reconciles = || {
        metrics
            .encode()
            .lines()
            .find_map(|l| {
                l.strip_prefix("fleet_engine_reconcile_count_total ")?
                    .parse::<u64>()
                    .ok()
            })
            .unwrap_or(0)
    };
    // past the new leader's hold (a reconcile during it always runs)
    tokio::time::sleep(TTL).await;
    drain(&mut engine).await;
    engine.handle(Event::Tick).await;
    let before = reconciles();
    for _ in 0..5 {
        tokio::time::sleep(Duration::from_secs(2)).await;
        engine.handle(Event::Tick).await;
    }
    assert_eq!(reconciles(), before, "ticks without a change reconciled");
    create(&store, "b.service", 2).await;
    drain(&mut engine).await;
    engine.handle(Event::Tick).await;
    assert_eq!(placement(&store, "b.service").as_deref(), Some("m1"));
    assert_eq!(reconciles(), before + 1);
    // a machine leaving is a change too
    add_machine(&store, "m2");
    drain(&mut engine).await;
    engine.handle(Event::Tick).await;
    assert_eq!(reconciles(), before + 2);
}

/// Regression (fleet-sim, 300 x 30,000, 10 % killed): the mirror watches its ranges with one
/// etcd watcher each, ordered within a watcher only. A later event of another range (a
/// machine leaving) came before the engine's own write came back through its range; the
/// engine took its mirror for one holding that write and moved the same units again, to
/// other machines: they ran on two. It waits for its write in the range it wrote to.
#[tokio::test(start_paused = true)]
async fn a_later_event_of_another_range_does_not_stand_for_its_own_write() {
    let store = MemoryStore::default();
    add_machine(&store, "m1");
    add_machine(&store, "m2");
    create(&store, "a.service", 1).await;
    let mut engine = Engine::new(Arc::new(store.clone()), config("m1"), Metrics::new());
    elect(&mut engine).await;
    engine.handle(Event::Tick).await;
    let placed = placement(&store, "a.service").expect("placed");
    // a machine registers after the write; its event comes before the write's
    add_machine(&store, "m3");
    let written = store.revision();
    let key = store.keys().machine("m3");
    let value = store.get(&key).expect("machine record");
    engine
        .handle(Event::Watch(WatchEvent::Put {
            key,
            value,
            revision: written,
        }))
        .await;
    for _ in 0..3 {
        engine.handle(Event::Tick).await;
    }
    assert_eq!(store.revision(), written, "decided without its own write");
    drain(&mut engine).await;
    engine.handle(Event::Tick).await;
    assert_eq!(placement(&store, "a.service"), Some(placed));
}

/// Regression: a transaction of the engine's comes back as one watch event per key, and a
/// reconcile between them decided from half of it: the units whose events had not come yet
/// looked unplaced (or still on a dead machine), were placed a second time, elsewhere, and ran
/// on two machines until the next reconcile dropped the first placement (fleet-sim, 1,000 x
/// 100,000, 10 % killed: 7 units). The engine decides again only once the watch says its
/// write's revision is whole.
#[tokio::test(start_paused = true)]
async fn a_reconcile_waits_for_the_whole_of_its_own_write() {
    let (store, mut engine, _) = leading().await;
    add_machine(&store, "m2");
    tokio::time::sleep(TTL).await;
    drain(&mut engine).await;
    engine.handle(Event::Tick).await;
    let names: Vec<String> = (0..6).map(|i| format!("u{i}.service")).collect();
    for (i, n) in (10..).zip(&names) {
        create(&store, n, i).await;
    }
    drain(&mut engine).await;
    let before = store.revision();
    engine.handle(Event::Tick).await;
    let written = store.revision();
    assert_eq!(written, before + 1, "the six placed in one write");
    // the first of the write's events comes in, and the others wait in the watch
    deliver(&mut engine, 1).await;
    for _ in 0..3 {
        engine.handle(Event::Tick).await;
    }
    assert_eq!(
        store.revision(),
        written,
        "decided from half of its own write"
    );
    drain(&mut engine).await;
    engine.handle(Event::Tick).await;
    for n in &names {
        let on: Vec<&str> = ["m1", "m2"]
            .into_iter()
            .filter(|m| store.get(&store.keys().schedule(m, n)).is_some())
            .collect();
        assert_eq!(on.len(), 1, "{n} scheduled on {on:?}");
    }
}

/// A decision whose write changes nothing (its keys were deleted meanwhile by someone else,
/// and the engine had not seen it yet) makes no revision and no watch event in etcd, which
/// answers with its current revision, maybe that of another range: the engine waited for that
/// revision to come back through its own range, and decided nothing more, ever.
#[tokio::test(start_paused = true)]
async fn a_write_that_changes_nothing_does_not_hold_the_engine_back() {
    let (store, mut engine) = leading_past_the_hold().await;
    // a.service destroyed by another hand, record first, then its decisions; then a machine
    // registers (another range)
    store.delete(&store.keys().unit("a.service"));
    store.delete(&store.keys().placement("a.service"));
    store.delete(&store.keys().schedule("m1", "a.service"));
    add_machine(&store, "m3");
    // the engine sees the record go (and that revision whole), not the rest yet
    deliver(&mut engine, 2).await;
    let (before, txns) = (store.revision(), store.engine_txns());
    engine.handle(Event::Tick).await;
    assert_eq!(
        store.engine_txns(),
        txns + 1,
        "the engine wrote its decision"
    );
    assert_eq!(
        store.revision(),
        before,
        "deleting keys already gone: no write"
    );
    drain(&mut engine).await;
    create(&store, "b.service", 2).await;
    drain(&mut engine).await;
    engine.handle(Event::Tick).await;
    assert_eq!(placement(&store, "b.service").as_deref(), Some("m1"));
}

/// Regression: a tick was skipped while the mirror's revision equalled that of the last
/// settled reconcile, but the ranges' watchers deliver out of step: a unit's event with an
/// earlier revision than a machine's already seen changed the mirror, not its revision, and
/// the unit waited for some later change. A tick skips only when nothing came in at all.
#[tokio::test(start_paused = true)]
async fn an_event_behind_another_range_is_not_skipped() {
    let (store, mut engine) = leading_past_the_hold().await;
    create(&store, "late.service", 7).await;
    let unit_rev = store.revision();
    add_machine(&store, "m3");
    let machine = store.keys().machine("m3");
    let put = |key: String, revision: i64| WatchEvent::Put {
        value: store.get(&key).expect("value"),
        key,
        revision,
    };
    // the machines' watcher is ahead of the units'
    engine
        .handle(Event::Watch(put(machine, store.revision())))
        .await;
    engine.handle(Event::Tick).await;
    assert_eq!(placement(&store, "late.service"), None);
    engine
        .handle(Event::Watch(put(
            store.keys().unit("late.service"),
            unit_rev,
        )))
        .await;
    engine.handle(Event::Tick).await;
    assert!(
        placement(&store, "late.service").is_some(),
        "the unit waited"
    );
}

/// Bodies are not mirrored: a unit whose body is not in etcd yet (a client that writes the
/// record first) cannot be placed, and its body is read again at the next tick, not only
/// once the mirror changes (a reconcile that could not read a body is not a settled one).
#[tokio::test(start_paused = true)]
async fn a_body_written_after_its_unit_is_read_at_a_later_tick() {
    let (store, mut engine) = leading_past_the_hold().await;
    let file = body(7);
    let rec = records::unit("late.service", file.hash(), TargetState::Launched);
    store.put(
        &store.keys().unit("late.service"),
        serde_json::to_vec(&rec).expect("json"),
    );
    drain(&mut engine).await;
    engine.handle(Event::Tick).await;
    assert_eq!(placement(&store, "late.service"), None);
    drain(&mut engine).await;
    engine.handle(Event::Tick).await;
    store.put(
        &store.keys().body(&file.hash().to_string()),
        file.serialize(),
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    engine.handle(Event::Tick).await;
    assert_eq!(placement(&store, "late.service").as_deref(), Some("m1"));
}

/// The in-memory store behind [`Intercepted`], whose writes and refences an [`Intercept`]
/// sees first (by default it only passes them on).
#[async_trait::async_trait]
trait Intercept: Send + Sync {
    async fn apply_batches(
        &self,
        store: &MemoryStore,
        leadership: &fleet_registry::Leadership,
        batches: &[Vec<fleet_registry::EngineOp>],
    ) -> Vec<fleet_registry::Result<i64>> {
        store.apply_batches(leadership, batches).await
    }
    async fn apply(
        &self,
        store: &MemoryStore,
        leadership: &fleet_registry::Leadership,
        ops: &[fleet_registry::EngineOp],
    ) -> fleet_registry::Result<i64> {
        store.apply(leadership, ops).await
    }
    async fn refence(
        &self,
        store: &MemoryStore,
        leadership: &fleet_registry::Leadership,
    ) -> fleet_registry::Result<i64> {
        store.refence(leadership).await
    }
}

/// An [`EngineStore`]: `store`, its decision writes and refences going through `with`.
struct Intercepted<I> {
    store: MemoryStore,
    with: I,
}

impl<I: Intercept> Intercepted<I> {
    fn new(store: &MemoryStore, with: I) -> Arc<Self> {
        Arc::new(Intercepted {
            store: store.clone(),
            with,
        })
    }
}

#[async_trait::async_trait]
impl<I: Intercept> EngineStore for Intercepted<I> {
    fn keys(&self) -> &fleet_registry::keys::Keys {
        self.store.keys()
    }
    async fn campaign(
        &self,
        machine_id: &str,
        ttl: Duration,
    ) -> fleet_registry::Result<Option<fleet_registry::Leadership>> {
        self.store.campaign(machine_id, ttl).await
    }
    async fn resign(&self, leadership: fleet_registry::Leadership) {
        self.store.resign(leadership).await
    }
    async fn refence(
        &self,
        leadership: &fleet_registry::Leadership,
    ) -> fleet_registry::Result<i64> {
        self.with.refence(&self.store, leadership).await
    }
    fn watch_engine(&self, poll: Option<Duration>) -> tokio::sync::mpsc::Receiver<WatchEvent> {
        self.store.watch_engine(poll)
    }
    fn watch_leader(&self, poll: Option<Duration>) -> tokio::sync::mpsc::Receiver<WatchEvent> {
        self.store.watch_leader(poll)
    }
    async fn unit_bodies(
        &self,
        hashes: &[fleet_unit::UnitHash],
    ) -> fleet_registry::Result<std::collections::HashMap<fleet_unit::UnitHash, UnitFile>> {
        self.store.unit_bodies(hashes).await
    }
    async fn apply(
        &self,
        leadership: &fleet_registry::Leadership,
        ops: &[fleet_registry::EngineOp],
    ) -> fleet_registry::Result<i64> {
        self.with.apply(&self.store, leadership, ops).await
    }
    async fn apply_batches(
        &self,
        leadership: &fleet_registry::Leadership,
        batches: &[Vec<fleet_registry::EngineOp>],
    ) -> Vec<fleet_registry::Result<i64>> {
        self.with
            .apply_batches(&self.store, leadership, batches)
            .await
    }
}

/// A leadership as it was when a write was sent (lease, create revision, fence), to send a
/// late copy of that write with.
fn leadership_then((lease, create_revision, fence): (i64, i64, i64)) -> fleet_registry::Leadership {
    let (_lost, lost_rx) = tokio::sync::watch::channel(false);
    let (_renewed, renewed_rx) = tokio::sync::watch::channel(tokio::time::Instant::now());
    fleet_registry::Leadership {
        lease: fleet_registry::Lease::new(lease, lost_rx, renewed_rx),
        create_revision,
        fence,
    }
}

fn proof(l: &fleet_registry::Leadership) -> (i64, i64, i64) {
    (l.lease.id(), l.create_revision, l.fence)
}

/// Every decision write answered only after [`SlowWrites::LATENCY`] (an etcd busy with a
/// mass reschedule).
struct SlowWrites;

impl SlowWrites {
    const LATENCY: Duration = Duration::from_secs(3);
}

#[async_trait::async_trait]
impl Intercept for SlowWrites {
    async fn apply(
        &self,
        store: &MemoryStore,
        leadership: &fleet_registry::Leadership,
        ops: &[fleet_registry::EngineOp],
    ) -> fleet_registry::Result<i64> {
        tokio::time::sleep(Self::LATENCY).await;
        store.apply(leadership, ops).await
    }
    async fn apply_batches(
        &self,
        store: &MemoryStore,
        leadership: &fleet_registry::Leadership,
        batches: &[Vec<fleet_registry::EngineOp>],
    ) -> Vec<fleet_registry::Result<i64>> {
        tokio::time::sleep(Self::LATENCY).await;
        store.apply_batches(leadership, batches).await
    }
}

/// A reconcile whose writes wait long on etcd rests afterwards only as long as it took to
/// decide: the writing is etcd's work, and machines that left meanwhile were kept waiting
/// for a second round as long again (fleet-sim, 1,000 machines, 10 % killed: two seconds).
#[tokio::test(start_paused = true)]
async fn slow_writes_do_not_lengthen_the_rest_before_the_next_reconcile() {
    let store = MemoryStore::default();
    add_machine(&store, "m1");
    let mut engine = Engine::new(
        Intercepted::new(&store, SlowWrites),
        config("m1"),
        Metrics::new(),
    );
    elect(&mut engine).await;
    create(&store, "a.service", 1).await;
    drain(&mut engine).await;
    let started = tokio::time::Instant::now();
    engine.handle(Event::Tick).await;
    assert!(started.elapsed() >= SlowWrites::LATENCY, "the write waited");
    assert_eq!(placement(&store, "a.service").as_deref(), Some("m1"));
    assert!(
        engine.rest() < Duration::from_secs(1),
        "rests {:?} after a reconcile whose writes took {:?}",
        engine.rest(),
        SlowWrites::LATENCY
    );
}

/// A round of decision writes as it was sent: the leadership's lease, create revision and
/// fence, and the batches.
type SentRound = ((i64, i64, i64), Vec<Vec<fleet_registry::EngineOp>>);

/// Decision writes whose first round times out without an answer and lands only later:
/// just before the next round's writes, with the leadership it was sent with (an etcd slow
/// to apply what it had accepted).
#[derive(Default)]
struct LateWrites {
    /// The lost round: its leadership (lease, create revision, fence) and its batches.
    held: std::sync::Mutex<Option<SentRound>>,
    /// The lost round's outcome when it finally reached the store.
    landed: std::sync::Mutex<Option<Vec<fleet_registry::Result<i64>>>>,
    lost_one: std::sync::atomic::AtomicBool,
}

/// A round's answer when etcd did not answer: each batch's outcome unknown.
fn unanswered(store: &MemoryStore, batches: usize) -> Vec<fleet_registry::Result<i64>> {
    (0..batches)
        .map(|_| {
            Err(fleet_registry::RegistryError::Unreachable {
                op: "writing engine decisions",
                key: store.keys().leader(),
            })
        })
        .collect()
}

#[async_trait::async_trait]
impl Intercept for LateWrites {
    async fn apply_batches(
        &self,
        store: &MemoryStore,
        leadership: &fleet_registry::Leadership,
        batches: &[Vec<fleet_registry::EngineOp>],
    ) -> Vec<fleet_registry::Result<i64>> {
        if !self
            .lost_one
            .swap(true, std::sync::atomic::Ordering::SeqCst)
        {
            *self.held.lock().expect("lock") = Some((proof(leadership), batches.to_vec()));
            return unanswered(store, batches.len());
        }
        let held = self.held.lock().expect("lock").take();
        if let Some((then, lost)) = held {
            let landed = store.apply_batches(&leadership_then(then), &lost).await;
            *self.landed.lock().expect("lock") = Some(landed);
        }
        store.apply_batches(leadership, batches).await
    }
}

/// A round of decisions that timed out may still land later, after the listing the leader
/// made to find out, and then beside the decisions made from that listing: a unit on two
/// machines (fleet-sim saw 4). The leader moves its fence before listing again, so the lost
/// round fails whole whenever it arrives.
#[tokio::test(start_paused = true)]
async fn a_lost_round_of_writes_cannot_land_after_the_listing_that_followed_it() {
    let store = MemoryStore::default();
    for m in ["m1", "m2"] {
        add_machine(&store, m);
    }
    for i in 0..20 {
        create(&store, &format!("u{i}.service"), i).await;
    }
    let late = Intercepted::new(&store, LateWrites::default());
    let mut engine = Engine::new(late.clone(), config("m1"), Metrics::new());
    elect(&mut engine).await;
    engine.handle(Event::Tick).await;
    assert!(
        late.with.held.lock().expect("lock").is_some(),
        "a round was lost"
    );
    assert!(store.list(&store.keys().placement("")).is_empty());
    // a third machine: the next round places differently from the lost one
    add_machine(&store, "m3");
    // up to the round that the lost one lands before (the schedule is looked at right after
    // it: a later reconcile would drop a stray schedule key)
    let mut landed = None;
    for _ in 0..20 {
        settle(&mut engine).await;
        landed = late.with.landed.lock().expect("lock").take();
        if landed.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let landed = landed.expect("the lost round arrived");
    assert!(
        landed
            .iter()
            .all(|r| matches!(r, Err(fleet_registry::RegistryError::NotLeader))),
        "the lost round landed: {landed:?}"
    );
    let dir = store.keys().schedule_dir("x");
    let prefix = dir.strip_suffix("x/").expect("schedule dir");
    let mut machines_of: std::collections::BTreeMap<String, Vec<String>> = Default::default();
    for (key, _) in store.list(prefix) {
        let rest = key.strip_prefix(prefix).expect("schedule key");
        let (machine, unit) = rest.split_once('/').expect("machine/unit");
        machines_of
            .entry(unit.to_string())
            .or_default()
            .push(machine.to_string());
    }
    assert_eq!(machines_of.len(), 20, "{machines_of:?}");
    assert!(
        machines_of.values().all(|m| m.len() == 1),
        "units on two machines: {machines_of:?}"
    );
    assert!(engine.is_leader());
}

/// Decision writes whose first round times out, and whose first refence times out too but
/// lands late (after the second refence, just before the next round): the leader key's mod
/// revision moves under a fence the leader still owns.
#[derive(Default)]
struct LateRefence {
    lost_round: std::sync::atomic::AtomicBool,
    held: std::sync::Mutex<Option<(i64, i64, i64)>>,
    refences: std::sync::atomic::AtomicUsize,
    landed: std::sync::atomic::AtomicBool,
}

#[async_trait::async_trait]
impl Intercept for LateRefence {
    async fn refence(
        &self,
        store: &MemoryStore,
        leadership: &fleet_registry::Leadership,
    ) -> fleet_registry::Result<i64> {
        if self
            .refences
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst)
            == 0
        {
            *self.held.lock().expect("lock") = Some(proof(leadership));
            return Err(fleet_registry::RegistryError::Unreachable {
                op: "moving the engine's fence",
                key: store.keys().leader(),
            });
        }
        store.refence(leadership).await
    }
    async fn apply_batches(
        &self,
        store: &MemoryStore,
        leadership: &fleet_registry::Leadership,
        batches: &[Vec<fleet_registry::EngineOp>],
    ) -> Vec<fleet_registry::Result<i64>> {
        if !self
            .lost_round
            .swap(true, std::sync::atomic::Ordering::SeqCst)
        {
            return unanswered(store, batches.len());
        }
        let held = self.held.lock().expect("lock").take();
        if let Some(then) = held {
            store
                .refence(&leadership_then(then))
                .await
                .expect("the late refence lands");
            self.landed.store(true, std::sync::atomic::Ordering::SeqCst);
        }
        store.apply_batches(leadership, batches).await
    }
}

/// A refence of unknown outcome that lands after a later one moves the mod revision of a key
/// this engine still owns: the next round fails its compare, and the engine moves its fence
/// again rather than step down (nobody else leads); the round's units are placed after.
#[tokio::test(start_paused = true)]
async fn a_late_refence_does_not_depose_the_leader() {
    let store = MemoryStore::default();
    add_machine(&store, "m1");
    for i in 0..5 {
        create(&store, &format!("u{i}.service"), i).await;
    }
    let late = Intercepted::new(&store, LateRefence::default());
    let mut engine = Engine::new(late.clone(), config("m1"), Metrics::new());
    elect(&mut engine).await;
    engine.handle(Event::Tick).await;
    for _ in 0..20 {
        settle(&mut engine).await;
        if late.with.landed.load(std::sync::atomic::Ordering::SeqCst) {
            break;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    assert!(
        late.with.landed.load(std::sync::atomic::Ordering::SeqCst),
        "the late refence landed"
    );
    assert!(
        engine.is_leader(),
        "stepped down though its key is still its own"
    );
    for _ in 0..10 {
        settle(&mut engine).await;
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    assert!(engine.is_leader());
    for i in 0..5 {
        assert_eq!(
            placement(&store, &format!("u{i}.service")).as_deref(),
            Some("m1")
        );
    }
}
