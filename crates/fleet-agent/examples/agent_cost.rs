//! What one agent costs per watch event: N units scheduled to its machine one (or a few) per
//! event, as an engine round hands them out during a big submission, each waited for until
//! it runs and its state is published. Prints the agent's CPU time per event and in total.
//!
//! `cargo run --release -p fleet-agent --example agent_cost [N ...] [--batch B]`
//! (N: 100 and 1000 by default; B: units per event, 1 by default).
//!
//! One agent on the in-memory twins of etcd ([`MemoryStore`]) and systemd
//! ([`FakeUnitManager`]), as the agent's own tests run it, in paused time (so the figures are
//! CPU, never waiting): everything runs on this thread, and the CPU time is this thread's
//! (`CLOCK_THREAD_CPUTIME_ID`). The machine also runs 3 global units (one bound to
//! metadata it has, one in conflict with a unit that arrives half-way, and stops then) and
//! 5 % of the units are in conflict groups, as fleet-sim submits them. The 5 s tick's full pass runs as it
//! would, every 5 s of virtual time.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use fleet_metrics::Metrics;
use fleet_registry::{GlobalRecord, MemoryStore, StateRecord};
use fleet_systemd::fake::FakeUnitManager;
use fleet_testutil::records;
use fleet_unit::{TargetState, UnitFile, UnitName};
use tokio_util::sync::CancellationToken;

const M1: &str = "m1";

/// This thread's CPU time so far, in nanoseconds.
fn cpu_ns() -> u64 {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::ThreadCPUTime);
    t.tv_sec as u64 * 1_000_000_000 + t.tv_nsec as u64
}

fn published_active(store: &MemoryStore, unit: &str) -> bool {
    store
        .get(&store.keys().state(unit, M1))
        .and_then(|v| serde_json::from_slice::<StateRecord>(&v).ok())
        .is_some_and(|s| s.active_state == "active")
}

async fn create(store: &MemoryStore, name: &str, file: &UnitFile) {
    let unit: UnitName = name.parse().expect("name");
    store
        .create_unit(&unit, file, TargetState::Launched)
        .await
        .expect("create");
}

/// Waits (in virtual time) until every one of `names` runs and says so.
async fn settled(store: &MemoryStore, names: &[String]) {
    let mut waited = Duration::ZERO;
    while !names.iter().all(|n| published_active(store, n)) {
        tokio::time::sleep(Duration::from_millis(1)).await;
        waited += Duration::from_millis(1);
        assert!(
            waited < Duration::from_secs(60),
            "units never settled: {names:?}"
        );
    }
}

struct Figures {
    events: usize,
    total_ns: u64,
    /// CPU of the last tenth of the events, per event: what an event costs once the
    /// machine already runs most of its units.
    late_per_event_ns: u64,
}

async fn one_run(n: usize, batch: usize) -> Figures {
    let store = MemoryStore::default();
    let systemd = FakeUnitManager::new();
    let dir = tempfile::tempdir().expect("dir");
    let cfg = fleet_agent::AgentConfig {
        machine_id: M1.into(),
        public_ip: "10.0.0.1".into(),
        metadata: BTreeMap::from([("disk".to_string(), "ssd".to_string())]),
        agent_ttl: Duration::from_secs(30),
        units_directory: dir.path().join("units"),
        disable_watches: false,
        version: "1.0.0".into(),
    };
    let shutdown = CancellationToken::new();
    let agent = tokio::spawn(fleet_agent::run(
        Arc::new(store.clone()),
        Arc::new(systemd.clone()),
        cfg,
        Metrics::new(),
        shutdown.clone(),
        Arc::new(AtomicBool::new(false)),
    ));
    while store.get(&store.keys().machine(M1)).is_none() {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    // the global units, first (fleet-sim submits them first too)
    let globals = [
        ("sim-global-0.service", "[X-Fleet]\nGlobal=true\n"),
        (
            "sim-global-ssd.service",
            "[X-Fleet]\nGlobal=true\nMachineMetadata=disk=ssd\n",
        ),
        (
            "sim-global-spread.service",
            "[X-Fleet]\nGlobal=true\nConflicts=sim-lonely-*.service\n",
        ),
    ];
    let mut global_names = Vec::new();
    for (name, x_fleet) in globals {
        let file = records::file(&format!("[Service]\nExecStart=/bin/sleep 1d\n{x_fleet}"));
        create(&store, name, &file).await;
        let rec = GlobalRecord {
            version: 1,
            hash: file.hash(),
            desired_state: TargetState::Launched,
        };
        store.put(
            &store.keys().global(name),
            serde_json::to_vec(&rec).expect("json"),
        );
        global_names.push(name.to_string());
    }
    settled(&store, &global_names[..2]).await;
    // the units: 5 % in conflict groups, the rest plain, each with a body of its own
    let units: Vec<(String, UnitFile)> = (0..n)
        .map(|i| {
            if i == n / 2 {
                // in conflict with a global unit: it stops there (a full pass, at once)
                (format!("sim-lonely-{i}.service"), records::body(i as u32))
            } else if i % 20 == 7 {
                let name = format!("sim-spread-{i}.service");
                let text =
                    format!("[Service]\nExecStart=/bin/sleep {i}\n[X-Fleet]\nConflicts=sim-spread-{i}-*.service\n");
                (name, records::file(&text))
            } else {
                (format!("sim-unit-{i:06}.service"), records::body(i as u32))
            }
        })
        .collect();
    for (name, file) in &units {
        create(&store, name, file).await;
    }
    let mut per_event = Vec::new();
    let total_start = cpu_ns();
    for chunk in units.chunks(batch) {
        let t0 = cpu_ns();
        for (name, file) in chunk {
            let rec = records::schedule(file.hash(), TargetState::Launched);
            store.put(
                &store.keys().schedule(M1, name),
                serde_json::to_vec(&rec).expect("json"),
            );
        }
        let names: Vec<String> = chunk.iter().map(|(n, _)| n.clone()).collect();
        settled(&store, &names).await;
        per_event.push(cpu_ns() - t0);
    }
    let total_ns = cpu_ns() - total_start;
    let late = &per_event[per_event.len() - per_event.len().div_ceil(10)..];
    let late_per_event_ns = late.iter().sum::<u64>() / late.len() as u64;
    shutdown.cancel();
    let _ = agent.await;
    // every unit, and the globals but the one in conflict with sim-lonely
    assert_eq!(systemd.active_units().len(), n + 2, "every unit runs");
    Figures {
        events: per_event.len(),
        total_ns,
        late_per_event_ns,
    }
}

fn main() {
    let mut sizes = Vec::new();
    let mut batch = 1;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        if a == "--batch" {
            batch = args
                .next()
                .and_then(|b| b.parse().ok())
                .filter(|b| *b > 0)
                .expect("--batch takes a positive number");
        } else {
            sizes.push(a.parse::<usize>().expect("sizes are numbers"));
        }
    }
    if sizes.is_empty() {
        sizes = vec![100, 1000];
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .start_paused(true)
        .build()
        .expect("runtime");
    for n in sizes {
        let f = rt.block_on(one_run(n, batch));
        println!(
            "units={n} batch={batch} events={} cpu_total_ms={:.1} cpu_per_event_us={:.0} cpu_per_event_last_tenth_us={:.0}",
            f.events,
            f.total_ns as f64 / 1e6,
            f.total_ns as f64 / f.events as f64 / 1e3,
            f.late_per_event_ns as f64 / 1e3,
        );
    }
}
