//! The dashboard in a real browser: fleetd with `enable_dashboard=true` serves it on its API
//! listener; Debian's headless Chromium opens it once, and the page, left open, shows units
//! started, stopped and destroyed with fleetctl within 1 s (DOM checks through the DevTools
//! protocol), then a unit's page with its file and history. A screenshot of each view is saved
//! under the target directory (`functional-artifacts/`).
//!
//! Chromium speaks the DevTools protocol over a pipe (`--remote-debugging-pipe`: commands on
//! its descriptor 3, answers on 4, NUL-terminated JSON), so no debugging port is opened.

use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use base64::Engine as _;
use functional::FleetCluster;
use functional::fleet::{boot, must, quick_spec};
use serde_json::{Value, json};

const WAIT: Duration = Duration::from_secs(30);
/// What the page has to show a change in, once fleetctl has seen it.
const LIVE: Duration = Duration::from_secs(1);
/// The API's TCP port in the nodes (fleet.socket), on the harness bridge.
const PORT: u16 = 49153;

/// Headless Chromium driven over the DevTools pipe; killed (by its PID) when dropped.
struct Browser {
    child: Child,
    commands: ChildStdin,
    answers: mpsc::Receiver<Value>,
    next_id: u64,
    session: String,
    _profile: TempDir,
}

/// A directory removed when dropped (the browser profile).
struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

impl Browser {
    fn open(url: &str) -> Browser {
        let chromium = ["/usr/bin/chromium", "/usr/bin/chromium-browser"]
            .into_iter()
            .find(|p| std::path::Path::new(p).exists())
            .unwrap_or_else(|| {
                panic!("chromium is not installed: run ./test (it installs the packages of functional/harness/packages.sh)")
            });
        let profile = std::env::temp_dir().join(format!("fleet-dash-{}", std::process::id()));
        std::fs::create_dir_all(&profile).expect("browser profile");
        // the shell hands our pipes to Chromium as descriptors 3 (commands) and 4 (answers)
        let script = format!(
            "exec {chromium} --headless --no-sandbox --disable-gpu --disable-dev-shm-usage \
             --no-first-run --no-default-browser-check --disable-background-networking \
             --disable-component-update --disable-sync --disable-extensions --disable-default-apps \
             --disable-domain-reliability --no-pings --no-proxy-server --mute-audio \
             --window-size=1280,900 --user-data-dir={} --remote-debugging-pipe about:blank \
             3<&0 4>&1 0</dev/null 1>/dev/null",
            profile.display()
        );
        let mut child = Command::new("sh")
            .args(["-c", &script])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("start chromium");
        let commands = child.stdin.take().expect("chromium's command pipe");
        let mut answers_pipe = BufReader::new(child.stdout.take().expect("chromium's answers"));
        let (tx, answers) = mpsc::channel();
        std::thread::spawn(move || {
            loop {
                let mut msg = Vec::new();
                match answers_pipe.read_until(0, &mut msg) {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {}
                }
                msg.pop();
                if let Ok(v) = serde_json::from_slice::<Value>(&msg)
                    && tx.send(v).is_err()
                {
                    return;
                }
            }
        });
        let mut b = Browser {
            child,
            commands,
            answers,
            next_id: 0,
            session: String::new(),
            _profile: TempDir(profile),
        };
        let target = b.call("Target.createTarget", json!({"url": url}));
        let target_id = target["targetId"].as_str().expect("target").to_string();
        let attached = b.call(
            "Target.attachToTarget",
            json!({"targetId": target_id, "flatten": true}),
        );
        b.session = attached["sessionId"].as_str().expect("session").to_string();
        b
    }

    /// One DevTools command (on the page once attached); its result.
    fn call(&mut self, method: &str, params: Value) -> Value {
        self.next_id += 1;
        let id = self.next_id;
        let mut msg = json!({"id": id, "method": method, "params": params});
        if !self.session.is_empty() {
            msg["sessionId"] = json!(self.session);
        }
        let mut bytes = msg.to_string().into_bytes();
        bytes.push(0);
        self.commands
            .write_all(&bytes)
            .and_then(|_| self.commands.flush())
            .expect("send to chromium");
        let deadline = Instant::now() + WAIT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let answer = self
                .answers
                .recv_timeout(left)
                .unwrap_or_else(|_| panic!("chromium did not answer {method}"));
            if answer["id"] == id {
                if let Some(e) = answer.get("error") {
                    panic!("chromium: {method}: {e}");
                }
                return answer["result"].clone();
            }
        }
    }

    /// Evaluates a JavaScript expression in the page; its value.
    fn eval(&mut self, expression: &str) -> Value {
        let r = self.call(
            "Runtime.evaluate",
            json!({"expression": expression, "returnByValue": true}),
        );
        r["result"]["value"].clone()
    }

    /// Polls `expression` until it is `true`; how long that took, or what it was last.
    fn until(&mut self, expression: &str, within: Duration) -> Result<Duration, Value> {
        let start = Instant::now();
        loop {
            let v = self.eval(expression);
            if v == json!(true) {
                return Ok(start.elapsed());
            }
            if start.elapsed() > within {
                return Err(v);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn screenshot(&mut self, name: &str) -> PathBuf {
        let shot = self.call("Page.captureScreenshot", json!({"format": "png"}));
        let png = base64::engine::general_purpose::STANDARD
            .decode(shot["data"].as_str().expect("screenshot data"))
            .expect("screenshot base64");
        let dir = artifacts_dir();
        std::fs::create_dir_all(&dir).expect("artifacts directory");
        let path = dir.join(name);
        std::fs::write(&path, png).expect("write screenshot");
        path
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        // ask it to close (its helper processes go with it), then make sure
        let close = format!("{}\0", json!({"id": 0, "method": "Browser.close"}));
        let _ = self.commands.write_all(close.as_bytes());
        let _ = self.commands.flush();
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline && matches!(self.child.try_wait(), Ok(None)) {
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `<target dir>/functional-artifacts`.
fn artifacts_dir() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target"));
    target.join("functional-artifacts")
}

/// The row of `unit` has attribute `data-<attr>` equal to `value`.
fn row_is(unit: &str, attr: &str, value: &str) -> String {
    format!(
        "(() => {{ const r = document.querySelector('#units tr[data-unit=\"{unit}\"]'); \
         return !!r && r.dataset.{attr} === '{value}'; }})()"
    )
}

#[test]
fn the_dashboard_follows_units_started_and_stopped_with_fleetctl() {
    let c = boot(
        quick_spec("dash", 2)
            .fleet_config("enable_dashboard=true")
            .fleet_tcp_port(PORT),
    );
    must(c.wait_for_machines(1, 2, WAIT));
    let url = format!("http://{}:{PORT}/dashboard/", c.ip(1));
    let mut b = Browser::open(&url);
    // the page lists both machines and follows the stream
    let shown = b.until(
        "document.querySelectorAll('#machines tbody tr').length === 2 && \
         document.getElementById('status').dataset.state === 'live'",
        WAIT,
    );
    assert!(shown.is_ok(), "the page did not load: {shown:?}");

    let hello = must(c.put_fixture(1, "hello.service"));
    must(c.fleetctl_ok(1, &["start", &hello]));
    // fleetctl has seen it launched: the page, never reloaded, shows it within 1 s
    let took = b.until(&row_is("hello.service", "current", "launched"), LIVE);
    assert!(took.is_ok(), "start not shown within {LIVE:?}: {took:?}");
    println!(
        "dashboard: start shown {:?} after fleetctl returned",
        took.ok()
    );
    let active = b.until(&row_is("hello.service", "active", "active"), WAIT);
    assert!(active.is_ok(), "never shown active: {active:?}");
    let machine =
        b.eval("document.querySelector('#units tr[data-unit=\"hello.service\"]').dataset.machine");
    let on = machine.as_str().unwrap_or("");
    assert!(
        on == c.machine_id(1) || on == c.machine_id(2),
        "machine {machine}"
    );
    println!(
        "screenshot: {}",
        b.screenshot("dashboard-started.png").display()
    );

    must(c.fleetctl_ok(1, &["stop", "hello.service"]));
    let took = b.until(&row_is("hello.service", "current", "loaded"), LIVE);
    assert!(took.is_ok(), "stop not shown within {LIVE:?}: {took:?}");
    println!(
        "dashboard: stop shown {:?} after fleetctl returned",
        took.ok()
    );

    // the filter hides what does not match
    let goodbye = must(c.put_fixture(1, "goodbye.service"));
    must(c.fleetctl_ok(1, &["submit", &goodbye]));
    let took = b.until(&row_is("goodbye.service", "desired", "inactive"), LIVE);
    assert!(took.is_ok(), "submit not shown within {LIVE:?}: {took:?}");
    b.eval(
        "(() => { const f = document.getElementById('filter'); f.value = 'good*'; \
         f.dispatchEvent(new Event('input')); return true; })()",
    );
    let filtered = b.until(
        "document.querySelector('#units tr[data-unit=\"hello.service\"]').hidden && \
         !document.querySelector('#units tr[data-unit=\"goodbye.service\"]').hidden",
        LIVE,
    );
    assert!(filtered.is_ok(), "filter: {filtered:?}");

    // a unit's page: its file, and its history since the page opened
    b.eval("location.hash = '#unit/hello.service'; true");
    let page = b.until(
        "document.getElementById('unit-file').textContent.includes('ExecStart=') && \
         document.querySelectorAll('#unit-history li').length >= 3",
        WAIT,
    );
    assert!(page.is_ok(), "unit page: {page:?}");
    let history = b.eval(
        "[...document.querySelectorAll('#unit-history li')].map(l => l.textContent).join('\\n')",
    );
    let history = history.as_str().unwrap_or("");
    for what in [
        "created",
        "placed on",
        "desired state launched \u{2192} loaded",
    ] {
        assert!(history.contains(what), "history lacks {what:?}: {history}");
    }
    println!(
        "screenshot: {}",
        b.screenshot("dashboard-unit.png").display()
    );

    must(c.fleetctl_ok(1, &["destroy", "hello.service"]));
    let took = b.until(
        "document.getElementById('unit-summary').textContent.includes('(destroyed)')",
        LIVE,
    );
    assert!(took.is_ok(), "destroy not shown within {LIVE:?}: {took:?}");
    b.eval("location.hash = ''; true");
    let gone = b.until(
        "!document.querySelector('#units tr[data-unit=\"hello.service\"]')",
        LIVE,
    );
    assert!(gone.is_ok(), "destroyed unit still listed: {gone:?}");
    drop(b);
    must(c.down());
}
