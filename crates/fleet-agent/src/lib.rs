//! fleet's agent: makes the local systemd run what the registry says this machine runs, and
//! reports back what systemd says.
//!
//! Inputs: this machine's schedule and the global units (one list-watch over two prefixes and
//! this machine's API-set metadata), and systemd's D-Bus signals for the units it manages.
//! Outputs: unit files, systemd jobs, and `states/<unit>/<machine>` records under the agent's
//! lease, written only when they change.
//!
//! Invariants:
//! - While etcd cannot be reached, what this machine must run is *unknown*, not *empty*:
//!   nothing is stopped or restarted (fleet #1181, #1289, #1725).
//! - A restarted fleetd adopts the units it left running when their files are unchanged; it
//!   does not restart them.
//! - One `daemon-reload` per batch of file changes, never one per unit.

mod agent;
mod desired;

pub use agent::{AgentConfig, AgentStats, run};
pub use desired::{Desired, desired_units};
