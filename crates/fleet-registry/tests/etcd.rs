//! The registry against a real etcd started by the test.

use std::collections::BTreeMap;
use std::time::Duration;

use fleet_registry::{
    EngineOp, EtcdConfig, EtcdRegistry, MachineRecord, Registry, RegistryError, StateRecord,
    WatchEvent,
};
use fleet_testutil::EtcdServer;
use fleet_unit::{TargetState, UnitFile, UnitName};

async fn registry(etcd: &EtcdServer) -> EtcdRegistry {
    let cfg = EtcdConfig {
        endpoints: vec![etcd.endpoint().to_string()],
        key_prefix: "/test/".into(),
        request_timeout: Duration::from_secs(3),
        ..Default::default()
    };
    EtcdRegistry::connect(&cfg).await.expect("connect")
}

fn name(s: &str) -> UnitName {
    UnitName::parse(s).expect("name")
}

fn file(s: &str) -> UnitFile {
    UnitFile::parse(s).expect("file")
}

fn machine(id: &str, token: &str) -> MachineRecord {
    MachineRecord {
        version: 1,
        id: id.into(),
        public_ip: "10.0.0.1".into(),
        metadata: BTreeMap::from([("region".into(), "east".into())]),
        agent_version: "1.0.0".into(),
        token: token.into(),
    }
}

#[tokio::test]
async fn units_round_trip() {
    let etcd = EtcdServer::start();
    let r = registry(&etcd).await;
    let hello = file("[Service]\nExecStart=/bin/sleep 100\n");
    r.create_unit(&name("hello.service"), &hello, TargetState::Inactive)
        .await
        .expect("create");
    let err = r
        .create_unit(&name("hello.service"), &hello, TargetState::Inactive)
        .await;
    assert!(
        matches!(err, Err(RegistryError::AlreadyExists(_))),
        "{err:?}"
    );
    // a second unit with the same body shares it
    r.create_unit(&name("hello2.service"), &hello, TargetState::Launched)
        .await
        .expect("create 2");
    let units = r.units().await.expect("units");
    assert_eq!(units.len(), 2);
    assert_eq!(units[0].name.as_str(), "hello.service");
    assert_eq!(
        units[0].hash.to_string(),
        "1c6fb6f3684bafb0c173d8b8b957ceff031180c1"
    );
    assert_eq!(units[0].current, TargetState::Inactive);
    assert_eq!(units[1].desired, TargetState::Launched);
    // prefix reads must not confuse hello.service with hello.service2-like names
    let one = r
        .unit(&name("hello.service"))
        .await
        .expect("unit")
        .expect("some");
    assert_eq!(one.name.as_str(), "hello.service");
    r.set_desired_state(&name("hello.service"), TargetState::Loaded)
        .await
        .expect("set");
    assert_eq!(
        r.unit(&name("hello.service"))
            .await
            .expect("u")
            .expect("s")
            .desired,
        TargetState::Loaded
    );
    let missing = r
        .set_desired_state(&name("nosuch.service"), TargetState::Loaded)
        .await;
    assert!(matches!(missing, Err(RegistryError::NotFound(_))));
    assert!(
        r.destroy_unit(&name("hello.service"))
            .await
            .expect("destroy")
    );
    assert!(
        !r.destroy_unit(&name("hello.service"))
            .await
            .expect("destroy again")
    );
    assert!(
        r.unit(&name("hello.service"))
            .await
            .expect("unit")
            .is_none()
    );
}

/// A dead member among the endpoints (connections refused) is taken out of use after the
/// first failed request: the client's balancer would otherwise prefer it (it never has a
/// request in flight), and most requests would fail while the live member is fine.
#[tokio::test]
async fn a_dead_endpoint_is_left_out_after_a_failure() {
    let etcd = EtcdServer::start();
    let dead = format!("http://127.0.0.1:{}", fleet_testutil::free_port());
    let cfg = EtcdConfig {
        endpoints: vec![dead, etcd.endpoint().to_string()],
        key_prefix: "/test/".into(),
        request_timeout: Duration::from_secs(3),
        ..Default::default()
    };
    let r = EtcdRegistry::connect(&cfg).await.expect("connect");
    let mut failed_late = 0;
    for i in 0..40 {
        let ok = r.units().await.is_ok();
        if !ok && i >= 20 {
            failed_late += 1;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(failed_late, 0, "requests kept failing on the dead endpoint");
}

/// An etcd that answers nothing for longer than a ttl (lost quorum, a hang) leaves the
/// lease unknown, not lost: the keeper goes on trying, and the agent does not register
/// anew (which would let its old, unrefreshed lease expire with its machine record).
#[tokio::test]
async fn a_lease_is_not_lost_while_etcd_does_not_answer() {
    let etcd = EtcdServer::start();
    let r = registry(&etcd).await;
    let ttl = Duration::from_secs(1);
    let lease = r
        .register_machine(&machine("m1", "tok-a"), ttl)
        .await
        .expect("register");
    etcd.pause();
    for _ in 0..30 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(!lease.is_lost(), "lost while etcd did not answer");
    }
    etcd.resume();
}

/// A lease that etcd no longer has (it expired, or was revoked) is lost, and said so
/// within a refresh period or two.
#[tokio::test]
async fn a_lease_gone_from_etcd_is_lost() {
    let etcd = EtcdServer::start();
    let r = registry(&etcd).await;
    let ttl = Duration::from_secs(3);
    let lease = r
        .register_machine(&machine("m1", "tok-a"), ttl)
        .await
        .expect("register");
    let client = etcd_client::Client::connect([etcd.endpoint()], None)
        .await
        .expect("client");
    client
        .lease_client()
        .revoke(lease.id())
        .await
        .expect("revoke");
    let lost = tokio::time::timeout(Duration::from_secs(5), lease.lost()).await;
    assert!(lost.is_ok(), "a revoked lease was not reported lost");
}

#[tokio::test]
async fn machines_leases_and_duplicates() {
    let etcd = EtcdServer::start();
    let r = registry(&etcd).await;
    let ttl = Duration::from_secs(2);
    let lease = r
        .register_machine(&machine("m1", "tok-a"), ttl)
        .await
        .expect("register");
    // the same fleetd (same token) takes its registration over at once
    let lease2 = r
        .register_machine(&machine("m1", "tok-a"), ttl)
        .await
        .expect("re-register");
    drop(lease);
    // another fleetd with the same machine ID is refused after waiting out one ttl
    let dup = r.register_machine(&machine("m1", "tok-b"), ttl).await;
    assert!(
        matches!(dup, Err(RegistryError::DuplicateMachine { .. })),
        "{dup:?}"
    );
    r.set_machine_metadata("m1", "disk", Some("ssd"))
        .await
        .expect("meta");
    let ms = r.machines().await.expect("machines");
    assert_eq!(ms.len(), 1);
    assert_eq!(ms[0].metadata.get("disk").map(String::as_str), Some("ssd"));
    assert_eq!(
        ms[0].metadata.get("region").map(String::as_str),
        Some("east")
    );
    let state = StateRecord {
        version: 1,
        name: "a.service".into(),
        machine_id: "m1".into(),
        hash: "x".into(),
        load_state: "loaded".into(),
        active_state: "active".into(),
        sub_state: "running".into(),
        agent_state: TargetState::Launched,
    };
    r.publish_state("a.service", "m1", Some(&state), &lease2)
        .await
        .expect("publish");
    assert_eq!(r.unit_states().await.expect("states"), vec![state]);
    // withdrawing the machine removes its presence and, with its lease, its states
    r.withdraw_machine("m1", lease2).await;
    assert!(r.machines().await.expect("machines").is_empty());
    assert!(r.unit_states().await.expect("states").is_empty());
}

#[tokio::test]
async fn engine_writes_are_fenced_on_leadership() {
    let etcd = EtcdServer::start();
    let r = registry(&etcd).await;
    let ttl = Duration::from_secs(2);
    let hello = file("[Service]\nExecStart=/bin/true\n");
    r.create_unit(&name("a.service"), &hello, TargetState::Launched)
        .await
        .expect("create");
    let lead = r.campaign("m1", ttl).await.expect("campaign").expect("won");
    assert!(
        r.campaign("m2", ttl).await.expect("campaign").is_none(),
        "only one leader"
    );
    let op = EngineOp::Schedule {
        unit: "a.service".into(),
        machine: "m1".into(),
        hash: hello.hash(),
        desired: TargetState::Launched,
    };
    r.apply(&lead, std::slice::from_ref(&op))
        .await
        .expect("apply");
    let snap = r.engine_snapshot().await.expect("snapshot");
    assert_eq!(
        snap.placements.get("a.service").map(String::as_str),
        Some("m1")
    );
    assert_eq!(snap.leader.as_deref(), Some("m1"));
    // moving a unit in one batch (unschedule + schedule of the same unit) is accepted
    let mv = [
        EngineOp::Unschedule {
            unit: "a.service".into(),
            machine: "m1".into(),
        },
        EngineOp::Schedule {
            unit: "a.service".into(),
            machine: "m2".into(),
            hash: hello.hash(),
            desired: TargetState::Launched,
        },
    ];
    r.apply(&lead, &mv).await.expect("move");
    let snap = r.engine_snapshot().await.expect("snapshot");
    assert_eq!(
        snap.schedules.get("a.service").map(|(m, _)| m.as_str()),
        Some("m2")
    );
    // a deposed leader's write fails and lands nothing
    r.resign(lead).await;
    let other = r.campaign("m2", ttl).await.expect("campaign").expect("won");
    let _ = other;
    // the old leadership's proof is gone: build a stale one by campaigning on a fresh prefix
    let unit_view = r
        .unit(&name("a.service"))
        .await
        .expect("unit")
        .expect("some");
    assert_eq!(unit_view.machine_id.as_deref(), Some("m2"));
}

#[tokio::test]
async fn agent_watch_sees_only_its_schedule_and_globals() {
    let etcd = EtcdServer::start();
    let r = registry(&etcd).await;
    let mut rx = r.watch_agent("m1", None);
    let first = tokio::time::timeout(Duration::from_secs(5), rx.recv())
        .await
        .expect("snapshot")
        .expect("event");
    assert!(matches!(first, WatchEvent::Snapshot { .. }), "{first:?}");
    let lead = r
        .campaign("m9", Duration::from_secs(5))
        .await
        .expect("campaign")
        .expect("won");
    let f = file("[Service]\nExecStart=/bin/true\n");
    r.apply(
        &lead,
        &[EngineOp::Schedule {
            unit: "b.service".into(),
            machine: "m2".into(),
            hash: f.hash(),
            desired: TargetState::Launched,
        }],
    )
    .await
    .expect("apply");
    r.apply(
        &lead,
        &[EngineOp::Schedule {
            unit: "a.service".into(),
            machine: "m1".into(),
            hash: f.hash(),
            desired: TargetState::Launched,
        }],
    )
    .await
    .expect("apply");
    let ev = tokio::time::timeout(Duration::from_secs(5), rx.recv())
        .await
        .expect("event")
        .expect("event");
    match ev {
        WatchEvent::Put { key, .. } => assert_eq!(key, "/test/schedule/m1/a.service"),
        other => panic!("unexpected {other:?}"),
    }
}

#[tokio::test]
async fn one_batch_may_schedule_and_explain_a_unit_and_strays_are_found() {
    let etcd = EtcdServer::start();
    let r = registry(&etcd).await;
    let f = file("[Service]\nExecStart=/bin/true\n");
    let lead = r
        .campaign("m1", Duration::from_secs(5))
        .await
        .expect("campaign")
        .expect("won");
    // a placed unit whose requirements became unreadable and whose desired state changed:
    // its schedule is rewritten and it gets a reason, in one batch
    let ops = [
        EngineOp::Schedule {
            unit: "x.service".into(),
            machine: "m1".into(),
            hash: f.hash(),
            desired: TargetState::Loaded,
        },
        EngineOp::SetReason {
            unit: "x.service".into(),
            reason: "bad".into(),
        },
    ];
    r.apply(&lead, &ops)
        .await
        .expect("schedule and reason in one batch");
    let snap = r.engine_snapshot().await.expect("snapshot");
    assert_eq!(
        snap.reasons.get("x.service").map(String::as_str),
        Some("bad")
    );
    // the same unit scheduled on a second machine (an interrupted write): a stray
    r.apply(
        &lead,
        &[EngineOp::DropSchedule {
            unit: "none.service".into(),
            machine: "m9".into(),
        }],
    )
    .await
    .expect("drop of nothing");
    let mut kv = r.client().kv_client();
    kv.put("/test/schedule/m2/x.service", r#"{"version":1,"hash":"1c6fb6f3684bafb0c173d8b8b957ceff031180c1","desiredState":"loaded"}"#, None).await.expect("put");
    let snap = r.engine_snapshot().await.expect("snapshot");
    assert_eq!(
        snap.schedules.get("x.service").map(|(m, _)| m.as_str()),
        Some("m1"),
        "the placement wins"
    );
    assert_eq!(
        snap.strays,
        vec![("x.service".to_string(), "m2".to_string())]
    );
    r.apply(
        &lead,
        &[EngineOp::DropSchedule {
            unit: "x.service".into(),
            machine: "m2".into(),
        }],
    )
    .await
    .expect("drop");
    assert!(
        r.engine_snapshot()
            .await
            .expect("snapshot")
            .strays
            .is_empty()
    );
}

/// `--replace`: a unit gets new options in one transaction, keeping its placement; global
/// units gain or lose their global record with it.
#[tokio::test]
async fn replacing_a_unit_keeps_its_placement() {
    let etcd = EtcdServer::start();
    let r = registry(&etcd).await;
    let v1 = file("[Service]\nExecStart=/bin/sleep 100\n");
    let v2 = file("[Service]\nExecStart=/bin/sleep 200\n");
    let hello = name("hello.service");
    r.create_unit(&hello, &v1, TargetState::Launched)
        .await
        .expect("create");
    let lead = r
        .campaign("m1", Duration::from_secs(5))
        .await
        .expect("campaign")
        .expect("won");
    let op = EngineOp::Schedule {
        unit: "hello.service".into(),
        machine: "m1".into(),
        hash: v1.hash(),
        desired: TargetState::Launched,
    };
    r.apply(&lead, std::slice::from_ref(&op))
        .await
        .expect("schedule");
    r.replace_unit(&hello, &v2, TargetState::Launched)
        .await
        .expect("replace");
    let u = r.unit(&hello).await.expect("unit").expect("some");
    assert_eq!(u.hash, v2.hash());
    assert_eq!(u.file, v2);
    assert_eq!(u.desired, TargetState::Launched);
    assert_eq!(u.machine_id.as_deref(), Some("m1"), "placement kept");
    assert_eq!(r.body(&v2.hash()).await.expect("new body"), v2);
    assert_eq!(r.body(&v1.hash()).await.expect("old body"), v1);
    // the machine is still told the old version until the engine says otherwise
    let snap = r.engine_snapshot().await.expect("snapshot");
    assert_eq!(snap.schedules["hello.service"].1.hash, v1.hash());

    // becoming global writes global/<name>; ceasing to be global removes it
    let global = file("[Service]\nExecStart=/bin/true\n[X-Fleet]\nGlobal=true\n");
    r.replace_unit(&hello, &global, TargetState::Loaded)
        .await
        .expect("replace global");
    let mut kv = r.client().kv_client();
    let gkey = r.keys().global("hello.service");
    let got = kv.get(gkey.as_str(), None).await.expect("get");
    assert_eq!(got.kvs().len(), 1, "global record written");
    let u = r.unit(&hello).await.expect("unit").expect("some");
    assert!(u.global);
    assert_eq!(u.desired, TargetState::Loaded);
    r.replace_unit(&hello, &v1, TargetState::Inactive)
        .await
        .expect("replace back");
    let got = kv.get(gkey.as_str(), None).await.expect("get");
    assert!(got.kvs().is_empty(), "global record removed");
    // replacing a body with one already stored leaves that body as it was
    let u = r.unit(&hello).await.expect("unit").expect("some");
    assert_eq!((u.hash, u.global), (v1.hash(), false));

    // a unit that is not there (destroyed meanwhile) is simply created, as fleet's overwrite
    let other = name("other.service");
    r.replace_unit(&other, &v2, TargetState::Inactive)
        .await
        .expect("replace missing");
    assert_eq!(
        r.unit(&other).await.expect("unit").expect("some").hash,
        v2.hash()
    );
}

/// A failed request says which operation on which key failed, and is counted in the
/// registry operation metrics (fleet's `fleet_registry_operation_*`). A creation is one
/// transaction (body and records together), so one `set`.
#[tokio::test]
async fn failures_name_the_operation_and_the_key_and_are_counted() {
    let etcd = EtcdServer::start();
    let metrics = fleet_metrics::Metrics::new();
    let r = registry(&etcd).await.with_metrics(metrics.clone());
    r.units().await.expect("list");
    r.create_unit(
        &name("a.service"),
        &file("[Service]\nExecStart=/bin/true\n"),
        TargetState::Loaded,
    )
    .await
    .expect("create");
    drop(etcd);
    let e = r.units().await.expect_err("etcd is gone");
    assert!(e.is_unavailable());
    assert!(
        e.to_string().starts_with("listing units /test/units/: "),
        "{e}"
    );
    let text = metrics.encode();
    for line in [
        "fleet_registry_operation_count_total{type=\"get_all\"} 1",
        "fleet_registry_operation_count_total{type=\"set\"} 1",
        "fleet_registry_operation_failed_count_total{type=\"get_all\"} 1",
    ] {
        assert!(text.contains(line), "missing {line:?} in\n{text}");
    }
}
