//! The agent's partial reconciles (only the units whose records changed) against its full
//! pass: random event sequences end in the same systemd and the same published states, and
//! the changes that bear on other units (global units' `Conflicts` and metadata) are seen at
//! once, not at the next periodic full pass.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use fleet_metrics::Metrics;
use fleet_registry::{GlobalRecord, MemoryStore, RegistryError, StateRecord, keys};
use fleet_systemd::UnitManager;
use fleet_systemd::fake::FakeUnitManager;
use fleet_testutil::records::{self, body};
use fleet_unit::{TargetState, UnitFile};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::{M1, TTL, active, eventually, idle};

/// An agent of `M1` on its own twins; `incremental: false` makes every reconcile a full pass.
struct Side {
    store: MemoryStore,
    systemd: FakeUnitManager,
    _dir: tempfile::TempDir,
    shutdown: CancellationToken,
    task: JoinHandle<Result<(), RegistryError>>,
}

impl Side {
    fn start(incremental: bool) -> Side {
        let (store, systemd, dir) = super::twins();
        let cfg = crate::AgentConfig {
            machine_id: M1.into(),
            public_ip: "10.0.0.1".into(),
            metadata: BTreeMap::from([("region".to_string(), "east".to_string())]),
            agent_ttl: TTL,
            units_directory: dir.path().join("units"),
            disable_watches: false,
            version: "1.0.0".into(),
        };
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(crate::agent::run_with(
            Arc::new(store.clone()),
            Arc::new(systemd.clone()),
            cfg,
            Metrics::new(),
            shutdown.clone(),
            Arc::new(AtomicBool::new(false)),
            incremental,
        ));
        Side {
            store,
            systemd,
            _dir: dir,
            shutdown,
            task,
        }
    }

    async fn stop(self) {
        self.shutdown.cancel();
        self.task.await.expect("agent task").expect("agent");
    }

    fn keys(&self) -> &keys::Keys {
        self.store.keys()
    }

    /// Stores a body, as a client creating a unit does.
    fn body(&self, file: &UnitFile) {
        self.store.put(
            &self.keys().body(&file.hash().to_string()),
            file.serialize().into_bytes(),
        );
    }

    fn schedule(&self, name: &str, file: &UnitFile, state: TargetState) {
        let rec = records::schedule(file.hash(), state);
        self.store.put(
            &self.keys().schedule(M1, name),
            serde_json::to_vec(&rec).expect("json"),
        );
    }

    fn global(&self, name: &str, file: &UnitFile, state: TargetState) {
        let rec = GlobalRecord {
            version: 1,
            hash: file.hash(),
            desired_state: state,
        };
        self.store.put(
            &self.keys().global(name),
            serde_json::to_vec(&rec).expect("json"),
        );
    }

    /// What systemd has (file, state, enabled) and what the registry says it has, unit by
    /// unit.
    async fn outcome(&self) -> (BTreeMap<String, String>, BTreeMap<String, String>) {
        let names = self.systemd.unit_file_names().await.expect("names");
        let states = self.systemd.states(&names).await.expect("states");
        let systemd = names
            .iter()
            .map(|n| {
                let s = states.get(n);
                let what = format!(
                    "{:?} {:?} {:?} enabled={}",
                    self.systemd.file(n),
                    s.map(|s| &s.active_state),
                    s.map(|s| &s.sub_state),
                    self.systemd.is_enabled(n),
                );
                (n.clone(), what)
            })
            .collect();
        let published = self
            .store
            .list(&self.keys().dir(keys::STATES))
            .into_iter()
            .map(|(k, v)| {
                let rec: Option<StateRecord> = serde_json::from_slice(&v).ok();
                (k, format!("{rec:?}"))
            })
            .collect();
        (systemd, published)
    }
}

/// A small repeatable generator (xorshift), so a failing sequence can be replayed.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: usize) -> usize {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 % n as u64) as usize
    }
}

fn x_fleet(n: u32, section: &str) -> UnitFile {
    records::file(&format!(
        "[Service]\nExecStart=/bin/sleep {n}\n[X-Fleet]\n{section}\n"
    ))
}

/// Random sequences of schedule, global and metadata changes, unreadable records, bodies
/// that cannot be read, and failing starts, applied to two agents at the same virtual
/// instants: one reconciling only what changed, one always in full. After every round both
/// systemds hold the same units in the same states, and both registries the same states.
#[tokio::test(start_paused = true)]
async fn partial_reconciles_end_where_full_passes_do() {
    for seed in 1..=6u64 {
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ (seed * 0x1234_5678_9abc));
        let sides = [Side::start(true), Side::start(false)];
        let units: Vec<String> = (0..10).map(|i| format!("u{i}.service")).collect();
        let globals = ["g0.service", "g1.service", "g2.service"];
        // bodies for scheduled units: plain, in conflict with globals or other units,
        // at-most-once; one never stored (its body cannot be read)
        let plain: Vec<UnitFile> = (1..=4).map(body).collect();
        let special = [
            x_fleet(11, "Conflicts=g1.service"),
            x_fleet(12, "Conflicts=u1.service u2.service"),
            x_fleet(13, "AtMostOnce=true"),
        ];
        let missing = body(99);
        let global_bodies = [
            x_fleet(21, "Global=true"),
            x_fleet(22, "Global=true\nMachineMetadata=disk=ssd"),
            x_fleet(23, "Global=true\nConflicts=u3.service u4*"),
            x_fleet(24, "Global=true\nConflicts=g0.service"),
            // not global: a global record naming it is refused
            body(25),
        ];
        for side in &sides {
            for f in plain.iter().chain(&special).chain(&global_bodies) {
                side.body(f);
            }
        }
        eventually("registered", || {
            sides
                .iter()
                .all(|s| s.store.get(&s.keys().machine(M1)).is_some())
        })
        .await;
        let states = [
            TargetState::Launched,
            TargetState::Launched,
            TargetState::Loaded,
            TargetState::Inactive,
        ];
        for round in 0..150 {
            let events = 1 + rng.below(3);
            let mut log = Vec::new();
            for _ in 0..events {
                let unit = units[rng.below(units.len())].as_str();
                let global = globals[rng.below(globals.len())];
                let state = states[rng.below(states.len())];
                let what = rng.below(22);
                let p = rng.below(plain.len());
                let s = rng.below(special.len());
                let g = rng.below(global_bodies.len());
                let fail = rng.below(2) == 0;
                log.push(format!(
                    "{what} {unit} {global} {state:?} p{p} s{s} g{g} {fail}"
                ));
                for side in &sides {
                    match what {
                        0..=5 => side.schedule(unit, &plain[p], state),
                        6..=8 => side.schedule(unit, &special[s], state),
                        9 | 10 => side.store.delete(&side.keys().schedule(M1, unit)),
                        11 => side.store.put(&side.keys().schedule(M1, unit), "{\"v\": 2"),
                        12 => side.schedule(unit, &missing, state),
                        13 | 14 => side.global(global, &global_bodies[g], state),
                        15 => side.store.delete(&side.keys().global(global)),
                        16 => side.store.put(&side.keys().global(global), "[]"),
                        17 => side.store.put(&side.keys().metadata(M1, "disk"), "ssd"),
                        18 => side.store.delete(&side.keys().metadata(M1, "disk")),
                        _ => side.systemd.fail_on_start(unit, fail),
                    }
                }
                idle(Duration::from_millis(rng.below(12) as u64)).await;
            }
            // past the debounce, well before most periodic full passes
            idle(Duration::from_millis(120)).await;
            let (a, b) = (sides[0].outcome().await, sides[1].outcome().await);
            assert_eq!(
                a.0, b.0,
                "systemd differs: seed {seed} round {round} after {log:?}"
            );
            assert_eq!(
                a.1, b.1,
                "states differ: seed {seed} round {round} after {log:?}"
            );
        }
        for side in sides {
            side.stop().await;
        }
    }
}

/// A unit scheduled here that a global unit's `Conflicts` names (or whose own `Conflicts`
/// names a global unit) stops that global unit at once, and its leaving starts it again at
/// once: such a change is not one the partial reconcile may take alone.
#[tokio::test(start_paused = true)]
async fn a_scheduled_unit_in_conflict_with_a_global_unit_is_seen_at_once() {
    let side = Side::start(true);
    let spread = x_fleet(1, "Global=true\nConflicts=lonely-*.service");
    let plain_global = x_fleet(2, "Global=true");
    let shy = x_fleet(3, "Conflicts=plain-global.service");
    for f in [&spread, &plain_global, &shy, &body(4)] {
        side.body(f);
    }
    side.global("spread.service", &spread, TargetState::Launched);
    side.global("plain-global.service", &plain_global, TargetState::Launched);
    side.schedule("a.service", &body(4), TargetState::Launched);
    eventually("globals run", || {
        active(&side.systemd, "spread.service") && active(&side.systemd, "plain-global.service")
    })
    .await;
    // not at the next periodic pass: within a debounce
    let soon = Duration::from_millis(100);
    // the global unit's Conflicts names the new unit
    side.schedule("lonely-1.service", &body(4), TargetState::Launched);
    idle(soon).await;
    assert!(active(&side.systemd, "lonely-1.service"));
    assert!(!active(&side.systemd, "spread.service"));
    side.store
        .delete(&side.keys().schedule(M1, "lonely-1.service"));
    idle(soon).await;
    assert!(active(&side.systemd, "spread.service"));
    // the new unit's Conflicts names the global unit
    side.schedule("shy.service", &shy, TargetState::Launched);
    idle(soon).await;
    assert!(active(&side.systemd, "shy.service"));
    assert!(!active(&side.systemd, "plain-global.service"));
    // its body replaced by one without: the global unit runs again
    side.schedule("shy.service", &body(4), TargetState::Launched);
    idle(soon).await;
    assert!(active(&side.systemd, "plain-global.service"));
    side.stop().await;
}

/// Metadata set through the API decides global units' eligibility at once.
#[tokio::test(start_paused = true)]
async fn metadata_changes_decide_global_units_at_once() {
    let side = Side::start(true);
    let ssd = x_fleet(1, "Global=true\nMachineMetadata=disk=ssd");
    side.body(&ssd);
    side.body(&body(2));
    side.global("ssd.service", &ssd, TargetState::Launched);
    side.schedule("a.service", &body(2), TargetState::Launched);
    eventually("a runs", || active(&side.systemd, "a.service")).await;
    idle(Duration::from_millis(100)).await;
    assert!(!active(&side.systemd, "ssd.service"));
    let soon = Duration::from_millis(100);
    side.store.put(&side.keys().metadata(M1, "disk"), "ssd");
    idle(soon).await;
    assert!(active(&side.systemd, "ssd.service"));
    side.store.delete(&side.keys().metadata(M1, "disk"));
    idle(soon).await;
    assert!(!active(&side.systemd, "ssd.service"));
    side.stop().await;
}
