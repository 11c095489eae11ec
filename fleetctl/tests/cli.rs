//! Whole-CLI tests: the real fleetctl binary against a real etcd started by each test
//! (`--driver=etcd`). Machines, placements and unit states are simulated by writing them
//! through `EtcdRegistry` the way fleetd's agent and engine do; no fleetd runs here.
//! Tables and messages are compared byte for byte.

use std::io::Read;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use fleet_registry::{
    EngineOp, EtcdConfig, EtcdRegistry, Leadership, LeaseKeeper, MachineRecord, StateRecord,
};
use fleet_testutil::EtcdServer;
use fleet_unit::{TargetState, UnitFile};

const HELLO: &str = "[Unit]\nDescription=Hello World\n\n[Service]\nExecStart=/bin/bash -c \"while true; do echo \\\"Hello, world\\\"; sleep 1; done\"\n";
const SLEEP: &str = "[Service]\nExecStart=/bin/sleep 100\n";
const M1: &str = "113f16a7c2f84bd2ae9e6cf77b9fb2d5";
const M2: &str = "c31e44e1f858436e933e59c642517860";

/// A private etcd, a scratch directory for unit files, and a runtime for simulating fleetd.
struct Cluster {
    etcd: EtcdServer,
    dir: tempfile::TempDir,
    rt: tokio::runtime::Runtime,
    leases: Mutex<Vec<LeaseKeeper>>,
}

#[derive(Debug)]
struct Output {
    code: i32,
    stdout: String,
    stderr: String,
}

impl Cluster {
    fn start() -> Cluster {
        Cluster::start_with(&[])
    }

    /// With extra etcd arguments (`--enable-v2=true` for fleet v1.0's registry).
    fn start_with(etcd_args: &[&str]) -> Cluster {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("runtime");
        Cluster {
            etcd: EtcdServer::start_with(etcd_args),
            dir: tempfile::tempdir().expect("tempdir"),
            rt,
            leases: Mutex::new(Vec::new()),
        }
    }

    fn write(&self, name: &str, text: &str) {
        std::fs::write(self.dir.path().join(name), text).expect("write unit file");
    }

    /// fleetctl with a clean environment, in the scratch directory, talking to etcd.
    fn command(&self, args: &[&str]) -> Command {
        let mut cmd = self.bare_command();
        cmd.arg("--driver=etcd")
            .arg(format!("--endpoint={}", self.etcd.endpoint()))
            .args(args);
        cmd
    }

    fn bare_command(&self) -> Command {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_fleetctl"));
        for (k, _) in std::env::vars_os() {
            if k.to_string_lossy().starts_with("FLEETCTL_") {
                cmd.env_remove(k);
            }
        }
        cmd.current_dir(self.dir.path()).env_remove("RUST_LOG");
        cmd
    }

    /// Serves fleet's HTTP API (backed by this etcd) on a unix socket; returns its endpoint.
    fn serve_api(&self) -> String {
        let path = self.dir.path().join("fleet.sock");
        let registry: Arc<dyn fleet_registry::Registry> = Arc::new(self.registry());
        self.rt.block_on(async {
            let listener = fleet_api::bind_unix(&path).expect("bind API socket");
            tokio::spawn(fleet_api::serve(
                vec![listener],
                registry,
                fleet_api::ApiConfig::default(),
                std::future::pending::<()>(),
            ));
        });
        format!("unix://{}", path.display())
    }

    fn run(&self, args: &[&str]) -> Output {
        let out = self.command(args).output().expect("run fleetctl");
        Output {
            code: out.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

    /// Runs fleetctl and checks exit status, stdout and stderr exactly.
    fn check(&self, args: &[&str], code: i32, stdout: &str, stderr: &str) {
        let out = self.run(args);
        assert_eq!(
            (out.code, out.stdout.as_str(), out.stderr.as_str()),
            (code, stdout, stderr),
            "fleetctl {args:?}"
        );
    }

    fn spawn(&self, args: &[&str]) -> Running {
        let mut child = self
            .command(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn fleetctl");
        let stdout = collect(child.stdout.take().expect("stdout"));
        let stderr = collect(child.stderr.take().expect("stderr"));
        Running {
            child,
            stdout,
            stderr,
        }
    }

    fn registry(&self) -> EtcdRegistry {
        let cfg = EtcdConfig {
            endpoints: vec![self.etcd.endpoint().to_string()],
            request_timeout: Duration::from_secs(3),
            ..EtcdConfig::default()
        };
        self.rt
            .block_on(EtcdRegistry::connect(&cfg))
            .expect("connect")
    }

    /// Registers a machine as an agent does (kept alive while the cluster lives).
    fn add_machine(&self, id: &str, ip: &str, metadata: &[(&str, &str)]) {
        let lease = self.register(&machine(id, ip, metadata, "1.0.0"));
        self.leases.lock().expect("lock").push(lease);
    }

    fn register(&self, rec: &MachineRecord) -> LeaseKeeper {
        let reg = self.registry();
        self.rt
            .block_on(reg.register_machine(rec, Duration::from_secs(60)))
            .expect("register")
    }

    /// Publishes a unit state as the agent of `machine` does.
    fn publish(
        &self,
        unit: &str,
        machine: &str,
        hash: &str,
        active: &str,
        sub: &str,
        agent: TargetState,
    ) {
        let reg = self.registry();
        let rec = StateRecord {
            version: 1,
            name: unit.to_string(),
            machine_id: machine.to_string(),
            hash: hash.to_string(),
            load_state: "loaded".to_string(),
            active_state: active.to_string(),
            sub_state: sub.to_string(),
            agent_state: agent,
        };
        self.rt.block_on(async {
            let lease = LeaseKeeper::grant(reg.client(), Duration::from_secs(60))
                .await
                .expect("lease");
            reg.publish_state(unit, machine, Some(&rec), &lease)
                .await
                .expect("publish");
            self.leases.lock().expect("lock").push(lease);
        });
    }

    /// Becomes the engine leader (to write placements and reasons as the engine does).
    fn engine(&self) -> (EtcdRegistry, Leadership) {
        let reg = self.registry();
        let lead = self
            .rt
            .block_on(reg.campaign("test-engine", Duration::from_secs(60)))
            .expect("campaign")
            .expect("leadership");
        (reg, lead)
    }

    fn apply(&self, engine: &(EtcdRegistry, Leadership), ops: &[EngineOp]) {
        self.rt
            .block_on(engine.0.apply(&engine.1, ops))
            .expect("engine write");
    }
}

fn machine(id: &str, ip: &str, metadata: &[(&str, &str)], version: &str) -> MachineRecord {
    MachineRecord {
        version: 1,
        id: id.to_string(),
        public_ip: ip.to_string(),
        metadata: metadata
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        agent_version: version.to_string(),
        token: format!("token-{id}"),
    }
}

/// Writes a key of fleet v1.0's registry through etcd's v2 API, as fleet v1.0 did (`PUT`,
/// form field `value`).
fn v2_put(endpoint: &str, key: &str, value: &str) {
    use std::io::Write;
    let addr = endpoint.trim_start_matches("http://");
    let mut form = String::from("value=");
    for b in value.bytes() {
        if b.is_ascii_alphanumeric() {
            form.push(b as char);
        } else {
            form.push_str(&format!("%{b:02X}"));
        }
    }
    let mut s = std::net::TcpStream::connect(addr).expect("connect");
    write!(
        s,
        "PUT /v2/keys/_coreos.com/fleet/{key} HTTP/1.0\r\nHost: {addr}\r\n\
         Content-Type: application/x-www-form-urlencoded\r\nContent-Length: {}\r\n\r\n{form}",
        form.len()
    )
    .expect("request");
    let mut resp = String::new();
    s.read_to_string(&mut resp).expect("response");
    assert!(resp.contains(" 201 ") || resp.contains(" 200 "), "{resp}");
}

fn hash_of(text: &str) -> fleet_unit::UnitHash {
    UnitFile::parse(text).expect("parse").hash()
}

/// A fleetctl still running, its output collected as it comes.
struct Running {
    child: Child,
    stdout: Arc<Mutex<String>>,
    stderr: Arc<Mutex<String>>,
}

fn collect(mut pipe: impl Read + Send + 'static) -> Arc<Mutex<String>> {
    let buf = Arc::new(Mutex::new(String::new()));
    let sink = buf.clone();
    std::thread::spawn(move || {
        let mut chunk = [0u8; 4096];
        while let Ok(n) = pipe.read(&mut chunk) {
            if n == 0 {
                break;
            }
            sink.lock()
                .expect("lock")
                .push_str(&String::from_utf8_lossy(&chunk[..n]));
        }
    });
    buf
}

impl Running {
    /// Waits until stderr contains `text`.
    fn wait_stderr(&self, text: &str) {
        let ok = fleet_testutil::wait_for(Duration::from_secs(10), || {
            self.stderr.lock().expect("lock").contains(text)
        });
        assert!(
            ok,
            "fleetctl did not print {text:?}; stderr so far: {:?}",
            self.stderr.lock().expect("lock")
        );
    }

    /// Waits for the end, failing the test if it does not come within `limit`.
    fn finish(mut self, limit: Duration) -> Output {
        let ok = fleet_testutil::wait_for(limit, || matches!(self.child.try_wait(), Ok(Some(_))));
        if !ok {
            let _ = self.child.kill();
        }
        let status = self.child.wait().expect("wait fleetctl");
        // the pipes close with the process; let the readers drain them
        let drained =
            || Arc::strong_count(&self.stdout) == 1 && Arc::strong_count(&self.stderr) == 1;
        fleet_testutil::wait_for(Duration::from_secs(5), drained);
        let out = Output {
            code: status.code().unwrap_or(-1),
            stdout: self.stdout.lock().expect("lock").clone(),
            stderr: self.stderr.lock().expect("lock").clone(),
        };
        assert!(ok, "fleetctl did not finish within {limit:?}: {out:?}");
        out
    }
}

#[test]
fn submit_cat_and_resubmit() {
    let c = Cluster::start();
    let hello = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/hello.service"),
    )
    .expect("examples/hello.service");
    c.write("hello.service", &hello);

    c.check(&["submit"], 0, "", "No units given\n");
    c.check(
        &["submit", "hello.service"],
        0,
        "Unit hello.service inactive\n",
        "",
    );
    // the canonical text, byte for byte, by name or by short name
    c.check(&["cat", "hello.service"], 0, &hello, "");
    c.check(&["cat", "hello"], 0, &hello, "");
    c.check(
        &["list-unit-files"],
        0,
        "UNIT\t\tHASH\tDSTATE\t\tSTATE\t\tTARGET\nhello.service\te55c0ae\tinactive\tinactive\t-\n",
        "",
    );

    // identical content: nothing to do, nothing printed
    c.check(&["submit", "hello.service"], 0, "", "");
    c.check(
        &["submit", "--replace", "hello.service"],
        0,
        "Found same Unit(hello.service) in Registry, nothing to do\n",
        "",
    );

    // different content: a warning, the registry keeps its copy
    c.write("hello.service", SLEEP);
    c.check(
        &["submit", "hello.service"],
        0,
        "",
        "WARNING: Unit hello.service in registry differs from local unit file hello.service. Add --replace to override.\n",
    );
    c.check(&["cat", "hello.service"], 0, &hello, "");

    // --replace takes the new content
    c.check(
        &["submit", "--replace", "hello.service"],
        0,
        "Unit hello.service inactive\n",
        "",
    );
    c.check(&["cat", "hello.service"], 0, SLEEP, "");
    c.check(
        &["list-unit-files", "--full", "--no-legend"],
        0,
        "hello.service\t1c6fb6f3684bafb0c173d8b8b957ceff031180c1\tinactive\tinactive\t-\n",
        "",
    );

    // a unit that is loaded may not be replaced by submit
    c.check(
        &["load", "--no-block", "hello.service"],
        0,
        "Triggered unit hello.service load\n",
        "",
    );
    c.write("hello.service", &hello);
    c.check(
        &["submit", "--replace", "hello.service"],
        0,
        "",
        "Warning: can not replace Unit(hello.service) in state 'loaded', use the appropriate command\n",
    );
    // load may replace a loaded unit: the new version stays loaded, and is waited for again
    c.check(
        &["load", "--no-block", "--replace", "hello.service"],
        0,
        "Unit hello.service loaded\nTriggered unit hello.service load\n",
        "",
    );
    c.check(&["cat", "hello.service"], 0, &hello, "");
    c.check(
        &["list-unit-files", "--no-legend", "--fields=unit,dstate"],
        0,
        "hello.service\tloaded\n",
        "",
    );
}

#[test]
fn missing_units_and_templates() {
    let c = Cluster::start();
    c.check(
        &["submit", "nosuch.service"],
        1,
        "",
        "Error creating units: unable to find Unit(nosuch.service) in Registry or on filesystem\n",
    );
    c.check(
        &["start", "--no-block", "nosuch"],
        1,
        "",
        "Error creating units: unable to find Unit(nosuch.service) in Registry or on filesystem\n",
    );
    c.check(
        &["cat", "nosuch.service"],
        1,
        "",
        "Unit nosuch.service not found\n",
    );
    c.check(&["cat"], 1, "", "One unit file must be provided\n");
    c.check(
        &["cat", "a", "b"],
        1,
        "",
        "One unit file must be provided\n",
    );
    c.check(
        &["destroy", "nosuch.service"],
        0,
        "",
        "Units not found in registry\n",
    );
    c.check(
        &["stop", "nosuch.service"],
        0,
        "",
        "Units not found in registry\n",
    );
    c.check(
        &["unload", "nosuch.service"],
        0,
        "",
        "Units not found in registry\n",
    );
    c.check(
        &["submit", "foo@1.service"],
        1,
        "",
        "Error creating units: failed getting Unit(foo@1.service) from template: unable to find template Unit(foo@.service) in Registry or on filesystem\n",
    );

    // an instance from a local template, in the argument's directory
    std::fs::create_dir(c.dir.path().join("units")).expect("mkdir");
    c.write(
        "units/web@.service",
        "[Unit]\nDescription=Web %i\n\n[Service]\nExecStart=/bin/true\n",
    );
    c.check(
        &["submit", "units/web@1.service"],
        0,
        "Unit web@1.service inactive\n",
        "",
    );
    c.check(
        &["cat", "web@1"],
        0,
        "[Unit]\nDescription=Web %i\n\n[Service]\nExecStart=/bin/true\n",
        "",
    );

    // an instance from a template in the registry (no local file)
    c.check(
        &["submit", "units/web@.service"],
        0,
        "Unit web@.service inactive\n",
        "",
    );
    std::fs::remove_file(c.dir.path().join("units/web@.service")).expect("rm");
    c.check(&["submit", "web@2"], 0, "Unit web@2.service inactive\n", "");
    c.check(
        &["list-unit-files", "--fields=unit,desc"],
        0,
        "UNIT\t\tDESC\nweb@.service\tWeb %i\nweb@1.service\tWeb %i\nweb@2.service\tWeb %i\n",
        "",
    );

    // several arguments: the first unknown one stops the command, earlier ones stay created
    c.write("a.service", SLEEP);
    c.check(
        &["submit", "a.service", "y1.service", "web@3.service"],
        1,
        "Unit a.service inactive\n",
        "Error creating units: unable to find Unit(y1.service) in Registry or on filesystem\n",
    );
}

#[test]
fn list_unit_files_fields_and_formats() {
    let c = Cluster::start();
    c.write(
        "b.service",
        "[Unit]\nDescription=Bee\n\n[Service]\nExecStart=/bin/true\n",
    );
    c.write("a.service", SLEEP);
    c.write(
        "global.service",
        "[Service]\nExecStart=/bin/true\n\n[X-Fleet]\nGlobal=true\n",
    );
    c.check(
        &["submit", "b.service", "a.service", "global.service"],
        0,
        "Unit b.service inactive\nUnit a.service inactive\nUnit global.service inactive\n",
        "",
    );
    let ha = hash_of(SLEEP).short();
    let hb = hash_of("[Unit]\nDescription=Bee\n\n[Service]\nExecStart=/bin/true\n").short();
    let hg = hash_of("[Service]\nExecStart=/bin/true\n\n[X-Fleet]\nGlobal=true\n").short();
    c.check(
        &["list-unit-files"],
        0,
        &format!(
            "UNIT\t\tHASH\tDSTATE\t\tSTATE\t\tTARGET\n\
             a.service\t{ha}\tinactive\tinactive\t-\n\
             b.service\t{hb}\tinactive\tinactive\t-\n\
             global.service\t{hg}\tinactive\t-\t\tglobal\n"
        ),
        "",
    );
    c.check(
        &[
            "list-unit-files",
            "--fields=unit,global,desc",
            "--no-legend",
        ],
        0,
        "a.service\tfalse\t-\nb.service\tfalse\tBee\nglobal.service\ttrue\t-\n",
        "",
    );
    c.check(
        &["list-unit-files", "--fields=unit,tmachine"],
        0,
        "UNIT\t\tTMACHINE\na.service\t-\nb.service\t-\nglobal.service\tglobal\n",
        "WARNING: The \"tmachine\" field is deprecated. Use \"target\" instead\n",
    );
    c.check(
        &["list-unit-files", "--fields=unit,x"],
        1,
        "",
        "Invalid key in output format: \"x\"\n",
    );
    c.check(
        &["list-unit-files", "--fields="],
        1,
        "",
        "Must define output format\n",
    );
    c.check(
        &["list-units", "--fields=foo"],
        1,
        "",
        "Invalid key in output format: \"foo\"\n",
    );
    c.check(
        &["list-machines", "--fields="],
        1,
        "",
        "Must define output format\n",
    );

    let json = c.run(&["list-unit-files", "-o", "json"]);
    assert_eq!(json.code, 0, "{json:?}");
    let v: serde_json::Value = serde_json::from_str(&json.stdout).expect("json");
    assert_eq!(v[0]["name"], "a.service");
    assert_eq!(v[0]["hash"], hash_of(SLEEP).to_string());
    assert_eq!(v[1]["description"], "Bee");
    assert_eq!(v[2]["global"], true);
    assert_eq!(v[2]["desiredState"], "inactive");
    assert_eq!(v[2]["machineID"], serde_json::Value::Null);
}

#[test]
fn destroy_stop_unload_and_no_block() {
    let c = Cluster::start();
    c.write("a.service", SLEEP);
    c.write("b.service", "[Service]\nExecStart=/bin/sleep 200\n");
    c.write(
        "global.service",
        "[Service]\nExecStart=/bin/true\n\n[X-Fleet]\nGlobal=true\n",
    );
    c.check(&["submit", "a.service"], 0, "Unit a.service inactive\n", "");
    c.check(
        &["load", "--no-block", "a.service", "b"],
        0,
        "Unit b.service inactive\nTriggered unit a.service load\nTriggered unit b.service load\n",
        "",
    );
    // already loaded: nothing to trigger
    c.check(&["load", "--no-block", "a.service"], 0, "", "");
    c.check(
        &["start", "--no-block", "a.service"],
        0,
        "Triggered unit a.service start\n",
        "",
    );
    c.check(
        &["start", "global.service"],
        0,
        "Unit global.service inactive\nTriggered global unit global.service start\n",
        "",
    );
    c.check(
        &["list-unit-files", "--fields=unit,dstate,state"],
        0,
        "UNIT\t\tDSTATE\t\tSTATE\na.service\tlaunched\tinactive\nb.service\tloaded\t\tinactive\nglobal.service\tlaunched\t-\n",
        "",
    );
    // no machine has them: their current state is inactive
    c.check(
        &["stop", "a.service"],
        1,
        "",
        "Unable to stop unit a.service in state inactive\n",
    );
    c.check(
        &["stop", "global"],
        0,
        "Triggered global unit global.service stop\n",
        "Successfully stopped units [].\n",
    );
    c.check(
        &["unload", "--no-block", "a.service", "b.service", "global.service"],
        0,
        "Triggered global unit global.service unload\nTriggered unit a.service unload\nTriggered unit b.service unload\n",
        "Successfully unloaded units [a.service b.service].\n",
    );
    c.check(
        &["destroy", "a.service", "nosuch", "b"],
        0,
        "Destroyed a.service\nDestroyed b.service\n",
        "",
    );
    c.check(
        &["destroy", "a.service"],
        0,
        "",
        "Units not found in registry\n",
    );
    c.check(
        &["list-unit-files", "--no-legend", "--fields=unit"],
        0,
        "global.service\n",
        "",
    );
    c.check(
        &["destroy", "global.service", "--no-block"],
        0,
        "Destroyed global.service\n",
        "",
    );
    c.check(
        &["list-unit-files"],
        0,
        "UNIT\tHASH\tDSTATE\tSTATE\tTARGET\n",
        "",
    );
}

#[test]
fn requirements_are_validated_on_submit() {
    let c = Cluster::start();
    c.write(
        "bad.service",
        "[Service]\nExecStart=/bin/true\n\n[X-Fleet]\nGlobal=true\nMachineOf=abcd\n",
    );
    c.check(
        &["submit", "bad.service"],
        1,
        "",
        "Error creating units: unit bad.service: Global cannot be used with MachineOf\n",
    );
    c.write(
        "odd.service",
        "[Service]\nExecStart=/bin/true\n\n[X-Fleet]\nBogus=1\n",
    );
    let out = c.run(&["submit", "odd.service"]);
    assert_eq!(
        (out.code, out.stdout.as_str()),
        (0, "Unit odd.service inactive\n"),
        "{out:?}"
    );
    assert!(
        out.stderr.contains("WARN")
            && out.stderr.contains(
                "Unit odd.service: unrecognized requirement in [X-Fleet] section: \"Bogus\""
            ),
        "{out:?}"
    );
    c.write("bad name.service", SLEEP);
    c.check(
        &["submit", "bad name.service"],
        1,
        "",
        "Error creating units: invalid character ' ' in unit name\n",
    );
    c.write("garbage.service", "[Service\nExecStart=/bin/true\n");
    c.check(
        &["submit", "garbage.service"],
        1,
        "",
        "Error creating units: failed getting Unit(garbage.service) from file: unable to find end of section\n",
    );
}

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
    let reg = c.registry();
    let name = fleet_unit::UnitName::parse("hello.service").expect("name");
    let desired_launched = || {
        c.rt.block_on(async {
            reg.unit(&name)
                .await
                .ok()
                .flatten()
                .is_some_and(|u| u.desired == TargetState::Launched)
        })
    };
    use fleet_registry::Registry as _;
    assert!(
        fleet_testutil::wait_for(Duration::from_secs(10), desired_launched),
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
    let desired_loaded = || {
        c.rt.block_on(async {
            reg.unit(&name)
                .await
                .ok()
                .flatten()
                .is_some_and(|u| u.desired == TargetState::Loaded)
        })
    };
    assert!(
        fleet_testutil::wait_for(Duration::from_secs(10), desired_loaded),
        "stop did not set the desired state"
    );
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

#[test]
fn version_help_completion_and_env() {
    let c = Cluster::start();
    let version = format!("fleetctl version {}\n", env!("CARGO_PKG_VERSION"));
    c.check(&["version"], 0, &version, "");
    c.check(&["--version"], 0, &version, "");
    c.check(&["-v"], 0, &version, "");
    c.check(
        &["verify", "x.service"],
        2,
        "",
        "Command \"verify\" is deprecated, DEPRECATED - No longer works\nWARNING: The signed/verified units feature is DEPRECATED and cannot be used.\n",
    );
    c.check(
        &["submit", "--sign", "x.service"],
        2,
        "",
        "WARNING: The signed/verified units feature is DEPRECATED and cannot be used.\n",
    );

    let help = c.run(&["help"]);
    assert_eq!(help.code, 0, "{help:?}");
    for cmd in [
        "list-unit-files",
        "list-machines",
        "submit",
        "journal",
        "ssh",
        "completion",
    ] {
        assert!(
            help.stdout.contains(cmd),
            "help lacks {cmd}: {}",
            help.stdout
        );
    }
    assert!(
        !help.stdout.contains("verify"),
        "deprecated command listed: {}",
        help.stdout
    );
    let bash = c.run(&["completion", "bash"]);
    assert_eq!(bash.code, 0);
    assert!(
        bash.stdout.contains("list-unit-files") && bash.stdout.contains("--block-attempts"),
        "{}",
        bash.stdout
    );

    // prefixes of commands work, as with fleet's cobra
    c.check(&["list-m", "--no-legend"], 0, "", "");

    // the FLEETCTL_* environment instead of flags; empty variables count as unset
    c.write("a.service", SLEEP);
    let out = Command::new(env!("CARGO_BIN_EXE_fleetctl"))
        .current_dir(c.dir.path())
        .env("FLEETCTL_DRIVER", "etcd")
        .env("FLEETCTL_ENDPOINT", c.etcd.endpoint())
        .env("FLEETCTL_REQUEST_TIMEOUT", "")
        .env("FLEETCTL_TUNNEL", "")
        .args(["submit", "a.service"])
        .output()
        .expect("run");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "Unit a.service inactive\n",
        "{out:?}"
    );
    // a different key prefix is a different cluster
    c.check(
        &[
            "--etcd-key-prefix=/other/",
            "list-unit-files",
            "--no-legend",
        ],
        0,
        "",
        "",
    );
    c.check(
        &["list-unit-files", "--no-legend", "--fields=unit"],
        0,
        "a.service\n",
        "",
    );
    c.check(
        &["--driver=zk", "list-units"],
        1,
        "",
        "Unable to initialize client: unrecognized driver \"zk\"\n",
    );
}

#[test]
fn api_driver_answers_like_the_etcd_driver() {
    let c = Cluster::start();
    let endpoint = c.serve_api();
    c.add_machine(M1, "172.17.8.103", &[("role", "web")]);
    c.write("hello.service", HELLO);
    let api = |args: &[&str]| {
        let out = c
            .bare_command()
            .arg(format!("--endpoint={endpoint}"))
            .args(args)
            .output()
            .expect("run");
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let same = |args: &[&str]| {
        let via_etcd = c.run(args);
        assert_eq!(
            api(args),
            (via_etcd.code, via_etcd.stdout, via_etcd.stderr),
            "fleetctl {args:?}"
        );
    };
    assert_eq!(
        api(&["submit", "hello.service"]),
        (
            0,
            "Unit hello.service inactive\n".to_string(),
            String::new()
        )
    );
    same(&["cat", "hello.service"]);
    same(&["cat", "nosuch.service"]);
    same(&["list-unit-files"]);
    same(&[
        "list-unit-files",
        "--full",
        "--fields=unit,hash,desc,global",
    ]);
    same(&["list-machines", "-l"]);
    same(&["submit", "hello.service"]);
    same(&["submit", "nosuch.service"]);
    assert_eq!(
        api(&["start", "--no-block", "hello"]),
        (
            0,
            "Triggered unit hello.service start\n".to_string(),
            String::new()
        )
    );
    same(&["list-unit-files", "--fields=unit,dstate,state"]);
    c.publish(
        "hello.service",
        M1,
        &hash_of(HELLO).to_string(),
        "active",
        "running",
        TargetState::Launched,
    );
    same(&["list-units"]);
    assert_eq!(
        api(&["destroy", "hello"]),
        (0, "Destroyed hello.service\n".to_string(), String::new())
    );
    same(&["list-unit-files"]);
    // nothing listening: fleet's advice names the socket
    let out = c
        .bare_command()
        .args(["--endpoint=unix:///nonexistent/fleet.sock", "list-units"])
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stdout).is_empty());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.starts_with("Error retrieving list of units from repository: "),
        "{stderr}"
    );
}

#[test]
fn remote_commands_check_units_first() {
    let c = Cluster::start();
    c.write("a.service", SLEEP);
    c.write(
        "g.service",
        "[Service]\nExecStart=/bin/true\n\n[X-Fleet]\nGlobal=true\n",
    );
    c.check(
        &["submit", "a.service", "g.service"],
        0,
        "Unit a.service inactive\nUnit g.service inactive\n",
        "",
    );
    c.check(
        &["status", "nosuch"],
        1,
        "",
        "Unit nosuch.service does not exist.\n",
    );
    c.check(
        &["status", "a.service"],
        1,
        "",
        "Unit a.service does not appear to be loaded.\n",
    );
    c.check(&["journal"], 1, "", "One unit file must be provided.\n");
    c.check(
        &["journal", "nosuch"],
        1,
        "",
        "Unit nosuch.service does not exist.\n",
    );
    c.check(
        &["journal", "g.service"],
        1,
        "",
        "Unable to retrieve journal of global unit g.service.\n",
    );
    c.check(
        &["journal", "a.service"],
        1,
        "",
        "Unit a.service does not appear to be running.\n",
    );
    c.check(
        &["ssh", "-m", "x", "-u", "y"],
        1,
        "",
        "Both machine and unit flags provided, please specify only one.\n",
    );
    c.check(
        &["ssh"],
        1,
        "",
        "Unable to proceed: one machine or unit must be provided\n",
    );
    c.check(
        &["ssh", "nothing"],
        1,
        "",
        "Unable to proceed: could not find matching unit or machine\n",
    );
    c.check(
        &["ssh", "--machine=zz"],
        1,
        "",
        "Unable to proceed: machine does not exist\n",
    );
    c.check(
        &["ssh", "--unit=g"],
        1,
        "",
        "Unable to proceed: global units unsupported\n",
    );
    c.check(
        &["ssh", "--unit=a"],
        1,
        "",
        "Could not determine address of machine.\n",
    );
    c.add_machine(M1, "", &[]);
    c.add_machine(M2, "5.6.7.8", &[]);
    c.check(
        &["ssh", "--machine=113f"],
        1,
        "",
        "Could not determine address of machine.\n",
    );
    c.add_machine("113fabcd", "1.2.3.4", &[]);
    c.check(
        &["ssh", "--machine=113f"],
        1,
        "",
        "Unable to proceed: found more than one machine\n",
    );
    c.check(&["fd-forward"], 1, "", "Provide a single argument\n");
    c.check(&["restart"], 0, "", "No units given\n");
    c.check(
        &["restart", "a.service"],
        0,
        "",
        "Unable to restart unit a.service in state inactive\n",
    );
}

/// A private sshd on 127.0.0.1 that accepts one generated key (for `ssh` and `--tunnel`).
struct Sshd {
    child: Child,
    port: u16,
    key: std::path::PathBuf,
}

impl Sshd {
    fn start(dir: &Path) -> Sshd {
        let keygen = |name: &str| {
            let path = dir.join(name);
            let ok = Command::new("ssh-keygen")
                .args(["-q", "-t", "ed25519", "-N", "", "-C", name, "-f"])
                .arg(&path)
                .status()
                .expect("ssh-keygen");
            assert!(ok.success(), "ssh-keygen failed");
            path
        };
        let host_key = keygen("host_key");
        let key = keygen("client_key");
        std::fs::copy(dir.join("client_key.pub"), dir.join("authorized_keys"))
            .expect("authorized_keys");
        std::fs::create_dir_all("/run/sshd").expect("/run/sshd");
        let port = fleet_testutil::free_port();
        let config = dir.join("sshd_config");
        std::fs::write(
            &config,
            format!(
                "Port {port}\nListenAddress 127.0.0.1\nHostKey {}\nPidFile {}\nAuthorizedKeysFile {}\n\
                 StrictModes no\nUsePAM no\nPasswordAuthentication no\nKbdInteractiveAuthentication no\n\
                 PermitRootLogin prohibit-password\nAllowTcpForwarding yes\nAllowStreamLocalForwarding yes\n\
                 PrintMotd no\n",
                host_key.display(),
                dir.join("sshd.pid").display(),
                dir.join("authorized_keys").display(),
            ),
        )
        .expect("sshd_config");
        let child = Command::new("/usr/sbin/sshd")
            .args(["-D", "-e", "-f"])
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start sshd");
        let up = fleet_testutil::wait_for(Duration::from_secs(10), || {
            std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
        });
        assert!(up, "sshd did not listen on port {port}");
        Sshd { child, port, key }
    }
}

impl Drop for Sshd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn ssh_and_tunnels_through_a_real_sshd() {
    let c = Cluster::start();
    let ssh_dir = tempfile::tempdir().expect("tempdir");
    let sshd = Sshd::start(ssh_dir.path());
    let user = String::from_utf8(Command::new("id").arg("-un").output().expect("id").stdout)
        .expect("utf8");
    let ssh_flags = [
        format!("--identity-file={}", sshd.key.display()),
        "--strict-host-key-checking=false".to_string(),
        format!("--ssh-username={}", user.trim()),
    ];
    let run = |extra: &[&str]| {
        let mut args: Vec<&str> = ssh_flags.iter().map(String::as_str).collect();
        args.extend_from_slice(extra);
        c.run(&args)
    };
    c.add_machine(M1, "127.0.0.1", &[("ssh", "yes")]);
    c.write("a.service", SLEEP);
    c.check(&["submit", "a.service"], 0, "Unit a.service inactive\n", "");
    let engine = c.engine();
    c.apply(
        &engine,
        &[EngineOp::Schedule {
            unit: "a.service".into(),
            machine: M1.into(),
            hash: hash_of(SLEEP),
            desired: TargetState::Inactive,
        }],
    );
    let port = format!("--ssh-port={}", sshd.port);

    // a command on a machine found by ID prefix, by unit, and through a tunnel
    let out = run(&["ssh", &port, "113f16", "echo", "hello"]);
    assert_eq!((out.code, out.stdout.as_str()), (0, "hello\n"), "{out:?}");
    let out = run(&["ssh", &port, "--unit=a", "--", "sh", "-c", "'exit 3'"]);
    assert_eq!(out.code, 3, "{out:?}");
    let tunnel = format!("--tunnel=127.0.0.1:{}", sshd.port);
    let out = run(&[&tunnel, "ssh", &port, "--machine", M1, "echo", "via tunnel"]);
    assert_eq!(
        (out.code, out.stdout.as_str()),
        (0, "via tunnel\n"),
        "{out:?}"
    );

    // the etcd driver through the tunnel
    let out = run(&[&tunnel, "list-machines", "--no-legend"]);
    assert_eq!(
        (out.code, out.stdout.as_str(), out.stderr.as_str()),
        (0, "113f16a7...\t127.0.0.1\tssh=yes\n", "")
    );

    // the API driver through the tunnel, to the API's unix socket
    let endpoint = c.serve_api();
    let mut cmd = c.bare_command();
    cmd.args(&ssh_flags).args([
        &tunnel,
        &format!("--endpoint={endpoint}"),
        "list-unit-files",
        "--fields=unit,target",
    ]);
    let out = cmd.output().expect("run");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "UNIT\t\tTARGET\na.service\t113f16a7.../127.0.0.1\n",
        "{out:?}"
    );

    // a tunnel nobody answers: fleet's prefix
    let dead = format!("--tunnel=127.0.0.1:{}", fleet_testutil::free_port());
    let out = run(&[&dead, "list-units"]);
    assert_eq!(out.code, 1, "{out:?}");
    assert!(
        out.stderr
            .starts_with("Unable to initialize client: failed initializing SSH client"),
        "{out:?}"
    );
}

/// The socket inodes a process holds (`socket:[N]` links under `/proc/<pid>/fd`).
fn socket_inodes(pid: u32) -> Vec<String> {
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return Vec::new();
    };
    dir.filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .filter_map(|l| {
            let l = l.to_string_lossy().into_owned();
            Some(l.strip_prefix("socket:[")?.strip_suffix(']')?.to_string())
        })
        .collect()
}

/// `(state, inode)` of every TCP socket in the process's network namespace (`0A` = LISTEN).
fn tcp_sockets(pid: u32) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for table in ["tcp", "tcp6"] {
        let text = std::fs::read_to_string(format!("/proc/{pid}/net/{table}")).unwrap_or_default();
        for line in text.lines().skip(1) {
            let cols: Vec<&str> = line.split_whitespace().collect();
            if cols.len() > 9 {
                out.push((cols[3].to_string(), cols[9].to_string()));
            }
        }
    }
    out
}

/// Inodes of listening unix sockets in the process's network namespace.
fn unix_listeners(pid: u32) -> Vec<String> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/net/unix")).unwrap_or_default();
    text.lines()
        .skip(1)
        .filter_map(|line| {
            let cols: Vec<&str> = line.split_whitespace().collect();
            // Flags `00010000` is __SO_ACCEPTCON: a listening socket
            (cols.len() > 6 && cols[3] == "00010000").then(|| cols[6].to_string())
        })
        .collect()
}

#[test]
fn tunnelled_etcd_driver_opens_no_listener() {
    let c = Cluster::start();
    let ssh_dir = tempfile::tempdir().expect("tempdir");
    let sshd = Sshd::start(ssh_dir.path());
    let user = String::from_utf8(Command::new("id").arg("-un").output().expect("id").stdout)
        .expect("utf8");
    c.add_machine(M1, "127.0.0.1", &[]);
    c.write("hello.service", HELLO);
    let key = format!("--identity-file={}", sshd.key.display());
    let username = format!("--ssh-username={}", user.trim());
    let tunnel = format!("--tunnel=127.0.0.1:{}", sshd.port);
    // a blocking start: fleetctl stays connected (through the tunnel) while nothing runs it
    let mut child = c.spawn(&[
        &key,
        "--strict-host-key-checking=false",
        &username,
        &tunnel,
        "start",
        "--block-attempts=100",
        "hello.service",
    ]);
    let reg = c.registry();
    let name = fleet_unit::UnitName::parse("hello.service").expect("name");
    use fleet_registry::Registry as _;
    let written = fleet_testutil::wait_for(Duration::from_secs(20), || {
        c.rt.block_on(async {
            reg.unit(&name)
                .await
                .ok()
                .flatten()
                .is_some_and(|u| u.desired == TargetState::Launched)
        })
    });
    assert!(
        written,
        "start through the tunnel did not reach etcd; stderr: {:?}",
        child.stderr.lock().expect("lock")
    );
    let pid = child.child.id();
    let mine = socket_inodes(pid);
    let tcp = tcp_sockets(pid);
    let unix = unix_listeners(pid);
    let _ = child.child.kill();
    let _ = child.child.wait();
    let owned: Vec<&(String, String)> = tcp.iter().filter(|(_, i)| mine.contains(i)).collect();
    // the SSH connection itself is seen (so the check can see fleetctl's sockets at all) ...
    assert!(
        owned.iter().any(|(st, _)| st == "01"),
        "no established TCP socket of fleetctl found: {owned:?}"
    );
    // ... and nothing fleetctl holds is listening
    assert!(
        !owned.iter().any(|(st, _)| st == "0A"),
        "fleetctl listens on TCP while tunnelling to etcd: {owned:?}"
    );
    assert!(
        !unix.iter().any(|i| mine.contains(i)),
        "fleetctl listens on a unix socket while tunnelling to etcd"
    );
}

/// Many units in one invocation: fleetctl works on many at once, yet prints in argument
/// order, stops at the first bad argument after reporting the ones before it, and handles a
/// unit named twice once. Through the etcd driver and through the API alike.
#[test]
fn many_units_are_reported_in_argument_order() {
    let c = Cluster::start();
    let api = c.serve_api();
    for driver in ["etcd", "api"] {
        let name = |i: usize| format!("{driver}-{i:02}.service");
        let names: Vec<String> = (1..=80).map(name).collect();
        for n in &names {
            c.write(n, SLEEP);
        }
        let bad = format!("{driver}-bad.service");
        c.write(
            &bad,
            "[Service]\nExecStart=/bin/true\n\n[X-Fleet]\nGlobal=true\nMachineOf=abcd\n",
        );
        let run = |args: &[&str]| -> Output {
            let flags = if driver == "etcd" {
                vec![
                    "--driver=etcd".to_string(),
                    format!("--endpoint={}", c.etcd.endpoint()),
                ]
            } else {
                vec![format!("--endpoint={api}")]
            };
            let out = c
                .bare_command()
                .args(flags)
                .args(args)
                .output()
                .expect("run fleetctl");
            Output {
                code: out.status.code().unwrap_or(-1),
                stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
                stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
            }
        };
        let inactive = |ns: &[String]| -> String {
            ns.iter().map(|n| format!("Unit {n} inactive\n")).collect()
        };

        // the bad unit in the middle: the 40 before it are created and reported, in order
        let mut args = vec!["start", "--no-block"];
        args.extend(names[..40].iter().map(String::as_str));
        args.push(&bad);
        args.extend(names[40..].iter().map(String::as_str));
        let out = run(&args);
        assert_eq!(
            (out.code, out.stdout.clone(), out.stderr.as_str()),
            (
                1,
                inactive(&names[..40]),
                format!("Error creating units: unit {bad}: Global cannot be used with MachineOf\n")
                    .as_str()
            ),
            "{driver}: {out:?}"
        );

        // again without it (and one unit named twice): the rest created, all started, in order
        let mut args = vec!["start", "--no-block"];
        args.extend(names.iter().map(String::as_str));
        args.push(&names[3]);
        let out = run(&args);
        let triggered: String = names
            .iter()
            .map(|n| format!("Triggered unit {n} start\n"))
            .collect();
        assert_eq!(
            (out.code, out.stdout.clone(), out.stderr.as_str()),
            (0, inactive(&names[40..]) + &triggered, ""),
            "{driver}: {out:?}"
        );
        let out = run(&["list-unit-files", "--no-legend", "--fields=unit,dstate"]);
        let want: String = names.iter().map(|n| format!("{n}\tlaunched\n")).collect();
        let ours: String = out
            .stdout
            .lines()
            .filter(|l| l.starts_with(&format!("{driver}-")))
            .map(|l| format!("{l}\n"))
            .collect();
        assert_eq!(ours, want, "{driver}: {out:?}");
    }
}

/// Arguments that depend on an earlier one of the same command: a unit named twice is
/// created once, and an instance finds the template created just before it (both drivers).
#[test]
fn arguments_see_the_units_created_before_them() {
    let c = Cluster::start();
    let api = c.serve_api();
    std::fs::create_dir_all(c.dir.path().join("sub")).expect("mkdir");
    for (driver, flags) in [
        (
            "etcd",
            vec![
                "--driver=etcd".to_string(),
                format!("--endpoint={}", c.etcd.endpoint()),
            ],
        ),
        ("api", vec![format!("--endpoint={api}")]),
    ] {
        let run = |args: &[&str]| {
            let out = c
                .bare_command()
                .args(&flags)
                .args(args)
                .output()
                .expect("run");
            (
                out.status.code().unwrap_or(-1),
                String::from_utf8_lossy(&out.stdout).into_owned(),
                String::from_utf8_lossy(&out.stderr).into_owned(),
            )
        };
        let dup = format!("dup-{driver}.service");
        c.write(&dup, SLEEP);
        assert_eq!(
            run(&["submit", &dup, &dup]),
            (0, format!("Unit {dup} inactive\n"), String::new()),
            "{driver}"
        );
        let x = format!("x-{driver}.service");
        let (tmpl, inst) = (
            format!("t{driver}@.service"),
            format!("t{driver}@1.service"),
        );
        c.write(&x, SLEEP);
        c.write(&format!("sub/{tmpl}"), SLEEP);
        let tmpl_path = format!("sub/{tmpl}");
        assert_eq!(
            run(&["submit", &x, &tmpl_path, &inst]),
            (
                0,
                format!("Unit {x} inactive\nUnit {tmpl} inactive\nUnit {inst} inactive\n"),
                String::new()
            ),
            "{driver}"
        );
    }
}

/// `start --replace` of a running unit writes the new version over the old one in one step,
/// keeping its desired state and its machine: the unit is never destroyed or inactive in
/// between (fleet's fleetctl made it inactive first, and it could land elsewhere), through
/// either driver.
#[test]
fn start_replace_keeps_the_unit_where_it_runs() {
    let c = Cluster::start();
    let api = c.serve_api();
    c.add_machine(M1, "172.17.8.103", &[]);
    let engine = c.engine();
    let reg = c.registry();
    for driver in ["etcd", "api"] {
        let unit = format!("{driver}.service");
        let name = fleet_unit::UnitName::parse(&unit).expect("name");
        c.rt.block_on(fleet_registry::Registry::create_unit(
            &reg,
            &name,
            &UnitFile::parse(SLEEP).expect("unit"),
            TargetState::Launched,
        ))
        .expect("create");
        c.apply(
            &engine,
            &[EngineOp::Schedule {
                unit: unit.clone(),
                machine: M1.into(),
                hash: hash_of(SLEEP),
                desired: TargetState::Launched,
            }],
        );
        let key = reg.keys().unit(&unit);
        let created = |c: &Cluster| {
            let mut kv = reg.client().kv_client();
            let got = c.rt.block_on(kv.get(key.as_str(), None)).expect("get");
            got.kvs().first().map(|kv| kv.create_revision())
        };
        let before = created(&c);
        assert!(before.is_some());
        c.write(&unit, HELLO);
        let endpoint = if driver == "etcd" {
            vec![
                "--driver=etcd".to_string(),
                format!("--endpoint={}", c.etcd.endpoint()),
            ]
        } else {
            vec![format!("--endpoint={api}")]
        };
        let out = c
            .bare_command()
            .args(&endpoint)
            .args(["start", "--no-block", "--replace", unit.as_str()])
            .output()
            .expect("run");
        assert_eq!(
            (
                out.status.code(),
                String::from_utf8_lossy(&out.stdout).into_owned(),
                String::from_utf8_lossy(&out.stderr).into_owned()
            ),
            (
                Some(0),
                format!("Unit {unit} launched\nTriggered unit {unit} start\n"),
                String::new()
            ),
            "{driver}"
        );
        assert_eq!(
            created(&c),
            before,
            "{driver}: the unit's key was never deleted"
        );
        let view =
            c.rt.block_on(fleet_registry::Registry::unit(&reg, &name))
                .expect("read")
                .expect("exists");
        assert_eq!(view.hash, hash_of(HELLO), "{driver}");
        assert_eq!(view.desired, TargetState::Launched, "{driver}");
        assert_eq!(view.machine_id.as_deref(), Some(M1), "{driver}");
    }
}

/// fleet's deprecated `--etcd-cafile`, `--etcd-certfile` and `--etcd-keyfile` set the same TLS
/// files as `--ca-file` and friends, for the API driver too: a CA file that cannot be read
/// stops an https endpoint before anything is sent.
#[test]
fn deprecated_tls_flags_reach_the_api_driver() {
    let c = Cluster::start();
    let port = fleet_testutil::free_port();
    for flag in ["--etcd-cafile", "--ca-file"] {
        let out = c
            .bare_command()
            .args([
                "--driver=api",
                &format!("--endpoint=https://127.0.0.1:{port}"),
                &format!("{flag}=/nonexistent/ca.pem"),
                "list-machines",
            ])
            .output()
            .expect("run");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{flag}: {stderr}");
        assert!(
            stderr.contains("/nonexistent/ca.pem"),
            "{flag}: the CA file was not used: {stderr}"
        );
    }
}

#[test]
fn import_v1_says_what_it_could_not_import() {
    let c = Cluster::start_with(&["--enable-v2=true"]);
    let ep = c.etcd.endpoint().to_string();
    c.check(
        &["import-v1"],
        1,
        "",
        &format!("no fleet v1.0 registry under /_coreos.com/fleet/ at {ep}\n"),
    );
    c.check(
        &["import-v1", "--v1-endpoint=https://127.0.0.1:1"],
        1,
        "",
        "cannot read fleet v1.0's registry: https://127.0.0.1:1: only http endpoints are supported for fleet v1.0's registry\n",
    );
    // one unit as fleet v1.0 wrote it, and one whose object is damaged
    let file = UnitFile::parse(SLEEP).expect("unit");
    let bytes: Vec<String> = file.hash().as_bytes().iter().map(u8::to_string).collect();
    let raw = serde_json::json!({ "Raw": SLEEP }).to_string();
    v2_put(&ep, &format!("unit/{}", file.hash()), &raw);
    v2_put(
        &ep,
        "job/sleep.service/object",
        &format!(
            r#"{{"Name":"sleep.service","UnitHash":[{}]}}"#,
            bytes.join(",")
        ),
    );
    v2_put(&ep, "job/sleep.service/target-state", "launched");
    v2_put(&ep, "job/sleep.service/target", M1);
    v2_put(&ep, "job/broken.service/object", "{");
    // the first endpoint that answers is used
    let endpoints = format!("--v1-endpoint=http://127.0.0.1:1,{ep}");
    c.check(
        &["import-v1", &endpoints],
        1,
        &format!("imported sleep.service (launched on {M1})\nimported: 1, already there: 0, skipped: 1, errors: 0\n"),
        "skipped job/broken.service/object: not a fleet v1.0 job record: EOF while parsing an object at line 1 column 1\n\
         not everything was imported: fix or remove the records named above, then run import-v1 again\n",
    );
    c.check(
        &[
            "list-unit-files",
            "--no-legend",
            "--fields=unit,dstate,target",
        ],
        0,
        &format!("sleep.service\tlaunched\t{}...\n", &M1[..8]),
        "",
    );
    c.check(
        &["import-v1", "--dry-run", "--v1-endpoint", &ep],
        1,
        "already there: sleep.service\nwould import: 0, already there: 1, skipped: 1, errors: 0\n",
        "skipped job/broken.service/object: not a fleet v1.0 job record: EOF while parsing an object at line 1 column 1\n\
         not everything was imported: fix or remove the records named above, then run import-v1 again\n",
    );
}
