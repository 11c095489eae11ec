//! The agent and engine cores on a real node after their split into planner, executor and
//! role stores: a killed fleetd's successor adopts the running unit without restarting it and
//! publishes its state again; `/metrics` counts engine tasks by fleet's task types, agent tasks
//! by type, and registry operations, recorded where they happen.

use std::time::Duration;

use functional::fleet::{AGENT_TTL, api_get, boot, fixture, must, quick_spec};
use functional::{FleetCluster, wait_for};

const WAIT: Duration = Duration::from_secs(30);

#[test]
fn a_killed_fleetd_is_succeeded_without_restarting_units_and_metrics_are_labelled() {
    let c = boot(quick_spec("cores", 1));
    must(c.wait_for_machines(1, 1, WAIT));
    let hello = must(c.put_fixture(1, "hello.service"));
    must(c.fleetctl_ok(1, &["start", "--no-block", &hello]));
    must(c.wait_for_active(1, 1, WAIT));
    let before = must(c.systemd_unit(1, "hello.service"));
    let fleetd = must(c.fleetd_pid(1));

    must(c.kill_fleetd(1));
    must(wait_for("a new fleetd", WAIT, || match c.fleetd_pid(1) {
        Ok(Some(pid)) if Some(pid) != fleetd => Ok(()),
        other => Err(format!("{other:?}")),
    }));
    // the killed fleetd's states expire with its lease; the new one's must be there after it
    std::thread::sleep(AGENT_TTL + Duration::from_secs(2));
    must(c.wait_for_active(1, 1, WAIT));
    let after = must(c.systemd_unit(1, "hello.service"));
    assert_eq!(after.active_state, "active");
    assert_eq!(
        (after.main_pid, after.active_enter_us),
        (before.main_pid, before.active_enter_us),
        "the new fleetd restarted hello.service"
    );

    // the new fleetd has scheduled nothing (the unit kept its place); a new unit counts
    let second = must(c.put_unit(1, "hello2.service", &fixture("hello.service")));
    must(c.fleetctl_ok(1, &["start", "--no-block", &second]));
    must(c.wait_for_active(1, 2, WAIT));
    let metrics = must(wait_for("labelled metrics", WAIT, || {
        let text = api_get(&c, 1, "/metrics").map_err(|e| e.to_string())?;
        let wanted = [
            "fleet_engine_task_count_total{type=\"attemptscheduleunit\"}",
            "fleet_agent_task_count_total{type=\"start\"}",
            "fleet_registry_operation_count_total{type=\"get_all\"}",
            "fleet_registry_operation_count_total{type=\"set\"}",
            "fleet_registry_operation_duration_second_count{ops=\"set\"}",
        ];
        if wanted.iter().all(|w| text.contains(w)) {
            Ok(text)
        } else {
            Err(text)
        }
    }));
    for old in [
        "fleet_engine_task_count_total{type=\"schedule\"}",
        "fleet_agent_task_count_total{type=\"task\"}",
    ] {
        assert!(!metrics.contains(old), "{old} is back:\n{metrics}");
    }
}
