//! The simulated machines: each is fleetd's own wiring (`fleetd::machine`: registration and
//! lease, agent, engine candidate) on an in-memory systemd, and some also serve the real API
//! (`fleetd::api_host`). Machines share gRPC channels to etcd in groups (each still takes its
//! own leases and watches), so a thousand machines cost tens of connections, not thousands.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use fleet_config::Config;
use fleet_registry::{EtcdConfig, EtcdRegistry, Registry};
use fleet_systemd::fake::{FakeUnitManager, Knobs};
use fleetd::api_host::{self, ApiHost};
use fleetd::machine::{self, Machine};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::workload::machine_metadata;

/// How the machines are made.
#[derive(Debug, Clone)]
pub struct ClusterOptions {
    pub machines: usize,
    /// Machines per gRPC channel to etcd.
    pub machines_per_channel: usize,
    /// How many machines serve the API (at least one; the first ones).
    pub api_hosts: usize,
    /// How many machines run an engine candidate (the first ones; `None`: every machine, as
    /// in a real cluster). Each candidate mirrors the engine's keys whether it leads or not.
    pub engine_candidates: Option<usize>,
    /// fleetd's configuration every machine starts from (its etcd_servers are replaced).
    pub config: Config,
    pub knobs: Knobs,
}

/// One simulated machine.
pub struct SimMachine {
    pub id: String,
    pub metadata: BTreeMap<String, String>,
    /// Its systemd: what it runs is the ground truth of the invariant checks.
    pub systemd: FakeUnitManager,
    /// Its agent's and engine's metrics, its own as in a real fleetd: the reconciles of one
    /// engine (a new leader's) are told apart from the others'.
    pub metrics: fleet_metrics::Metrics,
    running: Option<Machine>,
    api: Option<ApiServing>,
}

/// The API one machine serves.
struct ApiServing {
    host: ApiHost,
    registered: JoinHandle<()>,
    endpoint: String,
}

impl SimMachine {
    pub fn is_live(&self) -> bool {
        self.running.is_some()
    }

    /// The API endpoint, if this machine serves one.
    pub fn api_endpoint(&self) -> Option<&str> {
        self.api.as_ref().map(|a| a.endpoint.as_str())
    }
}

/// The simulated cluster.
pub struct Cluster {
    pub machines: Vec<SimMachine>,
    /// The APIs' metrics, shared by the machines serving one (each machine's agent and
    /// engine have their own: [`SimMachine::metrics`]).
    pub metrics: fleet_metrics::Metrics,
    pub channels: usize,
    /// The machines' units directories (the agent keeps its token beside them).
    _dir: tempfile::TempDir,
}

/// Machine `index`'s ID, 32 hex digits as in /etc/machine-id; the index leads, so the 8
/// digits fleetctl shows tell machines apart.
pub fn machine_id(index: usize) -> String {
    format!("{index:08x}5e1a{index:020x}")
}

impl Cluster {
    /// Starts every machine against etcd at `endpoint`.
    pub async fn start(opts: &ClusterOptions, endpoint: &str) -> Result<Cluster> {
        let dir = tempfile::tempdir().context("creating the machines' directory")?;
        let metrics = fleet_metrics::Metrics::new();
        let per_channel = opts.machines_per_channel.max(1);
        let mut machines = Vec::with_capacity(opts.machines);
        let mut registry: Option<EtcdRegistry> = None;
        let mut channels = 0;
        for index in 0..opts.machines {
            if index % per_channel == 0 {
                let etcd = EtcdConfig {
                    endpoints: vec![endpoint.to_string()],
                    key_prefix: opts.config.etcd_key_prefix.clone(),
                    request_timeout: opts.config.etcd_request_timeout,
                    ..EtcdConfig::default()
                };
                registry = Some(
                    EtcdRegistry::connect(&etcd)
                        .await
                        .with_context(|| format!("connecting to etcd at {endpoint}"))?,
                );
                channels += 1;
            }
            let registry = registry.clone().context("no etcd channel")?;
            let id = machine_id(index);
            let metadata = machine_metadata(index);
            let mut cfg = opts.config.clone();
            cfg.etcd_servers = vec![endpoint.to_string()];
            cfg.metadata = metadata.clone();
            cfg.public_ip = format!(
                "10.{}.{}.{}",
                index / 65536,
                (index / 256) % 256,
                index % 256
            );
            cfg.units_directory = dir.path().join(&id).join("units");
            if opts.engine_candidates.is_some_and(|n| index >= n) {
                cfg.disable_engine = true;
            }
            let systemd = FakeUnitManager::with_knobs(opts.knobs.clone());
            let own_metrics = fleet_metrics::Metrics::new();
            let api = if index < opts.api_hosts.max(1) {
                Some(serve_api(&cfg, &registry, &id, metrics.clone()).await?)
            } else {
                None
            };
            let running = machine::spawn(
                &cfg,
                machine::Wiring {
                    machine_id: id.clone(),
                    public_ip: cfg.public_ip.clone(),
                    registry,
                    systemd: Arc::new(systemd.clone()),
                    metrics: own_metrics.clone(),
                },
                CancellationToken::new(),
            );
            machines.push(SimMachine {
                id,
                metadata,
                systemd,
                metrics: own_metrics,
                running: Some(running),
                api,
            });
            // let the ones started so far register before the next batch
            if index % 50 == 49 {
                tokio::task::yield_now().await;
            }
        }
        Ok(Cluster {
            machines,
            metrics,
            channels,
            _dir: dir,
        })
    }

    pub fn live(&self) -> impl Iterator<Item = &SimMachine> {
        self.machines.iter().filter(|m| m.is_live())
    }

    /// The API endpoint of the first live machine serving one.
    pub fn api_endpoint(&self) -> Option<String> {
        self.live()
            .find_map(|m| m.api_endpoint().map(str::to_string))
    }

    pub fn index_of(&self, id: &str) -> Option<usize> {
        self.machines.iter().position(|m| m.id == id)
    }

    /// Machine `index` dies as a crash would: its agent and engine end where they are
    /// (no purge, no lease revoked, no resignation) and its API closes.
    pub async fn crash(&mut self, index: usize) {
        let Some(m) = self.machines.get_mut(index) else {
            return;
        };
        if let Some(running) = m.running.take() {
            running.crash();
        }
        if let Some(mut api) = m.api.take() {
            api.registered.abort();
            api.host.shutdown().await;
        }
    }

    /// Live machine IDs by unit, for every unit that is active (or, with `failed`, failed:
    /// started and failed by the failure rate) on a live machine; a unit on two machines is
    /// listed under both.
    pub fn placed(&self, failed: bool) -> BTreeMap<String, Vec<String>> {
        let mut by_unit: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for m in self.live() {
            let mut units = m.systemd.units_in("active");
            if failed {
                units.extend(m.systemd.units_in("failed"));
            }
            for unit in units {
                by_unit.entry(unit).or_default().push(m.id.clone());
            }
        }
        by_unit
    }

    /// How many placements [`Self::placed`] would list (a unit on two machines counts
    /// twice), counted without copying a name.
    pub fn placed_count(&self, failed: bool) -> usize {
        self.live()
            .map(|m| {
                m.systemd.count_in("active")
                    + if failed {
                        m.systemd.count_in("failed")
                    } else {
                        0
                    }
            })
            .sum()
    }

    /// How many units are failed on live machines.
    pub fn failed_count(&self) -> usize {
        self.live()
            .map(|m| m.systemd.units_in("failed").len())
            .sum()
    }

    /// The IDs of the live machines.
    pub fn live_ids(&self) -> BTreeSet<String> {
        self.live().map(|m| m.id.clone()).collect()
    }

    /// The reconcile rounds so far of machine `id`'s engine (0 for an unknown machine).
    pub fn reconciles_of(&self, id: &str) -> f64 {
        self.machines.iter().find(|m| m.id == id).map_or(0.0, |m| {
            crate::etcd::sum_metric(&m.metrics.encode(), "fleet_engine_reconcile_count_total")
        })
    }

    /// How long machine `id`'s engine has spent reconciling so far, and in how many rounds.
    pub fn reconcile_time_of(&self, id: &str) -> crate::SumCount {
        self.machines
            .iter()
            .find(|m| m.id == id)
            .map_or_else(crate::SumCount::default, |m| {
                let text = m.metrics.encode();
                crate::SumCount(
                    crate::etcd::sum_metric(&text, "fleet_engine_reconcile_duration_second_sum"),
                    crate::etcd::sum_metric(&text, "fleet_engine_reconcile_duration_second_count"),
                )
            })
    }

    /// The reconcile rounds so far of every machine's engine, by machine ID.
    pub fn reconciles(&self) -> BTreeMap<String, f64> {
        self.machines
            .iter()
            .map(|m| {
                let text = m.metrics.encode();
                let n = crate::etcd::sum_metric(&text, "fleet_engine_reconcile_count_total");
                (m.id.clone(), n)
            })
            .collect()
    }

    /// Stops every live machine without purging (its units keep "running", its leases
    /// expire with etcd) and closes the APIs.
    pub async fn shutdown(mut self) {
        for index in 0..self.machines.len() {
            if let Some(api) = self.machines[index].api.take() {
                api_host::unavailable(&api.host.availability(), api.registered).await;
                let mut host = api.host;
                host.shutdown().await;
            }
            if let Some(running) = self.machines[index].running.take() {
                running.crash();
            }
        }
    }
}

/// The API of machine `id` on a free loopback port, as fleetd serves it: 503 until the
/// machine shows as registered.
async fn serve_api(
    cfg: &Config,
    registry: &EtcdRegistry,
    id: &str,
    metrics: fleet_metrics::Metrics,
) -> Result<ApiServing> {
    let listener = fleet_api::bind_tcp("127.0.0.1:0")
        .await
        .context("binding the API on loopback")?;
    let addr = listener.tcp_addr().context("the API listener's address")?;
    let placeholder: Arc<dyn Registry> = Arc::new(fleet_registry::MemoryRegistry::new());
    let mut host = ApiHost::new(vec![listener], placeholder);
    // (its requests to etcd counted with the API's metrics, apart from the agents' and
    // engines' on the same channel)
    let registry = registry.clone().with_metrics(metrics.clone());
    let api_registry: Arc<dyn Registry> = Arc::new(registry.clone());
    host.rebuild(
        api_registry.clone(),
        machine::api_config(cfg, &registry, metrics),
        None,
    )
    .await;
    let registered = tokio::spawn(api_host::available_once_registered(
        api_registry,
        id.to_string(),
        host.availability(),
    ));
    Ok(ApiServing {
        host,
        registered,
        endpoint: format!("http://{addr}"),
    })
}

/// Waits up to `timeout` for `cond`, polling every `every`; whether it held.
pub async fn wait_until(
    timeout: Duration,
    every: Duration,
    mut cond: impl FnMut() -> bool,
) -> bool {
    let end = tokio::time::Instant::now() + timeout;
    loop {
        if cond() {
            return true;
        }
        if tokio::time::Instant::now() >= end {
            return false;
        }
        tokio::time::sleep(every).await;
    }
}
