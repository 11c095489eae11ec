//! What a fleet user sees on a test cluster: fleetctl's tables parsed into rows, unit files
//! written into nodes, systemd's view of a unit, the engine leader, and bounded waits built
//! on them. Used by the scenario tests in `functional/tests/`.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::command::run;
use crate::{Cluster, ClusterSpec, Error, Output, wait_for};

/// Where [`FleetCluster::put_unit`] writes unit files inside a node.
pub const NODE_UNITS_DIR: &str = "/var/tmp/fleet-units";

/// `agent_ttl` of the scenario clusters: short, so that lost machines are noticed quickly
/// (fleet's own functional tests used 3s).
pub const AGENT_TTL: Duration = Duration::from_secs(5);
/// `engine_reconcile_interval` of the scenario clusters.
pub const RECONCILE: Duration = Duration::from_secs(1);

/// A cluster of `nodes` nodes with [`AGENT_TTL`] and [`RECONCILE`].
pub fn quick_spec(name: &str, nodes: usize) -> ClusterSpec {
    ClusterSpec::new(name, nodes)
        .fleet_config(&format!("agent_ttl={}s", AGENT_TTL.as_secs()))
        .fleet_config(&format!(
            "engine_reconcile_interval={}",
            RECONCILE.as_secs()
        ))
}

/// Boots `spec`, panicking with the harness's message when it cannot.
pub fn boot(spec: ClusterSpec) -> Cluster {
    match Cluster::up(spec) {
        Ok(c) => c,
        Err(e) => panic!("cluster did not come up: {e}"),
    }
}

/// One row of `fleetctl list-units`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnitRow {
    pub unit: String,
    /// Full machine ID (the `/ip` part of the legend dropped).
    pub machine: String,
    pub active: String,
    pub sub: String,
}

/// One row of `fleetctl list-unit-files`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnitFileRow {
    pub unit: String,
    /// Full hash (40 hex digits).
    pub hash: String,
    pub dstate: String,
    /// `-` for global units.
    pub state: String,
    /// Full machine ID, `global`, or `-` when not scheduled.
    pub target: String,
}

/// systemd's view of one unit inside a node (`systemctl show`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SystemdUnit {
    pub load_state: String,
    pub active_state: String,
    pub sub_state: String,
    /// 0 when there is no main process.
    pub main_pid: u32,
    /// CLOCK_MONOTONIC microseconds of the last entry into `active`; 0 when never.
    pub active_enter_us: u64,
    /// `UnitFileState` (e.g. `linked-runtime`, `enabled-runtime`), empty when unknown.
    pub unit_file_state: String,
}

impl fmt::Display for SystemdUnit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}/{}/{} pid {} entered active at {}us, file {}",
            self.load_state,
            self.active_state,
            self.sub_state,
            self.main_pid,
            self.active_enter_us,
            self.unit_file_state
        )
    }
}

/// The text of fixture `functional/fixtures/units/<name>`.
///
/// # Panics
/// When the fixture does not exist (a bug in the test).
pub fn fixture(name: &str) -> String {
    let path = fixtures_dir().join(name);
    match std::fs::read_to_string(&path) {
        Ok(s) => s,
        Err(e) => panic!("fixture {}: {e}", path.display()),
    }
}

/// `functional/fixtures/units`.
pub fn fixtures_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures")
        .join("units")
}

/// Unwraps a harness result, panicking with its readable message (so the cluster's Drop
/// prints the nodes' journals and tears down).
#[track_caller]
pub fn must<T>(r: Result<T, Error>) -> T {
    match r {
        Ok(v) => v,
        Err(e) => panic!("{e}"),
    }
}

/// The first 8 characters of a machine ID, as fleetctl's legends show it.
pub fn short_id(id: &str) -> &str {
    id.get(..8).unwrap_or(id)
}

/// The bound of every wait for the cluster to act on a command in the scenario tests.
pub const WAIT: Duration = Duration::from_secs(30);

/// fleetctl in `node`, whatever its exit status (panics when it cannot run at all).
#[track_caller]
pub fn fleetctl(c: &Cluster, node: usize, args: &[&str]) -> Output {
    must(c.fleetctl(node, args))
}

/// fleetctl in `node`, which must succeed.
#[track_caller]
pub fn fleetctl_ok(c: &Cluster, node: usize, args: &[&str]) -> Output {
    must(c.fleetctl_ok(node, args))
}

/// The node a machine ID belongs to.
#[track_caller]
pub fn node(c: &Cluster, machine: &str) -> usize {
    c.node_of(machine)
        .unwrap_or_else(|| panic!("machine {machine} is not a node of the cluster"))
}

/// Waits up to [`WAIT`] until systemd in `node` reports `unit` with `ActiveState` `active`
/// and, when given, `LoadState` `load`.
#[track_caller]
pub fn wait_systemd(c: &Cluster, node: usize, unit: &str, load: Option<&str>, active: &str) {
    must(wait_for(
        &format!("{unit} {active} in node{node}'s systemd"),
        WAIT,
        || {
            let u = c.systemd_unit(node, unit).map_err(|e| e.to_string())?;
            if u.active_state == active && load.is_none_or(|l| u.load_state == l) {
                Ok(())
            } else {
                Err(u.to_string())
            }
        },
    ));
}

/// `GET path` on fleetd's API socket in `node` (curl, 5 s at most): the body.
pub fn api_get(c: &Cluster, node: usize, path: &str) -> Result<String, Error> {
    let url = format!("http://fleet{path}");
    let out = c.exec(
        node,
        &[
            "curl",
            "-sS",
            "--max-time",
            "5",
            "--unix-socket",
            "/var/run/fleet.sock",
            &url,
        ],
    )?;
    Ok(out.stdout)
}

/// The fleet-level operations the scenario tests share.
pub trait FleetCluster {
    /// fleetctl in `node`, required to succeed.
    fn fleetctl_ok(&self, node: usize, args: &[&str]) -> Result<Output, Error>;
    /// `fleetctl list-units` rows, sorted as fleetctl printed them.
    fn list_units(&self, node: usize) -> Result<Vec<UnitRow>, Error>;
    /// `fleetctl list-unit-files` rows, in fleetctl's order.
    fn list_unit_files(&self, node: usize) -> Result<Vec<UnitFileRow>, Error>;
    /// Full machine IDs of `fleetctl list-machines`.
    fn list_machines(&self, node: usize) -> Result<Vec<String>, Error>;
    /// Waits until `list-machines` (asked in `node`) shows exactly `n` machines.
    fn wait_for_machines(
        &self,
        node: usize,
        n: usize,
        timeout: Duration,
    ) -> Result<Vec<String>, Error>;
    /// The `active` rows of `list-units`, by unit.
    fn active_units(&self, node: usize) -> Result<BTreeMap<String, Vec<UnitRow>>, Error>;
    /// Waits until exactly `n` rows of `list-units` are `active` and returns them by unit.
    fn wait_for_active(
        &self,
        node: usize,
        n: usize,
        timeout: Duration,
    ) -> Result<BTreeMap<String, Vec<UnitRow>>, Error>;
    /// Writes a unit file into the node (under [`NODE_UNITS_DIR`]) and returns its path.
    fn put_unit(&self, node: usize, name: &str, contents: &str) -> Result<String, Error>;
    /// Writes fixture `name` into the node and returns its path there.
    fn put_fixture(&self, node: usize, name: &str) -> Result<String, Error>;
    /// systemd's view of `unit` in `node`.
    fn systemd_unit(&self, node: usize, unit: &str) -> Result<SystemdUnit, Error>;
    /// The node whose machine ID is `machine`.
    fn node_of(&self, machine: &str) -> Option<usize>;
    /// The engine leader's machine ID as etcd holds it.
    fn engine_leader(&self) -> Result<Option<String>, Error>;
    /// The lines PID 1 (systemd) of `node` logged at or after `since_us` (CLOCK_MONOTONIC
    /// microseconds, see [`now_us`]), in `short-monotonic` form.
    fn node_journal_since(&self, node: usize, since_us: u64) -> Result<String, Error>;
}

impl FleetCluster for Cluster {
    fn fleetctl_ok(&self, node: usize, args: &[&str]) -> Result<Output, Error> {
        self.fleetctl(node, args)?
            .ok(&format!("fleetctl {} on node{node}", args.join(" ")))
    }

    fn list_units(&self, node: usize) -> Result<Vec<UnitRow>, Error> {
        let args = [
            "list-units",
            "--no-legend",
            "--full",
            "--fields",
            "unit,machine,active,sub",
        ];
        let out = self.fleetctl_ok(node, &args)?;
        table(&out.stdout, 4, "fleetctl list-units")?
            .into_iter()
            .map(|c| {
                Ok(UnitRow {
                    unit: c[0].clone(),
                    machine: strip_ip(&c[1]),
                    active: c[2].clone(),
                    sub: c[3].clone(),
                })
            })
            .collect()
    }

    fn list_unit_files(&self, node: usize) -> Result<Vec<UnitFileRow>, Error> {
        let args = [
            "list-unit-files",
            "--no-legend",
            "--full",
            "--fields",
            "unit,hash,dstate,state,target",
        ];
        let out = self.fleetctl_ok(node, &args)?;
        table(&out.stdout, 5, "fleetctl list-unit-files")?
            .into_iter()
            .map(|c| {
                Ok(UnitFileRow {
                    unit: c[0].clone(),
                    hash: c[1].clone(),
                    dstate: c[2].clone(),
                    state: c[3].clone(),
                    target: strip_ip(&c[4]),
                })
            })
            .collect()
    }

    fn list_machines(&self, node: usize) -> Result<Vec<String>, Error> {
        let args = [
            "list-machines",
            "--no-legend",
            "--full",
            "--fields",
            "machine",
        ];
        let out = self.fleetctl_ok(node, &args)?;
        Ok(table(&out.stdout, 1, "fleetctl list-machines")?
            .into_iter()
            .map(|c| c[0].clone())
            .collect())
    }

    fn wait_for_machines(
        &self,
        node: usize,
        n: usize,
        timeout: Duration,
    ) -> Result<Vec<String>, Error> {
        wait_for(
            &format!("{n} machines seen from node{node}"),
            timeout,
            || {
                let m = self.list_machines(node)?;
                if m.len() == n {
                    Ok(m)
                } else {
                    Err(Error::Harness {
                        what: "list-machines".into(),
                        detail: format!("{} machines: {m:?}", m.len()),
                    })
                }
            },
        )
    }

    fn wait_for_active(
        &self,
        node: usize,
        n: usize,
        timeout: Duration,
    ) -> Result<BTreeMap<String, Vec<UnitRow>>, Error> {
        wait_for(
            &format!("{n} active units seen from node{node}"),
            timeout,
            || {
                let active = self.active_units(node)?;
                let count: usize = active.values().map(Vec::len).sum();
                if count == n {
                    Ok(active)
                } else {
                    Err(Error::Harness {
                        what: "list-units".into(),
                        detail: format!("{count} active: {active:?}"),
                    })
                }
            },
        )
    }

    fn active_units(&self, node: usize) -> Result<BTreeMap<String, Vec<UnitRow>>, Error> {
        let mut by_unit: BTreeMap<String, Vec<UnitRow>> = BTreeMap::new();
        for r in self.list_units(node)? {
            if r.active == "active" {
                by_unit.entry(r.unit.clone()).or_default().push(r);
            }
        }
        Ok(by_unit)
    }

    fn put_unit(&self, node: usize, name: &str, contents: &str) -> Result<String, Error> {
        let path = format!("{NODE_UNITS_DIR}/{name}");
        let script = "mkdir -p \"$(dirname \"$2\")\" && printf '%s' \"$1\" > \"$2\"";
        self.exec(node, &["sh", "-c", script, "sh", contents, &path])?
            .ok(&format!("writing {path} in node{node}"))?;
        Ok(path)
    }

    fn put_fixture(&self, node: usize, name: &str) -> Result<String, Error> {
        self.put_unit(node, name, &fixture(name))
    }

    fn systemd_unit(&self, node: usize, unit: &str) -> Result<SystemdUnit, Error> {
        let props =
            "LoadState,ActiveState,SubState,MainPID,ActiveEnterTimestampMonotonic,UnitFileState";
        let out = self
            .exec(node, &["systemctl", "show", "-p", props, unit])?
            .ok(&format!("systemctl show {unit} on node{node}"))?;
        let kv: BTreeMap<&str, &str> = out
            .stdout
            .lines()
            .filter_map(|l| l.split_once('='))
            .collect();
        let get = |k: &str| kv.get(k).copied().unwrap_or_default().to_string();
        let num = |k: &str| -> Result<u64, Error> {
            get(k).parse().map_err(|_| Error::Harness {
                what: format!("systemctl show {unit} on node{node}"),
                detail: format!("{k} in {:?}", out.stdout),
            })
        };
        Ok(SystemdUnit {
            load_state: get("LoadState"),
            active_state: get("ActiveState"),
            sub_state: get("SubState"),
            main_pid: u32::try_from(num("MainPID")?).unwrap_or(u32::MAX),
            active_enter_us: num("ActiveEnterTimestampMonotonic")?,
            unit_file_state: get("UnitFileState"),
        })
    }

    fn node_of(&self, machine: &str) -> Option<usize> {
        self.nodes().find(|&i| self.machine_id(i) == machine)
    }

    fn engine_leader(&self) -> Result<Option<String>, Error> {
        let mut cmd = Command::new("etcdctl");
        cmd.env("ETCDCTL_API", "3").args([
            &format!("--endpoints={}", self.etcd_endpoints().join(",")),
            "get",
            &format!("{}leader", fleet_config::DEFAULT_KEY_PREFIX),
            "--print-value-only",
        ]);
        let out = run(&mut cmd, "etcdctl get leader", Duration::from_secs(20))?
            .ok("etcdctl get leader")?;
        let v = out.trimmed();
        Ok((!v.is_empty()).then(|| v.to_string()))
    }

    fn node_journal_since(&self, node: usize, since_us: u64) -> Result<String, Error> {
        // journalctl cannot filter on monotonic time; print it and filter here
        let text = self.journal(node, &["-o", "short-monotonic", "_PID=1"])?;
        Ok(text
            .lines()
            .filter(|l| journal_time_us(l).is_some_and(|t| t >= since_us))
            .map(|l| format!("{l}\n"))
            .collect())
    }
}

/// The lines of a systemd journal that show a unit whose name starts with one of `prefixes`
/// being started or stopped (`Starting`, `Started`, `Stopping`, `Stopped`).
pub fn transitions<'a>(journal: &'a str, prefixes: &[&str]) -> Vec<&'a str> {
    const VERBS: [&str; 4] = ["Starting ", "Started ", "Stopping ", "Stopped "];
    journal
        .lines()
        .filter(|l| {
            VERBS.iter().any(|verb| {
                l.split(verb)
                    .skip(1)
                    .any(|rest| prefixes.iter().any(|p| rest.starts_with(p)))
            })
        })
        .collect()
}

/// The host's CLOCK_MONOTONIC in microseconds. Nodes share the host's kernel and have no time
/// namespace, so this is the clock of systemd's `*TimestampMonotonic` properties and of
/// `journalctl -o short-monotonic` in every node.
pub fn now_us() -> u64 {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::Monotonic);
    let secs = u64::try_from(t.tv_sec).unwrap_or(0);
    let nanos = u64::try_from(t.tv_nsec).unwrap_or(0);
    secs * 1_000_000 + nanos / 1_000
}

/// Rows of a `--no-legend` table, each with exactly `cols` whitespace-separated columns.
fn table(stdout: &str, cols: usize, what: &str) -> Result<Vec<Vec<String>>, Error> {
    stdout
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            let c: Vec<String> = l.split_whitespace().map(str::to_string).collect();
            if c.len() == cols {
                Ok(c)
            } else {
                Err(Error::Harness {
                    what: what.to_string(),
                    detail: format!("want {cols} columns in {l:?}"),
                })
            }
        })
        .collect()
}

/// `<machine>/<ip>` → `<machine>`.
fn strip_ip(legend: &str) -> String {
    legend.split('/').next().unwrap_or(legend).to_string()
}

/// The timestamp of a `short-monotonic` journal line (`[  123.456789] host ...`), in µs.
fn journal_time_us(line: &str) -> Option<u64> {
    let inner = line
        .trim_start()
        .strip_prefix('[')?
        .split(']')
        .next()?
        .trim();
    let (secs, frac) = inner.split_once('.')?;
    let secs: u64 = secs.parse().ok()?;
    let frac = format!("{frac:0<6}");
    let micros: u64 = frac.get(..6)?.parse().ok()?;
    Some(secs * 1_000_000 + micros)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_parse_or_name_the_bad_line() {
        let cases: &[(&str, usize, Result<usize, &str>)] = &[
            ("", 2, Ok(0)),
            ("a\tb\nc\t\td\n", 2, Ok(2)),
            ("a\tb\nc\n", 2, Err("\"c\"")),
            ("\n  \n", 1, Ok(0)),
        ];
        for (text, cols, want) in cases {
            match (table(text, *cols, "t"), want) {
                (Ok(rows), Ok(n)) => assert_eq!(rows.len(), *n, "{text:?}"),
                (Err(e), Err(needle)) => assert!(e.to_string().contains(needle), "{e}"),
                (got, want) => panic!("{text:?}: got {got:?}, want {want:?}"),
            }
        }
    }

    #[test]
    fn legends_lose_their_ip() {
        for (legend, want) in [
            ("0123abcd/172.18.0.11", "0123abcd"),
            ("global", "global"),
            ("-", "-"),
        ] {
            assert_eq!(strip_ip(legend), want);
        }
    }

    #[test]
    fn transitions_name_start_and_stop_lines_of_the_units_asked_for() {
        let journal = "[1.0] node1 systemd[1]: Starting hello@1.service - Greeter...\n\
                       [1.1] node1 systemd[1]: Started hello@1.service - Greeter.\n\
                       [2.0] node1 systemd[1]: Stopping global.service - One copy...\n\
                       [2.1] node1 systemd[1]: Stopped fleet.service - fleet daemon.\n\
                       [3.0] node1 systemd[1]: Reloading.\n\
                       [3.1] node1 systemd[1]: Started session-2.scope - Session 2 of root.\n";
        let cases: &[(&[&str], usize)] = &[
            (&["hello@"], 2),
            (&["global.service"], 1),
            (&["hello@", "global"], 3),
            (&["fleet.service"], 1),
            (&["nothing"], 0),
        ];
        for (prefixes, want) in cases {
            let got = transitions(journal, prefixes);
            assert_eq!(got.len(), *want, "{prefixes:?}: {got:?}");
        }
    }

    #[test]
    fn monotonic_journal_timestamps() {
        let cases = [
            (
                "[   12.345678] node1 systemd[1]: Started x.",
                Some(12_345_678),
            ),
            ("[12.5] node1 systemd[1]: x", Some(12_500_000)),
            ("-- Boot abc --", None),
            ("Nov 21 06:30:10 node1 x", None),
        ];
        for (line, want) in cases {
            assert_eq!(journal_time_us(line), want, "{line}");
        }
    }
}
