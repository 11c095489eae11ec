//! The registry's changes after a revision, in order and grouped by revision: what the API's
//! event stream (`GET /fleet/v1/events`) is made of.
//!
//! One etcd watch over the whole prefix, with previous values, so that a consumer can tell a
//! creation from a change, and with the revision of every change, so that a client can resume.
//! When etcd has compacted the history a watch asks for, the feed says so instead of skipping
//! events silently.

use async_trait::async_trait;
use etcd_client::{EventType, WatchOptions};
use tokio::sync::mpsc;
use tracing::debug;

use crate::{EtcdRegistry, RegistryError, Result};

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

#[async_trait]
impl ChangeFeed for EtcdRegistry {
    async fn current_revision(&self) -> Result<i64> {
        let mut kv = self.client().kv_client();
        let key = self.keys().leader();
        let resp = tokio::time::timeout(self.request_timeout(), kv.get(key, None))
            .await
            .map_err(|_| RegistryError::Timeout(self.request_timeout()))??;
        Ok(resp.header().map(|h| h.revision()).unwrap_or(0))
    }

    async fn changes_after(&self, after: i64, capacity: usize) -> Result<mpsc::Receiver<FeedItem>> {
        let prefix = self.keys().prefix().to_string();
        let opts = WatchOptions::new()
            .with_prefix()
            .with_prev_key()
            .with_start_revision(after.saturating_add(1));
        let mut wc = self.client().watch_client();
        let mut stream = tokio::time::timeout(
            self.request_timeout(),
            wc.watch(prefix.as_str(), Some(opts)),
        )
        .await
        .map_err(|_| RegistryError::Timeout(self.request_timeout()))??;
        let (tx, rx) = mpsc::channel(capacity.max(1));
        tokio::spawn(async move {
            let end = loop {
                let msg = tokio::select! {
                    m = stream.message() => m,
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
                    if tx.send(FeedItem::Batch(batch)).await.is_err() {
                        return;
                    }
                }
            };
            debug!(?end, "registry change feed ended");
            let _ = tx.send(end).await;
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
