//! The registry's changes after a revision, in order and grouped by revision: what the API's
//! event stream (`GET /fleet/v1/events`) is made of.
//!
//! One etcd watch over the whole prefix, with previous values, so that a consumer can tell a
//! creation from a change, and with the revision of every change, so that a client can resume.
//! When etcd has compacted the history a watch asks for, the feed says so instead of skipping
//! events silently.

use std::collections::BTreeMap;

use async_trait::async_trait;
use etcd_client::{EventType, WatchOptions};
use serde_json::{Map, Value, json};
use tokio::sync::mpsc;
use tracing::{debug, info};

use crate::{EtcdRegistry, MachineRecord, RegistryError, Result, StateRecord, UnitRecord};

/// One key that changed, relative to the registry prefix (`units/a.service`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    pub key: String,
    /// The new value; `None` when the key was deleted.
    pub value: Option<Vec<u8>>,
    /// The value before this change, when there was one.
    pub prev: Option<Vec<u8>>,
}

/// Every change of one etcd revision (one transaction).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChangeBatch {
    pub revision: i64,
    pub changes: Vec<Change>,
}

/// What a feed delivers. After `Compacted` or `Broken` nothing more comes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FeedItem {
    Batch(ChangeBatch),
    /// The history asked for is gone: etcd kept revisions after `compact_revision` only.
    Compacted {
        compact_revision: i64,
    },
    /// The watch ended (etcd unreachable, stream closed); resume after the last batch seen.
    Broken(String),
}

/// A source of the registry's changes. [`EtcdRegistry`] is one; the API takes any, so its
/// tests can feed it at a chosen rate.
#[async_trait]
pub trait ChangeFeed: Send + Sync {
    /// The registry's current revision.
    async fn current_revision(&self) -> Result<i64>;
    /// Changes with a revision above `after`, in revision order, into a channel of `capacity`
    /// items (the feed waits while it is full). The feed ends when the receiver is dropped.
    async fn changes_after(&self, after: i64, capacity: usize) -> Result<mpsc::Receiver<FeedItem>>;
}

fn timed_out(op: &'static str, key: &str, after: std::time::Duration) -> RegistryError {
    RegistryError::Timeout {
        op,
        key: key.to_string(),
        after,
    }
}

fn failed(op: &'static str, key: &str, source: etcd_client::Error) -> RegistryError {
    RegistryError::Etcd {
        op,
        key: key.to_string(),
        source,
    }
}

#[async_trait]
impl ChangeFeed for EtcdRegistry {
    async fn current_revision(&self) -> Result<i64> {
        let mut kv = self.client().kv_client();
        let key = self.keys().leader();
        let op = "reading the current revision at";
        let resp = tokio::time::timeout(self.request_timeout(), kv.get(key.as_str(), None))
            .await
            .map_err(|_| timed_out(op, &key, self.request_timeout()))?
            .map_err(|e| failed(op, &key, e))?;
        Ok(resp.header().map(|h| h.revision()).unwrap_or(0))
    }

    async fn changes_after(&self, after: i64, capacity: usize) -> Result<mpsc::Receiver<FeedItem>> {
        let prefix = self.keys().prefix().to_string();
        let mut members_out = self.members_out();
        if let Some(r) = members_out.as_mut() {
            r.borrow_and_update();
        }
        let mut stream = self.watch_changes(&prefix, after).await?;
        let registry = self.clone();
        let (tx, rx) = mpsc::channel(capacity.max(1));
        tokio::spawn(async move {
            // the last revision delivered whole: where a moved watch goes on from
            let mut delivered = after;
            let end = loop {
                let member_out = async {
                    let changed = match members_out.as_mut() {
                        Some(r) => r.changed().await.is_ok(),
                        None => false,
                    };
                    if !changed {
                        // no monitor (or it ended): never
                        std::future::pending::<()>().await;
                    }
                };
                let msg = tokio::select! {
                    m = stream.message() => m,
                    () = member_out => {
                        // the watch may sit on the member taken out, which sends nothing
                        // more: go on from the same revision on the members left
                        info!("an etcd member was taken out; the event stream watches on the others");
                        match registry.watch_changes(&prefix, delivered).await {
                            Ok(s) => {
                                stream = s;
                                continue;
                            }
                            Err(e) => break FeedItem::Broken(e.to_string()),
                        }
                    }
                    _ = tx.closed() => return,
                };
                let resp = match msg {
                    Ok(Some(r)) => r,
                    Ok(None) => break FeedItem::Broken("watch stream ended".into()),
                    Err(e) => break FeedItem::Broken(e.to_string()),
                };
                if resp.compact_revision() > 0 {
                    break FeedItem::Compacted {
                        compact_revision: resp.compact_revision(),
                    };
                }
                if resp.canceled() {
                    break FeedItem::Broken(format!("watch canceled: {}", resp.cancel_reason()));
                }
                for batch in group(&prefix, resp.events()) {
                    let revision = batch.revision;
                    if tx.send(FeedItem::Batch(batch)).await.is_err() {
                        return;
                    }
                    delivered = delivered.max(revision);
                }
            };
            debug!(?end, "registry change feed ended");
            let _ = tx.send(end).await;
        });
        Ok(rx)
    }
}

impl EtcdRegistry {
    /// A watch of everything under `prefix` after revision `after`, with previous values.
    async fn watch_changes(&self, prefix: &str, after: i64) -> Result<etcd_client::WatchStream> {
        let opts = WatchOptions::new()
            .with_prefix()
            .with_prev_key()
            .with_start_revision(after.saturating_add(1));
        let mut wc = self
            .client()
            .watch_client()
            .max_decoding_message_size(crate::watch::MAX_DECODED_BYTES);
        tokio::time::timeout(self.request_timeout(), wc.watch(prefix, Some(opts)))
            .await
            .map_err(|_| timed_out("watching", prefix, self.request_timeout()))?
            .map_err(|e| failed("watching", prefix, e))
    }
}

/// What a follower of the registry's events asks for (`fleetctl events`, `--watch`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EventQuery {
    /// Events after this revision; `None`: from now on.
    pub since: Option<i64>,
    /// Unit events of units matching this glob only.
    pub unit: Option<String>,
    /// Events about machines whose ID starts with this only.
    pub machine: Option<String>,
}

/// One message of an event stream: an event, a resume point, or both.
#[derive(Debug, Clone, PartialEq)]
pub struct EventMessage {
    /// The event as the API sends it (`type` says which, with `hello` first and `cut-off`
    /// when the follower fell behind); `None` for a message that only moves the resume point
    /// (the keepalive of a filtered stream).
    pub event: Option<Value>,
    /// The SSE `id:`, on the last event of each revision only: a follower that has it has
    /// every event up to that revision, and resumes from the last one it got.
    pub id: Option<i64>,
}

/// Why an event stream ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StreamEnd {
    /// The connection or the watch broke: reopen from the last resume point.
    Broken(String),
    /// The history to resume from is gone (etcd compacted it): reopening cannot help.
    Gone(String),
}

impl std::fmt::Display for StreamEnd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StreamEnd::Broken(m) | StreamEnd::Gone(m) => f.write_str(m),
        }
    }
}

/// One item of a followed event stream, or why it ended.
pub type EventItem = std::result::Result<EventMessage, StreamEnd>;

impl Described {
    /// Whether a follower with this unit glob and machine ID prefix wants the event.
    pub fn wanted(&self, unit: Option<&fleet_unit::Glob>, machine: Option<&str>) -> bool {
        if let Some(g) = unit
            && !self.unit.as_deref().is_some_and(|u| g.matches(u))
        {
            return false;
        }
        if let Some(m) = machine
            && !self.machine.as_deref().is_some_and(|id| id.starts_with(m))
        {
            return false;
        }
        true
    }
}

impl EtcdRegistry {
    /// [`crate::Registry::events`] straight from etcd: the same events the API streams.
    pub(crate) async fn follow_events(&self, q: &EventQuery) -> Result<mpsc::Receiver<EventItem>> {
        let glob = match q.unit.as_deref().filter(|u| !u.is_empty()) {
            Some(p) => Some(fleet_unit::Glob::new(p).ok_or_else(|| {
                RegistryError::Remote(format!("invalid unit pattern {p:?}").into())
            })?),
            None => None,
        };
        let machine = q.machine.clone().filter(|m| !m.is_empty());
        let from = match q.since {
            Some(s) => s,
            None => self.current_revision().await?,
        };
        let mut feed = self.changes_after(from, 256).await?;
        let (tx, rx) = mpsc::channel(256);
        tokio::spawn(async move {
            let hello = EventMessage {
                event: Some(json!({"type": "hello", "revision": from})),
                id: Some(from),
            };
            if tx.send(Ok(hello)).await.is_err() {
                return;
            }
            let end = loop {
                let item = tokio::select! {
                    i = feed.recv() => i,
                    _ = tx.closed() => return,
                };
                match item {
                    Some(FeedItem::Batch(b)) => {
                        let wanted: Vec<Value> = b
                            .changes
                            .iter()
                            .filter_map(describe)
                            .filter(|ev| ev.wanted(glob.as_ref(), machine.as_deref()))
                            .map(|ev| ev.to_json(b.revision))
                            .collect();
                        let count = wanted.len();
                        for (i, ev) in wanted.into_iter().enumerate() {
                            // the resume point moves once the whole revision is delivered
                            let id = (i + 1 == count).then_some(b.revision);
                            let msg = EventMessage {
                                event: Some(ev),
                                id,
                            };
                            if tx.send(Ok(msg)).await.is_err() {
                                return;
                            }
                        }
                    }
                    Some(FeedItem::Compacted { compact_revision }) => {
                        break StreamEnd::Gone(format!(
                            "revision {from} is too old to resume from (etcd keeps revisions after {compact_revision} only); list again and follow without --since"
                        ));
                    }
                    Some(FeedItem::Broken(reason)) => {
                        break StreamEnd::Broken(format!("watching etcd: {reason}"));
                    }
                    None => break StreamEnd::Broken("watching etcd: the watch ended".to_string()),
                }
            };
            let _ = tx.send(Err(end)).await;
        });
        Ok(rx)
    }
}

/// Groups one watch response's events by revision, keys made relative to `prefix`.
fn group(prefix: &str, events: &[etcd_client::Event]) -> Vec<ChangeBatch> {
    let mut batches: Vec<ChangeBatch> = Vec::new();
    for ev in events {
        let Some(kv) = ev.kv() else { continue };
        let key = String::from_utf8_lossy(kv.key());
        let Some(key) = key.strip_prefix(prefix) else {
            continue;
        };
        let change = Change {
            key: key.to_string(),
            value: match ev.event_type() {
                EventType::Put => Some(kv.value().to_vec()),
                EventType::Delete => None,
            },
            prev: ev.prev_kv().map(|p| p.value().to_vec()),
        };
        let revision = kv.mod_revision();
        match batches.last_mut() {
            Some(b) if b.revision == revision => b.changes.push(change),
            _ => batches.push(ChangeBatch {
                revision,
                changes: vec![change],
            }),
        }
    }
    batches
}

/// What one change means to users: an event of the stream.
#[derive(Debug, Clone, PartialEq)]
pub struct Described {
    /// `unit-created`, `unit-state`, `machine-joined`, ...
    pub kind: &'static str,
    pub unit: Option<String>,
    pub machine: Option<String>,
    /// The kind's own fields (`desiredState`, `activeState`, ...).
    pub fields: Map<String, Value>,
}

impl Described {
    /// The event as the stream sends it: `revision`, `type`, `unit`, `machine`, then its
    /// fields.
    pub fn to_json(&self, revision: i64) -> Value {
        let mut obj = Map::new();
        obj.insert("revision".into(), revision.into());
        obj.insert("type".into(), self.kind.into());
        if let Some(u) = &self.unit {
            obj.insert("unit".into(), u.clone().into());
        }
        if let Some(m) = &self.machine {
            obj.insert("machine".into(), m.clone().into());
        }
        obj.extend(self.fields.clone());
        Value::Object(obj)
    }
}

fn described(
    kind: &'static str,
    unit: Option<&str>,
    machine: Option<&str>,
    fields: Value,
) -> Option<Described> {
    let fields = match fields {
        Value::Object(m) => m,
        _ => Map::new(),
    };
    Some(Described {
        kind,
        unit: unit.map(str::to_string),
        machine: machine.map(str::to_string),
        fields,
    })
}

fn parse<T: serde::de::DeserializeOwned>(key: &str, value: &[u8]) -> Option<T> {
    match serde_json::from_slice(value) {
        Ok(v) => Some(v),
        Err(e) => {
            debug!(key, error = %e, "event stream: skipping a record that does not decode");
            None
        }
    }
}

/// The event `c` makes, if users care: bodies, schedule keys, the leader key and records
/// that do not decode make none.
pub fn describe(c: &Change) -> Option<Described> {
    let (kind, rest) = c.key.split_once('/')?;
    let text = |v: &[u8]| String::from_utf8_lossy(v).into_owned();
    match kind {
        "units" => match (&c.value, &c.prev) {
            (Some(v), prev) => {
                let rec: UnitRecord = parse(&c.key, v)?;
                let prev: Option<UnitRecord> = prev.as_deref().and_then(|p| parse(&c.key, p));
                match prev {
                    None => described(
                        "unit-created",
                        Some(rest),
                        None,
                        json!({"desiredState": rec.desired_state, "hash": rec.hash.to_string(), "global": rec.global}),
                    ),
                    Some(p) => described(
                        "unit-changed",
                        Some(rest),
                        None,
                        json!({
                            "desiredState": rec.desired_state,
                            "previousDesiredState": p.desired_state,
                            "hash": rec.hash.to_string(),
                            "previousHash": p.hash.to_string(),
                        }),
                    ),
                }
            }
            (None, _) => described("unit-destroyed", Some(rest), None, json!({})),
        },
        "placement" => match (&c.value, &c.prev) {
            // rewritten with each desired-state change: the same machine is no news
            (Some(v), Some(p)) if v == p => None,
            (Some(v), _) => described("unit-placed", Some(rest), Some(&text(v)), json!({})),
            (None, Some(p)) => described("unit-unplaced", Some(rest), Some(&text(p)), json!({})),
            (None, None) => described("unit-unplaced", Some(rest), None, json!({})),
        },
        "reasons" => {
            let v = c.value.as_deref()?;
            if c.prev.as_deref() == Some(v) {
                return None;
            }
            described(
                "unit-unplaceable",
                Some(rest),
                None,
                json!({"reason": text(v)}),
            )
        }
        "states" => {
            let (unit, machine) = rest.split_once('/')?;
            match &c.value {
                Some(v) => {
                    let s: StateRecord = parse(&c.key, v)?;
                    described(
                        "unit-state",
                        Some(unit),
                        Some(machine),
                        json!({
                            "loadState": s.load_state,
                            "activeState": s.active_state,
                            "subState": s.sub_state,
                            "currentState": s.agent_state,
                            "hash": s.hash,
                        }),
                    )
                }
                None => described("unit-state-removed", Some(unit), Some(machine), json!({})),
            }
        }
        "machines" => match &c.value {
            Some(v) => {
                let m: MachineRecord = parse(&c.key, v)?;
                let prev: Option<MachineRecord> = c.prev.as_deref().and_then(|p| parse(&c.key, p));
                let kind = match prev {
                    None => "machine-joined",
                    Some(p) if p.public_ip == m.public_ip && p.metadata == m.metadata => {
                        return None; // re-registered, nothing users see changed
                    }
                    Some(_) => "machine-changed",
                };
                described(
                    kind,
                    None,
                    Some(rest),
                    json!({"primaryIP": m.public_ip, "metadata": m.metadata}),
                )
            }
            None => described("machine-left", None, Some(rest), json!({})),
        },
        "metadata" => {
            let (machine, key) = rest.split_once('/')?;
            let value = c.value.as_deref().map(text);
            let mut fields = BTreeMap::new();
            fields.insert("key", Value::from(key));
            fields.insert("value", value.map(Value::from).unwrap_or(Value::Null));
            described(
                "machine-metadata",
                None,
                Some(machine),
                serde_json::to_value(fields).unwrap_or_default(),
            )
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn put(key: &str, value: &str, prev: Option<&str>) -> Change {
        Change {
            key: key.into(),
            value: Some(value.as_bytes().to_vec()),
            prev: prev.map(|p| p.as_bytes().to_vec()),
        }
    }

    fn del(key: &str, prev: Option<&str>) -> Change {
        Change {
            key: key.into(),
            value: None,
            prev: prev.map(|p| p.as_bytes().to_vec()),
        }
    }

    const UNIT: &str = r#"{"version":1,"name":"a.service","hash":"0123456789abcdef0123456789abcdef01234567","desiredState":"loaded"}"#;
    const UNIT2: &str = r#"{"version":1,"name":"a.service","hash":"0123456789abcdef0123456789abcdef01234567","desiredState":"launched"}"#;
    const STATE: &str = r#"{"version":1,"name":"a.service","machineId":"m1","hash":"h","loadState":"loaded","activeState":"active","subState":"running","agentState":"launched"}"#;
    const MACHINE: &str = r#"{"version":1,"id":"m1","publicIp":"10.0.0.1","metadata":{"r":"x"}}"#;

    fn check(change: Change, expected: Option<(&str, Option<&str>, Option<&str>, Value)>) {
        let got = describe(&change).map(|d| (d.kind, d.unit, d.machine, Value::Object(d.fields)));
        let expected =
            expected.map(|(k, u, m, f)| (k, u.map(str::to_string), m.map(str::to_string), f));
        assert_eq!(got, expected, "{change:?}");
    }

    #[test]
    fn changes_become_events() {
        check(
            put("units/a.service", UNIT, None),
            Some((
                "unit-created",
                Some("a.service"),
                None,
                json!({"desiredState": "loaded", "hash": "0123456789abcdef0123456789abcdef01234567", "global": false}),
            )),
        );
        check(
            put("units/a.service", UNIT2, Some(UNIT)),
            Some((
                "unit-changed",
                Some("a.service"),
                None,
                json!({"desiredState": "launched", "previousDesiredState": "loaded",
                       "hash": "0123456789abcdef0123456789abcdef01234567",
                       "previousHash": "0123456789abcdef0123456789abcdef01234567"}),
            )),
        );
        check(
            del("units/a.service", Some(UNIT)),
            Some(("unit-destroyed", Some("a.service"), None, json!({}))),
        );
        check(
            put("placement/a.service", "m1", None),
            Some(("unit-placed", Some("a.service"), Some("m1"), json!({}))),
        );
        check(
            del("placement/a.service", Some("m1")),
            Some(("unit-unplaced", Some("a.service"), Some("m1"), json!({}))),
        );
        check(
            put("reasons/a.service", "no machine", None),
            Some((
                "unit-unplaceable",
                Some("a.service"),
                None,
                json!({"reason": "no machine"}),
            )),
        );
        check(del("reasons/a.service", Some("no machine")), None);
        check(
            put("reasons/a.service", "no machine", Some("no machine")),
            None,
        );
        check(put("placement/a.service", "m1", Some("m1")), None);
        check(
            put("placement/a.service", "m2", Some("m1")),
            Some(("unit-placed", Some("a.service"), Some("m2"), json!({}))),
        );
        check(
            put("states/a.service/m1", STATE, None),
            Some((
                "unit-state",
                Some("a.service"),
                Some("m1"),
                json!({"loadState": "loaded", "activeState": "active", "subState": "running",
                       "currentState": "launched", "hash": "h"}),
            )),
        );
        check(
            del("states/a.service/m1", None),
            Some((
                "unit-state-removed",
                Some("a.service"),
                Some("m1"),
                json!({}),
            )),
        );
        check(
            put("machines/m1", MACHINE, None),
            Some((
                "machine-joined",
                None,
                Some("m1"),
                json!({"primaryIP": "10.0.0.1", "metadata": {"r": "x"}}),
            )),
        );
        check(put("machines/m1", MACHINE, Some(MACHINE)), None);
        check(
            del("machines/m1", Some(MACHINE)),
            Some(("machine-left", None, Some("m1"), json!({}))),
        );
        check(
            put("metadata/m1/region", "eu", None),
            Some((
                "machine-metadata",
                None,
                Some("m1"),
                json!({"key": "region", "value": "eu"}),
            )),
        );
        check(
            del("metadata/m1/region", Some("eu")),
            Some((
                "machine-metadata",
                None,
                Some("m1"),
                json!({"key": "region", "value": null}),
            )),
        );
        // internal keys and bad records are left out, never a panic
        check(put("bodies/abc", "[Unit]", None), None);
        check(put("schedule/m1/a.service", "{}", None), None);
        check(put("leader", "m1", None), None);
        check(put("units/a.service", "not json", None), None);
        check(put("states/a.service", STATE, None), None);
    }
}
