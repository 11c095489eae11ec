//! Blocking until the cluster has acted: until units report a state (load, start, stop,
//! unload) and until systemd reports started units active.
//!
//! fleet polled every 250 ms, up to two seconds per "attempt". Here each check is followed by
//! [`Registry::wait_for_change`] (a watch with the etcd driver), so a state change is seen when
//! it happens; `--block-attempts=N` keeps fleet's budget of N × 2 s. While a unit cannot be
//! placed, the engine's reason is printed once per distinct reason instead of waiting
//! silently.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use fleet_registry::{Registry, StateRecord, UnitView, reports_hash};
use fleet_unit::{TargetState, UnitHash, UnitName};
use tokio::time::Instant;

use crate::context::Ctx;
use crate::error::describe;
use crate::ui;

/// fleet's time budget of one blocking attempt.
pub const ATTEMPT: Duration = Duration::from_secs(2);
/// Longest single wait for a change before checking again anyway (covers changes that land
/// between a check and the start of the next watch).
const RECHECK: Duration = Duration::from_secs(1);
/// Pause between two rounds of checks of several units (fleet polled every 250 ms).
const POLL: Duration = Duration::from_millis(200);
/// Pause after a failed registry read before retrying.
const RETRY: Duration = Duration::from_millis(250);
/// How long systemd may report a started unit failed or inactive before we believe it.
const SETTLE: Duration = Duration::from_secs(2);
/// How long a unit waits before its reason is shown: in a burst the engine may see a unit
/// before the one it must join (`MachineOf=`) and say so for a moment; such passing reasons
/// are not worth a line.
const REASON_GRACE: Duration = Duration::from_secs(1);

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

/// Up to this many units a round reads each unit on its own; more, and it lists them all.
const FEW: usize = 8;

/// The registry's view of `names` (absent ones left out): one read per unit for a few, one
/// list for many.
async fn views(
    reg: &Arc<dyn Registry>,
    names: &[&UnitName],
) -> Result<HashMap<UnitName, UnitView>, String> {
    if names.len() <= FEW {
        let got: Vec<_> = futures_util::future::join_all(names.iter().map(|n| reg.unit(n))).await;
        let mut out = HashMap::new();
        for u in got {
            if let Some(u) = u.map_err(|e| describe(&e))? {
                out.insert(u.name.clone(), u);
            }
        }
        return Ok(out);
    }
    let all = reg.units().await.map_err(|e| describe(&e))?;
    Ok(all.into_iter().map(|u| (u.name.clone(), u)).collect())
}

/// Waits for a change of any of `pending` (at most until `deadline`); `false` when the
/// deadline has passed. One unit is watched; several are polled, as fleet did.
async fn wait_round(
    reg: &Arc<dyn Registry>,
    pending: &[&UnitName],
    deadline: Option<Instant>,
) -> bool {
    match pending {
        [one] => wait_change(reg, one, deadline).await,
        _ => {
            if deadline.is_some_and(|d| Instant::now() >= d) {
                return false;
            }
            let pause = deadline.map_or(POLL, |d| (d - Instant::now()).min(POLL));
            tokio::time::sleep(pause).await;
            true
        }
    }
}

/// Waits until each unit's state is `want`, printing `Unit <name> <state>[ on <machine>]` for
/// each as it gets there (in that order, as fleet did). A global unit is judged by its desired
/// state (no single machine reports it). Ends at the first error. All units are checked in
/// rounds, each round one registry read for all of them (or one per unit for a few).
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
    let mut pending: Vec<&UnitName> = names.iter().collect();
    let mut reasons_shown: HashSet<(UnitName, String)> = HashSet::new();
    let mut errors_shown: HashSet<String> = HashSet::new();
    let started = Instant::now();
    loop {
        match views(&reg, &pending).await {
            Ok(views) => {
                let mut left = Vec::new();
                for name in pending {
                    let Some(u) = views.get(name) else {
                        return Err(format!("Unit {name} not found"));
                    };
                    match reached(ctx, u, want).await {
                        Some(line) => ui::out(line),
                        None => {
                            // its machine's reason says why it is not started or loaded
                            // yet; `stop` and `unload` (and `restart`'s stop) wait for a
                            // unit to come down, which that wording does not fit
                            let coming_up = u.machine_id.is_none() || u.current < want;
                            if let Some(reason) = u.reason.as_ref().filter(|r| {
                                coming_up
                                    && started.elapsed() >= REASON_GRACE
                                    && reasons_shown.insert((name.clone(), r.to_string()))
                            }) {
                                ui::err(match &u.machine_id {
                                    None => format!("Unit {name} cannot be placed yet: {reason}"),
                                    // its machine says why it is not there yet (not in
                                    // fleet v1.0, which said nothing)
                                    Some(id) => format!(
                                        "Unit {name} cannot be {want} on {} yet: {reason}",
                                        ctx.legend(id, false).await
                                    ),
                                });
                            }
                            left.push(name);
                        }
                    }
                }
                pending = left;
                if pending.is_empty() {
                    return Ok(());
                }
            }
            Err(e) => {
                if errors_shown.insert(e.clone()) {
                    tracing::warn!("Error retrieving units from Registry: {e}");
                }
                tokio::time::sleep(RETRY).await;
            }
        }
        if !wait_round(&reg, &pending, deadline).await {
            return Err(format!(
                "timed out waiting for unit {} to report state {want}",
                pending[0]
            ));
        }
    }
}

/// The line reporting `u` in state `want`, when it is there.
async fn reached(ctx: &Ctx, u: &UnitView, want: TargetState) -> Option<String> {
    let state = if u.global { u.desired } else { u.current };
    if state != want {
        return None;
    }
    // (fleet printed the current state, always empty for a global unit)
    let mut msg = format!("Unit {} {state}", u.name);
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
    Some(msg)
}

/// After `start`: waits until systemd on each unit's machine reports it loaded and active.
/// A unit that systemd keeps reporting failed or inactive (for two seconds, to let a fresh
/// start show) is an error, as is the `--block-attempts` budget running out. Checked in
/// rounds: each reads the placements and the states once for all units.
pub async fn wait_for_active(ctx: &Ctx, names: &[UnitName], attempts: i64) -> Result<(), String> {
    if names.is_empty() || attempts < 0 {
        return Ok(());
    }
    let reg = ctx
        .registry()
        .await
        .map_err(|f| f.message.unwrap_or_default())?;
    let deadline = deadline(attempts);
    let mut pending: Vec<&UnitName> = names.iter().collect();
    let mut down_since: HashMap<&UnitName, Instant> = HashMap::new();
    loop {
        match systemd_states(&reg, &pending).await {
            Ok(states) => {
                let mut left = Vec::new();
                for name in pending {
                    match states.get(name) {
                        Some(s) if s.active_state == "active" && s.load_state == "loaded" => {
                            down_since.remove(name);
                        }
                        Some(s) if matches!(s.active_state.as_str(), "failed" | "inactive") => {
                            let since = *down_since.entry(name).or_insert_with(Instant::now);
                            if since.elapsed() >= SETTLE {
                                return Err(format!(
                                    "Failed to find an active unit {name}: systemd reports it {} ({})",
                                    s.active_state, s.sub_state
                                ));
                            }
                            left.push(name);
                        }
                        _ => {
                            down_since.remove(name);
                            left.push(name);
                        }
                    }
                }
                pending = left;
                if pending.is_empty() {
                    return Ok(());
                }
            }
            Err(e) => {
                tracing::debug!("Error getting unit states: {e}");
                tokio::time::sleep(RETRY).await;
            }
        }
        // a unit that is down is re-checked soon even without a change
        let settle_by = pending
            .iter()
            .filter_map(|n| down_since.get(n))
            .min()
            .map(|s| *s + SETTLE);
        let until = match (deadline, settle_by) {
            (Some(d), Some(s)) => Some(d.min(s)),
            (d, s) => d.or(s),
        };
        let waited = wait_round(&reg, &pending, until).await;
        if !waited && deadline.is_some_and(|d| Instant::now() >= d) {
            let secs = ATTEMPT.as_secs() * u64::try_from(attempts).unwrap_or(0);
            return Err(format!(
                "Failed to find an active unit {} within {secs}s",
                pending[0]
            ));
        }
    }
}

/// What systemd reports for each of `names` on the machine the unit is placed on, about the
/// unit's present body (units not placed, or with no report yet about that body — the old
/// version of a replaced unit still running — are left out).
async fn systemd_states(
    reg: &Arc<dyn Registry>,
    names: &[&UnitName],
) -> Result<HashMap<UnitName, StateRecord>, String> {
    let placed: HashMap<UnitName, (String, UnitHash)> = views(reg, names)
        .await?
        .into_values()
        .filter_map(|u| u.machine_id.map(|m| (u.name, (m, u.hash))))
        .collect();
    if placed.is_empty() {
        return Ok(HashMap::new());
    }
    let states = reg.unit_states().await.map_err(|e| describe(&e))?;
    Ok(states
        .into_iter()
        .filter_map(|s| {
            let name = UnitName::parse(&s.name).ok()?;
            let (machine, hash) = placed.get(&name)?;
            (*machine == s.machine_id && reports_hash(&s, hash)).then_some((name, s))
        })
        .collect())
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
