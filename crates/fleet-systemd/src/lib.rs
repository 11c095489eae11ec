//! The agent's view of the local systemd: unit files, D-Bus calls and state change signals.
//!
//! fleetd's agent never talks to systemd directly; it goes through the [`UnitManager`]
//! trait. [`SystemdManager`] is the real implementation (zbus on the system bus, or on the
//! user manager's session bus); [`fake::FakeUnitManager`] is an in-memory one with the same
//! semantics for the agent's unit tests.
//!
//! # What the agent does with it
//!
//! One reconciliation batch is, in order: [`UnitManager::remove_units`] (or `remove_unit`
//! each) for units to unload, [`UnitManager::write_unit`] (+ [`UnitManager::enable`] for units
//! with an `[Install]` section) for units to load, **one** [`UnitManager::reload`], then
//! [`UnitManager::stop`] / [`UnitManager::start`]. None of these wait for systemd's jobs to
//! finish: state comes back through [`UnitManager::subscribe`]. Calls may be made
//! concurrently (e.g. 200 starts at once); the real manager keeps at most 64 in flight on its
//! connection, below dbus-daemon's limit of pending replies per connection.
//!
//! # Invariants
//!
//! * Nothing is ever written or removed outside `units_directory`: every name passes
//!   [`validate_name`] first (fleet-unit has validated it already; this is defence in depth).
//! * States are learnt from systemd's signals, never by polling. [`UnitManager::states`] is for
//!   the initial read and for re-reading after a [`UnitEvent::Resync`].

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, PoisonError, RwLock};

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

mod dbus;
mod error;
#[cfg(any(test, feature = "fake"))]
pub mod fake;
mod files;
mod signals;

pub use dbus::{ManagerConfig, SystemdManager};
pub use error::{DBusError, Error, Result};
pub use files::{DEFAULT_UNITS_DIRECTORY, recognized_unit_type};

/// The three systemd state strings fleet publishes for a unit (`states/<unit>/<machine>`).
///
/// Serialized with fleet's field names (`loadState`, `activeState`, `subState`).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SystemdState {
    /// `loaded`, `not-found`, `error`, `masked`, ...
    pub load_state: String,
    /// `active`, `inactive`, `failed`, `activating`, `deactivating`, `reloading`.
    pub active_state: String,
    /// Type specific: `running`, `dead`, `exited`, `failed`, `start-pre`, ...
    pub sub_state: String,
}

impl SystemdState {
    /// Builds a state from its three strings.
    pub fn new(load: &str, active: &str, sub: &str) -> Self {
        SystemdState {
            load_state: load.to_owned(),
            active_state: active.to_owned(),
            sub_state: sub.to_owned(),
        }
    }
}

/// A watched unit's state as systemd just reported it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StateChange {
    /// The unit's name, e.g. `hello.service`.
    pub name: String,
    /// `Some`: the unit's new state (only sent when it differs from the last one sent).
    ///
    /// `None`: systemd unloaded the unit (its `UnitRemoved` signal). That is usually garbage
    /// collection of a stopped unit nothing refers to; it does **not** mean the file is gone.
    /// The last `Some` sent stays true for the active and sub state (systemd only collects
    /// inactive units), and asking [`UnitManager::states`] would load the unit again and report
    /// it as `inactive`/`dead` with the load state of its file, which is what fleet published.
    /// So a publisher should keep the last state rather than delete it; and it should not answer
    /// `None` with a `states()` call for the same unit, because that load is collected again,
    /// and sends another `None`. A `daemon-reexec` also sends `None` for every loaded unit
    /// (the old manager unloads them all, running or not), followed by a [`UnitEvent::Resync`].
    pub state: Option<SystemdState>,
}

/// Why a subscriber must re-read the states of every unit it watches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResyncReason {
    /// The subscription's D-Bus connection was lost and has been re-established; signals in
    /// between were missed.
    Reconnected,
    /// systemd finished a `daemon-reload` (its `Reloading(false)` signal): units were reloaded
    /// from disk without per-unit signals.
    Reloaded,
    /// The owner of `org.freedesktop.systemd1` changed (`daemon-reexec`, or the user manager
    /// restarted); the subscription was renewed.
    ManagerRestarted,
}

/// What a subscription delivers, in the order systemd sent it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UnitEvent {
    /// A watched unit changed state, or was unloaded.
    Changed(StateChange),
    /// Signals may have been missed: call [`UnitManager::states`] for every watched unit.
    Resync(ResyncReason),
}

/// The set of unit names a subscription reports on; shared between the caller and the
/// subscription, so the agent adds a unit when it loads it and removes it when it unloads it.
///
/// Signals for units not in the set are dropped after a hash lookup. Adding a name does not
/// emit that unit's current state: read it with [`UnitManager::states`].
#[derive(Debug, Clone, Default)]
pub struct WatchSet {
    names: Arc<RwLock<BTreeSet<String>>>,
}

impl WatchSet {
    /// An empty set.
    pub fn new() -> Self {
        WatchSet::default()
    }

    /// Starts reporting `name`; returns false if it was already watched.
    pub fn insert(&self, name: impl Into<String>) -> bool {
        self.names
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(name.into())
    }

    /// Stops reporting `name`; returns false if it was not watched.
    pub fn remove(&self, name: &str) -> bool {
        self.names
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(name)
    }

    /// Whether `name` is watched.
    pub fn contains(&self, name: &str) -> bool {
        self.names
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .contains(name)
    }

    /// The watched names, sorted.
    pub fn names(&self) -> Vec<String> {
        self.names
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .cloned()
            .collect()
    }

    /// How many names are watched.
    pub fn len(&self) -> usize {
        self.names
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }

    /// Whether no name is watched.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl<S: Into<String>> FromIterator<S> for WatchSet {
    fn from_iter<I: IntoIterator<Item = S>>(iter: I) -> Self {
        let set = WatchSet::new();
        for name in iter {
            set.insert(name);
        }
        set
    }
}

/// How many events a subscription buffers before it waits for the receiver (back-pressure:
/// systemd's signals then queue in the bus, nothing is dropped).
pub const SUBSCRIPTION_BUFFER: usize = 4096;

/// fleetd's handle on the local service manager.
///
/// Every method that names a unit refuses a name that fails [`validate_name`] with
/// [`Error::InvalidName`] before touching disk or D-Bus. Errors from systemd carry the unit
/// name and the D-Bus error name and message.
#[async_trait]
pub trait UnitManager: Send + Sync {
    /// Writes `contents` to `<units_directory>/<name>` atomically (temporary file, then
    /// rename; mode 0644) and links it into systemd's runtime unit directory
    /// (`LinkUnitFiles([path], runtime=true, force=true)`). Does not reload: call
    /// [`reload`](Self::reload) once after a batch.
    async fn write_unit(&self, name: &str, contents: &str) -> Result<()>;

    /// [`write_unit`](Self::write_unit) for a batch of `(name, contents)`: the real manager
    /// writes every file, then links them all in one `LinkUnitFiles` (one D-Bus round trip
    /// and one walk of systemd's unit directories instead of one per unit). One result per
    /// unit, in order; when the shared call fails, the units are linked one by one so that
    /// each error names its unit.
    async fn write_units(&self, units: &[(String, String)]) -> Vec<Result<()>> {
        let mut results = Vec::with_capacity(units.len());
        for (name, contents) in units {
            results.push(self.write_unit(name, contents).await);
        }
        results
    }

    /// Unlinks and disables the unit in the runtime directory (`DisableUnitFiles([name],
    /// runtime=true)`), clears a failed state (`ResetFailedUnit`), and removes its file. The
    /// file is removed even if a D-Bus call failed (the first error is returned). Does not stop
    /// the unit (call [`stop`](Self::stop) first) and does not reload.
    async fn remove_unit(&self, name: &str) -> Result<()>;

    /// [`remove_unit`](Self::remove_unit) for several units, for a batch of unloads: the real
    /// manager disables them all in one `DisableUnitFiles` (systemd walks its unit directories
    /// once per call, so this is much cheaper than one call per unit). Every unit is
    /// attempted; the first error is returned. Names are all checked before anything is done.
    async fn remove_units(&self, names: &[String]) -> Result<()> {
        for name in names {
            validate_name(name)?;
        }
        let mut first_error = None;
        for name in names {
            if let Err(e) = self.remove_unit(name).await {
                first_error.get_or_insert(e);
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    /// One `daemon-reload`. Returns when systemd has finished reloading.
    async fn reload(&self) -> Result<()>;

    /// `EnableUnitFiles([path], runtime=true, force=true)`, for a unit written with an
    /// `[Install]` section. A unit without install information is an error
    /// ([`Error::NoInstallInfo`]), as in fleet.
    async fn enable(&self, name: &str) -> Result<()>;

    /// `StartUnit(name, "replace")`. Returns once systemd has queued the job; the outcome
    /// arrives as state changes.
    async fn start(&self, name: &str) -> Result<()>;

    /// `StopUnit(name, "replace")`. Returns once systemd has queued the job.
    async fn stop(&self, name: &str) -> Result<()>;

    /// Current states of `names`, as systemd reports them now. A unit systemd does not know
    /// is reported by systemd itself (`not-found`/`inactive`/`dead`); every name asked for is
    /// in the answer. Note that systemd loads a unit to answer about it.
    async fn states(&self, names: &[String]) -> Result<BTreeMap<String, SystemdState>>;

    /// Starts delivering state changes of the units in `watch`, learnt from systemd's signals.
    ///
    /// Subscribe first, then read [`states`](Self::states), then apply events: nothing is lost
    /// in between. The subscription lives until the receiver is dropped, survives the loss of
    /// its bus connection and systemd restarts, and reports those as [`UnitEvent::Resync`].
    async fn subscribe(&self, watch: WatchSet) -> Result<mpsc::Receiver<UnitEvent>>;

    /// Names of the unit files in `units_directory` (recognized unit types only, sorted), so a
    /// restarted agent finds the units it left behind.
    async fn unit_file_names(&self) -> Result<Vec<String>>;

    /// The text of unit `name`'s file in `units_directory`, as a restarted agent finds it
    /// (to adopt the unit only if the registry still wants exactly that).
    async fn read_unit(&self, name: &str) -> Result<String>;
}

/// The longest unit name systemd accepts (`UNIT_NAME_MAX` is 256 with the NUL), which is
/// also the longest file name (NAME_MAX): the limit of every unit name fleet creates.
const MAX_NAME_LEN: usize = fleet_unit::UNIT_NAME_MAX;
// the reason `validate_name` gives spells the number out
const _: () = assert!(MAX_NAME_LEN == 255);

/// Refuses a unit name that could address a file outside the units directory (empty, `.`,
/// `..`, or containing `/` or NUL) or that no file or systemd unit can have (over 255 bytes).
pub fn validate_name(name: &str) -> Result<()> {
    let reason = if name.is_empty() {
        "name is empty"
    } else if name == "." || name == ".." {
        "name is a directory reference"
    } else if name.contains('/') {
        "name contains '/'"
    } else if name.contains('\0') {
        "name contains NUL"
    } else if name.len() > MAX_NAME_LEN {
        "name is longer than 255 bytes"
    } else {
        return Ok(());
    };
    Err(Error::InvalidName {
        name: name.to_owned(),
        reason,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validate_name_table() {
        let cases: &[(&str, bool)] = &[
            ("hello.service", true),
            ("foo@bar.service", true),
            (".hidden.service", true),
            ("a..b.service", true),
            ("", false),
            (".", false),
            ("..", false),
            ("../etc/passwd", false),
            ("a/b.service", false),
            ("/abs.service", false),
            ("nul\0.service", false),
        ];
        for (name, ok) in cases {
            assert_eq!(validate_name(name).is_ok(), *ok, "{name:?}");
        }
        let longest = format!("{}.service", "a".repeat(MAX_NAME_LEN - ".service".len()));
        assert!(validate_name(&longest).is_ok());
        assert!(validate_name(&format!("a{longest}")).is_err());
    }

    #[test]
    fn state_serializes_with_fleet_field_names() {
        let state = SystemdState::new("loaded", "active", "running");
        let json = serde_json::to_string(&state).expect("serialize");
        assert_eq!(
            json,
            r#"{"loadState":"loaded","activeState":"active","subState":"running"}"#
        );
        let back: SystemdState = serde_json::from_str(&json).expect("deserialize");
        assert_eq!(back, state);
    }

    #[test]
    fn watch_set_is_shared_between_clones() {
        let a = WatchSet::new();
        let b = a.clone();
        assert!(a.insert("x.service"));
        assert!(!b.insert("x.service"));
        assert!(b.contains("x.service"));
        assert!(b.remove("x.service"));
        assert!(a.is_empty());
        let c: WatchSet = ["b.service", "a.service"].into_iter().collect();
        assert_eq!(c.names(), vec!["a.service", "b.service"]);
        assert_eq!(c.len(), 2);
    }
}
