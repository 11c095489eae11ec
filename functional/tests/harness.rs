//! The cluster harness itself: nodes boot with their own identity, reach etcd, answer ssh and
//! run fleetd; fault injection does what it says; teardown leaves nothing behind.

use std::collections::HashSet;
use std::io::Read;
use std::net::{SocketAddr, TcpStream};
use std::process::{Command, Stdio};
use std::time::Duration;

use functional::{Cluster, ClusterSpec, Error, Output, leftovers, wait_for};

const WAIT: Duration = Duration::from_secs(20);

fn up(spec: ClusterSpec) -> Cluster {
    match Cluster::up(spec) {
        Ok(c) => c,
        Err(e) => panic!("cluster did not come up: {e}"),
    }
}

fn ok(out: Result<Output, Error>, what: &str) -> String {
    match out.and_then(|o| o.ok(what)) {
        Ok(o) => o.stdout.trim().to_string(),
        Err(e) => panic!("{e}"),
    }
}

/// Does something answer with an SSH banner at ip:22 within a second? (Host-side probe: it
/// works while the node is frozen, where exec would hang.)
fn ssh_banner(ip: &str) -> Result<(), String> {
    let addr: SocketAddr = format!("{ip}:22")
        .parse()
        .map_err(|e| format!("{ip}: {e}"))?;
    let mut s =
        TcpStream::connect_timeout(&addr, Duration::from_secs(1)).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(Duration::from_secs(1)))
        .map_err(|e| e.to_string())?;
    let mut banner = [0u8; 4];
    s.read_exact(&mut banner).map_err(|e| e.to_string())?;
    if &banner == b"SSH-" {
        Ok(())
    } else {
        Err(format!("banner {banner:?}"))
    }
}

/// Node `node` can reach the cluster's etcd (curl from inside the node).
fn etcd_reachable(c: &Cluster, node: usize) -> Result<String, String> {
    let url = format!("{}/version", c.etcd_endpoint());
    let out = c
        .exec(node, &["curl", "-sS", "--max-time", "2", &url])
        .map_err(|e| e.to_string())?;
    if out.success() && out.stdout.contains("etcdserver") {
        Ok(out.stdout)
    } else {
        Err(out.to_string())
    }
}

#[test]
fn three_nodes_boot_with_their_own_identity_etcd_ssh_and_fleetd() {
    let c = up(ClusterSpec::new("fhboot", 3)
        .metadata(2, "region=east,disk=ssd")
        .fleet_config("agent_ttl=3s")
        .fleet_env("FLEET_VERBOSITY", "2"));
    // The bridge keeps an address of its own: one taken from its ports changes as nodes join,
    // and a node that had learnt the old one loses the host (and etcd) for its ARP lifetime.
    let octets: Vec<u8> = c
        .bridge_ip()
        .split('.')
        .map(|o| o.parse().expect("bridge ip"))
        .collect();
    let mac = format!(
        "02:66:68:{:02x}:{:02x}:{:02x}",
        octets[0], octets[1], octets[2]
    );
    let link = std::process::Command::new("ip")
        .args(["-o", "link", "show", "fhboot0"])
        .output()
        .expect("ip link");
    let link = String::from_utf8_lossy(&link.stdout);
    assert!(
        link.contains(&format!("link/ether {mac} ")),
        "bridge: {link}"
    );
    let mut machine_ids = HashSet::new();
    for i in c.nodes() {
        let ip = c.ip(i).to_string();
        // (what, command inside the node, expected stdout)
        let checks: Vec<(&str, Vec<&str>, String)> = vec![
            ("PID 1", vec!["cat", "/proc/1/comm"], "systemd".into()),
            (
                "system state",
                vec!["systemctl", "is-system-running"],
                "running".into(),
            ),
            (
                "machine-id",
                vec!["cat", "/etc/machine-id"],
                c.machine_id(i).into(),
            ),
            ("hostname", vec!["hostname"], format!("node{i}")),
            (
                "fleet units",
                vec!["systemctl", "is-active", "fleet.socket", "fleet.service"],
                "active\nactive".into(),
            ),
            (
                "fleet units enabled",
                vec!["systemctl", "is-enabled", "fleet.socket", "fleet.service"],
                "enabled\nenabled".into(),
            ),
            (
                "fleetctl on PATH",
                vec!["sh", "-c", "command -v fleetctl"],
                "/usr/local/bin/fleetctl".into(),
            ),
            (
                "API socket",
                vec!["stat", "-c", "%F %a", "/run/fleet.sock"],
                "socket 660".into(),
            ),
            (
                "fleet environment",
                vec![
                    "systemctl",
                    "show",
                    "-p",
                    "Environment",
                    "--value",
                    "fleet.service",
                ],
                "FLEET_VERBOSITY=2".into(),
            ),
            (
                "address",
                vec!["sh", "-c", "ip -4 -o addr show dev eth0 | awk '{print $4}'"],
                format!("{ip}/24"),
            ),
        ];
        for (what, cmd, want) in checks {
            let got = ok(c.exec(i, &cmd), &format!("{what} on node{i}"));
            assert_eq!(got, want, "node{i}: {what}");
        }
        assert!(
            c.fleetd_pid(i).expect("MainPID").is_some(),
            "node{i}: fleetd not running"
        );
        let conf = ok(c.exec(i, &["cat", "/etc/fleet/fleet.conf"]), "fleet.conf");
        for line in [
            format!("etcd_servers={}", c.etcd_endpoint()),
            format!("public_ip={ip}"),
            "agent_ttl=3s".to_string(),
        ] {
            assert!(
                conf.lines().any(|l| l == line),
                "node{i}: no {line:?} in\n{conf}"
            );
        }
        let has_md = conf.lines().any(|l| l == "metadata=region=east,disk=ssd");
        assert_eq!(has_md, i == 2, "node{i} metadata:\n{conf}");

        let mid = c.machine_id(i);
        assert!(
            mid.len() == 32 && mid.chars().all(|ch| ch.is_ascii_hexdigit()),
            "node{i}: machine-id {mid:?}"
        );
        assert!(
            machine_ids.insert(mid.to_string()),
            "node{i}: machine-id {mid} not unique"
        );

        if let Err(e) = etcd_reachable(&c, i) {
            panic!("node{i} cannot reach etcd at {}: {e}", c.etcd_endpoint());
        }
        // ssh with the harness key and strict host key checking; a real login session
        assert_eq!(
            ok(
                c.ssh(i, "hostname; systemctl is-active fleet.service"),
                "ssh"
            ),
            format!("node{i}\nactive")
        );
        // the binaries the node runs are the ones the test built (bound read-only)
        for bin in ["fleetd", "fleetctl"] {
            let path = c.bin_dir().join(bin);
            let host = std::process::Command::new(&path).arg("--version").output();
            let host = match host {
                Ok(o) if o.status.success() => {
                    String::from_utf8_lossy(&o.stdout).trim().to_string()
                }
                other => panic!("{} --version on the host: {other:?}", path.display()),
            };
            let inside = format!("/opt/fleet/bin/{bin}");
            assert_eq!(
                ok(c.exec(i, &[&inside, "--version"]), "--version in the node"),
                host
            );
        }
        assert!(ok(c.fleetctl(i, &["--version"]), "fleetctl on PATH").contains("fleetctl"));
    }
    // nodes reach each other
    let to = format!("exec 3<>/dev/tcp/{}/22", c.ip(3));
    ok(
        c.exec(1, &["timeout", "3", "bash", "-c", &to]),
        "tcp node1 -> node3:22",
    );
    c.down().expect("down");
    assert_eq!(
        leftovers("fhboot").expect("leftovers"),
        Vec::<String>::new()
    );
}

#[test]
fn fault_injection_does_what_it_says() {
    let c = up(ClusterSpec::new("fhfault", 2));

    // partition: etcd unreachable from node1 only, back after heal
    c.partition(1).expect("partition");
    assert!(
        etcd_reachable(&c, 1).is_err(),
        "etcd reachable from a partitioned node"
    );
    etcd_reachable(&c, 2).expect("node2 unaffected by node1's partition");
    c.heal(1).expect("heal");
    wait_for("etcd from node1 after heal", WAIT, || etcd_reachable(&c, 1)).expect("healed");

    // block-etcd: etcd refused, ssh still fine; twice is the same as once
    c.block_etcd(1).expect("block");
    c.block_etcd(1).expect("block again");
    assert!(
        etcd_reachable(&c, 1).is_err(),
        "etcd reachable while blocked"
    );
    ok(c.ssh(1, "true"), "ssh while etcd blocked");
    c.unblock_etcd(1).expect("unblock");
    etcd_reachable(&c, 1).expect("etcd after unblock");
    assert_eq!(
        ok(c.exec(1, &["iptables", "-S", "OUTPUT"]), "iptables"),
        "-P OUTPUT ACCEPT"
    );

    // fleetd: kill -9 -> systemd restarts it; stop / start
    let before = c.fleetd_pid(2).expect("pid").expect("fleetd runs");
    c.kill_fleetd(2).expect("kill fleetd");
    let after = wait_for("fleetd restarted on node2", WAIT, || {
        match c.fleetd_pid(2) {
            Ok(Some(p)) if p != before => Ok(p),
            other => Err(format!("{other:?}")),
        }
    })
    .expect("restarted by systemd");
    assert_ne!(before, after);
    c.stop_fleetd(2).expect("stop fleetd");
    assert_eq!(c.fleetd_pid(2).expect("pid"), None);
    c.start_fleetd(2).expect("start fleetd");
    assert!(c.fleetd_pid(2).expect("pid").is_some());

    // freeze: a hung machine (no ssh banner), thaw: back
    c.freeze(2).expect("freeze");
    assert!(ssh_banner(c.ip(2)).is_err(), "a frozen node answered ssh");
    c.thaw(2).expect("thaw");
    wait_for("ssh banner after thaw", WAIT, || ssh_banner(c.ip(2))).expect("thawed");

    // kill / start node: same identity, host key and files
    ok(
        c.exec(2, &["sh", "-c", "echo kept > /var/tmp/marker"]),
        "marker",
    );
    c.kill_node(2).expect("kill node");
    assert!(
        !c.exec(2, &["true"]).is_ok_and(|o| o.success()),
        "exec into a killed node"
    );
    c.start_node(2).expect("start node");
    assert_eq!(
        ok(c.exec(2, &["cat", "/etc/machine-id"]), "machine-id"),
        c.machine_id(2)
    );
    assert_eq!(
        ok(c.ssh(2, "cat /var/tmp/marker"), "marker after restart"),
        "kept"
    );
    wait_for("fleet.service after reboot", WAIT, || {
        c.exec(2, &["systemctl", "is-active", "fleet.service"])?
            .ok("is-active")
    })
    .expect("fleetd back");

    // graceful stop / restart / poweroff
    c.restart_node(1).expect("restart node1");
    assert_eq!(
        ok(c.exec(1, &["systemctl", "is-system-running"]), "state"),
        "running"
    );
    c.poweroff_node(1).expect("poweroff node1");
    let journal = c
        .journal(1, &["-u", "fleet.service"])
        .expect("journal of a node that is down");
    assert!(journal.contains("Stopped fleet.service"), "{journal}");
    c.stop_node(2).expect("stop node2");

    // out-of-range node numbers are errors, not panics
    assert!(matches!(
        c.exec(3, &["true"]),
        Err(Error::NoSuchNode { node: 3, .. })
    ));
    assert!(matches!(
        c.kill_node(0),
        Err(Error::NoSuchNode { node: 0, .. })
    ));
}

#[test]
fn down_leaves_nothing_behind() {
    let c = up(ClusterSpec::new("fhdown", 2));
    // the worst case for teardown: a frozen node and a blocked one
    c.block_etcd(1).expect("block");
    c.freeze(2).expect("freeze");
    assert!(
        !leftovers("fhdown").expect("leftovers").is_empty(),
        "a running cluster shows up"
    );
    c.down().expect("down");
    assert_eq!(
        leftovers("fhdown").expect("leftovers"),
        Vec::<String>::new()
    );
}

/// `bash functional/harness/<script> args` for cluster `name`, as a user (or a crashed test
/// run) would leave it: no process holds the cluster.
fn harness(script: &str, name: &str, args: &[&str]) -> Output {
    let bin = functional::default_bin_dir().expect("bin dir");
    let out = Command::new("bash")
        .arg(functional::harness_dir().join(script))
        .args(args)
        .env("FH_CLUSTER", name)
        .env("FH_BIN_DIR", bin)
        .stdin(Stdio::null())
        .output()
        .expect("bash runs");
    Output {
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into(),
        stderr: String::from_utf8_lossy(&out.stderr).into(),
    }
}

#[test]
fn a_crashed_runs_cluster_is_cleaned_up_by_the_next_up_and_drop_tears_down() {
    // What a test process that died leaves behind: a running cluster and a lock file that
    // nobody holds (the kernel released the lock with the process).
    let crashed = harness("up.sh", "fhcrash", &["1"]);
    assert!(crashed.success(), "{crashed}");
    std::fs::write("/var/lib/fleet-fh/fhcrash.lock", "").expect("stale lock file");
    assert!(!leftovers("fhcrash").expect("leftovers").is_empty());
    {
        // the next up of the same name starts from a clean slate
        let again = up(ClusterSpec::new("fhcrash", 2));
        assert_eq!(ok(again.exec(2, &["hostname"]), "hostname"), "node2");
        // dropped here: Drop tears down
    }
    assert_eq!(
        leftovers("fhcrash").expect("leftovers"),
        Vec::<String>::new()
    );
}

#[test]
fn a_cluster_in_use_is_not_taken_over() {
    let a = up(ClusterSpec::new("fhbusy", 1));
    let second = Cluster::up(ClusterSpec {
        lock_timeout: Duration::from_millis(500),
        ..ClusterSpec::new("fhbusy", 1)
    });
    assert!(matches!(second, Err(Error::Busy { .. })), "{second:?}");
    for script in ["up.sh", "down.sh"] {
        let out = harness(script, "fhbusy", &[]);
        assert!(
            !out.success() && out.stderr.contains("in use"),
            "{script}: {out}"
        );
    }
    // the holder's cluster is untouched
    assert_eq!(
        ok(
            a.exec(1, &["systemctl", "is-active", "fleet.service"]),
            "still up"
        ),
        "active"
    );
    etcd_reachable(&a, 1).expect("etcd still up");
    a.down().expect("down");
    assert_eq!(
        leftovers("fhbusy").expect("leftovers"),
        Vec::<String>::new()
    );
}

#[test]
fn clusters_of_different_names_coexist() {
    let a = up(ClusterSpec::new("fhcoa", 1));
    let b = up(ClusterSpec::new("fhcob", 1));
    assert_ne!(a.etcd_endpoint(), b.etcd_endpoint());
    assert_ne!(a.ip(1), b.ip(1));
    etcd_reachable(&a, 1).expect("a's etcd from a");
    etcd_reachable(&b, 1).expect("b's etcd from b");
    b.down().expect("down b");
    // tearing b down left a alone
    assert_eq!(
        ok(
            a.exec(1, &["systemctl", "is-active", "fleet.service"]),
            "a still up"
        ),
        "active"
    );
    etcd_reachable(&a, 1).expect("a's etcd after b went");
    a.down().expect("down a");
    for name in ["fhcoa", "fhcob"] {
        assert_eq!(
            leftovers(name).expect("leftovers"),
            Vec::<String>::new(),
            "{name}"
        );
    }
}
