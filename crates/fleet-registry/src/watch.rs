//! List-then-watch over a few key prefixes, with re-listing after any break.
//!
//! The consumer first gets a [`WatchEvent::Snapshot`] of every watched prefix at one revision,
//! then the changes after it. When the watch breaks (etcd unreachable, compaction) it gets
//! [`WatchEvent::Disconnected`] and, once etcd answers again, a fresh snapshot. It never gets
//! a made-up deletion: a consumer that keeps its last snapshot while disconnected keeps
//! running what it ran (fleet stopped units on etcd hiccups; we do not).
//!
//! A watch on a member cut off from the others (or frozen) gets no events and no error: when
//! the health monitor takes a member out of the balancer, every list-watch lists again (a
//! fresh snapshot, no disconnection) and watches on the members left.

use std::time::Duration;

use etcd_client::{Client, EventType, GetOptions, Txn, TxnOp, TxnOpResponse, WatchOptions};
use tokio::sync::{mpsc, watch as signal};
use tracing::{debug, info, warn};

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
    /// The events sent before this one are whole revisions: this follows the events of
    /// each of etcd's answers, and etcd never splits a revision's events across answers. A
    /// transaction's changes come as one event each, and a consumer may act between them;
    /// one that must act on whole revisions (the engine, on its own writes) waits for this.
    /// `revision` is that of the last event before it. It says nothing of other ranges:
    /// each range has a watcher of its own, and they run out of step (an answer of one may
    /// come before older changes of another).
    Through {
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

    /// Whether `key` lies in this range.
    pub fn contains(&self, key: &str) -> bool {
        match &self.end {
            None => key.starts_with(&self.start),
            Some(end) => key >= self.start.as_str() && key < end.as_str(),
        }
    }

    fn watch_options(&self) -> WatchOptions {
        match &self.end {
            None => WatchOptions::new().with_prefix(),
            Some(e) => WatchOptions::new().with_range(e.as_str()),
        }
    }
}

/// Bounded exponential back-off between failed attempts (a list that failed or timed out, a
/// watch that broke), so a slow or absent etcd is not read in full back to back. It starts
/// again from the shortest delay only once a list and its watch work (or, when polling, a
/// list).
#[derive(Debug)]
struct Backoff {
    next: Duration,
}

impl Backoff {
    const FIRST: Duration = Duration::from_millis(200);
    /// Short enough that an agent cut off from etcd learns within ~2 s of the heal that its
    /// units were moved and stops its copies (one small scoped list per attempt).
    const MAX: Duration = Duration::from_secs(2);

    fn new() -> Backoff {
        Backoff { next: Self::FIRST }
    }

    /// The delay before the next attempt; the one after it is twice as long, up to `MAX`.
    fn next_delay(&mut self) -> Duration {
        let delay = self.next;
        self.next = (delay * 2).min(Self::MAX);
        delay
    }

    fn reset(&mut self) {
        self.next = Self::FIRST;
    }

    /// Sleeps the next delay; false if the receiver went away meanwhile.
    async fn wait(&mut self, tx: &mpsc::Sender<WatchEvent>) -> bool {
        tokio::select! {
            _ = tokio::time::sleep(self.next_delay()) => true,
            _ = tx.closed() => false,
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
        ListWatch::spawn_restarting(client, prefixes, poll, timeout, None)
    }

    /// Like [`ListWatch::spawn`]; each change of `restart` (a member taken out of the
    /// balancer) makes the open watch end and the loop list and watch again.
    pub(crate) fn spawn_restarting(
        client: Client,
        prefixes: Vec<KeyRange>,
        poll: Option<Duration>,
        timeout: Duration,
        restart: Option<signal::Receiver<u64>>,
    ) -> mpsc::Receiver<WatchEvent> {
        let (tx, rx) = mpsc::channel(1024);
        tokio::spawn(run(client, prefixes, poll, timeout, tx, restart));
        rx
    }
}

async fn run(
    client: Client,
    prefixes: Vec<KeyRange>,
    poll: Option<Duration>,
    timeout: Duration,
    tx: mpsc::Sender<WatchEvent>,
    mut restart: Option<signal::Receiver<u64>>,
) {
    let mut backoff = Backoff::new();
    let mut connected = true;
    loop {
        let listed = list(&client, &prefixes, Paging::new(timeout)).await;
        let (revision, kvs) = match listed {
            Ok(v) => v,
            Err(e) => {
                debug!(error = %e, ?timeout, "list failed");
                if connected && tx.send(WatchEvent::Disconnected).await.is_err() {
                    return;
                }
                connected = false;
                // a timeout too: a slow etcd must not be read in full back to back
                if !backoff.wait(&tx).await {
                    return;
                }
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
            backoff.reset();
            tokio::select! {
                _ = tokio::time::sleep(interval) => continue,
                _ = tx.closed() => return,
            }
        }
        if let Some(r) = restart.as_mut() {
            // members taken out before this list do not concern the watch that follows it
            r.borrow_and_update();
        }
        let watched = watch(&client, &prefixes, revision + 1, &tx, &mut backoff);
        let member_out = async {
            let changed = match restart.as_mut() {
                Some(r) => r.changed().await.is_ok(),
                None => false,
            };
            if !changed {
                // no monitor (or it ended): never
                std::future::pending::<()>().await;
            }
        };
        let end = tokio::select! {
            end = watched => end,
            _ = member_out => WatchEnd::MemberOut,
        };
        match end {
            WatchEnd::ReceiverGone => return,
            WatchEnd::MemberOut => {
                // the watch may sit on that member, which sends nothing more: list again (a
                // fresh snapshot, no disconnection: nothing is known to be lost)
                info!("an etcd member was taken out; listing and watching again");
                // every list-watch of every fleetd learns of it at once: spread their
                // listings over a second rather than all landing on etcd together
                tokio::select! {
                    _ = tokio::time::sleep(relist_jitter()) => {}
                    _ = tx.closed() => return,
                }
            }
            WatchEnd::Broken(reason) => {
                warn!(%reason, "etcd watch broke; listing again");
                if tx.send(WatchEvent::Disconnected).await.is_err() {
                    return;
                }
                connected = false;
                // a watch that keeps breaking must not make us re-list at full speed
                if !backoff.wait(&tx).await {
                    return;
                }
            }
        }
    }
}

/// A random delay in [0, 1 s) before listing again after a member was taken out. Drawn from
/// std's per-process random hash keys (no random-number crate for one jitter).
fn relist_jitter() -> Duration {
    use std::hash::{BuildHasher, Hasher};
    let draw = std::collections::hash_map::RandomState::new()
        .build_hasher()
        .finish();
    Duration::from_millis(draw % 1000)
}

/// How many keys the first page of a listing holds. A page of unit records is ~200 KiB, well
/// under gRPC's 4 MiB default; the client's raised decode limit ([`MAX_DECODED_BYTES`]) is only
/// a backstop for pages of unusually large values.
pub(crate) const PAGE_KEYS: i64 = 1000;

/// How many bytes (keys and values) a later page of a listing aims at. A range read with a
/// limit costs etcd 3.4 a walk of its index over every key from the page's start to the end
/// of the range, not just the page (3.5 stops the walk at the limit), so a prefix of U keys
/// read in pages of P costs U²/2P: 100 pages of 1,000 made a listing of 100,000 units walk
/// 5 million index entries (9.7 s for the four prefixes of a unit listing). Later pages are
/// therefore sized from the first one's keys to about this many bytes, a quarter of gRPC's
/// default message limit, small enough to come back within fleet's 1 s request timeout on a
/// busy etcd: some 17 pages for 100,000 unit records.
pub(crate) const PAGE_BYTES: usize = 1024 * 1024;

/// The most keys a later page holds, however small its values.
pub(crate) const MAX_PAGE_KEYS: i64 = 50_000;

/// The most bytes one etcd response may decode to. Pages keep responses far below it; it is
/// there for what cannot be paged by count alone (a page or a body batch of large values).
pub(crate) const MAX_DECODED_BYTES: usize = 256 * 1024 * 1024;

/// How many times a listing starts over because its revision was compacted between pages
/// before it gives up (each start is a fresh revision, so this only trips when compaction
/// runs faster than one page).
const MAX_LIST_RESTARTS: usize = 8;

/// Why a listing failed.
#[derive(Debug)]
pub(crate) enum ListError {
    Etcd(etcd_client::Error),
    /// One page took longer than the timeout.
    Timeout,
}

impl std::fmt::Display for ListError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ListError::Etcd(e) => write!(f, "{e}"),
            ListError::Timeout => write!(f, "timed out"),
        }
    }
}

/// How a listing reads: a first page of `page` keys, later pages of about `bytes` bytes (at
/// least `page` keys, at most [`MAX_PAGE_KEYS`]; all of `page` keys when `bytes` is 0), each
/// request bounded by `timeout`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Paging {
    pub(crate) page: i64,
    pub(crate) bytes: usize,
    pub(crate) timeout: Duration,
}

impl Paging {
    pub(crate) fn new(timeout: Duration) -> Paging {
        Paging {
            page: PAGE_KEYS,
            bytes: PAGE_BYTES,
            timeout,
        }
    }

    /// How many keys the page after one of `keys` keys and `bytes` bytes reads.
    fn next_page(&self, keys: usize, bytes: usize) -> i64 {
        let page = self.page.max(1);
        if self.bytes == 0 || keys == 0 {
            return page;
        }
        let fit = self.bytes.saturating_mul(keys) / bytes.max(1);
        i64::try_from(fit)
            .unwrap_or(i64::MAX)
            .clamp(page, MAX_PAGE_KEYS.max(page))
    }
}

/// Whether etcd refused a read because its revision was compacted.
pub(crate) fn compacted(e: &etcd_client::Error) -> bool {
    match e {
        etcd_client::Error::GRpcStatus(s) => {
            s.code() == tonic::Code::OutOfRange && s.message().contains("compacted")
        }
        _ => false,
    }
}

/// The first key past every key starting with `prefix` (etcd's prefix range end); empty (the
/// whole key space onward) when no such key exists.
pub(crate) fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

/// The kv client every registry read uses: gRPC's 4 MiB decode limit raised as a backstop.
pub(crate) fn kv_client(client: &Client) -> etcd_client::KvClient {
    client
        .kv_client()
        .max_decoding_message_size(MAX_DECODED_BYTES)
}

/// What runs before each page after the first (tests change etcd there).
pub(crate) type BetweenPages<'a> = &'a mut (
            dyn FnMut(usize) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>
                + Send
        );

/// Reads every range at one revision, in pages: one consistent snapshot however large. See
/// [`list_paged`].
pub(crate) async fn list(
    client: &Client,
    ranges: &[KeyRange],
    paging: Paging,
) -> Result<(i64, Vec<(String, Vec<u8>)>), ListError> {
    list_paged(client, ranges, paging, &mut |_| Box::pin(async {})).await
}

/// Reads every range at one revision. The first request reads the first page of every range
/// in one transaction (most listings end there, in one round trip) and fixes the revision;
/// ranges with more keys go on page by page at that revision. When etcd compacted that
/// revision meanwhile, the listing starts over at a new one. `between_pages` runs before
/// every request after the first (tests use it to change etcd between pages).
pub(crate) async fn list_paged(
    client: &Client,
    ranges: &[KeyRange],
    paging: Paging,
    between_pages: BetweenPages<'_>,
) -> Result<(i64, Vec<(String, Vec<u8>)>), ListError> {
    let mut restarts = 0;
    loop {
        match list_once(client, ranges, paging, &mut *between_pages).await {
            Err(ListError::Etcd(e)) if compacted(&e) && restarts < MAX_LIST_RESTARTS => {
                restarts += 1;
                debug!(
                    restarts,
                    "listing's revision compacted between pages; listing again"
                );
            }
            other => return other,
        }
    }
}

async fn list_once(
    client: &Client,
    ranges: &[KeyRange],
    paging: Paging,
    between_pages: BetweenPages<'_>,
) -> Result<(i64, Vec<(String, Vec<u8>)>), ListError> {
    let mut kv = kv_client(client);
    let page = paging.page.max(1);
    let bounds: Vec<(Vec<u8>, Vec<u8>)> = ranges
        .iter()
        .map(|r| {
            let start = r.start.as_bytes().to_vec();
            let end = match &r.end {
                Some(e) => e.as_bytes().to_vec(),
                None => prefix_end(&start),
            };
            (start, end)
        })
        .collect();
    let ops: Vec<TxnOp> = bounds
        .iter()
        .map(|(start, end)| {
            let opts = GetOptions::new().with_range(end.clone()).with_limit(page);
            TxnOp::get(start.clone(), Some(opts))
        })
        .collect();
    let resp = tokio::time::timeout(paging.timeout, kv.txn(Txn::new().and_then(ops)))
        .await
        .map_err(|_| ListError::Timeout)?
        .map_err(ListError::Etcd)?;
    let revision = resp.header().map(|h| h.revision()).unwrap_or(0);
    // each range's pages in order; a range's pages follow one another, ranges stay in order
    let mut out: Vec<Vec<(String, Vec<u8>)>> = vec![Vec::new(); bounds.len()];
    let mut pending: Vec<(usize, Vec<u8>)> = Vec::new();
    for (i, op) in resp.op_responses().into_iter().enumerate() {
        if let TxnOpResponse::Get(get) = op
            && let Some(into) = out.get_mut(i)
            && let Some(next) = take_page(&get, into)
        {
            pending.push((i, next));
        }
    }
    let mut requests = 1;
    for (i, mut start) in pending {
        let (Some((_, end)), Some(into)) = (bounds.get(i), out.get_mut(i)) else {
            continue;
        };
        // later pages sized from what this range's first page held
        let bytes: usize = into.iter().map(|(k, v)| k.len() + v.len()).sum();
        let limit = paging.next_page(into.len(), bytes);
        loop {
            between_pages(requests).await;
            requests += 1;
            let opts = GetOptions::new()
                .with_range(end.clone())
                .with_limit(limit)
                .with_revision(revision);
            let get = tokio::time::timeout(paging.timeout, kv.get(start, Some(opts)))
                .await
                .map_err(|_| ListError::Timeout)?
                .map_err(ListError::Etcd)?;
            match take_page(&get, into) {
                Some(next) => start = next,
                None => break,
            }
        }
    }
    Ok((revision, out.into_iter().flatten().collect()))
}

/// Moves one page's keys into `into`; the key the next page starts at when there is more.
fn take_page(get: &etcd_client::GetResponse, into: &mut Vec<(String, Vec<u8>)>) -> Option<Vec<u8>> {
    for kv in get.kvs() {
        into.push((
            String::from_utf8_lossy(kv.key()).into_owned(),
            kv.value().to_vec(),
        ));
    }
    let last = get.kvs().last()?;
    get.more().then(|| {
        // the smallest key after the last one read
        let mut next = last.key().to_vec();
        next.push(0);
        next
    })
}

enum WatchEnd {
    ReceiverGone,
    Broken(String),
    /// The health monitor took a member out of the balancer.
    MemberOut,
}

async fn watch(
    client: &Client,
    ranges: &[KeyRange],
    start: i64,
    tx: &mpsc::Sender<WatchEvent>,
    backoff: &mut Backoff,
) -> WatchEnd {
    let Some((first, rest)) = ranges.split_first() else {
        // nothing to watch: wait until the receiver goes away
        tx.closed().await;
        return WatchEnd::ReceiverGone;
    };
    let mut wc = client
        .watch_client()
        .max_decoding_message_size(MAX_DECODED_BYTES);
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
            backoff.reset();
        }
        if resp.canceled() {
            return WatchEnd::Broken(format!(
                "watch canceled (compacted at {}): {}",
                resp.compact_revision(),
                resp.cancel_reason()
            ));
        }
        let mut through = None;
        for ev in resp.events() {
            let Some(kv) = ev.kv() else { continue };
            let key = String::from_utf8_lossy(kv.key()).into_owned();
            let revision = kv.mod_revision();
            through = Some(revision);
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
        if let Some(revision) = through
            && tx.send(WatchEvent::Through { revision }).await.is_err()
        {
            return WatchEnd::ReceiverGone;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};
    use tokio::io::AsyncReadExt;
    use tokio::time::Instant;

    /// The relists after a member removal are spread over a second, not all at once.
    #[test]
    fn relists_after_a_member_removal_are_spread_over_a_second() {
        let draws: Vec<Duration> = (0..50).map(|_| relist_jitter()).collect();
        assert!(
            draws.iter().all(|d| *d < Duration::from_secs(1)),
            "{draws:?}"
        );
        let distinct: std::collections::HashSet<_> = draws.iter().collect();
        assert!(distinct.len() > 10, "{draws:?}");
    }

    #[test]
    fn backoff_doubles_up_to_two_seconds_and_resets() {
        let mut b = Backoff::new();
        let ms = |b: &mut Backoff| b.next_delay().as_millis();
        let delays: Vec<u128> = (0..8).map(|_| ms(&mut b)).collect();
        assert_eq!(delays, [200, 400, 800, 1600, 2000, 2000, 2000, 2000]);
        b.reset();
        assert_eq!(ms(&mut b), 200);
    }

    async fn next(rx: &mut mpsc::Receiver<WatchEvent>) -> WatchEvent {
        tokio::time::timeout(Duration::from_secs(10), rx.recv())
            .await
            .expect("an event in time")
            .expect("the watch goes on")
    }

    /// etcd answers a watch from a compacted revision (a watch resumed after a break, with
    /// compactions meanwhile) by cancelling it: that ends the watch as broken, saying so, and
    /// the loop lists again instead of waiting for events that will never come.
    #[tokio::test]
    async fn a_watch_from_a_compacted_revision_ends_as_broken() {
        let etcd = fleet_testutil::EtcdServer::start();
        let client = Client::connect([etcd.endpoint()], None)
            .await
            .expect("client");
        let mut kv = client.kv_client();
        let mut last = 0;
        for i in 0..5 {
            let put = kv.put("/x/a", format!("{i}"), None).await.expect("put");
            last = put.header().map(|h| h.revision()).unwrap_or_default();
        }
        client
            .kv_client()
            .compact(last, None)
            .await
            .expect("compact");
        let (tx, _rx) = mpsc::channel(16);
        let ranges = [KeyRange::prefix("/x/")];
        let end = tokio::time::timeout(
            Duration::from_secs(10),
            watch(&client, &ranges, 2, &tx, &mut Backoff::new()),
        )
        .await
        .expect("the watch ends");
        match end {
            WatchEnd::Broken(reason) => {
                assert!(reason.contains(&format!("compacted at {last}")), "{reason}")
            }
            _ => panic!("the watch did not end as broken"),
        }
        // and a list-watch from now on starts from a fresh snapshot and follows
        let mut rx = ListWatch::spawn(
            client.clone(),
            ranges.to_vec(),
            None,
            Duration::from_secs(5),
        );
        match next(&mut rx).await {
            WatchEvent::Snapshot { revision, kvs } => {
                assert_eq!(revision, last);
                assert_eq!(kvs, vec![("/x/a".to_string(), b"4".to_vec())]);
            }
            other => panic!("expected a snapshot, got {other:?}"),
        }
        kv.put("/x/b", "1", None).await.expect("put");
        assert!(matches!(next(&mut rx).await, WatchEvent::Put { key, .. } if key == "/x/b"));
    }

    /// A member taken out of the balancer (cut off, frozen) may hold the open watch, which
    /// then sees nothing: the signal makes the loop list again (a fresh snapshot, no
    /// disconnection) and follow from there.
    #[tokio::test]
    async fn a_member_taken_out_makes_the_watch_list_again() {
        let etcd = fleet_testutil::EtcdServer::start();
        let client = Client::connect([etcd.endpoint()], None)
            .await
            .expect("client");
        let (out, out_rx) = signal::channel(0u64);
        let mut rx = ListWatch::spawn_restarting(
            client.clone(),
            vec![KeyRange::prefix("/x/")],
            None,
            Duration::from_secs(5),
            Some(out_rx),
        );
        assert!(matches!(next(&mut rx).await, WatchEvent::Snapshot { .. }));
        out.send_modify(|n| *n += 1);
        match next(&mut rx).await {
            WatchEvent::Snapshot { kvs, .. } => assert!(kvs.is_empty()),
            other => panic!("expected a fresh snapshot, got {other:?}"),
        }
        client
            .kv_client()
            .put("/x/a", "1", None)
            .await
            .expect("put");
        assert!(matches!(next(&mut rx).await, WatchEvent::Put { key, .. } if key == "/x/a"));
    }

    /// Accepts connections on `listener` and never answers; records when each HTTP/2 HEADERS
    /// frame (the start of a request) arrives.
    async fn black_hole(listener: tokio::net::TcpListener, requests: Arc<Mutex<Vec<Instant>>>) {
        while let Ok((mut conn, _)) = listener.accept().await {
            let requests = requests.clone();
            tokio::spawn(async move {
                let mut preface = [0u8; 24];
                if conn.read_exact(&mut preface).await.is_err() {
                    return;
                }
                let mut header = [0u8; 9];
                while conn.read_exact(&mut header).await.is_ok() {
                    let len = u32::from_be_bytes([0, header[0], header[1], header[2]]);
                    if header[3] == 0x1 {
                        requests
                            .lock()
                            .unwrap_or_else(std::sync::PoisonError::into_inner)
                            .push(Instant::now());
                    }
                    let mut payload = vec![0u8; len as usize];
                    if conn.read_exact(&mut payload).await.is_err() {
                        return;
                    }
                }
            });
        }
    }

    /// An etcd that never answers: every list times out. Before, the next list followed at
    /// once (four lists within about 3 timeouts); now 200 ms, 400 ms, 800 ms pass between them.
    #[tokio::test]
    async fn lists_that_time_out_are_retried_with_backoff() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("address");
        let requests = Arc::new(Mutex::new(Vec::new()));
        tokio::spawn(black_hole(listener, requests.clone()));
        let client = Client::connect([format!("http://{addr}")], None)
            .await
            .expect("client");
        let timeout = Duration::from_millis(100);
        let mut rx = ListWatch::spawn(client, vec![KeyRange::prefix("/x/")], None, timeout);
        assert_eq!(rx.recv().await, Some(WatchEvent::Disconnected));
        let deadline = Instant::now() + Duration::from_secs(30);
        let starts = loop {
            let starts = requests
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .clone();
            if starts.len() >= 4 {
                break starts;
            }
            assert!(
                Instant::now() < deadline,
                "only {} lists in 30 s",
                starts.len()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        // Three timeouts and three delays (1.4 s) lie between the first and the fourth list;
        // a little is allowed for the first request reaching the server late.
        let spent = starts[3] - starts[0];
        assert!(
            spent >= Duration::from_millis(1500),
            "four lists within {spent:?}: no back-off after a timeout"
        );
        drop(rx);
    }

    async fn etcd_with(keys: &[(String, String)]) -> (fleet_testutil::EtcdServer, Client) {
        let etcd = fleet_testutil::EtcdServer::start();
        let client = Client::connect([etcd.endpoint()], None)
            .await
            .expect("client");
        let mut kv = client.kv_client();
        for (k, v) in keys {
            kv.put(k.as_str(), v.as_str(), None).await.expect("put");
        }
        (etcd, client)
    }

    fn paging(page: i64) -> Paging {
        Paging {
            page,
            bytes: 0,
            timeout: Duration::from_secs(5),
        }
    }

    fn text(kvs: &[(String, Vec<u8>)]) -> Vec<(String, String)> {
        kvs.iter()
            .map(|(k, v)| (k.clone(), String::from_utf8_lossy(v).into_owned()))
            .collect()
    }

    /// Ten keys under a/ and three under b/, read in pages of three: every key once, in
    /// order, ranges in the order asked, keys outside the ranges left out.
    #[tokio::test]
    async fn pages_read_every_key_once() {
        let mut keys: Vec<(String, String)> = (0..10)
            .map(|i| (format!("/p/a/{i}"), format!("v{i}")))
            .collect();
        keys.extend((0..3).map(|i| (format!("/p/b/{i}"), format!("w{i}"))));
        keys.push(("/p/c".into(), "out".into()));
        let (_etcd, client) = etcd_with(&keys).await;
        let ranges = [
            KeyRange::prefix("/p/a/"),
            KeyRange::between("/p/b/", "/p/b0"),
        ];
        let mut pages = 0;
        let (_, kvs) = list_paged(&client, &ranges, paging(3), &mut |_| {
            pages += 1;
            Box::pin(async {})
        })
        .await
        .expect("list");
        keys.pop();
        assert_eq!(text(&kvs), keys);
        // a/ in four pages, b/ in one (read with a/'s first, in the first request)
        assert_eq!(pages, 3);
    }

    /// Later pages are sized by bytes from the first page: small values are read in a few
    /// large pages (a page walks etcd 3.4's index to the end of its range, so many pages cost
    /// a walk each), large values in pages that stay near the byte target.
    #[tokio::test]
    async fn later_pages_are_sized_by_bytes() {
        let mut keys: Vec<(String, String)> = (0..3000)
            .map(|i| (format!("/p/a/{i:05}"), "v".repeat(20)))
            .collect();
        keys.extend((0..40).map(|i| (format!("/p/b/{i:02}"), "w".repeat(50_000))));
        let (_etcd, client) = etcd_with(&keys).await;
        let bytes = 500_000;
        let count = |range: KeyRange| {
            let client = client.clone();
            async move {
                let mut pages = 0;
                let paging = Paging {
                    page: 4,
                    bytes,
                    timeout: Duration::from_secs(5),
                };
                let (_, kvs) = list_paged(&client, &[range], paging, &mut |_| {
                    pages += 1;
                    Box::pin(async {})
                })
                .await
                .expect("list");
                (pages + 1, kvs)
            }
        };
        let (pages, kvs) = count(KeyRange::prefix("/p/a/")).await;
        assert_eq!(text(&kvs), keys[..3000].to_vec());
        // a first page of 4 keys, then pages of ~16,000 keys (30 bytes each): one more
        assert_eq!(pages, 2, "small values: pages of about {bytes} bytes");
        let (pages, kvs) = count(KeyRange::prefix("/p/b/")).await;
        assert_eq!(text(&kvs), keys[3000..].to_vec());
        // 4 keys, then pages of 9 keys (~450 KB): 36 keys in 4 pages
        assert_eq!(pages, 5, "large values: pages stay near {bytes} bytes");
    }

    /// A write between two pages is not seen: the pages are one snapshot at the first
    /// page's revision.
    #[tokio::test]
    async fn pages_form_one_snapshot() {
        let keys: Vec<(String, String)> = (0..6)
            .map(|i| (format!("/p/a/{i}"), "old".into()))
            .collect();
        let (_etcd, client) = etcd_with(&keys).await;
        let before = client.kv_client().get("/p", None).await.expect("get");
        let revision = before.header().map(|h| h.revision()).unwrap_or(0);
        let writer = client.clone();
        let (rev, kvs) = list_paged(
            &client,
            &[KeyRange::prefix("/p/a/")],
            paging(2),
            &mut move |n| {
                let writer = writer.clone();
                Box::pin(async move {
                    if n == 1 {
                        let mut kv = writer.kv_client();
                        kv.put("/p/a/5", "new", None).await.expect("put");
                        kv.put("/p/a/55", "new", None).await.expect("put");
                        kv.delete("/p/a/4", None).await.expect("delete");
                    }
                })
            },
        )
        .await
        .expect("list");
        assert_eq!(rev, revision);
        assert_eq!(text(&kvs), keys);
    }

    /// The first page's revision is compacted before the second page: the listing starts
    /// over and returns one snapshot at a newer revision.
    #[tokio::test]
    async fn compaction_between_pages_lists_again() {
        let keys: Vec<(String, String)> = (0..6)
            .map(|i| (format!("/p/a/{i}"), "old".into()))
            .collect();
        let (_etcd, client) = etcd_with(&keys).await;
        let writer = client.clone();
        let mut compacted = false;
        let (rev, kvs) = list_paged(
            &client,
            &[KeyRange::prefix("/p/a/")],
            paging(2),
            &mut move |_| {
                let writer = writer.clone();
                let first = !compacted;
                compacted = true;
                Box::pin(async move {
                    if first {
                        let mut kv = writer.kv_client();
                        let put = kv.put("/p/a/6", "new", None).await.expect("put");
                        let now = put.header().map(|h| h.revision()).unwrap_or(0);
                        kv.compact(now, None).await.expect("compact");
                    }
                })
            },
        )
        .await
        .expect("list");
        let mut expected = keys;
        expected.push(("/p/a/6".into(), "new".into()));
        assert_eq!(text(&kvs), expected);
        let now = client.kv_client().get("/p", None).await.expect("get");
        assert_eq!(Some(rev), now.header().map(|h| h.revision()));
    }

    #[test]
    fn prefix_ends() {
        assert_eq!(prefix_end(b"/a/"), b"/a0".to_vec());
        assert_eq!(prefix_end(b"a\xff"), b"b".to_vec());
        assert_eq!(prefix_end(b"\xff\xff"), vec![0]);
    }
}
