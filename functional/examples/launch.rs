//! Launch benchmark (a measurement, never a test): boots a harness cluster, launches N units
//! with `fleetctl start --no-block` in node1 (100 files per invocation, one invocation after
//! the other in one shell, as a user scripting fleetctl would), and prints when each phase
//! finished for the last unit, counted from the start of the first fleetctl invocation:
//!
//! - submit: the last fleetctl invocation returned;
//! - scheduled: every unit has a placement in etcd (polled; fleet v1.0 shows `-`);
//! - files: the newest unit file under `/run/fleet/units` in the nodes (its mtime);
//! - active: systemd's `ActiveEnterTimestampMonotonic` of the last unit to become active;
//!
//! then units/s (N / active), what the launch cost per unit in the whole cluster (fleetd's
//! counters from `/metrics`: API requests, etcd operations, engine reconciles, agent tasks,
//! D-Bus calls to systemd), and the CPU that fleetd and systemd (PID 1) of each node used
//! while the cluster sat idle afterwards. Each run boots a fresh cluster; the last table is
//! the median of the runs.
//!
//! ```sh
//! ./build && cargo run --release -p functional --example launch -- [NODES] [UNITS] [RUNS] [IDLE_SECS]
//! ```
//!
//! With `single` first (`launch single [NODES] [UNITS]`), it measures single units instead:
//! UNITS units (default 30) started one after the other into an idle cluster, each with its
//! own `fleetctl start --no-block`, half a second apart; for each, the time from the start of
//! its fleetctl to systemd's `ActiveEnterTimestampMonotonic`; it prints their median and max.
//!
//! With `systemd` first (`launch systemd [NODES] [UNITS]`), it measures systemd's own floor
//! without fleet in the path: every node writes its share of UNITS sleeper units into
//! `/run/systemd/system` and starts them with one `systemctl start --no-block` (no
//! daemon-reload: systemd loads each unit on its StartUnit, as the agent lets it), all nodes at
//! once; it prints when the last unit became active and the CPU PID 1 used per unit. fleetd
//! runs meanwhile (subscribed to systemd's signals, as in a launch), unless
//! `LAUNCH_FLOOR_WITHOUT_FLEET=1` stops it first.
//!
//! `LAUNCH_JOURNAL=1` prints, before a run's cluster is removed, the agent's batch lines
//! (`agent batch`) of every node's fleetd journal: how big each batch was and where its time went.
//!
//! Defaults: 3 nodes, 300 units, 1 run, 60 s idle. Root. The binaries come from
//! `$FLEET_BIN_DIR`, else the project's `bin/` (`./build`). A directory holding fleet v1.0's
//! fleetd and fleetctl (built by hand from its source, never part of this repository) works
//! as well: fleet v1.0 speaks etcd's v2 API, so run with `LAUNCH_ETCD_ARGS=--enable-v2=true`.
//! The cluster is called `launch` unless `LAUNCH_CLUSTER` names another (1-8 of `[a-z0-9]`).

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use functional::fleet::{NODE_UNITS_DIR, now_us};
use functional::{Cluster, ClusterSpec, Error, FleetCluster, wait_for};

/// Files per fleetctl invocation.
const PER_INVOCATION: usize = 100;
/// How long the units may take to become active, at most.
const DEADLINE: Duration = Duration::from_secs(1800);
/// Clock ticks per second of /proc/<pid>/stat (USER_HZ on Linux).
const TICKS: f64 = 100.0;

fn main() {
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    let single = args.first().is_some_and(|a| a == "single");
    let floor = args.first().is_some_and(|a| a == "systemd");
    if single || floor {
        args.remove(0);
    }
    let arg = |i: usize, default: u64| -> u64 {
        args.get(i).map_or(default, |a| {
            a.parse().unwrap_or_else(|_| {
                eprintln!("usage: launch [NODES] [UNITS] [RUNS] [IDLE_SECS]: bad number {a:?}");
                std::process::exit(2)
            })
        })
    };
    let (nodes, units, runs, idle) = (arg(0, 3), arg(1, 300), arg(2, 1), arg(3, 60));
    let bin_dir = std::env::var_os("FLEET_BIN_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../bin"));
    if floor {
        println!(
            "launch systemd: {units} units started with systemctl on {nodes} nodes, binaries in {}",
            bin_dir.display()
        );
        if let Err(e) = systemd_floor(&bin_dir, nodes as usize, units as usize) {
            eprintln!("failed: {e}");
            std::process::exit(1);
        }
        return;
    }
    if single {
        let units = arg(1, 30) as usize;
        println!(
            "launch single: {units} units one by one on {nodes} nodes, binaries in {}",
            bin_dir.display()
        );
        if let Err(e) = one_by_one(&bin_dir, nodes as usize, units) {
            eprintln!("failed: {e}");
            std::process::exit(1);
        }
        return;
    }
    println!(
        "launch: {units} units on {nodes} nodes, {runs} run(s), {idle}s idle, binaries in {}",
        bin_dir.display()
    );
    let mut results = Vec::new();
    for run in 1..=runs {
        match one_run(&bin_dir, nodes as usize, units as usize, idle) {
            Ok(r) => {
                print_result(&format!("run {run}"), &r, nodes as usize);
                results.push(r);
            }
            Err(e) => {
                eprintln!("run {run} failed: {e}");
                std::process::exit(1);
            }
        }
    }
    if results.len() > 1 {
        print_result(
            &format!("median of {}", results.len()),
            &median(&results),
            nodes as usize,
        );
    }
}

/// What one run measured; times are seconds after the first fleetctl invocation started.
#[derive(Debug, Clone, Default)]
struct Result_ {
    units: usize,
    submit: f64,
    scheduled: Option<f64>,
    files: f64,
    active: f64,
    /// Per node: (fleetd, systemd) CPU in percent of one core while idle.
    idle_cpu: Vec<(f64, f64)>,
    /// fleetd's counters summed over the nodes, per launched unit (empty when the fleetd
    /// serves no `/metrics`).
    per_unit: BTreeMap<String, f64>,
}

fn one_run(bin_dir: &Path, nodes: usize, units: usize, idle: u64) -> Result<Result_, Error> {
    let c = boot(bin_dir, nodes)?;
    let dir = write_units(&c, units)?;
    let counted_before = counters(&c)?;

    // The fleetctl invocations run one after the other in a single shell inside node1 (no
    // harness overhead between them), which says when it started and ended (realtime: the
    // nodes share the host's clock). A thread watches etcd's placements meanwhile.
    let real = || {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs_f64()
    };
    // realtime minus monotonic, to place systemd's monotonic timestamps on the same axis
    let mono_offset = real() - now_us() as f64 / 1e6;
    let endpoint = c.etcd_endpoint().to_string();
    let placed = std::thread::spawn(move || {
        let begun = Instant::now();
        while begun.elapsed() < DEADLINE {
            match placements(&endpoint) {
                Some(n) if n >= units => return Some(real()),
                None if begun.elapsed() > Duration::from_secs(10) => return None,
                _ => std::thread::sleep(Duration::from_millis(20)),
            }
        }
        None
    });
    let script = "d=$1 n=$2 per=$3; s=$(date +%s.%N); i=1; \
                  while [ $i -le $n ]; do j=$((i + per - 1)); [ $j -le $n ] || j=$n; \
                  fleetctl start --no-block $(seq $i $j | sed \"s|.*|$d/bench-&.service|\") >/dev/null || exit 1; \
                  i=$((j + 1)); done; echo \"$s $(date +%s.%N)\"";
    let out = c
        .exec(
            1,
            &[
                "sh",
                "-c",
                script,
                "sh",
                &dir,
                &units.to_string(),
                &PER_INVOCATION.to_string(),
            ],
        )?
        .ok("fleetctl start --no-block in node1")?;
    let mut stamps = out.trimmed().split_whitespace().map(str::parse::<f64>);
    let (Some(Ok(t0_real)), Some(Ok(submitted))) = (stamps.next(), stamps.next()) else {
        return Err(Error::Harness {
            what: "the submit script's time stamps".into(),
            detail: out.stdout.clone(),
        });
    };
    let submit = submitted - t0_real;
    let since = |mono_us: u64| mono_us as f64 / 1e6 + mono_offset - t0_real;
    let started = Instant::now();

    let mut last_report = Instant::now();
    wait_for("every unit active", DEADLINE, || {
        let mut active = 0;
        for i in c.nodes() {
            active += probe(&c, i).map_err(|e| e.to_string())?.active;
        }
        if last_report.elapsed() > Duration::from_secs(10) {
            last_report = Instant::now();
            eprintln!(
                "  ... {active}/{units} active after {:.0}s",
                started.elapsed().as_secs_f64()
            );
        }
        if active >= units {
            Ok(())
        } else {
            Err(format!("{active}/{units} active"))
        }
    })?;
    let scheduled = placed.join().unwrap_or(None).map(|t| t - t0_real);
    let counted_after = counters(&c)?;
    let per_unit = counted_after
        .iter()
        .map(|(k, v)| {
            let before = counted_before.get(k).copied().unwrap_or(0.0);
            (k.clone(), (v - before) / units as f64)
        })
        .filter(|(_, v)| *v > 0.0)
        .collect();

    let mut files_at = 0.0f64;
    let mut active_at = 0.0f64;
    for i in c.nodes() {
        let p = probe(&c, i)?;
        files_at = files_at.max(p.newest_file_real - t0_real);
        active_at = active_at.max(since(last_active_us(&c, i)?));
    }

    // idle: CPU of fleetd and PID 1 in each node over `idle` seconds
    let before: Vec<(u64, u64)> = c
        .nodes()
        .map(|i| cpu_ticks(&c, i))
        .collect::<Result<_, _>>()?;
    let t = Instant::now();
    std::thread::sleep(Duration::from_secs(idle));
    let secs = t.elapsed().as_secs_f64();
    let after: Vec<(u64, u64)> = c
        .nodes()
        .map(|i| cpu_ticks(&c, i))
        .collect::<Result<_, _>>()?;
    let pct = |a: u64, b: u64| (a.saturating_sub(b)) as f64 / TICKS / secs * 100.0;
    let idle_cpu = before
        .iter()
        .zip(&after)
        .map(|(b, a)| (pct(a.0, b.0), pct(a.1, b.1)))
        .collect();
    if std::env::var_os("LAUNCH_JOURNAL").is_some() {
        print_batches(&c);
    }
    teardown(c);
    Ok(Result_ {
        units,
        submit,
        scheduled,
        files: files_at,
        active: active_at,
        idle_cpu,
        per_unit,
    })
}

/// What the counts per unit are made of: fleetd's counters (`/metrics`) that say where a
/// launch goes, by the prefix of their line.
const COUNTED: [&str; 5] = [
    "fleet_api_requests_total{",
    "fleet_registry_operation_count_total{",
    "fleet_engine_reconcile_count_total",
    "fleet_agent_task_count_total{",
    "fleet_systemd_call_count_total{",
];

/// fleetd's counters of [`COUNTED`], summed over the nodes (the API's `code` label left out,
/// and so each method's requests summed). A fleetd without `/metrics` counts nothing.
fn counters(c: &Cluster) -> Result<BTreeMap<String, f64>, Error> {
    let mut sums = BTreeMap::new();
    for i in c.nodes() {
        let out = c.exec(
            i,
            &[
                "curl",
                "-s",
                "--max-time",
                "10",
                "--unix-socket",
                "/var/run/fleet.sock",
                "http://localhost/metrics",
            ],
        )?;
        for line in out.stdout.lines() {
            if !COUNTED.iter().any(|p| line.starts_with(p)) {
                continue;
            }
            let Some((key, value)) = line.rsplit_once(' ') else {
                continue;
            };
            let Ok(value) = value.parse::<f64>() else {
                continue;
            };
            let key = match key.split_once(",code=") {
                Some((head, _)) => format!("{head}}}"),
                None => key.to_string(),
            };
            *sums.entry(key).or_insert(0.0) += value;
        }
    }
    Ok(sums)
}

/// Boots a cluster of `nodes` and hands it over with its name.
fn boot(bin_dir: &Path, nodes: usize) -> Result<Cluster, Error> {
    let name = std::env::var("LAUNCH_CLUSTER").unwrap_or_else(|_| "launch".into());
    let spec = ClusterSpec::new(&name, nodes)
        .bin_dir(bin_dir)
        .etcd_args(&std::env::var("LAUNCH_ETCD_ARGS").unwrap_or_default());
    let c = Cluster::up(spec)?;
    c.wait_for_machines(1, nodes, Duration::from_secs(60))?;
    Ok(c)
}

/// Starts `units` units one after the other (each into an idle cluster) and prints how long
/// each took from the start of its fleetctl to systemd's ActiveEnterTimestamp: median, max.
fn one_by_one(bin_dir: &Path, nodes: usize, units: usize) -> Result<(), Error> {
    let c = boot(bin_dir, nodes)?;
    let dir = write_units(&c, units)?;
    let real = || {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs_f64()
    };
    let mono_offset = real() - now_us() as f64 / 1e6;
    let script = "d=$1 n=$2; i=1; while [ $i -le $n ]; do \
                  echo \"$i $(date +%s.%N)\"; fleetctl start --no-block $d/bench-$i.service >/dev/null || exit 1; \
                  sleep 0.5; i=$((i + 1)); done";
    let out = c
        .exec(1, &["sh", "-c", script, "sh", &dir, &units.to_string()])?
        .ok("fleetctl start --no-block, one by one, in node1")?;
    let mut started = BTreeMap::new();
    for line in out.stdout.lines() {
        if let Some((i, t)) = line.split_once(' ')
            && let (Ok(i), Ok(t)) = (i.parse::<usize>(), t.parse::<f64>())
        {
            started.insert(format!("bench-{i}.service"), t);
        }
    }
    wait_for("every unit active", Duration::from_secs(60), || {
        let mut active = 0;
        for i in c.nodes() {
            active += probe(&c, i).map_err(|e| e.to_string())?.active;
        }
        if active >= units {
            Ok(())
        } else {
            Err(format!("{active}/{units} active"))
        }
    })?;
    let mut took = Vec::new();
    for i in c.nodes() {
        let script = "u=$(systemctl list-units 'bench-*' --no-legend --plain | awk '{print $1}'); \
                      [ -z \"$u\" ] || systemctl show -p Id -p ActiveEnterTimestampMonotonic $u";
        let out = c
            .exec(i, &["sh", "-c", script])?
            .ok("ActiveEnterTimestampMonotonic")?;
        let mut id = None;
        for line in out.stdout.lines() {
            if let Some(v) = line.strip_prefix("Id=") {
                id = Some(v.to_string());
            } else if let Some(v) = line.strip_prefix("ActiveEnterTimestampMonotonic=")
                && let (Some(name), Ok(us)) = (id.take(), v.parse::<u64>())
                && let Some(t0) = started.get(&name)
            {
                took.push(us as f64 / 1e6 + mono_offset - t0);
            }
        }
    }
    teardown(c);
    took.sort_by(f64::total_cmp);
    let Some(max) = took.last() else {
        return Err(Error::Harness {
            what: "ActiveEnterTimestampMonotonic of the units".into(),
            detail: "none found".into(),
        });
    };
    println!(
        "single: {} units one by one: start --no-block to active: median {:.3}s, max {max:.3}s, min {:.3}s",
        took.len(),
        took[took.len() / 2],
        took[0]
    );
    Ok(())
}

/// Removes the cluster; a failure is said, and does not void what was measured.
fn teardown(c: Cluster) {
    if let Err(e) = c.down() {
        eprintln!("warning: removing the cluster failed (what was measured stands): {e}");
    }
}

/// Writes `bench-<i>.service` (a sleeper) into node1, returns their directory there.
fn write_units(c: &Cluster, units: usize) -> Result<String, Error> {
    let dir = format!("{NODE_UNITS_DIR}/launch");
    let script = "rm -rf \"$1\" && mkdir -p \"$1\" && i=1; while [ $i -le $2 ]; do \
                  printf '[Unit]\\nDescription=launch benchmark %s\\n\\n[Service]\\nExecStart=/bin/sleep infinity\\n' $i \
                  > \"$1/bench-$i.service\"; i=$((i + 1)); done";
    c.exec(1, &["sh", "-c", script, "sh", &dir, &units.to_string()])?
        .ok("writing the benchmark's unit files in node1")?;
    Ok(dir)
}

/// Placements of bench units in etcd (our v3 layout); `None` when there are none yet or etcd
/// cannot say (fleet v1.0 keeps its keys in the v2 store: after 5 s of none, no more polls).
fn placements(endpoint: &str) -> Option<usize> {
    let out = std::process::Command::new("etcdctl")
        .env("ETCDCTL_API", "3")
        .args([
            &format!("--endpoints={endpoint}"),
            "get",
            "--prefix",
            "--keys-only",
            "/_coreos.com/fleet/placement/bench-",
        ])
        .output()
        .ok()?;
    let n = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| !l.is_empty())
        .count();
    (out.status.success() && n > 0).then_some(n)
}

struct Probe {
    active: usize,
    /// Realtime seconds of the newest bench unit file (0 when none).
    newest_file_real: f64,
}

/// One look into node `i`: active bench units, newest unit file.
fn probe(c: &Cluster, i: usize) -> Result<Probe, Error> {
    let script = "a=$(systemctl list-units 'bench-*' --state=active --no-legend --plain | wc -l); \
                  m=$(find /run/fleet/units -name 'bench-*' -printf '%T@\\n' 2>/dev/null | sort -n | tail -n 1); \
                  echo \"$a ${m:-0}\"";
    let out = c.exec(i, &["sh", "-c", script])?.ok("probe")?;
    let mut w = out.trimmed().split_whitespace();
    let bad = || Error::Harness {
        what: format!("probe of node{i}"),
        detail: out.stdout.clone(),
    };
    Ok(Probe {
        active: w.next().and_then(|s| s.parse().ok()).ok_or_else(bad)?,
        newest_file_real: w.next().and_then(|s| s.parse().ok()).ok_or_else(bad)?,
    })
}

/// The latest `ActiveEnterTimestampMonotonic` among node `i`'s bench units (0 when none).
fn last_active_us(c: &Cluster, i: usize) -> Result<u64, Error> {
    let script = "u=$(systemctl list-units 'bench-*' --no-legend --plain | awk '{print $1}'); \
                  [ -z \"$u\" ] || systemctl show -p ActiveEnterTimestampMonotonic --value $u | sort -n | tail -n 1";
    let out = c
        .exec(i, &["sh", "-c", script])?
        .ok("ActiveEnterTimestampMonotonic")?;
    Ok(out.trimmed().parse().unwrap_or(0))
}

/// CPU ticks (user + system) of fleetd and of PID 1 in node `i`.
fn cpu_ticks(c: &Cluster, i: usize) -> Result<(u64, u64), Error> {
    let script =
        "cat /proc/$(systemctl show -p MainPID --value fleet.service)/stat; cat /proc/1/stat";
    let out = c.exec(i, &["sh", "-c", script])?.ok("/proc/PID/stat")?;
    let mut lines = out.stdout.lines();
    Ok((
        lines.next().map_or(0, stat_ticks),
        lines.next().map_or(0, stat_ticks),
    ))
}

/// User + system CPU ticks of a `/proc/<pid>/stat` line.
fn stat_ticks(line: &str) -> u64 {
    // the fields after "(comm)": state is the first, utime the 12th, stime the 13th
    let rest = line.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<&str> = rest.split_whitespace().collect();
    let n = |k: usize| f.get(k).and_then(|s| s.parse::<u64>().ok()).unwrap_or(0);
    n(11) + n(12)
}

fn print_result(title: &str, r: &Result_, nodes: usize) {
    let sched = r
        .scheduled
        .map_or_else(|| "-".to_string(), |s| format!("{s:.2}s"));
    println!(
        "{title}: {} units on {nodes} nodes: submit {:.2}s, scheduled {sched}, files {:.2}s, \
         active {:.2}s: {:.1} units/s",
        r.units,
        r.submit,
        r.files,
        r.active,
        r.units as f64 / r.active.max(1e-9)
    );
    let per_node: BTreeMap<usize, String> = r
        .idle_cpu
        .iter()
        .enumerate()
        .map(|(i, (f, s))| (i + 1, format!("fleetd {f:.2}%, systemd {s:.2}%")))
        .collect();
    for (i, s) in per_node {
        println!("  idle node{i}: {s}");
    }
    if !r.per_unit.is_empty() {
        println!(
            "  per unit, whole cluster (fleetd's counters, from before submit to all active):"
        );
        for (k, v) in &r.per_unit {
            println!("    {v:>8.3}  {k}");
        }
    }
}

fn median(rs: &[Result_]) -> Result_ {
    let med = |mut v: Vec<f64>| -> f64 {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let nodes = rs[0].idle_cpu.len();
    Result_ {
        units: rs[0].units,
        submit: med(rs.iter().map(|r| r.submit).collect()),
        scheduled: rs
            .iter()
            .map(|r| r.scheduled)
            .collect::<Option<Vec<f64>>>()
            .map(med),
        files: med(rs.iter().map(|r| r.files).collect()),
        active: med(rs.iter().map(|r| r.active).collect()),
        per_unit: rs[0]
            .per_unit
            .keys()
            .map(|k| {
                let v = rs
                    .iter()
                    .map(|r| r.per_unit.get(k).copied().unwrap_or(0.0))
                    .collect();
                (k.clone(), med(v))
            })
            .collect(),
        idle_cpu: (0..nodes)
            .map(|i| {
                (
                    med(rs.iter().map(|r| r.idle_cpu[i].0).collect()),
                    med(rs.iter().map(|r| r.idle_cpu[i].1).collect()),
                )
            })
            .collect(),
    }
}

/// Prints the agent's batch lines of every node's fleetd journal (`LAUNCH_JOURNAL`).
fn print_batches(c: &Cluster) {
    for i in c.nodes() {
        match c.journal(
            i,
            &["-u", "fleet.service", "-o", "short-monotonic", "--no-pager"],
        ) {
            Ok(j) => {
                for line in j.lines().filter(|l| l.contains("agent batch")) {
                    println!("  node{i}: {line}");
                }
            }
            Err(e) => eprintln!("  node{i}: no journal: {e}"),
        }
    }
}

/// systemd's floor: each node starts its share of `units` sleepers itself (one `systemctl
/// start --no-block`, no daemon-reload), all nodes at once; prints when the last became
/// active, counted from the start, and PID 1's CPU per unit.
fn systemd_floor(bin_dir: &Path, nodes: usize, units: usize) -> Result<(), Error> {
    let c = boot(bin_dir, nodes)?;
    let without_fleet = std::env::var_os("LAUNCH_FLOOR_WITHOUT_FLEET").is_some();
    if without_fleet {
        // no subscriber: systemd then sends no unit signals at all
        for i in c.nodes() {
            c.exec(i, &["systemctl", "stop", "fleet.socket", "fleet.service"])?
                .ok("stopping fleet")?;
        }
    }
    let per_node = units.div_ceil(nodes);
    let write = "i=1; while [ $i -le $1 ]; do \
                 printf '[Service]\\nExecStart=/bin/sleep infinity\\n' > /run/systemd/system/floor-$i.service; \
                 i=$((i + 1)); done";
    for i in c.nodes() {
        c.exec(i, &["sh", "-c", write, "sh", &per_node.to_string()])?
            .ok("writing the floor's unit files")?;
    }
    let ticks = |i: usize| -> Result<u64, Error> {
        let out = c.exec(i, &["cat", "/proc/1/stat"])?.ok("/proc/1/stat")?;
        Ok(stat_ticks(out.trimmed()))
    };
    let before: Vec<u64> = c.nodes().map(ticks).collect::<Result<_, _>>()?;
    let mono_start = now_us();
    let start = "systemctl start --no-block $(seq 1 $1 | sed 's/.*/floor-&.service/')";
    let per = per_node.to_string();
    let results: Vec<Result<(), Error>> = std::thread::scope(|s| {
        let handles: Vec<_> = c
            .nodes()
            .map(|i| {
                let (c, per) = (&c, &per);
                s.spawn(move || {
                    c.exec(i, &["sh", "-c", start, "sh", per])?
                        .ok("systemctl start")
                        .map(|_| ())
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join().unwrap_or_else(|_| {
                    Err(Error::Harness {
                        what: "a node's systemctl thread".into(),
                        detail: "panicked".into(),
                    })
                })
            })
            .collect()
    });
    results.into_iter().collect::<Result<Vec<()>, Error>>()?;
    let count = "systemctl list-units 'floor-*' --state=active --no-legend --plain | wc -l";
    wait_for("every floor unit active", DEADLINE, || {
        let mut active = 0;
        for i in c.nodes() {
            let out = c.exec(i, &["sh", "-c", count]).map_err(|e| e.to_string())?;
            active += out.trimmed().parse::<usize>().unwrap_or(0);
        }
        if active >= per_node * nodes {
            Ok(())
        } else {
            Err(format!("{active}/{} active", per_node * nodes))
        }
    })?;
    let last = "systemctl show -p ActiveEnterTimestampMonotonic --value $(seq 1 $1 | sed 's/.*/floor-&.service/') | sort -n | tail -n 1";
    let mut active_at = 0.0f64;
    let mut cpu = Vec::new();
    for (k, i) in c.nodes().enumerate() {
        let out = c
            .exec(i, &["sh", "-c", last, "sh", &per])?
            .ok("ActiveEnterTimestampMonotonic")?;
        let us: u64 = out.trimmed().parse().unwrap_or(0);
        active_at = active_at.max(us.saturating_sub(mono_start) as f64 / 1e6);
        let used = ticks(i)?.saturating_sub(before[k]) as f64 / TICKS;
        cpu.push(used);
    }
    teardown(c);
    println!(
        "systemd floor: {} units on {nodes} nodes ({per_node} each, systemctl start --no-block, no reload, \
         fleetd {}): last active after {active_at:.2}s: {:.1} units/s",
        per_node * nodes,
        if without_fleet { "stopped" } else { "running" },
        (per_node * nodes) as f64 / active_at.max(1e-9)
    );
    for (k, used) in cpu.iter().enumerate() {
        println!(
            "  node{}: PID 1 used {used:.2} s of CPU: {:.2} ms per unit",
            k + 1,
            used * 1000.0 / per_node as f64
        );
    }
    Ok(())
}
