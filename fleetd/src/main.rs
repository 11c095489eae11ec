//! fleetd: the fleet daemon of one machine — agent, engine and HTTP API — wired together.
//!
//! Order of start: configuration (fully validated), logging, machine identity, etcd and
//! systemd connections, API listeners, then the agent and engine loops. SIGTERM/SIGINT stop
//! everything and purge this machine's units (they move elsewhere); SIGHUP re-reads the
//! configuration and restarts the components without touching running units.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::Parser;
use fleet_config::Config;
use fleet_registry::{EtcdConfig, EtcdRegistry};
use tokio::signal::unix::{SignalKind, signal};
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

mod limits;

#[derive(Parser)]
#[command(
    name = "fleetd",
    version,
    about = "fleet daemon: runs units of a fleet cluster on this machine"
)]
struct Args {
    /// Path to config file. fleetd looks for /etc/fleet/fleet.conf by default
    #[arg(long)]
    config: Option<PathBuf>,
}

fn main() -> ExitCode {
    // fleet's flags were Go flags: accept `-config x` and `-version` as well.
    let argv = std::env::args().map(|a| match a.as_str() {
        "-config" | "-version" => format!("-{a}"),
        _ if a.starts_with("-config=") => format!("-{a}"),
        _ => a,
    });
    let args = Args::parse_from(argv);
    let cfg = match load_config(&args) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("fleetd: {e:#}");
            return ExitCode::from(1);
        }
    };
    init_logging(&cfg);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("fleetd: cannot start the runtime: {e}");
            return ExitCode::from(1);
        }
    };
    match runtime.block_on(run(args, cfg)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            error!("{e:#}");
            eprintln!("fleetd: {e:#}");
            ExitCode::from(1)
        }
    }
}

fn load_config(args: &Args) -> Result<Config> {
    Ok(Config::load(args.config.as_deref(), std::env::vars())?)
}

fn init_logging(cfg: &Config) {
    let default = if cfg.verbosity > 0 { "debug" } else { "info" };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        tracing_subscriber::EnvFilter::new(format!(
            "{default},h2=info,tower=info,hyper=info,tonic=info"
        ))
    });
    // journald adds its own timestamps; keep lines short
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .without_time()
        .with_target(false)
        .with_ansi(false)
        .init();
}

fn machine_id() -> Result<String> {
    let id = std::fs::read_to_string("/etc/machine-id")
        .context("unable to determine local machine ID: reading /etc/machine-id")?;
    let id = id.trim().to_string();
    if id.is_empty() {
        bail!("unable to determine local machine ID: /etc/machine-id is empty");
    }
    Ok(id)
}

/// The address this machine uses to reach etcd: a connected UDP socket's local address
/// (connecting a UDP socket sends nothing).
fn detect_public_ip(etcd: &[String]) -> Option<String> {
    let first = etcd.first()?;
    let hostport = first.split("://").nth(1)?.trim_end_matches('/');
    let sock = std::net::UdpSocket::bind("0.0.0.0:0").ok()?;
    sock.connect(hostport).ok()?;
    let ip = sock.local_addr().ok()?.ip();
    (!ip.is_loopback() && !ip.is_unspecified()).then(|| ip.to_string())
}

async fn run(args: Args, mut cfg: Config) -> Result<()> {
    for w in &cfg.warnings {
        warn!("{w}");
    }
    let machine_id = machine_id()?;
    let mut term = signal(SignalKind::terminate()).context("installing SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing SIGINT handler")?;
    let mut hup = signal(SignalKind::hangup()).context("installing SIGHUP handler")?;
    limits::raise_open_files(fleet_api::ApiConfig::default().max_open_connections());
    let listeners = api_listeners(&cfg).await?;
    let metrics = fleet_api::Metrics::new();

    // The API serves for the daemon's whole life; SIGHUP restarts agent and engine only.
    let api_shutdown = CancellationToken::new();
    let api = if listeners.is_empty() {
        warn!(
            "no API listeners: not socket-activated and api_listen is not set; the HTTP API is off"
        );
        None
    } else {
        let registry = connect_registry(&cfg).await?;
        let api_cfg = fleet_api::ApiConfig {
            token_limit: u16::try_from(cfg.token_limit).unwrap_or(u16::MAX),
            metrics: metrics.clone(),
            ..Default::default()
        };
        let stop = api_shutdown.clone();
        Some(tokio::spawn(async move {
            if let Err(e) = fleet_api::serve(
                listeners,
                Arc::new(registry),
                api_cfg,
                stop.cancelled_owned(),
            )
            .await
            {
                error!("API server: {e}");
            }
        }))
    };

    // The configuration that ran before a SIGHUP: started again if the new one fails to start.
    let mut previous: Option<Config> = None;
    let result = 'run: loop {
        let shutdown = CancellationToken::new();
        let purge = Arc::new(AtomicBool::new(true));
        let started = start(
            &cfg,
            &machine_id,
            metrics.clone(),
            shutdown.clone(),
            purge.clone(),
        )
        .await;
        let components = match started {
            Ok(c) => c,
            Err(e) => match previous.take() {
                Some(old) => {
                    error!("the new configuration failed to start, keeping the old one: {e:#}");
                    cfg = old;
                    continue;
                }
                None => break Err(e),
            },
        };
        // Wait for a signal; a SIGHUP with a bad configuration keeps everything as it is.
        let new_cfg = loop {
            let reload = tokio::select! {
                _ = term.recv() => false,
                _ = int.recv() => false,
                _ = hup.recv() => true,
                failed = components.agent_failed() => {
                    shutdown.cancel();
                    break 'run components.join().await.and(Err(failed));
                }
            };
            if !reload {
                break None;
            }
            info!("Reloading configuration");
            match load_config(&args) {
                Ok(new) => break Some(new),
                Err(e) => error!("keeping the old configuration: {e:#}"),
            }
        };
        if let Some(new) = new_cfg {
            purge.store(false, Ordering::SeqCst);
            shutdown.cancel();
            let _ = components.join().await;
            previous = Some(std::mem::replace(&mut cfg, new));
            for w in &cfg.warnings {
                warn!("{w}");
            }
            info!("Restarting server components");
            continue;
        }
        info!("Gracefully shutting down");
        shutdown.cancel();
        break components.join().await;
    };
    api_shutdown.cancel();
    if let Some(api) = api {
        let _ = api.await;
    }
    result
}

/// Socket-activated listeners (fleet.socket), else the ones `api_listen` names.
async fn api_listeners(cfg: &Config) -> Result<Vec<fleet_api::Listener>> {
    let mut listeners =
        fleet_api::listeners_from_systemd().context("taking socket-activated listeners")?;
    if listeners.is_empty() {
        for addr in &cfg.api_listen {
            let l = match addr.strip_prefix("unix://") {
                Some(path) => fleet_api::bind_unix(std::path::Path::new(path))?,
                None => fleet_api::bind_tcp(addr).await?,
            };
            listeners.push(l);
        }
    }
    if !cfg.api_certfile.is_empty() {
        let tls = fleet_api::load_tls(&fleet_api::TlsFiles {
            cert_file: PathBuf::from(&cfg.api_certfile),
            key_file: PathBuf::from(&cfg.api_keyfile),
            client_ca_file: non_empty(&cfg.api_client_cafile).map(PathBuf::from),
        })?;
        listeners = listeners
            .into_iter()
            .map(|l| {
                if l.is_tcp() {
                    l.with_tls(tls.clone())
                } else {
                    Ok(l)
                }
            })
            .collect::<Result<_, _>>()?;
    }
    let tls = !cfg.api_certfile.is_empty();
    for l in &listeners {
        info!("API listening on {}", l.describe());
        if exposed_plain_http(l.tcp_addr(), tls) {
            // Loud, not refused: socket activation is fleet v1.0's way to add TCP listeners,
            // and api_listen only gets here with api_allow_plain_tcp=true (see fleet-config).
            error!(
                "INSECURE: the API on {} is plain HTTP and reachable from the network: anyone \
                 who can connect controls every machine of the cluster; set api_certfile, \
                 api_keyfile and api_client_cafile, or listen on loopback only",
                l.describe()
            );
        }
    }
    Ok(listeners)
}

/// A TCP listener without TLS on an address other than loopback.
fn exposed_plain_http(tcp: Option<std::net::SocketAddr>, tls: bool) -> bool {
    tcp.is_some_and(|a| !tls && !a.ip().is_loopback())
}

async fn connect_registry(cfg: &Config) -> Result<EtcdRegistry> {
    let etcd = EtcdConfig {
        endpoints: cfg.etcd_servers.clone(),
        key_prefix: cfg.etcd_key_prefix.clone(),
        request_timeout: cfg.etcd_request_timeout,
        ca_file: non_empty(&cfg.etcd_cafile).map(PathBuf::from),
        cert_file: non_empty(&cfg.etcd_certfile).map(PathBuf::from),
        key_file: non_empty(&cfg.etcd_keyfile).map(PathBuf::from),
        username: non_empty(&cfg.etcd_username).map(str::to_string),
        password: non_empty(&cfg.etcd_password).map(str::to_string),
    };
    EtcdRegistry::connect(&etcd)
        .await
        .context("connecting to etcd")
}

struct Components {
    agent: tokio::task::JoinHandle<Result<(), fleet_registry::RegistryError>>,
    engine: Option<tokio::task::JoinHandle<()>>,
    bridge: tokio::task::JoinHandle<()>,
}

impl Components {
    /// Resolves only if the agent stops on its own (e.g. a duplicate machine ID).
    async fn agent_failed(&self) -> anyhow::Error {
        while !self.agent.is_finished() {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        anyhow::anyhow!("agent stopped")
    }

    async fn join(self) -> Result<()> {
        self.bridge.abort();
        if let Some(engine) = self.engine {
            let _ = engine.await;
        }
        match self.agent.await {
            Ok(r) => r.map_err(anyhow::Error::from),
            Err(e) => Err(anyhow::anyhow!("agent task: {e}")),
        }
    }
}

async fn start(
    cfg: &Config,
    machine_id: &str,
    metrics: fleet_api::Metrics,
    shutdown: CancellationToken,
    purge: Arc<AtomicBool>,
) -> Result<Components> {
    let registry = connect_registry(cfg).await?;
    let systemd = fleet_systemd::SystemdManager::connect(fleet_systemd::ManagerConfig {
        units_directory: cfg.units_directory.clone(),
        user: cfg.systemd_user,
    })
    .await
    .context("connecting to systemd over D-Bus")?;
    let public_ip = if cfg.public_ip.is_empty() {
        detect_public_ip(&cfg.etcd_servers).unwrap_or_default()
    } else {
        cfg.public_ip.clone()
    };
    info!(machine = machine_id, %public_ip, "starting fleetd {}", env!("CARGO_PKG_VERSION"));
    let agent_stats = Arc::new(fleet_agent::AgentStats::default());
    let engine_stats = Arc::new(fleet_engine::EngineStats::default());
    let agent_cfg = fleet_agent::AgentConfig {
        machine_id: machine_id.to_string(),
        public_ip,
        metadata: cfg.metadata.clone(),
        agent_ttl: cfg.agent_ttl,
        units_directory: cfg.units_directory.clone(),
        disable_watches: cfg.disable_watches,
        version: env!("CARGO_PKG_VERSION").to_string(),
    };
    let agent = tokio::spawn(fleet_agent::run(
        registry.clone(),
        Arc::new(systemd),
        agent_cfg,
        agent_stats.clone(),
        shutdown.clone(),
        purge,
    ));
    let engine = (!cfg.disable_engine).then(|| {
        let engine_cfg = fleet_engine::EngineConfig {
            machine_id: machine_id.to_string(),
            reconcile_interval: cfg.engine_reconcile_interval,
            agent_ttl: cfg.agent_ttl,
            disable_watches: cfg.disable_watches,
        };
        tokio::spawn(fleet_engine::run(
            registry.clone(),
            engine_cfg,
            engine_stats.clone(),
            shutdown.clone(),
        ))
    });
    let bridge = tokio::spawn(bridge_metrics(metrics, agent_stats, engine_stats));
    Ok(Components {
        agent,
        engine,
        bridge,
    })
}

/// Carries the agent's and engine's counters into the Prometheus metrics every second.
async fn bridge_metrics(
    metrics: fleet_api::Metrics,
    agent: Arc<fleet_agent::AgentStats>,
    engine: Arc<fleet_engine::EngineStats>,
) {
    let mut seen = [0u64; 6];
    let mut leader_since = 0;
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let now = [
            engine.tasks.load(Ordering::Relaxed),
            engine.reconciles.load(Ordering::Relaxed),
            engine.reconcile_failures.load(Ordering::Relaxed),
            agent.tasks.load(Ordering::Relaxed),
            agent.task_failures.load(Ordering::Relaxed),
            agent.reconciles.load(Ordering::Relaxed),
        ];
        let took = Duration::from_micros(engine.last_reconcile_micros.load(Ordering::Relaxed));
        for _ in seen[0]..now[0] {
            metrics.engine_task("schedule");
        }
        for _ in seen[1]..now[1] {
            metrics.engine_reconcile_success(took);
        }
        for _ in seen[2]..now[2] {
            metrics.engine_reconcile_failure(fleet_api::EngineFailure::Run);
        }
        for _ in seen[3]..now[3] {
            metrics.agent_task("task");
        }
        for _ in seen[4]..now[4] {
            metrics.agent_task_failure("task");
        }
        seen = now;
        let since = engine.leader_since.load(Ordering::Relaxed);
        if since != 0 && since != leader_since {
            metrics.engine_leader();
        }
        leader_since = since;
    }
}

fn non_empty(s: &str) -> Option<&str> {
    (!s.is_empty()).then_some(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_http_off_loopback_is_flagged() {
        let addr = |s: &str| Some(s.parse::<std::net::SocketAddr>().expect("addr"));
        assert!(exposed_plain_http(addr("0.0.0.0:49153"), false));
        assert!(exposed_plain_http(addr("[::]:49153"), false));
        assert!(exposed_plain_http(addr("10.1.2.3:49153"), false));
        assert!(!exposed_plain_http(addr("10.1.2.3:49153"), true));
        assert!(!exposed_plain_http(addr("127.0.0.1:49153"), false));
        assert!(!exposed_plain_http(addr("[::1]:49153"), false));
        assert!(!exposed_plain_http(None, false));
    }
}
