//! fleet's shared state on etcd v3: unit definitions, schedule, machine presence and unit states.
//!
//! Everything fleet knows lives under one key prefix (`etcd_key_prefix`, default
//! `/_coreos.com/fleet/`). The layout is documented in `keys` and in
//! `Documentation/etcd-layout.md`; values are JSON objects with a `version` field.
//!
//! Three kinds of users talk to the registry, each through its own trait:
//! - clients (the HTTP API and fleetctl's etcd driver): create, change and destroy units,
//!   list units, machines and states ([`Registry`]);
//! - the engine: leader election, a mirror of its keys, fenced writes of decisions
//!   ([`EngineStore`]);
//! - the agent: machine presence under a lease, its own schedule and the global units
//!   through a watch, unit states under its lease ([`AgentStore`]).
//!
//! [`EtcdRegistry`] implements all three on etcd v3; [`MemoryRegistry`] (clients) and
//! [`MemoryStore`] (agent and engine) are their in-memory twins for tests.

pub mod changes;
mod decode;
mod dial;
mod engine_model;
mod error;
mod etcd;
pub mod keys;
mod lease;
mod memory;
mod memory_store;
mod model;
mod roles;
mod watch;

pub use changes::{
    Change, ChangeBatch, ChangeFeed, EventItem, EventMessage, EventQuery, FeedItem, StreamEnd,
};
pub use decode::{agent_ranges, engine_ranges, engine_snapshot};
pub use dial::{DialStream, Dialer, endpoint_host_port};
pub use engine_model::EngineModel;
pub use error::{RegistryError, Result};
pub use etcd::{EtcdConfig, EtcdRegistry};
/// fleet's default key prefix, defined with fleetd's other option defaults.
pub use fleet_config::DEFAULT_KEY_PREFIX;
pub use lease::{AtMostOnce, CLOCK_RATE_MARGIN, Lease, LeaseKeeper, STOP_LATENCY_MARGIN};
pub use memory::MemoryRegistry;
pub use memory_store::MemoryStore;
pub use model::{
    GlobalRecord, MachineRecord, MachineView, ScheduleRecord, StateRecord, UnitRecord, UnitView,
    current_state, reports_hash,
};
pub use roles::{
    AgentStore, ENGINE_OPS_PER_TXN, EngineOp, EngineSnapshot, EngineStore, Leadership,
};
pub use watch::{KeyRange, ListWatch, WatchEvent};

use std::time::Duration;

use async_trait::async_trait;
use fleet_unit::{TargetState, UnitFile, UnitName};

/// Where a page of a sorted listing starts: after so many items, or after the item with a
/// given key (what the previous page ended with, which a range read can start from).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum PageStart<K> {
    /// After the first `n` items.
    Skip(usize),
    /// After the item whose key is this (and any item before it).
    After(K),
}

impl<K: Ord> PageStart<K> {
    /// The page of `all` (sorted by `key`) that starts here: at most `limit` items.
    pub fn cut<T>(&self, all: Vec<T>, limit: usize, key: impl Fn(&T) -> K) -> Vec<T> {
        match self {
            PageStart::Skip(n) => all.into_iter().skip(*n).take(limit).collect(),
            PageStart::After(after) => all
                .into_iter()
                .skip_while(|t| key(t) <= *after)
                .take(limit)
                .collect(),
        }
    }
}

/// What clients (the HTTP API and fleetctl's etcd driver) may do with the registry.
#[async_trait]
pub trait Registry: Send + Sync {
    /// Stores a new unit. Fails with [`RegistryError::AlreadyExists`] when the name is taken.
    async fn create_unit(
        &self,
        name: &UnitName,
        file: &UnitFile,
        desired: TargetState,
    ) -> Result<()>;
    /// Stores `file` as the unit `name` with `desired` in one transaction, over any unit of
    /// that name (fleet's overwrite, what `--replace` does) or as a new one. Nothing else of
    /// the unit is touched: the engine keeps it on its machine unless the new options forbid
    /// that machine, and that machine's agent restarts it with the new body.
    async fn replace_unit(
        &self,
        name: &UnitName,
        file: &UnitFile,
        desired: TargetState,
    ) -> Result<()>;
    /// Changes the desired state of an existing unit.
    async fn set_desired_state(&self, name: &UnitName, desired: TargetState) -> Result<()>;
    /// Removes a unit; `false` when there was none.
    async fn destroy_unit(&self, name: &UnitName) -> Result<bool>;
    /// One unit with its body, placement and current state.
    async fn unit(&self, name: &UnitName) -> Result<Option<UnitView>>;
    /// All units, sorted by name.
    async fn units(&self) -> Result<Vec<UnitView>>;
    /// One page of [`Registry::units`]: at most `limit` units, those that follow `start` in
    /// name order. Drivers that can read a range read only the page (and what joins its
    /// units); the default reads everything and cuts the page out.
    async fn units_page(&self, start: &PageStart<String>, limit: usize) -> Result<Vec<UnitView>> {
        Ok(start.cut(self.units().await?, limit, |u| u.name.to_string()))
    }
    /// [`Registry::units_page`], its views shared with what the driver keeps: a driver that
    /// keeps a listing's views (etcd's chunks read ahead) hands them out without copying.
    async fn units_page_shared(
        &self,
        start: &PageStart<String>,
        limit: usize,
    ) -> Result<Vec<std::sync::Arc<UnitView>>> {
        let page = self.units_page(start, limit).await?;
        Ok(page.into_iter().map(std::sync::Arc::new).collect())
    }
    /// All machines present now, sorted by ID, with API-set metadata merged in.
    async fn machines(&self) -> Result<Vec<MachineView>>;
    /// All unit states reported by agents, sorted by unit name then machine ID.
    async fn unit_states(&self) -> Result<Vec<StateRecord>>;
    /// One page of [`Registry::unit_states`]: at most `limit` states, those that follow
    /// `start` in (unit name, machine ID) order. The default reads everything.
    async fn unit_states_page(
        &self,
        start: &PageStart<(String, String)>,
        limit: usize,
    ) -> Result<Vec<StateRecord>> {
        Ok(start.cut(self.unit_states().await?, limit, |s| {
            (s.name.clone(), s.machine_id.clone())
        }))
    }
    /// Sets (Some) or removes (None) one metadata key of a machine; persists across restarts.
    async fn set_machine_metadata(
        &self,
        machine: &str,
        key: &str,
        value: Option<&str>,
    ) -> Result<()>;
    /// Waits until something about `unit` may have changed (its record, placement, reason or
    /// states, or the machine list), or `max` passed. Drivers that can watch do; the default
    /// just waits a little, which is what a polling client can do.
    async fn wait_for_change(&self, unit: &UnitName, max: Duration) {
        let _ = unit;
        tokio::time::sleep(max.min(Duration::from_millis(250))).await;
    }
    /// The registry's events after a revision (or from now on), as the API's event stream
    /// words them (`Documentation/api-v1-events.md`), `hello` first. The stream ends with an
    /// `Err` saying why, or with a `cut-off` event after which a follower resumes.
    async fn events(&self, query: &EventQuery) -> Result<tokio::sync::mpsc::Receiver<EventItem>> {
        let _ = query;
        Err(RegistryError::Remote(
            "this driver cannot follow the cluster's events".into(),
        ))
    }
}
