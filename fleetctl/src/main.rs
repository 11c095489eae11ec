//! fleetctl: the command-line client of a fleet cluster.

use clap::Parser;

#[derive(Parser)]
#[command(name = "fleetctl", version, about = "fleetctl is a command-line interface to fleet")]
struct Args {}

fn main() {
    let _args = Args::parse();
}
