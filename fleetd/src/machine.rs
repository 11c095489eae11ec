//! One machine's fleetd components — its agent (registration under a lease, the scoped watch,
//! systemd) and its engine candidate — started from a configuration, the registry connection
//! and a `UnitManager`. fleetd's main runs exactly this for its machine, and `fleet-sim` for
//! each of its simulated ones, so a simulation cannot drift from what fleetd wires.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use fleet_config::Config;
use fleet_registry::{EtcdRegistry, RegistryError};
use fleet_systemd::UnitManager;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// What one machine's components are made of, besides its configuration.
pub struct Wiring {
    /// This machine's ID (fleetd: /etc/machine-id).
    pub machine_id: String,
    /// The address this machine publishes.
    pub public_ip: String,
    /// The registry: its own connection (fleetd) or a clone sharing one with other machines
    /// (fleet-sim); the agent and the engine each take their own leases through it.
    pub registry: EtcdRegistry,
    /// systemd (fleetd: D-Bus; fleet-sim: the in-memory manager).
    pub systemd: Arc<dyn UnitManager>,
    /// Where the components record their metrics.
    pub metrics: fleet_metrics::Metrics,
}

/// The running agent and engine of one machine.
pub struct Machine {
    agent: JoinHandle<Result<(), RegistryError>>,
    engine: Option<JoinHandle<()>>,
    /// Stops agent and engine.
    shutdown: CancellationToken,
    /// Whether the agent purges this machine's units when it stops: set by
    /// [`Machine::stop`] just before it cancels `shutdown`.
    purge: Arc<AtomicBool>,
}

/// The agent's settings of `cfg` for `machine_id` publishing `public_ip`.
pub fn agent_config(cfg: &Config, machine_id: &str, public_ip: &str) -> fleet_agent::AgentConfig {
    fleet_agent::AgentConfig {
        machine_id: machine_id.to_string(),
        public_ip: public_ip.to_string(),
        metadata: cfg.metadata.clone(),
        agent_ttl: cfg.agent_ttl,
        units_directory: cfg.units_directory.clone(),
        disable_watches: cfg.disable_watches,
        version: env!("CARGO_PKG_VERSION").to_string(),
    }
}

/// The engine's settings of `cfg` for `machine_id`.
pub fn engine_config(cfg: &Config, machine_id: &str) -> fleet_engine::EngineConfig {
    fleet_engine::EngineConfig {
        machine_id: machine_id.to_string(),
        reconcile_interval: cfg.engine_reconcile_interval,
        agent_ttl: cfg.agent_ttl,
        disable_watches: cfg.disable_watches,
        campaign_spread: fleet_engine::CAMPAIGN_SPREAD,
    }
}

/// The API's settings of `cfg` serving `registry` (its event stream included), without TLS
/// (fleetd adds its certificates on the listeners).
pub fn api_config(
    cfg: &Config,
    registry: &EtcdRegistry,
    metrics: fleet_metrics::Metrics,
) -> fleet_api::ApiConfig {
    fleet_api::ApiConfig {
        token_limit: u16::try_from(cfg.token_limit).unwrap_or(u16::MAX),
        metrics,
        events: Some(fleet_api::EventFeed(Arc::new(registry.clone()))),
        dashboard: cfg.enable_dashboard,
        ..Default::default()
    }
}

/// Starts the agent and, unless `disable_engine`, the engine candidate of one machine; they
/// run until `shutdown` is cancelled (or [`Machine::stop`]).
pub fn spawn(cfg: &Config, wiring: Wiring, shutdown: CancellationToken) -> Machine {
    let purge = Arc::new(AtomicBool::new(true));
    let agent = tokio::spawn(fleet_agent::run(
        Arc::new(wiring.registry.clone()),
        wiring.systemd,
        agent_config(cfg, &wiring.machine_id, &wiring.public_ip),
        wiring.metrics.clone(),
        shutdown.clone(),
        purge.clone(),
    ));
    let engine = (!cfg.disable_engine).then(|| {
        tokio::spawn(fleet_engine::run(
            Arc::new(wiring.registry),
            engine_config(cfg, &wiring.machine_id),
            wiring.metrics,
            shutdown.clone(),
        ))
    });
    Machine {
        agent,
        engine,
        shutdown,
        purge,
    }
}

impl Machine {
    /// Whether the agent stopped on its own (e.g. it found its machine ID taken).
    pub fn agent_finished(&self) -> bool {
        self.agent.is_finished()
    }

    /// Stops agent and engine and waits for them; with `purge` the agent also stops and
    /// removes this machine's units and revokes its lease (a shutdown), without it they keep
    /// running (a reload). The engine resigns its leadership either way.
    pub async fn stop(self, purge: bool) -> anyhow::Result<()> {
        self.purge.store(purge, Ordering::SeqCst);
        self.shutdown.cancel();
        if let Some(engine) = self.engine {
            let _ = engine.await;
        }
        match self.agent.await {
            Ok(r) => r.map_err(anyhow::Error::from),
            Err(e) => Err(anyhow::anyhow!("agent task: {e}")),
        }
    }

    /// Ends agent and engine where they are, as a crash would: nothing is purged, withdrawn
    /// or resigned; their leases are no longer refreshed and expire after their ttl.
    pub fn crash(self) {
        self.agent.abort();
        if let Some(engine) = self.engine {
            engine.abort();
        }
    }
}
