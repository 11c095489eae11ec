//! Units the agent could not bring where they should be (a unit file it cannot write, a stop
//! or start that failed): why, and when to try again. The agent keeps such a unit as it is,
//! publishes the reason with its state, and retries with a growing delay. Pure: the executor
//! records outcomes here and asks which units wait.

use std::collections::BTreeMap;
use std::time::Duration;

use fleet_unit::UnitHash;
use tokio::time::Instant;

/// The delay before the first retry (the agent's tick comes about as often).
const FIRST: Duration = Duration::from_secs(5);
/// The longest delay between two tries of one unit.
const MAX: Duration = Duration::from_secs(30);

/// One unit's failure.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Fault {
    /// What failed, as users read it (`cannot write unit file: ...`).
    pub(crate) reason: String,
    /// The body the agent was working with (the one wanted when the write failed).
    pub(crate) hash: UnitHash,
    /// Not tried again before this.
    pub(crate) retry_at: Instant,
    delay: Duration,
}

/// The failing units, by name.
#[derive(Debug, Default)]
pub(crate) struct Faults {
    by_unit: BTreeMap<String, Fault>,
}

impl Faults {
    /// `unit` failed (again) at `now`: the next try waits twice as long as the last one did,
    /// up to [`MAX`]. Returns whether the reason is new (worth a log line and a state write).
    pub(crate) fn record(
        &mut self,
        unit: &str,
        hash: UnitHash,
        reason: String,
        now: Instant,
    ) -> bool {
        let delay = match self.by_unit.get(unit) {
            Some(f) => (f.delay * 2).min(MAX),
            None => FIRST,
        };
        let fault = Fault {
            reason,
            hash,
            retry_at: now + delay,
            delay,
        };
        let new = self
            .by_unit
            .get(unit)
            .is_none_or(|f| f.reason != fault.reason);
        self.by_unit.insert(unit.to_string(), fault);
        new
    }

    /// `unit` is fine now; returns whether it had failed.
    pub(crate) fn clear(&mut self, unit: &str) -> bool {
        self.by_unit.remove(unit).is_some()
    }

    pub(crate) fn get(&self, unit: &str) -> Option<&Fault> {
        self.by_unit.get(unit)
    }

    /// Whether `unit` failed and its next try is not due at `now`.
    pub(crate) fn waiting(&self, unit: &str, now: Instant) -> bool {
        self.by_unit.get(unit).is_some_and(|f| now < f.retry_at)
    }

    pub(crate) fn names(&self) -> impl Iterator<Item = &String> {
        self.by_unit.keys()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retries_back_off_and_a_success_forgets() {
        let hash = fleet_unit::UnitFile::parse("[Service]\nExecStart=/bin/true\n")
            .expect("unit")
            .hash();
        let t0 = Instant::now();
        let mut f = Faults::default();
        assert!(f.record("a.service", hash, "stop failed: x".into(), t0));
        assert!(f.waiting("a.service", t0 + Duration::from_secs(4)));
        assert!(!f.waiting("a.service", t0 + FIRST));
        // each failure doubles the wait, up to 30 s; the same reason is not news
        let mut delays = Vec::new();
        for _ in 0..6 {
            assert!(!f.record("a.service", hash, "stop failed: x".into(), t0));
            delays.push((f.get("a.service").expect("fault").retry_at - t0).as_secs());
        }
        assert_eq!(delays, [10, 20, 30, 30, 30, 30]);
        assert!(f.record("a.service", hash, "stop failed: y".into(), t0));
        assert!(!f.waiting("b.service", t0));
        assert!(f.clear("a.service"));
        assert!(!f.clear("a.service"));
        assert!(!f.waiting("a.service", t0));
    }
}
