//! Machines and fleetds failing: a stopped fleetd, a killed machine, etcd out of reach, a
//! killed engine leader and a duplicate machine ID. What must move moves, and what must not
//! is neither stopped nor restarted: judged by systemd itself (main PID, the time the unit
//! last became active, its journal).

use std::collections::BTreeMap;
use std::thread;
use std::time::{Duration, Instant};

use functional::fleet::{
    AGENT_TTL, RECONCILE, SystemdUnit, UnitRow, WAIT, boot, fleetctl_ok, must, node, now_us,
    quick_spec, transitions, wait_systemd,
};
use functional::{Cluster, ClusterSpec, FleetCluster, wait_for};
/// What a bounded poll adds to a deadline it checks: the pause between probes and the time
/// one fleetctl call takes.
const POLL_SLACK: Duration = Duration::from_secs(2);
/// How long "nothing else happens" is watched after a disturbance ends.
const SETTLE: Duration = Duration::from_secs(4);

/// systemd's view of every active unit, keyed by (node, unit).
fn snapshot(
    c: &Cluster,
    states: &BTreeMap<String, Vec<UnitRow>>,
) -> BTreeMap<(usize, String), SystemdUnit> {
    let mut snap = BTreeMap::new();
    for (unit, rows) in states {
        for r in rows {
            let n = node(c, &r.machine);
            let u = must(c.systemd_unit(n, unit));
            assert_eq!(u.active_state, "active", "{unit} on node{n}: {u}");
            assert!(u.main_pid > 0, "{unit} on node{n}: {u}");
            snap.insert((n, unit.clone()), u);
        }
    }
    snap
}

/// Asserts that systemd shows each unit of `before` exactly as it was: same main process,
/// same moment of becoming active.
fn unchanged(c: &Cluster, before: &BTreeMap<(usize, String), SystemdUnit>, what: &str) {
    for ((n, unit), was) in before {
        let now = must(c.systemd_unit(*n, unit));
        assert_eq!(&now, was, "{what}: {unit} on node{n} changed");
    }
}

/// Asserts that PID 1 of `node` logged no start or stop of the units named by `prefixes`
/// since `since_us`.
fn no_transitions(c: &Cluster, node: usize, since_us: u64, prefixes: &[&str]) {
    // the units were started in this node earlier: the journal must show that, or an empty
    // answer below would prove nothing
    let all = must(c.node_journal_since(node, 0));
    assert!(
        !transitions(&all, prefixes).is_empty(),
        "node{node}: no start of {prefixes:?} in the journal at all:\n{all}"
    );
    let journal = must(c.node_journal_since(node, since_us));
    let lines = transitions(&journal, prefixes);
    assert!(
        lines.is_empty(),
        "node{node}: units were started or stopped:\n{}",
        lines.join("\n")
    );
}

/// Starts `hello@1..=n` and `extra` (paths in node 1) without blocking.
fn start_hellos(c: &Cluster, n: usize, extra: &[&str]) {
    must(c.put_fixture(1, "hello@.service"));
    let dir = functional::fleet::NODE_UNITS_DIR;
    let mut args: Vec<String> = vec!["start".into(), "--no-block".into()];
    args.extend((1..=n).map(|i| format!("{dir}/hello@{i}.service")));
    args.extend(extra.iter().map(|s| s.to_string()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    fleetctl_ok(c, 1, &args);
}

/// Units placed on `machine` in `states` (non-global rows only have one machine).
fn units_on(states: &BTreeMap<String, Vec<UnitRow>>, machine: &str) -> Vec<String> {
    states
        .iter()
        .filter(|(_, rows)| rows.len() == 1 && rows[0].machine == machine)
        .map(|(u, _)| u.clone())
        .collect()
}

#[test]
fn stopping_fleet_on_a_machine_moves_its_units_and_nothing_else() {
    let c = boot(quick_spec("stopfl", 3));
    must(c.wait_for_machines(1, 3, WAIT));
    let global = must(c.put_fixture(1, "global.service"));
    start_hellos(&c, 6, &[&global]);
    let states = must(c.wait_for_active(1, 9, WAIT));
    let before = snapshot(&c, &states);

    // stop fleetd on a node other than 1 (fleetctl runs in node 1) that runs units
    let x = (2..=3)
        .find(|&n| !units_on(&states, c.machine_id(n)).is_empty())
        .unwrap_or_else(|| panic!("nodes 2 and 3 run nothing: {states:?}"));
    let gone = c.machine_id(x).to_string();
    let moving = units_on(&states, &gone);
    let t0 = now_us();
    must(c.stop_fleetd(x));

    must(c.wait_for_machines(1, 2, WAIT));
    let after = must(wait_for("units off the stopped machine", WAIT, || {
        let s = c.wait_for_active(1, 8, WAIT).map_err(|e| e.to_string())?;
        let left = units_on(&s, &gone);
        if left.is_empty() && s.values().flatten().all(|r| r.machine != gone) {
            Ok(s)
        } else {
            Err(format!("{s:?}"))
        }
    }));
    // the moved units run elsewhere; on the stopped machine fleetd took everything down
    for unit in &moving {
        let to = node(&c, &after[unit][0].machine);
        assert_ne!(to, x);
        assert_eq!(must(c.systemd_unit(to, unit)).active_state, "active");
        assert_eq!(must(c.systemd_unit(x, unit)).active_state, "inactive");
    }
    assert_eq!(
        must(c.systemd_unit(x, "global.service")).active_state,
        "inactive"
    );
    // systemd's journals tell the same story: stopped there, started elsewhere
    let stopped_on_x = must(c.node_journal_since(x, t0));
    for unit in &moving {
        let to = node(&c, &after[unit][0].machine);
        let started_there = must(c.node_journal_since(to, t0));
        assert!(
            stopped_on_x.contains(&format!("Stopping {unit}")),
            "node{x}:\n{stopped_on_x}"
        );
        assert!(
            started_there.contains(&format!("Started {unit}")),
            "node{to}:\n{started_there}"
        );
    }
    // everything else stayed where it was, untouched
    let stayed: BTreeMap<(usize, String), SystemdUnit> =
        before.into_iter().filter(|((n, _), _)| *n != x).collect();
    for (n, unit) in stayed.keys() {
        let rows = &after[unit];
        assert!(
            rows.iter().any(|r| r.machine == c.machine_id(*n)),
            "{unit} left node{n}: {rows:?}"
        );
    }
    unchanged(&c, &stayed, "after stopping fleet on another machine");
    for n in c.nodes().filter(|&n| n != x) {
        let journal = must(c.node_journal_since(n, t0));
        let stopped: Vec<&str> = transitions(&journal, &["hello@", "global.service"])
            .into_iter()
            .filter(|l| l.contains("Stopp"))
            .collect();
        assert!(
            stopped.is_empty(),
            "node{n} stopped units:\n{}",
            stopped.join("\n")
        );
    }

    // the machine comes back: it gets its global unit again, and nothing moves back
    let settled = snapshot(&c, &after);
    must(c.start_fleetd(x));
    must(c.wait_for_machines(1, 3, WAIT));
    let back = must(c.wait_for_active(1, 9, WAIT));
    thread::sleep(SETTLE);
    assert_eq!(
        must(c.active_units(1)),
        back,
        "units moved after node{x} returned"
    );
    for (unit, rows) in &after {
        for r in rows {
            assert!(back[unit].contains(r), "{unit} moved: {:?}", back[unit]);
        }
    }
    assert!(
        back["global.service"].iter().any(|r| r.machine == gone),
        "{back:?}"
    );
    unchanged(&c, &settled, "after node{x}'s fleet came back");
}

#[test]
fn a_killed_machines_units_are_rescheduled_within_the_agent_ttl() {
    let c = boot(quick_spec("killnode", 3));
    must(c.wait_for_machines(1, 3, WAIT));
    start_hellos(&c, 6, &[]);
    let states = must(c.wait_for_active(1, 6, WAIT));
    let before = snapshot(&c, &states);

    // kill a machine that runs units but not the engine leader (a lost leader has its own
    // test) and not node 1, where fleetctl runs
    let leader = must(c.engine_leader()).unwrap_or_default();
    let x = (2..=3)
        .find(|&n| c.machine_id(n) != leader && !units_on(&states, c.machine_id(n)).is_empty())
        .unwrap_or_else(|| panic!("no node to kill: leader {leader}, {states:?}"));
    let gone = c.machine_id(x).to_string();
    let moving = units_on(&states, &gone);

    let started = Instant::now();
    must(c.kill_node(x));
    // fleet's promise: the machine's lease expires after agent_ttl, the engine notices on its
    // next reconcile passes
    let bound = AGENT_TTL + 2 * RECONCILE;
    must(wait_for(
        &format!("{moving:?} rescheduled off the killed machine"),
        bound + POLL_SLACK,
        || {
            let files = c.list_unit_files(1).map_err(|e| e.to_string())?;
            let stuck: Vec<_> = files
                .iter()
                .filter(|f| moving.contains(&f.unit) && (f.target == gone || f.target == "-"))
                .collect();
            if stuck.is_empty() {
                Ok(())
            } else {
                Err(format!("{stuck:?}"))
            }
        },
    ));
    let rescheduled = started.elapsed();
    let after = must(c.wait_for_active(1, 6, WAIT));
    let active = started.elapsed();
    println!(
        "node{x} killed: its units rescheduled after {:.1}s (bound {:.0}s), active after {:.1}s",
        rescheduled.as_secs_f64(),
        bound.as_secs_f64(),
        active.as_secs_f64()
    );
    for unit in &moving {
        let to = node(&c, &after[unit][0].machine);
        assert_ne!(to, x, "{after:?}");
        assert_eq!(must(c.systemd_unit(to, unit)).active_state, "active");
    }
    let stayed: BTreeMap<(usize, String), SystemdUnit> =
        before.into_iter().filter(|((n, _), _)| *n != x).collect();
    unchanged(&c, &stayed, "after another machine died");
}

#[test]
fn losing_etcd_stops_and_restarts_nothing_on_a_single_machine() {
    let c = boot(quick_spec("etcdloss", 1));
    must(c.wait_for_machines(1, 1, WAIT));
    must(c.put_fixture(1, "single@.service"));
    must(c.put_fixture(1, "global@.service"));
    let dir = functional::fleet::NODE_UNITS_DIR;
    // (command, desired state, what list-units shows, systemd's UnitFileState)
    let modes: [(&[&str], &str, Option<&str>, &str); 3] = [
        (&["submit"], "inactive", None, ""),
        (
            &["load", "--no-block"],
            "loaded",
            Some("inactive"),
            "linked-runtime",
        ),
        (
            &["start", "--no-block"],
            "launched",
            Some("active"),
            "linked-runtime",
        ),
    ];
    let mut want_files = BTreeMap::new();
    let mut want_units = BTreeMap::new();
    for kind in ["single", "global"] {
        for (cmd, dstate, active, _) in &modes {
            let unit = format!("{kind}@{dstate}.service");
            let path = format!("{dir}/{unit}");
            let mut args = cmd.to_vec();
            args.push(&path);
            fleetctl_ok(&c, 1, &args);
            want_files.insert(unit.clone(), dstate.to_string());
            if let Some(a) = active {
                want_units.insert(unit, a.to_string());
            }
        }
    }
    let expected = || -> Result<(), String> {
        let files: BTreeMap<String, String> = c
            .list_unit_files(1)
            .map_err(|e| e.to_string())?
            .into_iter()
            .map(|f| (f.unit, f.dstate))
            .collect();
        let units: BTreeMap<String, String> = c
            .list_units(1)
            .map_err(|e| e.to_string())?
            .into_iter()
            .map(|r| (r.unit, r.active))
            .collect();
        if files == want_files && units == want_units {
            Ok(())
        } else {
            Err(format!("unit files {files:?}, units {units:?}"))
        }
    };
    must(wait_for("the initial states", WAIT, expected));
    // what systemd shows for each unit (the launched ones with their main PIDs)
    let systemd_view = || -> BTreeMap<String, SystemdUnit> {
        want_files
            .keys()
            .map(|u| (u.clone(), must(c.systemd_unit(1, u))))
            .collect()
    };
    let before = systemd_view();
    for kind in ["single", "global"] {
        for (_, dstate, active, file_state) in &modes {
            let u = &before[&format!("{kind}@{dstate}.service")];
            let want_active = if *active == Some("active") {
                "active"
            } else {
                "inactive"
            };
            assert_eq!(u.active_state, want_active, "{kind}@{dstate}: {u}");
            assert_eq!(u.unit_file_state, *file_state, "{kind}@{dstate}: {u}");
            assert_eq!(
                u.main_pid > 0,
                want_active == "active",
                "{kind}@{dstate}: {u}"
            );
        }
    }

    let t0 = now_us();
    must(c.block_etcd(1));
    // the point of the test: a long outage (two agent_ttls), then look
    thread::sleep(2 * AGENT_TTL);
    assert_eq!(
        systemd_view(),
        before,
        "systemd changed while etcd was unreachable"
    );
    no_transitions(&c, 1, t0, &["single@", "global@"]);

    must(c.unblock_etcd(1));
    must(wait_for("the states after etcd is back", WAIT, expected));
    thread::sleep(SETTLE);
    must(wait_for("the states, settled", WAIT, expected));
    assert_eq!(
        systemd_view(),
        before,
        "systemd changed after etcd came back"
    );
    no_transitions(&c, 1, t0, &["single@", "global@"]);
}

#[test]
fn losing_etcd_on_one_machine_leaves_its_global_units_running() {
    let c = boot(quick_spec("etcdglob", 3));
    must(c.wait_for_machines(1, 3, WAIT));
    let global = must(c.put_fixture(1, "global.service"));
    fleetctl_ok(&c, 1, &["start", "--no-block", &global]);
    let states = must(c.wait_for_active(1, 3, WAIT));
    let before = snapshot(&c, &states);

    let t0 = now_us();
    let blocked_at = Instant::now();
    must(c.block_etcd(3));
    // the others see the machine go
    must(c.wait_for_machines(1, 2, AGENT_TTL + 2 * RECONCILE + POLL_SLACK));
    thread::sleep((2 * AGENT_TTL).saturating_sub(blocked_at.elapsed()));
    unchanged(&c, &before, "while node3 could not reach etcd");
    no_transitions(&c, 3, t0, &["global.service"]);

    must(c.unblock_etcd(3));
    must(c.wait_for_machines(1, 3, WAIT));
    must(c.wait_for_active(1, 3, WAIT));
    thread::sleep(SETTLE);
    must(c.wait_for_active(1, 3, WAIT));
    unchanged(&c, &before, "after node3 reached etcd again");
    for n in c.nodes() {
        no_transitions(&c, n, t0, &["global.service"]);
    }
}

#[test]
fn a_killed_engine_leader_is_replaced_and_no_unit_restarts() {
    // The killed fleetd is restarted only after the leader lease (5 reconcile intervals) has
    // expired, so that another machine's engine must take over; its machine lease (agent_ttl)
    // outlives that pause by far, so nothing has a reason to move. (What happens once the
    // killed process's lease expires is the next test's subject.)
    let restart_after = Duration::from_secs(8);
    let c = boot(
        ClusterSpec::new("leader", 3)
            .fleet_config("agent_ttl=30s")
            .fleet_config(&format!(
                "engine_reconcile_interval={}",
                RECONCILE.as_secs()
            )),
    );
    must(c.wait_for_machines(1, 3, WAIT));
    let global = must(c.put_fixture(1, "global.service"));
    start_hellos(&c, 6, &[&global]);
    let states = must(c.wait_for_active(1, 9, WAIT));
    let before = snapshot(&c, &states);
    let old_leader = must(wait_for("an engine leader", WAIT, || {
        c.engine_leader()
            .map_err(|e| e.to_string())?
            .ok_or_else(|| "no leader key".to_string())
    }));
    let l = node(&c, &old_leader);
    let dropin = format!(
        "mkdir -p /run/systemd/system/fleet.service.d && \
         printf '[Service]\\nRestartSec={}\\n' > /run/systemd/system/fleet.service.d/50-slow-restart.conf && \
         systemctl daemon-reload",
        restart_after.as_secs()
    );
    must(
        c.exec(l, &["sh", "-c", &dropin])
            .and_then(|o| o.ok("slow restart drop-in")),
    );
    let old_pid = must(c.fleetd_pid(l));

    let t0 = now_us();
    must(c.kill_fleetd(l));
    let new_leader = must(wait_for(
        "another engine leader",
        5 * RECONCILE + 2 * RECONCILE + POLL_SLACK,
        || match c.engine_leader()? {
            Some(m) if m != old_leader => Ok(m),
            other => Err(functional::Error::Harness {
                what: "leader".into(),
                detail: format!("{other:?}"),
            }),
        },
    ));
    assert_ne!(new_leader, old_leader);
    // the new leader does its job: a new unit is placed and started
    let path = format!("{}/hello@7.service", functional::fleet::NODE_UNITS_DIR);
    let watcher = if l == 1 { 2 } else { 1 };
    must(c.put_fixture(watcher, "hello@.service"));
    fleetctl_ok(&c, watcher, &["start", "--no-block", &path]);
    must(wait_for(
        "fleetd restarted on the old leader",
        WAIT,
        || match c.fleetd_pid(l) {
            Ok(Some(p)) if Some(p) != old_pid => Ok(()),
            other => Err(format!("{other:?}")),
        },
    ));
    must(c.wait_for_machines(watcher, 3, WAIT));
    let after = must(c.wait_for_active(watcher, 10, WAIT));
    thread::sleep(SETTLE);
    assert_eq!(must(c.active_units(watcher)), after, "list-units changed");
    for (unit, rows) in &states {
        assert_eq!(&after[unit], rows, "{unit} moved");
    }
    unchanged(&c, &before, "after the engine leader was killed");
    for n in c.nodes() {
        no_transitions(
            &c,
            n,
            t0,
            &[
                "hello@1.",
                "hello@2.",
                "hello@3.",
                "hello@4.",
                "hello@5.",
                "hello@6.",
                "global.service",
            ],
        );
    }
}

#[test]
fn a_fleetd_killed_and_restarted_keeps_reporting_the_units_it_adopted() {
    let c = boot(quick_spec("restart", 2));
    must(c.wait_for_machines(1, 2, WAIT));
    start_hellos(&c, 4, &[]);
    let states = must(c.wait_for_active(1, 4, WAIT));
    let before = snapshot(&c, &states);

    // kill -9; systemd starts a new fleetd a second later, well within agent_ttl, which
    // adopts the running units
    let old_pid = must(c.fleetd_pid(2));
    let t0 = now_us();
    let killed_at = Instant::now();
    must(c.kill_fleetd(2));
    must(wait_for("fleetd restarted on node2", WAIT, || {
        match c.fleetd_pid(2) {
            Ok(Some(p)) if Some(p) != old_pid => Ok(()),
            other => Err(format!("{other:?}")),
        }
    }));
    must(c.wait_for_machines(1, 2, WAIT));
    // the killed process's lease has expired by now: whatever it had written under it must
    // have been taken over by its successor
    thread::sleep((AGENT_TTL + SETTLE).saturating_sub(killed_at.elapsed()));
    // systemd never stopped anything, so fleet must still report every unit as active
    unchanged(&c, &before, "after fleetd was killed and restarted");
    let after = must(c.active_units(1));
    assert_eq!(
        after, states,
        "list-units once the lease of node2's killed fleetd expired, while systemd runs \
         every unit unchanged"
    );
    no_transitions(&c, 2, t0, &["hello@"]);
}

/// fleetd writes a batch's unit files, then links them (one `LinkUnitFiles`). Killed in
/// between, it left files systemd had never heard of; its successor adopted them as loaded,
/// and their starts failed ("not found") at every retry: 11 of 300 units stayed down in a
/// CI run of the chaos suite. Now such a start links the file again and tries once more.
/// Here the predecessor's state is made exactly: the unit's file stays, its link goes, while
/// fleetd is stopped short of dying.
#[test]
fn a_unit_file_a_killed_fleetd_wrote_but_never_linked_is_linked_and_started() {
    // fleet's default agent_ttl: the old lease outlives the frozen fleetd's few seconds
    let c = boot(ClusterSpec::new("unlinked", 1).fleet_config("agent_ttl=30s"));
    must(c.wait_for_machines(1, 1, WAIT));
    start_hellos(&c, 1, &[]);
    must(c.wait_for_active(1, 1, WAIT));
    let old_pid = must(c.fleetd_pid(1));
    // frozen first, so that it sees none of this; then killed (systemd restarts it after 1 s)
    let script = "set -e; \
        systemctl kill --kill-who=main --signal=SIGSTOP fleet.service; \
        systemctl stop hello@1.service; \
        rm /run/systemd/system/hello@1.service; \
        systemctl daemon-reload; \
        test -f /run/fleet/units/hello@1.service; \
        systemctl kill --kill-who=main --signal=SIGKILL fleet.service";
    must(
        must(c.exec(1, &["sh", "-c", script]))
            .ok("unlinking hello@1.service under a frozen fleetd"),
    );
    must(wait_for("fleetd restarted", WAIT, || {
        match c.fleetd_pid(1) {
            Ok(Some(p)) if Some(p) != old_pid => Ok(()),
            other => Err(format!("{other:?}")),
        }
    }));
    wait_systemd(&c, 1, "hello@1.service", Some("loaded"), "active");
    must(c.wait_for_active(1, 1, WAIT));
    // by the new fleetd linking the file again, not by a schedule rewritten meanwhile (had
    // the old lease expired first, the unit would have been unscheduled and written anew)
    let journal = must(c.journal(1, &["-u", "fleet.service"]));
    assert!(
        journal.contains("linking them again"),
        "no relink in fleetd's journal:\n{journal}"
    );
}

#[test]
fn a_second_fleetd_with_a_machine_id_in_use_is_refused() {
    let c = boot(quick_spec("dupid", 2));
    must(c.wait_for_machines(1, 2, WAIT));
    let taken = c.machine_id(1).to_string();
    let pid1 = must(c.fleetd_pid(1));

    // In node2, a fleetd that believes it is node1: node1's ID bound over /etc/machine-id in
    // a private mount namespace, its own units directory (and so its own agent token), no
    // engine, no API.
    let script = r#"set -e
d=/run/dupfleet
mkdir -p $d
printf '%s\n' "$1" > $d/machine-id
printf 'etcd_servers=%s\npublic_ip=%s\nunits_directory=%s/units\ndisable_engine=true\nagent_ttl=5s\n' "$2" "$3" $d > $d/fleet.conf
exec unshare --mount --propagation private sh -c \
  "mount --bind $d/machine-id /etc/machine-id && exec timeout 60 /opt/fleet/bin/fleetd --config $d/fleet.conf"
"#;
    let started = Instant::now();
    let out = must(c.exec(
        2,
        &["sh", "-c", script, "sh", &taken, c.etcd_endpoint(), c.ip(2)],
    ));
    println!(
        "duplicate fleetd exited after {:.1}s with {:?}",
        started.elapsed().as_secs_f64(),
        out.code
    );
    assert!(
        !out.success() && out.code != Some(124),
        "the second fleetd must exit with an error, not run: {out}"
    );
    let text = format!("{}{}", out.stdout, out.stderr);
    assert!(
        text.contains(&format!("machine ID {taken} is already registered")),
        "the error must name the machine ID: {out}"
    );

    // the first one is untouched and still the one registered
    assert_eq!(must(c.fleetd_pid(1)), pid1);
    let out = fleetctl_ok(
        &c,
        1,
        &[
            "list-machines",
            "--no-legend",
            "--full",
            "--fields",
            "machine,ip",
        ],
    );
    let machines: Vec<(String, String)> = out
        .stdout
        .lines()
        .filter_map(|l| {
            let mut w = l.split_whitespace();
            Some((w.next()?.to_string(), w.next()?.to_string()))
        })
        .collect();
    assert!(
        machines.contains(&(taken.clone(), c.ip(1).to_string())),
        "{machines:?}"
    );
    assert_eq!(machines.len(), 2, "{machines:?}");
}
