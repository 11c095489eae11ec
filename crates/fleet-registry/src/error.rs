//! Errors of the registry, each naming what it was about.

use std::time::Duration;

use thiserror::Error;

pub type Result<T, E = RegistryError> = std::result::Result<T, E>;

#[derive(Debug, Error)]
pub enum RegistryError {
    #[error("unit {0} already exists")]
    AlreadyExists(String),
    #[error("unit {0} not found")]
    NotFound(String),
    /// Connecting to etcd failed (before any request).
    #[error("etcd: {0}")]
    Connect(#[from] etcd_client::Error),
    /// One etcd request failed: which operation, on which key (or the first of its keys).
    #[error("{op} {key}: etcd: {source}")]
    Etcd {
        op: &'static str,
        key: String,
        #[source]
        source: etcd_client::Error,
    },
    #[error("{op} {key}: etcd request timed out after {after:?}")]
    Timeout {
        op: &'static str,
        key: String,
        after: Duration,
    },
    /// The store cannot be reached (the in-memory store's partition, for tests).
    #[error("{op} {key}: registry unreachable")]
    Unreachable { op: &'static str, key: String },
    #[error("invalid value at {key}: {reason}")]
    BadValue { key: String, reason: String },
    #[error("unit body {0} missing from the registry")]
    MissingBody(String),
    #[error(
        "machine ID {id} is already registered by another fleetd (public IP {ip}); refusing to join"
    )]
    DuplicateMachine { id: String, ip: String },
    #[error("no longer the engine leader")]
    NotLeader,
    #[error("invalid etcd configuration: {0}")]
    Config(String),
    /// A remote driver's error (e.g. fleetd's API unreachable or answering an error), shown
    /// as that driver words it; the driver gets its own error back by downcasting.
    #[error(transparent)]
    Remote(Box<dyn std::error::Error + Send + Sync>),
}

impl RegistryError {
    /// True for errors that say the registry could not be reached (as opposed to a refusal).
    pub fn is_unavailable(&self) -> bool {
        match self {
            RegistryError::Etcd { source, .. } => !refusal(source),
            RegistryError::Connect(_)
            | RegistryError::Timeout { .. }
            | RegistryError::Unreachable { .. }
            | RegistryError::Remote(_) => true,
            _ => false,
        }
    }

    /// True when etcd answered and refused this request itself (permission denied on its key,
    /// a value or a request too large, no space left): asking again fails again, while
    /// requests about other keys may well succeed. A caller working through many keys skips
    /// this one instead of giving up on all of them.
    pub fn is_refused(&self) -> bool {
        matches!(self, RegistryError::Etcd { source, .. } if refusal(source))
    }
}

/// Whether etcd's answer refuses the request (its keys, its size, the space it needs) rather
/// than saying the member cannot serve now.
fn refusal(e: &etcd_client::Error) -> bool {
    match e {
        etcd_client::Error::GRpcStatus(s) => match s.code() {
            tonic::Code::PermissionDenied
            | tonic::Code::InvalidArgument
            | tonic::Code::OutOfRange => true,
            // no space left, unless it is an overloaded member saying "too many requests"
            tonic::Code::ResourceExhausted => !s.message().contains("too many requests"),
            _ => false,
        },
        _ => false,
    }
}
