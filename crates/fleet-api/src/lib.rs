//! fleet's JSON HTTP API v1: the server fleetd runs, its wire types and its metrics.
//!
//! - [`wire`]: the JSON entities, byte-compatible with fleet v1 (the client uses them too);
//! - [`serve`]: answers on listeners it is handed (systemd socket activation, a unix socket,
//!   TCP with optional TLS) until a shutdown future resolves;
//! - [`Metrics`]: the Prometheus metrics of fleetd, served at `/metrics`;
//! - [`DISCOVERY_JSON`]: the discovery document served at `/fleet/v1/discovery`.
//!
//! Only this crate and `fleet-client` know HTTP; the registry behind the API is any
//! [`fleet_registry::Registry`].

mod dashboard;
mod error;
mod events;
mod handlers;
mod listen;
mod live;
mod metrics;
mod page;
pub mod pem;
mod server;
mod unit_json;
pub mod wire;
mod write_timeout;

use std::time::Duration;

pub use error::ServeError;
pub use events::EventFeed;
pub use listen::{
    Listener, TlsConfig, TlsFiles, bind_tcp, bind_unix, listeners_from_systemd, load_tls,
};
pub use live::{DASHBOARD_PATH, EVENTS_PATH};
pub use metrics::{
    CONTENT_TYPE as METRICS_CONTENT_TYPE, EngineFailure, MethodLabel, Metrics, RegistryOp,
};
pub use page::{DEFAULT_TOKEN_LIMIT, PageToken};
pub use server::{serve, serve_keeping_listeners, serve_stream};

/// The discovery document of API v1 (same structure as fleet's `schema/v1.json`, our wording).
pub const DISCOVERY_JSON: &str = include_str!("discovery.json");

/// Where the API lives under a server's root.
pub const API_PREFIX: &str = "/fleet/v1";

/// How the server behaves; fleetd fills it from its configuration.
#[derive(Debug, Clone)]
pub struct ApiConfig {
    /// Items per page of the list endpoints (fleet's `token_limit`).
    pub token_limit: u16,
    /// A client must send a request's headers within this time, also between the requests
    /// of a kept-alive connection; otherwise the connection is closed.
    pub header_read_timeout: Duration,
    /// Reading the body and answering one request must finish within this time.
    pub request_timeout: Duration,
    /// Larger request bodies get 413.
    pub max_body_bytes: usize,
    /// Connections served at once on unix sockets (the local socket), counted apart from TCP
    /// so that no number of network clients can lock local users out; further clients wait
    /// in the listen backlog.
    pub max_unix_connections: usize,
    /// Connections served at once on TCP listeners, TLS handshakes included; further
    /// clients wait in the listen backlog.
    pub max_tcp_connections: usize,
    /// A TLS client must complete its handshake within this time, or is dropped.
    pub tls_handshake_timeout: Duration,
    /// A write to a client that stays blocked this long (the client does not read, e.g. it
    /// pipelines requests and never reads the answers) closes the connection. It is also the
    /// most blocked time a connection can save up: see `min_write_rate`.
    pub write_timeout: Duration,
    /// Bytes per second a client must read, on average, while the server waits for it to
    /// read: each byte written earns back `1 / min_write_rate` s of the `write_timeout`
    /// budget that blocked writes spend, so a client reading a few bytes now and then loses
    /// its connection too. 0: no minimum (only `write_timeout` without any progress).
    pub min_write_rate: u64,
    /// After shutdown, open connections get this long to finish their current request.
    pub shutdown_grace: Duration,
    /// Sent as `Server: fleetd/<version>`.
    pub version: String,
    /// Ignore `If-None-Match: *` on a unit's PUT and leave out [`wire::CREATE_ONLY_HEADER`],
    /// as fleet v1.0's fleetd did: for tests of clients talking to such a fleetd.
    pub ignore_create_only: bool,
    pub metrics: Metrics,
    /// While this says `false`, every request gets fleet's 503 ("fleet server unable to
    /// communicate with etcd"). `None`: always available.
    pub available: Option<tokio::sync::watch::Receiver<bool>>,
    /// The source of `GET /fleet/v1/events`; `None`: that path answers 404.
    pub events: Option<EventFeed>,
    /// Revisions of events kept so that clients can resume (`?since=`).
    pub event_history: usize,
    /// Bytes of events kept so that clients can resume; the older ones go first.
    pub event_history_bytes: usize,
    /// Revisions a subscriber may fall behind before it is cut off (with a message): what
    /// bounds fleetd's memory whatever the number and speed of subscribers.
    pub event_backlog: usize,
    /// A comment is sent on an idle stream this often.
    pub event_heartbeat: Duration,
    /// Serve the read-only dashboard at `/dashboard/` (`enable_dashboard`).
    pub dashboard: bool,
}

impl ApiConfig {
    /// Connections the server may hold open at once, all listeners together: what the
    /// process's open file limit must leave room for (`LimitNOFILE=` in fleet.service).
    pub fn max_open_connections(&self) -> usize {
        self.max_unix_connections
            .max(1)
            .saturating_add(self.max_tcp_connections.max(1))
    }
}

impl Default for ApiConfig {
    fn default() -> Self {
        ApiConfig {
            token_limit: DEFAULT_TOKEN_LIMIT,
            header_read_timeout: Duration::from_secs(10),
            request_timeout: Duration::from_secs(30),
            max_body_bytes: 1024 * 1024,
            max_unix_connections: 128,
            max_tcp_connections: 1024,
            tls_handshake_timeout: Duration::from_secs(10),
            write_timeout: Duration::from_secs(30),
            min_write_rate: 1024,
            shutdown_grace: Duration::from_secs(5),
            version: env!("CARGO_PKG_VERSION").to_string(),
            ignore_create_only: false,
            metrics: Metrics::new(),
            available: None,
            events: None,
            event_history: 10_000,
            event_history_bytes: 8 * 1024 * 1024,
            event_backlog: 1024,
            event_heartbeat: Duration::from_secs(15),
            dashboard: false,
        }
    }
}
