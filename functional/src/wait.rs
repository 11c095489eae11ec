//! Bounded polling: wait for a condition instead of sleeping for a guessed time.

use std::fmt::Display;
use std::thread;
use std::time::{Duration, Instant};

use crate::Error;

/// First pause between two attempts; it doubles up to [`MAX_PAUSE`].
const FIRST_PAUSE: Duration = Duration::from_millis(50);
const MAX_PAUSE: Duration = Duration::from_millis(500);

/// Calls `probe` until it returns `Ok`, or fails with [`Error::Timeout`] (carrying the
/// last `Err` text) once `timeout` has passed. The probe runs at least once.
///
/// ```no_run
/// # use std::time::Duration;
/// # fn machines() -> usize { 3 }
/// let n = functional::wait_for("3 machines", Duration::from_secs(10), || {
///     let n = machines();
///     if n == 3 { Ok(n) } else { Err(format!("{n} machines")) }
/// })?;
/// # Ok::<(), functional::Error>(())
/// ```
pub fn wait_for<T, E: Display>(
    what: &str,
    timeout: Duration,
    mut probe: impl FnMut() -> Result<T, E>,
) -> Result<T, Error> {
    let start = Instant::now();
    let mut pause = FIRST_PAUSE;
    loop {
        let last = match probe() {
            Ok(v) => return Ok(v),
            Err(e) => e.to_string(),
        };
        let waited = start.elapsed();
        if waited >= timeout {
            return Err(Error::Timeout {
                what: what.to_string(),
                waited,
                last,
            });
        }
        thread::sleep(pause.min(timeout - waited));
        pause = (pause * 2).min(MAX_PAUSE);
    }
}

/// Asserts that a boolean condition becomes true within a timeout (bounded poll).
///
/// `assert_eventually!(Duration::from_secs(5), cond)` or with a message:
/// `assert_eventually!(Duration::from_secs(5), cond, "unit {} running", name)`.
#[macro_export]
macro_rules! assert_eventually {
    ($timeout:expr, $cond:expr $(,)?) => {
        $crate::assert_eventually!($timeout, $cond, "{}", stringify!($cond))
    };
    ($timeout:expr, $cond:expr, $($arg:tt)+) => {
        if let Err(e) = $crate::wait_for(&format!($($arg)+), $timeout, || {
            if $cond { Ok(()) } else { Err("condition still false") }
        }) {
            panic!("{e}");
        }
    };
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::Cell;

    #[test]
    fn returns_the_first_success() {
        let calls = Cell::new(0);
        let got = wait_for("third call", Duration::from_secs(10), || {
            calls.set(calls.get() + 1);
            if calls.get() == 3 {
                Ok(calls.get())
            } else {
                Err("not yet")
            }
        })
        .expect("succeeds on the third call");
        assert_eq!(got, 3);
    }

    #[test]
    fn gives_up_with_the_last_error() {
        let calls = Cell::new(0);
        let err = wait_for("never", Duration::from_millis(120), || {
            calls.set(calls.get() + 1);
            Err::<(), _>(format!("attempt {}", calls.get()))
        })
        .expect_err("never succeeds");
        let text = err.to_string();
        assert!(text.contains("never"), "{text}");
        assert!(text.contains(&format!("attempt {}", calls.get())), "{text}");
    }

    #[test]
    fn a_zero_timeout_still_probes_once() {
        let got = wait_for("now", Duration::ZERO, || Ok::<_, String>(7));
        assert_eq!(got.expect("first probe succeeds"), 7);
    }

    #[test]
    fn assert_eventually_passes_once_true() {
        let n = Cell::new(0);
        assert_eventually!(Duration::from_secs(10), {
            n.set(n.get() + 1);
            n.get() > 2
        });
    }

    #[test]
    #[should_panic(expected = "gave up")]
    fn assert_eventually_panics_when_never_true() {
        assert_eventually!(Duration::from_millis(50), false, "the impossible");
    }
}
