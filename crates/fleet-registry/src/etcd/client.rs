//! The client role on etcd: what the HTTP API and fleetctl's etcd driver do ([`Registry`]).

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use std::collections::{BTreeMap, BTreeSet};

use etcd_client::{Compare, CompareOp, DeleteOptions, GetOptions, Txn, TxnOp, TxnOpResponse};
use fleet_unit::{TargetState, UnitFile, UnitHash, UnitName};
use tokio::sync::oneshot;
use tracing::{debug, warn};

use super::chunks::{Chunk, Found, Kvs, Slice, Views};
use super::{EtcdRegistry, MAX_TXN_OPS, OpKind};
use crate::keys;
use crate::model::{MachineView, StateRecord, UnitRecord, UnitView, decode, encode};
use crate::watch::{KeyRange, ListWatch, compacted, prefix_end};
use crate::{PageStart, Registry, RegistryError, Result, decode as records};

/// How many units' placements, reasons and states one request of a chunk's joined read covers:
/// some 1 MB, well within fleet's 1 s request timeout on a busy etcd (10,000 in one request,
/// some 4 MB, took longer while 1,000 machines loaded etcd).
const JOIN_KEYS: usize = 2_500;

/// How many states a listing's range over its units' states reads per unit, at most: one for
/// each placed unit, and room for a few global units' (a state per machine); the states the
/// bound leaves out are read by point reads (see `unit_context`).
const STATES_PER_NAME: usize = 2;

/// How many transactions of one [`EtcdRegistry::read_ranges`] are in flight at once (etcd
/// serves concurrent reads together).
const RANGE_TXNS_IN_FLIGHT: usize = 8;

/// How many times a page is read again because its revision was compacted between its reads.
const PAGE_RESTARTS: usize = 3;

/// One range to read: from `start`, up to `end` (a single key without it), at most `limit`
/// keys (0: no limit).
struct RangeRead {
    start: Vec<u8>,
    end: Option<Vec<u8>>,
    limit: i64,
}

/// What one range read found: its keys and values, and whether more keys followed.
struct RangeFound {
    kvs: Vec<(String, Vec<u8>)>,
    /// The key the range goes on at, when more keys followed.
    next: Option<Vec<u8>>,
}

/// The smallest key after `key`.
fn after(key: impl Into<Vec<u8>>) -> Vec<u8> {
    let mut k = key.into();
    k.push(0);
    k
}

/// The writes a unit's creation or replacement is made of.
struct UnitWrite {
    unit_key: String,
    unit_put: TxnOp,
    /// `global/<name>` for a global unit.
    global_put: Option<TxnOp>,
    /// The body, create-only (identical bodies share one key).
    body_txn: Txn,
}

impl EtcdRegistry {
    fn unit_write(&self, name: &UnitName, file: &UnitFile, desired: TargetState) -> UnitWrite {
        let rec = UnitRecord::new(name, file, desired);
        let unit_key = self.keys.unit(name.as_str());
        let body_key = self.keys.body(&rec.hash.to_string());
        let global_put = rec
            .global_record()
            .map(|g| TxnOp::put(self.keys.global(name.as_str()), encode(&g), None));
        let body_txn = Txn::new()
            .when([Compare::create_revision(
                body_key.as_str(),
                CompareOp::Equal,
                0,
            )])
            .and_then([TxnOp::put(body_key.as_str(), file.serialize(), None)]);
        UnitWrite {
            unit_put: TxnOp::put(unit_key.as_str(), encode(&rec), None),
            unit_key,
            global_put,
            body_txn,
        }
    }
}

impl EtcdRegistry {
    async fn views(&self, only: Option<&UnitName>) -> Result<Vec<UnitView>> {
        let prefixes: Vec<String> = match only {
            Some(n) => vec![
                self.keys.unit(n.as_str()),
                self.keys.placement(n.as_str()),
                self.keys.reason(n.as_str()),
                self.keys.states_dir(n.as_str()),
            ],
            None => [keys::UNITS, keys::PLACEMENT, keys::REASONS, keys::STATES]
                .iter()
                .map(|k| self.keys.dir(k))
                .collect(),
        };
        let (_, kvs) = self.list("listing units", &prefixes).await?;
        let mut units = records::units(&self.keys, &kvs);
        if let Some(n) = only {
            // A prefix read of units/a.service also matches units/a.service2.
            units.retain(|u| &u.name == n);
        }
        if only.is_none() {
            // every live body is known here: forget those of units destroyed or replaced
            let hashes: Vec<UnitHash> = units.iter().map(|u| u.hash).collect();
            self.prune_bodies(&hashes);
        }
        let mut out = self.views_of(units, &kvs).await?;
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    /// Reads `ranges` at `revision` (the current one when none), in transactions of at most
    /// [`MAX_TXN_OPS`] reads, up to [`RANGE_TXNS_IN_FLIGHT`] at once (all at one revision:
    /// without `revision`, the first transaction's); the revision read at, and what each
    /// range found, in the order of `ranges`.
    async fn read_ranges(
        &self,
        op: &'static str,
        revision: Option<i64>,
        ranges: Vec<RangeRead>,
    ) -> Result<(i64, Vec<RangeFound>)> {
        use futures_util::stream::{self, StreamExt, TryStreamExt};
        let mut batches = ranges.chunks(MAX_TXN_OPS);
        let mut rev = revision;
        let mut found = Vec::with_capacity(ranges.len());
        if rev.is_none()
            && let Some(first) = batches.next()
        {
            let (r, f) = self.read_range_txn(op, None, first).await?;
            rev = r;
            found.extend(f);
        }
        // (a chunk's point reads of states, before they were a range: some 40 transactions,
        // one after another took most of a chunk's time)
        // (the futures made first: a closure in the stream trips the Send check of callers)
        let reads: Vec<_> = batches
            .map(|batch| self.read_range_txn(op, rev, batch))
            .collect();
        let rest: Vec<(Option<i64>, Vec<RangeFound>)> = stream::iter(reads)
            .buffered(RANGE_TXNS_IN_FLIGHT)
            .try_collect()
            .await?;
        found.extend(rest.into_iter().flat_map(|(_, f)| f));
        Ok((rev.unwrap_or(0), found))
    }

    /// One transaction of [`EtcdRegistry::read_ranges`]: `batch` read at `rev`; the revision
    /// etcd answered at, when it said.
    async fn read_range_txn(
        &self,
        op: &'static str,
        rev: Option<i64>,
        batch: &[RangeRead],
    ) -> Result<(Option<i64>, Vec<RangeFound>)> {
        let first = batch
            .first()
            .map(|r| String::from_utf8_lossy(&r.start).into_owned())
            .unwrap_or_default();
        let options = |r: &RangeRead| {
            let mut opts = GetOptions::new().with_limit(r.limit);
            if let Some(end) = &r.end {
                opts = opts.with_range(end.clone());
            }
            if let Some(rev) = rev {
                opts = opts.with_revision(rev);
            }
            opts
        };
        if let [one] = batch {
            // one range (a chunk's keys): a plain read, whose answer is taken as it is (a
            // transaction's answers are copied out of it, some 1 MB for a chunk)
            let mut kv = self.kv();
            let mut get = self
                .timed(
                    OpKind::GetAll,
                    op,
                    &first,
                    kv.get(one.start.clone(), Some(options(one))),
                )
                .await?;
            self.walked.fetch_add(
                u64::try_from(get.count()).unwrap_or(0),
                std::sync::atomic::Ordering::Relaxed,
            );
            let more = get.more();
            let mut next = None;
            let mut taken = get.take_kvs().into_iter().peekable();
            let mut kvs: Vec<(String, Vec<u8>)> = Vec::with_capacity(taken.len());
            while let Some(kv) = taken.next() {
                let (k, v) = kv.into_key_value();
                if more && taken.peek().is_none() {
                    // from the key's own bytes: a key that is not UTF-8 reads otherwise
                    // below, and the next range must start right after the real one
                    next = Some(after(k.as_slice()));
                }
                let k = String::from_utf8(k)
                    .unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned());
                kvs.push((k, v));
            }
            return Ok((
                get.header().map(|h| h.revision()),
                vec![RangeFound { kvs, next }],
            ));
        }
        let ops: Vec<TxnOp> = batch
            .iter()
            .map(|r| TxnOp::get(r.start.clone(), Some(options(r))))
            .collect();
        let resp = self
            .txn(OpKind::GetAll, op, &first, Txn::new().and_then(ops))
            .await?;
        let mut found = Vec::with_capacity(batch.len());
        for answer in resp.op_responses() {
            let TxnOpResponse::Get(get) = answer else {
                continue;
            };
            self.walked.fetch_add(
                u64::try_from(get.count()).unwrap_or(0),
                std::sync::atomic::Ordering::Relaxed,
            );
            let kvs: Vec<(String, Vec<u8>)> = get
                .kvs()
                .iter()
                .map(|kv| {
                    (
                        String::from_utf8_lossy(kv.key()).into_owned(),
                        kv.value().to_vec(),
                    )
                })
                .collect();
            let next = get
                .more()
                .then(|| get.kvs().last().map(|kv| after(kv.key())))
                .flatten();
            found.push(RangeFound { kvs, next });
        }
        Ok((resp.header().map(|h| h.revision()), found))
    }

    /// Runs `read` again (a fresh page at a fresh revision) when etcd compacted the
    /// revision it read at between its requests.
    async fn page_read<T, F, Fut>(&self, read: F) -> Result<T>
    where
        F: Fn() -> Fut,
        Fut: std::future::Future<Output = Result<T>>,
    {
        let mut restarts = 0;
        loop {
            match read().await {
                Err(RegistryError::Etcd { source, .. })
                    if compacted(&source) && restarts < PAGE_RESTARTS =>
                {
                    // what was read ahead at that revision cannot be joined any more
                    self.chunks.clear();
                    restarts += 1;
                }
                other => return other,
            }
        }
    }

    /// At most `want` keys of the range from `from` to `end`, at `rev` (the current revision
    /// when `None`), for a page of an API listing: served from a chunk read ahead when one
    /// holds them (`chunks`), else read with a chunk's worth after them, kept for the pages
    /// that follow. A chunk that ends where `from` starts is followed at its own revision,
    /// so a listing stays at one revision. `fresh` (a listing's first page) reads afresh.
    /// With `join` (unit records), a chunk read also reads, at its revision, the placements,
    /// reasons and states of its span of names and the bodies, and keeps the units' views,
    /// so that its pages read and decode nothing more: they come back instead of the keys.
    #[allow(clippy::too_many_arguments)]
    async fn page_range(
        &self,
        op: &'static str,
        fresh: bool,
        join: bool,
        from: Vec<u8>,
        end: Vec<u8>,
        want: usize,
        rev: Option<i64>,
    ) -> Result<(i64, Slice)> {
        let mut at = rev;
        let mut waited = false;
        // (a fresh page reads; others look twice at most: again after waiting for a read
        // ahead)
        loop {
            if fresh {
                break;
            }
            match self
                .chunks
                .find(&from, &end, rev, want, std::time::Instant::now())
            {
                Found::Held {
                    rev,
                    slice,
                    successor,
                } => {
                    if let Some(successor) = successor {
                        self.read_ahead(op, join, successor, end, rev);
                    }
                    return Ok((rev, slice));
                }
                Found::Follows { rev } => {
                    // the chunk after is being read ahead: wait for it, then look again
                    if !waited && let Some(reading) = self.chunks.reading(&from, &end, rev) {
                        drop(reading.lock().await);
                        waited = true;
                        continue;
                    }
                    at = Some(rev);
                    break;
                }
                Found::Unknown => break,
            }
        }
        let chunk = self
            .read_chunk(op, join, from.clone(), end, want, at)
            .await?;
        let (r, slice) = (chunk.rev, chunk.slice(&from, want));
        self.chunks.keep(chunk, std::time::Instant::now());
        Ok((r, slice))
    }

    /// Reads the chunk of `end`'s range from `from` on (at least `want` keys) at `at` (the
    /// current revision when `None`); with `join` (unit records), also the placements,
    /// reasons and states of its span of names, at its revision, and their bodies: the
    /// chunk keeps the units' views.
    async fn read_chunk(
        &self,
        op: &'static str,
        join: bool,
        from: Vec<u8>,
        end: Vec<u8>,
        want: usize,
        at: Option<i64>,
    ) -> Result<Chunk> {
        let read = RangeRead {
            start: from.clone(),
            end: Some(end.clone()),
            limit: i64::try_from(self.chunks.keys().max(want)).unwrap_or(i64::MAX),
        };
        let (r, found) = self.read_ranges(op, at, vec![read]).await?;
        let found = found.into_iter().next().unwrap_or(RangeFound {
            kvs: Vec::new(),
            next: None,
        });
        let views = if join && !found.kvs.is_empty() {
            // in spans of JOIN_KEYS units, one request each, so each stays small
            let mut kvs: Kvs = Vec::new();
            for group in found.kvs.chunks(JOIN_KEYS) {
                let names: Vec<&str> = group
                    .iter()
                    .filter_map(|(k, _)| self.keys.strip(keys::UNITS, k))
                    .collect();
                kvs.extend(
                    self.unit_context("reading placements of listed units", r, &names)
                        .await?,
                );
            }
            kvs.sort_by(|a, b| a.0.cmp(&b.0));
            kvs.dedup_by(|a, b| a.0 == b.0);
            Some(self.chunk_views(&found.kvs, &kvs).await?)
        } else {
            None
        };
        Ok(Chunk {
            start: from,
            end,
            rev: r,
            kvs: Arc::new(found.kvs),
            next: found.next,
            views,
        })
    }

    /// The views of the units whose records are `records` (a chunk's keys), one per record,
    /// given their placements, reasons and states in `joined`: `None` for a record that
    /// cannot be read, or whose body is missing.
    async fn chunk_views(&self, records: &Kvs, joined: &Kvs) -> Result<Views> {
        let units: Vec<Option<UnitRecord>> = records
            .iter()
            .map(|(k, v)| {
                self.keys.strip(keys::UNITS, k)?;
                decode::<UnitRecord>(k, v)
                    .map_err(|e| warn!(error = %e, "skipping unit record"))
                    .ok()
            })
            .collect();
        let hashes: Vec<UnitHash> = units.iter().flatten().map(|u| u.hash).collect();
        let bodies = self.shared_bodies(&hashes).await?;
        // (sorted by key: read_chunk sorts what it joins)
        let mut context = records::SortedContext::new(&self.keys, joined);
        Ok(units
            .into_iter()
            .map(|u| {
                let u = u?;
                let Some(file) = bodies.get(&u.hash) else {
                    warn!(unit = %u.name, hash = %u.hash, "unit body missing; skipping unit");
                    return None;
                };
                Some(Arc::new(context.view(u, file.clone())))
            })
            .collect())
    }

    /// Reads the chunk of `end`'s range from `from` on at `rev` in the background and keeps
    /// it, unless it is kept or being read already (see [`super::chunks`]). A failed read
    /// is only logged: the page reaching the chunk reads it itself.
    fn read_ahead(&self, op: &'static str, join: bool, from: Vec<u8>, end: Vec<u8>, rev: i64) {
        let Some(token) = self
            .chunks
            .read_ahead(&from, &end, rev, std::time::Instant::now())
        else {
            return;
        };
        let this = self.clone();
        tokio::spawn(async move {
            let want = this.chunks.keys();
            match this.read_chunk(op, join, from, end, want, Some(rev)).await {
                Ok(chunk) => this.chunks.keep(chunk, std::time::Instant::now()),
                Err(e) => debug!(error = %e, "reading a listing's next chunk ahead"),
            }
            drop(token);
        });
    }

    /// A page of units: at most `limit` of those named after `after`, each read with its
    /// placement, reason, state and body, and nothing else: one range read of the unit
    /// records (more only where records cannot be read or bodies are missing), one request
    /// of their placements, reasons and states (see [`Self::unit_context`]), and the bodies
    /// not cached.
    async fn units_page_once(
        &self,
        after_name: Option<&str>,
        limit: usize,
    ) -> Result<Vec<Arc<UnitView>>> {
        let dir = self.keys.dir(keys::UNITS);
        let end = prefix_end(dir.as_bytes());
        let mut from = match after_name {
            Some(n) => after(self.keys.unit(n)),
            None => dir.into_bytes(),
        };
        let mut rev = None;
        let mut out = Vec::with_capacity(limit);
        while out.len() < limit {
            let (r, found) = self
                .page_range(
                    "listing a page of units",
                    after_name.is_none() && rev.is_none(),
                    true,
                    from.clone(),
                    end.clone(),
                    limit - out.len(),
                    rev,
                )
                .await?;
            rev = Some(r);
            match found.views {
                Some(views) => out.extend(views),
                None => {
                    let units = records::units(&self.keys, &found.kvs);
                    out.extend(self.join_units(r, units).await?.into_iter().map(Arc::new));
                }
            }
            match found.next {
                Some(next) => from = next,
                None => break,
            }
        }
        Ok(out)
    }

    /// Units (sorted by name, read at `rev`) as clients see them: with their placements,
    /// reasons and states read at the same revision, and their bodies. A unit whose body is
    /// missing is skipped, as in a whole listing. (Pages served from a chunk have their views
    /// already: see [`Self::chunk_views`].)
    async fn join_units(&self, rev: i64, units: Vec<UnitRecord>) -> Result<Vec<UnitView>> {
        if units.is_empty() {
            return Ok(Vec::new());
        }
        let names: Vec<&str> = units.iter().map(|u| u.name.as_str()).collect();
        let kvs = self
            .unit_context("reading placements of a page of units", rev, &names)
            .await?;
        self.views_of(units, &kvs).await
    }

    /// What the views of the units named `names` (sorted) show besides their records, read at
    /// `rev`: their placements and reasons (two range reads over their names) and the state
    /// the machine each is placed on reported, in one request. The states are one range read
    /// over the names' span, bounded (a global unit has a state per machine, not shown):
    /// `states/<first>` (no slash) to the end of `states/<last>/`. A placed unit whose state
    /// the range did not reach is read by a point read: past the bound, or a name that sorts
    /// within the span but whose state key does not (`a.service` before `a.service-b.service`
    /// as names, `states/a.service/m` after `states/a.service-b.service/` as keys, since `-`
    /// and `.` sort before `/`).
    async fn unit_context(&self, op: &'static str, rev: i64, names: &[&str]) -> Result<Kvs> {
        let (Some(first), Some(last)) = (names.first(), names.last()) else {
            return Ok(Vec::new());
        };
        let span = |key: fn(&crate::keys::Keys, &str) -> String| RangeRead {
            start: key(&self.keys, first).into_bytes(),
            end: Some(after(key(&self.keys, last))),
            limit: 0,
        };
        let states = RangeRead {
            start: format!("{}{}{first}", self.keys.prefix(), keys::STATES).into_bytes(),
            end: Some(prefix_end(self.keys.states_dir(last).as_bytes())),
            limit: i64::try_from(names.len().saturating_mul(STATES_PER_NAME)).unwrap_or(i64::MAX),
        };
        let reached = |key: &[u8], found: &RangeFound| {
            states.start.as_slice() <= key
                && states.end.as_deref().is_none_or(|e| key < e)
                && found.next.as_deref().is_none_or(|n| key < n)
        };
        let (_, found) = self
            .read_ranges(
                op,
                Some(rev),
                vec![
                    span(crate::keys::Keys::placement),
                    span(crate::keys::Keys::reason),
                    RangeRead {
                        start: states.start.clone(),
                        end: states.end.clone(),
                        limit: states.limit,
                    },
                ],
            )
            .await?;
        let mut found = found.into_iter();
        let mut kvs: Kvs = found.by_ref().take(2).flat_map(|f| f.kvs).collect();
        let state_range = found.next().unwrap_or(RangeFound {
            kvs: Vec::new(),
            next: None,
        });
        let missed: Vec<RangeRead> = kvs
            .iter()
            .filter_map(|(k, v)| {
                let name = self.keys.strip(keys::PLACEMENT, k)?;
                let key = self
                    .keys
                    .state(name, &String::from_utf8_lossy(v))
                    .into_bytes();
                (!reached(&key, &state_range)).then_some(RangeRead {
                    start: key,
                    end: None,
                    limit: 0,
                })
            })
            .collect();
        kvs.extend(state_range.kvs);
        if !missed.is_empty() {
            let (_, found) = self.read_ranges(op, Some(rev), missed).await?;
            kvs.extend(found.into_iter().flat_map(|f| f.kvs));
        }
        Ok(kvs)
    }

    /// Units as clients see them, given their placements, reasons and states in `kvs`.
    async fn views_of(&self, units: Vec<UnitRecord>, kvs: &Kvs) -> Result<Vec<UnitView>> {
        let context = records::UnitContext::read(&self.keys, kvs);
        let hashes: Vec<UnitHash> = units.iter().map(|u| u.hash).collect();
        let bodies = self.shared_bodies(&hashes).await?;
        let mut out = Vec::with_capacity(units.len());
        for u in units {
            let Some(file) = bodies.get(&u.hash).cloned() else {
                warn!(unit = %u.name, hash = %u.hash, "unit body missing; skipping unit");
                continue;
            };
            out.push(context.view(u, file));
        }
        Ok(out)
    }

    /// A page of unit states: at most `limit` of those after `after_state` in (unit name,
    /// machine ID) order. Keys (`states/<unit>/<machine>`) sort differently only where a
    /// unit's name is another's followed by a character below `/` (`a.service` and
    /// `a.service-b.service`): the shorter name's states come later in key order. So the
    /// page reads `limit` states onward in key order, then the states of every name that
    /// is such a prefix of one read, and keeps the first `limit` of them all. (A record
    /// whose key names no valid unit is not looked for this way: such junk may come later
    /// in a paged listing than in a whole one.)
    async fn states_page_once(
        &self,
        after_state: Option<&(String, String)>,
        limit: usize,
    ) -> Result<Vec<StateRecord>> {
        let dir = self.keys.dir(keys::STATES);
        let end = prefix_end(dir.as_bytes());
        // every state after (u, m) has a key from `states/u` on
        let mut from = match after_state {
            Some((unit, _)) => format!("{dir}{unit}").into_bytes(),
            None => dir.into_bytes(),
        };
        let later = |s: &StateRecord| {
            after_state.is_none_or(|(u, m)| {
                (s.name.as_str(), s.machine_id.as_str()) > (u.as_str(), m.as_str())
            })
        };
        let mut found: BTreeMap<(String, String), StateRecord> = BTreeMap::new();
        let mut rev = None;
        // the first read starts at the previous page's last state: one more for it
        let mut extra = usize::from(after_state.is_some());
        while found.len() < limit {
            let want = limit - found.len() + extra;
            extra = 0;
            let (r, range) = self
                .page_range(
                    "listing a page of unit states",
                    after_state.is_none() && rev.is_none(),
                    false,
                    from.clone(),
                    end.clone(),
                    want,
                    rev,
                )
                .await?;
            rev = Some(r);
            for s in records::states(&self.keys, &range.kvs) {
                if later(&s) {
                    found.insert((s.name.clone(), s.machine_id.clone()), s);
                }
            }
            match range.next {
                Some(next) => from = next,
                None => break,
            }
        }
        let mut prefixes = BTreeSet::new();
        for (name, _) in found.keys() {
            for (i, b) in name.bytes().enumerate() {
                // (an ASCII byte: `i` is a character boundary)
                let prefix = &name[..i];
                // (only a unit's name can have states: `a` of `a.service` cannot)
                if i > 0
                    && b < b'/'
                    && after_state.is_none_or(|(u, _)| prefix >= u.as_str())
                    && UnitName::parse_stored(prefix).is_ok()
                {
                    prefixes.insert(prefix.to_string());
                }
            }
        }
        if let (Some(rev), false) = (rev, prefixes.is_empty()) {
            let reads = prefixes
                .iter()
                .map(|p| {
                    let start = self.keys.states_dir(p).into_bytes();
                    RangeRead {
                        end: Some(prefix_end(&start)),
                        start,
                        limit: 0,
                    }
                })
                .collect();
            let (_, ranges) = self
                .read_ranges("listing a page of unit states", Some(rev), reads)
                .await?;
            for range in ranges {
                for s in records::states(&self.keys, &range.kvs) {
                    if later(&s) {
                        found.insert((s.name.clone(), s.machine_id.clone()), s);
                    }
                }
            }
        }
        Ok(found.into_values().take(limit).collect())
    }

    /// Resolves on the next change under any of the unit's keys, or after `max`.
    async fn watch_unit_change(&self, name: &str, max: Duration) {
        let prefixes = vec![
            self.keys.unit(name),
            self.keys.placement(name),
            self.keys.reason(name),
            self.keys.states_dir(name),
            self.keys.dir(keys::MACHINES),
        ];
        let ranges = prefixes.into_iter().map(KeyRange::prefix).collect();
        let mut rx = ListWatch::spawn(
            self.client.clone(),
            ranges,
            None,
            self.timeout.saturating_mul(5),
        );
        let _ = tokio::time::timeout(max, async {
            // the first message is the snapshot; wait for the one after it
            let _ = rx.recv().await;
            let _ = rx.recv().await;
        })
        .await;
    }
}

/// The most units one grouped creation writes: each is up to three operations (body, unit
/// record, global record), and etcd takes at most 128 in one transaction.
const CREATIONS_PER_TXN: usize = MAX_TXN_OPS / 3;

/// Creations asked for while another is being written (group commit): when it is done, they
/// are written together in one transaction, so a burst of concurrent PUTs costs a few etcd
/// writes, and a creation alone waits for nothing. (Up to four groups in flight at once,
/// another starting when more than four creations per group waited, were tried at 300 x
/// 30,000 and at 1,000 x 100,000: `fleet-sim`, runs interleaved, submitted in 43.9 and
/// 43.6 s against 40.4 and 42.5 s with one, with 0.4 etcd transactions a unit against 0.24.
/// Not kept.)
#[derive(Default)]
pub(super) struct Creations {
    /// Whether a writer task is running (it takes what waits until nothing does).
    writing: bool,
    waiting: Vec<Creation>,
}

/// The writer task's claim to be the one running, taken where the task is started and given
/// back should it end otherwise than by finding nothing to write (a panic, its task dropped
/// before or while it runs): else no writer would ever start again, and every creation
/// would wait forever. The creations waiting then are answered as with an etcd out of
/// reach, rather than left until some later creation starts a writer.
struct WriterSlot(Option<Arc<std::sync::Mutex<Creations>>>);

impl Drop for WriterSlot {
    fn drop(&mut self) {
        if let Some(creations) = self.0.take() {
            let mut q = creations
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            q.writing = false;
            // (their answers' senders dropped: each asker gets an error)
            q.waiting.clear();
        }
    }
}

struct Creation {
    name: UnitName,
    file: UnitFile,
    desired: TargetState,
    done: oneshot::Sender<Result<()>>,
}

impl EtcdRegistry {
    fn creations(&self) -> std::sync::MutexGuard<'_, Creations> {
        // nothing panics while holding it; a poisoned lock still holds a consistent queue
        self.creations
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Writes what waits, a group at a time, until nothing does. Runs in a task of its own,
    /// so a request that goes away (its client hung up) never leaves the others waiting.
    async fn write_creations(self, mut slot: WriterSlot) {
        loop {
            let group = {
                let mut q = self.creations();
                let group = take_group(&mut q.waiting);
                if group.is_empty() {
                    // (under the lock that queues creations: none is left behind)
                    q.writing = false;
                    slot.0 = None;
                    return;
                }
                group
            };
            self.create_group(group).await;
        }
    }

    /// Creates a group of distinct units in one transaction: each only if it is not there
    /// yet. When a unit is there after all (its compare fails the whole transaction) or etcd
    /// refuses the transaction (its size), each unit is created alone, so each gets its own
    /// exact answer; an etcd out of reach answers each with the error.
    async fn create_group(&self, group: Vec<Creation>) {
        if let [_] = group.as_slice() {
            for c in group {
                let r = self.create_one(&c.name, &c.file, c.desired).await;
                let _ = c.done.send(r);
            }
            return;
        }
        let mut compares = Vec::with_capacity(group.len());
        let mut ops = Vec::with_capacity(group.len() * 3);
        let mut bodies = std::collections::HashSet::new();
        for c in &group {
            let w = self.unit_write(&c.name, &c.file, c.desired);
            compares.push(Compare::create_revision(
                w.unit_key.as_str(),
                CompareOp::Equal,
                0,
            ));
            // etcd refuses a transaction that writes one key twice: one body per hash
            if bodies.insert(c.file.hash()) {
                ops.push(TxnOp::txn(w.body_txn));
            }
            ops.push(w.unit_put);
            ops.extend(w.global_put);
        }
        let Some(first) = group.first().map(|c| self.keys.unit(c.name.as_str())) else {
            return;
        };
        let txn = Txn::new().when(compares).and_then(ops);
        match self.txn(OpKind::Set, "creating units", &first, txn).await {
            Ok(r) if r.succeeded() => {
                for c in group {
                    self.cache_body(c.file.hash(), Arc::new(c.file));
                    let _ = c.done.send(Ok(()));
                }
            }
            Err(e) if !e.is_refused() => {
                warn!(error = %e, units = group.len(), "creating a group of units failed");
                for c in group {
                    let key = self.keys.unit(c.name.as_str());
                    let _ = c.done.send(Err(as_each(&e, key)));
                }
            }
            Ok(_) | Err(_) => {
                let mut each = tokio::task::JoinSet::new();
                for c in group {
                    let reg = self.clone();
                    each.spawn(async move {
                        let r = reg.create_one(&c.name, &c.file, c.desired).await;
                        let _ = c.done.send(r);
                    });
                }
                while each.join_next().await.is_some() {}
            }
        }
    }

    /// Creates one unit in one transaction, only if it is not there yet.
    async fn create_one(
        &self,
        name: &UnitName,
        file: &UnitFile,
        desired: TargetState,
    ) -> Result<()> {
        let w = self.unit_write(name, file, desired);
        // One transaction: the body (create-only in a nested transaction: identical bodies
        // share one key), then the unit record and its global record, all only if the unit
        // is not there yet. A refused creation writes nothing, not even the body.
        let mut ops = vec![TxnOp::txn(w.body_txn), w.unit_put];
        if let Some(g) = w.global_put {
            ops.push(g);
        }
        let txn = Txn::new()
            .when([Compare::create_revision(
                w.unit_key.as_str(),
                CompareOp::Equal,
                0,
            )])
            .and_then(ops);
        if !self
            .txn(OpKind::Set, "creating unit", &w.unit_key, txn)
            .await?
            .succeeded()
        {
            return Err(RegistryError::AlreadyExists(name.to_string()));
        }
        self.cache_body(file.hash(), Arc::new(file.clone()));
        Ok(())
    }
}

/// Takes the next group from `waiting`: up to [`CREATIONS_PER_TXN`] creations of distinct
/// units, in the order they came; a second creation of a unit in the group waits for the
/// next one (it is then refused as existing, or created if the first failed).
fn take_group(waiting: &mut Vec<Creation>) -> Vec<Creation> {
    let mut group: Vec<Creation> = Vec::new();
    let mut rest = Vec::new();
    for c in waiting.drain(..) {
        if group.len() < CREATIONS_PER_TXN && !group.iter().any(|g| g.name == c.name) {
            group.push(c);
        } else {
            rest.push(c);
        }
    }
    *waiting = rest;
    group
}

/// The failure of a group's transaction, as the answer to one of its units (an error
/// cannot be copied; this one says the same about that unit's key).
fn as_each(e: &RegistryError, key: String) -> RegistryError {
    match e {
        RegistryError::Timeout { op, after, .. } => RegistryError::Timeout {
            op,
            key,
            after: *after,
        },
        _ => RegistryError::Unreachable {
            op: "creating unit",
            key,
        },
    }
}

#[async_trait]
impl Registry for EtcdRegistry {
    /// Queued for the writer task (started if none runs), which writes the creations that
    /// gather while one is in flight as one transaction.
    async fn create_unit(
        &self,
        name: &UnitName,
        file: &UnitFile,
        desired: TargetState,
    ) -> Result<()> {
        let (done, answer) = oneshot::channel();
        let start = {
            let mut q = self.creations();
            q.waiting.push(Creation {
                name: name.clone(),
                file: file.clone(),
                desired,
                done,
            });
            !std::mem::replace(&mut q.writing, true)
        };
        if start {
            let slot = WriterSlot(Some(self.creations.clone()));
            tokio::spawn(self.clone().write_creations(slot));
        }
        answer.await.unwrap_or_else(|_| {
            Err(RegistryError::Unreachable {
                op: "creating unit",
                key: self.keys.unit(name.as_str()),
            })
        })
    }

    async fn replace_unit(
        &self,
        name: &UnitName,
        file: &UnitFile,
        desired: TargetState,
    ) -> Result<()> {
        let w = self.unit_write(name, file, desired);
        // One transaction: the body (still create-only, in a nested transaction), the unit
        // record and its global record. placement/ and schedule/ are the engine's: it keeps
        // the unit where it is while the new options allow it.
        let global_op = w
            .global_put
            .unwrap_or_else(|| TxnOp::delete(self.keys.global(name.as_str()), None));
        let ops = vec![TxnOp::txn(w.body_txn), w.unit_put, global_op];
        self.txn(
            OpKind::Set,
            "replacing unit",
            &w.unit_key,
            Txn::new().and_then(ops),
        )
        .await?;
        self.cache_body(file.hash(), Arc::new(file.clone()));
        Ok(())
    }

    async fn set_desired_state(&self, name: &UnitName, desired: TargetState) -> Result<()> {
        let key = self.keys.unit(name.as_str());
        loop {
            let mut kv = self.kv();
            let resp = self
                .timed(
                    OpKind::Get,
                    "reading unit",
                    &key,
                    kv.get(key.as_str(), None),
                )
                .await?;
            let Some(cur) = resp.kvs().first() else {
                return Err(RegistryError::NotFound(name.to_string()));
            };
            let mut rec: UnitRecord = decode(&key, cur.value())?;
            let rev = cur.mod_revision();
            if rec.desired_state == desired {
                return Ok(());
            }
            rec.desired_state = desired;
            let mut ops = vec![TxnOp::put(key.as_str(), encode(&rec), None)];
            if let Some(g) = rec.global_record() {
                ops.push(TxnOp::put(
                    self.keys.global(name.as_str()),
                    encode(&g),
                    None,
                ));
            }
            let txn = Txn::new()
                .when([Compare::mod_revision(key.as_str(), CompareOp::Equal, rev)])
                .and_then(ops);
            if self
                .txn(OpKind::Set, "setting desired state", &key, txn)
                .await?
                .succeeded()
            {
                return Ok(());
            }
        }
    }

    async fn destroy_unit(&self, name: &UnitName) -> Result<bool> {
        let key = self.keys.unit(name.as_str());
        let txn = Txn::new().and_then([
            TxnOp::delete(key.as_str(), Some(DeleteOptions::new())),
            TxnOp::delete(self.keys.global(name.as_str()), None),
        ]);
        let resp = self.txn(OpKind::Set, "destroying unit", &key, txn).await?;
        let deleted = resp.op_responses().into_iter().any(|op| match op {
            TxnOpResponse::Delete(d) => d.deleted() > 0,
            _ => false,
        });
        Ok(deleted)
    }

    async fn wait_for_change(&self, unit: &UnitName, max: Duration) {
        self.watch_unit_change(unit.as_str(), max).await
    }

    async fn events(
        &self,
        query: &crate::EventQuery,
    ) -> Result<tokio::sync::mpsc::Receiver<crate::EventItem>> {
        self.follow_events(query).await
    }

    async fn unit(&self, name: &UnitName) -> Result<Option<UnitView>> {
        Ok(self.views(Some(name)).await?.into_iter().next())
    }

    async fn units(&self) -> Result<Vec<UnitView>> {
        self.views(None).await
    }

    async fn units_page(&self, start: &PageStart<String>, limit: usize) -> Result<Vec<UnitView>> {
        let page = self.units_page_shared(start, limit).await?;
        Ok(page.into_iter().map(Arc::unwrap_or_clone).collect())
    }

    async fn units_page_shared(
        &self,
        start: &PageStart<String>,
        limit: usize,
    ) -> Result<Vec<Arc<UnitView>>> {
        match start {
            PageStart::After(name) => {
                self.page_read(|| self.units_page_once(Some(name), limit))
                    .await
            }
            PageStart::Skip(0) => self.page_read(|| self.units_page_once(None, limit)).await,
            // a position without the key before it: counted in a whole listing
            PageStart::Skip(_) => {
                let page = start.cut(self.units().await?, limit, |u| u.name.to_string());
                Ok(page.into_iter().map(Arc::new).collect())
            }
        }
    }

    async fn unit_states_page(
        &self,
        start: &PageStart<(String, String)>,
        limit: usize,
    ) -> Result<Vec<StateRecord>> {
        match start {
            PageStart::After(key) => {
                self.page_read(|| self.states_page_once(Some(key), limit))
                    .await
            }
            PageStart::Skip(0) => self.page_read(|| self.states_page_once(None, limit)).await,
            PageStart::Skip(_) => Ok(start.cut(self.unit_states().await?, limit, |s| {
                (s.name.clone(), s.machine_id.clone())
            })),
        }
    }

    async fn machines(&self) -> Result<Vec<MachineView>> {
        let prefixes = vec![self.keys.dir(keys::MACHINES), self.keys.dir(keys::METADATA)];
        let (_, kvs) = self.list("listing machines", &prefixes).await?;
        Ok(records::machines(&self.keys, &kvs))
    }

    async fn unit_states(&self) -> Result<Vec<StateRecord>> {
        let kvs = self
            .get_prefix("listing unit states", &self.keys.dir(keys::STATES))
            .await?;
        let mut states = records::states(&self.keys, &kvs);
        states.sort_by(|a, b| (&a.name, &a.machine_id).cmp(&(&b.name, &b.machine_id)));
        Ok(states)
    }

    async fn set_machine_metadata(
        &self,
        machine: &str,
        key: &str,
        value: Option<&str>,
    ) -> Result<()> {
        let k = self.keys.metadata(machine, key);
        let mut kv = self.kv();
        match value {
            Some(v) => {
                self.timed(
                    OpKind::Set,
                    "setting machine metadata",
                    &k,
                    kv.put(k.as_str(), v, None),
                )
                .await?;
            }
            None => {
                self.timed(
                    OpKind::Set,
                    "deleting machine metadata",
                    &k,
                    kv.delete(k.as_str(), None),
                )
                .await?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A creation writer that ends otherwise than by finding nothing to write (a panic, its
    /// task dropped) gives its claim back, and the creations waiting get an error instead of
    /// waiting for a writer that is gone.
    #[tokio::test]
    async fn a_writer_that_ends_abruptly_gives_back_its_claim_and_answers_the_waiting() {
        let creations = Arc::new(std::sync::Mutex::new(Creations::default()));
        let (done, answer) = oneshot::channel();
        {
            let mut q = creations.lock().expect("lock");
            q.writing = true;
            q.waiting.push(Creation {
                name: UnitName::parse("a.service").expect("name"),
                file: UnitFile::from_options(vec![]),
                desired: TargetState::Launched,
                done,
            });
        }
        // a writer that panics
        let slot = WriterSlot(Some(creations.clone()));
        let task = tokio::spawn(async move {
            let _slot = slot;
            panic!("a writer that fails");
        });
        assert!(task.await.is_err(), "the writer panicked");
        assert!(answer.await.is_err(), "the waiting creation is answered");
        let q = creations.lock().expect("lock");
        assert!(
            !q.writing,
            "the claim given back: the next creation starts a writer"
        );
        assert!(q.waiting.is_empty());
    }
}
