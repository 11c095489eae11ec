//! fleet's agent: makes the local systemd run what the registry says this machine runs, and
//! reports back what systemd says.
//!
//! Inputs: this machine's schedule and the global units (one list-watch over two prefixes and
//! this machine's API-set metadata), and systemd's D-Bus signals for the units it manages.
//! Outputs: unit files, systemd jobs, and `states/<unit>/<machine>` records under the agent's
//! lease, written only when they change.
//!
//! Where things are: the loop (`agent.rs`), what this machine must run (`desired.rs`, pure),
//! the watched records decoded as they change (`mirror.rs`), the tasks that get it there
//! (`plan.rs`, pure) and their execution (`executor.rs`), state
//! publishing (`publish.rs`), failing units (`faults.rs`), adoption of a predecessor's units (`adopt.rs`). The agent talks
//! to the registry through [`fleet_registry::AgentStore`] and to systemd through
//! [`fleet_systemd::UnitManager`], so its loop tests run on in-memory twins of both.
//!
//! Invariants:
//! - While etcd cannot be reached, what this machine must run is *unknown*, not *empty*:
//!   nothing is stopped or restarted (fleet #1181, #1289, #1725).
//! - A restarted fleetd adopts the units it left running when their files are unchanged; it
//!   does not restart them.
//! - One `daemon-reload` per batch of file changes, never one per unit.
//! - An at-most-once unit (`[X-Fleet] AtMostOnce=true`) is stopped once this machine's lease
//!   has gone unrenewed for `fleet_registry::AtMostOnce::stop_after` (`fence.rs`), and is
//!   started again only once the lease is refreshed.
//! - A unit the agent cannot bring where it should be (a file it cannot write, a failed stop)
//!   is kept as it is, never forgotten while it runs; it is retried with a growing delay, and
//!   its published state carries the reason (`faults.rs`).

mod adopt;
mod agent;
mod desired;
mod executor;
mod faults;
mod fence;
mod mirror;
mod plan;
mod publish;
#[cfg(test)]
mod tests;

pub use agent::{AgentConfig, run};
pub use desired::{Candidate, Desired, Wanted, Watched, desired_units, read_watched};
pub use plan::{Current, Move, Plan, Reload, plan, reload_rule};
