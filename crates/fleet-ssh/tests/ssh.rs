//! Integration tests against the host's real OpenSSH server, started per test on a free
//! loopback port with its own host key, authorized keys and (where needed) ssh-agent.

mod support;

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::process::Command;
use std::time::Duration;

use fleet_ssh::{NewHostPolicy, PtyRequest, SshConfig, SshError, connect};
use support::{Agent, Fixture, KeyPair, run};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[tokio::test]
async fn exec_returns_exit_code_and_capture_returns_output() {
    let fx = Fixture::new();
    let session = connect(&fx.sshd.addr(), &fx.cfg).await.expect("connect");
    let code = session.exec("sh -c 'echo hi; exit 3'").await.expect("exec");
    assert_eq!(code, 3);

    // (command, stdout, stderr, exit status)
    let cases: &[(&str, &str, &str, i32)] = &[
        ("sh -c 'echo hi; exit 3'", "hi\n", "", 3),
        ("echo out; echo err >&2", "out\n", "err\n", 0),
        ("printf 'a\\nb'", "a\nb", "", 0),
        ("exit 255", "", "", 255),
        ("kill -TERM $$", "", "", 143),
        ("kill -KILL $$", "", "", 137),
        ("cat", "", "", 0), // stdin is closed at once, so cat ends
    ];
    for (cmd, out, err, code) in cases {
        let (o, e, c) = session.exec_capture(cmd).await.expect("exec_capture");
        assert_eq!(
            (text(&o).as_str(), text(&e).as_str(), c),
            (*out, *err, *code),
            "{cmd}"
        );
    }

    // Large output crosses many channel windows.
    let (o, _, c) = session
        .exec_capture("head -c 3000000 /dev/zero | tr '\\0' x")
        .await
        .expect("large output");
    assert_eq!(c, 0);
    assert_eq!(o.len(), 3_000_000);
    assert!(o.iter().all(|b| *b == b'x'));
    session.close().await.expect("close");
}

#[tokio::test]
async fn identity_files_of_each_key_type_authenticate() {
    let fx = Fixture::new();
    let kinds = ["ed25519", "ecdsa", "rsa"];
    let keys: Vec<KeyPair> = kinds
        .iter()
        .map(|k| KeyPair::generate(fx.dir.path(), &format!("id_{k}_extra"), k, ""))
        .collect();
    let extra_dir = fx.path("extra");
    fs::create_dir(&extra_dir).expect("mkdir");
    let extra = support::Sshd::start(&extra_dir, &keys.iter().collect::<Vec<_>>());
    for (kind, key) in kinds.iter().zip(&keys) {
        let cfg = SshConfig {
            identity_file: Some(key.private.clone()),
            ..fx.cfg.clone()
        };
        let session = connect(&extra.addr(), &cfg)
            .await
            .unwrap_or_else(|e| panic!("{kind} key: {e}\n{}", extra.log_text()));
        let (o, _, c) = session.exec_capture("echo ok").await.expect("exec");
        assert_eq!((text(&o).as_str(), c), ("ok\n", 0), "{kind}");
    }
}

#[tokio::test]
async fn authentication_failures_name_what_failed() {
    let fx = Fixture::new();
    let stranger = KeyPair::generate(fx.dir.path(), "id_stranger", "ed25519", "");
    let encrypted = KeyPair::generate(fx.dir.path(), "id_locked", "ed25519", "secret-pass");
    let missing = fx.path("id_missing");

    let cfg = SshConfig {
        identity_file: Some(stranger.private.clone()),
        ..fx.cfg.clone()
    };
    match connect(&fx.sshd.addr(), &cfg).await {
        Err(e @ SshError::AuthFailed { .. }) => {
            let msg = e.to_string();
            assert!(msg.contains(&fx.sshd.addr()), "{msg}");
            assert!(
                msg.contains(&stranger.private.display().to_string()),
                "{msg}"
            );
        }
        other => panic!("expected AuthFailed, got {other:?}"),
    }

    for path in [&encrypted.private, &missing] {
        let cfg = SshConfig {
            identity_file: Some(path.clone()),
            ..fx.cfg.clone()
        };
        match connect(&fx.sshd.addr(), &cfg).await {
            Err(e @ SshError::IdentityFile { .. }) => {
                assert!(e.to_string().contains(&path.display().to_string()), "{e}");
            }
            other => panic!(
                "expected IdentityFile for {}, got {other:?}",
                path.display()
            ),
        }
    }
    let locked = SshConfig {
        identity_file: Some(encrypted.private.clone()),
        ..fx.cfg.clone()
    };
    let err = connect(&fx.sshd.addr(), &locked)
        .await
        .expect_err("encrypted");
    assert!(err.to_string().contains("encrypted"), "{err}");

    let nothing = SshConfig {
        identity_file: None,
        agent_socket: None,
        ..fx.cfg.clone()
    };
    let err = connect(&fx.sshd.addr(), &nothing)
        .await
        .expect_err("no method");
    assert!(matches!(err, SshError::NoAuthMethod), "{err:?}");
    assert!(
        err.to_string().starts_with(
            "SSH_AUTH_SOCK environment variable is not set. Verify ssh-agent is running"
        )
    );
}

#[tokio::test]
async fn agent_authenticates_and_can_be_forwarded() {
    let fx = Fixture::new();
    let agent = Agent::start(fx.dir.path(), &[&fx.key]);
    let cfg = SshConfig {
        identity_file: None,
        agent_socket: Some(agent.socket.clone()),
        ..fx.cfg.clone()
    };
    let session = connect(&fx.sshd.addr(), &cfg).await.expect("agent auth");
    let (o, _, c) = session.exec_capture("echo via-agent").await.expect("exec");
    assert_eq!((text(&o).as_str(), c), ("via-agent\n", 0));
    // Not forwarded: the remote side has no agent.
    let (_, _, c) = session.exec_capture("ssh-add -l").await.expect("exec");
    assert_eq!(c, 2, "ssh-add -l without an agent exits 2");

    let forwarding = SshConfig {
        forward_agent: true,
        ..cfg.clone()
    };
    let session = connect(&fx.sshd.addr(), &forwarding)
        .await
        .expect("agent auth");
    let (o, e, c) = session.exec_capture("ssh-add -L").await.expect("exec");
    assert_eq!(c, 0, "forwarded agent: {}{}", text(&o), text(&e));
    assert!(text(&o).contains(&fx.key.public_bare()), "{}", text(&o));

    // An agent without keys fails authentication and says so.
    let empty_dir = tempfile::tempdir().expect("tempdir");
    let empty = Agent::start(empty_dir.path(), &[]);
    let cfg = SshConfig {
        agent_socket: Some(empty.socket.clone()),
        ..cfg
    };
    let err = connect(&fx.sshd.addr(), &cfg).await.expect_err("no keys");
    assert!(err.to_string().contains("holds no keys"), "{err}");
}

#[tokio::test]
async fn first_contact_stores_the_host_key_once() {
    let fx = Fixture::new();
    let file = &fx.cfg.known_hosts_file;
    assert!(!file.exists());
    let session = connect(&fx.sshd.addr(), &fx.cfg).await.expect("connect");
    drop(session);
    let stored = fs::read_to_string(file).expect("known_hosts written");
    assert_eq!(
        stored,
        format!(
            "{} {}\n",
            fx.sshd.known_name(),
            fx.sshd.host_key.public_bare()
        )
    );
    let mode = |p: &std::path::Path| fs::metadata(p).expect("stat").permissions().mode() & 0o777;
    assert_eq!(mode(file), 0o600);
    assert_eq!(mode(file.parent().expect("parent")), 0o700);

    // Known now: the file is left alone, even with a policy that refuses new hosts.
    let strict = SshConfig {
        new_host: NewHostPolicy::Reject,
        ..fx.cfg.clone()
    };
    connect(&fx.sshd.addr(), &strict).await.expect("known host");
    assert_eq!(fs::read_to_string(file).expect("read"), stored);

    // A refused new host is not recorded.
    fs::remove_file(file).expect("remove");
    let err = connect(&fx.sshd.addr(), &strict)
        .await
        .expect_err("refused");
    assert!(matches!(err, SshError::UntrustedHost { .. }), "{err:?}");
    assert!(!file.exists());
}

#[tokio::test]
async fn changed_host_key_is_refused_with_file_and_line() {
    let fx = Fixture::new();
    let other = KeyPair::generate(fx.dir.path(), "other_host_key", "ed25519", "");
    let file = &fx.cfg.known_hosts_file;
    fs::create_dir_all(file.parent().expect("parent")).expect("mkdir");
    let contents = format!(
        "# fleetctl known hosts\n10.9.9.9 {}\n{} {}\n",
        fx.sshd.host_key.public_bare(),
        fx.sshd.known_name(),
        other.public_bare()
    );
    fs::write(file, &contents).expect("write known_hosts");
    match connect(&fx.sshd.addr(), &fx.cfg).await {
        Err(e @ SshError::HostKeyMismatch { .. }) => {
            let msg = e.to_string();
            assert!(msg.contains(&format!("{}:3", file.display())), "{msg}");
            assert!(msg.contains("host key mismatch"), "{msg}");
            if let SshError::HostKeyMismatch { line, file: f, .. } = e {
                assert_eq!((line, f.as_path()), (3, file.as_path()));
            }
        }
        other => panic!("expected HostKeyMismatch, got {other:?}"),
    }
    assert_eq!(fs::read_to_string(file).expect("read"), contents);

    // Without strict checking the same server is reached and the file is not touched.
    let lax = SshConfig {
        strict_host_key_checking: false,
        ..fx.cfg.clone()
    };
    let session = connect(&fx.sshd.addr(), &lax).await.expect("lax connect");
    let (o, _, _) = session.exec_capture("echo lax").await.expect("exec");
    assert_eq!(text(&o), "lax\n");
    assert_eq!(fs::read_to_string(file).expect("read"), contents);
}

#[tokio::test]
async fn hashed_entries_written_by_ssh_keygen_match() {
    let fx = Fixture::new();
    let file = fx.cfg.known_hosts_file.clone();
    connect(&fx.sshd.addr(), &fx.cfg)
        .await
        .expect("first contact");
    run(Command::new("ssh-keygen").arg("-H").arg("-f").arg(&file));
    let hashed = fs::read_to_string(&file).expect("read");
    assert!(hashed.starts_with("|1|"), "{hashed}");
    let refuse_new = SshConfig {
        new_host: NewHostPolicy::Reject,
        ..fx.cfg.clone()
    };
    connect(&fx.sshd.addr(), &refuse_new)
        .await
        .expect("hashed entry recognised");
    assert_eq!(fs::read_to_string(&file).expect("read"), hashed);

    // A hashed entry with another key is a mismatch on its line.
    let other = KeyPair::generate(fx.dir.path(), "other_host_key", "ed25519", "");
    fs::write(
        &file,
        format!("{} {}\n", fx.sshd.known_name(), other.public_bare()),
    )
    .expect("write");
    run(Command::new("ssh-keygen").arg("-H").arg("-f").arg(&file));
    let err = connect(&fx.sshd.addr(), &fx.cfg)
        .await
        .expect_err("mismatch");
    assert!(
        matches!(err, SshError::HostKeyMismatch { line: 1, .. }),
        "{err:?}"
    );
}

#[tokio::test]
async fn unix_socket_and_tcp_streams_reach_remote_listeners() {
    let fx = Fixture::new();
    let session = connect(&fx.sshd.addr(), &fx.cfg).await.expect("connect");

    // A unix socket server that answers "got:" + everything it read.
    let sock_path = fx.path("api.sock");
    let unix = tokio::net::UnixListener::bind(&sock_path).expect("bind unix");
    let unix_server = tokio::spawn(async move {
        let (mut conn, _) = unix.accept().await.expect("accept");
        let mut got = Vec::new();
        conn.read_to_end(&mut got).await.expect("read");
        conn.write_all(&[b"got:".as_slice(), &got].concat())
            .await
            .expect("write");
    });
    let mut stream = session
        .open_unix_socket(sock_path.to_str().expect("utf-8 path"))
        .await
        .expect("open unix socket");
    stream
        .write_all(b"GET /fleet/v1/units")
        .await
        .expect("write");
    stream.shutdown().await.expect("eof");
    let mut reply = Vec::new();
    stream.read_to_end(&mut reply).await.expect("read");
    assert_eq!(text(&reply), "got:GET /fleet/v1/units");
    unix_server.await.expect("server");

    let tcp = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind tcp");
    let port = tcp.local_addr().expect("addr").port();
    let tcp_server = tokio::spawn(async move {
        let (mut conn, _) = tcp.accept().await.expect("accept");
        let mut buf = [0u8; 4];
        conn.read_exact(&mut buf).await.expect("read");
        conn.write_all(&buf.map(|b| b.to_ascii_uppercase()))
            .await
            .expect("write");
    });
    let mut stream = session.open_tcp("127.0.0.1", port).await.expect("open tcp");
    stream.write_all(b"etcd").await.expect("write");
    let mut reply = Vec::new();
    stream.read_to_end(&mut reply).await.expect("read");
    assert_eq!(text(&reply), "ETCD");
    tcp_server.await.expect("server");

    let missing = fx.path("nosuch.sock");
    let err = session
        .open_unix_socket(missing.to_str().expect("utf-8"))
        .await
        .expect_err("no such socket");
    assert!(
        err.to_string().contains(&missing.display().to_string()),
        "{err}"
    );
}

#[tokio::test]
async fn tunnelled_connection_runs_commands() {
    let fx = Fixture::new();
    let bastion = connect(&fx.sshd.addr(), &fx.cfg).await.expect("bastion");
    let target = bastion
        .connect_via(&fx.sshd.addr(), &fx.cfg)
        .await
        .expect("tunnelled connect");
    let (o, _, c) = target.exec_capture("echo tunnelled").await.expect("exec");
    assert_eq!((text(&o).as_str(), c), ("tunnelled\n", 0));
}

#[tokio::test]
async fn pty_stdin_and_shell_through_run() {
    let fx = Fixture::new();
    let session = connect(&fx.sshd.addr(), &fx.cfg).await.expect("connect");
    let pty = PtyRequest {
        term: "vt100".into(),
        cols: 101,
        rows: 33,
    };
    let (mut out, mut err) = (Vec::new(), Vec::new());
    let code = session
        .run(
            Some("stty size; echo term=$TERM; tty; exit 4"),
            Some(pty),
            None::<&[u8]>,
            &mut out,
            &mut err,
        )
        .await
        .expect("run with pty");
    let o = text(&out);
    assert_eq!(code, 4);
    assert!(o.contains("33 101"), "{o}");
    assert!(o.contains("term=vt100"), "{o}");
    assert!(o.contains("/dev/pts/"), "{o}");

    // Without a PTY, stdin reaches the command and EOF ends it.
    let (mut out, mut err) = (Vec::new(), Vec::new());
    let code = session
        .run(
            Some("read line; echo got:$line; cat | wc -c"),
            None,
            Some(&b"hello\n12345"[..]),
            &mut out,
            &mut err,
        )
        .await
        .expect("run with stdin");
    assert_eq!(
        (text(&out).split_whitespace().collect::<Vec<_>>(), code),
        (vec!["got:hello", "5"], 0)
    );

    // No command: the login shell reads its commands from stdin.
    let (mut out, mut err) = (Vec::new(), Vec::new());
    let code = session
        .run(
            None,
            None,
            Some(&b"echo from-shell\nexit 7\n"[..]),
            &mut out,
            &mut err,
        )
        .await
        .expect("shell");
    assert_eq!((text(&out).as_str(), code), ("from-shell\n", 7));
}

#[tokio::test]
async fn connect_errors_name_the_address() {
    // A listener that never speaks SSH: the handshake times out.
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = silent.local_addr().expect("addr").to_string();
    let dir = tempfile::tempdir().expect("tempdir");
    let key = KeyPair::generate(dir.path(), "id", "ed25519", "");
    let cfg = SshConfig {
        timeout: Duration::from_millis(300),
        identity_file: Some(key.private.clone()),
        agent_socket: None,
        known_hosts_file: dir.path().join("known_hosts"),
        new_host: NewHostPolicy::Accept,
        ..SshConfig::default()
    };
    let err = connect(&addr, &cfg).await.expect_err("timeout");
    assert!(matches!(err, SshError::Timeout { .. }), "{err:?}");
    assert_eq!(
        err.to_string(),
        format!("timed out while initiating SSH connection to {addr}")
    );
    drop(silent);

    // Nothing listening any more: refused.
    let err = connect(&addr, &cfg).await.expect_err("refused");
    assert!(matches!(err, SshError::Connect { .. }), "{err:?}");
    assert!(err.to_string().contains(&addr), "{err}");

    let err = connect("127.0.0.1:notaport", &cfg)
        .await
        .expect_err("bad address");
    assert!(matches!(err, SshError::InvalidAddress { .. }), "{err:?}");
}

#[tokio::test]
async fn fd_forward_relays_both_directions() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("fleet.sock");
    let listener = tokio::net::UnixListener::bind(&path).expect("bind");
    let server = tokio::spawn(async move {
        let (mut conn, _) = listener.accept().await.expect("accept");
        let mut got = Vec::new();
        conn.read_to_end(&mut got).await.expect("read");
        conn.write_all(&[b"reply:".as_slice(), &got].concat())
            .await
            .expect("write");
    });
    let mut output = Vec::new();
    fleet_ssh::forward_unix_socket(&path, &b"request"[..], &mut output)
        .await
        .expect("forward");
    assert_eq!(text(&output), "reply:request");
    server.await.expect("server");

    // The socket closing first ends the relay even while input stays open.
    let listener = tokio::net::UnixListener::bind(dir.path().join("b.sock")).expect("bind");
    let server = tokio::spawn(async move {
        let (mut conn, _) = listener.accept().await.expect("accept");
        conn.write_all(b"bye").await.expect("write");
    });
    let (_keep_open, never_ends) = tokio::io::duplex(64);
    let mut output = Vec::new();
    fleet_ssh::forward_unix_socket(&dir.path().join("b.sock"), never_ends, &mut output)
        .await
        .expect("forward");
    assert_eq!(text(&output), "bye");
    server.await.expect("server");

    let missing = dir.path().join("missing.sock");
    let err = fleet_ssh::forward_unix_socket(&missing, &b""[..], &mut Vec::new())
        .await
        .expect_err("no socket");
    assert!(
        err.to_string().starts_with(&format!(
            "failed dialing remote address {}",
            missing.display()
        )),
        "{err}"
    );
}
