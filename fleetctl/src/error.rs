//! How a command ends when it does not succeed: an exit code and the message for stderr.
//! `main` is the only place that turns a [`Failure`] into output and an exit status.

use std::fmt;

/// A command's unsuccessful end.
#[derive(Debug)]
pub struct Failure {
    /// The process exit status.
    pub code: i32,
    /// What to print on stderr; `None` when everything was printed already (or, for a remote
    /// command, when the exit status speaks for itself).
    pub message: Option<String>,
}

impl Failure {
    /// Exit with `code` after printing `message` on stderr.
    pub fn new(code: i32, message: impl fmt::Display) -> Failure {
        Failure {
            code,
            message: Some(message.to_string()),
        }
    }

    /// Exit status 1 with `message`: fleetctl's usual failure.
    pub fn msg(message: impl fmt::Display) -> Failure {
        Failure::new(1, message)
    }

    /// Exit with `code` without printing anything more.
    pub fn silent(code: i32) -> Failure {
        Failure {
            code,
            message: None,
        }
    }
}

/// What every command returns.
pub type Outcome = Result<(), Failure>;

/// A registry error as the user should read it: the API driver's own message (fleet's
/// wording) rather than the transport wrapper it travels in, followed on a second line by
/// what to check when the driver has advice.
pub fn describe(e: &fleet_registry::RegistryError) -> String {
    match fleet_client::ClientError::from_registry(e) {
        Some(ce) => match ce.hint() {
            Some(hint) => format!("{ce}\n{hint}"),
            None => ce.to_string(),
        },
        None => e.to_string(),
    }
}
