//! fleetd's configuration: fleet's options, read from `/etc/fleet/fleet.conf` (INI, global
//! section) and overridden by `FLEET_*` environment variables, fully validated before the
//! daemon binds or connects to anything.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use thiserror::Error;

pub const DEFAULT_CONFIG_FILE: &str = "/etc/fleet/fleet.conf";

/// The longest any duration option may be: one day. A longer TTL, timeout or interval is
/// surely a mistake, and the bound keeps everything computed from them (deadlines as
/// `Instant + ttl`, lease TTLs as `interval * 5`, `timeout * 5`) far from overflowing.
pub const MAX_DURATION: Duration = Duration::from_secs(24 * 60 * 60);

/// The shortest timeout or interval: 1 ms (a zero interval would panic tokio's timers, and a
/// zero timeout fails every request).
pub const MIN_DURATION: Duration = Duration::from_millis(1);

#[derive(Debug, Error, PartialEq)]
pub enum ConfigError {
    #[error("unable to use config file {path}: {reason}")]
    File { path: String, reason: String },
    #[error("{source_name}: invalid value {value:?} for {key}: {reason}")]
    Value {
        source_name: String,
        key: String,
        value: String,
        reason: String,
    },
    #[error("{source_name} line {line}: {reason}")]
    Syntax {
        source_name: String,
        line: usize,
        reason: String,
    },
    /// Options that are valid alone but not together.
    #[error("{0}")]
    Conflict(String),
}

/// All of fleet's options, with fleet's defaults.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub verbosity: u32,
    pub etcd_servers: Vec<String>,
    pub etcd_username: String,
    pub etcd_password: String,
    pub etcd_keyfile: String,
    pub etcd_certfile: String,
    pub etcd_cafile: String,
    pub etcd_key_prefix: String,
    pub etcd_request_timeout: Duration,
    pub engine_reconcile_interval: Duration,
    pub public_ip: String,
    pub metadata: BTreeMap<String, String>,
    pub agent_ttl: Duration,
    pub units_directory: PathBuf,
    pub systemd_user: bool,
    pub token_limit: usize,
    pub disable_engine: bool,
    pub disable_watches: bool,
    /// Beyond fleet: listen addresses for the API when not socket-activated
    /// (`unix:///path` or `host:port`, comma-separated).
    pub api_listen: Vec<String>,
    /// Beyond fleet: TLS for TCP API listeners, and an optional CA that client certificates
    /// must be signed by.
    pub api_certfile: String,
    pub api_keyfile: String,
    pub api_client_cafile: String,
    /// Beyond fleet: allow a plain-HTTP (no `api_certfile`) `api_listen` TCP address that is
    /// not loopback. Off by default: such a listener gives everyone who can reach it root on
    /// every machine of the cluster.
    pub api_allow_plain_tcp: bool,
    /// Beyond fleet: serve the read-only dashboard at `/dashboard/` on the API's listeners.
    /// Off by default: it shows every unit file to whoever can reach the API.
    pub enable_dashboard: bool,
    /// Warnings to log once logging is set up (deprecated or unknown options).
    pub warnings: Vec<String>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            verbosity: 0,
            etcd_servers: vec![
                "http://127.0.0.1:2379".into(),
                "http://127.0.0.1:4001".into(),
            ],
            etcd_username: String::new(),
            etcd_password: String::new(),
            etcd_keyfile: String::new(),
            etcd_certfile: String::new(),
            etcd_cafile: String::new(),
            etcd_key_prefix: "/_coreos.com/fleet/".into(),
            etcd_request_timeout: Duration::from_secs(1),
            engine_reconcile_interval: Duration::from_secs(2),
            public_ip: String::new(),
            metadata: BTreeMap::new(),
            agent_ttl: Duration::from_secs(30),
            units_directory: PathBuf::from("/run/fleet/units/"),
            systemd_user: false,
            token_limit: 100,
            disable_engine: false,
            disable_watches: false,
            api_listen: Vec::new(),
            api_certfile: String::new(),
            api_keyfile: String::new(),
            api_client_cafile: String::new(),
            api_allow_plain_tcp: false,
            enable_dashboard: false,
            warnings: Vec::new(),
        }
    }
}

/// Every option name fleet accepts, in fleet's order.
pub const OPTIONS: &[&str] = &[
    "verbosity",
    "etcd_servers",
    "etcd_username",
    "etcd_password",
    "etcd_keyfile",
    "etcd_certfile",
    "etcd_cafile",
    "etcd_key_prefix",
    "etcd_request_timeout",
    "engine_reconcile_interval",
    "public_ip",
    "metadata",
    "agent_ttl",
    "units_directory",
    "systemd_user",
    "token_limit",
    "enable_grpc",
    "disable_engine",
    "disable_watches",
    "verify_units",
    "authorized_keys_file",
    "api_listen",
    "api_certfile",
    "api_keyfile",
    "api_client_cafile",
    "api_allow_plain_tcp",
    "enable_dashboard",
];

impl Config {
    /// Loads the configuration as fleetd does: `path` if given (it must be usable), else the
    /// default file if it exists; then `FLEET_*` variables from `env` override it.
    pub fn load(
        path: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Config, ConfigError> {
        let mut cfg = Config::default();
        let file = match path {
            Some(p) => Some(p.to_path_buf()),
            None => Some(PathBuf::from(DEFAULT_CONFIG_FILE)).filter(|p| p.exists()),
        };
        if let Some(p) = file {
            let name = p.display().to_string();
            if p.is_dir() {
                return Err(ConfigError::File {
                    path: name,
                    reason: "is a directory, not a file".into(),
                });
            }
            let text = std::fs::read_to_string(&p).map_err(|e| ConfigError::File {
                path: name.clone(),
                reason: e.to_string(),
            })?;
            for (line, key, value) in parse_ini(&name, &text)? {
                let _ = line;
                cfg.set(&name, &key, &value)?;
            }
        }
        let env: BTreeMap<String, String> = env.into_iter().collect();
        for opt in OPTIONS {
            let var = format!("FLEET_{}", opt.to_uppercase());
            if let Some(v) = env.get(&var) {
                cfg.set(&var, opt, v)?;
            }
        }
        cfg.validate(socket_activated(&env, std::process::id()))?;
        Ok(cfg)
    }

    /// Checks the options that depend on each other; [`Config::load`] runs it, so a bad
    /// combination stops fleetd at start and is refused (old configuration kept) on SIGHUP.
    /// `socket_activated`: fleetd serves the API on sockets systemd passed it and ignores
    /// `api_listen`, so `api_listen` only gets a warning (see [`socket_activated`]).
    pub fn validate(&mut self, socket_activated: bool) -> Result<(), ConfigError> {
        if self.api_certfile.is_empty() != self.api_keyfile.is_empty() {
            return Err(ConfigError::Conflict(
                "api_certfile and api_keyfile must be given together".into(),
            ));
        }
        // Client certificates are only checked in a TLS handshake: without api_certfile the
        // TCP API would be plain HTTP with no authentication at all.
        if !self.api_client_cafile.is_empty() && self.api_certfile.is_empty() {
            return Err(ConfigError::Conflict(
                "api_client_cafile is set but api_certfile is not: client certificates need a \
                 TLS listener; set api_certfile and api_keyfile too"
                    .into(),
            ));
        }
        // A plain-HTTP API on a non-loopback TCP address is refused unless explicitly allowed
        // (anyone who reaches it controls every machine). Socket-activated listeners are
        // fleet v1.0's way and are not refused; fleetd warns about them at start instead.
        let plain_off_loopback = self
            .api_listen
            .iter()
            .find(|a| !is_loopback_listen(a))
            .filter(|_| self.api_certfile.is_empty() && !self.api_allow_plain_tcp)
            .map(|addr| {
                format!(
                    "api_listen {addr} would serve the API over plain HTTP to the network: set \
                     api_certfile and api_keyfile (and api_client_cafile), listen on loopback, \
                     or set api_allow_plain_tcp=true"
                )
            });
        if socket_activated {
            // api_listen is not used: a fleet.conf that worked before keeps working.
            if !self.api_listen.is_empty() {
                let mut warning = format!(
                    "api_listen {} is ignored: fleetd is socket-activated and serves the API \
                     on the sockets systemd passed",
                    self.api_listen.join(",")
                );
                if let Some(refusal) = plain_off_loopback {
                    warning.push_str(&format!(
                        "; without socket activation it is refused: {refusal}"
                    ));
                }
                self.warnings.push(warning);
            }
        } else if let Some(refusal) = plain_off_loopback {
            return Err(ConfigError::Conflict(refusal));
        }
        Ok(())
    }

    /// Sets one option from its text form.
    pub fn set(&mut self, source: &str, key: &str, raw: &str) -> Result<(), ConfigError> {
        let value = unquote(raw.trim());
        let bad = |reason: &str| ConfigError::Value {
            source_name: source.to_string(),
            key: key.to_string(),
            value: value.to_string(),
            reason: reason.to_string(),
        };
        match key {
            "verbosity" => {
                self.verbosity = value.parse().map_err(|_| bad("expected a whole number"))?
            }
            "etcd_servers" => {
                let list = parse_list(value);
                if list.is_empty() {
                    return Err(bad("at least one etcd endpoint is needed"));
                }
                for e in &list {
                    if !(e.starts_with("http://") || e.starts_with("https://")) {
                        return Err(bad("endpoints must start with http:// or https://"));
                    }
                }
                self.etcd_servers = list;
            }
            "etcd_username" => self.etcd_username = value.to_string(),
            "etcd_password" => self.etcd_password = value.to_string(),
            "etcd_keyfile" => self.etcd_keyfile = value.to_string(),
            "etcd_certfile" => self.etcd_certfile = value.to_string(),
            "etcd_cafile" => self.etcd_cafile = value.to_string(),
            "etcd_key_prefix" => {
                if value.is_empty() {
                    return Err(bad("must not be empty"));
                }
                self.etcd_key_prefix = value.to_string();
            }
            "etcd_request_timeout" => {
                let secs: f64 = value
                    .parse()
                    .map_err(|_| bad("expected seconds, e.g. 1.0"))?;
                self.etcd_request_timeout =
                    bounded(secs, MIN_DURATION).map_err(|reason| bad(&reason))?;
            }
            "engine_reconcile_interval" => {
                let secs: f64 = value.parse().map_err(|_| bad("expected seconds, e.g. 2"))?;
                self.engine_reconcile_interval =
                    bounded(secs, MIN_DURATION).map_err(|reason| bad(&reason))?;
            }
            "public_ip" => {
                if !value.is_empty() && value.parse::<std::net::IpAddr>().is_err() {
                    return Err(bad("expected an IP address"));
                }
                self.public_ip = value.to_string();
            }
            "metadata" => self.metadata = parse_metadata(value),
            "agent_ttl" => {
                let secs =
                    duration_secs(value).ok_or_else(|| bad("expected a duration, e.g. 30s"))?;
                self.agent_ttl =
                    bounded(secs, Duration::from_secs(1)).map_err(|reason| bad(&reason))?;
            }
            "units_directory" => {
                if value.is_empty() {
                    return Err(bad("must not be empty"));
                }
                self.units_directory = PathBuf::from(value);
            }
            "systemd_user" => {
                self.systemd_user = boolean(value).ok_or_else(|| bad("expected true or false"))?
            }
            "token_limit" => {
                let n: usize = value.parse().map_err(|_| bad("expected a whole number"))?;
                if n == 0 {
                    return Err(bad("must be at least 1"));
                }
                self.token_limit = n;
            }
            "disable_engine" => {
                self.disable_engine = boolean(value).ok_or_else(|| bad("expected true or false"))?
            }
            "disable_watches" => {
                self.disable_watches =
                    boolean(value).ok_or_else(|| bad("expected true or false"))?
            }
            "enable_grpc" => {
                boolean(value).ok_or_else(|| bad("expected true or false"))?;
                self.warnings.push("config option enable_grpc is ignored: agents and engine always talk through etcd".into());
            }
            "verify_units" => {
                if boolean(value).ok_or_else(|| bad("expected true or false"))? {
                    self.warnings.push(
                        "Config option verify_units is no longer supported - ignoring".into(),
                    );
                }
            }
            "authorized_keys_file" => {
                if !value.is_empty() {
                    self.warnings.push(
                        "Config option authorized_keys_file is no longer supported - ignoring"
                            .into(),
                    );
                }
            }
            "api_listen" => self.api_listen = parse_list(value),
            "api_certfile" => self.api_certfile = value.to_string(),
            "api_keyfile" => self.api_keyfile = value.to_string(),
            "api_client_cafile" => self.api_client_cafile = value.to_string(),
            "api_allow_plain_tcp" => {
                self.api_allow_plain_tcp =
                    boolean(value).ok_or_else(|| bad("expected true or false"))?
            }
            "enable_dashboard" => {
                self.enable_dashboard =
                    boolean(value).ok_or_else(|| bad("expected true or false"))?
            }
            other => self
                .warnings
                .push(format!("{source}: unknown option {other:?} ignored")),
        }
        Ok(())
    }
}

/// `key=value` lines of the global section; `#`/`;` comments; `[section]` headers other than
/// the first global part are an error (fleet reads only the global section).
fn parse_ini(name: &str, text: &str) -> Result<Vec<(usize, String, String)>, ConfigError> {
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let l = line.trim();
        if l.is_empty() || l.starts_with('#') || l.starts_with(';') {
            continue;
        }
        if l.starts_with('[') {
            return Err(ConfigError::Syntax {
                source_name: name.to_string(),
                line: i + 1,
                reason: "sections are not supported: fleet options go at the top level".into(),
            });
        }
        let Some((k, v)) = l.split_once('=') else {
            return Err(ConfigError::Syntax {
                source_name: name.to_string(),
                line: i + 1,
                reason: format!("expected key=value, found {l:?}"),
            });
        };
        out.push((i + 1, k.trim().to_string(), v.trim().to_string()));
    }
    Ok(out)
}

fn unquote(v: &str) -> &str {
    if v.len() >= 2 && v.starts_with('"') && v.ends_with('"') {
        &v[1..v.len() - 1]
    } else {
        v
    }
}

/// fleet's list syntax: `["a", "b"]` or `a,b`.
/// Only the list's own brackets are removed, so IPv6 items like `[::1]:49153` keep theirs.
fn parse_list(v: &str) -> Vec<String> {
    let v = v.trim();
    let v = v
        .strip_prefix('[')
        .and_then(|inner| inner.strip_suffix(']'))
        .unwrap_or(v);
    v.split(',')
        .map(|item| item.trim_matches([' ', '"']))
        .filter(|s| !s.is_empty())
        .map(str::to_string)
        .collect()
}

/// fleet's metadata syntax: comma-separated `key=value`, pairs without `=` skipped.
pub fn parse_metadata(v: &str) -> BTreeMap<String, String> {
    v.split(',')
        .filter_map(|pair| {
            let (k, v) = pair.split_once('=')?;
            Some((k.trim().to_string(), v.trim().to_string()))
        })
        .collect()
}

/// `secs` as a duration of at least `min` and at most [`MAX_DURATION`]; NaN, infinities and
/// negative values are errors (converting them would panic).
fn bounded(secs: f64, min: Duration) -> Result<Duration, String> {
    if secs.is_nan() {
        return Err("not a number".into());
    }
    if secs > MAX_DURATION.as_secs_f64() {
        return Err(format!(
            "must be at most {}s (one day)",
            MAX_DURATION.as_secs()
        ));
    }
    if secs < min.as_secs_f64() {
        return Err(format!("must be at least {}", show(min)));
    }
    Duration::try_from_secs_f64(secs).map_err(|e| e.to_string())
}

/// `1s`, `1ms`: a bound as the user would write it.
fn show(d: Duration) -> String {
    if d.subsec_nanos() == 0 {
        format!("{}s", d.as_secs())
    } else {
        format!("{}ms", d.as_millis())
    }
}

/// Whether systemd passed listening sockets to the process `pid` (`LISTEN_PID` is `pid` and
/// `LISTEN_FDS` at least 1, in `env`): fleetd then serves the API on those, as
/// `fleet_api::listeners_from_systemd` takes them, and `api_listen` is not used.
pub fn socket_activated(env: &BTreeMap<String, String>, pid: u32) -> bool {
    let ours = env
        .get("LISTEN_PID")
        .and_then(|p| p.trim().parse::<u32>().ok())
        == Some(pid);
    let fds = env
        .get("LISTEN_FDS")
        .and_then(|n| n.trim().parse::<u32>().ok())
        .unwrap_or(0);
    ours && fds > 0
}

/// True for API listen addresses that only this machine can reach: unix sockets, loopback
/// addresses and `localhost`. Unspecified (`0.0.0.0`, `[::]`) and host names are not. The one
/// rule for `api_listen` entries (refused as plain HTTP otherwise) and for the TCP listeners
/// fleetd got (warned about at start; pass their socket address as text).
pub fn is_loopback_listen(addr: &str) -> bool {
    if addr.starts_with("unix://") {
        return true;
    }
    if let Ok(sa) = addr.parse::<std::net::SocketAddr>() {
        return sa.ip().is_loopback();
    }
    addr.rsplit_once(':')
        .is_some_and(|(host, _)| host.eq_ignore_ascii_case("localhost"))
}

fn boolean(v: &str) -> Option<bool> {
    match v {
        "1" | "t" | "T" | "true" | "TRUE" | "True" => Some(true),
        "0" | "f" | "F" | "false" | "FALSE" | "False" => Some(false),
        _ => None,
    }
}

/// Go's duration syntax (`30s`, `1m30s`, `500ms`, `1.5h`); a bare number means seconds.
/// `None` for bad syntax and for values no `Duration` holds (negative, NaN, too large).
pub fn parse_duration(v: &str) -> Option<Duration> {
    Duration::try_from_secs_f64(duration_secs(v)?).ok()
}

/// Go's duration syntax as a number of seconds, unbounded (may be huge, negative or NaN for
/// a bare number; the caller bounds it).
fn duration_secs(v: &str) -> Option<f64> {
    if let Ok(n) = v.parse::<f64>() {
        return Some(n);
    }
    let mut total = 0f64;
    let mut rest = v;
    if rest.is_empty() {
        return None;
    }
    while !rest.is_empty() {
        let num_end = rest.find(|c: char| !(c.is_ascii_digit() || c == '.'))?;
        let n: f64 = rest[..num_end].parse().ok()?;
        rest = &rest[num_end..];
        let unit_end = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let factor = match &rest[..unit_end] {
            "ns" => 1e-9,
            "us" | "µs" => 1e-6,
            "ms" => 1e-3,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            _ => return None,
        };
        total += n * factor;
        rest = &rest[unit_end..];
    }
    Some(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(text: &str, env: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("fleet.conf");
        std::fs::write(&p, text).expect("write");
        Config::load(
            Some(&p),
            env.iter().map(|(k, v)| (k.to_string(), v.to_string())),
        )
    }

    #[test]
    fn defaults_are_fleets() {
        let c = load("", &[]).expect("load");
        assert_eq!(c.agent_ttl, Duration::from_secs(30));
        assert_eq!(c.engine_reconcile_interval, Duration::from_secs(2));
        assert_eq!(c.etcd_key_prefix, "/_coreos.com/fleet/");
        assert_eq!(c.units_directory, PathBuf::from("/run/fleet/units/"));
        assert_eq!(c.token_limit, 100);
        assert!(!c.enable_dashboard);
    }

    #[test]
    fn the_dashboard_is_enabled_by_file_or_environment() {
        assert!(
            load("enable_dashboard=true\n", &[])
                .expect("load")
                .enable_dashboard
        );
        let c = load("", &[("FLEET_ENABLE_DASHBOARD", "1")]).expect("load");
        assert!(c.enable_dashboard);
        let err = load("enable_dashboard=maybe\n", &[]).expect_err("refused");
        assert!(err.to_string().contains("enable_dashboard"), "{err}");
    }

    #[test]
    fn file_then_environment() {
        let c = load(
            "# comment\netcd_servers=[\"http://10.0.0.1:2379\", \"http://10.0.0.2:2379\"]\nmetadata=\"region=us-west, az = a ,bogus\"\nagent_ttl=\"1m30s\"\npublic_ip=172.18.0.11\n",
            &[("FLEET_AGENT_TTL", "10s"), ("FLEET_DISABLE_ENGINE", "true")],
        )
        .expect("load");
        assert_eq!(
            c.etcd_servers,
            vec!["http://10.0.0.1:2379", "http://10.0.0.2:2379"]
        );
        assert_eq!(
            c.metadata.get("region").map(String::as_str),
            Some("us-west")
        );
        assert_eq!(c.metadata.get("az").map(String::as_str), Some("a"));
        assert_eq!(c.metadata.len(), 2);
        assert_eq!(c.agent_ttl, Duration::from_secs(10));
        assert!(c.disable_engine);
    }

    #[test]
    fn invalid_values_are_errors_naming_the_option() {
        for (text, key) in [
            ("agent_ttl=soon\n", "agent_ttl"),
            (
                "engine_reconcile_interval=-1\n",
                "engine_reconcile_interval",
            ),
            ("disable_watches=maybe\n", "disable_watches"),
            ("etcd_servers=127.0.0.1:2379\n", "etcd_servers"),
            ("public_ip=nope\n", "public_ip"),
            ("token_limit=0\n", "token_limit"),
        ] {
            let err = load(text, &[]).expect_err(text);
            assert!(err.to_string().contains(key), "{err}");
        }
        assert!(load("just words\n", &[]).is_err());
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("30s"), Some(Duration::from_secs(30)));
        assert_eq!(parse_duration("1m30s"), Some(Duration::from_secs(90)));
        assert_eq!(parse_duration("500ms"), Some(Duration::from_millis(500)));
        assert_eq!(parse_duration("5"), Some(Duration::from_secs(5)));
        assert_eq!(parse_duration("5x"), None);
    }

    /// Values that once panicked (`Duration::from_secs_f64`) or overflowed what is computed
    /// from them (`Instant + ttl`, `interval * 5`) are refused with a message naming the
    /// option, from the file and from the environment alike.
    #[test]
    fn out_of_range_durations_are_refused() {
        for (key, value, reason) in [
            ("agent_ttl", "1e20", "at most 86400s"),
            ("agent_ttl", "1e400", "at most 86400s"),
            ("agent_ttl", "inf", "at most 86400s"),
            ("agent_ttl", "-inf", "at least 1s"),
            ("agent_ttl", "NaN", "not a number"),
            ("agent_ttl", "-5", "at least 1s"),
            ("agent_ttl", "25h", "at most 86400s"),
            ("agent_ttl", "99999999999999999999h", "at most 86400s"),
            ("agent_ttl", "0.5", "at least 1s"),
            ("engine_reconcile_interval", "1e20", "at most 86400s"),
            ("engine_reconcile_interval", "86401", "at most 86400s"),
            ("engine_reconcile_interval", "inf", "at most 86400s"),
            ("engine_reconcile_interval", "nan", "not a number"),
            ("engine_reconcile_interval", "-1", "at least 1ms"),
            ("engine_reconcile_interval", "0", "at least 1ms"),
            ("engine_reconcile_interval", "1e-12", "at least 1ms"),
            ("etcd_request_timeout", "1e20", "at most 86400s"),
            ("etcd_request_timeout", "infinity", "at most 86400s"),
            ("etcd_request_timeout", "NaN", "not a number"),
            ("etcd_request_timeout", "0", "at least 1ms"),
            ("etcd_request_timeout", "-0.5", "at least 1ms"),
        ] {
            let err = load(&format!("{key}={value}\n"), &[]).expect_err(value);
            let msg = err.to_string();
            assert!(
                msg.contains(key) && msg.contains(reason),
                "{key}={value}: {msg}"
            );
            let var = format!("FLEET_{}", key.to_uppercase());
            let err = load("", &[(var.as_str(), value)]).expect_err(value);
            assert!(err.to_string().contains(reason), "{var}={value}: {err}");
        }
        // the bounds themselves are accepted
        let c = load(
            "agent_ttl=24h\nengine_reconcile_interval=0.001\netcd_request_timeout=86400\n",
            &[],
        )
        .expect("bounds");
        assert_eq!(c.agent_ttl, MAX_DURATION);
        assert_eq!(c.engine_reconcile_interval, MIN_DURATION);
        assert_eq!(c.etcd_request_timeout, MAX_DURATION);
        // everything computed from them stays in range
        let now = std::time::Instant::now();
        assert!(
            now.checked_add(c.agent_ttl + Duration::from_secs(2))
                .is_some()
        );
        assert!(c.etcd_request_timeout.checked_mul(5).is_some());
        assert_eq!(parse_duration("1e20"), None);
        assert_eq!(parse_duration("-1"), None);
        assert_eq!(parse_duration("99999999999999999999h"), None);
    }

    #[test]
    fn client_ca_without_a_certificate_is_refused() {
        let err = load("api_client_cafile=/etc/fleet/ca.pem\n", &[]).expect_err("cafile alone");
        assert_eq!(
            err.to_string(),
            "api_client_cafile is set but api_certfile is not: client certificates need a TLS \
             listener; set api_certfile and api_keyfile too"
        );
        let err = load("", &[("FLEET_API_CLIENT_CAFILE", "/ca.pem")]).expect_err("env");
        assert!(err.to_string().contains("api_client_cafile"), "{err}");
        let err = load("api_certfile=/c.pem\n", &[]).expect_err("cert without key");
        assert!(err.to_string().contains("api_keyfile"), "{err}");
        load(
            "api_certfile=/c.pem\napi_keyfile=/k.pem\napi_client_cafile=/ca.pem\napi_listen=0.0.0.0:49153\n",
            &[],
        )
        .expect("a TLS listener with client certificates");
    }

    #[test]
    fn plain_http_off_loopback_needs_explicit_consent() {
        for addr in [
            "0.0.0.0:49153",
            "[::]:49153",
            "10.0.0.5:49153",
            "fleet.example:49153",
        ] {
            let err = load(&format!("api_listen={addr}\n"), &[]).expect_err(addr);
            let msg = err.to_string();
            assert!(
                msg.contains(addr) && msg.contains("api_allow_plain_tcp"),
                "{msg}"
            );
            let mut text = format!("api_listen=unix:///run/f.sock,{addr}\n");
            text.push_str("api_allow_plain_tcp=true\n");
            load(&text, &[]).expect("allowed explicitly");
        }
        for addr in [
            "127.0.0.1:49153",
            "[::1]:49153",
            "localhost:49153",
            "unix:///var/run/fleet.sock",
        ] {
            load(&format!("api_listen={addr}\n"), &[]).expect(addr);
        }
    }

    /// A socket-activated fleetd ignores api_listen, so an api_listen that would be refused
    /// only gets a warning there. Before, such a fleet.conf (which fleet v1.0 and earlier
    /// builds accepted) stopped fleetd even though the address was never used.
    #[test]
    fn plain_http_api_listen_is_only_refused_when_used() {
        let pid = std::process::id().to_string();
        let other = (std::process::id() + 1).to_string();
        let text = "api_listen=0.0.0.0:49153\n";
        let c = load(text, &[("LISTEN_PID", &pid), ("LISTEN_FDS", "1")]).expect("activated");
        assert!(
            c.warnings
                .iter()
                .any(|w| w.contains("api_listen 0.0.0.0:49153 is ignored")
                    && w.contains("api_allow_plain_tcp")),
            "{:?}",
            c.warnings
        );
        for env in [
            vec![("LISTEN_PID", other.as_str()), ("LISTEN_FDS", "1")],
            vec![("LISTEN_PID", pid.as_str()), ("LISTEN_FDS", "0")],
            vec![("LISTEN_PID", pid.as_str())],
            vec![("LISTEN_FDS", "1")],
            vec![],
        ] {
            let err = load(text, &env).expect_err("api_listen is used");
            assert!(
                err.to_string().contains("api_allow_plain_tcp"),
                "{env:?}: {err}"
            );
        }
        // socket-activated with a loopback api_listen: only the notice that it is ignored
        let c = load(
            "api_listen=127.0.0.1:49153\n",
            &[("LISTEN_PID", &pid), ("LISTEN_FDS", "2")],
        )
        .expect("activated");
        assert_eq!(
            c.warnings,
            vec![
                "api_listen 127.0.0.1:49153 is ignored: fleetd is socket-activated and serves \
                 the API on the sockets systemd passed"
                    .to_string()
            ]
        );
        assert!(
            load("", &[("LISTEN_PID", &pid), ("LISTEN_FDS", "1")])
                .expect("no api_listen")
                .warnings
                .is_empty()
        );
    }

    /// The one loopback rule, for configured addresses and for the socket addresses of the
    /// listeners fleetd got (as text).
    #[test]
    fn loopback_listen_addresses() {
        for (addr, want) in [
            ("unix:///var/run/fleet.sock", true),
            ("127.0.0.1:49153", true),
            ("127.1.2.3:49153", true),
            ("[::1]:49153", true),
            ("localhost:49153", true),
            ("LOCALHOST:49153", true),
            ("0.0.0.0:49153", false),
            ("[::]:49153", false),
            ("10.1.2.3:49153", false),
            ("fleet.example:49153", false),
            ("localhost.example:49153", false),
        ] {
            assert_eq!(is_loopback_listen(addr), want, "{addr}");
        }
        let bound: std::net::SocketAddr = "[::1]:49153".parse().expect("addr");
        assert!(is_loopback_listen(&bound.to_string()));
    }

    #[test]
    fn missing_file_is_an_error() {
        let err =
            Config::load(Some(Path::new("/nonexistent/fleet.conf")), []).expect_err("missing");
        assert!(err.to_string().contains("/nonexistent/fleet.conf"));
    }
}
