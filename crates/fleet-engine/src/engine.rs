//! The engine: a struct that handles one [`Event`] at a time (campaign, reconcile and step
//! down are its methods), and the loop that feeds it from one `select!`.
//!
//! A candidate that does not lead follows the leader key alone; only a leader lists and
//! mirrors the engine's keys, and it drops that mirror when it stops leading. Every fleetd
//! is a candidate, so the mirror's memory and decoding are paid once per cluster, not once
//! per machine.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use fleet_metrics::{EngineFailure, Metrics};
use fleet_registry::{
    AtMostOnce, ENGINE_OPS_PER_TXN, EngineModel, EngineOp, EngineStore, KeyRange, Leadership,
    RegistryError, UnitRecord, WatchEvent,
};
use fleet_scheduler::fasthash::{FastMap, FastSet};
use fleet_unit::{AT_MOST_ONCE_IGNORED, Requirements, TargetState, UnitFile, UnitHash, UnitName};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::plan::{diff, to_scheduler_snapshot};

/// After a burst of watch events the engine reconciles once, this long after the first.
const DEBOUNCE: Duration = Duration::from_millis(50);
/// How long a unit whose decisions etcd refused is left alone before the engine tries again
/// (each try of a refused batch costs one more write per unit).
const REFUSED_WAIT: Duration = Duration::from_secs(30);
/// A change after a quiet spell (no reconcile for [`DEBOUNCE`]) is acted on this soon: one
/// `fleetctl start` is not held for a burst that is not coming. A burst's later changes are
/// gathered for [`DEBOUNCE`] as ever.
const PROMPT: Duration = Duration::from_millis(2);
/// What fleetd spreads its candidates' campaigns over once the leader key is gone (see
/// [`EngineConfig::campaign_spread`]); never more than the reconcile interval.
pub const CAMPAIGN_SPREAD: Duration = Duration::from_secs(1);

/// How long after a watch event the leader reconciles, `since` the end of its last
/// reconcile, which took `took`. After a quiet spell at least as long as that reconcile (and
/// [`DEBOUNCE`]), [`PROMPT`]ly; during a burst, once it has rested as long as it last worked
/// (and at least [`DEBOUNCE`] later). A reconcile reads every unit, so at 100,000 units one
/// takes a second or more: back to back, through a burst of creations, they would hold a
/// core the API and etcd need to take those creations, while each decided little more than
/// the one before. Resting as long as it worked keeps the engine to half a core at most, and
/// places a burst's last unit within two reconciles of its arrival.
fn reconcile_delay(since: Option<Duration>, took: Duration) -> Duration {
    let rest = took.max(DEBOUNCE);
    match since {
        Some(s) if s < rest => took.saturating_sub(s).max(DEBOUNCE),
        _ => PROMPT,
    }
}

#[derive(Debug, Clone)]
pub struct EngineConfig {
    pub machine_id: String,
    /// fleet's `engine_reconcile_interval`.
    pub reconcile_interval: Duration,
    /// fleet's `agent_ttl`: how long a new leader keeps units on machines it has not seen.
    pub agent_ttl: Duration,
    /// fleet's `disable_watches`: re-list every interval instead of watching.
    pub disable_watches: bool,
    /// Once a candidate sees that nobody leads, it waits a delay in `[0, campaign_spread)`
    /// before campaigning (its own, drawn from its machine ID and the revision that showed
    /// the leader key gone): the first winner's key reaches the others before most of them
    /// campaign, so a thousand candidates do not grant a thousand leases in one burst when
    /// the leader dies. With N candidates the first campaigns about `spread / (N + 1)` after
    /// the key went. Zero: at once (tests).
    pub campaign_spread: Duration,
}

/// What the engine reacts to.
#[derive(Debug)]
pub(crate) enum Event {
    /// A change of the watched keys: the leader key while not leading, the mirrored keys
    /// while leading (or a fresh snapshot, or a disconnection).
    Watch(WatchEvent),
    /// The watch ended; the engine watches again.
    WatchClosed,
    /// Time to reconcile: the interval, or a quiet moment after a burst of watch events.
    Tick,
    /// The leadership lease is gone.
    LeadershipLost,
    Shutdown,
}

/// Leadership this engine holds.
struct Leader {
    leadership: Leadership,
    since: Instant,
    /// Machines this leader has seen present. Only machines it never saw get the grace
    /// period: one that was here and left has really left.
    seen: HashSet<String>,
    /// Whether this leader has taken over the two-step moves its predecessor may have left
    /// half done (see [`adopt_half_done_moves`]), in a reconcile that read every body.
    adopted_moves: bool,
}

pub(crate) struct Engine {
    store: Arc<dyn EngineStore>,
    cfg: EngineConfig,
    metrics: Metrics,
    /// The leader key's watch while not leading, the mirror's while leading.
    watch: mpsc::Receiver<WatchEvent>,
    /// While leading, the engine's keys as the watch reported them, decoded, at
    /// `mirror_rev`: each watch event decodes its one record, so a reconcile never decodes
    /// every unit again. `None` while not leading (and until a new leader's listing came).
    model: Option<EngineModel>,
    mirror_rev: i64,
    /// The revision up to which the mirror holds the range of the engine's own writes
    /// (placement/, reasons/, schedule/): the listing's, then that range's last watch event.
    /// The mirror watches its ranges with one etcd watcher each, and etcd orders events
    /// within a watcher, not across them: under load a busy watcher falls behind while
    /// another (machines leaving) runs ahead, so `mirror_rev` alone may pass the engine's
    /// last write before that write is in the mirror. Seen in fleet-sim (300 x 30,000, 10 %
    /// killed): a second reconcile moved the same units again, and they ran on two machines.
    decisions_rev: i64,
    /// The revision of the last event of that range taken in. It counts in
    /// `decisions_rev` once the watch says its revision is whole ([`WatchEvent::Through`]):
    /// a transaction of the engine's comes as one event per key, and a reconcile between
    /// them decided from half of it. Seen in fleet-sim (1,000 x 100,000, 10 % killed): units
    /// of a batch of moves whose events had not come yet looked still on the dead machines,
    /// were moved a second time elsewhere, and ran on two machines until the next reconcile.
    decisions_seen: i64,
    /// That range: every key the engine writes is in it.
    decisions_range: KeyRange,
    /// Whether what is watched is a fresh snapshot (the engine decides from nothing else).
    synced: bool,
    /// Whether the leader key exists, as the leader watch last said (while not leading).
    leader_present: bool,
    /// When this candidate campaigns, having seen nobody lead (see
    /// [`EngineConfig::campaign_spread`]); `None` while somebody leads.
    campaign_at: Option<Instant>,
    /// The revision of this engine's last write (or of its election): it never decides from
    /// a mirror older than that.
    written_rev: i64,
    /// A decision write failed in a way that may have landed anyway (a timeout after the
    /// commit, or not yet committed: etcd may still apply it). Before deciding again the
    /// leader moves its fence, so that such a write fails if it has not landed yet, and only
    /// then lists again: the listing holds whatever did land. (Relisting alone left a
    /// window: a write landing after the listing, and a reconcile from that listing placing
    /// its units a second time; fleet-sim saw 4 units on two machines.)
    refence_due: bool,
    leader: Option<Leader>,
    /// Requirements by unit body, read once (bodies never change under a hash).
    /// One entry per unit (its body's hash beside it), looked up without copying the name.
    requirements: RequirementsCache,
    /// Units whose decisions etcd refused, until when they are left alone.
    refused: HashMap<String, Instant>,
    /// Units whose record could not be read at the last reconcile (said once each).
    unreadable: std::collections::BTreeSet<String>,
    /// The interval of reconciles (zero would panic tokio; fleet-config refuses below 1 ms).
    tick: tokio::time::Interval,
    /// When the debounced reconcile after a burst of watch events is due.
    deadline: Option<Instant>,
    /// Machines holding at-most-once units, absent since this engine saw them leave (or,
    /// when it did not see that, since it first found them absent): such units move only
    /// `AtMostOnce::start_after` later. Forgotten when a machine comes back (a listing that
    /// shows it, too), and wholly when the engine stops leading or lists again after a blind
    /// spell long enough to have missed a return that mattered (see `apply_watch`).
    absent_since: HashMap<String, Instant>,
    /// When the mirror stopped being a fresh view (a disconnection, a relist): a listing
    /// that follows a short blind spell keeps `absent_since` for machines still absent.
    unsynced_at: Option<Instant>,
    /// At-most-once units this engine took off a machine that is still there, to place them
    /// elsewhere: with that machine and when. They are placed again only once the old copy
    /// has surely stopped (see [`Engine::move_at_most_once_in_two_steps`]).
    moving: HashMap<String, (String, Instant)>,
    /// When the last reconcile ran (a change after a quiet spell is acted on promptly).
    last_reconcile: Option<Instant>,
    /// How long the last reconcile took to decide: the engine rests as long before the next
    /// one (see [`reconcile_delay`]).
    last_took: Duration,
    /// How long the last reconcile took to decide, its writes not counted (`None`: it ended
    /// before it had decided, and its whole time counts).
    deciding: Option<Duration>,
    /// How many changes the mirror has taken in (listings and watch events). Not its
    /// revision: the ranges' watchers deliver out of step, so an event of one range may come
    /// after a later revision of another.
    mirror_changes: u64,
    /// `mirror_changes` at the last reconcile that left nothing to do later: it wrote
    /// nothing, and nothing in it waited on time (no hold of a new leader, no at-most-once
    /// wait or move, no refused unit). A reconcile from the same view would decide the same,
    /// so the interval's ticks skip it: at 100,000 units a reconcile costs a second or more of
    /// CPU, and a machine leaving waited behind one that could not change anything.
    settled_at: Option<u64>,
}

/// Runs CPU-bound `work` (a reconcile, whose cost grows with what users stored) on tokio's
/// blocking pool, so that it never holds one of the runtime's few workers: the API, the
/// agent and lease keep-alives go on meanwhile.
async fn off_runtime<T: Send + 'static>(
    work: impl FnOnce() -> T + Send + 'static,
) -> Result<T, tokio::task::JoinError> {
    tokio::task::spawn_blocking(work).await
}

/// Runs the engine until `shutdown` is cancelled; on shutdown a leader resigns at once so
/// another engine takes over without waiting for the lease to expire.
pub async fn run(
    store: Arc<dyn EngineStore>,
    cfg: EngineConfig,
    metrics: Metrics,
    shutdown: CancellationToken,
) {
    let mut engine = Engine::new(store, cfg, metrics);
    loop {
        let event = engine.next_event(&shutdown).await;
        if !engine.handle(event).await {
            return;
        }
    }
}

impl Engine {
    pub(crate) fn new(store: Arc<dyn EngineStore>, cfg: EngineConfig, metrics: Metrics) -> Engine {
        let mut tick = tokio::time::interval(cfg.reconcile_interval.max(Duration::from_millis(1)));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let poll = cfg.disable_watches.then_some(cfg.reconcile_interval);
        Engine {
            watch: store.watch_leader(poll),
            model: None,
            decisions_rev: 0,
            decisions_seen: 0,
            decisions_range: decisions_range(store.keys()),
            store,
            cfg,
            metrics,
            mirror_rev: 0,
            synced: false,
            leader_present: false,
            campaign_at: None,
            written_rev: 0,
            refence_due: false,
            leader: None,
            requirements: RequirementsCache::default(),
            unreadable: Default::default(),
            refused: HashMap::new(),
            tick,
            deadline: None,
            absent_since: HashMap::new(),
            unsynced_at: None,
            moving: HashMap::new(),
            last_reconcile: None,
            last_took: Duration::ZERO,
            deciding: None,
            mirror_changes: 0,
            settled_at: None,
        }
    }

    /// How long the engine rests after its last reconcile (see [`reconcile_delay`]).
    #[cfg(test)]
    pub(crate) fn rest(&self) -> Duration {
        self.last_took
    }

    #[cfg(test)]
    pub(crate) fn is_leader(&self) -> bool {
        self.leader.is_some()
    }

    /// Whether the engine holds a mirror of the engine's keys (only a leader does).
    #[cfg(test)]
    pub(crate) fn has_model(&self) -> bool {
        self.model.is_some()
    }

    /// A watch event already delivered, if any (tests feed them one by one).
    #[cfg(test)]
    pub(crate) fn delivered(&mut self) -> Option<WatchEvent> {
        self.watch.try_recv().ok()
    }

    /// Whether a debounced reconcile is pending.
    #[cfg(test)]
    pub(crate) fn reconcile_pending(&self) -> bool {
        self.deadline.is_some()
    }

    /// Waits for the next event.
    pub(crate) async fn next_event(&mut self, shutdown: &CancellationToken) -> Event {
        let lease_lost = async {
            match &self.leader {
                Some(l) => l.leadership.lease.lost().await,
                None => std::future::pending().await,
            }
        };
        let deadline = self.deadline;
        let soon = async {
            match deadline {
                Some(d) => tokio::time::sleep_until(d).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = shutdown.cancelled() => Event::Shutdown,
            ev = self.watch.recv() => ev.map(Event::Watch).unwrap_or(Event::WatchClosed),
            _ = lease_lost => Event::LeadershipLost,
            _ = self.tick.tick() => Event::Tick,
            _ = soon => { self.deadline = None; Event::Tick }
        }
    }

    /// Handles one event; false when the engine is done (shutdown).
    pub(crate) async fn handle(&mut self, event: Event) -> bool {
        match event {
            Event::Shutdown => {
                if let Some(l) = self.leader.take() {
                    info!("engine resigning leadership");
                    self.store.resign(l.leadership).await;
                }
                return false;
            }
            Event::WatchClosed => {
                warn!("engine watch ended; restarting it");
                self.rewatch();
            }
            Event::LeadershipLost => {
                warn!("engine lost its leadership lease");
                self.step_down();
            }
            Event::Watch(WatchEvent::Disconnected) => self.unsync(),
            Event::Watch(ev) if self.leader.is_none() => {
                self.follow_leader_key(ev);
                // nobody leads: campaign at this candidate's moment rather than at the next
                // tick
                if self.synced && !self.leader_present && self.deadline.is_none() {
                    let at = self.campaign_at.unwrap_or_else(|| Instant::now() + PROMPT);
                    self.deadline = Some(at);
                }
            }
            Event::Watch(ev) => {
                self.apply_watch(ev).await;
                // reconcile on ticks (the interval, or a quiet moment after a burst of watch
                // events), never once per event
                // (a deadline already set may be the end of an at-most-once wait, far off: the
                // earlier of the two)
                if self.synced {
                    let since = self.last_reconcile.map(|t| t.elapsed());
                    let due = Instant::now() + reconcile_delay(since, self.last_took);
                    self.deadline = Some(self.deadline.map_or(due, |d| d.min(due)));
                }
            }
            Event::Tick => {
                if self.synced && self.leader.is_none() {
                    match self.campaign_at {
                        // not this candidate's moment yet (a tick of the interval): wait
                        Some(at) if Instant::now() < at => {
                            self.deadline = Some(self.deadline.map_or(at, |d| d.min(at)));
                        }
                        // (winning switches to the mirror's watch: decisions wait for its
                        // listing)
                        _ => self.campaign().await,
                    }
                }
                if self.synced && self.leader.is_some() {
                    // (an interval tick, too, waits until the engine has rested as long as
                    // its last reconcile took: a reconcile longer than the interval would
                    // otherwise start the next at once)
                    let now = Instant::now();
                    let rested = self
                        .last_reconcile
                        .map_or(Duration::MAX, |t| now.saturating_duration_since(t));
                    if rested < self.last_took {
                        let due = now + (self.last_took - rested);
                        self.deadline = Some(self.deadline.map_or(due, |d| d.min(due)));
                    } else if self.reconcile().await {
                        // the rest is as long as the deciding took, not the writing: a mass
                        // reschedule's writes wait seconds on etcd with the engine idle, and
                        // the machines that left meanwhile waited that long again (bounded
                        // by the interval)
                        let end = Instant::now();
                        let took = end.saturating_duration_since(now);
                        self.last_took = self
                            .deciding
                            .unwrap_or(took)
                            .min(self.cfg.reconcile_interval);
                        self.last_reconcile = Some(end);
                    }
                }
            }
        }
        true
    }

    /// When this candidate campaigns, having seen at `revision` that nobody leads: a delay in
    /// `[0, campaign_spread)` (capped by the reconcile interval) from now, drawn from its
    /// machine ID and that revision. Every candidate sees the same revision, so the draws
    /// differ by machine, and by failover for one machine: no candidate always goes first.
    fn campaign_moment(&self, revision: i64) -> Instant {
        let spread = self.cfg.campaign_spread.min(self.cfg.reconcile_interval);
        Instant::now() + campaign_delay(&self.cfg.machine_id, revision, spread)
    }

    /// What the leader key's watch says (while not leading): whether somebody leads.
    fn follow_leader_key(&mut self, ev: WatchEvent) {
        let key = self.store.keys().leader();
        match ev {
            WatchEvent::Snapshot { kvs, revision } => {
                self.leader_present = kvs.iter().any(|(k, _)| *k == key);
                self.campaign_at = (!self.leader_present).then(|| self.campaign_moment(revision));
                self.synced = true;
            }
            WatchEvent::Put { key: k, .. } if k == key => {
                self.leader_present = true;
                self.campaign_at = None;
            }
            WatchEvent::Delete { key: k, revision } if k == key => {
                let at = self.campaign_moment(revision);
                debug!(
                    in_ms = at.saturating_duration_since(Instant::now()).as_millis() as u64,
                    "leader key deleted; campaigning"
                );
                self.leader_present = false;
                self.campaign_at = Some(at);
            }
            WatchEvent::Put { .. } | WatchEvent::Delete { .. } | WatchEvent::Through { .. } => {}
            WatchEvent::Disconnected => self.unsync(),
        }
    }

    async fn apply_watch(&mut self, ev: WatchEvent) {
        match ev {
            WatchEvent::Snapshot { revision, kvs } => {
                // a machine may have come back and left again unseen while the mirror was
                // stale: only a blind spell shorter than a rejoined machine's hold (during
                // which it starts no at-most-once unit) keeps the absences known
                let blind = match (self.synced, self.unsynced_at) {
                    (true, _) => Duration::ZERO,
                    (false, Some(t)) => t.elapsed(),
                    (false, None) => Duration::MAX,
                };
                self.unsynced_at = None;
                if blind >= AtMostOnce::for_ttl(self.cfg.agent_ttl).hold_after_rejoin {
                    self.absent_since.clear();
                }
                // absences end for the machines the listing shows present
                let keys = self.store.keys();
                let back: Vec<String> = self
                    .absent_since
                    .keys()
                    .filter(|id| kvs_has(&kvs, &keys.machine(id)))
                    .cloned()
                    .collect();
                for id in back {
                    self.absent_since.remove(&id);
                }
                // decoding a whole listing grows with the cluster: off the runtime's workers
                let mut model = EngineModel::new(self.store.keys());
                let (keys_listed, decode_started) = (kvs.len(), Instant::now());
                let decoded = off_runtime(move || {
                    model.reset(kvs.iter().map(|(k, v)| (k, v)));
                    model
                })
                .await;
                match decoded {
                    Ok(model) => {
                        self.decisions_rev = revision;
                        self.decisions_seen = revision;
                        debug!(
                            keys = keys_listed,
                            decode_ms = decode_started.elapsed().as_millis() as u64,
                            "engine listing decoded"
                        );
                        self.model = Some(model);
                        self.mirror_rev = revision;
                        self.mirror_changes += 1;
                        self.synced = true;
                    }
                    Err(e) => {
                        warn!(error = %e, "decoding the engine's listing failed; listing again");
                        self.rewatch();
                    }
                }
            }
            WatchEvent::Put {
                key,
                value,
                revision,
            } => {
                if let Some(id) = key.strip_prefix(&self.store.keys().machine("")) {
                    // a machine (re)registered: its absence, if any, is over
                    self.absent_since.remove(id);
                }
                if self.decisions_range.contains(&key) {
                    self.decisions_seen = self.decisions_seen.max(revision);
                }
                if let Some(model) = self.model.as_mut() {
                    model.put(&key, &value);
                    self.mirror_rev = self.mirror_rev.max(revision);
                    self.mirror_changes += 1;
                }
            }
            WatchEvent::Delete { key, revision } => {
                if let Some(id) = key.strip_prefix(&self.store.keys().machine("")) {
                    debug!(machine = %id, "machine left");
                }
                if self.decisions_range.contains(&key) {
                    self.decisions_seen = self.decisions_seen.max(revision);
                }
                if let Some(model) = self.model.as_mut() {
                    model.delete(&key);
                    self.mirror_rev = self.mirror_rev.max(revision);
                    self.mirror_changes += 1;
                }
            }
            WatchEvent::Through { .. } => {
                // the events taken in so far are whole revisions
                self.decisions_rev = self.decisions_rev.max(self.decisions_seen);
            }
            WatchEvent::Disconnected => self.unsync(),
        }
    }

    /// Lists again before deciding anything more: the mirror while leading, the leader key
    /// otherwise.
    fn rewatch(&mut self) {
        let poll = self
            .cfg
            .disable_watches
            .then_some(self.cfg.reconcile_interval);
        self.watch = if self.leader.is_some() {
            self.store.watch_engine(poll)
        } else {
            self.store.watch_leader(poll)
        };
        self.unsync();
    }

    /// The mirror is no longer a fresh view.
    fn unsync(&mut self) {
        if self.synced || self.unsynced_at.is_none() {
            self.unsynced_at = Some(Instant::now());
        }
        self.synced = false;
    }

    /// Tries to lead when nobody does; on winning, lists the engine's keys (the mirror) before
    /// deciding anything.
    pub(crate) async fn campaign(&mut self) {
        if self.leader_present {
            return;
        }
        let ttl = self.cfg.reconcile_interval.saturating_mul(5);
        match self.store.campaign(&self.cfg.machine_id, ttl).await {
            Ok(Some(l)) => {
                info!(machine = %self.cfg.machine_id, "engine became leader");
                self.metrics.engine_leader();
                self.written_rev = l.create_revision;
                self.refence_due = false;
                self.leader = Some(Leader {
                    leadership: l,
                    since: Instant::now(),
                    seen: HashSet::new(),
                    adopted_moves: false,
                });
                self.model = None;
                self.rewatch();
            }
            Ok(None) => {}
            Err(e) => debug!(error = %e, "campaign failed"),
        }
    }

    /// Gives up leadership: forgets it and revokes its lease in the background, so the
    /// leader key goes at once and another engine can win; drops the mirror and what was
    /// derived from it, and follows the leader key alone again.
    pub(crate) fn step_down(&mut self) {
        self.absent_since.clear();
        self.settled_at = None;
        let Some(l) = self.leader.take() else {
            return;
        };
        // a move begun in this term is the next leader's to adopt (see
        // [`adopt_half_done_moves`]); a deadline of this term (an at-most-once wait) must not
        // hold back the campaign of the next
        self.moving = HashMap::new();
        self.deadline = None;
        self.last_took = Duration::ZERO;
        self.last_reconcile = None;
        let store = self.store.clone();
        tokio::spawn(async move { store.resign(l.leadership).await });
        self.model = None;
        self.mirror_rev = 0;
        self.decisions_rev = 0;
        self.decisions_seen = 0;
        self.refence_due = false;
        self.requirements = RequirementsCache::default();
        self.unreadable = Default::default();
        self.refused = HashMap::new();
        // our own key may still be there until the resignation lands: the watch says when
        self.leader_present = true;
        self.campaign_at = None;
        self.rewatch();
    }

    /// One reconcile of a leader: decide from the mirror, write the difference. False when
    /// it did not run: its own last write has not come back yet, or nothing changed since a
    /// reconcile that left nothing to do.
    pub(crate) async fn reconcile(&mut self) -> bool {
        if self.refence_due {
            self.refence().await;
            return false;
        }
        if self.mirror_rev < self.written_rev || self.decisions_rev < self.written_rev {
            // our own last write has not come back through the watch yet
            return false;
        }
        if self.settled_at == Some(self.mirror_changes) {
            // nothing changed since a reconcile that left nothing to do
            return false;
        }
        self.settled_at = None;
        self.deciding = None;
        self.decide().await;
        true
    }

    /// Moves the fence after a write of unknown outcome (see `refence_due`), then lists
    /// again; tried again at the next tick while etcd does not answer.
    async fn refence(&mut self) {
        let Some(l) = self.leader.as_mut() else {
            self.refence_due = false;
            return;
        };
        match self.store.refence(&l.leadership).await {
            Ok(rev) => {
                debug!(fence = rev, "engine fence moved; listing again");
                l.leadership.fence = rev;
                self.written_rev = self.written_rev.max(rev);
                self.refence_due = false;
                self.rewatch();
            }
            Err(RegistryError::NotLeader) => {
                warn!("the leader key is no longer this engine's; stepping down");
                self.step_down();
            }
            Err(e) => debug!(error = %e, "moving the engine's fence failed; trying again"),
        }
    }

    /// The body of [`Engine::reconcile`].
    async fn decide(&mut self) {
        let started = Instant::now();
        let Some(model) = self.model.as_mut() else {
            return;
        };
        let snap = model.snapshot(self.mirror_rev);
        if snap.leader.as_deref() != Some(self.cfg.machine_id.as_str()) {
            // The mirror is past our election, so it holds our leader key unless that key is
            // gone (deleted by hand, or expired while we did not notice): we do not lead.
            warn!("the leader key is no longer this engine's; stepping down");
            self.step_down();
            return;
        }
        // each body once: a new leader needs every unit's, and many units share one (a
        // template's instances)
        let bodies_needed: Vec<UnitHash> = snap
            .units
            .iter()
            .filter(|u| {
                !u.global
                    && self
                        .requirements
                        .get(&u.name)
                        .is_none_or(|(h, _)| *h != u.hash)
            })
            .map(|u| u.hash)
            .collect::<FastSet<UnitHash>>()
            .into_iter()
            .collect();
        let snapshot_ms = started.elapsed().as_millis() as u64;
        let (bodies, refused_bodies) = match self.read_bodies(&bodies_needed).await {
            Ok(b) => b,
            Err(e) => {
                // (not one of fleet's reconcile failure types, which count units: logged)
                warn!(error = %e, "reading unit bodies failed");
                return;
            }
        };
        let requirements = &mut self.requirements;
        // a body etcd refused or did not have is read again next time (not cached): such a
        // reconcile is not settled, or no tick would try again until the mirror changed
        let mut body_unread = false;
        let mut req_of = |rec: &UnitRecord| -> Result<Requirements, String> {
            if let Some((h, r)) = requirements.get(&rec.name)
                && *h == rec.hash
            {
                return r.clone();
            }
            if let Some(e) = refused_bodies.get(&rec.hash) {
                body_unread = true;
                return Err(format!(
                    "unit file {} cannot be read: {e}",
                    rec.hash.short()
                ));
            }
            let Some(file) = bodies.get(&rec.hash) else {
                body_unread = true;
                return Err(format!(
                    "unit file {} missing from the registry",
                    rec.hash.short()
                ));
            };
            let r = Requirements::from_unit(&rec.name, file)
                .map(|(r, warnings)| {
                    // (a stored value fleet v1.0 took as an unknown key: false, as there)
                    for w in warnings
                        .iter()
                        .filter(|w| w.starts_with(AT_MOST_ONCE_IGNORED))
                    {
                        warn!(unit = %rec.name, "{w}");
                    }
                    r
                })
                .map_err(|e| e.to_string());
            requirements.insert(rec.name.clone(), (rec.hash, r.clone()));
            r
        };
        let (sched_snap, invalid) = to_scheduler_snapshot(&snap, &mut req_of);
        if self.requirements.len() > 2 * snap.units.len() + 64 {
            // forget destroyed units (the cache would otherwise grow with every unit ever seen)
            let live: HashMap<&UnitName, &UnitHash> =
                snap.units.iter().map(|u| (&u.name, &u.hash)).collect();
            self.requirements
                .retain(|n, (h, _)| live.get(n).is_some_and(|l| *l == h));
        }
        let bodies_ms = started.elapsed().as_millis() as u64;
        let plan = match off_runtime(move || fleet_scheduler::reconcile(&sched_snap)).await {
            Ok(plan) => plan,
            Err(e) => {
                warn!(error = %e, "the scheduler failed");
                return;
            }
        };
        let waiting = self.wait_for_at_most_once(&snap);
        let Some(l) = self.leader.as_mut() else {
            return;
        };
        // what a new leader has seen matters only while it holds placements (one agent_ttl)
        if l.since.elapsed() < self.cfg.agent_ttl {
            l.seen.extend(snap.machines.iter().map(|m| m.id.clone()));
        } else if !l.seen.is_empty() {
            l.seen = HashSet::new();
        }
        let in_hold = l.since.elapsed() < self.cfg.agent_ttl;
        let held = held_machines(l, &snap, self.cfg.agent_ttl);
        let mut ops = diff(&snap, &plan, &invalid, &held);
        // a unit whose record cannot be read is not a destroyed one: its placement stays
        // as it is (the agent, likewise, leaves it running)
        for u in snap.unreadable.difference(&self.unreadable) {
            warn!(unit = %u, "unit record cannot be read; leaving its placement as it is");
        }
        self.unreadable.clone_from(&snap.unreadable);
        ops.retain(|op| !snap.unreadable.contains(op.unit()));
        ops.retain(|op| !waiting.contains(op.unit()));
        if !l.adopted_moves {
            // (until a reconcile has read every body: a unit whose body could not be read is
            // not known to be at-most-once yet)
            l.adopted_moves = !body_unread;
            adopt_half_done_moves(&mut self.moving, &self.requirements, &snap, l.since);
        }
        let parked = move_at_most_once_in_two_steps(
            &mut self.moving,
            &self.requirements,
            AtMostOnce::for_ttl(self.cfg.agent_ttl),
            &snap,
            &mut ops,
        );
        if let Some(n) = parked {
            self.deadline = Some(self.deadline.map_or(n, |d| d.min(n)));
        }
        let timeless = !in_hold
            && !body_unread
            && waiting.is_empty()
            && parked.is_none()
            && self.moving.is_empty();
        // a unit whose keys etcd refused is tried again only after a while
        let now = Instant::now();
        self.refused.retain(|_, until| now < *until);
        ops.retain(|op| !self.refused.contains_key(op.unit()));
        report_failures(&self.metrics, &snap, &plan, &ops);
        self.deciding = Some(started.elapsed());
        if ops.is_empty() {
            if timeless && self.refused.is_empty() {
                self.settled_at = Some(self.mirror_changes);
            }
            debug!(
                units = snap.units.len(),
                bodies = bodies_needed.len(),
                snapshot_ms,
                bodies_ms,
                took_ms = started.elapsed().as_millis() as u64,
                "engine reconciled: nothing to write"
            );
            self.metrics.engine_reconcile_success(started.elapsed());
            return;
        }
        let decided_ms = started.elapsed().as_millis() as u64;
        debug!(
            ops = ops.len(),
            units = snap.units.len(),
            bodies = bodies_needed.len(),
            snapshot_ms,
            bodies_ms,
            decided_ms,
            "engine writing decisions"
        );
        // several units' decisions per fenced transaction, several transactions in flight
        let batches = batches_by_unit(&ops);
        let results = self.store.apply_batches(&l.leadership, &batches).await;
        let mut written = Vec::with_capacity(batches.len());
        let mut refused = Vec::new();
        for (batch, result) in batches.into_iter().zip(results) {
            match result {
                Err(e) if e.is_refused() => {
                    warn!(error = %e, ops = batch.len(), "engine write refused; writing its units one by one");
                    refused.extend(batch);
                }
                r => written.push((batch, r)),
            }
        }
        if !refused.is_empty() && written.iter().all(|(_, r)| r.is_ok()) {
            // etcd refuses one of the keys (a permission, a value too large): write that
            // batch unit by unit, so that one unit's keys do not hold up the others
            written.extend(apply_unit_by_unit(self.store.as_ref(), &l.leadership, &refused).await);
        } else if !refused.is_empty() {
            // a deposed leader or an unreachable etcd: the next leader or listing decides
            self.count_failed(&refused);
        }
        debug!(
            took_ms = started.elapsed().as_millis() as u64,
            "engine decisions written"
        );
        if self.written(written) {
            self.metrics.engine_reconcile_success(started.elapsed());
        }
        if self.refence_due {
            // at once: a deposed leader steps down now, not a tick later
            self.refence().await;
        }
    }

    /// The at-most-once units scheduled on machines that left less than
    /// `AtMostOnce::start_after` ago: their old copy may still be stopping, so they stay
    /// placed as they are for now (and a reconcile is due when the first wait ends). The
    /// reasoning behind the wait: [`fleet_registry::AtMostOnce`].
    fn wait_for_at_most_once(&mut self, snap: &fleet_registry::EngineSnapshot) -> HashSet<String> {
        // a machine whose record cannot be read is not absent
        let present: FastSet<&str> = snap
            .machines
            .iter()
            .map(|m| m.id.as_str())
            .chain(snap.unreadable_machines.iter().map(String::as_str))
            .collect();
        // only absent machines that still hold at-most-once units are remembered
        let mut was = std::mem::take(&mut self.absent_since);
        let wait = AtMostOnce::for_ttl(self.cfg.agent_ttl).start_after;
        let now = Instant::now();
        let mut waiting = HashSet::new();
        let mut next: Option<Instant> = None;
        for u in &snap.units {
            let Some((machine, _)) = snap.schedules.get(u.name.as_str()) else {
                continue;
            };
            if present.contains(machine.as_str()) {
                continue;
            }
            let at_most_once = self
                .requirements
                .get(&u.name)
                .is_some_and(|(h, r)| *h == u.hash && r.as_ref().is_ok_and(|r| r.at_most_once));
            if !at_most_once {
                continue;
            }
            let since = *self
                .absent_since
                .entry(machine.clone())
                .or_insert_with(|| was.remove(machine).unwrap_or(now));
            let ends = since + wait;
            if now < ends {
                waiting.insert(u.name.to_string());
                next = Some(next.map_or(ends, |n| n.min(ends)));
            }
        }
        if !waiting.is_empty() {
            debug!(
                units = waiting.len(),
                "at-most-once units wait for their old copies to stop before moving"
            );
        }
        if let Some(n) = next {
            self.deadline = Some(self.deadline.map_or(n, |d| d.min(n)));
        }
        waiting
    }

    /// Unit bodies by hash, and those etcd refuses to give (with why). A refused batch is read
    /// again one body at a time, so one body that cannot be read (a permission on its key)
    /// does not keep the engine from deciding about every other unit.
    async fn read_bodies(
        &self,
        hashes: &[UnitHash],
    ) -> Result<(HashMap<UnitHash, UnitFile>, HashMap<UnitHash, String>), RegistryError> {
        match self.store.unit_bodies(hashes).await {
            Ok(b) => return Ok((b, HashMap::new())),
            Err(e) if e.is_refused() => {
                warn!(error = %e, "reading unit bodies refused; reading them one by one");
            }
            Err(e) => return Err(e),
        }
        let (mut bodies, mut refused) = (HashMap::new(), HashMap::new());
        for h in hashes {
            match self.store.unit_bodies(std::slice::from_ref(h)).await {
                Ok(b) => bodies.extend(b),
                Err(e) if e.is_refused() => {
                    refused.insert(*h, e.to_string());
                }
                Err(e) => return Err(e),
            }
        }
        Ok((bodies, refused))
    }

    /// What the writes of a reconcile did, batch by batch (or unit by unit): the units etcd
    /// refuses are logged, counted as failed tasks and left alone for [`REFUSED_WAIT`]; a
    /// write refused by the fence, or that failed otherwise (it may have landed anyway, a
    /// timeout after commit, or land later), ends the round: the leader moves its fence (or
    /// steps down when the leader key is no longer its own) and decides again only from a
    /// listing made after that, never from a mirror that may lack its own write. True when
    /// all was written.
    fn written(&mut self, written: Vec<(Vec<EngineOp>, Result<i64, RegistryError>)>) -> bool {
        let (mut deposed, mut failed, mut all) = (false, false, true);
        for (group, result) in written {
            all &= result.is_ok();
            match result {
                Ok(rev) => {
                    self.written_rev = self.written_rev.max(rev);
                    self.count_done(&group);
                }
                Err(RegistryError::NotLeader) => {
                    self.count_failed(&group);
                    deposed = true;
                }
                Err(e) if e.is_refused() => {
                    let unit = group
                        .first()
                        .map(|op| op.unit().to_string())
                        .unwrap_or_default();
                    warn!(%unit, error = %e, "etcd refuses this unit's decisions; trying again in {REFUSED_WAIT:?}");
                    self.count_failed(&group);
                    self.refused.insert(unit, Instant::now() + REFUSED_WAIT);
                }
                Err(e) => {
                    warn!(error = %e, "engine write failed; listing again before deciding");
                    self.count_failed(&group);
                    failed = true;
                }
            }
        }
        if deposed {
            // the fence moved: another engine's key, or our own key written again by a
            // refence of ours that landed late; the refence (fenced on the key's create
            // revision) tells which
            warn!("engine write refused: the fence moved; does this engine still lead?");
            self.refence_due = true;
        } else if failed {
            self.refence_due = true;
        }
        all
    }

    /// Tasks written: logged and counted by type.
    fn count_done(&self, ops: &[EngineOp]) {
        for op in ops {
            info!(?op, "engine decision");
            if let Some(t) = op.task_type() {
                self.metrics.engine_task(t);
            }
        }
    }

    /// Tasks whose write failed: counted as tasks and as failures, as fleet's doTask did.
    fn count_failed(&self, ops: &[EngineOp]) {
        for t in ops.iter().filter_map(EngineOp::task_type) {
            self.metrics.engine_task(t);
            self.metrics.engine_task_failure(t);
        }
    }
}

/// `ops` in batches of at most [`ENGINE_OPS_PER_TXN`] decisions (one fenced transaction
/// each), a unit's decisions never split between batches (a unit that moves is unscheduled
/// and scheduled in one transaction).
fn batches_by_unit(ops: &[EngineOp]) -> Vec<Vec<EngineOp>> {
    let mut by_unit: BTreeMap<&str, Vec<EngineOp>> = BTreeMap::new();
    for op in ops {
        by_unit.entry(op.unit()).or_default().push(op.clone());
    }
    let mut batches: Vec<Vec<EngineOp>> = Vec::new();
    for group in by_unit.into_values() {
        match batches.last_mut() {
            Some(b) if b.len() + group.len() <= ENGINE_OPS_PER_TXN => b.extend(group),
            _ => batches.push(group),
        }
    }
    batches
}

/// Writes `ops` one unit's decisions at a time (each write fenced as always), up to the
/// first answer that is not about one unit (a deposed leader, an unreachable etcd): the
/// writes made, each with its outcome.
async fn apply_unit_by_unit(
    store: &dyn EngineStore,
    leadership: &Leadership,
    ops: &[EngineOp],
) -> Vec<(Vec<EngineOp>, Result<i64, RegistryError>)> {
    let mut by_unit: BTreeMap<&str, Vec<EngineOp>> = BTreeMap::new();
    for op in ops {
        by_unit.entry(op.unit()).or_default().push(op.clone());
    }
    let mut written = Vec::with_capacity(by_unit.len());
    for group in by_unit.into_values() {
        let result = store.apply(leadership, &group).await;
        let go_on = match &result {
            Ok(_) => true,
            Err(e) => e.is_refused(),
        };
        written.push((group, result));
        if !go_on {
            break;
        }
    }
    written
}

/// fleet's per-unit reconcile failures: a unit that cannot be placed (`schedule`), a unit
/// taken off a machine that went away (`machine_away`), a unit taken off a machine that is
/// still there but can no longer run it (`run`: its options or the machine's metadata
/// changed, a conflict); counted every reconcile, as fleet did.
fn report_failures(
    metrics: &Metrics,
    snap: &fleet_registry::EngineSnapshot,
    plan: &fleet_scheduler::Plan,
    ops: &[EngineOp],
) {
    for _ in &plan.unplaceable {
        metrics.engine_reconcile_failure(EngineFailure::Schedule);
    }
    let present: HashSet<&str> = snap.machines.iter().map(|m| m.id.as_str()).collect();
    let unable: HashSet<&str> = plan
        .unschedule_reasons
        .iter()
        .filter(|(_, why)| {
            // a unit unloaded, or become global, is not one its machine is unable to run
            why.as_str() != "target state inactive" && !why.starts_with("global units")
        })
        .map(|(u, _)| u.as_str())
        .collect();
    for op in ops {
        if let EngineOp::Unschedule { unit, machine } = op {
            if !present.contains(machine.as_str()) {
                metrics.engine_reconcile_failure(EngineFailure::MachineAway);
            } else if unable.contains(unit.as_str()) {
                metrics.engine_reconcile_failure(EngineFailure::Run);
            }
        }
    }
}

/// The machines absent from the snapshot whose units stay: those whose record cannot be read
/// (they are there), and during a new leader's first `agent_ttl` those it has never seen but
/// that hold units (re-registering after an etcd blip).
fn held_machines(
    l: &Leader,
    snap: &fleet_registry::EngineSnapshot,
    agent_ttl: Duration,
) -> HashSet<String> {
    // a machine whose record cannot be read is there: its units stay
    let mut held: HashSet<String> = snap.unreadable_machines.iter().cloned().collect();
    if l.since.elapsed() >= agent_ttl {
        return held;
    }
    let present: HashSet<&str> = snap.machines.iter().map(|m| m.id.as_str()).collect();
    held.extend(
        snap.schedules
            .values()
            .map(|(m, _)| m.clone())
            .filter(|m| !present.contains(m.as_str()) && !l.seen.contains(m)),
    );
    held
}

/// Whether `unit` is an at-most-once unit, by the known requirements of its body.
fn is_at_most_once(requirements: &RequirementsCache, unit: &UnitRecord) -> bool {
    requirements
        .get(&unit.name)
        .is_some_and(|(h, r)| *h == unit.hash && r.as_ref().is_ok_and(|r| r.at_most_once))
}

/// The engine's cache of requirements by unit, with the body each was read from.
type RequirementsCache = FastMap<UnitName, (UnitHash, Result<Requirements, String>)>;

/// A leader that died between the two steps of an at-most-once move (see
/// [`move_at_most_once_in_two_steps`]) left the unit unscheduled with its old copy perhaps
/// still stopping, and nothing in etcd says where it was. So a new leader's first reconcile
/// (the first that could read every body) takes every at-most-once unit it finds unscheduled
/// and wanted running as moving from an unknown machine since its election: it is placed
/// once the old copy has surely stopped. Units that arrive later are placed at once. A
/// leader's moves end with its term ([`Engine::step_down`]).
fn adopt_half_done_moves(
    moving: &mut HashMap<String, (String, Instant)>,
    requirements: &RequirementsCache,
    snap: &fleet_registry::EngineSnapshot,
    elected: Instant,
) {
    for u in &snap.units {
        if u.desired_state != TargetState::Inactive
            && !snap.schedules.contains_key(u.name.as_str())
            && is_at_most_once(requirements, u)
        {
            moving
                .entry(u.name.to_string())
                .or_insert_with(|| (String::new(), elected));
        }
    }
}

/// An at-most-once unit moved off a machine that is still there (its metadata changed, a
/// conflict) is taken off it first and placed elsewhere only once its old copy has surely
/// stopped: written together, the new machine could start it before the old one saw its
/// schedule go. "Surely" is a time: the old machine may lose etcd just then and never see
/// the unschedule; its fence stops the unit by B + S after its last refresh, which
/// `start_after + ttl` on the engine's clock covers (see [`fleet_registry::AtMostOnce`]).
///
/// Drops from `ops` the placements that must wait, remembering in `moving` the units taken
/// off a machine; returns when the first wait ends.
fn move_at_most_once_in_two_steps(
    moving: &mut HashMap<String, (String, Instant)>,
    requirements: &RequirementsCache,
    timing: AtMostOnce,
    snap: &fleet_registry::EngineSnapshot,
    ops: &mut Vec<EngineOp>,
) -> Option<Instant> {
    let hold = timing.start_after + timing.ttl;
    let now = Instant::now();
    moving.retain(|_, (_, since)| now < *since + hold);
    let present: HashSet<&str> = snap.machines.iter().map(|m| m.id.as_str()).collect();
    let taken_off: Vec<(&String, &String)> = ops
        .iter()
        .filter_map(|op| match op {
            EngineOp::Unschedule { unit, machine } if present.contains(machine.as_str()) => {
                Some((unit, machine))
            }
            _ => None,
        })
        .collect();
    if !taken_off.is_empty() {
        // (indexed only when some unit leaves a live machine: rarely, and never in a burst
        // of placements, where every reconcile would otherwise index every unit for nothing)
        let records: HashMap<&str, &UnitRecord> =
            snap.units.iter().map(|u| (u.name.as_str(), u)).collect();
        for (unit, machine) in taken_off {
            if records
                .get(unit.as_str())
                .is_some_and(|u| is_at_most_once(requirements, u))
            {
                moving.insert(unit.clone(), (machine.clone(), now));
            }
        }
    }
    if moving.is_empty() {
        return None;
    }
    let mut next: Option<Instant> = None;
    ops.retain(|op| {
        let EngineOp::Schedule { unit, machine, .. } = op else {
            return true;
        };
        match moving.get(unit) {
            // back where it was: that machine stops or keeps it, never two copies
            Some((from, _)) if from == machine => true,
            Some((_, since)) => {
                let ends = *since + hold;
                next = Some(next.map_or(ends, |n| n.min(ends)));
                false
            }
            None => true,
        }
    });
    if next.is_some() {
        debug!("at-most-once units wait for their old copies to stop before moving");
    }
    next
}

/// A delay in `[0, spread)` for candidate `machine_id` once the leader key went at
/// `revision`: a hash of both (std's SipHash with fixed keys: the same inputs give the same
/// delay, so the engine's tests can replay it; different machines spread evenly).
fn campaign_delay(machine_id: &str, revision: i64, spread: Duration) -> Duration {
    use std::hash::{Hash, Hasher};
    let micros = u64::try_from(spread.as_micros()).unwrap_or(u64::MAX);
    if micros == 0 {
        return Duration::ZERO;
    }
    let mut h = std::hash::DefaultHasher::new();
    (machine_id, revision).hash(&mut h);
    Duration::from_micros(h.finish() % micros)
}

/// The watched range that holds every key the engine writes (schedule/, placement/,
/// reasons/): the one of the engine's ranges that holds a schedule key.
fn decisions_range(keys: &fleet_registry::keys::Keys) -> KeyRange {
    let probe = keys.schedule("m", "u.service");
    fleet_registry::engine_ranges(keys)
        .into_iter()
        .find(|r| r.contains(&probe))
        .unwrap_or_else(|| KeyRange::prefix(keys.prefix()))
}

/// Whether a listing holds `key`.
fn kvs_has(kvs: &[(String, Vec<u8>)], key: &str) -> bool {
    kvs.iter().any(|(k, _)| k == key)
}

#[cfg(test)]
mod tests {
    use std::sync::mpsc;

    use super::*;

    #[test]
    fn a_burst_waits_as_long_as_the_last_reconcile_took() {
        let ms = Duration::from_millis;
        // (since the last reconcile, how long it took) → delay
        let table = [
            // never reconciled, or quiet for longer than the debounce: promptly
            (None, ms(0), PROMPT),
            (Some(ms(60)), ms(5), PROMPT),
            // a short reconcile a moment ago: the debounce, as ever
            (Some(ms(10)), ms(5), DEBOUNCE),
            (Some(ms(0)), ms(40), DEBOUNCE),
            // a long reconcile: rest as long as it took
            (Some(ms(0)), ms(1500), ms(1500)),
            (Some(ms(1000)), ms(1500), ms(500)),
            (Some(ms(1480)), ms(1500), DEBOUNCE),
            // rested as long as it took: promptly again
            (Some(ms(1500)), ms(1500), PROMPT),
            (Some(ms(9000)), ms(1500), PROMPT),
        ];
        for (since, took, want) in table {
            assert_eq!(
                reconcile_delay(since, took),
                want,
                "since {since:?}, took {took:?}"
            );
        }
    }

    /// The work waits for a task of the same single-threaded runtime: it completes only if
    /// it runs beside the runtime rather than on it.
    #[tokio::test(flavor = "current_thread")]
    async fn reconcile_work_leaves_the_runtime_free() {
        let (tx, rx) = mpsc::channel();
        let other = tokio::spawn(async move {
            tokio::task::yield_now().await;
            tx.send(()).map_err(|_| "the work is gone")
        });
        let work = off_runtime(move || rx.recv_timeout(Duration::from_secs(10)).is_ok());
        assert_eq!(
            work.await.ok(),
            Some(true),
            "the runtime's task never ran while the work did"
        );
        assert_eq!(other.await.ok(), Some(Ok(())));
    }
}
