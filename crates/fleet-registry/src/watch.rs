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

/// Spawns list-watch loops; see the module docs.
pub struct ListWatch;

impl ListWatch {
    /// Watches `prefixes`. With `poll = Some(interval)` (fleet's `disable_watches`), re-lists
    /// every interval instead of watching. The task ends when the receiver is dropped.
    pub fn spawn(
        client: Client,
        prefixes: Vec<String>,
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
    prefixes: Vec<String>,
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
        backoff = Duration::from_millis(200);
        if tx
            .send(WatchEvent::Snapshot { revision, kvs })
            .await
            .is_err()
        {
            return;
        }
        if let Some(interval) = poll {
            tokio::select! {
                _ = tokio::time::sleep(interval) => continue,
                _ = tx.closed() => return,
            }
        }
        match watch(&client, &prefixes, revision + 1, &tx).await {
            WatchEnd::ReceiverGone => return,
            WatchEnd::Broken(reason) => {
                warn!(%reason, "etcd watch broke; listing again");
                if tx.send(WatchEvent::Disconnected).await.is_err() {
                    return;
                }
                connected = false;
                tokio::time::sleep(backoff).await;
            }
        }
    }
}

/// Reads all prefixes in one transaction, so they share one revision.
pub(crate) async fn list(
    client: &Client,
    prefixes: &[String],
) -> Result<(i64, Vec<(String, Vec<u8>)>), etcd_client::Error> {
    let ops: Vec<TxnOp> = prefixes
        .iter()
        .map(|p| TxnOp::get(p.as_str(), Some(GetOptions::new().with_prefix())))
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
    prefixes: &[String],
    start: i64,
    tx: &mpsc::Sender<WatchEvent>,
) -> WatchEnd {
    let mut wc = client.watch_client();
    let first = &prefixes[0];
    let opts = |_: &str| WatchOptions::new().with_prefix().with_start_revision(start);
    let mut stream = match wc.watch(first.as_str(), Some(opts(first))).await {
        Ok(s) => s,
        Err(e) => return WatchEnd::Broken(e.to_string()),
    };
    for p in &prefixes[1..] {
        if let Err(e) = stream.watch(p.as_str(), Some(opts(p))).await {
            return WatchEnd::Broken(e.to_string());
        }
    }
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
