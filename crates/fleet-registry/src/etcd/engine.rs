//! The engine role on etcd: leader election, the engine's mirror, unit bodies and fenced
//! writes of decisions ([`EngineStore`]).

use std::collections::HashMap;
use std::time::Duration;

use async_trait::async_trait;
use etcd_client::{Compare, CompareOp, PutOptions, Txn, TxnOp, TxnOpResponse};
use fleet_unit::{UnitFile, UnitHash};
use tokio::sync::mpsc;

use super::{EtcdRegistry, MAX_TXN_OPS, OpKind};
use crate::keys::Keys;
use crate::lease::{Lease, LeaseKeeper};
use crate::roles::{EngineOp, EngineSnapshot, EngineStore, Leadership, Write, engine_writes};
use crate::watch::{KeyRange, ListWatch};
use crate::{RegistryError, Result, WatchEvent, decode as records};

impl EtcdRegistry {
    /// Tries to become the engine leader. `Ok(None)` when someone else leads.
    pub async fn campaign(&self, machine_id: &str, ttl: Duration) -> Result<Option<Leadership>> {
        let key = self.keys.leader();
        let lease = self
            .timed(
                OpKind::Set,
                "granting the leader lease",
                &key,
                LeaseKeeper::grant_watched(&self.client, ttl, self.health.clone()),
            )
            .await?;
        let txn = Txn::new()
            .when([Compare::create_revision(key.as_str(), CompareOp::Equal, 0)])
            .and_then([TxnOp::put(
                key.as_str(),
                machine_id,
                Some(PutOptions::new().with_lease(lease.id())),
            )]);
        let resp = self.txn(OpKind::Set, "campaigning", &key, txn).await?;
        if !resp.succeeded() {
            lease.revoke(&self.client).await;
            return Ok(None);
        }
        let create_revision = resp.header().map(|h| h.revision()).unwrap_or(0);
        Ok(Some(Leadership {
            lease: Lease::from(lease),
            create_revision,
            fence: create_revision,
        }))
    }

    /// See [`EngineStore::refence`].
    pub async fn refence(&self, leadership: &Leadership) -> Result<i64> {
        let key = self.keys.leader();
        // the same value and lease: only the key's mod revision moves
        let txn = Txn::new()
            .when([Compare::create_revision(
                key.as_str(),
                CompareOp::Equal,
                leadership.create_revision,
            )])
            .and_then([TxnOp::put(
                key.as_str(),
                "",
                Some(PutOptions::new().with_ignore_value().with_ignore_lease()),
            )]);
        let resp = self
            .txn(OpKind::Set, "moving the engine's fence", &key, txn)
            .await?;
        if !resp.succeeded() {
            return Err(RegistryError::NotLeader);
        }
        resp.header()
            .map(|h| h.revision())
            .ok_or(RegistryError::NotLeader)
    }

    /// The current leader's machine ID, if any.
    pub async fn leader(&self) -> Result<Option<String>> {
        let key = self.keys.leader();
        let mut kv = self.kv();
        let resp = self
            .timed(
                OpKind::Get,
                "reading the leader",
                &key,
                kv.get(key.as_str(), None),
            )
            .await?;
        Ok(resp
            .kvs()
            .first()
            .map(|kv| String::from_utf8_lossy(kv.value()).into_owned()))
    }

    /// Gives up leadership at once (on shutdown), so another engine takes over quickly.
    pub async fn resign(&self, leadership: Leadership) {
        if let Some(keeper) = leadership.lease.into_keeper() {
            keeper.revoke(&self.client).await;
        }
    }

    /// The key ranges the engine mirrors; see [`records::engine_ranges`].
    pub fn engine_ranges(&self) -> Vec<KeyRange> {
        records::engine_ranges(&self.keys)
    }

    /// Decodes a mirror of [`Self::engine_ranges`] into what the engine decides from.
    /// Malformed records are logged and skipped.
    pub fn decode_engine_snapshot<'a>(
        &self,
        revision: i64,
        kvs: impl Iterator<Item = (&'a String, &'a Vec<u8>)>,
    ) -> EngineSnapshot {
        records::engine_snapshot(&self.keys, revision, kvs)
    }

    /// Everything the engine decides from, read at one revision.
    pub async fn engine_snapshot(&self) -> Result<EngineSnapshot> {
        let ranges = self.engine_ranges();
        let (revision, kvs) = self
            .list_ranges("listing the engine's keys", &ranges)
            .await?;
        Ok(self.decode_engine_snapshot(revision, kvs.iter().map(|(k, v)| (k, v))))
    }

    /// Mirrors the engine's prefixes (see [`ListWatch`]).
    pub fn watch_engine(&self, poll: Option<Duration>) -> mpsc::Receiver<WatchEvent> {
        ListWatch::spawn_restarting(
            self.client.clone(),
            self.engine_ranges(),
            poll,
            self.timeout.saturating_mul(5),
            self.health.members_out(),
        )
    }

    /// List-watch of the leader key alone (what a candidate that does not lead follows).
    pub fn watch_leader(&self, poll: Option<Duration>) -> mpsc::Receiver<WatchEvent> {
        ListWatch::spawn_restarting(
            self.client.clone(),
            vec![KeyRange::prefix(self.keys.leader())],
            poll,
            self.timeout.saturating_mul(5),
            self.health.members_out(),
        )
    }

    /// The bodies of the given units (for their requirements).
    pub async fn unit_bodies(&self, hashes: &[UnitHash]) -> Result<HashMap<UnitHash, UnitFile>> {
        self.bodies(hashes).await
    }

    /// Writes decisions, each transaction fenced on the leader key: a deposed leader's writes
    /// fail as a whole ([`RegistryError::NotLeader`]). Returns the revision of the last write
    /// that changed something (0 when none did).
    pub async fn apply(&self, leadership: &Leadership, ops: &[EngineOp]) -> Result<i64> {
        self.apply_fenced(leadership.fence, ops).await
    }

    /// [`Self::apply`] of each batch, up to [`TXNS_IN_FLIGHT`] at once: each batch's outcome,
    /// in order. Every transaction carries the fence, so a deposed leader's batches all fail,
    /// in flight or not.
    pub async fn apply_batches(
        &self,
        leadership: &Leadership,
        batches: &[Vec<EngineOp>],
    ) -> Vec<Result<i64>> {
        let fence = leadership.fence;
        let mut out: Vec<Option<Result<i64>>> = batches.iter().map(|_| None).collect();
        let mut index = HashMap::new();
        let mut tasks = tokio::task::JoinSet::new();
        let mut next = 0;
        loop {
            while next < batches.len() && tasks.len() < TXNS_IN_FLIGHT {
                let this = self.clone();
                let ops = batches[next].clone();
                let task = tasks.spawn(async move { this.apply_fenced(fence, &ops).await });
                index.insert(task.id(), next);
                next += 1;
            }
            let (id, result) = match tasks.join_next_with_id().await {
                None => break,
                Some(Ok((id, r))) => (id, r),
                Some(Err(e)) => (
                    e.id(),
                    // a write task that did not finish: its write may or may not have landed
                    Err(RegistryError::Unreachable {
                        op: "writing engine decisions",
                        key: self.keys.leader(),
                    }),
                ),
            };
            if let Some(slot) = index.get(&id).and_then(|i| out.get_mut(*i)) {
                *slot = Some(result);
            }
        }
        out.into_iter()
            .map(|r| {
                r.unwrap_or_else(|| {
                    Err(RegistryError::Unreachable {
                        op: "writing engine decisions",
                        key: self.keys.leader(),
                    })
                })
            })
            .collect()
    }

    /// Writes `ops` in transactions fenced on the leader key's mod revision `fence`.
    async fn apply_fenced(&self, fence: i64, ops: &[EngineOp]) -> Result<i64> {
        let leader = self.keys.leader();
        let mut revision = 0;
        for chunk in txn_chunks(&self.keys, ops) {
            let txn = Txn::new()
                .when([Compare::mod_revision(
                    leader.as_str(),
                    CompareOp::Equal,
                    fence,
                )])
                .and_then(chunk);
            let mut kv = self.kv();
            let resp = self
                .timed_within(
                    self.timeout.saturating_mul(DECISION_TIMEOUT_FACTOR),
                    OpKind::Set,
                    "writing engine decisions",
                    &leader,
                    kv.txn(txn),
                )
                .await?;
            if !resp.succeeded() {
                return Err(RegistryError::NotLeader);
            }
            // a transaction that changed nothing (it deleted only keys already gone) makes no
            // revision and no watch event: etcd answers with its current revision, perhaps
            // another range's, which the engine waiting for its own write would never see
            let changed = resp.op_responses().iter().any(|r| match r {
                TxnOpResponse::Delete(d) => d.deleted() > 0,
                _ => true,
            });
            if changed {
                revision = resp.header().map(|h| h.revision()).unwrap_or(revision);
            }
        }
        Ok(revision)
    }
}

/// How many request timeouts a transaction of decisions may take. Under load (a mass
/// reschedule beside a thousand agents starting what it wrote) some took close to or more
/// than the 1 s request timeout, and a write that times out costs the leader a new listing
/// of every unit (its mirror may lack the write): seconds at 100,000 units. Worse, the
/// timed-out transaction may still land after that listing's revision, and a reconcile
/// from the listing then places its units a second time (a unit on two machines until the
/// stray is seen; fleet-sim saw 4 once at 2x with a round ended early at the first
/// failure). Waiting longer for the answer makes that rarer and is the cheaper of the two;
/// an etcd that does not answer at all still ends it.
const DECISION_TIMEOUT_FACTOR: u32 = 5;

/// How many transactions of decisions [`EtcdRegistry::apply_batches`] keeps in flight: etcd
/// commits concurrent proposals together, so a burst's writes cost a few round trips, not
/// one per batch.
const TXNS_IN_FLIGHT: usize = 32;

/// The etcd operations of `ops`, in transactions of at most [`MAX_TXN_OPS`]; a transaction
/// never splits one decision's group.
fn txn_chunks(keys: &Keys, ops: &[EngineOp]) -> Vec<Vec<TxnOp>> {
    let groups = engine_writes(keys, ops).into_iter().map(|g| {
        g.into_iter()
            .map(|w| match w {
                Write::Put(k, v) => TxnOp::put(k, v, None),
                Write::Delete(k) => TxnOp::delete(k, None),
            })
            .collect::<Vec<_>>()
    });
    let mut chunks = Vec::new();
    let mut chunk: Vec<TxnOp> = Vec::new();
    let mut iter = groups.peekable();
    while let Some(group) = iter.next() {
        chunk.extend(group);
        let next_fits = iter
            .peek()
            .is_some_and(|g| chunk.len() + g.len() <= MAX_TXN_OPS);
        if !next_fits {
            chunks.push(std::mem::take(&mut chunk));
        }
    }
    chunks
}

#[async_trait]
impl EngineStore for EtcdRegistry {
    fn keys(&self) -> &Keys {
        &self.keys
    }

    async fn campaign(&self, machine_id: &str, ttl: Duration) -> Result<Option<Leadership>> {
        EtcdRegistry::campaign(self, machine_id, ttl).await
    }

    async fn resign(&self, leadership: Leadership) {
        EtcdRegistry::resign(self, leadership).await
    }

    async fn refence(&self, leadership: &Leadership) -> Result<i64> {
        EtcdRegistry::refence(self, leadership).await
    }

    fn watch_engine(&self, poll: Option<Duration>) -> mpsc::Receiver<WatchEvent> {
        EtcdRegistry::watch_engine(self, poll)
    }

    fn watch_leader(&self, poll: Option<Duration>) -> mpsc::Receiver<WatchEvent> {
        EtcdRegistry::watch_leader(self, poll)
    }

    async fn unit_bodies(&self, hashes: &[UnitHash]) -> Result<HashMap<UnitHash, UnitFile>> {
        self.bodies(hashes).await
    }

    async fn apply(&self, leadership: &Leadership, ops: &[EngineOp]) -> Result<i64> {
        EtcdRegistry::apply(self, leadership, ops).await
    }

    async fn apply_batches(
        &self,
        leadership: &Leadership,
        batches: &[Vec<EngineOp>],
    ) -> Vec<Result<i64>> {
        EtcdRegistry::apply_batches(self, leadership, batches).await
    }
}
