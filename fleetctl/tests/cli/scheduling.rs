//! Machines and unit states as fleetctl shows them, and blocking commands that wait for the engine.

use std::time::Duration;

use fleet_registry::EngineOp;
use fleet_unit::TargetState;

use crate::support::*;

#[test]
fn machines_and_unit_states() {
    let c = Cluster::start();
    c.check(&["list-machines"], 0, "MACHINE\tIP\tMETADATA\n", "");
    c.add_machine(M2, "5.6.7.8", &[("ping", "pong"), ("foo", "bar")]);
    c.add_machine(M1, "172.17.8.103", &[]);
    c.add_machine("abc", "", &[]);
    c.check(
        &["list-machines"],
        0,
        "MACHINE\t\tIP\t\tMETADATA\n113f16a7...\t172.17.8.103\t-\nabc...\t\t-\t\t-\nc31e44e1...\t5.6.7.8\t\tfoo=bar,ping=pong\n",
        "",
    );
    c.check(
        &["list-machines", "-l", "--no-legend", "--fields=machine,ip"],
        0,
        &format!("{M1}\t172.17.8.103\nabc\t\t\t\t\t-\n{M2}\t5.6.7.8\n"),
        "",
    );
    let json = c.run(&["list-machines", "--output=json"]);
    let v: serde_json::Value = serde_json::from_str(&json.stdout).expect("json");
    assert_eq!(v[2]["id"], M2);
    assert_eq!(v[2]["primaryIP"], "5.6.7.8");
    assert_eq!(v[2]["metadata"]["ping"], "pong");

    c.check(&["list-units"], 0, "UNIT\tMACHINE\tACTIVE\tSUB\n", "");

    // a machine with a newer fleet: fleet's warning before the output
    let lease = c.register(&machine("f00", "", &[], "99.0.0"));
    c.check(
        &["list-machines", "--fields=machine", "--no-legend"],
        0,
        "113f16a7...\nabc...\nc31e44e1...\nf00...\n",
        &format!(
            "####################################################################\n\
             WARNING: fleetctl ({v}) is older than the latest registered\n\
             version of fleet found in the cluster (99.0.0). You are strongly\n\
             recommended to upgrade fleetctl to prevent incompatibility issues.\n\
             ####################################################################\n",
            v = env!("CARGO_PKG_VERSION")
        ),
    );
    let reg = c.registry();
    c.rt.block_on(reg.withdraw_machine("f00", lease));
    let h = hash_of(SLEEP).to_string();
    c.publish(
        "b.service",
        M2,
        &h,
        "active",
        "running",
        TargetState::Launched,
    );
    c.publish("a.service", M2, &h, "inactive", "dead", TargetState::Loaded);
    c.publish(
        "a.service",
        M1,
        "",
        "active",
        "running",
        TargetState::Launched,
    );
    c.check(
        &["list-units"],
        0,
        "UNIT\t\tMACHINE\t\t\t\tACTIVE\t\tSUB\n\
         a.service\t113f16a7.../172.17.8.103\tactive\t\trunning\n\
         a.service\tc31e44e1.../5.6.7.8\t\tinactive\tdead\n\
         b.service\tc31e44e1.../5.6.7.8\t\tactive\t\trunning\n",
        "",
    );
    c.check(
        &["list-units", "-l", "--fields=unit,hash,load", "--no-legend"],
        0,
        &format!(
            "a.service\t-\t\t\t\t\t\tloaded\na.service\t{h}\tloaded\nb.service\t{h}\tloaded\n"
        ),
        "",
    );
    c.check(
        &["list-units", "--fields=machine,hash"],
        0,
        &format!("MACHINE\t\t\t\tHASH\n113f16a7.../172.17.8.103\t-\nc31e44e1.../5.6.7.8\t\t{s}\nc31e44e1.../5.6.7.8\t\t{s}\n", s = &h[..7]),
        "",
    );
    let json = c.run(&["list-units", "-o", "json"]);
    let v: serde_json::Value = serde_json::from_str(&json.stdout).expect("json");
    assert_eq!(v[1]["systemdSubState"], "dead");
    assert_eq!(v[1]["machineID"], M2);
}

#[test]
fn blocking_start_reports_reasons_and_placement() {
    let c = Cluster::start();
    c.add_machine(M1, "172.17.8.103", &[]);
    c.write("hello.service", HELLO);
    let child = c.spawn(&["start", "--block-attempts=15", "hello.service"]);
    // the unit appears, then the engine says why it cannot be placed
    assert!(
        c.wait_desired(
            "hello.service",
            TargetState::Launched,
            Duration::from_secs(10)
        ),
        "start did not set the desired state"
    );
    let engine = c.engine();
    let reason = "no machine satisfies MachineMetadata";
    c.apply(
        &engine,
        &[EngineOp::SetReason {
            unit: "hello.service".into(),
            reason: reason.into(),
        }],
    );
    child.wait_stderr(reason);
    // another reason is printed too; one already shown is not shown again
    c.apply(
        &engine,
        &[EngineOp::SetReason {
            unit: "hello.service".into(),
            reason: "all machines conflict".into(),
        }],
    );
    child.wait_stderr("all machines conflict");
    c.apply(
        &engine,
        &[EngineOp::SetReason {
            unit: "hello.service".into(),
            reason: reason.into(),
        }],
    );
    let hash = hash_of(HELLO);
    c.apply(
        &engine,
        &[EngineOp::Schedule {
            unit: "hello.service".into(),
            machine: M1.into(),
            hash,
            desired: TargetState::Launched,
        }],
    );
    c.publish(
        "hello.service",
        M1,
        &hash.to_string(),
        "active",
        "running",
        TargetState::Launched,
    );
    let out = child.finish(Duration::from_secs(20));
    assert_eq!(
        (out.code, out.stdout.as_str()),
        (
            0,
            "Unit hello.service inactive\nUnit hello.service launched on 113f16a7.../172.17.8.103\n"
        ),
        "{out:?}"
    );
    assert_eq!(
        out.stderr,
        "Unit hello.service cannot be placed yet: no machine satisfies MachineMetadata\n\
         Unit hello.service cannot be placed yet: all machines conflict\n",
        "{out:?}"
    );

    // stop: the agent reports the unit loaded
    let child = c.spawn(&["stop", "hello.service"]);
    assert!(
        c.wait_desired(
            "hello.service",
            TargetState::Loaded,
            Duration::from_secs(10)
        ),
        "stop did not set the desired state"
    );
    // its machine's reason for a unit that does not stop yet is not worded as for a start
    // ("cannot be loaded on ... yet"): fleetctl shows none while it waits for a stop
    c.publish_reason(
        "hello.service",
        M1,
        &hash.to_string(),
        "stop failed: org.freedesktop.DBus.Error.Timeout",
    );
    std::thread::sleep(Duration::from_millis(2500));
    c.publish(
        "hello.service",
        M1,
        &hash.to_string(),
        "inactive",
        "dead",
        TargetState::Loaded,
    );
    let out = child.finish(Duration::from_secs(20));
    assert_eq!(
        (out.code, out.stdout.as_str(), out.stderr.as_str()),
        (
            0,
            "Unit hello.service loaded on 113f16a7.../172.17.8.103\n",
            "Successfully stopped units [hello.service].\n"
        ),
    );
    c.check(
        &["list-unit-files"],
        0,
        &format!("UNIT\t\tHASH\tDSTATE\tSTATE\tTARGET\nhello.service\t{}\tloaded\tloaded\t113f16a7.../172.17.8.103\n", hash.short()),
        "",
    );
}

#[test]
fn blocking_gives_up_after_block_attempts() {
    let c = Cluster::start();
    c.write("hello.service", HELLO);
    let started = std::time::Instant::now();
    c.check(
        &["load", "--block-attempts=1", "hello.service"],
        1,
        "Unit hello.service inactive\n",
        "Error waiting for units: timed out waiting for unit hello.service to report state loaded\n\
         Error waiting for unit states, exit status: timed out waiting for unit hello.service to report state loaded\n",
    );
    assert!(
        started.elapsed() >= Duration::from_secs(2),
        "gave up before the attempt's two seconds"
    );
}
