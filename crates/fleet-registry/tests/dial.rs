//! `EtcdRegistry::connect_via`: every connection comes from the caller's dialer (fleetctl's
//! SSH tunnel), which sees the endpoint's real host name, and https etcd is verified against
//! that name, not the address the bytes happen to travel to.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use fleet_registry::{DialStream, Dialer, EtcdConfig, EtcdRegistry, Registry};
use fleet_testutil::{EtcdServer, free_port, wait_for};

/// Sends every connection to 127.0.0.1:`port`, whatever host it is asked for, and records
/// what it was asked for.
struct Redirect {
    port: u16,
    asked: Mutex<Vec<(String, u16)>>,
}

#[async_trait::async_trait]
impl Dialer for Redirect {
    async fn dial(&self, host: &str, port: u16) -> std::io::Result<Box<dyn DialStream>> {
        self.asked
            .lock()
            .expect("lock")
            .push((host.to_string(), port));
        let conn = tokio::net::TcpStream::connect(("127.0.0.1", self.port)).await?;
        Ok(Box::new(conn))
    }
}

fn redirect(port: u16) -> Arc<Redirect> {
    Arc::new(Redirect {
        port,
        asked: Mutex::new(Vec::new()),
    })
}

fn port_of(endpoint: &str) -> u16 {
    endpoint
        .rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .expect("port")
}

fn config(endpoints: &[String], ca: Option<&Path>) -> EtcdConfig {
    EtcdConfig {
        endpoints: endpoints.to_vec(),
        key_prefix: "/test/".into(),
        request_timeout: Duration::from_secs(3),
        ca_file: ca.map(Path::to_path_buf),
        ..Default::default()
    }
}

#[tokio::test]
async fn plain_etcd_through_a_dialer() {
    let etcd = EtcdServer::start();
    let dialer = redirect(port_of(etcd.endpoint()));
    // a name no resolver knows: only the dialer can reach it
    let cfg = config(&["http://etcd.invalid:2379".into()], None);
    let reg = EtcdRegistry::connect_via(&cfg, dialer.clone())
        .await
        .expect("connect");
    assert_eq!(reg.machines().await.expect("machines"), vec![]);
    let asked = dialer.asked.lock().expect("lock").clone();
    assert!(!asked.is_empty());
    assert!(
        asked
            .iter()
            .all(|a| *a == ("etcd.invalid".to_string(), 2379)),
        "{asked:?}"
    );
}

#[tokio::test]
async fn a_dead_endpoint_fails_over_to_the_next() {
    let etcd = EtcdServer::start();
    let live = port_of(etcd.endpoint());
    struct Pick {
        live: u16,
    }
    #[async_trait::async_trait]
    impl Dialer for Pick {
        async fn dial(&self, host: &str, _: u16) -> std::io::Result<Box<dyn DialStream>> {
            if host == "dead.invalid" {
                return Err(std::io::Error::other("connection refused"));
            }
            Ok(Box::new(
                tokio::net::TcpStream::connect(("127.0.0.1", self.live)).await?,
            ))
        }
    }
    let cfg = config(
        &[
            "http://dead.invalid:2379".into(),
            "http://live.invalid:2379".into(),
        ],
        None,
    );
    let reg = EtcdRegistry::connect_via(&cfg, Arc::new(Pick { live }))
        .await
        .expect("connect");
    let mut ok = false;
    for _ in 0..5 {
        if reg.machines().await.is_ok() {
            ok = true;
            break;
        }
    }
    assert!(ok, "requests never moved to the live endpoint");
}

/// An etcd serving https with a certificate for `etcd.test` only, signed by a test CA.
struct TlsEtcd {
    child: Child,
    port: u16,
    dir: tempfile::TempDir,
}

impl TlsEtcd {
    fn start() -> TlsEtcd {
        use rcgen::{
            BasicConstraints, CertificateParams, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
            KeyUsagePurpose,
        };
        let dir = tempfile::tempdir().expect("tempdir");
        let mut ca = CertificateParams::new(Vec::<String>::new()).expect("params");
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        ca.distinguished_name
            .push(rcgen::DnType::CommonName, "test ca");
        let ca_key = KeyPair::generate().expect("key");
        let ca_cert = ca.self_signed(&ca_key).expect("ca");
        let issuer = Issuer::new(ca, ca_key);
        let mut leaf = CertificateParams::new(vec!["etcd.test".to_string()]).expect("params");
        leaf.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let key = KeyPair::generate().expect("key");
        let cert = leaf.signed_by(&key, &issuer).expect("leaf");
        let write = |n: &str, s: String| std::fs::write(dir.path().join(n), s).expect("write");
        write("ca.pem", ca_cert.pem());
        write("server.pem", cert.pem());
        write("server-key.pem", key.serialize_pem());

        let port = free_port();
        let peer = free_port();
        let log = std::fs::File::create(dir.path().join("etcd.log")).expect("log");
        let child = Command::new("/usr/bin/etcd")
            .arg("--name=tls")
            .arg(format!("--data-dir={}", dir.path().join("data").display()))
            .arg(format!("--listen-client-urls=https://127.0.0.1:{port}"))
            .arg(format!("--advertise-client-urls=https://127.0.0.1:{port}"))
            .arg(format!(
                "--cert-file={}",
                dir.path().join("server.pem").display()
            ))
            .arg(format!(
                "--key-file={}",
                dir.path().join("server-key.pem").display()
            ))
            .arg(format!("--listen-peer-urls=http://127.0.0.1:{peer}"))
            .arg(format!(
                "--initial-advertise-peer-urls=http://127.0.0.1:{peer}"
            ))
            .arg(format!("--initial-cluster=tls=http://127.0.0.1:{peer}"))
            .arg("--log-level=error")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn etcd (is etcd-server installed?)");
        let up = wait_for(Duration::from_secs(20), || {
            std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
        });
        assert!(up, "tls etcd did not come up on port {port}");
        TlsEtcd { child, port, dir }
    }

    fn ca(&self) -> std::path::PathBuf {
        self.dir.path().join("ca.pem")
    }
}

impl Drop for TlsEtcd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test]
async fn https_through_a_dialer_is_verified_against_the_endpoint_name() {
    let etcd = TlsEtcd::start();
    // the certificate names etcd.test: verified against the endpoint's name, it passes
    let cfg = config(&["https://etcd.test:2379".into()], Some(&etcd.ca()));
    let reg = EtcdRegistry::connect_via(&cfg, redirect(etcd.port))
        .await
        .expect("connect");
    let mut ok = false;
    for _ in 0..20 {
        match reg.machines().await {
            Ok(_) => {
                ok = true;
                break;
            }
            // etcd may still be starting its gRPC server
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
    assert!(ok, "https etcd.test through the dialer failed");

    // the same bytes under another name fail verification: the name is checked
    let cfg = config(&["https://other.test:2379".into()], Some(&etcd.ca()));
    let reg = EtcdRegistry::connect_via(&cfg, redirect(etcd.port))
        .await
        .expect("connect");
    assert!(
        reg.machines().await.is_err(),
        "a certificate for etcd.test was accepted for other.test"
    );
}
