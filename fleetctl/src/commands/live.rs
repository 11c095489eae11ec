//! `fleetctl events` and `list-units --watch` / `list-machines --watch`: following the
//! cluster's event stream (`Documentation/api-v1-events.md`), through fleetd's API or
//! straight from etcd, resuming after a cut-off or a broken connection from the last
//! revision seen.

use std::io::IsTerminal;
use std::sync::Arc;
use std::time::Duration;

use fleet_registry::{EventItem, EventQuery, Registry, StreamEnd};
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
    /// The resume point: the last revision whose events have all been delivered (the
    /// stream's `id:`s, which come on the last event of each revision only), or the one the
    /// stream started at.
    last: Option<i64>,
    /// Breaks and failed reopens since the stream last showed it works (an event, or a
    /// keepalive); each after the first waits before reopening, and too many end the command.
    failures: u32,
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
            failures: 0,
        })
    }

    /// The next event (never `hello` or `cut-off`, which it handles).
    async fn next(&mut self) -> Result<Value, Failure> {
        loop {
            let broken = match self.rx.recv().await {
                Some(Ok(msg)) => {
                    if let Some(id) = msg.id {
                        self.last = Some(self.last.map_or(id, |l| l.max(id)));
                    }
                    let Some(ev) = msg.event else {
                        // a keepalive: the stream is alive
                        self.failures = 0;
                        continue;
                    };
                    let rev = ev["revision"].as_i64();
                    match ev["type"].as_str().unwrap_or("") {
                        "hello" => continue,
                        // cut off for reading too slowly: resume where it stopped, which the
                        // message says (a filtered stream's last id may be older)
                        "cut-off" => {
                            if let Some(rev) = rev {
                                self.last = Some(self.last.map_or(rev, |l| l.max(rev)));
                            }
                            "cut off".to_string()
                        }
                        "reset" => {
                            let msg = ev["message"].as_str().unwrap_or("events were lost");
                            ui::err(format!("warning: {msg}"));
                            self.last = rev;
                            self.failures = 0;
                            return Ok(ev);
                        }
                        _ => {
                            self.failures = 0;
                            return Ok(ev);
                        }
                    }
                }
                Some(Err(StreamEnd::Gone(msg))) => {
                    return Err(Failure::msg(format!("Error following events: {msg}")));
                }
                Some(Err(StreamEnd::Broken(reason))) => reason,
                None => "the event stream ended".to_string(),
            };
            // reopen after the last revision delivered
            loop {
                if self.failures >= RECONNECT_ATTEMPTS {
                    return Err(Failure::msg(format!("Error following events: {broken}")));
                }
                self.failures += 1;
                if self.failures > 1 {
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
                        // a refusal (too old to resume) will not change by trying again
                        let refused = fleet_client::ClientError::from_registry(&e)
                            .and_then(|c| c.status())
                            .is_some_and(|s| (400..500).contains(&s));
                        if refused || self.failures >= RECONNECT_ATTEMPTS {
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

/// `text` with its control characters (newlines, tabs, escape sequences) written as escapes.
fn escape_controls(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

/// One line of `fleetctl events`: the revision, the unit or machine, what happened.
fn text_line(ev: &Value) -> Option<String> {
    // every field comes from the cluster (a unit file's reason, metadata, states): control
    // characters are shown escaped, never written to the terminal as they are
    let s = |k: &str| escape_controls(ev[k].as_str().unwrap_or(""));
    let machine = || machine_id_legend(&s("machine"), false);
    let what = match s("type").as_str() {
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
            Some(v) => format!("metadata {}={}", s("key"), escape_controls(v)),
            None => format!("metadata {} removed", s("key")),
        },
        "reset" => return Some(format!("{}\t-\t{}", ev["revision"], s("message"))),
        _ => return None,
    };
    let subject = match ev["unit"].as_str() {
        Some(u) => escape_controls(u),
        None => machine(),
    };
    Some(format!("{}\t{subject}\t{what}", ev["revision"]))
}

#[cfg(test)]
mod tests {
    use super::*;
    use async_trait::async_trait;
    use fleet_registry::{
        EventMessage, MachineView, RegistryError, Result as RegResult, StateRecord, UnitView,
    };
    use fleet_unit::{TargetState, UnitFile, UnitName};
    use serde_json::json;
    use std::collections::VecDeque;
    use std::sync::Mutex;

    /// A registry whose event streams are scripted: each open gets the next script (its
    /// channel then ends), and the queries it was opened with are kept.
    #[derive(Default)]
    struct Scripted {
        scripts: Mutex<VecDeque<Vec<EventItem>>>,
        /// What every open gets once the scripts are used up.
        forever: Vec<EventItem>,
        opened: Mutex<Vec<EventQuery>>,
    }

    fn not_here<T>() -> RegResult<T> {
        Err(RegistryError::Remote("not in this test".into()))
    }

    #[async_trait]
    impl Registry for Scripted {
        async fn create_unit(&self, _: &UnitName, _: &UnitFile, _: TargetState) -> RegResult<()> {
            not_here()
        }
        async fn replace_unit(&self, _: &UnitName, _: &UnitFile, _: TargetState) -> RegResult<()> {
            not_here()
        }
        async fn set_desired_state(&self, _: &UnitName, _: TargetState) -> RegResult<()> {
            not_here()
        }
        async fn destroy_unit(&self, _: &UnitName) -> RegResult<bool> {
            not_here()
        }
        async fn unit(&self, _: &UnitName) -> RegResult<Option<UnitView>> {
            not_here()
        }
        async fn units(&self) -> RegResult<Vec<UnitView>> {
            not_here()
        }
        async fn machines(&self) -> RegResult<Vec<MachineView>> {
            not_here()
        }
        async fn unit_states(&self) -> RegResult<Vec<StateRecord>> {
            not_here()
        }
        async fn set_machine_metadata(&self, _: &str, _: &str, _: Option<&str>) -> RegResult<()> {
            not_here()
        }
        async fn events(&self, query: &EventQuery) -> RegResult<mpsc::Receiver<EventItem>> {
            self.opened.lock().expect("lock").push(query.clone());
            let items = self
                .scripts
                .lock()
                .expect("lock")
                .pop_front()
                .unwrap_or_else(|| self.forever.clone());
            let (tx, rx) = mpsc::channel(items.len().max(1));
            for i in items {
                tx.try_send(i).expect("room");
            }
            Ok(rx)
        }
    }

    fn msg(ev: Value, id: Option<i64>) -> EventItem {
        Ok(EventMessage {
            event: Some(ev),
            id,
        })
    }

    fn hello(rev: i64) -> EventItem {
        msg(json!({"type": "hello", "revision": rev}), Some(rev))
    }

    fn placed(rev: i64, unit: &str) -> Value {
        json!({"type": "unit-placed", "revision": rev, "unit": unit, "machine": "m1"})
    }

    fn broken() -> EventItem {
        Err(StreamEnd::Broken("connection reset".into()))
    }

    async fn follower(reg: &Arc<Scripted>, since: Option<i64>) -> Follower {
        let reg: Arc<dyn Registry> = reg.clone();
        Follower::open(
            reg,
            EventQuery {
                since,
                ..Default::default()
            },
        )
        .await
        .map_err(|f| f.message)
        .expect("open")
    }

    fn resumed_from(reg: &Scripted) -> Vec<Option<i64>> {
        reg.opened
            .lock()
            .expect("lock")
            .iter()
            .map(|q| q.since)
            .collect()
    }

    /// A break after the first of a revision's events resumes before that revision: only the
    /// `id:` on its last event moves the resume point.
    #[tokio::test(start_paused = true)]
    async fn a_break_mid_revision_resumes_before_it() {
        let reg = Arc::new(Scripted {
            scripts: Mutex::new(VecDeque::from([
                vec![hello(4), msg(placed(5, "a.service"), None), broken()],
                vec![
                    hello(4),
                    msg(placed(5, "a.service"), None),
                    msg(placed(5, "b.service"), Some(5)),
                    broken(),
                ],
                vec![hello(5), msg(placed(6, "c.service"), Some(6))],
            ])),
            ..Default::default()
        });
        let mut f = follower(&reg, None).await;
        let mut units = Vec::new();
        for _ in 0..4 {
            let ev = f.next().await.map_err(|f| f.message).expect("event");
            units.push(ev["unit"].as_str().unwrap_or("").to_string());
        }
        assert_eq!(units, ["a.service", "a.service", "b.service", "c.service"]);
        assert_eq!(resumed_from(&reg), [None, Some(4), Some(5)]);
    }

    /// A filtered stream's resume point moves with keepalives and with the cut-off message,
    /// not only with its own (rare) events.
    #[tokio::test(start_paused = true)]
    async fn keepalives_and_cut_offs_move_the_resume_point() {
        let cut_off = json!({"type": "cut-off", "revision": 90, "message": "client too slow"});
        let reg = Arc::new(Scripted {
            scripts: Mutex::new(VecDeque::from([
                vec![
                    hello(3),
                    Ok(EventMessage {
                        event: None,
                        id: Some(40),
                    }),
                    broken(),
                ],
                vec![hello(40), msg(cut_off, None)],
                vec![hello(90), msg(placed(91, "a.service"), Some(91))],
            ])),
            ..Default::default()
        });
        let mut f = follower(&reg, Some(3)).await;
        let ev = f.next().await.map_err(|f| f.message).expect("event");
        assert_eq!(ev["revision"], 91);
        assert_eq!(resumed_from(&reg), [Some(3), Some(40), Some(90)]);
    }

    /// A stream that opens and breaks at once is reopened after a growing number of waits,
    /// then given up; it does not spin.
    #[tokio::test(start_paused = true)]
    async fn streams_that_break_at_once_back_off_then_give_up() {
        let reg = Arc::new(Scripted {
            forever: vec![hello(7), broken()],
            ..Default::default()
        });
        let started = tokio::time::Instant::now();
        let mut f = follower(&reg, None).await;
        let end = f.next().await.map_err(|f| f.message);
        assert_eq!(
            end,
            Err(Some("Error following events: connection reset".to_string()))
        );
        let opens = resumed_from(&reg).len() as u32;
        assert_eq!(
            opens,
            RECONNECT_ATTEMPTS + 1,
            "the first open and each retry"
        );
        assert!(
            started.elapsed() >= RECONNECT_DELAY * (RECONNECT_ATTEMPTS - 1),
            "reopened without waiting: {:?}",
            started.elapsed()
        );
    }

    /// History etcd has compacted away ends the command with the message saying so.
    #[tokio::test(start_paused = true)]
    async fn a_compacted_history_ends_the_command() {
        let gone = "revision 1 is too old to resume from (etcd keeps revisions after 50 only); list again and follow without --since";
        let reg = Arc::new(Scripted {
            forever: vec![hello(1), Err(StreamEnd::Gone(gone.into()))],
            ..Default::default()
        });
        let mut f = follower(&reg, Some(1)).await;
        let end = f.next().await.map_err(|f| f.message);
        assert_eq!(end, Err(Some(format!("Error following events: {gone}"))));
        assert_eq!(resumed_from(&reg), [Some(1)]);
    }

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

    #[test]
    fn control_characters_in_events_are_escaped() {
        let m = "2c4b0d1bd4cd4a8d90d4c4e0e4b0f2a1";
        check(
            json!({"revision": 11, "type": "unit-unplaceable", "unit": "b.service", "reason": "no\nmachine\x1b[2J\t"}),
            Some("11\tb.service\tcannot be placed: no\\nmachine\\u{1b}[2J\\t"),
        );
        check(
            json!({"revision": 12, "type": "machine-metadata", "machine": m, "key": "a\rb", "value": "x\u{7}y"}),
            Some("12\t2c4b0d1b...\tmetadata a\\rb=x\\u{7}y"),
        );
        check(
            json!({"revision": 13, "type": "unit-state", "unit": "a.service", "machine": m, "loadState": "loaded\n", "activeState": "active", "subState": "running", "currentState": "launched"}),
            Some("13\ta.service\tloaded\\n active running on 2c4b0d1b... (launched)"),
        );
    }
}
