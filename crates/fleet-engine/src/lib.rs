//! fleet's engine: one leader per cluster turns units and machines into a schedule.
//!
//! Every fleetd runs an engine (unless `disable_engine`); they elect one leader through etcd.
//! The leader mirrors the engine's keys with one list-watch, and after every change (and
//! every `engine_reconcile_interval`) asks the pure scheduler what to do and writes only the
//! difference, each write fenced on its leadership. It also writes, for each unit it cannot
//! place, the scheduler's reason.
//!
//! Where things are: the engine as a struct handling one event at a time, and its loop
//! (`engine.rs`); the pure translation between the registry's view and the scheduler
//! (`plan.rs`). The engine talks to the registry through [`fleet_registry::EngineStore`], so
//! its loop tests run on the in-memory store.
//!
//! Invariants:
//! - A reconcile never runs on a mirror older than the engine's own last write (no double
//!   scheduling from a stale view).
//! - A new leader moves nothing during its first `agent_ttl`: placements on machines that
//!   have not re-appeared yet are kept (a leadership change or an etcd blip must not move
//!   units: fleet #1181, #1289, #1725).

mod engine;
mod plan;
#[cfg(test)]
mod tests;

pub use engine::{CAMPAIGN_SPREAD, EngineConfig, run};
pub use plan::{diff, to_scheduler_snapshot};
