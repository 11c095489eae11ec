//! fleetctl's `--endpoint` for the API driver, read with fleet's rules.

use std::path::PathBuf;
use std::sync::Arc;

use tracing::warn;

use crate::ClientError;
use crate::connector::{Connector, TcpConnector, UnixConnector};

/// fleetctl's default: the unix socket `fleet.socket` provides.
pub const DEFAULT_ENDPOINT: &str = "unix:///var/run/fleet.sock";

/// Where fleetd's API is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    /// `unix:///path` (or `file:///path`).
    Unix { path: PathBuf },
    /// `http://host:port[/prefix]` or, with `tls`, `https://...`.
    Tcp {
        /// `host:port` as dialed (the default port added when missing).
        addr: String,
        /// `host:port` as given, for the Host header and URLs.
        authority: String,
        /// The host alone (no brackets, no port), for TLS server name checks.
        host: String,
        /// Path before `/fleet/v1/`, without a trailing `/` (usually empty).
        prefix: String,
        tls: bool,
    },
}

impl Endpoint {
    /// Parses an endpoint; of a comma-separated list only the first is used (with a warning),
    /// as in fleet.
    pub fn parse(text: &str) -> Result<Endpoint, ClientError> {
        let mut all = text.split(',');
        let first = all.next().unwrap_or("").trim();
        if all.next().is_some() {
            warn!("multiple endpoints provided but only the first ({first}) is used");
        }
        let Some((scheme, rest)) = first.split_once(':') else {
            return Err(ClientError::NoScheme);
        };
        let valid_scheme = scheme
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic())
            && scheme
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "+-.".contains(c));
        if !valid_scheme {
            return Err(ClientError::NoScheme);
        }
        let scheme = scheme.to_ascii_lowercase();
        let (authority, path) = match rest.strip_prefix("//") {
            Some(r) => match r.find('/') {
                Some(at) => (&r[..at], &r[at..]),
                None => (r, ""),
            },
            None => ("", rest),
        };
        let bad = |reason: &str| ClientError::BadEndpoint {
            endpoint: first.to_string(),
            reason: reason.to_string(),
        };
        match scheme.as_str() {
            "unix" | "file" => {
                // "unix://var/run/fleet.sock" (one slash too few) reads as host "var"
                if !authority.is_empty() {
                    return Err(ClientError::HostWithSocketScheme {
                        host: authority.to_string(),
                        scheme,
                    });
                }
                if path.is_empty() {
                    return Err(bad("no socket path"));
                }
                Ok(Endpoint::Unix {
                    path: PathBuf::from(path),
                })
            }
            "http" | "https" => {
                if authority.is_empty() {
                    return Err(bad("no host"));
                }
                let tls = scheme == "https";
                let (host, has_port) = split_host(authority);
                if host.is_empty() {
                    return Err(bad("no host"));
                }
                let addr = if has_port {
                    authority.to_string()
                } else {
                    format!("{authority}:{}", if tls { 443 } else { 80 })
                };
                Ok(Endpoint::Tcp {
                    addr,
                    authority: authority.to_string(),
                    host: host.to_string(),
                    prefix: path.trim_end_matches('/').to_string(),
                    tls,
                })
            }
            _ => Err(ClientError::UnsupportedScheme(scheme)),
        }
    }

    pub(crate) fn connector(&self) -> Arc<dyn Connector> {
        match self {
            Endpoint::Unix { path } => Arc::new(UnixConnector { path: path.clone() }),
            Endpoint::Tcp { addr, .. } => Arc::new(TcpConnector { addr: addr.clone() }),
        }
    }

    pub fn is_https(&self) -> bool {
        matches!(self, Endpoint::Tcp { tls: true, .. })
    }

    /// The host name TLS checks the server certificate against.
    pub(crate) fn host(&self) -> &str {
        match self {
            Endpoint::Unix { .. } => "domain-sock",
            Endpoint::Tcp { host, .. } => host,
        }
    }

    pub(crate) fn url_scheme(&self) -> &'static str {
        if self.is_https() { "https" } else { "http" }
    }

    /// The Host header; fleet's client sent `domain-sock` over unix sockets.
    pub(crate) fn host_header(&self) -> &str {
        match self {
            Endpoint::Unix { .. } => "domain-sock",
            Endpoint::Tcp { authority, .. } => authority,
        }
    }

    /// `/fleet/v1/`, after the endpoint's own path if it has one.
    pub(crate) fn base_path(&self) -> String {
        match self {
            Endpoint::Unix { .. } => "/fleet/v1/".to_string(),
            Endpoint::Tcp { prefix, .. } => format!("{prefix}/fleet/v1/"),
        }
    }
}

/// The host of `host[:port]` or `[v6][:port]`, and whether a port is given.
fn split_host(authority: &str) -> (&str, bool) {
    if let Some(rest) = authority.strip_prefix('[') {
        return match rest.split_once(']') {
            Some((host, after)) => (host, after.starts_with(':')),
            None => ("", false),
        };
    }
    match authority.rsplit_once(':') {
        Some((host, _)) => (host, true),
        None => (authority, false),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints() {
        let tcp =
            |addr: &str, authority: &str, host: &str, prefix: &str, tls: bool| Endpoint::Tcp {
                addr: addr.into(),
                authority: authority.into(),
                host: host.into(),
                prefix: prefix.into(),
                tls,
            };
        let cases: Vec<(&str, Result<Endpoint, &str>)> = vec![
            (
                DEFAULT_ENDPOINT,
                Ok(Endpoint::Unix {
                    path: "/var/run/fleet.sock".into(),
                }),
            ),
            (
                "unix:/run/fleet.sock",
                Ok(Endpoint::Unix {
                    path: "/run/fleet.sock".into(),
                }),
            ),
            (
                "file:///run/fleet.sock",
                Ok(Endpoint::Unix {
                    path: "/run/fleet.sock".into(),
                }),
            ),
            (
                "unix://var/run/fleet.sock",
                Err("unable to connect to host \"var\" with scheme \"unix\""),
            ),
            ("/var/run/fleet.sock", Err("URL scheme undefined")),
            (
                "http://10.0.0.1:49153",
                Ok(tcp(
                    "10.0.0.1:49153",
                    "10.0.0.1:49153",
                    "10.0.0.1",
                    "",
                    false,
                )),
            ),
            (
                "https://fleet.example:8443/api/",
                Ok(tcp(
                    "fleet.example:8443",
                    "fleet.example:8443",
                    "fleet.example",
                    "/api",
                    true,
                )),
            ),
            (
                "https://fleet.example",
                Ok(tcp(
                    "fleet.example:443",
                    "fleet.example",
                    "fleet.example",
                    "",
                    true,
                )),
            ),
            (
                "http://[::1]:49153",
                Ok(tcp("[::1]:49153", "[::1]:49153", "::1", "", false)),
            ),
            (
                "http://a:1,http://b:2",
                Ok(tcp("a:1", "a:1", "a", "", false)),
            ),
            ("ftp://a:1", Err("unsupported protocol scheme \"ftp\"")),
            ("http://", Err("invalid endpoint \"http://\": no host")),
        ];
        for (text, expected) in cases {
            let got = Endpoint::parse(text).map_err(|e| e.to_string());
            assert_eq!(got, expected.map_err(String::from), "{text}");
        }
        let e = Endpoint::parse("https://h:1/p").expect("valid");
        assert_eq!(
            (e.base_path(), e.host_header(), e.url_scheme()),
            ("/p/fleet/v1/".to_string(), "h:1", "https")
        );
    }
}
