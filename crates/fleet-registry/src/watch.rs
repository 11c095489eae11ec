//! List-then-watch over a few key prefixes, with re-listing after any break.
//!
//! The consumer first gets a [`WatchEvent::Snapshot`] of every watched prefix at one revision,
//! then the changes after it. When the watch breaks (etcd unreachable, compaction) it gets
//! [`WatchEvent::Disconnected`] and, once etcd answers again, a fresh snapshot. It never gets
//! a made-up deletion: a consumer that keeps its last snapshot while disconnected keeps
//! running what it ran (fleet stopped units on etcd hiccups; we do not).

use std::time::Duration;

use etcd_client::{Client, EventType, GetOptions, Txn, TxnOp, TxnOpResponse, WatchOptions};
use tokio::sync::mpsc;
use tracing::{debug, warn};

#[derive(Debug, Clone, PartialEq)]
pub enum WatchEvent {
    /// Everything under the watched prefixes at `revision`.
    Snapshot {
        revision: i64,
        kvs: Vec<(String, Vec<u8>)>,
    },
    Put {
        key: String,
        value: Vec<u8>,
        revision: i64,
    },
    Delete {
        key: String,
        revision: i64,
    },
    /// The watch broke; a Snapshot follows when etcd answers again.
    Disconnected,
}

/// A range of keys: everything under a prefix, or `[start, end)`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyRange {
    pub start: String,
    /// `None`: every key starting with `start`.
    pub end: Option<String>,
}

impl KeyRange {
    pub fn prefix(p: impl Into<String>) -> KeyRange {
        KeyRange {
            start: p.into(),
            end: None,
        }
    }

    /// `[start, end)`. One watcher over one range delivers all events of one revision in one
    /// message, which several prefix watchers would split.
    pub fn between(start: impl Into<String>, end: impl Into<String>) -> KeyRange {
        KeyRange {
            start: start.into(),
            end: Some(end.into()),
        }
    }

    fn get_options(&self) -> GetOptions {
        match &self.end {
            None => GetOptions::new().with_prefix(),
            Some(e) => GetOptions::new().with_range(e.as_str()),
        }
    }

    fn watch_options(&self) -> WatchOptions {
        match &self.end {
            None => WatchOptions::new().with_prefix(),
            Some(e) => WatchOptions::new().with_range(e.as_str()),
        }
    }
}

/// Spawns list-watch loops; see the module docs.
pub struct ListWatch;

impl ListWatch {
    /// Watches `ranges`. With `poll = Some(interval)` (fleet's `disable_watches`), re-lists
    /// every interval instead of watching. The task ends when the receiver is dropped.
    pub fn spawn(
        client: Client,
        prefixes: Vec<KeyRange>,
        poll: Option<Duration>,
        timeout: Duration,
    ) -> mpsc::Receiver<WatchEvent> {
        let (tx, rx) = mpsc::channel(1024);
        tokio::spawn(run(client, prefixes, poll, timeout, tx));
        rx
    }
}

async fn run(
    client: Client,
    prefixes: Vec<KeyRange>,
    poll: Option<Duration>,
    timeout: Duration,
    tx: mpsc::Sender<WatchEvent>,
) {
    let mut backoff = Duration::from_millis(200);
    let mut connected = true;
    loop {
        let listed = tokio::time::timeout(timeout, list(&client, &prefixes)).await;
        let (revision, kvs) = match listed {
            Ok(Ok(v)) => v,
            Ok(Err(e)) => {
                debug!(error = %e, "list failed");
                if connected && tx.send(WatchEvent::Disconnected).await.is_err() {
                    return;
                }
                connected = false;
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
                continue;
            }
            Err(_) => {
                if connected && tx.send(WatchEvent::Disconnected).await.is_err() {
                    return;
                }
                connected = false;
                continue;
            }
        };
        connected = true;
        if tx
            .send(WatchEvent::Snapshot { revision, kvs })
            .await
            .is_err()
        {
            return;
        }
        if let Some(interval) = poll {
            backoff = Duration::from_millis(200);
            tokio::select! {
                _ = tokio::time::sleep(interval) => continue,
                _ = tx.closed() => return,
            }
        }
        match watch(&client, &prefixes, revision + 1, &tx, &mut backoff).await {
            WatchEnd::ReceiverGone => return,
            WatchEnd::Broken(reason) => {
                warn!(%reason, "etcd watch broke; listing again");
                if tx.send(WatchEvent::Disconnected).await.is_err() {
                    return;
                }
                connected = false;
                tokio::time::sleep(backoff).await;
                // a watch that keeps breaking must not make us re-list at full speed
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        }
    }
}

/// Reads all prefixes in one transaction, so they share one revision.
pub(crate) async fn list(
    client: &Client,
    prefixes: &[KeyRange],
) -> Result<(i64, Vec<(String, Vec<u8>)>), etcd_client::Error> {
    let ops: Vec<TxnOp> = prefixes
        .iter()
        .map(|r| TxnOp::get(r.start.as_str(), Some(r.get_options())))
        .collect();
    let resp = client.kv_client().txn(Txn::new().and_then(ops)).await?;
    let revision = resp.header().map(|h| h.revision()).unwrap_or(0);
    let mut kvs = Vec::new();
    for op in resp.op_responses() {
        if let TxnOpResponse::Get(get) = op {
            for kv in get.kvs() {
                kvs.push((
                    String::from_utf8_lossy(kv.key()).into_owned(),
                    kv.value().to_vec(),
                ));
            }
        }
    }
    Ok((revision, kvs))
}

enum WatchEnd {
    ReceiverGone,
    Broken(String),
}

async fn watch(
    client: &Client,
    ranges: &[KeyRange],
    start: i64,
    tx: &mpsc::Sender<WatchEvent>,
    backoff: &mut Duration,
) -> WatchEnd {
    let Some((first, rest)) = ranges.split_first() else {
        // nothing to watch: wait until the receiver goes away
        tx.closed().await;
        return WatchEnd::ReceiverGone;
    };
    let mut wc = client.watch_client();
    let opts = |r: &KeyRange| r.watch_options().with_start_revision(start);
    let mut stream = match wc.watch(first.start.as_str(), Some(opts(first))).await {
        Ok(s) => s,
        Err(e) => return WatchEnd::Broken(e.to_string()),
    };
    for r in rest {
        if let Err(e) = stream.watch(r.start.as_str(), Some(opts(r))).await {
            return WatchEnd::Broken(e.to_string());
        }
    }
    let mut working = false;
    loop {
        let msg = tokio::select! {
            m = stream.message() => m,
            _ = tx.closed() => return WatchEnd::ReceiverGone,
        };
        let resp = match msg {
            Ok(Some(r)) => r,
            Ok(None) => return WatchEnd::Broken("watch stream ended".into()),
            Err(e) => return WatchEnd::Broken(e.to_string()),
        };
        if !working {
            // the watch answered: breaks from now on start again from a short backoff
            working = true;
            *backoff = Duration::from_millis(200);
        }
        if resp.canceled() {
            return WatchEnd::Broken(format!(
                "watch canceled (compacted at {}): {}",
                resp.compact_revision(),
                resp.cancel_reason()
            ));
        }
        for ev in resp.events() {
            let Some(kv) = ev.kv() else { continue };
            let key = String::from_utf8_lossy(kv.key()).into_owned();
            let revision = kv.mod_revision();
            let event = match ev.event_type() {
                EventType::Put => WatchEvent::Put {
                    key,
                    value: kv.value().to_vec(),
                    revision,
                },
                EventType::Delete => WatchEvent::Delete { key, revision },
            };
            if tx.send(event).await.is_err() {
                return WatchEnd::ReceiverGone;
            }
        }
    }
}
