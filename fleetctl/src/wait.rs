//! Blocking until the cluster has acted: until units report a state (load, start, stop,
//! unload) and until systemd reports started units active.
//!
//! fleet polled every 250 ms, up to two seconds per "attempt". Here each check is followed by
//! [`Registry::wait_for_change`] (a watch with the etcd driver), so a state change is seen when
//! it happens; `--block-attempts=N` keeps fleet's budget of N × 2 s. While a unit cannot be
//! placed, the engine's reason is printed once per distinct reason instead of waiting
//! silently.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use fleet_registry::{Registry, StateRecord};
use fleet_unit::{TargetState, UnitName};
use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use tokio::time::Instant;

use crate::context::Ctx;
use crate::error::describe;
use crate::ui;

/// fleet's time budget of one blocking attempt.
pub const ATTEMPT: Duration = Duration::from_secs(2);
/// Longest single wait for a change before checking again anyway (covers changes that land
/// between a check and the start of the next watch).
const RECHECK: Duration = Duration::from_secs(1);
/// Pause after a failed registry read before retrying.
const RETRY: Duration = Duration::from_millis(250);
/// How long systemd may report a started unit failed or inactive before we believe it.
const SETTLE: Duration = Duration::from_secs(2);

/// fleet's `getBlockAttempts`: -1 with `--no-block`, else `--block-attempts` (0 = no limit).
pub fn block_attempts(no_block: bool, attempts: i64) -> i64 {
    if no_block { -1 } else { attempts.max(0) }
}

fn deadline(attempts: i64) -> Option<Instant> {
    (attempts > 0).then(|| Instant::now() + ATTEMPT * u32::try_from(attempts).unwrap_or(u32::MAX))
}

/// Waits up to `max` (never past `deadline`) for a change of `name`; `false` when the
/// deadline has passed.
async fn wait_change(reg: &Arc<dyn Registry>, name: &UnitName, deadline: Option<Instant>) -> bool {
    let max = match deadline {
        Some(d) => {
            let now = Instant::now();
            if now >= d {
                return false;
            }
            (d - now).min(RECHECK)
        }
        None => RECHECK,
    };
    let started = Instant::now();
    reg.wait_for_change(name, max).await;
    // a driver that cannot watch (or a broken connection) may return at once: do not spin
    if started.elapsed() < Duration::from_millis(20) {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    true
}

/// fleet's `tryWaitForUnitStates`: with `attempts < 0` only reports `Triggered unit <name>
/// <verb>`; otherwise waits for every unit to reach `want`.
pub async fn try_wait_for_unit_states(
    ctx: &Ctx,
    names: &[UnitName],
    verb: &str,
    want: TargetState,
    attempts: i64,
) -> Result<(), String> {
    if attempts < 0 {
        for name in names {
            ui::out(format!("Triggered unit {name} {verb}"));
        }
        return Ok(());
    }
    wait_for_unit_states(ctx, names, want, attempts).await
}

/// Waits (concurrently) until each unit's state is `want`, printing `Unit <name> <state>[ on
/// <machine>]` for each as it gets there (in that order, as fleet did). A global unit is judged by its desired state (no
/// single machine reports it). Ends at the first error.
pub async fn wait_for_unit_states(
    ctx: &Ctx,
    names: &[UnitName],
    want: TargetState,
    attempts: i64,
) -> Result<(), String> {
    if names.is_empty() {
        return Ok(());
    }
    let reg = ctx
        .registry()
        .await
        .map_err(|f| f.message.unwrap_or_default())?;
    let deadline = deadline(attempts);
    let mut waits: FuturesUnordered<_> = names
        .iter()
        .map(|name| wait_for_unit_state(ctx, &reg, name, want, deadline))
        .collect();
    while let Some(result) = waits.next().await {
        ui::out(result?);
    }
    Ok(())
}

/// Waits until one unit's state is `want`, and returns the line that says so (`Unit <name>
/// <state>[ on <machine>]`) for the caller to print in its order.
pub async fn unit_state_line(
    ctx: &Ctx,
    reg: &Arc<dyn Registry>,
    name: &UnitName,
    want: TargetState,
    attempts: i64,
) -> Result<String, String> {
    wait_for_unit_state(ctx, reg, name, want, deadline(attempts)).await
}

async fn wait_for_unit_state(
    ctx: &Ctx,
    reg: &Arc<dyn Registry>,
    name: &UnitName,
    want: TargetState,
    deadline: Option<Instant>,
) -> Result<String, String> {
    let mut reasons_shown: HashSet<String> = HashSet::new();
    let mut errors_shown: HashSet<String> = HashSet::new();
    loop {
        match reg.unit(name).await {
            Ok(Some(u)) => {
                let state = if u.global { u.desired } else { u.current };
                if state == want {
                    // (fleet printed the current state, always empty for a global unit)
                    let mut msg = format!("Unit {name} {state}");
                    let machine = match &u.machine_id {
                        Some(id) => ctx.machine(id).await,
                        None => None,
                    };
                    if let Some(m) = machine {
                        msg = format!(
                            "{msg} on {}",
                            crate::context::machine_full_legend(&m.id, &m.public_ip, false)
                        );
                    }
                    return Ok(msg);
                }
                tracing::debug!("Waiting for Unit({name}) state({state}) to be {want}");
                let unplaced_reason = u.reason.filter(|_| u.machine_id.is_none());
                if let Some(reason) = unplaced_reason.filter(|r| reasons_shown.insert(r.clone())) {
                    ui::err(format!("Unit {name} cannot be placed yet: {reason}"));
                }
            }
            Ok(None) => return Err(format!("Unit {name} not found")),
            Err(e) => {
                let e = describe(&e);
                if errors_shown.insert(e.clone()) {
                    tracing::warn!("Error retrieving Unit({name}) from Registry: {e}");
                }
                tokio::time::sleep(RETRY).await;
            }
        }
        if !wait_change(reg, name, deadline).await {
            return Err(format!(
                "timed out waiting for unit {name} to report state {want}"
            ));
        }
    }
}

/// After `start`: waits until systemd on each unit's machine reports it loaded and active.
/// A unit that systemd keeps reporting failed or inactive (for two seconds, to let a fresh
/// start show) is an error, as is the `--block-attempts` budget running out.
pub async fn wait_for_active(ctx: &Ctx, names: &[UnitName], attempts: i64) -> Result<(), String> {
    if names.is_empty() || attempts < 0 {
        return Ok(());
    }
    let reg = ctx
        .registry()
        .await
        .map_err(|f| f.message.unwrap_or_default())?;
    let deadline = deadline(attempts);
    let mut waits: FuturesUnordered<_> = names
        .iter()
        .map(|name| wait_for_active_one(&reg, name, deadline, attempts))
        .collect();
    while let Some(result) = waits.next().await {
        result?;
    }
    Ok(())
}

async fn wait_for_active_one(
    reg: &Arc<dyn Registry>,
    name: &UnitName,
    deadline: Option<Instant>,
    attempts: i64,
) -> Result<(), String> {
    let mut down_since: Option<Instant> = None;
    loop {
        match systemd_state(reg, name).await {
            Ok(Some(s)) if s.active_state == "active" && s.load_state == "loaded" => return Ok(()),
            Ok(Some(s)) if matches!(s.active_state.as_str(), "failed" | "inactive") => {
                let since = *down_since.get_or_insert_with(Instant::now);
                if since.elapsed() >= SETTLE {
                    return Err(format!(
                        "Failed to find an active unit {name}: systemd reports it {} ({})",
                        s.active_state, s.sub_state
                    ));
                }
            }
            Ok(_) => down_since = None,
            Err(e) => {
                tracing::debug!("Error getting unit state of {name}: {e}");
                tokio::time::sleep(RETRY).await;
            }
        }
        // a unit that is down is re-checked soon even without a change
        let settle_by = down_since.map(|s| s + SETTLE);
        let until = match (deadline, settle_by) {
            (Some(d), Some(s)) => Some(d.min(s)),
            (d, s) => d.or(s),
        };
        let waited = wait_change(reg, name, until).await;
        if !waited && deadline.is_some_and(|d| Instant::now() >= d) {
            let secs = ATTEMPT.as_secs() * u64::try_from(attempts).unwrap_or(0);
            return Err(format!(
                "Failed to find an active unit {name} within {secs}s"
            ));
        }
    }
}

/// What systemd reports for `name` on the machine the unit is placed on.
async fn systemd_state(
    reg: &Arc<dyn Registry>,
    name: &UnitName,
) -> Result<Option<StateRecord>, String> {
    let unit = reg.unit(name).await.map_err(|e| describe(&e))?;
    let Some(machine) = unit.and_then(|u| u.machine_id) else {
        return Ok(None);
    };
    let states = reg.unit_states().await.map_err(|e| describe(&e))?;
    Ok(states
        .into_iter()
        .find(|s| s.name == name.as_str() && s.machine_id == machine))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn block_attempts_like_fleet() {
        for (no_block, attempts, want) in [
            (true, 0, -1),
            (true, -1, -1),
            (true, 9999, -1),
            (false, 0, 0),
            (false, -1, 0),
            (false, 9999, 9999),
        ] {
            assert_eq!(
                block_attempts(no_block, attempts),
                want,
                "{no_block} {attempts}"
            );
        }
    }
}
