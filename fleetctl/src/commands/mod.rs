//! One function per fleetctl command. Each returns an [`Outcome`]; output that fleet printed
//! along the way is printed here, the final error message is left to `main`.

mod import_v1;
mod lifecycle;
mod list;
mod live;
mod remote;

use crate::cli::Command;
use crate::context::Ctx;
use crate::error::{Failure, Outcome};
use crate::ui;

/// fleet's warning for the removed signed-units feature (exit status 2).
const SIGN_DEPRECATED: &str =
    "WARNING: The signed/verified units feature is DEPRECATED and cannot be used.";

/// Runs one command.
pub async fn run(ctx: &Ctx, command: Command) -> Outcome {
    match command {
        Command::Cat(a) => lifecycle::cat(ctx, &a.units).await,
        Command::Destroy(a) => lifecycle::destroy(ctx, &a.units, &a.block).await,
        Command::FdForward(a) => remote::fd_forward(&a.socket).await,
        Command::ImportV1(a) => import_v1::run(ctx, &a).await,
        Command::Events(a) => live::events(ctx, &a).await,
        Command::Journal(a) => remote::journal(ctx, &a).await,
        Command::ListMachines(a) if a.watch => live::watch_machines(ctx, &a).await,
        Command::ListMachines(a) => list::machines(ctx, &a.list, &a.fields).await,
        Command::ListUnitFiles(a) => list::unit_files(ctx, &a.list, &a.fields).await,
        Command::ListUnits(a) if a.watch => live::watch_units(ctx, &a).await,
        Command::ListUnits(a) => list::units(ctx, &a.list, &a.fields).await,
        Command::Load(a) => {
            if a.sign.sign {
                return Err(Failure::new(2, SIGN_DEPRECATED));
            }
            lifecycle::load(ctx, &a.units, &a.block, a.replace).await
        }
        Command::Restart(a) => {
            lifecycle::restart(ctx, &a.units, a.block_attempts, a.ssh_port).await
        }
        Command::Ssh(a) => remote::ssh(ctx, &a).await,
        Command::Start(a) => {
            if a.sign.sign {
                return Err(Failure::new(2, SIGN_DEPRECATED));
            }
            lifecycle::start(ctx, &a.units, &a.block, a.replace).await
        }
        Command::Status(a) => remote::status(ctx, &a.units, a.ssh_port).await,
        Command::Stop(a) => lifecycle::stop(ctx, &a.units, &a.block).await,
        Command::Submit(a) => {
            if a.sign.sign {
                return Err(Failure::new(2, SIGN_DEPRECATED));
            }
            lifecycle::submit(ctx, &a.units, a.replace).await
        }
        Command::Unload(a) => lifecycle::unload(ctx, &a.units, &a.block).await,
        Command::Verify(_) => {
            ui::err("Command \"verify\" is deprecated, DEPRECATED - No longer works");
            Err(Failure::new(2, SIGN_DEPRECATED))
        }
        Command::Version => {
            version();
            Ok(())
        }
        Command::Completion(a) => {
            // Generated into memory first: clap_complete panics on a failed write, and
            // `fleetctl completion bash | head -1` closes the pipe early.
            let mut cmd = crate::cli::command();
            let mut script = Vec::new();
            clap_complete::generate(a.shell, &mut cmd, "fleetctl", &mut script);
            ui::out_raw(&String::from_utf8_lossy(&script));
            Ok(())
        }
    }
}

/// `fleetctl version`, also `fleetctl --version` and `-v`.
pub fn version() {
    ui::out(format!("fleetctl version {}", env!("CARGO_PKG_VERSION")));
}
