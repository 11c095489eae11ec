//! fleet-sim: M simulated machines in one process against a real etcd, each running fleetd's
//! own wiring (`fleetd::machine`) on an in-memory systemd, driven through the real API the way
//! fleetctl drives it; it measures the whole system and checks its invariants.
//!
//! [`run`] is the whole benchmark (the binary prints its figures); the correctness test runs
//! it small and asserts [`Report::violations`] is empty and the failover moved nothing.

pub mod cluster;
pub mod etcd;
pub mod workload;

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use fleet_client::{ClientConfig, HttpRegistry};
use fleet_registry::{Registry, RegistryError};
use fleet_unit::{TargetState, UnitFile, UnitName};
use futures_util::StreamExt;

use crate::cluster::{Cluster, ClusterOptions, wait_until};
use crate::workload::{Kind, Workload};

/// Units created and started at a time, as fleetctl does.
const SUBMIT_CONCURRENCY: usize = 32;

/// While the cluster settles, how often the full invariant check runs although the count of
/// what runs says it has not settled yet.
const FULL_CHECK_EVERY: Duration = Duration::from_secs(2);

/// Runs CPU-bound `f` without holding one of the runtime's workers (the simulated machines'
/// tasks go on meanwhile).
fn off_workers<T>(f: impl FnOnce() -> T) -> T {
    use tokio::runtime::{Handle, RuntimeFlavor};
    match Handle::try_current().map(|h| h.runtime_flavor()) {
        Ok(RuntimeFlavor::MultiThread) => tokio::task::block_in_place(f),
        _ => f(),
    }
}

/// One run's settings.
#[derive(Debug, Clone)]
pub struct Options {
    pub units: usize,
    pub cluster: ClusterOptions,
    /// The quiet period over which etcd's requests are counted.
    pub quiet: Duration,
    /// The fleetctl binary timing the listings (none: those figures are not measured).
    pub fleetctl: Option<PathBuf>,
    /// Bound on each wait (all active, the kills, the failover).
    pub settle_timeout: Duration,
    /// etcd's process, to report its memory (when the simulation started it).
    pub etcd_pid: Option<u32>,
}

/// The figures of one run; `None` where not measured.
#[derive(Debug, Clone, Default)]
pub struct Figures {
    pub machines: usize,
    pub units: usize,
    pub all_active_s: Option<f64>,
    pub list_unit_files_s: Option<f64>,
    pub list_units_s: Option<f64>,
    pub steady_etcd_requests_per_machine_per_10s: Option<f64>,
    pub rss_mib: Option<f64>,
    pub kill_10pct_reschedule_s: Option<f64>,
    pub leader_failover_s: Option<f64>,
    pub leader_failover_moved: Option<usize>,
}

fn opt<T: std::fmt::Display>(v: &Option<T>) -> String {
    v.as_ref()
        .map_or_else(|| "n/a".to_string(), |v| v.to_string())
}

fn secs(v: &Option<f64>) -> String {
    v.map_or_else(|| "n/a".to_string(), |v| format!("{v:.2}"))
}

impl Figures {
    /// The one line of `key=value` figures, in the order.
    pub fn line(&self) -> String {
        format!(
            "machines={} units={} all_active_s={} list_unit_files_s={} list_units_s={} \
             steady_etcd_requests_per_machine_per_10s={} rss_mib={} kill_10pct_reschedule_s={} \
             leader_failover_s={} leader_failover_moved={}",
            self.machines,
            self.units,
            secs(&self.all_active_s),
            secs(&self.list_unit_files_s),
            secs(&self.list_units_s),
            secs(&self.steady_etcd_requests_per_machine_per_10s),
            self.rss_mib
                .map_or_else(|| "n/a".into(), |v| format!("{v:.0}")),
            secs(&self.kill_10pct_reschedule_s),
            secs(&self.leader_failover_s),
            opt(&self.leader_failover_moved),
        )
    }
}

/// What a run found.
pub struct Report {
    pub figures: Figures,
    /// Other measurements, `key=value`, for the line before the figures.
    pub details: Vec<(String, String)>,
    /// Broken invariants at the end (empty: every unit placed exactly once, none on two
    /// machines, Conflicts and MachineMetadata held, nothing lost).
    pub violations: Vec<String>,
    /// Why what the API shows could not be checked (it could not list the units), if so.
    pub unverified: Option<String>,
    /// The cluster, still running (`--hold`, or to shut down).
    pub sim: Sim,
}

/// A started simulation: the cluster, what it runs, and a client of its API.
pub struct Sim {
    pub cluster: Cluster,
    pub workload: Workload,
    etcd_endpoint: String,
    key_prefix: String,
    /// Whether failed units count as placed (a failure rate is set).
    failures: bool,
    /// Violations seen on any poll while waiting to settle that are never a passing state (a
    /// unit on two live machines, conflicting units sharing one, an unsubmitted unit
    /// running): the run fails for them even when a later poll no longer sees them.
    lasting: std::sync::Mutex<BTreeSet<String>>,
}

fn progress(msg: &str) {
    eprintln!("fleet-sim: {msg}");
}

impl Sim {
    /// Starts the machines against `endpoint` and plans `units` units.
    pub async fn start(opts: &Options, endpoint: &str) -> Result<Sim> {
        let workload = workload::plan(opts.units, opts.cluster.machines)?;
        let cluster = Cluster::start(&opts.cluster, endpoint).await?;
        Ok(Sim {
            cluster,
            workload,
            etcd_endpoint: endpoint.to_string(),
            key_prefix: opts.cluster.config.etcd_key_prefix.clone(),
            lasting: Default::default(),
            failures: opts.cluster.knobs.start_failure_rate > 0.0,
        })
    }

    /// A client of the first live API, as fleetctl's API driver.
    pub fn api(&self) -> Result<HttpRegistry> {
        let endpoint = self
            .cluster
            .api_endpoint()
            .context("no live machine serves the API")?;
        HttpRegistry::new(&ClientConfig {
            endpoint,
            request_timeout: Duration::from_secs(30),
            ..ClientConfig::default()
        })
        .context("API client")
    }

    /// Waits until the API answers and lists every live machine.
    pub async fn wait_registered(&self, timeout: Duration) -> Result<()> {
        let want = self.cluster.live_ids();
        let end = Instant::now() + timeout;
        loop {
            if let Ok(api) = self.api()
                && let Ok(ms) = api.machines().await
                && want.iter().all(|id| ms.iter().any(|m| &m.id == id))
            {
                return Ok(());
            }
            if Instant::now() > end {
                bail!("the machines did not all register within {timeout:?}");
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Submits the templates, then every unit, 32 at a time, as `fleetctl start` of local
    /// unit files does: one create-only PUT per unit, in its desired state (launched).
    pub async fn submit(&self) -> Result<()> {
        let api = Arc::new(self.api()?);
        for (name, file) in &self.workload.templates {
            create(&api, name, file, TargetState::Inactive).await?;
        }
        let results: Vec<Result<()>> = futures_util::stream::iter(self.workload.units.iter())
            .map(|p| {
                let api = api.clone();
                async move { create(&api, &p.name, &p.file, TargetState::Launched).await }
            })
            .buffer_unordered(SUBMIT_CONCURRENCY)
            .collect()
            .await;
        results.into_iter().collect()
    }

    /// Broken invariants on the machines themselves (their systemd): every planned unit
    /// placed on exactly one live machine (global units: on every live machine that
    /// matches), Conflicts and MachineMetadata held, nothing unknown running.
    pub fn ground_violations(&self) -> Vec<String> {
        let placed = self.cluster.placed(self.failures);
        let machines: BTreeMap<&str, &BTreeMap<String, String>> = self
            .cluster
            .live()
            .map(|m| (m.id.as_str(), &m.metadata))
            .collect();
        violations(&self.workload, &placed, &machines)
    }

    /// Broken invariants as the API shows them (`list-unit-files`, `list-units`): every
    /// submitted unit present (launched ones launched), each placed unit's state reported
    /// active by exactly the machine that runs it; and when the API showed them: when the
    /// later of the two listings' first pages came back (fleetd serves a listing's later
    /// pages at the revision of its first).
    pub async fn api_violations(&self) -> Result<(Vec<String>, Instant)> {
        let api = self.api()?;
        let (units, states, shown) = api
            .units_and_states_shown()
            .await
            .map_err(|e| listing_failed("listing units and unit states through the API", &e))?;
        let placed = self.cluster.placed(self.failures);
        let mut out = Vec::new();
        let listed: BTreeMap<&str, TargetState> =
            units.iter().map(|u| (u.name.as_str(), u.desired)).collect();
        for (name, _) in &self.workload.templates {
            if !listed.contains_key(name.as_str()) {
                out.push(format!("template {name} lost"));
            }
        }
        let mut reported: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
        for s in &states {
            let ok = s.active_state == "active" || (self.failures && s.active_state == "failed");
            if ok {
                reported
                    .entry(s.name.as_str())
                    .or_default()
                    .push(s.machine_id.as_str());
            }
        }
        let none = Vec::new();
        for p in &self.workload.units {
            match listed.get(p.name.as_str()) {
                None => out.push(format!("{} lost: not in the API's unit list", p.name)),
                Some(TargetState::Launched) => {}
                Some(other) => out.push(format!("{} is {other}, not launched", p.name)),
            }
            let mut got: Vec<&str> = reported.get(p.name.as_str()).cloned().unwrap_or_default();
            let mut want: Vec<&str> = placed
                .get(p.name.as_str())
                .unwrap_or(&none)
                .iter()
                .map(String::as_str)
                .collect();
            got.sort_unstable();
            want.sort_unstable();
            if got != want {
                out.push(format!(
                    "{}: the API reports it on {got:?}, it runs on {want:?}",
                    p.name
                ));
            }
        }
        Ok((out, shown))
    }

    /// Waits until the machines hold every invariant; how long that took.
    ///
    /// Each poll first counts what runs (cheap); the full check, which builds every unit's
    /// placement (a tenth of a second of CPU at 100,000 units), runs only when the count is
    /// at least the one a settled cluster has (settled, or something placed twice), or every
    /// [`FULL_CHECK_EVERY`] to catch broken invariants while it settles, and then off the
    /// runtime's workers: a measurement that
    /// held a worker 4 times a second stalled the machines it measures (their etcd answers
    /// waited to be polled).
    async fn settle(&self, timeout: Duration) -> Result<Duration> {
        let start = Instant::now();
        let mut last_full: Option<Instant> = None;
        let ok = wait_until(timeout, Duration::from_millis(250), || {
            // fewer placements than settled: still settling (checked in full now and then);
            // as many or more: settled, or a violation that must be seen (a unit on two
            // machines), checked in full at every poll
            let fewer = self.cluster.placed_count(self.failures) < self.expected_placements();
            if fewer && last_full.is_some_and(|t| t.elapsed() < FULL_CHECK_EVERY) {
                return false;
            }
            last_full = Some(Instant::now());
            let v = off_workers(|| self.ground_violations());
            if let Ok(mut lasting) = self.lasting.lock() {
                let new: Vec<&String> = v
                    .iter()
                    .filter(|v| !is_transient(v))
                    .filter(|v| lasting.insert((*v).clone()))
                    .collect();
                if let Some(first) = new.first() {
                    // when, for the record: the phase it broke in (the first of them)
                    let more = match new.len() - 1 {
                        0 => String::new(),
                        n => format!(" (and {n} more)"),
                    };
                    progress(&format!(
                        "broken {:.1} s into this wait: {first}{more}",
                        start.elapsed().as_secs_f64()
                    ));
                }
            }
            v.is_empty()
        })
        .await;
        if !ok {
            let v = self.ground_violations();
            bail!(
                "not settled within {timeout:?}: {} violations, e.g. {:?}",
                v.len(),
                v.iter().take(5).collect::<Vec<_>>()
            );
        }
        Ok(start.elapsed())
    }

    /// How many placements a settled cluster has: one per unit, and each global unit once on
    /// every live machine it belongs on.
    fn expected_placements(&self) -> usize {
        let live: Vec<&BTreeMap<String, String>> =
            self.cluster.live().map(|m| &m.metadata).collect();
        let ssd = live
            .iter()
            .filter(|m| m.get("disk").map(String::as_str) == Some("ssd"))
            .count();
        self.workload
            .units
            .iter()
            .map(|p| match p.kind {
                Kind::Global { ssd_only: true } => ssd,
                Kind::Global { ssd_only: false } => live.len(),
                _ => 1,
            })
            .sum()
    }

    /// Waits until the API shows what the machines run (bounded; the last violations if
    /// not): when the listings that showed it had their first pages back. A listing shows
    /// the registry at the revision of its first page (while fleetd keeps what it read
    /// ahead: see `fleet-registry`'s `etcd/chunks.rs`), so every unit was active by then; the
    /// rest of the listings (some 2 s at 100,000 units) is their own figure.
    async fn api_settle(&self, timeout: Duration) -> Result<Instant> {
        let end = Instant::now() + timeout;
        loop {
            let (v, shown) = self.api_violations().await?;
            if v.is_empty() {
                return Ok(shown);
            }
            if Instant::now() > end {
                bail!(
                    "the API did not show every unit active within {timeout:?}: {} violations, e.g. {:?}",
                    v.len(),
                    v.iter().take(5).collect::<Vec<_>>()
                );
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    async fn etcd_client(&self) -> Result<etcd_client::Client> {
        etcd_client::Client::connect([self.etcd_endpoint.as_str()], None)
            .await
            .context("connecting to etcd to read the leader key")
    }

    /// Live machine by unit (non-global units on one machine only).
    fn placement(&self) -> BTreeMap<String, String> {
        self.cluster
            .placed(self.failures)
            .into_iter()
            .filter_map(|(u, on)| (on.len() == 1).then(|| (u, on[0].clone())))
            .collect()
    }
}

/// Broken invariants of `placed` (live machine IDs by unit) on the live `machines` (ID →
/// metadata) for `workload`: every planned unit on exactly one machine (a global one on every
/// machine that matches), `disk=ssd` units on `disk=ssd` machines, no two of a conflict group
/// on one machine, nothing placed that was not planned.
pub fn violations(
    workload: &Workload,
    placed: &BTreeMap<String, Vec<String>>,
    machines: &BTreeMap<&str, &BTreeMap<String, String>>,
) -> Vec<String> {
    let is_ssd = |id: &str| {
        machines
            .get(id)
            .is_some_and(|m| m.get("disk").map(String::as_str) == Some("ssd"))
    };
    let mut out = Vec::new();
    let mut groups: BTreeSet<(usize, &str)> = BTreeSet::new();
    let none = Vec::new();
    for p in &workload.units {
        let on = placed.get(p.name.as_str()).unwrap_or(&none);
        match p.kind {
            Kind::Global { ssd_only } => {
                let want: BTreeSet<&str> = machines
                    .keys()
                    .copied()
                    .filter(|id| !ssd_only || is_ssd(id))
                    .collect();
                let got: BTreeSet<&str> = on.iter().map(String::as_str).collect();
                if !got.is_subset(&want) {
                    out.push(format!(
                        "global {} on machines it does not belong on: {:?}",
                        p.name,
                        got.difference(&want).collect::<Vec<_>>()
                    ));
                } else if want != got {
                    out.push(format!(
                        "global {} on {} machines, expected {}",
                        p.name,
                        got.len(),
                        want.len()
                    ));
                }
                continue;
            }
            _ if on.len() != 1 => {
                out.push(format!("{} on {} machines: {on:?}", p.name, on.len()));
                continue;
            }
            Kind::Ssd if !is_ssd(&on[0]) => {
                out.push(format!("{} on {} without disk=ssd", p.name, on[0]));
            }
            Kind::Spread { group } if !groups.insert((group, on[0].as_str())) => {
                out.push(format!(
                    "{} shares {} with its conflict group",
                    p.name, on[0]
                ));
            }
            _ => {}
        }
    }
    let known: BTreeSet<&str> = workload.units.iter().map(|p| p.name.as_str()).collect();
    for unit in placed.keys() {
        if !known.contains(unit.as_str()) {
            out.push(format!("{unit} runs but was never submitted"));
        }
    }
    out
}

/// Whether a violation of [`violations`] may be a passing state while the cluster settles:
/// a unit not placed yet, a global unit not yet on every machine it belongs on. A unit on
/// two machines, conflicting units together, an unsubmitted unit running never are.
fn is_transient(violation: &str) -> bool {
    violation.contains(" on 0 machines")
        || (violation.starts_with("global ") && violation.contains(" machines, expected "))
}

/// A listing through the API failed: [`ApiUnreadable`] when the answer was too large for
/// gRPC (what the API shows cannot be checked at this size), a plain error otherwise (a
/// broken API is a failure of the run, not an unverified figure).
fn listing_failed(what: &str, e: &RegistryError) -> anyhow::Error {
    let message = format!("{what}: {e}");
    if is_message_size(&message) {
        anyhow::Error::new(ApiUnreadable(message))
    } else {
        anyhow::anyhow!(message)
    }
}

/// Whether an error says that a gRPC message exceeded the size limit (tonic's wording, and
/// etcd's and grpc-go's).
fn is_message_size(message: &str) -> bool {
    [
        "message length too large",
        "larger than max",
        "message too large",
        "exceeds the limit",
    ]
    .iter()
    .any(|m| message.contains(m))
}

/// The API answered a listing with an error: what it shows cannot be checked.
#[derive(Debug)]
pub struct ApiUnreadable(String);

impl std::fmt::Display for ApiUnreadable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ApiUnreadable {}

/// Creates `name` in `state` with one create-only PUT. A unit already there (an earlier
/// attempt that got through) counts as created, and is then set to `state`, as fleetctl
/// does with a unit it finds.
async fn create(
    api: &HttpRegistry,
    name: &UnitName,
    file: &UnitFile,
    state: TargetState,
) -> Result<()> {
    match retry(|| api.create_unit(name, file, state)).await {
        Ok(()) => Ok(()),
        Err(RegistryError::AlreadyExists(_)) if state == TargetState::Inactive => Ok(()),
        Err(RegistryError::AlreadyExists(_)) => retry(|| api.set_desired_state(name, state))
            .await
            .with_context(|| format!("starting {name}")),
        Err(e) => Err(anyhow::Error::from(e).context(format!("creating {name}"))),
    }
}

/// `f` tried up to 3 times, 1 s apart, while it fails otherwise than with an answer.
async fn retry<F, Fut>(mut f: F) -> Result<(), RegistryError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<(), RegistryError>>,
{
    let mut attempt = 0;
    loop {
        match f().await {
            Err(e @ (RegistryError::AlreadyExists(_) | RegistryError::NotFound(_))) => {
                return Err(e);
            }
            Err(e) if attempt < 2 => {
                attempt += 1;
                tracing::debug!(error = %e, "retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            other => return other,
        }
    }
}

/// Times `fleetctl --endpoint <api> <command>`; the lines it printed.
async fn time_fleetctl(fleetctl: &PathBuf, endpoint: &str, command: &str) -> Result<(f64, usize)> {
    let start = Instant::now();
    let out = tokio::process::Command::new(fleetctl)
        .arg(format!("--endpoint={endpoint}"))
        .arg(command)
        .stdin(std::process::Stdio::null())
        .output()
        .await
        .with_context(|| format!("running {}", fleetctl.display()))?;
    let took = start.elapsed().as_secs_f64();
    if !out.status.success() {
        bail!(
            "fleetctl {command} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok((
        took,
        out.stdout
            .split(|b| *b == b'\n')
            .filter(|l| !l.is_empty())
            .count(),
    ))
}

/// A histogram's sum (seconds) and count, from a machine's or the APIs' metrics.
#[derive(Default)]
pub struct SumCount(pub f64, pub f64);

impl SumCount {
    /// The mean, in milliseconds, of what was observed after `before`.
    fn mean_ms_since(&self, before: &SumCount) -> String {
        let n = self.1 - before.1;
        if n > 0.0 {
            format!("{:.1}", (self.0 - before.0) / n * 1e3)
        } else {
            "n/a".into()
        }
    }
}

/// How long the APIs' requests took, and their writes to etcd (`set` operations).
struct ApiLatencies {
    request: SumCount,
    write: SumCount,
}

impl ApiLatencies {
    fn of(metrics: &fleet_metrics::Metrics) -> ApiLatencies {
        let text = metrics.encode();
        let find = |line_start: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(line_start)?.trim().parse::<f64>().ok())
                .unwrap_or(0.0)
        };
        ApiLatencies {
            request: SumCount(
                find("fleet_api_request_duration_seconds_sum "),
                find("fleet_api_request_duration_seconds_count "),
            ),
            write: SumCount(
                find("fleet_registry_operation_duration_second_sum{ops=\"set\"} "),
                find("fleet_registry_operation_duration_second_count{ops=\"set\"} "),
            ),
        }
    }
}

/// The whole benchmark: start, submit, all active, steady state, listings, 10 % killed, the
/// leader killed, invariants.
pub async fn run(opts: &Options, endpoint: &str) -> Result<Report> {
    let machines = opts.cluster.machines;
    let mut figures = Figures {
        machines,
        units: opts.units,
        ..Figures::default()
    };
    let mut details = Vec::new();
    let started = Instant::now();
    let mut sim = Sim::start(opts, endpoint).await?;
    sim.wait_registered(opts.settle_timeout).await?;
    details.push((
        "register_s".into(),
        format!("{:.2}", started.elapsed().as_secs_f64()),
    ));
    let api_endpoint = sim.cluster.api_endpoint().unwrap_or_default();
    progress(&format!(
        "{machines} machines registered; API at {api_endpoint} (fleetctl --endpoint={api_endpoint} list-machines)"
    ));

    // all active: from the first submission until list-units shows every unit active
    let ops_before = etcd::kv_operations(endpoint).await.ok();
    let api_before = ApiLatencies::of(&sim.cluster.metrics);
    let t0 = Instant::now();
    sim.submit().await?;
    details.push((
        "submit_s".into(),
        format!("{:.2}", t0.elapsed().as_secs_f64()),
    ));
    // where a submission's time goes: the APIs' requests, and their writes to etcd
    let api_after = ApiLatencies::of(&sim.cluster.metrics);
    details.push((
        "submit_api_request_ms".into(),
        api_after.request.mean_ms_since(&api_before.request),
    ));
    details.push((
        "submit_api_etcd_write_ms".into(),
        api_after.write.mean_ms_since(&api_before.write),
    ));
    progress(&format!(
        "{} units submitted in {:.1} s",
        opts.units,
        t0.elapsed().as_secs_f64()
    ));
    sim.settle(opts.settle_timeout).await?;
    let mut unverified = None;
    let mut shown = None;
    match sim.api_settle(opts.settle_timeout).await {
        Ok(first_pages) => {
            // when the listings that showed it ended, beside when their first pages came
            // back (the figure)
            details.push((
                "all_active_listed_s".into(),
                format!("{:.2}", t0.elapsed().as_secs_f64()),
            ));
            shown = Some(first_pages);
        }
        // the API cannot list this many units (a range read beyond gRPC's 4 MiB): the time
        // is the machines' own, and the details say so
        Err(e) if e.downcast_ref::<ApiUnreadable>().is_some() => {
            progress(&format!(
                "{e:#}; all_active_s is when every machine ran its units"
            ));
            details.push(("all_active_by".into(), "systemd".into()));
            unverified = Some(format!("{e:#}"));
        }
        Err(e) => return Err(e),
    }
    figures.all_active_s = Some(
        shown
            .unwrap_or_else(Instant::now)
            .saturating_duration_since(t0)
            .as_secs_f64(),
    );
    // what the launch cost etcd's store, per unit (puts: unit records, bodies, decisions,
    // states), by etcd's own counters (see `etcd::kv_operations`)
    if let (Some(b), Ok(a)) = (ops_before, etcd::kv_operations(endpoint).await) {
        let per = |x: f64, y: f64| format!("{:.2}", (x - y) / opts.units.max(1) as f64);
        details.push(("launch_etcd_mvcc_puts_per_unit".into(), per(a.0, b.0)));
        details.push(("launch_etcd_mvcc_txns_per_unit".into(), per(a.1, b.1)));
        details.push(("launch_etcd_mvcc_ranges_per_unit".into(), per(a.2, b.2)));
    }
    progress(&format!(
        "all active after {:.1} s (the listings that showed it ended after {:.1} s)",
        figures.all_active_s.unwrap_or_default(),
        t0.elapsed().as_secs_f64()
    ));

    // steady state: etcd's requests over the quiet period, nothing driving the cluster
    if !opts.quiet.is_zero() {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let before = etcd::requests_started(endpoint).await?;
        tokio::time::sleep(opts.quiet).await;
        let after = etcd::requests_started(endpoint).await?;
        let live = sim.cluster.live().count().max(1) as f64;
        let per = (after - before) / live / (opts.quiet.as_secs_f64() / 10.0);
        figures.steady_etcd_requests_per_machine_per_10s = Some(per);
        details.push(("steady_etcd_requests".into(), format!("{}", after - before)));
        progress(&format!(
            "steady: {} etcd requests in {:?} ({per:.3} per machine per 10 s)",
            after - before,
            opts.quiet
        ));
    }

    // the real fleetctl listing everything through the API
    match &opts.fleetctl {
        Some(fleetctl) => {
            let api = sim.cluster.api_endpoint().context("no API")?;
            let mut etcd = sim.etcd_client().await?;
            for (command, figure, key) in [
                (
                    "list-unit-files",
                    &mut figures.list_unit_files_s,
                    "list_unit_files_lines",
                ),
                ("list-units", &mut figures.list_units_s, "list_units_lines"),
            ] {
                // cold: the API serves a listing's later pages from the chunks it read for
                // listings at the same revision (kept 30 s), so after the quiet period
                // the all-active listings' chunks could still serve this one
                if let Err(e) = etcd::new_revision(&mut etcd).await {
                    progress(&format!("{e:#} (the listing may be served from chunks)"));
                }
                match time_fleetctl(fleetctl, &api, command).await {
                    Ok((s, lines)) => {
                        *figure = Some(s);
                        details.push((key.into(), lines.to_string()));
                    }
                    Err(e) => progress(&format!("{e:#}")),
                }
            }
        }
        None => {
            progress("fleetctl not built (cargo build --release -p fleetctl): listings not timed")
        }
    }
    figures.rss_mib = etcd::rss_mib("self");
    if let Some(pid) = opts.etcd_pid {
        let rss = etcd::rss_mib(&pid.to_string());
        details.push((
            "etcd_rss_mib".into(),
            rss.map_or("n/a".into(), |v| format!("{v:.0}")),
        ));
    }
    let fds = std::fs::read_dir("/proc/self/fd")
        .map(|d| d.count())
        .unwrap_or(0);
    details.push(("fds".into(), fds.to_string()));
    details.push(("etcd_channels".into(), sim.cluster.channels.to_string()));

    let mut etcd = sim.etcd_client().await?;
    let leader = etcd::leader(&mut etcd, &sim.key_prefix).await?;

    // 10 % of the machines die at once, without purging
    let victims = pick_victims(&sim.cluster, leader.as_deref(), machines / 10);
    if !victims.is_empty() {
        let t = Instant::now();
        let victim_ids: Vec<String> = victims
            .iter()
            .filter_map(|&v| sim.cluster.machines.get(v).map(|m| m.id.clone()))
            .collect();
        for &v in &victims {
            sim.cluster.crash(v).await;
        }
        // when etcd has let every victim's lease expire (its machine record gone), beside
        // the wait for their units to run elsewhere: the detection phase of the figure
        // (and when the first went, and the leader's reconciles meanwhile: what the time
        // after the leases went is made of)
        // (taken after the crashes: nothing happens before the leases expire, 20 s later)
        let reconciles_before = leader.as_deref().map(|l| sim.cluster.reconcile_time_of(l));
        let mut watcher = sim.etcd_client().await?;
        let mut first_gone = None;
        let gone = async {
            let end = t + opts.settle_timeout;
            while Instant::now() < end {
                let present = etcd::machines_present(&mut watcher, &sim.key_prefix, &victim_ids)
                    .await
                    .ok();
                if present.is_some_and(|n| n < victim_ids.len()) && first_gone.is_none() {
                    first_gone = Some(t.elapsed().as_secs_f64());
                }
                if present == Some(0) {
                    return Some(t.elapsed().as_secs_f64());
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            None
        };
        let (settled, gone) = tokio::join!(sim.settle(opts.settle_timeout), gone);
        settled?;
        figures.kill_10pct_reschedule_s = Some(t.elapsed().as_secs_f64());
        if let Some(first) = first_gone {
            details.push(("kill_first_gone_s".into(), format!("{first:.2}")));
        }
        if let Some(gone) = gone {
            details.push(("kill_machines_gone_s".into(), format!("{gone:.2}")));
        }
        if let (Some(l), Some(before)) = (leader.as_deref(), reconciles_before) {
            let after = sim.cluster.reconcile_time_of(l);
            details.push((
                "kill_leader_reconciles".into(),
                format!("{:.0}", after.1 - before.1),
            ));
            details.push((
                "kill_leader_reconcile_ms".into(),
                after.mean_ms_since(&before),
            ));
        }
        progress(&format!(
            "{} machines killed: their units active elsewhere after {:.1} s",
            victims.len(),
            t.elapsed().as_secs_f64()
        ));
    }

    // the engine leader dies
    let leader = etcd::leader(&mut etcd, &sim.key_prefix).await?;
    let leader_index = leader.as_deref().and_then(|l| sim.cluster.index_of(l));
    let spare_api = sim
        .cluster
        .live()
        .filter(|m| m.api_endpoint().is_some() && Some(m.id.as_str()) != leader.as_deref())
        .count();
    match (leader, leader_index) {
        (Some(old), Some(index)) if sim.cluster.live().count() > 1 && spare_api > 0 => {
            let before: BTreeMap<String, String> = sim
                .placement()
                .into_iter()
                .filter(|(_, m)| *m != old)
                .collect();
            // each machine's own count: the figure ends at the new leader's first reconcile,
            // not at any engine's (a reconcile the old leader finished as it was killed)
            let reconciles = sim.cluster.reconciles();
            let t = Instant::now();
            sim.cluster.crash(index).await;
            let end = t + opts.settle_timeout;
            let mut new_leader_s = None;
            loop {
                let new = etcd::leader(&mut etcd, &sim.key_prefix)
                    .await
                    .ok()
                    .flatten()
                    .filter(|n| *n != old);
                if let Some(new) = new {
                    new_leader_s.get_or_insert(t.elapsed().as_secs_f64());
                    let before = reconciles.get(&new).copied().unwrap_or(0.0);
                    if sim.cluster.reconciles_of(&new) > before {
                        break;
                    }
                }
                if Instant::now() > end {
                    bail!(
                        "no new engine leader reconciled within {:?}",
                        opts.settle_timeout
                    );
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            figures.leader_failover_s = Some(t.elapsed().as_secs_f64());
            if let Some(s) = new_leader_s {
                details.push(("failover_new_leader_s".into(), format!("{s:.2}")));
            }
            sim.settle(opts.settle_timeout).await?;
            let after = sim.placement();
            let moved = before
                .iter()
                .filter(|(unit, m)| after.get(*unit) != Some(m))
                .count();
            figures.leader_failover_moved = Some(moved);
            progress(&format!(
                "leader {old} killed: a new leader reconciled after {:.1} s; {moved} units moved",
                figures.leader_failover_s.unwrap_or_default()
            ));
        }
        _ => progress("no leader to kill (or it is the last machine serving the API)"),
    }

    // what the API shows at the end, then the invariants
    let mut violations = sim.ground_violations();
    if let Ok(lasting) = sim.lasting.lock() {
        let seen: Vec<String> = lasting
            .iter()
            .filter(|v| !violations.contains(v))
            .cloned()
            .collect();
        violations.extend(seen);
    }
    if violations.is_empty() {
        match sim.api_settle(opts.settle_timeout).await {
            Ok(_) => {}
            Err(e) if e.downcast_ref::<ApiUnreadable>().is_some() => {
                unverified = Some(format!("{e:#}"));
            }
            Err(e) => violations.push(format!("{e:#}")),
        }
    }
    details.push((
        "failed_units".into(),
        sim.cluster.failed_count().to_string(),
    ));
    details.push((
        "total_s".into(),
        format!("{:.1}", started.elapsed().as_secs_f64()),
    ));
    Ok(Report {
        figures,
        details,
        violations,
        unverified,
        sim,
    })
}

/// `n` machines to kill: neither the leader nor API hosts, spread over the indexes.
fn pick_victims(cluster: &Cluster, leader: Option<&str>, n: usize) -> Vec<usize> {
    let candidates: Vec<usize> = cluster
        .machines
        .iter()
        .enumerate()
        .filter(|(_, m)| m.is_live() && m.api_endpoint().is_none() && Some(m.id.as_str()) != leader)
        .map(|(i, _)| i)
        .collect();
    if candidates.is_empty() || n == 0 {
        return Vec::new();
    }
    let step = (candidates.len() / n).max(1);
    candidates.into_iter().step_by(step).take(n).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each invariant, broken once, is reported; the placement that holds them is not.
    #[test]
    fn every_broken_invariant_is_reported() {
        // 4 machines (0 and 2 with disk=ssd), 100 units: 3 global, 4 spread in groups of 2,
        // 9 ssd, 38 instances, 46 plain
        let workload = workload::plan(100, 4).expect("plan");
        let ids: Vec<String> = (0..4).map(cluster::machine_id).collect();
        let metadata: Vec<BTreeMap<String, String>> =
            (0..4).map(workload::machine_metadata).collect();
        let machines: BTreeMap<&str, &BTreeMap<String, String>> = ids
            .iter()
            .map(String::as_str)
            .zip(metadata.iter())
            .collect();
        let fixed: BTreeMap<String, Vec<String>> = workload
            .units
            .iter()
            .enumerate()
            .map(|(n, u)| {
                let on = match u.kind {
                    Kind::Global { ssd_only: false } => ids.clone(),
                    Kind::Global { ssd_only: true } => vec![ids[0].clone(), ids[2].clone()],
                    Kind::Ssd => vec![ids[0].clone()],
                    // neighbours in the plan, so one of each group on machine 1, one on 2
                    Kind::Spread { .. } => vec![ids[1 + n % 2].clone()],
                    _ => vec![ids[1].clone()],
                };
                (u.name.to_string(), on)
            })
            .collect();
        assert_eq!(
            violations(&workload, &fixed, &machines),
            Vec::<String>::new()
        );

        type Placed = BTreeMap<String, Vec<String>>;
        let check = |change: &dyn Fn(&mut Placed), want: &str| {
            let mut p = fixed.clone();
            change(&mut p);
            let got = violations(&workload, &p, &machines);
            assert!(
                got.len() == 1 && got[0].contains(want),
                "expected one violation with {want:?}, got {got:?}"
            );
        };
        let plain = workload
            .units
            .iter()
            .find(|u| u.kind == Kind::Plain)
            .expect("a plain unit")
            .name
            .to_string();
        let ssd = workload
            .units
            .iter()
            .find(|u| u.kind == Kind::Ssd)
            .expect("an ssd unit")
            .name
            .to_string();
        let spread: Vec<String> = workload
            .units
            .iter()
            .filter(|u| matches!(u.kind, Kind::Spread { group: 0 }))
            .map(|u| u.name.to_string())
            .collect();
        assert_eq!(spread.len(), 2, "{:?}", workload.units);
        let (i0, i1, i3) = (ids[0].clone(), ids[1].clone(), ids[3].clone());
        check(&|p| drop(p.remove(&plain)), "on 0 machines");
        check(
            &|p| {
                p.insert(plain.clone(), vec![i0.clone(), i1.clone()])
                    .map_or((), drop)
            },
            "on 2 machines",
        );
        check(
            &|p| p.insert(ssd.clone(), vec![i3.clone()]).map_or((), drop),
            "without disk=ssd",
        );
        check(
            &|p| {
                p.insert("sim-global-0.service".into(), vec![i0.clone()])
                    .map_or((), drop)
            },
            "global sim-global-0.service",
        );
        check(
            &|p| {
                p.insert("stray.service".into(), vec![i0.clone()])
                    .map_or((), drop)
            },
            "never submitted",
        );
        let first = fixed[&spread[0]].clone();
        check(
            &|p| p.insert(spread[1].clone(), first.clone()).map_or((), drop),
            "conflict group",
        );
    }
}

#[cfg(test)]
mod listing_tests {
    use super::is_message_size;

    /// Only gRPC's message-size error leaves what the API shows unverified; any other
    /// listing error fails the run.
    /// Only "not placed yet" may pass while the cluster settles.
    #[test]
    fn lasting_violations_are_kept() {
        use super::is_transient;
        assert!(is_transient("a.service on 0 machines: []"));
        assert!(is_transient("global g.service on 3 machines, expected 4"));
        assert!(!is_transient("a.service on 2 machines: [\"m1\", \"m2\"]"));
        assert!(!is_transient("a.service shares m1 with its conflict group"));
        assert!(!is_transient("x.service runs but was never submitted"));
        assert!(!is_transient("s.service on m1 without disk=ssd"));
        assert!(!is_transient(
            "global g.service on machines it does not belong on: [\"m1\"]"
        ));
    }

    #[test]
    fn only_the_message_size_error_is_unreadable() {
        assert!(is_message_size(
            "listing units through the API: Internal Server Error: range: etcd: grpc request \
             error: status: OutOfRange, message: \"decoded message length too large: found \
             5000000 bytes, the limit is: 4194304 bytes\""
        ));
        assert!(!is_message_size(
            "listing units through the API: error sending request: connection refused"
        ));
        assert!(!is_message_size(
            "listing units through the API: 503 Service Unavailable"
        ));
    }
}
