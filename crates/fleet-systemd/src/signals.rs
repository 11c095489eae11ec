//! State changes from systemd's D-Bus signals: the subscription task and the pure bookkeeping
//! ([`Tracker`]) that turns signals into [`UnitEvent`]s.
//!
//! # How signals map to states
//!
//! * `PropertiesChanged` on a unit object, interface `org.freedesktop.systemd1.Unit`: systemd
//!   sends it on every change of a unit it has announced, with `ActiveState` and `SubState`.
//!   It never carries `LoadState` (measured on systemd 252), which changes only when a unit
//!   is (re)loaded; so the load state comes from one read of the unit after it was announced,
//!   and is merged into every later change. This is the main source.
//! * `UnitNew`: systemd loaded the unit. Changes made before systemd got round to announcing
//!   the unit are folded into this one signal, which carries no state; the unit is marked
//!   *stale* until it is read. It is not read right away: reading loads an unloaded unit,
//!   which systemd collects again (`UnitRemoved`) and announces again (`UnitNew`), forever.
//! * A stale unit is read when it next changes or when a job of it ends (`JobRemoved`). The
//!   reads of a burst of signals are batched into one `ListUnitsByNames`. A freshly loaded
//!   `Type=simple` service that starts at once often sends only `UnitNew` and `JobRemoved`;
//!   measured: 200 such starts, 2–3 reads.
//! * `UnitRemoved`: systemd unloaded the unit → `StateChange { state: None }`, if a state had
//!   been sent for it.
//! * `Reloading(false)` and a new owner of `org.freedesktop.systemd1` → [`UnitEvent::Resync`].
//!
//! # Senders
//!
//! Every local user may send a signal to our connection: the system bus's default policy
//! allows signals from anyone, and a signal addressed to our unique name (a unicast signal,
//! `busctl --destination=… emit`) is delivered whatever our match rules say; those only pick
//! the broadcasts we get. So a signal counts only when the bus daemon vouches for its sender:
//! systemd's signals must come from the unique name that owns `org.freedesktop.systemd1` now
//! (asked with `GetNameOwner` on connecting, then followed through `NameOwnerChanged`), and
//! `NameOwnerChanged` must come from the bus daemon itself (`org.freedesktop.DBus`, a name
//! nobody else can own). The bus daemon writes the sender field; a client cannot choose it.
//! Anything else is dropped before it is decoded, so it neither changes a state nor queues a
//! read nor causes a resync ([`genuine`]).
//!
//! Should a `NameOwnerChanged` ever be missed, the owner we know would stay wrong and every
//! genuine signal be dropped. So a signal on systemd's paths and interfaces from a sender that
//! is not the owner we know (or while we know none) makes the subscription ask `GetNameOwner`
//! again, at most once per [`OWNER_RECHECK`] whoever sends such signals; an owner found
//! changed is handled as its `NameOwnerChanged` would have been (a resync), and the signal
//! counts if its sender is that owner ([`Verdict::Unconfirmed`]).
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
use tokio::time::Instant;
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

/// The bus daemon's name: the sender of its own signals, and a name no client can own.
const BUS_SERVICE: &str = "org.freedesktop.DBus";

/// Prefix of unit object paths; the rest is the escaped unit name.
const UNIT_PATH_PREFIX: &str = "/org/freedesktop/systemd1/unit/";

/// Messages zbus may queue for the subscription before it stops reading the socket.
const CONNECTION_QUEUE: usize = 8192;

/// Most signals handled before the pending state reads are done.
const MAX_BATCH: usize = 1024;

/// Least time between two `GetNameOwner` asked because a signal came from a sender that is
/// not the owner we know: anyone can send such signals, so they must not cost a call each.
const OWNER_RECHECK: Duration = Duration::from_secs(1);

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

#[derive(Debug, Default)]
struct Tracked {
    /// The state last emitted (None: none yet).
    last: Option<SystemdState>,
    /// Announced by `UnitNew` and not read since: its load state may have changed.
    stale: bool,
}

/// Per watched unit, what was last sent, and which units must be read from systemd because
/// the signals did not tell enough. Turns decoded signals into state changes to emit. No I/O.
#[derive(Debug, Default)]
pub(crate) struct Tracker {
    units: HashMap<String, Tracked>,
    /// Units to read with the next batched `ListUnitsByNames` ([`Tracker::take_pending`]).
    pending: BTreeSet<String>,
}

impl Tracker {
    /// `PropertiesChanged` with whichever of the three states it carried. systemd's signals
    /// carry `ActiveState` and `SubState` but not `LoadState`, so a unit whose load state is not
    /// known (none sent yet, or announced anew) is queued for a read instead.
    pub(crate) fn properties(
        &mut self,
        name: &str,
        load: Option<String>,
        active: Option<String>,
        sub: Option<String>,
    ) -> Option<StateChange> {
        let tracked = self.units.entry(name.to_owned()).or_default();
        let last = tracked.last.as_ref().filter(|_| !tracked.stale);
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
            _ => {
                self.pending.insert(name.to_owned());
                None
            }
        }
    }

    /// `UnitNew`. Not read now: reading loads an unloaded unit, which systemd collects and
    /// announces again, forever. Its first change or job end will queue the read.
    pub(crate) fn unit_new(&mut self, name: &str) -> Option<StateChange> {
        self.units.entry(name.to_owned()).or_default().stale = true;
        None
    }

    /// `JobRemoved`: the job's outcome is known from the signals before it, unless the unit
    /// was announced anew and nothing told its state since.
    pub(crate) fn job_removed(&mut self, name: &str) -> Option<StateChange> {
        let known = self
            .units
            .get(name)
            .is_some_and(|t| t.last.is_some() && !t.stale);
        if !known {
            self.pending.insert(name.to_owned());
        }
        None
    }

    /// `UnitRemoved`. A read still pending stays pending: it reports the state systemd gives
    /// the unit when asked (which is the last word on a unit stopped and collected before its
    /// load state was known).
    pub(crate) fn unit_removed(&mut self, name: &str) -> Option<StateChange> {
        match self.units.remove(name) {
            Some(Tracked { last: Some(_), .. }) => Some(StateChange {
                name: name.to_owned(),
                state: None,
            }),
            _ => None,
        }
    }

    /// The answer to a read.
    pub(crate) fn fetched(&mut self, name: &str, state: SystemdState) -> Option<StateChange> {
        self.pending.remove(name);
        self.units.entry(name.to_owned()).or_default().stale = false;
        self.set(name, state)
    }

    /// The units to read now; empties the queue.
    pub(crate) fn take_pending(&mut self) -> Vec<String> {
        std::mem::take(&mut self.pending).into_iter().collect()
    }

    /// The unit is no longer watched.
    pub(crate) fn forget(&mut self, name: &str) {
        self.units.remove(name);
        self.pending.remove(name);
    }

    /// Everything may have changed unseen; the consumer re-reads.
    pub(crate) fn reset(&mut self) {
        self.units.clear();
        self.pending.clear();
    }

    fn set(&mut self, name: &str, state: SystemdState) -> Option<StateChange> {
        let tracked = self.units.entry(name.to_owned()).or_default();
        if tracked.last.as_ref() == Some(&state) {
            return None;
        }
        tracked.last = Some(state.clone());
        Some(StateChange {
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
    /// `org.freedesktop.systemd1` has a new owner (None: it has none now).
    OwnerChanged(Option<String>),
}

/// Who must have sent a signal for it to count.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Origin {
    /// systemd's manager: the current owner of `org.freedesktop.systemd1`.
    Systemd,
    /// The bus daemon.
    Bus,
}

/// Whether a signal that must come from `origin`, sent by `sender` (the unique name the bus
/// daemon wrote into the message), is genuine. `systemd` is the unique name that owns
/// `org.freedesktop.systemd1` now; None while nobody does, when nothing is systemd's.
fn genuine(sender: Option<&str>, systemd: Option<&str>, origin: Origin) -> bool {
    match (sender, origin) {
        (Some(sender), Origin::Bus) => sender == BUS_SERVICE,
        (Some(sender), Origin::Systemd) => systemd == Some(sender),
        (None, _) => false,
    }
}

/// What the sender of a message says about it.
#[derive(Debug, PartialEq, Eq)]
enum Verdict {
    /// A signal from whom it must come from ([`genuine`]).
    Genuine,
    /// A signal on systemd's object paths and interfaces from `sender`, which is not the owner
    /// of systemd's name we know (or we know none): forged, or systemd under a new name
    /// whose `NameOwnerChanged` we missed. Counts only once the bus confirms the owner.
    Unconfirmed(String),
    /// Anything else: dropped.
    Foreign,
}

/// Judges `msg` by its sender; `systemd` is the owner of systemd's name we know.
fn verdict(msg: &Message, systemd: Option<&str>) -> Verdict {
    if msg.message_type() != MessageType::Signal {
        return Verdict::Foreign;
    }
    let header = msg.header();
    let (Some(interface), Some(member), Some(path)) =
        (header.interface(), header.member(), header.path())
    else {
        return Verdict::Foreign;
    };
    let (interface, member, path) = (interface.as_str(), member.as_str(), path.as_str());
    let origin = match (interface, member) {
        (BUS_SERVICE, "NameOwnerChanged") => Origin::Bus,
        _ => Origin::Systemd,
    };
    let sender = header.sender().map(|s| s.as_str());
    if genuine(sender, systemd, origin) {
        return Verdict::Genuine;
    }
    let systemds = match interface {
        MANAGER_INTERFACE => path == SYSTEMD_PATH,
        "org.freedesktop.DBus.Properties" => path.starts_with(UNIT_PATH_PREFIX),
        _ => false,
    };
    match sender {
        Some(sender) if origin == Origin::Systemd && systemds => {
            Verdict::Unconfirmed(sender.to_owned())
        }
        _ => Verdict::Foreign,
    }
}

/// Allows a `GetNameOwner` for an unconfirmed sender at most once per [`OWNER_RECHECK`].
#[derive(Debug, Default)]
struct OwnerRecheck {
    last: Option<Instant>,
}

impl OwnerRecheck {
    /// Whether asking at `now` is allowed; if so, counts it.
    fn allow(&mut self, now: Instant) -> bool {
        if self
            .last
            .is_some_and(|last| now.saturating_duration_since(last) < OWNER_RECHECK)
        {
            return false;
        }
        self.last = Some(now);
        true
    }
}

/// Logs a signal dropped for its sender (at debug level: anyone can send them, any number).
fn log_dropped(msg: &Message, systemd: Option<&str>) {
    let header = msg.header();
    tracing::debug!(
        sender = header.sender().map(|s| s.as_str()),
        path = header.path().map(|p| p.as_str()),
        interface = header.interface().map(|i| i.as_str()),
        member = header.member().map(|m| m.as_str()),
        systemd,
        "dropping a signal not sent by systemd or the bus"
    );
}

/// Decodes `msg` if it is a genuine signal (see [`genuine`]; `systemd` is the current owner of
/// systemd's name) about a watched unit, the manager itself or the owner of its name.
#[cfg(test)]
fn decode(
    msg: &Message,
    systemd: Option<&str>,
    watch: &WatchSet,
    tracker: &mut Tracker,
) -> Option<Signal> {
    if verdict(msg, systemd) != Verdict::Genuine {
        return None;
    }
    decode_trusted(msg, watch, tracker)
}

/// Decodes a signal whose sender was checked ([`verdict`]) about a watched unit, the manager
/// itself or the owner of its name.
fn decode_trusted(msg: &Message, watch: &WatchSet, tracker: &mut Tracker) -> Option<Signal> {
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
            (name == SYSTEMD_SERVICE)
                .then(|| Signal::OwnerChanged((!new.is_empty()).then_some(new)))
        }
        _ => None,
    }
}

/// An open subscription connection.
struct Opened {
    conn: Connection,
    stream: MessageStream,
    /// The unique name owning `org.freedesktop.systemd1` when the connection was opened.
    systemd: Option<String>,
}

/// Opens a connection, installs the match rules, learns who systemd is and subscribes.
async fn open(kind: BusKind) -> Result<Opened> {
    let conn = kind.connect(Some(CONNECTION_QUEUE)).await?;
    // The stream exists before the first rule, so no matching signal can slip past.
    let stream = MessageStream::from(&conn);
    for rule in match_rules() {
        conn.call_method(
            Some(BUS_SERVICE),
            "/org/freedesktop/DBus",
            Some(BUS_SERVICE),
            "AddMatch",
            &rule.as_str(),
        )
        .await
        .map_err(|e| Error::Manager {
            method: "AddMatch",
            error: e.into(),
        })?;
    }
    // Asked after the NameOwnerChanged rule is in place: a change after the answer arrives
    // as a signal; one before it is queued ahead of it and tells the same owner or an older one
    // that the signals after it correct.
    let systemd = name_owner(&conn).await?;
    subscribe_manager(&conn).await?;
    Ok(Opened {
        conn,
        stream,
        systemd,
    })
}

/// The unique name owning `org.freedesktop.systemd1`; None if nobody does.
pub(crate) async fn name_owner(conn: &Connection) -> Result<Option<String>> {
    let reply = conn
        .call_method(
            Some(BUS_SERVICE),
            "/org/freedesktop/DBus",
            Some(BUS_SERVICE),
            "GetNameOwner",
            &SYSTEMD_SERVICE,
        )
        .await;
    let error: crate::DBusError = match reply {
        Ok(reply) => match reply.body().deserialize::<String>() {
            Ok(owner) => return Ok(Some(owner)),
            Err(e) => e.into(),
        },
        Err(e) => e.into(),
    };
    if error.is("org.freedesktop.DBus.Error.NameHasNoOwner") {
        return Ok(None);
    }
    Err(Error::Manager {
        method: "GetNameOwner",
        error,
    })
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
    let opened = open(manager.kind).await?;
    Ok(spawn(manager, watch, opened))
}

/// Spawns the task of a subscription on `opened`.
fn spawn(manager: Arc<Inner>, watch: WatchSet, opened: Opened) -> mpsc::Receiver<UnitEvent> {
    let (tx, rx) = mpsc::channel(SUBSCRIPTION_BUFFER);
    let task = Subscription {
        manager,
        watch,
        tx,
        tracker: Tracker::default(),
        systemd: opened.systemd,
        recheck: OwnerRecheck::default(),
    };
    tokio::spawn(task.run(opened.conn, opened.stream));
    rx
}

struct Subscription {
    manager: Arc<Inner>,
    watch: WatchSet,
    tx: mpsc::Sender<UnitEvent>,
    tracker: Tracker,
    /// The unique name owning `org.freedesktop.systemd1` now: the only sender whose unit and
    /// manager signals count (any local user can send us signals).
    systemd: Option<String>,
    /// Bounds the `GetNameOwner` calls that signals from other senders cause.
    recheck: OwnerRecheck,
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
                    let Some(opened) = self.reopen().await else {
                        return;
                    };
                    (conn, stream) = (opened.conn, opened.stream);
                    self.systemd = opened.systemd;
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
            for _ in 0..MAX_BATCH {
                let msg = match next {
                    Some(Ok(msg)) => msg,
                    Some(Err(e)) => {
                        tracing::debug!(error = %e, "systemd subscription stream failed");
                        return Stop::Lost;
                    }
                    None => return Stop::Lost,
                };
                let trusted = match verdict(&msg, self.systemd.as_deref()) {
                    Verdict::Genuine => Ok(true),
                    Verdict::Unconfirmed(sender) => self.confirm(conn, &sender).await,
                    Verdict::Foreign => Ok(false),
                };
                match trusted {
                    Err(Closed) => return Stop::Closed,
                    Ok(false) => log_dropped(&msg, self.systemd.as_deref()),
                    Ok(true) => {
                        if let Some(signal) = decode_trusted(&msg, &self.watch, &mut self.tracker) {
                            tracing::trace!(?signal, "systemd signal");
                            if self.handle(conn, signal).await.is_err() {
                                return Stop::Closed;
                            }
                        }
                    }
                }
                match stream.next().now_or_never() {
                    Some(msg) => next = msg,
                    None => break,
                }
            }
            if self.fetch().await.is_err() {
                return Stop::Closed;
            }
        }
    }

    async fn handle(&mut self, conn: &Connection, signal: Signal) -> Result<(), Closed> {
        let change = match signal {
            Signal::Properties {
                name,
                load,
                active,
                sub,
            } => self.tracker.properties(&name, load, active, sub),
            Signal::UnitNew(name) => self.tracker.unit_new(&name),
            Signal::UnitRemoved(name) => self.tracker.unit_removed(&name),
            Signal::JobRemoved(name) => self.tracker.job_removed(&name),
            Signal::Reloaded => {
                self.tracker.reset();
                return self.send(UnitEvent::Resync(ResyncReason::Reloaded)).await;
            }
            Signal::OwnerChanged(owner) => {
                let Some(owner) = owner else {
                    // systemd left the bus; its successor's arrival is the next signal.
                    self.systemd = None;
                    return Ok(());
                };
                self.systemd = Some(owner);
                // A re-executed manager may or may not remember its subscribers.
                if let Err(e) = subscribe_manager(conn).await {
                    tracing::warn!(error = %e, "renewing the systemd subscription failed");
                }
                self.tracker.reset();
                return self
                    .send(UnitEvent::Resync(ResyncReason::ManagerRestarted))
                    .await;
            }
        };
        match change {
            Some(change) => self.send(UnitEvent::Changed(change)).await,
            None => Ok(()),
        }
    }

    /// Whether `sender`, which is not the owner of systemd's name we know, owns it now: asks
    /// the bus (at most once per [`OWNER_RECHECK`]), and takes a changed owner as the
    /// `NameOwnerChanged` we must have missed (a resync).
    async fn confirm(&mut self, conn: &Connection, sender: &str) -> Result<bool, Closed> {
        if !self.recheck.allow(Instant::now()) {
            return Ok(false);
        }
        let owner = match self.manager.systemd_owner().await {
            Ok(owner) => owner,
            Err(e) => {
                tracing::warn!(error = %e, "asking the bus who systemd is failed");
                return Ok(false);
            }
        };
        if owner != self.systemd {
            tracing::warn!(
                owner = owner.as_deref(),
                previous = self.systemd.as_deref(),
                "systemd's bus name changed owner unannounced, resynchronizing"
            );
            self.handle(conn, Signal::OwnerChanged(owner)).await?;
        }
        Ok(self.systemd.as_deref() == Some(sender))
    }

    /// Reads the states the tracker asked for, over the shared call connection (not this
    /// subscription's: its queue may be full of signals not read yet), and reports the ones
    /// that changed.
    async fn fetch(&mut self) -> Result<(), Closed> {
        let names: Vec<String> = self
            .tracker
            .take_pending()
            .into_iter()
            .filter(|n| self.watch.contains(n))
            .collect();
        if names.is_empty() {
            return Ok(());
        }
        tracing::debug!(
            units = names.len(),
            "reading unit states the signals did not tell"
        );
        let states = match self.manager.states(&names).await {
            Ok(states) => states,
            Err(e) => {
                tracing::warn!(error = %e, "reading unit states after signals failed");
                return Ok(());
            }
        };
        for (name, state) in states {
            if let Some(change) = self.tracker.fetched(&name, state) {
                self.send(UnitEvent::Changed(change)).await?;
            }
        }
        Ok(())
    }

    async fn send(&self, event: UnitEvent) -> Result<(), Closed> {
        self.tx.send(event).await.map_err(|_| Closed)
    }

    /// Reconnects with back-off until it works or the receiver goes away.
    async fn reopen(&self) -> Option<Opened> {
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

    /// What the tracker did after one scripted input.
    #[derive(Debug, PartialEq, Eq)]
    enum Out {
        Nothing,
        Emit(StateChange),
        /// The reads taken with [`In::Take`].
        Read(Vec<String>),
    }

    fn emit(name: &str, state: Option<SystemdState>) -> Out {
        Out::Emit(StateChange {
            name: name.into(),
            state,
        })
    }

    fn read(names: &[&str]) -> Out {
        Out::Read(names.iter().map(|n| n.to_string()).collect())
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

    #[test]
    fn only_systemd_and_the_bus_are_believed() {
        use Origin::{Bus, Systemd};
        let (systemd, forger) = (":1.1", ":1.42");
        let cases: &[(Option<&str>, Option<&str>, Origin, bool)] = &[
            (Some(systemd), Some(systemd), Systemd, true),
            (Some(forger), Some(systemd), Systemd, false),
            (None, Some(systemd), Systemd, false),
            // nobody owns systemd's name (it is restarting): nothing is systemd's
            (Some(systemd), None, Systemd, false),
            (None, None, Systemd, false),
            // the bus daemon is not systemd
            (Some(BUS_SERVICE), Some(systemd), Systemd, false),
            (Some(BUS_SERVICE), Some(systemd), Bus, true),
            (Some(BUS_SERVICE), None, Bus, true),
            // systemd is not the bus daemon
            (Some(systemd), Some(systemd), Bus, false),
            (Some(forger), Some(systemd), Bus, false),
            (None, Some(systemd), Bus, false),
        ];
        for &(sender, owner, origin, want) in cases {
            assert_eq!(
                genuine(sender, owner, origin),
                want,
                "sender {sender:?}, owner {owner:?}, {origin:?}"
            );
        }
    }

    fn props_msg(sender: &str, name: &str, states: &[(&str, &str)]) -> Message {
        let changed: HashMap<&str, zbus::zvariant::Value<'_>> = states
            .iter()
            .map(|(k, v)| (*k, zbus::zvariant::Value::from(*v)))
            .collect();
        Message::signal(
            unit_path(name).as_str(),
            "org.freedesktop.DBus.Properties",
            "PropertiesChanged",
        )
        .and_then(|b| b.sender(sender))
        .and_then(|b| b.build(&(UNIT_INTERFACE, changed, Vec::<String>::new())))
        .expect("PropertiesChanged message")
    }

    fn reloading_msg(sender: &str) -> Message {
        Message::signal(SYSTEMD_PATH, MANAGER_INTERFACE, "Reloading")
            .and_then(|b| b.sender(sender))
            .and_then(|b| b.build(&false))
            .expect("Reloading message")
    }

    fn owner_msg(sender: &str, new: &str) -> Message {
        Message::signal("/org/freedesktop/DBus", BUS_SERVICE, "NameOwnerChanged")
            .and_then(|b| b.sender(sender))
            .and_then(|b| b.build(&(SYSTEMD_SERVICE, ":1.1", new)))
            .expect("NameOwnerChanged message")
    }

    #[test]
    fn decode_drops_forged_signals_before_they_touch_the_tracker() {
        let (systemd, forger) = (":1.1", ":1.42");
        let unit = "a.service";
        let watch = WatchSet::from_iter([unit.to_owned()]);
        let full = [
            ("LoadState", "loaded"),
            ("ActiveState", "failed"),
            ("SubState", "failed"),
        ];
        let partial = [("ActiveState", "failed"), ("SubState", "failed")];
        let props = |load: Option<&str>| Signal::Properties {
            name: unit.into(),
            load: load.map(str::to_owned),
            active: Some("failed".into()),
            sub: Some("failed".into()),
        };
        let cases: Vec<(&str, Message, Option<&str>, Option<Signal>)> = vec![
            (
                "systemd's change",
                props_msg(systemd, unit, &full),
                Some(systemd),
                Some(props(Some("loaded"))),
            ),
            (
                "forged change",
                props_msg(forger, unit, &full),
                Some(systemd),
                None,
            ),
            (
                "forged change that would need a read",
                props_msg(forger, unit, &partial),
                Some(systemd),
                None,
            ),
            (
                "systemd's change while its name has no owner",
                props_msg(systemd, unit, &partial),
                None,
                None,
            ),
            (
                "change sent as the bus daemon",
                props_msg(BUS_SERVICE, unit, &full),
                Some(systemd),
                None,
            ),
            (
                "systemd's reload",
                reloading_msg(systemd),
                Some(systemd),
                Some(Signal::Reloaded),
            ),
            ("forged reload", reloading_msg(forger), Some(systemd), None),
            (
                "the bus announces a new systemd",
                owner_msg(BUS_SERVICE, ":1.7"),
                Some(systemd),
                Some(Signal::OwnerChanged(Some(":1.7".into()))),
            ),
            (
                "the bus announces systemd left",
                owner_msg(BUS_SERVICE, ""),
                Some(systemd),
                Some(Signal::OwnerChanged(None)),
            ),
            (
                "forged owner change",
                owner_msg(forger, forger),
                Some(systemd),
                None,
            ),
            (
                "owner change sent by systemd itself",
                owner_msg(systemd, forger),
                Some(systemd),
                None,
            ),
        ];
        for (what, msg, owner, want) in cases {
            let mut tracker = Tracker::default();
            assert_eq!(decode(&msg, owner, &watch, &mut tracker), want, "{what}");
            if want.is_none() {
                assert_eq!(tracker.take_pending(), Vec::<String>::new(), "{what}");
                assert!(tracker.units.is_empty(), "{what}");
            }
        }
    }

    /// A dbus-daemon of one test, on a socket in a temporary directory; killed when dropped.
    struct PrivateBus {
        daemon: std::process::Child,
        address: &'static str,
        _dir: tempfile::TempDir,
    }

    impl PrivateBus {
        /// Starts one; None (with a notice) where dbus-daemon is not installed.
        fn start() -> Option<PrivateBus> {
            use std::io::{BufRead, Write};
            let dir = tempfile::tempdir().expect("tempdir");
            let config = dir.path().join("bus.conf");
            // Signals are allowed from anyone to anyone, as on the system bus (its default
            // policy has `<allow send_type="signal"/>`); here everything else is allowed too.
            let text = format!(
                "<!DOCTYPE busconfig PUBLIC \"-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN\"\n                  \"http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd\">\n\
                 <busconfig><type>session</type><listen>unix:path={}</listen>\
                 <auth>EXTERNAL</auth><policy context=\"default\"><allow user=\"*\"/>\
                 <allow own=\"*\"/><allow send_destination=\"*\"/>\
                 <allow send_type=\"signal\"/><allow receive_sender=\"*\"/>\
                 </policy></busconfig>\n",
                dir.path().join("socket").display()
            );
            std::fs::write(&config, text).expect("write bus config");
            let spawned = std::process::Command::new("dbus-daemon")
                .arg(format!("--config-file={}", config.display()))
                .args(["--nofork", "--print-address"])
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::null())
                .spawn();
            let mut daemon = match spawned {
                Ok(daemon) => daemon,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    let _ = writeln!(
                        std::io::stderr(),
                        "fleet-systemd: skipping, dbus-daemon is not installed"
                    );
                    return None;
                }
                Err(e) => panic!("starting dbus-daemon: {e}"),
            };
            let mut line = String::new();
            let stdout = daemon.stdout.take().expect("dbus-daemon stdout");
            std::io::BufReader::new(stdout)
                .read_line(&mut line)
                .expect("dbus-daemon address");
            assert!(!line.trim().is_empty(), "dbus-daemon printed no address");
            Some(PrivateBus {
                daemon,
                address: Box::leak(line.trim().to_owned().into_boxed_str()),
                _dir: dir,
            })
        }

        async fn connect(&self) -> Connection {
            zbus::connection::Builder::address(self.address)
                .expect("bus address")
                .build()
                .await
                .expect("connect to the private bus")
        }
    }

    impl Drop for PrivateBus {
        fn drop(&mut self) {
            let _ = self.daemon.kill();
            let _ = self.daemon.wait();
        }
    }

    /// Plays systemd's manager on `conn`: answers `Subscribe`, and `ListUnitsByNames` (counted
    /// in `reads`) with every unit loaded, active and running.
    async fn play_systemd(
        conn: Connection,
        mut calls: MessageStream,
        reads: Arc<std::sync::atomic::AtomicUsize>,
    ) {
        while let Some(Ok(msg)) = calls.next().await {
            if msg.message_type() != MessageType::MethodCall {
                continue;
            }
            let header = msg.header();
            let replied = match header.member().map(|m| m.as_str()) {
                Some("Subscribe") => conn.reply(&header, &()).await,
                Some("ListUnitsByNames") => {
                    reads.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    let names: Vec<String> = msg.body().deserialize().unwrap_or_default();
                    let root = OwnedObjectPath::try_from("/").expect("path");
                    let rows: Vec<_> = names
                        .into_iter()
                        .map(|n| {
                            let path = OwnedObjectPath::try_from(unit_path(&n)).expect("path");
                            let (job, none) = (0u32, root.clone());
                            (
                                n, "", "loaded", "active", "running", "", path, job, "", none,
                            )
                        })
                        .collect();
                    conn.reply(&header, &rows).await
                }
                _ => Ok(()),
            };
            replied.expect("reply as systemd");
        }
    }

    /// Before signals were checked for their sender, the forged `PropertiesChanged` below was
    /// the first event (and the forged `Reloading` a resync): the bus hands a signal addressed
    /// to a connection's unique name to that connection whatever its match rules.
    #[tokio::test]
    async fn signals_forged_by_another_connection_are_ignored() {
        let Some(bus) = PrivateBus::start() else {
            return;
        };
        let systemd = bus.connect().await;
        let calls = MessageStream::from(&systemd);
        systemd
            .request_name(SYSTEMD_SERVICE)
            .await
            .expect("own systemd's name");
        let reads = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        tokio::spawn(play_systemd(systemd.clone(), calls, reads.clone()));

        let units = tempfile::tempdir().expect("tempdir");
        let inner = Inner::for_tests(BusKind::Address(bus.address), units.path().join("units"))
            .expect("manager");
        let unit = "a.service";
        let mut rx = subscribe(Arc::new(inner), WatchSet::from_iter([unit.to_owned()]))
            .await
            .expect("subscribe");

        let forger = bus.connect().await;
        let (systemd_name, forger_name) = (
            systemd.unique_name().expect("systemd's name").to_string(),
            forger.unique_name().expect("forger's name").to_string(),
        );
        let listed = forger
            .call_method(
                Some(BUS_SERVICE),
                "/org/freedesktop/DBus",
                Some(BUS_SERVICE),
                "ListNames",
                &(),
            )
            .await
            .expect("ListNames");
        let names: Vec<String> = listed.body().deserialize().expect("names");
        // Every other connection (the subscription's among them), and a broadcast.
        let mut destinations: Vec<Option<String>> = names
            .into_iter()
            .filter(|n| n.starts_with(':') && *n != systemd_name && *n != forger_name)
            .map(Some)
            .collect();
        assert!(
            !destinations.is_empty(),
            "no connection to forge signals to"
        );
        destinations.push(None);
        let failed: HashMap<&str, zbus::zvariant::Value<'_>> = [
            ("LoadState", "loaded"),
            ("ActiveState", "failed"),
            ("SubState", "failed"),
        ]
        .into_iter()
        .map(|(k, v)| (k, zbus::zvariant::Value::from(v)))
        .collect();
        let partial: HashMap<&str, zbus::zvariant::Value<'_>> =
            [("ActiveState", zbus::zvariant::Value::from("failed"))]
                .into_iter()
                .collect();
        let path = unit_path(unit);
        let no_names = Vec::<String>::new();
        for dest in &destinations {
            let dest = dest.as_deref();
            let props = "org.freedesktop.DBus.Properties";
            let (p, b) = (path.as_str(), BUS_SERVICE);
            let sent = [
                forger
                    .emit_signal(
                        dest,
                        p,
                        props,
                        "PropertiesChanged",
                        &(UNIT_INTERFACE, &failed, &no_names),
                    )
                    .await,
                forger
                    .emit_signal(
                        dest,
                        p,
                        props,
                        "PropertiesChanged",
                        &(UNIT_INTERFACE, &partial, &no_names),
                    )
                    .await,
                forger
                    .emit_signal(dest, SYSTEMD_PATH, MANAGER_INTERFACE, "Reloading", &false)
                    .await,
                forger
                    .emit_signal(
                        dest,
                        "/org/freedesktop/DBus",
                        b,
                        "NameOwnerChanged",
                        &(SYSTEMD_SERVICE, &systemd_name, &forger_name),
                    )
                    .await,
                forger
                    .emit_signal(dest, SYSTEMD_PATH, MANAGER_INTERFACE, "Reloading", &false)
                    .await,
            ];
            for result in sent {
                result.expect("forge a signal");
            }
        }
        // A round trip: the bus has routed all of the above before systemd's signal below.
        forger
            .call_method(
                Some(BUS_SERVICE),
                "/org/freedesktop/DBus",
                Some(BUS_SERVICE),
                "GetId",
                &(),
            )
            .await
            .expect("GetId");

        let running: HashMap<&str, zbus::zvariant::Value<'_>> = [
            ("LoadState", "loaded"),
            ("ActiveState", "active"),
            ("SubState", "running"),
        ]
        .into_iter()
        .map(|(k, v)| (k, zbus::zvariant::Value::from(v)))
        .collect();
        systemd
            .emit_signal(
                None::<&str>,
                path.as_str(),
                "org.freedesktop.DBus.Properties",
                "PropertiesChanged",
                &(UNIT_INTERFACE, &running, &no_names),
            )
            .await
            .expect("systemd's signal");
        let first = tokio::time::timeout(Duration::from_secs(10), rx.recv())
            .await
            .expect("systemd's change within 10 s");
        assert_eq!(
            first,
            Some(UnitEvent::Changed(StateChange {
                name: unit.to_owned(),
                state: Some(st("loaded", "active", "running")),
            }))
        );
        assert_eq!(
            reads.load(std::sync::atomic::Ordering::SeqCst),
            0,
            "a forged signal made the subscription read states"
        );
    }

    /// A `NameOwnerChanged` that never arrived (or a subscription that knows no owner) left
    /// the subscription believing in the wrong systemd. Before the owner was asked again,
    /// every genuine signal was dropped from then on and this test timed out.
    #[tokio::test]
    async fn a_missed_owner_change_is_noticed_at_the_next_signal() {
        let Some(bus) = PrivateBus::start() else {
            return;
        };
        let systemd = bus.connect().await;
        let calls = MessageStream::from(&systemd);
        systemd
            .request_name(SYSTEMD_SERVICE)
            .await
            .expect("own systemd's name");
        let reads = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        tokio::spawn(play_systemd(systemd.clone(), calls, reads.clone()));
        let unit = "a.service";
        let running: HashMap<&str, zbus::zvariant::Value<'_>> = [
            ("LoadState", "loaded"),
            ("ActiveState", "active"),
            ("SubState", "running"),
        ]
        .into_iter()
        .map(|(k, v)| (k, zbus::zvariant::Value::from(v)))
        .collect();
        let path = unit_path(unit);
        let no_names = Vec::<String>::new();

        for believed in [Some(":1.9999"), None] {
            let units = tempfile::tempdir().expect("tempdir");
            let inner = Inner::for_tests(BusKind::Address(bus.address), units.path().join("units"))
                .expect("manager");
            let mut opened = open(BusKind::Address(bus.address)).await.expect("open");
            assert_eq!(
                opened.systemd.as_deref(),
                systemd.unique_name().map(|n| n.as_str())
            );
            opened.systemd = believed.map(str::to_owned);
            let mut rx = spawn(
                Arc::new(inner),
                WatchSet::from_iter([unit.to_owned()]),
                opened,
            );
            systemd
                .emit_signal(
                    None::<&str>,
                    path.as_str(),
                    "org.freedesktop.DBus.Properties",
                    "PropertiesChanged",
                    &(UNIT_INTERFACE, &running, &no_names),
                )
                .await
                .expect("systemd's signal");
            let mut next = async || {
                tokio::time::timeout(Duration::from_secs(10), rx.recv())
                    .await
                    .unwrap_or_else(|_| panic!("believing {believed:?}: no event within 10 s"))
            };
            assert_eq!(
                next().await,
                Some(UnitEvent::Resync(ResyncReason::ManagerRestarted)),
                "believing {believed:?}"
            );
            assert_eq!(
                next().await,
                Some(UnitEvent::Changed(StateChange {
                    name: unit.to_owned(),
                    state: Some(st("loaded", "active", "running")),
                })),
                "believing {believed:?}"
            );
        }
    }

    #[tokio::test(start_paused = true)]
    async fn the_owner_is_asked_again_at_most_once_a_second() {
        let mut recheck = OwnerRecheck::default();
        assert!(recheck.allow(Instant::now()), "the first time");
        assert!(!recheck.allow(Instant::now()), "at once again");
        tokio::time::advance(OWNER_RECHECK - Duration::from_millis(1)).await;
        assert!(
            !recheck.allow(Instant::now()),
            "just before a second passed"
        );
        tokio::time::advance(Duration::from_millis(1)).await;
        assert!(recheck.allow(Instant::now()), "a second later");
        assert!(!recheck.allow(Instant::now()), "and not again at once");
    }

    #[test]
    fn senders_other_than_the_known_owner_are_checked_only_on_systemds_signals() {
        let (systemd, other) = (":1.1", ":1.42");
        let unconfirmed = || Verdict::Unconfirmed(other.to_owned());
        let unit_props = props_msg(other, "a.service", &[("ActiveState", "failed")]);
        let foreign_props = Message::signal(
            "/org/example/thing",
            "org.freedesktop.DBus.Properties",
            "PropertiesChanged",
        )
        .and_then(|b| b.sender(other))
        .and_then(|b| {
            b.build(&(
                UNIT_INTERFACE,
                HashMap::<&str, zbus::zvariant::Value<'_>>::new(),
                Vec::<String>::new(),
            ))
        })
        .expect("message");
        let manager_elsewhere = Message::signal("/org/example", MANAGER_INTERFACE, "Reloading")
            .and_then(|b| b.sender(other))
            .and_then(|b| b.build(&false))
            .expect("message");
        let cases: Vec<(&str, Message, Option<&str>, Verdict)> = vec![
            (
                "systemd's own",
                props_msg(systemd, "a.service", &[]),
                Some(systemd),
                Verdict::Genuine,
            ),
            (
                "unit change from another",
                unit_props.clone(),
                Some(systemd),
                unconfirmed(),
            ),
            (
                "unit change, owner unknown",
                unit_props,
                None,
                unconfirmed(),
            ),
            (
                "reload from another",
                reloading_msg(other),
                Some(systemd),
                unconfirmed(),
            ),
            (
                "reload, owner unknown",
                reloading_msg(other),
                None,
                unconfirmed(),
            ),
            (
                "bus signal from another",
                owner_msg(other, other),
                Some(systemd),
                Verdict::Foreign,
            ),
            (
                "bus signal from the bus",
                owner_msg(BUS_SERVICE, other),
                None,
                Verdict::Genuine,
            ),
            (
                "not a unit path",
                foreign_props,
                Some(systemd),
                Verdict::Foreign,
            ),
            (
                "manager interface elsewhere",
                manager_elsewhere,
                Some(systemd),
                Verdict::Foreign,
            ),
        ];
        for (what, msg, owner, want) in cases {
            assert_eq!(verdict(&msg, owner), want, "{what}");
        }
    }

    /// One scripted signal for the tracker tests.
    enum In {
        /// `PropertiesChanged` as systemd sends it: active and sub state only.
        Props(&'static str, &'static str, &'static str),
        New(&'static str),
        Removed(&'static str),
        Job(&'static str),
        Fetched(&'static str, SystemdState),
        Take,
        Reset,
    }

    fn run(script: Vec<In>) -> Vec<Out> {
        let mut t = Tracker::default();
        let out = |c: Option<StateChange>| c.map_or(Out::Nothing, Out::Emit);
        script
            .into_iter()
            .map(|input| match input {
                In::Props(n, a, u) => out(t.properties(n, None, Some(a.into()), Some(u.into()))),
                In::New(n) => out(t.unit_new(n)),
                In::Removed(n) => out(t.unit_removed(n)),
                In::Job(n) => out(t.job_removed(n)),
                In::Fetched(n, state) => out(t.fetched(n, state)),
                In::Take => Out::Read(t.take_pending()),
                In::Reset => {
                    t.reset();
                    Out::Nothing
                }
            })
            .collect()
    }

    #[test]
    fn tracker_table() {
        use In::*;
        let (a, b) = ("a.service", "b.service");
        let running = || st("loaded", "active", "running");
        let dead = || st("loaded", "inactive", "dead");
        let cases: Vec<(&str, Vec<In>, Vec<Out>)> = vec![
            (
                "first change: load state unknown, so read once; later changes merge it",
                vec![
                    Props(a, "activating", "start"),
                    Props(b, "activating", "start"),
                    Take,
                    Fetched(a, st("loaded", "activating", "start")),
                    Fetched(b, st("loaded", "active", "running")),
                    Props(a, "active", "running"),
                    Props(a, "active", "running"),
                    Job(a),
                    Take,
                ],
                vec![
                    Out::Nothing,
                    Out::Nothing,
                    read(&[a, b]),
                    emit(a, Some(st("loaded", "activating", "start"))),
                    emit(b, Some(running())),
                    emit(a, Some(running())),
                    Out::Nothing,
                    Out::Nothing,
                    read(&[]),
                ],
            ),
            (
                "changes folded into UnitNew: read when the job ends",
                vec![New(a), Job(a), Take, Fetched(a, running())],
                vec![
                    Out::Nothing,
                    Out::Nothing,
                    read(&[a]),
                    emit(a, Some(running())),
                ],
            ),
            (
                "announced anew: the old load state is not trusted",
                vec![
                    Fetched(a, running()),
                    New(a),
                    Props(a, "inactive", "dead"),
                    Take,
                    Fetched(a, st("not-found", "inactive", "dead")),
                ],
                vec![
                    emit(a, Some(running())),
                    Out::Nothing,
                    Out::Nothing,
                    read(&[a]),
                    emit(a, Some(st("not-found", "inactive", "dead"))),
                ],
            ),
            (
                "stop then garbage collection",
                vec![
                    Fetched(a, running()),
                    Props(a, "inactive", "dead"),
                    Removed(a),
                    Removed(a),
                    Take,
                ],
                vec![
                    emit(a, Some(running())),
                    emit(a, Some(dead())),
                    emit(a, None),
                    Out::Nothing,
                    read(&[]),
                ],
            ),
            (
                "collected before its load state was read: the read still happens",
                vec![
                    Props(a, "inactive", "dead"),
                    Removed(a),
                    Take,
                    Fetched(a, dead()),
                ],
                vec![
                    Out::Nothing,
                    Out::Nothing,
                    read(&[a]),
                    emit(a, Some(dead())),
                ],
            ),
            (
                "a load for a query and its collection say nothing",
                vec![New(a), Removed(a), Take],
                vec![Out::Nothing, Out::Nothing, read(&[])],
            ),
            (
                "after a reset nothing is pending and the same state is sent again",
                vec![
                    Fetched(a, running()),
                    Props(b, "active", "running"),
                    Reset,
                    Take,
                    Fetched(a, running()),
                ],
                vec![
                    emit(a, Some(running())),
                    Out::Nothing,
                    Out::Nothing,
                    read(&[]),
                    emit(a, Some(running())),
                ],
            ),
        ];
        for (what, script, want) in cases {
            assert_eq!(run(script), want, "{what}");
        }
    }
}
