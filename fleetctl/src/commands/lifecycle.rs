//! The commands that change units: submit, load, start, stop, unload, destroy, restart, and
//! `cat`, which shows what was submitted.

use fleet_registry::UnitView;
use fleet_unit::{TargetState, UnitName};

use crate::cli::BlockArgs;
use crate::context::Ctx;
use crate::error::{Failure, Outcome, describe};
use crate::ui;
use crate::units::{self, Creator};
use crate::wait::{self, block_attempts};

/// fleet's answer to a command without units: a note, and success.
fn no_units() -> Outcome {
    ui::err("No units given");
    Ok(())
}

pub async fn submit(ctx: &Ctx, args: &[String], replace: bool) -> Outcome {
    if args.is_empty() {
        return no_units();
    }
    units::lazy_create(ctx, args, replace, Creator::Submit).await
}

pub async fn load(ctx: &Ctx, args: &[String], block: &BlockArgs, replace: bool) -> Outcome {
    if args.is_empty() {
        return no_units();
    }
    units::lazy_create(ctx, args, replace, Creator::Load).await?;
    let triggered = units::set_target_states(ctx, args, TargetState::Loaded)
        .await
        .map_err(|e| Failure::msg(format!("Error loading units: {e}")))?;
    let loading = trigger_globals(&triggered, "load");
    let attempts = block_attempts(block.no_block, block.block_attempts);
    wait::try_wait_for_unit_states(ctx, &loading, "load", TargetState::Loaded, attempts)
        .await
        .map_err(unit_wait_failed)
}

pub async fn start(ctx: &Ctx, args: &[String], block: &BlockArgs, replace: bool) -> Outcome {
    if args.is_empty() {
        return no_units();
    }
    units::lazy_create(ctx, args, replace, Creator::Start).await?;
    let triggered = units::set_target_states(ctx, args, TargetState::Launched)
        .await
        .map_err(|e| Failure::msg(format!("Error starting units: {e}")))?;
    let starting = trigger_globals(&triggered, "start");
    let attempts = block_attempts(block.no_block, block.block_attempts);
    wait::try_wait_for_unit_states(ctx, &starting, "start", TargetState::Launched, attempts)
        .await
        .map_err(unit_wait_failed)?;
    wait::wait_for_active(ctx, &starting, attempts)
        .await
        .map_err(active_wait_failed)
}

/// A wait for unit states that failed, in fleet's two lines: the wait's own, then the
/// command's.
fn unit_wait_failed(e: String) -> Failure {
    ui::err(format!("Error waiting for units: {e}"));
    Failure::msg(format!("Error waiting for unit states, exit status: {e}"))
}

/// A wait for systemd to report started units active that failed, in fleet's two lines.
fn active_wait_failed(e: String) -> Failure {
    ui::err(format!("Error waiting for units: {e}"));
    Failure::msg(format!("Error waiting for systemd unit states, err: {e}"))
}

/// Reports the global units among `triggered` (nobody waits for those) and returns the others.
fn trigger_globals(triggered: &[UnitView], verb: &str) -> Vec<UnitName> {
    let mut rest = Vec::new();
    for u in triggered {
        if u.global {
            ui::out(format!("Triggered global unit {} {verb}", u.name));
        } else {
            rest.push(u.name.clone());
        }
    }
    rest
}

/// The registry units named by `args`, or `None` (after fleet's note) when there are none.
async fn named_units(ctx: &Ctx, args: &[String]) -> Result<Option<Vec<UnitView>>, Failure> {
    let found = units::find_units(ctx, args).await?;
    if found.is_empty() {
        ui::err("Units not found in registry");
        return Ok(None);
    }
    Ok(Some(found))
}

pub async fn stop(ctx: &Ctx, args: &[String], block: &BlockArgs) -> Outcome {
    if args.is_empty() {
        return no_units();
    }
    let Some(found) = named_units(ctx, args).await? else {
        return Ok(());
    };
    let reg = ctx.registry().await?;
    let mut stopping = Vec::new();
    for u in &found {
        if !u.global {
            if u.current == TargetState::Inactive {
                return Err(Failure::msg(format!(
                    "Unable to stop unit {} in state inactive",
                    u.name
                )));
            }
            // fleet skipped any unit currently loaded, even one about to be started
            if u.current == TargetState::Loaded && u.desired == TargetState::Loaded {
                tracing::debug!("Unit({}) already loaded, skipping.", u.name);
                continue;
            }
        }
        lower_target(&*reg, u, TargetState::Loaded, "stop", &mut stopping).await?;
    }
    wait_lowered(
        ctx,
        block,
        &stopping,
        TargetState::Loaded,
        ("stop", "stopped"),
    )
    .await
}

/// Sets `u`'s desired state to `target` (stop, unload); global units are reported as
/// triggered, the others added to `waiting`.
async fn lower_target(
    reg: &dyn fleet_registry::Registry,
    u: &UnitView,
    target: TargetState,
    verb: &str,
    waiting: &mut Vec<UnitName>,
) -> Result<(), Failure> {
    tracing::debug!("Setting target state of Unit({}) to {target}", u.name);
    reg.set_desired_state(&u.name, target).await.map_err(|e| {
        Failure::msg(format!(
            "Error setting target state of unit {}: {}",
            u.name,
            describe(&e)
        ))
    })?;
    if u.global {
        ui::out(format!("Triggered global unit {} {verb}", u.name));
    } else {
        waiting.push(u.name.clone());
    }
    Ok(())
}

/// Waits (unless --no-block) for `waiting` to reach `target`, with fleet's messages.
async fn wait_lowered(
    ctx: &Ctx,
    block: &BlockArgs,
    waiting: &[UnitName],
    target: TargetState,
    (verb, done): (&str, &str),
) -> Outcome {
    let attempts = block_attempts(block.no_block, block.block_attempts);
    wait::try_wait_for_unit_states(ctx, waiting, verb, target, attempts)
        .await
        .map_err(|e| {
            ui::err(format!("Error waiting for units: {e}"));
            Failure::msg(format!(
                "Failed to {verb} units {}. err: {e}",
                ui::go_list(waiting)
            ))
        })?;
    ui::err(format!(
        "Successfully {done} units {}.",
        ui::go_list(waiting)
    ));
    Ok(())
}

pub async fn unload(ctx: &Ctx, args: &[String], block: &BlockArgs) -> Outcome {
    if args.is_empty() {
        return no_units();
    }
    let Some(found) = named_units(ctx, args).await? else {
        return Ok(());
    };
    let reg = ctx.registry().await?;
    let mut waiting = Vec::new();
    for u in &found {
        // fleet skipped any unit not currently placed, even one waiting to be placed
        if !u.global && u.current == TargetState::Inactive && u.desired == TargetState::Inactive {
            tracing::debug!(
                "Target state of Unit({}) already inactive, skipping.",
                u.name
            );
            continue;
        }
        lower_target(&*reg, u, TargetState::Inactive, "unload", &mut waiting).await?;
    }
    wait_lowered(
        ctx,
        block,
        &waiting,
        TargetState::Inactive,
        ("unload", "unloaded"),
    )
    .await
}

pub async fn destroy(ctx: &Ctx, args: &[String], block: &BlockArgs) -> Outcome {
    if args.is_empty() {
        return no_units();
    }
    let Some(found) = named_units(ctx, args).await? else {
        return Ok(());
    };
    let reg = ctx.registry().await?;
    let attempts = block_attempts(block.no_block, block.block_attempts);
    let mut failed = false;
    for u in &found {
        match reg.destroy_unit(&u.name).await {
            // someone else destroyed it meanwhile
            Ok(false) => continue,
            Ok(true) => {}
            Err(e) => {
                ui::err(format!("Error destroying units: {}", describe(&e)));
                failed = true;
                continue;
            }
        }
        if attempts >= 0 {
            let deadline = (attempts > 0)
                .then(|| tokio::time::Instant::now() + wait::ATTEMPT * attempts as u32);
            loop {
                match reg.unit(&u.name).await {
                    Ok(None) => break,
                    Ok(Some(_)) => {}
                    Err(e) => {
                        ui::err(format!("Error destroying units: {}", describe(&e)));
                        failed = true;
                        break;
                    }
                }
                if deadline.is_some_and(|d| tokio::time::Instant::now() >= d) {
                    break;
                }
                reg.wait_for_change(&u.name, wait::ATTEMPT).await;
            }
        }
        ui::out(format!("Destroyed {}", u.name));
    }
    if failed {
        Err(Failure::silent(1))
    } else {
        Ok(())
    }
}

pub async fn cat(ctx: &Ctx, args: &[String]) -> Outcome {
    let [arg] = args else {
        return Err(Failure::msg("One unit file must be provided"));
    };
    let name = units::mangle(arg);
    let reg = ctx.registry().await?;
    let unit = units::lookup(&reg, &name)
        .await
        .map_err(|e| Failure::msg(format!("Error retrieving Unit {name}: {e}")))?
        .ok_or_else(|| Failure::msg(format!("Unit {name} not found")))?;
    // the stored unit exactly, without an added newline
    ui::out_raw(&unit.file.serialize());
    Ok(())
}

/// A rolling restart: one unit after the other is stopped, waited for, started and waited for
/// until systemd reports it active. Global units are restarted with `systemctl restart` on
/// every machine that reports them.
pub async fn restart(
    ctx: &Ctx,
    args: &[String],
    block_attempts_flag: i64,
    ssh_port: u16,
) -> Outcome {
    if args.is_empty() {
        return no_units();
    }
    let found = units::find_units(ctx, args).await?;
    units::lazy_create(ctx, args, false, Creator::Restart).await?;
    let attempts = block_attempts(false, block_attempts_flag);
    let mut globals = Vec::new();
    for u in &found {
        if u.global {
            globals.push(u.name.clone());
            continue;
        }
        match u.current {
            TargetState::Inactive => {
                ui::err(format!(
                    "Unable to restart unit {} in state inactive",
                    u.name
                ));
                continue;
            }
            TargetState::Loaded => {
                tracing::debug!("Unit({}) already loaded, starting.", u.name);
            }
            TargetState::Launched => {
                set_state_and_wait(ctx, &u.name, TargetState::Loaded, attempts).await?;
            }
        }
        set_state_and_wait(ctx, &u.name, TargetState::Launched, attempts).await?;
        wait::wait_for_active(ctx, std::slice::from_ref(&u.name), attempts)
            .await
            .map_err(active_wait_failed)?;
        tracing::debug!("Unit({}) was restarted.", u.name);
    }
    if !globals.is_empty() {
        super::remote::on_machines_running(ctx, &globals, "restart", ssh_port)
            .await
            .map_err(|e| {
                Failure::msg(format!(
                    "Error restarting global units {}: {e}",
                    ui::go_list(&globals)
                ))
            })?;
    }
    Ok(())
}

async fn set_state_and_wait(
    ctx: &Ctx,
    name: &UnitName,
    state: TargetState,
    attempts: i64,
) -> Outcome {
    let reg = ctx.registry().await?;
    reg.set_desired_state(name, state).await.map_err(|e| {
        Failure::msg(format!(
            "Error setting target state for unit {name}: {}",
            describe(&e)
        ))
    })?;
    wait::wait_for_unit_states(ctx, std::slice::from_ref(name), state, attempts)
        .await
        .map_err(unit_wait_failed)
}
