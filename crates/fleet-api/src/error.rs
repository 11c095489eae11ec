//! Errors of setting up and running the API server, each naming what failed.

use std::path::PathBuf;

use thiserror::Error;

#[derive(Debug, Error)]
pub enum ServeError {
    #[error("binding unix socket {path}: {source}")]
    BindUnix {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("unix socket {0} is in use by another process")]
    UnixInUse(PathBuf),
    #[error("binding TCP address {addr}: {source}")]
    BindTcp {
        addr: String,
        source: std::io::Error,
    },
    #[error("socket activation: {0}")]
    Activation(String),
    #[error("reading TLS {what} file {path}: {reason}")]
    TlsFile {
        what: &'static str,
        path: PathBuf,
        reason: String,
    },
    #[error("TLS configuration: {0}")]
    Tls(String),
    #[error("TLS is only possible on TCP listeners")]
    TlsOnUnix,
    #[error("no listeners to serve the API on")]
    NoListeners,
}

impl From<crate::pem::PemError> for ServeError {
    fn from(e: crate::pem::PemError) -> ServeError {
        ServeError::TlsFile {
            what: e.what,
            path: e.path,
            reason: e.reason,
        }
    }
}
