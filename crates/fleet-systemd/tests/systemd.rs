//! `SystemdManager` against a real systemd. Every test is `#[ignore]`d, as it needs systemd as
//! PID 1 of its namespace: `./test` runs them with `--ignored` inside a harness node
//! (`functional/systemd-tests.sh`); elsewhere they are listed as ignored, never as passed.
//!
//! Every test uses its own units directory and unit names, and removes what it created.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use fleet_systemd::{
    Error, ManagerConfig, ResyncReason, StateChange, SystemdManager, SystemdState, UnitEvent,
    UnitManager, WatchSet,
};
use futures_util::future::join_all;
use tokio::sync::mpsc::Receiver;

/// How long any awaited signal may take before the test fails.
const SIGNAL_DEADLINE: Duration = Duration::from_secs(30);

const RUNTIME_UNIT_DIR: &str = "/run/systemd/system";

/// Fails the test unless this namespace runs systemd as PID 1. The tests are `#[ignore]`d, so
/// a plain `cargo test` lists them as ignored; `./test` runs them with `--ignored` inside a
/// harness node (`functional/systemd-tests.sh`), where this holds.
fn require_systemd() {
    let comm = std::fs::read_to_string("/proc/1/comm").unwrap_or_default();
    assert!(
        comm.trim() == "systemd" && Path::new("/run/systemd/system").is_dir(),
        "PID 1 of this namespace is not systemd: run these tests inside a harness node \
         (functional/systemd-tests.sh)"
    );
}

fn st(load: &str, active: &str, sub: &str) -> SystemdState {
    SystemdState::new(load, active, sub)
}

fn sleeper() -> String {
    "[Unit]\nDescription=fleet-systemd test unit\n\n[Service]\nExecStart=/bin/sleep 100000\n"
        .to_owned()
}

struct Env {
    mgr: SystemdManager,
    dir: PathBuf,
}

async fn env(test: &str) -> Env {
    env_for(test, false).await
}

/// A manager of the system (or, with `user`, the session) bus with its own units directory.
async fn env_for(test: &str, user: bool) -> Env {
    // `RUST_LOG=fleet_systemd=debug` and `--nocapture` show the library's logs.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    let dir = PathBuf::from(format!("/run/fleet-systemd-test/{test}/units"));
    let _ = std::fs::remove_dir_all(&dir);
    let mgr = SystemdManager::connect(ManagerConfig {
        units_directory: dir.clone(),
        user,
    })
    .await
    .expect("connect to the bus");
    Env { mgr, dir }
}

impl Env {
    /// Stops, removes and forgets `names`, then reloads once.
    async fn cleanup(&self, names: &[String]) {
        for name in names {
            let _ = self.mgr.stop(name).await;
            self.mgr
                .remove_unit(name)
                .await
                .expect("remove_unit in cleanup");
        }
        self.mgr.reload().await.expect("reload in cleanup");
    }
}

/// Receives events until `done` says the wanted one came; fails after [`SIGNAL_DEADLINE`],
/// listing what did arrive.
async fn wait_for(
    rx: &mut Receiver<UnitEvent>,
    what: &str,
    mut done: impl FnMut(&UnitEvent) -> bool,
) -> Vec<UnitEvent> {
    let deadline = tokio::time::Instant::now() + SIGNAL_DEADLINE;
    let mut seen = Vec::new();
    loop {
        match tokio::time::timeout_at(deadline, rx.recv()).await {
            Ok(Some(event)) => {
                let hit = done(&event);
                seen.push(event);
                if hit {
                    return seen;
                }
            }
            Ok(None) => panic!("subscription closed while waiting for {what}; saw {seen:?}"),
            Err(_) => panic!("no {what} within {SIGNAL_DEADLINE:?}; saw {seen:?}"),
        }
    }
}

fn is_state(event: &UnitEvent, name: &str, want: &SystemdState) -> bool {
    matches!(event, UnitEvent::Changed(StateChange { name: n, state: Some(s) }) if n == name && s == want)
}

fn link_target(name: &str) -> Option<PathBuf> {
    std::fs::read_link(Path::new(RUNTIME_UNIT_DIR).join(name)).ok()
}

#[tokio::test]
#[ignore = "needs systemd as PID 1: ./test runs these inside a harness node"]
async fn write_start_stop_remove_seen_through_signals() {
    require_systemd();
    let env = env("lifecycle").await;
    let name = "fsd-lifecycle.service".to_owned();
    let watch = WatchSet::from_iter([name.clone()]);
    let mut rx = env.mgr.subscribe(watch).await.expect("subscribe");

    env.mgr
        .write_unit(&name, &sleeper())
        .await
        .expect("write_unit");
    assert_eq!(
        std::fs::read_to_string(env.dir.join(&name)).expect("unit file"),
        sleeper()
    );
    assert_eq!(
        link_target(&name),
        Some(env.dir.join(&name)),
        "runtime link"
    );
    env.mgr.reload().await.expect("reload");

    env.mgr.start(&name).await.expect("start");
    let running = st("loaded", "active", "running");
    wait_for(&mut rx, "active/running signal", |e| {
        is_state(e, &name, &running)
    })
    .await;
    let states = env
        .mgr
        .states(std::slice::from_ref(&name))
        .await
        .expect("states");
    assert_eq!(states.get(&name), Some(&running));
    assert_eq!(
        env.mgr
            .states_by_properties(std::slice::from_ref(&name))
            .await
            .expect("fallback states"),
        states,
        "the pre-230 fallback reads the same"
    );

    env.mgr.stop(&name).await.expect("stop");
    let dead = st("loaded", "inactive", "dead");
    wait_for(&mut rx, "inactive/dead signal", |e| {
        is_state(e, &name, &dead)
    })
    .await;

    env.mgr.remove_unit(&name).await.expect("remove_unit");
    assert!(!env.dir.join(&name).exists(), "unit file removed");
    assert_eq!(link_target(&name), None, "runtime link removed");
    env.mgr.reload().await.expect("reload");
    let states = env
        .mgr
        .states(std::slice::from_ref(&name))
        .await
        .expect("states");
    assert_eq!(
        states.get(&name),
        Some(&st("not-found", "inactive", "dead"))
    );
    assert!(env.mgr.unit_file_names().await.expect("names").is_empty());
}

/// Sends forged systemd signals from a connection of its own to every other connection of this
/// process (the subscription's among them) and as a broadcast: a failed state for `name`, a
/// `Reloading` and a `NameOwnerChanged` naming the forger as systemd's new owner.
async fn forge_signals(name: &str) {
    use std::collections::HashMap;
    use zbus::zvariant::Value;
    const BUS: &str = "org.freedesktop.DBus";
    let forger = zbus::Connection::system().await.expect("forger connects");
    let own = forger.unique_name().expect("forger's name").to_string();
    let call = |method: &'static str, arg: Option<String>| {
        let forger = forger.clone();
        async move {
            let path = "/org/freedesktop/DBus";
            match arg {
                Some(arg) => {
                    forger
                        .call_method(Some(BUS), path, Some(BUS), method, &arg)
                        .await
                }
                None => {
                    forger
                        .call_method(Some(BUS), path, Some(BUS), method, &())
                        .await
                }
            }
            .unwrap_or_else(|e| panic!("{method}: {e}"))
        }
    };
    let names: Vec<String> = call("ListNames", None)
        .await
        .body()
        .deserialize()
        .expect("names");
    let systemd: String = call("GetNameOwner", Some("org.freedesktop.systemd1".into()))
        .await
        .body()
        .deserialize()
        .expect("systemd's owner");
    let mut destinations = vec![None];
    for n in names
        .into_iter()
        .filter(|n| n.starts_with(':') && *n != own)
    {
        let pid: Result<u32, _> = forger
            .call_method(
                Some(BUS),
                "/org/freedesktop/DBus",
                Some(BUS),
                "GetConnectionUnixProcessID",
                &n,
            )
            .await
            .and_then(|r| r.body().deserialize());
        if pid.ok() == Some(std::process::id()) {
            destinations.push(Some(n));
        }
    }
    assert!(
        destinations.len() > 1,
        "found no connection of this process"
    );
    let path = format!(
        "/org/freedesktop/systemd1/unit/{}",
        name.bytes()
            .map(|b| if b.is_ascii_alphanumeric() {
                char::from(b).to_string()
            } else {
                format!("_{b:02x}")
            })
            .collect::<String>()
    );
    let failed: HashMap<&str, Value<'_>> = [
        ("LoadState", "loaded"),
        ("ActiveState", "failed"),
        ("SubState", "failed"),
    ]
    .into_iter()
    .map(|(k, v)| (k, Value::from(v)))
    .collect();
    let none = Vec::<String>::new();
    let manager = "org.freedesktop.systemd1.Manager";
    for dest in &destinations {
        let dest = dest.as_deref();
        forger
            .emit_signal(
                dest,
                path.as_str(),
                "org.freedesktop.DBus.Properties",
                "PropertiesChanged",
                &("org.freedesktop.systemd1.Unit", &failed, &none),
            )
            .await
            .expect("forge PropertiesChanged");
        forger
            .emit_signal(
                dest,
                "/org/freedesktop/systemd1",
                manager,
                "Reloading",
                &false,
            )
            .await
            .expect("forge Reloading");
        forger
            .emit_signal(
                dest,
                "/org/freedesktop/DBus",
                BUS,
                "NameOwnerChanged",
                &("org.freedesktop.systemd1", &systemd, &own),
            )
            .await
            .expect("forge NameOwnerChanged");
    }
    // A round trip: the bus has routed all of the above before anything systemd sends next.
    call("GetId", None).await;
}

#[tokio::test]
#[ignore = "needs systemd as PID 1: ./test runs these inside a harness node"]
async fn signals_forged_by_another_connection_are_ignored() {
    require_systemd();
    let env = env("forged").await;
    let name = "fsd-forged.service".to_owned();
    let mut rx = env
        .mgr
        .subscribe(WatchSet::from_iter([name.clone()]))
        .await
        .expect("subscribe");
    env.mgr.write_unit(&name, &sleeper()).await.expect("write");
    env.mgr.reload().await.expect("reload");
    env.mgr.start(&name).await.expect("start");
    let running = st("loaded", "active", "running");
    wait_for(&mut rx, "active/running signal", |e| {
        is_state(e, &name, &running)
    })
    .await;

    forge_signals(&name).await;
    env.mgr.stop(&name).await.expect("stop");
    let dead = st("loaded", "inactive", "dead");
    let seen = wait_for(&mut rx, "inactive/dead signal", |e| {
        is_state(e, &name, &dead)
    })
    .await;
    let forged = st("loaded", "failed", "failed");
    assert!(
        !seen
            .iter()
            .any(|e| is_state(e, &name, &forged) || matches!(e, UnitEvent::Resync(_))),
        "a forged signal got through: {seen:?}"
    );
    env.cleanup(&[name]).await;
}

#[tokio::test]
#[ignore = "needs systemd as PID 1: ./test runs these inside a harness node"]
async fn enable_links_install_section_and_refuses_units_without_one() {
    require_systemd();
    let env = env("enable").await;
    let with = "fsd-enable.service".to_owned();
    let without = "fsd-noinstall.service".to_owned();
    let body = format!("{}\n[Install]\nWantedBy=multi-user.target\n", sleeper());
    env.mgr.write_unit(&with, &body).await.expect("write_unit");
    env.mgr
        .write_unit(&without, &sleeper())
        .await
        .expect("write_unit");
    env.mgr.reload().await.expect("reload");

    env.mgr.enable(&with).await.expect("enable");
    let wants = Path::new(RUNTIME_UNIT_DIR)
        .join("multi-user.target.wants")
        .join(&with);
    assert!(
        std::fs::symlink_metadata(&wants).is_ok(),
        "{} exists",
        wants.display()
    );

    let err = env.mgr.enable(&without).await.expect_err("no [Install]");
    assert!(
        matches!(&err, Error::NoInstallInfo { unit } if *unit == without),
        "{err}"
    );

    assert_eq!(
        env.mgr.unit_file_names().await.expect("names"),
        vec![with.clone(), without.clone()]
    );
    env.cleanup(&[with.clone(), without]).await;
    assert!(
        std::fs::symlink_metadata(&wants).is_err(),
        "wants link removed"
    );
    assert_eq!(link_target(&with), None, "runtime link removed");
}

#[tokio::test]
#[ignore = "needs systemd as PID 1: ./test runs these inside a harness node"]
async fn failing_unit_reports_failed_and_errors_name_the_unit() {
    require_systemd();
    let env = env("failing").await;
    let name = "fsd-failing.service".to_owned();
    let mut rx = env
        .mgr
        .subscribe(WatchSet::from_iter([name.clone()]))
        .await
        .expect("subscribe");
    env.mgr
        .write_unit(&name, "[Service]\nExecStart=/bin/false\n")
        .await
        .expect("write_unit");
    env.mgr.reload().await.expect("reload");
    env.mgr.start(&name).await.expect("start is only queued");
    let failed = st("loaded", "failed", "failed");
    wait_for(&mut rx, "failed signal", |e| is_state(e, &name, &failed)).await;
    let states = env
        .mgr
        .states(std::slice::from_ref(&name))
        .await
        .expect("states");
    assert_eq!(states.get(&name), Some(&failed));

    // remove_unit resets the failed state, so nothing stale stays loaded.
    env.mgr.remove_unit(&name).await.expect("remove_unit");
    env.mgr.reload().await.expect("reload");
    let states = env
        .mgr
        .states(std::slice::from_ref(&name))
        .await
        .expect("states");
    assert_eq!(
        states.get(&name),
        Some(&st("not-found", "inactive", "dead"))
    );

    let missing = "fsd-missing.service";
    let err = env.mgr.start(missing).await.expect_err("no such unit");
    let dbus = err.dbus().expect("a D-Bus error");
    assert_eq!(err.unit(), Some(missing));
    assert!(dbus.is("org.freedesktop.systemd1.NoSuchUnit"), "{err}");
    assert!(err.to_string().contains(missing), "{err}");
}

#[tokio::test]
#[ignore = "needs systemd as PID 1: ./test runs these inside a harness node"]
async fn signals_keep_coming_after_daemon_reload_and_reexec() {
    require_systemd();
    let env = env("reload").await;
    let name = "fsd-reload.service".to_owned();
    let mut rx = env
        .mgr
        .subscribe(WatchSet::from_iter([name.clone()]))
        .await
        .expect("subscribe");
    env.mgr
        .write_unit(&name, &sleeper())
        .await
        .expect("write_unit");
    env.mgr.reload().await.expect("reload");
    wait_for(&mut rx, "resync after our reload", |e| {
        *e == UnitEvent::Resync(ResyncReason::Reloaded)
    })
    .await;

    // A reload by somebody else.
    let status = std::process::Command::new("systemctl")
        .arg("daemon-reload")
        .status()
        .expect("run systemctl");
    assert!(status.success());
    wait_for(&mut rx, "resync after systemctl daemon-reload", |e| {
        *e == UnitEvent::Resync(ResyncReason::Reloaded)
    })
    .await;
    env.mgr.start(&name).await.expect("start");
    let running = st("loaded", "active", "running");
    wait_for(&mut rx, "active/running after reload", |e| {
        is_state(e, &name, &running)
    })
    .await;

    // daemon-reexec: systemd re-executes itself and reconnects to the bus.
    let status = std::process::Command::new("systemctl")
        .arg("daemon-reexec")
        .status()
        .expect("run systemctl");
    assert!(status.success());
    let seen = wait_for(&mut rx, "resync after daemon-reexec", |e| {
        matches!(e, UnitEvent::Resync(_))
    })
    .await;
    let _ = writeln!(std::io::stderr(), "events after daemon-reexec: {seen:?}");
    env.mgr.stop(&name).await.expect("stop");
    let dead = st("loaded", "inactive", "dead");
    wait_for(&mut rx, "inactive/dead after reexec", |e| {
        is_state(e, &name, &dead)
    })
    .await;
    env.cleanup(&[name]).await;
}

#[tokio::test]
#[ignore = "needs systemd as PID 1: ./test runs these inside a harness node"]
async fn names_that_escape_the_units_directory_are_refused() {
    require_systemd();
    let env = env("badnames").await;
    for name in ["../escape.service", "a/b.service", "..", ".", ""] {
        let refused = |r: Result<(), Error>| matches!(r, Err(Error::InvalidName { .. }));
        assert!(
            refused(env.mgr.write_unit(name, &sleeper()).await),
            "write {name:?}"
        );
        assert!(refused(env.mgr.remove_unit(name).await), "remove {name:?}");
        assert!(refused(env.mgr.enable(name).await), "enable {name:?}");
        assert!(refused(env.mgr.start(name).await), "start {name:?}");
        assert!(refused(env.mgr.stop(name).await), "stop {name:?}");
        let states = env.mgr.states(&[name.to_owned()]).await;
        assert!(
            matches!(states, Err(Error::InvalidName { .. })),
            "states {name:?}"
        );
    }
    assert!(
        !env.dir
            .parent()
            .expect("parent")
            .join("escape.service")
            .exists()
    );
    assert!(env.mgr.unit_file_names().await.expect("names").is_empty());
}

/// A batch of units is written and linked together (one `LinkUnitFiles`); a unit of the
/// batch that cannot be written fails alone, named, and the others are linked all the same.
#[tokio::test]
#[ignore = "needs systemd as PID 1: ./test runs these inside a harness node"]
async fn a_batch_of_units_is_written_and_linked_together() {
    require_systemd();
    let env = env("batch").await;
    let names: Vec<String> = (0..5)
        .map(|i| format!("fleet-systemd-test-batch{i}.service"))
        .collect();
    let mut units: Vec<(String, String)> = names.iter().map(|n| (n.clone(), sleeper())).collect();
    units.insert(2, ("../escape.service".to_owned(), sleeper()));
    let results = env.mgr.write_units(&units).await;
    assert_eq!(results.len(), units.len());
    for ((name, _), r) in units.iter().zip(&results) {
        if name.starts_with("..") {
            assert!(matches!(r, Err(Error::InvalidName { .. })), "{name}: {r:?}");
        } else {
            assert!(r.is_ok(), "{name}: {r:?}");
            assert_eq!(link_target(name), Some(env.dir.join(name)), "{name}");
        }
    }
    env.mgr.reload().await.expect("reload");
    env.mgr
        .start(&names[0])
        .await
        .expect("start a unit of the batch");
    env.cleanup(&names).await;
}

/// CPU time (user + system) this process has used; /proc/<pid>/stat counts in clock ticks,
/// 100 per second on Linux.
fn cpu_time(pid: &str) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("read stat");
    let after_comm = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest)
        .unwrap_or_default();
    let fields: Vec<&str> = after_comm.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<u64>().ok())
            .unwrap_or(0)
    };
    // After the comm: state is field 3 of the file, utime 14, stime 15.
    Duration::from_millis((ticks(11) + ticks(12)) * 10)
}

#[tokio::test]
#[ignore = "needs systemd as PID 1: ./test runs these inside a harness node"]
async fn two_hundred_units_started_at_once_all_report_through_signals() {
    require_systemd();
    const WATCHED: usize = 200;
    const UNWATCHED: usize = 50;
    let env = env("many").await;
    let watched: Vec<String> = (0..WATCHED)
        .map(|i| format!("fsd-many-{i:03}.service"))
        .collect();
    let unwatched: Vec<String> = (0..UNWATCHED)
        .map(|i| format!("fsd-other-{i:03}.service"))
        .collect();
    let all: Vec<String> = watched.iter().chain(&unwatched).cloned().collect();
    let mut rx = env
        .mgr
        .subscribe(watched.iter().cloned().collect())
        .await
        .expect("subscribe");

    let (cpu0, sd0, t0) = (cpu_time("self"), cpu_time("1"), Instant::now());
    for name in &all {
        env.mgr
            .write_unit(name, &sleeper())
            .await
            .expect("write_unit");
    }
    let t_written = Instant::now();
    env.mgr.reload().await.expect("reload");
    wait_for(&mut rx, "resync after reload", |e| {
        *e == UnitEvent::Resync(ResyncReason::Reloaded)
    })
    .await;
    let t_reloaded = Instant::now();
    let (cpu1, sd1) = (cpu_time("self"), cpu_time("1"));

    let started = join_all(all.iter().map(|n| env.mgr.start(n))).await;
    for (name, result) in all.iter().zip(started) {
        result.unwrap_or_else(|e| panic!("start {name}: {e}"));
    }
    let t_started = Instant::now();
    let running = st("loaded", "active", "running");
    let mut pending: BTreeSet<&String> = watched.iter().collect();
    let seen = wait_for(&mut rx, "active/running of all watched units", |e| {
        if let UnitEvent::Changed(StateChange {
            name,
            state: Some(s),
        }) = e
            && *s == running
        {
            pending.remove(name);
        }
        pending.is_empty()
    })
    .await;
    let t_all = Instant::now();
    let (cpu2, sd2) = (cpu_time("self"), cpu_time("1"));

    let reported: BTreeSet<&str> = seen
        .iter()
        .filter_map(|e| match e {
            UnitEvent::Changed(c) => Some(c.name.as_str()),
            UnitEvent::Resync(_) => None,
        })
        .collect();
    assert!(
        reported.iter().all(|n| n.starts_with("fsd-many-")),
        "unwatched units reported: {reported:?}"
    );
    let states: BTreeMap<String, SystemdState> = env.mgr.states(&all).await.expect("states");
    assert!(states.values().all(|s| *s == running), "{states:?}");

    let _ = writeln!(
        std::io::stderr(),
        "{} units ({WATCHED} watched): write+link {:?}, reload {:?}, {} StartUnit calls {:?}, \
         last active signal {:?} after the first start ({} events); \
         CPU of this process: load {:?}, start+signals {:?}; systemd (PID 1) CPU: load {:?}, start {:?}",
        all.len(),
        t_written - t0,
        t_reloaded - t_written,
        all.len(),
        t_started - t_reloaded,
        t_all - t_reloaded,
        seen.len(),
        cpu1 - cpu0,
        cpu2 - cpu1,
        sd1 - sd0,
        sd2 - sd1,
    );

    let t_cleanup = Instant::now();
    let stopped = join_all(all.iter().map(|n| env.mgr.stop(n))).await;
    assert!(stopped.iter().all(Result::is_ok));
    let dead = st("loaded", "inactive", "dead");
    let mut pending: BTreeSet<&String> = watched.iter().collect();
    wait_for(&mut rx, "inactive/dead of all watched units", |e| {
        if let UnitEvent::Changed(StateChange { name, state }) = e
            && (state.is_none() || state.as_ref() == Some(&dead))
        {
            pending.remove(name);
        }
        pending.is_empty()
    })
    .await;
    let t_stopped = Instant::now();
    // Half one by one, half in one batch, to compare.
    let (singly, batched) = all.split_at(all.len() / 2);
    for name in singly {
        env.mgr.remove_unit(name).await.expect("remove_unit");
    }
    let t_singly = Instant::now();
    env.mgr.remove_units(batched).await.expect("remove_units");
    let t_batched = Instant::now();
    env.mgr.reload().await.expect("reload");
    let _ = writeln!(
        std::io::stderr(),
        "{} units: concurrent stop until all inactive signals {:?}; remove_unit x{} {:?}, \
         remove_units of {} {:?}",
        all.len(),
        t_stopped - t_cleanup,
        singly.len(),
        t_singly - t_stopped,
        batched.len(),
        t_batched - t_singly,
    );
    let left: Vec<&String> = all.iter().filter(|n| link_target(n).is_some()).collect();
    assert!(left.is_empty(), "runtime links left: {left:?}");
    assert!(env.mgr.unit_file_names().await.expect("names").is_empty());
}

#[tokio::test]
#[ignore = "needs systemd as PID 1: ./test runs these inside a harness node"]
async fn subscription_and_calls_survive_a_dbus_restart() {
    require_systemd();
    let env = env("dbus-restart").await;
    let name = "fsd-dbus-restart.service".to_owned();
    let mut rx = env
        .mgr
        .subscribe(WatchSet::from_iter([name.clone()]))
        .await
        .expect("subscribe");
    env.mgr
        .write_unit(&name, &sleeper())
        .await
        .expect("write_unit");
    env.mgr.reload().await.expect("reload");

    // systemctl talks to systemd over its private socket, not through dbus-daemon.
    let status = std::process::Command::new("systemctl")
        .args(["restart", "dbus.service"])
        .status()
        .expect("run systemctl");
    assert!(status.success());
    wait_for(&mut rx, "resync after the bus came back", |e| {
        *e == UnitEvent::Resync(ResyncReason::Reconnected)
    })
    .await;

    // The call connection broke too: the first call reconnects by itself.
    env.mgr
        .start(&name)
        .await
        .expect("start after dbus restart");
    let running = st("loaded", "active", "running");
    wait_for(&mut rx, "active/running after dbus restart", |e| {
        is_state(e, &name, &running)
    })
    .await;
    env.cleanup(&[name]).await;
}

#[tokio::test]
#[ignore = "needs systemd as PID 1: ./test runs these inside a harness node"]
async fn user_manager_links_into_its_runtime_directory() {
    require_systemd();
    let runtime_dir = std::env::var_os("XDG_RUNTIME_DIR")
        .map(PathBuf::from)
        .filter(|d| d.join("bus").exists())
        .expect(
            "a user bus at $XDG_RUNTIME_DIR/bus (functional/systemd-tests.sh runs \
             `loginctl enable-linger root` and sets XDG_RUNTIME_DIR=/run/user/0)",
        );
    let env = env_for("user", true).await;
    let name = "fsd-user.service".to_owned();
    let mut rx = env
        .mgr
        .subscribe(WatchSet::from_iter([name.clone()]))
        .await
        .expect("subscribe");
    env.mgr
        .write_unit(&name, &sleeper())
        .await
        .expect("write_unit");
    let link = runtime_dir.join("systemd/user").join(&name);
    assert_eq!(
        std::fs::read_link(&link).ok(),
        Some(env.dir.join(&name)),
        "{}",
        link.display()
    );
    assert_eq!(
        link_target(&name),
        None,
        "nothing in the system manager's directory"
    );
    env.mgr.reload().await.expect("reload");
    env.mgr.start(&name).await.expect("start");
    let running = st("loaded", "active", "running");
    wait_for(&mut rx, "active/running from the user manager", |e| {
        is_state(e, &name, &running)
    })
    .await;
    let states = env
        .mgr
        .states(std::slice::from_ref(&name))
        .await
        .expect("states");
    assert_eq!(states.get(&name), Some(&running));
    env.cleanup(&[name]).await;
    assert!(
        std::fs::symlink_metadata(&link).is_err(),
        "user runtime link removed"
    );
}
