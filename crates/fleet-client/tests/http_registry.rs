//! HttpRegistry against the real API server in front of a private etcd: everything the
//! etcd driver does, read back through HTTP, must look the same; plus unix sockets, TLS with
//! client certificates, custom connectors, and the errors a user sees when fleetd is away.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use fleet_api::{ApiConfig, Listener, TlsFiles, bind_tcp, bind_unix, load_tls, serve};
use fleet_client::{ClientConfig, ClientError, Connector, HttpRegistry, Stream};
use fleet_registry::{
    EngineOp, EtcdConfig, EtcdRegistry, MachineRecord, Registry, RegistryError, StateRecord,
};
use fleet_testutil::EtcdServer;
use fleet_unit::{TargetState, UnitFile, UnitName};
use tokio::sync::oneshot;

struct Server {
    _etcd: EtcdServer,
    etcd_reg: EtcdRegistry,
    stop: Option<oneshot::Sender<()>>,
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
    }
}

/// A private etcd, its registry, and the API server on `listener`.
async fn start(listener: Listener, config: ApiConfig) -> Server {
    let etcd = EtcdServer::start();
    let cfg = EtcdConfig {
        endpoints: vec![etcd.endpoint().to_string()],
        key_prefix: "/test/".into(),
        request_timeout: Duration::from_secs(3),
        ..Default::default()
    };
    let reg = EtcdRegistry::connect(&cfg).await.expect("connect to etcd");
    reg.units().await.expect("etcd answers");
    let (tx, rx) = oneshot::channel::<()>();
    tokio::spawn(serve(
        vec![listener],
        Arc::new(reg.clone()),
        config,
        async {
            let _ = rx.await;
        },
    ));
    Server {
        _etcd: etcd,
        etcd_reg: reg,
        stop: Some(tx),
    }
}

fn client(endpoint: &str) -> HttpRegistry {
    HttpRegistry::new(&ClientConfig {
        endpoint: endpoint.into(),
        request_timeout: Duration::from_secs(5),
        ..ClientConfig::default()
    })
    .expect("valid client config")
}

fn name(s: &str) -> UnitName {
    UnitName::parse(s).expect("valid name")
}

fn file(s: &str) -> UnitFile {
    UnitFile::parse(s).expect("valid unit file")
}

fn machine(id: &str) -> MachineRecord {
    MachineRecord {
        version: 1,
        id: id.into(),
        public_ip: format!("10.0.0.{}", id.len()),
        metadata: BTreeMap::from([("region".into(), "east".into())]),
        agent_version: "1.0.0".into(),
        token: format!("token-{id}"),
    }
}

fn state(unit: &str, machine: &str, active: &str) -> StateRecord {
    StateRecord {
        version: 1,
        name: unit.into(),
        machine_id: machine.into(),
        hash: "1c6fb6f3684bafb0c173d8b8b957ceff031180c1".into(),
        load_state: "loaded".into(),
        active_state: active.into(),
        sub_state: "running".into(),
        agent_state: if active == "active" {
            TargetState::Launched
        } else {
            TargetState::Loaded
        },
        reason: None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_trips_match_the_etcd_driver() {
    let listener = bind_tcp("127.0.0.1:0").await.expect("bind");
    let addr = listener.tcp_addr().expect("addr");
    let srv = start(
        listener,
        ApiConfig {
            token_limit: 2,
            ..ApiConfig::default()
        },
    )
    .await;
    let etcd = &srv.etcd_reg;
    let http = client(&format!("http://{addr}"));
    let dynamic: Arc<dyn Registry> = Arc::new(http.clone());

    // units: create, duplicate, read back
    let hello = file("[Unit]\nDescription=hi\n\n[Service]\nExecStart=/bin/sleep 100\n");
    let global = file("[Service]\nExecStart=/bin/true\n\n[X-Fleet]\nGlobal=true\n");
    for i in 1..=4 {
        dynamic
            .create_unit(
                &name(&format!("u{i}.service")),
                &hello,
                TargetState::Launched,
            )
            .await
            .expect("create");
    }
    dynamic
        .create_unit(&name("g.service"), &global, TargetState::Loaded)
        .await
        .expect("create global");
    dynamic
        .create_unit(&name("t@.service"), &hello, TargetState::Inactive)
        .await
        .expect("create template");
    let dup = dynamic
        .create_unit(&name("u1.service"), &hello, TargetState::Inactive)
        .await;
    assert!(
        matches!(dup, Err(RegistryError::AlreadyExists(ref n)) if n == "u1.service"),
        "{dup:?}"
    );
    let other = dynamic
        .create_unit(&name("u1.service"), &global, TargetState::Inactive)
        .await;
    assert!(
        matches!(other, Err(RegistryError::AlreadyExists(_))),
        "{other:?}"
    );
    // the duplicate attempts changed nothing
    assert_eq!(
        etcd.unit(&name("u1.service"))
            .await
            .expect("read")
            .expect("u1")
            .desired,
        TargetState::Launched
    );

    // placement and a reason, written as the engine does
    let leadership = etcd
        .campaign("m1", Duration::from_secs(10))
        .await
        .expect("campaign")
        .expect("leader");
    let lease1 = etcd
        .register_machine(&machine("m1"), Duration::from_secs(30))
        .await
        .expect("register m1");
    let lease2 = etcd
        .register_machine(&machine("m22"), Duration::from_secs(30))
        .await
        .expect("register m22");
    let _lease3 = etcd
        .register_machine(&machine("m333"), Duration::from_secs(30))
        .await
        .expect("register m333");
    etcd.apply(
        &leadership,
        &[
            EngineOp::Schedule {
                unit: "u1.service".into(),
                machine: "m1".into(),
                hash: hello.hash(),
                desired: TargetState::Launched,
            },
            EngineOp::SetReason {
                unit: "u2.service".into(),
                reason: "no machines match".into(),
            },
        ],
    )
    .await
    .expect("engine writes");
    etcd.publish_state(
        "u1.service",
        "m1",
        // a report about the unit's present body (another one would leave it inactive)
        Some(&StateRecord {
            hash: hello.hash().to_string(),
            ..state("u1.service", "m1", "active")
        }),
        &lease1,
    )
    .await
    .expect("publish");
    etcd.publish_state(
        "g.service",
        "m1",
        Some(&state("g.service", "m1", "inactive")),
        &lease1,
    )
    .await
    .expect("publish");
    etcd.publish_state(
        "g.service",
        "m22",
        Some(&state("g.service", "m22", "active")),
        &lease2,
    )
    .await
    .expect("publish");

    // the same views through both drivers (HTTP pages through token_limit 2)
    let via_http = dynamic.units().await.expect("units over http");
    assert_eq!(via_http, etcd.units().await.expect("units from etcd"));
    assert_eq!(via_http.len(), 6);
    let u1 = dynamic
        .unit(&name("u1.service"))
        .await
        .expect("get")
        .expect("u1");
    assert_eq!(
        (u1.machine_id.as_deref(), u1.current, u1.hash),
        (Some("m1"), TargetState::Launched, hello.hash())
    );
    assert_eq!(
        dynamic
            .unit(&name("u2.service"))
            .await
            .expect("get")
            .expect("u2")
            .reason
            .as_deref(),
        Some("no machines match")
    );
    assert!(
        dynamic
            .unit(&name("g.service"))
            .await
            .expect("get")
            .expect("g")
            .global
    );
    assert_eq!(
        dynamic.unit(&name("nosuch.service")).await.expect("get"),
        None
    );

    assert_eq!(
        dynamic.unit_states().await.expect("states"),
        etcd.unit_states().await.expect("states")
    );
    let http_machines = dynamic.machines().await.expect("machines");
    let etcd_machines = etcd.machines().await.expect("machines");
    let strip = |ms: Vec<fleet_registry::MachineView>| {
        ms.into_iter()
            .map(|m| (m.id, m.public_ip, m.metadata))
            .collect::<Vec<_>>()
    };
    assert_eq!(strip(http_machines), strip(etcd_machines));

    // desired state (every one of them, down to inactive), templates, destroy
    for state in [
        TargetState::Launched,
        TargetState::Inactive,
        TargetState::Loaded,
    ] {
        dynamic
            .set_desired_state(&name("u3.service"), state)
            .await
            .unwrap_or_else(|e| panic!("set {state}: {e}"));
        assert_eq!(
            etcd.unit(&name("u3.service"))
                .await
                .expect("read")
                .expect("u3")
                .desired,
            state
        );
    }
    let missing = dynamic
        .set_desired_state(&name("nosuch.service"), TargetState::Loaded)
        .await;
    assert!(
        matches!(missing, Err(RegistryError::NotFound(_))),
        "{missing:?}"
    );
    let template = dynamic
        .set_desired_state(&name("t@.service"), TargetState::Launched)
        .await
        .expect_err("template");
    let api = ClientError::from_registry(&template).expect("an API error");
    assert_eq!(
        api.to_string(),
        "googleapi: Error 400: cannot activate template \"t@.service\""
    );
    assert!(
        dynamic
            .destroy_unit(&name("u4.service"))
            .await
            .expect("destroy")
    );
    assert!(
        !dynamic
            .destroy_unit(&name("u4.service"))
            .await
            .expect("destroy again")
    );

    // invalid units are refused with fleet's message
    let bad = file("[Service]\nExecStart=/bin/true\n\n[X-Fleet]\nMachineID=abc\nGlobal=true\n");
    let err = dynamic
        .create_unit(&name("bad.service"), &bad, TargetState::Launched)
        .await
        .expect_err("invalid");
    assert_eq!(
        ClientError::from_registry(&err)
            .map(|e| e.to_string())
            .as_deref(),
        Some("googleapi: Error 400: MachineID cannot be used with Global")
    );

    // metadata, also for a machine that is not there
    dynamic
        .set_machine_metadata("m1", "disk", Some("ssd"))
        .await
        .expect("add");
    dynamic
        .set_machine_metadata("m1", "region", Some("west"))
        .await
        .expect("replace");
    dynamic
        .set_machine_metadata("m9", "role", Some("db"))
        .await
        .expect("add for absent machine");
    let m1 = dynamic
        .machines()
        .await
        .expect("machines")
        .into_iter()
        .find(|m| m.id == "m1")
        .expect("m1");
    assert_eq!(
        m1.metadata,
        BTreeMap::from([
            ("disk".into(), "ssd".into()),
            ("region".into(), "west".into())
        ])
    );
    dynamic
        .set_machine_metadata("m1", "disk", None)
        .await
        .expect("remove");
    assert_eq!(
        etcd.machine_metadata("m1").await.expect("metadata"),
        BTreeMap::from([("region".into(), "west".into())])
    );
    assert_eq!(
        etcd.machine_metadata("m9").await.expect("metadata"),
        BTreeMap::from([("role".into(), "db".into())])
    );
    let bad_key = dynamic
        .set_machine_metadata("m1", "a b", Some("x"))
        .await
        .expect_err("bad key");
    assert_eq!(
        ClientError::from_registry(&bad_key).and_then(ClientError::status),
        Some(400)
    );

    // server-side filters
    let g_states = http
        .wire_states(None, Some("g.service"))
        .await
        .expect("filtered");
    assert_eq!(
        g_states
            .iter()
            .map(|s| s.machine_id.as_str())
            .collect::<Vec<_>>(),
        ["m1", "m22"]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unix_socket_endpoint_and_custom_connector() {
    let dir = tempfile::tempdir().expect("tempdir");
    let sock = dir.path().join("fleet.sock");
    let srv = start(bind_unix(&sock).expect("bind"), ApiConfig::default()).await;
    let http = client(&format!("unix://{}", sock.display()));
    http.create_unit(
        &name("a.service"),
        &file("[Service]\nExecStart=/bin/true\n"),
        TargetState::Launched,
    )
    .await
    .expect("create over unix socket");
    assert_eq!(srv.etcd_reg.units().await.expect("units").len(), 1);

    /// Dials the socket itself and counts connections, like a tunnel would.
    struct Counting {
        path: std::path::PathBuf,
        dials: AtomicUsize,
    }
    #[async_trait]
    impl Connector for Counting {
        async fn connect(&self) -> std::io::Result<Box<dyn Stream>> {
            self.dials.fetch_add(1, Ordering::SeqCst);
            Ok(Box::new(tokio::net::UnixStream::connect(&self.path).await?))
        }
        fn target(&self) -> String {
            "tunnel".into()
        }
    }
    let counting = Arc::new(Counting {
        path: sock.clone(),
        dials: AtomicUsize::new(0),
    });
    let tunneled = HttpRegistry::new(&ClientConfig {
        // the endpoint as seen from the far side of the tunnel
        endpoint: "unix:///var/run/fleet.sock".into(),
        connector: Some(counting.clone()),
        ..ClientConfig::default()
    })
    .expect("config");
    assert_eq!(tunneled.units().await.expect("units").len(), 1);
    assert_eq!(counting.dials.load(Ordering::SeqCst), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_when_fleetd_is_not_there() {
    // no socket
    let err = client("unix:///nonexistent/fleet.sock")
        .units()
        .await
        .expect_err("no fleetd");
    assert!(err.is_unavailable());
    let e = ClientError::from_registry(&err).expect("client error");
    assert_eq!(
        e.to_string(),
        "Get http://domain-sock/fleet/v1/units?alt=json: dial unix /nonexistent/fleet.sock: connect: no such file or directory"
    );
    assert_eq!(
        e.hint(),
        Some("is fleetd running? check 'systemctl status fleet.socket fleet.service'")
    );

    // nothing listening on the port: a socket bound (so no other test can take the port) but
    // never listening refuses connections
    let bound = tokio::net::TcpSocket::new_v4().expect("socket");
    bound
        .bind("127.0.0.1:0".parse().expect("addr"))
        .expect("bind");
    let port = bound.local_addr().expect("addr").port();
    let err = client(&format!("http://127.0.0.1:{port}"))
        .machines()
        .await
        .expect_err("refused");
    let e = ClientError::from_registry(&err).expect("client error");
    assert_eq!(
        e.to_string(),
        format!(
            "Get http://127.0.0.1:{port}/fleet/v1/machines?alt=json: dial tcp 127.0.0.1:{port}: connect: connection refused"
        )
    );
    assert!(e.hint().is_some_and(|h| h.contains("127.0.0.1")), "{e:?}");

    // something that accepts and never answers: bounded by the request timeout
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = silent.local_addr().expect("addr");
    let holder = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = silent.accept().await {
            held.push(s);
        }
    });
    let slow = HttpRegistry::new(&ClientConfig {
        endpoint: format!("http://{addr}"),
        request_timeout: Duration::from_millis(300),
        ..ClientConfig::default()
    })
    .expect("config");
    let start = std::time::Instant::now();
    let err = slow.units().await.expect_err("timeout");
    println!(
        "request against a silent server failed after {:?}",
        start.elapsed()
    );
    assert!(
        matches!(
            ClientError::from_registry(&err),
            Some(ClientError::Timeout { .. })
        ),
        "{err:?}"
    );
    holder.abort();
}

struct Pki {
    dir: tempfile::TempDir,
}

impl Pki {
    /// A CA, a server certificate for 127.0.0.1, and a client certificate, all as PEM files.
    fn new() -> Pki {
        use rcgen::{
            BasicConstraints, CertificateParams, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
            KeyUsagePurpose,
        };
        let dir = tempfile::tempdir().expect("tempdir");
        let write = |n: &str, s: String| std::fs::write(dir.path().join(n), s).expect("write pem");
        let ca = |name: &str| {
            let mut p = CertificateParams::new(Vec::<String>::new()).expect("params");
            p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            p.key_usages = vec![
                KeyUsagePurpose::KeyCertSign,
                KeyUsagePurpose::DigitalSignature,
            ];
            p.distinguished_name.push(rcgen::DnType::CommonName, name);
            let key = KeyPair::generate().expect("key");
            let cert = p.self_signed(&key).expect("self-signed");
            (cert, Issuer::new(p, key))
        };
        let (ca_cert, issuer) = ca("test ca");
        let (other_ca, _) = ca("other ca");
        let leaf = |sans: Vec<String>, usage: ExtendedKeyUsagePurpose| {
            let mut p = CertificateParams::new(sans).expect("params");
            p.extended_key_usages = vec![usage];
            let key = KeyPair::generate().expect("key");
            let cert = p.signed_by(&key, &issuer).expect("signed");
            (cert.pem(), key.serialize_pem())
        };
        let (srv_cert, srv_key) = leaf(
            vec!["127.0.0.1".into(), "localhost".into()],
            ExtendedKeyUsagePurpose::ServerAuth,
        );
        let (cli_cert, cli_key) =
            leaf(vec!["fleetctl".into()], ExtendedKeyUsagePurpose::ClientAuth);
        write("ca.pem", ca_cert.pem());
        write("other-ca.pem", other_ca.pem());
        write("server.pem", srv_cert);
        write("server-key.pem", srv_key);
        write("client.pem", cli_cert);
        write("client-key.pem", cli_key);
        Pki { dir }
    }

    fn path(&self, n: &str) -> std::path::PathBuf {
        self.dir.path().join(n)
    }
}

fn tls_client(endpoint: &str, ca: &Path, cert: Option<(&Path, &Path)>) -> HttpRegistry {
    HttpRegistry::new(&ClientConfig {
        endpoint: endpoint.into(),
        request_timeout: Duration::from_secs(5),
        ca_file: Some(ca.to_path_buf()),
        cert_file: cert.map(|c| c.0.to_path_buf()),
        key_file: cert.map(|c| c.1.to_path_buf()),
        connector: None,
    })
    .expect("client config")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_with_required_client_certificates() {
    let pki = Pki::new();
    let tls = load_tls(&TlsFiles {
        cert_file: pki.path("server.pem"),
        key_file: pki.path("server-key.pem"),
        client_ca_file: Some(pki.path("ca.pem")),
    })
    .expect("server TLS");
    let listener = bind_tcp("127.0.0.1:0")
        .await
        .expect("bind")
        .with_tls(tls)
        .expect("TLS on TCP");
    let addr = listener.tcp_addr().expect("addr");
    let _srv = start(listener, ApiConfig::default()).await;
    let url = format!("https://{addr}");
    let (cert, key) = (pki.path("client.pem"), pki.path("client-key.pem"));

    let good = tls_client(&url, &pki.path("ca.pem"), Some((&cert, &key)));
    good.create_unit(
        &name("a.service"),
        &file("[Service]\nExecStart=/bin/true\n"),
        TargetState::Launched,
    )
    .await
    .expect("create over TLS");
    assert_eq!(good.units().await.expect("units").len(), 1);

    // no client certificate: refused
    let anonymous = tls_client(&url, &pki.path("ca.pem"), None);
    let err = anonymous
        .units()
        .await
        .expect_err("client certificate required");
    assert!(
        ClientError::from_registry(&err).is_some_and(ClientError::is_unreachable),
        "{err:?}"
    );
    // a server the client's CA did not sign: refused
    let distrustful = tls_client(&url, &pki.path("other-ca.pem"), Some((&cert, &key)));
    let err = distrustful.units().await.expect_err("unknown server CA");
    let text = ClientError::from_registry(&err)
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(text.contains("TLS"), "{text}");
    // plain HTTP to the TLS port gets nothing useful
    assert!(client(&format!("http://{addr}")).units().await.is_err());

    // configuration errors name the file
    let missing = HttpRegistry::new(&ClientConfig {
        endpoint: url.clone(),
        ca_file: Some("/nonexistent/ca.pem".into()),
        ..ClientConfig::default()
    })
    .expect_err("no CA file");
    assert!(
        missing.to_string().contains("/nonexistent/ca.pem"),
        "{missing}"
    );
    let half = HttpRegistry::new(&ClientConfig {
        endpoint: url,
        cert_file: Some(cert.clone()),
        ..ClientConfig::default()
    })
    .expect_err("cert without key");
    assert!(half.to_string().contains("--key-file"), "{half}");
}

/// `--request-timeout` bounds the time until fleetd's answer starts (what it bounded in fleet,
/// for etcd), not the whole answer: a long page that keeps coming is read to its end, one that
/// stops for the timeout fails.
#[tokio::test]
async fn request_timeout_bounds_the_start_of_the_answer_not_its_length() {
    let body = r#"{"machines":[{"id":"m1","primaryIP":"10.0.0.1","metadata":{}}]}"#;
    // answers at once, then sends the body in pieces, `gap` apart; stops after `pieces`
    let serve = |gap: Duration, pieces: usize| async move {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let task = tokio::spawn(async move {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            while let Ok((mut s, _)) = listener.accept().await {
                let mut buf = [0u8; 4096];
                let _ = s.read(&mut buf).await;
                let head = format!(
                    "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
                    body.len()
                );
                let _ = s.write_all(head.as_bytes()).await;
                let chunk = body.len().div_ceil(6);
                for (i, piece) in body.as_bytes().chunks(chunk).enumerate() {
                    if i == pieces {
                        tokio::time::sleep(Duration::from_secs(30)).await;
                    }
                    tokio::time::sleep(gap).await;
                    let _ = s.write_all(piece).await;
                }
            }
        });
        (addr, task)
    };
    let client = |addr: std::net::SocketAddr| {
        HttpRegistry::new(&ClientConfig {
            endpoint: format!("http://{addr}"),
            request_timeout: Duration::from_millis(400),
            ..ClientConfig::default()
        })
        .expect("config")
    };

    // six pieces 200 ms apart: 1.2 s in all, three times the timeout, yet never silent for it
    let (addr, task) = serve(Duration::from_millis(200), usize::MAX).await;
    let machines = client(addr).machines().await.expect("a slow page is read");
    assert_eq!(machines.len(), 1);
    assert_eq!(machines[0].public_ip, "10.0.0.1");
    task.abort();

    // two pieces, then silence
    let (addr, task) = serve(Duration::from_millis(50), 2).await;
    let err = client(addr).machines().await.expect_err("stalled");
    let e = ClientError::from_registry(&err).expect("client error");
    assert!(e.to_string().contains("nothing received for 400ms"), "{e}");
    task.abort();
}
