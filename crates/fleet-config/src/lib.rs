//! fleetd's configuration: fleet's options, read from `/etc/fleet/fleet.conf` (INI, global
//! section) and overridden by `FLEET_*` environment variables, fully validated before the
//! daemon binds or connects to anything.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use thiserror::Error;

mod options;
pub use options::{OPTION_DOCS, OptionDoc};

/// fleet's default etcd key prefix (`etcd_key_prefix`), under which the whole registry lives.
/// The one definition: fleet-registry, fleetctl and the functional harness use it too.
pub const DEFAULT_KEY_PREFIX: &str = "/_coreos.com/fleet/";

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
            etcd_key_prefix: DEFAULT_KEY_PREFIX.into(),
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
            // fleet read bytes: a stray non-UTF-8 byte (in a comment, say) is no reason to stop
            let bytes = std::fs::read(&p).map_err(|e| ConfigError::File {
                path: name.clone(),
                reason: e.to_string(),
            })?;
            let text = String::from_utf8_lossy(&bytes);
            for e in parse_fleet_conf(&name, &text)? {
                cfg.set(&format!("{name} line {}", e.line), &e.key, &e.value)?;
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

    /// fleet v1.0 set its numeric and boolean options through Go flags and dropped a value
    /// that did not parse, keeping the default: fleetd started. So do we, loudly.
    fn ignored(&mut self, source: &str, key: &str, value: &str, expected: &str) {
        self.warnings.push(format!(
            "{source}: invalid value {value:?} for {key} ignored (expected {expected}), \
             keeping {key}'s default as fleet v1.0 did"
        ));
    }

    /// Sets one option from its text form. `source` names where it came from (a file and
    /// line, or an environment variable) for errors and warnings.
    pub fn set(&mut self, source: &str, key: &str, raw: &str) -> Result<(), ConfigError> {
        let value = unquote(raw.trim());
        let bad = |reason: &str| ConfigError::Value {
            source_name: source.to_string(),
            key: key.to_string(),
            value: value.to_string(),
            reason: reason.to_string(),
        };
        match key {
            "verbosity" => match go_int(value) {
                Some(n) => self.verbosity = u32::try_from(n.max(0)).unwrap_or(u32::MAX),
                None => self.ignored(source, key, value, "a whole number"),
            },
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
            "etcd_request_timeout" => match value.parse::<f64>() {
                Ok(secs) => {
                    self.etcd_request_timeout =
                        bounded(secs, MIN_DURATION).map_err(|reason| bad(&reason))?
                }
                Err(_) => self.ignored(source, key, value, "seconds, e.g. 1.0"),
            },
            "engine_reconcile_interval" => match value.parse::<f64>() {
                Ok(secs) => {
                    self.engine_reconcile_interval =
                        bounded(secs, MIN_DURATION).map_err(|reason| bad(&reason))?
                }
                Err(_) => self.ignored(source, key, value, "seconds, e.g. 2"),
            },
            // Any text, as in fleet: an address or a host name that others reach this machine
            // by (`fleetctl ssh` connects to it). Control characters (only possible from the
            // environment) would garble fleetctl's tables and the registry's records.
            "public_ip" => {
                if value.chars().any(char::is_control) {
                    return Err(bad("control characters are not allowed"));
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
            "systemd_user" => match boolean(value) {
                Some(b) => self.systemd_user = b,
                None => self.ignored(source, key, value, "true or false"),
            },
            "token_limit" => match go_int(value) {
                Some(n) if n < 1 => return Err(bad("must be at least 1")),
                Some(n) => self.token_limit = usize::try_from(n).unwrap_or(usize::MAX),
                None => self.ignored(source, key, value, "a whole number"),
            },
            "disable_engine" => match boolean(value) {
                Some(b) => self.disable_engine = b,
                None => self.ignored(source, key, value, "true or false"),
            },
            "disable_watches" => match boolean(value) {
                Some(b) => self.disable_watches = b,
                None => self.ignored(source, key, value, "true or false"),
            },
            "enable_grpc" => match boolean(value) {
                Some(_) => self.warnings.push(
                    "config option enable_grpc is ignored: agents and engine always talk \
                     through etcd"
                        .into(),
                ),
                None => self.ignored(source, key, value, "true or false"),
            },
            "verify_units" => match boolean(value) {
                Some(true) => self
                    .warnings
                    .push("Config option verify_units is no longer supported - ignoring".into()),
                Some(false) => {}
                None => self.ignored(source, key, value, "true or false"),
            },
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
            // not fleet's: refused, not ignored, as it guards the API
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

/// One `key=value` of fleet.conf's global part, with the line it starts on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub line: usize,
    /// Lowercased, as fleet's INI library stored keys.
    pub key: String,
    pub value: String,
}

/// Reads fleet.conf the way fleet v1.0 did (its `globalconf` on top of the `goini` library),
/// so that every file fleet ran with runs here with the same values:
///
/// - each line is trimmed; empty lines and lines starting with `#` or `;` are skipped;
/// - a line ending in `\` continues on the next one (trimmed), comment lines included;
/// - `[name]` starts a section; fleet read only the part before the first section, so keys
///   in sections are ignored (and `[]` goes back to that part, dropping what it had, as
///   fleet's library did);
/// - `key = "value"` and `key = 'value'` (the whole rest of the line quoted) give the text
///   between the quotes; otherwise the value ends at the first `#` or `;` (an inline comment)
///   and is trimmed; `key =` gives an empty value;
/// - keys are case-insensitive (stored lowercased) and cannot contain blanks or `=`; a later
///   key replaces an earlier one.
///
/// Errors (file and line named) only where fleet failed too: a line that is none of the
/// above, a continuation at the end of the file, a continuation that joins to nothing (fleet
/// crashed on both of the latter). Entries of the global part come back in file order.
///
/// Why not rust-ini: its rules differ from fleet's where fleet.conf files depend on them.
/// It ends a value at `#`/`;` only after a blank (`metadata=a=1;b=2` would keep `b=2`), does
/// not continue comment lines, reads `\t`-style escapes or keeps backslashes, lets a key run
/// over several lines until an `=` (a stray line would swallow the next option instead of
/// being an error) and treats `[]` as a section of its own. Matching fleet on top of it would
/// mean re-parsing each line first, which is this function.
pub fn parse_fleet_conf(name: &str, text: &str) -> Result<Vec<Entry>, ConfigError> {
    let syntax = |line: usize, reason: String| ConfigError::Syntax {
        source_name: name.to_string(),
        line,
        reason,
    };
    let mut out: Vec<Entry> = Vec::new();
    let mut global = true;
    // a final newline ends the last line; it does not begin another (empty) one, which a
    // backslash on the last line could otherwise continue onto
    let body = text.strip_suffix('\n').unwrap_or(text);
    let mut lines = body.split('\n').enumerate();
    while let Some((i, raw)) = lines.next() {
        let lineno = i + 1;
        let mut line = raw.trim().to_string();
        if line.is_empty() {
            continue;
        }
        while let Some(head) = line.strip_suffix('\\') {
            let head = head.to_string();
            let Some((_, next)) = lines.next() else {
                return Err(syntax(
                    lineno,
                    "the last line ends with a backslash: nothing follows to continue it".into(),
                ));
            };
            line = head + next.trim();
            if line.is_empty() {
                return Err(syntax(
                    lineno,
                    "a backslash continues this line onto an empty one: nothing to read".into(),
                ));
            }
        }
        if line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        if let Some(inner) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            global = inner.trim().is_empty();
            if global {
                out.clear();
            }
            continue;
        }
        let Some((key, value)) = key_value(&line) else {
            return Err(syntax(
                lineno,
                format!(
                    "expected key=value (a key without blanks), a [section] or a comment, \
                     found {line:?}"
                ),
            ));
        };
        if global {
            out.retain(|e| e.key != key);
            out.push(Entry {
                line: lineno,
                key,
                value,
            });
        }
    }
    Ok(out)
}

/// One trimmed, non-comment line as fleet's library read it: the key (lowercased) and value.
fn key_value(line: &str) -> Option<(String, String)> {
    let key_end = line.find(['=', ' ', '\t']).unwrap_or(line.len());
    if key_end == 0 {
        return None;
    }
    let (key, rest) = line.split_at(key_end);
    let rest = rest.trim_start_matches([' ', '\t']).strip_prefix('=')?;
    let rest = rest.trim_start_matches([' ', '\t']);
    for quote in ['"', '\''] {
        if let Some(inner) = rest.strip_prefix(quote).and_then(|r| r.strip_suffix(quote))
            && !inner.contains(quote)
        {
            return Some((key.to_lowercase(), inner.to_string()));
        }
    }
    let value = rest.split(['#', ';']).next().unwrap_or("").trim();
    Some((key.to_lowercase(), value.to_string()))
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

/// A whole number as Go's flag package read one (`strconv.ParseInt(s, 0, 64)`): an optional
/// sign, then decimal, `0x` hexadecimal, `0o`/`0` octal or `0b` binary, `_` between digits.
fn go_int(v: &str) -> Option<i64> {
    let (negative, digits) = match v.as_bytes().first()? {
        b'-' => (true, &v[1..]),
        b'+' => (false, &v[1..]),
        _ => (false, v),
    };
    let lower = digits.to_ascii_lowercase();
    let (radix, body) = if let Some(b) = lower.strip_prefix("0x") {
        (16, b)
    } else if let Some(b) = lower.strip_prefix("0o") {
        (8, b)
    } else if let Some(b) = lower.strip_prefix("0b") {
        (2, b)
    } else if lower.len() > 1 && lower.starts_with('0') {
        (8, &lower[1..])
    } else {
        (10, lower.as_str())
    };
    // `_` only between digits or right after a base prefix, as in Go's integer literals
    let prefixed = radix != 10;
    if body.ends_with('_') || body.contains("__") || (body.starts_with('_') && !prefixed) {
        return None;
    }
    let clean: String = body.chars().filter(|&c| c != '_').collect();
    if clean.is_empty() || !clean.chars().all(|c| c.is_digit(radix)) {
        return None;
    }
    let n = i64::from_str_radix(&clean, radix).ok()?;
    Some(if negative { -n } else { n })
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
            ("etcd_servers=127.0.0.1:2379\n", "etcd_servers"),
            ("token_limit=0\n", "token_limit"),
        ] {
            let err = load(text, &[]).expect_err(text);
            assert!(err.to_string().contains(key), "{err}");
            assert!(err.to_string().contains("fleet.conf line 1"), "{err}");
        }
        let err = load("# x\n\njust words\n", &[]).expect_err("no =");
        assert!(err.to_string().ends_with("fleet.conf line 3: expected key=value (a key without blanks), a [section] or a comment, found \"just words\""), "{err}");
    }

    /// fleet v1.0 dropped numeric and boolean values that did not parse (Go's flag package
    /// refused them and globalconf ignored the refusal) and started with the default; before,
    /// such a fleet.conf stopped fleetd. Now: the default, and a warning naming file and line.
    #[test]
    fn unparsable_typed_values_keep_the_default_as_in_fleet() {
        let c = load(
            "verbosity=high\ndisable_watches=maybe\nsystemd_user=yes\ntoken_limit=lots\n\
             engine_reconcile_interval=2s\netcd_request_timeout=\nenable_grpc=on\n\
             verify_units=nah\ndisable_engine=\n",
            &[("FLEET_VERBOSITY", "loud")],
        )
        .expect("fleet started with this file");
        let d = Config::default();
        assert_eq!(
            (
                c.verbosity,
                c.disable_watches,
                c.systemd_user,
                c.token_limit
            ),
            (0, false, false, 100)
        );
        assert_eq!(c.engine_reconcile_interval, d.engine_reconcile_interval);
        assert_eq!(c.etcd_request_timeout, d.etcd_request_timeout);
        assert!(!c.disable_engine);
        assert_eq!(c.warnings.len(), 10, "{:#?}", c.warnings);
        assert!(
            c.warnings[0]
                .contains("fleet.conf line 1: invalid value \"high\" for verbosity ignored"),
            "{}",
            c.warnings[0]
        );
        assert!(c.warnings[9].starts_with("FLEET_VERBOSITY: invalid value \"loud\""));
        // Go's integer syntax, as fleet's flags took it
        for (v, n) in [("0x10", 16), ("010", 8), ("+3", 3), ("1_0", 10), ("-2", 0)] {
            assert_eq!(
                load(&format!("verbosity={v}\n"), &[]).expect(v).verbosity,
                n,
                "{v}"
            );
        }
        assert_eq!(
            load("token_limit=0x20\n", &[]).expect("hex").token_limit,
            32
        );
        assert_eq!(go_int("08"), None);
        assert_eq!(go_int("_1"), None);
        assert_eq!(go_int("0x_1f"), Some(31));
    }

    /// fleet took any text for public_ip (a host name works for `fleetctl ssh`); before, only
    /// an IP literal was accepted and such a fleet.conf stopped fleetd.
    #[test]
    fn public_ip_is_any_text_as_in_fleet() {
        for v in ["172.18.0.11", "fd00::11", "node-1.example.com", ""] {
            let c = load(&format!("public_ip={v}\n"), &[]).expect(v);
            assert_eq!(c.public_ip, v);
        }
        let err = load("", &[("FLEET_PUBLIC_IP", "10.0.0.1\u{1b}[2J")]).expect_err("escape");
        assert!(err.to_string().contains("control characters"), "{err}");
    }

    fn entries(text: &str) -> Vec<(usize, String, String)> {
        parse_fleet_conf("fleet.conf", text)
            .expect(text)
            .into_iter()
            .map(|e| (e.line, e.key, e.value))
            .collect()
    }

    fn e(line: usize, key: &str, value: &str) -> (usize, String, String) {
        (line, key.to_string(), value.to_string())
    }

    /// Files fleet v1.0's parser read, and what it read from them. Before, single quotes,
    /// inline comments, continuations and sections stopped fleetd or gave other values.
    #[test]
    fn fleet_style_files() {
        for (text, want) in [
            // quotes: the whole rest of the line, comment characters kept inside
            (
                "public_ip = '10.0.0.1'\n",
                vec![e(1, "public_ip", "10.0.0.1")],
            ),
            (
                "metadata=\"a=1;b=#2\"\n",
                vec![e(1, "metadata", "a=1;b=#2")],
            ),
            ("metadata='a=1, b=2'\n", vec![e(1, "metadata", "a=1, b=2")]),
            // a quote not closing the line is text; the value ends at an inline comment
            (
                "public_ip = \"1.2.3.4\" # home\n",
                vec![e(1, "public_ip", "\"1.2.3.4\"")],
            ),
            (
                "agent_ttl = 30s # half a minute\n",
                vec![e(1, "agent_ttl", "30s")],
            ),
            ("metadata=a=1;b=2\n", vec![e(1, "metadata", "a=1")]),
            ("metadata=a=1#b=2\n", vec![e(1, "metadata", "a=1")]),
            ("public_ip = ; nothing\n", vec![e(1, "public_ip", "")]),
            ("public_ip=\n", vec![e(1, "public_ip", "")]),
            ("etcd_servers==x\n", vec![e(1, "etcd_servers", "=x")]),
            // continuations join trimmed lines; a continued comment swallows the next line
            (
                "etcd_servers=http://a:2379,\\\n    http://b:2379\nverbosity=1\n",
                vec![
                    e(1, "etcd_servers", "http://a:2379,http://b:2379"),
                    e(3, "verbosity", "1"),
                ],
            ),
            (
                "# old: \\\nverbosity=1\nagent_ttl=5s\n",
                vec![e(3, "agent_ttl", "5s")],
            ),
            (
                "metadata=\"a=1,\\\n b=2\"\n",
                vec![e(1, "metadata", "a=1,b=2")],
            ),
            // keys are case-insensitive; the last one wins
            (
                "Public_IP=1.1.1.1\nETCD_KEY_PREFIX=/x/\npublic_ip=2.2.2.2\n",
                vec![e(2, "etcd_key_prefix", "/x/"), e(3, "public_ip", "2.2.2.2")],
            ),
            // comments, blank lines, CRLF, indentation
            (
                "; fleet\r\n  # indented\r\n\r\n\tverbosity\t=\t2\r\n",
                vec![e(4, "verbosity", "2")],
            ),
            // only the part before the first section counts
            (
                "verbosity=1\n[Extra]\npublic_ip=9.9.9.9\n[ other ]\nagent_ttl=1s\n",
                vec![e(1, "verbosity", "1")],
            ),
            // `[]` goes back to it, dropping what it had (fleet's library did)
            (
                "verbosity=1\n[x]\nagent_ttl=1s\n[]\npublic_ip=3.3.3.3\n",
                vec![e(5, "public_ip", "3.3.3.3")],
            ),
            // a section header that is not closed at the line's end is a key line
            ("[x] =1\n", vec![e(1, "[x]", "1")]),
            ("", vec![]),
        ] {
            assert_eq!(entries(text), want, "{text:?}");
        }
    }

    /// What fleet v1.0 could not read either is an error naming file and line.
    #[test]
    fn what_fleet_could_not_read_is_an_error_with_its_line() {
        for (text, line, reason) in [
            ("verbosity=1\njust words\n", 2, "expected key=value"),
            ("my key = 1\n", 1, "expected key=value"),
            ("= 1\n", 1, "expected key=value"),
            ("[section\n", 1, "expected key=value"),
            ("\"quoted\"\n", 1, "expected key=value"),
            ("verbosity=1\npublic_ip=1.2.3.4\\", 2, "nothing follows"),
            // the same with the file's final newline (fleet's reader saw no further line)
            ("verbosity=1\npublic_ip=1.2.3.4\\\n", 2, "nothing follows"),
            ("public_ip=1.2.3.4 \\\r\n", 1, "nothing follows"),
            ("\n\\\n\n", 2, "onto an empty one"),
        ] {
            let err = parse_fleet_conf("/etc/fleet/fleet.conf", text).expect_err(text);
            let msg = err.to_string();
            assert!(
                msg.starts_with(&format!("/etc/fleet/fleet.conf line {line}: "))
                    && msg.contains(reason),
                "{text:?}: {msg}"
            );
        }
    }

    /// A whole fleet v1.0-style file, through `Config::load`.
    #[test]
    fn a_fleet_v1_conf_loads() {
        let c = load(
            "# fleet.conf as written for fleet v1.0\n\
             ETCD_SERVERS = 'http://10.0.0.1:2379,http://10.0.0.2:2379'\n\
             metadata = \"region=us-west,\\\n            disk=ssd\"\n\
             public_ip = node-1.example.com ; reached by name\n\
             agent_ttl=\"45s\"\n\
             \n\
             [unused]\n\
             verbosity = loud\n",
            &[],
        )
        .expect("fleet v1.0 ran with this file");
        assert_eq!(
            c.etcd_servers,
            vec!["http://10.0.0.1:2379", "http://10.0.0.2:2379"]
        );
        assert_eq!(c.metadata.len(), 2);
        assert_eq!(c.metadata.get("disk").map(String::as_str), Some("ssd"));
        assert_eq!(c.public_ip, "node-1.example.com");
        assert_eq!(c.agent_ttl, Duration::from_secs(45));
        assert_eq!(c.verbosity, 0);
        assert!(c.warnings.is_empty(), "{:?}", c.warnings);
        // bytes that are not UTF-8 (fleet read bytes) do not stop fleetd
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("fleet.conf");
        std::fs::write(&p, b"# caf\xe9\nverbosity=1\n").expect("write");
        let c = Config::load(Some(&p), std::iter::empty()).expect("latin-1 comment");
        assert_eq!(c.verbosity, 1);
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
