//! The local terminal during an interactive session: raw mode with guaranteed restore, its size,
//! and SIGWINCH watching.

use std::io;
use std::os::fd::AsFd;

use rustix::termios::{self, OptionalActions, Termios};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

/// Puts a terminal in raw mode and restores its previous settings when dropped, so every exit
/// path (return, error, panic unwinding, a dropped future) leaves the terminal as it was.
pub struct RawMode<F: AsFd> {
    fd: F,
    saved: Termios,
}

impl<F: AsFd> RawMode<F> {
    /// Saves the settings of `fd` and switches it to raw mode.
    pub fn enable(fd: F) -> io::Result<RawMode<F>> {
        let saved = termios::tcgetattr(&fd)?;
        let mut raw = saved.clone();
        raw.make_raw();
        termios::tcsetattr(&fd, OptionalActions::Now, &raw)?;
        Ok(RawMode { fd, saved })
    }
}

impl<F: AsFd> Drop for RawMode<F> {
    fn drop(&mut self) {
        if let Err(e) = termios::tcsetattr(&self.fd, OptionalActions::Now, &self.saved) {
            tracing::warn!("failed to restore the terminal settings: {e}");
        }
    }
}

/// The terminal's size as (columns, rows); `None` when unknown or zero.
pub fn size<F: AsFd>(fd: F) -> Option<(u32, u32)> {
    let ws = termios::tcgetwinsize(fd).ok()?;
    (ws.ws_col > 0 && ws.ws_row > 0).then_some((u32::from(ws.ws_col), u32::from(ws.ws_row)))
}

/// Sends stdin's terminal size on `tx` after every SIGWINCH until aborted or `tx` closes.
pub(crate) fn watch_resizes(tx: mpsc::Sender<(u32, u32)>) -> JoinHandle<()> {
    tokio::spawn(async move {
        use tokio::signal::unix::{SignalKind, signal};
        let mut winch = match signal(SignalKind::window_change()) {
            Ok(s) => s,
            Err(e) => {
                tracing::debug!("cannot watch SIGWINCH: {e}");
                return;
            }
        };
        while winch.recv().await.is_some() {
            if let Some(sz) = size(std::io::stdin())
                && tx.send(sz).await.is_err()
            {
                return;
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustix::pty::{OpenptFlags, grantpt, openpt, ptsname, unlockpt};
    use rustix::termios::{LocalModes, Winsize};

    /// A pseudo-terminal pair: (controller, the terminal side).
    fn pty_pair() -> (std::os::fd::OwnedFd, std::fs::File) {
        let controller = openpt(OpenptFlags::RDWR | OpenptFlags::NOCTTY).expect("openpt");
        grantpt(&controller).expect("grantpt");
        unlockpt(&controller).expect("unlockpt");
        let name = ptsname(&controller, Vec::new()).expect("ptsname");
        let name = name.to_str().expect("pty name is UTF-8").to_string();
        let terminal = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&name)
            .expect("open pty");
        (controller, terminal)
    }

    #[test]
    fn raw_mode_is_restored_on_drop() {
        let (_controller, term) = pty_pair();
        let before = termios::tcgetattr(&term).expect("tcgetattr");
        assert!(
            before
                .local_modes
                .contains(LocalModes::ICANON | LocalModes::ECHO)
        );
        {
            let _raw = RawMode::enable(&term).expect("raw mode");
            let during = termios::tcgetattr(&term).expect("tcgetattr");
            assert!(!during.local_modes.contains(LocalModes::ICANON));
            assert!(!during.local_modes.contains(LocalModes::ECHO));
        }
        let after = termios::tcgetattr(&term).expect("tcgetattr");
        assert_eq!(after.local_modes, before.local_modes);
        assert_eq!(after.input_modes, before.input_modes);
        assert_eq!(after.output_modes, before.output_modes);
    }

    #[test]
    fn raw_mode_is_restored_after_a_panic() {
        let (_controller, term) = pty_pair();
        let before = termios::tcgetattr(&term).expect("tcgetattr");
        let result = std::panic::catch_unwind(|| {
            let _raw = RawMode::enable(&term).expect("raw mode");
            panic!("boom");
        });
        assert!(result.is_err());
        let after = termios::tcgetattr(&term).expect("tcgetattr");
        assert_eq!(after.local_modes, before.local_modes);
    }

    #[test]
    fn terminal_size() {
        let (_controller, term) = pty_pair();
        let ws = Winsize {
            ws_row: 33,
            ws_col: 101,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        termios::tcsetwinsize(&term, ws).expect("set size");
        assert_eq!(size(&term), Some((101, 33)));
        let (_c2, unsized_term) = pty_pair();
        assert_eq!(size(&unsized_term), None);
        let not_a_tty = tempfile::tempfile().expect("tempfile");
        assert_eq!(size(&not_a_tty), None);
    }
}
