//! The event stream, `GET /fleet/v1/events`: the registry's changes as Server-Sent Events,
//! each with the etcd revision it came from, resumable with `?since=<revision>` (or the
//! `Last-Event-ID` header that `EventSource` sends when it reconnects).
//!
//! One [`Hub`] per server watches etcd once (started by the first subscriber), turns each
//! revision's changes into events, renders them once and keeps the last ones in a ring that
//! is bounded in revisions and bytes: that ring is what a client can resume from. Live
//! batches go to subscribers through one bounded broadcast channel, so fleetd's memory does
//! not grow with the number of subscribers or with how slowly they read: a subscriber that
//! falls more than `event_backlog` revisions behind is cut off with a message saying where
//! to resume from.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use fleet_registry::changes::describe;
use fleet_registry::{ChangeBatch, ChangeFeed, FeedItem};
use fleet_unit::Glob;
use http_body_util::StreamBody;
use hyper::body::Frame;
use serde_json::json;
use tokio::sync::{OwnedSemaphorePermit, broadcast, mpsc, watch};
use tracing::{debug, warn};

/// The source of the event stream, as [`crate::ApiConfig`] holds it.
#[derive(Clone)]
pub struct EventFeed(pub Arc<dyn ChangeFeed>);

impl std::fmt::Debug for EventFeed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("EventFeed")
    }
}

/// How much the hub keeps, and how far a subscriber may fall behind.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Limits {
    /// Revisions kept for resuming.
    pub history: usize,
    /// Bytes of rendered events kept for resuming.
    pub history_bytes: usize,
    /// Revisions a subscriber may be behind before it is cut off.
    pub backlog: usize,
    /// A comment line is sent this often, so that idle streams show they are alive.
    pub heartbeat: Duration,
}

/// One event, rendered as an SSE message without its `id:` line, with what filters look at.
#[derive(Debug)]
pub(crate) struct Rendered {
    unit: Option<String>,
    machine: Option<String>,
    text: Bytes,
}

/// Every event of one revision.
#[derive(Debug)]
pub(crate) struct Batch {
    revision: i64,
    events: Vec<Rendered>,
    /// All events' text, for subscribers without a filter; the last one carries the `id:`,
    /// so that a client that loses the connection mid-revision resumes before it.
    all: Bytes,
    /// Set on the message that ends every stream when the hub lost events (its watch's
    /// history was compacted away while etcd was unreachable).
    reset: Option<Bytes>,
}

impl Batch {
    fn size(&self) -> usize {
        self.all.len() + self.events.iter().map(|e| e.text.len() + 64).sum::<usize>() + 64
    }
}

/// Which events a subscriber wants.
#[derive(Debug, Default)]
pub(crate) struct Filter {
    /// Unit events whose unit name matches (machine events are left out).
    pub unit: Option<Glob>,
    /// Events about machines whose ID starts with this (unit events placed or reported there).
    pub machine: Option<String>,
}

impl Filter {
    fn is_empty(&self) -> bool {
        self.unit.is_none() && self.machine.is_none()
    }

    fn keeps(&self, e: &Rendered) -> bool {
        if let Some(g) = &self.unit
            && !e.unit.as_deref().is_some_and(|u| g.matches(u))
        {
            return false;
        }
        if let Some(m) = &self.machine
            && !e
                .machine
                .as_deref()
                .is_some_and(|id| id.starts_with(m.as_str()))
        {
            return false;
        }
        true
    }
}

struct State {
    /// Every batch with a revision above `floor` is in `ring` (or had no events).
    floor: i64,
    /// The newest revision seen.
    last: i64,
    /// In revision order: subscribers replaying find their place by binary search.
    ring: VecDeque<Arc<Batch>>,
    ring_bytes: usize,
    tx: broadcast::Sender<Arc<Batch>>,
    /// How many times the history was lost, and the message that said so last: a subscriber
    /// still replaying learns of it here rather than from the broadcast.
    resets: u64,
    reset_msg: Option<Bytes>,
}

/// Why a subscription was refused.
#[derive(Debug)]
pub(crate) enum SubscribeError {
    /// `since` is older than anything this server can replay.
    Gone { since: i64, oldest: i64 },
    /// The hub could not start (etcd unreachable).
    Unavailable(String),
}

/// The server's one watch of the registry and its recent history; see the module docs.
pub(crate) struct Hub {
    feed: Arc<dyn ChangeFeed>,
    limits: Limits,
    state: Arc<Mutex<State>>,
    started: tokio::sync::OnceCell<()>,
    shutdown: watch::Receiver<bool>,
}

/// What the hub's own etcd watch may queue before etcd waits for it.
const FEED_CAPACITY: usize = 256;

impl Hub {
    pub(crate) fn new(
        feed: Arc<dyn ChangeFeed>,
        limits: Limits,
        shutdown: watch::Receiver<bool>,
    ) -> Hub {
        let (tx, _) = broadcast::channel(limits.backlog.max(1));
        Hub {
            feed,
            limits,
            state: Arc::new(Mutex::new(State {
                floor: 0,
                last: 0,
                ring: VecDeque::new(),
                ring_bytes: 0,
                tx,
                resets: 0,
                reset_msg: None,
            })),
            started: tokio::sync::OnceCell::new(),
            shutdown,
        }
    }

    /// Starts watching etcd, once: from now, or from `since` when the first subscriber
    /// resumes from a revision not older than `history` revisions (etcd still has them, unless
    /// compacted), so that a client resuming on a restarted fleetd loses nothing.
    async fn start(&self, since: Option<i64>) -> Result<(), SubscribeError> {
        self.started
            .get_or_try_init(|| async {
                let unavailable =
                    |e: fleet_registry::RegistryError| SubscribeError::Unavailable(e.to_string());
                let current = self.feed.current_revision().await.map_err(unavailable)?;
                let reach = i64::try_from(self.limits.history).unwrap_or(i64::MAX);
                let rev = match since {
                    Some(s) if s < current && current.saturating_sub(s) <= reach => s,
                    _ => current,
                };
                let rx = self
                    .feed
                    .changes_after(rev, FEED_CAPACITY)
                    .await
                    .map_err(unavailable)?;
                {
                    let mut st = lock(&self.state);
                    st.floor = rev;
                    st.last = rev;
                }
                tokio::spawn(run(
                    self.feed.clone(),
                    self.limits,
                    self.state.clone(),
                    rx,
                    self.shutdown.clone(),
                ));
                Ok(())
            })
            .await
            .map(|_| ())
    }

    /// A stream of the events after `since` (or from now on), as SSE text.
    pub(crate) async fn subscribe(
        &self,
        since: Option<i64>,
        filter: Filter,
        slot: Option<OwnedSemaphorePermit>,
    ) -> Result<Subscription, SubscribeError> {
        self.start(since).await?;
        let st = lock(&self.state);
        let from = since.unwrap_or(st.last);
        if from < st.floor {
            return Err(SubscribeError::Gone {
                since: from,
                oldest: st.floor,
            });
        }
        // the replay is a place in the shared ring, not a copy of it: a subscriber costs the
        // same however much history it replays
        let rx = st.tx.subscribe();
        let resets = st.resets;
        drop(st);
        let hello = format!(
            "retry: 1000\nid: {from}\ndata: {}\n\n",
            json!({"type": "hello", "revision": from})
        );
        let start = tokio::time::Instant::now() + self.limits.heartbeat;
        Ok(Subscription {
            hello: Some(Bytes::from(hello)),
            replaying: true,
            resets,
            rx,
            last_sent: from,
            filter,
            backlog: self.limits.backlog,
            heartbeat: tokio::time::interval_at(start, self.limits.heartbeat),
            shutdown: self.shutdown.clone(),
            done: false,
            state: self.state.clone(),
            _slot: slot,
        })
    }
}

fn lock(m: &Mutex<State>) -> std::sync::MutexGuard<'_, State> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The hub's loop: feed batches in; resume after a broken watch; start over (cutting every
/// subscriber off) when the history needed to resume is gone.
async fn run(
    feed: Arc<dyn ChangeFeed>,
    limits: Limits,
    state: Arc<Mutex<State>>,
    mut rx: mpsc::Receiver<FeedItem>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut delay = Duration::from_millis(200);
    loop {
        let item = tokio::select! {
            i = rx.recv() => i,
            _ = shutdown.changed() => return,
        };
        let resume_after = match item {
            Some(FeedItem::Batch(b)) => {
                delay = Duration::from_millis(200);
                publish(&state, &limits, render(&b));
                continue;
            }
            Some(FeedItem::Compacted { compact_revision }) => {
                warn!(
                    compact_revision,
                    "event stream: etcd compacted the history it needed; subscribers must list again"
                );
                None
            }
            Some(FeedItem::Broken(reason)) => {
                debug!(%reason, "event stream: etcd watch broke; resuming");
                Some(lock(&state).last)
            }
            None => Some(lock(&state).last),
        };
        // wait before watching again, every time: a watch that opens and breaks at once (etcd
        // answering, then failing every watch) must not spin; the delay grows until a batch
        // arrives
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = shutdown.changed() => return,
        }
        delay = (delay * 2).min(Duration::from_secs(5));
        // resume after the last revision seen, or start over at the current one
        loop {
            let attempt = match resume_after {
                Some(last) => feed.changes_after(last, FEED_CAPACITY).await,
                None => match feed.current_revision().await {
                    Ok(rev) => {
                        reset(&state, rev);
                        feed.changes_after(rev, FEED_CAPACITY).await
                    }
                    Err(e) => Err(e),
                },
            };
            match attempt {
                Ok(new) => {
                    rx = new;
                    break;
                }
                Err(e) => {
                    debug!(error = %e, "event stream: cannot watch etcd; retrying");
                    tokio::select! {
                        _ = tokio::time::sleep(delay) => {}
                        _ = shutdown.changed() => return,
                    }
                    delay = (delay * 2).min(Duration::from_secs(5));
                }
            }
        }
    }
}

fn publish(state: &Mutex<State>, limits: &Limits, batch: Batch) {
    let mut st = lock(state);
    if batch.revision <= st.last {
        return; // seen before the watch was resumed
    }
    st.last = batch.revision;
    if batch.events.is_empty() {
        return;
    }
    let batch = Arc::new(batch);
    st.ring_bytes += batch.size();
    st.ring.push_back(batch.clone());
    while st.ring.len() > limits.history.max(1) || st.ring_bytes > limits.history_bytes {
        let Some(old) = st.ring.pop_front() else {
            break;
        };
        st.ring_bytes -= old.size();
        st.floor = old.revision;
    }
    // no subscribers is not an error
    let _ = st.tx.send(batch);
}

/// Forgets the history (events were lost) and ends every stream with a message.
fn reset(state: &Mutex<State>, revision: i64) {
    let mut st = lock(state);
    st.ring.clear();
    st.ring_bytes = 0;
    let lost_after = st.last;
    st.floor = revision;
    st.last = revision;
    let msg = Bytes::from(format!(
        "data: {}\n\n",
        json!({
            "type": "reset",
            "revision": revision,
            "message": format!("events after revision {lost_after} were lost while etcd was unreachable; list again and resume from revision {revision}"),
        })
    ));
    st.resets += 1;
    st.reset_msg = Some(msg.clone());
    let _ = st.tx.send(Arc::new(Batch {
        revision,
        events: Vec::new(),
        all: Bytes::new(),
        reset: Some(msg),
    }));
}

/// Where a replaying subscriber stands in the ring.
enum Replay {
    /// The next batch after its place.
    Next(Arc<Batch>),
    /// It has replayed all the ring holds: live batches from now on.
    Done,
    /// Batches it had not read left the ring (it read too slowly).
    Lost,
    /// The history was lost (see [`reset`]); the stream ends with this message.
    Reset(Bytes),
}

/// One subscriber's view: the hello message, the replay from the ring, then live batches.
pub(crate) struct Subscription {
    hello: Option<Bytes>,
    /// Still replaying the ring, from just after `last_sent`.
    replaying: bool,
    /// The hub's reset count when it subscribed.
    resets: u64,
    rx: broadcast::Receiver<Arc<Batch>>,
    last_sent: i64,
    filter: Filter,
    backlog: usize,
    heartbeat: tokio::time::Interval,
    shutdown: watch::Receiver<bool>,
    done: bool,
    /// The hub's state, to read its last revision for keepalives.
    state: Arc<Mutex<State>>,
    /// This stream's place in its listener's budget of event streams, freed when it ends.
    _slot: Option<OwnedSemaphorePermit>,
}

impl Subscription {
    /// The next piece of SSE text; `None` at the end of the stream.
    pub(crate) async fn next_chunk(&mut self) -> Option<Bytes> {
        if self.done {
            return None;
        }
        if let Some(h) = self.hello.take() {
            return Some(h);
        }
        while self.replaying {
            match self.replay_next() {
                Replay::Next(b) => {
                    if let Some(text) = self.take(&b) {
                        return Some(text);
                    }
                }
                Replay::Done => self.replaying = false,
                Replay::Lost => {
                    self.done = true;
                    return Some(self.cut_off());
                }
                Replay::Reset(msg) => {
                    self.done = true;
                    return Some(msg);
                }
            }
        }
        loop {
            tokio::select! {
                r = self.rx.recv() => match r {
                    Ok(b) => {
                        if let Some(msg) = &b.reset {
                            self.done = true;
                            return Some(msg.clone());
                        }
                        if let Some(text) = self.take(&b) {
                            return Some(text);
                        }
                    }
                    Err(broadcast::error::RecvError::Lagged(_)) => {
                        self.done = true;
                        return Some(self.cut_off());
                    }
                    Err(broadcast::error::RecvError::Closed) => return None,
                },
                _ = self.heartbeat.tick() => return Some(self.keepalive()),
                _ = self.shutdown.changed() => {
                    self.done = true;
                    return None;
                }
            }
        }
    }

    /// The batch after `last_sent` in the ring, found by binary search under the hub's lock.
    fn replay_next(&self) -> Replay {
        let st = lock(&self.state);
        if st.resets != self.resets {
            return match &st.reset_msg {
                Some(m) => Replay::Reset(m.clone()),
                None => Replay::Lost,
            };
        }
        if self.last_sent < st.floor {
            return Replay::Lost;
        }
        let next = st.ring.partition_point(|b| b.revision <= self.last_sent);
        match st.ring.get(next) {
            Some(b) => Replay::Next(b.clone()),
            None => Replay::Done,
        }
    }

    /// The message that ends the stream of a subscriber that fell behind.
    fn cut_off(&self) -> Bytes {
        let msg = json!({
            "type": "cut-off",
            "revision": self.last_sent,
            "message": format!(
                "client too slow: more than {} revisions behind; reconnect with since={} to resume",
                self.backlog, self.last_sent
            ),
        });
        Bytes::from(format!("data: {msg}\n\n"))
    }

    /// The keepalive comment, with the revision this subscriber has every event up to as its
    /// `id:`: a filtered stream may go long without an event of its own, and an `EventSource`
    /// keeps the last id it saw, so it resumes from there rather than from an old event.
    fn keepalive(&mut self) -> Bytes {
        {
            // under the lock the hub publishes under: with nothing queued for this subscriber,
            // it has seen every revision up to the hub's last
            let st = lock(&self.state);
            if self.rx.is_empty() {
                self.last_sent = self.last_sent.max(st.last);
            }
        }
        Bytes::from(format!(": keepalive\nid: {}\n\n", self.last_sent))
    }

    /// The text of `b` this subscriber wants, if any; marks `b` as delivered.
    fn take(&mut self, b: &Batch) -> Option<Bytes> {
        if b.revision <= self.last_sent {
            return None;
        }
        self.last_sent = b.revision;
        if self.filter.is_empty() {
            return Some(b.all.clone());
        }
        let kept: Vec<&Rendered> = b.events.iter().filter(|e| self.filter.keeps(e)).collect();
        (!kept.is_empty()).then(|| with_id(b.revision, kept.into_iter()))
    }

    /// The subscription as an HTTP body.
    pub(crate) fn into_body(
        self,
    ) -> StreamBody<impl futures_util::Stream<Item = Result<Frame<Bytes>, Infallible>> + Send> {
        StreamBody::new(futures_util::stream::unfold(self, |mut s| async move {
            let chunk = s.next_chunk().await?;
            Some((Ok(Frame::data(chunk)), s))
        }))
    }
}

/// The text of `events` of revision `revision`, the `id:` line on the last one only: an
/// `EventSource` (or fleetctl) that has the id has every event of the revision.
fn with_id<'a>(revision: i64, events: impl ExactSizeIterator<Item = &'a Rendered>) -> Bytes {
    let count = events.len();
    let mut out = Vec::new();
    for (i, e) in events.enumerate() {
        if i + 1 == count {
            out.extend_from_slice(format!("id: {revision}\n").as_bytes());
        }
        out.extend_from_slice(&e.text);
    }
    Bytes::from(out)
}

/// Renders one revision's changes: each change that means something to users becomes one
/// event; the others (bodies, schedule keys, the leader key, bad records) are left out.
pub(crate) fn render(batch: &ChangeBatch) -> Batch {
    let events: Vec<Rendered> = batch
        .changes
        .iter()
        .filter_map(describe)
        .map(|ev| {
            let text = format!("data: {}\n\n", ev.to_json(batch.revision));
            Rendered {
                unit: ev.unit,
                machine: ev.machine,
                text: Bytes::from(text),
            }
        })
        .collect();
    let all = with_id(batch.revision, events.iter());
    Batch {
        revision: batch.revision,
        events,
        all,
        reset: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// A feed whose every watch opens and breaks at once, counting the watches.
    struct Breaking {
        opened: AtomicUsize,
    }

    #[async_trait::async_trait]
    impl ChangeFeed for Breaking {
        async fn current_revision(&self) -> fleet_registry::Result<i64> {
            Ok(10)
        }

        async fn changes_after(
            &self,
            _after: i64,
            _capacity: usize,
        ) -> fleet_registry::Result<mpsc::Receiver<FeedItem>> {
            self.opened.fetch_add(1, Ordering::SeqCst);
            let (tx, rx) = mpsc::channel(1);
            let _ = tx.try_send(FeedItem::Broken("etcd went away".into()));
            Ok(rx)
        }
    }

    #[tokio::test]
    async fn a_watch_that_breaks_at_once_is_retried_with_a_delay() {
        let feed = Arc::new(Breaking {
            opened: AtomicUsize::new(0),
        });
        let (_stop, stopped) = watch::channel(false);
        let limits = Limits {
            history: 100,
            history_bytes: 1 << 20,
            backlog: 16,
            heartbeat: Duration::from_secs(15),
        };
        let hub = Hub::new(feed.clone(), limits, stopped);
        let _sub = hub
            .subscribe(None, Filter::default(), None)
            .await
            .map_err(|e| format!("{e:?}"))
            .expect("subscribe");
        tokio::time::sleep(Duration::from_secs(1)).await;
        // 200 ms, then 400 ms, then 800 ms between watches
        let opened = feed.opened.load(Ordering::SeqCst);
        assert!(opened <= 4, "{opened} watches in one second");
    }

    #[test]
    fn filters_pick_units_and_machines() {
        let ev = |unit: Option<&str>, machine: Option<&str>| Rendered {
            unit: unit.map(str::to_string),
            machine: machine.map(str::to_string),
            text: Bytes::new(),
        };
        let f = Filter {
            unit: Glob::new("web*.service"),
            machine: None,
        };
        assert!(f.keeps(&ev(Some("web1.service"), None)));
        assert!(!f.keeps(&ev(Some("db.service"), None)));
        assert!(!f.keeps(&ev(None, Some("m1"))));
        let f = Filter {
            unit: None,
            machine: Some("m1".into()),
        };
        assert!(f.keeps(&ev(Some("db.service"), Some("m1abc"))));
        assert!(f.keeps(&ev(None, Some("m1"))));
        assert!(!f.keeps(&ev(Some("db.service"), None)));
        assert!(!f.keeps(&ev(None, Some("m2"))));
    }
}
