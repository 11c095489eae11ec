//! Phase 1 of a reconcile pass: every current placement that still holds is kept, targets
//! before followers; the rest are unscheduled with a reason.

use std::cmp::Reverse;
use std::collections::BinaryHeap;

use super::{CYCLE, Ctx, NONE, State};

impl Ctx<'_> {
    /// Phase 1: keep what still holds. Returns the units that need a (new) machine.
    pub(super) fn keep_current(
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
    pub(super) fn still_holds(
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

    pub(super) fn cycle_reason(&self, u: usize) -> String {
        let target = self.peers[u]
            .iter()
            .position(|t| *t != NONE && self.rank[*t as usize] == CYCLE)
            .map(|i| self.req(u).machine_of[i].as_str())
            .unwrap_or("");
        format!(
            "MachineOf={target} leads back to this unit (bidirectional MachineOf is not supported)"
        )
    }
}
