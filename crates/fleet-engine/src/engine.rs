//! The engine's loop: one event enum, one `select!`.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use fleet_registry::{EtcdRegistry, Leadership, RegistryError, UnitRecord, WatchEvent};
use fleet_unit::{Requirements, UnitHash, UnitName};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::plan::{diff, to_scheduler_snapshot};

#[derive(Debug, Clone)]
pub struct EngineConfig {
    pub machine_id: String,
    /// fleet's `engine_reconcile_interval`.
    pub reconcile_interval: Duration,
    /// fleet's `agent_ttl`: how long a new leader keeps units on machines it has not seen.
    pub agent_ttl: Duration,
    /// fleet's `disable_watches`: re-list every interval instead of watching.
    pub disable_watches: bool,
}

/// Counters fleetd exports as metrics.
#[derive(Debug, Default)]
pub struct EngineStats {
    pub reconciles: AtomicU64,
    pub reconcile_failures: AtomicU64,
    pub tasks: AtomicU64,
    /// Unix time (seconds) this engine last became leader; 0 when it is not leader.
    pub leader_since: AtomicU64,
    pub last_reconcile_micros: AtomicU64,
}

enum Event {
    Watch(WatchEvent),
    WatchClosed,
    Tick,
    LeaseLost,
    Shutdown,
}

struct Leader {
    leadership: Leadership,
    since: Instant,
    /// Machines this leader has seen present. Only machines it never saw get the grace
    /// period: one that was here and left has really left.
    seen: HashSet<String>,
}

/// Gives up leadership: forgets it and revokes its lease in the background, so the leader
/// key goes at once and another engine can win.
fn step_down(registry: &EtcdRegistry, leader: &mut Option<Leader>, stats: &EngineStats) {
    stats.leader_since.store(0, Ordering::Relaxed);
    if let Some(l) = leader.take() {
        let registry = registry.clone();
        tokio::spawn(async move { registry.resign(l.leadership).await });
    }
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
    registry: EtcdRegistry,
    cfg: EngineConfig,
    stats: Arc<EngineStats>,
    shutdown: CancellationToken,
) {
    let poll = cfg.disable_watches.then_some(cfg.reconcile_interval);
    let mut watch = registry.watch_engine(poll);
    let mut mirror: BTreeMap<String, Vec<u8>> = BTreeMap::new();
    let mut mirror_rev: i64 = 0;
    let mut synced = false;
    let mut written_rev: i64 = 0;
    let mut leader: Option<Leader> = None;
    let mut requirements: HashMap<(UnitName, UnitHash), Result<Requirements, String>> =
        HashMap::new();
    // a zero period would panic tokio (fleet-config refuses less than 1 ms anyway)
    let mut tick = tokio::time::interval(cfg.reconcile_interval.max(Duration::from_millis(1)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let leader_key = registry.keys().leader();
    // Debounce: after a burst of watch events reconcile once, shortly after.
    let debounce = Duration::from_millis(50);
    let mut deadline: Option<tokio::time::Instant> = None;

    loop {
        let event = {
            let lease_lost = async {
                match &leader {
                    Some(l) => l.leadership.lease.lost().await,
                    None => std::future::pending().await,
                }
            };
            let soon = async {
                match deadline {
                    Some(d) => tokio::time::sleep_until(d).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = shutdown.cancelled() => Event::Shutdown,
                ev = watch.recv() => ev.map(Event::Watch).unwrap_or(Event::WatchClosed),
                _ = lease_lost => Event::LeaseLost,
                _ = tick.tick() => Event::Tick,
                _ = soon => { deadline = None; Event::Tick }
            }
        };
        let due = matches!(event, Event::Tick);
        match event {
            Event::Shutdown => {
                if let Some(l) = leader.take() {
                    info!("engine resigning leadership");
                    registry.resign(l.leadership).await;
                }
                return;
            }
            Event::WatchClosed => {
                warn!("engine watch ended; restarting it");
                watch = registry.watch_engine(poll);
                synced = false;
                continue;
            }
            Event::LeaseLost => {
                warn!("engine lost its leadership lease");
                step_down(&registry, &mut leader, &stats);
                continue;
            }
            Event::Watch(WatchEvent::Snapshot { revision, kvs }) => {
                mirror = kvs.into_iter().collect();
                mirror_rev = revision;
                synced = true;
            }
            Event::Watch(WatchEvent::Put {
                key,
                value,
                revision,
            }) => {
                mirror.insert(key, value);
                mirror_rev = mirror_rev.max(revision);
            }
            Event::Watch(WatchEvent::Delete { key, revision }) => {
                let leader_gone = key == leader_key;
                mirror.remove(&key);
                mirror_rev = mirror_rev.max(revision);
                if leader_gone && leader.is_none() {
                    debug!("leader key deleted; campaigning");
                }
            }
            Event::Watch(WatchEvent::Disconnected) => {
                synced = false;
                continue;
            }
            Event::Tick => {}
        }
        if !synced {
            continue;
        }
        // Reconcile on ticks (the interval, or a quiet moment after a burst of watch events),
        // never once per event.
        if !due {
            if deadline.is_none() {
                deadline = Some(tokio::time::Instant::now() + debounce);
            }
            continue;
        }
        if leader.is_none() {
            let leader_present = mirror.contains_key(&leader_key);
            if !leader_present {
                match registry
                    .campaign(&cfg.machine_id, cfg.reconcile_interval.saturating_mul(5))
                    .await
                {
                    Ok(Some(l)) => {
                        info!(machine = %cfg.machine_id, "engine became leader");
                        let now = std::time::SystemTime::now()
                            .duration_since(std::time::UNIX_EPOCH)
                            .map(|d| d.as_secs())
                            .unwrap_or(0);
                        stats.leader_since.store(now, Ordering::Relaxed);
                        written_rev = l.create_revision;
                        leader = Some(Leader {
                            leadership: l,
                            since: Instant::now(),
                            seen: HashSet::new(),
                        });
                    }
                    Ok(None) => {}
                    Err(e) => debug!(error = %e, "campaign failed"),
                }
            }
        }
        let Some(l) = leader.as_mut() else { continue };
        if mirror_rev < written_rev {
            // our own last write has not come back through the watch yet
            continue;
        }
        let started = Instant::now();
        let snap = registry.decode_engine_snapshot(mirror_rev, mirror.iter());
        match snap.leader.as_deref() {
            Some(id) if id == cfg.machine_id => {}
            // The mirror is past our election, so it holds our leader key unless that key is
            // gone (deleted by hand, or expired while we did not notice): we do not lead.
            _ => {
                warn!("the leader key is no longer this engine's; stepping down");
                step_down(&registry, &mut leader, &stats);
                continue;
            }
        }
        let bodies_needed: Vec<UnitHash> = snap
            .units
            .iter()
            .filter(|u| !u.global && !requirements.contains_key(&(u.name.clone(), u.hash)))
            .map(|u| u.hash)
            .collect();
        let bodies = match registry.unit_bodies(&bodies_needed).await {
            Ok(b) => b,
            Err(e) => {
                warn!(error = %e, "reading unit bodies failed");
                stats.reconcile_failures.fetch_add(1, Ordering::Relaxed);
                continue;
            }
        };
        let mut req_of = |rec: &UnitRecord| -> Result<Requirements, String> {
            let key = (rec.name.clone(), rec.hash);
            if let Some(r) = requirements.get(&key) {
                return r.clone();
            }
            let Some(file) = bodies.get(&rec.hash) else {
                return Err(format!(
                    "unit file {} missing from the registry",
                    rec.hash.short()
                ));
            };
            let r = Requirements::from_unit(&rec.name, file)
                .map(|(r, _)| r)
                .map_err(|e| e.to_string());
            requirements.insert(key, r.clone());
            r
        };
        let (sched_snap, invalid) = to_scheduler_snapshot(&snap, &mut req_of);
        if requirements.len() > 2 * snap.units.len() + 64 {
            // forget destroyed units (the cache would otherwise grow with every unit ever seen)
            let live: HashSet<(&UnitName, &UnitHash)> =
                snap.units.iter().map(|u| (&u.name, &u.hash)).collect();
            requirements.retain(|(n, h), _| live.contains(&(n, h)));
        }
        let plan = match off_runtime(move || fleet_scheduler::reconcile(&sched_snap)).await {
            Ok(plan) => plan,
            Err(e) => {
                warn!(error = %e, "the scheduler failed");
                stats.reconcile_failures.fetch_add(1, Ordering::Relaxed);
                continue;
            }
        };
        l.seen.extend(snap.machines.iter().map(|m| m.id.clone()));
        let held: HashSet<String> = if l.since.elapsed() < cfg.agent_ttl {
            let present: HashSet<&str> = snap.machines.iter().map(|m| m.id.as_str()).collect();
            snap.schedules
                .values()
                .map(|(m, _)| m.clone())
                .filter(|m| !present.contains(m.as_str()) && !l.seen.contains(m))
                .collect()
        } else {
            HashSet::new()
        };
        let ops = diff(&snap, &plan, &invalid, &held);
        stats.reconciles.fetch_add(1, Ordering::Relaxed);
        if ops.is_empty() {
            stats
                .last_reconcile_micros
                .store(started.elapsed().as_micros() as u64, Ordering::Relaxed);
            continue;
        }
        debug!(ops = ops.len(), "engine writing decisions");
        match registry.apply(&l.leadership, &ops).await {
            Ok(rev) => {
                stats.tasks.fetch_add(ops.len() as u64, Ordering::Relaxed);
                written_rev = written_rev.max(rev);
                for op in &ops {
                    info!(?op, "engine decision");
                }
            }
            Err(RegistryError::NotLeader) => {
                warn!("engine write refused: no longer leader");
                step_down(&registry, &mut leader, &stats);
            }
            Err(e) => {
                // The write may have landed anyway (a timeout after commit): decide again only
                // from a fresh listing, never from a mirror that may lack our own write.
                warn!(error = %e, "engine write failed; listing again before deciding");
                stats.reconcile_failures.fetch_add(1, Ordering::Relaxed);
                watch = registry.watch_engine(poll);
                synced = false;
            }
        }
        stats
            .last_reconcile_micros
            .store(started.elapsed().as_micros() as u64, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use std::sync::mpsc;

    use super::*;

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
