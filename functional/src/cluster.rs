//! A booted test cluster (etcd + N systemd nodes running fleetd), driven through the shell
//! harness in `functional/harness/`, which stays the one implementation of every operation.

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, SystemTime};

use crate::command::{Output, run, run_with_input};
use crate::lock::ClusterLock;
use crate::{Error, wait_for};

/// How long fleet.service may take to become active after a node booted.
const FLEETD_ACTIVE_TIMEOUT: Duration = Duration::from_secs(30);
/// Set to 1 to leave a cluster running when its [`Cluster`] is dropped (for debugging).
const KEEP_ENV: &str = "FLEET_FUNCTIONAL_KEEP";
/// Directory holding the fleetd and fleetctl to test, instead of the debug build.
const BIN_DIR_ENV: &str = "FLEET_BIN_DIR";
/// Parent of every cluster's state and lock file (FH_ROOT of functional/harness/lib.sh).
const HARNESS_ROOT: &str = "/var/lib/fleet-fh";

/// What cluster to boot. Start from [`ClusterSpec::new`] and add what the test needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterSpec {
    /// Cluster name: 1-8 characters of `[a-z0-9]`, starting with a letter. Every host
    /// resource (bridge `<name>0`, netns `<name>-nI`, state, cgroups) derives from it, so
    /// clusters of different names can exist at once. Use a name per test.
    pub name: String,
    /// Number of nodes, 1..=200.
    pub nodes: usize,
    /// fleet metadata per node (1-based), e.g. `"region=us-east,az=1"`.
    pub metadata: BTreeMap<usize, String>,
    /// Extra lines for every node's `/etc/fleet/fleet.conf`, e.g. `"agent_ttl=3s"`.
    pub fleet_config: Vec<String>,
    /// Environment of fleet.service on every node (a drop-in), e.g. `FLEET_VERBOSITY=2`.
    pub fleet_env: Vec<(String, String)>,
    /// When set, fleet.socket also listens on this TCP port (the HTTP API on the node IP).
    pub fleet_tcp_port: Option<u16>,
    /// Directory with fleetd and fleetctl; default: `$FLEET_BIN_DIR`, else the debug build.
    pub bin_dir: Option<PathBuf>,
    /// Whether the harness installs fleet in the nodes (true by default). Without it
    /// ([`ClusterSpec::without_fleet`]) nodes have no fleet units, fleet.conf, binaries or
    /// fleetctl, and `up` does not wait for fleet.service: the test installs fleet itself.
    pub install_fleet: bool,
    /// First three octets of the cluster's /24 subnet, e.g. `"172.20.5"`. Default: derived
    /// from the name (172.18.0.0/16 for the cluster called "fleet").
    pub net: Option<String>,
    /// Extra arguments of the cluster's etcd (e.g. `--enable-v2=true`, which fleet v1.0's
    /// fleetd needs when a benchmark runs it in the nodes).
    pub etcd_args: String,
    /// etcd members: 1 (one etcd on the bridge address, the default) or an etcd cluster of
    /// 3 or 5 (up to 7), each member in its own network namespace at `<net>.(1+K)`, which
    /// [`Cluster::etcd_kill`], [`Cluster::etcd_freeze`] and [`Cluster::etcd_isolate`]
    /// act on. fleetd in the nodes is given every member.
    pub etcd_members: usize,
    /// How long each node may take to boot.
    pub boot_timeout: Duration,
    /// How long one command (exec, fleetctl, ssh, a node operation) may take.
    pub command_timeout: Duration,
    /// How long to wait while another process (another test run) holds a cluster of the
    /// same name.
    pub lock_timeout: Duration,
}

impl ClusterSpec {
    /// A cluster called `name` with `nodes` nodes and default settings.
    pub fn new(name: &str, nodes: usize) -> ClusterSpec {
        ClusterSpec {
            name: name.to_string(),
            nodes,
            metadata: BTreeMap::new(),
            fleet_config: Vec::new(),
            fleet_env: Vec::new(),
            fleet_tcp_port: None,
            bin_dir: None,
            install_fleet: true,
            net: None,
            etcd_args: String::new(),
            etcd_members: 1,
            boot_timeout: Duration::from_secs(120),
            command_timeout: Duration::from_secs(120),
            lock_timeout: Duration::from_secs(30 * 60),
        }
    }

    /// Sets the fleet metadata of one node (1-based).
    pub fn metadata(mut self, node: usize, metadata: &str) -> ClusterSpec {
        self.metadata.insert(node, metadata.to_string());
        self
    }

    /// Adds a line to every node's fleet.conf.
    pub fn fleet_config(mut self, line: &str) -> ClusterSpec {
        self.fleet_config.push(line.to_string());
        self
    }

    /// Adds an environment variable to fleet.service on every node.
    pub fn fleet_env(mut self, key: &str, value: &str) -> ClusterSpec {
        self.fleet_env.push((key.to_string(), value.to_string()));
        self
    }

    /// Makes fleet.socket listen on a TCP port as well.
    pub fn fleet_tcp_port(mut self, port: u16) -> ClusterSpec {
        self.fleet_tcp_port = Some(port);
        self
    }

    /// Extra arguments for the cluster's etcd.
    pub fn etcd_args(mut self, args: &str) -> ClusterSpec {
        self.etcd_args = args.to_string();
        self
    }

    /// Runs an etcd cluster of `members` members instead of one etcd.
    pub fn etcd_members(mut self, members: usize) -> ClusterSpec {
        self.etcd_members = members;
        self
    }

    /// Uses fleetd and fleetctl from `dir`.
    pub fn bin_dir(mut self, dir: impl Into<PathBuf>) -> ClusterSpec {
        self.bin_dir = Some(dir.into());
        self
    }

    /// Nodes without the harness's fleet (see [`ClusterSpec::install_fleet`]), for tests
    /// that install it another way, such as the Debian package.
    pub fn without_fleet(mut self) -> ClusterSpec {
        self.install_fleet = false;
        self
    }

    fn validate(&self) -> Result<(), Error> {
        let bad = |reason: String| {
            Err(Error::Spec {
                cluster: self.name.clone(),
                reason,
            })
        };
        let name_ok = self.name.len() <= 8
            && self.name.starts_with(|c: char| c.is_ascii_lowercase())
            && self
                .name
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit());
        if !name_ok {
            return bad(
                "the name must be 1-8 characters of [a-z0-9], starting with a letter".into(),
            );
        }
        if !(1..=200).contains(&self.nodes) {
            return bad(format!("{} nodes; want 1..=200", self.nodes));
        }
        if !(1..=7).contains(&self.etcd_members) {
            return bad(format!("{} etcd members; want 1..=7", self.etcd_members));
        }
        if let Some(n) = self.metadata.keys().find(|&&n| n == 0 || n > self.nodes) {
            return bad(format!("metadata for node {n} of {}", self.nodes));
        }
        for (key, value) in &self.fleet_env {
            let key_ok = !key.is_empty()
                && !key.starts_with(|c: char| c.is_ascii_digit())
                && key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
            if !key_ok {
                return bad(format!("environment name {key:?}"));
            }
            if value.contains(['"', '\\', '\n']) {
                return bad(format!(
                    "environment value {value:?} (no quotes, backslashes or newlines)"
                ));
            }
        }
        let fleet_settings = !self.metadata.is_empty()
            || !self.fleet_config.is_empty()
            || !self.fleet_env.is_empty()
            || self.fleet_tcp_port.is_some();
        if !self.install_fleet && fleet_settings {
            return bad("fleet settings for nodes without the harness's fleet".into());
        }
        let lines = self.fleet_config.iter().chain(self.metadata.values());
        if let Some(l) = lines.into_iter().find(|l| l.contains('\n')) {
            return bad(format!("{l:?} spans lines"));
        }
        if let Some(net) = &self.net {
            let octets: Vec<_> = net.split('.').map(str::parse::<u8>).collect();
            if octets.len() != 3 || octets.iter().any(Result::is_err) {
                return bad(format!(
                    "net {net:?}; want the first three octets, like 172.20.5"
                ));
            }
        }
        Ok(())
    }

    /// The environment the harness scripts read (see functional/harness/lib.sh).
    fn harness_env(&self, bin_dir: &Path) -> Vec<(String, String)> {
        let mut env = vec![
            ("FH_CLUSTER".to_string(), self.name.clone()),
            ("FH_ROOT".to_string(), HARNESS_ROOT.to_string()),
            // this process holds the cluster's lock (see crate::lock)
            ("FH_LOCK_HELD".to_string(), "1".to_string()),
            ("FH_BIN_DIR".to_string(), bin_dir.display().to_string()),
            (
                "FH_BOOT_TIMEOUT".to_string(),
                self.boot_timeout.as_secs().max(1).to_string(),
            ),
            ("FH_FLEET_CONF".to_string(), self.fleet_config.join("\n")),
            ("FH_ETCD_ARGS".to_string(), self.etcd_args.clone()),
            ("FH_ETCD_MEMBERS".to_string(), self.etcd_members.to_string()),
            (
                "FH_INSTALL_FLEET".to_string(),
                u8::from(self.install_fleet).to_string(),
            ),
            (
                "FH_FLEET_ENV".to_string(),
                self.fleet_env
                    .iter()
                    .map(|(k, v)| format!("{k}={v}"))
                    .collect::<Vec<_>>()
                    .join("\n"),
            ),
        ];
        for (node, md) in &self.metadata {
            env.push((format!("FH_METADATA_{node}"), md.clone()));
        }
        if let Some(port) = self.fleet_tcp_port {
            env.push(("FH_FLEET_TCP_PORT".to_string(), port.to_string()));
        }
        if let Some(net) = &self.net {
            env.push(("FH_NET".to_string(), net.clone()));
        }
        env
    }
}

/// Who an etcd member is cut off from ([`Cluster::etcd_isolate`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EtcdPeer {
    /// Another etcd member (1-based).
    Member(usize),
    /// A node (1-based): its fleetd cannot reach this member any more.
    Node(usize),
}

impl EtcdPeer {
    fn arg(&self) -> String {
        match self {
            EtcdPeer::Member(k) => format!("e{k}"),
            EtcdPeer::Node(i) => format!("n{i}"),
        }
    }
}

#[derive(Debug)]
struct Node {
    ip: String,
    machine_id: String,
}

/// A running cluster. Dropping it tears it down (unless `FLEET_FUNCTIONAL_KEEP=1`), so a
/// failing test leaves nothing behind; if the test panicked, each node's fleet.service
/// journal is printed first.
#[derive(Debug)]
pub struct Cluster {
    spec: ClusterSpec,
    bin_dir: PathBuf,
    env: Vec<(String, String)>,
    etcd_endpoint: String,
    etcd_endpoints: Vec<String>,
    bridge_ip: String,
    nodes: Vec<Node>,
    torn_down: bool,
    /// Held while the cluster lives; released (and its file removed) once it is torn down.
    lock: Option<ClusterLock>,
}

impl Cluster {
    /// Boots the cluster and waits until every node runs systemd and fleet.service is
    /// active. Leftovers of an earlier cluster of the same name (a crashed test) are
    /// removed first.
    pub fn up(spec: ClusterSpec) -> Result<Cluster, Error> {
        spec.validate()?;
        if !is_root() {
            return Err(Error::NotRoot);
        }
        let bin_dir = match &spec.bin_dir {
            Some(d) => d.clone(),
            None => default_bin_dir()?,
        };
        for name in ["fleetd", "fleetctl"] {
            if spec.install_fleet && !bin_dir.join(name).is_file() {
                return Err(Error::MissingBinary {
                    name,
                    dir: bin_dir.clone(),
                });
            }
        }
        if spec.install_fleet {
            warn_if_stale(&bin_dir);
        }
        let lock = ClusterLock::acquire(Path::new(HARNESS_ROOT), &spec.name, spec.lock_timeout)?;
        let env = spec.harness_env(&bin_dir);
        // From here on, dropping `cluster` (an error below) tears down what was booted.
        let mut cluster = Cluster {
            spec,
            bin_dir,
            env,
            etcd_endpoint: String::new(),
            etcd_endpoints: Vec::new(),
            bridge_ip: String::new(),
            nodes: Vec::new(),
            torn_down: false,
            lock: Some(lock),
        };
        let n = cluster.spec.nodes.to_string();
        let boot = cluster.spec.boot_timeout + Duration::from_secs(60);
        cluster.script("up.sh", &[&n], boot)?.ok("harness up.sh")?;
        let info = cluster.info()?;
        let field = |key: &str| {
            info.get(key).cloned().ok_or_else(|| Error::Harness {
                what: "node.sh info".into(),
                detail: format!("no {key}="),
            })
        };
        cluster.etcd_endpoint = field("etcd_endpoint")?;
        cluster.etcd_endpoints = field("etcd_endpoints")?
            .split(',')
            .map(str::to_string)
            .collect();
        cluster.bridge_ip = field("bridge_ip")?;
        let state = PathBuf::from(field("state")?);
        for i in 1..=cluster.spec.nodes {
            let read = |file: &str| {
                let path = state.join(format!("node{i}")).join(file);
                fs::read_to_string(&path)
                    .map(|s| s.trim().to_string())
                    .map_err(|e| Error::Harness {
                        what: format!("node{i} state"),
                        detail: format!("{}: {e}", path.display()),
                    })
            };
            cluster.nodes.push(Node {
                ip: read("ip")?,
                machine_id: read("machine-id")?,
            });
        }
        for i in cluster.nodes().filter(|_| cluster.spec.install_fleet) {
            wait_for(
                &format!("fleet.service active on node{i}"),
                FLEETD_ACTIVE_TIMEOUT,
                || {
                    let out = cluster.exec(i, &["systemctl", "is-active", "fleet.service"])?;
                    match out.trimmed() {
                        "active" => Ok(()),
                        other => Err(Error::Harness {
                            what: "systemctl is-active fleet.service".into(),
                            detail: other.to_string(),
                        }),
                    }
                },
            )?;
        }
        Ok(cluster)
    }

    /// The cluster's name.
    pub fn name(&self) -> &str {
        &self.spec.name
    }

    /// Node numbers, `1..=n`.
    pub fn nodes(&self) -> std::ops::RangeInclusive<usize> {
        1..=self.nodes.len()
    }

    /// The node's IP address on the cluster bridge.
    ///
    /// # Panics
    /// When `node` is not in the cluster (a bug in the test).
    pub fn ip(&self, node: usize) -> &str {
        &self.node(node).ip
    }

    /// The node's machine ID (32 hex characters), as written into it before its first boot.
    ///
    /// # Panics
    /// When `node` is not in the cluster (a bug in the test).
    pub fn machine_id(&self, node: usize) -> &str {
        &self.node(node).machine_id
    }

    /// The client URL of the cluster's etcd, e.g. `http://172.18.0.1:2379`.
    pub fn etcd_endpoint(&self) -> &str {
        &self.etcd_endpoint
    }

    /// The host's address on the cluster bridge.
    pub fn bridge_ip(&self) -> &str {
        &self.bridge_ip
    }

    /// The directory whose fleetd and fleetctl the nodes run (at /opt/fleet/bin).
    pub fn bin_dir(&self) -> &Path {
        &self.bin_dir
    }

    /// Runs a command inside a node (all its namespaces, a clean environment).
    pub fn exec(&self, node: usize, args: &[&str]) -> Result<Output, Error> {
        self.check(node)?;
        self.script(
            "node.sh",
            &node_args("exec", node, args),
            self.spec.command_timeout,
        )
    }

    /// Runs fleetctl inside a node, where it talks to the local fleetd over its socket.
    pub fn fleetctl(&self, node: usize, args: &[&str]) -> Result<Output, Error> {
        let mut a = vec!["fleetctl"];
        a.extend_from_slice(args);
        self.exec(node, &a)
    }

    /// Runs fleetctl on the host against the cluster's etcd (`--driver=etcd --endpoint=...`).
    pub fn fleetctl_host(&self, args: &[&str]) -> Result<Output, Error> {
        let mut cmd = Command::new(self.bin_dir.join("fleetctl"));
        cmd.arg("--driver=etcd")
            .arg(format!("--endpoint={}", self.etcd_endpoint))
            .args(args);
        run(
            &mut cmd,
            &format!("fleetctl {}", args.join(" ")),
            self.spec.command_timeout,
        )
    }

    /// Runs the fleetctl the nodes run, on the host, with exactly `args` (no driver or
    /// endpoint added), `env` added to its environment and `input`, when given, on its
    /// stdin (else stdin is /dev/null).
    pub fn fleetctl_host_with(
        &self,
        args: &[&str],
        env: &[(&str, &str)],
        input: Option<&str>,
    ) -> Result<Output, Error> {
        let mut cmd = Command::new(self.bin_dir.join("fleetctl"));
        cmd.args(args).envs(env.iter().copied());
        run_with_input(
            &mut cmd,
            input.map(str::as_bytes),
            &format!("fleetctl {}", args.join(" ")),
            self.spec.command_timeout,
        )
    }

    /// The private key that logs in as root on every node (the harness's, no passphrase).
    pub fn ssh_key(&self) -> Result<PathBuf, Error> {
        self.info_path("ssh_key")
    }

    /// The harness's known-hosts file: one line per node with the node's current host key.
    pub fn ssh_known_hosts(&self) -> Result<PathBuf, Error> {
        self.info_path("known_hosts")
    }

    /// Runs a shell command in a node over ssh, as root with the harness key.
    pub fn ssh(&self, node: usize, command: &str) -> Result<Output, Error> {
        self.check(node)?;
        self.script(
            "node.sh",
            &node_args("ssh", node, &[command]),
            self.spec.command_timeout,
        )
    }

    /// The node's journal (read from the host, so it works when the node is down), with
    /// extra journalctl arguments such as `["-u", "fleet.service"]`.
    pub fn journal(&self, node: usize, args: &[&str]) -> Result<String, Error> {
        self.check(node)?;
        Ok(self
            .script(
                "node.sh",
                &node_args("journal", node, args),
                self.spec.command_timeout,
            )?
            .ok(&format!("journal of node{node}"))?
            .stdout)
    }

    /// fleet.service's main PID inside the node (in the node's PID namespace), if running.
    pub fn fleetd_pid(&self, node: usize) -> Result<Option<u32>, Error> {
        let out = self
            .exec(
                node,
                &[
                    "systemctl",
                    "show",
                    "--property=MainPID",
                    "--value",
                    "fleet.service",
                ],
            )?
            .ok(&format!("systemctl show fleet.service on node{node}"))?;
        let pid: u32 = out.trimmed().parse().map_err(|_| Error::Harness {
            what: format!("MainPID of fleet.service on node{node}"),
            detail: out.stdout.clone(),
        })?;
        Ok((pid != 0).then_some(pid))
    }

    /// `systemctl stop fleet.service` in the node (fleet.socket stays listening).
    pub fn stop_fleetd(&self, node: usize) -> Result<(), Error> {
        self.node_op("fleetd-stop", node)
    }

    /// `systemctl start fleet.service` in the node.
    pub fn start_fleetd(&self, node: usize) -> Result<(), Error> {
        self.node_op("fleetd-start", node)
    }

    /// `systemctl restart fleet.service` in the node.
    pub fn restart_fleetd(&self, node: usize) -> Result<(), Error> {
        self.node_op("fleetd-restart", node)
    }

    /// SIGKILL to fleet.service's main process; systemd restarts it after 1 s.
    pub fn kill_fleetd(&self, node: usize) -> Result<(), Error> {
        self.node_op("fleetd-kill", node)
    }

    /// Graceful stop of a node (its systemd halts); it keeps its files and identity.
    pub fn stop_node(&self, node: usize) -> Result<(), Error> {
        self.node_op("stop", node)
    }

    /// Boots a stopped node again and waits until its systemd runs.
    pub fn start_node(&self, node: usize) -> Result<(), Error> {
        self.node_op("start", node)
    }

    /// Stops and boots a node.
    pub fn restart_node(&self, node: usize) -> Result<(), Error> {
        self.node_op("restart", node)
    }

    /// Kills every process of a node at once (a crash or power cut).
    pub fn kill_node(&self, node: usize) -> Result<(), Error> {
        self.node_op("kill", node)
    }

    /// `systemctl poweroff` inside the node; returns once it is gone.
    pub fn poweroff_node(&self, node: usize) -> Result<(), Error> {
        self.node_op("poweroff", node)
    }

    /// Cuts the node off the bridge (its packets are silently dropped).
    pub fn partition(&self, node: usize) -> Result<(), Error> {
        self.node_op("partition", node)
    }

    /// Undoes [`Cluster::partition`].
    pub fn heal(&self, node: usize) -> Result<(), Error> {
        self.node_op("heal", node)
    }

    /// Freezes every process of the node (a hung machine). Commands run inside a frozen
    /// node hang until [`Cluster::thaw`]: use the host side to observe it.
    pub fn freeze(&self, node: usize) -> Result<(), Error> {
        self.node_op("freeze", node)
    }

    /// Undoes [`Cluster::freeze`].
    pub fn thaw(&self, node: usize) -> Result<(), Error> {
        self.node_op("thaw", node)
    }

    /// Makes the node's connections to etcd fail at once (TCP reset), everything else works.
    pub fn block_etcd(&self, node: usize) -> Result<(), Error> {
        self.node_op("block-etcd", node)
    }

    /// Undoes [`Cluster::block_etcd`].
    pub fn unblock_etcd(&self, node: usize) -> Result<(), Error> {
        self.node_op("unblock-etcd", node)
    }

    /// Every etcd client endpoint (one per member), in member order; fleetd's etcd_servers.
    pub fn etcd_endpoints(&self) -> &[String] {
        &self.etcd_endpoints
    }

    /// SIGKILLs etcd member `member` (1-based; an etcd cluster only). Its data survives.
    pub fn etcd_kill(&self, member: usize) -> Result<(), Error> {
        self.member_op("etcd-kill", member, &[])
    }

    /// Starts a killed member again and waits until it is healthy (it has a leader).
    pub fn etcd_start(&self, member: usize) -> Result<(), Error> {
        self.member_op("etcd-start", member, &[])
    }

    /// SIGSTOPs a member: a hung etcd whose sockets stay open.
    pub fn etcd_freeze(&self, member: usize) -> Result<(), Error> {
        self.member_op("etcd-freeze", member, &[])
    }

    /// Undoes [`Cluster::etcd_freeze`].
    pub fn etcd_thaw(&self, member: usize) -> Result<(), Error> {
        self.member_op("etcd-thaw", member, &[])
    }

    /// Drops all traffic between a member and the given peers; no peers: every other
    /// member (the member is a minority of one).
    pub fn etcd_isolate(&self, member: usize, from: &[EtcdPeer]) -> Result<(), Error> {
        let from: Vec<String> = from.iter().map(EtcdPeer::arg).collect();
        let from: Vec<&str> = from.iter().map(String::as_str).collect();
        self.member_op("etcd-isolate", member, &from)
    }

    /// Undoes every [`Cluster::etcd_isolate`] of a member.
    pub fn etcd_heal(&self, member: usize) -> Result<(), Error> {
        self.member_op("etcd-heal", member, &[])
    }

    /// The member that leads the etcd cluster now; `None` while there is no leader.
    pub fn etcd_leader(&self) -> Result<Option<usize>, Error> {
        let out = self.script("node.sh", &["etcd-leader"], self.spec.command_timeout)?;
        if !out.success() {
            return Ok(None);
        }
        out.trimmed().parse().map(Some).map_err(|_| Error::Harness {
            what: "node.sh etcd-leader".into(),
            detail: out.trimmed().to_string(),
        })
    }

    fn member_op(&self, op: &str, member: usize, args: &[&str]) -> Result<(), Error> {
        if self.spec.etcd_members < 2 || member == 0 || member > self.spec.etcd_members {
            return Err(Error::Spec {
                cluster: self.spec.name.clone(),
                reason: format!(
                    "{op}: no etcd member {member} (the cluster has {} member(s); \
                     set ClusterSpec::etcd_members)",
                    self.spec.etcd_members
                ),
            });
        }
        let member = member.to_string();
        let mut all = vec![op, member.as_str()];
        all.extend_from_slice(args);
        self.script("node.sh", &all, self.spec.command_timeout)?
            .ok(&format!("{op} {member} of cluster {}", self.spec.name))
            .map(drop)
    }

    /// Tears the cluster down: nodes, etcd, mounts, namespaces, links, cgroups, state.
    pub fn down(mut self) -> Result<(), Error> {
        self.torn_down = true;
        let result = self
            .script::<&str>("down.sh", &[], Duration::from_secs(120))
            .and_then(|o| o.ok(&format!("harness down.sh of cluster {}", self.spec.name)));
        if let Some(lock) = self.lock.take() {
            lock.release();
        }
        result.map(drop)
    }

    fn info(&self) -> Result<HashMap<String, String>, Error> {
        let out = self
            .script("node.sh", &["info"], self.spec.command_timeout)?
            .ok("harness node.sh info")?;
        Ok(out
            .stdout
            .lines()
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect())
    }

    fn info_path(&self, key: &str) -> Result<PathBuf, Error> {
        self.info()?
            .remove(key)
            .map(PathBuf::from)
            .ok_or_else(|| Error::Harness {
                what: "node.sh info".into(),
                detail: format!("no {key}="),
            })
    }

    fn node_op(&self, op: &str, node: usize) -> Result<(), Error> {
        self.check(node)?;
        self.script(
            "node.sh",
            &node_args(op, node, &[]),
            self.spec.command_timeout,
        )?
        .ok(&format!("{op} node{node} of cluster {}", self.spec.name))
        .map(drop)
    }

    fn script<S: AsRef<str>>(
        &self,
        script: &str,
        args: &[S],
        timeout: Duration,
    ) -> Result<Output, Error> {
        let mut cmd = harness_command(script, &self.env);
        let args: Vec<&str> = args.iter().map(AsRef::as_ref).collect();
        cmd.args(&args);
        let what = format!("{script} {} (cluster {})", args.join(" "), self.spec.name);
        run(&mut cmd, &what, timeout)
    }

    fn check(&self, node: usize) -> Result<(), Error> {
        if node == 0 || node > self.nodes.len() {
            return Err(Error::NoSuchNode {
                cluster: self.spec.name.clone(),
                node,
                nodes: self.nodes.len(),
            });
        }
        Ok(())
    }

    fn node(&self, node: usize) -> &Node {
        match self.check(node) {
            Ok(()) => &self.nodes[node - 1],
            Err(e) => panic!("{e}"),
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if self.torn_down {
            return;
        }
        if std::thread::panicking() {
            for i in self.nodes() {
                match self.journal(i, &["-u", "fleet.service", "-n", "80"]) {
                    Ok(j) => eprintln!("--- node{i} ({}) fleet.service journal:\n{j}", self.ip(i)),
                    Err(e) => eprintln!("--- node{i}: no journal: {e}"),
                }
            }
        }
        if std::env::var(KEEP_ENV).is_ok_and(|v| v == "1") {
            eprintln!(
                "{KEEP_ENV}=1: cluster {} left running; remove it with \
                 FH_CLUSTER={} {}/down.sh",
                self.spec.name,
                self.spec.name,
                harness_dir().display()
            );
            return;
        }
        self.torn_down = true;
        match self.script::<&str>("down.sh", &[], Duration::from_secs(120)) {
            Ok(out) if out.success() => {}
            Ok(out) => eprintln!("tearing down cluster {} failed: {out}", self.spec.name),
            Err(e) => eprintln!("tearing down cluster {} failed: {e}", self.spec.name),
        }
        if let Some(lock) = self.lock.take() {
            lock.release();
        }
    }
}

/// The shell harness's directory (`functional/harness`).
pub fn harness_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("harness")
}

/// Does this process run as root (what the harness needs)?
pub fn is_root() -> bool {
    fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0)
}

/// What cluster `name` left on this host (mounts, netns, links, cgroups, processes, state,
/// bound etcd ports), one description each; empty when nothing.
pub fn leftovers(name: &str) -> Result<Vec<String>, Error> {
    let env = [
        ("FH_CLUSTER".to_string(), name.to_string()),
        ("FH_ROOT".to_string(), HARNESS_ROOT.to_string()),
    ];
    let mut cmd = harness_command("node.sh", &env);
    cmd.arg("leftovers");
    let out = run(&mut cmd, "node.sh leftovers", Duration::from_secs(60))?;
    match out.code {
        Some(0) | Some(1) => Ok(out.stdout.lines().map(str::to_string).collect()),
        _ => Err(out
            .ok("harness node.sh leftovers")
            .err()
            .unwrap_or_else(|| Error::Harness {
                what: "node.sh leftovers".into(),
                detail: "unexpected exit".into(),
            })),
    }
}

/// `bash <harness>/<script>` with no inherited FH_* settings, only `env`.
fn harness_command(script: &str, env: &[(String, String)]) -> Command {
    let mut cmd = Command::new("bash");
    cmd.arg(harness_dir().join(script));
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("FH_") {
            cmd.env_remove(k);
        }
    }
    cmd.envs(env.iter().map(|(k, v)| (k, v)));
    cmd
}

/// `[op, node, rest...]`, the arguments of `node.sh`.
fn node_args(op: &str, node: usize, rest: &[&str]) -> Vec<String> {
    let mut v = vec![op.to_string(), node.to_string()];
    v.extend(rest.iter().map(|s| s.to_string()));
    v
}

/// Where the binaries under test are: `$FLEET_BIN_DIR`, else the cargo profile directory
/// this test executable was built in (`target/debug/deps/<test>` → `target/debug`), where
/// `cargo build -p fleetd -p fleetctl` put them.
pub fn default_bin_dir() -> Result<PathBuf, Error> {
    if let Some(dir) = std::env::var_os(BIN_DIR_ENV) {
        return Ok(PathBuf::from(dir));
    }
    let exe = std::env::current_exe().map_err(|source| Error::Spawn {
        what: "current_exe (to find the debug binaries)".into(),
        source,
    })?;
    let mut dir = exe.parent().map(Path::to_path_buf).unwrap_or_default();
    if dir.file_name().is_some_and(|n| n == "deps") {
        dir.pop();
    }
    Ok(dir)
}

/// Warns (does not fail: others may be editing while a suite runs) when a source file is
/// newer than the fleetd about to be tested.
fn warn_if_stale(bin_dir: &Path) {
    let Ok(built) = fs::metadata(bin_dir.join("fleetd")).and_then(|m| m.modified()) else {
        return;
    };
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    let root = manifest.parent().unwrap_or(manifest);
    let mut newest: Option<(SystemTime, PathBuf)> = None;
    let mut dirs = vec![
        root.join("fleetd/src"),
        root.join("fleetctl/src"),
        root.join("crates"),
    ];
    while let Some(dir) = dirs.pop() {
        let Ok(entries) = fs::read_dir(&dir) else {
            continue;
        };
        for e in entries.flatten() {
            let path = e.path();
            let Ok(meta) = e.metadata() else { continue };
            if meta.is_dir() {
                if path.file_name().is_some_and(|n| n != "target") {
                    dirs.push(path);
                }
                continue;
            }
            let is_rs = path.extension().is_some_and(|x| x == "rs");
            match meta.modified() {
                Ok(t) if is_rs && newest.as_ref().is_none_or(|(n, _)| t > *n) => {
                    newest = Some((t, path));
                }
                _ => {}
            }
        }
    }
    match newest {
        Some((t, path)) if t > built => eprintln!(
            "warning: {} is newer than {}: the cluster runs an old build \
             (cargo build -p fleetd -p fleetctl)",
            path.display(),
            bin_dir.join("fleetd").display()
        ),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(spec: ClusterSpec, want_err: Option<&str>) {
        let got = spec.validate();
        match (got, want_err) {
            (Ok(()), None) => {}
            (Err(e), Some(w)) => assert!(e.to_string().contains(w), "{e} lacks {w:?}"),
            (got, want) => panic!("{spec:?}: got {got:?}, want error {want:?}"),
        }
    }

    #[test]
    fn spec_validation() {
        let s = |name: &str, n| ClusterSpec::new(name, n);
        let cases: Vec<(ClusterSpec, Option<&str>)> = vec![
            (s("fleet", 3), None),
            (s("t1", 1), None),
            (s("abcdefgh", 200), None),
            (s("abcdefghi", 1), Some("1-8 characters")),
            (s("", 1), Some("1-8 characters")),
            (s("1abc", 1), Some("1-8 characters")),
            (s("Fleet", 1), Some("1-8 characters")),
            (s("a-b", 1), Some("1-8 characters")),
            (s("fleet", 0), Some("0 nodes")),
            (s("fleet", 201), Some("201 nodes")),
            (
                s("fleet", 2).metadata(3, "a=b"),
                Some("metadata for node 3"),
            ),
            (
                s("fleet", 2).metadata(0, "a=b"),
                Some("metadata for node 0"),
            ),
            (s("fleet", 2).metadata(2, "a=b,c=d"), None),
            (s("fleet", 1).fleet_env("FLEET_VERBOSITY", "2"), None),
            (s("fleet", 1).fleet_env("9X", "2"), Some("environment name")),
            (
                s("fleet", 1).fleet_env("A B", "2"),
                Some("environment name"),
            ),
            (
                s("fleet", 1).fleet_env("A", "say \"hi\""),
                Some("environment value"),
            ),
            (s("fleet", 1).fleet_config("a=1\nb=2"), Some("spans lines")),
            (s("pkg", 2).without_fleet(), None),
            (
                s("pkg", 2).without_fleet().fleet_config("agent_ttl=3s"),
                Some("without the harness's fleet"),
            ),
            (
                s("pkg", 2).without_fleet().metadata(1, "a=b"),
                Some("without the harness's fleet"),
            ),
            (
                ClusterSpec {
                    net: Some("172.30.1".into()),
                    ..s("x", 1)
                },
                None,
            ),
            (
                ClusterSpec {
                    net: Some("172.300.1".into()),
                    ..s("x", 1)
                },
                Some("net"),
            ),
            (
                ClusterSpec {
                    net: Some("10.1".into()),
                    ..s("x", 1)
                },
                Some("net"),
            ),
        ];
        for (spec, want) in cases {
            check(spec, want);
        }
    }

    #[test]
    fn harness_env_carries_the_spec() {
        let spec = ClusterSpec::new("abc", 2)
            .metadata(2, "region=east")
            .fleet_config("agent_ttl=3s")
            .fleet_config("etcd_key_prefix=/x")
            .fleet_env("FLEET_VERBOSITY", "2")
            .fleet_tcp_port(54728);
        let env: HashMap<_, _> = spec.harness_env(Path::new("/b")).into_iter().collect();
        let get = |k: &str| env.get(k).map(String::as_str);
        assert_eq!(get("FH_CLUSTER"), Some("abc"));
        assert_eq!(get("FH_BIN_DIR"), Some("/b"));
        assert_eq!(get("FH_INSTALL_FLEET"), Some("1"));
        assert_eq!(get("FH_METADATA_2"), Some("region=east"));
        assert_eq!(get("FH_METADATA_1"), None);
        assert_eq!(
            get("FH_FLEET_CONF"),
            Some("agent_ttl=3s\netcd_key_prefix=/x")
        );
        assert_eq!(get("FH_FLEET_ENV"), Some("FLEET_VERBOSITY=2"));
        assert_eq!(get("FH_FLEET_TCP_PORT"), Some("54728"));
        assert_eq!(get("FH_NET"), None);
        let bare = ClusterSpec::new("pkg", 2).without_fleet();
        let env: HashMap<_, _> = bare.harness_env(Path::new("/b")).into_iter().collect();
        assert_eq!(env.get("FH_INSTALL_FLEET").map(String::as_str), Some("0"));
    }
}
