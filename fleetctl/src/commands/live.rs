//! `fleetctl events` and `list-units --watch` / `list-machines --watch`: following the
//! cluster's event stream (`Documentation/api-v1-events.md`), through fleetd's API or
//! straight from etcd, resuming after a cut-off or a broken connection from the last
//! revision seen.

use std::io::IsTerminal;
use std::sync::Arc;
use std::time::Duration;

use fleet_registry::{EventItem, EventQuery, Registry};
use serde_json::Value;
use tokio::sync::mpsc;

use super::list;
use crate::cli::{EventsArgs, EventsFormat, ListMachinesArgs, ListUnitsArgs};
use crate::context::{Ctx, machine_id_legend};
use crate::error::{Failure, Outcome, describe};
use crate::ui;

/// After an event, further events within this time are drawn in one redraw.
const SETTLE: Duration = Duration::from_millis(100);
/// How long to wait before reconnecting a stream that broke.
const RECONNECT_DELAY: Duration = Duration::from_secs(1);
/// A stream that cannot be reopened this many times in a row ends the command.
const RECONNECT_ATTEMPTS: u32 = 10;

/// The event stream of one command, reopened where it left off when it breaks.
struct Follower {
    reg: Arc<dyn Registry>,
    query: EventQuery,
    rx: mpsc::Receiver<EventItem>,
    /// The last revision delivered (or the one the stream started at).
    last: Option<i64>,
}

impl Follower {
    async fn open(reg: Arc<dyn Registry>, query: EventQuery) -> Result<Follower, Failure> {
        let rx = reg
            .events(&query)
            .await
            .map_err(|e| Failure::msg(format!("Error following events: {}", describe(&e))))?;
        let last = query.since;
        Ok(Follower {
            reg,
            query,
            rx,
            last,
        })
    }

    /// The next event (never `hello` or `cut-off`, which it handles).
    async fn next(&mut self) -> Result<Value, Failure> {
        let mut failures = 0;
        loop {
            let broken = match self.rx.recv().await {
                Some(Ok(ev)) => {
                    let rev = ev["revision"].as_i64();
                    match ev["type"].as_str().unwrap_or("") {
                        "hello" => {
                            self.last = self.last.max(rev);
                            continue;
                        }
                        // cut off for reading too slowly: resume where it stopped
                        "cut-off" => "cut off".to_string(),
                        "reset" => {
                            let msg = ev["message"].as_str().unwrap_or("events were lost");
                            ui::err(format!("warning: {msg}"));
                            self.last = rev;
                            return Ok(ev);
                        }
                        _ => {
                            self.last = rev.or(self.last);
                            return Ok(ev);
                        }
                    }
                }
                Some(Err(reason)) => reason,
                None => "the event stream ended".to_string(),
            };
            // reopen after the last revision delivered
            loop {
                if failures > 0 {
                    tokio::time::sleep(RECONNECT_DELAY).await;
                }
                let query = EventQuery {
                    since: self.last,
                    ..self.query.clone()
                };
                match self.reg.events(&query).await {
                    Ok(rx) => {
                        self.rx = rx;
                        break;
                    }
                    Err(e) => {
                        failures += 1;
                        // a refusal (too old to resume) will not change by trying again
                        let refused = fleet_client::ClientError::from_registry(&e)
                            .and_then(|c| c.status())
                            .is_some_and(|s| (400..500).contains(&s));
                        if refused || failures >= RECONNECT_ATTEMPTS {
                            return Err(Failure::msg(format!(
                                "Error following events ({broken}): {}",
                                describe(&e)
                            )));
                        }
                    }
                }
            }
        }
    }
}

/// `fleetctl events`.
pub async fn events(ctx: &Ctx, args: &EventsArgs) -> Outcome {
    let reg = ctx.registry().await?;
    let query = EventQuery {
        since: args.since,
        unit: args.unit.clone(),
        machine: args.machine.clone(),
    };
    let mut follower = Follower::open(reg, query).await?;
    loop {
        let ev = follower.next().await?;
        match args.output {
            EventsFormat::Json => ui::out(ev.to_string()),
            EventsFormat::Text => {
                if let Some(line) = text_line(&ev) {
                    ui::out(line);
                }
            }
        }
    }
}

/// `list-units --watch`.
pub async fn watch_units(ctx: &Ctx, args: &ListUnitsArgs) -> Outcome {
    watch(ctx, Table::Units(args)).await
}

/// `list-machines --watch`.
pub async fn watch_machines(ctx: &Ctx, args: &ListMachinesArgs) -> Outcome {
    watch(ctx, Table::Machines(args)).await
}

enum Table<'a> {
    Units(&'a ListUnitsArgs),
    Machines(&'a ListMachinesArgs),
}

/// Draws the table, then again after every change (a burst of changes is one redraw). On a
/// terminal the screen is cleared first; otherwise tables follow each other, a blank line
/// between them.
async fn watch(ctx: &Ctx, table: Table<'_>) -> Outcome {
    let reg = ctx.registry().await?;
    // subscribe first: no change between the first listing and the stream is missed
    let mut follower = Follower::open(reg, EventQuery::default()).await?;
    let terminal = std::io::stdout().is_terminal();
    let mut first = true;
    loop {
        if terminal {
            ui::out_raw("\x1b[H\x1b[2J");
        } else if !first {
            ui::out("");
        }
        first = false;
        match &table {
            Table::Units(a) => list::units(ctx, &a.list, &a.fields).await?,
            Table::Machines(a) => list::machines(ctx, &a.list, &a.fields).await?,
        }
        let ev = follower.next().await?;
        let mut machines_changed = is_machine_event(&ev);
        // let a burst settle
        let settle = tokio::time::sleep(SETTLE);
        tokio::pin!(settle);
        loop {
            tokio::select! {
                _ = &mut settle => break,
                ev = follower.next() => machines_changed |= is_machine_event(&ev?),
            }
        }
        if machines_changed {
            ctx.forget_machines().await;
        }
    }
}

fn is_machine_event(ev: &Value) -> bool {
    ev["type"]
        .as_str()
        .is_some_and(|t| t.starts_with("machine-"))
}

/// One line of `fleetctl events`: the revision, the unit or machine, what happened.
fn text_line(ev: &Value) -> Option<String> {
    let s = |k: &str| ev[k].as_str().unwrap_or("");
    let machine = || machine_id_legend(s("machine"), false);
    let what = match s("type") {
        "unit-created" => format!("created, desired state {}", s("desiredState")),
        "unit-changed" if s("hash") != s("previousHash") => {
            format!("unit file replaced, desired state {}", s("desiredState"))
        }
        "unit-changed" => format!(
            "desired state {} -> {}",
            s("previousDesiredState"),
            s("desiredState")
        ),
        "unit-destroyed" => "destroyed".to_string(),
        "unit-placed" => format!("placed on {}", machine()),
        "unit-unplaced" if s("machine").is_empty() => "unscheduled".to_string(),
        "unit-unplaced" => format!("unscheduled from {}", machine()),
        "unit-unplaceable" => format!("cannot be placed: {}", s("reason")),
        "unit-state" => format!(
            "{} {} {} on {} ({})",
            s("loadState"),
            s("activeState"),
            s("subState"),
            machine(),
            s("currentState")
        ),
        "unit-state-removed" => format!("no state from {}", machine()),
        "machine-joined" => format!("joined, IP {}", s("primaryIP")),
        "machine-changed" => format!("changed, IP {}", s("primaryIP")),
        "machine-left" => "left".to_string(),
        "machine-metadata" => match ev["value"].as_str() {
            Some(v) => format!("metadata {}={v}", s("key")),
            None => format!("metadata {} removed", s("key")),
        },
        "reset" => return Some(format!("{}\t-\t{}", ev["revision"], s("message"))),
        _ => return None,
    };
    let subject = match ev["unit"].as_str() {
        Some(u) => u.to_string(),
        None => machine(),
    };
    Some(format!("{}\t{subject}\t{what}", ev["revision"]))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn check(ev: Value, expected: Option<&str>) {
        assert_eq!(text_line(&ev).as_deref(), expected, "{ev}");
    }

    #[test]
    fn events_print_as_one_line_each() {
        let m = "2c4b0d1bd4cd4a8d90d4c4e0e4b0f2a1";
        check(
            json!({"revision": 7, "type": "unit-created", "unit": "a.service", "desiredState": "launched", "hash": "h"}),
            Some("7\ta.service\tcreated, desired state launched"),
        );
        check(
            json!({"revision": 8, "type": "unit-changed", "unit": "a.service", "desiredState": "inactive", "previousDesiredState": "launched", "hash": "h", "previousHash": "h"}),
            Some("8\ta.service\tdesired state launched -> inactive"),
        );
        check(
            json!({"revision": 9, "type": "unit-state", "unit": "a.service", "machine": m, "loadState": "loaded", "activeState": "active", "subState": "running", "currentState": "launched"}),
            Some("9\ta.service\tloaded active running on 2c4b0d1b... (launched)"),
        );
        check(
            json!({"revision": 10, "type": "machine-metadata", "machine": m, "key": "az", "value": null}),
            Some("10\t2c4b0d1b...\tmetadata az removed"),
        );
        check(
            json!({"revision": 11, "type": "unit-unplaceable", "unit": "b.service", "reason": "no machine matches"}),
            Some("11\tb.service\tcannot be placed: no machine matches"),
        );
        check(json!({"revision": 12, "type": "something-new"}), None);
    }
}
