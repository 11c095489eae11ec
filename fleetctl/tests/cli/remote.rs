//! Commands that reach machines over SSH (`ssh`, `status`, `journal`) and `--tunnel`, against a private sshd.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use fleet_registry::EngineOp;
use fleet_unit::TargetState;

use crate::support::*;

#[test]
fn remote_commands_check_units_first() {
    let c = Cluster::start();
    c.write("a.service", SLEEP);
    c.write(
        "g.service",
        "[Service]\nExecStart=/bin/true\n\n[X-Fleet]\nGlobal=true\n",
    );
    c.check(
        &["submit", "a.service", "g.service"],
        0,
        "Unit a.service inactive\nUnit g.service inactive\n",
        "",
    );
    c.check(
        &["status", "nosuch"],
        1,
        "",
        "Unit nosuch.service does not exist.\n",
    );
    c.check(
        &["status", "a.service"],
        1,
        "",
        "Unit a.service does not appear to be loaded.\n",
    );
    c.check(&["journal"], 1, "", "One unit file must be provided.\n");
    c.check(
        &["journal", "nosuch"],
        1,
        "",
        "Unit nosuch.service does not exist.\n",
    );
    c.check(
        &["journal", "g.service"],
        1,
        "",
        "Unable to retrieve journal of global unit g.service.\n",
    );
    c.check(
        &["journal", "a.service"],
        1,
        "",
        "Unit a.service does not appear to be running.\n",
    );
    c.check(
        &["ssh", "-m", "x", "-u", "y"],
        1,
        "",
        "Both machine and unit flags provided, please specify only one.\n",
    );
    c.check(
        &["ssh"],
        1,
        "",
        "Unable to proceed: one machine or unit must be provided\n",
    );
    c.check(
        &["ssh", "nothing"],
        1,
        "",
        "Unable to proceed: could not find matching unit or machine\n",
    );
    c.check(
        &["ssh", "--machine=zz"],
        1,
        "",
        "Unable to proceed: machine does not exist\n",
    );
    c.check(
        &["ssh", "--unit=g"],
        1,
        "",
        "Unable to proceed: global units unsupported\n",
    );
    c.check(
        &["ssh", "--unit=a"],
        1,
        "",
        "Could not determine address of machine.\n",
    );
    c.add_machine(M1, "", &[]);
    c.add_machine(M2, "5.6.7.8", &[]);
    c.check(
        &["ssh", "--machine=113f"],
        1,
        "",
        "Could not determine address of machine.\n",
    );
    c.add_machine("113fabcd", "1.2.3.4", &[]);
    c.check(
        &["ssh", "--machine=113f"],
        1,
        "",
        "Unable to proceed: found more than one machine\n",
    );
    c.check(&["fd-forward"], 1, "", "Provide a single argument\n");
    c.check(&["restart"], 0, "", "No units given\n");
    c.check(
        &["restart", "a.service"],
        0,
        "",
        "Unable to restart unit a.service in state inactive\n",
    );
}

/// A private sshd on 127.0.0.1 that accepts one generated key (for `ssh` and `--tunnel`).
struct Sshd {
    child: Child,
    port: u16,
    key: std::path::PathBuf,
}

impl Sshd {
    fn start(dir: &Path) -> Sshd {
        let keygen = |name: &str| {
            let path = dir.join(name);
            let ok = Command::new("ssh-keygen")
                .args(["-q", "-t", "ed25519", "-N", "", "-C", name, "-f"])
                .arg(&path)
                .status()
                .expect("ssh-keygen");
            assert!(ok.success(), "ssh-keygen failed");
            path
        };
        let host_key = keygen("host_key");
        let key = keygen("client_key");
        std::fs::copy(dir.join("client_key.pub"), dir.join("authorized_keys"))
            .expect("authorized_keys");
        std::fs::create_dir_all("/run/sshd").expect("/run/sshd");
        let port = fleet_testutil::free_port();
        let config = dir.join("sshd_config");
        std::fs::write(
            &config,
            format!(
                "Port {port}\nListenAddress 127.0.0.1\nHostKey {}\nPidFile {}\nAuthorizedKeysFile {}\n\
                 StrictModes no\nUsePAM no\nPasswordAuthentication no\nKbdInteractiveAuthentication no\n\
                 PermitRootLogin prohibit-password\nAllowTcpForwarding yes\nAllowStreamLocalForwarding yes\n\
                 PrintMotd no\n",
                host_key.display(),
                dir.join("sshd.pid").display(),
                dir.join("authorized_keys").display(),
            ),
        )
        .expect("sshd_config");
        let child = Command::new("/usr/sbin/sshd")
            .args(["-D", "-e", "-f"])
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start sshd");
        let up = fleet_testutil::wait_for(Duration::from_secs(10), || {
            std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
        });
        assert!(up, "sshd did not listen on port {port}");
        Sshd { child, port, key }
    }
}

impl Drop for Sshd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn ssh_and_tunnels_through_a_real_sshd() {
    let c = Cluster::start();
    let ssh_dir = tempfile::tempdir().expect("tempdir");
    let sshd = Sshd::start(ssh_dir.path());
    let user = String::from_utf8(Command::new("id").arg("-un").output().expect("id").stdout)
        .expect("utf8");
    let ssh_flags = [
        format!("--identity-file={}", sshd.key.display()),
        "--strict-host-key-checking=false".to_string(),
        format!("--ssh-username={}", user.trim()),
    ];
    let run = |extra: &[&str]| {
        let mut args: Vec<&str> = ssh_flags.iter().map(String::as_str).collect();
        args.extend_from_slice(extra);
        c.run(&args)
    };
    c.add_machine(M1, "127.0.0.1", &[("ssh", "yes")]);
    c.write("a.service", SLEEP);
    c.check(&["submit", "a.service"], 0, "Unit a.service inactive\n", "");
    let engine = c.engine();
    c.apply(
        &engine,
        &[EngineOp::Schedule {
            unit: "a.service".into(),
            machine: M1.into(),
            hash: hash_of(SLEEP),
            desired: TargetState::Inactive,
        }],
    );
    let port = format!("--ssh-port={}", sshd.port);

    // a command on a machine found by ID prefix, by unit, and through a tunnel
    let out = run(&["ssh", &port, "113f16", "echo", "hello"]);
    assert_eq!((out.code, out.stdout.as_str()), (0, "hello\n"), "{out:?}");
    let out = run(&["ssh", &port, "--unit=a", "--", "sh", "-c", "'exit 3'"]);
    assert_eq!(out.code, 3, "{out:?}");
    let tunnel = format!("--tunnel=127.0.0.1:{}", sshd.port);
    let out = run(&[&tunnel, "ssh", &port, "--machine", M1, "echo", "via tunnel"]);
    assert_eq!(
        (out.code, out.stdout.as_str()),
        (0, "via tunnel\n"),
        "{out:?}"
    );

    // the etcd driver through the tunnel
    let out = run(&[&tunnel, "list-machines", "--no-legend"]);
    assert_eq!(
        (out.code, out.stdout.as_str(), out.stderr.as_str()),
        (0, "113f16a7...\t127.0.0.1\tssh=yes\n", "")
    );

    // the API driver through the tunnel, to the API's unix socket
    let endpoint = c.serve_api();
    let mut cmd = c.bare_command();
    cmd.args(&ssh_flags).args([
        &tunnel,
        &format!("--endpoint={endpoint}"),
        "list-unit-files",
        "--fields=unit,target",
    ]);
    let out = cmd.output().expect("run");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "UNIT\t\tTARGET\na.service\t113f16a7.../127.0.0.1\n",
        "{out:?}"
    );

    // a tunnel nobody answers: fleet's prefix
    let dead = format!("--tunnel=127.0.0.1:{}", fleet_testutil::free_port());
    let out = run(&[&dead, "list-units"]);
    assert_eq!(out.code, 1, "{out:?}");
    assert!(
        out.stderr
            .starts_with("Unable to initialize client: failed initializing SSH client"),
        "{out:?}"
    );
}

/// The socket inodes a process holds (`socket:[N]` links under `/proc/<pid>/fd`).
fn socket_inodes(pid: u32) -> Vec<String> {
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return Vec::new();
    };
    dir.filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .filter_map(|l| {
            let l = l.to_string_lossy().into_owned();
            Some(l.strip_prefix("socket:[")?.strip_suffix(']')?.to_string())
        })
        .collect()
}

/// `(state, inode)` of every TCP socket in the process's network namespace (`0A` = LISTEN).
fn tcp_sockets(pid: u32) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for table in ["tcp", "tcp6"] {
        let text = std::fs::read_to_string(format!("/proc/{pid}/net/{table}")).unwrap_or_default();
        for line in text.lines().skip(1) {
            let cols: Vec<&str> = line.split_whitespace().collect();
            if cols.len() > 9 {
                out.push((cols[3].to_string(), cols[9].to_string()));
            }
        }
    }
    out
}

/// Inodes of listening unix sockets in the process's network namespace.
fn unix_listeners(pid: u32) -> Vec<String> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/net/unix")).unwrap_or_default();
    text.lines()
        .skip(1)
        .filter_map(|line| {
            let cols: Vec<&str> = line.split_whitespace().collect();
            // Flags `00010000` is __SO_ACCEPTCON: a listening socket
            (cols.len() > 6 && cols[3] == "00010000").then(|| cols[6].to_string())
        })
        .collect()
}

#[test]
fn tunnelled_etcd_driver_opens_no_listener() {
    let c = Cluster::start();
    let ssh_dir = tempfile::tempdir().expect("tempdir");
    let sshd = Sshd::start(ssh_dir.path());
    let user = String::from_utf8(Command::new("id").arg("-un").output().expect("id").stdout)
        .expect("utf8");
    c.add_machine(M1, "127.0.0.1", &[]);
    c.write("hello.service", HELLO);
    let key = format!("--identity-file={}", sshd.key.display());
    let username = format!("--ssh-username={}", user.trim());
    let tunnel = format!("--tunnel=127.0.0.1:{}", sshd.port);
    // a blocking start: fleetctl stays connected (through the tunnel) while nothing runs it
    let mut child = c.spawn(&[
        &key,
        "--strict-host-key-checking=false",
        &username,
        &tunnel,
        "start",
        "--block-attempts=100",
        "hello.service",
    ]);
    let written = c.wait_desired(
        "hello.service",
        TargetState::Launched,
        Duration::from_secs(20),
    );
    assert!(
        written,
        "start through the tunnel did not reach etcd; stderr: {:?}",
        child.stderr.lock().expect("lock")
    );
    let pid = child.child.id();
    let mine = socket_inodes(pid);
    let tcp = tcp_sockets(pid);
    let unix = unix_listeners(pid);
    let _ = child.child.kill();
    let _ = child.child.wait();
    let owned: Vec<&(String, String)> = tcp.iter().filter(|(_, i)| mine.contains(i)).collect();
    // the SSH connection itself is seen (so the check can see fleetctl's sockets at all) ...
    assert!(
        owned.iter().any(|(st, _)| st == "01"),
        "no established TCP socket of fleetctl found: {owned:?}"
    );
    // ... and nothing fleetctl holds is listening
    assert!(
        !owned.iter().any(|(st, _)| st == "0A"),
        "fleetctl listens on TCP while tunnelling to etcd: {owned:?}"
    );
    assert!(
        !unix.iter().any(|i| mine.contains(i)),
        "fleetctl listens on a unix socket while tunnelling to etcd"
    );
}
