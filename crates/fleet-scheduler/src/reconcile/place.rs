//! Phase 2 of a reconcile pass: every unit that should run and has no machine is placed on
//! the least-loaded eligible one, kicking replaced units away, or gets the reason why not.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap};

use super::{Block, CYCLE, Class, Ctx, NONE, State};
use crate::words::name_list;

impl Ctx<'_> {
    /// Phase 2: place every queued unit, targets before followers.
    pub(super) fn place_pending(&self, st: &mut State, mut queue: BinaryHeap<Reverse<(u32, u32)>>) {
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
    pub(super) fn place_one(
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
    pub(super) fn explicit_candidates(&self, st: &State, u: usize) -> Result<Vec<u32>, String> {
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
    pub(super) fn mark_blocked(&self, st: &mut State, u: usize) {
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
    pub(super) fn check(&self, st: &State, u: usize, m: u32) -> Result<Vec<u32>, Block> {
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

    pub(super) fn commit(
        &self,
        st: &mut State,
        u: usize,
        m: u32,
        kicks: &[u32],
        class: Option<usize>,
    ) {
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
    pub(super) fn class_for(&self, st: &mut State, u: usize) -> usize {
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

    pub(super) fn blocked_reason(&self, blocks: &[Block]) -> String {
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
