//! TLS for `https` endpoints: the server checked against `--ca-file` (or the system's roots),
//! and a client certificate from `--cert-file`/`--key-file` when given.

use std::path::Path;
use std::sync::Arc;

use fleet_api::pem;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;
use tokio_rustls::rustls::pki_types::ServerName;
use tokio_rustls::rustls::{ClientConfig, RootCertStore};

use crate::ClientError;
use crate::connector::Stream;

#[derive(Clone)]
pub(crate) struct ClientTls {
    connector: TlsConnector,
    server_name: ServerName<'static>,
}

impl ClientTls {
    pub(crate) fn load(
        host: &str,
        ca_file: Option<&Path>,
        cert_file: Option<&Path>,
        key_file: Option<&Path>,
    ) -> Result<ClientTls, ClientError> {
        let roots = match ca_file {
            Some(ca) => pem::read_roots("CA", ca)?,
            None => {
                let mut roots = RootCertStore::empty();
                let native = rustls_native_certs::load_native_certs();
                for c in native.certs {
                    let _ = roots.add(c);
                }
                roots
            }
        };
        let provider = Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
        let builder = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| ClientError::Tls(e.to_string()))?
            .with_root_certificates(roots);
        let mut config = match (cert_file, key_file) {
            (Some(cert), Some(key)) => {
                let chain = pem::read_certs("certificate", cert)?;
                let key_der = pem::read_key(key)?;
                builder.with_client_auth_cert(chain, key_der).map_err(|e| {
                    ClientError::Tls(format!("client certificate and key do not fit: {e}"))
                })?
            }
            (None, None) => builder.with_no_client_auth(),
            _ => {
                return Err(ClientError::Tls(
                    "--cert-file and --key-file must be given together".into(),
                ));
            }
        };
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        let server_name = ServerName::try_from(host.to_string())
            .map_err(|e| ClientError::Tls(format!("server name {host:?}: {e}")))?;
        Ok(ClientTls {
            connector: TlsConnector::from(Arc::new(config)),
            server_name,
        })
    }

    pub(crate) async fn connect(
        &self,
        stream: Box<dyn Stream>,
    ) -> std::io::Result<TlsStream<Box<dyn Stream>>> {
        self.connector
            .connect(self.server_name.clone(), stream)
            .await
    }
}
