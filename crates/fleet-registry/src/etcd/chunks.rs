//! The chunks an API listing reads ahead: many keys of a range at one revision, from which the
//! listing's following pages are served.
//!
//! Why: etcd 3.4 answers a range read with a limit by walking its index over every key from
//! the read's start to the range's end, then cutting the answer to the limit (3.5 stops the
//! walk at the limit). A page of 100 units near the start of 100,000 walked all 100,000, and a
//! whole listing in pages of 100 walked U²/200 entries: 28.6 s for `list-unit-files` at
//! 100,000 units. Reading [`CHUNK_KEYS`] keys at once and serving the next pages from them
//! makes that U²/2C, a few walks per listing, and keeps a listing at one revision: a chunk's
//! successor is read at the chunk's revision. A chunk of unit records (some 1 MB for 5,000)
//! is read with their placements, reasons and states (three range reads in one request, point
//! reads only for the states those miss), in requests of some 1 MB each: one request for
//! 10,000 units took more than fleet's 1 s request timeout on a busy etcd (`fleet-sim` at
//! 1,000 x 100,000).
//!
//! Bounded: at most [`CHUNKS_KEPT`] chunks (the least recently used go first), each dropped
//! [`CHUNK_AGE`] after it was read, so no page is served from a view older than that. A page
//! that starts a listing (no cursor) always reads afresh, so a new listing sees the registry
//! as it is now; a page with a cursor is served from the newest chunk holding its start.
//!
//! Read ahead: once a page is served from a chunk, the chunk after it is read in the
//! background, at the same revision, so that the page reaching it finds it ready instead of
//! waiting some 40 requests to etcd (a fifth of a 100,000-unit `list-unit-files` went to
//! those waits). A page that reaches a chunk still being read waits for that read rather
//! than reading it again. A listing's first page reads nothing ahead (a client reading one
//! page costs one chunk).
//!
//! Decoded once: a chunk of unit records is kept as the units' views (records decoded,
//! joined with their placements, reasons and states, bodies shared with the registry's
//! cache), built where the chunk is read, in the background for a chunk read ahead. A page
//! served from it only copies its views: at 100,000 units the decoding and joining done per
//! page was most of a `list-unit-files`' time in the API.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::model::UnitView;

/// How many keys a chunk reads.
pub(crate) const CHUNK_KEYS: usize = 5_000;
/// How many chunks are kept (records and views, some 2 MB each for a chunk of units):
/// a listing holds two (the one its pages come from and the one read ahead), so four
/// listings at once keep theirs.
pub(crate) const CHUNKS_KEPT: usize = 8;
/// How long a chunk is kept after it was read.
pub(crate) const CHUNK_AGE: Duration = Duration::from_secs(30);
/// How many chunks are read ahead at once, at most: half the chunks kept, so that reads
/// ahead for some listings do not evict the chunks others are paging through (with as many
/// reads ahead as chunks, three listings at once evicted each other's and read every chunk
/// twice).
pub(crate) const READS_AHEAD: usize = CHUNKS_KEPT / 2;

/// Keys and values of a range, in key order.
pub(crate) type Kvs = Vec<(String, Vec<u8>)>;

/// A chunk's units as clients see them, one per key of the chunk, in key order: `None` where
/// the record cannot be read or its body is missing (pages skip it, as a whole listing does).
pub(crate) type Views = Arc<[Option<Arc<UnitView>>]>;

/// What one read of a range found: every key from `start` on, up to `next` (exclusive) or,
/// when `next` is `None`, to `end`.
#[derive(Debug)]
pub(crate) struct Chunk {
    pub(crate) start: Vec<u8>,
    pub(crate) end: Vec<u8>,
    pub(crate) rev: i64,
    pub(crate) kvs: Arc<Kvs>,
    /// Where the range goes on, when the chunk did not reach its end.
    pub(crate) next: Option<Vec<u8>>,
    /// For unit records: the units' views, one per key (see [`Views`]); pages take them
    /// instead of the keys' values.
    pub(crate) views: Option<Views>,
}

impl Chunk {
    /// Whether this chunk knows every key of `end`'s range from `from` on, up to its own end,
    /// at `rev` (any revision when `None`).
    fn holds(&self, from: &[u8], end: &[u8], rev: Option<i64>) -> bool {
        self.end == end
            && rev.is_none_or(|r| r == self.rev)
            && self.start.as_slice() <= from
            && self.next.as_deref().is_none_or(|n| from < n)
    }

    /// At most `want` keys from `from` on, and where the range goes on after them. A chunk
    /// with views gives the views of those keys (the readable ones) and no keys.
    pub(crate) fn slice(&self, from: &[u8], want: usize) -> Slice {
        let at = self.kvs.partition_point(|(k, _)| k.as_bytes() < from);
        let stop = at.saturating_add(want).min(self.kvs.len());
        let next = if stop < self.kvs.len() {
            // more keys of this chunk follow: the range goes on right after the last one taken
            stop.checked_sub(1)
                .and_then(|last| self.kvs.get(last))
                .map(|(k, _)| {
                    let mut n = k.as_bytes().to_vec();
                    n.push(0);
                    n
                })
        } else {
            self.next.clone()
        };
        match &self.views {
            Some(views) => Slice {
                kvs: Vec::new(),
                views: Some(
                    views
                        .get(at..stop)
                        .unwrap_or_default()
                        .iter()
                        .flatten()
                        .cloned()
                        .collect(),
                ),
                next,
            },
            None => Slice {
                kvs: self
                    .kvs
                    .get(at..stop)
                    .map(<[_]>::to_vec)
                    .unwrap_or_default(),
                views: None,
                next,
            },
        }
    }
}

/// What a page takes of a chunk: its keys and values, or, from a chunk with views, their
/// views; and where the range goes on after them.
#[derive(Debug)]
pub(crate) struct Slice {
    pub(crate) kvs: Kvs,
    pub(crate) views: Option<Vec<Arc<UnitView>>>,
    pub(crate) next: Option<Vec<u8>>,
}

/// What [`Chunks::find`] found for a page.
#[derive(Debug)]
pub(crate) enum Found {
    /// A chunk holds the page's start: the keys from there, their revision, and where the
    /// range goes on.
    Held {
        rev: i64,
        slice: Slice,
        /// Where the chunk's successor starts, when the range goes on after the chunk.
        successor: Option<Vec<u8>>,
    },
    /// A chunk ends where the page starts: read its successor at its revision.
    Follows { rev: i64 },
    /// Nothing known: read afresh.
    Unknown,
}

/// A chunk kept, when it was read and when a page was last served from it.
#[derive(Debug)]
struct Kept {
    chunk: Chunk,
    read: Instant,
    used: Instant,
}

/// A chunk being read ahead: where it starts, of which range, at which revision, and the
/// lock its reader holds until it is kept (or the read failed).
#[derive(Debug)]
struct Pending {
    start: Vec<u8>,
    end: Vec<u8>,
    rev: i64,
    done: Arc<tokio::sync::Mutex<()>>,
}

/// The chunks kept.
#[derive(Debug)]
pub(crate) struct Chunks {
    keys: usize,
    kept: Mutex<Vec<Kept>>,
    /// The chunks being read ahead (at most [`READS_AHEAD`]).
    pending: Mutex<Vec<Pending>>,
}

/// A read ahead under way: while it lives, pages reaching its chunk wait for it; dropped (the
/// chunk kept, or the read failed or was cancelled), they go on.
#[derive(Debug)]
pub(crate) struct ReadAhead {
    chunks: Arc<Chunks>,
    done: Arc<tokio::sync::Mutex<()>>,
    _holding: tokio::sync::OwnedMutexGuard<()>,
}

impl Drop for ReadAhead {
    fn drop(&mut self) {
        if let Ok(mut pending) = self.chunks.pending.lock() {
            pending.retain(|p| !Arc::ptr_eq(&p.done, &self.done));
        }
    }
}

impl Chunks {
    /// Chunks of `keys` keys.
    pub(crate) fn new(keys: usize) -> Chunks {
        Chunks {
            keys: keys.max(1),
            kept: Mutex::new(Vec::new()),
            pending: Mutex::new(Vec::new()),
        }
    }

    /// How many keys a chunk reads.
    pub(crate) fn keys(&self) -> usize {
        self.keys
    }

    /// At most `want` keys of `end`'s range from `from` on, at `rev` when given, from the
    /// newest chunk that holds them.
    pub(crate) fn find(
        &self,
        from: &[u8],
        end: &[u8],
        rev: Option<i64>,
        want: usize,
        now: Instant,
    ) -> Found {
        let Ok(mut kept) = self.kept.lock() else {
            return Found::Unknown;
        };
        kept.retain(|k| now.saturating_duration_since(k.read) < CHUNK_AGE);
        // a listing whose chunk ended here goes on at its revision, unless a newer one holds
        // the page: an older listing's chunk must not take over (it may end too soon)
        let follows = kept
            .iter()
            .map(|k| &k.chunk)
            .filter(|c| {
                c.end == end && c.next.as_deref() == Some(from) && rev.is_none_or(|r| r == c.rev)
            })
            .map(|c| c.rev)
            .max();
        let newest = kept
            .iter_mut()
            .filter(|k| k.chunk.holds(from, end, rev))
            .max_by_key(|k| k.chunk.rev);
        match (newest, follows) {
            (Some(k), f) if f.is_none_or(|f| f <= k.chunk.rev) => {
                k.used = now;
                Found::Held {
                    rev: k.chunk.rev,
                    slice: k.chunk.slice(from, want),
                    successor: k.chunk.next.clone(),
                }
            }
            (_, Some(rev)) => Found::Follows { rev },
            (_, None) => Found::Unknown,
        }
    }

    /// Starts reading ahead the chunk of `end`'s range from `start` on at `rev`, unless a
    /// chunk kept holds it already, it is being read, or [`READS_AHEAD`] reads are under way:
    /// the read's token, which the reader holds until it has kept the chunk.
    pub(crate) fn read_ahead(
        self: &Arc<Self>,
        start: &[u8],
        end: &[u8],
        rev: i64,
        now: Instant,
    ) -> Option<ReadAhead> {
        let held = self.kept.lock().ok()?.iter().any(|k| {
            now.saturating_duration_since(k.read) < CHUNK_AGE
                && k.chunk.holds(start, end, Some(rev))
        });
        if held {
            return None;
        }
        let mut pending = self.pending.lock().ok()?;
        if pending.len() >= READS_AHEAD
            || pending
                .iter()
                .any(|p| p.start == start && p.end == end && p.rev == rev)
        {
            return None;
        }
        let done = Arc::new(tokio::sync::Mutex::new(()));
        let holding = done.clone().try_lock_owned().ok()?;
        pending.push(Pending {
            start: start.to_vec(),
            end: end.to_vec(),
            rev,
            done: done.clone(),
        });
        Some(ReadAhead {
            chunks: self.clone(),
            done,
            _holding: holding,
        })
    }

    /// The lock of the read ahead of the chunk of `end`'s range from `start` on at `rev`, when
    /// one is under way: it is free once that read is over.
    pub(crate) fn reading(
        &self,
        start: &[u8],
        end: &[u8],
        rev: i64,
    ) -> Option<Arc<tokio::sync::Mutex<()>>> {
        let pending = self.pending.lock().ok()?;
        pending
            .iter()
            .find(|p| p.start == start && p.end == end && p.rev == rev)
            .map(|p| p.done.clone())
    }

    /// Keeps `chunk`, dropping the least recently used beyond [`CHUNKS_KEPT`].
    pub(crate) fn keep(&self, chunk: Chunk, now: Instant) {
        let Ok(mut kept) = self.kept.lock() else {
            return;
        };
        kept.push(Kept {
            chunk,
            read: now,
            used: now,
        });
        while kept.len() > CHUNKS_KEPT {
            let oldest = kept
                .iter()
                .enumerate()
                .min_by_key(|(_, k)| k.used)
                .map(|(i, _)| i);
            match oldest {
                Some(i) => drop(kept.swap_remove(i)),
                None => break,
            }
        }
    }

    /// Forgets every chunk (their revision was compacted).
    pub(crate) fn clear(&self) {
        if let Ok(mut kept) = self.kept.lock() {
            kept.clear();
        }
    }

    /// How many chunks are kept.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.kept.lock().map(|k| k.len()).unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunk(start: &str, keys: &[&str], next: Option<&str>, rev: i64) -> Chunk {
        Chunk {
            start: start.as_bytes().to_vec(),
            end: b"z".to_vec(),
            rev,
            kvs: Arc::new(
                keys.iter()
                    .map(|k| (k.to_string(), k.as_bytes().to_vec()))
                    .collect(),
            ),
            next: next.map(|n| n.as_bytes().to_vec()),
            views: None,
        }
    }

    fn held(found: Found) -> (i64, Vec<String>, Option<String>) {
        match found {
            Found::Held { rev, slice, .. } => (
                rev,
                slice.kvs.into_iter().map(|(k, _)| k).collect(),
                slice.next.map(|n| String::from_utf8_lossy(&n).into_owned()),
            ),
            other => panic!("not held: {other:?}"),
        }
    }

    #[test]
    fn serves_pages_from_the_newest_chunk_that_holds_their_start() {
        let now = Instant::now();
        let chunks = Chunks::new(4);
        chunks.keep(chunk("a", &["b", "c", "d", "e"], Some("e\0"), 7), now);
        let find = |from: &str, want| chunks.find(from.as_bytes(), b"z", None, want, now);
        let s = |v: &[&str]| v.iter().map(|k| k.to_string()).collect::<Vec<_>>();
        assert_eq!(held(find("a", 2)), (7, s(&["b", "c"]), Some("c\0".into())));
        assert_eq!(
            held(find("c\0", 2)),
            (7, s(&["d", "e"]), Some("e\0".into()))
        );
        // fewer than asked: the rest, and where the range goes on
        assert_eq!(held(find("d", 5)), (7, s(&["d", "e"]), Some("e\0".into())));
        // where the chunk ends, its successor is read at its revision
        assert!(matches!(find("e\0", 2), Found::Follows { rev: 7 }));
        // before its start, past its end, another range or another revision: unknown
        assert!(matches!(find("", 2), Found::Unknown));
        assert!(matches!(find("f", 2), Found::Unknown));
        assert!(matches!(
            chunks.find(b"b", b"y", None, 2, now),
            Found::Unknown
        ));
        assert!(matches!(
            chunks.find(b"b", b"z", Some(6), 2, now),
            Found::Unknown
        ));
        // a newer listing's chunk wins where both hold the start
        chunks.keep(chunk("a", &["b", "bb", "c"], None, 9), now);
        assert_eq!(held(find("b\0", 2)), (9, s(&["bb", "c"]), None));
        assert_eq!(
            held(chunks.find(b"b\0", b"z", Some(7), 2, now)),
            (7, s(&["c", "d"]), Some("d\0".into()))
        );
        // the last chunk of a range holds everything after its start
        assert_eq!(held(find("x", 2)), (9, vec![], None));
        // ... but where a newer listing's chunk ended, that listing goes on at its revision
        chunks.keep(chunk("b", &["bb", "c"], Some("c\0"), 11), now);
        assert!(matches!(find("c\0", 2), Found::Follows { rev: 11 }));
    }

    #[test]
    fn pages_of_a_chunk_with_views_take_the_views_of_their_keys() {
        use fleet_unit::{TargetState, UnitFile, UnitName};
        let view = |name: &str| {
            let file = Arc::new(UnitFile::from_options(vec![]));
            UnitView {
                name: UnitName::parse(name).expect("a valid name"),
                hash: file.hash(),
                file,
                desired: TargetState::Launched,
                global: false,
                machine_id: None,
                current: TargetState::Inactive,
                reason: None,
            }
        };
        let mut c = chunk("a", &["b", "c", "d", "e"], Some("e\0"), 7);
        // `c` cannot be read: pages skip it, and go on where its key says
        c.views = Some(
            vec![
                Some(Arc::new(view("b.service"))),
                None,
                Some(Arc::new(view("d.service"))),
                Some(Arc::new(view("e.service"))),
            ]
            .into(),
        );
        let names = |s: &Slice| {
            s.views
                .as_ref()
                .expect("views")
                .iter()
                .map(|v| v.name.to_string())
                .collect::<Vec<_>>()
        };
        let first = c.slice(b"a", 2);
        assert_eq!(names(&first), ["b.service"]);
        assert!(first.kvs.is_empty(), "no keys besides the views");
        assert_eq!(first.next.as_deref(), Some(&b"c\0"[..]));
        let second = c.slice(b"c\0", 5);
        assert_eq!(names(&second), ["d.service", "e.service"]);
        assert_eq!(
            second.next.as_deref(),
            Some(&b"e\0"[..]),
            "the chunk's own next"
        );
    }

    #[tokio::test]
    async fn a_chunk_is_read_ahead_once_and_pages_wait_for_it() {
        let now = Instant::now();
        let chunks = Arc::new(Chunks::new(4));
        chunks.keep(chunk("a", &["b", "c"], Some("c\0"), 7), now);
        // a page served from the chunk learns where its successor starts
        match chunks.find(b"b", b"z", None, 1, now) {
            Found::Held { successor, .. } => assert_eq!(successor.as_deref(), Some(&b"c\0"[..])),
            other => panic!("not held: {other:?}"),
        }
        let token = chunks.read_ahead(b"c\0", b"z", 7, now).expect("read ahead");
        // once: a second page does not read it again, nor does one of another listing
        assert!(chunks.read_ahead(b"c\0", b"z", 7, now).is_none());
        let reading = chunks.reading(b"c\0", b"z", 7).expect("being read");
        assert!(
            reading.try_lock().is_err(),
            "held while the read is under way"
        );
        assert!(
            chunks.reading(b"c\0", b"z", 8).is_none(),
            "another revision"
        );
        // a chunk kept already is not read ahead
        assert!(chunks.read_ahead(b"b", b"z", 7, now).is_none());
        // bounded: at most READS_AHEAD at once
        let more: Vec<_> = (0..READS_AHEAD + 2)
            .filter_map(|i| chunks.read_ahead(format!("k{i}").as_bytes(), b"z", 7, now))
            .collect();
        assert_eq!(more.len(), READS_AHEAD - 1);
        // over (kept or failed): waiting pages go on, and it may be read again
        drop(token);
        assert!(reading.try_lock().is_ok());
        assert!(chunks.reading(b"c\0", b"z", 7).is_none());
        drop(more);
        assert!(chunks.read_ahead(b"c\0", b"z", 7, now).is_some());
    }

    #[test]
    fn keeps_few_chunks_and_drops_old_ones() {
        let now = Instant::now();
        let chunks = Chunks::new(4);
        for i in 0..(CHUNKS_KEPT + 3) {
            let start = format!("k{i}");
            let later = now + Duration::from_millis(i as u64);
            chunks.keep(chunk(&start, &[], None, i as i64), later);
        }
        assert_eq!(chunks.len(), CHUNKS_KEPT);
        // the least recently used went first
        assert!(matches!(
            chunks.find(b"k0", b"z", Some(0), 1, now),
            Found::Unknown
        ));
        let late = now + CHUNK_AGE + Duration::from_secs(1);
        assert!(matches!(
            chunks.find(b"k8", b"z", None, 1, late),
            Found::Unknown
        ));
        assert_eq!(chunks.len(), 0, "old chunks dropped");
        chunks.keep(chunk("a", &["b"], None, 1), now);
        chunks.clear();
        assert_eq!(chunks.len(), 0);
    }
}
