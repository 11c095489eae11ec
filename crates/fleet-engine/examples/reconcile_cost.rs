//! What one engine reconcile costs, stage by stage, at a given size, in memory (no etcd):
//! decoding the whole mirror (what the engine did on every reconcile before it kept a
//! decoded model), applying one change to the model and taking its snapshot (what it does
//! now), and the pure part after it (scheduler input, the scheduler pass, the diff).
//!
//! `cargo run --release -p fleet-engine --example reconcile_cost [machines] [units]`
//! (defaults 1000 10000). Every unit is placed and scheduled, as in a steady cluster.

use std::collections::{BTreeMap, HashSet};
use std::time::{Duration, Instant};

use fleet_registry::keys::Keys;
use fleet_registry::{EngineModel, MachineRecord, ScheduleRecord, UnitRecord};
use fleet_unit::{Requirements, TargetState, UnitFile, UnitName};

/// A record's JSON, as the registry stores it.
macro_rules! json {
    ($v:expr) => {
        serde_json::to_vec($v).expect("encode")
    };
}

fn main() {
    let mut args = std::env::args().skip(1);
    let machines: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(1000);
    let units: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(10_000);
    let keys = Keys::new("/cost/");
    let file = UnitFile::parse("[Service]\nExecStart=/bin/true\n").expect("file");
    let hash = file.hash();
    let mut kvs: BTreeMap<String, Vec<u8>> = BTreeMap::new();
    let ids: Vec<String> = (0..machines).map(|i| format!("{i:032x}")).collect();
    for (i, id) in ids.iter().enumerate() {
        let rec = MachineRecord {
            version: 1,
            id: id.clone(),
            public_ip: format!("10.0.{}.{}", i / 250, i % 250 + 1),
            metadata: BTreeMap::new(),
            agent_version: "cost".into(),
            token: String::new(),
        };
        kvs.insert(keys.machine(id), json!(&rec));
    }
    kvs.insert(keys.leader(), b"engine".to_vec());
    for i in 0..units {
        let name = format!("u{i}.service");
        let rec = UnitRecord {
            version: 1,
            name: UnitName::parse(&name).expect("name"),
            hash,
            desired_state: TargetState::Launched,
            global: false,
        };
        let m = &ids[i % machines.max(1)];
        kvs.insert(keys.unit(&name), json!(&rec));
        kvs.insert(keys.placement(&name), m.clone().into_bytes());
        let sched = ScheduleRecord {
            version: 1,
            hash,
            desired_state: TargetState::Launched,
        };
        kvs.insert(keys.schedule(m, &name), json!(&sched));
    }
    let requirements = Requirements::from_unit(&UnitName::parse("u.service").expect("n"), &file)
        .map(|(r, _)| r)
        .expect("requirements");
    let rounds = 10;

    let full = time(rounds, || {
        std::hint::black_box(fleet_registry::engine_snapshot(&keys, 1, kvs.iter()));
    });
    let mut model = EngineModel::new(&keys);
    let reset = time(1, || model.reset(kvs.iter()));
    // one change: a unit's desired state flips
    let changed = keys.unit("u0.service");
    let mut flip = false;
    let incremental = time(rounds, || {
        flip = !flip;
        let rec = UnitRecord {
            version: 1,
            name: UnitName::parse("u0.service").expect("name"),
            hash,
            desired_state: if flip {
                TargetState::Loaded
            } else {
                TargetState::Launched
            },
            global: false,
        };
        model.put(&changed, &json!(&rec));
        std::hint::black_box(model.snapshot(2));
    });
    let snap = model.snapshot(2);
    let mut pure = Duration::ZERO;
    for _ in 0..rounds {
        let t = Instant::now();
        let (sched, invalid) =
            fleet_engine::to_scheduler_snapshot(&snap, |_| Ok(requirements.clone()));
        let plan = fleet_scheduler::reconcile(&sched);
        std::hint::black_box(fleet_engine::diff(&snap, &plan, &invalid, &HashSet::new()));
        pure += t.elapsed();
    }
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    println!(
        "machines={machines} units={units} full_decode_ms={:.1} model_reset_ms={:.1} \
         one_change_snapshot_ms={:.1} scheduler_and_diff_ms={:.1}",
        ms(full),
        ms(reset),
        ms(incremental),
        ms(pure / rounds),
    );
}

/// The mean time of `rounds` runs of `f`.
fn time(rounds: u32, mut f: impl FnMut()) -> Duration {
    let t = Instant::now();
    for _ in 0..rounds {
        f();
    }
    t.elapsed() / rounds
}
