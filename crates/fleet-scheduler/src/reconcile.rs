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

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap};

use fleet_unit::{Requirements, TargetState};

use crate::fasthash::{FastMap, FastSet};
use crate::patterns::PatternIndex;
use crate::words::{metadata_phrase, name_list};
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

impl<'a> Ctx<'a> {
    fn new(snapshot: &'a Snapshot) -> Ctx<'a> {
        let mut machines: Vec<&Machine> = snapshot.machines.iter().collect();
        if !machines.is_sorted_by(|a, b| a.id <= b.id) {
            machines.sort_by(|a, b| a.id.cmp(&b.id));
        }
        machines.dedup_by(|a, b| a.id == b.id);
        let mut units: Vec<&Unit> = snapshot.units.iter().collect();
        // Registries list units by name already; only sort when they are not.
        if !units.is_sorted_by(|a, b| a.name <= b.name) {
            units.sort_by(|a, b| a.name.cmp(&b.name));
        }
        units.dedup_by(|a, b| a.name == b.name);

        let names: Vec<&str> = units.iter().map(|u| u.name.as_str()).collect();
        let unit_by_name: FastMap<&str, u32> = names
            .iter()
            .enumerate()
            .map(|(i, n)| (*n, i as u32))
            .collect();
        let mut machine_by_id =
            FastMap::with_capacity_and_hasher(machines.len(), Default::default());
        let mut machine_by_short_id: FastMap<&str, Vec<u32>> = FastMap::default();
        for (i, m) in machines.iter().enumerate() {
            machine_by_id.insert(m.id.as_str(), i as u32);
            if let Some(short) = m.id.get(..8)
                && short.len() < m.id.len()
            {
                machine_by_short_id.entry(short).or_default().push(i as u32);
            }
        }

        let active: Vec<bool> = units
            .iter()
            .map(|u| u.desired != TargetState::Inactive)
            .collect();
        let global: Vec<bool> = units.iter().map(|u| u.requirements.global).collect();
        let n = units.len();

        let mut peers = vec![Vec::new(); n];
        let mut followers = vec![Vec::new(); n];
        for u in 0..n {
            if !active[u] || global[u] {
                continue;
            }
            for target in &units[u].requirements.machine_of {
                let t = unit_by_name.get(target.as_str()).copied().unwrap_or(NONE);
                peers[u].push(t);
                if t != NONE {
                    followers[t as usize].push(u as u32);
                }
            }
        }

        let conflict_universe = active.clone();
        let conflicts = PatternIndex::build(&names, &conflict_universe, |u| {
            units[u].requirements.conflicts.as_slice()
        });
        let replace_universe: Vec<bool> = (0..n).map(|u| active[u] && !global[u]).collect();
        let replaces = PatternIndex::build(&names, &replace_universe, |u| {
            units[u].requirements.replaces.as_slice()
        });
        let globals = (0..n)
            .filter(|u| active[*u] && global[*u])
            .map(|u| u as u32)
            .collect();

        let mut ctx = Ctx {
            machines,
            units,
            names,
            machine_by_id,
            machine_by_short_id,
            active,
            global,
            peers,
            followers,
            rank: vec![0; n],
            conflicts,
            replaces,
            globals,
        };
        ctx.rank = ctx.machine_of_ranks();
        ctx
    }

    fn schedulable(&self, u: usize) -> bool {
        self.active[u] && !self.global[u]
    }

    fn req(&self, u: usize) -> &'a Requirements {
        &self.units[u].requirements
    }

    /// MachineOf depth of every schedulable unit; CYCLE for units on a MachineOf cycle.
    fn machine_of_ranks(&self) -> Vec<u32> {
        let n = self.units.len();
        let mut rank = vec![0u32; n];
        let mut state = vec![0u8; n]; // 0 new, 1 on stack, 2 done
        let mut cyclic = vec![false; n];
        let dep_ok = |w: u32| w != NONE && self.schedulable(w as usize);
        for start in 0..n {
            if !self.schedulable(start) || state[start] != 0 || self.peers[start].is_empty() {
                continue;
            }
            let mut stack: Vec<(u32, usize)> = vec![(start as u32, 0)];
            state[start] = 1;
            while let Some(top) = stack.last_mut() {
                let v = top.0 as usize;
                if top.1 < self.peers[v].len() {
                    let w = self.peers[v][top.1];
                    top.1 += 1;
                    if !dep_ok(w) {
                        continue;
                    }
                    match state[w as usize] {
                        0 => {
                            state[w as usize] = 1;
                            stack.push((w, 0));
                        }
                        1 => {
                            let from = stack.iter().rposition(|(x, _)| *x == w).unwrap_or(0);
                            for (x, _) in &stack[from..] {
                                cyclic[*x as usize] = true;
                            }
                        }
                        _ => {}
                    }
                } else {
                    let r = self.peers[v]
                        .iter()
                        .filter(|w| dep_ok(**w) && !cyclic[**w as usize])
                        .map(|w| rank[*w as usize].saturating_add(1))
                        .max()
                        .unwrap_or(0);
                    rank[v] = if cyclic[v] { CYCLE } else { r.min(CYCLE - 1) };
                    state[v] = 2;
                    stack.pop();
                }
            }
        }
        rank
    }

    fn machine_matches_id(&self, m: usize, id: &str) -> bool {
        let mid = self.machines[m].id.as_str();
        mid == id || (mid.len() > 8 && mid.get(..8) == Some(id))
    }

    /// Machines a MachineID requirement can mean (full ID, or the 8-character short ID).
    fn machines_with_id(&self, id: &str) -> Vec<u32> {
        if let Some(m) = self.machine_by_id.get(id) {
            return vec![*m];
        }
        self.machine_by_short_id
            .get(id)
            .cloned()
            .unwrap_or_default()
    }

    /// Why machine `m` can never take unit `u` (MachineID, MachineMetadata), if it can't.
    fn static_misfit(&self, u: usize, m: usize) -> Option<String> {
        let req = self.req(u);
        if let Some(id) = &req.machine_id
            && !self.machine_matches_id(m, id)
        {
            return Some(format!("is not MachineID={id}"));
        }
        if !req.metadata_satisfied_by(&self.machines[m].metadata) {
            return Some(format!(
                "does not have metadata {}",
                metadata_phrase(&req.metadata)
            ));
        }
        None
    }

    /// Why no machine at all fits unit `u`'s static requirements.
    fn static_reason(&self, u: usize) -> String {
        let req = self.req(u);
        if self.machines.is_empty() {
            return "no machines in the cluster".to_string();
        }
        if let Some(id) = &req.machine_id {
            let ms = self.machines_with_id(id);
            return match ms.first() {
                None => format!("no machine has ID {id}"),
                Some(m) => format!(
                    "machine {} does not have metadata {}",
                    self.machines[*m as usize].id,
                    metadata_phrase(&req.metadata)
                ),
            };
        }
        for (key, values) in &req.metadata {
            let any = self.machines.iter().any(|m| {
                m.metadata
                    .get(key)
                    .is_some_and(|v| values.iter().any(|a| a == v))
            });
            if !any {
                let single = BTreeMap::from([(key.clone(), values.clone())]);
                return format!("no machine has metadata {}", metadata_phrase(&single));
            }
        }
        format!("no machine has metadata {}", metadata_phrase(&req.metadata))
    }

    fn mid(&self, m: u32) -> &'a str {
        self.machines[m as usize].id.as_str()
    }

    fn do_conflict(&self, a: usize, b: usize) -> bool {
        self.conflicts.any_matches(a, self.names[b]) || self.conflicts.any_matches(b, self.names[a])
    }

    /// Circular Replaces: units that replace each other, directly or around a longer circle
    /// (a strongly connected group of the Replaces graph), would push each other off forever,
    /// so only one unit of each such group may run: the first by name among those currently
    /// placed, else the first by name. Returns, per unit, the unit it gave way to (NONE for
    /// units that may run).
    fn circular_replace_rivals(&self, st: &mut State) -> Vec<u32> {
        let n = self.units.len();
        let mut rivals = vec![NONE; n];
        if (0..n).all(|u| !self.replaces.declares_any(u)) {
            return rivals;
        }
        let edges: Vec<Vec<u32>> = (0..n)
            .map(|u| {
                if self.schedulable(u) {
                    self.replaced_by_unit(u)
                } else {
                    Vec::new()
                }
            })
            .collect();
        for group in strongly_connected(&edges) {
            if group.len() < 2 {
                continue;
            }
            let winner = group
                .iter()
                .copied()
                .min_by_key(|u| (self.units[*u as usize].placement.is_none(), *u))
                .unwrap_or(group[0]);
            for &u in &group {
                if u != winner {
                    rivals[u as usize] = winner;
                    st.unplaceable
                        .insert(u, self.circular_reason(winner as usize));
                }
            }
        }
        rivals
    }

    /// Units that `u`'s Replaces patterns match (sorted, without `u`).
    fn replaced_by_unit(&self, u: usize) -> Vec<u32> {
        let mut out: Vec<u32> = self
            .replaces
            .targets(u)
            .filter(|w| *w as usize != u)
            .collect();
        if self.replaces.any_broad {
            for w in 0..self.units.len() {
                if w != u && self.schedulable(w) && self.replaces.broad_matches(u, self.names[w]) {
                    out.push(w as u32);
                }
            }
        }
        out.sort_unstable();
        out.dedup();
        out
    }

    fn circular_reason(&self, rival: usize) -> String {
        format!(
            "circular Replaces with {}: only one of them is scheduled",
            self.names[rival]
        )
    }

    /// A current placement that survives the checks every unit must pass on its own:
    /// active, not global, machine present, MachineID and MachineMetadata satisfied.
    fn basic_placement(&self, u: usize, rivals: &[u32]) -> Result<Option<u32>, String> {
        let unit = self.units[u];
        let Some(mid) = unit.placement.as_deref() else {
            return Ok(None);
        };
        if self.global[u] {
            return Err("global units are not scheduled by the engine".to_string());
        }
        if !self.active[u] {
            return Err("target state inactive".to_string());
        }
        let Some(&m) = self.machine_by_id.get(mid) else {
            return Err(format!("machine {mid} went away"));
        };
        if rivals[u] != NONE {
            return Err(self.circular_reason(rivals[u] as usize));
        }
        if let Some(misfit) = self.static_misfit(u, m as usize) {
            return Err(format!("machine {mid} {misfit}"));
        }
        Ok(Some(m))
    }

    /// Decides where each global unit runs, as agents will: metadata must match, and it must
    /// not conflict (either direction) with units scheduled there or with global units
    /// accepted there before it (by name).
    /// Each unit's current machine if it passes [`Ctx::basic_placement`] (NONE otherwise);
    /// records an unschedule for every placement that fails.
    fn basic_placements(&self, st: &mut State, rivals: &[u32]) -> Vec<u32> {
        let mut basic = vec![NONE; self.units.len()];
        for (u, slot) in basic.iter_mut().enumerate() {
            match self.basic_placement(u, rivals) {
                Ok(Some(m)) => *slot = m,
                Ok(None) => {}
                Err(reason) => {
                    let mid = self.units[u].placement.as_deref().unwrap_or_default();
                    let m = self.machine_by_id.get(mid).copied().unwrap_or(NONE);
                    st.unschedules.push((u as u32, m, reason));
                }
            }
        }
        basic
    }

    fn place_globals(&self, st: &mut State, basic: &[u32]) {
        if self.globals.is_empty() {
            return;
        }
        let m_count = self.machines.len();
        // Scheduled units (current placements that pass the basic checks) block globals.
        let mut scheduled_on: Vec<Vec<u32>> = vec![Vec::new(); m_count];
        for (u, &m) in basic.iter().enumerate() {
            if m != NONE {
                scheduled_on[m as usize].push(u as u32);
            }
        }
        let k = self.globals.len();
        let mut gg = vec![false; k * k];
        for i in 0..k {
            for j in 0..i {
                let c = self.do_conflict(self.globals[i] as usize, self.globals[j] as usize);
                gg[i * k + j] = c;
                gg[j * k + i] = c;
            }
        }
        let mut globals_here: Vec<Vec<usize>> = vec![Vec::new(); m_count];
        let mut blocked = vec![false; m_count];
        for (gi, &g) in self.globals.iter().enumerate() {
            let g = g as usize;
            blocked.iter_mut().for_each(|b| *b = false);
            for w in self.conflicts.targets(g).chain(self.conflicts.sources(g)) {
                let w = w as usize;
                if w != g && !self.global[w] && basic[w] != NONE {
                    blocked[basic[w] as usize] = true;
                }
            }
            for m in 0..m_count {
                if blocked[m]
                    || !self
                        .req(g)
                        .metadata_satisfied_by(&self.machines[m].metadata)
                {
                    continue;
                }
                if self.conflicts.any_broad
                    && scheduled_on[m].iter().any(|w| {
                        self.conflicts.broad_matches(g, self.names[*w as usize])
                            || self.conflicts.broad_matches(*w as usize, self.names[g])
                    })
                {
                    continue;
                }
                if globals_here[m].iter().any(|gj| gg[gi * k + gj]) {
                    continue;
                }
                globals_here[m].push(gi);
                st.globals_on[m].push(g as u32);
                st.global_machines[g].push(m as u32);
                st.load[m] += 1;
            }
        }
    }

    /// Phase 1: keep what still holds. Returns the units that need a (new) machine.
    fn keep_current(
        &self,
        st: &mut State,
        rivals: &[u32],
        basic: &[u32],
    ) -> BinaryHeap<Reverse<(u32, u32)>> {
        let n = self.units.len();
        let mut queue = BinaryHeap::new();
        // status: 0 = not yet visited, 1 = kept, 2 = dropped (or never placed)
        let mut status = vec![0u8; n];
        let mut placed: Vec<usize> = Vec::new();
        for u in 0..n {
            if basic[u] != NONE {
                placed.push(u);
            } else {
                status[u] = 2;
            }
        }
        let mut by_machine_orig: Vec<Vec<u32>> = vec![Vec::new(); self.machines.len()];
        if self.replaces.any_broad {
            for &u in &placed {
                by_machine_orig[basic[u] as usize].push(u as u32);
            }
        }
        placed.sort_by_key(|u| (self.rank[*u], *u));
        for u in placed {
            let m = basic[u];
            match self.still_holds(st, u, m, &status, basic, &by_machine_orig) {
                Ok(()) => {
                    status[u] = 1;
                    st.placement[u] = m;
                    st.on_machine[m as usize].push(u as u32);
                    st.load[m as usize] += 1;
                }
                Err(reason) => {
                    status[u] = 2;
                    st.unschedules.push((u as u32, m, reason));
                }
            }
        }
        for (u, rival) in rivals.iter().enumerate() {
            if self.schedulable(u) && *rival == NONE && st.placement[u] == NONE {
                queue.push(Reverse((self.rank[u], u as u32)));
            }
        }
        queue
    }

    /// Whether unit `u`, currently on `m`, may stay there given the units kept so far.
    fn still_holds(
        &self,
        st: &State,
        u: usize,
        m: u32,
        status: &[u8],
        basic: &[u32],
        by_machine_orig: &[Vec<u32>],
    ) -> Result<(), String> {
        let mid = self.mid(m);
        if self.rank[u] == CYCLE {
            return Err(self.cycle_reason(u));
        }
        for (i, &t) in self.peers[u].iter().enumerate() {
            let here = t != NONE
                && self.active[t as usize]
                && if self.global[t as usize] {
                    st.global_machines[t as usize].contains(&m)
                } else {
                    st.placement[t as usize] == m
                };
            if !here {
                let target = &self.req(u).machine_of[i];
                let elsewhere = t != NONE
                    && self.active[t as usize]
                    && (st.placement[t as usize] != NONE
                        || !st.global_machines[t as usize].is_empty());
                return Err(if elsewhere {
                    format!("MachineOf={target}, which is not on machine {mid}")
                } else {
                    format!("MachineOf={target}, which is not scheduled")
                });
            }
        }
        for w in self.conflicts.targets(u).chain(self.conflicts.sources(u)) {
            let w = w as usize;
            if w != u && !self.global[w] && status[w] == 1 && st.placement[w] == m {
                return Err(format!("conflicts with {} on machine {mid}", self.names[w]));
            }
        }
        if self.conflicts.any_broad {
            for &w in &st.on_machine[m as usize] {
                let w = w as usize;
                if w != u
                    && (self.conflicts.broad_matches(u, self.names[w])
                        || self.conflicts.broad_matches(w, self.names[u]))
                {
                    return Err(format!("conflicts with {} on machine {mid}", self.names[w]));
                }
            }
        }
        let replacer_here = |v: usize| {
            v != u
                && basic[v] == m
                && (status[v] == 1 || status[v] == 0)
                && !self.replaces.any_matches(u, self.names[v])
        };
        let mut replacer = self
            .replaces
            .sources(u)
            .map(|v| v as usize)
            .find(|v| replacer_here(*v));
        if replacer.is_none() && self.replaces.any_broad {
            replacer = by_machine_orig[m as usize]
                .iter()
                .map(|v| *v as usize)
                .find(|v| replacer_here(*v) && self.replaces.broad_matches(*v, self.names[u]));
        }
        if let Some(v) = replacer {
            return Err(format!("replaced by {}", self.names[v]));
        }
        Ok(())
    }

    fn cycle_reason(&self, u: usize) -> String {
        let target = self.peers[u]
            .iter()
            .position(|t| *t != NONE && self.rank[*t as usize] == CYCLE)
            .map(|i| self.req(u).machine_of[i].as_str())
            .unwrap_or("");
        format!(
            "MachineOf={target} leads back to this unit (bidirectional MachineOf is not supported)"
        )
    }

    /// Phase 2: place every queued unit, targets before followers.
    fn place_pending(&self, st: &mut State, mut queue: BinaryHeap<Reverse<(u32, u32)>>) {
        while let Some(Reverse((_, u))) = queue.pop() {
            let u = u as usize;
            if st.placement[u] != NONE {
                continue;
            }
            match self.place_one(st, u) {
                Ok((m, kicks, class)) => {
                    st.unplaceable.remove(&(u as u32));
                    self.commit(st, u, m, &kicks, class);
                    for k in kicks {
                        queue.push(Reverse((self.rank[k as usize], k)));
                    }
                }
                Err(reason) => {
                    st.unplaceable.insert(u as u32, reason);
                }
            }
        }
    }

    /// Finds the machine for `u`: Ok((machine, units to kick off it)) or the reason.
    fn place_one(
        &self,
        st: &mut State,
        u: usize,
    ) -> Result<(u32, Vec<u32>, Option<usize>), String> {
        if self.machines.is_empty() {
            return Err("no machines in the cluster".to_string());
        }
        if self.rank[u] == CYCLE {
            return Err(self.cycle_reason(u));
        }
        self.mark_blocked(st, u);
        let mut blocks: Vec<Block> = Vec::new();
        let req = self.req(u);
        if !self.peers[u].is_empty() || req.machine_id.is_some() {
            let mut candidates = self.explicit_candidates(st, u)?;
            candidates.sort_by_key(|m| (st.load[*m as usize], *m));
            for m in candidates {
                match self.check(st, u, m) {
                    Ok(kicks) => return Ok((m, kicks, None)),
                    Err(b) => blocks.push(b),
                }
            }
            return Err(self.blocked_reason(&blocks));
        }
        let c = self.class_for(st, u);
        if st.classes[c].members.is_empty() {
            return Err(self.static_reason(u));
        }
        let mut skipped = Vec::new();
        let mut found = None;
        while let Some(Reverse((load, m))) = st.classes[c].heap.pop() {
            if load != st.load[m as usize] {
                let fresh = Reverse((st.load[m as usize], m));
                st.classes[c].heap.push(fresh);
                continue;
            }
            match self.check(st, u, m) {
                Ok(kicks) => {
                    found = Some((m, kicks, Some(c)));
                    break;
                }
                Err(b) => {
                    blocks.push(b);
                    skipped.push(Reverse((load, m)));
                }
            }
        }
        st.classes[c].heap.extend(skipped);
        found.ok_or_else(|| self.blocked_reason(&blocks))
    }

    /// Candidate machines for a unit with MachineOf or MachineID, after static checks.
    fn explicit_candidates(&self, st: &State, u: usize) -> Result<Vec<u32>, String> {
        let req = self.req(u);
        let mut set: Option<Vec<u32>> = None;
        let mut first_target: Option<(&str, Vec<u32>)> = None;
        for (i, &t) in self.peers[u].iter().enumerate() {
            let target = req.machine_of[i].as_str();
            let machines: Vec<u32> = if t == NONE || !self.active[t as usize] {
                Vec::new()
            } else if self.global[t as usize] {
                st.global_machines[t as usize].clone()
            } else if st.placement[t as usize] != NONE {
                vec![st.placement[t as usize]]
            } else {
                Vec::new()
            };
            if machines.is_empty() {
                return Err(format!("MachineOf={target}, which is not scheduled"));
            }
            set = Some(match set {
                None => {
                    first_target = Some((target, machines.clone()));
                    machines
                }
                Some(prev) => {
                    let both: Vec<u32> =
                        prev.into_iter().filter(|m| machines.contains(m)).collect();
                    if both.is_empty() {
                        let first = first_target.as_ref().map(|f| f.0).unwrap_or("");
                        return Err(format!(
                            "MachineOf={first} and MachineOf={target} are on different machines"
                        ));
                    }
                    both
                }
            });
        }
        let set = match set {
            Some(s) => s,
            None => {
                let id = req.machine_id.as_deref().unwrap_or("");
                let ms = self.machines_with_id(id);
                if ms.is_empty() {
                    return Err(format!("no machine has ID {id}"));
                }
                ms
            }
        };
        let fitting: Vec<u32> = set
            .iter()
            .copied()
            .filter(|m| self.static_misfit(u, *m as usize).is_none())
            .collect();
        if fitting.is_empty() {
            let m = set[0];
            let misfit = self.static_misfit(u, m as usize).unwrap_or_default();
            return Err(match first_target {
                Some((target, _)) => format!(
                    "MachineOf={target} is on machine {}, which {misfit}",
                    self.mid(m)
                ),
                None => format!("machine {} {misfit}", self.mid(m)),
            });
        }
        Ok(fitting)
    }

    /// Marks the machines that units conflicting with `u`, or replacing it, occupy.
    fn mark_blocked(&self, st: &mut State, u: usize) {
        st.generation += 1;
        let generation = st.generation;
        for w in self.conflicts.targets(u).chain(self.conflicts.sources(u)) {
            let w = w as usize;
            if w == u || !self.active[w] {
                continue;
            }
            if self.global[w] {
                for &m in &st.global_machines[w] {
                    st.mark[m as usize] = generation;
                    st.blocker[m as usize] = Block::Conflict(w as u32);
                }
            } else if st.placement[w] != NONE {
                let m = st.placement[w] as usize;
                st.mark[m] = generation;
                st.blocker[m] = Block::Conflict(w as u32);
            }
        }
        for v in self.replaces.sources(u) {
            let v = v as usize;
            if v != u && st.placement[v] != NONE {
                let m = st.placement[v] as usize;
                st.mark[m] = generation;
                st.blocker[m] = Block::ReplacedBy(v as u32);
            }
        }
    }

    /// Whether `u` may go on `m` now; Ok gives the units it would push off `m`.
    fn check(&self, st: &State, u: usize, m: u32) -> Result<Vec<u32>, Block> {
        let mi = m as usize;
        if st.mark[mi] == st.generation {
            return Err(st.blocker[mi]);
        }
        if self.conflicts.any_broad {
            for &w in st.on_machine[mi].iter().chain(&st.globals_on[mi]) {
                let w = w as usize;
                if w != u
                    && (self.conflicts.broad_matches(u, self.names[w])
                        || self.conflicts.broad_matches(w, self.names[u]))
                {
                    return Err(Block::Conflict(w as u32));
                }
            }
        }
        if self.replaces.any_broad {
            for &v in &st.on_machine[mi] {
                if v as usize != u && self.replaces.broad_matches(v as usize, self.names[u]) {
                    return Err(Block::ReplacedBy(v));
                }
            }
        }
        if !self.replaces.declares_any(u) {
            return Ok(Vec::new());
        }
        let mut victims: Vec<u32> = self
            .replaces
            .targets(u)
            .filter(|v| *v as usize != u && st.placement[*v as usize] == m)
            .collect();
        if self.replaces.any_broad {
            victims.extend(st.on_machine[mi].iter().copied().filter(|v| {
                *v as usize != u && self.replaces.broad_matches(u, self.names[*v as usize])
            }));
        }
        if victims.is_empty() {
            return Ok(victims);
        }
        victims.sort_unstable();
        victims.dedup();
        // Everything that follows a victim on this machine has to go with it.
        let mut kicks: Vec<u32> = Vec::new();
        let mut todo = victims.clone();
        while let Some(k) = todo.pop() {
            if kicks.contains(&k) {
                continue;
            }
            if st.fresh[k as usize] || self.peers[u].contains(&k) {
                let root = victims.first().copied().unwrap_or(k);
                return Err(Block::CannotReplace(root));
            }
            kicks.push(k);
            for &f in &self.followers[k as usize] {
                if st.placement[f as usize] == m && f as usize != u {
                    todo.push(f);
                }
            }
        }
        kicks.sort_unstable();
        Ok(kicks)
    }

    fn commit(&self, st: &mut State, u: usize, m: u32, kicks: &[u32], class: Option<usize>) {
        let mi = m as usize;
        for &k in kicks {
            let reason = if self.replaces.any_matches(u, self.names[k as usize]) {
                format!("replaced by {}", self.names[u])
            } else {
                format!("follows a unit replaced by {}", self.names[u])
            };
            st.unschedules.push((k, m, reason));
            st.placement[k as usize] = NONE;
            st.on_machine[mi].retain(|x| *x != k);
            st.load[mi] -= 1;
        }
        st.placement[u] = m;
        st.fresh[u] = true;
        st.on_machine[mi].push(u as u32);
        st.load[mi] += 1;
        st.schedules.push((u as u32, m));
        // The class heap we popped from lost this machine's entry: put it back. If kicks
        // lowered the load, every heap holding this machine needs an entry that is not
        // too high (higher-than-true entries are never corrected lazily).
        let entry = Reverse((st.load[mi], m));
        if let Some(c) = class {
            st.classes[c].heap.push(entry);
        }
        if !kicks.is_empty() {
            for &c in &st.machine_classes[mi] {
                if Some(c as usize) != class {
                    st.classes[c as usize].heap.push(entry);
                }
            }
        }
    }

    /// The class (machines satisfying `u`'s MachineMetadata), built on first use.
    fn class_for(&self, st: &mut State, u: usize) -> usize {
        let req = self.req(u);
        let key = metadata_key(&req.metadata);
        if let Some(c) = st.class_of.get(key.as_str()) {
            return *c as usize;
        }
        let members: Vec<u32> = (0..self.machines.len())
            .filter(|m| req.metadata_satisfied_by(&self.machines[*m].metadata))
            .map(|m| m as u32)
            .collect();
        let heap = members
            .iter()
            .map(|m| Reverse((st.load[*m as usize], *m)))
            .collect();
        let c = st.classes.len();
        for m in &members {
            st.machine_classes[*m as usize].push(c as u32);
        }
        st.classes.push(Class { members, heap });
        st.class_of.insert(key, c as u32);
        c
    }

    fn blocked_reason(&self, blocks: &[Block]) -> String {
        let mut conflicts = BTreeSet::new();
        let mut replacers = BTreeSet::new();
        let mut stuck = BTreeSet::new();
        for b in blocks {
            match b {
                Block::Conflict(w) => conflicts.insert(self.names[*w as usize]),
                Block::ReplacedBy(v) => replacers.insert(self.names[*v as usize]),
                Block::CannotReplace(y) => stuck.insert(self.names[*y as usize]),
            };
        }
        let list = |s: &BTreeSet<&str>| name_list(&s.iter().copied().collect::<Vec<_>>());
        let mut parts = Vec::new();
        if !conflicts.is_empty() {
            parts.push(format!("conflicts with {}", list(&conflicts)));
        }
        if !replacers.is_empty() {
            parts.push(format!("is replaced by {}", list(&replacers)));
        }
        if !stuck.is_empty() {
            parts.push(format!(
                "cannot replace {}, which was just placed or is needed here",
                list(&stuck)
            ));
        }
        if parts.is_empty() {
            return "no eligible machine".to_string();
        }
        let mut text = format!("{} on every eligible machine", parts.join(" or "));
        if let Some(rest) = text.strip_prefix("is ") {
            text = rest.to_string();
        }
        text
    }

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

/// A stable text key for a MachineMetadata requirement.
fn metadata_key(md: &BTreeMap<String, Vec<String>>) -> String {
    let mut key = String::new();
    for (k, vs) in md {
        key.push_str(k);
        key.push('\u{0}');
        for v in vs {
            key.push_str(v);
            key.push('\u{1}');
        }
        key.push('\u{2}');
    }
    key
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

/// Strongly connected components of a directed graph (iterative Tarjan), each listed with its
/// members in ascending order.
fn strongly_connected(edges: &[Vec<u32>]) -> Vec<Vec<u32>> {
    let n = edges.len();
    let mut index = vec![NONE; n];
    let mut low = vec![0u32; n];
    let mut on_stack = vec![false; n];
    let mut stack: Vec<u32> = Vec::new();
    let mut groups = Vec::new();
    let mut next = 0u32;
    for root in 0..n {
        if index[root] != NONE || edges[root].is_empty() {
            continue;
        }
        let mut work: Vec<(u32, usize)> = vec![(root as u32, 0)];
        index[root] = next;
        low[root] = next;
        next += 1;
        stack.push(root as u32);
        on_stack[root] = true;
        while let Some(top) = work.last_mut() {
            let v = top.0 as usize;
            if let Some(&w) = edges[v].get(top.1) {
                top.1 += 1;
                let w = w as usize;
                if index[w] == NONE {
                    index[w] = next;
                    low[w] = next;
                    next += 1;
                    stack.push(w as u32);
                    on_stack[w] = true;
                    work.push((w as u32, 0));
                } else if on_stack[w] {
                    low[v] = low[v].min(index[w]);
                }
                continue;
            }
            work.pop();
            if let Some(parent) = work.last() {
                let p = parent.0 as usize;
                low[p] = low[p].min(low[v]);
            }
            if low[v] == index[v] {
                let mut group = Vec::new();
                while let Some(w) = stack.pop() {
                    on_stack[w as usize] = false;
                    group.push(w);
                    if w as usize == v {
                        break;
                    }
                }
                group.sort_unstable();
                groups.push(group);
            }
        }
    }
    groups
}
