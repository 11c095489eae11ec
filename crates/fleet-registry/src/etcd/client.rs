//! The client role on etcd: what the HTTP API and fleetctl's etcd driver do ([`Registry`]).

use std::time::Duration;

use async_trait::async_trait;
use etcd_client::{Compare, CompareOp, DeleteOptions, Txn, TxnOp, TxnOpResponse};
use fleet_unit::{TargetState, UnitFile, UnitHash, UnitName};
use tokio::sync::oneshot;
use tracing::warn;

use super::{EtcdRegistry, MAX_TXN_OPS, OpKind};
use crate::keys;
use crate::model::{MachineView, StateRecord, UnitRecord, UnitView, decode, encode};
use crate::watch::{KeyRange, ListWatch};
use crate::{Registry, RegistryError, Result, decode as records};

/// The writes a unit's creation or replacement is made of.
struct UnitWrite {
    unit_key: String,
    unit_put: TxnOp,
    /// `global/<name>` for a global unit.
    global_put: Option<TxnOp>,
    /// The body, create-only (identical bodies share one key).
    body_txn: Txn,
}

impl EtcdRegistry {
    fn unit_write(&self, name: &UnitName, file: &UnitFile, desired: TargetState) -> UnitWrite {
        let rec = UnitRecord::new(name, file, desired);
        let unit_key = self.keys.unit(name.as_str());
        let body_key = self.keys.body(&rec.hash.to_string());
        let global_put = rec
            .global_record()
            .map(|g| TxnOp::put(self.keys.global(name.as_str()), encode(&g), None));
        let body_txn = Txn::new()
            .when([Compare::create_revision(
                body_key.as_str(),
                CompareOp::Equal,
                0,
            )])
            .and_then([TxnOp::put(body_key.as_str(), file.serialize(), None)]);
        UnitWrite {
            unit_put: TxnOp::put(unit_key.as_str(), encode(&rec), None),
            unit_key,
            global_put,
            body_txn,
        }
    }
}

impl EtcdRegistry {
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
        let (_, kvs) = self.list("listing units", &prefixes).await?;
        let mut units = records::units(&self.keys, &kvs);
        if let Some(n) = only {
            // A prefix read of units/a.service also matches units/a.service2.
            units.retain(|u| &u.name == n);
        }
        let context = records::UnitContext::read(&self.keys, &kvs);
        let hashes: Vec<UnitHash> = units.iter().map(|u| u.hash).collect();
        if only.is_none() {
            // every live body is known here: forget those of units destroyed or replaced
            self.prune_bodies(&hashes);
        }
        let bodies = self.bodies(&hashes).await?;
        let mut out = Vec::with_capacity(units.len());
        for u in units {
            let Some(file) = bodies.get(&u.hash).cloned() else {
                warn!(unit = %u.name, hash = %u.hash, "unit body missing; skipping unit");
                continue;
            };
            out.push(context.view(u, file));
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
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

/// The most units one grouped creation writes: each is up to three operations (body, unit
/// record, global record), and etcd takes at most 128 in one transaction.
const CREATIONS_PER_TXN: usize = MAX_TXN_OPS / 3;

/// Creations asked for while another is being written (group commit): when it is done, they
/// are written together in one transaction, so a burst of concurrent PUTs costs a few etcd
/// writes, and a creation alone waits for nothing.
#[derive(Default)]
pub(super) struct Creations {
    /// Whether a writer task is running (it takes what waits until nothing does).
    writing: bool,
    waiting: Vec<Creation>,
}

struct Creation {
    name: UnitName,
    file: UnitFile,
    desired: TargetState,
    done: oneshot::Sender<Result<()>>,
}

impl EtcdRegistry {
    fn creations(&self) -> std::sync::MutexGuard<'_, Creations> {
        // nothing panics while holding it; a poisoned lock still holds a consistent queue
        self.creations
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Writes what waits, a group at a time, until nothing does. Runs in a task of its own,
    /// so a request that goes away (its client hung up) never leaves the others waiting.
    async fn write_creations(self) {
        loop {
            let group = {
                let mut q = self.creations();
                let group = take_group(&mut q.waiting);
                if group.is_empty() {
                    q.writing = false;
                    return;
                }
                group
            };
            self.create_group(group).await;
        }
    }

    /// Creates a group of distinct units in one transaction: each only if it is not there
    /// yet. When a unit is there after all (its compare fails the whole transaction) or etcd
    /// refuses the transaction (its size), each unit is created alone, so each gets its own
    /// exact answer; an etcd out of reach answers each with the error.
    async fn create_group(&self, group: Vec<Creation>) {
        if let [_] = group.as_slice() {
            for c in group {
                let r = self.create_one(&c.name, &c.file, c.desired).await;
                let _ = c.done.send(r);
            }
            return;
        }
        let mut compares = Vec::with_capacity(group.len());
        let mut ops = Vec::with_capacity(group.len() * 3);
        let mut bodies = std::collections::HashSet::new();
        for c in &group {
            let w = self.unit_write(&c.name, &c.file, c.desired);
            compares.push(Compare::create_revision(
                w.unit_key.as_str(),
                CompareOp::Equal,
                0,
            ));
            // etcd refuses a transaction that writes one key twice: one body per hash
            if bodies.insert(c.file.hash()) {
                ops.push(TxnOp::txn(w.body_txn));
            }
            ops.push(w.unit_put);
            ops.extend(w.global_put);
        }
        let Some(first) = group.first().map(|c| self.keys.unit(c.name.as_str())) else {
            return;
        };
        let txn = Txn::new().when(compares).and_then(ops);
        match self.txn(OpKind::Set, "creating units", &first, txn).await {
            Ok(r) if r.succeeded() => {
                for c in group {
                    self.cache_body(c.file.hash(), c.file);
                    let _ = c.done.send(Ok(()));
                }
            }
            Err(e) if !e.is_refused() => {
                warn!(error = %e, units = group.len(), "creating a group of units failed");
                for c in group {
                    let key = self.keys.unit(c.name.as_str());
                    let _ = c.done.send(Err(as_each(&e, key)));
                }
            }
            Ok(_) | Err(_) => {
                let mut each = tokio::task::JoinSet::new();
                for c in group {
                    let reg = self.clone();
                    each.spawn(async move {
                        let r = reg.create_one(&c.name, &c.file, c.desired).await;
                        let _ = c.done.send(r);
                    });
                }
                while each.join_next().await.is_some() {}
            }
        }
    }

    /// Creates one unit in one transaction, only if it is not there yet.
    async fn create_one(
        &self,
        name: &UnitName,
        file: &UnitFile,
        desired: TargetState,
    ) -> Result<()> {
        let w = self.unit_write(name, file, desired);
        // One transaction: the body (create-only in a nested transaction: identical bodies
        // share one key), then the unit record and its global record, all only if the unit
        // is not there yet. A refused creation writes nothing, not even the body.
        let mut ops = vec![TxnOp::txn(w.body_txn), w.unit_put];
        if let Some(g) = w.global_put {
            ops.push(g);
        }
        let txn = Txn::new()
            .when([Compare::create_revision(
                w.unit_key.as_str(),
                CompareOp::Equal,
                0,
            )])
            .and_then(ops);
        if !self
            .txn(OpKind::Set, "creating unit", &w.unit_key, txn)
            .await?
            .succeeded()
        {
            return Err(RegistryError::AlreadyExists(name.to_string()));
        }
        self.cache_body(file.hash(), file.clone());
        Ok(())
    }
}

/// Takes the next group from `waiting`: up to [`CREATIONS_PER_TXN`] creations of distinct
/// units, in the order they came; a second creation of a unit in the group waits for the
/// next one (it is then refused as existing, or created if the first failed).
fn take_group(waiting: &mut Vec<Creation>) -> Vec<Creation> {
    let mut group: Vec<Creation> = Vec::new();
    let mut rest = Vec::new();
    for c in waiting.drain(..) {
        if group.len() < CREATIONS_PER_TXN && !group.iter().any(|g| g.name == c.name) {
            group.push(c);
        } else {
            rest.push(c);
        }
    }
    *waiting = rest;
    group
}

/// The failure of a group's transaction, as the answer to one of its units (an error
/// cannot be copied; this one says the same about that unit's key).
fn as_each(e: &RegistryError, key: String) -> RegistryError {
    match e {
        RegistryError::Timeout { op, after, .. } => RegistryError::Timeout {
            op,
            key,
            after: *after,
        },
        _ => RegistryError::Unreachable {
            op: "creating unit",
            key,
        },
    }
}

#[async_trait]
impl Registry for EtcdRegistry {
    /// Queued for the writer task (started if none runs), which writes the creations that
    /// gather while one is in flight as one transaction.
    async fn create_unit(
        &self,
        name: &UnitName,
        file: &UnitFile,
        desired: TargetState,
    ) -> Result<()> {
        let (done, answer) = oneshot::channel();
        let start = {
            let mut q = self.creations();
            q.waiting.push(Creation {
                name: name.clone(),
                file: file.clone(),
                desired,
                done,
            });
            !std::mem::replace(&mut q.writing, true)
        };
        if start {
            tokio::spawn(self.clone().write_creations());
        }
        answer.await.unwrap_or_else(|_| {
            Err(RegistryError::Unreachable {
                op: "creating unit",
                key: self.keys.unit(name.as_str()),
            })
        })
    }

    async fn replace_unit(
        &self,
        name: &UnitName,
        file: &UnitFile,
        desired: TargetState,
    ) -> Result<()> {
        let w = self.unit_write(name, file, desired);
        // One transaction: the body (still create-only, in a nested transaction), the unit
        // record and its global record. placement/ and schedule/ are the engine's: it keeps
        // the unit where it is while the new options allow it.
        let global_op = w
            .global_put
            .unwrap_or_else(|| TxnOp::delete(self.keys.global(name.as_str()), None));
        let ops = vec![TxnOp::txn(w.body_txn), w.unit_put, global_op];
        self.txn(
            OpKind::Set,
            "replacing unit",
            &w.unit_key,
            Txn::new().and_then(ops),
        )
        .await?;
        self.cache_body(file.hash(), file.clone());
        Ok(())
    }

    async fn set_desired_state(&self, name: &UnitName, desired: TargetState) -> Result<()> {
        let key = self.keys.unit(name.as_str());
        loop {
            let mut kv = self.kv();
            let resp = self
                .timed(
                    OpKind::Get,
                    "reading unit",
                    &key,
                    kv.get(key.as_str(), None),
                )
                .await?;
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
            if let Some(g) = rec.global_record() {
                ops.push(TxnOp::put(
                    self.keys.global(name.as_str()),
                    encode(&g),
                    None,
                ));
            }
            let txn = Txn::new()
                .when([Compare::mod_revision(key.as_str(), CompareOp::Equal, rev)])
                .and_then(ops);
            if self
                .txn(OpKind::Set, "setting desired state", &key, txn)
                .await?
                .succeeded()
            {
                return Ok(());
            }
        }
    }

    async fn destroy_unit(&self, name: &UnitName) -> Result<bool> {
        let key = self.keys.unit(name.as_str());
        let txn = Txn::new().and_then([
            TxnOp::delete(key.as_str(), Some(DeleteOptions::new())),
            TxnOp::delete(self.keys.global(name.as_str()), None),
        ]);
        let resp = self.txn(OpKind::Set, "destroying unit", &key, txn).await?;
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
        let (_, kvs) = self.list("listing machines", &prefixes).await?;
        Ok(records::machines(&self.keys, &kvs))
    }

    async fn unit_states(&self) -> Result<Vec<StateRecord>> {
        let kvs = self
            .get_prefix("listing unit states", &self.keys.dir(keys::STATES))
            .await?;
        let mut states = records::states(&self.keys, &kvs);
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
        let mut kv = self.kv();
        match value {
            Some(v) => {
                self.timed(
                    OpKind::Set,
                    "setting machine metadata",
                    &k,
                    kv.put(k.as_str(), v, None),
                )
                .await?;
            }
            None => {
                self.timed(
                    OpKind::Set,
                    "deleting machine metadata",
                    &k,
                    kv.delete(k.as_str(), None),
                )
                .await?;
            }
        }
        Ok(())
    }
}
