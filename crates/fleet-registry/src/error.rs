//! Errors of the registry, each naming what it was about.

use thiserror::Error;

pub type Result<T, E = RegistryError> = std::result::Result<T, E>;

#[derive(Debug, Error)]
pub enum RegistryError {
    #[error("unit {0} already exists")]
    AlreadyExists(String),
    #[error("unit {0} not found")]
    NotFound(String),
    #[error("etcd: {0}")]
    Etcd(#[from] etcd_client::Error),
    #[error("etcd request timed out after {0:?}")]
    Timeout(std::time::Duration),
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
    /// A remote driver's error (e.g. fleetd's API unreachable), shown as that driver words it.
    #[error(transparent)]
    Remote(Box<dyn std::error::Error + Send + Sync>),
}

impl RegistryError {
    /// True for errors that say etcd could not be reached (as opposed to a refusal).
    pub fn is_unavailable(&self) -> bool {
        matches!(
            self,
            RegistryError::Etcd(_) | RegistryError::Timeout(_) | RegistryError::Remote(_)
        )
    }
}
