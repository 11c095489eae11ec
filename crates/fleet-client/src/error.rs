//! What can go wrong talking to fleetd's API, with fleet's wording where fleetctl printed it.

use std::path::PathBuf;
use std::time::Duration;

use fleet_registry::RegistryError;
use thiserror::Error;

/// A failure of the HTTP driver. `Display` follows what fleet's Go client printed
/// (`Get http://domain-sock/fleet/v1/units?alt=json: dial unix /var/run/fleet.sock: ...`,
/// `googleapi: Error 404: unit does not exist`); [`ClientError::hint`] says what to check.
#[derive(Debug, Error)]
pub enum ClientError {
    #[error("URL scheme undefined")]
    NoScheme,
    #[error("unable to connect to host {host:?} with scheme {scheme:?}")]
    HostWithSocketScheme { host: String, scheme: String },
    #[error("unsupported protocol scheme {0:?}")]
    UnsupportedScheme(String),
    #[error("invalid endpoint {endpoint:?}: {reason}")]
    BadEndpoint { endpoint: String, reason: String },
    #[error("reading TLS {what} file {path}: {reason}")]
    TlsFile {
        what: &'static str,
        path: PathBuf,
        reason: String,
    },
    #[error("TLS configuration: {0}")]
    Tls(String),
    /// fleetd could not be reached at all.
    #[error("{op} {url}: dial {target}: {reason}")]
    Unreachable {
        op: String,
        url: String,
        target: String,
        reason: String,
        hint: String,
    },
    #[error("{op} {url}: no response within {after:?}")]
    Timeout {
        op: String,
        url: String,
        after: Duration,
    },
    /// The connection broke, or TLS failed, after it was made.
    #[error("{op} {url}: {reason}")]
    Transport {
        op: String,
        url: String,
        reason: String,
    },
    /// fleetd answered with an error status.
    #[error("{}", api_text(*.code, .message, .body))]
    Api {
        code: u16,
        message: String,
        body: String,
    },
    /// fleetd answered something this client cannot read.
    #[error("{op} {url}: unreadable response: {reason}")]
    BadResponse {
        op: String,
        url: String,
        reason: String,
    },
}

/// googleapi's formatting of an error response.
fn api_text(code: u16, message: &str, body: &str) -> String {
    if message.is_empty() {
        format!("googleapi: got HTTP response code {code} with body: {body}")
    } else {
        format!("googleapi: Error {code}: {message}")
    }
}

impl ClientError {
    /// What the user should check next, when there is something to say.
    pub fn hint(&self) -> Option<&str> {
        match self {
            ClientError::Unreachable { hint, .. } => Some(hint),
            ClientError::Timeout { .. } => {
                Some("fleetd did not answer in time; try a larger --request-timeout")
            }
            _ => None,
        }
    }

    /// True when fleetd could not be reached or did not answer (as opposed to a refusal).
    pub fn is_unreachable(&self) -> bool {
        matches!(
            self,
            ClientError::Unreachable { .. }
                | ClientError::Timeout { .. }
                | ClientError::Transport { .. }
        )
    }

    /// The HTTP status of an API error response.
    pub fn status(&self) -> Option<u16> {
        match self {
            ClientError::Api { code, .. } => Some(*code),
            _ => None,
        }
    }

    /// Finds the client error carried by a [`RegistryError`] that [`crate::HttpRegistry`]
    /// returned, so that fleetctl can print it (and its hint) in fleet's words.
    pub fn from_registry(e: &RegistryError) -> Option<&ClientError> {
        match e {
            RegistryError::Remote(inner) => inner.downcast_ref::<ClientError>(),
            _ => None,
        }
    }
}

impl From<fleet_api::pem::PemError> for ClientError {
    fn from(e: fleet_api::pem::PemError) -> ClientError {
        ClientError::TlsFile {
            what: e.what,
            path: e.path,
            reason: e.reason,
        }
    }
}

/// Carries a client error through the [`fleet_registry::Registry`] trait.
///
/// It travels as [`RegistryError::Remote`] (`is_unavailable()` is true, as for any failure
/// of the driver), from where [`ClientError::from_registry`] gets it back.
pub(crate) fn to_registry(e: ClientError) -> RegistryError {
    RegistryError::Remote(Box::new(e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_are_fleets() {
        let cases: Vec<(ClientError, &str)> = vec![
            (
                ClientError::Api {
                    code: 404,
                    message: "unit does not exist".into(),
                    body: String::new(),
                },
                "googleapi: Error 404: unit does not exist",
            ),
            (
                ClientError::Api {
                    code: 500,
                    message: String::new(),
                    body: "{\"error\":{\"code\":500,\"message\":\"\"}}".into(),
                },
                "googleapi: got HTTP response code 500 with body: {\"error\":{\"code\":500,\"message\":\"\"}}",
            ),
            (
                ClientError::Unreachable {
                    op: "Get".into(),
                    url: "http://domain-sock/fleet/v1/units?alt=json".into(),
                    target: "unix /var/run/fleet.sock".into(),
                    reason: "connect: no such file or directory".into(),
                    hint: String::new(),
                },
                "Get http://domain-sock/fleet/v1/units?alt=json: dial unix /var/run/fleet.sock: connect: no such file or directory",
            ),
            (
                ClientError::HostWithSocketScheme {
                    host: "var".into(),
                    scheme: "unix".into(),
                },
                "unable to connect to host \"var\" with scheme \"unix\"",
            ),
        ];
        for (e, text) in cases {
            assert_eq!(e.to_string(), text);
        }
    }

    #[test]
    fn survives_the_registry_trait() {
        let e = to_registry(ClientError::NoScheme);
        assert!(matches!(e, RegistryError::Remote(_)));
        assert!(e.is_unavailable());
        assert!(matches!(
            ClientError::from_registry(&e),
            Some(ClientError::NoScheme)
        ));
        assert!(ClientError::from_registry(&RegistryError::NotFound("a.service".into())).is_none());
    }
}
