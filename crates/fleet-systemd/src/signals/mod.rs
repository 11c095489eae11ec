//! State changes from systemd's D-Bus signals: the subscription task and the pure bookkeeping
//! ([`Tracker`](tracker::Tracker)) that turns signals into [`UnitEvent`]s.
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
//! read nor causes a resync ([`genuine`](decode::genuine)).
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
//!
//! The tracker is in `tracker.rs`, the sender checks and the decoding of messages into
//! signals in `decode.rs`; this file holds the subscription: its connection and its task.

mod decode;
mod tracker;

use std::sync::Arc;
use std::time::Duration;

use futures_util::{FutureExt, StreamExt};
use tokio::sync::mpsc;
use tokio::time::Instant;
use zbus::{Connection, MessageStream};

use crate::dbus::{
    BusKind, Inner, MANAGER_INTERFACE, SYSTEMD_PATH, SYSTEMD_SERVICE, UNIT_INTERFACE,
};
use crate::{Error, Result, ResyncReason, SUBSCRIPTION_BUFFER, UnitEvent, WatchSet};
use decode::{BUS_SERVICE, OwnerRecheck, Signal, Verdict, decode_trusted, log_dropped, verdict};
use tracker::Tracker;

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
    use std::collections::HashMap;

    use zbus::message::Type as MessageType;
    use zbus::zvariant::OwnedObjectPath;

    use super::decode::unit_path;
    use super::*;
    use crate::{StateChange, SystemdState};

    #[test]
    fn match_rules_parse() {
        for rule in match_rules() {
            zbus::MatchRule::try_from(rule.as_str()).expect(&rule);
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
                state: Some(SystemdState::new("loaded", "active", "running")),
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
                    state: Some(SystemdState::new("loaded", "active", "running")),
                })),
                "believing {believed:?}"
            );
        }
    }
}
