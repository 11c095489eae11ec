//! fleetd: the fleet daemon of one machine — agent, engine and HTTP API — wired together.
//!
//! Order of start: configuration (fully validated), logging, machine identity, etcd and
//! systemd connections, API listeners, then the agent and engine loops. SIGTERM/SIGINT stop
//! everything and purge this machine's units (they move elsewhere); SIGHUP re-reads the
//! configuration and restarts the components, the API included (on the same listeners),
//! without touching running units; SIGUSR1 prints the agent's state as JSON.

use std::future::Future;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::Parser;
use fleet_config::Config;
use fleet_registry::{EtcdConfig, EtcdRegistry};
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

mod dump;
mod public_ip;

use fleetd::api_host;
use fleetd::cli::Args;
use fleetd::limits;
use fleetd::machine::{self, Machine};

/// mimalloc, not glibc's malloc: in a listing of 100,000 units glibc's allocator had some 45 %
/// of the samples, and with mimalloc the API's CPU per listing fell to a third; see
/// Documentation/scaling.md.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// What `fleetd --version` prints: fleet's wording, which scripts parse.
fn version_line() -> String {
    format!("fleetd version {}", env!("CARGO_PKG_VERSION"))
}

fn main() -> ExitCode {
    // fleet's flags were Go flags: accept `-config x` and `-version` as well.
    let argv = std::env::args().map(|a| match a.as_str() {
        "-config" | "-version" => format!("-{a}"),
        _ if a.starts_with("-config=") => format!("-{a}"),
        _ => a,
    });
    let args = Args::parse_from(argv);
    match args.command.as_deref() {
        Some("version") => {
            println!("{}", version_line());
            return ExitCode::SUCCESS;
        }
        Some(_) => {
            eprintln!("fleetd takes no arguments. Did you mean to invoke fleetctl instead?");
            return ExitCode::from(1);
        }
        None if args.version => {
            println!("{}", version_line());
            return ExitCode::SUCCESS;
        }
        None => {}
    }
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

/// What lives as long as fleetd, whatever configuration runs.
struct Daemon {
    machine_id: String,
    metrics: fleet_api::Metrics,
    /// The API's listeners and server, rebuilt by each start of the components.
    api: tokio::sync::Mutex<api_host::ApiHost>,
    /// The API's switch between answering and 503.
    available: Arc<tokio::sync::watch::Sender<bool>>,
    /// The registry of the running configuration, for SIGUSR1.
    registry: std::sync::Mutex<Option<EtcdRegistry>>,
    /// For components that ask for a restart (a changed address).
    control: mpsc::Sender<Control>,
}

async fn run(args: Args, cfg: Config) -> Result<()> {
    for w in &cfg.warnings {
        warn!("{w}");
    }
    let machine_id = machine_id()?;
    let (control_tx, control) = mpsc::channel(4);
    forward_signals(control_tx.clone())?;
    // the process's metrics: the etcd registry, the agent, the engine and the API record
    // theirs there as things happen, and the API serves them
    let metrics = fleet_metrics::global().clone();
    limits::raise_open_files(fleet_api::ApiConfig::default().max_open_connections());
    let listeners = api_listeners(&cfg).await?;
    if listeners.is_empty() {
        warn!(
            "no API listeners: not socket-activated and api_listen is not set; the HTTP API is off"
        );
    }
    // The listeners serve for the daemon's whole life: 503 until this machine is registered,
    // then each start of agent and engine (SIGHUP) rebuilds the API on them.
    let api = api_host::ApiHost::new(listeners, Arc::new(fleet_registry::MemoryRegistry::new()));
    let daemon = Arc::new(Daemon {
        machine_id,
        metrics,
        available: api.availability(),
        api: tokio::sync::Mutex::new(api),
        registry: std::sync::Mutex::new(None),
        control: control_tx,
    });
    dump_on_sigusr1(daemon.clone())?;

    let start_components = |cfg: Config| {
        let daemon = daemon.clone();
        async move { start(&cfg, &daemon).await }
    };
    let result = supervise(
        cfg,
        start_components,
        || load_config(&args),
        control,
        RESTART_BACKOFF,
    )
    .await;
    daemon.available.send_replace(false);
    daemon.api.lock().await.shutdown().await;
    result
}

/// SIGUSR1: the agent's state as one line of JSON on stdout, as fleet v1.0 printed it.
fn dump_on_sigusr1(daemon: Arc<Daemon>) -> Result<()> {
    let mut usr1 = signal(SignalKind::user_defined1()).context("installing SIGUSR1 handler")?;
    tokio::spawn(async move {
        while usr1.recv().await.is_some() {
            info!("Dumping server state");
            let registry = daemon.registry.lock().ok().and_then(|r| r.clone());
            let Some(registry) = registry else {
                error!("Failed to dump server state: agent and engine are not running");
                continue;
            };
            match dump::collect(&registry, &daemon.machine_id).await {
                Ok(json) => {
                    use std::io::Write;
                    let mut out = std::io::stdout().lock();
                    if let Err(e) = writeln!(out, "{json}").and_then(|()| out.flush()) {
                        error!("Failed to dump server state: {e}");
                    }
                }
                Err(e) => error!("Failed to dump server state: {e:#}"),
            }
        }
    });
    Ok(())
}

/// What the signals tell the main loop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Control {
    /// SIGTERM or SIGINT: stop, purging this machine's units.
    Stop,
    /// SIGHUP: re-read the configuration and restart agent, engine and API with it.
    Reload,
    /// This machine's detected address changed: restart agent and engine with the same
    /// configuration, so that they publish the new one.
    Refresh,
}

/// Installs the handlers of SIGTERM, SIGINT and SIGHUP, and turns the signals into
/// [`Control`]s sent to `tx`.
fn forward_signals(tx: mpsc::Sender<Control>) -> Result<()> {
    let mut term = signal(SignalKind::terminate()).context("installing SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing SIGINT handler")?;
    let mut hup = signal(SignalKind::hangup()).context("installing SIGHUP handler")?;
    tokio::spawn(async move {
        loop {
            let control = tokio::select! {
                _ = term.recv() => Control::Stop,
                _ = int.recv() => Control::Stop,
                _ = hup.recv() => Control::Reload,
            };
            if tx.send(control).await.is_err() {
                return;
            }
        }
    });
    Ok(())
}

/// Least and most time between two attempts to start a configuration again.
const RESTART_BACKOFF: (Duration, Duration) = (Duration::from_secs(1), Duration::from_secs(30));

/// Agent and engine of one configuration, as the main loop sees them.
trait Running: Sized {
    /// Resolves only if they stop on their own (e.g. the agent found a duplicate machine ID).
    async fn failed(&self) -> anyhow::Error;
    /// Stops them; with `purge`, the agent also stops and removes this machine's units and
    /// revokes its lease (a shutdown), without it they keep running (a reload).
    async fn stop(self, purge: bool) -> Result<()>;
}

/// Runs the components of `cfg` (`start`) until a [`Control::Stop`], restarting them with a
/// new configuration (`reload`) on [`Control::Reload`], with the same one on
/// [`Control::Refresh`].
///
/// Only the first start may end fleetd. Once a configuration ran, a reload never does: a new
/// configuration that fails to start gives way to the one before, and a configuration that
/// cannot start (etcd or D-Bus away) is tried again after `backoff` (doubling from its first
/// to its second value); a SIGHUP meanwhile tries the configuration read then. A stop while
/// nothing runs ends fleetd with an error: there was nothing to purge the units with.
async fn supervise<R, S, F>(
    mut cfg: Config,
    mut start: S,
    mut reload: impl FnMut() -> Result<Config>,
    mut control: mpsc::Receiver<Control>,
    backoff: (Duration, Duration),
) -> Result<()>
where
    R: Running,
    S: FnMut(Config) -> F,
    F: Future<Output = Result<R>>,
{
    // The configuration that ran before the one being started, to go back to if it fails.
    let mut previous: Option<Config> = None;
    let mut ran = false;
    let mut delay = backoff.0;
    loop {
        let running = match start(cfg.clone()).await {
            Ok(running) => running,
            Err(e) => {
                if let Some(old) = previous.take() {
                    error!("the new configuration failed to start, keeping the old one: {e:#}");
                    cfg = old;
                    continue;
                }
                if !ran {
                    return Err(e);
                }
                error!(retry_in = ?delay, "starting agent and engine failed: {e:#}");
                let control = tokio::select! {
                    () = tokio::time::sleep(delay) => None,
                    control = control.recv() => Some(control.unwrap_or(Control::Stop)),
                };
                delay = (delay * 2).min(backoff.1);
                match control {
                    // the next start detects the address anew anyway
                    None | Some(Control::Refresh) => {}
                    Some(Control::Stop) => {
                        return Err(e.context(
                            "stopped while agent and engine could not start: this machine's \
                             units were not purged",
                        ));
                    }
                    Some(Control::Reload) => {
                        info!("Reloading configuration");
                        match reload() {
                            Ok(new) => {
                                previous = Some(std::mem::replace(&mut cfg, new));
                                for w in &cfg.warnings {
                                    warn!("{w}");
                                }
                            }
                            Err(e) => error!("keeping the old configuration: {e:#}"),
                        }
                    }
                }
                continue;
            }
        };
        ran = true;
        delay = backoff.0;
        // Wait for a signal; a SIGHUP with a bad configuration keeps everything as it is.
        let new_cfg = loop {
            let next = tokio::select! {
                control = control.recv() => control.unwrap_or(Control::Stop),
                failed = running.failed() => return running.stop(true).await.and(Err(failed)),
            };
            match next {
                Control::Stop => break None,
                Control::Refresh => break Some(cfg.clone()),
                Control::Reload => {}
            }
            info!("Reloading configuration");
            match reload() {
                Ok(new) => break Some(new),
                Err(e) => error!("keeping the old configuration: {e:#}"),
            }
        };
        let Some(new) = new_cfg else {
            info!("Gracefully shutting down");
            return running.stop(true).await;
        };
        let _ = running.stop(false).await;
        previous = Some(std::mem::replace(&mut cfg, new));
        for w in &cfg.warnings {
            warn!("{w}");
        }
        info!("Restarting server components");
    }
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
    for l in &listeners {
        info!("API listening on {}", l.describe());
    }
    Ok(listeners)
}

/// The API's TLS certificates of `cfg`, if it names them (read anew by each start, so a
/// SIGHUP picks up renewed files).
fn api_tls(cfg: &Config) -> Result<Option<fleet_api::TlsConfig>> {
    if cfg.api_certfile.is_empty() {
        return Ok(None);
    }
    let tls = fleet_api::load_tls(&fleet_api::TlsFiles {
        cert_file: PathBuf::from(&cfg.api_certfile),
        key_file: PathBuf::from(&cfg.api_keyfile),
        client_ca_file: non_empty(&cfg.api_client_cafile).map(PathBuf::from),
    })?;
    Ok(Some(tls))
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
    /// Agent and engine, as fleetd's library starts them.
    machine: Machine,
    /// Makes the API available once this machine shows as registered.
    registered: tokio::task::JoinHandle<()>,
    /// Looks at this machine's address every minute (when `public_ip` is not set).
    refresher: Option<tokio::task::JoinHandle<()>>,
    /// The API answers 503 from the moment these components stop.
    available: Arc<tokio::sync::watch::Sender<bool>>,
}

impl Running for Components {
    async fn failed(&self) -> anyhow::Error {
        while !self.machine.agent_finished() {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        anyhow::anyhow!("agent stopped")
    }

    async fn stop(self, purge: bool) -> Result<()> {
        // as fleet: the API says 503 while its components are down or restarting
        api_host::unavailable(&self.available, self.registered).await;
        if let Some(r) = &self.refresher {
            r.abort();
        }
        self.machine.stop(purge).await
    }
}

/// Starts agent and engine of `cfg`, and rebuilds the API on its listeners with `cfg`'s
/// registry, `token_limit` and certificates (fleet v1.0 built a new API server, on the same
/// listeners, with each configuration). The API answers 503 until this machine registers.
async fn start(cfg: &Config, daemon: &Daemon) -> Result<Components> {
    let machine_id = daemon.machine_id.as_str();
    let registry = connect_registry(cfg).await?;
    let systemd = fleet_systemd::SystemdManager::connect(fleet_systemd::ManagerConfig {
        units_directory: cfg.units_directory.clone(),
        user: cfg.systemd_user,
    })
    .await
    .context("connecting to systemd over D-Bus")?;
    let tls = api_tls(cfg)?;
    let api_cfg = machine::api_config(cfg, &registry, daemon.metrics.clone());
    let api_registry: Arc<dyn fleet_registry::Registry> = Arc::new(registry.clone());
    daemon.available.send_replace(false);
    daemon
        .api
        .lock()
        .await
        .rebuild(api_registry.clone(), api_cfg, tls.as_ref())
        .await;
    if let Ok(mut current) = daemon.registry.lock() {
        *current = Some(registry.clone());
    }
    let public_ip = if cfg.public_ip.is_empty() {
        public_ip::detect_off_runtime(Arc::new(cfg.etcd_servers.clone()), public_ip::detect).await
    } else {
        cfg.public_ip.clone()
    };
    let refresher = cfg.public_ip.is_empty().then(|| {
        tokio::spawn(public_ip::refresh(
            cfg.etcd_servers.clone(),
            public_ip.clone(),
            public_ip::REFRESH_INTERVAL,
            public_ip::detect,
            daemon.control.clone(),
        ))
    });
    info!(machine = machine_id, %public_ip, "starting fleetd {}", env!("CARGO_PKG_VERSION"));
    let machine = machine::spawn(
        cfg,
        machine::Wiring {
            machine_id: machine_id.to_string(),
            public_ip,
            registry,
            systemd: Arc::new(systemd),
            metrics: daemon.metrics.clone(),
        },
        CancellationToken::new(),
    );
    let registered = tokio::spawn(api_host::available_once_registered(
        api_registry,
        machine_id.to_string(),
        daemon.available.clone(),
    ));
    Ok(Components {
        machine,
        registered,
        refresher,
        available: daemon.available.clone(),
    })
}

fn non_empty(s: &str) -> Option<&str> {
    (!s.is_empty()).then_some(s)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    /// What the fake components saw: starts (by configuration) and stops (with purge or not).
    #[derive(Debug, Default)]
    struct Log {
        events: Vec<String>,
    }

    struct Fake {
        name: String,
        log: Arc<Mutex<Log>>,
    }

    impl Running for Fake {
        async fn failed(&self) -> anyhow::Error {
            std::future::pending().await
        }

        async fn stop(self, purge: bool) -> Result<()> {
            let mut log = self.log.lock().expect("log");
            log.events.push(format!("stop {} purge={purge}", self.name));
            Ok(())
        }
    }

    /// A configuration told apart by its public_ip.
    fn config(name: &str) -> Config {
        Config {
            public_ip: name.to_string(),
            ..Config::default()
        }
    }

    /// Starts fake components: the n-th start runs if `script[n]` says so (later ones if
    /// `then` does), and is logged with the seconds since the starter was made.
    fn starter(
        log: Arc<Mutex<Log>>,
        script: Vec<bool>,
        then: bool,
    ) -> impl FnMut(Config) -> std::future::Ready<Result<Fake>> {
        let epoch = tokio::time::Instant::now();
        let mut script = script.into_iter();
        move |cfg: Config| {
            let name = cfg.public_ip.clone();
            let runs = script.next().unwrap_or(then);
            log.lock().expect("log").events.push(format!(
                "start {name} {} at {}s",
                if runs { "runs" } else { "fails" },
                epoch.elapsed().as_secs()
            ));
            std::future::ready(if runs {
                Ok(Fake {
                    name,
                    log: log.clone(),
                })
            } else {
                Err(anyhow::anyhow!("cannot connect to D-Bus"))
            })
        }
    }

    /// Lets the loop run until it waits on a timer or the channel.
    async fn settle() {
        for _ in 0..100 {
            tokio::task::yield_now().await;
        }
    }

    /// SIGHUP with a configuration that fails to start while the old one cannot start
    /// either (D-Bus down): before, fleetd then exited without purging; now the old
    /// configuration is tried again with back-off until it runs.
    #[tokio::test(start_paused = true)]
    async fn a_reload_that_cannot_start_retries_the_old_configuration() {
        let log = Arc::new(Mutex::new(Log::default()));
        let (tx, rx) = mpsc::channel(4);
        let epoch = tokio::time::Instant::now();
        let loop_ = tokio::spawn(supervise(
            config("old"),
            starter(log.clone(), vec![true, false, false, false, false], true),
            || Ok(config("new")),
            rx,
            (Duration::from_secs(1), Duration::from_secs(30)),
        ));
        settle().await;
        tx.send(Control::Reload).await.expect("reload");
        // old fails 3 times after the reload: retried after 1, 2 and 4 s
        tokio::time::sleep(Duration::from_secs(60)).await;
        assert!(!loop_.is_finished(), "fleetd exited after a failed reload");
        let took = epoch.elapsed();
        tx.send(Control::Stop).await.expect("stop");
        loop_
            .await
            .expect("loop")
            .expect("a clean shutdown once the old configuration runs again");
        let events = log.lock().expect("log").events.join("\n");
        let want = [
            "start old runs",
            "stop old purge=false",
            "start new fails",
            "start old fails",
            "start old fails",
            "start old fails",
            "start old runs",
            "stop old purge=true",
        ];
        let got: Vec<String> = events
            .lines()
            .map(|l| l.split(" at ").next().unwrap_or(l).to_string())
            .collect();
        assert_eq!(got, want, "{events}");
        assert!(took >= Duration::from_secs(60));
    }

    #[tokio::test(start_paused = true)]
    async fn retries_back_off_and_a_reload_meanwhile_is_tried() {
        let log = Arc::new(Mutex::new(Log::default()));
        let (tx, rx) = mpsc::channel(4);
        let mut reloads = vec![Ok(config("third")), Ok(config("second"))];
        let loop_ = tokio::spawn(supervise(
            config("first"),
            starter(
                log.clone(),
                vec![true, false, false, false, false, false, false, false],
                true,
            ),
            move || {
                reloads
                    .pop()
                    .unwrap_or_else(|| Err(anyhow::anyhow!("no more")))
            },
            rx,
            (Duration::from_secs(1), Duration::from_secs(8)),
        ));
        settle().await;
        tx.send(Control::Reload).await.expect("reload");
        // second fails once, first 6 times: waits of 1, 2, 4, 8, 8 s, then a SIGHUP
        tokio::time::sleep(Duration::from_secs(24)).await;
        settle().await;
        tx.send(Control::Reload).await.expect("reload");
        settle().await;
        tx.send(Control::Stop).await.expect("stop");
        loop_.await.expect("loop").expect("clean shutdown");
        let events = log.lock().expect("log").events.clone();
        let want = [
            "start first runs at 0s",
            "stop first purge=false",
            "start second fails at 0s",
            "start first fails at 0s",
            "start first fails at 1s",
            "start first fails at 3s",
            "start first fails at 7s",
            "start first fails at 15s",
            "start first fails at 23s",
            "start third runs at 24s",
            "stop third purge=true",
        ];
        assert_eq!(events, want);
    }

    #[tokio::test(start_paused = true)]
    async fn a_stop_while_nothing_runs_ends_at_once_saying_units_were_not_purged() {
        let log = Arc::new(Mutex::new(Log::default()));
        let (tx, rx) = mpsc::channel(4);
        let loop_ = tokio::spawn(supervise(
            config("old"),
            starter(log.clone(), vec![true], false),
            || Ok(config("new")),
            rx,
            (Duration::from_secs(1), Duration::from_secs(30)),
        ));
        settle().await;
        tx.send(Control::Reload).await.expect("reload");
        tokio::time::sleep(Duration::from_secs(100)).await;
        let before = tokio::time::Instant::now();
        tx.send(Control::Stop).await.expect("stop");
        let err = loop_.await.expect("loop").expect_err("nothing purged");
        assert_eq!(
            before.elapsed(),
            Duration::ZERO,
            "the stop waited for the back-off"
        );
        assert!(
            format!("{err:#}").contains("units were not purged"),
            "{err:#}"
        );
    }

    /// A changed address (public_ip::refresh) restarts the components with the same
    /// configuration, without re-reading the file and without purging.
    #[tokio::test(start_paused = true)]
    async fn a_refresh_restarts_with_the_same_configuration() {
        let log = Arc::new(Mutex::new(Log::default()));
        let (tx, rx) = mpsc::channel(4);
        let loop_ = tokio::spawn(supervise(
            config("only"),
            starter(log.clone(), vec![], true),
            || Err(anyhow::anyhow!("the file is not read on a refresh")),
            rx,
            (Duration::from_secs(1), Duration::from_secs(30)),
        ));
        settle().await;
        tx.send(Control::Refresh).await.expect("refresh");
        settle().await;
        tx.send(Control::Stop).await.expect("stop");
        loop_.await.expect("loop").expect("clean shutdown");
        let events = log.lock().expect("log").events.clone();
        assert_eq!(
            events,
            [
                "start only runs at 0s",
                "stop only purge=false",
                "start only runs at 0s",
                "stop only purge=true"
            ]
        );
    }

    #[tokio::test(start_paused = true)]
    async fn the_first_start_failing_ends_fleetd() {
        let log = Arc::new(Mutex::new(Log::default()));
        let (_tx, rx) = mpsc::channel(4);
        let err = supervise(
            config("first"),
            starter(log.clone(), vec![false], true),
            || Ok(config("new")),
            rx,
            (Duration::from_secs(1), Duration::from_secs(30)),
        )
        .await
        .expect_err("the first start failed");
        assert!(err.to_string().contains("D-Bus"), "{err}");
    }
}
