//! [`SystemdManager`]: the real [`UnitManager`], systemd's `org.freedesktop.systemd1.Manager`
//! over zbus.
//!
//! Calls share one connection. When a call fails because the connection broke (dbus-daemon
//! restarted, socket closed), the connection is dropped, a new one is made, and the call is
//! sent once more; if that fails too the error is returned and the next call starts over.
//! Every call here is idempotent (link/enable with `force`, start/stop with `replace`), so the
//! retry cannot do harm, and callers may likewise simply call again.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::{Mutex, Semaphore, mpsc};
use zbus::Connection;
use zbus::message::Message;
use zbus::zvariant::{OwnedObjectPath, OwnedValue};

use crate::files::UnitsDir;
use crate::{
    DBusError, DEFAULT_UNITS_DIRECTORY, Error, Result, SystemdState, UnitEvent, UnitManager,
    WatchSet, signals, validate_name,
};

pub(crate) const SYSTEMD_SERVICE: &str = "org.freedesktop.systemd1";
pub(crate) const SYSTEMD_PATH: &str = "/org/freedesktop/systemd1";
pub(crate) const MANAGER_INTERFACE: &str = "org.freedesktop.systemd1.Manager";
pub(crate) const UNIT_INTERFACE: &str = "org.freedesktop.systemd1.Unit";
const PROPERTIES_INTERFACE: &str = "org.freedesktop.DBus.Properties";

/// How long a call may wait for systemd's reply before it fails (a frozen manager must not
/// hang the agent forever).
const CALL_TIMEOUT: Duration = Duration::from_secs(120);

/// How to reach systemd and where to keep unit files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ManagerConfig {
    /// Directory holding the unit files fleet writes; created (0755) on connect.
    pub units_directory: PathBuf,
    /// Talk to the user's service manager on the session bus (`$DBUS_SESSION_BUS_ADDRESS`,
    /// else `$XDG_RUNTIME_DIR/bus`) instead of the system manager on the system bus
    /// (`$DBUS_SYSTEM_BUS_ADDRESS`, else `/var/run/dbus/system_bus_socket`). fleet's
    /// `systemd_user`.
    pub user: bool,
}

impl Default for ManagerConfig {
    fn default() -> Self {
        ManagerConfig {
            units_directory: PathBuf::from(DEFAULT_UNITS_DIRECTORY),
            user: false,
        }
    }
}

/// Which bus systemd is on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum BusKind {
    System,
    Session,
    /// A private bus of a unit test (its own dbus-daemon).
    #[cfg(test)]
    Address(&'static str),
}

impl BusKind {
    fn label(self) -> &'static str {
        match self {
            BusKind::System => "system",
            BusKind::Session => "user session",
            #[cfg(test)]
            BusKind::Address(_) => "test",
        }
    }

    /// A new connection; `max_queued` sizes zbus's queue of incoming messages.
    pub(crate) async fn connect(self, max_queued: Option<usize>) -> Result<Connection> {
        let connect_err = |e: zbus::Error| Error::Connect {
            bus: self.label(),
            error: e.into(),
        };
        let builder = match self {
            BusKind::System => zbus::connection::Builder::system(),
            BusKind::Session => zbus::connection::Builder::session(),
            #[cfg(test)]
            BusKind::Address(address) => zbus::connection::Builder::address(address),
        }
        .map_err(connect_err)?
        .method_timeout(CALL_TIMEOUT);
        let builder = match max_queued {
            Some(n) => builder.max_queued(n),
            None => builder,
        };
        builder.build().await.map_err(connect_err)
    }
}

/// Calls in flight at once on the shared connection. dbus-daemon refuses more than
/// `max_replies_per_connection` pending replies (128 by default on the system bus) with
/// `org.freedesktop.DBus.Error.LimitsExceeded`; an agent starting 200 units concurrently hit
/// that, so callers beyond this many wait their turn instead.
const MAX_CALLS_IN_FLIGHT: usize = 64;

/// Most unit files linked by one `LinkUnitFiles` of [`UnitManager::write_units`].
const LINK_CHUNK: usize = 256;

/// The shared, self-healing connection for method calls.
#[derive(Debug)]
pub(crate) struct Caller {
    kind: BusKind,
    conn: Mutex<Option<Connection>>,
    in_flight: Semaphore,
}

impl Caller {
    async fn connection(&self) -> Result<Connection> {
        let mut slot = self.conn.lock().await;
        if let Some(conn) = slot.as_ref() {
            return Ok(conn.clone());
        }
        let conn = self.kind.connect(None).await?;
        *slot = Some(conn.clone());
        Ok(conn)
    }

    /// Forgets `broken` (unless another call replaced it already).
    async fn invalidate(&self, broken: &Connection) {
        let mut slot = self.conn.lock().await;
        if slot.as_ref().map(Connection::unique_name) == Some(broken.unique_name()) {
            *slot = None;
        }
    }

    /// Calls `method` on `interface` at `path` of systemd; errors name `unit` if given.
    pub(crate) async fn call<B>(
        &self,
        path: &str,
        interface: &str,
        method: &'static str,
        unit: Option<&str>,
        body: &B,
    ) -> Result<Message>
    where
        B: serde::Serialize + zbus::zvariant::DynamicType,
    {
        let mut retried = false;
        fleet_metrics::global().systemd_call(method);
        // Never closed, so acquiring cannot fail; a closed semaphore would just not limit.
        let _permit = self.in_flight.acquire().await.ok();
        loop {
            let conn = self.connection().await?;
            let error: DBusError = match conn
                .call_method(Some(SYSTEMD_SERVICE), path, Some(interface), method, body)
                .await
            {
                Ok(reply) => return Ok(reply),
                Err(e) => e.into(),
            };
            if error.transport {
                self.invalidate(&conn).await;
                if !retried {
                    tracing::debug!(method, %error, "D-Bus connection lost, reconnecting");
                    retried = true;
                    continue;
                }
            }
            return Err(match unit {
                Some(unit) => Error::Unit {
                    unit: unit.to_owned(),
                    method,
                    error,
                },
                None => Error::Manager { method, error },
            });
        }
    }

    /// Calls a method of the Manager interface.
    pub(crate) async fn manager<B>(
        &self,
        method: &'static str,
        unit: Option<&str>,
        body: &B,
    ) -> Result<Message>
    where
        B: serde::Serialize + zbus::zvariant::DynamicType,
    {
        self.call(SYSTEMD_PATH, MANAGER_INTERFACE, method, unit, body)
            .await
    }

    /// `ListUnitsByNames`, or the per-unit fallback when systemd lacks it (before v230).
    pub(crate) async fn states(
        &self,
        names: &[String],
        list_by_names: &AtomicBool,
    ) -> Result<BTreeMap<String, SystemdState>> {
        for name in names {
            validate_name(name)?;
        }
        if names.is_empty() {
            return Ok(BTreeMap::new());
        }
        if list_by_names.load(Ordering::Relaxed) {
            match self.list_units_by_names(names).await {
                Err(e) if e.dbus().is_some_and(|d| d.is(UNKNOWN_METHOD)) => {
                    tracing::debug!(
                        "ListUnitsByNames is not implemented by this systemd (needs 230), asking per unit"
                    );
                    list_by_names.store(false, Ordering::Relaxed);
                }
                other => return other,
            }
        }
        self.states_by_properties(names).await
    }

    async fn list_units_by_names(
        &self,
        names: &[String],
    ) -> Result<BTreeMap<String, SystemdState>> {
        let reply = self.manager("ListUnitsByNames", None, &names).await?;
        let units: Vec<ListedUnit> = reply.body().deserialize().map_err(|e| Error::Manager {
            method: "ListUnitsByNames",
            error: e.into(),
        })?;
        let mut states = BTreeMap::new();
        for (name, _desc, load, active, sub, ..) in units {
            states.insert(
                name,
                SystemdState {
                    load_state: load,
                    active_state: active,
                    sub_state: sub,
                },
            );
        }
        // systemd answers for every name asked; a gap would be a bug on its side, so ask it
        // the slow way rather than report nothing.
        let missing: Vec<String> = names
            .iter()
            .filter(|n| !states.contains_key(*n))
            .cloned()
            .collect();
        if !missing.is_empty() {
            states.extend(self.states_by_properties(&missing).await?);
        }
        Ok(states)
    }

    /// One `LoadUnit` + `Properties.GetAll` per unit: the way to ask before systemd 230.
    pub(crate) async fn states_by_properties(
        &self,
        names: &[String],
    ) -> Result<BTreeMap<String, SystemdState>> {
        let mut states = BTreeMap::new();
        for name in names {
            validate_name(name)?;
            let reply = self.manager("LoadUnit", Some(name), &name.as_str()).await?;
            let path: OwnedObjectPath = reply.body().deserialize().map_err(|e| Error::Unit {
                unit: name.clone(),
                method: "LoadUnit",
                error: e.into(),
            })?;
            let reply = self
                .call(
                    path.as_str(),
                    PROPERTIES_INTERFACE,
                    "GetAll",
                    Some(name),
                    &UNIT_INTERFACE,
                )
                .await?;
            let props: HashMap<String, OwnedValue> =
                reply.body().deserialize().map_err(|e| Error::Unit {
                    unit: name.clone(),
                    method: "GetAll",
                    error: e.into(),
                })?;
            let get = |key: &str| {
                props
                    .get(key)
                    .and_then(|v| <&str>::try_from(v).ok())
                    .map(str::to_owned)
                    .ok_or_else(|| Error::Unit {
                        unit: name.clone(),
                        method: "GetAll",
                        error: DBusError {
                            name: None,
                            message: format!("reply lacks the string property {key}"),
                            transport: false,
                        },
                    })
            };
            states.insert(
                name.clone(),
                SystemdState {
                    load_state: get("LoadState")?,
                    active_state: get("ActiveState")?,
                    sub_state: get("SubState")?,
                },
            );
        }
        Ok(states)
    }
}

const UNKNOWN_METHOD: &str = "org.freedesktop.DBus.Error.UnknownMethod";

/// One row of `ListUnits*`: name, description, load, active, sub, following, path, job id,
/// job type, job path.
type ListedUnit = (
    String,
    String,
    String,
    String,
    String,
    String,
    OwnedObjectPath,
    u32,
    String,
    OwnedObjectPath,
);

/// One change reported by `LinkUnitFiles`, `EnableUnitFiles`, `DisableUnitFiles`: type
/// (`symlink`, `unlink`), file, destination.
type FileChange = (String, String, String);

#[derive(Debug)]
pub(crate) struct Inner {
    pub(crate) kind: BusKind,
    pub(crate) caller: Caller,
    dir: UnitsDir,
    list_by_names: AtomicBool,
}

impl Inner {
    /// A manager on `kind`'s bus keeping its files in `dir`, for unit tests.
    #[cfg(test)]
    pub(crate) fn for_tests(kind: BusKind, dir: PathBuf) -> Result<Inner> {
        Ok(Inner {
            kind,
            caller: Caller {
                kind,
                conn: Mutex::new(None),
                in_flight: Semaphore::new(MAX_CALLS_IN_FLIGHT),
            },
            dir: UnitsDir::create(dir)?,
            list_by_names: AtomicBool::new(true),
        })
    }

    /// Current states, for the subscription's catch-up reads.
    pub(crate) async fn states(&self, names: &[String]) -> Result<BTreeMap<String, SystemdState>> {
        self.caller.states(names, &self.list_by_names).await
    }

    /// The unique name owning `org.freedesktop.systemd1` now (None: nobody), asked over the
    /// shared call connection (a subscription's own queue may be full of unread signals).
    pub(crate) async fn systemd_owner(&self) -> Result<Option<String>> {
        let conn = self.caller.connection().await?;
        let owner = crate::signals::name_owner(&conn).await;
        if let Err(Error::Manager { error, .. }) = &owner
            && error.transport
        {
            self.caller.invalidate(&conn).await;
        }
        owner
    }
}

/// fleetd's connection to the node's systemd (system manager, or the user's with
/// [`ManagerConfig::user`]). Cheap to clone; clones share the connection.
#[derive(Debug, Clone)]
pub struct SystemdManager {
    inner: Arc<Inner>,
}

impl SystemdManager {
    /// `StartUnit`/`StopUnit` with mode "replace": returns once systemd queued the job.
    async fn queue_job(&self, name: &str, method: &'static str, verb: &str) -> Result<()> {
        validate_name(name)?;
        let reply = self
            .inner
            .caller
            .manager(method, Some(name), &(name, "replace"))
            .await?;
        let job: Result<OwnedObjectPath, _> = reply.body().deserialize();
        tracing::info!(unit = name, job = ?job.ok(), "triggered systemd unit {verb}");
        Ok(())
    }

    /// Creates the units directory and connects to the bus (failing now if it is not there).
    pub async fn connect(config: ManagerConfig) -> Result<Self> {
        let dir = config.units_directory.clone();
        let dir = tokio::task::spawn_blocking(move || UnitsDir::create(dir))
            .await
            .map_err(|e| join_error("creating units directory", &config.units_directory, e))??;
        let kind = if config.user {
            BusKind::Session
        } else {
            BusKind::System
        };
        let caller = Caller {
            kind,
            conn: Mutex::new(None),
            in_flight: Semaphore::new(MAX_CALLS_IN_FLIGHT),
        };
        // Connect now, so a missing bus fails here rather than at the first call.
        let _connected = caller.connection().await?;
        Ok(SystemdManager {
            inner: Arc::new(Inner {
                kind,
                caller,
                dir,
                list_by_names: AtomicBool::new(true),
            }),
        })
    }

    /// [`UnitManager::states`] the slow way (`LoadUnit` + `Properties.GetAll` per unit), which
    /// is what runs on systemd older than 230. Public for the integration tests only.
    #[doc(hidden)]
    pub async fn states_by_properties(
        &self,
        names: &[String],
    ) -> Result<BTreeMap<String, SystemdState>> {
        self.inner.caller.states_by_properties(names).await
    }

    /// `DisableUnitFiles(names, runtime=true)`: removes the runtime link and any runtime
    /// enablement links of each unit.
    async fn disable(&self, names: &[String]) -> Result<()> {
        let unit = match names {
            [one] => Some(one.as_str()),
            _ => None,
        };
        let reply = self
            .inner
            .caller
            .manager("DisableUnitFiles", unit, &(names, true))
            .await?;
        let changes: Result<Vec<FileChange>, _> = reply.body().deserialize();
        tracing::debug!(?changes, "disabled unit files");
        Ok(())
    }

    /// The rest of a removal once the unit is disabled (or failed to be, `disable_error`):
    /// clears a failed state and removes the file, which goes even if a call failed.
    /// Unlinking comes before the file goes: a link left pointing at nothing, or a failed unit
    /// with no file, confuses later loads (fleet saw `systemctl stop fleet` hang).
    async fn finish_remove(&self, name: &str, disable_error: Option<Error>) -> Result<()> {
        let mut first_error = disable_error;
        match self
            .inner
            .caller
            .manager("ResetFailedUnit", Some(name), &name)
            .await
        {
            Err(e) if !e.is_no_such_unit() => {
                first_error.get_or_insert(e);
            }
            _ => {}
        }
        let owned_name = name.to_owned();
        let removed = self
            .blocking("removing unit file", name, move |dir| {
                dir.remove(&owned_name)
            })
            .await;
        match (first_error, removed) {
            (Some(e), _) => Err(e),
            (None, removed) => removed,
        }
    }

    /// `LinkUnitFiles(paths, runtime=true, force=true)`; errors name `what` (a unit).
    async fn link(&self, what: &str, paths: Vec<String>) -> Result<()> {
        let reply = self
            .inner
            .caller
            .manager("LinkUnitFiles", Some(what), &(paths, true, true))
            .await?;
        let changes: Vec<FileChange> = reply
            .body()
            .deserialize()
            .map_err(|e| decode_error(what, "LinkUnitFiles", e))?;
        tracing::debug!(unit = what, ?changes, "linked unit files");
        Ok(())
    }

    /// Runs a blocking file operation off the async workers.
    async fn blocking<T, F>(&self, action: &'static str, name: &str, f: F) -> Result<T>
    where
        F: FnOnce(&UnitsDir) -> Result<T> + Send + 'static,
        T: Send + 'static,
    {
        let dir = self.inner.dir.clone();
        let path = self.inner.dir.path(name).unwrap_or_default();
        tokio::task::spawn_blocking(move || f(&dir))
            .await
            .map_err(|e| join_error(action, &path, e))?
    }
}

fn join_error(action: &'static str, path: &std::path::Path, e: tokio::task::JoinError) -> Error {
    Error::Io {
        action,
        path: path.to_owned(),
        source: std::io::Error::other(e),
    }
}

fn decode_error(unit: &str, method: &'static str, e: zbus::Error) -> Error {
    Error::Unit {
        unit: unit.to_owned(),
        method,
        error: e.into(),
    }
}

#[async_trait]
impl UnitManager for SystemdManager {
    async fn write_unit(&self, name: &str, contents: &str) -> Result<()> {
        validate_name(name)?;
        tracing::info!(unit = name, bytes = contents.len(), "writing systemd unit");
        let (owned_name, contents) = (name.to_owned(), contents.to_owned());
        let path = self
            .blocking("writing unit file", name, move |dir| {
                dir.write(&owned_name, &contents)
            })
            .await?;
        self.link(name, vec![path.to_string_lossy().into_owned()])
            .await
    }

    async fn write_units(&self, units: &[(String, String)]) -> Vec<Result<()>> {
        if units.len() < 2 {
            let mut results = Vec::new();
            for (name, contents) in units {
                results.push(self.write_unit(name, contents).await);
            }
            return results;
        }
        tracing::info!(units = units.len(), "writing systemd units");
        let owned = units.to_vec();
        let written = self
            .blocking("writing unit files", &units[0].0, move |dir| {
                Ok(owned
                    .iter()
                    .map(|(name, contents)| {
                        validate_name(name)?;
                        dir.write(name, contents)
                    })
                    .collect::<Vec<_>>())
            })
            .await;
        let written = match written {
            Ok(w) => w,
            Err(e) => {
                tracing::debug!(error = %e, "writing unit files together failed; one by one");
                let mut results = Vec::new();
                for (name, contents) in units {
                    results.push(self.write_unit(name, contents).await);
                }
                return results;
            }
        };
        // linked LINK_CHUNK at a time (a node may get thousands at once; each call stays
        // well within the D-Bus call timeout)
        let mut linked: Vec<Option<bool>> = vec![None; written.len()];
        let ok: Vec<usize> = (0..written.len()).filter(|&i| written[i].is_ok()).collect();
        for chunk in ok.chunks(LINK_CHUNK) {
            let paths: Vec<String> = chunk
                .iter()
                .filter_map(|&i| written[i].as_ref().ok())
                .map(|p| p.to_string_lossy().into_owned())
                .collect();
            let together = self
                .link(&format!("{} units", paths.len()), paths)
                .await
                .is_ok();
            for &i in chunk {
                linked[i] = Some(together);
            }
        }
        let mut results = Vec::with_capacity(units.len());
        for (((name, _), w), together) in units.iter().zip(written).zip(linked) {
            results.push(match (w, together) {
                (Err(e), _) => Err(e),
                (Ok(_), Some(true)) => Ok(()),
                // which unit the shared call failed on: each alone says
                (Ok(path), _) => {
                    self.link(name, vec![path.to_string_lossy().into_owned()])
                        .await
                }
            });
        }
        results
    }

    async fn remove_unit(&self, name: &str) -> Result<()> {
        validate_name(name)?;
        tracing::info!(unit = name, "removing systemd unit");
        let disabled = self.disable(&[name.to_owned()]).await;
        self.finish_remove(name, disabled.err()).await
    }

    async fn remove_units(&self, names: &[String]) -> Result<()> {
        for name in names {
            validate_name(name)?;
        }
        if names.is_empty() {
            return Ok(());
        }
        tracing::info!(units = names.len(), "removing systemd units");
        let mut first_error = None;
        if let Err(e) = self.disable(names).await {
            // Find out which unit it was about, unit by unit.
            tracing::debug!(error = %e, "disabling units in one call failed, retrying one by one");
            for name in names {
                if let Err(e) = self.remove_unit(name).await {
                    first_error.get_or_insert(e);
                }
            }
        } else {
            for name in names {
                if let Err(e) = self.finish_remove(name, None).await {
                    first_error.get_or_insert(e);
                }
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    async fn reload(&self) -> Result<()> {
        tracing::info!("instructing systemd to reload units");
        self.inner.caller.manager("Reload", None, &()).await?;
        Ok(())
    }

    async fn enable(&self, name: &str) -> Result<()> {
        validate_name(name)?;
        tracing::info!(unit = name, "enabling systemd unit");
        let path = self.inner.dir.path(name)?.to_string_lossy().into_owned();
        let reply = self
            .inner
            .caller
            .manager("EnableUnitFiles", Some(name), &(vec![path], true, true))
            .await?;
        let (carries_install_info, changes): (bool, Vec<FileChange>) =
            reply
                .body()
                .deserialize()
                .map_err(|e| decode_error(name, "EnableUnitFiles", e))?;
        tracing::debug!(unit = name, ?changes, "enabled unit file");
        if !carries_install_info {
            return Err(Error::NoInstallInfo {
                unit: name.to_owned(),
            });
        }
        Ok(())
    }

    async fn start(&self, name: &str) -> Result<()> {
        self.queue_job(name, "StartUnit", "start").await
    }

    async fn stop(&self, name: &str) -> Result<()> {
        self.queue_job(name, "StopUnit", "stop").await
    }

    async fn states(&self, names: &[String]) -> Result<BTreeMap<String, SystemdState>> {
        self.inner.states(names).await
    }

    async fn subscribe(&self, watch: WatchSet) -> Result<mpsc::Receiver<UnitEvent>> {
        signals::subscribe(self.inner.clone(), watch).await
    }

    async fn unit_file_names(&self) -> Result<Vec<String>> {
        let dir = self.inner.dir.clone();
        tokio::task::spawn_blocking(move || dir.list())
            .await
            .map_err(|e| join_error("listing units directory", self.inner.dir.dir(), e))?
    }

    async fn read_unit(&self, name: &str) -> Result<String> {
        let dir = self.inner.dir.clone();
        let owned = name.to_owned();
        tokio::task::spawn_blocking(move || dir.read(&owned))
            .await
            .map_err(|e| join_error("reading unit file", self.inner.dir.dir(), e))?
    }
}

pub(crate) const NO_SUCH_UNIT: &str = "org.freedesktop.systemd1.NoSuchUnit";
