//! The Debian package on fresh machines: built by `packaging/debian/build-deb.sh` (what
//! `./build --deb` runs) from the binaries under test (or `$FLEET_DEB`), checked by lintian, installed with
//! `dpkg -i` into nodes that have no fleet of the harness's, configured, and forming a
//! cluster that runs a unit; then upgraded (the config and the running unit are kept),
//! removed (fleetd stops, the unit keeps running) and purged. Its man pages render.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use functional::fleet::{boot, must};
use functional::{Cluster, ClusterSpec, FleetCluster, wait_for};

const WAIT: Duration = Duration::from_secs(30);

/// The package under test: `$FLEET_DEB` when set (e.g. `bin/fleet_1.0.0_amd64.deb` from
/// `./build --deb`), else one built by `packaging/debian/build-deb.sh` from the binaries the
/// other functional tests run (fleetd, fleetctl and fleet-dist next to the test executable,
/// `cargo build -p fleetd -p fleetctl -p fleet-dist`). Built below `dir` in /var/tmp: the
/// nodes' lower layer, so they see it at the same path (a node empties /tmp when it boots).
fn package(dir: &Path) -> PathBuf {
    if let Some(deb) = std::env::var_os("FLEET_DEB") {
        return PathBuf::from(deb);
    }
    let stage = dir.join("bin");
    std::fs::create_dir_all(&stage).expect("package dir");
    let src = functional::default_bin_dir().expect("bin dir");
    for b in ["fleetd", "fleetctl", "fleet-dist"] {
        let from = src.join(b);
        assert!(
            from.is_file(),
            "no {}: build it with cargo build -p fleetd -p fleetctl -p fleet-dist, or set \
             FLEET_DEB to a package (./build --deb)",
            from.display()
        );
        // a link, not a copy: debug binaries are large, and build-deb.sh strips its own copy
        if std::fs::hard_link(&from, stage.join(b)).is_err() {
            std::fs::copy(&from, stage.join(b)).unwrap_or_else(|e| panic!("copy {b}: {e}"));
        }
    }
    run_ok(Command::new(stage.join("fleet-dist")).arg(&stage));
    let script = functional::harness_dir().join("../../packaging/debian/build-deb.sh");
    let out = run_ok(Command::new("bash").arg(&script).arg(&stage).arg(dir));
    let deb = PathBuf::from(out.trim());
    assert!(deb.is_file(), "{deb:?}");
    deb
}

/// Runs `cmd`, which must succeed; its stdout.
fn run_ok(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{cmd:?}: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// `sh -c SCRIPT` in node `i`, which must succeed; its stdout.
fn sh(c: &Cluster, i: usize, script: &str) -> String {
    must(must(c.exec(i, &["sh", "-c", script])).ok(script)).stdout
}

/// `systemctl is-active UNIT` in node `i`.
fn state(c: &Cluster, i: usize, unit: &str) -> String {
    must(c.exec(i, &["systemctl", "is-active", unit]))
        .trimmed()
        .to_string()
}

#[test]
fn the_debian_package_installs_forms_a_cluster_upgrades_and_removes() {
    let dir = PathBuf::from(format!("/var/tmp/fleet-pkg-test-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let deb = package(&dir);
    let deb_s = deb.display().to_string();

    // lintian: no errors (warnings are printed for a reader of the test's output)
    let lint = Command::new("lintian")
        .args(["--fail-on", "error", &deb_s])
        .output()
        .expect("lintian (functional/harness/packages.sh installs it)");
    let lint_out = String::from_utf8_lossy(&lint.stdout);
    println!("lintian:\n{lint_out}");
    assert!(lint.status.success(), "lintian found errors:\n{lint_out}");

    let c = boot(ClusterSpec::new("pkg", 2).without_fleet());
    for i in c.nodes() {
        // a fresh machine: no fleet at all
        sh(
            &c,
            i,
            "! command -v fleetd && ! command -v fleetctl && [ ! -e /etc/fleet ]",
        );
        // The host is a container image whose policy-rc.d forbids every service start during
        // package installs; the nodes see it through their lower layer. A real machine has
        // none, so the node drops it (its own copy only).
        sh(&c, i, "rm -f /usr/sbin/policy-rc.d");
        sh(&c, i, &format!("dpkg -i {deb_s} >/dev/null"));
        // both units enabled, the socket listening, fleetd left to the administrator
        let enabled = sh(&c, i, "systemctl is-enabled fleet.socket fleet.service");
        assert_eq!(
            enabled.split_whitespace().collect::<Vec<_>>(),
            ["enabled", "enabled"]
        );
        assert_eq!(state(&c, i, "fleet.socket"), "active");
        assert_eq!(state(&c, i, "fleet.service"), "inactive");
        sh(
            &c,
            i,
            "[ -S /var/run/fleet.sock ] && grep -q '^#agent_ttl=30s$' /etc/fleet/fleet.conf",
        );
        let conf = format!(
            "etcd_servers={}\npublic_ip={}\nagent_ttl=5s\nengine_reconcile_interval=1\n",
            c.etcd_endpoint(),
            c.ip(i)
        );
        must(
            must(c.exec(
                i,
                &[
                    "sh",
                    "-c",
                    "printf '%s' \"$1\" > /etc/fleet/fleet.conf",
                    "sh",
                    &conf,
                ],
            ))
            .ok("writing fleet.conf"),
        );
        sh(&c, i, "systemctl start fleet.service");
        assert_eq!(state(&c, i, "fleet.service"), "active");
        assert_eq!(
            sh(&c, i, "command -v fleetd; command -v fleetctl"),
            "/usr/bin/fleetd\n/usr/bin/fleetctl\n"
        );
    }
    must(c.wait_for_machines(1, 2, WAIT));
    let hello = must(c.put_fixture(1, "hello.service"));
    must(c.fleetctl_ok(1, &["start", "--no-block", &hello]));
    let active = must(c.wait_for_active(1, 1, WAIT));
    let node = c
        .node_of(&active["hello.service"][0].machine)
        .expect("hello's node");
    let before = must(c.systemd_unit(node, "hello.service"));
    assert_eq!(before.active_state, "active", "{before}");

    // every man page renders, without complaints from groff
    let pages = sh(
        &c,
        1,
        "ls /usr/share/man/man1/fleetctl*.1.gz /usr/share/man/man8/fleetd.8.gz /usr/share/man/man5/fleet.conf.5.gz",
    );
    assert!(pages.lines().count() >= 4, "{pages}");
    for page in pages.lines() {
        let out = must(c.exec(1, &["env", "MANWIDTH=80", "man", "-l", page]));
        assert!(
            out.success() && out.stderr.is_empty(),
            "man -l {page}: {}",
            out.stderr
        );
        assert!(out.stdout.contains("NAME"), "man -l {page}: {}", out.stdout);
    }
    let conf5 = must(c.exec(1, &["man", "-l", "/usr/share/man/man5/fleet.conf.5.gz"])).stdout;
    assert!(
        conf5.contains("agent_ttl") && conf5.contains("Default: 30s"),
        "{conf5}"
    );
    sh(
        &c,
        1,
        "[ -s /usr/share/bash-completion/completions/fleetctl ] && [ -s /usr/share/zsh/vendor-completions/_fleetctl ]",
    );

    // an upgrade (here: the same version again) keeps the edited configuration, and the new
    // fleetd takes over the running unit without restarting it; a running fleetd comes back
    // even when the administrator disabled fleet.service (socket activation)
    sh(&c, node, "systemctl disable --quiet fleet.service");
    let fleetd_before = must(c.fleetd_pid(node));
    sh(&c, node, &format!("dpkg -i {deb_s} >/dev/null"));
    sh(&c, node, "grep -q '^agent_ttl=5s$' /etc/fleet/fleet.conf");
    must(wait_for("fleetd back after the upgrade", WAIT, || {
        match (
            state(&c, node, "fleet.service").as_str(),
            c.fleetd_pid(node),
        ) {
            ("active", Ok(Some(pid))) if Some(pid) != fleetd_before => Ok(()),
            (s, pid) => Err(format!("{s} {pid:?}")),
        }
    }));
    must(c.wait_for_machines(1, 2, WAIT));
    // the new fleetd settles (it reports the unit again) and leaves the unit alone
    must(wait_for(
        "hello.service reported after the upgrade",
        WAIT,
        || {
            let a = c.active_units(1).map_err(|e| e.to_string())?;
            match a.get("hello.service").and_then(|r| r.first()) {
                Some(r) if r.machine == c.machine_id(node) => Ok(()),
                other => Err(format!("{other:?}")),
            }
        },
    ));
    let after = must(c.systemd_unit(node, "hello.service"));
    assert_eq!(
        (after.main_pid, after.active_enter_us),
        (before.main_pid, before.active_enter_us),
        "hello.service was restarted by the upgrade: {before} -> {after}"
    );

    // removal stops fleetd without stopping the machine's units; the configuration stays
    sh(&c, node, "dpkg -r fleet >/dev/null");
    // SIGKILL, as stop-keeping-units sends it, is a success: not left failed
    assert_eq!(state(&c, node, "fleet.service"), "inactive");
    assert_ne!(state(&c, node, "fleet.socket"), "active");
    let kept = must(c.systemd_unit(node, "hello.service"));
    assert_eq!(
        kept.main_pid, before.main_pid,
        "removal stopped hello.service: {kept}"
    );
    sh(
        &c,
        node,
        "[ ! -e /usr/bin/fleetd ] && grep -q '^agent_ttl=5s$' /etc/fleet/fleet.conf",
    );
    // purge removes the configuration too
    sh(
        &c,
        node,
        "dpkg -P fleet >/dev/null && [ ! -e /etc/fleet/fleet.conf ]",
    );

    must(c.down());
    let _ = std::fs::remove_dir_all(&dir);
}
