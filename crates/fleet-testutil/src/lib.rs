//! Test utilities shared by the crates' tests: a real etcd on a free loopback port, bounded
//! waiting for conditions, and a child process's output collected as it comes; with the
//! `registry` feature, a registry on that etcd ([`fixture`]) and record builders
//! ([`records`]); with `api`, fleet's API server in front of a registry.

use std::io::Read;
use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

#[cfg(feature = "registry")]
pub mod fixture;
#[cfg(feature = "registry")]
pub mod records;

#[cfg(feature = "api")]
pub use fixture::ApiServer;
#[cfg(feature = "registry")]
pub use fixture::Fixture;

/// A private etcd server for one test: started on free loopback ports with its data in a
/// temporary directory, killed (by its PID) and removed when dropped.
pub struct EtcdServer {
    child: Child,
    endpoint: String,
    _dir: tempfile::TempDir,
}

impl EtcdServer {
    /// Starts etcd and waits until it answers. Panics (tests only) when it cannot.
    pub fn start() -> EtcdServer {
        EtcdServer::start_with(&[])
    }

    /// Like [`EtcdServer::start`], with extra arguments for etcd (`--enable-v2=true` for a
    /// test that reads or writes etcd's v2 API, as fleet v1.0 did).
    pub fn start_with(extra: &[&str]) -> EtcdServer {
        EtcdServer::launch(extra).unwrap_or_else(|e| panic!("{e}"))
    }

    /// Starts etcd with `extra` arguments and waits (up to 20 s) until it accepts
    /// connections, or says why it could not: the fallible start, for programs (fleet-sim)
    /// rather than tests.
    pub fn launch(extra: &[&str]) -> Result<EtcdServer, String> {
        // A free port can be taken by another process between our probe and etcd's bind
        // (etcd then exits at once): try again on other ports before giving up.
        let mut why = String::new();
        for _ in 0..3 {
            match EtcdServer::try_start(extra) {
                Ok(server) => return Ok(server),
                Err(e) => why = e,
            }
        }
        Err(why)
    }

    fn try_start(extra: &[&str]) -> Result<EtcdServer, String> {
        let bin = which_etcd().ok_or(
            "etcd is not installed: run ./test (it installs etcd-server) or apt-get install etcd-server",
        )?;
        let dir = tempfile::tempdir().map_err(|e| format!("etcd's data directory: {e}"))?;
        let port = || {
            TcpListener::bind("127.0.0.1:0")
                .and_then(|l| l.local_addr())
                .map(|a| a.port())
                .map_err(|e| format!("finding a free loopback port: {e}"))
        };
        let (client, peer) = (port()?, port()?);
        let endpoint = format!("http://127.0.0.1:{client}");
        let log_path = dir.path().join("etcd.log");
        let log = std::fs::File::create(&log_path).map_err(|e| format!("etcd's log: {e}"))?;
        let child = Command::new(&bin)
            .arg("--name=test")
            .arg(format!("--data-dir={}", dir.path().join("data").display()))
            .arg(format!("--listen-client-urls={endpoint}"))
            .arg(format!("--advertise-client-urls={endpoint}"))
            .arg(format!("--listen-peer-urls=http://127.0.0.1:{peer}"))
            .arg(format!(
                "--initial-advertise-peer-urls=http://127.0.0.1:{peer}"
            ))
            .arg(format!("--initial-cluster=test=http://127.0.0.1:{peer}"))
            .arg("--log-level=error")
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .map_err(|e| format!("starting {bin}: {e}"))?;
        let mut server = EtcdServer {
            child,
            endpoint,
            _dir: dir,
        };
        let mut exited = false;
        let ok = wait_for(Duration::from_secs(20), || {
            exited = exited || server.child.try_wait().is_ok_and(|s| s.is_some());
            exited || std::net::TcpStream::connect(("127.0.0.1", client)).is_ok()
        });
        if ok && !exited {
            return Ok(server);
        }
        let log = std::fs::read_to_string(&log_path).unwrap_or_default();
        Err(format!("etcd did not come up on port {client}: {log}"))
    }

    /// The etcd process's ID.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// Freezes the server (SIGSTOP): its connections stay open and nothing answers, as
    /// with an etcd that lost its quorum or hangs.
    pub fn pause(&self) {
        self.signal("-STOP");
    }

    /// Undoes [`EtcdServer::pause`].
    pub fn resume(&self) {
        self.signal("-CONT");
    }

    fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .args([sig, &self.child.id().to_string()])
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "kill {sig} etcd failed");
    }
}

impl Drop for EtcdServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn which_etcd() -> Option<String> {
    ["/usr/bin/etcd", "/usr/local/bin/etcd"]
        .iter()
        .find(|p| std::path::Path::new(p).exists())
        .map(|p| p.to_string())
}

/// A free TCP port on 127.0.0.1 (bound and released; good enough for tests).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// Polls `cond` every 50 ms until it holds or `timeout` passes; returns whether it held.
pub fn wait_for(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + timeout;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= end {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The async [`wait_for`], for tokio tests: polls `cond` every 50 ms until it holds or
/// `timeout` passes, and returns whether it held. It sleeps on tokio's clock, so it never
/// blocks the runtime (the task under test keeps running between polls) and it follows
/// paused time (`tokio::time::pause`) as the code under test does.
pub async fn eventually<F, Fut>(timeout: Duration, mut cond: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let end = tokio::time::Instant::now() + timeout;
    loop {
        if cond().await {
            return true;
        }
        if tokio::time::Instant::now() >= end {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Reads `pipe` (a child's stdout or stderr) on a thread of its own until it closes; the text
/// so far is in the returned buffer at any time. The thread drops its handle when the pipe
/// closes, so a strong count of 1 says that everything was read.
pub fn collect_output(mut pipe: impl Read + Send + 'static) -> Arc<Mutex<String>> {
    let buf = Arc::new(Mutex::new(String::new()));
    let sink = buf.clone();
    std::thread::spawn(move || {
        let mut chunk = [0u8; 4096];
        while let Ok(n) = pipe.read(&mut chunk) {
            if n == 0 {
                break;
            }
            sink.lock()
                .expect("lock")
                .push_str(&String::from_utf8_lossy(&chunk[..n]));
        }
    });
    buf
}
