//! Times one reconcile over a large synthetic cluster and prints the figures.
//!
//! `cargo run --release -p fleet-scheduler --example bench` (1,000 machines x 100,000 units),
//! `... --example bench -- 10000 1000000` for the stretch size.
//!
//! The unit mix: plain services; MachineMetadata (single and OR'ed values, AND'ed keys);
//! template instances in families of ten that conflict with each other; sidekicks with
//! MachineOf their instance; MachineID pins; Replaces pairs; literal Conflicts; a few global
//! units. Three passes are timed: cold start (nothing placed), steady state (the cold plan
//! applied: must decide nothing), and churn (5% of machines gone, 5% new units, 1% stopped).

use std::collections::{BTreeMap, HashMap};
use std::time::Instant;

use fleet_scheduler::{Decision, Machine, Plan, Snapshot, Unit, reconcile};
use fleet_unit::{Requirements, TargetState, UnitName};

/// xorshift64*: a tiny deterministic generator, so runs are comparable.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

const REGIONS: [&str; 4] = ["us-east-1", "us-west-1", "eu-west-1", "ap-south-1"];

fn machine_id(i: usize) -> String {
    format!("{:08x}{:024x}", i as u32 ^ 0x5a5a_5a5a, i)
}

fn machines(n: usize) -> Vec<Machine> {
    (0..n)
        .map(|i| {
            let mut metadata = BTreeMap::new();
            metadata.insert("region".to_string(), REGIONS[i % 4].to_string());
            metadata.insert(
                "disk".to_string(),
                if i.is_multiple_of(3) { "ssd" } else { "hdd" }.to_string(),
            );
            metadata.insert("rack".to_string(), format!("r{}", i % 50));
            Machine {
                id: machine_id(i),
                metadata,
            }
        })
        .collect()
}

fn name(s: &str) -> UnitName {
    match UnitName::parse(s) {
        Ok(n) => n,
        Err(e) => panic!("generated an invalid unit name {s}: {e}"),
    }
}

fn unit(n: String, requirements: Requirements) -> Unit {
    Unit {
        name: name(&n),
        desired: TargetState::Launched,
        requirements,
        placement: None,
    }
}

fn units(count: usize, machines: usize, rng: &mut Rng, tag: &str) -> Vec<Unit> {
    let mut out = Vec::with_capacity(count);
    let mut i = 0usize;
    if tag.is_empty() {
        for g in 0..10usize {
            let mut req = Requirements {
                global: true,
                ..Default::default()
            };
            if g.is_multiple_of(2) {
                req.metadata
                    .insert("region".into(), vec![REGIONS[g % 4].to_string()]);
            }
            if g == 9 {
                req.conflicts.push("global-8.service".into());
            }
            out.push(unit(format!("global-{g}.service"), req));
        }
    }
    while out.len() < count {
        let roll = rng.below(100);
        let req = Requirements::default();
        match roll {
            0..=59 => out.push(unit(format!("svc{tag}-{i}.service"), req)),
            60..=74 => {
                let mut req = req;
                let r = rng.below(4) as usize;
                let mut regions = vec![REGIONS[r].to_string()];
                if roll.is_multiple_of(3) {
                    regions.push(REGIONS[(r + 1) % 4].to_string());
                    regions.sort();
                }
                req.metadata.insert("region".into(), regions);
                if roll.is_multiple_of(5) {
                    req.metadata.insert("disk".into(), vec!["ssd".into()]);
                }
                out.push(unit(format!("md{tag}-{i}.service"), req));
            }
            75..=89 => {
                // a family of ten instances that keep apart, each with a sidekick half the time
                let fam = format!("app{tag}-{i}");
                for j in 0..10u32 {
                    let mut r = Requirements::default();
                    r.conflicts.push(format!("{fam}@*.service"));
                    out.push(unit(format!("{fam}@{j}.service"), r));
                    if j.is_multiple_of(2) {
                        let mut s = Requirements::default();
                        s.machine_of.push(format!("{fam}@{j}.service"));
                        out.push(unit(format!("side{tag}-{i}@{j}.service"), s));
                    }
                }
            }
            90..=91 => {
                let mut req = req;
                req.machine_id = Some(machine_id(rng.below(machines as u64) as usize));
                out.push(unit(format!("pin{tag}-{i}.service"), req));
            }
            92..=93 => {
                out.push(unit(format!("old{tag}-{i}.service"), req));
                let mut r = Requirements::default();
                r.replaces.push(format!("old{tag}-{i}.service"));
                out.push(unit(format!("new{tag}-{i}.service"), r));
            }
            _ => {
                let mut req = req;
                req.conflicts
                    .push(format!("svc{tag}-{}.service", rng.below(i as u64 + 1)));
                out.push(unit(format!("lit{tag}-{i}.service"), req));
            }
        }
        i += 1;
    }
    out.truncate(count);
    out
}

fn apply(snapshot: &mut Snapshot, plan: &Plan) {
    let index: HashMap<String, usize> = snapshot
        .units
        .iter()
        .enumerate()
        .map(|(i, u)| (u.name.to_string(), i))
        .collect();
    for d in &plan.decisions {
        match d {
            Decision::Unschedule { unit, .. } => {
                if let Some(i) = index.get(unit.as_str()) {
                    snapshot.units[*i].placement = None;
                }
            }
            Decision::Schedule { unit, machine } => {
                if let Some(i) = index.get(unit.as_str()) {
                    snapshot.units[*i].placement = Some(machine.clone());
                }
            }
        }
    }
}

/// CPU time this process has used, in milliseconds (from /proc; 10 ms resolution). Wall time
/// alone misleads on a shared machine.
fn cpu_ms() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the command name (which ends with ')'): utime is the 12th, stime the 13th.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    (ticks(11) + ticks(12)) * 10.0
}

fn timed(label: &str, snapshot: &Snapshot) -> Plan {
    let start = Instant::now();
    let cpu_start = cpu_ms();
    let plan = reconcile(snapshot);
    let took = start.elapsed();
    let cpu = cpu_ms() - cpu_start;
    let schedules = plan
        .decisions
        .iter()
        .filter(|d| matches!(d, Decision::Schedule { .. }))
        .count();
    println!(
        "{label:<8} wall {:>8.1} ms  cpu {:>6.0} ms  schedule {:>8}  unschedule {:>7}  unplaceable {:>6}",
        took.as_secs_f64() * 1000.0,
        cpu,
        schedules,
        plan.decisions.len() - schedules,
        plan.unplaceable.len()
    );
    plan
}

fn main() {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let n_machines = args.first().copied().unwrap_or(1_000);
    let n_units = args.get(1).copied().unwrap_or(100_000);
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);

    let start = Instant::now();
    let mut snapshot = Snapshot {
        machines: machines(n_machines),
        units: units(n_units, n_machines, &mut rng, ""),
    };
    // A registry lists units by name; reconcile only sorts input that is not sorted.
    snapshot.units.sort_by(|a, b| a.name.cmp(&b.name));
    println!(
        "{} machines x {} units (built in {:.0} ms)",
        snapshot.machines.len(),
        snapshot.units.len(),
        start.elapsed().as_secs_f64() * 1000.0
    );

    let cold = timed("cold", &snapshot);
    apply(&mut snapshot, &cold);
    let steady = timed("steady", &snapshot);
    if !steady.decisions.is_empty() {
        println!(
            "  note: steady state still made {} decisions",
            steady.decisions.len()
        );
    }
    let again = reconcile(&snapshot);
    if again != steady {
        println!("  note: two reconciles of one snapshot differed");
    }

    // churn: 5% of machines leave, 5% new units arrive, 1% of units are stopped
    let gone = n_machines / 20;
    snapshot.machines.drain(..gone);
    let extra = units(n_units / 20, n_machines, &mut rng, "x");
    snapshot.units.extend(extra);
    snapshot.units.sort_by(|a, b| a.name.cmp(&b.name));
    let stop = snapshot.units.len() / 100;
    for u in snapshot.units.iter_mut().take(stop * 7).step_by(7) {
        u.desired = TargetState::Inactive;
    }
    let churn = timed("churn", &snapshot);
    let mut kinds: BTreeMap<String, (usize, String)> = BTreeMap::new();
    for (unit, reason) in &churn.unplaceable {
        let kind: String = reason
            .split([' ', '='])
            .next()
            .unwrap_or_default()
            .to_string();
        let e = kinds
            .entry(kind)
            .or_insert((0, format!("{unit}: {reason}")));
        e.0 += 1;
    }
    for (count, example) in kinds.values() {
        println!("  {count:>6} like {example}");
    }
    apply(&mut snapshot, &churn);
    timed("settled", &snapshot);
}
