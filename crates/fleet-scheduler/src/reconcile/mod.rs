//! One reconcile pass: from a snapshot to unschedule/schedule decisions and reasons.
//!
//! Phases:
//! 0. Index the snapshot (units by name, machines by ID, Conflicts/Replaces patterns,
//!    MachineOf edges and their depth), pick the single survivor of each circular Replaces
//!    pair, and work out where global units run.
//! 1. Keep every current placement that still holds, visiting units by MachineOf depth so a
//!    follower is checked after its target; drop the rest with a reason.
//! 2. Place every unit that should run and is not placed, again targets before followers:
//!    least-loaded eligible machine (ties by machine ID), kicking replaced units away.
//!
//! Invariant: a unit placed in this pass is never moved again in this pass, and a kicked unit
//! is re-placed at most once, so the pass terminates and is deterministic.
//!
//! Phase 0 is in `index.rs`, phase 1 in `keep.rs`, phase 2 in `place.rs`; this file holds the
//! pass's context and state, and turns the final state into a [`Plan`].

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap};

use crate::fasthash::{FastMap, FastSet};
use crate::patterns::PatternIndex;
use crate::{Decision, Machine, Plan, Snapshot, Unit};

const NONE: u32 = u32::MAX;
const CYCLE: u32 = u32::MAX;

/// Why a machine cannot take a unit right now.
#[derive(Clone, Copy)]
enum Block {
    Conflict(u32),
    ReplacedBy(u32),
    CannotReplace(u32),
}

/// Machines sharing one static requirement (MachineMetadata), with a lazy least-loaded heap.
struct Class {
    members: Vec<u32>,
    /// (load, machine) entries; an entry whose load is stale is refreshed when popped.
    heap: BinaryHeap<Reverse<(u32, u32)>>,
}

struct Ctx<'a> {
    machines: Vec<&'a Machine>,
    units: Vec<&'a Unit>,
    names: Vec<&'a str>,
    machine_by_id: FastMap<&'a str, u32>,
    machine_by_short_id: FastMap<&'a str, Vec<u32>>,
    active: Vec<bool>,
    global: Vec<bool>,
    /// MachineOf targets resolved to unit indexes (NONE: no such unit).
    peers: Vec<Vec<u32>>,
    /// Units whose MachineOf names this unit.
    followers: Vec<Vec<u32>>,
    /// MachineOf depth (targets first); CYCLE for units on a MachineOf cycle.
    rank: Vec<u32>,
    conflicts: PatternIndex,
    replaces: PatternIndex,
    /// Global-versus-global conflicts, by position in `globals`.
    globals: Vec<u32>,
}

struct State {
    placement: Vec<u32>,
    /// Placed during this pass (never kicked again in this pass).
    fresh: Vec<bool>,
    load: Vec<u32>,
    /// Non-global units placed on each machine.
    on_machine: Vec<Vec<u32>>,
    /// Global units running on each machine.
    globals_on: Vec<Vec<u32>>,
    /// Machines each global unit runs on.
    global_machines: Vec<Vec<u32>>,
    unschedules: Vec<(u32, u32, String)>,
    schedules: Vec<(u32, u32)>,
    unplaceable: BTreeMap<u32, String>,
    classes: Vec<Class>,
    class_of: FastMap<String, u32>,
    machine_classes: Vec<Vec<u32>>,
    /// Scratch for per-unit blocked machines: mark[m] == generation means blocked.
    mark: Vec<u32>,
    blocker: Vec<Block>,
    generation: u32,
}

pub(crate) fn run(snapshot: &Snapshot) -> Plan {
    let ctx = Ctx::new(snapshot);
    let mut st = State::new(&ctx);
    let rivals = ctx.circular_replace_rivals(&mut st);
    let basic = ctx.basic_placements(&mut st, &rivals);
    ctx.place_globals(&mut st, &basic);
    let queue = ctx.keep_current(&mut st, &rivals, &basic);
    ctx.place_pending(&mut st, queue);
    ctx.build_plan(st)
}

mod index;
mod keep;
mod place;

impl Ctx<'_> {
    fn build_plan(&self, st: State) -> Plan {
        // An unschedule followed by a schedule of the same unit on the same machine is no move.
        let scheduled: FastMap<u32, u32> = st.schedules.iter().copied().collect();
        let mut cancelled: FastSet<u32> = FastSet::default();
        let mut plan = Plan::default();
        for (u, m, reason) in st.unschedules {
            if m != NONE && scheduled.get(&u) == Some(&m) {
                cancelled.insert(u);
                continue;
            }
            let unit = self.units[u as usize];
            let machine = unit.placement.clone().unwrap_or_default();
            plan.unschedule_reasons.insert(unit.name.clone(), reason);
            plan.decisions.push(Decision::Unschedule {
                unit: unit.name.clone(),
                machine,
            });
        }
        for (u, m) in st.schedules {
            if cancelled.contains(&u) {
                continue;
            }
            plan.decisions.push(Decision::Schedule {
                unit: self.units[u as usize].name.clone(),
                machine: self.mid(m).to_string(),
            });
        }
        for (u, reason) in st.unplaceable {
            plan.unplaceable
                .insert(self.units[u as usize].name.clone(), reason);
        }
        plan
    }
}

impl State {
    fn new(ctx: &Ctx<'_>) -> State {
        let n = ctx.units.len();
        let m = ctx.machines.len();
        State {
            placement: vec![NONE; n],
            fresh: vec![false; n],
            load: vec![0; m],
            on_machine: vec![Vec::new(); m],
            globals_on: vec![Vec::new(); m],
            global_machines: vec![Vec::new(); n],
            unschedules: Vec::new(),
            schedules: Vec::new(),
            unplaceable: BTreeMap::new(),
            classes: Vec::new(),
            class_of: FastMap::default(),
            machine_classes: vec![Vec::new(); m],
            mark: vec![0; m],
            blocker: vec![Block::Conflict(0); m],
            generation: 0,
        }
    }
}
