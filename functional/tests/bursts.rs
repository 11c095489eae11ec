//! Bursts of `fleetctl start` of local unit files, the path that creates each new unit in its
//! desired state with one request: two invocations at once, in two nodes (two API servers),
//! over overlapping sets of units that all conflict with each other.

use std::collections::{BTreeMap, BTreeSet};
use std::thread;
use std::time::{Duration, Instant};

use functional::fleet::{UnitRow, boot, must, quick_spec};
use functional::{Cluster, FleetCluster};

/// Bound of every wait for the cluster to act on a command.
const WAIT: Duration = Duration::from_secs(30);
/// How long "nothing else happens" is watched: several reconcile passes.
const SETTLE: Duration = Duration::from_secs(4);

/// The one machine an active unit runs on.
fn machine_of(states: &BTreeMap<String, Vec<UnitRow>>, unit: &str) -> String {
    match states.get(unit).map(Vec::as_slice) {
        Some([row]) => row.machine.clone(),
        other => panic!("{unit}: want one active row, got {other:?} in {states:?}"),
    }
}

/// Names of the active units matching `pattern` in `node`'s systemd.
fn running_in(c: &Cluster, node: usize, pattern: &str) -> BTreeSet<String> {
    let out = must(c.exec(
        node,
        &[
            "systemctl",
            "list-units",
            "--state=active",
            "--no-legend",
            "--plain",
            pattern,
        ],
    ));
    out.stdout
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_string)
        .collect()
}

/// Each of two fleetctl invocations at once prints, in argument order, the units it created
/// (one the other created first is found: no line) and then the units it started (one the
/// other created or started first: no line). Between them every unit is created once, with
/// its start, and the conflicts hold: one unit per machine, the rest unplaced.
#[test]
fn concurrent_bursts_of_local_files_create_each_unit_once() {
    let c = boot(quick_spec("launch", 3));
    must(c.wait_for_machines(1, 3, WAIT));
    let body = "[Service]\nExecStart=/bin/sleep infinity\n\n[X-Fleet]\nConflicts=cy-*.service\n";
    let mut paths = BTreeMap::new();
    for n in [1, 2] {
        for i in 1..=6 {
            paths.insert(
                (n, i),
                must(c.put_unit(n, &format!("cy-{i}.service"), body)),
            );
        }
    }
    let args = |node: usize, units: std::ops::RangeInclusive<usize>| -> Vec<String> {
        let mut a = vec!["start".to_string(), "--no-block".to_string()];
        a.extend(units.map(|i| paths[&(node, i)].clone()));
        a
    };
    let (a, b) = (args(1, 1..=4), args(2, 3..=6));
    let run = |node: usize, args: &[String]| {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        must(c.fleetctl(node, &args))
    };
    let (out_a, out_b) = thread::scope(|s| {
        let ha = s.spawn(|| run(1, &a));
        let hb = s.spawn(|| run(2, &b));
        (ha.join(), hb.join())
    });
    let (out_a, out_b) = (
        out_a.unwrap_or_else(|_| panic!("fleetctl in node1 panicked")),
        out_b.unwrap_or_else(|_| panic!("fleetctl in node2 panicked")),
    );
    let mut created = Vec::new();
    let mut triggered = Vec::new();
    for (out, units) in [(&out_a, 1..=4), (&out_b, 3..=6)] {
        assert!(out.success(), "{out}");
        assert_eq!(out.stderr, "", "{out}");
        let lines: Vec<&str> = out.stdout.lines().collect();
        let split = lines
            .iter()
            .position(|l| l.starts_with("Triggered"))
            .unwrap_or(lines.len());
        for (part, what) in [(&lines[..split], "inactive"), (&lines[split..], "start")] {
            let own: Vec<String> = units
                .clone()
                .map(|i| match what {
                    "inactive" => format!("Unit cy-{i}.service inactive"),
                    _ => format!("Triggered unit cy-{i}.service start"),
                })
                .collect();
            let at: Vec<Option<usize>> = part
                .iter()
                .map(|l| own.iter().position(|o| o == l))
                .collect();
            assert!(
                at.iter().all(Option::is_some) && at.windows(2).all(|w| w[0] < w[1]),
                "{what} lines not its own or out of order: {out}"
            );
        }
        created.extend(lines[..split].iter().map(|l| l.to_string()));
        triggered.extend(lines[split..].iter().map(|l| l.to_string()));
    }
    created.sort();
    let want: Vec<String> = (1..=6)
        .map(|i| format!("Unit cy-{i}.service inactive"))
        .collect();
    assert_eq!(created, want, "each unit reported created once");
    // a unit is created with its start: whoever created it started it, nobody else
    triggered.sort();
    let want: Vec<String> = (1..=6)
        .map(|i| format!("Triggered unit cy-{i}.service start"))
        .collect();
    assert_eq!(triggered, want, "each unit reported started once");

    let files = must(c.list_unit_files(1));
    let names: Vec<&str> = files.iter().map(|f| f.unit.as_str()).collect();
    assert_eq!(
        names,
        (1..=6)
            .map(|i| format!("cy-{i}.service"))
            .collect::<Vec<_>>(),
        "each unit once: {files:?}"
    );
    assert!(files.iter().all(|f| f.dstate == "launched"), "{files:?}");
    let active = must(c.wait_for_active(1, 3, WAIT));
    let machines: BTreeSet<String> = active.keys().map(|u| machine_of(&active, u)).collect();
    assert_eq!(
        machines.len(),
        3,
        "one conflicting unit per machine: {active:?}"
    );
    let until = Instant::now() + SETTLE;
    while Instant::now() < until {
        assert_eq!(must(c.active_units(1)), active, "the active units changed");
        thread::sleep(Duration::from_millis(500));
    }
    for n in c.nodes() {
        assert!(
            running_in(&c, n, "cy-*").len() <= 1,
            "node{n} runs two of them"
        );
    }
}
