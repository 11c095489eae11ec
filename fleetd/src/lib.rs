//! fleetd as a library: its command-line definitions (so that fleetd(8) in packages,
//! `crates/fleet-dist`, comes from the same definition as `fleetd --help`), and the wiring of
//! one machine's components and API, which fleetd's main and `fleet-sim` both run.

pub mod api_host;
pub mod cli;
pub mod limits;
pub mod machine;
