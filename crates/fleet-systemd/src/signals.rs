//! State changes from systemd's D-Bus signals: the subscription task and the pure bookkeeping
//! ([`Tracker`]) that turns signals into [`UnitEvent`]s.
//!
//! # How signals map to states
//!
//! * `PropertiesChanged` on a unit object, interface `org.freedesktop.systemd1.Unit`: systemd
//!   sends it on every change of a unit it has announced, with `LoadState`, `ActiveState` and
//!   `SubState` in it. This is the main source.
//! * `UnitNew`: systemd loaded the unit. Changes made before systemd got round to announcing
//!   the unit are folded into this one signal, which carries no state; so the unit is marked
//!   *stale* until a `PropertiesChanged` arrives.
//! * `JobRemoved`: a start/stop job ended. If the unit is still stale (no `PropertiesChanged`
//!   since `UnitNew`), its state is read once with `ListUnitsByNames`, batched with the other
//!   units in the same burst of signals. A freshly loaded `Type=simple` service that starts at
//!   once typically only ever sends `UnitNew`; measured on systemd 252: 200 such starts, 2–3
//!   reads. Reading on `UnitNew` instead would loop: reading loads an unloaded unit, which
//!   systemd collects again (`UnitRemoved`) and announces again (`UnitNew`).
//! * `UnitRemoved`: systemd unloaded the unit → `StateChange { state: None }`, if a state had
//!   been sent for it.
//! * `Reloading(false)` and a new owner of `org.freedesktop.systemd1` → [`UnitEvent::Resync`].
//!
//! Filtering: the bus delivers only these signals (one match rule each; unit
//! `PropertiesChanged` is restricted to the Unit interface by `arg0`, so a service's
//! `org.freedesktop.systemd1.Service` changes never reach us). A per-unit match rule would let
//! the bus drop unwatched units too, but dbus-daemon caps match rules per connection (512 on
//! the system bus), fewer than the units a machine may run; so unwatched units are dropped here,
//! by decoding the object path and one set lookup, before the message body is decoded.
//!
//! One connection per subscription, its own queue (so a slow consumer does not stall method
//! calls), and `Manager.Subscribe` on it (systemd sends unit signals only while somebody is
//! subscribed; the subscription ends with the connection).

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use futures_util::{FutureExt, StreamExt};
use tokio::sync::mpsc;
use zbus::message::{Message, Type as MessageType};
use zbus::zvariant::{OwnedObjectPath, OwnedValue};
use zbus::{Connection, MessageStream};

use crate::dbus::{
    BusKind, Inner, MANAGER_INTERFACE, SYSTEMD_PATH, SYSTEMD_SERVICE, UNIT_INTERFACE,
};
use crate::{
    Error, Result, ResyncReason, SUBSCRIPTION_BUFFER, StateChange, SystemdState, UnitEvent,
    WatchSet,
};

/// Prefix of unit object paths; the rest is the escaped unit name.
const UNIT_PATH_PREFIX: &str = "/org/freedesktop/systemd1/unit/";

/// Messages zbus may queue for the subscription before it stops reading the socket.
const CONNECTION_QUEUE: usize = 8192;

/// Most signals handled before the pending state reads are done.
const MAX_BATCH: usize = 1024;

/// The match rules of a subscription.
fn match_rules() -> Vec<String> {
    let manager = |member: &str| {
        format!(
            "type='signal',sender='{SYSTEMD_SERVICE}',path='{SYSTEMD_PATH}',\
             interface='{MANAGER_INTERFACE}',member='{member}'"
        )
    };
    vec![
        manager("UnitNew"),
        manager("UnitRemoved"),
        manager("JobRemoved"),
        manager("Reloading"),
        format!(
            "type='signal',sender='{SYSTEMD_SERVICE}',interface='org.freedesktop.DBus.Properties',\
             member='PropertiesChanged',path_namespace='/org/freedesktop/systemd1/unit',\
             arg0='{UNIT_INTERFACE}'"
        ),
        format!(
            "type='signal',sender='org.freedesktop.DBus',path='/org/freedesktop/DBus',\
             interface='org.freedesktop.DBus',member='NameOwnerChanged',arg0='{SYSTEMD_SERVICE}'"
        ),
    ]
}

/// systemd's object path label for a unit name: ASCII letters and digits stay, every other
/// byte becomes `_` and two lowercase hex digits.
#[cfg(test)]
fn unit_path(name: &str) -> String {
    let mut path = String::with_capacity(UNIT_PATH_PREFIX.len() + name.len() * 2);
    path.push_str(UNIT_PATH_PREFIX);
    if name.is_empty() {
        path.push('_');
    }
    for b in name.bytes() {
        if b.is_ascii_alphanumeric() {
            path.push(char::from(b));
        } else {
            path.push_str(&format!("_{b:02x}"));
        }
    }
    path
}

/// The unit name a unit object path stands for; None for other paths or bad escapes.
pub(crate) fn unit_name_from_path(path: &str) -> Option<String> {
    let label = path.strip_prefix(UNIT_PATH_PREFIX)?.as_bytes();
    let mut name = Vec::with_capacity(label.len());
    let mut i = 0;
    while i < label.len() {
        if label[i] == b'_' {
            let hex = std::str::from_utf8(label.get(i + 1..i + 3)?).ok()?;
            name.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            name.push(label[i]);
            i += 1;
        }
    }
    String::from_utf8(name).ok().filter(|n| !n.is_empty())
}

/// What the subscription task must do after a signal.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Step {
    Nothing,
    Emit(StateChange),
    /// Read this unit's state from systemd, then report it with [`Tracker::fetched`].
    Fetch(String),
}

#[derive(Debug, Default)]
struct Tracked {
    /// The state last emitted (None: none yet).
    last: Option<SystemdState>,
    /// Announced by `UnitNew` with no `PropertiesChanged` since: `last` may be out of date.
    stale: bool,
}

/// Per watched unit, what was last sent; turns decoded signals into [`Step`]s. No I/O.
#[derive(Debug, Default)]
pub(crate) struct Tracker {
    units: HashMap<String, Tracked>,
}

impl Tracker {
    /// `PropertiesChanged` with whichever of the three states it carried.
    pub(crate) fn properties(
        &mut self,
        name: &str,
        load: Option<String>,
        active: Option<String>,
        sub: Option<String>,
    ) -> Step {
        let tracked = self.units.entry(name.to_owned()).or_default();
        let last = tracked.last.as_ref();
        let merged = (
            load.or_else(|| last.map(|s| s.load_state.clone())),
            active.or_else(|| last.map(|s| s.active_state.clone())),
            sub.or_else(|| last.map(|s| s.sub_state.clone())),
        );
        match merged {
            (Some(load_state), Some(active_state), Some(sub_state)) => {
                tracked.stale = false;
                self.set(
                    name,
                    SystemdState {
                        load_state,
                        active_state,
                        sub_state,
                    },
                )
            }
            _ => Step::Fetch(name.to_owned()),
        }
    }

    /// `UnitNew`.
    pub(crate) fn unit_new(&mut self, name: &str) -> Step {
        self.units.entry(name.to_owned()).or_default().stale = true;
        Step::Nothing
    }

    /// `JobRemoved`.
    pub(crate) fn job_removed(&mut self, name: &str) -> Step {
        match self.units.get(name) {
            Some(Tracked {
                last: Some(_),
                stale: false,
            }) => Step::Nothing,
            _ => Step::Fetch(name.to_owned()),
        }
    }

    /// `UnitRemoved`.
    pub(crate) fn unit_removed(&mut self, name: &str) -> Step {
        match self.units.remove(name) {
            Some(Tracked { last: Some(_), .. }) => Step::Emit(StateChange {
                name: name.to_owned(),
                state: None,
            }),
            _ => Step::Nothing,
        }
    }

    /// The answer to a [`Step::Fetch`].
    pub(crate) fn fetched(&mut self, name: &str, state: SystemdState) -> Step {
        self.units.entry(name.to_owned()).or_default().stale = false;
        self.set(name, state)
    }

    /// The unit is no longer watched.
    pub(crate) fn forget(&mut self, name: &str) {
        self.units.remove(name);
    }

    /// Everything may have changed unseen; the consumer re-reads.
    pub(crate) fn reset(&mut self) {
        self.units.clear();
    }

    fn set(&mut self, name: &str, state: SystemdState) -> Step {
        let tracked = self.units.entry(name.to_owned()).or_default();
        if tracked.last.as_ref() == Some(&state) {
            return Step::Nothing;
        }
        tracked.last = Some(state.clone());
        Step::Emit(StateChange {
            name: name.to_owned(),
            state: Some(state),
        })
    }
}

/// A decoded signal, limited to what the tracker needs.
#[derive(Debug, PartialEq, Eq)]
enum Signal {
    Properties {
        name: String,
        load: Option<String>,
        active: Option<String>,
        sub: Option<String>,
    },
    UnitNew(String),
    UnitRemoved(String),
    JobRemoved(String),
    Reloaded,
    OwnerChanged,
}

/// Decodes `msg` if it is a signal about a watched unit (or about the manager itself).
fn decode(msg: &Message, watch: &WatchSet, tracker: &mut Tracker) -> Option<Signal> {
    if msg.message_type() != MessageType::Signal {
        return None;
    }
    let header = msg.header();
    let interface = header.interface()?.as_str();
    let member = header.member()?.as_str();
    let watched = |name: &str, tracker: &mut Tracker| {
        let watched = watch.contains(name);
        if !watched {
            tracker.forget(name);
        }
        watched
    };
    match (interface, member) {
        ("org.freedesktop.DBus.Properties", "PropertiesChanged") => {
            let name = unit_name_from_path(header.path()?.as_str())?;
            if !watched(&name, tracker) {
                return None;
            }
            let body = msg.body();
            let (iface, changed, invalidated): (String, HashMap<String, OwnedValue>, Vec<String>) =
                body.deserialize().ok()?;
            if iface != UNIT_INTERFACE {
                return None;
            }
            let get = |key: &str| {
                if invalidated.iter().any(|k| k == key) {
                    return None;
                }
                changed
                    .get(key)
                    .and_then(|v| <&str>::try_from(v).ok())
                    .map(str::to_owned)
            };
            let (load, active, sub) = (get("LoadState"), get("ActiveState"), get("SubState"));
            if load.is_none()
                && active.is_none()
                && sub.is_none()
                && !["LoadState", "ActiveState", "SubState"]
                    .iter()
                    .any(|k| invalidated.iter().any(|i| i == k))
            {
                return None;
            }
            Some(Signal::Properties {
                name,
                load,
                active,
                sub,
            })
        }
        (MANAGER_INTERFACE, "UnitNew" | "UnitRemoved") => {
            let (name, _path): (String, OwnedObjectPath) = msg.body().deserialize().ok()?;
            if !watched(&name, tracker) {
                return None;
            }
            Some(if member == "UnitNew" {
                Signal::UnitNew(name)
            } else {
                Signal::UnitRemoved(name)
            })
        }
        (MANAGER_INTERFACE, "JobRemoved") => {
            let (_id, _job, name, _result): (u32, OwnedObjectPath, String, String) =
                msg.body().deserialize().ok()?;
            watched(&name, tracker).then_some(Signal::JobRemoved(name))
        }
        (MANAGER_INTERFACE, "Reloading") => {
            let active: bool = msg.body().deserialize().ok()?;
            (!active).then_some(Signal::Reloaded)
        }
        ("org.freedesktop.DBus", "NameOwnerChanged") => {
            let (name, _old, new): (String, String, String) = msg.body().deserialize().ok()?;
            (name == SYSTEMD_SERVICE && !new.is_empty()).then_some(Signal::OwnerChanged)
        }
        _ => None,
    }
}

/// Opens a connection, installs the match rules and subscribes.
async fn open(kind: BusKind) -> Result<(Connection, MessageStream)> {
    let conn = kind.connect(Some(CONNECTION_QUEUE)).await?;
    // The stream exists before the first rule, so no matching signal can slip past.
    let stream = MessageStream::from(&conn);
    for rule in match_rules() {
        conn.call_method(
            Some("org.freedesktop.DBus"),
            "/org/freedesktop/DBus",
            Some("org.freedesktop.DBus"),
            "AddMatch",
            &rule.as_str(),
        )
        .await
        .map_err(|e| Error::Manager {
            method: "AddMatch",
            error: e.into(),
        })?;
    }
    subscribe_manager(&conn).await?;
    Ok((conn, stream))
}

/// `Manager.Subscribe` on `conn`; being subscribed already is fine.
async fn subscribe_manager(conn: &Connection) -> Result<()> {
    match conn
        .call_method(
            Some(SYSTEMD_SERVICE),
            SYSTEMD_PATH,
            Some(MANAGER_INTERFACE),
            "Subscribe",
            &(),
        )
        .await
    {
        Ok(_) => Ok(()),
        Err(e) => {
            let error: crate::DBusError = e.into();
            if error.is("org.freedesktop.systemd1.AlreadySubscribed") {
                Ok(())
            } else {
                Err(Error::Manager {
                    method: "Subscribe",
                    error,
                })
            }
        }
    }
}

/// Sets up a subscription and spawns its task; fails if the first setup fails.
pub(crate) async fn subscribe(
    manager: Arc<Inner>,
    watch: WatchSet,
) -> Result<mpsc::Receiver<UnitEvent>> {
    let (conn, stream) = open(manager.kind).await?;
    let (tx, rx) = mpsc::channel(SUBSCRIPTION_BUFFER);
    let task = Subscription {
        manager,
        watch,
        tx,
        tracker: Tracker::default(),
    };
    tokio::spawn(task.run(conn, stream));
    Ok(rx)
}

struct Subscription {
    manager: Arc<Inner>,
    watch: WatchSet,
    tx: mpsc::Sender<UnitEvent>,
    tracker: Tracker,
}

/// Why the task's loop ended.
enum Stop {
    /// The receiver was dropped.
    Closed,
    /// The connection broke.
    Lost,
}

impl Subscription {
    async fn run(mut self, mut conn: Connection, mut stream: MessageStream) {
        loop {
            match self.pump(&conn, &mut stream).await {
                Stop::Closed => return,
                Stop::Lost => {
                    tracing::warn!(
                        "lost the D-Bus connection of the systemd subscription, reconnecting"
                    );
                    let Some((new_conn, new_stream)) = self.reopen().await else {
                        return;
                    };
                    (conn, stream) = (new_conn, new_stream);
                    self.tracker.reset();
                    if self
                        .send(UnitEvent::Resync(ResyncReason::Reconnected))
                        .await
                        .is_err()
                    {
                        return;
                    }
                }
            }
        }
    }

    /// Handles messages until the connection breaks or the receiver goes away.
    async fn pump(&mut self, conn: &Connection, stream: &mut MessageStream) -> Stop {
        loop {
            let mut next = tokio::select! {
                () = self.tx.closed() => return Stop::Closed,
                msg = stream.next() => msg,
            };
            // Handle what has already arrived as one batch, so the units whose state must be
            // read (see the module docs) are read with one `ListUnitsByNames`, not one each.
            let mut to_fetch = BTreeSet::new();
            for _ in 0..MAX_BATCH {
                let msg = match next {
                    Some(Ok(msg)) => msg,
                    Some(Err(e)) => {
                        tracing::debug!(error = %e, "systemd subscription stream failed");
                        return Stop::Lost;
                    }
                    None => return Stop::Lost,
                };
                if let Some(signal) = decode(&msg, &self.watch, &mut self.tracker)
                    && self.handle(conn, signal, &mut to_fetch).await.is_err()
                {
                    return Stop::Closed;
                }
                match stream.next().now_or_never() {
                    Some(msg) => next = msg,
                    None => break,
                }
            }
            if !to_fetch.is_empty() && self.fetch(to_fetch).await.is_err() {
                return Stop::Closed;
            }
        }
    }

    async fn handle(
        &mut self,
        conn: &Connection,
        signal: Signal,
        to_fetch: &mut BTreeSet<String>,
    ) -> Result<(), Closed> {
        let step = match signal {
            Signal::Properties {
                name,
                load,
                active,
                sub,
            } => self.tracker.properties(&name, load, active, sub),
            Signal::UnitNew(name) => self.tracker.unit_new(&name),
            Signal::UnitRemoved(name) => {
                // Reading it now would only load it again.
                to_fetch.remove(&name);
                self.tracker.unit_removed(&name)
            }
            Signal::JobRemoved(name) => self.tracker.job_removed(&name),
            Signal::Reloaded => {
                self.tracker.reset();
                to_fetch.clear();
                return self.send(UnitEvent::Resync(ResyncReason::Reloaded)).await;
            }
            Signal::OwnerChanged => {
                // A re-executed manager may or may not remember its subscribers.
                if let Err(e) = subscribe_manager(conn).await {
                    tracing::warn!(error = %e, "renewing the systemd subscription failed");
                }
                self.tracker.reset();
                to_fetch.clear();
                return self
                    .send(UnitEvent::Resync(ResyncReason::ManagerRestarted))
                    .await;
            }
        };
        match step {
            Step::Emit(change) => self.send(UnitEvent::Changed(change)).await,
            Step::Fetch(name) => {
                to_fetch.insert(name);
                Ok(())
            }
            Step::Nothing => Ok(()),
        }
    }

    /// Reads the states of `names` over the shared call connection (not this subscription's:
    /// its queue may be full of signals not read yet) and reports the ones that changed.
    async fn fetch(&mut self, names: BTreeSet<String>) -> Result<(), Closed> {
        let names: Vec<String> = names
            .into_iter()
            .filter(|n| self.watch.contains(n))
            .collect();
        tracing::debug!(
            units = names.len(),
            "no state signal since these units were announced, reading them"
        );
        let states = match self.manager.states(&names).await {
            Ok(states) => states,
            Err(e) => {
                tracing::warn!(error = %e, "reading unit states after signals failed");
                return Ok(());
            }
        };
        for (name, state) in states {
            if let Step::Emit(change) = self.tracker.fetched(&name, state) {
                self.send(UnitEvent::Changed(change)).await?;
            }
        }
        Ok(())
    }

    async fn send(&self, event: UnitEvent) -> Result<(), Closed> {
        self.tx.send(event).await.map_err(|_| Closed)
    }

    /// Reconnects with back-off until it works or the receiver goes away.
    async fn reopen(&self) -> Option<(Connection, MessageStream)> {
        let mut delay = Duration::from_millis(100);
        loop {
            match open(self.manager.kind).await {
                Ok(opened) => return Some(opened),
                Err(e) => {
                    tracing::warn!(error = %e, retry_in = ?delay, "systemd subscription: reconnect failed")
                }
            }
            tokio::select! {
                () = self.tx.closed() => return None,
                () = tokio::time::sleep(delay) => {}
            }
            delay = (delay * 2).min(Duration::from_secs(5));
        }
    }
}

/// The receiver was dropped.
struct Closed;

#[cfg(test)]
mod tests {
    use super::*;

    fn st(load: &str, active: &str, sub: &str) -> SystemdState {
        SystemdState::new(load, active, sub)
    }

    fn emit(name: &str, state: Option<SystemdState>) -> Step {
        Step::Emit(StateChange {
            name: name.into(),
            state,
        })
    }

    #[test]
    fn unit_paths_round_trip() {
        let cases = [
            (
                "hello.service",
                "/org/freedesktop/systemd1/unit/hello_2eservice",
            ),
            (
                "foo@bar-1.service",
                "/org/freedesktop/systemd1/unit/foo_40bar_2d1_2eservice",
            ),
            (
                "a_b.socket",
                "/org/freedesktop/systemd1/unit/a_5fb_2esocket",
            ),
            (
                "dev-sda.device",
                "/org/freedesktop/systemd1/unit/dev_2dsda_2edevice",
            ),
            (
                "ü.service",
                "/org/freedesktop/systemd1/unit/_c3_bc_2eservice",
            ),
        ];
        for (name, path) in cases {
            assert_eq!(unit_path(name), path);
            assert_eq!(unit_name_from_path(path).as_deref(), Some(name));
        }
    }

    #[test]
    fn foreign_or_broken_paths_are_not_units() {
        for path in [
            "/org/freedesktop/systemd1",
            "/org/freedesktop/systemd1/job/12",
            "/org/freedesktop/systemd1/unit/",
            "/org/freedesktop/systemd1/unit/_",
            "/org/freedesktop/systemd1/unit/bad_2",
            "/org/freedesktop/systemd1/unit/bad_zz",
            "/org/freedesktop/systemd1/unit/_ff",
        ] {
            assert_eq!(unit_name_from_path(path), None, "{path}");
        }
    }

    #[test]
    fn match_rules_parse() {
        for rule in match_rules() {
            zbus::MatchRule::try_from(rule.as_str()).expect(&rule);
        }
    }

    /// One scripted signal for the tracker tests.
    enum In {
        Props(
            &'static str,
            Option<&'static str>,
            Option<&'static str>,
            Option<&'static str>,
        ),
        New(&'static str),
        Removed(&'static str),
        Job(&'static str),
        Fetched(&'static str, SystemdState),
        Reset,
    }

    fn run(script: Vec<In>) -> Vec<Step> {
        let mut t = Tracker::default();
        let s = |v: Option<&str>| v.map(str::to_owned);
        script
            .into_iter()
            .map(|input| match input {
                In::Props(n, l, a, u) => t.properties(n, s(l), s(a), s(u)),
                In::New(n) => t.unit_new(n),
                In::Removed(n) => t.unit_removed(n),
                In::Job(n) => t.job_removed(n),
                In::Fetched(n, state) => t.fetched(n, state),
                In::Reset => {
                    t.reset();
                    Step::Nothing
                }
            })
            .collect()
    }

    #[test]
    fn tracker_table() {
        use In::*;
        let a = "a.service";
        let cases: Vec<(&str, Vec<In>, Vec<Step>)> = vec![
            (
                "start seen through properties: no fetch, duplicates dropped",
                vec![
                    New(a),
                    Props(a, Some("loaded"), Some("activating"), Some("start")),
                    Props(a, Some("loaded"), Some("active"), Some("running")),
                    Props(a, Some("loaded"), Some("active"), Some("running")),
                    Job(a),
                ],
                vec![
                    Step::Nothing,
                    emit(a, Some(st("loaded", "activating", "start"))),
                    emit(a, Some(st("loaded", "active", "running"))),
                    Step::Nothing,
                    Step::Nothing,
                ],
            ),
            (
                "changes folded into UnitNew: fetched when the job ends",
                vec![
                    New(a),
                    Job(a),
                    Fetched(a, st("loaded", "active", "running")),
                ],
                vec![
                    Step::Nothing,
                    Step::Fetch(a.into()),
                    emit(a, Some(st("loaded", "active", "running"))),
                ],
            ),
            (
                "job on a unit never seen: fetched once",
                vec![
                    Job(a),
                    Fetched(a, st("loaded", "active", "running")),
                    Job(a),
                ],
                vec![
                    Step::Fetch(a.into()),
                    emit(a, Some(st("loaded", "active", "running"))),
                    Step::Nothing,
                ],
            ),
            (
                "stop then garbage collection",
                vec![
                    Props(a, Some("loaded"), Some("active"), Some("running")),
                    Props(a, Some("loaded"), Some("inactive"), Some("dead")),
                    Removed(a),
                    Removed(a),
                ],
                vec![
                    emit(a, Some(st("loaded", "active", "running"))),
                    emit(a, Some(st("loaded", "inactive", "dead"))),
                    emit(a, None),
                    Step::Nothing,
                ],
            ),
            (
                "a load for a query and its collection say nothing",
                vec![New(a), Removed(a)],
                vec![Step::Nothing, Step::Nothing],
            ),
            (
                "partial properties merge with the last state",
                vec![
                    Props(a, Some("loaded"), Some("active"), Some("running")),
                    Props(a, None, None, Some("reload")),
                ],
                vec![
                    emit(a, Some(st("loaded", "active", "running"))),
                    emit(a, Some(st("loaded", "active", "reload"))),
                ],
            ),
            (
                "partial properties with nothing to merge: fetch",
                vec![Props(a, None, Some("active"), None)],
                vec![Step::Fetch(a.into())],
            ),
            (
                "after a reset the same state is sent again",
                vec![
                    Props(a, Some("loaded"), Some("active"), Some("running")),
                    Reset,
                    Props(a, Some("loaded"), Some("active"), Some("running")),
                ],
                vec![
                    emit(a, Some(st("loaded", "active", "running"))),
                    Step::Nothing,
                    emit(a, Some(st("loaded", "active", "running"))),
                ],
            ),
        ];
        for (what, script, want) in cases {
            assert_eq!(run(script), want, "{what}");
        }
    }
}
