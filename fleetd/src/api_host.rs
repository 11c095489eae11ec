//! fleetd's HTTP API across reloads, as fleet v1.0 ran it: the same listeners for the
//! daemon's whole life, a server rebuilt with each configuration that starts (its registry,
//! `token_limit`, TLS certificates), and fleet's 503 while agent and engine are not running
//! or this machine has not registered yet.

use std::sync::Arc;
use std::time::Duration;

use fleet_api::{ApiConfig, Listener, TlsConfig};
use fleet_registry::Registry;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info};

/// The API's listeners and the server currently holding them.
pub struct ApiHost {
    /// The listeners while no server holds them.
    idle: Vec<Listener>,
    /// The running server: its stop signal, and the task that hands the listeners back.
    server: Option<(CancellationToken, JoinHandle<Vec<Listener>>)>,
    /// Whether the API answers (`true`) or gives fleet's 503 (`false`); every server built
    /// here follows it.
    available: Arc<watch::Sender<bool>>,
}

impl ApiHost {
    /// Takes the listeners; until [`ApiHost::rebuild`] they answer 503 to everything (the
    /// registry given here is never asked).
    pub fn new(listeners: Vec<Listener>, placeholder: Arc<dyn Registry>) -> ApiHost {
        let (available, _) = watch::channel(false);
        let mut host = ApiHost {
            idle: listeners,
            server: None,
            available: Arc::new(available),
        };
        host.spawn(placeholder, ApiConfig::default());
        host
    }

    /// The switch between answering and 503, for the components' life cycle.
    pub fn availability(&self) -> Arc<watch::Sender<bool>> {
        self.available.clone()
    }

    /// Stops the current server (letting its open requests finish) and serves the same
    /// listeners with `registry` and `config`, TLS on TCP listeners with `tls` (none: plain).
    /// Availability is left as it is.
    pub async fn rebuild(
        &mut self,
        registry: Arc<dyn Registry>,
        config: ApiConfig,
        tls: Option<&TlsConfig>,
    ) {
        let listeners = self.take_listeners().await;
        self.idle = listeners
            .into_iter()
            .filter_map(|l| {
                let l = l.without_tls();
                match tls {
                    Some(tls) if l.is_tcp() => match l.with_tls(tls.clone()) {
                        Ok(l) => Some(l),
                        Err(e) => {
                            error!("API listener lost: {e}");
                            None
                        }
                    },
                    _ => Some(l),
                }
            })
            .collect();
        for l in &self.idle {
            let exposed = l
                .tcp_addr()
                .is_some_and(|a| !fleet_config::is_loopback_listen(&a.to_string()));
            if exposed && tls.is_none() {
                // Loud, not refused: socket activation is fleet v1.0's way to add TCP
                // listeners, and api_listen only gets here with api_allow_plain_tcp=true.
                error!(
                    "INSECURE: the API on {} is plain HTTP and reachable from the network: \
                     anyone who can connect controls every machine of the cluster; set \
                     api_certfile, api_keyfile and api_client_cafile, or listen on loopback only",
                    l.describe()
                );
            }
        }
        self.spawn(registry, config);
    }

    /// Stops serving for good.
    pub async fn shutdown(&mut self) {
        drop(self.take_listeners().await);
    }

    fn spawn(&mut self, registry: Arc<dyn Registry>, mut config: ApiConfig) {
        let listeners = std::mem::take(&mut self.idle);
        if listeners.is_empty() {
            return;
        }
        config.available = Some(self.available.subscribe());
        let stop = CancellationToken::new();
        let until = stop.clone().cancelled_owned();
        let task = tokio::spawn(async move {
            match fleet_api::serve_keeping_listeners(listeners, registry, config, until).await {
                Ok(listeners) => listeners,
                Err(e) => {
                    error!("API server: {e}");
                    Vec::new()
                }
            }
        });
        self.server = Some((stop, task));
    }

    async fn take_listeners(&mut self) -> Vec<Listener> {
        let Some((stop, task)) = self.server.take() else {
            return std::mem::take(&mut self.idle);
        };
        stop.cancel();
        match task.await {
            Ok(listeners) => listeners,
            Err(e) => {
                error!("API server task: {e}; its listeners are lost");
                Vec::new()
            }
        }
    }
}

/// Makes the API available once `machine_id` shows among the registry's machines (fleet
/// answered 503 until its machine was registered), polling until then. Runs until it did or
/// is aborted.
pub async fn available_once_registered(
    registry: Arc<dyn Registry>,
    machine_id: String,
    available: Arc<watch::Sender<bool>>,
) {
    let mut wait = Duration::from_millis(50);
    loop {
        match registry.machines().await {
            Ok(machines) if machines.iter().any(|m| m.id == machine_id) => {
                info!("machine registered: the API is available");
                available.send_replace(true);
                return;
            }
            Ok(_) => debug!("machine not registered yet: the API answers 503"),
            Err(e) => debug!(error = %e, "checking the registration"),
        }
        tokio::time::sleep(wait).await;
        wait = (wait * 2).min(Duration::from_secs(1));
    }
}

/// Makes the API unavailable (503) for good: ends `registered` first (and waits for it, as an
/// abort takes effect only at its next pause: a task in the middle of making the API
/// available would otherwise do so after this).
pub async fn unavailable(available: &watch::Sender<bool>, registered: JoinHandle<()>) {
    registered.abort();
    let _ = registered.await;
    available.send_replace(false);
}

#[cfg(test)]
mod tests {
    use super::*;
    use fleet_registry::{MachineView, MemoryRegistry};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// One request on a new connection: status and body.
    async fn get(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
        let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let req = format!("GET {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n");
        s.write_all(req.as_bytes()).await.expect("write");
        let mut out = String::new();
        tokio::time::timeout(Duration::from_secs(10), s.read_to_string(&mut out))
            .await
            .expect("answer in time")
            .expect("read");
        let status = out
            .split(' ')
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or(0);
        let body = out.split("\r\n\r\n").nth(1).unwrap_or("").to_string();
        (status, body)
    }

    fn machine(id: &str) -> MachineView {
        MachineView {
            id: id.into(),
            public_ip: "10.0.0.1".into(),
            metadata: Default::default(),
            version: "1.0.0".into(),
        }
    }

    /// Before, fleetd served the API from the start with the registry and `token_limit` it
    /// started with, never answered 503 while it was not registered, and a SIGHUP did not
    /// reach the API. Now: 503 until registered and while components restart; a rebuild
    /// takes the new registry and `token_limit` on the same socket.
    /// A registration check in the middle of making the API available when the components
    /// stop: the API ends unavailable all the same.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_stop_wins_over_a_registration_in_flight() {
        let available = Arc::new(watch::Sender::new(false));
        let started = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let registered = tokio::spawn({
            let (available, started) = (available.clone(), started.clone());
            async move {
                started.store(true, std::sync::atomic::Ordering::SeqCst);
                // busy between two pauses, where an abort does not reach it
                std::thread::sleep(Duration::from_millis(200));
                available.send_replace(true);
            }
        });
        while !started.load(std::sync::atomic::Ordering::SeqCst) {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        unavailable(&available, registered).await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(!*available.borrow(), "the API came back after the stop");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn rebuilt_on_the_same_listener_and_503_until_registered() {
        let listener = fleet_api::bind_tcp("127.0.0.1:0").await.expect("bind");
        let addr = listener.tcp_addr().expect("tcp");
        let mut host = ApiHost::new(vec![listener], Arc::new(MemoryRegistry::new()));
        let (code, body) = get(addr, "/fleet/v1/machines").await;
        assert_eq!(code, 503, "{body}");
        assert!(body.contains("fleet server unable to communicate with etcd"));

        // the first configuration starts: still 503 until this machine registers
        let registry = Arc::new(MemoryRegistry::new());
        let config = ApiConfig {
            token_limit: 100,
            ..ApiConfig::default()
        };
        host.rebuild(registry.clone(), config, None).await;
        assert_eq!(get(addr, "/fleet/v1/machines").await.0, 503);
        let available = host.availability();
        let waiter = tokio::spawn(available_once_registered(
            registry.clone(),
            "m1".into(),
            available.clone(),
        ));
        registry.add_machine(machine("m2"));
        registry.add_machine(machine("m1"));
        tokio::time::timeout(Duration::from_secs(10), waiter)
            .await
            .expect("noticed in time")
            .expect("waiter");
        let (code, body) = get(addr, "/fleet/v1/machines").await;
        assert_eq!(code, 200, "{body}");
        assert!(!body.contains("nextPageToken"), "{body}");

        // SIGHUP: components stop (503), a new configuration with token_limit=1 starts
        available.send_replace(false);
        assert_eq!(get(addr, "/fleet/v1/machines").await.0, 503);
        let config = ApiConfig {
            token_limit: 1,
            ..ApiConfig::default()
        };
        host.rebuild(registry.clone(), config, None).await;
        available.send_replace(true);
        let (code, body) = get(addr, "/fleet/v1/machines").await;
        assert_eq!(code, 200, "{body}");
        assert!(
            body.contains("nextPageToken"),
            "token_limit=1 reached the API: {body}"
        );

        host.shutdown().await;
        assert!(tokio::net::TcpStream::connect(addr).await.is_err());
    }
}
