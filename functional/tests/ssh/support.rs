//! What the SSH tests share: fleetctl on the host as a user of a cluster, its scratch
//! directory, long-running commands read line by line, and units started and waited for.

use functional::FleetCluster;
use std::collections::BTreeMap;
use std::fs;
use std::io::BufReader;
use std::io::{BufRead, Read};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use functional::fleet::{fixtures_dir, must};
use functional::{Cluster, Output, wait_for};

/// Bound of every wait for the cluster to act on a command.
pub const WAIT: Duration = Duration::from_secs(30);
/// How soon `journal -f` must be gone after a signal.
pub const PROMPT_EXIT: Duration = Duration::from_secs(5);

/// A scratch directory, removed on drop.
pub struct ScratchDir(pub PathBuf);

impl ScratchDir {
    pub fn new(name: &str) -> ScratchDir {
        let dir = std::env::temp_dir().join(format!("fleet-ssh-{name}-{}", std::process::id()));
        // a leftover of a crashed run of the same pid is ours to replace
        let _ = fs::remove_dir_all(&dir);
        if let Err(e) = fs::create_dir_all(&dir) {
            panic!("creating {}: {e}", dir.display());
        }
        ScratchDir(dir)
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// fleetctl on the host, as a user of cluster `c`: root over SSH with the harness key,
/// host keys checked against a known-hosts file of its own (a copy of the harness's).
pub struct Host<'a> {
    pub c: &'a Cluster,
    pub key: String,
    pub known_hosts: PathBuf,
    pub dir: ScratchDir,
}

impl<'a> Host<'a> {
    pub fn new(c: &'a Cluster) -> Host<'a> {
        let dir = ScratchDir::new(c.name());
        let known_hosts = dir.0.join("known_hosts");
        if let Err(e) = fs::copy(must(c.ssh_known_hosts()), &known_hosts) {
            panic!("copying the harness's known hosts: {e}");
        }
        Host {
            c,
            key: must(c.ssh_key()).display().to_string(),
            known_hosts,
            dir,
        }
    }

    /// SSH flags with `known_hosts`, and the identity file unless an agent is used.
    pub fn ssh_flags(&self, known_hosts: &Path, identity: bool) -> Vec<String> {
        let mut v = vec![
            "--ssh-username=root".to_string(),
            format!("--known-hosts-file={}", known_hosts.display()),
        ];
        if identity {
            v.push(format!("--identity-file={}", self.key));
        }
        v
    }

    /// The flags of the etcd driver on the cluster's etcd.
    pub fn etcd_flags(&self) -> Vec<String> {
        vec![
            "--driver=etcd".to_string(),
            format!("--endpoint={}", self.c.etcd_endpoint()),
        ]
    }

    /// fleetctl with the etcd driver and our known-hosts file.
    pub fn fleetctl(&self, args: &[&str]) -> Output {
        self.with_known_hosts(&self.known_hosts, args, None)
    }

    /// fleetctl that must succeed.
    pub fn fleetctl_ok(&self, args: &[&str]) -> Output {
        let out = self.fleetctl(args);
        assert!(out.success(), "fleetctl {}: {out}", args.join(" "));
        out
    }

    /// fleetctl with the etcd driver, `known_hosts` and `input` on stdin.
    pub fn with_known_hosts(
        &self,
        known_hosts: &Path,
        args: &[&str],
        input: Option<&str>,
    ) -> Output {
        let mut all = self.ssh_flags(known_hosts, true);
        all.extend(self.etcd_flags());
        all.extend(args.iter().map(|a| a.to_string()));
        self.run(&all, &[], input)
    }

    /// fleetctl `--tunnel` to `node` with the API driver (fleetd's socket in the node).
    pub fn tunnel(&self, node: usize, args: &[&str]) -> Output {
        let mut all = self.ssh_flags(&self.known_hosts, true);
        all.push(format!("--tunnel={}", self.c.ip(node)));
        all.extend(args.iter().map(|a| a.to_string()));
        self.run(&all, &[], None)
    }

    pub fn run(&self, args: &[String], env: &[(&str, &str)], input: Option<&str>) -> Output {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        must(self.c.fleetctl_host_with(&args, env, input))
    }

    /// A long-running fleetctl (etcd driver), its stdout read line by line.
    pub fn spawn(&self, args: &[&str]) -> Spawned {
        let mut all = self.ssh_flags(&self.known_hosts, true);
        all.extend(self.etcd_flags());
        all.extend(args.iter().map(|a| a.to_string()));
        let mut cmd = Command::new(self.c.bin_dir().join("fleetctl"));
        cmd.args(&all);
        Spawned::new(cmd, &format!("fleetctl {}", args.join(" ")))
    }
}

/// A child process whose stdout lines arrive on a channel; killed (its whole process group)
/// if still running when dropped.
pub struct Spawned {
    pub what: String,
    pub child: Child,
    pub lines: mpsc::Receiver<String>,
    pub stderr: Option<mpsc::Receiver<Vec<u8>>>,
    pub seen: Vec<String>,
    pub status: Option<ExitStatus>,
}

impl Spawned {
    pub fn new(mut cmd: Command, what: &str) -> Spawned {
        let mut child = match cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            .spawn()
        {
            Ok(c) => c,
            Err(e) => panic!("spawning {what}: {e}"),
        };
        let (tx, lines) = mpsc::channel();
        if let Some(out) = child.stdout.take() {
            thread::spawn(move || {
                for line in BufReader::new(out).lines() {
                    let Ok(line) = line else { return };
                    if tx.send(line).is_err() {
                        return;
                    }
                }
            });
        }
        let stderr = child.stderr.take().map(|mut err| {
            let (tx, rx) = mpsc::channel();
            thread::spawn(move || {
                let mut buf = Vec::new();
                let _ = err.read_to_end(&mut buf);
                let _ = tx.send(buf);
            });
            rx
        });
        Spawned {
            what: what.to_string(),
            child,
            lines,
            stderr,
            seen: Vec::new(),
            status: None,
        }
    }

    /// Stops reading stdout: the pipe is closed once the next line arrives.
    pub fn close_stdout(&mut self) {
        self.lines = mpsc::channel().1;
    }

    /// What the process wrote on stderr, once it has exited.
    pub fn stderr(&mut self) -> String {
        let bytes = self
            .stderr
            .take()
            .and_then(|rx| rx.recv_timeout(Duration::from_secs(10)).ok())
            .unwrap_or_default();
        String::from_utf8_lossy(&bytes).into_owned()
    }

    /// Waits until `n` lines satisfying `pred` have been printed in all.
    pub fn wait_lines(&mut self, n: usize, timeout: Duration, pred: impl Fn(&str) -> bool) {
        let deadline = Instant::now() + timeout;
        while self.seen.iter().filter(|l| pred(l)).count() < n {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(l) => self.seen.push(l),
                Err(e) => panic!(
                    "{}: wanted {n} matching lines within {timeout:?} ({e}); got {:?}",
                    self.what, self.seen
                ),
            }
        }
    }

    pub fn signal(&self, sig: &str) {
        let status = Command::new("kill")
            .args([&format!("-{sig}"), &self.child.id().to_string()])
            .status();
        assert!(
            status.is_ok_and(|s| s.success()),
            "kill -{sig} {}",
            self.what
        );
    }

    /// The exit status, waiting at most `timeout` for it.
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let child = &mut self.child;
        let status = must(wait_for(
            &format!("{} to exit", self.what),
            timeout,
            || match child.try_wait() {
                Ok(Some(s)) => Ok(s),
                Ok(None) => Err("still running".to_string()),
                Err(e) => Err(e.to_string()),
            },
        ));
        self.status = Some(status);
        status
    }
}

impl Drop for Spawned {
    fn drop(&mut self) {
        if self.status.is_none() && matches!(self.child.try_wait(), Ok(None)) {
            let _ = Command::new("kill")
                .args(["-KILL", "--", &format!("-{}", self.child.id())])
                .status();
            let _ = self.child.wait();
        }
    }
}

/// Starts units from the host and waits until fleet reports `n` of them active.
pub fn start_and_wait(h: &Host, files: &[String], n: usize) -> BTreeMap<String, Vec<usize>> {
    let mut args = vec!["start"];
    args.extend(files.iter().map(String::as_str));
    h.fleetctl_ok(&args);
    let active = must(h.c.wait_for_active(1, n, WAIT));
    active
        .into_iter()
        .map(|(unit, rows)| {
            let nodes = rows
                .iter()
                .map(|r| match h.c.node_of(&r.machine) {
                    Some(i) => i,
                    None => panic!("{unit} on unknown machine {}", r.machine),
                })
                .collect();
            (unit, nodes)
        })
        .collect()
}

pub fn fixture_path(name: &str) -> String {
    fixtures_dir().join(name).display().to_string()
}
