//! `/run` full on one node (a small tmpfs mounted over its units directory, then filled): the
//! unit file its agent cannot write gets a reason that `fleetctl start` and
//! `fleetctl list-unit-files` show, the unit it already ran and the other node's units are
//! unaffected, and once there is room again the unit starts and the reason goes.

use std::time::{Duration, Instant};

use functional::fleet::{UnitFileRow, boot, must, quick_spec};
use functional::{Cluster, FleetCluster, wait_for};

/// Bound of every wait for the cluster to act.
const WAIT: Duration = Duration::from_secs(60);
/// The agent's units directory (fleet's default).
const UNITS_DIR: &str = "/run/fleet/units";
/// The file that takes every byte of the small tmpfs (a dot file: never a unit).
const FILLER: &str = "/run/fleet/units/.filler";

fn unit(disk: &str) -> String {
    format!("[Service]\nExecStart=/bin/sleep 10000\n\n[X-Fleet]\nMachineMetadata=disk={disk}\n")
}

/// Writes unit `name` (pinned to the node whose disk is `disk`) into node 1 and starts it
/// without waiting.
fn start(c: &Cluster, name: &str, disk: &str) {
    let path = must(c.put_unit(1, &format!("{name}.service"), &unit(disk)));
    must(c.fleetctl_ok(1, &["start", "--no-block", &path]));
}

fn active(c: &Cluster, node: usize, name: &str) -> bool {
    c.systemd_unit(node, &format!("{name}.service"))
        .is_ok_and(|u| u.active_state == "active")
}

fn wait_active(c: &Cluster, node: usize, name: &str) {
    must(wait_for(
        &format!("{name} active in node{node}"),
        WAIT,
        || {
            if active(c, node, name) {
                Ok(())
            } else {
                Err("not active")
            }
        },
    ));
}

/// `list-unit-files` with the reason column: unit → (state, reason).
fn unit_files_with_reasons(c: &Cluster) -> Result<Vec<(String, String, String)>, String> {
    let out = c
        .fleetctl_ok(
            2,
            &[
                "list-unit-files",
                "--no-legend",
                "--fields=unit,state,reason",
            ],
        )
        .map_err(|e| e.to_string())?;
    Ok(out
        .stdout
        .lines()
        .filter_map(|l| {
            let mut cols = l.split_whitespace();
            let (unit, state) = (cols.next()?, cols.next()?);
            let reason = cols.collect::<Vec<_>>().join(" ");
            Some((unit.to_string(), state.to_string(), reason))
        })
        .collect())
}

#[test]
fn a_full_run_on_one_node_gives_its_units_a_reason_and_spares_the_rest() {
    let c = boot(
        quick_spec("faults", 2)
            .metadata(1, "disk=full")
            .metadata(2, "disk=ok"),
    );
    // a small tmpfs over node 1's (still empty) units directory
    must(c.exec(1, &["mkdir", "-p", UNITS_DIR]));
    must(c.exec(
        1,
        &[
            "mount",
            "-t",
            "tmpfs",
            "-o",
            "size=64k,mode=0755",
            "fleetfull",
            UNITS_DIR,
        ],
    ));
    start(&c, "early", "full");
    wait_active(&c, 1, "early");
    // fill it: dd stops at "No space left on device"
    let _ = c.exec(1, &["dd", "if=/dev/zero", &format!("of={FILLER}"), "bs=4k"]);
    let df = must(c.exec(1, &["df", "--output=avail", UNITS_DIR]));
    assert!(
        df.stdout.lines().nth(1).is_some_and(|a| a.trim() == "0"),
        "{df}"
    );

    let filled = Instant::now();
    start(&c, "other", "ok");
    // start, waiting (3 attempts of 2 s), says why it does not get there
    let late = must(c.put_unit(1, "late.service", &unit("full")));
    let waited = must(c.fleetctl(1, &["start", "--block-attempts=3", &late]));
    println!("runfull: fleetctl start late.service: {waited}");
    assert!(
        waited
            .stderr
            .contains("Unit late.service cannot be launched on ")
            && waited.stderr.contains("No space left on device"),
        "{waited}"
    );
    wait_active(&c, 2, "other");
    let reason = must(wait_for("late's reason in list-unit-files", WAIT, || {
        let rows = unit_files_with_reasons(&c)?;
        match rows.iter().find(|(u, _, _)| u == "late.service") {
            Some((_, state, reason)) if reason.contains("No space left on device") => {
                Ok((state.clone(), reason.clone()))
            }
            other => Err(format!("{other:?} in {rows:?}")),
        }
    }));
    println!(
        "runfull: late.service listed {:?} after the fill: state {} reason {:?}",
        filled.elapsed(),
        reason.0,
        reason.1
    );
    assert_eq!(reason.0, "inactive", "it does not run");
    assert!(reason.1.starts_with("load failed: "), "{}", reason.1);
    // the JSON output carries it too
    let json = must(c.fleetctl_ok(2, &["list-unit-files", "-o", "json"]));
    assert!(json.stdout.contains("No space left on device"), "{json}");
    // the rest is unaffected: node 1's running unit, node 2's unit
    assert!(active(&c, 1, "early"), "early stopped");
    assert!(active(&c, 2, "other"), "other stopped");
    assert!(!active(&c, 1, "late"));
    let rows: Vec<UnitFileRow> = must(c.list_unit_files(2));
    for u in ["early.service", "other.service"] {
        let row = rows.iter().find(|r| r.unit == u).expect("listed");
        assert_eq!(row.state, "launched", "{u}: {rows:?}");
    }

    // room again: the agent's next try writes and starts it, and the reason goes
    must(c.exec(1, &["rm", "-f", FILLER]));
    let freed = Instant::now();
    wait_active(&c, 1, "late");
    must(wait_for("late's reason gone", WAIT, || {
        let rows = unit_files_with_reasons(&c)?;
        match rows.iter().find(|(u, _, _)| u == "late.service") {
            Some((_, state, reason)) if state == "launched" && reason == "-" => Ok(()),
            other => Err(format!("{other:?}")),
        }
    }));
    println!(
        "runfull: late.service active {:?} after room was made",
        freed.elapsed()
    );
    assert!(active(&c, 1, "early"), "early stopped");

    // undo: units destroyed, then the tmpfs unmounted
    must(c.fleetctl_ok(
        1,
        &["destroy", "early.service", "late.service", "other.service"],
    ));
    must(wait_for("units gone from node 1", WAIT, || {
        if active(&c, 1, "early") || active(&c, 1, "late") {
            Err("still active")
        } else {
            Ok(())
        }
    }));
    must(c.exec(1, &["umount", UNITS_DIR]));
    must(c.down());
}
