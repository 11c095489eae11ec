//! A stream wrapper whose writes fail once they have been blocked for too long, so that a
//! client that stops reading (pipelining requests and never reading the answers), or reads
//! only a trickle, cannot hold its connection slot forever.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

/// Wraps `IO`; its writes, flushes and shutdowns may stay blocked (pending) for a limited time
/// only, after which they fail with [`io::ErrorKind::TimedOut`].
///
/// The limit is a budget of blocked time: it starts at `timeout`, every blocked stretch spends
/// what it lasted, and every byte written earns back `1 / min_rate` seconds, up to `timeout`
/// again. So a client that reads nothing is cut off after `timeout`, and one that reads, but
/// on average slower than `min_rate` bytes per second while the server waits for it (a few
/// KB every 25 s, forever), loses its connection too: progress does not restart the clock.
/// Time the server spends not writing costs nothing. Reads are passed through: hyper bounds
/// those with its header read timeout and the API with its request timeout.
pub(crate) struct WriteTimeout<IO> {
    io: IO,
    /// The most blocked time a connection can have in reserve.
    timeout: Duration,
    /// Bytes per second a client must read while the server waits for it, on average.
    min_rate: u64,
    /// Blocked time this connection may still spend, at most `timeout`.
    budget: Duration,
    /// When the current blocked stretch began: a write returned pending and none has
    /// completed since.
    blocked_since: Option<Instant>,
    /// Fires at `blocked_since + budget`; armed while blocked.
    timer: Option<Pin<Box<Sleep>>>,
}

impl<IO> WriteTimeout<IO> {
    /// `min_rate` in bytes per second; 0 turns the rate off (only `timeout` without any
    /// progress remains).
    pub(crate) fn new(io: IO, timeout: Duration, min_rate: u64) -> WriteTimeout<IO> {
        WriteTimeout {
            io,
            timeout,
            min_rate,
            budget: timeout,
            blocked_since: None,
            timer: None,
        }
    }

    /// Accounts for one poll of a write (`written` bytes when it completed) and fails it once
    /// the budget is spent.
    fn check<T>(
        &mut self,
        cx: &mut Context<'_>,
        r: Poll<io::Result<T>>,
        written: impl FnOnce(&T) -> usize,
    ) -> Poll<io::Result<T>> {
        match r {
            Poll::Ready(v) => {
                let now = Instant::now();
                if let Some(since) = self.blocked_since.take() {
                    self.budget = self
                        .budget
                        .saturating_sub(now.saturating_duration_since(since));
                }
                if let Ok(v) = &v {
                    self.earn(written(v));
                }
                Poll::Ready(v)
            }
            Poll::Pending => {
                let since = *self.blocked_since.get_or_insert_with(Instant::now);
                // The budget does not change while blocked, so neither does the deadline.
                let Some(deadline) = since.checked_add(self.budget) else {
                    return Poll::Pending;
                };
                let timer = self
                    .timer
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
                if timer.deadline() != deadline {
                    timer.as_mut().reset(deadline);
                }
                match timer.as_mut().poll(cx) {
                    Poll::Ready(()) => Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "client did not read the response in time",
                    ))),
                    Poll::Pending => Poll::Pending,
                }
            }
        }
    }

    /// `bytes` were written: they earn back blocked time at the minimum rate.
    fn earn(&mut self, bytes: usize) {
        let earned = if self.min_rate == 0 {
            self.timeout
        } else {
            Duration::from_secs_f64(bytes as f64 / self.min_rate as f64).min(self.timeout)
        };
        self.budget = self.budget.saturating_add(earned).min(self.timeout);
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for WriteTimeout<IO> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for WriteTimeout<IO> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.io).poll_write(cx, buf);
        self.check(cx, r, |n| *n)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.io).poll_write_vectored(cx, bufs);
        self.check(cx, r, |n| *n)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let r = Pin::new(&mut self.io).poll_flush(cx);
        self.check(cx, r, |()| 0)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let r = Pin::new(&mut self.io).poll_shutdown(cx);
        self.check(cx, r, |()| 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test(start_paused = true)]
    async fn a_write_nobody_reads_fails_after_the_timeout() {
        let (client, server) = tokio::io::duplex(16);
        let mut w = WriteTimeout::new(server, Duration::from_secs(5), 4);
        let start = tokio::time::Instant::now();
        let err = w.write_all(&[0u8; 64]).await.expect_err("nobody reads");
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        assert_eq!(start.elapsed(), Duration::from_secs(5));
        drop(client);
    }

    #[tokio::test(start_paused = true)]
    async fn a_reader_that_keeps_up_never_times_out() {
        let (mut client, server) = tokio::io::duplex(16);
        // 8 bytes a second, twice the minimum rate
        let mut w = WriteTimeout::new(server, Duration::from_secs(5), 4);
        let reader = tokio::spawn(async move {
            let mut got = Vec::new();
            let mut buf = [0u8; 8];
            loop {
                // slower than the buffer fills, faster than the timeout
                tokio::time::sleep(Duration::from_secs(1)).await;
                match client.read(&mut buf).await {
                    Ok(0) | Err(_) => return got.len(),
                    Ok(n) => got.extend_from_slice(&buf[..n]),
                }
            }
        });
        w.write_all(&[1u8; 256]).await.expect("reader keeps up");
        w.shutdown().await.expect("shutdown");
        drop(w);
        assert_eq!(reader.await.expect("reader"), 256);
    }

    /// A reader taking `chunk` bytes every `every`, forever; returns what it got.
    fn trickle(
        mut client: tokio::io::DuplexStream,
        chunk: usize,
        every: Duration,
    ) -> tokio::task::JoinHandle<usize> {
        tokio::spawn(async move {
            let mut got = 0;
            let mut buf = vec![0u8; chunk];
            loop {
                tokio::time::sleep(every).await;
                match client.read(&mut buf).await {
                    Ok(0) | Err(_) => return got,
                    Ok(n) => got += n,
                }
            }
        })
    }

    /// A client reading a little every so often, well within the no-progress timeout but
    /// far below the minimum rate, kept its connection forever before the budget (each read
    /// restarted the clock): this write of 4 KiB succeeded after 2,560 s of trickling.
    #[tokio::test(start_paused = true)]
    async fn a_trickling_reader_loses_the_connection_however_often_it_reads() {
        let (client, server) = tokio::io::duplex(64);
        let timeout = Duration::from_secs(30);
        // 8 bytes every 5 s: 1.6 B/s, against a minimum of 16 B/s
        let mut w = WriteTimeout::new(server, timeout, 16);
        let reader = trickle(client, 8, Duration::from_secs(5));
        let start = tokio::time::Instant::now();
        let err = w
            .write_all(&[0u8; 4096])
            .await
            .expect_err("a trickle is not enough");
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        // each 5 s wait costs 5 s and earns 0.5 s back: the 30 s budget lasts about 33 s
        let took = start.elapsed();
        assert!(
            took > timeout && took < 2 * timeout,
            "cut off after {took:?}"
        );
        drop(w);
        assert!(reader.await.expect("reader") < 4096);
    }

    /// Blocked time is budgeted over the connection's life, not per write: many small
    /// responses each read late still use it up.
    #[tokio::test(start_paused = true)]
    async fn the_budget_spans_writes() {
        let (client, server) = tokio::io::duplex(8);
        let mut w = WriteTimeout::new(server, Duration::from_secs(10), 1024);
        let reader = trickle(client, 8, Duration::from_secs(4));
        let start = tokio::time::Instant::now();
        let mut result = Ok(());
        for _ in 0..100 {
            result = w.write_all(&[1u8; 16]).await;
            if result.is_err() {
                break;
            }
        }
        let err = result.expect_err("the budget runs out");
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "{:?}",
            start.elapsed()
        );
        drop(w);
        let _ = reader.await;
    }

    /// A reader at the minimum rate or faster is never cut off, however long it reads.
    #[tokio::test(start_paused = true)]
    async fn a_reader_at_the_minimum_rate_reads_everything() {
        let (client, server) = tokio::io::duplex(64);
        let mut w = WriteTimeout::new(server, Duration::from_secs(30), 16);
        // 16 bytes a second, exactly the minimum, for over an hour
        let reader = trickle(client, 16, Duration::from_secs(1));
        w.write_all(&[2u8; 64 * 1024])
            .await
            .expect("a reader at the minimum rate keeps up");
        w.shutdown().await.expect("shutdown");
        drop(w);
        assert_eq!(reader.await.expect("reader"), 64 * 1024);
    }
}
