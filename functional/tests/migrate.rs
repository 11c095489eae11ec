//! Taking over a running fleet v1.0 cluster (Documentation/migrating-from-fleet-v1.md): a
//! registry seeded through etcd's v2 API exactly as fleet v1.0 wrote it, unit files left in
//! the nodes and started the way fleet v1.0's agent did, then the documented procedure:
//! `fleetctl import-v1`, our fleetd started on every node. No unit may restart (same systemd
//! InvocationID), fleetctl must show every unit where it ran, and stop/destroy must work on
//! the imported units afterwards (a template and a global unit among them). One unit whose
//! file on disk differs from fleet v1.0's registry is replaced, as any change would be.

use std::collections::BTreeMap;
use std::io::Write;
use std::process::{Command, Stdio};
use std::time::Duration;

use functional::fleet::{UnitFileRow, UnitRow, boot, must, now_us, quick_spec, transitions};
use functional::{Cluster, FleetCluster, wait_for};

/// Bound of every wait for the cluster to act.
const WAIT: Duration = Duration::from_secs(40);

const PREFIX: &str = fleet_config::DEFAULT_KEY_PREFIX;

/// One unit of the fleet v1.0 cluster: its name, its file in fleet v1.0's canonical form
/// (what its agent wrote to disk and its registry kept as `Raw`), its target state and where
/// v1.0's engine placed it (`None`: not placed; global units are never placed).
struct V1Unit {
    name: &'static str,
    text: &'static str,
    state: &'static str,
    target: Option<usize>,
    global: bool,
}

const SLEEP: &str = "[Service]\nExecStart=/bin/sleep 100000\n";
const TEMPLATE: &str =
    "[Unit]\nDescription=instance %i\n\n[Service]\nExecStart=/bin/sleep 100000\n";
const GLOBAL: &str = "[Service]\nExecStart=/bin/sleep 100000\n\n[X-Fleet]\nGlobal=true\n";
/// What the registry holds for [`CHANGED`]; its node runs [`SLEEP`] under that name.
const NEWER: &str = "[Service]\nExecStart=/bin/sleep 200000\n";
/// The unit whose file on disk is not what the registry wants.
const CHANGED: &str = "changed.service";
const ENABLED: &str =
    "[Service]\nExecStart=/bin/sleep 100000\n\n[Install]\nWantedBy=multi-user.target\n";

fn units() -> Vec<V1Unit> {
    let u = |name, text, state, target, global| V1Unit {
        name,
        text,
        state,
        target,
        global,
    };
    vec![
        u("hello.service", SLEEP, "launched", Some(1), false),
        u("enabled.service", ENABLED, "launched", Some(1), false),
        u("inst@.service", TEMPLATE, "inactive", None, false),
        u("inst@1.service", TEMPLATE, "launched", Some(2), false),
        u("idle.service", SLEEP, "loaded", Some(2), false),
        u("glob.service", GLOBAL, "launched", None, true),
        u(CHANGED, NEWER, "launched", Some(2), false),
    ]
}

/// The nodes where fleet v1.0's agents ran `u`.
fn nodes_of(c: &Cluster, u: &V1Unit) -> Vec<usize> {
    if u.global {
        c.nodes().collect()
    } else {
        u.target.into_iter().collect()
    }
}

/// A JSON string literal.
fn json_str(s: &str) -> String {
    let mut out = String::from("\"");
    for ch in s.chars() {
        match ch {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// The SHA-1 fleet v1.0 named a unit by: of its canonical text (the fixtures above are
/// canonical already), computed by sha1sum, not by this project's code.
fn sha1_hex(text: &str) -> String {
    let mut child = Command::new("sha1sum")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("sha1sum");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(text.as_bytes())
        .expect("write");
    let out = child.wait_with_output().expect("sha1sum output");
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .expect("hash")
        .to_string()
}

/// A v2 `set`, as fleet v1.0's etcd client made it.
fn v2_set(c: &Cluster, key: &str, value: &str) {
    let out = Command::new("etcdctl")
        .env("ETCDCTL_API", "2")
        .arg(format!("--endpoints={}", c.etcd_endpoint()))
        .args(["set", "--", &format!("{PREFIX}{key}"), value])
        .output()
        .expect("etcdctl");
    assert!(
        out.status.success(),
        "etcdctl set {key}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// fleet v1.0's registry, key by key as its registry package wrote it.
fn seed_registry(c: &Cluster) {
    for u in units() {
        let hash = sha1_hex(u.text);
        let bytes: Vec<String> = (0..20)
            .map(|i| {
                u8::from_str_radix(&hash[2 * i..2 * i + 2], 16)
                    .expect("hex")
                    .to_string()
            })
            .collect();
        v2_set(
            c,
            &format!("unit/{hash}"),
            &format!("{{\"Raw\":{}}}", json_str(u.text)),
        );
        v2_set(
            c,
            &format!("job/{}/object", u.name),
            &format!(
                "{{\"Name\":{},\"UnitHash\":[{}]}}",
                json_str(u.name),
                bytes.join(",")
            ),
        );
        v2_set(c, &format!("job/{}/target-state", u.name), u.state);
        if let Some(n) = u.target {
            v2_set(c, &format!("job/{}/target", u.name), c.machine_id(n));
        }
    }
    for i in c.nodes() {
        let id = c.machine_id(i);
        v2_set(
            c,
            &format!("machines/{id}/object"),
            &format!(
                "{{\"ID\":\"{id}\",\"PublicIP\":\"{}\",\"Metadata\":{{}},\"Version\":\"1.0.0\"}}",
                c.ip(i)
            ),
        );
    }
    v2_set(
        c,
        &format!("machines/{}/metadata/role", c.machine_id(1)),
        "front",
    );
}

/// What fleet v1.0's agent did for each unit of its machine: the file in /run/fleet/units,
/// linked into systemd's runtime directory (enabled there when it has [Install]), one
/// daemon-reload, then a start of the launched ones.
fn run_like_v1_agent(c: &Cluster) {
    let all = units();
    for i in c.nodes() {
        let mine: Vec<&V1Unit> = all
            .iter()
            .filter(|u| u.state != "inactive" && nodes_of(c, u).contains(&i))
            .collect();
        for u in &mine {
            // the registry's unit changed while this agent ran an older file
            let text = if u.name == CHANGED { SLEEP } else { u.text };
            let script = "set -e; mkdir -p /run/fleet/units; printf '%s' \"$2\" > /run/fleet/units/$1; \
                          chmod 0644 /run/fleet/units/$1; systemctl link --runtime --force /run/fleet/units/$1; \
                          if grep -q '^\\[Install\\]' /run/fleet/units/$1; then systemctl enable --runtime --force /run/fleet/units/$1; fi";
            must(
                must(c.exec(i, &["sh", "-c", script, "sh", u.name, text]))
                    .ok(&format!("loading {} on node{i}", u.name)),
            );
        }
        must(must(c.exec(i, &["systemctl", "daemon-reload"])).ok("daemon-reload"));
        for u in mine.iter().filter(|u| u.state == "launched") {
            must(
                must(c.exec(i, &["systemctl", "start", u.name]))
                    .ok(&format!("starting {} on node{i}", u.name)),
            );
        }
    }
}

/// `InvocationID` of every unit running anywhere, by (node, unit).
fn invocations(c: &Cluster) -> BTreeMap<(usize, String), String> {
    let mut ids = BTreeMap::new();
    for u in units().iter().filter(|u| u.state == "launched") {
        for i in nodes_of(c, u) {
            let out = must(
                must(c.exec(
                    i,
                    &["systemctl", "show", "-p", "InvocationID", "--value", u.name],
                ))
                .ok("systemctl show"),
            );
            let id = out.trimmed().to_string();
            assert_eq!(id.len(), 32, "{} on node{i} runs: {id:?}", u.name);
            ids.insert((i, u.name.to_string()), id);
        }
    }
    ids
}

fn wait_list_units(c: &Cluster, want: &[UnitRow]) {
    must(wait_for("list-units", WAIT, || {
        let got = c.list_units(1).map_err(|e| e.to_string())?;
        if got == want {
            Ok(())
        } else {
            Err(format!("{got:?}"))
        }
    }));
}

#[test]
fn a_running_fleet_v1_cluster_is_taken_over_without_restarts() {
    let c = boot(quick_spec("migrate", 2).etcd_args("--enable-v2=true"));
    // the cluster as fleet v1.0 left it: no fleetd of ours yet
    for i in c.nodes() {
        must(c.stop_fleetd(i));
    }
    seed_registry(&c);
    run_like_v1_agent(&c);
    let mut before = invocations(&c);
    let since = now_us();

    // step 3 of the procedure: the plan, then the import
    let dry = must(c.fleetctl_host(&["import-v1", "--dry-run"]));
    assert!(dry.success(), "{dry:?}");
    let m1 = c.machine_id(1).to_string();
    let m2 = c.machine_id(2).to_string();
    assert_eq!(
        dry.stdout,
        format!(
            "would import changed.service (launched on {m2})\n\
             would import enabled.service (launched on {m1})\n\
             would import glob.service (launched, global)\n\
             would import hello.service (launched on {m1})\n\
             would import idle.service (loaded on {m2})\n\
             would import inst@.service (inactive, not scheduled)\n\
             would import inst@1.service (launched on {m2})\n\
             would import metadata {m1} role=front\n\
             would import: 8, already there: 0, skipped: 0, errors: 0\n"
        )
    );
    let imported = must(c.fleetctl_host(&["import-v1"]));
    assert!(imported.success(), "{imported:?}");
    assert!(
        imported
            .stdout
            .ends_with("imported: 8, already there: 0, skipped: 0, errors: 0\n"),
        "{}",
        imported.stdout
    );
    let again = must(c.fleetctl_host(&["import-v1"]));
    assert!(
        again
            .stdout
            .ends_with("imported: 0, already there: 8, skipped: 0, errors: 0\n"),
        "{}",
        again.stdout
    );

    // step 4: our fleetd on every machine
    for i in c.nodes() {
        must(c.start_fleetd(i));
    }
    let row = |unit: &str, m: &str, active: &str, sub: &str| UnitRow {
        unit: unit.into(),
        machine: m.into(),
        active: active.into(),
        sub: sub.into(),
    };
    let (first, second) = if m1 < m2 { (&m1, &m2) } else { (&m2, &m1) };
    let want = vec![
        row(CHANGED, &m2, "active", "running"),
        row("enabled.service", &m1, "active", "running"),
        row("glob.service", first, "active", "running"),
        row("glob.service", second, "active", "running"),
        row("hello.service", &m1, "active", "running"),
        row("idle.service", &m2, "inactive", "dead"),
        row("inst@1.service", &m2, "active", "running"),
    ];
    wait_list_units(&c, &want);
    let f = |u: &str, d: &str, s: &str, t: &str| -> (String, String, String, String) {
        (u.into(), d.into(), s.into(), t.into())
    };
    let want_files = vec![
        f(CHANGED, "launched", "launched", &m2),
        f("enabled.service", "launched", "launched", &m1),
        f("glob.service", "launched", "-", "global"),
        f("hello.service", "launched", "launched", &m1),
        f("idle.service", "loaded", "loaded", &m2),
        f("inst@.service", "inactive", "inactive", "-"),
        f("inst@1.service", "launched", "launched", &m2),
    ];
    // (the replaced unit is briefly inactive while its new file is started)
    must(wait_for("list-unit-files", WAIT, || {
        let files: Vec<(String, String, String, String)> = c
            .list_unit_files(1)
            .map_err(|e| e.to_string())?
            .into_iter()
            .map(|r: UnitFileRow| (r.unit, r.dstate, r.state, r.target))
            .collect();
        if files == want_files {
            Ok(())
        } else {
            Err(format!("{files:?}"))
        }
    }));
    // a few reconciles later: still the same processes, no start or stop logged
    std::thread::sleep(Duration::from_secs(3));
    let mut after = invocations(&c);
    let key = (2, CHANGED.to_string());
    assert_ne!(
        after.remove(&key),
        before.remove(&key),
        "{CHANGED} not replaced"
    );
    assert_eq!(after, before, "a unit restarted");
    let on_disk = must(c.exec(2, &["cat", &format!("/run/fleet/units/{CHANGED}")]));
    assert_eq!(on_disk.stdout, NEWER);
    for i in c.nodes() {
        let journal = must(c.node_journal_since(i, since));
        let moved = transitions(
            &journal,
            &[
                "hello", "enabled", "inst@", "idle", "glob", "Hello", "instance",
            ],
        );
        assert!(moved.is_empty(), "node{i}: {moved:?}");
        // no reload storm: one for the replaced file on node2, none where nothing changed
        let reloads: Vec<&str> = journal
            .lines()
            .filter(|l| l.contains("Reloading"))
            .collect();
        assert!(reloads.len() < i, "node{i}: {reloads:?}");
    }
    let md = must(c.fleetctl_ok(1, &["list-machines", "--no-legend", "--full"]));
    assert!(md.stdout.contains("role=front"), "{}", md.stdout);

    // and the imported units are ordinary units now
    must(c.fleetctl_ok(
        1,
        &["stop", "hello.service", "inst@1.service", "glob.service"],
    ));
    wait_list_units(
        &c,
        &[
            row(CHANGED, &m2, "active", "running"),
            row("enabled.service", &m1, "active", "running"),
            row("glob.service", first, "inactive", "dead"),
            row("glob.service", second, "inactive", "dead"),
            row("hello.service", &m1, "inactive", "dead"),
            row("idle.service", &m2, "inactive", "dead"),
            row("inst@1.service", &m2, "inactive", "dead"),
        ],
    );
    must(c.fleetctl_ok(
        1,
        &[
            "destroy",
            CHANGED,
            "hello.service",
            "enabled.service",
            "inst@.service",
            "inst@1.service",
            "idle.service",
            "glob.service",
        ],
    ));
    wait_list_units(&c, &[]);
    assert_eq!(must(c.list_unit_files(1)), vec![]);
    for i in c.nodes() {
        must(wait_for(
            &format!("node{i}'s units directory empty"),
            WAIT,
            || {
                let out = c
                    .exec(i, &["ls", "-A", "/run/fleet/units"])
                    .map_err(|e| e.to_string())?;
                if out.trimmed().is_empty() {
                    Ok(())
                } else {
                    Err(out.stdout)
                }
            },
        ));
        let active = must(c.exec(i, &["systemctl", "is-active", "enabled.service"]));
        assert_eq!(active.trimmed(), "inactive", "node{i}");
    }
    must(c.down());
}
