//! Scale run of the engine on a real etcd: M machines register, U units are created, and one
//! engine schedules them all. Prints how long that took, how many etcd transactions the
//! engine needed, and how many watch events one machine's agent watch received (it should be
//! its own share of the units, not the whole cluster's).
//!
//! `cargo run --release -p fleet-engine --example scale [machines] [units]` (defaults 100 1000).
//! Units are created 32 at a time; every listing is paginated, so 100,000 units list fine.
//! Needs `etcd` installed (./test installs it); starts its own on a free loopback port.

use std::sync::Arc;
use std::time::{Duration, Instant};

use fleet_engine::EngineConfig;
use fleet_metrics::Metrics;
use fleet_registry::{MachineRecord, Registry, WatchEvent};
use fleet_testutil::{Fixture, records};
use fleet_unit::{TargetState, UnitFile, UnitName};
use tokio_util::sync::CancellationToken;

#[tokio::main]
async fn main() {
    let mut args = std::env::args().skip(1);
    let machines: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(100);
    let units: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(1000);
    let fixture = Fixture::start_with("/scale/", Duration::from_secs(10)).await;
    let registry = fixture.registry.clone();
    let mut leases = Vec::new();
    for i in 0..machines {
        let rec = MachineRecord {
            public_ip: format!("10.0.{}.{}", i / 250, i % 250 + 1),
            agent_version: "scale".into(),
            ..records::machine(&format!("{i:032x}"))
        };
        leases.push(
            registry
                .register_machine(&rec, Duration::from_secs(60))
                .await
                .expect("register"),
        );
    }
    // one agent's watch, to count what wakes it
    let watched = format!("{:032x}", 0);
    let mut agent_watch = registry.watch_agent(&watched, None);
    let _ = agent_watch.recv().await; // its initial snapshot
    let t0 = Instant::now();
    // 32 creations in flight, as fleetctl sends a burst
    let mut tasks = tokio::task::JoinSet::new();
    for lane in 0..32 {
        let registry = registry.clone();
        tasks.spawn(async move {
            for i in (lane..units).step_by(32) {
                let name = UnitName::parse(&format!("u{i}.service")).expect("name");
                let file = UnitFile::parse(&format!("[Service]\nExecStart=/bin/sleep {i}\n"))
                    .expect("file");
                registry
                    .create_unit(&name, &file, TargetState::Launched)
                    .await
                    .expect("create");
            }
        });
    }
    while let Some(done) = tasks.join_next().await {
        done.expect("creating units");
    }
    let created = t0.elapsed();
    let metrics = Metrics::new();
    let shutdown = CancellationToken::new();
    let engine = tokio::spawn(fleet_engine::run(
        Arc::new(registry.clone()),
        EngineConfig {
            machine_id: "engine".into(),
            reconcile_interval: Duration::from_secs(2),
            agent_ttl: Duration::from_secs(30),
            disable_watches: false,
            campaign_spread: Duration::ZERO,
        },
        metrics.clone(),
        shutdown.clone(),
    ));
    let t1 = Instant::now();
    loop {
        // the engine's own listing (no bodies): cheap enough to poll at 100,000 units
        let snap = registry.engine_snapshot().await.expect("engine snapshot");
        if snap.schedules.len() == units {
            break;
        }
        assert!(
            t1.elapsed() < Duration::from_secs(600),
            "not all units scheduled in 600s"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let scheduled = t1.elapsed();
    let t2 = Instant::now();
    let views = registry.units().await.expect("units");
    assert_eq!(views.len(), units);
    let listed = t2.elapsed();
    let mut agent_events = 0;
    while let Ok(Some(ev)) =
        tokio::time::timeout(Duration::from_millis(500), agent_watch.recv()).await
    {
        if matches!(ev, WatchEvent::Put { .. } | WatchEvent::Delete { .. }) {
            agent_events += 1;
        }
    }
    shutdown.cancel();
    let _ = engine.await;
    println!("machines: {machines}, units: {units}");
    println!(
        "create {units} units through the registry: {:.2}s",
        created.as_secs_f64()
    );
    println!(
        "engine: all units scheduled {:.2}s after start",
        scheduled.as_secs_f64()
    );
    println!(
        "list every unit through the registry (list-unit-files): {:.2}s",
        listed.as_secs_f64()
    );
    let text = metrics.encode();
    let reconciles = metric(&text, "fleet_engine_reconcile_count_total");
    let seconds = metric(&text, "fleet_engine_reconcile_duration_second_sum");
    println!(
        "engine: {reconciles} reconciles, {} units placed, {:.1} ms per reconcile on average",
        metric(
            &text,
            "fleet_engine_task_count_total{type=\"attemptscheduleunit\"}"
        ),
        seconds * 1000.0 / reconciles.max(1.0)
    );
    println!(
        "one agent's watch woke {agent_events} times (expected about units/machines = {})",
        units / machines.max(1)
    );
}

/// The value of one series in the metrics text (0 when absent).
fn metric(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or(0.0)
}
