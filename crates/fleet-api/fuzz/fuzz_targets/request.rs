//! Fuzz target: arbitrary bytes sent to the API as one client connection (hyper's parser, the
//! routes, bodies, pagination, JSON), against an in-memory registry holding a machine, a
//! unit and its state. A panic anywhere, or a connection that never ends, is a bug.
#![no_main]

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use fleet_api::{ApiConfig, serve_stream};
use fleet_registry::{MachineView, MemoryRegistry, Registry, StateRecord};
use fleet_unit::{TargetState, UnitFile, UnitName};
use libfuzzer_sys::fuzz_target;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

thread_local! {
    // One runtime for all inputs; virtual time, so the server's timeouts fire as soon as
    // nothing else can happen instead of after seconds of wall-clock time.
    static RUNTIME: RefCell<tokio::runtime::Runtime> = RefCell::new(
        tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .start_paused(true)
            .build()
            .expect("runtime"),
    );
}

async fn registry() -> Arc<MemoryRegistry> {
    let r = MemoryRegistry::new();
    r.add_machine(MachineView {
        id: "m1".into(),
        public_ip: "10.0.0.1".into(),
        metadata: BTreeMap::from([("region".into(), "east".into())]),
        version: "1.0.0".into(),
    });
    let body = UnitFile::parse("[Service]\nExecStart=/bin/true\n").expect("unit");
    for name in ["a.service", "b@1.service", "c@.service"] {
        let name = UnitName::parse(name).expect("name");
        r.create_unit(&name, &body, TargetState::Launched)
            .await
            .expect("create");
    }
    r.set_placement("a.service", Some("m1"));
    r.set_state(StateRecord {
        version: 1,
        name: "a.service".into(),
        machine_id: "m1".into(),
        hash: body.hash().to_string(),
        load_state: "loaded".into(),
        active_state: "active".into(),
        sub_state: "running".into(),
        agent_state: TargetState::Launched,
        reason: None,
    });
    Arc::new(r)
}

fuzz_target!(|data: &[u8]| {
    RUNTIME.with(|rt| {
        rt.borrow().block_on(async {
            let config = ApiConfig {
                token_limit: 2,
                max_body_bytes: 64 * 1024,
                ..ApiConfig::default()
            };
            let (client, server) = tokio::io::duplex(64 * 1024);
            let serving = tokio::spawn(serve_stream(server, registry().await, config));
            let (mut rd, mut wr) = tokio::io::split(client);
            let write = async {
                let _ = wr.write_all(data).await;
                let _ = wr.shutdown().await;
            };
            let mut answer = Vec::new();
            let read = rd.read_to_end(&mut answer);
            // virtual time: an hour passes only if the server waits on nothing but timers
            let done = tokio::time::timeout(Duration::from_secs(3600), async {
                let ((), r) = tokio::join!(write, read);
                let _ = r;
                serving.await
            })
            .await;
            match done {
                Ok(Ok(())) => {}
                Ok(Err(e)) => panic!("connection task failed: {e}"),
                Err(_) => panic!("connection still open after an hour"),
            }
        })
    })
});
