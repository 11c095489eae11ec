//! The server under hostile or broken clients and registries: body size limit, slow and
//! malformed clients, panicking handlers, unavailability, shutdown, and a unix socket listener.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use common::{Harness, parse, request, send};
use fleet_api::{ApiConfig, bind_unix, serve};
use fleet_registry::{MachineView, Registry, StateRecord, UnitView};
use fleet_unit::{TargetState, UnitFile, UnitName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Writes `raw` while reading the response; write errors are ignored (the server may answer
/// before it has read everything).
async fn send_streaming(addr: std::net::SocketAddr, raw: Vec<u8>) -> common::Reply {
    let s = TcpStream::connect(addr).await.expect("connect");
    let (mut rd, mut wr) = s.into_split();
    let writer = tokio::spawn(async move {
        let _ = wr.write_all(&raw).await;
        wr
    });
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(20), rd.read_to_end(&mut buf))
        .await
        .expect("response within 20s");
    drop(writer);
    parse(&buf)
}

/// Reads until the server closes the connection; returns what it sent and how long after
/// `start` that was.
async fn until_closed(s: &mut TcpStream, start: Instant) -> (Vec<u8>, Duration) {
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut buf))
        .await
        .expect("server closes the connection");
    (buf, start.elapsed())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_over_1_mib_are_refused() {
    let h = Harness::start(ApiConfig::default()).await;
    let limit = 1024 * 1024;
    // exactly 1 MiB is fine
    let unit = r#"{"desiredState":"loaded","options":[{"section":"Service","name":"ExecStart","value":"/bin/true"}]}"#;
    let padded = format!("{unit}{}", " ".repeat(limit - unit.len()));
    assert_eq!(padded.len(), limit);
    let r = send_streaming(
        h.addr,
        request(
            "PUT",
            "/fleet/v1/units/big.service",
            Some("application/json"),
            &padded,
        ),
    )
    .await;
    assert_eq!(r.status, 201, "{r:?}");

    // declared too large: refused before the body is read
    let head = format!(
        "PUT /fleet/v1/units/x.service HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        limit + 1
    );
    let r = send(h.addr, head.as_bytes()).await;
    assert_eq!(
        (r.status, r.error_message()),
        (413, format!("request body exceeds {limit} bytes"))
    );

    // chunked, no length declared: refused once it passes the limit
    let mut raw = format!(
        "PATCH /fleet/v1/machines HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n{:x}\r\n",
        limit + 1
    )
    .into_bytes();
    raw.extend(std::iter::repeat_n(b' ', limit + 1));
    let r = send_streaming(h.addr, raw).await;
    assert_eq!(r.status, 413, "{r:?}");
    assert_eq!(h.get("/fleet/v1/units").await.status, 200);
    h.stop().await.expect("clean shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_and_malformed_clients_cannot_hold_the_server() {
    let cfg = ApiConfig {
        header_read_timeout: Duration::from_millis(300),
        request_timeout: Duration::from_secs(2),
        ..ApiConfig::default()
    };
    let h = Harness::start(cfg).await;

    // headers never finished
    let start = Instant::now();
    let mut half = TcpStream::connect(h.addr).await.expect("connect");
    half.write_all(b"GET /fleet/v1/units HTTP/1.1\r\nHost: t\r\n")
        .await
        .expect("write");
    // connected, silent
    let mut idle = TcpStream::connect(h.addr).await.expect("connect");
    // body promised, not sent
    let mut slow_body = TcpStream::connect(h.addr).await.expect("connect");
    slow_body
        .write_all(b"PUT /fleet/v1/units/a.service HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"desired")
        .await
        .expect("write");

    // meanwhile others are served
    assert_eq!(h.get("/fleet/v1/units").await.status, 200);

    let (got, took) = until_closed(&mut half, start).await;
    println!("incomplete headers: closed after {took:?}");
    assert!(
        got.is_empty() || String::from_utf8_lossy(&got).starts_with("HTTP/1.1 408"),
        "{got:?}"
    );
    let (_, took) = until_closed(&mut idle, start).await;
    println!("idle connection: closed after {took:?}");
    let (got, took) = until_closed(&mut slow_body, start).await;
    println!("incomplete body: answered after {took:?}");
    let r = parse(&got);
    assert_eq!(
        (r.status, r.error_message().as_str()),
        (408, "request body not received in time")
    );

    // garbage and oversized headers get 4xx, and the server goes on
    let r = send(h.addr, b"GARBAGE\r\n\r\n").await;
    assert_eq!(r.status, 400, "{r:?}");
    let huge = format!(
        "GET /fleet/v1/units HTTP/1.1\r\nHost: t\r\nX-Big: {}\r\n\r\n",
        "a".repeat(100 * 1024)
    );
    let r = send_streaming(h.addr, huge.into_bytes()).await;
    assert_eq!(r.status, 431, "{r:?}");
    let r = send(
        h.addr,
        b"GET /fleet/v1/units%zz HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(r.status, 400, "{r:?}");
    assert_eq!(h.get("/fleet/v1/units").await.status, 200);
    h.stop().await.expect("clean shutdown");
}

/// A registry whose every call panics: a bug anywhere behind a handler.
struct Panicking;

#[async_trait]
impl Registry for Panicking {
    async fn create_unit(
        &self,
        _: &UnitName,
        _: &UnitFile,
        _: TargetState,
    ) -> fleet_registry::Result<()> {
        panic!("create_unit")
    }
    async fn replace_unit(
        &self,
        _: &UnitName,
        _: &UnitFile,
        _: TargetState,
    ) -> fleet_registry::Result<()> {
        panic!("replace_unit")
    }
    async fn set_desired_state(&self, _: &UnitName, _: TargetState) -> fleet_registry::Result<()> {
        panic!("set_desired_state")
    }
    async fn destroy_unit(&self, _: &UnitName) -> fleet_registry::Result<bool> {
        panic!("destroy_unit")
    }
    async fn unit(&self, _: &UnitName) -> fleet_registry::Result<Option<UnitView>> {
        panic!("unit")
    }
    async fn units(&self) -> fleet_registry::Result<Vec<UnitView>> {
        panic!("units")
    }
    async fn machines(&self) -> fleet_registry::Result<Vec<MachineView>> {
        panic!("machines")
    }
    async fn unit_states(&self) -> fleet_registry::Result<Vec<StateRecord>> {
        panic!("unit_states")
    }
    async fn set_machine_metadata(
        &self,
        _: &str,
        _: &str,
        _: Option<&str>,
    ) -> fleet_registry::Result<()> {
        panic!("set_machine_metadata")
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_handler_answers_500_and_the_server_goes_on() {
    let (tx, rx) = tokio::sync::watch::channel(true);
    let cfg = ApiConfig {
        available: Some(rx),
        ..ApiConfig::default()
    };
    let h = Harness::with_registry(Arc::new(Panicking), cfg).await;
    for _ in 0..3 {
        for (method, path) in [
            ("GET", "/fleet/v1/units"),
            ("GET", "/fleet/v1/machines"),
            ("DELETE", "/fleet/v1/units/a.service"),
        ] {
            let r = h.send(method, path, None, "").await;
            assert_eq!(
                (r.status, r.body.as_str()),
                (500, r#"{"error":{"code":500,"message":""}}"#),
                "{method} {path}"
            );
        }
    }
    // requests that never reach the registry still work
    assert_eq!(h.get("/fleet/v1/discovery").await.status, 200);

    // fleetd says etcd is gone: fleet's 503 for everything
    tx.send(false).expect("server holds the receiver");
    let r = h.get("/fleet/v1/discovery").await;
    assert_eq!(
        (r.status, r.error_message().as_str()),
        (503, "fleet server unable to communicate with etcd")
    );
    tx.send(true).expect("server holds the receiver");
    assert_eq!(h.get("/fleet/v1/discovery").await.status, 200);
    h.stop().await.expect("clean shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_does_not_wait_for_idle_keepalive_connections() {
    let cfg = ApiConfig {
        shutdown_grace: Duration::from_secs(5),
        ..ApiConfig::default()
    };
    let h = Harness::with_registry(Arc::new(Panicking), cfg).await;
    let addr = h.addr;
    // a kept-alive connection after one request
    let mut s = TcpStream::connect(addr).await.expect("connect");
    s.write_all(b"GET /fleet/v1/discovery HTTP/1.1\r\nHost: t\r\n\r\n")
        .await
        .expect("write");
    let mut buf = vec![0u8; 64];
    let n = s.read(&mut buf).await.expect("read");
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
    let start = Instant::now();
    h.stop().await.expect("clean shutdown");
    println!(
        "shutdown with an idle connection took {:?}",
        start.elapsed()
    );
    assert!(
        start.elapsed() < Duration::from_secs(5),
        "waited for the idle connection"
    );
    assert!(
        TcpStream::connect(addr).await.is_err(),
        "still accepting after shutdown"
    );
}

/// A server on a unix socket in a temporary directory; send on the sender to stop it.
struct UnixServer {
    _dir: tempfile::TempDir,
    path: std::path::PathBuf,
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<Result<(), fleet_api::ServeError>>,
}

fn unix_server(registry: Arc<dyn Registry>) -> UnixServer {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("fleet.sock");
    let listener = bind_unix(&path).expect("bind");
    let (stop, rx) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(serve(
        vec![listener],
        registry,
        ApiConfig::default(),
        async {
            let _ = rx.await;
        },
    ));
    UnixServer {
        _dir: dir,
        path,
        stop,
        task,
    }
}

impl UnixServer {
    /// Sends `req`, then (with `half_close`) closes the write side, and reads the answer.
    async fn ask(&self, req: &[u8], half_close: bool) -> common::Reply {
        let mut s = tokio::net::UnixStream::connect(&self.path)
            .await
            .expect("connect");
        s.write_all(req).await.expect("write");
        if half_close {
            s.shutdown().await.expect("half-close");
        }
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).await.expect("read");
        parse(&buf)
    }

    async fn stop(self) {
        let _ = self.stop.send(());
        self.task.await.expect("joined").expect("served");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serves_on_a_unix_socket() {
    let server = unix_server(Arc::new(Panicking));
    let r = server
        .ask(
            &request("GET", "/fleet/v1/discovery?alt=json", None, ""),
            false,
        )
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.header("server"), Some("fleetd/1.0.0"));
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_closes_its_write_side_still_gets_the_answer() {
    // `printf 'GET ...' | fleetctl fd-forward /var/run/fleet.sock`: the request, then EOF
    let server = unix_server(Arc::new(Panicking));
    let r = server
        .ask(
            &request("GET", "/fleet/v1/discovery?alt=json", None, ""),
            true,
        )
        .await;
    assert_eq!(r.status, 200);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_out_of_reach_is_a_503_that_says_so() {
    let fleet_testutil::Fixture { etcd, registry } =
        fleet_testutil::Fixture::start_with("/gone/", Duration::from_millis(500)).await;
    drop(etcd);
    let server = unix_server(Arc::new(registry));
    let r = server
        .ask(&request("GET", "/fleet/v1/units?alt=json", None, ""), false)
        .await;
    assert_eq!(r.status, 503);
    assert!(
        r.body
            .contains("fleet server unable to communicate with etcd"),
        "{r:?}"
    );
    server.stop().await;
}
