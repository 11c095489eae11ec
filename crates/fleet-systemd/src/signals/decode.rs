//! Which signals count (their senders checked against the bus's word) and what they say:
//! messages decoded into [`Signal`]s about watched units, before any body is decoded for others.

use std::collections::HashMap;

use tokio::time::Instant;
use zbus::message::{Message, Type as MessageType};
use zbus::zvariant::{OwnedObjectPath, OwnedValue};

use super::OWNER_RECHECK;
use super::tracker::Tracker;
use crate::WatchSet;
use crate::dbus::{MANAGER_INTERFACE, SYSTEMD_PATH, SYSTEMD_SERVICE, UNIT_INTERFACE};

/// The bus daemon's name: the sender of its own signals, and a name no client can own.
pub(super) const BUS_SERVICE: &str = "org.freedesktop.DBus";

/// Prefix of unit object paths; the rest is the escaped unit name.
pub(super) const UNIT_PATH_PREFIX: &str = "/org/freedesktop/systemd1/unit/";

/// systemd's object path label for a unit name: ASCII letters and digits stay, every other
/// byte becomes `_` and two lowercase hex digits.
#[cfg(test)]
pub(super) fn unit_path(name: &str) -> String {
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

/// A decoded signal, limited to what the tracker needs.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Signal {
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
pub(super) enum Origin {
    /// systemd's manager: the current owner of `org.freedesktop.systemd1`.
    Systemd,
    /// The bus daemon.
    Bus,
}

/// Whether a signal that must come from `origin`, sent by `sender` (the unique name the bus
/// daemon wrote into the message), is genuine. `systemd` is the unique name that owns
/// `org.freedesktop.systemd1` now; None while nobody does, when nothing is systemd's.
pub(super) fn genuine(sender: Option<&str>, systemd: Option<&str>, origin: Origin) -> bool {
    match (sender, origin) {
        (Some(sender), Origin::Bus) => sender == BUS_SERVICE,
        (Some(sender), Origin::Systemd) => systemd == Some(sender),
        (None, _) => false,
    }
}

/// What the sender of a message says about it.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Verdict {
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
pub(super) fn verdict(msg: &Message, systemd: Option<&str>) -> Verdict {
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
pub(super) struct OwnerRecheck {
    last: Option<Instant>,
}

impl OwnerRecheck {
    /// Whether asking at `now` is allowed; if so, counts it.
    pub(super) fn allow(&mut self, now: Instant) -> bool {
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
pub(super) fn log_dropped(msg: &Message, systemd: Option<&str>) {
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
pub(super) fn decode(
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
pub(super) fn decode_trusted(
    msg: &Message,
    watch: &WatchSet,
    tracker: &mut Tracker,
) -> Option<Signal> {
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

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

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
}
