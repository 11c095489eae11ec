//! Running a child process with captured output and a deadline.

use std::fmt;
use std::io::{Read, Write};
use std::os::unix::process::CommandExt;
use std::process::{Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::Duration;

use crate::Error;

/// What a finished command printed and how it ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Output {
    /// Exit code; `None` when a signal ended the command.
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl Output {
    /// Did the command exit with status 0?
    pub fn success(&self) -> bool {
        self.code == Some(0)
    }

    /// stdout without surrounding whitespace, for one-line answers.
    pub fn trimmed(&self) -> &str {
        self.stdout.trim()
    }

    /// `Ok(self)` when the command succeeded, otherwise an error naming `what`.
    pub fn ok(self, what: &str) -> Result<Output, Error> {
        if self.success() {
            Ok(self)
        } else {
            Err(Error::Failed {
                what: what.to_string(),
                status: self.status_text(),
                stdout: self.stdout,
                stderr: self.stderr,
            })
        }
    }

    fn status_text(&self) -> String {
        match self.code {
            Some(c) => format!("exit status {c}"),
            None => "killed by a signal".to_string(),
        }
    }
}

impl fmt::Display for Output {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}\nstdout:\n{}\nstderr:\n{}",
            self.status_text(),
            self.stdout,
            self.stderr
        )
    }
}

/// Runs `cmd` with stdin from /dev/null and its output captured. When it has not finished
/// after `timeout`, its whole process group (it gets its own) is killed and
/// [`Error::CommandTimeout`] returned.
pub(crate) fn run(cmd: &mut Command, what: &str, timeout: Duration) -> Result<Output, Error> {
    run_with_input(cmd, None, what, timeout)
}

/// [`run`], with `input` (when given) written to the command's stdin, which is then closed.
pub(crate) fn run_with_input(
    cmd: &mut Command,
    input: Option<&[u8]>,
    what: &str,
    timeout: Duration,
) -> Result<Output, Error> {
    let spawn_err = |source| Error::Spawn {
        what: what.to_string(),
        source,
    };
    let stdin = if input.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    };
    let mut child = cmd
        .stdin(stdin)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .spawn()
        .map_err(spawn_err)?;
    let pid = child.id();
    if let (Some(input), Some(mut pipe)) = (input, child.stdin.take()) {
        let input = input.to_vec();
        // A writer thread: a command that never reads must not block us; a command that
        // exits early makes the write fail, which is fine.
        thread::spawn(move || {
            let _ = pipe.write_all(&input);
        });
    }
    let stdout = child.stdout.take().map(reader);
    let stderr = child.stderr.take().map(reader);
    let (tx, rx) = mpsc::channel::<std::io::Result<ExitStatus>>();
    thread::spawn(move || {
        // The receiver may be gone after a timeout; nothing to report then.
        let _ = tx.send(child.wait());
    });
    let status = rx.recv_timeout(timeout);
    if status.is_err() {
        // Our own child leads its own process group: kill the group (nsenter forks).
        let _ = Command::new("kill")
            .args(["-KILL", "--", &format!("-{pid}")])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
    // The pipes close once every process holding them is gone.
    let grace = Duration::from_secs(10);
    let stdout = stdout.map(|r| r.recv_timeout(grace));
    let stderr = stderr.map(|r| r.recv_timeout(grace));
    let text = |r: Option<Result<Vec<u8>, mpsc::RecvTimeoutError>>| match r {
        Some(Ok(b)) => Ok(String::from_utf8_lossy(&b).into_owned()),
        Some(Err(_)) => Err(()),
        None => Ok(String::new()),
    };
    let (stdout, stderr) = (text(stdout), text(stderr));
    let status = match status {
        Ok(status) => status.map_err(spawn_err)?,
        Err(_) => {
            let left = if stdout.is_err() || stderr.is_err() {
                " (some process of it still holds its output open)"
            } else {
                ""
            };
            return Err(Error::CommandTimeout {
                what: format!("{what}{left}"),
                timeout,
            });
        }
    };
    let gone = |what: &str| Error::Harness {
        what: what.to_string(),
        detail: "a background process kept the output pipe open".to_string(),
    };
    Ok(Output {
        code: status.code(),
        stdout: stdout.map_err(|()| gone(what))?,
        stderr: stderr.map_err(|()| gone(what))?,
    })
}

fn reader(mut pipe: impl Read + Send + 'static) -> mpsc::Receiver<Vec<u8>> {
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let mut buf = Vec::new();
        // A read error ends the capture; what was read so far is kept.
        let _ = pipe.read_to_end(&mut buf);
        let _ = tx.send(buf);
    });
    rx
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    #[test]
    fn captures_output_and_exit_code() {
        let cases: &[(&str, Option<i32>, &str, &str)] = &[
            ("echo out; echo err >&2", Some(0), "out\n", "err\n"),
            ("printf x; exit 3", Some(3), "x", ""),
            ("kill -9 $$", None, "", ""),
        ];
        for (script, code, stdout, stderr) in cases {
            let out = run(
                Command::new("sh").args(["-c", script]),
                script,
                Duration::from_secs(20),
            )
            .expect("sh runs");
            assert_eq!(
                (out.code, out.stdout.as_str(), out.stderr.as_str()),
                (*code, *stdout, *stderr),
                "{script}"
            );
        }
    }

    #[test]
    fn input_reaches_stdin_then_eof() {
        let cases: &[(&[u8], &str)] = &[(b"yes\n", "yes\n"), (b"", ""), (b"a\nb", "a\nb")];
        for (input, want) in cases {
            let out = run_with_input(
                &mut Command::new("cat"),
                Some(input),
                "cat",
                Duration::from_secs(20),
            )
            .expect("cat runs");
            assert_eq!(
                (out.code, out.stdout.as_str()),
                (Some(0), *want),
                "{input:?}"
            );
        }
    }

    #[test]
    fn a_command_past_its_deadline_is_killed_with_its_children() {
        let started = Instant::now();
        let err = run(
            Command::new("sh").args(["-c", "sleep 30 & sleep 30; wait"]),
            "two sleeps",
            Duration::from_millis(300),
        )
        .expect_err("must time out");
        assert!(matches!(err, Error::CommandTimeout { .. }), "{err}");
        // The pipes close only when the background sleep died as well.
        assert!(!err.to_string().contains("still holds"), "{err}");
        assert!(started.elapsed() < Duration::from_secs(9), "{err}");
    }

    #[test]
    fn ok_names_the_failed_command() {
        let out = Output {
            code: Some(1),
            stdout: String::new(),
            stderr: "boom".into(),
        };
        let err = out.ok("fleetctl list-units").expect_err("failed");
        let text = err.to_string();
        assert!(
            text.contains("fleetctl list-units") && text.contains("boom"),
            "{text}"
        );
    }
}
