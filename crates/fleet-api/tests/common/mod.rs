//! Test helpers: the real server on a loopback port in front of a private etcd, and a raw
//! HTTP/1.1 client that can also send what a well-behaved client never would.

#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use fleet_api::{ApiConfig, ServeError};
use fleet_registry::{EtcdRegistry, Registry};
use fleet_testutil::{ApiServer, Fixture};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

pub struct Harness {
    /// The private etcd and its registry, when the server is in front of them.
    pub fixture: Option<Fixture>,
    pub addr: SocketAddr,
    server: ApiServer,
}

impl Harness {
    /// A private etcd, its registry, and the API server on 127.0.0.1:<free port>.
    pub async fn start(config: ApiConfig) -> Harness {
        let fixture = Fixture::start().await;
        let mut h = Harness::with_registry(Arc::new(fixture.registry.clone()), config).await;
        h.fixture = Some(fixture);
        h
    }

    /// The API server in front of any registry (no etcd).
    pub async fn with_registry(registry: Arc<dyn Registry>, config: ApiConfig) -> Harness {
        let server = ApiServer::on_loopback(registry, config).await;
        Harness {
            fixture: None,
            addr: server.addr(),
            server,
        }
    }

    pub fn reg(&self) -> &EtcdRegistry {
        &self
            .fixture
            .as_ref()
            .expect("harness has a registry")
            .registry
    }

    pub async fn send(
        &self,
        method: &str,
        path: &str,
        content_type: Option<&str>,
        body: &str,
    ) -> Reply {
        send(self.addr, &request(method, path, content_type, body)).await
    }

    pub async fn get(&self, path: &str) -> Reply {
        self.send("GET", path, None, "").await
    }

    pub async fn put(&self, path: &str, body: &str) -> Reply {
        self.send("PUT", path, Some("application/json"), body).await
    }

    pub async fn patch(&self, body: &str) -> Reply {
        self.send(
            "PATCH",
            "/fleet/v1/machines",
            Some("application/json"),
            body,
        )
        .await
    }

    /// Stops the server and waits for `serve` to return.
    pub async fn stop(self) -> Result<(), ServeError> {
        self.server.stop().await
    }
}

/// A parsed response.
#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl Reply {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", self.body))
    }

    /// The message of an error response, checking its shape and that its code is the status.
    pub fn error_message(&self) -> String {
        assert_eq!(
            self.header("content-type"),
            Some("application/json"),
            "{self:?}"
        );
        let v = self.json();
        assert_eq!(
            v["error"]["code"].as_u64(),
            Some(u64::from(self.status)),
            "{self:?}"
        );
        v["error"]["message"]
            .as_str()
            .expect("message is a string")
            .to_string()
    }
}

/// One request with `Connection: close`.
pub fn request(method: &str, path: &str, content_type: Option<&str>, body: &str) -> Vec<u8> {
    let mut r = format!("{method} {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n");
    if let Some(ct) = content_type {
        r.push_str(&format!("Content-Type: {ct}\r\n"));
    }
    if !body.is_empty() || matches!(method, "PUT" | "PATCH" | "POST") {
        r.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    r.push_str("\r\n");
    r.push_str(body);
    r.into_bytes()
}

/// Sends raw bytes and reads the response until the server closes the connection.
pub async fn send(addr: SocketAddr, raw: &[u8]) -> Reply {
    let mut s = TcpStream::connect(addr).await.expect("connect to API");
    s.write_all(raw).await.expect("write request");
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(20), s.read_to_end(&mut buf))
        .await
        .expect("response within 20s")
        .expect("read response");
    parse(&buf)
}

pub fn parse(buf: &[u8]) -> Reply {
    let text = String::from_utf8_lossy(buf).into_owned();
    let (head, body) = text
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("no header end in {text:?}"));
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or("");
    let status = status_line
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("bad status line {status_line:?}"));
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect();
    let chunked = headers
        .iter()
        .any(|(k, v)| k.eq_ignore_ascii_case("transfer-encoding") && v.contains("chunked"));
    let body = if chunked {
        dechunk(body)
    } else {
        body.to_string()
    };
    Reply {
        status,
        headers,
        body,
    }
}

fn dechunk(mut s: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = s.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if n == 0 {
            break;
        }
        out.push_str(&rest[..n]);
        s = &rest[n + 2..];
    }
    out
}
