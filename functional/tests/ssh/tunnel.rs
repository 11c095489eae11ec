//! `--tunnel` to a node's API socket: listing and starting units through it.

use functional::FleetCluster;
use std::time::{Duration, Instant};

use functional::fleet::{boot, must, quick_spec, short_id};
use functional::wait_for;

use crate::support::*;

#[test]
fn tunnel_to_a_node_lists_and_starts_units() {
    let c = boot(quick_spec("sshtun", 3));
    let h = Host::new(&c);

    // list-machines through node1's API socket
    let out = h.tunnel(
        1,
        &[
            "list-machines",
            "--no-legend",
            "--full",
            "--fields=machine,ip",
        ],
    );
    assert!(out.success(), "{out}");
    let mut got: Vec<String> = out
        .stdout
        .lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
        .collect();
    got.sort();
    let mut want: Vec<String> = c
        .nodes()
        .map(|i| format!("{} {}", c.machine_id(i), c.ip(i)))
        .collect();
    want.sort();
    assert_eq!(got, want, "{out}");
    let out = h.tunnel(1, &["list-units", "--no-legend"]);
    assert_eq!((out.code, out.stdout.as_str()), (Some(0), ""), "{out}");

    // a batch of ten instances, started (and waited for) through the tunnel
    let files: Vec<String> = (1..=10)
        .map(|i| fixture_path(&format!("hello@{i}.service")))
        .collect();
    let mut args = vec!["start"];
    args.extend(files.iter().map(String::as_str));
    let out = h.tunnel(1, &args);
    assert!(out.success(), "{out}");
    for i in 1..=10 {
        let want = format!("Unit hello@{i}.service launched on ");
        assert!(out.stdout.contains(&want), "lacks {want:?}: {out}");
    }
    let rows = must(wait_for(
        "10 active units listed through the tunnel",
        WAIT,
        || {
            let out = h.tunnel(
                1,
                &[
                    "list-units",
                    "--no-legend",
                    "--full",
                    "--fields=unit,machine,active",
                ],
            );
            let rows: Vec<Vec<String>> = out
                .stdout
                .lines()
                .map(|l| l.split_whitespace().map(str::to_string).collect())
                .collect();
            let active = rows
                .iter()
                .filter(|r| r.len() == 3 && r[2] == "active")
                .count();
            if out.success() && active == 10 {
                Ok(rows)
            } else {
                Err(format!("{active} active: {out}"))
            }
        },
    ));
    // ... and the nodes' own systemd agrees
    for r in &rows {
        let machine = r[1].split('/').next().unwrap_or_default();
        let node = match c.node_of(machine) {
            Some(n) => n,
            None => panic!("unknown machine in {r:?}"),
        };
        let u = must(c.systemd_unit(node, &r[0]));
        assert_eq!(u.active_state, "active", "{} on node{node}: {u}", r[0]);
    }

    // the etcd driver through the same tunnel (etcd as reached from node1)
    let endpoint = format!("--endpoint={}", c.etcd_endpoint());
    let out = h.tunnel(
        1,
        &[
            "--driver=etcd",
            &endpoint,
            "list-unit-files",
            "--no-legend",
            "--fields=unit,dstate",
        ],
    );
    assert!(out.success(), "{out}");
    let launched = out
        .stdout
        .lines()
        .filter(|l| l.ends_with("launched"))
        .count();
    assert_eq!(launched, 10, "{out}");

    // ssh and status through the tunnel host to another machine
    let m3 = short_id(c.machine_id(3)).to_string();
    let out = h.tunnel(1, &["ssh", &m3, "hostname"]);
    assert_eq!(
        (out.code, out.stdout.as_str()),
        (Some(0), "node3\n"),
        "{out}"
    );
    let out = h.tunnel(1, &["status", "hello@7.service"]);
    assert!(
        out.success() && out.stdout.contains("Active: active (running)"),
        "{out}"
    );

    // an unreachable machine: --ssh-timeout bounds the attempt
    must(c.partition(3));
    let started = Instant::now();
    let out = h.fleetctl(&["--ssh-timeout=1", "ssh", &m3, "true"]);
    let took = started.elapsed();
    must(c.heal(3));
    assert_eq!(out.code, Some(1), "{out}");
    assert!(
        out.stderr.contains(&format!(
            "Failed building SSH client: timed out while initiating SSH connection to {}:22",
            c.ip(3)
        )),
        "{out}"
    );
    assert!(took < Duration::from_secs(10), "took {took:?}: {out}");
}
