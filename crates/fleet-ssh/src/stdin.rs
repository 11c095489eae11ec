//! The process's standard input as an async reader, shared by every user in the process.
//!
//! tokio's own stdin reads on a blocking-pool thread, and a runtime waits for its blocking
//! threads when it shuts down: a read still parked on a terminal would keep fleetctl from exiting
//! after the remote side is done. So one detached thread reads stdin for the whole process and
//! hands chunks over a channel; whoever needs stdin (the new-host prompt, a shell, fd-forward)
//! takes the lock on the receiving side, and bytes it does not consume stay for the next user.

use std::io::{self, Read};
use std::pin::Pin;
use std::sync::OnceLock;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, ReadBuf};
use tokio::sync::{Mutex, MutexGuard, mpsc};

/// Receiving end of the stdin pump.
pub(crate) struct Pump {
    rx: mpsc::Receiver<io::Result<Vec<u8>>>,
    /// Bytes received but not yet consumed.
    pending: Vec<u8>,
}

static PUMP: OnceLock<Mutex<Pump>> = OnceLock::new();

fn pump() -> &'static Mutex<Pump> {
    PUMP.get_or_init(|| {
        let (tx, rx) = mpsc::channel(16);
        let spawned = std::thread::Builder::new()
            .name("fleet-ssh-stdin".into())
            .spawn(move || {
                let mut buf = vec![0u8; 16 * 1024];
                let mut stdin = io::stdin();
                loop {
                    match stdin.read(&mut buf) {
                        Ok(0) => break,
                        Ok(n) => {
                            if tx.blocking_send(Ok(buf[..n].to_vec())).is_err() {
                                break;
                            }
                        }
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                        Err(e) => {
                            let _ = tx.blocking_send(Err(e));
                            break;
                        }
                    }
                }
            });
        if let Err(e) = spawned {
            // Without the thread stdin reads as an immediate EOF; say why once.
            tracing::warn!("cannot start the stdin reader thread: {e}");
        }
        Mutex::new(Pump {
            rx,
            pending: Vec::new(),
        })
    })
}

/// Exclusive access to stdin until dropped.
pub(crate) struct StdinReader {
    guard: MutexGuard<'static, Pump>,
}

/// Waits for exclusive access to the process's stdin.
pub(crate) async fn reader() -> StdinReader {
    StdinReader {
        guard: pump().lock().await,
    }
}

impl StdinReader {
    /// Reads one line (without its newline); `None` at end of input.
    pub(crate) async fn read_line(&mut self) -> Option<String> {
        let mut line = Vec::new();
        loop {
            if let Some(pos) = self.guard.pending.iter().position(|b| *b == b'\n') {
                line.extend(self.guard.pending.drain(..=pos));
                line.pop();
                return Some(String::from_utf8_lossy(&line).into_owned());
            }
            let rest = std::mem::take(&mut self.guard.pending);
            line.extend(rest);
            match self.guard.rx.recv().await {
                Some(Ok(chunk)) => self.guard.pending = chunk,
                Some(Err(_)) | None => {
                    return (!line.is_empty()).then(|| String::from_utf8_lossy(&line).into_owned());
                }
            }
        }
    }
}

impl AsyncRead for StdinReader {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let pump = &mut *self.guard;
        if pump.pending.is_empty() {
            match pump.rx.poll_recv(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(None) => return Poll::Ready(Ok(())),
                Poll::Ready(Some(Err(e))) => return Poll::Ready(Err(e)),
                Poll::Ready(Some(Ok(chunk))) => pump.pending = chunk,
            }
        }
        let n = pump.pending.len().min(buf.remaining());
        buf.put_slice(&pump.pending[..n]);
        pump.pending.drain(..n);
        Poll::Ready(Ok(()))
    }
}
