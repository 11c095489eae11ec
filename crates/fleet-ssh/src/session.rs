//! An authenticated connection: remote commands, interactive shells and forwarded streams.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use russh::client::{Handle, Msg};
use russh::{ChannelMsg, ChannelStream, Pty, Sig};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::sync::mpsc;

use crate::client::ClientHandler;
use crate::error::SshError;
use crate::terminal;

/// Terminal modes sent with a PTY request (fleet's: echo on, 14.4 kbaud both ways).
const PTY_MODES: &[(Pty, u32)] = &[
    (Pty::ECHO, 1),
    (Pty::TTY_OP_ISPEED, 14400),
    (Pty::TTY_OP_OSPEED, 14400),
];

/// The terminal type requested when `$TERM` is unset (fleet always asked for this one).
pub const DEFAULT_TERM: &str = "xterm-256color";

/// A pseudo-terminal to request for a remote command or shell.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PtyRequest {
    /// Value for the remote `TERM`.
    pub term: String,
    /// Width in characters.
    pub cols: u32,
    /// Height in rows.
    pub rows: u32,
}

/// An authenticated SSH connection to one host. Channels are independent: several commands or
/// streams may be used at once through `&Session`.
pub struct Session {
    handle: Handle<ClientHandler>,
    addr: String,
    forward_agent: bool,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("addr", &self.addr)
            .field("forward_agent", &self.forward_agent)
            .finish_non_exhaustive()
    }
}

impl Session {
    pub(crate) fn new(handle: Handle<ClientHandler>, addr: String, forward_agent: bool) -> Self {
        Session {
            handle,
            addr,
            forward_agent,
        }
    }

    /// The `host:port` this session is connected to.
    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// Runs `cmd` remotely without a PTY, streaming its stdout and stderr to ours, and returns
    /// its exit status. The remote stdin is closed at once (the remote command sees EOF): the
    /// commands fleetctl runs this way (`systemctl status`, `journalctl`) do not read it.
    ///
    /// A command killed by a signal yields 128 + the signal's number (143 for TERM), as fleet
    /// reported it; a signal without a known number yields 128.
    pub async fn exec(&self, cmd: &str) -> Result<i32, SshError> {
        let mut stdout = tokio::io::stdout();
        let mut stderr = tokio::io::stderr();
        self.run(
            Some(cmd),
            None,
            None::<tokio::io::Empty>,
            &mut stdout,
            &mut stderr,
        )
        .await
    }

    /// Runs `cmd` remotely without a PTY and returns its stdout, stderr and exit status
    /// (signals as in [`Session::exec`]).
    pub async fn exec_capture(&self, cmd: &str) -> Result<(Vec<u8>, Vec<u8>, i32), SshError> {
        let mut out = Vec::new();
        let mut err = Vec::new();
        let code = self
            .run(
                Some(cmd),
                None,
                None::<tokio::io::Empty>,
                &mut out,
                &mut err,
            )
            .await?;
        Ok((out, err, code))
    }

    /// fleet's `Execute`, as `fleetctl status`, `journal` and the global part of `restart`
    /// run their remote command: when stdin is a terminal, [`Session::shell`] (a PTY, so
    /// colours, `systemctl status` paging and Ctrl-C reaching `journalctl -f` work, with our
    /// stdin forwarded); otherwise [`Session::exec`] (no PTY, remote stdin closed at once).
    /// fleet forwarded a non-terminal stdin too, so a `while read` loop around fleetctl lost
    /// its input to commands that never read it; here it is left alone.
    pub async fn execute(&self, cmd: &str) -> Result<i32, SshError> {
        if rustix::termios::isatty(std::io::stdin()) {
            self.shell(Some(cmd)).await
        } else {
            self.exec(cmd).await
        }
    }

    /// The interactive session of `fleetctl ssh`: runs `cmd`, or a login shell when `None`,
    /// with our stdin forwarded. When stdin is a terminal (fleet's rule), a PTY is requested
    /// with `$TERM` (default [`DEFAULT_TERM`]) and the terminal's size, the local terminal is put
    /// in raw mode and restored when this returns (on errors too, and when the future is
    /// dropped), and window-size changes (SIGWINCH) are forwarded. Without a terminal no PTY is
    /// requested and stdin is forwarded as a stream. Returns the remote exit status (signals as
    /// in [`Session::exec`]).
    pub async fn shell(&self, cmd: Option<&str>) -> Result<i32, SshError> {
        let mut stdout = tokio::io::stdout();
        let mut stderr = tokio::io::stderr();
        let stdin = crate::stdin::reader().await;
        let tty = std::io::stdin();
        if !rustix::termios::isatty(&tty) {
            return self
                .run(cmd, None, Some(stdin), &mut stdout, &mut stderr)
                .await;
        }
        let (cols, rows) = terminal::size(&tty).unwrap_or((80, 24));
        let term = std::env::var("TERM")
            .ok()
            .filter(|t| !t.is_empty())
            .unwrap_or_else(|| DEFAULT_TERM.to_string());
        let raw = terminal::RawMode::enable(tty)
            .map_err(|e| SshError::io("failed to put the terminal in raw mode", e))?;
        let (resize_tx, resize_rx) = mpsc::channel(4);
        let watcher = terminal::watch_resizes(resize_tx);
        let result = self
            .run_inner(
                cmd,
                Some(PtyRequest { term, cols, rows }),
                Some(stdin),
                &mut stdout,
                &mut stderr,
                Some(resize_rx),
            )
            .await;
        watcher.abort();
        drop(raw);
        result
    }

    /// The general form behind [`exec`](Session::exec), [`exec_capture`](Session::exec_capture)
    /// and [`shell`](Session::shell): runs `cmd` (a shell when `None`), optionally on a PTY,
    /// sending `stdin` (EOF at once when `None`) and writing the remote output to `stdout` and
    /// `stderr`. Returns the exit status (signals as in [`Session::exec`]). Nothing here touches
    /// the local terminal.
    pub async fn run<I, O, E>(
        &self,
        cmd: Option<&str>,
        pty: Option<PtyRequest>,
        stdin: Option<I>,
        stdout: &mut O,
        stderr: &mut E,
    ) -> Result<i32, SshError>
    where
        I: AsyncRead + Unpin + Send,
        O: AsyncWrite + Unpin + Send + ?Sized,
        E: AsyncWrite + Unpin + Send + ?Sized,
    {
        self.run_inner(cmd, pty, stdin, stdout, stderr, None).await
    }

    async fn run_inner<I, O, E>(
        &self,
        cmd: Option<&str>,
        pty: Option<PtyRequest>,
        mut stdin: Option<I>,
        stdout: &mut O,
        stderr: &mut E,
        mut resize: Option<mpsc::Receiver<(u32, u32)>>,
    ) -> Result<i32, SshError>
    where
        I: AsyncRead + Unpin + Send,
        O: AsyncWrite + Unpin + Send + ?Sized,
        E: AsyncWrite + Unpin + Send + ?Sized,
    {
        let what = match cmd {
            Some(c) => format!("command {c:?}"),
            None => "shell".to_string(),
        };
        let request_err = |reason: String| SshError::Request {
            addr: self.addr.clone(),
            what: what.clone(),
            reason,
        };
        let channel =
            self.handle
                .channel_open_session()
                .await
                .map_err(|source| SshError::Channel {
                    addr: self.addr.clone(),
                    what: "session channel".to_string(),
                    source: Box::new(source),
                })?;
        let (mut rx, tx) = channel.split();
        if self.forward_agent {
            // Best effort, as with fleet: a server refusing it still runs the command.
            tx.agent_forward(false)
                .await
                .map_err(|e| request_err(format!("agent forwarding request: {e}")))?;
        }
        if let Some(p) = &pty {
            tx.request_pty(true, &p.term, p.cols, p.rows, 0, 0, PTY_MODES)
                .await
                .map_err(|e| request_err(format!("PTY request: {e}")))?;
            loop {
                match rx.wait().await {
                    Some(ChannelMsg::Success) => break,
                    Some(ChannelMsg::Failure) => {
                        return Err(request_err("the server refused a PTY".to_string()));
                    }
                    Some(ChannelMsg::Close) | None => {
                        return Err(request_err("channel closed during PTY request".into()));
                    }
                    Some(_) => {}
                }
            }
        }
        match cmd {
            Some(c) => tx.exec(true, c).await,
            None => tx.request_shell(true).await,
        }
        .map_err(|e| request_err(e.to_string()))?;

        let mut input_open = stdin.is_some();
        if !input_open {
            let _ = tx.eof().await;
        }
        let mut exit = None;
        let mut buf = vec![0u8; 32 * 1024];
        loop {
            tokio::select! {
                msg = rx.wait() => match msg {
                    Some(ChannelMsg::Data { data }) => {
                        write_out(stdout, &data).await.map_err(|e| SshError::io("failed writing remote output", e))?;
                    }
                    Some(ChannelMsg::ExtendedData { data, ext: 1 }) => {
                        write_out(stderr, &data).await.map_err(|e| SshError::io("failed writing remote error output", e))?;
                    }
                    Some(ChannelMsg::ExitStatus { exit_status }) => {
                        exit = Some(i32::try_from(exit_status).unwrap_or(255));
                    }
                    Some(ChannelMsg::ExitSignal { signal_name, .. }) => {
                        exit = Some(128 + signal_number(&signal_name));
                    }
                    Some(ChannelMsg::Failure) => {
                        return Err(request_err("the server refused to run it".to_string()));
                    }
                    Some(ChannelMsg::Close) | None => break,
                    Some(_) => {}
                },
                n = async {
                    match stdin.as_mut() {
                        Some(r) if input_open => r.read(&mut buf).await,
                        _ => std::future::pending().await,
                    }
                } => match n {
                    Ok(0) | Err(_) => {
                        input_open = false;
                        let _ = tx.eof().await;
                    }
                    Ok(n) => {
                        if tx.data(&buf[..n]).await.is_err() {
                            input_open = false;
                        }
                    }
                },
                size = async {
                    match resize.as_mut() {
                        Some(r) => r.recv().await,
                        None => std::future::pending().await,
                    }
                } => match size {
                    Some((cols, rows)) => {
                        let _ = tx.window_change(cols, rows, 0, 0).await;
                    }
                    None => resize = None,
                },
            }
        }
        exit.ok_or_else(|| SshError::NoExitStatus {
            addr: self.addr.clone(),
            command: cmd.unwrap_or("shell").to_string(),
        })
    }

    /// Opens a stream to the unix socket `path` on the remote host (`direct-streamlocal`,
    /// OpenSSH's `ssh -L local:/remote.sock`); used by `--tunnel` to reach fleetd's API socket.
    pub async fn open_unix_socket(&self, path: &str) -> Result<SshStream, SshError> {
        let channel = self
            .handle
            .channel_open_direct_streamlocal(path)
            .await
            .map_err(|source| SshError::Channel {
                addr: self.addr.clone(),
                what: format!("a stream to unix socket {path}"),
                source: Box::new(source),
            })?;
        Ok(SshStream {
            inner: channel.into_stream(),
        })
    }

    /// Opens a stream to `host:port` as reached from the remote host (`direct-tcpip`); used by
    /// `--tunnel` to reach etcd.
    pub async fn open_tcp(&self, host: &str, port: u16) -> Result<SshStream, SshError> {
        let channel = self
            .handle
            .channel_open_direct_tcpip(host, u32::from(port), "127.0.0.1", 0)
            .await
            .map_err(|source| SshError::Channel {
                addr: self.addr.clone(),
                what: format!(
                    "a TCP stream to {}",
                    crate::client::display_addr(host, port)
                ),
                source: Box::new(source),
            })?;
        Ok(SshStream {
            inner: channel.into_stream(),
        })
    }

    /// Connects to `addr` through this session (fleet's tunnelled client: `fleetctl --tunnel
    /// BASTION ssh MACHINE`). `cfg` applies to the new connection; the target's host key is
    /// checked under the name given in `addr`.
    pub async fn connect_via(
        &self,
        addr: &str,
        cfg: &crate::SshConfig,
    ) -> Result<Session, SshError> {
        crate::client::connect_via(self, addr, cfg).await
    }

    /// Closes the connection politely.
    pub async fn close(self) -> Result<(), SshError> {
        self.handle
            .disconnect(russh::Disconnect::ByApplication, "", "en")
            .await
            .map_err(|source| SshError::Handshake {
                addr: self.addr.clone(),
                source: Box::new(source),
            })
    }
}

async fn write_out<W: AsyncWrite + Unpin + ?Sized>(w: &mut W, data: &[u8]) -> io::Result<()> {
    w.write_all(data).await?;
    w.flush().await
}

/// Linux signal numbers for the names SSH reports.
fn signal_number(sig: &Sig) -> i32 {
    match sig {
        Sig::HUP => 1,
        Sig::INT => 2,
        Sig::QUIT => 3,
        Sig::ILL => 4,
        Sig::ABRT => 6,
        Sig::FPE => 8,
        Sig::KILL => 9,
        Sig::USR1 => 10,
        Sig::SEGV => 11,
        Sig::PIPE => 13,
        Sig::ALRM => 14,
        Sig::TERM => 15,
        Sig::Custom(name) => match name.as_str() {
            "USR2" => 12,
            _ => 0,
        },
    }
}

/// A byte stream through an SSH channel (a remote unix socket or TCP port). Dropping it closes
/// the channel; shutting down its write half sends EOF.
pub struct SshStream {
    inner: ChannelStream<Msg>,
}

impl std::fmt::Debug for SshStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SshStream").finish_non_exhaustive()
    }
}

impl AsyncRead for SshStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for SshStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signal_numbers() {
        let check = |sig: Sig, expected: i32| assert_eq!(signal_number(&sig), expected);
        check(Sig::TERM, 15);
        check(Sig::KILL, 9);
        check(Sig::HUP, 1);
        check(Sig::Custom("USR2".into()), 12);
        check(Sig::Custom("WEIRD".into()), 0);
    }
}
