//! Errors of the systemd layer: each names the unit (or the call) that failed and keeps the
//! D-Bus error name and message systemd sent.

use std::path::PathBuf;

/// Result of every fallible call in this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// A failed D-Bus exchange: the error name systemd (or the bus) replied with, or none when the
/// failure was local (connection lost, reply that did not decode).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}{message}", name.as_deref().map(|n| format!("{n}: ")).unwrap_or_default())]
pub struct DBusError {
    /// D-Bus error name, e.g. `org.freedesktop.systemd1.NoSuchUnit`.
    pub name: Option<String>,
    /// The human readable part.
    pub message: String,
    /// Whether the connection itself failed (the next call reconnects).
    pub transport: bool,
}

impl DBusError {
    /// Whether systemd replied with the D-Bus error `name`.
    pub fn is(&self, name: &str) -> bool {
        self.name.as_deref() == Some(name)
    }
}

impl From<zbus::Error> for DBusError {
    fn from(err: zbus::Error) -> Self {
        match err {
            zbus::Error::MethodError(name, message, _) => DBusError {
                name: Some(name.to_string()),
                message: message.unwrap_or_default(),
                transport: false,
            },
            zbus::Error::FDO(fdo) => {
                let name = zbus::DBusError::name(&*fdo).to_string();
                DBusError {
                    name: Some(name),
                    message: zbus::DBusError::description(&*fdo)
                        .unwrap_or_default()
                        .to_owned(),
                    transport: false,
                }
            }
            other => {
                let transport = matches!(
                    other,
                    zbus::Error::InputOutput(_)
                        | zbus::Error::Connection(..)
                        | zbus::Error::Handshake(_)
                        | zbus::Error::Address(_)
                );
                DBusError {
                    name: None,
                    message: other.to_string(),
                    transport,
                }
            }
        }
    }
}

/// Everything that can go wrong talking to systemd.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A unit name that could address a path outside the units directory.
    #[error("invalid unit name {name:?}: {reason}")]
    InvalidName {
        /// The name as given.
        name: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// Could not reach the bus.
    #[error("connecting to the {bus} bus: {error}")]
    Connect {
        /// `system` or `user session`.
        bus: &'static str,
        /// Why.
        error: DBusError,
    },
    /// A systemd call about one unit failed.
    #[error("{method} {unit}: {error}")]
    Unit {
        /// The unit the call was about.
        unit: String,
        /// The D-Bus method, e.g. `StartUnit`.
        method: &'static str,
        /// What systemd or the bus said.
        error: DBusError,
    },
    /// A systemd call not about one unit failed (`Reload`, `Subscribe`, `AddMatch`, ...).
    #[error("{method}: {error}")]
    Manager {
        /// The D-Bus method.
        method: &'static str,
        /// What systemd or the bus said.
        error: DBusError,
    },
    /// `EnableUnitFiles` found nothing to enable.
    #[error("failed to enable systemd unit {unit}: it carries no install information")]
    NoInstallInfo {
        /// The unit.
        unit: String,
    },
    /// A file operation in the units directory failed.
    #[error("{action} {}: {source}", path.display())]
    Io {
        /// What was being done, e.g. `writing unit file`.
        action: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
}

impl Error {
    /// The D-Bus error inside, if this is one.
    pub fn dbus(&self) -> Option<&DBusError> {
        match self {
            Error::Connect { error, .. }
            | Error::Unit { error, .. }
            | Error::Manager { error, .. } => Some(error),
            _ => None,
        }
    }

    /// Whether systemd answered that it cannot find the unit (`NoSuchUnit`): no unit file
    /// of that name in its search path, nor a unit of that name loaded.
    pub fn is_no_such_unit(&self) -> bool {
        self.dbus().is_some_and(|d| d.is(crate::dbus::NO_SUCH_UNIT))
    }

    /// The unit this error is about, if any.
    pub fn unit(&self) -> Option<&str> {
        match self {
            Error::InvalidName { name, .. } => Some(name),
            Error::Unit { unit, .. } | Error::NoInstallInfo { unit } => Some(unit),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_name_the_unit_and_the_dbus_error() {
        let cases: Vec<(Error, &str)> = vec![
            (
                Error::Unit {
                    unit: "hello.service".into(),
                    method: "StartUnit",
                    error: DBusError {
                        name: Some("org.freedesktop.systemd1.NoSuchUnit".into()),
                        message: "Unit hello.service not found.".into(),
                        transport: false,
                    },
                },
                "StartUnit hello.service: org.freedesktop.systemd1.NoSuchUnit: Unit hello.service not found.",
            ),
            (
                Error::Manager {
                    method: "Reload",
                    error: DBusError {
                        name: None,
                        message: "I/O error: broken pipe".into(),
                        transport: true,
                    },
                },
                "Reload: I/O error: broken pipe",
            ),
            (
                Error::InvalidName {
                    name: "a/b".into(),
                    reason: "name contains '/'",
                },
                "invalid unit name \"a/b\": name contains '/'",
            ),
            (
                Error::NoInstallInfo {
                    unit: "x.service".into(),
                },
                "failed to enable systemd unit x.service: it carries no install information",
            ),
        ];
        for (err, want) in cases {
            assert_eq!(err.to_string(), want);
        }
    }
}
