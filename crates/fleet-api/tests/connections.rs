//! Connection budgets and timeouts under hostile clients: network clients cannot lock out the
//! local socket, clients that never read or never finish a TLS handshake lose their slot, and
//! method tokens cannot grow the metrics.

mod common;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use common::{parse, request, send};
use fleet_api::{ApiConfig, Listener, ServeError, TlsFiles, bind_tcp, bind_unix, load_tls, serve};
use fleet_registry::MemoryRegistry;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream, UnixStream};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// Generous bound for anything that should happen "soon"; never a speed assertion.
const SOON: Duration = Duration::from_secs(15);

/// A server on a TCP listener (optionally TLS) and a unix socket, before an empty in-memory
/// registry.
struct Server {
    _dir: tempfile::TempDir,
    tcp: std::net::SocketAddr,
    unix: PathBuf,
    stop: oneshot::Sender<()>,
    task: JoinHandle<Result<(), ServeError>>,
}

async fn server(config: ApiConfig, tls: bool) -> Server {
    let dir = tempfile::tempdir().expect("tempdir");
    let unix = dir.path().join("fleet.sock");
    let mut tcp_listener = bind_tcp("127.0.0.1:0").await.expect("bind tcp");
    let tcp = tcp_listener.tcp_addr().expect("tcp address");
    if tls {
        tcp_listener = tcp_listener
            .with_tls(load_tls(&self_signed(dir.path())).expect("tls"))
            .expect("tls on tcp");
    }
    let listeners: Vec<Listener> = vec![tcp_listener, bind_unix(&unix).expect("bind unix")];
    let (stop, rx) = oneshot::channel::<()>();
    let task = tokio::spawn(serve(
        listeners,
        Arc::new(MemoryRegistry::new()),
        config,
        async {
            let _ = rx.await;
        },
    ));
    Server {
        _dir: dir,
        tcp,
        unix,
        stop,
        task,
    }
}

impl Server {
    async fn ask_unix(&self, path: &str) -> common::Reply {
        let mut s = UnixStream::connect(&self.unix).await.expect("connect unix");
        s.write_all(&request("GET", path, None, ""))
            .await
            .expect("write");
        let mut buf = Vec::new();
        tokio::time::timeout(SOON, s.read_to_end(&mut buf))
            .await
            .expect("the local socket answers while TCP slots are taken")
            .expect("read");
        parse(&buf)
    }

    async fn stop(self) {
        let _ = self.stop.send(());
        let _ = tokio::time::timeout(SOON, self.task).await;
    }
}

/// A self-signed server certificate and key for 127.0.0.1, written into `dir`.
fn self_signed(dir: &std::path::Path) -> TlsFiles {
    let key = rcgen::KeyPair::generate().expect("key");
    let cert = rcgen::CertificateParams::new(vec!["127.0.0.1".to_string()])
        .expect("params")
        .self_signed(&key)
        .expect("self-signed");
    let files = TlsFiles {
        cert_file: dir.join("cert.pem"),
        key_file: dir.join("key.pem"),
        client_ca_file: None,
    };
    std::fs::write(&files.cert_file, cert.pem()).expect("write cert");
    std::fs::write(&files.key_file, key.serialize_pem()).expect("write key");
    files
}

/// Reads until the server closes the connection (EOF or reset), at most `SOON`.
async fn closed_by_server(s: &mut TcpStream) -> bool {
    let mut buf = vec![0u8; 64 * 1024];
    tokio::time::timeout(SOON, async {
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await
    .is_ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_local_socket_is_answered_while_every_tcp_slot_is_taken() {
    let cfg = ApiConfig {
        max_tcp_connections: 4,
        // idle clients keep their slot this long
        header_read_timeout: Duration::from_secs(60),
        ..ApiConfig::default()
    };
    let srv = server(cfg, false).await;
    let mut idle = Vec::new();
    for _ in 0..4 {
        idle.push(TcpStream::connect(srv.tcp).await.expect("connect"));
    }
    // the TCP budget is used up: a further TCP client waits in the backlog
    let mut waiting = TcpStream::connect(srv.tcp).await.expect("connect");
    waiting
        .write_all(&request("GET", "/fleet/v1/discovery", None, ""))
        .await
        .expect("write");
    let mut buf = [0u8; 16];
    assert!(
        tokio::time::timeout(Duration::from_millis(500), waiting.read(&mut buf))
            .await
            .is_err(),
        "the TCP budget was not used up"
    );
    // the local socket has its own
    for _ in 0..5 {
        assert_eq!(srv.ask_unix("/fleet/v1/units").await.status, 200);
    }
    drop(idle);
    srv.stop().await;
}

/// A client that pipelines requests as fast as it can and never reads an answer.
async fn non_reader(addr: std::net::SocketAddr) -> JoinHandle<()> {
    let sock = TcpSocket::new_v4().expect("socket");
    // a small receive window, so the server's writes block early
    let _ = sock.set_recv_buffer_size(4096);
    let mut s = sock.connect(addr).await.expect("connect");
    tokio::spawn(async move {
        let one = b"GET /fleet/v1/discovery HTTP/1.1\r\nHost: t\r\n\r\n".repeat(64);
        // ends when the server drops the connection
        while s.write_all(&one).await.is_ok() {}
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_that_never_read_lose_their_slot_after_the_write_timeout() {
    let cfg = ApiConfig {
        max_tcp_connections: 2,
        write_timeout: Duration::from_millis(500),
        header_read_timeout: Duration::from_secs(60),
        ..ApiConfig::default()
    };
    let srv = server(cfg, false).await;
    let hogs = [non_reader(srv.tcp).await, non_reader(srv.tcp).await];
    // meanwhile the local socket is served
    assert_eq!(srv.ask_unix("/fleet/v1/discovery").await.status, 200);
    // once the hogs are dropped, TCP clients are served again (`send` waits at most 20 s)
    let r = send(srv.tcp, &request("GET", "/fleet/v1/discovery", None, "")).await;
    assert_eq!(r.status, 200);
    for hog in hogs {
        tokio::time::timeout(SOON, hog)
            .await
            .expect("the server closed the non-reading connection")
            .expect("hog task");
    }
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tls_handshake_that_never_completes_is_dropped() {
    let cfg = ApiConfig {
        max_tcp_connections: 1,
        tls_handshake_timeout: Duration::from_millis(300),
        header_read_timeout: Duration::from_secs(60),
        ..ApiConfig::default()
    };
    let srv = server(cfg, true).await;
    // silent after connecting
    let mut silent = TcpStream::connect(srv.tcp).await.expect("connect");
    // the start of a ClientHello, then nothing
    let mut partial = TcpStream::connect(srv.tcp).await.expect("connect");
    partial
        .write_all(&[0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00])
        .await
        .expect("write");
    assert!(srv.ask_unix("/fleet/v1/discovery").await.status == 200);
    // one TCP slot: the second client is only accepted once the first one was dropped
    assert!(closed_by_server(&mut silent).await, "silent client kept");
    assert!(closed_by_server(&mut partial).await, "partial client kept");
    srv.stop().await;
}

/// Method tokens that no client would send: letters, digits and token punctuation.
fn random_methods(n: usize) -> Vec<String> {
    const TCHAR: &[u8] =
        b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789!#$%&'*+-.^_`|~";
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next = move || {
        // xorshift64
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    (0..n)
        .map(|_| {
            let len = 1 + (next() % 12) as usize;
            (0..len)
                .map(|_| TCHAR[(next() % TCHAR.len() as u64) as usize] as char)
                .collect()
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_method_tokens_do_not_grow_the_metrics() {
    let srv = server(ApiConfig::default(), false).await;
    let methods = random_methods(1000);
    // one kept-alive connection, one request after the other
    let mut s = UnixStream::connect(&srv.unix).await.expect("connect");
    let mut buf = vec![0u8; 64 * 1024];
    for m in &methods {
        s.write_all(format!("{m} /fleet/v1/units HTTP/1.1\r\nHost: t\r\n\r\n").as_bytes())
            .await
            .expect("write");
        // each answer is small and has a Content-Length; read until its body is complete
        let mut got = Vec::new();
        loop {
            let n = tokio::time::timeout(SOON, s.read(&mut buf))
                .await
                .expect("answer")
                .expect("read");
            assert!(n > 0, "server closed the connection after {m:?}");
            got.extend_from_slice(&buf[..n]);
            if complete(&got) {
                break;
            }
        }
    }
    let r = srv.ask_unix("/metrics").await;
    assert_eq!(r.status, 200);
    let series: Vec<&str> = r
        .body
        .lines()
        .filter(|l| l.starts_with("fleet_api_requests_total{"))
        .collect();
    println!(
        "{} series after 1000 random methods: {series:#?}",
        series.len()
    );
    // a fixed set of methods times the few status codes the API answers with
    assert!(series.len() <= 10, "{series:#?}");
    assert!(
        series.iter().any(|l| l.contains("method=\"other\"")),
        "{series:#?}"
    );
    srv.stop().await;
}

/// Whether `buf` holds one whole response with a Content-Length.
fn complete(buf: &[u8]) -> bool {
    let text = String::from_utf8_lossy(buf);
    let Some((head, body)) = text.split_once("\r\n\r\n") else {
        return false;
    };
    let len = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("content-length")
                .then(|| v.trim().parse::<usize>().ok())?
        })
        .unwrap_or(0);
    body.len() >= len
}
