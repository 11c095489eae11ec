//! One fixture for tests that need fleet's registry on a real etcd, and optionally fleet's
//! API server in front of it: a private etcd, an `EtcdRegistry` connected to it, and
//! `ApiServer` on a listener of the test's choosing, stopped when dropped.

use std::time::{Duration, Instant};

use fleet_registry::{EtcdConfig, EtcdRegistry, Registry};

use crate::EtcdServer;

/// The key prefix a fixture's registry uses unless told otherwise.
pub const PREFIX: &str = "/test/";
/// The registry's request timeout unless told otherwise.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(3);

/// A private etcd and a registry connected to it (etcd stops when the fixture is dropped).
pub struct Fixture {
    pub etcd: EtcdServer,
    pub registry: EtcdRegistry,
}

impl Fixture {
    /// etcd, and a registry under [`PREFIX`] with [`REQUEST_TIMEOUT`].
    pub async fn start() -> Fixture {
        Fixture::start_with(PREFIX, REQUEST_TIMEOUT).await
    }

    /// etcd, and a registry under `prefix` whose requests time out after `timeout`.
    pub async fn start_with(prefix: &str, timeout: Duration) -> Fixture {
        let etcd = EtcdServer::start();
        let registry = connect(&etcd, prefix, timeout).await;
        Fixture { etcd, registry }
    }
}

/// A registry on `etcd` under `prefix`, already connected: it has answered one request, so
/// a test with short request timeouts does not spend them on connecting. (The first
/// requests are retried for up to 20 s: on a loaded machine, connecting can take longer
/// than a short timeout.)
pub async fn connect(etcd: &EtcdServer, prefix: &str, timeout: Duration) -> EtcdRegistry {
    let cfg = EtcdConfig {
        endpoints: vec![etcd.endpoint().to_string()],
        key_prefix: prefix.into(),
        request_timeout: timeout,
        ..Default::default()
    };
    let registry = EtcdRegistry::connect(&cfg).await.expect("connect to etcd");
    let give_up = Instant::now() + Duration::from_secs(20);
    loop {
        match registry.units().await {
            Ok(_) => return registry,
            Err(e) if Instant::now() >= give_up => panic!("etcd does not answer: {e}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

#[cfg(feature = "api")]
pub use api::ApiServer;

#[cfg(feature = "api")]
mod api {
    use std::net::SocketAddr;
    use std::sync::Arc;
    use std::time::Duration;

    use fleet_api::{ApiConfig, Listener, ServeError, bind_tcp, serve};
    use fleet_registry::Registry;
    use tokio::sync::oneshot;
    use tokio::task::JoinHandle;

    /// fleet's API server on one listener, run by a task of the test's runtime; it stops
    /// when [`ApiServer::stop`] is called or when it is dropped.
    pub struct ApiServer {
        addr: Option<SocketAddr>,
        stop: Option<oneshot::Sender<()>>,
        task: Option<JoinHandle<Result<(), ServeError>>>,
    }

    impl ApiServer {
        /// Serves `registry` on 127.0.0.1 at a free port.
        pub async fn on_loopback(registry: Arc<dyn Registry>, config: ApiConfig) -> ApiServer {
            let listener = bind_tcp("127.0.0.1:0").await.expect("bind");
            ApiServer::on(listener, registry, config)
        }

        /// Serves `registry` on `listener` (TCP, TLS or a unix socket).
        pub fn on(listener: Listener, registry: Arc<dyn Registry>, config: ApiConfig) -> ApiServer {
            let addr = listener.tcp_addr();
            let (tx, rx) = oneshot::channel::<()>();
            let task = tokio::spawn(serve(vec![listener], registry, config, async {
                let _ = rx.await;
            }));
            ApiServer {
                addr,
                stop: Some(tx),
                task: Some(task),
            }
        }

        /// The TCP address it listens on (panics for a unix socket).
        pub fn addr(&self) -> SocketAddr {
            self.addr.expect("the API server listens on TCP")
        }

        /// Stops the server and waits (up to 10 s) for `serve` to return.
        pub async fn stop(mut self) -> Result<(), ServeError> {
            if let Some(tx) = self.stop.take() {
                let _ = tx.send(());
            }
            let task = self.task.take().expect("server task");
            tokio::time::timeout(Duration::from_secs(10), task)
                .await
                .expect("serve returns after shutdown")
                .expect("serve task did not panic")
        }
    }

    impl Drop for ApiServer {
        fn drop(&mut self) {
            if let Some(tx) = self.stop.take() {
                let _ = tx.send(());
            }
        }
    }
}
