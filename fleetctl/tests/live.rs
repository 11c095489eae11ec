//! `fleetctl events` and `list-units --watch`, the real binary against a real etcd, through
//! fleetd's API (the event stream) and straight from etcd (`--driver=etcd`).

use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use fleet_registry::{EtcdConfig, EtcdRegistry, Registry};
use fleet_testutil::EtcdServer;
use fleet_unit::{TargetState, UnitFile, UnitName};

struct Setup {
    etcd: EtcdServer,
    dir: tempfile::TempDir,
    rt: tokio::runtime::Runtime,
    reg: EtcdRegistry,
    api: String,
}

impl Setup {
    fn start() -> Setup {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("runtime");
        let etcd = EtcdServer::start();
        let dir = tempfile::tempdir().expect("tempdir");
        let cfg = EtcdConfig {
            endpoints: vec![etcd.endpoint().to_string()],
            key_prefix: "/_coreos.com/fleet/".into(),
            request_timeout: Duration::from_secs(3),
            ..Default::default()
        };
        let reg = rt
            .block_on(EtcdRegistry::connect(&cfg))
            .expect("connect to etcd");
        let path = dir.path().join("fleet.sock");
        let registry = Arc::new(reg.clone());
        rt.block_on(async {
            let listener = fleet_api::bind_unix(&path).expect("bind API socket");
            let config = fleet_api::ApiConfig {
                events: Some(fleet_api::EventFeed(registry.clone())),
                ..Default::default()
            };
            tokio::spawn(fleet_api::serve(
                vec![listener],
                registry,
                config,
                std::future::pending::<()>(),
            ));
        });
        let api = format!("unix://{}", path.display());
        Setup {
            etcd,
            dir,
            rt,
            reg,
            api,
        }
    }

    fn spawn(&self, args: &[&str]) -> Running {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_fleetctl"));
        for (k, _) in std::env::vars_os() {
            if k.to_string_lossy().starts_with("FLEETCTL_") {
                cmd.env_remove(k);
            }
        }
        let mut child = cmd
            .current_dir(self.dir.path())
            .env_remove("RUST_LOG")
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn fleetctl");
        Running {
            stdout: fleet_testutil::collect_output(child.stdout.take().expect("stdout")),
            stderr: fleet_testutil::collect_output(child.stderr.take().expect("stderr")),
            child,
        }
    }

    fn create(&self, name: &str, desired: TargetState) {
        let file = UnitFile::parse("[Service]\nExecStart=/bin/sleep 100\n").expect("unit");
        let name = UnitName::parse(name).expect("name");
        self.rt
            .block_on(self.reg.create_unit(&name, &file, desired))
            .expect("create unit");
    }

    fn set(&self, name: &str, desired: TargetState) {
        let name = UnitName::parse(name).expect("name");
        self.rt
            .block_on(self.reg.set_desired_state(&name, desired))
            .expect("set desired state");
    }
}

struct Running {
    child: Child,
    stdout: Arc<Mutex<String>>,
    stderr: Arc<Mutex<String>>,
}

impl Running {
    fn stdout(&self) -> String {
        self.stdout.lock().expect("lock").clone()
    }

    /// Waits until stdout satisfies `cond`.
    fn wait_stdout(&self, what: &str, cond: impl Fn(&str) -> bool) {
        let ok = fleet_testutil::wait_for(Duration::from_secs(15), || cond(&self.stdout()));
        assert!(
            ok,
            "fleetctl did not print {what}; stdout: {:?}, stderr: {:?}",
            self.stdout(),
            self.stderr.lock().expect("lock")
        );
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn events_prints_the_stream_as_text_and_json_and_resumes_with_since() {
    let s = Setup::start();
    let endpoint = format!("--endpoint={}", s.api);
    let text = s.spawn(&[&endpoint, "events", "--unit", "web*"]);
    let json = s.spawn(&[&endpoint, "events", "-o", "json"]);
    let direct = s.spawn(&[
        "--driver=etcd",
        &format!("--endpoint={}", s.etcd.endpoint()),
        "events",
        "-o",
        "json",
    ]);
    // each is following once the first event shows
    let ok = fleet_testutil::wait_for(Duration::from_secs(15), || {
        s.create("web-probe.service", TargetState::Inactive);
        let seen = |r: &Running| r.stdout().contains("web-probe.service");
        let name = UnitName::parse("web-probe.service").expect("name");
        let _ = s.rt.block_on(s.reg.destroy_unit(&name));
        seen(&text) && seen(&json) && seen(&direct)
    });
    assert!(ok, "the followers did not start: {:?}", json.stdout());
    s.create("web1.service", TargetState::Loaded);
    s.create("db.service", TargetState::Loaded);
    s.set("web1.service", TargetState::Launched);
    text.wait_stdout("web1's desired-state change", |o| {
        o.contains("web1.service\tdesired state loaded -> launched")
    });
    let lines: Vec<String> = text
        .stdout()
        .lines()
        .filter(|l| !l.contains("web-probe"))
        .map(str::to_string)
        .collect();
    assert_eq!(lines.len(), 2, "{lines:?}");
    assert!(lines[0].ends_with("\tweb1.service\tcreated, desired state loaded"));
    assert!(!text.stdout().contains("db.service"), "the glob filters");

    for r in [&json, &direct] {
        r.wait_stdout("the change as JSON", |o| {
            o.contains(r#""previousDesiredState":"loaded""#)
        });
    }
    // the API's stream and etcd's say the same
    let tail = |r: &Running| {
        let out = r.stdout();
        let from = out.find("web1.service").and_then(|i| out[..i].rfind('\n'));
        out[from.map_or(0, |i| i + 1)..].to_string()
    };
    assert_eq!(tail(&json), tail(&direct));

    // --since replays from a revision
    let first: serde_json::Value = tail(&json)
        .lines()
        .next()
        .and_then(|l| serde_json::from_str(l).ok())
        .expect("a JSON line");
    let rev = first["revision"].as_i64().expect("revision");
    let since = s.spawn(&[
        &endpoint,
        "events",
        "-o",
        "json",
        "--since",
        &(rev - 1).to_string(),
    ]);
    since.wait_stdout("the replay", |o| o.lines().count() >= 3);
    assert_eq!(since.stdout().lines().next(), tail(&json).lines().next());
}

#[test]
fn list_units_watch_redraws_on_changes() {
    let s = Setup::start();
    let endpoint = format!("--endpoint={}", s.api);
    let watch = s.spawn(&[&endpoint, "list-units", "--watch"]);
    watch.wait_stdout("the first table", |o| o.starts_with("UNIT"));
    s.create("hello.service", TargetState::Launched);
    // not a terminal: tables follow each other, a blank line between them
    watch.wait_stdout("a redraw", |o| o.contains("\n\nUNIT"));
    let machines = s.spawn(&[&endpoint, "list-machines", "--watch"]);
    machines.wait_stdout("the machine table", |o| o.starts_with("MACHINE"));
    let bad = s.spawn(&[&endpoint, "events", "--unit", "["]);
    let ok = fleet_testutil::wait_for(Duration::from_secs(10), || {
        let stderr = bad.stderr.lock().expect("lock").clone();
        stderr == "Error following events: googleapi: Error 400: invalid unit pattern \"[\"\n"
    });
    assert!(ok, "stderr: {:?}", bad.stderr.lock().expect("lock"));
}

/// `--driver=etcd` with a `--since` etcd has compacted away: the watch opens, then etcd says
/// the history is gone. fleetctl ends with the message saying so, instead of reopening the
/// watch forever.
#[test]
fn events_from_a_compacted_revision_end_with_a_message() {
    let s = Setup::start();
    for i in 0..3 {
        s.create(&format!("c{i}.service"), TargetState::Loaded);
    }
    let rev =
        s.rt.block_on(fleet_registry::ChangeFeed::current_revision(&s.reg))
            .expect("current revision");
    let out = Command::new("etcdctl")
        .env("ETCDCTL_API", "3")
        .arg(format!("--endpoints={}", s.etcd.endpoint()))
        .arg("compaction")
        .arg(rev.to_string())
        .output()
        .expect("run etcdctl");
    assert!(
        out.status.success(),
        "etcdctl compaction: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut r = s.spawn(&[
        "--driver=etcd",
        &format!("--endpoint={}", s.etcd.endpoint()),
        "events",
        "--since",
        "1",
    ]);
    let exited = fleet_testutil::wait_for(Duration::from_secs(15), || {
        matches!(r.child.try_wait(), Ok(Some(_)))
    });
    assert!(exited, "fleetctl events did not end: it reopens the watch");
    let expected = format!(
        "Error following events: revision 1 is too old to resume from (etcd keeps revisions after {rev} only); list again and follow without --since"
    );
    let said = fleet_testutil::wait_for(Duration::from_secs(5), || {
        r.stderr.lock().expect("lock").contains(&expected)
    });
    assert!(
        said,
        "stderr: {:?}, expected {expected:?}",
        r.stderr.lock().expect("lock")
    );
}
