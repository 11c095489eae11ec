//! Taking over units another fleetd left running (fleet v1.0's agent, or this fleetd before a
//! restart): files in the units directory, runtime-linked, running. When the registry wants
//! the same unit with the same content on this machine, the agent touches nothing (no stop,
//! start, write or daemon-reload); when the content differs, it replaces the unit.

use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use fleet_agent::AgentConfig;
use fleet_systemd::fake::{Call, FakeUnitManager};
use fleet_systemd::{SystemdState, UnitManager};
use fleet_testutil::{Fixture, eventually, records};
use fleet_unit::{TargetState, UnitFile};
use tokio_util::sync::CancellationToken;

const MACHINE: &str = "0123456789abcdef0123456789abcdef";
/// What fleet v1.0's agent wrote (its canonical form) and what the registry holds.
const HELLO: &str = "[Unit]\nDescription=hello\n\n[Service]\nExecStart=/bin/sleep 1000\n";
const NEWER: &str = "[Unit]\nDescription=hello\n\n[Service]\nExecStart=/bin/sleep 2000\n";

/// Runs the agent over a units directory holding `on_disk` for hello.service (running, as
/// the previous agent left it) while the registry schedules `wanted` here, until the agent
/// has published the unit's state after two reconciles; returns the systemd calls it made.
async fn take_over(on_disk: &str, wanted: &str) -> (Vec<Call>, Arc<FakeUnitManager>) {
    let fixture = Fixture::start_with("/takeover/", Duration::from_secs(3)).await;
    let registry = fixture.registry.clone();
    let keys = registry.keys().clone();
    let file = UnitFile::parse(wanted).expect("unit");
    let mut kv = registry.client().kv_client();
    kv.put(keys.body(&file.hash().to_string()), file.serialize(), None)
        .await
        .expect("body");
    let rec = records::schedule(file.hash(), TargetState::Launched);
    kv.put(
        keys.schedule(MACHINE, "hello.service"),
        serde_json::to_vec(&rec).expect("json"),
        None,
    )
    .await
    .expect("schedule");

    let dir = tempfile::tempdir().expect("tempdir");
    let units = dir.path().join("units");
    std::fs::create_dir_all(&units).expect("units dir");
    std::fs::write(units.join("hello.service"), on_disk).expect("file");
    let fake = Arc::new(FakeUnitManager::new());
    fake.write_unit("hello.service", on_disk)
        .await
        .expect("write");
    fake.set_state(
        "hello.service",
        SystemdState::new("loaded", "active", "running"),
    )
    .await;
    fake.clear_calls();

    let shutdown = CancellationToken::new();
    let agent = tokio::spawn(fleet_agent::run(
        Arc::new(registry.clone()),
        fake.clone(),
        AgentConfig {
            machine_id: MACHINE.into(),
            public_ip: "10.0.0.1".into(),
            metadata: Default::default(),
            agent_ttl: Duration::from_secs(10),
            units_directory: units,
            disable_watches: false,
            version: "test".into(),
        },
        fleet_metrics::Metrics::new(),
        shutdown.clone(),
        Arc::new(AtomicBool::new(false)),
    ));
    let state_key = keys.state("hello.service", MACHINE);
    let want = file.hash().to_string();
    let published = eventually(Duration::from_secs(20), || {
        let mut kv = registry.client().kv_client();
        let key = state_key.clone();
        let want = want.clone();
        async move {
            let Ok(r) = kv.get(key, None).await else {
                return false;
            };
            r.kvs().first().is_some_and(|kv| {
                let v = String::from_utf8_lossy(kv.value());
                v.contains(&want) && v.contains("\"activeState\":\"active\"")
            })
        }
    })
    .await;
    // one more periodic pass of the agent (every 5 s, its TICK), which must not
    // change anything either
    tokio::time::sleep(Duration::from_secs(6)).await;
    shutdown.cancel();
    let _ = agent.await;
    assert!(
        published,
        "hello.service's state was not published as wanted"
    );
    (fake.calls(), fake)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn same_content_is_adopted_untouched() {
    let (calls, fake) = take_over(HELLO, HELLO).await;
    assert_eq!(calls, vec![]);
    assert_eq!(fake.reload_count(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn other_content_is_replaced() {
    let (calls, fake) = take_over(HELLO, NEWER).await;
    assert_eq!(
        calls,
        vec![
            Call::Stop("hello.service".into()),
            Call::RemoveUnit("hello.service".into()),
            Call::WriteUnit("hello.service".into()),
            Call::Reload,
            Call::Start("hello.service".into()),
        ]
    );
    assert_eq!(fake.file("hello.service").as_deref(), Some(NEWER));
}
