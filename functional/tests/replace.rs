//! `fleetctl start --replace` on a real cluster: the new version of a running unit runs on
//! the machine the old one ran on, and moves only when its new options rule that machine out.

use std::time::Duration;

use functional::fleet::{boot, must, quick_spec};
use functional::{Cluster, FleetCluster, wait_for};

/// Bound of every wait for the cluster to act on a command.
const WAIT: Duration = Duration::from_secs(30);

/// The node running `unit` per `list-units`, once it is active there.
fn running_on(c: &Cluster, unit: &str) -> usize {
    must(wait_for(&format!("{unit} active"), WAIT, || {
        let rows = c.list_units(1).map_err(|e| e.to_string())?;
        match rows.iter().find(|r| r.unit == unit) {
            Some(r) if r.active == "active" => c
                .node_of(&r.machine)
                .ok_or_else(|| format!("unknown machine: {rows:?}")),
            _ => Err(format!("{rows:?}")),
        }
    }))
}

/// Asserts that systemd in `node` runs `unit` with an ExecStart containing `exec` now (after
/// `start --replace` returned: it waits for the new version, not the old one).
fn runs_now(c: &Cluster, node: usize, unit: &str, exec: &str) {
    let show = must(c.exec(
        node,
        &["systemctl", "show", "-p", "ExecStart,ActiveState", unit],
    ));
    assert!(
        show.stdout.contains(exec) && show.stdout.contains("ActiveState=active"),
        "node{node} does not run {exec} yet: {}",
        show.stdout
    );
}

/// Waits until systemd in `node` runs `unit` with an ExecStart containing `exec`.
fn wait_exec(c: &Cluster, node: usize, unit: &str, exec: &str) {
    must(wait_for(
        &format!("{unit} running {exec} in node{node}"),
        WAIT,
        || {
            let show = c
                .exec(
                    node,
                    &["systemctl", "show", "-p", "ExecStart,ActiveState", unit],
                )
                .map_err(|e| e.to_string())?;
            if show.stdout.contains(exec) && show.stdout.contains("ActiveState=active") {
                Ok(())
            } else {
                Err(show.stdout)
            }
        },
    ));
}

#[test]
fn start_replace_keeps_the_machine_unless_the_new_options_forbid_it() {
    let c = boot(
        quick_spec("parityc", 2)
            .metadata(1, "role=web")
            .metadata(2, "role=db"),
    );
    let v1 = must(c.put_unit(1, "v1/r.service", "[Service]\nExecStart=/bin/sleep 1001\n"));
    must(c.fleetctl_ok(1, &["start", &v1]));
    let first = running_on(&c, "r.service");
    wait_exec(&c, first, "r.service", "/bin/sleep 1001");

    // a new body: same machine, the new command runs there
    let v2 = must(c.put_unit(1, "v2/r.service", "[Service]\nExecStart=/bin/sleep 1002\n"));
    let out = must(c.fleetctl_ok(1, &["start", "--replace", &v2]));
    assert!(out.stdout.starts_with("Unit r.service launched\n"), "{out}");
    runs_now(&c, first, "r.service", "/bin/sleep 1002");
    assert_eq!(running_on(&c, "r.service"), first, "the unit stayed");
    let other = 3 - first;
    let elsewhere = must(c.systemd_unit(other, "r.service"));
    assert_eq!(
        elsewhere.load_state, "not-found",
        "never ran on node{other}"
    );

    // new options that rule its machine out: it moves
    let role = if other == 1 { "web" } else { "db" };
    let v3 = must(c.put_unit(
        1,
        "v3/r.service",
        &format!(
            "[Service]\nExecStart=/bin/sleep 1003\n\n[X-Fleet]\nMachineMetadata=role={role}\n"
        ),
    ));
    must(c.fleetctl_ok(1, &["start", "--replace", &v3]));
    runs_now(&c, other, "r.service", "/bin/sleep 1003");
    assert_eq!(running_on(&c, "r.service"), other, "the unit moved");
    must(wait_for(
        "r.service gone from its first machine",
        WAIT,
        || {
            let u = c
                .systemd_unit(first, "r.service")
                .map_err(|e| e.to_string())?;
            if u.active_state == "active" {
                Err(u.to_string())
            } else {
                Ok(())
            }
        },
    ));
    must(c.down());
}
