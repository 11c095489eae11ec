//! Test fixtures: a private OpenSSH server and ssh-agent started from the host's binaries, and
//! keys made with ssh-keygen. Every process is killed by its PID when its guard drops.

#![allow(dead_code)]

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use fleet_ssh::{NewHostPolicy, SshConfig};

pub const SSHD: &str = "/usr/sbin/sshd";

pub use fleet_testutil::wait_for;

/// Runs a command to completion, panicking with its output on failure.
pub fn run(cmd: &mut Command) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("running {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A key pair made by ssh-keygen.
pub struct KeyPair {
    pub private: PathBuf,
    /// The public key line, `type base64 comment`.
    pub public: String,
}

impl KeyPair {
    /// `kind` is ssh-keygen's `-t` (with `-b` bits for rsa/ecdsa); `passphrase` empty for none.
    pub fn generate(dir: &Path, name: &str, kind: &str, passphrase: &str) -> KeyPair {
        let private = dir.join(name);
        let mut cmd = Command::new("ssh-keygen");
        cmd.args(["-q", "-t", kind, "-N", passphrase, "-C", name, "-f"])
            .arg(&private);
        match kind {
            "rsa" => {
                cmd.args(["-b", "2048"]);
            }
            "ecdsa" => {
                cmd.args(["-b", "256"]);
            }
            _ => {}
        }
        run(&mut cmd);
        let public = fs::read_to_string(private.with_extension("pub"))
            .or_else(|_| fs::read_to_string(format!("{}.pub", private.display())))
            .expect("public key file");
        KeyPair {
            private,
            public: public.trim().to_string(),
        }
    }

    /// `type base64`, without the comment.
    pub fn public_bare(&self) -> String {
        self.public.split(' ').take(2).collect::<Vec<_>>().join(" ")
    }
}

/// The name of the user running the tests.
pub fn current_user() -> String {
    run(Command::new("id").arg("-un")).trim().to_string()
}

/// A running sshd on 127.0.0.1 with its own host key and authorized keys.
pub struct Sshd {
    child: Child,
    pub port: u16,
    pub host_key: KeyPair,
    pub log: PathBuf,
}

impl Sshd {
    /// Starts sshd in `dir` accepting `authorized` public keys for any user.
    pub fn start(dir: &Path, authorized: &[&KeyPair]) -> Sshd {
        fs::create_dir_all("/run/sshd").expect("create /run/sshd");
        let host_key = KeyPair::generate(dir, "ssh_host_ed25519_key", "ed25519", "");
        let auth_file = dir.join("authorized_keys");
        let keys: String = authorized
            .iter()
            .map(|k| format!("{}\n", k.public))
            .collect();
        fs::write(&auth_file, keys).expect("write authorized_keys");
        let pid_file = dir.join("sshd.pid");
        let log = dir.join("sshd.log");
        for attempt in 0..5 {
            let port = free_port();
            let config = dir.join("sshd_config");
            fs::write(
                &config,
                format!(
                    "Port {port}\n\
                     ListenAddress 127.0.0.1\n\
                     HostKey {host}\n\
                     PidFile {pid}\n\
                     AuthorizedKeysFile {auth}\n\
                     StrictModes no\n\
                     UsePAM no\n\
                     PubkeyAuthentication yes\n\
                     PasswordAuthentication no\n\
                     KbdInteractiveAuthentication no\n\
                     PermitRootLogin prohibit-password\n\
                     AllowAgentForwarding yes\n\
                     AllowTcpForwarding yes\n\
                     AllowStreamLocalForwarding yes\n\
                     PrintMotd no\n\
                     LogLevel VERBOSE\n",
                    host = host_key.private.display(),
                    pid = pid_file.display(),
                    auth = auth_file.display(),
                ),
            )
            .expect("write sshd_config");
            let _ = fs::remove_file(&pid_file);
            let log_file = fs::File::create(&log).expect("create sshd log");
            let mut child = Command::new(SSHD)
                .arg("-D")
                .arg("-e")
                .arg("-f")
                .arg(&config)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(log_file)
                .spawn()
                .expect("start sshd");
            let pid = child.id().to_string();
            let ready = wait_for(Duration::from_secs(10), || {
                if matches!(child.try_wait(), Ok(Some(_))) {
                    return true;
                }
                fs::read_to_string(&pid_file).is_ok_and(|p| p.trim() == pid)
            });
            if ready && matches!(child.try_wait(), Ok(None)) {
                return Sshd {
                    child,
                    port,
                    host_key,
                    log,
                };
            }
            let _ = child.kill();
            let _ = child.wait();
            eprintln!(
                "sshd attempt {attempt} on port {port} failed:\n{}",
                fs::read_to_string(&log).unwrap_or_default()
            );
        }
        panic!("sshd did not start");
    }

    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// The known-hosts name of this server.
    pub fn known_name(&self) -> String {
        format!("[127.0.0.1]:{}", self.port)
    }

    pub fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Sshd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind a free port");
    l.local_addr().expect("local addr").port()
}

/// A running ssh-agent holding the given keys.
pub struct Agent {
    child: Child,
    pub socket: PathBuf,
}

impl Agent {
    pub fn start(dir: &Path, keys: &[&KeyPair]) -> Agent {
        let socket = dir.join("agent.sock");
        let child = Command::new("ssh-agent")
            .arg("-D")
            .arg("-a")
            .arg(&socket)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start ssh-agent");
        let agent = Agent { child, socket };
        assert!(
            wait_for(Duration::from_secs(10), || agent.socket.exists()),
            "ssh-agent socket did not appear"
        );
        for key in keys {
            run(Command::new("ssh-add")
                .arg("-q")
                .arg(&key.private)
                .env("SSH_AUTH_SOCK", &agent.socket));
        }
        agent
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A server, a client key it accepts, and a config using that key and a private known-hosts
/// file that trusts new hosts without asking.
pub struct Fixture {
    pub dir: tempfile::TempDir,
    pub key: KeyPair,
    pub sshd: Sshd,
    pub cfg: SshConfig,
}

impl Fixture {
    pub fn new() -> Fixture {
        let dir = tempfile::tempdir().expect("tempdir");
        let key = KeyPair::generate(dir.path(), "id_ed25519", "ed25519", "");
        let sshd = Sshd::start(dir.path(), &[&key]);
        let cfg = SshConfig {
            user: current_user(),
            timeout: Duration::from_secs(30),
            known_hosts_file: dir.path().join("fleetctl/known_hosts"),
            identity_file: Some(key.private.clone()),
            agent_socket: None,
            new_host: NewHostPolicy::Accept,
            ..SshConfig::default()
        };
        Fixture {
            dir,
            key,
            sshd,
            cfg,
        }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
}
