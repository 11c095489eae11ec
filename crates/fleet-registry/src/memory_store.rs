//! An in-memory store with etcd's semantics as the agent and the engine see them: keys in
//! fleet's layout with revisions, leases that expire, list-watches that deliver, fenced
//! engine writes. For the agent's and the engine's loop tests; never what fleetd runs.
//!
//! Everything is deterministic under `tokio::time::pause`: a lease expires `ttl` after the
//! store became unreachable (nobody can refresh it then) or at once by
//! [`MemoryStore::expire_lease`]; watch events are sent as the write happens.
//!
//! Leases behave as etcd's do for their holder: a write under a revoked or expired lease is
//! refused with etcd's own error, and a holder learns that its lease is lost only from an
//! answer, that is once the store is reachable again (while cut off, a lease is unknown).

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use async_trait::async_trait;
use fleet_unit::{TargetState, UnitFile, UnitHash, UnitName};
use tokio::sync::{mpsc, watch};

use crate::keys::{self, Keys};
use crate::lease::Lease;
use crate::model::{MachineRecord, MachineView, StateRecord, UnitRecord, UnitView, decode, encode};
use crate::roles::{AgentStore, EngineOp, EngineStore, Leadership, Write, engine_writes};
use crate::watch::KeyRange;
use crate::{RegistryError, Result, WatchEvent, decode as records};

/// How many events a watcher may have unread before it is dropped (its receiver then ends,
/// as a broken etcd watch does, and the consumer watches again).
const WATCH_BUFFER: usize = 4096;
/// etcd's default limit on the operations of one transaction (`--max-txn-ops`).
const MAX_TXN_OPS: usize = 128;

/// The store. Cheap to clone: clones share the data.
#[derive(Clone)]
pub struct MemoryStore {
    keys: Keys,
    inner: Arc<Mutex<Kv>>,
}

struct Entry {
    value: Vec<u8>,
    create_revision: i64,
    mod_revision: i64,
    lease: Option<i64>,
}

struct LeaseEntry {
    ttl: Duration,
    lost: watch::Sender<bool>,
    /// Refreshed every ttl/3 while the store is reachable, as `LeaseKeeper` does on etcd.
    renewed: watch::Sender<tokio::time::Instant>,
}

struct Watcher {
    ranges: Vec<KeyRange>,
    tx: mpsc::Sender<WatchEvent>,
    /// Told of a disconnection, owed a snapshot when the store is reachable again.
    disconnected: bool,
}

#[derive(Default)]
struct Kv {
    revision: i64,
    data: BTreeMap<String, Entry>,
    leases: HashMap<i64, LeaseEntry>,
    next_lease: i64,
    watchers: Vec<Watcher>,
    unreachable: bool,
    /// Holders of leases that expired while the store was cut off: told once it is back.
    lost_unheard: Vec<watch::Sender<bool>>,
    /// Keys etcd refuses every request about (see [`MemoryStore::refuse_key`]).
    refused: std::collections::BTreeSet<String>,
    /// Bumped at every change of reachability, so a pending expiry knows it is stale.
    epoch: u64,
    /// What the engine asked, for tests that count it: transactions of decisions committed,
    /// the ranges of every watch opened, body reads and the hashes they asked for, and
    /// campaigns.
    engine_txns: u64,
    watches_opened: Vec<Vec<KeyRange>>,
    body_reads: u64,
    bodies_asked: u64,
    campaigns: u64,
}

impl Default for MemoryStore {
    fn default() -> Self {
        MemoryStore::new(crate::DEFAULT_KEY_PREFIX)
    }
}

impl MemoryStore {
    /// An empty store whose keys start with `prefix`.
    pub fn new(prefix: &str) -> MemoryStore {
        MemoryStore {
            keys: Keys::new(prefix),
            inner: Arc::new(Mutex::new(Kv::default())),
        }
    }

    pub fn keys(&self) -> &Keys {
        &self.keys
    }

    fn lock(&self) -> MutexGuard<'_, Kv> {
        // a panicking test thread must not make every later call panic too
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Locks the store for a request; fails as etcd out of reach would.
    fn request(&self, op: &'static str, key: &str) -> Result<MutexGuard<'_, Kv>> {
        let kv = self.lock();
        if kv.unreachable {
            return Err(RegistryError::Unreachable {
                op,
                key: key.to_string(),
            });
        }
        if kv.refused.contains(key) {
            return Err(refused(op, key));
        }
        Ok(kv)
    }

    /// How many transactions of engine decisions were committed.
    pub fn engine_txns(&self) -> u64 {
        self.lock().engine_txns
    }

    /// The ranges of every watch opened so far, oldest first.
    pub fn watches_opened(&self) -> Vec<Vec<KeyRange>> {
        self.lock().watches_opened.clone()
    }

    /// How many reads of unit bodies were asked for.
    pub fn body_reads(&self) -> u64 {
        self.lock().body_reads
    }

    /// How many hashes the reads of unit bodies asked for, over all reads (a hash asked
    /// twice counts twice).
    pub fn bodies_asked(&self) -> u64 {
        self.lock().bodies_asked
    }

    /// How many campaigns engines made (won or lost).
    pub fn campaigns(&self) -> u64 {
        self.lock().campaigns
    }

    /// From now on (`true`) every request that reads or writes `key` fails as etcd refuses one
    /// (permission denied), until `false`; a transaction touching it fails whole, as in etcd.
    /// For a persistent error on one key among many (a permission, an oversized value).
    pub fn refuse_key(&self, key: &str, refuse: bool) {
        let mut kv = self.lock();
        if refuse {
            kv.refused.insert(key.to_string());
        } else {
            kv.refused.remove(key);
        }
    }

    /// Cuts every client off (`false`) or lets them back (`true`). While cut off, requests
    /// fail, watchers get [`WatchEvent::Disconnected`], and every lease expires after its
    /// ttl; once back, watchers get a fresh snapshot.
    pub fn set_reachable(&self, reachable: bool) {
        let mut kv = self.lock();
        if kv.unreachable != reachable {
            return;
        }
        kv.unreachable = !reachable;
        kv.epoch += 1;
        let epoch = kv.epoch;
        if reachable {
            for lost in std::mem::take(&mut kv.lost_unheard) {
                let _ = lost.send(true);
            }
            let (revision, data) = (kv.revision, snapshot_of(&kv.data));
            kv.watchers.retain_mut(|w| {
                w.disconnected = false;
                w.tx.try_send(WatchEvent::Snapshot {
                    revision,
                    kvs: in_ranges(&data, &w.ranges),
                })
                .is_ok()
            });
            return;
        }
        kv.watchers.retain_mut(|w| {
            w.disconnected = true;
            w.tx.try_send(WatchEvent::Disconnected).is_ok()
        });
        for (&id, lease) in &kv.leases {
            self.expire_unless_reached(id, lease.ttl, epoch);
        }
    }

    /// Expires lease `id` after `ttl` unless the store was reachable again in between (the
    /// cut of `epoch` over: its holder could refresh it again).
    fn expire_unless_reached(&self, id: i64, ttl: Duration, epoch: u64) {
        let store = self.clone();
        tokio::spawn(async move {
            tokio::time::sleep(ttl).await;
            let still_cut_off = {
                let kv = store.lock();
                kv.unreachable && kv.epoch == epoch
            };
            if still_cut_off {
                store.expire_lease(id);
            }
        });
    }

    /// The lease expires now: its keys are deleted, and its holder learns it is lost (once
    /// the store is reachable, if it is cut off now).
    pub fn expire_lease(&self, id: i64) {
        let mut kv = self.lock();
        kv.revoke(id);
    }

    /// Writes one key as etcdctl would (no lease), e.g. a record this code cannot read.
    pub fn put(&self, key: &str, value: impl Into<Vec<u8>>) {
        self.lock()
            .commit(vec![Write::Put(key.to_string(), value.into())], None);
    }

    /// Deletes one key as etcdctl would.
    pub fn delete(&self, key: &str) {
        self.lock()
            .commit(vec![Write::Delete(key.to_string())], None);
    }

    /// The value under `key`.
    pub fn get(&self, key: &str) -> Option<Vec<u8>> {
        self.lock().data.get(key).map(|e| e.value.clone())
    }

    /// Every key under `prefix`, with its value, in key order.
    pub fn list(&self, prefix: &str) -> Vec<(String, Vec<u8>)> {
        in_ranges(&snapshot_of(&self.lock().data), &[KeyRange::prefix(prefix)])
    }

    /// The revision of the last write.
    pub fn revision(&self) -> i64 {
        self.lock().revision
    }

    /// The lease a key is held under, if any.
    pub fn lease_of(&self, key: &str) -> Option<i64> {
        self.lock().data.get(key).and_then(|e| e.lease)
    }

    fn grant(&self, kv: &mut Kv, ttl: Duration) -> Lease {
        kv.next_lease += 1;
        let id = kv.next_lease;
        let (lost, rx) = watch::channel(false);
        let (renewed, renewals) = watch::channel(tokio::time::Instant::now());
        kv.leases.insert(id, LeaseEntry { ttl, lost, renewed });
        let lease = Lease::new(id, rx, renewals);
        // the holder's keep-alive: a refresh every ttl/3 that succeeds while the store is
        // reachable; ends with the lease
        let store = self.clone();
        tokio::spawn(async move {
            let period = (ttl / 3).max(Duration::from_millis(1));
            loop {
                let sent = tokio::time::Instant::now();
                {
                    let kv = store.lock();
                    let Some(lease) = kv.leases.get(&id) else {
                        return;
                    };
                    if !kv.unreachable {
                        let _ = lease.renewed.send(sent);
                    }
                }
                tokio::time::sleep(period).await;
            }
        });
        if kv.unreachable {
            // granted just before the cut: it cannot be refreshed either
            self.expire_unless_reached(id, ttl, kv.epoch);
        }
        lease
    }

    fn watch(&self, ranges: Vec<KeyRange>) -> mpsc::Receiver<WatchEvent> {
        let (tx, rx) = mpsc::channel(WATCH_BUFFER);
        let mut kv = self.lock();
        kv.watches_opened.push(ranges.clone());
        let first = if kv.unreachable {
            WatchEvent::Disconnected
        } else {
            WatchEvent::Snapshot {
                revision: kv.revision,
                kvs: in_ranges(&snapshot_of(&kv.data), &ranges),
            }
        };
        if tx.try_send(first).is_ok() {
            let disconnected = kv.unreachable;
            kv.watchers.push(Watcher {
                ranges,
                tx,
                disconnected,
            });
        }
        rx
    }

    /// Several bodies in one request, as etcd reads them (one transaction): one refused key
    /// fails it whole; missing or unreadable bodies are left out.
    fn bodies_together(&self, hashes: &[UnitHash]) -> Result<HashMap<UnitHash, UnitFile>> {
        let mut kv = self.request("reading unit bodies", &self.keys.dir(keys::BODIES))?;
        kv.body_reads += 1;
        kv.bodies_asked += hashes.len() as u64;
        if let Some(key) = hashes
            .iter()
            .map(|h| self.keys.body(&h.to_string()))
            .find(|k| kv.refused.contains(k))
        {
            return Err(refused("reading unit bodies", &key));
        }
        Ok(hashes
            .iter()
            .filter_map(|h| Some((*h, self.body_of(&kv, h).ok()?)))
            .collect())
    }

    fn body_of(&self, kv: &Kv, hash: &UnitHash) -> Result<UnitFile> {
        let key = self.keys.body(&hash.to_string());
        let Some(e) = kv.data.get(&key) else {
            return Err(RegistryError::MissingBody(hash.to_string()));
        };
        UnitFile::parse(&String::from_utf8_lossy(&e.value)).map_err(|e| RegistryError::BadValue {
            key,
            reason: e.to_string(),
        })
    }
}

/// What etcd answers a write under a lease it does not have (revoked or expired).
fn lease_not_found(op: &'static str, key: String) -> RegistryError {
    RegistryError::Etcd {
        op,
        key,
        source: etcd_client::Error::GRpcStatus(tonic::Status::not_found(
            "etcdserver: requested lease not found",
        )),
    }
}

fn snapshot_of(data: &BTreeMap<String, Entry>) -> Vec<(String, Vec<u8>)> {
    data.iter()
        .map(|(k, e)| (k.clone(), e.value.clone()))
        .collect()
}

fn in_ranges(data: &[(String, Vec<u8>)], ranges: &[KeyRange]) -> Vec<(String, Vec<u8>)> {
    data.iter()
        .filter(|(k, _)| ranges.iter().any(|r| r.contains(k)))
        .cloned()
        .collect()
}

impl Kv {
    /// Applies writes as one transaction (one revision) and tells the watchers.
    fn commit(&mut self, writes: Vec<Write>, lease: Option<i64>) -> i64 {
        if writes.is_empty() {
            return self.revision;
        }
        self.revision += 1;
        let revision = self.revision;
        let mut events = Vec::with_capacity(writes.len());
        for w in writes {
            match w {
                Write::Put(key, value) => {
                    let create_revision =
                        self.data.get(&key).map_or(revision, |e| e.create_revision);
                    self.data.insert(
                        key.clone(),
                        Entry {
                            value: value.clone(),
                            create_revision,
                            mod_revision: revision,
                            lease,
                        },
                    );
                    events.push(WatchEvent::Put {
                        key,
                        value,
                        revision,
                    });
                }
                Write::Delete(key) => {
                    if self.data.remove(&key).is_some() {
                        events.push(WatchEvent::Delete { key, revision });
                    }
                }
            }
        }
        if events.is_empty() {
            // as etcd: a transaction that changed nothing (it deleted only keys already
            // gone) makes no revision
            self.revision -= 1;
            return self.revision;
        }
        self.watchers.retain(|w| {
            if w.disconnected {
                return true;
            }
            let mut sent = 0;
            // (as etcd's: a write's events, then that they are all there)
            events
                .iter()
                .filter(|ev| match ev {
                    WatchEvent::Put { key, .. } | WatchEvent::Delete { key, .. } => {
                        w.ranges.iter().any(|r| r.contains(key))
                    }
                    _ => false,
                })
                .all(|ev| {
                    sent += 1;
                    w.tx.try_send(ev.clone()).is_ok()
                })
                && (sent == 0 || w.tx.try_send(WatchEvent::Through { revision }).is_ok())
        });
        revision
    }

    fn revoke(&mut self, id: i64) {
        let Some(lease) = self.leases.remove(&id) else {
            return;
        };
        if self.unreachable {
            self.lost_unheard.push(lease.lost);
        } else {
            let _ = lease.lost.send(true);
        }
        let held: Vec<Write> = self
            .data
            .iter()
            .filter(|(_, e)| e.lease == Some(id))
            .map(|(k, _)| Write::Delete(k.clone()))
            .collect();
        self.commit(held, None);
    }

    fn mod_revision(&self, key: &str) -> i64 {
        self.data.get(key).map_or(0, |e| e.mod_revision)
    }
}

#[async_trait]
impl AgentStore for MemoryStore {
    fn keys(&self) -> &Keys {
        &self.keys
    }

    async fn register_machine(&self, rec: &MachineRecord, ttl: Duration) -> Result<Lease> {
        let key = self.keys.machine(&rec.id);
        let deadline = tokio::time::Instant::now() + ttl.saturating_add(Duration::from_secs(2));
        loop {
            {
                let mut kv = self.request("registering machine", &key)?;
                let taken = kv
                    .data
                    .get(&key)
                    .map(|e| decode::<MachineRecord>(&key, &e.value).ok());
                let ours = |o: &Option<MachineRecord>| {
                    o.as_ref()
                        .is_some_and(|o| !o.token.is_empty() && o.token == rec.token)
                };
                match taken {
                    Some(other) if !ours(&other) => {
                        if tokio::time::Instant::now() >= deadline {
                            return Err(RegistryError::DuplicateMachine {
                                id: rec.id.clone(),
                                ip: other.map(|o| o.public_ip).unwrap_or_default(),
                            });
                        }
                    }
                    _ => {
                        let lease = self.grant(&mut kv, ttl);
                        kv.commit(vec![Write::Put(key.clone(), encode(rec))], Some(lease.id()));
                        return Ok(lease);
                    }
                }
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }

    async fn withdraw_machine(&self, id: &str, lease: Lease) {
        let mut kv = self.lock();
        if kv.unreachable {
            return;
        }
        kv.revoke(lease.id());
        kv.commit(vec![Write::Delete(self.keys.machine(id))], None);
    }

    fn watch_agent(&self, machine_id: &str, _poll: Option<Duration>) -> mpsc::Receiver<WatchEvent> {
        // polling would deliver the same snapshots later; the store always watches
        self.watch(records::agent_ranges(&self.keys, machine_id))
    }

    async fn body(&self, hash: &UnitHash) -> Result<UnitFile> {
        let key = self.keys.body(&hash.to_string());
        let kv = self.request("reading unit body", &key)?;
        self.body_of(&kv, hash)
    }

    async fn bodies(&self, hashes: &[UnitHash]) -> Result<HashMap<UnitHash, UnitFile>> {
        self.bodies_together(hashes)
    }

    async fn publish_state(
        &self,
        name: &str,
        machine_id: &str,
        state: Option<&StateRecord>,
        lease: &Lease,
    ) -> Result<()> {
        let key = self.keys.state(name, machine_id);
        let mut kv = self.request("publishing unit state", &key)?;
        match state {
            Some(_) if !kv.leases.contains_key(&lease.id()) => {
                return Err(lease_not_found("publishing unit state", key));
            }
            Some(s) => kv.commit(vec![Write::Put(key, encode(s))], Some(lease.id())),
            None => kv.commit(vec![Write::Delete(key)], None),
        };
        Ok(())
    }

    async fn publish_states(
        &self,
        machine_id: &str,
        states: &[StateRecord],
        lease: &Lease,
    ) -> Result<()> {
        const OP: &str = "publishing unit states";
        let Some(first) = states.first() else {
            return Ok(());
        };
        let mut kv = self.request(OP, &self.keys.state(&first.name, machine_id))?;
        let writes: Vec<Write> = states
            .iter()
            .map(|s| Write::Put(self.keys.state(&s.name, machine_id), encode(s)))
            .collect();
        // one transaction in etcd: one refused key fails it whole, and writes nothing
        if let Some(key) = writes
            .iter()
            .map(write_key)
            .find(|k| kv.refused.contains(*k))
        {
            return Err(refused(OP, key));
        }
        if !kv.leases.contains_key(&lease.id()) {
            return Err(lease_not_found(
                OP,
                self.keys.state(&first.name, machine_id),
            ));
        }
        kv.commit(writes, Some(lease.id()));
        Ok(())
    }
}

#[async_trait]
impl EngineStore for MemoryStore {
    fn keys(&self) -> &Keys {
        &self.keys
    }

    async fn campaign(&self, machine_id: &str, ttl: Duration) -> Result<Option<Leadership>> {
        let key = self.keys.leader();
        let mut kv = self.request("campaigning", &key)?;
        kv.campaigns += 1;
        if kv.data.contains_key(&key) {
            return Ok(None);
        }
        let lease = self.grant(&mut kv, ttl);
        let create_revision = kv.commit(
            vec![Write::Put(key, machine_id.as_bytes().to_vec())],
            Some(lease.id()),
        );
        Ok(Some(Leadership {
            lease,
            create_revision,
            fence: create_revision,
        }))
    }

    async fn refence(&self, leadership: &Leadership) -> Result<i64> {
        let key = self.keys.leader();
        let mut kv = self.request("moving the engine's fence", &key)?;
        let Some(e) = kv
            .data
            .get(&key)
            .filter(|e| e.create_revision == leadership.create_revision)
        else {
            return Err(RegistryError::NotLeader);
        };
        let (value, lease) = (e.value.clone(), e.lease);
        Ok(kv.commit(vec![Write::Put(key, value)], lease))
    }

    async fn resign(&self, leadership: Leadership) {
        let mut kv = self.lock();
        if !kv.unreachable {
            kv.revoke(leadership.lease.id());
        }
    }

    fn watch_engine(&self, _poll: Option<Duration>) -> mpsc::Receiver<WatchEvent> {
        self.watch(records::engine_ranges(&self.keys))
    }

    fn watch_leader(&self, _poll: Option<Duration>) -> mpsc::Receiver<WatchEvent> {
        self.watch(vec![KeyRange::prefix(self.keys.leader())])
    }

    async fn unit_bodies(&self, hashes: &[UnitHash]) -> Result<HashMap<UnitHash, UnitFile>> {
        self.bodies_together(hashes)
    }

    async fn apply(&self, leadership: &Leadership, ops: &[EngineOp]) -> Result<i64> {
        let leader = self.keys.leader();
        let mut kv = self.request("writing engine decisions", &leader)?;
        let writes: Vec<Write> = engine_writes(&self.keys, ops)
            .into_iter()
            .flatten()
            .collect();
        if writes.is_empty() {
            return Ok(0);
        }
        if let Some(key) = writes
            .iter()
            .map(write_key)
            .find(|k| kv.refused.contains(*k))
        {
            return Err(refused("writing engine decisions", key));
        }
        if writes.len() > MAX_TXN_OPS {
            // etcd's answer to a transaction over its limit (compares are counted apart)
            return Err(RegistryError::Etcd {
                op: "writing engine decisions",
                key: leader,
                source: etcd_client::Error::GRpcStatus(tonic::Status::invalid_argument(
                    "etcdserver: too many operations in txn request",
                )),
            });
        }
        if kv.mod_revision(&leader) != leadership.fence {
            return Err(RegistryError::NotLeader);
        }
        kv.engine_txns += 1;
        let before = kv.revision;
        let revision = kv.commit(writes, None);
        // (as etcd's: a write that changed nothing is no write of the engine's to wait for)
        Ok(if revision == before { 0 } else { revision })
    }
}

/// What etcd answers a request it refuses (here: permission denied on `key`).
fn refused(op: &'static str, key: &str) -> RegistryError {
    RegistryError::Etcd {
        op,
        key: key.to_string(),
        source: etcd_client::Error::GRpcStatus(tonic::Status::permission_denied(
            "etcdserver: permission denied",
        )),
    }
}

fn write_key(w: &Write) -> &str {
    match w {
        Write::Put(k, _) | Write::Delete(k) => k,
    }
}

/// The client's writes and reads, as the etcd registry does them, so that tests create and
/// change units the way fleetctl does. (Inherent, not an `impl Registry`: the trait is the
/// clients' and grows with them; `MemoryRegistry` is its in-memory implementation.)
impl MemoryStore {
    pub async fn create_unit(
        &self,
        name: &UnitName,
        file: &UnitFile,
        desired: TargetState,
    ) -> Result<()> {
        let rec = UnitRecord::new(name, file, desired);
        let unit_key = self.keys.unit(name.as_str());
        let body_key = self.keys.body(&rec.hash.to_string());
        let mut kv = self.request("creating unit", &unit_key)?;
        if kv.data.contains_key(&unit_key) {
            return Err(RegistryError::AlreadyExists(name.to_string()));
        }
        if !kv.data.contains_key(&body_key) {
            kv.commit(
                vec![Write::Put(body_key, file.serialize().into_bytes())],
                None,
            );
        }
        let mut writes = vec![Write::Put(unit_key, encode(&rec))];
        if let Some(g) = rec.global_record() {
            writes.push(Write::Put(self.keys.global(name.as_str()), encode(&g)));
        }
        kv.commit(writes, None);
        Ok(())
    }

    pub async fn set_desired_state(&self, name: &UnitName, desired: TargetState) -> Result<()> {
        let key = self.keys.unit(name.as_str());
        let mut kv = self.request("setting desired state", &key)?;
        let Some(e) = kv.data.get(&key) else {
            return Err(RegistryError::NotFound(name.to_string()));
        };
        let mut rec: UnitRecord = decode(&key, &e.value)?;
        if rec.desired_state == desired {
            return Ok(());
        }
        rec.desired_state = desired;
        let mut writes = vec![Write::Put(key, encode(&rec))];
        if let Some(g) = rec.global_record() {
            writes.push(Write::Put(self.keys.global(name.as_str()), encode(&g)));
        }
        kv.commit(writes, None);
        Ok(())
    }

    pub async fn destroy_unit(&self, name: &UnitName) -> Result<bool> {
        let key = self.keys.unit(name.as_str());
        let mut kv = self.request("destroying unit", &key)?;
        let existed = kv.data.contains_key(&key);
        kv.commit(
            vec![
                Write::Delete(key),
                Write::Delete(self.keys.global(name.as_str())),
            ],
            None,
        );
        Ok(existed)
    }

    pub async fn unit(&self, name: &UnitName) -> Result<Option<UnitView>> {
        Ok(self.units().await?.into_iter().find(|u| &u.name == name))
    }

    pub async fn units(&self) -> Result<Vec<UnitView>> {
        let kv = self.request("listing units", &self.keys.dir(keys::UNITS))?;
        let all = snapshot_of(&kv.data);
        let context = records::UnitContext::read(&self.keys, &all);
        let mut out = Vec::new();
        for u in records::units(&self.keys, &all) {
            let Ok(file) = self.body_of(&kv, &u.hash) else {
                continue;
            };
            out.push(context.view(u, file));
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    pub async fn machines(&self) -> Result<Vec<MachineView>> {
        let kv = self.request("listing machines", &self.keys.dir(keys::MACHINES))?;
        Ok(records::machines(&self.keys, &snapshot_of(&kv.data)))
    }

    pub async fn unit_states(&self) -> Result<Vec<StateRecord>> {
        let kv = self.request("listing unit states", &self.keys.dir(keys::STATES))?;
        let mut states = records::states(&self.keys, &snapshot_of(&kv.data));
        states.sort_by(|a, b| (&a.name, &a.machine_id).cmp(&(&b.name, &b.machine_id)));
        Ok(states)
    }

    pub async fn set_machine_metadata(
        &self,
        machine: &str,
        key: &str,
        value: Option<&str>,
    ) -> Result<()> {
        let k = self.keys.metadata(machine, key);
        let mut kv = self.request("setting machine metadata", &k)?;
        let w = match value {
            Some(v) => Write::Put(k, v.as_bytes().to_vec()),
            None => Write::Delete(k),
        };
        kv.commit(vec![w], None);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn machine(id: &str, token: &str) -> MachineRecord {
        MachineRecord {
            version: 1,
            id: id.into(),
            public_ip: "10.0.0.1".into(),
            metadata: BTreeMap::new(),
            agent_version: "1.0.0".into(),
            token: token.into(),
        }
    }

    async fn next(rx: &mut mpsc::Receiver<WatchEvent>) -> WatchEvent {
        rx.recv().await.expect("watch open")
    }

    #[tokio::test(start_paused = true)]
    async fn leases_expire_one_ttl_after_the_store_is_cut_off() {
        let s = MemoryStore::default();
        let ttl = Duration::from_secs(10);
        let lease = AgentStore::register_machine(&s, &machine("m1", "t"), ttl)
            .await
            .expect("register");
        let mut rx = s.watch(vec![KeyRange::prefix(s.keys().dir(keys::MACHINES))]);
        assert!(matches!(next(&mut rx).await, WatchEvent::Snapshot { kvs, .. } if kvs.len() == 1));
        s.set_reachable(false);
        assert_eq!(next(&mut rx).await, WatchEvent::Disconnected);
        tokio::time::sleep(ttl - Duration::from_millis(1)).await;
        assert!(s.get(&s.keys().machine("m1")).is_some());
        tokio::time::sleep(Duration::from_millis(2)).await;
        assert!(s.get(&s.keys().machine("m1")).is_none());
        // etcd has let it go, but nobody can say so to a holder that cannot reach it
        assert!(!lease.is_lost(), "lost reported while unreachable");
        s.set_reachable(true);
        assert!(lease.is_lost());
        assert!(matches!(next(&mut rx).await, WatchEvent::Snapshot { kvs, .. } if kvs.is_empty()));
    }

    #[tokio::test(start_paused = true)]
    async fn writes_under_an_expired_or_revoked_lease_are_refused() {
        let s = MemoryStore::default();
        let ttl = Duration::from_secs(10);
        let st = |unit: &str| StateRecord {
            version: 1,
            name: unit.into(),
            machine_id: "m1".into(),
            hash: "1c6fb6f3684bafb0c173d8b8b957ceff031180c1".into(),
            load_state: "loaded".into(),
            active_state: "active".into(),
            sub_state: "running".into(),
            agent_state: TargetState::Launched,
            reason: None,
        };
        let expired = AgentStore::register_machine(&s, &machine("m1", "t"), ttl)
            .await
            .expect("register");
        s.expire_lease(expired.id());
        let e = s
            .publish_state("a.service", "m1", Some(&st("a.service")), &expired)
            .await
            .expect_err("expired lease");
        let said = e.to_string();
        let key = s.keys().state("a.service", "m1");
        assert!(
            said.starts_with(&format!("publishing unit state {key}: etcd: "))
                && said.contains("requested lease not found"),
            "{said}"
        );
        let lead = s.campaign("m1", ttl).await.expect("campaign").expect("won");
        let revoked = Lease::new(
            lead.lease.id(),
            watch::channel(false).1,
            watch::channel(tokio::time::Instant::now()).1,
        );
        s.resign(lead).await;
        assert!(
            s.publish_state("b.service", "m1", Some(&st("b.service")), &revoked)
                .await
                .is_err()
        );
        let batch = [st("c.service"), st("d.service")];
        assert!(s.publish_states("m1", &batch, &expired).await.is_err());
        assert!(
            s.list(&s.keys().dir(keys::STATES)).is_empty(),
            "half written"
        );
        // a batch with one refused key fails whole and writes nothing; then all of it
        let live = AgentStore::register_machine(&s, &machine("m2", "t"), ttl)
            .await
            .expect("register");
        let refused_key = s.keys().state("d.service", "m1");
        s.refuse_key(&refused_key, true);
        let e = s
            .publish_states("m1", &batch, &live)
            .await
            .expect_err("refused key");
        assert!(
            e.is_refused() && e.to_string().contains(&refused_key),
            "{e}"
        );
        assert!(
            s.list(&s.keys().dir(keys::STATES)).is_empty(),
            "half written"
        );
        s.refuse_key(&refused_key, false);
        s.publish_states("m1", &batch, &live)
            .await
            .expect("publish");
        assert_eq!(s.list(&s.keys().dir(keys::STATES)).len(), 2);
        // withdrawing needs no lease
        s.publish_state("a.service", "m1", None, &expired)
            .await
            .expect("delete");
    }

    #[tokio::test(start_paused = true)]
    async fn leases_outlive_a_short_cut() {
        let s = MemoryStore::default();
        let ttl = Duration::from_secs(10);
        let lease = AgentStore::register_machine(&s, &machine("m1", "t"), ttl)
            .await
            .expect("register");
        s.set_reachable(false);
        tokio::time::sleep(ttl / 2).await;
        s.set_reachable(true);
        tokio::time::sleep(ttl * 2).await;
        assert!(!lease.is_lost());
        assert!(s.get(&s.keys().machine("m1")).is_some());
    }

    #[tokio::test]
    async fn watches_deliver_writes_in_their_ranges_with_revisions() {
        let s = MemoryStore::default();
        let mut rx = s.watch_agent("m1", None);
        let WatchEvent::Snapshot { revision, kvs } = next(&mut rx).await else {
            panic!("no snapshot first");
        };
        assert!(kvs.is_empty());
        s.put(&s.keys().schedule("m2", "a.service"), "x"); // another machine's: not watched
        s.put(&s.keys().schedule("m1", "a.service"), "y");
        assert_eq!(
            next(&mut rx).await,
            WatchEvent::Put {
                key: s.keys().schedule("m1", "a.service"),
                value: b"y".to_vec(),
                revision: revision + 2,
            }
        );
        // (then that the write's events are all there, as etcd's watch says)
        assert_eq!(
            next(&mut rx).await,
            WatchEvent::Through {
                revision: revision + 2
            }
        );
        s.delete(&s.keys().schedule("m1", "a.service"));
        assert!(matches!(next(&mut rx).await, WatchEvent::Delete { .. }));
        assert!(matches!(next(&mut rx).await, WatchEvent::Through { .. }));
    }

    #[tokio::test]
    async fn engine_writes_are_fenced_on_the_leader_key() {
        let s = MemoryStore::default();
        let ttl = Duration::from_secs(10);
        let lead = s.campaign("m1", ttl).await.expect("campaign").expect("won");
        assert!(s.campaign("m2", ttl).await.expect("campaign").is_none());
        let op = EngineOp::SetReason {
            unit: "a.service".into(),
            reason: "no machine".into(),
        };
        s.apply(&lead, std::slice::from_ref(&op))
            .await
            .expect("apply");
        assert_eq!(
            s.get(&s.keys().reason("a.service")),
            Some(b"no machine".to_vec())
        );
        // the fence moved: the old one fails, the key keeps its value
        let mut lead = lead;
        let old = lead.fence;
        lead.fence = s.refence(&lead).await.expect("refence");
        assert!(lead.fence > old);
        assert_eq!(s.get(&s.keys().leader()), Some(b"m1".to_vec()));
        let stale = Leadership {
            lease: crate::Lease::new(
                lead.lease.id(),
                watch::channel(false).1,
                watch::channel(tokio::time::Instant::now()).1,
            ),
            create_revision: lead.create_revision,
            fence: old,
        };
        assert!(matches!(
            s.apply(&stale, std::slice::from_ref(&op)).await,
            Err(RegistryError::NotLeader)
        ));
        s.apply(&lead, std::slice::from_ref(&op))
            .await
            .expect("apply with the new fence");
        // the key deleted and won again by someone else: the old leader's writes fail whole
        s.delete(&s.keys().leader());
        let other = s.campaign("m2", ttl).await.expect("campaign").expect("won");
        assert!(matches!(
            s.apply(&lead, std::slice::from_ref(&op)).await,
            Err(RegistryError::NotLeader)
        ));
        assert!(matches!(
            s.refence(&lead).await,
            Err(RegistryError::NotLeader)
        ));
        s.apply(&other, &[op]).await.expect("the new leader writes");
        s.resign(other).await;
        assert!(s.get(&s.keys().leader()).is_none());
    }

    #[tokio::test]
    async fn a_refused_key_fails_its_requests_only_and_is_not_an_outage() {
        let s = MemoryStore::default();
        let (a, b) = (
            UnitFile::parse("[Service]\nExecStart=/bin/a\n").expect("unit"),
            UnitFile::parse("[Service]\nExecStart=/bin/b\n").expect("unit"),
        );
        for (n, f) in [("a.service", &a), ("b.service", &b)] {
            s.create_unit(&n.parse().expect("name"), f, TargetState::Launched)
                .await
                .expect("create");
        }
        let key = s.keys().body(&a.hash().to_string());
        s.refuse_key(&key, true);
        let e = AgentStore::body(&s, &a.hash()).await.expect_err("refused");
        assert!(e.is_refused() && !e.is_unavailable(), "{e}");
        assert!(e.to_string().contains(&key), "{e}");
        AgentStore::body(&s, &b.hash()).await.expect("another key");
        // a transaction touching it fails whole
        let both = s.unit_bodies(&[a.hash(), b.hash()]).await;
        assert!(both.is_err_and(|e| e.is_refused()));
        s.refuse_key(&key, false);
        AgentStore::body(&s, &a.hash())
            .await
            .expect("allowed again");
    }

    #[tokio::test]
    async fn errors_name_the_operation_and_the_key() {
        let s = MemoryStore::default();
        s.set_reachable(false);
        let hash = UnitFile::parse("[Service]\nExecStart=/bin/true\n")
            .expect("unit")
            .hash();
        let e = AgentStore::body(&s, &hash).await.expect_err("cut off");
        assert!(e.is_unavailable());
        assert_eq!(
            e.to_string(),
            format!(
                "reading unit body {}: registry unreachable",
                s.keys().body(&hash.to_string())
            )
        );
    }

    #[tokio::test]
    async fn clients_see_what_the_engine_and_agents_wrote() {
        let s = MemoryStore::default();
        let name: UnitName = "a.service".parse().expect("name");
        let file = UnitFile::parse("[Service]\nExecStart=/bin/true\n").expect("unit");
        s.create_unit(&name, &file, TargetState::Loaded)
            .await
            .expect("create");
        assert!(matches!(
            s.create_unit(&name, &file, TargetState::Loaded).await,
            Err(RegistryError::AlreadyExists(_))
        ));
        s.set_desired_state(&name, TargetState::Launched)
            .await
            .expect("desired");
        let lease = AgentStore::register_machine(&s, &machine("m1", "t"), Duration::from_secs(9))
            .await
            .expect("register");
        let lead = s
            .campaign("m1", Duration::from_secs(9))
            .await
            .expect("campaign")
            .expect("won");
        let op = EngineOp::Schedule {
            unit: "a.service".into(),
            machine: "m1".into(),
            hash: file.hash(),
            desired: TargetState::Launched,
        };
        s.apply(&lead, &[op]).await.expect("apply");
        let state = StateRecord {
            version: 1,
            name: "a.service".into(),
            machine_id: "m1".into(),
            hash: file.hash().to_string(),
            load_state: "loaded".into(),
            active_state: "active".into(),
            sub_state: "running".into(),
            agent_state: TargetState::Launched,
            reason: None,
        };
        s.publish_state("a.service", "m1", Some(&state), &lease)
            .await
            .expect("publish");
        let view = s.unit(&name).await.expect("unit").expect("exists");
        assert_eq!(view.machine_id.as_deref(), Some("m1"));
        assert_eq!(view.current, TargetState::Launched);
        assert_eq!(s.machines().await.expect("machines").len(), 1);
        assert_eq!(s.unit_states().await.expect("states"), vec![state]);
        assert!(s.destroy_unit(&name).await.expect("destroy"));
        assert!(s.units().await.expect("units").is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn another_fleetds_machine_id_is_refused_after_one_ttl() {
        let s = MemoryStore::default();
        let ttl = Duration::from_secs(5);
        let _first = AgentStore::register_machine(&s, &machine("m1", "a"), ttl)
            .await
            .expect("register");
        // the same fleetd (token) takes its record over at once
        AgentStore::register_machine(&s, &machine("m1", "a"), ttl)
            .await
            .expect("same token");
        let dup = AgentStore::register_machine(&s, &machine("m1", "b"), ttl).await;
        assert!(matches!(dup, Err(RegistryError::DuplicateMachine { .. })));
    }
}
