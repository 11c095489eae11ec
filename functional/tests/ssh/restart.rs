//! Rolling `restart` of normal and global units, checked against every node's journal: one instance down at a time.

use functional::FleetCluster;
use std::collections::BTreeMap;

use functional::fleet::{boot, must, now_us, quick_spec, transitions};
use functional::{Cluster, Output, wait_for};

use crate::support::*;

/// A unit's down time on one node: from `Stopping` (or `Stopped`) to the next `Started`, in
/// CLOCK_MONOTONIC microseconds.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Down {
    node: usize,
    unit: String,
    from: u64,
    to: Option<u64>,
}

/// The down windows of units starting with `prefix`, from every node's journal since `since`.
fn down_windows(c: &Cluster, since: u64, prefix: &str) -> Vec<Down> {
    let mut windows = Vec::new();
    for node in c.nodes() {
        let journal = must(c.node_journal_since(node, since));
        let mut open: BTreeMap<String, usize> = BTreeMap::new();
        for line in transitions(&journal, &[prefix]) {
            let Some((ts, verb, unit)) = parse_transition(line) else {
                panic!("unreadable journal line {line:?}");
            };
            match verb {
                "Stopping" | "Stopped" if !open.contains_key(unit) => {
                    open.insert(unit.to_string(), windows.len());
                    windows.push(Down {
                        node,
                        unit: unit.to_string(),
                        from: ts,
                        to: None,
                    });
                }
                "Started" => {
                    if let Some(i) = open.remove(unit) {
                        windows[i].to = Some(ts);
                    }
                }
                _ => {}
            }
        }
    }
    windows.sort_by_key(|w| w.from);
    windows
}

/// `[  12.345678] node1 systemd[1]: Stopping hello@1.service - ...` → (µs, verb, unit).
fn parse_transition(line: &str) -> Option<(u64, &str, &str)> {
    let rest = line.trim_start().strip_prefix('[')?;
    let (ts, rest) = rest.split_once(']')?;
    let (secs, frac) = ts.trim().split_once('.')?;
    let frac = format!("{frac:0<6}");
    let us = secs.parse::<u64>().ok()? * 1_000_000 + frac.get(..6)?.parse::<u64>().ok()?;
    let (_, msg) = rest.split_once("]: ")?;
    let mut words = msg.split_whitespace();
    let verb = words.next()?;
    let unit = words.next()?.trim_end_matches('.');
    Some((us, verb, unit))
}

/// Waits until every one of `units` (unit, node) had exactly one complete down window since
/// `since`, and checks that no two windows overlap.
fn check_one_down_at_a_time(c: &Cluster, since: u64, prefix: &str, units: &[(String, usize)]) {
    let mut want: Vec<(usize, String)> = units.iter().map(|(u, n)| (*n, u.clone())).collect();
    want.sort();
    let windows = must(wait_for(
        &format!("one completed restart of each {prefix} unit in the journals"),
        WAIT,
        || {
            let w = down_windows(c, since, prefix);
            let mut got: Vec<(usize, String)> = w
                .iter()
                .filter(|d| d.to.is_some())
                .map(|d| (d.node, d.unit.clone()))
                .collect();
            got.sort();
            if got == want && w.len() == want.len() {
                Ok(w)
            } else {
                Err(format!("{w:?}"))
            }
        },
    ));
    let gaps: Vec<String> = windows
        .iter()
        .map(|w| {
            let down = w.to.unwrap_or(w.from).saturating_sub(w.from) / 1000;
            format!("{} on node{} down {down} ms", w.unit, w.node)
        })
        .collect();
    eprintln!("restart of {prefix}: {}", gaps.join(", "));
    for pair in windows.windows(2) {
        let (a, b) = (&pair[0], &pair[1]);
        assert!(
            a.to.is_some_and(|end| end <= b.from),
            "{} on node{} was down while {} on node{} was: {windows:?}",
            b.unit,
            b.node,
            a.unit,
            a.node
        );
    }
}

#[test]
fn restart_keeps_one_instance_down_at_a_time() {
    let c = boot(quick_spec("sshrst", 3));
    let h = Host::new(&c);
    let files: Vec<String> = (1..=3)
        .map(|i| fixture_path(&format!("hello@{i}.service")))
        .chain([fixture_path("global.service")])
        .collect();
    let units = start_and_wait(&h, &files, 6);
    let placed: Vec<(String, usize)> = units
        .iter()
        .flat_map(|(u, nodes)| nodes.iter().map(move |n| (u.clone(), *n)))
        .collect();
    let pid = |unit: &str, node: usize| must(c.systemd_unit(node, unit)).main_pid;
    let pids: BTreeMap<(String, usize), u32> = placed
        .iter()
        .map(|(u, n)| ((u.clone(), *n), pid(u, *n)))
        .collect();

    // normal units: one after the other, each back up before the next goes down
    let since = now_us();
    h.fleetctl_ok(&[
        "restart",
        "hello@1.service",
        "hello@2.service",
        "hello@3.service",
    ]);
    let hellos: Vec<(String, usize)> = placed
        .iter()
        .filter(|(u, _)| u.starts_with("hello@"))
        .cloned()
        .collect();
    check_one_down_at_a_time(&c, since, "hello@", &hellos);

    // a global unit: one machine after the other (through a tunnel to node1 this time, so
    // the other machines are reached through it)
    let since = now_us();
    let out = h.tunnel(1, &["restart", "global.service"]);
    assert!(
        out.success(),
        "restart global.service through the tunnel: {out}"
    );
    let globals: Vec<(String, usize)> = placed
        .iter()
        .filter(|(u, _)| u == "global.service")
        .cloned()
        .collect();
    assert_eq!(globals.len(), 3, "{placed:?}");
    check_one_down_at_a_time(&c, since, "global.service", &globals);

    // everything runs again, as new processes
    for ((unit, node), old) in &pids {
        let u = must(c.systemd_unit(*node, unit));
        assert!(
            u.active_state == "active" && u.main_pid != *old && u.main_pid != 0,
            "{unit} on node{node} (pid before {old}): {u}"
        );
    }
    // what cannot be done with a global unit or an inactive one
    h.fleetctl_ok(&["submit", &fixture_path("goodbye.service")]);
    let cases: [(&[&str], i32, &str); 4] = [
        (
            &["journal", "global.service"],
            1,
            "Unable to retrieve journal of global unit global.service.\n",
        ),
        (
            &["ssh", "-u", "global.service", "true"],
            1,
            "Unable to proceed: global units unsupported\n",
        ),
        (
            &["restart", "goodbye.service"],
            0,
            "Unable to restart unit goodbye.service in state inactive\n",
        ),
        (
            &["status", "goodbye.service"],
            1,
            "Unit goodbye.service does not appear to be loaded.\n",
        ),
    ];
    for (args, code, stderr) in cases {
        let out = h.fleetctl(args);
        assert_eq!(
            (out.code, out.stderr.as_str()),
            (Some(code), stderr),
            "fleetctl {}: {out}",
            args.join(" ")
        );
    }

    // status of a global unit: systemctl status from every machine running it
    let headings = |out: &Output, unit: &str| {
        out.stdout
            .lines()
            // "● unit - description" (active) or "○ unit - ..." (inactive)
            .filter(|l| {
                l.split_once(' ')
                    .is_some_and(|(_, rest)| rest.starts_with(&format!("{unit} - ")))
            })
            .count()
    };
    let out = h.fleetctl_ok(&["status", "global.service"]);
    assert_eq!(headings(&out, "global.service"), 3, "{out}");
    // a stopped unit's status 3 ends the command, after the global units named before it
    h.fleetctl_ok(&["load", "goodbye.service"]);
    let out = h.fleetctl(&[
        "status",
        "global.service",
        "goodbye.service",
        "hello@1.service",
    ]);
    assert_eq!(out.code, Some(3), "{out}");
    let shown: Vec<usize> = ["global.service", "goodbye.service", "hello@1.service"]
        .iter()
        .map(|u| headings(&out, u))
        .collect();
    assert_eq!(shown, [3, 1, 0], "{out}");
}
