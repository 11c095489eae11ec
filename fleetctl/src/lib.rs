//! fleetctl's command-line definitions as a library, so that the man pages and shell
//! completions of packages (`crates/fleet-dist`) come from the same clap tree as `--help`.

pub mod cli;
