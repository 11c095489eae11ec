//! fleetctl: the command-line client of a fleet cluster.
//!
//! `main` parses the command line (see `cli`), runs one command (see `commands`) and is the
//! only place that turns the outcome into a message on stderr and an exit status.

mod commands;
mod context;
mod error;
mod table;
mod tunnel;
mod ui;
mod units;
mod wait;

use std::io::IsTerminal;

use clap::FromArgMatches;
use fleetctl::cli;

use crate::cli::Cli;
use crate::context::Ctx;

/// The allocator of fleetd and fleet-sim, for the same reason (listings of 100,000 rows).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() {
    let matches = cli::command().get_matches();
    let cli = match Cli::from_arg_matches(&matches) {
        Ok(cli) => cli,
        Err(e) => e.exit(),
    };
    if cli.global.version {
        commands::version();
        return;
    }
    let Some(command) = cli.command else {
        // fleet printed its usage when run without a command, and succeeded
        let _ = cli::command().print_help();
        return;
    };
    init_logging(cli.global.debug);

    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            ui::err(format!("fleetctl: cannot start: {e}"));
            std::process::exit(1);
        }
    };
    let ctx = Ctx::new(cli.global);
    let outcome = runtime.block_on(commands::run(&ctx, command));
    // background tasks (watches, tunnels) are not waited for
    runtime.shutdown_background();
    if let Err(failure) = outcome {
        if let Some(message) = failure.message {
            ui::err(message);
        }
        std::process::exit(failure.code);
    }
}

/// Warnings always go to stderr; `--debug` adds fleetctl's and the libraries' debug output.
/// (russh's buffers warn once per process when they cannot be locked in memory, as in any
/// login session with the usual RLIMIT_MEMLOCK: noise for a user, so only with `--debug`.)
fn init_logging(debug: bool) {
    let filter = if debug {
        "debug,h2=info,tower=info,hyper=info,rustls=info"
    } else {
        "warn,russh_cryptovec=error"
    };
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_target(debug)
        .try_init();
}
