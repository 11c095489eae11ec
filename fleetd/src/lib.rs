//! fleetd's command-line definitions as a library, so that fleetd(8) in packages
//! (`crates/fleet-dist`) comes from the same definition as `fleetd --help`.

pub mod cli;
