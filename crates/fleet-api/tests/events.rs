//! The event stream (`GET /fleet/v1/events`) through the real server: resuming after a
//! disconnect loses nothing, a history too old answers 410, a slow reader is cut off, and
//! 100 subscribers at 1,000 events/s stay within a stated memory bound.

mod common;

use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use common::Harness;
use fleet_api::{ApiConfig, EventFeed};
use fleet_registry::{
    Change, ChangeBatch, ChangeFeed, FeedItem, Registry, RegistryError, Result as RegResult,
};
use fleet_testutil::Fixture;
use fleet_unit::{TargetState, UnitFile, UnitName};
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::sync::mpsc;

/// One SSE message.
#[derive(Debug, Clone, PartialEq)]
struct Msg {
    id: Option<i64>,
    /// The `data:` line, parsed on demand (the 100 subscribers read 500,000 messages).
    raw: String,
}

impl Msg {
    fn data(&self) -> Value {
        serde_json::from_str(&self.raw).expect("json data")
    }

    fn kind(&self) -> String {
        self.data()["type"].as_str().unwrap_or("").to_string()
    }

    fn is_cut_off(&self) -> bool {
        self.raw.contains(r#""type":"cut-off""#)
    }
}

/// A raw HTTP/1.1 SSE client: chunked decoding and message framing, nothing more.
struct Sse {
    reader: BufReader<TcpStream>,
    pending: Vec<u8>,
    /// The `id:` of every message without data (keepalives) read so far.
    keepalive_ids: Vec<i64>,
}

enum Opened {
    Stream(Sse),
    Refused(u16, String),
}

impl Sse {
    async fn open(addr: std::net::SocketAddr, query: &str) -> Opened {
        Sse::open_with(addr, query, "").await
    }

    /// [`Sse::open`] with extra header lines (each ending in `\r\n`).
    async fn open_with(addr: std::net::SocketAddr, query: &str, headers: &str) -> Opened {
        let mut s = TcpStream::connect(addr).await.expect("connect");
        let req = format!("GET /fleet/v1/events{query} HTTP/1.1\r\nHost: test\r\n{headers}\r\n");
        s.write_all(req.as_bytes()).await.expect("write request");
        let mut reader = BufReader::new(s);
        let mut status = String::new();
        reader.read_line(&mut status).await.expect("status line");
        let code: u16 = status
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .expect("status code");
        let mut length = 0usize;
        let mut chunked = false;
        let mut retry_after = None;
        loop {
            let mut line = String::new();
            reader.read_line(&mut line).await.expect("header");
            let line = line.trim_end().to_ascii_lowercase();
            if line.is_empty() {
                break;
            }
            if let Some(v) = line.strip_prefix("content-length:") {
                length = v.trim().parse().expect("length");
            }
            if line == "transfer-encoding: chunked" {
                chunked = true;
            }
            if let Some(v) = line.strip_prefix("retry-after:") {
                retry_after = Some(v.trim().to_string());
            }
        }
        if code != 200 {
            let mut body = vec![0; length];
            reader.read_exact(&mut body).await.expect("body");
            let mut body = String::from_utf8_lossy(&body).into_owned();
            if let Some(r) = retry_after {
                body = format!("retry-after {r}: {body}");
            }
            return Opened::Refused(code, body);
        }
        assert!(chunked, "an event stream is chunked");
        Opened::Stream(Sse {
            reader,
            pending: Vec::new(),
            keepalive_ids: Vec::new(),
        })
    }

    async fn stream(addr: std::net::SocketAddr, query: &str) -> Sse {
        match Sse::open(addr, query).await {
            Opened::Stream(s) => s,
            Opened::Refused(code, body) => panic!("events{query}: {code} {body}"),
        }
    }

    /// The next message (comments skipped); `None` at the end of the stream.
    async fn next(&mut self) -> Option<Msg> {
        loop {
            if let Some(pos) = self.pending.windows(2).position(|w| w == b"\n\n") {
                let raw: Vec<u8> = self.pending.drain(..pos + 2).collect();
                let text = String::from_utf8(raw).expect("utf-8");
                let mut id = None;
                let mut data = None;
                for line in text.lines() {
                    if let Some(v) = line.strip_prefix("id: ") {
                        id = Some(v.parse().expect("numeric id"));
                    } else if let Some(v) = line.strip_prefix("data: ") {
                        data = Some(v.to_string());
                    }
                }
                match data {
                    Some(raw) => return Some(Msg { id, raw }),
                    None => {
                        // a comment (keepalive)
                        self.keepalive_ids.extend(id);
                        continue;
                    }
                }
            }
            let mut size = String::new();
            if self.reader.read_line(&mut size).await.ok()? == 0 {
                return None;
            }
            let size = usize::from_str_radix(size.trim(), 16).expect("chunk size");
            if size == 0 {
                return None;
            }
            let mut chunk = vec![0; size + 2];
            self.reader.read_exact(&mut chunk).await.ok()?;
            chunk.truncate(size);
            self.pending.extend_from_slice(&chunk);
        }
    }

    /// Messages up to and including the first that `stop` accepts.
    async fn until(&mut self, mut stop: impl FnMut(&Msg) -> bool) -> Vec<Msg> {
        let mut out = Vec::new();
        loop {
            let m = tokio::time::timeout(Duration::from_secs(20), self.next())
                .await
                .expect("an event within 20 s")
                .expect("the stream goes on");
            let done = stop(&m);
            out.push(m);
            if done {
                return out;
            }
        }
    }
}

fn is(kind: &'static str, unit: &'static str) -> impl FnMut(&Msg) -> bool {
    move |m| m.kind() == kind && m.data()["unit"] == unit
}

fn unit_file() -> UnitFile {
    UnitFile::parse("[Service]\nExecStart=/bin/sleep 1000\n").expect("unit file")
}

fn name(n: &str) -> UnitName {
    UnitName::parse(n).expect("unit name")
}

#[tokio::test]
async fn resuming_after_a_disconnect_loses_no_event() {
    let fixture = Fixture::start().await;
    let reg = fixture.registry.clone();
    let config = ApiConfig {
        events: Some(EventFeed(Arc::new(reg.clone()))),
        ..Default::default()
    };
    let h = Harness::with_registry(Arc::new(reg.clone()), config).await;
    // a witness that stays connected throughout
    let mut witness = Sse::stream(h.addr, "").await;
    let hello = witness.next().await.expect("hello");
    assert_eq!(hello.kind(), "hello");
    let from = hello.id.expect("hello has a revision");

    let mut client = Sse::stream(h.addr, &format!("?since={from}")).await;
    assert_eq!(client.next().await.map(|m| m.id), Some(Some(from)));
    for i in 0..5 {
        reg.create_unit(
            &name(&format!("u{i}.service")),
            &unit_file(),
            TargetState::Loaded,
        )
        .await
        .expect("create");
    }
    let mut seen = client.until(is("unit-created", "u4.service")).await;
    let last = seen.last().and_then(|m| m.id).expect("events have ids");
    drop(client);

    // while it is away
    for i in 0..5 {
        reg.set_desired_state(&name(&format!("u{i}.service")), TargetState::Launched)
            .await
            .expect("set state");
    }
    reg.destroy_unit(&name("u2.service"))
        .await
        .expect("destroy");

    let mut client = Sse::stream(h.addr, &format!("?since={last}")).await;
    let hello = client.next().await.expect("hello");
    assert_eq!((hello.kind().as_str(), hello.id), ("hello", Some(last)));
    seen.extend(client.until(is("unit-destroyed", "u2.service")).await);

    let all = witness.until(is("unit-destroyed", "u2.service")).await;
    assert_eq!(
        seen, all,
        "the resumed stream differs from the uninterrupted one"
    );
    let kinds: Vec<String> = all.iter().map(Msg::kind).collect();
    assert_eq!(kinds.iter().filter(|k| *k == "unit-created").count(), 5);
    assert_eq!(kinds.iter().filter(|k| *k == "unit-changed").count(), 5);
    assert_eq!(kinds.last().map(String::as_str), Some("unit-destroyed"));

    // a server started later (a restarted fleetd) resumes from etcd's history
    let config = ApiConfig {
        events: Some(EventFeed(Arc::new(reg.clone()))),
        ..Default::default()
    };
    let restarted = Harness::with_registry(Arc::new(reg.clone()), config).await;
    let mut client = Sse::stream(restarted.addr, &format!("?since={from}")).await;
    client.next().await.expect("hello");
    let again = client.until(is("unit-destroyed", "u2.service")).await;
    assert_eq!(again, all, "resuming on another server");

    // EventSource's reconnection header works as `since`
    let mut s = TcpStream::connect(h.addr).await.expect("connect");
    let req = format!(
        "GET /fleet/v1/events?unit=u2.* HTTP/1.1\r\nHost: t\r\nLast-Event-ID: {from}\r\n\r\n"
    );
    s.write_all(req.as_bytes()).await.expect("write");
    let mut client = Sse {
        reader: BufReader::new(s),
        pending: Vec::new(),
        keepalive_ids: Vec::new(),
    };
    // skip the headers
    loop {
        let mut line = String::new();
        client.reader.read_line(&mut line).await.expect("header");
        if line == "\r\n" {
            break;
        }
    }
    let msgs = client.until(is("unit-destroyed", "u2.service")).await;
    let units: Vec<Value> = msgs[1..].iter().map(|m| m.data()["unit"].clone()).collect();
    assert!(units.iter().all(|u| *u == "u2.service"), "{units:?}");
    assert_eq!(units.len(), 3, "created, changed, destroyed: {msgs:?}");
}

/// A feed the test drives: batches go in through `push`.
struct FakeFeed {
    rx: Mutex<Option<mpsc::Receiver<FeedItem>>>,
    started: AtomicBool,
    revision: AtomicI64,
}

impl FakeFeed {
    fn new() -> (Arc<FakeFeed>, mpsc::Sender<FeedItem>) {
        let (tx, rx) = mpsc::channel(64);
        let feed = Arc::new(FakeFeed {
            rx: Mutex::new(Some(rx)),
            started: AtomicBool::new(false),
            revision: AtomicI64::new(0),
        });
        (feed, tx)
    }
}

#[async_trait]
impl ChangeFeed for FakeFeed {
    async fn current_revision(&self) -> RegResult<i64> {
        Ok(self.revision.load(Ordering::SeqCst))
    }

    async fn changes_after(
        &self,
        _after: i64,
        _capacity: usize,
    ) -> RegResult<mpsc::Receiver<FeedItem>> {
        self.started.store(true, Ordering::SeqCst);
        self.rx
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take()
            .ok_or_else(|| RegistryError::Config("fake feed is used up".into()))
    }
}

/// A realistic change: a unit state record of about 250 bytes, or with `pad` a metadata
/// value of that many bytes.
fn batch(revision: i64, pad: usize) -> FeedItem {
    let change = if pad > 0 {
        Change {
            key: "metadata/m1/blob".into(),
            value: Some(vec![b'x'; pad]),
            prev: None,
        }
    } else {
        let unit = format!("unit{}.service", revision % 50);
        let state = serde_json::json!({
            "version": 1, "name": unit, "machineId": "2c4b0d1bd4cd4a8d90d4c4e0e4b0f2a1",
            "hash": "0123456789abcdef0123456789abcdef01234567", "loadState": "loaded",
            "activeState": "active", "subState": "running", "agentState": "launched",
        });
        Change {
            key: format!("states/{unit}/2c4b0d1bd4cd4a8d90d4c4e0e4b0f2a1"),
            value: Some(state.to_string().into_bytes()),
            prev: None,
        }
    };
    FeedItem::Batch(ChangeBatch {
        revision,
        changes: vec![change],
    })
}

async fn fake_server(config: ApiConfig) -> (Harness, mpsc::Sender<FeedItem>) {
    let (feed, tx) = FakeFeed::new();
    let registry: Arc<dyn Registry> = Arc::new(fleet_registry::MemoryRegistry::new());
    let config = ApiConfig {
        events: Some(EventFeed(feed)),
        ..config
    };
    (Harness::with_registry(registry, config).await, tx)
}

/// A server shutting down ends its streams at once: they do not hold it for the grace period.
#[tokio::test]
async fn streams_end_when_the_server_shuts_down() {
    let (h, _tx) = fake_server(ApiConfig {
        shutdown_grace: Duration::from_secs(60),
        ..Default::default()
    })
    .await;
    let mut s = Sse::stream(h.addr, "").await;
    s.next().await.expect("hello");
    let stopped = tokio::time::timeout(Duration::from_secs(10), h.stop()).await;
    assert!(matches!(stopped, Ok(Ok(()))), "{stopped:?}");
    let end = tokio::time::timeout(Duration::from_secs(10), s.next()).await;
    assert!(matches!(end, Ok(None)), "the stream goes on: {end:?}");
}

#[tokio::test]
async fn only_get_is_allowed() {
    let (h, _tx) = fake_server(ApiConfig::default()).await;
    for method in ["POST", "HEAD", "DELETE"] {
        let r = h.send(method, "/fleet/v1/events", None, "").await;
        assert_eq!(r.status, 405, "{method}");
    }
    // without a feed (fleetd's tests, fuzzing), the path does not exist
    let plain = Harness::with_registry(
        Arc::new(fleet_registry::MemoryRegistry::new()),
        ApiConfig::default(),
    )
    .await;
    let r = plain.get("/fleet/v1/events").await;
    assert_eq!(r.status, 404);
    // nor does the dashboard unless enabled
    assert_eq!(plain.get("/dashboard/").await.status, 404);
    let dash = Harness::with_registry(
        Arc::new(fleet_registry::MemoryRegistry::new()),
        ApiConfig {
            dashboard: true,
            ..Default::default()
        },
    )
    .await;
    let page = dash.get("/dashboard/").await;
    assert_eq!(page.status, 200);
    assert_eq!(
        page.header("server"),
        Some(concat!("fleetd/", env!("CARGO_PKG_VERSION")))
    );
}

#[tokio::test]
async fn a_revision_older_than_the_history_is_refused_with_410() {
    let (h, tx) = fake_server(ApiConfig {
        event_history: 3,
        ..Default::default()
    })
    .await;
    let mut s = Sse::stream(h.addr, "").await;
    assert_eq!(s.next().await.and_then(|m| m.id), Some(0));
    for rev in 1..=10 {
        tx.send(batch(rev, 0)).await.expect("feed");
    }
    s.until(|m| m.id == Some(10)).await;
    // revisions 8, 9, 10 are kept: 7 resumes, 6 does not
    match Sse::open(h.addr, "?since=7").await {
        Opened::Stream(mut s) => {
            let ids: Vec<Option<i64>> = s
                .until(|m| m.id == Some(10))
                .await
                .iter()
                .map(|m| m.id)
                .collect();
            assert_eq!(ids, [Some(7), Some(8), Some(9), Some(10)]);
        }
        Opened::Refused(code, body) => panic!("since=7: {code} {body}"),
    }
    for (query, code, message) in [
        (
            "?since=6",
            410,
            "revision 6 is too old to resume from (this server has events after revision 7 only); list units and machines again, then follow the stream without since",
        ),
        (
            "?since=abc",
            400,
            "invalid since \"abc\": expected a revision (a whole number)",
        ),
        (
            "?since=-1",
            400,
            "invalid since \"-1\": expected a revision (a whole number)",
        ),
        ("?unit=%5B", 400, "invalid unit pattern \"[\""),
    ] {
        match Sse::open(h.addr, query).await {
            Opened::Stream(_) => panic!("{query} answered a stream"),
            Opened::Refused(got, body) => {
                assert_eq!(got, code, "{query}: {body}");
                let v: Value = serde_json::from_str(&body).expect("json error");
                assert_eq!(v["error"]["message"], message, "{query}");
            }
        }
    }
}

/// Follows the stream from `since` to revision `last` as a well-behaved client does:
/// reconnecting where it was cut off. Returns every event ID received and the cut-offs.
/// With `ready`, says when it is connected.
async fn follow(
    addr: std::net::SocketAddr,
    since: i64,
    last: i64,
    ready: Option<mpsc::Sender<()>>,
) -> (Vec<i64>, usize) {
    let mut ids = Vec::with_capacity((last - since).max(0) as usize);
    let mut cutoffs = 0;
    let mut s = Sse::stream(addr, &format!("?since={since}")).await;
    s.next().await.expect("hello");
    if let Some(r) = ready {
        r.send(()).await.expect("ready");
    }
    loop {
        match s.next().await {
            Some(m) if m.is_cut_off() => {
                cutoffs += 1;
                let since = m.data()["revision"].as_i64().expect("revision");
                s = Sse::stream(addr, &format!("?since={since}")).await;
                s.next().await.expect("hello");
            }
            Some(m) => {
                let id = m.id.expect("id");
                ids.push(id);
                if id == last {
                    return (ids, cutoffs);
                }
            }
            None => panic!("the stream ended without a message"),
        }
    }
}

#[tokio::test]
async fn a_slow_reader_is_cut_off_and_can_resume() {
    let (h, tx) = fake_server(ApiConfig {
        event_backlog: 16,
        event_history_bytes: 64 * 1024 * 1024,
        ..Default::default()
    })
    .await;
    let mut slow = Sse::stream(h.addr, "").await;
    assert_eq!(
        slow.next().await.map(|m| m.kind()).as_deref(),
        Some("hello")
    );
    // 2,000 events of 4 KiB (8 MiB): more than the socket buffers hold, while `slow` reads
    // nothing
    let total = 2000;
    let producer = tokio::spawn(async move {
        for rev in 1..=total {
            if tx.send(batch(rev, 4096)).await.is_err() {
                return;
            }
        }
    });
    // another client, reading, sees them all
    let (ids, _) = follow(h.addr, 0, total, None).await;
    assert_eq!(ids, (1..=total).collect::<Vec<_>>());
    producer.await.expect("producer");

    let mut got = Vec::new();
    let last = loop {
        let m = tokio::time::timeout(Duration::from_secs(20), slow.next())
            .await
            .expect("a message within 20 s");
        match m {
            Some(m) if m.is_cut_off() => break m,
            Some(m) => got.push(m.id.expect("id")),
            None => panic!("the stream ended without saying why, after {}", got.len()),
        }
    };
    assert!(
        slow.next().await.is_none(),
        "the stream ends after the cut-off"
    );
    assert!((got.len() as i64) < total, "never fell behind");
    assert_eq!(got, (1..=got.len() as i64).collect::<Vec<_>>());
    let data = last.data();
    let resume = data["revision"].as_i64().expect("revision");
    assert_eq!(resume, got.len() as i64);
    assert_eq!(
        data["message"],
        format!(
            "client too slow: more than 16 revisions behind; reconnect with since={resume} to resume"
        )
    );
    // resuming where it was cut off delivers the rest
    let (rest, _) = follow(h.addr, resume, total, None).await;
    assert_eq!(rest, (resume + 1..=total).collect::<Vec<_>>());
}

/// Live heap bytes allocated by the server's threads (the clients' threads are counted
/// apart), and their peak: what the memory test reports. RSS would say little: glibc keeps
/// what many threads freed in per-thread arenas.
mod heap {
    #![allow(unsafe_code)] // GlobalAlloc is an unsafe trait; this only counts, then forwards

    use std::alloc::{GlobalAlloc, Layout, System};
    use std::cell::Cell;
    use std::sync::atomic::{AtomicIsize, Ordering};

    pub struct Counting;
    static LIVE: AtomicIsize = AtomicIsize::new(0);
    static PEAK: AtomicIsize = AtomicIsize::new(0);

    thread_local! {
        static CLIENT: Cell<bool> = const { Cell::new(false) };
    }

    /// Allocations of this thread are the clients', not counted.
    pub fn mark_client_thread() {
        CLIENT.with(|c| c.set(true));
    }

    fn counted() -> bool {
        !CLIENT.try_with(Cell::get).unwrap_or(true)
    }

    unsafe impl GlobalAlloc for Counting {
        unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
            // SAFETY: forwarded unchanged to the system allocator
            let p = unsafe { System.alloc(layout) };
            if !p.is_null() && counted() {
                let size = layout.size() as isize;
                let now = LIVE.fetch_add(size, Ordering::Relaxed) + size;
                PEAK.fetch_max(now, Ordering::Relaxed);
            }
            p
        }
        unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
            // SAFETY: forwarded unchanged to the system allocator
            unsafe { System.dealloc(ptr, layout) };
            if counted() {
                LIVE.fetch_sub(layout.size() as isize, Ordering::Relaxed);
            }
        }
    }

    pub fn live() -> isize {
        LIVE.load(Ordering::Relaxed)
    }

    /// Starts measuring the peak from now.
    pub fn reset_peak() {
        PEAK.store(live(), Ordering::Relaxed);
    }

    pub fn peak() -> isize {
        PEAK.load(Ordering::Relaxed)
    }
}

#[global_allocator]
static ALLOCATOR: heap::Counting = heap::Counting;

/// 100 subscribers follow 1,000 events/s for 5 s, each resuming when it is cut off, and each
/// receives every event once, in order. The bound stated in `Documentation/api-v1-events.md`
/// is what the server holds whatever its subscribers do: the history
/// (`event_history_bytes`, 8 MiB by default) plus, per subscriber, what hyper buffers for a
/// connection (about 400 KiB at most) and a few KiB of task and state. The clients run on
/// threads of their own, so that the heap the server's threads hold can be measured; the
/// figures are printed.
#[test]
fn a_hundred_subscribers_at_a_thousand_events_per_second_stay_bounded() {
    const SUBSCRIBERS: usize = 100;
    const TOTAL: i64 = 5000;
    let server = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("server runtime");
    let clients = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .on_thread_start(heap::mark_client_thread)
        .enable_all()
        .build()
        .expect("client runtime");
    let before = heap::live();
    let (h, tx) = server.block_on(fake_server(ApiConfig::default()));
    let addr = h.addr;
    let (ready, mut connected) = mpsc::channel(SUBSCRIBERS);
    let followers: Vec<_> = (0..SUBSCRIBERS)
        .map(|_| clients.spawn(follow(addr, 0, TOTAL, Some(ready.clone()))))
        .collect();
    let (produced_in, with_subscribers) = server.block_on(async {
        // every subscriber connected (each has its hello) before the first event
        for _ in 0..SUBSCRIBERS {
            connected.recv().await.expect("a subscriber connected");
        }
        let with_subscribers = heap::live();
        heap::reset_peak();
        let started = std::time::Instant::now();
        let mut tick = tokio::time::interval(Duration::from_millis(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
        for rev in 1..=TOTAL {
            tick.tick().await;
            tx.send(batch(rev, 0)).await.expect("feed");
        }
        (started.elapsed(), with_subscribers)
    });
    let mut total_cutoffs = 0;
    for f in followers {
        let (ids, cutoffs) = server.block_on(f).expect("subscriber");
        assert_eq!(
            ids,
            (1..=TOTAL).collect::<Vec<_>>(),
            "lost or repeated events"
        );
        total_cutoffs += cutoffs;
    }
    let peak = heap::peak();
    let mib = |b: isize| b as f64 / (1024.0 * 1024.0);
    let growth = mib(peak - before);
    println!(
        "events: {SUBSCRIBERS} subscribers, {TOTAL} events produced in {produced_in:.2?}, \
         {total_cutoffs} cut-offs resumed; server heap {:.1} MiB with the subscribers \
         connected, peak {:.1} MiB: +{growth:.1} MiB over the server before it started",
        mib(with_subscribers - before),
        mib(peak - before),
    );
    let bound = 8.0 + SUBSCRIBERS as f64 * (400.0 + 16.0) / 1024.0;
    assert!(
        growth < bound,
        "server heap grew {growth:.1} MiB, bound {bound:.1} MiB"
    );
    drop(h);
}

/// Every unit in `units` placed on m1 in one revision (one etcd transaction).
fn placements(revision: i64, units: &[&str]) -> FeedItem {
    FeedItem::Batch(ChangeBatch {
        revision,
        changes: units
            .iter()
            .map(|u| Change {
                key: format!("placement/{u}"),
                value: Some(b"2c4b0d1bd4cd4a8d90d4c4e0e4b0f2a1".to_vec()),
                prev: None,
            })
            .collect(),
    })
}

/// Only the last event of a revision carries its `id:`: a client that breaks off after the
/// first of them resumes before the revision and so gets the rest.
#[tokio::test]
async fn only_the_last_event_of_a_revision_has_an_id() {
    let (h, tx) = fake_server(ApiConfig::default()).await;
    let mut s = Sse::stream(h.addr, "").await;
    s.next().await.expect("hello");
    tx.send(placements(5, &["a.service", "b.service", "c.service"]))
        .await
        .expect("feed");
    tx.send(placements(6, &["d.service"])).await.expect("feed");
    let got = s.until(|m| m.id == Some(6)).await;
    let seen: Vec<(String, Option<i64>)> = got
        .iter()
        .map(|m| (m.data()["unit"].as_str().unwrap_or("").to_string(), m.id))
        .collect();
    let expected = [
        ("a.service", None),
        ("b.service", None),
        ("c.service", Some(5)),
        ("d.service", Some(6)),
    ]
    .map(|(u, id)| (u.to_string(), id));
    assert_eq!(seen, expected);
    // a filtered stream gets the id on the last event it keeps
    let mut f = Sse::stream(h.addr, "?since=4&unit=b.service").await;
    f.next().await.expect("hello");
    let m = f.next().await.expect("b's placement");
    assert_eq!(
        (m.data()["unit"].clone(), m.id),
        ("b.service".into(), Some(5))
    );
}

/// `Last-Event-ID` (what an `EventSource` sends when it reconnects) wins over the `since`
/// of the URL it was opened with.
#[tokio::test]
async fn last_event_id_wins_over_since() {
    let (h, tx) = fake_server(ApiConfig::default()).await;
    let mut s = Sse::stream(h.addr, "").await;
    s.next().await.expect("hello");
    for rev in 1..=6 {
        tx.send(batch(rev, 0)).await.expect("feed");
    }
    s.until(|m| m.id == Some(6)).await;
    let mut again = match Sse::open_with(h.addr, "?since=2", "Last-Event-ID: 4\r\n").await {
        Opened::Stream(s) => s,
        Opened::Refused(code, body) => panic!("{code} {body}"),
    };
    let ids: Vec<Option<i64>> = again
        .until(|m| m.id == Some(6))
        .await
        .iter()
        .map(|m| m.id)
        .collect();
    assert_eq!(ids, [Some(4), Some(5), Some(6)]);
}

/// Event streams take at most half of a listener's connection budget; one more is refused
/// with 503 and Retry-After, while plain requests still get through.
#[tokio::test]
async fn event_streams_take_at_most_half_the_connections() {
    let (h, _tx) = fake_server(ApiConfig {
        max_tcp_connections: 4,
        // a stream notices its client left when it next writes
        event_heartbeat: Duration::from_millis(200),
        ..Default::default()
    })
    .await;
    let mut a = Sse::stream(h.addr, "").await;
    a.next().await.expect("hello");
    let mut b = Sse::stream(h.addr, "").await;
    b.next().await.expect("hello");
    match Sse::open(h.addr, "").await {
        Opened::Stream(_) => panic!("a third stream was accepted"),
        Opened::Refused(code, body) => {
            assert_eq!(code, 503);
            let (retry, body) = body.split_once(": ").expect("retry-after");
            assert_eq!(retry, "retry-after 5");
            let v: Value = serde_json::from_str(body).expect("json error");
            assert_eq!(
                v["error"]["message"],
                "too many event streams open on this listener (at most 2, half its connection limit); retry later"
            );
        }
    }
    assert_eq!(h.get("/fleet/v1/machines").await.status, 200);
    // a stream that ends gives its place back
    drop(a);
    let reopened = fleet_testutil::eventually(Duration::from_secs(10), || async {
        matches!(Sse::open(h.addr, "").await, Opened::Stream(_))
    })
    .await;
    assert!(reopened, "the freed stream slot was not given back");
    drop(b);
}

/// A filtered stream's keepalive carries the revision it has seen everything up to, so that
/// a client that saw none of the recent events still resumes from a recent revision.
#[tokio::test]
async fn keepalives_carry_the_current_revision() {
    let (h, tx) = fake_server(ApiConfig {
        event_heartbeat: Duration::from_millis(100),
        ..Default::default()
    })
    .await;
    let mut s = Sse::stream(h.addr, "?unit=nothing.service").await;
    s.next().await.expect("hello");
    for rev in 1..=7 {
        tx.send(batch(rev, 0)).await.expect("feed");
    }
    let got = tokio::time::timeout(Duration::from_secs(10), async {
        while !s.keepalive_ids.contains(&7) {
            let _ = tokio::time::timeout(Duration::from_millis(200), s.next()).await;
        }
    })
    .await;
    assert!(got.is_ok(), "keepalive ids: {:?}", s.keepalive_ids);
}

/// Filter parameters are bounded.
#[tokio::test]
async fn overlong_filters_are_refused() {
    let (h, _tx) = fake_server(ApiConfig::default()).await;
    let long = "a".repeat(256);
    for (key, value, ok) in [
        ("unit", "a".repeat(255), true),
        ("unit", long.clone(), false),
        ("machine", long.clone(), false),
    ] {
        match Sse::open(h.addr, &format!("?{key}={value}")).await {
            Opened::Stream(_) => assert!(ok, "{key} of {} bytes accepted", value.len()),
            Opened::Refused(code, body) => {
                assert!(!ok, "{key}: {code} {body}");
                assert_eq!(code, 400);
                let v: Value = serde_json::from_str(&body).expect("json error");
                assert_eq!(
                    v["error"]["message"],
                    format!("{key} filter too long: at most 255 bytes")
                );
            }
        }
    }
}
