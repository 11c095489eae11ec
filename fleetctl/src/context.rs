//! What every command works with: the global flags, the cluster (connected on first use,
//! through the API or etcd driver, optionally through an SSH tunnel) and a per-invocation
//! cache of the machine list (fleet's `cachedMachineState`).

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, anyhow, bail};
use fleet_registry::{EtcdConfig, EtcdRegistry, MachineView, Registry};
use fleet_ssh::{Session, SshConfig};
use tokio::sync::{Mutex, OnceCell};

use crate::cli::{DEFAULT_ENDPOINT, DEFAULT_ETCD_ENDPOINTS, GlobalArgs};
use crate::error::Failure;
use crate::tunnel::{self, Target};

/// The two ways fleetctl reaches a cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Driver {
    /// fleet's HTTP API (fleetd's socket), fleet's default.
    Api,
    /// etcd itself.
    Etcd,
}

/// The state shared by the commands of one invocation.
pub struct Ctx {
    pub global: GlobalArgs,
    registry: OnceCell<Arc<dyn Registry>>,
    tunnel: OnceCell<Arc<Session>>,
    machines: Mutex<Option<HashMap<String, MachineView>>>,
    /// Units this invocation created, as they were when created: the next step of the same
    /// command (setting their target state) needs not read them back.
    created: std::sync::Mutex<HashMap<String, fleet_registry::UnitView>>,
    /// Units this invocation replaced (`--replace`): they keep their desired state, yet the
    /// command still waits for them to reach its own, as fleet's did.
    replaced: std::sync::Mutex<std::collections::HashSet<String>>,
}

impl Ctx {
    pub fn new(global: GlobalArgs) -> Ctx {
        Ctx {
            global,
            registry: OnceCell::new(),
            tunnel: OnceCell::new(),
            machines: Mutex::new(None),
            created: std::sync::Mutex::default(),
            replaced: std::sync::Mutex::default(),
        }
    }

    /// Remembers a unit this invocation has just replaced.
    pub fn note_replaced(&self, name: &str) {
        let mut replaced = self.replaced.lock().unwrap_or_else(|p| p.into_inner());
        replaced.insert(name.to_string());
    }

    /// Whether this invocation replaced the unit.
    pub fn was_replaced(&self, name: &str) -> bool {
        let replaced = self.replaced.lock().unwrap_or_else(|p| p.into_inner());
        replaced.contains(name)
    }

    /// Forgets the cached machine list (machines came or went: `--watch`).
    pub async fn forget_machines(&self) {
        *self.machines.lock().await = None;
    }

    /// Remembers a unit this invocation has just created.
    pub fn note_created(&self, unit: fleet_registry::UnitView) {
        let mut created = self.created.lock().unwrap_or_else(|p| p.into_inner());
        created.insert(unit.name.to_string(), unit);
    }

    /// A unit this invocation created (and forgets it: it is only good for one step).
    pub fn take_created(&self, name: &str) -> Option<fleet_registry::UnitView> {
        let mut created = self.created.lock().unwrap_or_else(|p| p.into_inner());
        created.remove(name)
    }

    /// The cluster, connected on first use. Failing to connect is fleet's
    /// `Unable to initialize client: ...` (exit 1).
    pub async fn registry(&self) -> Result<Arc<dyn Registry>, Failure> {
        self.registry
            .get_or_try_init(|| self.connect())
            .await
            .cloned()
            .map_err(|e| Failure::msg(format!("Unable to initialize client: {e:#}")))
    }

    /// A direct etcd connection, whatever `--driver` says (`import-v1` writes records only
    /// etcd's own driver can write). No `--tunnel`: the v2 reads are plain HTTP.
    pub async fn etcd(&self) -> anyhow::Result<EtcdRegistry> {
        let g = &self.global;
        if g.tunnel.is_some() {
            bail!("--tunnel is not supported by this command; run it where etcd can be reached");
        }
        let timeout = Duration::try_from_secs_f64(g.request_timeout)
            .map_err(|_| anyhow!("invalid --request-timeout {}", g.request_timeout))?;
        Ok(EtcdRegistry::connect(&etcd_config(g, timeout)).await?)
    }

    /// The etcd endpoints `etcd` connects to, in the order given.
    pub fn etcd_endpoints(&self) -> Vec<String> {
        etcd_config(&self.global, Duration::from_secs(1)).endpoints
    }

    /// `--request-timeout` as a duration (one second when it cannot be one).
    pub fn request_timeout(&self) -> Duration {
        Duration::try_from_secs_f64(self.global.request_timeout).unwrap_or(Duration::from_secs(1))
    }

    async fn connect(&self) -> anyhow::Result<Arc<dyn Registry>> {
        let g = &self.global;
        let timeout = Duration::try_from_secs_f64(g.request_timeout)
            .map_err(|_| anyhow!("invalid --request-timeout {}", g.request_timeout))?;
        let tls = TlsFiles::of(g);
        match driver(g)? {
            Driver::Etcd => {
                let cfg = etcd_config(g, timeout);
                let reg = if g.tunnel.is_some() {
                    // dialled in process through the SSH session: no local listener
                    let session = self.tunnel().await?;
                    let dialer = Arc::new(tunnel::SshDialer { session });
                    EtcdRegistry::connect_via(&cfg, dialer).await?
                } else {
                    EtcdRegistry::connect(&cfg).await?
                };
                let reg: Arc<dyn Registry> = Arc::new(reg);
                check_version(&reg).await;
                Ok(reg)
            }
            Driver::Api => {
                let endpoint = g
                    .endpoint
                    .clone()
                    .unwrap_or_else(|| DEFAULT_ENDPOINT.to_string());
                let first = endpoint.split(',').next().unwrap_or("").trim().to_string();
                if endpoint.contains(',') {
                    tracing::warn!(
                        "multiple endpoints provided but only the first ({first}) is used"
                    );
                }
                let connector: Option<Arc<dyn fleet_client::Connector>> = if g.tunnel.is_some() {
                    let session = self.tunnel().await?;
                    let target = match first.split_once("://") {
                        Some(("unix" | "file", path)) => Target::Unix {
                            path: path.to_string(),
                        },
                        _ => {
                            let (host, port) = fleet_registry::endpoint_host_port(&first)
                                .ok_or_else(|| anyhow!("invalid endpoint {first:?}"))?;
                            Target::Tcp { host, port }
                        }
                    };
                    Some(Arc::new(tunnel::SshConnector { session, target }))
                } else {
                    None
                };
                connect_api(&fleet_client::ClientConfig {
                    endpoint: first,
                    request_timeout: timeout,
                    ca_file: tls.ca,
                    cert_file: tls.cert,
                    key_file: tls.key,
                    connector,
                })
            }
        }
    }

    /// The SSH connection `--tunnel` names, opened once.
    async fn tunnel(&self) -> anyhow::Result<Arc<Session>> {
        let addr = self.global.tunnel.clone().unwrap_or_default();
        self.tunnel
            .get_or_try_init(|| async {
                let cfg = self.ssh_config(22, false)?;
                let session = fleet_ssh::connect(&addr, &cfg)
                    .await
                    .context("failed initializing SSH client")?;
                Ok::<_, anyhow::Error>(Arc::new(session))
            })
            .await
            .cloned()
    }

    /// SSH settings from the global flags.
    pub fn ssh_config(&self, port: u16, forward_agent: bool) -> anyhow::Result<SshConfig> {
        let g = &self.global;
        let timeout = Duration::try_from_secs_f64(g.ssh_timeout)
            .map_err(|_| anyhow!("invalid --ssh-timeout {}", g.ssh_timeout))?;
        Ok(SshConfig {
            user: g.ssh_username.clone(),
            port,
            timeout,
            strict_host_key_checking: g.strict_host_key_checking,
            known_hosts_file: fleet_ssh::known_hosts::expand_tilde(g.known_hosts_file.as_ref()),
            identity_file: g.identity_file.clone().map(PathBuf::from),
            forward_agent,
            ..SshConfig::default()
        })
    }

    /// Connects to a machine over SSH, through the `--tunnel` host when one is given.
    pub async fn ssh(&self, addr: &str, port: u16, forward_agent: bool) -> anyhow::Result<Session> {
        let cfg = self.ssh_config(port, forward_agent)?;
        if self.global.tunnel.is_some() {
            let bastion = self.tunnel().await?;
            Ok(bastion.connect_via(addr, &cfg).await?)
        } else {
            Ok(fleet_ssh::connect(addr, &cfg).await?)
        }
    }

    /// A machine by ID from the list fetched once per invocation; `None` when the machine is
    /// not in the cluster or the list cannot be read.
    pub async fn machine(&self, id: &str) -> Option<MachineView> {
        let mut cache = self.machines.lock().await;
        if cache.is_none() {
            let reg = self.registry().await.ok()?;
            let list = reg.machines().await.ok()?;
            *cache = Some(list.into_iter().map(|m| (m.id.clone(), m)).collect());
        }
        cache.as_ref().and_then(|c| c.get(id).cloned())
    }

    /// fleet's machine legend: `113f16a7.../172.17.8.103` (whole ID with `full`), the bare ID
    /// legend when the machine is unknown.
    pub async fn legend(&self, id: &str, full: bool) -> String {
        match self.machine(id).await {
            Some(m) => machine_full_legend(&m.id, &m.public_ip, full),
            None => machine_full_legend(id, "", full),
        }
    }
}

/// fleet's check with the etcd driver: warn when a machine runs a newer fleet than this
/// fleetctl. Best effort: failures only show with `--debug`.
async fn check_version(reg: &Arc<dyn Registry>) {
    let ours = env!("CARGO_PKG_VERSION");
    let machines = match reg.machines().await {
        Ok(m) => m,
        Err(e) => {
            tracing::debug!("error attempting to check latest fleet version in Registry: {e}");
            return;
        }
    };
    let latest = machines
        .iter()
        .filter_map(|m| parse_version(&m.version).map(|v| (v, m.version.as_str())))
        .max();
    let Some((theirs, text)) = latest else {
        return;
    };
    if parse_version(ours).is_some_and(|mine| theirs > mine) {
        crate::ui::err(format!(
            "####################################################################\n\
             WARNING: fleetctl ({ours}) is older than the latest registered\n\
             version of fleet found in the cluster ({text}). You are strongly\n\
             recommended to upgrade fleetctl to prevent incompatibility issues.\n\
             ####################################################################"
        ));
    }
}

/// `major.minor.patch` of a version string (a leading `v` and any suffix ignored).
fn parse_version(v: &str) -> Option<(u64, u64, u64)> {
    let v = v.strip_prefix('v').unwrap_or(v);
    let core = v.split(['-', '+']).next()?;
    let mut parts = core.split('.').map(|p| p.parse::<u64>().ok());
    Some((parts.next()??, parts.next()??, parts.next()??))
}

/// Which driver the flags select. fleet compared `--driver` with "API" and "etcd"; both are
/// accepted in any case here. Without `--driver`, an `--endpoint` on etcd's ports (2379, 4001)
/// selects etcd, as fleet intended.
pub fn driver(g: &GlobalArgs) -> anyhow::Result<Driver> {
    match g.driver.as_deref() {
        Some(d) if d.eq_ignore_ascii_case("api") => Ok(Driver::Api),
        Some(d) if d.eq_ignore_ascii_case("etcd") => Ok(Driver::Etcd),
        Some(d) => bail!("unrecognized driver {d:?}"),
        None => {
            let first = g
                .endpoint
                .as_deref()
                .unwrap_or("")
                .split(',')
                .next()
                .unwrap_or("");
            let etcd_port = fleet_registry::endpoint_host_port(first)
                .is_some_and(|(_, p)| p == 2379 || p == 4001);
            if etcd_port {
                tracing::debug!("defaulting to --driver=etcd as --endpoint appears to be etcd");
                Ok(Driver::Etcd)
            } else {
                Ok(Driver::Api)
            }
        }
    }
}

/// The TLS files of either driver.
#[derive(Debug, PartialEq, Eq)]
struct TlsFiles {
    ca: Option<PathBuf>,
    cert: Option<PathBuf>,
    key: Option<PathBuf>,
}

impl TlsFiles {
    /// `--ca-file`, `--cert-file`, `--key-file`, or their deprecated spellings `--etcd-cafile`,
    /// `--etcd-certfile`, `--etcd-keyfile`, which fleet applied to the API driver as well (both
    /// spellings set one variable). Given both ways, the current spelling wins (in fleet, the
    /// one given last did).
    fn of(g: &GlobalArgs) -> TlsFiles {
        let pick = |new: &Option<String>, old: &Option<String>| {
            new.clone().or_else(|| old.clone()).map(PathBuf::from)
        };
        TlsFiles {
            ca: pick(&g.ca_file, &g.etcd_cafile),
            cert: pick(&g.cert_file, &g.etcd_certfile),
            key: pick(&g.key_file, &g.etcd_keyfile),
        }
    }
}

/// How fleetctl reaches etcd with `--driver=etcd` (and `import-v1`, whatever the driver).
fn etcd_config(g: &GlobalArgs, timeout: Duration) -> EtcdConfig {
    let endpoints: Vec<String> = etcd_endpoints(g)
        .split(',')
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .collect();
    let tls = TlsFiles::of(g);
    EtcdConfig {
        endpoints,
        key_prefix: g.etcd_key_prefix.clone(),
        request_timeout: timeout,
        ca_file: tls.ca,
        cert_file: tls.cert,
        key_file: tls.key,
        username: None,
        password: None,
    }
}

/// The etcd endpoints: `--endpoint` unless it was left at (or set to) the API's default (then
/// the local etcd, what fleet gave only with `--experimental-api=false`).
fn etcd_endpoints(g: &GlobalArgs) -> String {
    match g.endpoint.as_deref() {
        Some(ep) if ep != DEFAULT_ENDPOINT => ep.to_string(),
        _ => DEFAULT_ETCD_ENDPOINTS.to_string(),
    }
}

/// The API driver (fleet's default): fleetd's HTTP API through `fleet-client`.
pub fn connect_api(cfg: &fleet_client::ClientConfig) -> anyhow::Result<Arc<dyn Registry>> {
    Ok(Arc::new(fleet_client::HttpRegistry::new(cfg)?))
}

/// `113f16a7...` or the whole ID.
pub fn machine_id_legend(id: &str, full: bool) -> String {
    if full {
        id.to_string()
    } else {
        let short: String = id.chars().take(8).collect();
        format!("{short}...")
    }
}

/// `113f16a7.../172.17.8.103`: the ID legend, then the IP when there is one.
pub fn machine_full_legend(id: &str, ip: &str, full: bool) -> String {
    let legend = machine_id_legend(id, full);
    if ip.is_empty() {
        legend
    } else {
        format!("{legend}/{ip}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[test]
    fn legends() {
        let id = "595989bb-cbb7-49ce-8726-722d6e157b4e";
        for (ip, full, want) in [
            ("5.6.7.8", false, "595989bb.../5.6.7.8"),
            (
                "5.6.7.8",
                true,
                "595989bb-cbb7-49ce-8726-722d6e157b4e/5.6.7.8",
            ),
            ("", false, "595989bb..."),
            ("", true, "595989bb-cbb7-49ce-8726-722d6e157b4e"),
        ] {
            assert_eq!(machine_full_legend(id, ip, full), want);
        }
        assert_eq!(machine_id_legend("abc", false), "abc...");
    }

    fn global(args: &[&str]) -> GlobalArgs {
        let mut argv = vec!["fleetctl"];
        argv.extend_from_slice(args);
        crate::cli::Cli::parse_from(argv).global
    }

    #[test]
    fn driver_selection() {
        for (args, want) in [
            (&[][..], Some(Driver::Api)),
            (&["--driver=API"][..], Some(Driver::Api)),
            (&["--driver=api"][..], Some(Driver::Api)),
            (&["--driver=etcd"][..], Some(Driver::Etcd)),
            (&["--endpoint=http://10.0.0.1:2379"][..], Some(Driver::Etcd)),
            (
                &["--endpoint=http://10.0.0.1:4001,http://x:1"][..],
                Some(Driver::Etcd),
            ),
            (&["--endpoint=http://10.0.0.1:8080"][..], Some(Driver::Api)),
            (
                &["--driver=API", "--endpoint=http://10.0.0.1:2379"][..],
                Some(Driver::Api),
            ),
            (&["--driver=zk"][..], None),
        ] {
            if std::env::var_os("FLEETCTL_DRIVER").is_some()
                || std::env::var_os("FLEETCTL_ENDPOINT").is_some()
            {
                return;
            }
            assert_eq!(driver(&global(args)).ok(), want, "{args:?}");
        }
    }

    #[test]
    fn versions() {
        assert_eq!(parse_version("1.0.0"), Some((1, 0, 0)));
        assert_eq!(parse_version("v0.13.2+git"), Some((0, 13, 2)));
        assert_eq!(parse_version("1.10.0-rc1"), Some((1, 10, 0)));
        assert_eq!(parse_version(""), None);
        assert_eq!(parse_version("1.0"), None);
        assert!(parse_version("1.10.0") > parse_version("1.9.9"));
    }

    #[test]
    fn etcd_endpoint_defaults() {
        if std::env::var_os("FLEETCTL_ENDPOINT").is_some() {
            return;
        }
        assert_eq!(etcd_endpoints(&global(&[])), DEFAULT_ETCD_ENDPOINTS);
        assert_eq!(
            etcd_endpoints(&global(&["--endpoint=http://e:2379"])),
            "http://e:2379"
        );
    }

    /// fleet's `--experimental-api=false` only gave the etcd driver the old etcd endpoints
    /// when `--endpoint` was left at the API socket; it never chose the driver. Here the etcd
    /// driver has those endpoints by default either way.
    #[test]
    fn experimental_api_false_as_in_fleet() {
        if std::env::var_os("FLEETCTL_ENDPOINT").is_some()
            || std::env::var_os("FLEETCTL_DRIVER").is_some()
        {
            return;
        }
        let off = global(&["--experimental-api=false"]);
        assert!(!off.experimental_api);
        assert_eq!(driver(&off).ok(), Some(Driver::Api));
        for args in [
            &["--driver=etcd", "--experimental-api=false"][..],
            &[
                "--driver=etcd",
                "--experimental-api=false",
                "--endpoint=unix:///var/run/fleet.sock",
            ],
            &["--driver=etcd"],
        ] {
            assert_eq!(
                etcd_endpoints(&global(args)),
                DEFAULT_ETCD_ENDPOINTS,
                "{args:?}"
            );
        }
        let given = global(&["--experimental-api=false", "--endpoint=http://e:4001"]);
        assert_eq!(etcd_endpoints(&given), "http://e:4001");
    }

    /// The deprecated `--etcd-*file` spellings count for both drivers, as in fleet.
    #[test]
    fn deprecated_tls_flags_for_both_drivers() {
        for var in [
            "CA_FILE",
            "CERT_FILE",
            "KEY_FILE",
            "ETCD_CAFILE",
            "ETCD_CERTFILE",
            "ETCD_KEYFILE",
        ] {
            if std::env::var_os(format!("FLEETCTL_{var}")).is_some() {
                return;
            }
        }
        let files = |ca: &str, cert: &str, key: &str| TlsFiles {
            ca: Some(ca.into()),
            cert: Some(cert.into()),
            key: Some(key.into()),
        };
        let old = [
            "--etcd-cafile=/o/ca",
            "--etcd-certfile=/o/cert",
            "--etcd-keyfile=/o/key",
        ];
        for driver_flag in ["--driver=api", "--driver=etcd"] {
            let mut args = vec![driver_flag];
            args.extend_from_slice(&old);
            assert_eq!(
                TlsFiles::of(&global(&args)),
                files("/o/ca", "/o/cert", "/o/key")
            );
            args.extend_from_slice(&["--ca-file=/n/ca", "--key-file=/n/key"]);
            assert_eq!(
                TlsFiles::of(&global(&args)),
                files("/n/ca", "/o/cert", "/n/key")
            );
        }
        assert_eq!(
            TlsFiles::of(&global(&[])),
            TlsFiles {
                ca: None,
                cert: None,
                key: None
            }
        );
    }
}
