//! Phase 0 of a reconcile pass: the snapshot indexed (units, machines, patterns, MachineOf
//! depth), circular Replaces settled, the basic placement of each unit and where global units
//! run; and the lookups every phase uses.

use std::collections::BTreeMap;

use fleet_unit::{Requirements, TargetState};

use super::{CYCLE, Ctx, NONE, State};
use crate::fasthash::FastMap;
use crate::patterns::PatternIndex;
use crate::words::metadata_phrase;
use crate::{Machine, Snapshot, Unit};

impl<'a> Ctx<'a> {
    pub(super) fn new(snapshot: &'a Snapshot) -> Ctx<'a> {
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

    pub(super) fn schedulable(&self, u: usize) -> bool {
        self.active[u] && !self.global[u]
    }

    pub(super) fn req(&self, u: usize) -> &'a Requirements {
        &self.units[u].requirements
    }

    /// MachineOf depth of every schedulable unit; CYCLE for units on a MachineOf cycle.
    pub(super) fn machine_of_ranks(&self) -> Vec<u32> {
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

    pub(super) fn machine_matches_id(&self, m: usize, id: &str) -> bool {
        let mid = self.machines[m].id.as_str();
        mid == id || (mid.len() > 8 && mid.get(..8) == Some(id))
    }

    /// Machines a MachineID requirement can mean (full ID, or the 8-character short ID).
    pub(super) fn machines_with_id(&self, id: &str) -> Vec<u32> {
        if let Some(m) = self.machine_by_id.get(id) {
            return vec![*m];
        }
        self.machine_by_short_id
            .get(id)
            .cloned()
            .unwrap_or_default()
    }

    /// Why machine `m` can never take unit `u` (MachineID, MachineMetadata), if it can't.
    pub(super) fn static_misfit(&self, u: usize, m: usize) -> Option<String> {
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
    pub(super) fn static_reason(&self, u: usize) -> String {
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

    pub(super) fn mid(&self, m: u32) -> &'a str {
        self.machines[m as usize].id.as_str()
    }

    pub(super) fn do_conflict(&self, a: usize, b: usize) -> bool {
        self.conflicts.any_matches(a, self.names[b]) || self.conflicts.any_matches(b, self.names[a])
    }

    /// Circular Replaces: units that replace each other, directly or around a longer circle
    /// (a strongly connected group of the Replaces graph), would push each other off forever,
    /// so only one unit of each such group may run: the first by name among those currently
    /// placed, else the first by name. Returns, per unit, the unit it gave way to (NONE for
    /// units that may run).
    pub(super) fn circular_replace_rivals(&self, st: &mut State) -> Vec<u32> {
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
    pub(super) fn replaced_by_unit(&self, u: usize) -> Vec<u32> {
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

    pub(super) fn circular_reason(&self, rival: usize) -> String {
        format!(
            "circular Replaces with {}: only one of them is scheduled",
            self.names[rival]
        )
    }

    /// A current placement that survives the checks every unit must pass on its own:
    /// active, not global, machine present, MachineID and MachineMetadata satisfied.
    pub(super) fn basic_placement(&self, u: usize, rivals: &[u32]) -> Result<Option<u32>, String> {
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
    pub(super) fn basic_placements(&self, st: &mut State, rivals: &[u32]) -> Vec<u32> {
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

    pub(super) fn place_globals(&self, st: &mut State, basic: &[u32]) {
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
