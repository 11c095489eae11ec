//! [`FakeUnitManager`]: an in-memory [`UnitManager`] with systemd's observable semantics, for
//! the agent's unit tests. Never what fleetd runs: it is compiled only with the non-default
//! `fake` feature, which only dev-dependencies turn on.
//!
//! What it models: unit files in a units directory, enablement, a unit table whose states
//! change on start/stop (immediately: `active`/`running`, or `failed`/`failed` for a unit
//! marked with [`FakeUnitManager::fail_on_start`]), `daemon-reload` (counted; units whose file
//! is gone are unloaded or become `not-found`), and subscriptions that receive the same
//! [`UnitEvent`]s the real one sends. Every mutating call is logged ([`FakeUnitManager::calls`])
//! so a test can check order and batching (one reload per batch).
//!
//! Knobs ([`Knobs`], [`FakeUnitManager::with_knobs`]) make it a simulated machine's systemd
//! (`fleet-sim`): starts and stops that take time (the job is queued at once, as systemd's
//! `StartUnit` returns a job, and the unit passes through `activating`/`deactivating`), a
//! share of starts that fail, and no call log (it grows with every call).
//!
//! Not modelled unless a test asks: garbage collection of stopped units (the real manager
//! then sends `state: None`; simulate it with [`FakeUnitManager::collect`]), crashes
//! ([`FakeUnitManager::set_state`]), reconnects and reexecs ([`FakeUnitManager::resync`]),
//! and D-Bus errors ([`FakeUnitManager::inject_error`]). Starting a unit whose file changed
//! without a reload uses the new file, where systemd would keep the old definition.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::hash::{Hash, Hasher};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::mpsc;

use crate::{
    DBusError, Error, Result, ResyncReason, SUBSCRIPTION_BUFFER, StateChange, SystemdState,
    UnitEvent, UnitManager, WatchSet, recognized_unit_type, validate_name,
};

/// A mutating call, as logged by the fake.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Call {
    /// [`UnitManager::write_unit`].
    WriteUnit(String),
    /// [`UnitManager::remove_unit`].
    RemoveUnit(String),
    /// [`UnitManager::reload`].
    Reload,
    /// [`UnitManager::enable`].
    Enable(String),
    /// [`UnitManager::start`].
    Start(String),
    /// [`UnitManager::stop`].
    Stop(String),
}

/// How a simulated systemd behaves: latencies and failures of its jobs.
#[derive(Debug, Clone, PartialEq)]
pub struct Knobs {
    /// How long a start takes: `activating` until then, then `active` (or `failed`).
    /// Zero: the state changes before `start` returns.
    pub start_latency: Duration,
    /// How long a stop takes: `deactivating` until then, then `inactive`.
    pub stop_latency: Duration,
    /// The share of starts (0 to 1) that end `failed`, chosen by a hash of the unit name, the
    /// attempt and `seed`, so a run is repeatable.
    pub start_failure_rate: f64,
    pub seed: u64,
    /// Whether every mutating call is kept for [`FakeUnitManager::calls`]; off, memory does
    /// not grow with the number of calls.
    pub keep_call_log: bool,
}

impl Default for Knobs {
    fn default() -> Self {
        Knobs {
            start_latency: Duration::ZERO,
            stop_latency: Duration::ZERO,
            start_failure_rate: 0.0,
            seed: 0,
            keep_call_log: true,
        }
    }
}

#[derive(Debug, Default)]
struct State {
    knobs: Knobs,
    /// Starts so far, an input of the failure draw.
    starts: u64,
    /// The units directory: name → contents.
    files: BTreeMap<String, String>,
    /// Files systemd cannot find: written but never linked ([`FakeUnitManager::unlink`]).
    unlinked: BTreeSet<String>,
    enabled: BTreeSet<String>,
    /// Units systemd has loaded, with their state.
    units: BTreeMap<String, SystemdState>,
    fail_on_start: BTreeSet<String>,
    /// One-shot errors: method name → error.
    injected: HashMap<&'static str, DBusError>,
    /// Units whose next stops fail, with how many are left to fail.
    failing_stops: HashMap<String, usize>,
    reloads: usize,
    calls: Vec<Call>,
    subscribers: Vec<(WatchSet, mpsc::Sender<UnitEvent>)>,
}

/// Events to deliver once the lock is released.
type Outbox = Vec<(mpsc::Sender<UnitEvent>, UnitEvent)>;

impl State {
    fn log(&mut self, call: Call) {
        if self.knobs.keep_call_log {
            self.calls.push(call);
        }
    }

    /// Whether this start of `name` fails by the failure rate.
    fn draw_failure(&mut self, name: &str) -> bool {
        self.starts += 1;
        let rate = self.knobs.start_failure_rate;
        if rate <= 0.0 {
            return false;
        }
        let mut h = std::collections::hash_map::DefaultHasher::new();
        (name, self.starts, self.knobs.seed).hash(&mut h);
        // the top 53 bits as a number in [0, 1)
        let draw = (h.finish() >> 11) as f64 / (1u64 << 53) as f64;
        draw < rate
    }

    /// Queues `event` for every live subscriber that watches `name` (all of them if None).
    fn notify(&mut self, name: Option<&str>, event: UnitEvent, out: &mut Outbox) {
        self.subscribers.retain(|(_, tx)| !tx.is_closed());
        for (watch, tx) in &self.subscribers {
            if name.is_none_or(|n| watch.contains(n)) {
                out.push((tx.clone(), event.clone()));
            }
        }
    }

    fn set_state(&mut self, name: &str, state: Option<SystemdState>, out: &mut Outbox) {
        let changed = match &state {
            Some(s) => self.units.insert(name.to_owned(), s.clone()).as_ref() != Some(s),
            None => self.units.remove(name).is_some(),
        };
        if changed {
            let change = StateChange {
                name: name.to_owned(),
                state,
            };
            self.notify(Some(name), UnitEvent::Changed(change), out);
        }
    }

    fn take_injected(&mut self, method: &'static str, unit: Option<&str>) -> Result<()> {
        match self.injected.remove(method) {
            None => Ok(()),
            Some(error) => Err(match unit {
                Some(unit) => Error::Unit {
                    unit: unit.to_owned(),
                    method,
                    error,
                },
                None => Error::Manager { method, error },
            }),
        }
    }

    /// What systemd would answer for `name` now.
    fn state_of(&self, name: &str) -> SystemdState {
        if let Some(state) = self.units.get(name) {
            state.clone()
        } else if self.files.contains_key(name) && !self.unlinked.contains(name) {
            SystemdState::new("loaded", "inactive", "dead")
        } else {
            SystemdState::new("not-found", "inactive", "dead")
        }
    }
}

fn no_such_unit(unit: &str, method: &'static str, message: String) -> Error {
    Error::Unit {
        unit: unit.to_owned(),
        method,
        error: DBusError {
            name: Some("org.freedesktop.systemd1.NoSuchUnit".into()),
            message,
            transport: false,
        },
    }
}

/// In-memory [`UnitManager`]. Clones share state.
#[derive(Debug, Clone, Default)]
pub struct FakeUnitManager {
    state: Arc<Mutex<State>>,
}

impl FakeUnitManager {
    /// An empty manager: no files, no units.
    pub fn new() -> Self {
        FakeUnitManager::with_knobs(Knobs::default())
    }

    /// An empty manager behaving as `knobs` say.
    pub fn with_knobs(knobs: Knobs) -> Self {
        let state = State {
            knobs,
            ..State::default()
        };
        FakeUnitManager {
            state: Arc::new(Mutex::new(state)),
        }
    }

    /// Units in `active_state` "active" now.
    pub fn active_units(&self) -> Vec<String> {
        self.units_in("active")
    }

    /// How many units are in `active_state` (what [`Self::units_in`] would list, without
    /// copying a name).
    pub fn count_in(&self, active_state: &str) -> usize {
        self.lock()
            .units
            .values()
            .filter(|s| s.active_state == active_state)
            .count()
    }

    /// Units whose `active_state` is `active_state` now.
    pub fn units_in(&self, active_state: &str) -> Vec<String> {
        self.lock()
            .units
            .iter()
            .filter(|(_, s)| s.active_state == active_state)
            .map(|(n, _)| n.clone())
            .collect()
    }

    /// After `after`, moves `name` from `from` (an `activating`/`deactivating` state set by
    /// a slow job) to `to`, unless something else changed it meanwhile.
    fn finish_later(&self, name: &str, after: Duration, from: SystemdState, to: SystemdState) {
        let this = self.clone();
        let name = name.to_owned();
        tokio::spawn(async move {
            tokio::time::sleep(after).await;
            let _ = this
                .with(|s, out| {
                    if s.units.get(&name) == Some(&from) {
                        s.set_state(&name, Some(to), out);
                    }
                    Ok(())
                })
                .await;
        });
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    async fn deliver(out: Outbox) {
        for (tx, event) in out {
            // A receiver dropped meanwhile is simply gone.
            let _ = tx.send(event).await;
        }
    }

    /// Runs `f` under the lock, then delivers the events it queued.
    async fn with<T>(&self, f: impl FnOnce(&mut State, &mut Outbox) -> Result<T>) -> Result<T> {
        let mut out = Outbox::new();
        let result = f(&mut self.lock(), &mut out);
        Self::deliver(out).await;
        result
    }

    /// How many times [`UnitManager::reload`] succeeded.
    pub fn reload_count(&self) -> usize {
        self.lock().reloads
    }

    /// Every mutating call so far, in order (failed ones included).
    pub fn calls(&self) -> Vec<Call> {
        self.lock().calls.clone()
    }

    /// Forgets the call log.
    pub fn clear_calls(&self) {
        self.lock().calls.clear();
    }

    /// Contents of a unit file in the units directory.
    pub fn file(&self, name: &str) -> Option<String> {
        self.lock().files.get(name).cloned()
    }

    /// Whether `name` was enabled and not removed since.
    pub fn is_enabled(&self, name: &str) -> bool {
        self.lock().enabled.contains(name)
    }

    /// Makes later starts of `name` end in `failed`/`failed` (or succeed again with false).
    pub fn fail_on_start(&self, name: &str, fail: bool) {
        let mut state = self.lock();
        if fail {
            state.fail_on_start.insert(name.to_owned());
        } else {
            state.fail_on_start.remove(name);
        }
    }

    /// Makes the next call of `method` (`"StartUnit"`, `"StopUnit"`, `"LinkUnitFiles"`,
    /// `"DisableUnitFiles"`, `"Reload"`, `"EnableUnitFiles"`, `"ListUnitsByNames"`) fail with
    /// the D-Bus error `name`/`message`.
    pub fn inject_error(&self, method: &'static str, name: &str, message: &str) {
        self.lock().injected.insert(
            method,
            DBusError {
                name: Some(name.to_owned()),
                message: message.to_owned(),
                transport: false,
            },
        );
    }

    /// Makes the next `times` StopUnit calls for `name` fail (a job systemd refuses), whoever
    /// makes them.
    pub fn fail_stops(&self, name: &str, times: usize) {
        self.lock().failing_stops.insert(name.to_owned(), times);
    }

    /// As if fleetd died between writing `name`'s file and linking it, or its link went
    /// and systemd reloaded: the file stays in the units directory, but systemd no longer
    /// finds it until it is written (and linked) again. A stopped unit is forgotten; a
    /// running one runs on, `not-found`.
    pub async fn unlink(&self, name: &str) {
        let _ = self
            .with(|s, out| {
                s.unlinked.insert(name.to_owned());
                match s.units.get(name).cloned() {
                    Some(u) if u.active_state == "inactive" => s.set_state(name, None, out),
                    Some(u) => {
                        let state = SystemdState {
                            load_state: "not-found".into(),
                            ..u
                        };
                        s.set_state(name, Some(state), out);
                    }
                    None => {}
                }
                Ok(())
            })
            .await;
    }

    /// A change systemd made on its own (a crash, a restart): sets the state and notifies.
    pub async fn set_state(&self, name: &str, state: SystemdState) {
        let _ = self
            .with(|s, out| {
                s.set_state(name, Some(state), out);
                Ok(())
            })
            .await;
    }

    /// systemd garbage-collects `name`: it leaves the unit table and subscribers get `None`.
    pub async fn collect(&self, name: &str) {
        let _ = self
            .with(|s, out| {
                s.set_state(name, None, out);
                Ok(())
            })
            .await;
    }

    /// Sends [`UnitEvent::Resync`] to every subscriber (a reconnect, a reexec).
    pub async fn resync(&self, reason: ResyncReason) {
        let _ = self
            .with(|s, out| {
                s.notify(None, UnitEvent::Resync(reason), out);
                Ok(())
            })
            .await;
    }
}

#[async_trait]
impl UnitManager for FakeUnitManager {
    async fn write_unit(&self, name: &str, contents: &str) -> Result<()> {
        validate_name(name)?;
        self.with(|s, _| {
            s.log(Call::WriteUnit(name.to_owned()));
            s.take_injected("LinkUnitFiles", Some(name))?;
            s.files.insert(name.to_owned(), contents.to_owned());
            s.unlinked.remove(name);
            Ok(())
        })
        .await
    }

    async fn remove_unit(&self, name: &str) -> Result<()> {
        validate_name(name)?;
        self.with(|s, out| {
            s.log(Call::RemoveUnit(name.to_owned()));
            let result = s.take_injected("DisableUnitFiles", Some(name));
            s.enabled.remove(name);
            if s.units
                .get(name)
                .is_some_and(|u| u.active_state == "failed")
            {
                let load = s.units[name].load_state.clone();
                s.set_state(
                    name,
                    Some(SystemdState::new(&load, "inactive", "dead")),
                    out,
                );
            }
            s.files.remove(name);
            s.unlinked.remove(name);
            result
        })
        .await
    }

    async fn reload(&self) -> Result<()> {
        self.with(|s, out| {
            s.log(Call::Reload);
            s.take_injected("Reload", None)?;
            s.reloads += 1;
            let orphans: Vec<(String, SystemdState)> = s
                .units
                .iter()
                .filter(|(name, _)| !s.files.contains_key(*name) || s.unlinked.contains(*name))
                .map(|(n, st)| (n.clone(), st.clone()))
                .collect();
            for (name, state) in orphans {
                if state.active_state == "inactive" {
                    s.set_state(&name, None, out);
                } else {
                    let state = SystemdState {
                        load_state: "not-found".into(),
                        ..state
                    };
                    s.set_state(&name, Some(state), out);
                }
            }
            Ok(())
        })
        .await
    }

    async fn enable(&self, name: &str) -> Result<()> {
        validate_name(name)?;
        self.with(|s, _| {
            s.log(Call::Enable(name.to_owned()));
            s.take_injected("EnableUnitFiles", Some(name))?;
            let Some(contents) = s.files.get(name) else {
                return Err(Error::Unit {
                    unit: name.to_owned(),
                    method: "EnableUnitFiles",
                    error: DBusError {
                        name: Some("org.freedesktop.DBus.Error.FileNotFound".into()),
                        message: "No such file or directory".into(),
                        transport: false,
                    },
                });
            };
            if !contents.lines().any(|l| l.trim() == "[Install]") {
                return Err(Error::NoInstallInfo {
                    unit: name.to_owned(),
                });
            }
            s.enabled.insert(name.to_owned());
            Ok(())
        })
        .await
    }

    async fn start(&self, name: &str) -> Result<()> {
        validate_name(name)?;
        let slow = self
            .with(|s, out| {
                s.log(Call::Start(name.to_owned()));
                s.take_injected("StartUnit", Some(name))?;
                // (systemd refuses to start a unit it knows only as not found)
                let found = s.files.contains_key(name) && !s.unlinked.contains(name);
                let known = s
                    .units
                    .get(name)
                    .is_some_and(|u| u.load_state != "not-found");
                if !found && !known {
                    return Err(no_such_unit(
                        name,
                        "StartUnit",
                        format!("Unit {name} not found."),
                    ));
                }
                let fails = s.fail_on_start.contains(name) || s.draw_failure(name);
                let state = if fails {
                    SystemdState::new("loaded", "failed", "failed")
                } else {
                    SystemdState::new("loaded", "active", "running")
                };
                let latency = s.knobs.start_latency;
                if latency.is_zero()
                    || s.units
                        .get(name)
                        .is_some_and(|u| u.active_state == "active")
                {
                    s.set_state(name, Some(state), out);
                    return Ok(None);
                }
                let activating = SystemdState::new("loaded", "activating", "start");
                s.set_state(name, Some(activating.clone()), out);
                Ok(Some((latency, activating, state)))
            })
            .await?;
        if let Some((latency, from, to)) = slow {
            self.finish_later(name, latency, from, to);
        }
        Ok(())
    }

    async fn stop(&self, name: &str) -> Result<()> {
        validate_name(name)?;
        let slow = self
            .with(|s, out| {
                s.log(Call::Stop(name.to_owned()));
                s.take_injected("StopUnit", Some(name))?;
                if let Some(left) = s.failing_stops.get_mut(name)
                    && *left > 0
                {
                    *left -= 1;
                    return Err(Error::Unit {
                        unit: name.to_owned(),
                        method: "StopUnit",
                        error: DBusError {
                            name: Some("org.freedesktop.DBus.Error.Failed".to_owned()),
                            message: "stop refused".to_owned(),
                            transport: false,
                        },
                    });
                }
                let Some(current) = s.units.get(name) else {
                    if s.files.contains_key(name) && !s.unlinked.contains(name) {
                        return Ok(None);
                    }
                    return Err(no_such_unit(
                        name,
                        "StopUnit",
                        format!("Unit {name} not loaded."),
                    ));
                };
                if current.active_state == "failed" {
                    return Ok(None);
                }
                let load = current.load_state.clone();
                let stopped = SystemdState::new(&load, "inactive", "dead");
                let latency = s.knobs.stop_latency;
                if latency.is_zero() || current.active_state == "inactive" {
                    s.set_state(name, Some(stopped), out);
                    return Ok(None);
                }
                let deactivating = SystemdState::new(&load, "deactivating", "stop");
                s.set_state(name, Some(deactivating.clone()), out);
                Ok(Some((latency, deactivating, stopped)))
            })
            .await?;
        if let Some((latency, from, to)) = slow {
            self.finish_later(name, latency, from, to);
        }
        Ok(())
    }

    async fn states(&self, names: &[String]) -> Result<BTreeMap<String, SystemdState>> {
        for name in names {
            validate_name(name)?;
        }
        let mut s = self.lock();
        s.take_injected("ListUnitsByNames", None)?;
        Ok(names.iter().map(|n| (n.clone(), s.state_of(n))).collect())
    }

    async fn subscribe(&self, watch: WatchSet) -> Result<mpsc::Receiver<UnitEvent>> {
        let (tx, rx) = mpsc::channel(SUBSCRIPTION_BUFFER);
        self.lock().subscribers.push((watch, tx));
        Ok(rx)
    }

    async fn unit_file_names(&self) -> Result<Vec<String>> {
        Ok(self
            .lock()
            .files
            .keys()
            .filter(|n| recognized_unit_type(n))
            .cloned()
            .collect())
    }

    async fn read_unit(&self, name: &str) -> Result<String> {
        validate_name(name)?;
        self.lock()
            .files
            .get(name)
            .cloned()
            .ok_or_else(|| Error::Io {
                action: "reading unit file",
                path: std::path::PathBuf::from(name),
                source: std::io::Error::from(std::io::ErrorKind::NotFound),
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BODY: &str = "[Service]\nExecStart=/bin/sleep 1000\n";
    const INSTALL: &str = "[Service]\nExecStart=/bin/true\n[Install]\nWantedBy=multi-user.target\n";

    fn st(load: &str, active: &str, sub: &str) -> SystemdState {
        SystemdState::new(load, active, sub)
    }

    fn changed(name: &str, state: Option<SystemdState>) -> UnitEvent {
        UnitEvent::Changed(StateChange {
            name: name.into(),
            state,
        })
    }

    fn drain(rx: &mut mpsc::Receiver<UnitEvent>) -> Vec<UnitEvent> {
        std::iter::from_fn(|| rx.try_recv().ok()).collect()
    }

    fn names(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[tokio::test]
    async fn lifecycle_through_states_and_events() {
        let fake = FakeUnitManager::new();
        let watch = WatchSet::from_iter(["a.service"]);
        let mut rx = fake.subscribe(watch.clone()).await.expect("subscribe");

        fake.write_unit("a.service", BODY).await.expect("write");
        fake.write_unit("b.service", BODY).await.expect("write");
        fake.reload().await.expect("reload");
        let got = fake
            .states(&names(&["a.service", "x.service"]))
            .await
            .expect("states");
        assert_eq!(got["a.service"], st("loaded", "inactive", "dead"));
        assert_eq!(got["x.service"], st("not-found", "inactive", "dead"));

        fake.start("a.service").await.expect("start a");
        fake.start("b.service").await.expect("start b (unwatched)");
        fake.stop("a.service").await.expect("stop a");
        fake.fail_on_start("a.service", true);
        fake.start("a.service").await.expect("start a again");
        fake.remove_units(&names(&["a.service"]))
            .await
            .expect("remove");
        fake.reload().await.expect("reload");

        assert_eq!(
            drain(&mut rx),
            vec![
                changed("a.service", Some(st("loaded", "active", "running"))),
                changed("a.service", Some(st("loaded", "inactive", "dead"))),
                changed("a.service", Some(st("loaded", "failed", "failed"))),
                changed("a.service", Some(st("loaded", "inactive", "dead"))),
                changed("a.service", None),
            ]
        );
        assert_eq!(fake.reload_count(), 2);
        assert_eq!(
            fake.unit_file_names().await.expect("names"),
            vec!["b.service"]
        );
        assert_eq!(
            fake.calls(),
            vec![
                Call::WriteUnit("a.service".into()),
                Call::WriteUnit("b.service".into()),
                Call::Reload,
                Call::Start("a.service".into()),
                Call::Start("b.service".into()),
                Call::Stop("a.service".into()),
                Call::Start("a.service".into()),
                Call::RemoveUnit("a.service".into()),
                Call::Reload,
            ]
        );
    }

    #[tokio::test]
    async fn errors_name_the_unit() {
        let fake = FakeUnitManager::new();
        fake.write_unit("plain.service", BODY).await.expect("write");
        fake.write_unit("inst.service", INSTALL)
            .await
            .expect("write");
        fake.enable("inst.service").await.expect("enable");
        assert!(fake.is_enabled("inst.service"));
        let cases: Vec<(Result<()>, &str)> = vec![
            (
                fake.start("missing.service").await,
                "StartUnit missing.service: org.freedesktop.systemd1.NoSuchUnit: Unit missing.service not found.",
            ),
            (
                fake.stop("missing.service").await,
                "StopUnit missing.service: org.freedesktop.systemd1.NoSuchUnit: Unit missing.service not loaded.",
            ),
            (
                fake.enable("plain.service").await,
                "failed to enable systemd unit plain.service: it carries no install information",
            ),
            (
                fake.write_unit("../x.service", BODY).await,
                "invalid unit name \"../x.service\": name contains '/'",
            ),
        ];
        for (result, want) in cases {
            assert_eq!(result.expect_err(want).to_string(), want);
        }

        fake.inject_error("StartUnit", "org.freedesktop.DBus.Error.AccessDenied", "no");
        let err = fake.start("plain.service").await.expect_err("injected");
        assert_eq!(
            err.to_string(),
            "StartUnit plain.service: org.freedesktop.DBus.Error.AccessDenied: no"
        );
        // The injected error was one-shot.
        fake.start("plain.service")
            .await
            .expect("start after injected error");
    }

    #[tokio::test]
    async fn resync_collect_and_dropped_receivers() {
        let fake = FakeUnitManager::new();
        let watch = WatchSet::from_iter(["a.service"]);
        let mut rx = fake.subscribe(watch.clone()).await.expect("subscribe");
        let dropped = fake.subscribe(watch).await.expect("subscribe");
        drop(dropped);

        fake.write_unit("a.service", BODY).await.expect("write");
        fake.set_state("a.service", st("loaded", "active", "running"))
            .await;
        fake.set_state("a.service", st("loaded", "active", "running"))
            .await;
        fake.collect("a.service").await;
        fake.resync(ResyncReason::Reloaded).await;
        assert_eq!(
            drain(&mut rx),
            vec![
                changed("a.service", Some(st("loaded", "active", "running"))),
                changed("a.service", None),
                UnitEvent::Resync(ResyncReason::Reloaded),
            ]
        );
    }

    #[tokio::test]
    async fn removed_running_unit_becomes_not_found_on_reload() {
        let fake = FakeUnitManager::new();
        let mut rx = fake
            .subscribe(WatchSet::from_iter(["a.service"]))
            .await
            .expect("subscribe");
        fake.write_unit("a.service", BODY).await.expect("write");
        fake.start("a.service").await.expect("start");
        fake.remove_unit("a.service").await.expect("remove");
        fake.reload().await.expect("reload");
        assert_eq!(
            drain(&mut rx),
            vec![
                changed("a.service", Some(st("loaded", "active", "running"))),
                changed("a.service", Some(st("not-found", "active", "running"))),
            ]
        );
    }

    /// Knobs: a slow start passes through `activating`, a slow stop through
    /// `deactivating`, each reaching its end state after its latency; no call is logged.
    #[tokio::test(start_paused = true)]
    async fn latencies_pass_through_transitional_states() {
        let fake = FakeUnitManager::with_knobs(Knobs {
            start_latency: Duration::from_secs(2),
            stop_latency: Duration::from_secs(1),
            keep_call_log: false,
            ..Knobs::default()
        });
        let mut rx = fake
            .subscribe(WatchSet::from_iter(["a.service"]))
            .await
            .expect("subscribe");
        fake.write_unit("a.service", BODY).await.expect("write");
        fake.start("a.service").await.expect("start");
        assert_eq!(
            drain(&mut rx),
            vec![changed(
                "a.service",
                Some(st("loaded", "activating", "start"))
            )]
        );
        assert!(fake.active_units().is_empty());
        tokio::time::sleep(Duration::from_millis(2100)).await;
        assert_eq!(
            drain(&mut rx),
            vec![changed(
                "a.service",
                Some(st("loaded", "active", "running"))
            )]
        );
        assert_eq!(fake.active_units(), vec!["a.service"]);
        fake.stop("a.service").await.expect("stop");
        tokio::time::sleep(Duration::from_millis(1100)).await;
        assert_eq!(
            drain(&mut rx),
            vec![
                changed("a.service", Some(st("loaded", "deactivating", "stop"))),
                changed("a.service", Some(st("loaded", "inactive", "dead"))),
            ]
        );
        assert!(fake.calls().is_empty(), "the call log was kept");
    }

    /// Knobs: the failure rate decides the share of failed starts, the same way each run.
    #[tokio::test]
    async fn the_failure_rate_fails_that_share_of_starts() {
        async fn failed(rate: f64) -> usize {
            let fake = FakeUnitManager::with_knobs(Knobs {
                start_failure_rate: rate,
                seed: 7,
                ..Knobs::default()
            });
            let names: Vec<String> = (0..1000).map(|i| format!("u{i}.service")).collect();
            for n in &names {
                fake.write_unit(n, BODY).await.expect("write");
                fake.start(n).await.expect("start");
            }
            let states = fake.states(&names).await.expect("states");
            states
                .values()
                .filter(|s| s.active_state == "failed")
                .count()
        }
        assert_eq!(failed(0.0).await, 0);
        assert_eq!(failed(1.0).await, 1000);
        let half = failed(0.5).await;
        assert!((400..600).contains(&half), "{half} of 1000 failed at 0.5");
        assert_eq!(failed(0.5).await, half, "not repeatable");
    }
}
