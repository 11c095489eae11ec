//! What every CLI test uses: a private etcd with a scratch directory, fleetd's records written
//! as its agent and engine would, and fleetctl run to the end or left running.

use std::io::Read;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use fleet_registry::{EngineOp, EtcdRegistry, Leadership, LeaseKeeper, MachineRecord, StateRecord};
use fleet_testutil::{EtcdServer, fixture, records};
use fleet_unit::{TargetState, UnitFile};

pub const HELLO: &str = "[Unit]\nDescription=Hello World\n\n[Service]\nExecStart=/bin/bash -c \"while true; do echo \\\"Hello, world\\\"; sleep 1; done\"\n";
pub const SLEEP: &str = "[Service]\nExecStart=/bin/sleep 100\n";
pub const M1: &str = "113f16a7c2f84bd2ae9e6cf77b9fb2d5";
pub const M2: &str = "c31e44e1f858436e933e59c642517860";

/// A private etcd, a scratch directory for unit files, and a runtime for simulating fleetd.
pub struct Cluster {
    pub etcd: EtcdServer,
    pub dir: tempfile::TempDir,
    pub rt: tokio::runtime::Runtime,
    pub leases: Mutex<Vec<LeaseKeeper>>,
}

#[derive(Debug)]
pub struct Output {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Output {
    /// Runs `cmd` to the end.
    fn of(mut cmd: Command) -> Output {
        let out = cmd.output().expect("run fleetctl");
        Output {
            code: out.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

    /// (exit status, stdout, stderr), to compare in one assertion.
    pub fn parts(self) -> (i32, String, String) {
        (self.code, self.stdout, self.stderr)
    }
}

impl Cluster {
    pub fn start() -> Cluster {
        Cluster::start_with(&[])
    }

    /// With extra etcd arguments (`--enable-v2=true` for fleet v1.0's registry).
    pub fn start_with(etcd_args: &[&str]) -> Cluster {
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

    pub fn write(&self, name: &str, text: &str) {
        std::fs::write(self.dir.path().join(name), text).expect("write unit file");
    }

    /// fleetctl with a clean environment, in the scratch directory, talking to etcd.
    pub fn command(&self, args: &[&str]) -> Command {
        let mut cmd = self.bare_command();
        cmd.arg("--driver=etcd")
            .arg(format!("--endpoint={}", self.etcd.endpoint()))
            .args(args);
        cmd
    }

    pub fn bare_command(&self) -> Command {
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
    pub fn serve_api(&self) -> String {
        self.serve_api_counted(fleet_api::Metrics::new())
    }

    /// [`Cluster::serve_api`], counting the requests it answers in `metrics`.
    pub fn serve_api_counted(&self, metrics: fleet_api::Metrics) -> String {
        let config = fleet_api::ApiConfig {
            metrics,
            ..fleet_api::ApiConfig::default()
        };
        self.serve_api_of(Arc::new(self.registry()), config)
    }

    /// [`Cluster::serve_api`] answering a unit's PUT as fleet v1.0's fleetd did: it ignores
    /// `If-None-Match: *` and does not say that it honours it.
    pub fn serve_api_like_fleet_v1(&self) -> String {
        let config = fleet_api::ApiConfig {
            ignore_create_only: true,
            ..fleet_api::ApiConfig::default()
        };
        self.serve_api_of(Arc::new(self.registry()), config)
    }

    /// [`Cluster::serve_api`] whose creation of the unit `name` fails (the API answers 500).
    pub fn serve_api_failing_create(&self, name: &str) -> String {
        let registry = FailingCreate {
            inner: self.registry(),
            name: name.to_string(),
        };
        self.serve_api_of(Arc::new(registry), fleet_api::ApiConfig::default())
    }

    /// Serves `registry` through fleet's HTTP API on a unix socket; returns its endpoint.
    fn serve_api_of(
        &self,
        registry: Arc<dyn fleet_registry::Registry>,
        config: fleet_api::ApiConfig,
    ) -> String {
        let path = self.dir.path().join("fleet.sock");
        self.rt.block_on(async {
            let listener = fleet_api::bind_unix(&path).expect("bind API socket");
            tokio::spawn(fleet_api::serve(
                vec![listener],
                registry,
                config,
                std::future::pending::<()>(),
            ));
        });
        format!("unix://{}", path.display())
    }

    pub fn run(&self, args: &[&str]) -> Output {
        Output::of(self.command(args))
    }

    /// The flags that point fleetctl at this cluster through `driver`: `etcd`, or the API
    /// at `api` (what [`Cluster::serve_api`] returned).
    pub fn driver_flags(&self, driver: &str, api: &str) -> Vec<String> {
        if driver == "etcd" {
            vec![
                "--driver=etcd".to_string(),
                format!("--endpoint={}", self.etcd.endpoint()),
            ]
        } else {
            vec![format!("--endpoint={api}")]
        }
    }

    /// fleetctl run to the end with `flags` (a driver of the caller's choice), then `args`.
    pub fn run_with(&self, flags: &[String], args: &[&str]) -> Output {
        let mut cmd = self.bare_command();
        cmd.args(flags).args(args);
        Output::of(cmd)
    }

    /// Waits up to `timeout` for `unit`'s desired state in etcd to be `want`.
    pub fn wait_desired(&self, unit: &str, want: TargetState, timeout: Duration) -> bool {
        use fleet_registry::Registry as _;
        let reg = self.registry();
        let name = fleet_unit::UnitName::parse(unit).expect("name");
        fleet_testutil::wait_for(timeout, || {
            self.rt.block_on(async {
                reg.unit(&name)
                    .await
                    .ok()
                    .flatten()
                    .is_some_and(|u| u.desired == want)
            })
        })
    }

    /// Runs fleetctl and checks exit status, stdout and stderr exactly.
    pub fn check(&self, args: &[&str], code: i32, stdout: &str, stderr: &str) {
        let out = self.run(args);
        assert_eq!(
            (out.code, out.stdout.as_str(), out.stderr.as_str()),
            (code, stdout, stderr),
            "fleetctl {args:?}"
        );
    }

    pub fn spawn(&self, args: &[&str]) -> Running {
        let mut child = self
            .command(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn fleetctl");
        let stdout = fleet_testutil::collect_output(child.stdout.take().expect("stdout"));
        let stderr = fleet_testutil::collect_output(child.stderr.take().expect("stderr"));
        Running {
            child,
            stdout,
            stderr,
        }
    }

    pub fn registry(&self) -> EtcdRegistry {
        self.rt.block_on(fixture::connect(
            &self.etcd,
            fleet_registry::DEFAULT_KEY_PREFIX,
            Duration::from_secs(3),
        ))
    }

    /// Registers a machine as an agent does (kept alive while the cluster lives).
    pub fn add_machine(&self, id: &str, ip: &str, metadata: &[(&str, &str)]) {
        let lease = self.register(&machine(id, ip, metadata, "1.0.0"));
        self.leases.lock().expect("lock").push(lease);
    }

    pub fn register(&self, rec: &MachineRecord) -> LeaseKeeper {
        let reg = self.registry();
        self.rt
            .block_on(reg.register_machine(rec, Duration::from_secs(60)))
            .expect("register")
    }

    /// Publishes that `unit` still runs (launched) on `machine`, which cannot change it:
    /// `reason`, as an agent does.
    pub fn publish_reason(&self, unit: &str, machine: &str, hash: &str, reason: &str) {
        let reg = self.registry();
        let rec = StateRecord {
            active_state: "active".to_string(),
            sub_state: "running".to_string(),
            agent_state: TargetState::Launched,
            reason: Some(reason.to_string()),
            ..records::state(unit, machine, hash)
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

    /// Publishes a unit state as the agent of `machine` does.
    pub fn publish(
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
            active_state: active.to_string(),
            sub_state: sub.to_string(),
            agent_state: agent,
            ..records::state(unit, machine, hash)
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
    pub fn engine(&self) -> (EtcdRegistry, Leadership) {
        let reg = self.registry();
        let lead = self
            .rt
            .block_on(reg.campaign("test-engine", Duration::from_secs(60)))
            .expect("campaign")
            .expect("leadership");
        (reg, lead)
    }

    pub fn apply(&self, engine: &(EtcdRegistry, Leadership), ops: &[EngineOp]) {
        self.rt
            .block_on(engine.0.apply(&engine.1, ops))
            .expect("engine write");
    }
}

pub fn machine(id: &str, ip: &str, metadata: &[(&str, &str)], version: &str) -> MachineRecord {
    MachineRecord {
        public_ip: ip.to_string(),
        metadata: metadata
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        agent_version: version.to_string(),
        ..records::machine(id)
    }
}

/// Writes a key of fleet v1.0's registry through etcd's v2 API, as fleet v1.0 did (`PUT`,
/// form field `value`).
pub fn v2_put(endpoint: &str, key: &str, value: &str) {
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

pub fn hash_of(text: &str) -> fleet_unit::UnitHash {
    UnitFile::parse(text).expect("parse").hash()
}

/// A fleetctl still running, its output collected as it comes.
pub struct Running {
    pub child: Child,
    pub stdout: Arc<Mutex<String>>,
    pub stderr: Arc<Mutex<String>>,
}

impl Running {
    /// Waits until stderr contains `text`.
    pub fn wait_stderr(&self, text: &str) {
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
    pub fn finish(mut self, limit: Duration) -> Output {
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

/// The cluster's registry, but creating one unit fails as etcd failing would.
struct FailingCreate {
    inner: EtcdRegistry,
    name: String,
}

#[async_trait::async_trait]
impl fleet_registry::Registry for FailingCreate {
    async fn create_unit(
        &self,
        name: &fleet_unit::UnitName,
        file: &UnitFile,
        desired: TargetState,
    ) -> fleet_registry::Result<()> {
        if name.as_str() == self.name {
            return Err(fleet_registry::RegistryError::Unreachable {
                op: "create",
                key: name.to_string(),
            });
        }
        self.inner.create_unit(name, file, desired).await
    }
    async fn replace_unit(
        &self,
        name: &fleet_unit::UnitName,
        file: &UnitFile,
        desired: TargetState,
    ) -> fleet_registry::Result<()> {
        self.inner.replace_unit(name, file, desired).await
    }
    async fn set_desired_state(
        &self,
        name: &fleet_unit::UnitName,
        desired: TargetState,
    ) -> fleet_registry::Result<()> {
        self.inner.set_desired_state(name, desired).await
    }
    async fn destroy_unit(&self, name: &fleet_unit::UnitName) -> fleet_registry::Result<bool> {
        self.inner.destroy_unit(name).await
    }
    async fn unit(
        &self,
        name: &fleet_unit::UnitName,
    ) -> fleet_registry::Result<Option<fleet_registry::UnitView>> {
        self.inner.unit(name).await
    }
    async fn units(&self) -> fleet_registry::Result<Vec<fleet_registry::UnitView>> {
        self.inner.units().await
    }
    async fn machines(&self) -> fleet_registry::Result<Vec<fleet_registry::MachineView>> {
        self.inner.machines().await
    }
    async fn unit_states(&self) -> fleet_registry::Result<Vec<StateRecord>> {
        self.inner.unit_states().await
    }
    async fn set_machine_metadata(
        &self,
        machine: &str,
        key: &str,
        value: Option<&str>,
    ) -> fleet_registry::Result<()> {
        self.inner.set_machine_metadata(machine, key, value).await
    }
}
