//! fleetd: the fleet daemon (agent, engine and HTTP API) of one machine.

use clap::Parser;

#[derive(Parser)]
#[command(name = "fleetd", version, about = "fleet daemon")]
struct Args {
    /// Path to the configuration file
    #[arg(long, default_value = "/etc/fleet/fleet.conf")]
    config: String,
}

fn main() {
    let _args = Args::parse();
    // Placeholder until the agent and engine land: stay up until systemd stops us.
    loop {
        std::thread::park();
    }
}
