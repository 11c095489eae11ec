//! Where the cluster puts units, as fleetctl and each node's systemd show it: MachineOf
//! pairs, Conflicts (mutual and one-way), Replaces (also circular), MachineID,
//! MachineMetadata with template specifiers, and global units.

use std::collections::{BTreeMap, BTreeSet};
use std::thread;
use std::time::{Duration, Instant};

use functional::fleet::{
    NODE_UNITS_DIR, UnitFileRow, UnitRow, WAIT, boot, fixture, fleetctl, fleetctl_ok, must, node,
    quick_spec, short_id, wait_systemd,
};
use functional::{Cluster, FleetCluster, Output, wait_for};
/// How long "nothing else happens" is watched: several reconcile passes.
const SETTLE: Duration = Duration::from_secs(4);

/// The one machine an active unit runs on.
fn machine_of(states: &BTreeMap<String, Vec<UnitRow>>, unit: &str) -> String {
    match states.get(unit).map(Vec::as_slice) {
        Some([row]) => row.machine.clone(),
        other => panic!("{unit}: want one active row, got {other:?} in {states:?}"),
    }
}

/// Names of the units matching `pattern` that systemd in `node` runs.
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

/// Watches the active units for [`SETTLE`]: they must stay exactly `want`.
fn stays_active(c: &Cluster, node: usize, want: &BTreeMap<String, Vec<UnitRow>>) {
    let until = Instant::now() + SETTLE;
    while Instant::now() < until {
        let got = must(c.active_units(node));
        assert_eq!(&got, want, "the active units changed");
        thread::sleep(Duration::from_millis(500));
    }
}

#[test]
fn machine_of_pairs_land_together_and_move_together() {
    let c = boot(quick_spec("machof", 3));
    must(c.wait_for_machines(1, 3, WAIT));
    let mut args = vec!["start".to_string(), "--no-block".to_string()];
    for i in 0..3 {
        for half in ["ping", "pong"] {
            args.push(must(c.put_fixture(1, &format!("{half}.{i}.service"))));
        }
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    fleetctl_ok(&c, 1, &args);
    assert_eq!(must(c.list_unit_files(1)).len(), 6);

    let states = must(c.wait_for_active(1, 6, WAIT));
    for i in 0..3 {
        assert_eq!(
            machine_of(&states, &format!("ping.{i}.service")),
            machine_of(&states, &format!("pong.{i}.service")),
            "pair {i} split: {states:?}"
        );
    }

    // the machine of pair 1 loses its fleetd: the pair moves, together
    let old = machine_of(&states, "ping.1.service");
    let gone = node(&c, &old);
    must(c.stop_fleetd(gone));
    let watcher = c.nodes().find(|&n| n != gone).unwrap_or(1);
    must(c.wait_for_machines(watcher, 2, WAIT));
    let states = must(wait_for("pair 1 moved", WAIT, || {
        let s = c
            .wait_for_active(watcher, 6, WAIT)
            .map_err(|e| e.to_string())?;
        if machine_of(&s, "ping.1.service") != old {
            Ok(s)
        } else {
            Err(format!("{s:?}"))
        }
    }));
    let new = machine_of(&states, "ping.1.service");
    assert_eq!(new, machine_of(&states, "pong.1.service"), "{states:?}");
    for unit in ["ping.1.service", "pong.1.service"] {
        wait_systemd(&c, node(&c, &new), unit, None, "active");
        wait_systemd(&c, gone, unit, None, "inactive");
    }
}

#[test]
fn mutually_conflicting_units_take_one_machine_each() {
    let c = boot(quick_spec("conflict", 3));
    must(c.wait_for_machines(1, 3, WAIT));
    let names: Vec<String> = (0..5).map(|i| format!("conflict.{i}.service")).collect();
    let mut args = vec!["start".to_string(), "--block-attempts=3".to_string()];
    for n in &names {
        args.push(must(c.put_unit(1, n, &fixture("conflict.service"))));
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    // blocking: two of them can never start, and fleetctl says why
    let started = fleetctl(&c, 1, &args);
    assert!(!started.success(), "two units cannot be placed: {started}");
    assert_eq!(must(c.list_unit_files(1)).len(), 5);

    let states = must(c.wait_for_active(1, 3, WAIT));
    let machines: BTreeSet<String> = states.keys().map(|u| machine_of(&states, u)).collect();
    assert_eq!(
        machines.len(),
        3,
        "3 active units on 3 machines: {states:?}"
    );
    // systemd agrees: one conflict.N per node
    for n in c.nodes() {
        let running = running_in(&c, n, "conflict.*");
        assert_eq!(running.len(), 1, "node{n} runs {running:?}");
    }
    stays_active(&c, 1, &states);

    // the two others are not scheduled
    let files = must(c.list_unit_files(1));
    let waiting: Vec<&str> = files
        .iter()
        .filter(|f| !states.contains_key(&f.unit))
        .map(|f| f.unit.as_str())
        .collect();
    assert_eq!(waiting.len(), 2, "{files:?}");
    for f in files.iter().filter(|f| waiting.contains(&f.unit.as_str())) {
        assert_eq!(
            (f.dstate.as_str(), f.state.as_str(), f.target.as_str()),
            ("launched", "inactive", "-"),
            "{f:?}"
        );
    }
    assert!(
        waiting.iter().any(|u| started.stderr.contains(&format!(
            "Unit {u} cannot be placed yet: conflicts with conflict."
        ))),
        "no reason for {waiting:?}: {started}"
    );
}

#[test]
fn a_one_way_conflict_keeps_the_other_unit_away_until_destroyed() {
    let c = boot(quick_spec("oneway", 1));
    must(c.wait_for_machines(1, 1, WAIT));
    let cwh = must(c.put_fixture(1, "conflicts-with-hello.service"));
    let hello = must(c.put_fixture(1, "hello.service"));
    fleetctl_ok(&c, 1, &["start", "--no-block", &cwh]);
    must(c.wait_for_active(1, 1, WAIT));

    // hello.service declares no conflict, but cannot join the unit that excludes it
    fleetctl_ok(&c, 1, &["start", "--no-block", &hello]);
    assert_eq!(must(c.list_unit_files(1)).len(), 2);
    let states = must(c.wait_for_active(1, 1, WAIT));
    assert!(
        states.contains_key("conflicts-with-hello.service"),
        "{states:?}"
    );
    stays_active(&c, 1, &states);
    assert_eq!(
        must(c.systemd_unit(1, "hello.service")).load_state,
        "not-found"
    );

    fleetctl_ok(&c, 1, &["destroy", "conflicts-with-hello.service"]);
    let states = must(wait_for("hello.service alone active", WAIT, || {
        let s = c.wait_for_active(1, 1, WAIT).map_err(|e| e.to_string())?;
        if s.contains_key("hello.service") {
            Ok(s)
        } else {
            Err(format!("{s:?}"))
        }
    }));
    assert_eq!(states.len(), 1, "{states:?}");
    wait_systemd(&c, 1, "hello.service", None, "active");
    wait_systemd(&c, 1, "conflicts-with-hello.service", None, "inactive");
}

#[test]
fn replaces_takes_the_machine_and_moves_the_replaced_unit() {
    let c = boot(quick_spec("replace", 2));
    must(c.wait_for_machines(1, 2, WAIT));
    let paths: Vec<String> = [
        "replace.0.service",
        "replace.1.service",
        "replace.2.service",
        "replace-kick0.service",
    ]
    .iter()
    .map(|n| must(c.put_fixture(1, n)))
    .collect();
    // replace.0 alone on one machine, replace.1 and .2 (MachineOf) on the other
    fleetctl_ok(&c, 1, &["start", &paths[0]]);
    fleetctl_ok(&c, 1, &["start", &paths[1], &paths[2]]);
    let states = must(c.wait_for_active(1, 3, WAIT));
    let old = machine_of(&states, "replace.0.service");
    assert_ne!(old, machine_of(&states, "replace.1.service"), "{states:?}");
    let pid_before = must(c.systemd_unit(node(&c, &old), "replace.0.service")).main_pid;

    fleetctl_ok(&c, 1, &["start", "--no-block", &paths[3]]);
    let states = must(wait_for(
        "replace-kick0 in the place of replace.0",
        WAIT,
        || {
            let s = c.wait_for_active(1, 4, WAIT).map_err(|e| e.to_string())?;
            let kick = machine_of(&s, "replace-kick0.service");
            let zero = machine_of(&s, "replace.0.service");
            if kick == old && zero != old {
                Ok(s)
            } else {
                Err(format!("{s:?}"))
            }
        },
    ));
    let moved_to = node(&c, &machine_of(&states, "replace.0.service"));
    wait_systemd(&c, moved_to, "replace.0.service", None, "active");
    wait_systemd(&c, node(&c, &old), "replace-kick0.service", None, "active");
    wait_systemd(&c, node(&c, &old), "replace.0.service", None, "inactive");
    assert_ne!(
        must(c.systemd_unit(moved_to, "replace.0.service")).main_pid,
        pid_before
    );
}

#[test]
fn circular_replaces_launch_only_one_unit() {
    let c = boot(quick_spec("circular", 2));
    must(c.wait_for_machines(1, 2, WAIT));
    // replace.0 replaces replace-kick0, which replaces replace.0
    let zero = format!(
        "{}\n[X-Fleet]\nReplaces=replace-kick0.service\n",
        fixture("replace.0.service")
    );
    let zero = must(c.put_unit(1, "replace.0.service", &zero));
    let kick = must(c.put_fixture(1, "replace-kick0.service"));

    fleetctl_ok(&c, 1, &["start", "--no-block", &zero]);
    assert_eq!(must(c.list_unit_files(1)).len(), 1);
    must(c.wait_for_active(1, 1, WAIT));

    fleetctl_ok(&c, 1, &["start", "--no-block", &kick]);
    assert_eq!(must(c.list_unit_files(1)).len(), 2);
    let launched = || -> Result<Vec<String>, functional::Error> {
        Ok(c.list_unit_files(1)?
            .into_iter()
            .filter(|f| f.state == "launched")
            .map(|f| f.unit)
            .collect())
    };
    // give the engine a few passes, then exactly one is launched and active
    thread::sleep(SETTLE);
    let states = must(c.wait_for_active(1, 1, WAIT));
    let l = must(launched());
    assert_eq!(l.len(), 1, "launched: {l:?}");
    assert!(states.contains_key(&l[0]), "{states:?} vs launched {l:?}");
    stays_active(&c, 1, &states);
    let mut running = BTreeSet::new();
    for n in c.nodes() {
        running.extend(running_in(&c, n, "replace*"));
    }
    assert_eq!(running.len(), 1, "systemd runs {running:?}");
}

#[test]
fn machine_id_and_metadata_with_template_specifiers_pick_the_machine() {
    let mut spec = quick_spec("machid", 3);
    for i in 1..=3 {
        spec = spec.metadata(i, &format!("hostname=node{i}"));
    }
    let c = boot(spec);
    must(c.wait_for_machines(1, 3, WAIT));

    // MachineID=%i: each instance goes to the machine its name names
    must(c.put_fixture(1, "pin@.service"));
    for i in c.nodes() {
        let unit = format!("pin@{}.service", c.machine_id(i));
        let out = fleetctl_ok(&c, 1, &["start", &format!("{NODE_UNITS_DIR}/{unit}")]);
        assert_eq!(
            out.stdout,
            format!(
                "Unit {unit} inactive\nUnit {unit} launched on {}.../{}\n",
                short_id(c.machine_id(i)),
                c.ip(i)
            ),
            "{out}"
        );
        wait_systemd(&c, i, &unit, None, "active");
    }

    // MachineMetadata=hostname=%i from a submitted template, started in reverse order
    let template = must(c.put_fixture(1, "metadata@.service"));
    fleetctl_ok(&c, 1, &["submit", &template]);
    for i in (1..=3).rev() {
        fleetctl_ok(&c, 1, &["start", &format!("metadata@node{i}.service")]);
    }
    let states = must(c.wait_for_active(1, 6, WAIT));
    for i in c.nodes() {
        let unit = format!("metadata@node{i}.service");
        assert_eq!(machine_of(&states, &unit), c.machine_id(i), "{states:?}");
        wait_systemd(&c, i, &unit, None, "active");
    }

    // no machine has the metadata: never placed, and fleetctl says why
    let out = fleetctl(
        &c,
        1,
        &["start", "--block-attempts=2", "metadata@invalid.service"],
    );
    assert!(!out.success(), "{out}");
    assert!(
        out.stderr
            .contains("Unit metadata@invalid.service cannot be placed yet: ")
            && out.stderr.contains("hostname=invalid"),
        "{out}"
    );
    assert_eq!(must(c.wait_for_active(1, 6, WAIT)), states);
}

#[test]
fn global_units_run_once_per_machine_and_conflicting_globals_do_not() {
    let c = boot(quick_spec("global", 3));
    let machines = must(c.wait_for_machines(1, 3, WAIT));
    let hello = must(c.put_fixture(1, "hello.service"));
    let goodbye = must(c.put_fixture(1, "goodbye.service"));
    fleetctl_ok(&c, 1, &["start", "--no-block", &hello, &goodbye]);
    must(c.wait_for_active(1, 2, WAIT));

    let global = must(c.put_fixture(1, "global.service"));
    let out = fleetctl_ok(&c, 1, &["start", "--no-block", &global]);
    assert_eq!(
        out.stdout, "Unit global.service inactive\nTriggered global unit global.service start\n",
        "{out}"
    );
    let states = must(c.wait_for_active(1, 5, WAIT));
    let on: BTreeSet<String> = states["global.service"]
        .iter()
        .map(|r| r.machine.clone())
        .collect();
    assert_eq!(on, machines.iter().cloned().collect(), "{states:?}");
    for n in c.nodes() {
        wait_systemd(&c, n, "global.service", None, "active");
    }
    let files = must(c.list_unit_files(1));
    let g = files
        .iter()
        .find(|f| f.unit == "global.service")
        .unwrap_or_else(|| panic!("{files:?}"));
    assert_eq!(
        (g.dstate.as_str(), g.state.as_str(), g.target.as_str()),
        ("launched", "-", "global")
    );

    // two globals that conflict: the first runs everywhere, the second nowhere
    let g0 = must(c.put_unit(
        1,
        "conflict-global.0.service",
        &fixture("conflict-global.service"),
    ));
    let g1 = must(c.put_unit(
        1,
        "conflict-global.1.service",
        &fixture("conflict-global.service"),
    ));
    fleetctl_ok(&c, 1, &["start", "--no-block", &g0]);
    let states = must(c.wait_for_active(1, 8, WAIT));
    assert_eq!(states["conflict-global.0.service"].len(), 3, "{states:?}");
    fleetctl_ok(&c, 1, &["start", "--no-block", &g1]);
    stays_active(&c, 1, &states);
    for n in c.nodes() {
        assert_eq!(
            must(c.systemd_unit(n, "conflict-global.1.service")).active_state,
            "inactive",
            "node{n}"
        );
        assert!(running_in(&c, n, "conflict-global.*").len() == 1, "node{n}");
    }

    // stopping a global unit stops it everywhere
    let out = fleetctl_ok(&c, 1, &["stop", "global.service"]);
    assert!(
        out.stdout
            .contains("Triggered global unit global.service stop"),
        "{out}"
    );
    for n in c.nodes() {
        wait_systemd(&c, n, "global.service", None, "inactive");
    }
    must(c.wait_for_active(1, 5, WAIT));
}

/// Two fleetctl invocations at once, in two nodes (two API servers), start overlapping sets
/// of template instances that all conflict with each other: each unit is created once (the
/// one created by both is taken by the second as its own), no machine runs two of them, the
/// rest say why they wait, and both commands print exactly their own lines and succeed.
#[test]
fn concurrent_starts_of_overlapping_conflicting_units() {
    let c = boot(quick_spec("concur", 3));
    must(c.wait_for_machines(1, 3, WAIT));
    let template =
        "[Service]\nExecStart=/bin/sleep infinity\n\n[X-Fleet]\nConflicts=cx@*.service\n";
    for n in [1, 2] {
        must(c.put_unit(n, "cx@.service", template));
    }
    let (_, files, active) = overlapping_conflicting_starts(
        &c,
        "cx@*",
        |i| format!("cx@{i}.service"),
        |_, i| format!("{NODE_UNITS_DIR}/cx@{i}.service"),
    );
    let waiting: Vec<&UnitFileRow> = files
        .iter()
        .filter(|f| !active.contains_key(&f.unit))
        .collect();
    assert_eq!(waiting.len(), 3, "{files:?}");
    for f in waiting {
        assert_eq!(f.target, "-", "{f:?} should not be placed");
    }
}

/// The same with local unit files, the path that creates each new unit in its desired state
/// with one request: every unit is created once, with its start, and nothing is written to
/// stderr.
#[test]
fn concurrent_bursts_of_local_files_create_each_unit_once() {
    let c = boot(quick_spec("bursts", 3));
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
    let (outs, _, _) = overlapping_conflicting_starts(
        &c,
        "cy-*",
        |i| format!("cy-{i}.service"),
        |n, i| paths[&(n, i)].clone(),
    );
    for out in outs {
        assert_eq!(out.stderr, "", "{out}");
    }
}

/// `fleetctl start --no-block` of units 1..=4 in node1 and, at the same time, of units 3..=6
/// in node2, six units that all conflict with each other; `unit(i)` is unit i's name,
/// `file(node, i)` the argument naming it in `node` and `pattern` matches the six in systemd.
/// Each fleetctl prints, in its order, the units it created (one the other created first is
/// found, not created: no line) and then the units it started (one the other started first is
/// "already launched": no line); between them every unit is created once and started, and
/// the conflicts hold: one unit per machine, for good. Returns both outputs, the unit files
/// and the active units.
fn overlapping_conflicting_starts(
    c: &Cluster,
    pattern: &str,
    unit: impl Fn(usize) -> String,
    file: impl Fn(usize, usize) -> String,
) -> (
    [Output; 2],
    Vec<UnitFileRow>,
    BTreeMap<String, Vec<UnitRow>>,
) {
    let args = |node: usize, units: std::ops::RangeInclusive<usize>| -> Vec<String> {
        let mut a = vec!["start".to_string(), "--no-block".to_string()];
        a.extend(units.map(|i| file(node, i)));
        a
    };
    let (a, b) = (args(1, 1..=4), args(2, 3..=6));
    let run = |node: usize, args: &[String]| {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        fleetctl(c, node, &args)
    };
    let (out_a, out_b) = thread::scope(|s| {
        let ha = s.spawn(|| run(1, &a));
        let hb = s.spawn(|| run(2, &b));
        (ha.join(), hb.join())
    });
    let outs = [
        out_a.unwrap_or_else(|_| panic!("fleetctl in node1 panicked")),
        out_b.unwrap_or_else(|_| panic!("fleetctl in node2 panicked")),
    ];
    let mut created = Vec::new();
    let mut triggered = BTreeSet::new();
    for (out, units) in [(&outs[0], 1..=4), (&outs[1], 3..=6)] {
        assert!(out.success(), "{out}");
        let lines: Vec<&str> = out.stdout.lines().collect();
        let split = lines
            .iter()
            .position(|l| l.starts_with("Triggered"))
            .unwrap_or(lines.len());
        for (part, what) in [(&lines[..split], "inactive"), (&lines[split..], "start")] {
            let own: Vec<String> = units
                .clone()
                .map(|i| match what {
                    "inactive" => format!("Unit {} inactive", unit(i)),
                    _ => format!("Triggered unit {} start", unit(i)),
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
        .map(|i| format!("Unit {} inactive", unit(i)))
        .collect();
    assert_eq!(created, want, "each unit reported created once");
    let want: BTreeSet<String> = (1..=6)
        .map(|i| format!("Triggered unit {} start", unit(i)))
        .collect();
    assert_eq!(triggered, want, "each unit reported started");

    let files = must(c.list_unit_files(1));
    let names: Vec<&str> = files.iter().map(|f| f.unit.as_str()).collect();
    assert_eq!(
        names,
        (1..=6).map(&unit).collect::<Vec<_>>(),
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
    stays_active(c, 1, &active);
    for n in c.nodes() {
        assert!(
            running_in(c, n, pattern).len() <= 1,
            "node{n} runs two of them"
        );
    }
    (outs, files, active)
}
