//! Table-driven tests of every scheduling rule, including the wording of each reason.

use std::collections::BTreeMap;

use fleet_scheduler::{
    Decision, Machine, Plan, Snapshot, Unit, global_unit_runs_here, global_units_for_machine,
    reconcile,
};
use fleet_unit::{Requirements, TargetState, UnitFile, UnitName};

fn machine(spec: &str) -> Machine {
    // "m1" or "m1 region=us-east-1 disk=ssd"
    let mut parts = spec.split_whitespace();
    let id = parts.next().unwrap_or_default().to_string();
    let metadata = parts
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    Machine { id, metadata }
}

/// "name state [@machine] [| X-Fleet lines separated by ;]"
fn unit(spec: &str) -> Unit {
    let (head, xfleet) = spec.split_once('|').unwrap_or((spec, ""));
    let mut parts = head.split_whitespace();
    let name = UnitName::parse(parts.next().unwrap_or_default()).expect("valid unit name");
    let desired: TargetState = parts
        .next()
        .unwrap_or("launched")
        .parse()
        .expect("valid state");
    let placement = parts.next().map(|p| p.trim_start_matches('@').to_string());
    let body = format!(
        "[Service]\nExecStart=/bin/true\n[X-Fleet]\n{}\n",
        xfleet.trim().replace(';', "\n")
    );
    let file = UnitFile::parse(&body).expect("valid unit file");
    let (requirements, _) = Requirements::from_unit(&name, &file).expect("valid requirements");
    Unit {
        name,
        desired,
        requirements,
        placement,
    }
}

fn snapshot(machines: &[&str], units: &[&str]) -> Snapshot {
    Snapshot {
        machines: machines.iter().map(|m| machine(m)).collect(),
        units: units.iter().map(|u| unit(u)).collect(),
    }
}

fn decisions(plan: &Plan) -> Vec<String> {
    plan.decisions
        .iter()
        .map(|d| match d {
            Decision::Schedule { unit, machine } => format!("schedule {unit} {machine}"),
            Decision::Unschedule { unit, machine } => format!("unschedule {unit} {machine}"),
        })
        .collect()
}

fn reasons(plan: &Plan) -> Vec<String> {
    plan.unplaceable
        .iter()
        .map(|(u, r)| format!("{u}: {r}"))
        .collect()
}

struct Case {
    name: &'static str,
    machines: &'static [&'static str],
    units: &'static [&'static str],
    decisions: &'static [&'static str],
    unplaceable: &'static [&'static str],
}

fn check(cases: &[Case]) {
    for c in cases {
        let plan = reconcile(&snapshot(c.machines, c.units));
        assert_eq!(
            decisions(&plan),
            c.decisions,
            "case {:?}: decisions",
            c.name
        );
        assert_eq!(
            reasons(&plan),
            c.unplaceable,
            "case {:?}: unplaceable",
            c.name
        );
    }
}

#[test]
fn placement_and_load() {
    check(&[
        Case {
            name: "no machines",
            machines: &[],
            units: &["a.service launched"],
            decisions: &[],
            unplaceable: &["a.service: no machines in the cluster"],
        },
        Case {
            name: "tie broken by machine id",
            machines: &["m2", "m1"],
            units: &["a.service launched"],
            decisions: &["schedule a.service m1"],
            unplaceable: &[],
        },
        Case {
            name: "least loaded wins",
            machines: &["m1", "m2"],
            units: &[
                "x.service launched @m1",
                "y.service launched @m1",
                "z.service launched @m2",
                "a.service loaded",
            ],
            decisions: &["schedule a.service m2"],
            unplaceable: &[],
        },
        Case {
            name: "new units spread in name order",
            machines: &["m1", "m2"],
            units: &[
                "c.service launched",
                "a.service launched",
                "b.service loaded",
            ],
            decisions: &[
                "schedule a.service m1",
                "schedule b.service m2",
                "schedule c.service m1",
            ],
            unplaceable: &[],
        },
        Case {
            name: "inactive units are unscheduled and not placed",
            machines: &["m1"],
            units: &["a.service inactive @m1", "b.service inactive"],
            decisions: &["unschedule a.service m1"],
            unplaceable: &[],
        },
        Case {
            name: "no churn: placed units stay even when unbalanced",
            machines: &["m1", "m2"],
            units: &[
                "a.service launched @m1",
                "b.service launched @m1",
                "c.service launched @m1",
            ],
            decisions: &[],
            unplaceable: &[],
        },
        Case {
            name: "machine went away",
            machines: &["m1", "m2"],
            units: &["a.service launched @m3", "b.service launched @m1"],
            decisions: &["unschedule a.service m3", "schedule a.service m2"],
            unplaceable: &[],
        },
        Case {
            name: "global units count as load",
            machines: &["m1", "m2"],
            units: &[
                "g.service launched | Global=true",
                "a.service launched @m2",
                "b.service launched",
            ],
            decisions: &["schedule b.service m1"],
            unplaceable: &[],
        },
    ]);
}

#[test]
fn machine_id_and_metadata() {
    check(&[
        Case {
            name: "MachineID beats load",
            machines: &["m1", "m2"],
            units: &[
                "x.service launched @m2",
                "a.service launched | MachineID=m2",
            ],
            decisions: &["schedule a.service m2"],
            unplaceable: &[],
        },
        Case {
            name: "MachineID by short id",
            machines: &["0123456789abcdef", "fedcba9876543210"],
            units: &["a.service launched | MachineID=fedcba98"],
            decisions: &["schedule a.service fedcba9876543210"],
            unplaceable: &[],
        },
        Case {
            name: "odd machine IDs never panic",
            machines: &[
                "m\u{e9}\u{e9}\u{e9}\u{e9}\u{e9}",
                "\u{1f600}\u{1f600}\u{1f600}",
            ],
            units: &["a.service launched | MachineID=m\u{e9}\u{e9}\u{e9}"],
            decisions: &[],
            unplaceable: &["a.service: no machine has ID m\u{e9}\u{e9}\u{e9}"],
        },
        Case {
            name: "MachineID unknown",
            machines: &["m1"],
            units: &["a.service launched | MachineID=nope"],
            decisions: &[],
            unplaceable: &["a.service: no machine has ID nope"],
        },
        Case {
            name: "MachineID with metadata that machine lacks",
            machines: &["m1 region=eu"],
            units: &["a.service launched | MachineID=m1;MachineMetadata=region=us"],
            decisions: &[],
            unplaceable: &["a.service: machine m1 does not have metadata region=us"],
        },
        Case {
            name: "MachineID no longer matches",
            machines: &["m1", "m2"],
            units: &["a.service launched @m1 | MachineID=m2"],
            decisions: &["unschedule a.service m1", "schedule a.service m2"],
            unplaceable: &[],
        },
        Case {
            name: "metadata picks the machine",
            machines: &["m1 region=eu", "m2 region=us-east-1"],
            units: &["a.service launched | MachineMetadata=region=us-east-1"],
            decisions: &["schedule a.service m2"],
            unplaceable: &[],
        },
        Case {
            name: "metadata: no machine has it",
            machines: &["m1 region=eu"],
            units: &["a.service launched | MachineMetadata=region=us-east-1"],
            decisions: &[],
            unplaceable: &["a.service: no machine has metadata region=us-east-1"],
        },
        Case {
            name: "metadata: OR within a key",
            machines: &["m1 region=eu", "m2 region=us-west-1", "m3 region=ap"],
            units: &[
                "x.service launched @m1",
                "a.service launched | MachineMetadata=\"region=us-east-1\" \"region=us-west-1\" \"region=eu\"",
            ],
            decisions: &["schedule a.service m2"],
            unplaceable: &[],
        },
        Case {
            name: "metadata: AND across keys",
            machines: &[
                "m1 region=eu disk=hdd",
                "m2 region=us disk=ssd",
                "m3 region=eu disk=ssd",
            ],
            units: &["a.service launched | MachineMetadata=region=eu;MachineMetadata=disk=ssd"],
            decisions: &["schedule a.service m3"],
            unplaceable: &[],
        },
        Case {
            name: "metadata: keys each exist but never together",
            machines: &["m1 region=eu disk=hdd", "m2 region=us disk=ssd"],
            units: &[
                "a.service launched | MachineMetadata=region=eu;MachineMetadata=disk=ssd",
                "b.service launched | MachineMetadata=\"region=eu\" \"region=ap\";MachineMetadata=disk=ssd",
                "c.service launched | MachineMetadata=rack=r9;MachineMetadata=disk=ssd",
            ],
            decisions: &[],
            unplaceable: &[
                "a.service: no machine has metadata disk=ssd and region=eu",
                "b.service: no machine has metadata disk=ssd and (region=ap or region=eu)",
                "c.service: no machine has metadata rack=r9",
            ],
        },
        Case {
            name: "metadata stops holding",
            machines: &["m1 region=eu", "m2 region=us"],
            units: &["a.service launched @m1 | MachineMetadata=region=us"],
            decisions: &["unschedule a.service m1", "schedule a.service m2"],
            unplaceable: &[],
        },
    ]);
}

#[test]
fn machine_of() {
    check(&[
        Case {
            name: "follows its target",
            machines: &["m1", "m2"],
            units: &[
                "db.service launched @m2",
                "x.service launched @m1",
                "y.service launched @m1",
                "app.service launched | MachineOf=db.service",
            ],
            decisions: &["schedule app.service m2"],
            unplaceable: &[],
        },
        Case {
            name: "target and follower placed in one pass",
            machines: &["m1", "m2"],
            units: &[
                "x.service launched @m1",
                "b-follower.service launched | MachineOf=z-target.service",
                "z-target.service launched",
            ],
            decisions: &[
                "schedule z-target.service m2",
                "schedule b-follower.service m2",
            ],
            unplaceable: &[],
        },
        Case {
            name: "target not scheduled",
            machines: &["m1"],
            units: &[
                "db.service inactive",
                "app.service launched | MachineOf=db.service",
                "other.service launched | MachineOf=missing.service",
            ],
            decisions: &[],
            unplaceable: &[
                "app.service: MachineOf=db.service, which is not scheduled",
                "other.service: MachineOf=missing.service, which is not scheduled",
            ],
        },
        Case {
            name: "target moves, follower follows",
            machines: &["m1", "m2"],
            units: &[
                "db.service launched @gone",
                "app.service launched @gone | MachineOf=db.service",
                "x.service launched @m1",
            ],
            decisions: &[
                "unschedule app.service gone",
                "unschedule db.service gone",
                "schedule db.service m2",
                "schedule app.service m2",
            ],
            unplaceable: &[],
        },
        Case {
            name: "follower on the wrong machine",
            machines: &["m1", "m2"],
            units: &[
                "db.service launched @m2",
                "app.service launched @m1 | MachineOf=db.service",
            ],
            decisions: &["unschedule app.service m1", "schedule app.service m2"],
            unplaceable: &[],
        },
        Case {
            name: "target becomes inactive",
            machines: &["m1"],
            units: &[
                "db.service inactive @m1",
                "app.service launched @m1 | MachineOf=db.service",
            ],
            decisions: &["unschedule db.service m1", "unschedule app.service m1"],
            unplaceable: &["app.service: MachineOf=db.service, which is not scheduled"],
        },
        Case {
            name: "target's machine lacks the follower's metadata",
            machines: &["m1 region=eu", "m2 region=us"],
            units: &[
                "db.service launched @m1",
                "app.service launched | MachineOf=db.service;MachineMetadata=region=us",
            ],
            decisions: &[],
            unplaceable: &[
                "app.service: MachineOf=db.service is on machine m1, which does not have metadata region=us",
            ],
        },
        Case {
            name: "two targets on different machines",
            machines: &["m1", "m2"],
            units: &[
                "a.service launched @m1",
                "b.service launched @m2",
                "c.service launched | MachineOf=a.service;MachineOf=b.service",
            ],
            decisions: &[],
            unplaceable: &[
                "c.service: MachineOf=a.service and MachineOf=b.service are on different machines",
            ],
        },
        Case {
            name: "bidirectional MachineOf is refused",
            machines: &["m1"],
            units: &[
                "a.service launched | MachineOf=b.service",
                "b.service launched | MachineOf=a.service",
                "c.service launched | MachineOf=a.service",
            ],
            decisions: &[],
            unplaceable: &[
                "a.service: MachineOf=b.service leads back to this unit (bidirectional MachineOf is not supported)",
                "b.service: MachineOf=a.service leads back to this unit (bidirectional MachineOf is not supported)",
                "c.service: MachineOf=a.service, which is not scheduled",
            ],
        },
        Case {
            name: "follower of a global unit",
            machines: &["m1 role=edge", "m2"],
            units: &[
                "g.service launched | Global=true;MachineMetadata=role=edge",
                "side.service launched | MachineOf=g.service",
            ],
            decisions: &["schedule side.service m1"],
            unplaceable: &[],
        },
        Case {
            name: "specifiers: sidekick follows its instance",
            machines: &["m1", "m2"],
            units: &[
                "web@1.service launched @m2",
                "x.service launched @m1",
                "y.service launched @m1",
                "side@1.service launched | MachineOf=web@%i.service",
            ],
            decisions: &["schedule side@1.service m2"],
            unplaceable: &[],
        },
    ]);
}

#[test]
fn conflicts() {
    check(&[
        Case {
            name: "own Conflicts keeps it away",
            machines: &["m1", "m2"],
            units: &[
                "web.1.service launched @m1",
                "z.service launched @m2",
                "y.service launched @m2",
                "web.2.service launched | Conflicts=web.*.service",
            ],
            decisions: &["schedule web.2.service m2"],
            unplaceable: &[],
        },
        Case {
            name: "others' Conflicts keep a unit without Conflicts away",
            machines: &["m1", "m2"],
            units: &[
                "guard.service launched @m1 | Conflicts=plain.service",
                "z.service launched @m2",
                "y.service launched @m2",
                "plain.service launched",
            ],
            decisions: &["schedule plain.service m2"],
            unplaceable: &[],
        },
        Case {
            name: "conflicts everywhere",
            machines: &["m1"],
            units: &[
                "web.1.service launched @m1 | Conflicts=web.*",
                "web.2.service launched | Conflicts=web.*",
            ],
            decisions: &[],
            unplaceable: &["web.2.service: conflicts with web.1.service on every eligible machine"],
        },
        Case {
            name: "several Conflicts, several blockers",
            machines: &["m1", "m2"],
            units: &[
                "a.service launched @m1",
                "b.service launched @m2",
                "c.service launched | Conflicts=a.service b.service",
            ],
            decisions: &[],
            unplaceable: &[
                "c.service: conflicts with a.service and b.service on every eligible machine",
            ],
        },
        Case {
            name: "instances spread one per machine",
            machines: &["m1", "m2", "m3"],
            units: &[
                "hello@1.service launched | Conflicts=hello@*.service",
                "hello@2.service launched | Conflicts=hello@*.service",
                "hello@3.service launched | Conflicts=hello@*.service",
                "hello@4.service launched | Conflicts=hello@*.service",
            ],
            decisions: &[
                "schedule hello@1.service m1",
                "schedule hello@2.service m2",
                "schedule hello@3.service m3",
            ],
            unplaceable: &[
                "hello@4.service: conflicts with hello@1.service, hello@2.service and hello@3.service on every eligible machine",
            ],
        },
        Case {
            name: "co-located conflicting units: the later name moves",
            machines: &["m1", "m2"],
            units: &[
                "a.service launched @m1 | Conflicts=b.service",
                "b.service launched @m1",
            ],
            decisions: &["unschedule b.service m1", "schedule b.service m2"],
            unplaceable: &[],
        },
        Case {
            name: "conflict with a global unit running there",
            machines: &["m1", "m2"],
            units: &[
                "g.service launched | Global=true;Conflicts=a.service",
                "a.service launched",
            ],
            decisions: &[],
            unplaceable: &["a.service: conflicts with g.service on every eligible machine"],
        },
        Case {
            name: "inactive units do not conflict",
            machines: &["m1"],
            units: &["a.service inactive | Conflicts=*", "b.service launched"],
            decisions: &["schedule b.service m1"],
            unplaceable: &[],
        },
    ]);
}

#[test]
fn replaces() {
    check(&[
        Case {
            name: "kick the replaced unit to another machine (fleet's TestScheduleReplace)",
            machines: &["m0", "m1"],
            units: &[
                "replace.0.service launched @m0",
                "replace.1.service launched @m1",
                "replace.2.service launched @m1 | MachineOf=replace.1.service",
                "replace-kick0.service launched | Replaces=replace.0.service",
            ],
            decisions: &[
                "unschedule replace.0.service m0",
                "schedule replace-kick0.service m0",
                "schedule replace.0.service m1",
            ],
            unplaceable: &[],
        },
        Case {
            name: "replaced unit has nowhere to go",
            machines: &["m0"],
            units: &[
                "old.service launched @m0",
                "new.service launched | Replaces=old.service",
            ],
            decisions: &["unschedule old.service m0", "schedule new.service m0"],
            unplaceable: &["old.service: replaced by new.service on every eligible machine"],
        },
        Case {
            name: "a replaced unit is not placed next to its replacer",
            machines: &["m0", "m1"],
            units: &[
                "new.service launched @m0 | Replaces=old.service",
                "old.service launched",
                "x.service launched @m1",
            ],
            decisions: &["schedule old.service m1"],
            unplaceable: &[],
        },
        Case {
            name: "already together: the replaced unit moves",
            machines: &["m0", "m1"],
            units: &[
                "new.service launched @m0 | Replaces=old.service",
                "old.service launched @m0",
            ],
            decisions: &["unschedule old.service m0", "schedule old.service m1"],
            unplaceable: &[],
        },
        Case {
            name: "followers go with the replaced unit",
            machines: &["m0", "m1"],
            units: &[
                "db.service launched @m0",
                "app.service launched @m0 | MachineOf=db.service",
                "x.service launched @m1",
                "y.service launched @m1",
                "z.service launched @m1",
                "newdb.service launched | Replaces=db.service",
            ],
            decisions: &[
                "unschedule app.service m0",
                "unschedule db.service m0",
                "schedule newdb.service m0",
                "schedule db.service m1",
                "schedule app.service m1",
            ],
            unplaceable: &[],
        },
        Case {
            name: "circular replacement: only one launched",
            machines: &["m0", "m1"],
            units: &[
                "a.service launched | Replaces=b.service",
                "b.service launched | Replaces=a.service",
            ],
            decisions: &["schedule a.service m0"],
            unplaceable: &[
                "b.service: circular Replaces with a.service: only one of them is scheduled",
            ],
        },
        Case {
            name: "circular replacement around three units",
            machines: &["m0"],
            units: &[
                "a.service launched | Replaces=b.service",
                "b.service launched | Replaces=c.service",
                "c.service launched @m0 | Replaces=a.service",
            ],
            decisions: &[],
            unplaceable: &[
                "a.service: circular Replaces with c.service: only one of them is scheduled",
                "b.service: circular Replaces with c.service: only one of them is scheduled",
            ],
        },
        Case {
            name: "circular replacement: the placed one stays",
            machines: &["m0", "m1"],
            units: &[
                "a.service launched | Replaces=b.service",
                "b.service launched @m1 | Replaces=a.service",
            ],
            decisions: &[],
            unplaceable: &[
                "a.service: circular Replaces with b.service: only one of them is scheduled",
            ],
        },
    ]);
}

#[test]
fn global_units_are_never_scheduled() {
    check(&[Case {
        name: "global unit with a stale placement",
        machines: &["m1"],
        units: &[
            "g.service launched @m1 | Global=true",
            "h.service launched | Global=true",
        ],
        decisions: &["unschedule g.service m1"],
        unplaceable: &[],
    }]);
}

#[test]
fn unschedule_reasons() {
    let plan = reconcile(&snapshot(
        &["m1 region=eu", "m2"],
        &[
            "a.service inactive @m1",
            "b.service launched @gone",
            "c.service launched @m1 | MachineMetadata=region=us",
            "d.service launched @m1 | Conflicts=c.service",
            "e.service launched @m2 | MachineID=m1;MachineMetadata=region=eu",
            "f.service launched @m2 | MachineOf=e.service",
        ],
    ));
    let got: Vec<String> = plan
        .unschedule_reasons
        .iter()
        .map(|(u, r)| format!("{u}: {r}"))
        .collect();
    assert_eq!(
        got,
        [
            "a.service: target state inactive",
            "b.service: machine gone went away",
            "c.service: machine m1 does not have metadata region=us",
            "e.service: machine m2 is not MachineID=m1",
            "f.service: MachineOf=e.service, which is not scheduled",
        ]
    );
}

#[test]
fn same_snapshot_same_plan_whatever_the_order() {
    let machines = ["m3 region=eu", "m1", "m2 region=eu", "m4"];
    let units = [
        "web@1.service launched | Conflicts=web@*",
        "web@2.service launched | Conflicts=web@*",
        "web@3.service launched @m2 | Conflicts=web@*",
        "db.service launched | MachineMetadata=region=eu",
        "side.service launched | MachineOf=db.service",
        "old.service launched @m1",
        "new.service launched | Replaces=old.service",
        "g.service launched | Global=true;MachineMetadata=region=eu",
        "x.service loaded @m9",
    ];
    let base = reconcile(&snapshot(&machines, &units));
    let mut rm = machines;
    let mut ru = units;
    for round in 0..8 {
        rm.rotate_left(1);
        ru.rotate_left(3);
        if round % 2 == 1 {
            ru.reverse();
        }
        assert_eq!(reconcile(&snapshot(&rm, &ru)), base, "round {round}");
    }
}

fn sunit(name: &str, xfleet: &str) -> Unit {
    unit(&format!("{name} launched | {xfleet}"))
}

#[test]
fn global_rule_for_agents() {
    let m = machine("m1 role=edge");
    let g = sunit(
        "g.service",
        "Global=true;MachineMetadata=role=edge;Conflicts=bad.service",
    );
    let g_inactive = unit("g.service inactive | Global=true");
    let not_global = sunit("plain.service", "");
    let picky = sunit("p.service", "Global=true;MachineMetadata=role=core");
    let bad = sunit("bad.service", "");
    let hater = sunit("hater.service", "Conflicts=g.*");
    let friend = sunit("friend.service", "");
    let cases: Vec<(&Unit, Vec<&Unit>, Result<(), &str>)> = vec![
        (&g, vec![], Ok(())),
        (&g, vec![&friend], Ok(())),
        (&g, vec![&g], Ok(())),
        (
            &g,
            vec![&bad],
            Err("conflicts with bad.service on machine m1"),
        ),
        (
            &g,
            vec![&friend, &hater],
            Err("conflicts with hater.service on machine m1"),
        ),
        (
            &picky,
            vec![],
            Err("machine m1 does not have metadata role=core"),
        ),
        (&g_inactive, vec![], Err("target state inactive")),
        (
            &not_global,
            vec![],
            Err("plain.service is not a global unit"),
        ),
    ];
    for (unit, others, want) in cases {
        assert_eq!(
            global_unit_runs_here(&m, unit, &others),
            want.map_err(str::to_string),
            "{} with {:?}",
            unit.name,
            others.iter().map(|o| o.name.as_str()).collect::<Vec<_>>()
        );
    }

    // Two global units that conflict: the first by name runs.
    let g1 = sunit("cg.0.service", "Global=true;Conflicts=cg.*.service");
    let g2 = sunit("cg.1.service", "Global=true;Conflicts=cg.*.service");
    let verdicts = global_units_for_machine(&m, &[&g2, &g1], &[]);
    let got: Vec<(String, Result<(), String>)> = verdicts
        .into_iter()
        .map(|(u, r)| (u.name.to_string(), r))
        .collect();
    assert_eq!(
        got,
        vec![
            ("cg.0.service".to_string(), Ok(())),
            (
                "cg.1.service".to_string(),
                Err("conflicts with cg.0.service on machine m1".to_string())
            ),
        ]
    );
}

#[test]
fn reconcile_counts_globals_like_agents() {
    // Two conflicting globals on two machines: each machine runs only the first by name, so
    // each machine's load is 1 and the new unit goes to m1 (tie by ID).
    let plan = reconcile(&snapshot(
        &["m1", "m2", "m3"],
        &[
            "cg.0.service launched | Global=true;Conflicts=cg.*.service",
            "cg.1.service launched | Global=true;Conflicts=cg.*.service",
            "busy.service launched @m3",
            "busy2.service launched @m3",
            "a.service launched | Conflicts=cg.1.service",
        ],
    ));
    assert_eq!(decisions(&plan), ["schedule a.service m1"]);
    assert!(plan.unplaceable.is_empty());
    let _ = BTreeMap::<String, String>::new();
}
