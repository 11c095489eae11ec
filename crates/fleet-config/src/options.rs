//! The option table for people: what each of fleetd's options means, and each option's
//! current value in the syntax `fleet.conf` takes. `fleet.conf(5)` and the commented
//! `/etc/fleet/fleet.conf` of the Debian package are generated from it, so they list exactly
//! the options [`OPTIONS`](crate::OPTIONS) names, with the defaults of [`Config::default`].

use crate::Config;

/// One option of `fleet.conf`, as documented for users.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionDoc {
    /// The option's name in `fleet.conf` (`FLEET_` + upper case in the environment).
    pub name: &'static str,
    /// The syntax of its value, e.g. `duration` or `true|false`.
    pub value: &'static str,
    /// What it does, one paragraph.
    pub help: &'static str,
    /// Accepted for compatibility with fleet v1.0, but has no effect.
    pub ignored: bool,
}

const fn doc(name: &'static str, value: &'static str, help: &'static str) -> OptionDoc {
    OptionDoc {
        name,
        value,
        help,
        ignored: false,
    }
}

const fn ignored(name: &'static str, value: &'static str, help: &'static str) -> OptionDoc {
    OptionDoc {
        name,
        value,
        help,
        ignored: true,
    }
}

/// Every option of [`OPTIONS`](crate::OPTIONS), in the same order (a test holds them equal).
pub const OPTION_DOCS: &[OptionDoc] = &[
    doc(
        "verbosity",
        "integer",
        "Log level: 0 logs informational messages, 1 or more adds debug messages. \
         RUST_LOG, when set, overrides it.",
    ),
    doc(
        "etcd_servers",
        "URL[,URL...]",
        "The etcd endpoints to use, comma-separated (a bracketed, quoted list as fleet wrote \
         it is accepted too). Each starts with http:// or https://.",
    ),
    doc(
        "etcd_username",
        "name",
        "User name for etcd authentication; empty for none.",
    ),
    doc("etcd_password", "password", "Password of etcd_username."),
    doc(
        "etcd_keyfile",
        "path",
        "Private key of the client certificate presented to etcd (https endpoints).",
    ),
    doc(
        "etcd_certfile",
        "path",
        "Client certificate presented to etcd (https endpoints).",
    ),
    doc(
        "etcd_cafile",
        "path",
        "Certificate authority that signed etcd's server certificate; empty to use the \
         system's trusted authorities.",
    ),
    doc(
        "etcd_key_prefix",
        "prefix",
        "Where fleet keeps its data in etcd. Every machine of a cluster must use the same \
         prefix; clusters sharing an etcd need different ones.",
    ),
    doc(
        "etcd_request_timeout",
        "seconds",
        "How long one etcd request may take before it fails, in seconds (fractions allowed).",
    ),
    doc(
        "engine_reconcile_interval",
        "seconds",
        "How often the engine leader checks every unit's placement even when nothing \
         changed, in seconds.",
    ),
    doc(
        "public_ip",
        "IP address",
        "The address other machines and fleetctl users know this machine by; it is shown by \
         list-machines and used by fleetctl ssh. Empty: the local address fleetd reaches the \
         first etcd endpoint from, unless that is a loopback address.",
    ),
    doc(
        "metadata",
        "key=value[,key=value...]",
        "Attributes of this machine that units select with MachineMetadata= in [X-Fleet].",
    ),
    doc(
        "agent_ttl",
        "duration",
        "How long this machine stays in the cluster after fleetd stops renewing its presence \
         (it crashed or lost etcd); then its units are scheduled elsewhere. Go duration \
         syntax (30s, 1m30s) or seconds.",
    ),
    doc(
        "units_directory",
        "path",
        "Where fleetd writes the unit files of the units scheduled to this machine before \
         linking them into systemd.",
    ),
    doc(
        "systemd_user",
        "true|false",
        "Manage units in the calling user's systemd instance instead of the system instance.",
    ),
    doc(
        "token_limit",
        "integer",
        "How many units the API returns per page at most (list requests with nextPageToken).",
    ),
    ignored(
        "enable_grpc",
        "true|false",
        "fleet v1.0's experimental gRPC transport between engine and agents. Ignored: they \
         always talk through etcd.",
    ),
    doc(
        "disable_engine",
        "true|false",
        "Never take part in the engine leader election: this machine runs units but never \
         schedules them.",
    ),
    doc(
        "disable_watches",
        "true|false",
        "Do not watch etcd for changes: the engine re-reads it every engine_reconcile_interval \
         and the agent every two seconds.",
    ),
    ignored(
        "verify_units",
        "true|false",
        "fleet's signed units, removed before v1.0. Ignored (true logs a warning).",
    ),
    ignored(
        "authorized_keys_file",
        "path",
        "Keys for signed units, removed before v1.0. Ignored (a value logs a warning).",
    ),
    doc(
        "api_listen",
        "ADDRESS[,ADDRESS...]",
        "Where to serve the HTTP API when systemd did not pass listening sockets (fleet.socket): \
         unix:///path or host:port. A TCP address off loopback needs api_certfile and \
         api_keyfile, or api_allow_plain_tcp.",
    ),
    doc(
        "api_certfile",
        "path",
        "Server certificate for TCP API listeners, which then speak TLS; needs api_keyfile.",
    ),
    doc("api_keyfile", "path", "Private key of api_certfile."),
    doc(
        "api_client_cafile",
        "path",
        "Certificate authority that API clients' certificates must be signed by; clients \
         without such a certificate are refused. Needs api_certfile.",
    ),
    doc(
        "api_allow_plain_tcp",
        "true|false",
        "Allow api_listen to serve plain HTTP on a TCP address other machines can reach. \
         Anyone who reaches such a listener controls every machine of the cluster.",
    ),
    doc(
        "enable_dashboard",
        "true|false",
        "Serve the read-only cluster dashboard at /dashboard/ on the API's listeners, with \
         the API's TLS and client certificates.",
    ),
];

impl Config {
    /// The value of option `name` in the syntax [`Config::set`] takes (so setting it back
    /// changes nothing); `None` for a name that is not an option. Options that are ignored
    /// show fleet v1.0's default.
    pub fn option_text(&self, name: &str) -> Option<String> {
        let secs = |d: std::time::Duration| format!("{}", d.as_secs_f64());
        Some(match name {
            "verbosity" => self.verbosity.to_string(),
            "etcd_servers" => self.etcd_servers.join(","),
            "etcd_username" => self.etcd_username.clone(),
            "etcd_password" => self.etcd_password.clone(),
            "etcd_keyfile" => self.etcd_keyfile.clone(),
            "etcd_certfile" => self.etcd_certfile.clone(),
            "etcd_cafile" => self.etcd_cafile.clone(),
            "etcd_key_prefix" => self.etcd_key_prefix.clone(),
            "etcd_request_timeout" => secs(self.etcd_request_timeout),
            "engine_reconcile_interval" => secs(self.engine_reconcile_interval),
            "public_ip" => self.public_ip.clone(),
            "metadata" => self
                .metadata
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect::<Vec<_>>()
                .join(","),
            "agent_ttl" => format!("{}s", secs(self.agent_ttl)),
            "units_directory" => self.units_directory.display().to_string(),
            "systemd_user" => self.systemd_user.to_string(),
            "token_limit" => self.token_limit.to_string(),
            "enable_grpc" | "verify_units" => "false".into(),
            "authorized_keys_file" => String::new(),
            "disable_engine" => self.disable_engine.to_string(),
            "disable_watches" => self.disable_watches.to_string(),
            "api_listen" => self.api_listen.join(","),
            "api_certfile" => self.api_certfile.clone(),
            "api_keyfile" => self.api_keyfile.clone(),
            "api_client_cafile" => self.api_client_cafile.clone(),
            "api_allow_plain_tcp" => self.api_allow_plain_tcp.to_string(),
            "enable_dashboard" => self.enable_dashboard.to_string(),
            _ => return None,
        })
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::path::PathBuf;
    use std::time::Duration;

    use super::*;
    use crate::OPTIONS;

    #[test]
    fn every_option_is_documented_in_order() {
        let documented: Vec<&str> = OPTION_DOCS.iter().map(|d| d.name).collect();
        assert_eq!(documented, OPTIONS);
        for d in OPTION_DOCS {
            assert!(!d.help.is_empty() && !d.value.is_empty(), "{}", d.name);
        }
    }

    /// Each option's text, set back, gives the same configuration without warnings: for the
    /// defaults (what fleet.conf(5) shows) and for a configuration with no default left. Options
    /// that are ignored are accepted (enable_grpc warns whatever its value).
    #[test]
    fn option_text_round_trips() {
        let mut changed = Config {
            verbosity: 2,
            etcd_servers: vec!["https://10.0.0.1:2379".into(), "http://e:4001".into()],
            etcd_username: "u".into(),
            etcd_password: "p".into(),
            etcd_keyfile: "/k".into(),
            etcd_certfile: "/c".into(),
            etcd_cafile: "/ca".into(),
            etcd_key_prefix: "/x/".into(),
            etcd_request_timeout: Duration::from_millis(1500),
            engine_reconcile_interval: Duration::from_secs(7),
            public_ip: "10.0.0.9".into(),
            metadata: BTreeMap::from([("a".into(), "1".into()), ("b".into(), "2".into())]),
            agent_ttl: Duration::from_secs(90),
            units_directory: PathBuf::from("/u"),
            systemd_user: true,
            token_limit: 7,
            disable_engine: true,
            disable_watches: true,
            api_listen: vec!["unix:///a.sock".into(), "127.0.0.1:1".into()],
            api_certfile: "/ac".into(),
            api_keyfile: "/ak".into(),
            api_client_cafile: "/acc".into(),
            api_allow_plain_tcp: true,
            enable_dashboard: true,
            warnings: Vec::new(),
        };
        for config in [Config::default(), changed.clone()] {
            let mut again = config.clone();
            for d in OPTION_DOCS {
                let text = config.option_text(d.name).expect(d.name);
                again.set("test", d.name, &text).expect(d.name);
                if d.ignored {
                    // accepted, and at most a warning (enable_grpc always warns)
                    again.warnings.clear();
                }
            }
            assert_eq!(again, config);
        }
        assert_eq!(changed.option_text("nonsense"), None);
        changed.set("test", "agent_ttl", "1m30s").expect("set");
        assert_eq!(changed.option_text("agent_ttl").as_deref(), Some("90s"));
    }
}
