//! fleetd's configuration at work on a cluster: polling instead of watches
//! (`disable_watches`), and SIGHUP re-reading `/etc/fleet/fleet.conf` without touching the
//! running units.

use std::time::Duration;

use functional::fleet::{boot, must, quick_spec};
use functional::{FleetCluster, wait_for};

const WAIT: Duration = Duration::from_secs(30);

#[test]
fn without_watches_units_are_still_scheduled_and_run() {
    let c = boot(quick_spec("nowatch", 2).fleet_config("disable_watches=true"));
    must(c.wait_for_machines(1, 2, WAIT));
    let hello = must(c.put_fixture(1, "hello.service"));
    must(c.fleetctl_ok(1, &["start", "--no-block", &hello]));
    let active = must(c.wait_for_active(1, 1, WAIT));
    assert!(active.contains_key("hello.service"), "{active:?}");
    // and they still move when their machine's fleetd stops
    let row = &active["hello.service"][0];
    let node = c.node_of(&row.machine).expect("the unit's node");
    must(c.stop_fleetd(node));
    let other = if node == 1 { 2 } else { 1 };
    must(wait_for("hello.service moved", WAIT, || {
        let a = c.active_units(other).map_err(|e| e.to_string())?;
        match a.get("hello.service").and_then(|r| r.first()) {
            Some(r) if r.machine == c.machine_id(other) => Ok(()),
            other => Err(format!("{other:?}")),
        }
    }));
}

#[test]
fn sighup_reloads_the_configuration_and_leaves_units_running() {
    let c = boot(quick_spec("sighup", 1).metadata(1, "role=old"));
    must(c.wait_for_machines(1, 1, WAIT));
    let hello = must(c.put_fixture(1, "hello.service"));
    must(c.fleetctl_ok(1, &["start", "--no-block", &hello]));
    must(c.wait_for_active(1, 1, WAIT));
    let before = must(c.systemd_unit(1, "hello.service"));
    let fleetd = must(c.fleetd_pid(1));
    // a later line wins over the harness's metadata line
    must(c.exec(
        1,
        &[
            "sh",
            "-c",
            "echo metadata=role=new >> /etc/fleet/fleet.conf",
        ],
    ));
    // `systemctl reload` (the unit's ExecReload) sends the SIGHUP
    must(c.exec(1, &["systemctl", "reload", "fleet.service"]));
    must(wait_for("list-machines shows role=new", WAIT, || {
        let out = c
            .fleetctl_ok(1, &["list-machines", "--no-legend", "--fields", "metadata"])
            .map_err(|e| e.to_string())?;
        if out.stdout.trim() == "role=new" {
            Ok(())
        } else {
            Err(out.stdout)
        }
    }));
    assert_eq!(
        must(c.fleetd_pid(1)),
        fleetd,
        "SIGHUP must not restart fleetd"
    );
    // an invalid configuration is refused and the old one kept
    must(c.exec(
        1,
        &["sh", "-c", "echo agent_ttl=soon >> /etc/fleet/fleet.conf"],
    ));
    must(c.exec(1, &["systemctl", "kill", "-s", "HUP", "fleet.service"]));
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(
        must(c.fleetd_pid(1)),
        fleetd,
        "a bad reload keeps the running fleetd"
    );
    let after = must(c.systemd_unit(1, "hello.service"));
    assert_eq!(after.active_state, "active");
    assert_eq!(
        (after.main_pid, after.active_enter_us),
        (before.main_pid, before.active_enter_us),
        "reloading the configuration restarted hello.service"
    );
    let listed = must(c.fleetctl_ok(1, &["list-units", "--no-legend", "--fields", "unit,active"]));
    assert_eq!(
        listed.stdout.split_whitespace().collect::<Vec<_>>(),
        ["hello.service", "active"]
    );
}
