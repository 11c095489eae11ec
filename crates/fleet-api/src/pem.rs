//! PEM files for TLS (certificate chains, CA bundles, private keys), read the same way by the
//! API server and its client, with errors that name the file and what it was for.

use std::path::{Path, PathBuf};

use tokio_rustls::rustls::RootCertStore;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// A PEM file that could not be used: `what` it was for (`certificate`, `key`, `CA`, ...),
/// its path, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PemError {
    pub what: &'static str,
    pub path: PathBuf,
    pub reason: String,
}

impl PemError {
    fn new(what: &'static str, path: &Path, reason: impl Into<String>) -> PemError {
        PemError {
            what,
            path: path.to_path_buf(),
            reason: reason.into(),
        }
    }
}

/// Every certificate in `path`; a file without one is an error.
pub fn read_certs(
    what: &'static str,
    path: &Path,
) -> Result<Vec<CertificateDer<'static>>, PemError> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| PemError::new(what, path, e.to_string()))?;
    if certs.is_empty() {
        return Err(PemError::new(what, path, "no certificate found"));
    }
    Ok(certs)
}

/// The certificates in `path` as trust roots.
pub fn read_roots(what: &'static str, path: &Path) -> Result<RootCertStore, PemError> {
    let mut roots = RootCertStore::empty();
    for c in read_certs(what, path)? {
        roots
            .add(c)
            .map_err(|e| PemError::new(what, path, e.to_string()))?;
    }
    Ok(roots)
}

/// The private key in `path`.
pub fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, PemError> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| PemError::new("key", path, e.to_string()))
}
