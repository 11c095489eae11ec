//! The registry against a real etcd started by the test.

use std::collections::BTreeMap;
use std::time::Duration;

use fleet_registry::{
    ENGINE_OPS_PER_TXN, EngineOp, EtcdConfig, EtcdRegistry, Leadership, Lease, MachineRecord,
    Registry, RegistryError, WatchEvent,
};
use fleet_testutil::records::{self, file, name};
use fleet_testutil::{EtcdServer, fixture};
use fleet_unit::TargetState;

async fn registry(etcd: &EtcdServer) -> EtcdRegistry {
    fixture::connect(etcd, fixture::PREFIX, fixture::REQUEST_TIMEOUT).await
}

fn machine(id: &str, token: &str) -> MachineRecord {
    MachineRecord {
        metadata: BTreeMap::from([("region".into(), "east".into())]),
        token: token.into(),
        ..records::machine(id)
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

/// The lease tells when its last accepted refresh was sent: it moves on while etcd answers
/// and stands still while it does not (at-most-once units count from it), then moves on
/// again once etcd answers.
#[tokio::test]
async fn a_lease_says_when_its_last_accepted_refresh_was_sent() {
    let etcd = EtcdServer::start();
    let r = registry(&etcd).await;
    let ttl = Duration::from_secs(3);
    let before = tokio::time::Instant::now();
    let lease = fleet_registry::Lease::from(
        r.register_machine(&machine("m1", "tok-a"), ttl)
            .await
            .expect("register"),
    );
    let renewed = lease.renewed();
    let granted = *renewed.borrow();
    assert!(granted >= before && granted <= tokio::time::Instant::now());
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let refreshed = *renewed.borrow();
    assert!(refreshed > granted, "no refresh in 1.5 s at ttl 3 s");
    etcd.pause();
    let paused = tokio::time::Instant::now();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let stale = *renewed.borrow();
    assert!(
        stale <= paused,
        "a refresh was accepted while etcd was paused"
    );
    etcd.resume();
    let back = fleet_testutil::eventually(Duration::from_secs(10), || {
        std::future::ready(*renewed.borrow() > stale)
    })
    .await;
    assert!(back, "no refresh accepted after etcd came back");
    assert!(!lease.is_lost());
}

/// etcd's count of `LeaseKeepAlive` streams opened so far, from its `/metrics`.
async fn keep_alive_streams(etcd: &EtcdServer) -> f64 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let hostport = etcd
        .endpoint()
        .trim_start_matches("http://")
        .trim_end_matches('/');
    let mut s = tokio::net::TcpStream::connect(hostport)
        .await
        .expect("connect to etcd's metrics");
    let req = format!("GET /metrics HTTP/1.0\r\nHost: {hostport}\r\n\r\n");
    s.write_all(req.as_bytes()).await.expect("request metrics");
    let mut text = String::new();
    s.read_to_string(&mut text).await.expect("read metrics");
    text.lines()
        .filter(|l| l.starts_with("grpc_server_started_total{") && l.contains("\"LeaseKeepAlive\""))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Refreshes go out on one kept-open keep-alive stream: etcd counts each stream opened as a
/// request, so a stream per refresh cost every machine a request per ttl/3.
#[tokio::test]
async fn lease_refreshes_share_one_keep_alive_stream() {
    let etcd = EtcdServer::start();
    let r = registry(&etcd).await;
    let before = keep_alive_streams(&etcd).await;
    let lease = fleet_registry::Lease::from(
        r.register_machine(&machine("m1", "tok-a"), Duration::from_secs(3))
            .await
            .expect("register"),
    );
    let mut renewed = lease.renewed();
    let mut refreshes = 0;
    while refreshes < 4 {
        tokio::time::timeout(Duration::from_secs(5), renewed.changed())
            .await
            .expect("a refresh within 5 s at ttl 3 s")
            .expect("keeper alive");
        refreshes += 1;
    }
    let streams = keep_alive_streams(&etcd).await - before;
    assert_eq!(
        streams, 1.0,
        "{refreshes} refreshes opened {streams} streams"
    );
    assert!(!lease.is_lost());
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
    let state = records::state("a.service", "m1", "x");
    r.publish_state("a.service", "m1", Some(&state), &lease2)
        .await
        .expect("publish");
    assert_eq!(r.unit_states().await.expect("states"), vec![state]);
    // withdrawing the machine removes its presence and, with its lease, its states
    r.withdraw_machine("m1", lease2).await;
    assert!(r.machines().await.expect("machines").is_empty());
    assert!(r.unit_states().await.expect("states").is_empty());
}

/// A burst's decisions in batches: each batch one fenced transaction, several in flight,
/// every outcome reported in order; a deposed leader's batches all fail and land nothing.
#[tokio::test]
async fn engine_batches_are_fenced_transactions() {
    let etcd = EtcdServer::start();
    let r = registry(&etcd).await;
    let hello = file("[Service]\nExecStart=/bin/true\n");
    let lead = r
        .campaign("m1", Duration::from_secs(5))
        .await
        .expect("campaign")
        .expect("won");
    let batches = |from: usize, count: usize| -> Vec<Vec<EngineOp>> {
        (from..from + count)
            .map(|b| {
                (0..ENGINE_OPS_PER_TXN)
                    .map(|i| EngineOp::Schedule {
                        unit: format!("u{}.service", b * ENGINE_OPS_PER_TXN + i),
                        machine: "m1".into(),
                        hash: hello.hash(),
                        desired: TargetState::Launched,
                    })
                    .collect()
            })
            .collect()
    };
    let before = r.engine_snapshot().await.expect("snapshot").revision;
    let outcomes = r.apply_batches(&lead, &batches(0, 20)).await;
    assert_eq!(outcomes.len(), 20);
    assert!(outcomes.iter().all(Result::is_ok), "{outcomes:?}");
    let snap = r.engine_snapshot().await.expect("snapshot");
    assert_eq!(snap.placements.len(), 20 * ENGINE_OPS_PER_TXN);
    // one transaction (one revision) per batch
    assert_eq!(snap.revision - before, 20);
    // the fence moved (after a write of unknown outcome): writes with the old one fail
    // whole, the leader key keeps its value, lease and create revision
    let proof = |l: &Leadership, fence: i64| {
        let (_lost, lost) = tokio::sync::watch::channel(false);
        let (_renewed, renewed) = tokio::sync::watch::channel(tokio::time::Instant::now());
        Leadership {
            lease: Lease::new(l.lease.id(), lost, renewed),
            create_revision: l.create_revision,
            fence,
        }
    };
    let mut lead = lead;
    let old_fence = proof(&lead, lead.fence);
    lead.fence = r.refence(&lead).await.expect("refence");
    assert!(lead.fence > old_fence.fence);
    let outcomes = r.apply_batches(&old_fence, &batches(20, 2)).await;
    assert!(
        outcomes
            .iter()
            .all(|o| matches!(o, Err(RegistryError::NotLeader))),
        "{outcomes:?}"
    );
    let mut kv = etcd_client::Client::connect([etcd.endpoint()], None)
        .await
        .expect("connect");
    let key = r.keys().leader();
    let got = kv.get(key.as_str(), None).await.expect("get");
    let leader = &got.kvs()[0];
    assert_eq!(leader.value(), b"m1");
    assert_eq!(leader.lease(), lead.lease.id());
    assert_eq!(leader.create_revision(), lead.create_revision);
    assert_eq!(leader.mod_revision(), lead.fence);
    let outcomes = r.apply_batches(&lead, &batches(20, 2)).await;
    assert!(outcomes.iter().all(Result::is_ok), "{outcomes:?}");
    let snap = r.engine_snapshot().await.expect("snapshot");
    assert_eq!(snap.placements.len(), 22 * ENGINE_OPS_PER_TXN);
    // the leader key won by another engine: every batch of the old proof fails, and its
    // fence cannot be moved
    let stale = proof(&lead, lead.fence);
    r.resign(lead).await;
    let _other = r
        .campaign("m2", Duration::from_secs(5))
        .await
        .expect("campaign")
        .expect("won");
    let outcomes = r.apply_batches(&stale, &batches(30, 5)).await;
    assert_eq!(outcomes.len(), 5);
    assert!(
        outcomes
            .iter()
            .all(|o| matches!(o, Err(RegistryError::NotLeader))),
        "{outcomes:?}"
    );
    assert!(matches!(
        r.refence(&stale).await,
        Err(RegistryError::NotLeader)
    ));
    let snap = r.engine_snapshot().await.expect("snapshot");
    assert_eq!(snap.placements.len(), 22 * ENGINE_OPS_PER_TXN);
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

/// A decision write that changes nothing (its keys already gone) makes no revision in etcd:
/// it is no write of the engine's to wait for (0), while one that changes something gives
/// its revision.
#[tokio::test]
async fn a_decision_write_that_changes_nothing_has_no_revision() {
    let etcd = EtcdServer::start();
    let r = registry(&etcd).await;
    let lead = r
        .campaign("m1", Duration::from_secs(5))
        .await
        .expect("campaign")
        .expect("won");
    let gone = [EngineOp::Unschedule {
        unit: "gone.service".into(),
        machine: "m1".into(),
    }];
    assert_eq!(r.apply(&lead, &gone).await.expect("apply"), 0);
    let f = file("[Service]\nExecStart=/bin/true\n");
    let placed = [EngineOp::Schedule {
        unit: "a.service".into(),
        machine: "m1".into(),
        hash: f.hash(),
        desired: TargetState::Launched,
    }];
    assert!(r.apply(&lead, &placed).await.expect("apply") > 0);
}

/// A transaction comes through the watch as one event per key, then a mark that its
/// revision is whole (the engine decides only on whole revisions of its own writes).
#[tokio::test]
async fn a_transactions_events_are_followed_by_a_mark_that_they_are_all_there() {
    let etcd = EtcdServer::start();
    let r = registry(&etcd).await;
    let mut rx = r.watch_engine(None);
    let next = async |rx: &mut tokio::sync::mpsc::Receiver<WatchEvent>| {
        tokio::time::timeout(Duration::from_secs(5), rx.recv())
            .await
            .expect("event")
            .expect("event")
    };
    assert!(matches!(next(&mut rx).await, WatchEvent::Snapshot { .. }));
    let lead = r
        .campaign("m1", Duration::from_secs(5))
        .await
        .expect("campaign")
        .expect("won");
    let WatchEvent::Put { revision, .. } = next(&mut rx).await else {
        panic!("no leader key");
    };
    assert_eq!(next(&mut rx).await, WatchEvent::Through { revision });
    let f = file("[Service]\nExecStart=/bin/true\n");
    let ops: Vec<EngineOp> = ["a.service", "b.service"]
        .iter()
        .map(|u| EngineOp::Schedule {
            unit: u.to_string(),
            machine: "m1".into(),
            hash: f.hash(),
            desired: TargetState::Launched,
        })
        .collect();
    r.apply(&lead, &ops).await.expect("apply");
    // a schedule and a placement for each (their reasons were not there to delete)
    let mut revisions = Vec::new();
    for _ in 0..4 {
        match next(&mut rx).await {
            WatchEvent::Put { revision, .. } => revisions.push(revision),
            other => panic!("unexpected {other:?}"),
        }
    }
    revisions.dedup();
    let [written] = revisions[..] else {
        panic!("one write, one revision: {revisions:?}");
    };
    assert_eq!(
        next(&mut rx).await,
        WatchEvent::Through { revision: written }
    );
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
    assert_eq!(*u.file, v2);
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

/// Three etcd members on loopback ports, one cluster.
fn etcd_cluster() -> Vec<EtcdServer> {
    let peers: Vec<String> = (0..3)
        .map(|_| format!("http://127.0.0.1:{}", fleet_testutil::free_port()))
        .collect();
    let initial: Vec<String> = peers
        .iter()
        .enumerate()
        .map(|(i, p)| format!("m{i}={p}"))
        .collect();
    let initial = format!("--initial-cluster={}", initial.join(","));
    peers
        .iter()
        .enumerate()
        .map(|(i, p)| {
            // (later flags win over the single-member ones EtcdServer sets)
            let args = [
                format!("--name=m{i}"),
                format!("--listen-peer-urls={p}"),
                format!("--initial-advertise-peer-urls={p}"),
                initial.clone(),
            ];
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            EtcdServer::start_with(&args)
        })
        .collect()
}

/// Writes `key` through the members other than `frozen`, retrying while they elect a leader.
async fn put_elsewhere(members: &[EtcdServer], frozen: usize, key: &str) {
    let others: Vec<&str> = members
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != frozen)
        .map(|(_, m)| m.endpoint())
        .collect();
    let client = etcd_client::Client::connect(others, None)
        .await
        .expect("client");
    let mut kv = client.kv_client();
    for _ in 0..30 {
        let put = kv.put(key, "{}", None);
        if let Ok(Ok(_)) = tokio::time::timeout(Duration::from_secs(2), put).await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    panic!("cannot write {key} through the members left");
}

/// A registry on every member of `members`, once the cluster answers.
async fn cluster_registry(members: &[EtcdServer]) -> EtcdRegistry {
    let cfg = EtcdConfig {
        endpoints: members.iter().map(|m| m.endpoint().to_string()).collect(),
        key_prefix: "/test/".into(),
        request_timeout: Duration::from_secs(1),
        ..Default::default()
    };
    let r = EtcdRegistry::connect(&cfg).await.expect("connect");
    let ready = fleet_testutil::eventually(Duration::from_secs(20), || async {
        r.units().await.is_ok()
    })
    .await;
    assert!(ready, "the etcd cluster did not come up");
    r
}

/// A watch open on a member that is cut off from the others (here: frozen) sees no event and
/// no error. Once the health monitor takes that member out, the agent's and the engine's
/// list-watches list again and watch on the members left. Each member is frozen in turn, so
/// one round freezes the member the watch sits on. Before, that round saw nothing until the
/// stream broke on its own seconds later (4.8 s and 9.7 s in two runs), and the agent was
/// told etcd was lost meanwhile; now the watch moves at once, with no disconnection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_on_a_member_taken_out_moves_to_the_others() {
    let members = etcd_cluster();
    let r = cluster_registry(&members).await;
    let mut rx = r.watch_agent("m1", None);
    let first = tokio::time::timeout(Duration::from_secs(10), rx.recv())
        .await
        .expect("snapshot")
        .expect("event");
    assert!(matches!(first, WatchEvent::Snapshot { .. }), "{first:?}");
    let mut broke = Vec::new();
    for (i, member) in members.iter().enumerate() {
        member.pause();
        let key = r.keys().schedule("m1", &format!("u{i}.service"));
        put_elsewhere(&members, i, &key).await;
        let started = std::time::Instant::now();
        let seen = loop {
            // requests through the registry let its monitor find the frozen member
            let poke = async {
                let _ = r.units().await;
                tokio::time::sleep(Duration::from_millis(200)).await;
            };
            let event = tokio::select! {
                ev = rx.recv() => Some(ev.expect("the watch goes on")),
                _ = poke => None,
            };
            let seen = match event {
                Some(WatchEvent::Put { key: k, .. }) => k == key,
                Some(WatchEvent::Snapshot { kvs, .. }) => kvs.iter().any(|(k, _)| *k == key),
                Some(WatchEvent::Disconnected) => {
                    broke.push(i);
                    false
                }
                _ => false,
            };
            if seen || started.elapsed() > Duration::from_secs(20) {
                break seen;
            }
        };
        member.resume();
        assert!(seen, "member {i} frozen: the watch never saw {key}");
        assert!(
            broke.is_empty(),
            "member {i} frozen: the watch saw nothing until it broke (rounds {broke:?})"
        );
        // back in the balancer after two good probes
        tokio::time::sleep(Duration::from_secs(3)).await;
    }
}

/// The same for the API's event stream (`fleetctl events`, the live view): a stream open on a
/// member taken out went quiet until it broke and ended. It now follows on from the same
/// revision on the members left: every event comes, the stream does not end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_stream_on_a_member_taken_out_moves_to_the_others() {
    let members = etcd_cluster();
    let r = cluster_registry(&members).await;
    let mut rx = r
        .events(&fleet_registry::EventQuery::default())
        .await
        .expect("events");
    for (i, member) in members.iter().enumerate() {
        member.pause();
        let unit = format!("u{i}.service");
        put_elsewhere(&members, i, &r.keys().placement(&unit)).await;
        let started = std::time::Instant::now();
        let seen = loop {
            // requests through the registry let its monitor find the frozen member
            let poke = async {
                let _ = r.units().await;
                tokio::time::sleep(Duration::from_millis(200)).await;
            };
            let item = tokio::select! {
                item = rx.recv() => Some(item.expect("the stream goes on")),
                _ = poke => None,
            };
            let seen = match item {
                Some(Ok(msg)) => msg.event.is_some_and(|ev| ev["unit"] == unit.as_str()),
                Some(Err(end)) => panic!("member {i} frozen: the stream ended: {end:?}"),
                None => false,
            };
            if seen || started.elapsed() > Duration::from_secs(20) {
                break seen;
            }
        };
        member.resume();
        assert!(seen, "member {i} frozen: the stream never told of {unit}");
        // back in the balancer after two good probes
        tokio::time::sleep(Duration::from_secs(3)).await;
    }
}

/// Writes `count` unit records sharing one body straight to etcd, 120 to a transaction
/// (far faster than `create_unit` one by one). Long names make each record ~0.5 KiB.
async fn many_units(r: &EtcdRegistry, count: usize) {
    use etcd_client::{Txn, TxnOp};
    let body = file("[Service]\nExecStart=/bin/true\n");
    let hash = body.hash();
    let mut kv = r.client().kv_client();
    kv.put(r.keys().body(&hash.to_string()), body.serialize(), None)
        .await
        .expect("body");
    let pad = "x".repeat(180);
    let names: Vec<String> = (0..count)
        .map(|i| format!("u{i:06}-{pad}.service"))
        .collect();
    for chunk in names.chunks(120) {
        let ops: Vec<TxnOp> = chunk
            .iter()
            .map(|n| {
                let rec = fleet_registry::UnitRecord {
                    version: 1,
                    name: name(n),
                    hash,
                    desired_state: TargetState::Launched,
                    global: false,
                };
                let value = serde_json::to_vec(&rec).expect("encode");
                TxnOp::put(r.keys().unit(n), value, None)
            })
            .collect();
        kv.txn(Txn::new().and_then(ops)).await.expect("write units");
    }
}

/// 12,000 unit records of ~0.5 KiB each: ~6 MiB under units/, past gRPC's 4 MiB decode
/// limit. Every whole-prefix read (the API's unit list, the engine's snapshot and its
/// list-watch) read it whole in one response and failed; read in pages, they all see every
/// unit.
#[tokio::test]
async fn listings_larger_than_a_grpc_message_are_read_in_pages() {
    let etcd = EtcdServer::start();
    let r = registry(&etcd).await;
    let count = 12_000;
    many_units(&r, count).await;
    let mut kv = r.client().kv_client();
    let size = kv
        .get(
            r.keys().dir(fleet_registry::keys::UNITS),
            Some(
                etcd_client::GetOptions::new()
                    .with_prefix()
                    .with_keys_only(),
            ),
        )
        .await
        .map(|g| g.kvs().len())
        .expect("count");
    assert_eq!(size, count);
    let units = r.units().await.expect("list units");
    assert_eq!(units.len(), count);
    assert!(units.windows(2).all(|w| w[0].name < w[1].name));
    let snap = r.engine_snapshot().await.expect("engine snapshot");
    assert_eq!(snap.units.len(), count);
    let mut watch = r.watch_engine(None);
    match tokio::time::timeout(Duration::from_secs(30), watch.recv()).await {
        Ok(Some(WatchEvent::Snapshot { kvs, .. })) => {
            let units = kvs
                .iter()
                .filter(|(k, _)| k.starts_with(&r.keys().dir(fleet_registry::keys::UNITS)))
                .count();
            assert_eq!(units, count);
        }
        other => panic!("no snapshot from the engine's watch: {other:?}"),
    }
}

/// An agent publishes a batch of states in transactions of up to 120 puts, each state
/// under its lease: 250 states are three `set`s, and they vanish with the lease.
#[tokio::test]
async fn a_batch_of_states_is_published_in_few_transactions_under_the_lease() {
    let etcd = EtcdServer::start();
    let metrics = fleet_metrics::Metrics::new();
    let r = registry(&etcd).await.with_metrics(metrics.clone());
    let lease = r
        .register_machine(&machine("m1", "tok"), Duration::from_secs(5))
        .await
        .expect("register");
    let before = sets(&metrics);
    let states: Vec<_> = (0..250)
        .map(|i| records::state(&format!("u{i:03}.service"), "m1", "x"))
        .collect();
    r.publish_states("m1", &states, &lease)
        .await
        .expect("publish");
    assert_eq!(sets(&metrics) - before, 3, "set operations");
    let mut published = r.unit_states().await.expect("states");
    published.sort_by(|a, b| a.name.cmp(&b.name));
    assert_eq!(published, states);
    r.withdraw_machine("m1", lease).await;
    assert!(r.unit_states().await.expect("states").is_empty());
}

/// The `set` operations counted in `metrics` so far.
fn sets(metrics: &fleet_metrics::Metrics) -> u64 {
    metrics
        .encode()
        .lines()
        .find_map(|l| {
            l.strip_prefix("fleet_registry_operation_count_total{type=\"set\"} ")
                .and_then(|n| n.parse::<u64>().ok())
        })
        .unwrap_or(0)
}

/// Concurrent creations (the API serving a burst of PUTs) are written together: those that
/// arrive while one is in flight go in one transaction. Each unit is created once, in its
/// desired state, with its body (instances share theirs).
#[tokio::test]
async fn concurrent_creations_are_grouped_into_few_transactions() {
    let etcd = EtcdServer::start();
    let metrics = fleet_metrics::Metrics::new();
    let r = registry(&etcd).await.with_metrics(metrics.clone());
    let shared = file("[Service]\nExecStart=/bin/sleep 1\n");
    let before = sets(&metrics);
    let creations: Vec<_> = (0..60)
        .map(|i| {
            let r = r.clone();
            let f = if i % 2 == 0 {
                shared.clone()
            } else {
                file(&format!("[Service]\nExecStart=/bin/sleep 100{i}\n"))
            };
            tokio::spawn(async move {
                r.create_unit(
                    &name(&format!("u{i:02}.service")),
                    &f,
                    TargetState::Launched,
                )
                .await
            })
        })
        .collect();
    for c in creations {
        c.await.expect("task").expect("created");
    }
    let writes = sets(&metrics) - before;
    eprintln!("{writes} transactions for 60 creations");
    assert!(writes <= 10, "{writes} transactions for 60 creations");
    let units = r.units().await.expect("units");
    assert_eq!(units.len(), 60);
    assert!(
        units
            .iter()
            .all(|u| u.desired == TargetState::Launched && u.file.hash() == u.hash)
    );
    let distinct: std::collections::BTreeSet<_> = units.iter().map(|u| u.hash).collect();
    assert_eq!(distinct.len(), 31, "one body per distinct file");
}

/// In a group, each creation still gets its own answer: a unit already there is refused
/// (and left as it was), a unit asked for twice at once is created once, and the others
/// are created.
#[tokio::test]
async fn grouped_creations_answer_each_unit_exactly() {
    let etcd = EtcdServer::start();
    let r = registry(&etcd).await;
    let old = file("[Service]\nExecStart=/bin/old\n");
    r.create_unit(&name("there.service"), &old, TargetState::Inactive)
        .await
        .expect("create");
    let mut asked = vec!["there.service".to_string(), "twice.service".to_string()];
    asked.extend((0..30).map(|i| format!("new{i}.service")));
    asked.push("twice.service".into());
    let creations: Vec<_> = asked
        .iter()
        .map(|n| {
            let (r, n) = (r.clone(), n.clone());
            tokio::spawn(async move {
                let f = file(&format!("[Service]\nExecStart=/bin/{n}\n"));
                r.create_unit(&name(&n), &f, TargetState::Launched).await
            })
        })
        .collect();
    let mut answers = Vec::new();
    for c in creations {
        answers.push(c.await.expect("task"));
    }
    let exists = |r: &Result<(), RegistryError>| matches!(r, Err(RegistryError::AlreadyExists(_)));
    assert!(exists(&answers[0]), "{:?}", answers[0]);
    let last = answers.len() - 1;
    assert!(
        exists(&answers[1]) != exists(&answers[last]),
        "twice: {:?} {:?}",
        answers[1],
        answers[last]
    );
    for (n, a) in asked.iter().zip(&answers).skip(2).take(30) {
        assert!(a.is_ok(), "{n}: {a:?}");
    }
    let there = r
        .unit(&name("there.service"))
        .await
        .expect("read")
        .expect("there");
    assert_eq!(
        (there.hash, there.desired),
        (old.hash(), TargetState::Inactive)
    );
    assert_eq!(r.units().await.expect("units").len(), 32);
}

/// Writes what the engine and the agents would: `placement/<unit>` and unit states.
async fn place(etcd: &EtcdServer, unit: &str, machine: &str, hash: &str) {
    let mut c = etcd_client::Client::connect([etcd.endpoint()], None)
        .await
        .expect("client");
    let prefix = fixture::PREFIX;
    c.put(format!("{prefix}placement/{unit}"), machine, None)
        .await
        .expect("placement");
    report(&mut c, unit, machine, hash).await;
}

/// A state of `unit` from `machine`, about the body `hash` (a view shows it only when that is
/// the unit's body).
async fn report(c: &mut etcd_client::Client, unit: &str, machine: &str, hash: &str) {
    let prefix = fixture::PREFIX;
    let state = serde_json::to_string(&records::state(unit, machine, hash)).expect("json");
    c.put(format!("{prefix}states/{unit}/{machine}"), state, None)
        .await
        .expect("state");
}

/// Every page of a listing, each starting after the last item of the one before (as the
/// API goes on from a page token).
async fn all_pages<T, K>(
    limit: usize,
    key: impl Fn(&T) -> K,
    mut page: impl AsyncFnMut(fleet_registry::PageStart<K>) -> Vec<T>,
) -> Vec<T> {
    let mut out = Vec::new();
    let mut start = fleet_registry::PageStart::Skip(0);
    loop {
        let items = page(start).await;
        let full = items.len() == limit;
        let Some(last) = items.last() else {
            break;
        };
        start = fleet_registry::PageStart::After(key(last));
        out.extend(items);
        if !full {
            break;
        }
    }
    out
}

/// Paging through units and unit states with any page size gives exactly the whole
/// listing, in its order, with the same fields; names whose keys sort differently from
/// the names themselves (`a.service` before `a.service-b.service`, whose states' keys come
/// first) included; and a page found by position is the same as one found by key.
#[tokio::test]
async fn pages_add_up_to_the_whole_listing() {
    let etcd = EtcdServer::start();
    let r = registry(&etcd).await;
    let mut names: Vec<String> = [
        "a.service",
        "a.service-b.service",
        "a.service.service",
        "a-b.service",
        "a.service-b.service-c.service",
        "b.service",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    names.extend((0..17).map(|i| format!("c{i:02}.service")));
    for (i, n) in names.iter().enumerate() {
        let body = if i % 2 == 0 {
            "[Service]\nExecStart=/bin/true\n".to_string()
        } else {
            format!("[Service]\nExecStart=/bin/echo {i}\n")
        };
        r.create_unit(&name(n), &file(&body), TargetState::Launched)
            .await
            .expect("create");
        if i % 3 != 1 {
            let hash = file(&body).hash().to_string();
            place(&etcd, n, &format!("m{}", i % 4), &hash).await;
        }
    }
    // states the placements do not explain: a second machine, a unit without a record, and
    // ten machines' states of b.service before the one it is placed on (m1), as a global
    // unit's: more than a chunk's range of states reads for so few units, so the rest are
    // read by point reads
    let mut c = etcd_client::Client::connect([etcd.endpoint()], None)
        .await
        .expect("client");
    let others: Vec<String> = (0..10).map(|i| format!("l{i}")).collect();
    for (unit, machine) in [
        ("a.service", "m9"),
        ("a.service-b.service", "m0"),
        ("gone.service", "m1"),
    ]
    .into_iter()
    .chain(others.iter().map(|m| ("b.service", m.as_str())))
    {
        report(&mut c, unit, machine, "h").await;
    }
    let units = r.units().await.expect("units");
    let states = r.unit_states().await.expect("states");
    assert_eq!(units.len(), names.len());
    assert!(states.len() > 15, "{}", states.len());
    // read-ahead chunks of a few keys put chunk edges between every such pair of names
    for (chunk, limit) in [1, 2, 3, 4]
        .into_iter()
        .flat_map(|c| [1, 2, 3].map(|l| (c, l)))
        .chain([1, 2, 3, 5, 7, 23, 24, 100].map(|l| (5_000, l)))
    {
        let r = r.clone().with_listing_chunk(chunk);
        let paged = all_pages(
            limit,
            |u: &fleet_registry::UnitView| u.name.to_string(),
            async |start| r.units_page(&start, limit).await.expect("page"),
        )
        .await;
        assert_eq!(paged, units, "units in pages of {limit}, chunks of {chunk}");
        let paged = all_pages(
            limit,
            |s: &fleet_registry::StateRecord| (s.name.clone(), s.machine_id.clone()),
            async |start| r.unit_states_page(&start, limit).await.expect("page"),
        )
        .await;
        assert_eq!(paged, states, "states in pages of {limit}");
        for skip in [0, limit, 2 * limit] {
            let by_position = r
                .units_page(&fleet_registry::PageStart::Skip(skip), limit)
                .await
                .expect("page");
            let want: Vec<_> = units.iter().skip(skip).take(limit).cloned().collect();
            assert_eq!(by_position, want, "units from {skip}, {limit}");
            let by_position = r
                .unit_states_page(&fleet_registry::PageStart::Skip(skip), limit)
                .await
                .expect("page");
            let want: Vec<_> = states.iter().skip(skip).take(limit).cloned().collect();
            assert_eq!(by_position, want, "states from {skip}, {limit}");
        }
    }
}

/// How many reads the registry has sent (`get_all` in its operation metrics).
fn reads(metrics: &fleet_metrics::Metrics) -> u64 {
    let text = metrics.encode();
    text.lines()
        .find_map(|l| l.strip_prefix("fleet_registry_operation_count_total{type=\"get_all\"} "))
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

/// A page costs the same few reads however many units there are: the unit records from the
/// page on (a chunk's worth, which the next pages are served from; here a chunk is a page),
/// then the placements, reasons and states of those units in one transaction (bodies come
/// from the cache). Before, every page read the whole registry; then the states of the placed
/// units were point reads in a transaction of their own.
#[tokio::test]
async fn a_page_reads_only_its_units() {
    let etcd = EtcdServer::start();
    let metrics = fleet_metrics::Metrics::new();
    let r = registry(&etcd).await.with_metrics(metrics.clone());
    let hello = file("[Service]\nExecStart=/bin/true\n");
    let mut created = 0;
    for total in [30, 300] {
        while created < total {
            let n = format!("u{created:04}.service");
            r.create_unit(&name(&n), &hello, TargetState::Launched)
                .await
                .expect("create");
            place(&etcd, &n, "m1", "h").await;
            created += 1;
        }
        // a registry that has read nothing ahead (`a_listing_walks_...` shows what it saves)
        let r = r.clone().with_listing_chunk(10);
        let before = reads(&metrics);
        let page = r
            .units_page(
                &fleet_registry::PageStart::After("u0009.service".into()),
                10,
            )
            .await
            .expect("page");
        let names: Vec<String> = page.iter().map(|u| u.name.to_string()).collect();
        let want: Vec<String> = (10..20).map(|i| format!("u{i:04}.service")).collect();
        assert_eq!(names, want);
        assert!(page.iter().all(|u| u.machine_id.as_deref() == Some("m1")));
        assert_eq!(
            reads(&metrics) - before,
            2,
            "reads of a page at {total} units"
        );
        let before = reads(&metrics);
        let page = r
            .unit_states_page(
                &fleet_registry::PageStart::After(("u0009.service".into(), "m1".into())),
                10,
            )
            .await
            .expect("page");
        assert_eq!(page.len(), 10);
        assert_eq!(
            reads(&metrics) - before,
            1,
            "reads of a state page at {total} units"
        );
    }
}

/// A new leader asks for every unit's body at once (100,000 hashes in fleet-sim, most
/// repeated): each distinct body is read once, in transactions of at most 120 gets that go
/// out several at a time, and every one comes back. (Before, the hashes were told apart by
/// searching a list, seconds at that size, and the transactions went one after another.)
#[tokio::test]
async fn many_bodies_are_read_once_each_in_batches() {
    use etcd_client::{Txn, TxnOp};
    let etcd = EtcdServer::start();
    let writer = registry(&etcd).await;
    let bodies: Vec<_> = (0..1000)
        .map(|i| file(&format!("[Service]\nExecStart=/bin/echo {i}\n")))
        .collect();
    let mut kv = writer.client().kv_client();
    for chunk in bodies.chunks(120) {
        let ops: Vec<TxnOp> = chunk
            .iter()
            .map(|b| {
                TxnOp::put(
                    writer.keys().body(&b.hash().to_string()),
                    b.serialize(),
                    None,
                )
            })
            .collect();
        kv.txn(Txn::new().and_then(ops))
            .await
            .expect("write bodies");
    }
    // a registry with nothing cached, asked for each hash three times
    let metrics = fleet_metrics::Metrics::new();
    let reader = registry(&etcd).await.with_metrics(metrics.clone());
    let hashes: Vec<_> = (0..3)
        .flat_map(|_| bodies.iter().map(|b| b.hash()))
        .collect();
    let before = reads(&metrics);
    let got = fleet_registry::EngineStore::unit_bodies(&reader, &hashes)
        .await
        .expect("bodies");
    assert_eq!(got.len(), bodies.len());
    assert!(bodies.iter().all(|b| got.get(&b.hash()) == Some(b)));
    assert_eq!(
        reads(&metrics) - before,
        1000u64.div_ceil(120),
        "transactions"
    );
}

/// `count` units named `u00000.service` on, each placed on `m1` and reported there, written
/// straight to etcd (120 operations a transaction).
async fn placed_units(r: &EtcdRegistry, from: usize, count: usize) {
    use etcd_client::{Txn, TxnOp};
    let body = file("[Service]\nExecStart=/bin/true\n");
    let hash = body.hash();
    let mut kv = r.client().kv_client();
    kv.put(r.keys().body(&hash.to_string()), body.serialize(), None)
        .await
        .expect("body");
    let names: Vec<String> = (from..from + count)
        .map(|i| format!("u{i:05}.service"))
        .collect();
    for chunk in names.chunks(40) {
        let mut ops = Vec::new();
        for n in chunk {
            let unit = records::unit(n, hash, TargetState::Launched);
            let state = records::state(n, "m1", hash);
            ops.push(TxnOp::put(
                r.keys().unit(n),
                serde_json::to_vec(&unit).expect("encode"),
                None,
            ));
            ops.push(TxnOp::put(r.keys().placement(n), "m1", None));
            ops.push(TxnOp::put(
                r.keys().state(n, "m1"),
                serde_json::to_vec(&state).expect("encode"),
                None,
            ));
        }
        kv.txn(Txn::new().and_then(ops)).await.expect("write units");
    }
}

/// What runs after each page of a listing, given how many items were listed.
type Between = dyn FnMut(usize) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()>>>;

/// Lists every unit (`states` false) or every state the API's way, page after page from
/// where the last one ended, calling `between` after each page; the unit names listed, and
/// the keys etcd counted (walked, in etcd 3.4) for each page.
async fn list_in_pages(
    r: &EtcdRegistry,
    states: bool,
    limit: usize,
    between: &mut Between,
) -> (Vec<String>, Vec<u64>) {
    use fleet_registry::PageStart;
    let mut names = Vec::new();
    let mut walks = Vec::new();
    let mut units_start = PageStart::Skip(0);
    let mut states_start = PageStart::Skip(0);
    loop {
        let before = r.page_keys_walked();
        let full = if states {
            let page = r
                .unit_states_page(&states_start, limit)
                .await
                .expect("page");
            names.extend(page.iter().map(|s| s.name.clone()));
            if let Some(s) = page.last() {
                states_start = PageStart::After((s.name.clone(), s.machine_id.clone()));
            }
            page.len() == limit
        } else {
            let page = r.units_page(&units_start, limit).await.expect("page");
            names.extend(page.iter().map(|u| u.name.to_string()));
            if let Some(u) = page.last() {
                units_start = PageStart::After(u.name.to_string());
            }
            page.len() == limit
        };
        walks.push(r.page_keys_walked() - before);
        if !full {
            break;
        }
        between(names.len()).await;
    }
    (names, walks)
}

/// An etcd with `count` placed units (`u00000.service` on), a registry listing them in
/// chunks of `chunk`, and their names in order.
async fn placed_in_chunks(count: usize, chunk: usize) -> (EtcdServer, EtcdRegistry, Vec<String>) {
    let etcd = EtcdServer::start();
    let r = registry(&etcd).await.with_listing_chunk(chunk);
    placed_units(&r, 0, count).await;
    let want = (0..count).map(|i| format!("u{i:05}.service")).collect();
    (etcd, r, want)
}

/// etcd 3.4 answers a range read with a limit by walking its index from the read's start to
/// the range's end: a page of 100 read by itself walked every unit after it, and a listing
/// in pages of 100 walked U²/200 keys (28.6 s at 100,000 units). Pages are now served from
/// chunks read ahead: only a chunk's read walks the rest of the range; every other page
/// walks its own keys (placements, reasons and states of its units), however large the
/// registry.
#[tokio::test]
async fn a_listing_walks_the_registry_once_per_chunk_not_once_per_page() {
    let (count, chunk) = (2000, 500);
    let (_etcd, r, want) = placed_in_chunks(count, chunk).await;
    for states in [false, true] {
        let (names, walks) = list_in_pages(&r, states, 100, &mut |_| Box::pin(async {})).await;
        assert_eq!(names, want, "states: {states}");
        // a page of 100 units: 100 placements, 100 reasons (none), 100 states
        let own = 3 * 100;
        let chunk_reads = walks.iter().filter(|w| **w > own).count();
        // 2,000 / 500 chunks
        assert!(
            chunk_reads <= count / chunk,
            "{chunk_reads} of {} pages walked past their own keys (states: {states}): {walks:?}",
            walks.len()
        );
        let total: u64 = walks.iter().sum();
        let bound = count * (count / chunk) + 3 * count;
        assert!(
            total <= bound as u64,
            "a listing of {count} walked {total} keys (states: {states}): {walks:?}"
        );
    }
}

/// Once a page is served from a chunk, the chunk after it is read in the background, so the
/// page that reaches it does not wait for it; the listing is the same, and no chunk is read
/// twice (a page reaching a chunk still being read waits for that read).
#[tokio::test]
async fn a_listings_next_chunk_is_read_ahead() {
    let (count, chunk) = (2000, 500);
    let (_etcd, r, want) = placed_in_chunks(count, chunk).await;
    for states in [false, true] {
        let before = r.page_keys_walked();
        // the first page reads the first chunk; the second, served from it, starts the next
        let watched = r.clone();
        let (names, _) = list_in_pages(&r, states, 100, &mut move |listed| {
            let r = watched.clone();
            Box::pin(async move {
                if listed == 200 {
                    let after = r.page_keys_walked();
                    // the next chunk's read counts the rest of the range, 1,500 keys
                    let read = fleet_testutil::eventually(Duration::from_secs(10), || {
                        let r = r.clone();
                        async move { r.page_keys_walked() >= after + 1500 }
                    })
                    .await;
                    assert!(read, "no chunk read ahead after the second page");
                }
            })
        })
        .await;
        assert_eq!(names, want, "states: {states}");
        // each chunk's read walks the rest of the range once, and a unit chunk's join its
        // units' placements and states: nothing read twice
        let chunk_walks: usize = (0..count / chunk).map(|i| count - i * chunk).sum();
        let joins = if states { 0 } else { 2 * count };
        let total = r.page_keys_walked() - before;
        assert!(
            total <= (chunk_walks + joins) as u64,
            "a listing of {count} walked {total} keys (states: {states})"
        );
    }
}

/// Units created and destroyed during a listing, before and after where it is: the listing
/// shows the registry as it was when it began, every unit once, nothing lost or repeated,
/// even across chunks (a chunk's successor is read at its revision), and the next listing
/// shows the registry as it is then.
#[tokio::test]
async fn a_listing_loses_and_repeats_nothing_while_units_come_and_go() {
    let etcd = EtcdServer::start();
    let r = registry(&etcd).await.with_listing_chunk(250);
    // even numbers to begin with; odd ones are created during the listing, even ones
    // destroyed
    for i in (0..1000).step_by(2) {
        placed_units(&r, i, 1).await;
    }
    // twice each: a listing's chunks outlive it, and must not serve the next listing
    for states in [false, true, false, true] {
        // the first units go: this listing's chunks end later than the last one's began
        let mut c = r.client().kv_client();
        for u in r.units().await.expect("units").iter().take(60) {
            let n = u.name.as_str();
            c.delete(r.keys().unit(n), None).await.expect("delete");
            c.delete(r.keys().state(n, "m1"), None)
                .await
                .expect("delete");
        }
        let mut want: Vec<String> = r
            .units()
            .await
            .expect("units")
            .iter()
            .map(|u| u.name.to_string())
            .collect();
        want.sort();
        let writer = r.clone();
        let mut between = move |listed: usize| {
            let r = writer.clone();
            let fut: std::pin::Pin<Box<dyn std::future::Future<Output = ()>>> =
                Box::pin(async move {
                    // a unit before where the listing is, one after it, one destroyed after it
                    placed_units(&r, listed.saturating_sub(51) | 1, 1).await;
                    placed_units(&r, ((listed * 2 + 301) % 1000) | 1, 1).await;
                    let gone = format!("u{:05}.service", ((listed * 2 + 400) % 1000) & !1);
                    let mut c = r.client().kv_client();
                    c.delete(r.keys().unit(&gone), None).await.expect("delete");
                    c.delete(r.keys().state(&gone, "m1"), None)
                        .await
                        .expect("delete");
                });
            fut
        };
        let (names, _) = list_in_pages(&r, states, 100, &mut between).await;
        assert_eq!(names, want, "states: {states}");
    }
}

/// A listing's last chunk holds everything after its start, at its revision; the next
/// listing, which reads afresh and crosses into that range where its own chunk ends, goes on
/// at its own revision and sees the units created since.
#[tokio::test]
async fn a_listing_is_not_served_from_an_older_listings_chunks() {
    let etcd = EtcdServer::start();
    let r = registry(&etcd).await.with_listing_chunk(250);
    placed_units(&r, 0, 500).await;
    let (names, _) = list_in_pages(&r, false, 100, &mut |_| Box::pin(async {})).await;
    assert_eq!(names.len(), 500);
    placed_units(&r, 500, 100).await;
    for states in [false, true] {
        let (names, _) = list_in_pages(&r, states, 100, &mut |_| Box::pin(async {})).await;
        let want: Vec<String> = (0..600).map(|i| format!("u{i:05}.service")).collect();
        assert_eq!(names, want, "states: {states}");
    }
}
