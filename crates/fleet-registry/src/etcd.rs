//! The registry on etcd v3, through `etcd-client`.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use etcd_client::{
    Certificate, Client, Compare, CompareOp, ConnectOptions, DeleteOptions, GetOptions, Identity,
    PutOptions, TlsOptions, Txn, TxnOp, TxnOpResponse,
};
use fleet_unit::{Requirements, TargetState, UnitFile, UnitHash, UnitName};
use tracing::warn;

use crate::keys::{self, Keys};
use crate::lease::LeaseKeeper;
use crate::model::{
    GlobalRecord, MachineRecord, MachineView, RECORD_VERSION, ScheduleRecord, StateRecord,
    UnitRecord, UnitView, current_state, decode, encode,
};
use crate::watch::{KeyRange, ListWatch, WatchEvent, list};
use crate::{Registry, RegistryError, Result};

/// etcd accepts at most 128 operations in one transaction by default.
const MAX_TXN_OPS: usize = 120;

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
            key_prefix: "/_coreos.com/fleet/".into(),
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
    bodies: Arc<Mutex<HashMap<UnitHash, UnitFile>>>,
}

/// One engine decision, written by [`EtcdRegistry::apply`].
#[derive(Debug, Clone, PartialEq)]
pub enum EngineOp {
    /// (Re)write `schedule/<machine>/<unit>` and `placement/<unit>`, clear the reason.
    Schedule {
        unit: String,
        machine: String,
        hash: UnitHash,
        desired: TargetState,
    },
    /// Remove the unit from the machine it was placed on.
    Unschedule {
        unit: String,
        machine: String,
    },
    /// Remove one machine's schedule key of a unit, leaving its placement alone (strays).
    DropSchedule {
        unit: String,
        machine: String,
    },
    SetReason {
        unit: String,
        reason: String,
    },
    ClearReason {
        unit: String,
    },
}

/// What the engine decides from: units, machines, placements and reasons at one revision.
#[derive(Debug, Clone, Default)]
pub struct EngineSnapshot {
    pub revision: i64,
    pub units: Vec<UnitRecord>,
    pub machines: Vec<MachineView>,
    /// unit name → (machine, what that machine was told)
    pub schedules: BTreeMap<String, (String, ScheduleRecord)>,
    /// (unit, machine) schedule keys beside the one in `schedules` (a unit on two machines
    /// after an interrupted write) or unreadable ones: to be removed.
    pub strays: Vec<(String, String)>,
    pub placements: BTreeMap<String, String>,
    pub reasons: BTreeMap<String, String>,
    pub leader: Option<String>,
}

/// Proof of engine leadership: the lease and the leader key's create revision, which fences
/// every write of the engine.
pub struct Leadership {
    pub lease: LeaseKeeper,
    pub create_revision: i64,
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
            let mut tls = TlsOptions::new();
            if let Some(ca) = &cfg.ca_file {
                let pem = std::fs::read(ca)
                    .map_err(|e| RegistryError::Config(format!("{}: {e}", ca.display())))?;
                tls = tls.ca_certificate(Certificate::from_pem(pem));
            }
            match (&cfg.cert_file, &cfg.key_file) {
                (Some(c), Some(k)) => {
                    let cert = std::fs::read(c)
                        .map_err(|e| RegistryError::Config(format!("{}: {e}", c.display())))?;
                    let key = std::fs::read(k)
                        .map_err(|e| RegistryError::Config(format!("{}: {e}", k.display())))?;
                    tls = tls.identity(Identity::from_pem(cert, key));
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
        let endpoints: Vec<String> = cfg.endpoints.clone();
        let client = match dialer {
            None => Client::connect(endpoints, Some(opts)).await?,
            Some(dialer) => {
                let dialed = crate::dial::Dialed {
                    dialer,
                    endpoints: endpoints.len() + 1,
                };
                Client::connect_with_balanced_channel(endpoints, Some(opts), dialed).await?
            }
        };
        Ok(EtcdRegistry {
            client,
            keys: Keys::new(&cfg.key_prefix),
            timeout: cfg.request_timeout,
            bodies: Arc::new(Mutex::new(HashMap::new())),
        })
    }

    pub fn keys(&self) -> &Keys {
        &self.keys
    }

    pub fn client(&self) -> &Client {
        &self.client
    }

    /// How long one etcd request may take (`etcd_request_timeout`).
    pub fn request_timeout(&self) -> Duration {
        self.timeout
    }

    async fn timed<T, F>(&self, f: F) -> Result<T>
    where
        F: std::future::Future<Output = std::result::Result<T, etcd_client::Error>>,
    {
        match tokio::time::timeout(self.timeout, f).await {
            Ok(r) => Ok(r?),
            Err(_) => Err(RegistryError::Timeout(self.timeout)),
        }
    }

    async fn txn(&self, txn: Txn) -> Result<etcd_client::TxnResponse> {
        let mut kv = self.client.kv_client();
        self.timed(kv.txn(txn)).await
    }

    async fn get_prefix(&self, prefix: &str) -> Result<Vec<(String, Vec<u8>)>> {
        let mut kv = self.client.kv_client();
        let resp = self
            .timed(kv.get(prefix, Some(GetOptions::new().with_prefix())))
            .await?;
        Ok(resp
            .kvs()
            .iter()
            .map(|kv| {
                (
                    String::from_utf8_lossy(kv.key()).into_owned(),
                    kv.value().to_vec(),
                )
            })
            .collect())
    }

    /// Reads several prefixes at one revision.
    async fn list(&self, prefixes: &[String]) -> Result<(i64, Vec<(String, Vec<u8>)>)> {
        let ranges: Vec<KeyRange> = prefixes.iter().map(KeyRange::prefix).collect();
        self.timed(list(&self.client, &ranges)).await
    }

    // ---- bodies ----

    /// The unit file stored under `hash` (cached; bodies never change).
    pub async fn body(&self, hash: &UnitHash) -> Result<UnitFile> {
        if let Some(f) = self.cached_body(hash) {
            return Ok(f);
        }
        let key = self.keys.body(&hash.to_string());
        let mut kv = self.client.kv_client();
        let resp = self.timed(kv.get(key.as_str(), None)).await?;
        let Some(kv) = resp.kvs().first() else {
            return Err(RegistryError::MissingBody(hash.to_string()));
        };
        let text = String::from_utf8_lossy(kv.value());
        let file = UnitFile::parse(&text).map_err(|e| RegistryError::BadValue {
            key,
            reason: e.to_string(),
        })?;
        self.cache_body(*hash, file.clone());
        Ok(file)
    }

    /// Bodies of many hashes, fetched in batched transactions.
    async fn bodies(&self, hashes: &[UnitHash]) -> Result<HashMap<UnitHash, UnitFile>> {
        let mut out = HashMap::new();
        let mut missing = Vec::new();
        for h in hashes {
            match self.cached_body(h) {
                Some(f) => {
                    out.insert(*h, f);
                }
                None if !missing.contains(h) => missing.push(*h),
                None => {}
            }
        }
        for chunk in missing.chunks(MAX_TXN_OPS) {
            let ops: Vec<TxnOp> = chunk
                .iter()
                .map(|h| TxnOp::get(self.keys.body(&h.to_string()), None))
                .collect();
            let resp = self.txn(Txn::new().and_then(ops)).await?;
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
                            self.cache_body(hash, f.clone());
                            out.insert(hash, f);
                        }
                        Err(e) => warn!(%key, error = %e, "unparsable unit body"),
                    }
                }
            }
        }
        Ok(out)
    }

    fn cached_body(&self, hash: &UnitHash) -> Option<UnitFile> {
        self.bodies.lock().ok()?.get(hash).cloned()
    }

    fn cache_body(&self, hash: UnitHash, file: UnitFile) {
        if let Ok(mut m) = self.bodies.lock() {
            m.insert(hash, file);
        }
    }

    // ---- decoding helpers ----

    fn decode_units(&self, kvs: &[(String, Vec<u8>)]) -> Vec<UnitRecord> {
        kvs.iter()
            .filter(|(k, _)| self.keys.strip(keys::UNITS, k).is_some())
            .filter_map(|(k, v)| match decode::<UnitRecord>(k, v) {
                Ok(u) => Some(u),
                Err(e) => {
                    warn!(error = %e, "skipping unit record");
                    None
                }
            })
            .collect()
    }

    fn decode_machines(&self, kvs: &[(String, Vec<u8>)]) -> Vec<MachineView> {
        let mut overrides: BTreeMap<String, BTreeMap<String, String>> = BTreeMap::new();
        for (k, v) in kvs {
            if let Some((id, key)) = self
                .keys
                .strip(keys::METADATA, k)
                .and_then(|rest| rest.split_once('/'))
            {
                overrides
                    .entry(id.to_string())
                    .or_default()
                    .insert(key.to_string(), String::from_utf8_lossy(v).into_owned());
            }
        }
        let mut out: Vec<MachineView> = kvs
            .iter()
            .filter(|(k, _)| self.keys.strip(keys::MACHINES, k).is_some())
            .filter_map(|(k, v)| match decode::<MachineRecord>(k, v) {
                Ok(m) => Some(m),
                Err(e) => {
                    warn!(error = %e, "skipping machine record");
                    None
                }
            })
            .map(|m| {
                let mut metadata = m.metadata;
                if let Some(o) = overrides.get(&m.id) {
                    metadata.extend(o.iter().map(|(k, v)| (k.clone(), v.clone())));
                }
                MachineView {
                    id: m.id,
                    public_ip: m.public_ip,
                    metadata,
                    version: m.agent_version,
                }
            })
            .collect();
        out.sort_by(|a, b| a.id.cmp(&b.id));
        out
    }

    fn decode_strings(&self, kind: &str, kvs: &[(String, Vec<u8>)]) -> BTreeMap<String, String> {
        kvs.iter()
            .filter_map(|(k, v)| {
                let name = self.keys.strip(kind, k)?;
                Some((name.to_string(), String::from_utf8_lossy(v).into_owned()))
            })
            .collect()
    }

    fn decode_states(&self, kvs: &[(String, Vec<u8>)]) -> Vec<StateRecord> {
        kvs.iter()
            .filter(|(k, _)| self.keys.strip(keys::STATES, k).is_some())
            .filter_map(|(k, v)| decode::<StateRecord>(k, v).ok())
            .collect()
    }

    async fn views(&self, only: Option<&UnitName>) -> Result<Vec<UnitView>> {
        let prefixes: Vec<String> = match only {
            Some(n) => vec![
                self.keys.unit(n.as_str()),
                self.keys.placement(n.as_str()),
                self.keys.reason(n.as_str()),
                self.keys.states_dir(n.as_str()),
            ],
            None => [keys::UNITS, keys::PLACEMENT, keys::REASONS, keys::STATES]
                .iter()
                .map(|k| self.keys.dir(k))
                .collect(),
        };
        let (_, kvs) = self.list(&prefixes).await?;
        let mut units = self.decode_units(&kvs);
        if let Some(n) = only {
            // A prefix read of units/a.service also matches units/a.service2.
            units.retain(|u| &u.name == n);
        }
        let placements = self.decode_strings(keys::PLACEMENT, &kvs);
        let reasons = self.decode_strings(keys::REASONS, &kvs);
        let mut states: HashMap<(String, String), StateRecord> = HashMap::new();
        for s in self.decode_states(&kvs) {
            states.insert((s.name.clone(), s.machine_id.clone()), s);
        }
        let hashes: Vec<UnitHash> = units.iter().map(|u| u.hash).collect();
        let bodies = self.bodies(&hashes).await?;
        let mut out = Vec::with_capacity(units.len());
        for u in units {
            let Some(file) = bodies.get(&u.hash).cloned() else {
                warn!(unit = %u.name, hash = %u.hash, "unit body missing; skipping unit");
                continue;
            };
            let name = u.name.to_string();
            let machine = placements.get(&name).cloned();
            let state = machine
                .as_ref()
                .and_then(|m| states.get(&(name.clone(), m.clone())));
            out.push(UnitView {
                current: current_state(machine.as_deref(), state),
                name: u.name,
                file,
                hash: u.hash,
                desired: u.desired_state,
                global: u.global,
                machine_id: machine,
                reason: reasons.get(&name).cloned(),
            });
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    // ---- engine ----

    /// Tries to become the engine leader. `Ok(None)` when someone else leads.
    pub async fn campaign(&self, machine_id: &str, ttl: Duration) -> Result<Option<Leadership>> {
        let key = self.keys.leader();
        let lease = self.timed(LeaseKeeper::grant(&self.client, ttl)).await?;
        let txn = Txn::new()
            .when([Compare::create_revision(key.as_str(), CompareOp::Equal, 0)])
            .and_then([TxnOp::put(
                key.as_str(),
                machine_id,
                Some(PutOptions::new().with_lease(lease.id())),
            )]);
        let resp = self.txn(txn).await?;
        if !resp.succeeded() {
            lease.revoke(&self.client).await;
            return Ok(None);
        }
        let create_revision = resp.header().map(|h| h.revision()).unwrap_or(0);
        Ok(Some(Leadership {
            lease,
            create_revision,
        }))
    }

    /// The current leader's machine ID, if any.
    pub async fn leader(&self) -> Result<Option<String>> {
        let mut kv = self.client.kv_client();
        let resp = self.timed(kv.get(self.keys.leader(), None)).await?;
        Ok(resp
            .kvs()
            .first()
            .map(|kv| String::from_utf8_lossy(kv.value()).into_owned()))
    }

    /// Gives up leadership at once (on shutdown), so another engine takes over quickly.
    pub async fn resign(&self, leadership: Leadership) {
        leadership.lease.revoke(&self.client).await;
    }

    /// The key ranges the engine mirrors (list-watch) and decides from. The engine's own
    /// writes (`placement/`, `reasons/`, `schedule/`, adjacent in key order) are one range, so
    /// one write's events arrive together and the mirror never holds half of a decision.
    pub fn engine_ranges(&self) -> Vec<KeyRange> {
        let mut r: Vec<KeyRange> = [keys::UNITS, keys::MACHINES, keys::METADATA]
            .iter()
            .map(|k| KeyRange::prefix(self.keys.dir(k)))
            .collect();
        r.push(KeyRange::between(
            self.keys.dir(keys::PLACEMENT),
            // just past every key under schedule/ ('0' follows '/')
            format!("{}schedule0", self.keys.prefix()),
        ));
        r.push(KeyRange::prefix(self.keys.leader()));
        r
    }

    /// Decodes a mirror of [`Self::engine_ranges`] into what the engine decides from.
    /// Malformed records are logged and skipped.
    pub fn decode_engine_snapshot<'a>(
        &self,
        revision: i64,
        kvs: impl Iterator<Item = (&'a String, &'a Vec<u8>)> + Clone,
    ) -> EngineSnapshot {
        let owned: Vec<(String, Vec<u8>)> = kvs.map(|(k, v)| (k.clone(), v.clone())).collect();
        let placements = self.decode_strings(keys::PLACEMENT, &owned);
        let mut schedules: BTreeMap<String, (String, ScheduleRecord)> = BTreeMap::new();
        let mut strays = Vec::new();
        for (k, v) in &owned {
            let Some(rest) = self.keys.strip(keys::SCHEDULE, k) else {
                continue;
            };
            let Some((machine, unit)) = rest.split_once('/') else {
                continue;
            };
            let rec = match decode::<ScheduleRecord>(k, v) {
                Ok(r) => r,
                Err(e) => {
                    // unreadable: the engine removes it like any other stray
                    warn!(error = %e, "schedule record not understood");
                    strays.push((unit.to_string(), machine.to_string()));
                    continue;
                }
            };
            // A unit scheduled on two machines (an interrupted write): the placement says
            // which one is meant; the other is a stray to remove.
            let keep_new = match schedules.get(unit) {
                None => true,
                Some((m, _)) => {
                    placements.get(unit) == Some(&machine.to_string())
                        && placements.get(unit) != Some(m)
                }
            };
            if keep_new {
                if let Some((old, _)) =
                    schedules.insert(unit.to_string(), (machine.to_string(), rec))
                {
                    strays.push((unit.to_string(), old));
                }
            } else {
                strays.push((unit.to_string(), machine.to_string()));
            }
        }
        let leader_key = self.keys.leader();
        EngineSnapshot {
            revision,
            units: self.decode_units(&owned),
            machines: self.decode_machines(&owned),
            schedules,
            strays,
            placements,
            reasons: self.decode_strings(keys::REASONS, &owned),
            leader: owned
                .iter()
                .find(|(k, _)| *k == leader_key)
                .map(|(_, v)| String::from_utf8_lossy(v).into_owned()),
        }
    }

    /// Everything the engine decides from, read at one revision.
    pub async fn engine_snapshot(&self) -> Result<EngineSnapshot> {
        let (revision, kvs) = self
            .timed(list(&self.client, &self.engine_ranges()))
            .await?;
        Ok(self.decode_engine_snapshot(revision, kvs.iter().map(|(k, v)| (k, v))))
    }

    /// Mirrors the engine's prefixes (see [`ListWatch`]).
    pub fn watch_engine(&self, poll: Option<Duration>) -> tokio::sync::mpsc::Receiver<WatchEvent> {
        ListWatch::spawn(
            self.client.clone(),
            self.engine_ranges(),
            poll,
            self.timeout.saturating_mul(5),
        )
    }

    /// The bodies of the given units (for their requirements).
    pub async fn unit_bodies(&self, hashes: &[UnitHash]) -> Result<HashMap<UnitHash, UnitFile>> {
        self.bodies(hashes).await
    }

    /// Writes decisions, each transaction fenced on the leader key: a deposed leader's writes
    /// fail as a whole ([`RegistryError::NotLeader`]). Returns the revision of the last write
    /// (0 when there was nothing to write).
    pub async fn apply(&self, leadership: &Leadership, ops: &[EngineOp]) -> Result<i64> {
        // one group of etcd operations per decision; a transaction never splits a group
        // a unit that moves is unscheduled and scheduled in one batch: its placement key is
        // then only overwritten (etcd refuses a put and a delete of one key in one txn)
        let moving: std::collections::HashSet<&str> = ops
            .iter()
            .filter_map(|op| match op {
                EngineOp::Schedule { unit, .. } => Some(unit.as_str()),
                _ => None,
            })
            .collect();
        // likewise a unit that gets a reason in this batch keeps its reason key out of its
        // schedule write, and a stray overwritten by a schedule write is not also deleted
        let reasoned: std::collections::HashSet<&str> = ops
            .iter()
            .filter_map(|op| match op {
                EngineOp::SetReason { unit, .. } => Some(unit.as_str()),
                _ => None,
            })
            .collect();
        let scheduled_to: std::collections::HashSet<(&str, &str)> = ops
            .iter()
            .filter_map(|op| match op {
                EngineOp::Schedule { unit, machine, .. } => Some((unit.as_str(), machine.as_str())),
                _ => None,
            })
            .collect();
        let groups: Vec<Vec<TxnOp>> = ops
            .iter()
            .map(|op| match op {
                EngineOp::Unschedule { unit, machine } if moving.contains(unit.as_str()) => {
                    vec![TxnOp::delete(self.keys.schedule(machine, unit), None)]
                }
                EngineOp::DropSchedule { unit, machine }
                    if scheduled_to.contains(&(unit.as_str(), machine.as_str())) =>
                {
                    vec![]
                }
                EngineOp::Schedule { unit, .. } if reasoned.contains(unit.as_str()) => {
                    let mut g = self.engine_txn_ops(op);
                    g.truncate(2); // schedule + placement, without the reason delete
                    g
                }
                _ => self.engine_txn_ops(op),
            })
            .filter(|g| !g.is_empty())
            .collect();
        let mut revision = 0;
        let leader = self.keys.leader();
        let mut chunk: Vec<TxnOp> = Vec::new();
        let mut iter = groups.into_iter().peekable();
        while let Some(group) = iter.next() {
            chunk.extend(group);
            let next_fits = iter
                .peek()
                .is_some_and(|g| chunk.len() + g.len() <= MAX_TXN_OPS);
            if next_fits {
                continue;
            }
            let txn = Txn::new()
                .when([Compare::create_revision(
                    leader.as_str(),
                    CompareOp::Equal,
                    leadership.create_revision,
                )])
                .and_then(std::mem::take(&mut chunk));
            let resp = self.txn(txn).await?;
            if !resp.succeeded() {
                return Err(RegistryError::NotLeader);
            }
            revision = resp.header().map(|h| h.revision()).unwrap_or(revision);
        }
        Ok(revision)
    }

    fn engine_txn_ops(&self, op: &EngineOp) -> Vec<TxnOp> {
        match op {
            EngineOp::Schedule {
                unit,
                machine,
                hash,
                desired,
            } => {
                let rec = ScheduleRecord {
                    version: RECORD_VERSION,
                    hash: *hash,
                    desired_state: *desired,
                };
                vec![
                    TxnOp::put(self.keys.schedule(machine, unit), encode(&rec), None),
                    TxnOp::put(self.keys.placement(unit), machine.as_str(), None),
                    TxnOp::delete(self.keys.reason(unit), None),
                ]
            }
            EngineOp::Unschedule { unit, machine } => vec![
                TxnOp::delete(self.keys.schedule(machine, unit), None),
                TxnOp::delete(self.keys.placement(unit), None),
            ],
            EngineOp::SetReason { unit, reason } => {
                vec![TxnOp::put(self.keys.reason(unit), reason.as_str(), None)]
            }
            EngineOp::ClearReason { unit } => vec![TxnOp::delete(self.keys.reason(unit), None)],
            EngineOp::DropSchedule { unit, machine } => {
                vec![TxnOp::delete(self.keys.schedule(machine, unit), None)]
            }
        }
    }

    // ---- agent ----

    /// Registers a machine under a new lease. A record of the same ID with another token is
    /// another fleetd: waits up to one ttl for it to vanish (a crashed predecessor's lease
    /// expiring), then fails with [`RegistryError::DuplicateMachine`].
    pub async fn register_machine(
        &self,
        rec: &MachineRecord,
        ttl: Duration,
    ) -> Result<LeaseKeeper> {
        let key = self.keys.machine(&rec.id);
        let now = tokio::time::Instant::now();
        let wait = ttl.saturating_add(Duration::from_secs(2));
        // a ttl too large for a deadline (fleet-config bounds it to a day) waits a day
        let deadline = now
            .checked_add(wait)
            .unwrap_or(now + Duration::from_secs(86_400));
        loop {
            let lease = self.timed(LeaseKeeper::grant(&self.client, ttl)).await?;
            let put = TxnOp::put(
                key.as_str(),
                encode(rec),
                Some(PutOptions::new().with_lease(lease.id())),
            );
            let txn = Txn::new()
                .when([Compare::create_revision(key.as_str(), CompareOp::Equal, 0)])
                .and_then([put.clone()])
                .or_else([TxnOp::get(key.as_str(), None)]);
            let resp = self.txn(txn).await?;
            if resp.succeeded() {
                return Ok(lease);
            }
            let existing = resp.op_responses().into_iter().find_map(|op| match op {
                TxnOpResponse::Get(g) => g
                    .kvs()
                    .first()
                    .map(|kv| (kv.value().to_vec(), kv.mod_revision())),
                _ => None,
            });
            if let Some((value, mod_rev)) = existing {
                let other: Option<MachineRecord> = decode(&key, &value).ok();
                let same_fleetd = other
                    .as_ref()
                    .is_some_and(|o| !o.token.is_empty() && o.token == rec.token);
                if same_fleetd {
                    // our own stale registration (fleetd restarted): take it over
                    let txn = Txn::new()
                        .when([Compare::mod_revision(
                            key.as_str(),
                            CompareOp::Equal,
                            mod_rev,
                        )])
                        .and_then([put]);
                    if self.txn(txn).await?.succeeded() {
                        return Ok(lease);
                    }
                } else if tokio::time::Instant::now() >= deadline {
                    lease.revoke(&self.client).await;
                    return Err(RegistryError::DuplicateMachine {
                        id: rec.id.clone(),
                        ip: other.map(|o| o.public_ip).unwrap_or_default(),
                    });
                }
            }
            lease.revoke(&self.client).await;
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }

    /// Rewrites the machine record under the existing lease (e.g. after SIGHUP).
    pub async fn update_machine(&self, rec: &MachineRecord, lease: &LeaseKeeper) -> Result<()> {
        let mut kv = self.client.kv_client();
        let key = self.keys.machine(&rec.id);
        self.timed(kv.put(
            key,
            encode(rec),
            Some(PutOptions::new().with_lease(lease.id())),
        ))
        .await?;
        Ok(())
    }

    /// Withdraws a machine's presence at once.
    pub async fn withdraw_machine(&self, id: &str, lease: LeaseKeeper) {
        lease.revoke(&self.client).await;
        let mut kv = self.client.kv_client();
        let _ = self.timed(kv.delete(self.keys.machine(id), None)).await;
    }

    /// Watches the agent's own schedule, the global units and its API-set metadata (never
    /// the whole unit tree).
    pub fn watch_agent(
        &self,
        machine_id: &str,
        poll: Option<Duration>,
    ) -> tokio::sync::mpsc::Receiver<WatchEvent> {
        let prefixes = vec![
            self.keys.schedule_dir(machine_id),
            self.keys.dir(keys::GLOBAL),
            self.keys.metadata_dir(machine_id),
        ];
        let ranges = prefixes.into_iter().map(KeyRange::prefix).collect();
        ListWatch::spawn(
            self.client.clone(),
            ranges,
            poll,
            self.timeout.saturating_mul(5),
        )
    }

    /// The API-set metadata of one machine (persistent; merged over the configured one).
    pub async fn machine_metadata(&self, id: &str) -> Result<BTreeMap<String, String>> {
        let dir = self.keys.metadata_dir(id);
        Ok(self
            .get_prefix(&dir)
            .await?
            .into_iter()
            .filter_map(|(k, v)| {
                Some((
                    k.strip_prefix(&dir)?.to_string(),
                    String::from_utf8_lossy(&v).into_owned(),
                ))
            })
            .collect())
    }

    /// Publishes (Some) or withdraws (None) one unit state of this machine.
    pub async fn publish_state(
        &self,
        name: &str,
        machine_id: &str,
        state: Option<&StateRecord>,
        lease: &LeaseKeeper,
    ) -> Result<()> {
        let key = self.keys.state(name, machine_id);
        let mut kv = self.client.kv_client();
        match state {
            Some(s) => {
                self.timed(kv.put(
                    key,
                    encode(s),
                    Some(PutOptions::new().with_lease(lease.id())),
                ))
                .await?;
            }
            None => {
                self.timed(kv.delete(key, None)).await?;
            }
        }
        Ok(())
    }

    /// Resolves on the next change under any of the unit's keys, or after `max`.
    async fn watch_unit_change(&self, name: &str, max: Duration) {
        let prefixes = vec![
            self.keys.unit(name),
            self.keys.placement(name),
            self.keys.reason(name),
            self.keys.states_dir(name),
            self.keys.dir(keys::MACHINES),
        ];
        let ranges = prefixes.into_iter().map(KeyRange::prefix).collect();
        let mut rx = ListWatch::spawn(
            self.client.clone(),
            ranges,
            None,
            self.timeout.saturating_mul(5),
        );
        let _ = tokio::time::timeout(max, async {
            // the first message is the snapshot; wait for the one after it
            let _ = rx.recv().await;
            let _ = rx.recv().await;
        })
        .await;
    }
}

#[async_trait]
impl Registry for EtcdRegistry {
    async fn create_unit(
        &self,
        name: &UnitName,
        file: &UnitFile,
        desired: TargetState,
    ) -> Result<()> {
        let global = Requirements::from_unit(name, file)
            .map(|(r, _)| r.global)
            .unwrap_or(false);
        let hash = file.hash();
        let rec = UnitRecord {
            version: RECORD_VERSION,
            name: name.clone(),
            hash,
            desired_state: desired,
            global,
        };
        let unit_key = self.keys.unit(name.as_str());
        let body_key = self.keys.body(&hash.to_string());
        let mut ops = vec![TxnOp::put(unit_key.as_str(), encode(&rec), None)];
        if global {
            let g = GlobalRecord {
                version: RECORD_VERSION,
                hash,
                desired_state: desired,
            };
            ops.push(TxnOp::put(
                self.keys.global(name.as_str()),
                encode(&g),
                None,
            ));
        }
        // the body first (create-only: identical bodies share one key)
        let body_txn = Txn::new()
            .when([Compare::create_revision(
                body_key.as_str(),
                CompareOp::Equal,
                0,
            )])
            .and_then([TxnOp::put(body_key.as_str(), file.serialize(), None)]);
        self.txn(body_txn).await?;
        let txn = Txn::new()
            .when([Compare::create_revision(
                unit_key.as_str(),
                CompareOp::Equal,
                0,
            )])
            .and_then(ops);
        if !self.txn(txn).await?.succeeded() {
            return Err(RegistryError::AlreadyExists(name.to_string()));
        }
        self.cache_body(hash, file.clone());
        Ok(())
    }

    async fn set_desired_state(&self, name: &UnitName, desired: TargetState) -> Result<()> {
        let key = self.keys.unit(name.as_str());
        loop {
            let mut kv = self.client.kv_client();
            let resp = self.timed(kv.get(key.as_str(), None)).await?;
            let Some(cur) = resp.kvs().first() else {
                return Err(RegistryError::NotFound(name.to_string()));
            };
            let mut rec: UnitRecord = decode(&key, cur.value())?;
            let rev = cur.mod_revision();
            if rec.desired_state == desired {
                return Ok(());
            }
            rec.desired_state = desired;
            let mut ops = vec![TxnOp::put(key.as_str(), encode(&rec), None)];
            if rec.global {
                let g = GlobalRecord {
                    version: RECORD_VERSION,
                    hash: rec.hash,
                    desired_state: desired,
                };
                ops.push(TxnOp::put(
                    self.keys.global(name.as_str()),
                    encode(&g),
                    None,
                ));
            }
            let txn = Txn::new()
                .when([Compare::mod_revision(key.as_str(), CompareOp::Equal, rev)])
                .and_then(ops);
            if self.txn(txn).await?.succeeded() {
                return Ok(());
            }
        }
    }

    async fn destroy_unit(&self, name: &UnitName) -> Result<bool> {
        let txn = Txn::new().and_then([
            TxnOp::delete(self.keys.unit(name.as_str()), Some(DeleteOptions::new())),
            TxnOp::delete(self.keys.global(name.as_str()), None),
        ]);
        let resp = self.txn(txn).await?;
        let deleted = resp.op_responses().into_iter().any(|op| match op {
            TxnOpResponse::Delete(d) => d.deleted() > 0,
            _ => false,
        });
        Ok(deleted)
    }

    async fn wait_for_change(&self, unit: &UnitName, max: Duration) {
        self.watch_unit_change(unit.as_str(), max).await
    }

    async fn events(
        &self,
        query: &crate::EventQuery,
    ) -> Result<tokio::sync::mpsc::Receiver<crate::EventItem>> {
        self.follow_events(query).await
    }

    async fn unit(&self, name: &UnitName) -> Result<Option<UnitView>> {
        Ok(self.views(Some(name)).await?.into_iter().next())
    }

    async fn units(&self) -> Result<Vec<UnitView>> {
        self.views(None).await
    }

    async fn machines(&self) -> Result<Vec<MachineView>> {
        let prefixes = vec![self.keys.dir(keys::MACHINES), self.keys.dir(keys::METADATA)];
        let (_, kvs) = self.list(&prefixes).await?;
        Ok(self.decode_machines(&kvs))
    }

    async fn unit_states(&self) -> Result<Vec<StateRecord>> {
        let kvs = self.get_prefix(&self.keys.dir(keys::STATES)).await?;
        let mut states = self.decode_states(&kvs);
        states.sort_by(|a, b| (&a.name, &a.machine_id).cmp(&(&b.name, &b.machine_id)));
        Ok(states)
    }

    async fn set_machine_metadata(
        &self,
        machine: &str,
        key: &str,
        value: Option<&str>,
    ) -> Result<()> {
        let k = self.keys.metadata(machine, key);
        let mut kv = self.client.kv_client();
        match value {
            Some(v) => {
                self.timed(kv.put(k, v, None)).await?;
            }
            None => {
                self.timed(kv.delete(k, None)).await?;
            }
        }
        Ok(())
    }
}
