//! fleetd's command line, defined once: parsing and `--help` in fleetd, and fleetd(8) in
//! packages (`crates/fleet-dist`).

use std::path::PathBuf;

use clap::{CommandFactory, Parser};

#[derive(Parser)]
#[command(
    name = "fleetd",
    disable_version_flag = true,
    about = "fleet daemon: runs units of a fleet cluster on this machine"
)]
pub struct Args {
    /// Path to config file. fleetd looks for /etc/fleet/fleet.conf by default
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Print the version and exit
    #[arg(long)]
    pub version: bool,
    /// `version` does what --version does (as in fleet); fleetd takes no other argument
    #[arg(hide = true)]
    pub command: Option<String>,
}

/// The clap command behind `fleetd --help`.
pub fn command() -> clap::Command {
    Args::command()
}
