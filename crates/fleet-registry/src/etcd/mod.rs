//! The registry on etcd v3, through `etcd-client`: the connection and what every role shares
//! (timed requests naming their key, transactions, the unit body cache). Each role's requests
//! live in their own module: `client` ([`crate::Registry`]), `engine` ([`crate::EngineStore`])
//! and `agent` ([`crate::AgentStore`]).

mod agent;
mod chunks;
mod client;
mod engine;
pub(crate) mod health;

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use etcd_client::{
    Certificate, Client, ConnectOptions, Identity, TlsOptions, Txn, TxnOp, TxnOpResponse,
};
use fleet_unit::{UnitFile, UnitHash};
use tracing::warn;

use crate::keys::{self, Keys};
use crate::watch::{KeyRange, ListError, Paging, kv_client, list};
use crate::{RegistryError, Result};

/// etcd accepts at most 128 operations in one transaction by default.
pub(super) const MAX_TXN_OPS: usize = 120;

/// How to reach etcd; fleet's `etcd_*` options.
#[derive(Debug, Clone)]
pub struct EtcdConfig {
    pub endpoints: Vec<String>,
    pub key_prefix: String,
    pub request_timeout: Duration,
    pub ca_file: Option<PathBuf>,
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
    pub username: Option<String>,
    pub password: Option<String>,
}

impl Default for EtcdConfig {
    fn default() -> Self {
        EtcdConfig {
            endpoints: vec!["http://127.0.0.1:2379".into()],
            key_prefix: crate::DEFAULT_KEY_PREFIX.into(),
            request_timeout: Duration::from_secs(1),
            ca_file: None,
            cert_file: None,
            key_file: None,
            username: None,
            password: None,
        }
    }
}

/// The registry. Cheap to clone; clones share the connection and the body cache.
#[derive(Clone)]
pub struct EtcdRegistry {
    client: Client,
    keys: Keys,
    timeout: Duration,
    /// Unit bodies by hash: immutable once written, so caching them is always correct.
    bodies: Arc<Mutex<HashMap<UnitHash, Arc<UnitFile>>>>,
    /// Where every request is counted (fleet's registry operation metrics).
    metrics: fleet_metrics::Metrics,
    /// Takes dead members out of the balancer once a request failed.
    health: health::Health,
    /// Creations waiting for the one in flight: written together next (group commit).
    creations: Arc<Mutex<client::Creations>>,
    /// How many keys one page of a listing reads.
    page: i64,
    /// What API listings read ahead, to serve their next pages from (`chunks`).
    chunks: Arc<chunks::Chunks>,
    /// How many keys etcd counted in the ranges page reads covered: what etcd 3.4 walks to
    /// answer them.
    walked: Arc<std::sync::atomic::AtomicU64>,
}

impl EtcdRegistry {
    /// Connects (lazily: etcd need not be up yet) and validates the configuration.
    pub async fn connect(cfg: &EtcdConfig) -> Result<EtcdRegistry> {
        EtcdRegistry::open(cfg, None).await
    }

    /// Like [`EtcdRegistry::connect`], but every connection to an endpoint is opened by
    /// `dialer` (fleetctl's `--tunnel`: an SSH channel) instead of a TCP connect, so no local
    /// port is involved. TLS still verifies the host name in the endpoint URL.
    pub async fn connect_via(
        cfg: &EtcdConfig,
        dialer: Arc<dyn crate::Dialer>,
    ) -> Result<EtcdRegistry> {
        EtcdRegistry::open(cfg, Some(dialer)).await
    }

    async fn open(
        cfg: &EtcdConfig,
        dialer: Option<Arc<dyn crate::Dialer>>,
    ) -> Result<EtcdRegistry> {
        if cfg.endpoints.is_empty() {
            return Err(RegistryError::Config("etcd_servers is empty".into()));
        }
        let mut opts = ConnectOptions::new()
            .with_keep_alive(Duration::from_secs(5), Duration::from_secs(5))
            .with_connect_timeout(cfg.request_timeout.max(Duration::from_secs(1)))
            .with_keep_alive_while_idle(true);
        if let (Some(u), Some(p)) = (&cfg.username, &cfg.password) {
            opts = opts.with_user(u.clone(), p.clone());
        }
        let tls_wanted = cfg.ca_file.is_some()
            || cfg.cert_file.is_some()
            || cfg.endpoints.iter().any(|e| e.starts_with("https://"));
        if tls_wanted {
            // tonic parses the PEM text itself, when it connects
            let read_pem = |path: &std::path::Path| {
                std::fs::read(path)
                    .map_err(|e| RegistryError::Config(format!("{}: {e}", path.display())))
            };
            let mut tls = TlsOptions::new();
            if let Some(ca) = &cfg.ca_file {
                tls = tls.ca_certificate(Certificate::from_pem(read_pem(ca)?));
            }
            match (&cfg.cert_file, &cfg.key_file) {
                (Some(c), Some(k)) => {
                    tls = tls.identity(Identity::from_pem(read_pem(c)?, read_pem(k)?));
                }
                (None, None) => {}
                _ => {
                    return Err(RegistryError::Config(
                        "etcd_certfile and etcd_keyfile must be given together".into(),
                    ));
                }
            }
            opts = opts.with_tls(tls);
        }
        // the balancer keys endpoints by URI: one entry each
        let mut endpoints: Vec<String> = Vec::with_capacity(cfg.endpoints.len());
        for e in &cfg.endpoints {
            if !endpoints.contains(e) {
                endpoints.push(e.clone());
            }
        }
        let (client, health) = match dialer {
            None => {
                let client = Client::connect(endpoints.clone(), Some(opts.clone())).await?;
                let health = if endpoints.len() > 1 {
                    health::Health::spawn(client.clone(), endpoints, opts)
                } else {
                    health::Health::none()
                };
                (client, health)
            }
            Some(dialer) => {
                let dialed = crate::dial::Dialed {
                    dialer,
                    endpoints: endpoints.len() + 1,
                };
                let client =
                    Client::connect_with_balanced_channel(endpoints, Some(opts), dialed).await?;
                (client, health::Health::none())
            }
        };
        Ok(EtcdRegistry {
            client,
            keys: Keys::new(&cfg.key_prefix),
            timeout: cfg.request_timeout,
            bodies: Arc::new(Mutex::new(HashMap::new())),
            metrics: fleet_metrics::global().clone(),
            health,
            creations: Arc::default(),
            page: crate::watch::PAGE_KEYS,
            chunks: Arc::new(chunks::Chunks::new(chunks::CHUNK_KEYS)),
            walked: Arc::default(),
        })
    }

    /// Counts this registry's requests in `metrics` instead of the process's
    /// [`fleet_metrics::global`] ones.
    pub fn with_metrics(mut self, metrics: fleet_metrics::Metrics) -> EtcdRegistry {
        self.metrics = metrics;
        self
    }

    pub fn keys(&self) -> &Keys {
        &self.keys
    }

    pub fn client(&self) -> &Client {
        &self.client
    }

    /// Changes each time the health monitor takes a member out of the balancer (`None`
    /// without a monitor): a watch open on that member may hear nothing more.
    pub(crate) fn members_out(&self) -> Option<tokio::sync::watch::Receiver<u64>> {
        self.health.members_out()
    }

    /// How long one etcd request may take (`etcd_request_timeout`).
    pub fn request_timeout(&self) -> Duration {
        self.timeout
    }

    /// One etcd request, bounded by the request timeout; a failure names `op` and `key`,
    /// and the request is counted in the registry metrics as `kind`.
    async fn timed<T, F>(&self, kind: OpKind, op: &'static str, key: &str, f: F) -> Result<T>
    where
        F: std::future::Future<Output = std::result::Result<T, etcd_client::Error>>,
    {
        self.timed_within(self.timeout, kind, op, key, f).await
    }

    /// [`Self::timed`] with its own bound `limit` instead of the request timeout.
    async fn timed_within<T, F>(
        &self,
        limit: Duration,
        kind: OpKind,
        op: &'static str,
        key: &str,
        f: F,
    ) -> Result<T>
    where
        F: std::future::Future<Output = std::result::Result<T, etcd_client::Error>>,
    {
        let started = std::time::Instant::now();
        let result = match tokio::time::timeout(limit, f).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(source)) => Err(self.failed(op, key, source)),
            Err(_) => Err(self.timed_out(op, key, limit)),
        };
        self.metrics
            .registry_op(kind.metric(), started.elapsed(), result.is_ok());
        result
    }

    /// A failed request as an error naming `op` and `key`; a member that may not serve is
    /// suspected.
    fn failed(&self, op: &'static str, key: &str, source: etcd_client::Error) -> RegistryError {
        if unavailable(&source) {
            self.health.suspect();
        }
        RegistryError::Etcd {
            op,
            key: key.to_string(),
            source,
        }
    }

    fn timed_out(&self, op: &'static str, key: &str, after: Duration) -> RegistryError {
        self.health.suspect();
        RegistryError::Timeout {
            op,
            key: key.to_string(),
            after,
        }
    }

    /// A transaction; `op` and `key` (its first key) name it in errors.
    async fn txn(
        &self,
        kind: OpKind,
        op: &'static str,
        key: &str,
        txn: Txn,
    ) -> Result<etcd_client::TxnResponse> {
        let mut kv = self.kv();
        self.timed(kind, op, key, kv.txn(txn)).await
    }

    async fn get_prefix(&self, op: &'static str, prefix: &str) -> Result<Vec<(String, Vec<u8>)>> {
        let (_, kvs) = self.list(op, &[prefix.to_string()]).await?;
        Ok(kvs)
    }

    /// Reads several prefixes at one revision.
    async fn list(
        &self,
        op: &'static str,
        prefixes: &[String],
    ) -> Result<(i64, Vec<(String, Vec<u8>)>)> {
        let ranges: Vec<KeyRange> = prefixes.iter().map(KeyRange::prefix).collect();
        self.list_ranges(op, &ranges).await
    }

    /// Reads key ranges at one revision, in pages of [`EtcdRegistry::with_page_size`] keys
    /// (each page bounded by the request timeout), so no response grows with the cluster.
    async fn list_ranges(
        &self,
        op: &'static str,
        ranges: &[KeyRange],
    ) -> Result<(i64, Vec<(String, Vec<u8>)>)> {
        let first = ranges.first().map(|r| r.start.as_str()).unwrap_or_default();
        let started = std::time::Instant::now();
        let result = list(&self.client, ranges, self.paging())
            .await
            .map_err(|e| match e {
                ListError::Etcd(source) => self.failed(op, first, source),
                ListError::Timeout => self.timed_out(op, first, self.timeout),
            });
        self.metrics
            .registry_op(OpKind::GetAll.metric(), started.elapsed(), result.is_ok());
        result
    }

    fn paging(&self) -> Paging {
        Paging {
            page: self.page,
            // pages of a size a test asked for stay that size
            bytes: if self.page == crate::watch::PAGE_KEYS {
                crate::watch::PAGE_BYTES
            } else {
                0
            },
            timeout: self.timeout,
        }
    }

    /// Lists in pages of `keys` keys instead of a first page of 1,000 and later pages of
    /// about 1 MiB (tests; tuning).
    pub fn with_page_size(mut self, keys: usize) -> EtcdRegistry {
        self.page = i64::try_from(keys.max(1)).unwrap_or(i64::MAX);
        self
    }

    /// Reads API listings ahead in chunks of `keys` keys instead of 5,000 (tests; tuning).
    pub fn with_listing_chunk(mut self, keys: usize) -> EtcdRegistry {
        self.chunks = Arc::new(chunks::Chunks::new(keys));
        self
    }

    /// How many keys etcd has counted in the ranges this registry's page reads (the API's
    /// `units_page` and `unit_states_page`) covered. etcd 3.4 walks its index over every one
    /// of them, so this is what those reads cost etcd, whatever their limit.
    pub fn page_keys_walked(&self) -> u64 {
        self.walked.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// A kv client whose decode limit is raised (see [`crate::watch::MAX_DECODED_BYTES`]).
    fn kv(&self) -> etcd_client::KvClient {
        kv_client(&self.client)
    }

    /// The unit file stored under `hash` (cached; bodies never change).
    pub async fn body(&self, hash: &UnitHash) -> Result<UnitFile> {
        if let Some(f) = self.cached_body(hash) {
            return Ok(UnitFile::clone(&f));
        }
        let key = self.keys.body(&hash.to_string());
        let mut kv = self.kv();
        let resp = self
            .timed(
                OpKind::Get,
                "reading unit body",
                &key,
                kv.get(key.as_str(), None),
            )
            .await?;
        let Some(kv) = resp.kvs().first() else {
            return Err(RegistryError::MissingBody(hash.to_string()));
        };
        let text = String::from_utf8_lossy(kv.value());
        let file = UnitFile::parse(&text).map_err(|e| RegistryError::BadValue {
            key,
            reason: e.to_string(),
        })?;
        self.cache_body(*hash, Arc::new(file.clone()));
        Ok(file)
    }

    /// Bodies of many hashes, fetched in batched transactions (copies, for the engine and
    /// the agents).
    async fn bodies(&self, hashes: &[UnitHash]) -> Result<HashMap<UnitHash, UnitFile>> {
        Ok(self
            .shared_bodies(hashes)
            .await?
            .into_iter()
            .map(|(h, f)| (h, Arc::unwrap_or_clone(f)))
            .collect())
    }

    /// Bodies of many hashes, fetched in batched transactions, shared with the cache.
    pub(crate) async fn shared_bodies(
        &self,
        hashes: &[UnitHash],
    ) -> Result<HashMap<UnitHash, Arc<UnitFile>>> {
        let mut out = HashMap::new();
        // (a set: a new leader asks for every unit's body at once, 100,000 hashes of which
        // many repeat; a list searched for each one took seconds)
        let mut asked = HashSet::with_capacity(hashes.len());
        let mut missing = Vec::new();
        for h in hashes {
            if !asked.insert(*h) {
                continue;
            }
            match self.cached_body(h) {
                Some(f) => {
                    out.insert(*h, f);
                }
                None => missing.push(*h),
            }
        }
        // batches of one transaction each, several in flight: etcd serves concurrent reads
        // together, so 50,000 bodies cost tens of round trips, not hundreds
        let mut reads = tokio::task::JoinSet::new();
        let mut chunks = missing.chunks(MAX_TXN_OPS);
        loop {
            while reads.len() < BODY_READS_IN_FLIGHT
                && let Some(chunk) = chunks.next()
            {
                let this = self.clone();
                let chunk = chunk.to_vec();
                reads.spawn(async move { this.read_body_batch(&chunk).await });
            }
            match reads.join_next().await {
                None => break,
                Some(Ok(batch)) => out.extend(batch?),
                Some(Err(_)) => {
                    return Err(RegistryError::Unreachable {
                        op: "reading unit bodies",
                        key: self.keys.dir(keys::BODIES),
                    });
                }
            }
        }
        Ok(out)
    }

    /// One transaction reading the bodies of `chunk` (at most [`MAX_TXN_OPS`]), parsed and
    /// cached; a body that does not parse is logged and left out.
    async fn read_body_batch(
        &self,
        chunk: &[UnitHash],
    ) -> Result<HashMap<UnitHash, Arc<UnitFile>>> {
        let mut out = HashMap::new();
        let Some(first) = chunk.first() else {
            return Ok(out);
        };
        let ops: Vec<TxnOp> = chunk
            .iter()
            .map(|h| TxnOp::get(self.keys.body(&h.to_string()), None))
            .collect();
        let first = self.keys.body(&first.to_string());
        let resp = self
            .txn(
                OpKind::GetAll,
                "reading unit bodies",
                &first,
                Txn::new().and_then(ops),
            )
            .await?;
        for op in resp.op_responses() {
            let TxnOpResponse::Get(get) = op else {
                continue;
            };
            for kv in get.kvs() {
                let key = String::from_utf8_lossy(kv.key()).into_owned();
                let Some(hash) = self
                    .keys
                    .strip(keys::BODIES, &key)
                    .and_then(|h| h.parse().ok())
                else {
                    continue;
                };
                match UnitFile::parse(&String::from_utf8_lossy(kv.value())) {
                    Ok(f) => {
                        let f = Arc::new(f);
                        self.cache_body(hash, f.clone());
                        out.insert(hash, f);
                    }
                    Err(e) => warn!(%key, error = %e, "unparsable unit body"),
                }
            }
        }
        Ok(out)
    }

    fn cached_body(&self, hash: &UnitHash) -> Option<Arc<UnitFile>> {
        self.bodies.lock().ok()?.get(hash).cloned()
    }

    pub(crate) fn cache_body(&self, hash: UnitHash, file: Arc<UnitFile>) {
        if let Ok(mut m) = self.bodies.lock() {
            // a hard bound whoever uses the cache (a fleetd whose API never lists
            // everything would otherwise keep every body it ever read)
            if m.len() >= MAX_CACHED_BODIES {
                m.clear();
            }
            m.insert(hash, file);
        }
    }

    /// Keeps only the bodies of `live` once the cache holds many more than that (called
    /// with every unit's hash after a full listing).
    pub(crate) fn prune_bodies(&self, live: &[UnitHash]) {
        if let Ok(mut m) = self.bodies.lock()
            && m.len() > 2 * live.len() + 1024
        {
            let live: std::collections::HashSet<&UnitHash> = live.iter().collect();
            m.retain(|h, _| live.contains(h));
        }
    }

    /// How many bodies the cache holds (for tests).
    pub fn cached_bodies(&self) -> usize {
        self.bodies.lock().map(|m| m.len()).unwrap_or(0)
    }
}

/// Whether an etcd error may come from a member that cannot serve (as opposed to a
/// refusal: no space, permission denied, a bad request).
fn unavailable(e: &etcd_client::Error) -> bool {
    match e {
        etcd_client::Error::GRpcStatus(s) => matches!(
            s.code(),
            tonic::Code::Unavailable
                | tonic::Code::DeadlineExceeded
                | tonic::Code::Unknown
                | tonic::Code::Internal
                | tonic::Code::Cancelled
        ),
        etcd_client::Error::TransportError(_) | etcd_client::Error::IoError(_) => true,
        _ => false,
    }
}

/// The most unit bodies the cache holds before it starts over (bodies are a few hundred
/// bytes to a few KiB: tens of MiB at most).
const MAX_CACHED_BODIES: usize = 131_072;

/// How many transactions of body reads are in flight at once.
const BODY_READS_IN_FLIGHT: usize = 8;

/// What kind of registry operation a request is, as fleet's registry metrics count them.
#[derive(Debug, Clone, Copy)]
enum OpKind {
    Get,
    GetAll,
    Set,
}

impl OpKind {
    fn metric(self) -> fleet_metrics::RegistryOp {
        match self {
            OpKind::Get => fleet_metrics::RegistryOp::Get,
            OpKind::GetAll => fleet_metrics::RegistryOp::GetAll,
            OpKind::Set => fleet_metrics::RegistryOp::Set,
        }
    }
}
