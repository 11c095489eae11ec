//! The agent role on etcd: machine presence under a lease, the agent's scoped watch, unit
//! bodies and unit states under the lease ([`AgentStore`]).

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use async_trait::async_trait;
use etcd_client::{Compare, CompareOp, PutOptions, Txn, TxnOp, TxnOpResponse};
use fleet_unit::{UnitFile, UnitHash};
use tokio::sync::mpsc;

use super::{EtcdRegistry, MAX_TXN_OPS, OpKind};
use crate::keys::Keys;
use crate::lease::{Lease, LeaseKeeper};
use crate::model::{MachineRecord, StateRecord, decode, encode};
use crate::roles::AgentStore;
use crate::watch::ListWatch;
use crate::{RegistryError, Result, WatchEvent, decode as records};

impl EtcdRegistry {
    /// Revokes a lease this registration granted but could not use, so it does not linger
    /// for a ttl (retries would pile them up); best effort, bounded by the request timeout.
    async fn abandon(&self, lease: LeaseKeeper) {
        let _ = tokio::time::timeout(self.timeout, lease.revoke(&self.client)).await;
    }

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
            let lease = self
                .timed(
                    OpKind::Set,
                    "granting the machine lease",
                    &key,
                    LeaseKeeper::grant_watched(&self.client, ttl, self.health.clone()),
                )
                .await?;
            let put = TxnOp::put(
                key.as_str(),
                encode(rec),
                Some(PutOptions::new().with_lease(lease.id())),
            );
            let txn = Txn::new()
                .when([Compare::create_revision(key.as_str(), CompareOp::Equal, 0)])
                .and_then([put.clone()])
                .or_else([TxnOp::get(key.as_str(), None)]);
            let resp = match self
                .txn(OpKind::Set, "registering machine", &key, txn)
                .await
            {
                Ok(r) => r,
                Err(e) => {
                    self.abandon(lease).await;
                    return Err(e);
                }
            };
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
                    match self
                        .txn(OpKind::Set, "taking over the machine record", &key, txn)
                        .await
                    {
                        Ok(r) if r.succeeded() => return Ok(lease),
                        Ok(_) => {}
                        Err(e) => {
                            self.abandon(lease).await;
                            return Err(e);
                        }
                    }
                } else if tokio::time::Instant::now() >= deadline {
                    self.abandon(lease).await;
                    return Err(RegistryError::DuplicateMachine {
                        id: rec.id.clone(),
                        ip: other.map(|o| o.public_ip).unwrap_or_default(),
                    });
                }
            }
            self.abandon(lease).await;
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }

    /// Rewrites the machine record under the existing lease (e.g. after SIGHUP).
    pub async fn update_machine(&self, rec: &MachineRecord, lease: &LeaseKeeper) -> Result<()> {
        let mut kv = self.kv();
        let key = self.keys.machine(&rec.id);
        self.timed(
            OpKind::Set,
            "updating machine",
            &key,
            kv.put(
                key.as_str(),
                encode(rec),
                Some(PutOptions::new().with_lease(lease.id())),
            ),
        )
        .await?;
        Ok(())
    }

    /// Withdraws a machine's presence at once.
    pub async fn withdraw_machine(&self, id: &str, lease: LeaseKeeper) {
        self.abandon(lease).await;
        self.delete_machine(id).await;
    }

    async fn delete_machine(&self, id: &str) {
        let key = self.keys.machine(id);
        let mut kv = self.kv();
        let _ = self
            .timed(
                OpKind::Set,
                "withdrawing machine",
                &key,
                kv.delete(key.as_str(), None),
            )
            .await;
    }

    /// Watches the agent's own schedule, the global units and its API-set metadata (never
    /// the whole unit tree).
    pub fn watch_agent(
        &self,
        machine_id: &str,
        poll: Option<Duration>,
    ) -> mpsc::Receiver<WatchEvent> {
        ListWatch::spawn_restarting(
            self.client.clone(),
            records::agent_ranges(&self.keys, machine_id),
            poll,
            self.timeout.saturating_mul(5),
            self.health.members_out(),
        )
    }

    /// The API-set metadata of one machine (persistent; merged over the configured one).
    pub async fn machine_metadata(&self, id: &str) -> Result<BTreeMap<String, String>> {
        let dir = self.keys.metadata_dir(id);
        Ok(self
            .get_prefix("reading machine metadata", &dir)
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
        self.write_state(name, machine_id, state, lease.id()).await
    }

    /// Publishes several unit states of this machine under `lease`, in transactions of at
    /// most [`MAX_TXN_OPS`] puts (one for a batch of that size); a failed transaction writes
    /// none of its states and ends the call.
    pub async fn publish_states(
        &self,
        machine_id: &str,
        states: &[StateRecord],
        lease: &LeaseKeeper,
    ) -> Result<()> {
        self.write_states(machine_id, states, lease.id()).await
    }

    async fn write_states(
        &self,
        machine_id: &str,
        states: &[StateRecord],
        lease: i64,
    ) -> Result<()> {
        if let [one] = states {
            return self
                .write_state(&one.name, machine_id, Some(one), lease)
                .await;
        }
        for chunk in states.chunks(MAX_TXN_OPS) {
            let Some(first) = chunk.first() else {
                continue;
            };
            let puts: Vec<TxnOp> = chunk
                .iter()
                .map(|s| {
                    TxnOp::put(
                        self.keys.state(&s.name, machine_id),
                        encode(s),
                        Some(PutOptions::new().with_lease(lease)),
                    )
                })
                .collect();
            let key = self.keys.state(&first.name, machine_id);
            self.txn(
                OpKind::Set,
                "publishing unit states",
                &key,
                Txn::new().and_then(puts),
            )
            .await?;
        }
        Ok(())
    }

    async fn write_state(
        &self,
        name: &str,
        machine_id: &str,
        state: Option<&StateRecord>,
        lease: i64,
    ) -> Result<()> {
        let key = self.keys.state(name, machine_id);
        let mut kv = self.kv();
        match state {
            Some(s) => {
                self.timed(
                    OpKind::Set,
                    "publishing unit state",
                    &key,
                    kv.put(
                        key.as_str(),
                        encode(s),
                        Some(PutOptions::new().with_lease(lease)),
                    ),
                )
                .await?;
            }
            None => {
                self.timed(
                    OpKind::Set,
                    "withdrawing unit state",
                    &key,
                    kv.delete(key.as_str(), None),
                )
                .await?;
            }
        }
        Ok(())
    }
}

#[async_trait]
impl AgentStore for EtcdRegistry {
    fn keys(&self) -> &Keys {
        &self.keys
    }

    async fn register_machine(&self, rec: &MachineRecord, ttl: Duration) -> Result<Lease> {
        EtcdRegistry::register_machine(self, rec, ttl)
            .await
            .map(Lease::from)
    }

    async fn withdraw_machine(&self, id: &str, lease: Lease) {
        if let Some(keeper) = lease.into_keeper() {
            keeper.revoke(&self.client).await;
        }
        self.delete_machine(id).await;
    }

    fn watch_agent(&self, machine_id: &str, poll: Option<Duration>) -> mpsc::Receiver<WatchEvent> {
        EtcdRegistry::watch_agent(self, machine_id, poll)
    }

    async fn body(&self, hash: &UnitHash) -> Result<UnitFile> {
        EtcdRegistry::body(self, hash).await
    }

    async fn bodies(&self, hashes: &[UnitHash]) -> Result<HashMap<UnitHash, UnitFile>> {
        EtcdRegistry::bodies(self, hashes).await
    }

    async fn publish_state(
        &self,
        name: &str,
        machine_id: &str,
        state: Option<&StateRecord>,
        lease: &Lease,
    ) -> Result<()> {
        self.write_state(name, machine_id, state, lease.id()).await
    }

    async fn publish_states(
        &self,
        machine_id: &str,
        states: &[StateRecord],
        lease: &Lease,
    ) -> Result<()> {
        self.write_states(machine_id, states, lease.id()).await
    }
}
