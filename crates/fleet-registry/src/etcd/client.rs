//! The client role on etcd: what the HTTP API and fleetctl's etcd driver do ([`Registry`]).

use std::time::Duration;

use async_trait::async_trait;
use etcd_client::{Compare, CompareOp, DeleteOptions, Txn, TxnOp, TxnOpResponse};
use fleet_unit::{TargetState, UnitFile, UnitHash, UnitName};
use tracing::warn;

use super::{EtcdRegistry, OpKind};
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

#[async_trait]
impl Registry for EtcdRegistry {
    async fn create_unit(
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
