//! `Session::shell` on a real terminal: this binary re-runs itself as the client on the terminal
//! side of a pseudo-terminal, against a private sshd, and checks what a user would see: the
//! remote PTY has our TERM and size, a resize reaches it, the exit status comes back, and the
//! terminal is out of raw mode during the session and back to normal afterwards.
//!
//! `Session::execute` (fleet's `Execute`, for `status` and `journal`) gets the same PTY and
//! stdin on a terminal, and neither off one.
//!
//! A custom harness (`harness = false`): `main` runs the tests, or is the client when
//! `FLEET_SSH_SHELL_CLIENT` is set.

mod support;

use std::io::{Read, Write};
use std::os::fd::OwnedFd;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use fleet_ssh::{NewHostPolicy, SshConfig};
use rustix::pty::{OpenptFlags, grantpt, openpt, ptsname, unlockpt};
use rustix::termios::{self, LocalModes, Winsize};
use support::{Fixture, wait_for};

const REMOTE: &str = "echo term=$TERM; stty size; \
     for i in $(seq 300); do [ \"$(stty size)\" = '50 132' ] && break; sleep 0.05; done; \
     echo resized-to=$(stty size); echo ready; read x; echo got=$x; exit 5";

fn main() {
    if std::env::var_os("FLEET_SSH_SHELL_CLIENT").is_some() {
        client();
    }
    // Speak enough of libtest's command line for cargo-nextest: it lists tests with
    // `--list --format terse` (and `--ignored` for the ignored ones), then runs each by name
    // with `--exact`.
    let args: Vec<String> = std::env::args().skip(1).collect();
    let tests: [(&str, fn()); 2] = [
        ("shell_on_a_terminal", shell_on_a_terminal),
        (
            "execute_on_a_terminal_and_off_it",
            execute_on_a_terminal_and_off_it,
        ),
    ];
    if args.iter().any(|a| a == "--list") {
        if !args.iter().any(|a| a == "--ignored") {
            for (name, _) in &tests {
                println!("{name}: test");
            }
        }
        return;
    }
    let filters: Vec<&String> = args.iter().filter(|a| !a.starts_with('-')).collect();
    let chosen: Vec<_> = tests
        .iter()
        .filter(|(name, _)| filters.is_empty() || filters.iter().any(|f| name.contains(f.as_str())))
        .collect();
    println!("running {} tests", chosen.len());
    for (name, test) in chosen {
        test();
        println!("test {name} ... ok");
    }
}

/// The client side: connect with the settings from the environment and run the shell.
fn client() -> ! {
    let var = |name: &str| std::env::var(name).unwrap_or_default();
    let cfg = SshConfig {
        user: var("FLEET_SSH_USER"),
        identity_file: Some(var("FLEET_SSH_KEY").into()),
        known_hosts_file: var("FLEET_SSH_KNOWN_HOSTS").into(),
        agent_socket: None,
        new_host: NewHostPolicy::Accept,
        ..SshConfig::default()
    };
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let code = rt.block_on(async {
        let session = fleet_ssh::connect(&var("FLEET_SSH_ADDR"), &cfg)
            .await
            .expect("connect");
        match std::env::var("FLEET_SSH_EXECUTE") {
            Ok(cmd) => session.execute(&cmd).await.expect("execute"),
            Err(_) => session.shell(Some(REMOTE)).await.expect("shell"),
        }
    });
    std::process::exit(code);
}

fn pty_pair() -> (OwnedFd, std::fs::File) {
    let controller = openpt(OpenptFlags::RDWR | OpenptFlags::NOCTTY).expect("openpt");
    grantpt(&controller).expect("grantpt");
    unlockpt(&controller).expect("unlockpt");
    let name = ptsname(&controller, Vec::new()).expect("ptsname");
    let terminal = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(name.to_str().expect("utf-8 pty name"))
        .expect("open pty");
    (controller, terminal)
}

fn shell_on_a_terminal() {
    let fx = Fixture::new();
    let (controller, term) = pty_pair();
    let size = |rows, cols| Winsize {
        ws_row: rows,
        ws_col: cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    termios::tcsetwinsize(&term, size(30, 90)).expect("set size");
    let before = termios::tcgetattr(&term).expect("tcgetattr");
    assert!(
        before
            .local_modes
            .contains(LocalModes::ICANON | LocalModes::ECHO)
    );

    let output = Arc::new(Mutex::new(Vec::new()));
    let sink = output.clone();
    let mut reader = std::fs::File::from(controller);
    let writer = reader.try_clone().expect("dup controller");
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n) = reader.read(&mut buf) {
            if n == 0 {
                break;
            }
            if let Ok(mut out) = sink.lock() {
                out.extend_from_slice(&buf[..n]);
            }
        }
    });
    let seen = |what: &str| {
        output
            .lock()
            .map(|o| String::from_utf8_lossy(&o).contains(what))
            .unwrap_or(false)
    };
    let shown = || {
        output
            .lock()
            .map(|o| String::from_utf8_lossy(&o).into_owned())
            .unwrap_or_default()
    };

    let clone = |f: &std::fs::File| Stdio::from(f.try_clone().expect("dup pty"));
    let mut child = Command::new(std::env::current_exe().expect("own path"))
        .env("FLEET_SSH_SHELL_CLIENT", "1")
        .env("FLEET_SSH_ADDR", fx.sshd.addr())
        .env("FLEET_SSH_USER", &fx.cfg.user)
        .env("FLEET_SSH_KEY", &fx.key.private)
        .env("FLEET_SSH_KNOWN_HOSTS", &fx.cfg.known_hosts_file)
        .env("TERM", "xterm-test")
        .stdin(clone(&term))
        .stdout(clone(&term))
        .stderr(clone(&term))
        .spawn()
        .expect("start client");
    let pid = child.id().to_string();
    let finish = |child: &mut std::process::Child, ok: bool, what: &str| {
        if !ok {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "{what}; terminal output:\n{}\nsshd log:\n{}",
                shown(),
                fx.sshd.log_text()
            );
        }
    };

    let started = wait_for(Duration::from_secs(30), || seen("30 90"));
    finish(
        &mut child,
        started,
        "the remote PTY did not report the initial size 30x90",
    );
    let during = termios::tcgetattr(&term).expect("tcgetattr");
    let raw = !during.local_modes.contains(LocalModes::ICANON)
        && !during.local_modes.contains(LocalModes::ECHO);
    finish(
        &mut child,
        raw,
        "the local terminal is not in raw mode during the session",
    );

    termios::tcsetwinsize(&term, size(50, 132)).expect("resize");
    let resized = wait_for(Duration::from_secs(20), || {
        // The client only reads the new size when told, as a terminal emulator would tell it.
        let _ = Command::new("kill").args(["-WINCH", &pid]).status();
        seen("resized-to=50 132")
    });
    finish(
        &mut child,
        resized,
        "the new window size did not reach the remote PTY",
    );

    // Keystrokes reach the remote side one by one (the remote PTY echoes them before any
    // newline), which only happens when the local terminal is really in raw mode.
    let typed = wait_for(Duration::from_secs(20), || seen("ready"));
    finish(
        &mut child,
        typed,
        "the remote command did not get ready for input",
    );
    let mut keyboard = writer.try_clone().expect("dup controller");
    keyboard.write_all(b"hello").expect("type");
    let echoed = wait_for(Duration::from_secs(20), || {
        seen("readyhello") || seen("ready\r\nhello")
    });
    finish(
        &mut child,
        echoed,
        "typed characters were not forwarded before a newline",
    );
    keyboard.write_all(b"\r").expect("type enter");

    let mut status = None;
    let exited = wait_for(Duration::from_secs(20), || {
        status = child.try_wait().ok().flatten();
        status.is_some()
    });
    finish(&mut child, exited, "the client did not exit");
    assert_eq!(status.and_then(|s| s.code()), Some(5), "{}", shown());
    assert!(seen("term=xterm-test"), "{}", shown());
    assert!(seen("got=hello"), "{}", shown());
    let after = termios::tcgetattr(&term).expect("tcgetattr");
    assert_eq!(after.local_modes, before.local_modes, "terminal restored");
    assert_eq!(after.input_modes, before.input_modes, "terminal restored");
    assert_eq!(after.output_modes, before.output_modes, "terminal restored");
}

/// `execute` with a terminal on stdin runs on a remote PTY and forwards what is typed; with
/// stdin elsewhere, no PTY, and the remote stdin is closed at once (whatever ours holds).
fn execute_on_a_terminal_and_off_it() {
    let fx = Fixture::new();
    let client = |cmd: &str| {
        let mut c = Command::new(std::env::current_exe().expect("own path"));
        c.env("FLEET_SSH_SHELL_CLIENT", "1")
            .env("FLEET_SSH_EXECUTE", cmd)
            .env("FLEET_SSH_ADDR", fx.sshd.addr())
            .env("FLEET_SSH_USER", &fx.cfg.user)
            .env("FLEET_SSH_KEY", &fx.key.private)
            .env("FLEET_SSH_KNOWN_HOSTS", &fx.cfg.known_hosts_file);
        c
    };

    // off a terminal: stdin is a pipe we keep open, yet `cat` sees EOF at once
    let mut child = client("tty; cat; echo done; exit 7")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start client");
    let _held_open = child.stdin.take();
    let mut out = String::new();
    child
        .stdout
        .take()
        .expect("stdout")
        .read_to_string(&mut out)
        .expect("read");
    let status = child.wait().expect("wait");
    assert_eq!(status.code(), Some(7), "{out}");
    assert_eq!(out, "not a tty\ndone\n");

    // on a terminal: a remote PTY, and a typed line reaches the command
    let (controller, term) = pty_pair();
    let output = Arc::new(Mutex::new(Vec::new()));
    let sink = output.clone();
    let mut reader = std::fs::File::from(controller);
    let mut keyboard = reader.try_clone().expect("dup controller");
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n) = reader.read(&mut buf) {
            if n == 0 {
                break;
            }
            if let Ok(mut out) = sink.lock() {
                out.extend_from_slice(&buf[..n]);
            }
        }
    });
    let shown = || {
        output
            .lock()
            .map(|o| String::from_utf8_lossy(&o).into_owned())
            .unwrap_or_default()
    };
    let clone = |f: &std::fs::File| Stdio::from(f.try_clone().expect("dup pty"));
    let mut child = client("tty; echo ready; read x; echo got=$x; exit 6")
        .stdin(clone(&term))
        .stdout(clone(&term))
        .stderr(clone(&term))
        .spawn()
        .expect("start client");
    if !wait_for(Duration::from_secs(30), || shown().contains("ready")) {
        let _ = child.kill();
        let _ = child.wait();
        panic!("the remote command did not start: {}", shown());
    }
    keyboard.write_all(b"hi\r").expect("type");
    let mut status = None;
    let exited = wait_for(Duration::from_secs(20), || {
        status = child.try_wait().ok().flatten();
        status.is_some()
    });
    if !exited {
        let _ = child.kill();
        let _ = child.wait();
    }
    assert_eq!(status.and_then(|s| s.code()), Some(6), "{}", shown());
    let text = shown();
    assert!(text.contains("/dev/pts/"), "no remote PTY: {text}");
    assert!(text.contains("got=hi"), "{text}");
}
