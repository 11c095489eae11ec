//! Pure bookkeeping of unit states from signals: what was last sent per watched unit, and
//! which units must be read because the signals did not tell enough. No I/O.

use std::collections::{BTreeSet, HashMap};

use crate::{StateChange, SystemdState};

#[derive(Debug, Default)]
pub(super) struct Tracked {
    /// The state last emitted (None: none yet).
    last: Option<SystemdState>,
    /// Announced by `UnitNew` and not read since: its load state may have changed.
    stale: bool,
}

/// Per watched unit, what was last sent, and which units must be read from systemd because
/// the signals did not tell enough. Turns decoded signals into state changes to emit. No I/O.
#[derive(Debug, Default)]
pub(crate) struct Tracker {
    pub(super) units: HashMap<String, Tracked>,
    /// Units to read with the next batched `ListUnitsByNames` ([`Tracker::take_pending`]).
    pending: BTreeSet<String>,
}

impl Tracker {
    /// `PropertiesChanged` with whichever of the three states it carried. systemd's signals
    /// carry `ActiveState` and `SubState` but not `LoadState`, so a unit whose load state is not
    /// known (none sent yet, or announced anew) is queued for a read instead.
    pub(crate) fn properties(
        &mut self,
        name: &str,
        load: Option<String>,
        active: Option<String>,
        sub: Option<String>,
    ) -> Option<StateChange> {
        let tracked = self.units.entry(name.to_owned()).or_default();
        let last = tracked.last.as_ref().filter(|_| !tracked.stale);
        let merged = (
            load.or_else(|| last.map(|s| s.load_state.clone())),
            active.or_else(|| last.map(|s| s.active_state.clone())),
            sub.or_else(|| last.map(|s| s.sub_state.clone())),
        );
        match merged {
            (Some(load_state), Some(active_state), Some(sub_state)) => {
                tracked.stale = false;
                self.set(
                    name,
                    SystemdState {
                        load_state,
                        active_state,
                        sub_state,
                    },
                )
            }
            _ => {
                self.pending.insert(name.to_owned());
                None
            }
        }
    }

    /// `UnitNew`. Not read now: reading loads an unloaded unit, which systemd collects and
    /// announces again, forever. Its first change or job end will queue the read.
    pub(crate) fn unit_new(&mut self, name: &str) -> Option<StateChange> {
        self.units.entry(name.to_owned()).or_default().stale = true;
        None
    }

    /// `JobRemoved`: the job's outcome is known from the signals before it, unless the unit
    /// was announced anew and nothing told its state since.
    pub(crate) fn job_removed(&mut self, name: &str) -> Option<StateChange> {
        let known = self
            .units
            .get(name)
            .is_some_and(|t| t.last.is_some() && !t.stale);
        if !known {
            self.pending.insert(name.to_owned());
        }
        None
    }

    /// `UnitRemoved`. A read still pending stays pending: it reports the state systemd gives
    /// the unit when asked (which is the last word on a unit stopped and collected before its
    /// load state was known).
    pub(crate) fn unit_removed(&mut self, name: &str) -> Option<StateChange> {
        match self.units.remove(name) {
            Some(Tracked { last: Some(_), .. }) => Some(StateChange {
                name: name.to_owned(),
                state: None,
            }),
            _ => None,
        }
    }

    /// The answer to a read.
    pub(crate) fn fetched(&mut self, name: &str, state: SystemdState) -> Option<StateChange> {
        self.pending.remove(name);
        self.units.entry(name.to_owned()).or_default().stale = false;
        self.set(name, state)
    }

    /// The units to read now; empties the queue.
    pub(crate) fn take_pending(&mut self) -> Vec<String> {
        std::mem::take(&mut self.pending).into_iter().collect()
    }

    /// The unit is no longer watched.
    pub(crate) fn forget(&mut self, name: &str) {
        self.units.remove(name);
        self.pending.remove(name);
    }

    /// Everything may have changed unseen; the consumer re-reads.
    pub(crate) fn reset(&mut self) {
        self.units.clear();
        self.pending.clear();
    }

    fn set(&mut self, name: &str, state: SystemdState) -> Option<StateChange> {
        let tracked = self.units.entry(name.to_owned()).or_default();
        if tracked.last.as_ref() == Some(&state) {
            return None;
        }
        tracked.last = Some(state.clone());
        Some(StateChange {
            name: name.to_owned(),
            state: Some(state),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn st(load: &str, active: &str, sub: &str) -> SystemdState {
        SystemdState::new(load, active, sub)
    }

    /// What the tracker did after one scripted input.
    #[derive(Debug, PartialEq, Eq)]
    enum Out {
        Nothing,
        Emit(StateChange),
        /// The reads taken with [`In::Take`].
        Read(Vec<String>),
    }

    fn emit(name: &str, state: Option<SystemdState>) -> Out {
        Out::Emit(StateChange {
            name: name.into(),
            state,
        })
    }

    fn read(names: &[&str]) -> Out {
        Out::Read(names.iter().map(|n| n.to_string()).collect())
    }

    /// One scripted signal for the tracker tests.
    enum In {
        /// `PropertiesChanged` as systemd sends it: active and sub state only.
        Props(&'static str, &'static str, &'static str),
        New(&'static str),
        Removed(&'static str),
        Job(&'static str),
        Fetched(&'static str, SystemdState),
        Take,
        Reset,
    }

    fn run(script: Vec<In>) -> Vec<Out> {
        let mut t = Tracker::default();
        let out = |c: Option<StateChange>| c.map_or(Out::Nothing, Out::Emit);
        script
            .into_iter()
            .map(|input| match input {
                In::Props(n, a, u) => out(t.properties(n, None, Some(a.into()), Some(u.into()))),
                In::New(n) => out(t.unit_new(n)),
                In::Removed(n) => out(t.unit_removed(n)),
                In::Job(n) => out(t.job_removed(n)),
                In::Fetched(n, state) => out(t.fetched(n, state)),
                In::Take => Out::Read(t.take_pending()),
                In::Reset => {
                    t.reset();
                    Out::Nothing
                }
            })
            .collect()
    }

    #[test]
    fn tracker_table() {
        use In::*;
        let (a, b) = ("a.service", "b.service");
        let running = || st("loaded", "active", "running");
        let dead = || st("loaded", "inactive", "dead");
        let cases: Vec<(&str, Vec<In>, Vec<Out>)> = vec![
            (
                "first change: load state unknown, so read once; later changes merge it",
                vec![
                    Props(a, "activating", "start"),
                    Props(b, "activating", "start"),
                    Take,
                    Fetched(a, st("loaded", "activating", "start")),
                    Fetched(b, st("loaded", "active", "running")),
                    Props(a, "active", "running"),
                    Props(a, "active", "running"),
                    Job(a),
                    Take,
                ],
                vec![
                    Out::Nothing,
                    Out::Nothing,
                    read(&[a, b]),
                    emit(a, Some(st("loaded", "activating", "start"))),
                    emit(b, Some(running())),
                    emit(a, Some(running())),
                    Out::Nothing,
                    Out::Nothing,
                    read(&[]),
                ],
            ),
            (
                "changes folded into UnitNew: read when the job ends",
                vec![New(a), Job(a), Take, Fetched(a, running())],
                vec![
                    Out::Nothing,
                    Out::Nothing,
                    read(&[a]),
                    emit(a, Some(running())),
                ],
            ),
            (
                "announced anew: the old load state is not trusted",
                vec![
                    Fetched(a, running()),
                    New(a),
                    Props(a, "inactive", "dead"),
                    Take,
                    Fetched(a, st("not-found", "inactive", "dead")),
                ],
                vec![
                    emit(a, Some(running())),
                    Out::Nothing,
                    Out::Nothing,
                    read(&[a]),
                    emit(a, Some(st("not-found", "inactive", "dead"))),
                ],
            ),
            (
                "stop then garbage collection",
                vec![
                    Fetched(a, running()),
                    Props(a, "inactive", "dead"),
                    Removed(a),
                    Removed(a),
                    Take,
                ],
                vec![
                    emit(a, Some(running())),
                    emit(a, Some(dead())),
                    emit(a, None),
                    Out::Nothing,
                    read(&[]),
                ],
            ),
            (
                "collected before its load state was read: the read still happens",
                vec![
                    Props(a, "inactive", "dead"),
                    Removed(a),
                    Take,
                    Fetched(a, dead()),
                ],
                vec![
                    Out::Nothing,
                    Out::Nothing,
                    read(&[a]),
                    emit(a, Some(dead())),
                ],
            ),
            (
                "a load for a query and its collection say nothing",
                vec![New(a), Removed(a), Take],
                vec![Out::Nothing, Out::Nothing, read(&[])],
            ),
            (
                "after a reset nothing is pending and the same state is sent again",
                vec![
                    Fetched(a, running()),
                    Props(b, "active", "running"),
                    Reset,
                    Take,
                    Fetched(a, running()),
                ],
                vec![
                    emit(a, Some(running())),
                    Out::Nothing,
                    Out::Nothing,
                    read(&[]),
                    emit(a, Some(running())),
                ],
            ),
        ];
        for (what, script, want) in cases {
            assert_eq!(run(script), want, "{what}");
        }
    }
}
