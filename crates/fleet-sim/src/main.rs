//! `fleet-sim`: the simulator's command line. Starts etcd (or uses `--etcd`), runs the
//! benchmark of `fleet_sim::run`, prints progress and the API endpoint on stderr, and ends
//! with one line of `key=value` figures on stdout.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::Parser;
use fleet_sim::cluster::ClusterOptions;
use fleet_sim::etcd::OwnEtcd;
use fleet_sim::{Options, run};
use fleet_systemd::fake::Knobs;

/// fleetd's allocator (see fleetd's `main.rs`), so that the simulation costs what fleetd does.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// M simulated machines (fleetd's real wiring, in-memory systemd) against a real etcd.
#[derive(Debug, Parser)]
#[command(name = "fleet-sim", version)]
struct Args {
    /// Simulated machines.
    #[arg(long, default_value_t = 10)]
    machines: usize,
    /// Units to submit and launch (a mix: plain, template instances, global, Conflicts,
    /// MachineMetadata).
    #[arg(long, default_value_t = 1000)]
    units: usize,
    /// etcd to use; without it, one is started on a free loopback port.
    #[arg(long, value_name = "URL")]
    etcd: Option<String>,
    /// The quiet period after all units are active over which etcd's requests are counted
    /// (0: not measured).
    #[arg(long, default_value_t = 60)]
    quiet_secs: u64,
    /// fleetd's agent_ttl, in seconds.
    #[arg(long, default_value_t = 30)]
    agent_ttl_secs: u64,
    /// fleetd's etcd_request_timeout, in milliseconds.
    #[arg(long, default_value_t = 1000)]
    etcd_request_timeout_ms: u64,
    /// How long a start takes in a simulated systemd, in milliseconds.
    #[arg(long, default_value_t = 10)]
    start_latency_ms: u64,
    /// How long a stop takes in a simulated systemd, in milliseconds.
    #[arg(long, default_value_t = 10)]
    stop_latency_ms: u64,
    /// The share of starts (0 to 1) that end failed.
    #[arg(long, default_value_t = 0.0)]
    start_failure_rate: f64,
    /// Machines sharing one gRPC channel to etcd (each keeps its own leases and watches).
    #[arg(long, default_value_t = 50)]
    machines_per_channel: usize,
    /// Machines serving the API (the first ones; each on a loopback port).
    #[arg(long, default_value_t = 2)]
    api_hosts: usize,
    /// Machines running an engine candidate (the first ones); default: every machine, as
    /// in a real cluster (each candidate mirrors the engine's keys, leader or not).
    #[arg(long, value_name = "N")]
    engine_candidates: Option<usize>,
    /// The fleetctl binary timing the listings (default: beside this one in the target
    /// directory).
    #[arg(long, value_name = "PATH")]
    fleetctl: Option<PathBuf>,
    /// Bound on each wait (all active, the kills, the failover), in seconds.
    #[arg(long, default_value_t = 600)]
    settle_timeout_secs: u64,
    /// Keep the cluster running after the figures, for fleetctl, until interrupted.
    #[arg(long)]
    hold: bool,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("error"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("fleet-sim: cannot start the runtime: {e}");
            return ExitCode::from(1);
        }
    };
    match runtime.block_on(sim(args)) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(2),
        Err(e) => {
            eprintln!("fleet-sim: {e:#}");
            ExitCode::from(1)
        }
    }
}

/// fleetctl beside this binary (target/<profile>/), if built.
fn default_fleetctl() -> Option<PathBuf> {
    let exe = std::env::current_exe().ok()?;
    let path = exe.parent()?.join("fleetctl");
    path.exists().then_some(path)
}

/// Runs the benchmark; whether every invariant held.
async fn sim(args: Args) -> Result<bool> {
    if args.machines == 0 {
        bail!("--machines must be at least 1");
    }
    if !(0.0..=1.0).contains(&args.start_failure_rate) {
        bail!("--start-failure-rate must be between 0 and 1");
    }
    if args.engine_candidates == Some(0) {
        bail!("--engine-candidates must be at least 1");
    }
    if args.agent_ttl_secs == 0 {
        bail!("--agent-ttl-secs must be at least 1");
    }
    // a thousand machines hold thousands of watches and leases, but few descriptors; the
    // API and fleetctl's connections are the rest
    fleetd::limits::raise_open_files(4096);
    let own = match &args.etcd {
        Some(_) => None,
        None => Some(OwnEtcd::start()?),
    };
    let endpoint = match (&args.etcd, &own) {
        (Some(url), _) => url.clone(),
        (None, Some(etcd)) => etcd.endpoint().to_string(),
        (None, None) => bail!("no etcd"),
    };
    eprintln!("fleet-sim: etcd at {endpoint}");
    let fleetctl = args.fleetctl.clone().or_else(default_fleetctl);
    if let Some(path) = &fleetctl
        && !path.exists()
    {
        bail!("{}: no such fleetctl binary", path.display());
    }
    let config = fleet_config::Config {
        agent_ttl: Duration::from_secs(args.agent_ttl_secs),
        etcd_request_timeout: Duration::from_millis(args.etcd_request_timeout_ms.max(1)),
        ..fleet_config::Config::default()
    };
    let opts = Options {
        units: args.units,
        cluster: ClusterOptions {
            machines: args.machines,
            machines_per_channel: args.machines_per_channel,
            api_hosts: args.api_hosts,
            engine_candidates: args.engine_candidates,
            config,
            knobs: Knobs {
                start_latency: Duration::from_millis(args.start_latency_ms),
                stop_latency: Duration::from_millis(args.stop_latency_ms),
                start_failure_rate: args.start_failure_rate,
                seed: 1,
                keep_call_log: false,
            },
        },
        quiet: Duration::from_secs(args.quiet_secs),
        fleetctl,
        settle_timeout: Duration::from_secs(args.settle_timeout_secs),
        etcd_pid: own.as_ref().map(OwnEtcd::pid),
    };
    let report = run(&opts, &endpoint).await?;
    let details: Vec<String> = report
        .details
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    eprintln!("fleet-sim: {}", details.join(" "));
    let ok = report.violations.is_empty() && report.unverified.is_none();
    if let Some(why) = &report.unverified {
        eprintln!(
            "fleet-sim: invariants held on the machines; what the API shows is unverified: {why}"
        );
    } else if ok {
        eprintln!("fleet-sim: invariants held");
    } else {
        eprintln!("fleet-sim: {} invariants broken:", report.violations.len());
        for v in report.violations.iter().take(20) {
            eprintln!("  {v}");
        }
    }
    println!("{}", report.figures.line());
    if args.hold {
        let api = report.sim.cluster.api_endpoint().unwrap_or_default();
        eprintln!(
            "fleet-sim: holding; try fleetctl --endpoint={api} list-units; Ctrl-C ends the simulation"
        );
        tokio::signal::ctrl_c()
            .await
            .context("waiting for Ctrl-C")?;
    }
    report.sim.cluster.shutdown().await;
    drop(own);
    Ok(ok)
}
