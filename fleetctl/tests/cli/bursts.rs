//! Many units in one command: argument order, units that depend on earlier arguments, `start --replace`.

use fleet_registry::EngineOp;
use fleet_unit::{TargetState, UnitFile};

use crate::support::*;

/// Many units in one invocation: fleetctl works on many at once, yet prints in argument
/// order, stops at the first bad argument after reporting the ones before it, and handles a
/// unit named twice once. Through the etcd driver and through the API alike.
#[test]
fn many_units_are_reported_in_argument_order() {
    let c = Cluster::start();
    let api = c.serve_api();
    for driver in ["etcd", "api"] {
        let name = |i: usize| format!("{driver}-{i:02}.service");
        let names: Vec<String> = (1..=80).map(name).collect();
        for n in &names {
            c.write(n, SLEEP);
        }
        let bad = format!("{driver}-bad.service");
        c.write(
            &bad,
            "[Service]\nExecStart=/bin/true\n\n[X-Fleet]\nGlobal=true\nMachineOf=abcd\n",
        );
        let run = |args: &[&str]| -> Output { c.run_with(&c.driver_flags(driver, &api), args) };
        let inactive = |ns: &[String]| -> String {
            ns.iter().map(|n| format!("Unit {n} inactive\n")).collect()
        };

        // the bad unit in the middle: the 40 before it are created and reported, in order
        let mut args = vec!["start", "--no-block"];
        args.extend(names[..40].iter().map(String::as_str));
        args.push(&bad);
        args.extend(names[40..].iter().map(String::as_str));
        let out = run(&args);
        assert_eq!(
            (out.code, out.stdout.clone(), out.stderr.as_str()),
            (
                1,
                inactive(&names[..40]),
                format!("Error creating units: unit {bad}: Global cannot be used with MachineOf\n")
                    .as_str()
            ),
            "{driver}: {out:?}"
        );
        // as fleet left them: created, not started
        let out = run(&["list-unit-files", "--no-legend", "--fields=unit,dstate"]);
        let want: String = names[..40]
            .iter()
            .map(|n| format!("{n}\tinactive\n"))
            .collect();
        let ours: String = out
            .stdout
            .lines()
            .filter(|l| l.starts_with(&format!("{driver}-")))
            .map(|l| format!("{l}\n"))
            .collect();
        assert_eq!(ours, want, "{driver}: {out:?}");

        // again without it (and one unit named twice): the rest created, all started, in order
        let mut args = vec!["start", "--no-block"];
        args.extend(names.iter().map(String::as_str));
        args.push(&names[3]);
        let out = run(&args);
        let triggered: String = names
            .iter()
            .map(|n| format!("Triggered unit {n} start\n"))
            .collect();
        assert_eq!(
            (out.code, out.stdout.clone(), out.stderr.as_str()),
            (0, inactive(&names[40..]) + &triggered, ""),
            "{driver}: {out:?}"
        );
        let out = run(&["list-unit-files", "--no-legend", "--fields=unit,dstate"]);
        let want: String = names.iter().map(|n| format!("{n}\tlaunched\n")).collect();
        let ours: String = out
            .stdout
            .lines()
            .filter(|l| l.starts_with(&format!("{driver}-")))
            .map(|l| format!("{l}\n"))
            .collect();
        assert_eq!(ours, want, "{driver}: {out:?}");
    }
}

/// Arguments that depend on an earlier one of the same command: a unit named twice is
/// created once, and an instance finds the template created just before it (both drivers).
#[test]
fn arguments_see_the_units_created_before_them() {
    let c = Cluster::start();
    let api = c.serve_api();
    std::fs::create_dir_all(c.dir.path().join("sub")).expect("mkdir");
    for driver in ["etcd", "api"] {
        let flags = c.driver_flags(driver, &api);
        let run = |args: &[&str]| c.run_with(&flags, args).parts();
        let dup = format!("dup-{driver}.service");
        c.write(&dup, SLEEP);
        assert_eq!(
            run(&["submit", &dup, &dup]),
            (0, format!("Unit {dup} inactive\n"), String::new()),
            "{driver}"
        );
        let x = format!("x-{driver}.service");
        let (tmpl, inst) = (
            format!("t{driver}@.service"),
            format!("t{driver}@1.service"),
        );
        c.write(&x, SLEEP);
        c.write(&format!("sub/{tmpl}"), SLEEP);
        let tmpl_path = format!("sub/{tmpl}");
        assert_eq!(
            run(&["submit", &x, &tmpl_path, &inst]),
            (
                0,
                format!("Unit {x} inactive\nUnit {tmpl} inactive\nUnit {inst} inactive\n"),
                String::new()
            ),
            "{driver}"
        );
    }
}

/// `start --replace` of a running unit writes the new version over the old one in one step,
/// keeping its desired state and its machine: the unit is never destroyed or inactive in
/// between (fleet's fleetctl made it inactive first, and it could land elsewhere), through
/// either driver.
#[test]
fn start_replace_keeps_the_unit_where_it_runs() {
    let c = Cluster::start();
    let api = c.serve_api();
    c.add_machine(M1, "172.17.8.103", &[]);
    let engine = c.engine();
    let reg = c.registry();
    for driver in ["etcd", "api"] {
        let unit = format!("{driver}.service");
        let name = fleet_unit::UnitName::parse(&unit).expect("name");
        c.rt.block_on(fleet_registry::Registry::create_unit(
            &reg,
            &name,
            &UnitFile::parse(SLEEP).expect("unit"),
            TargetState::Launched,
        ))
        .expect("create");
        c.apply(
            &engine,
            &[EngineOp::Schedule {
                unit: unit.clone(),
                machine: M1.into(),
                hash: hash_of(SLEEP),
                desired: TargetState::Launched,
            }],
        );
        let key = reg.keys().unit(&unit);
        let created = |c: &Cluster| {
            let mut kv = reg.client().kv_client();
            let got = c.rt.block_on(kv.get(key.as_str(), None)).expect("get");
            got.kvs().first().map(|kv| kv.create_revision())
        };
        let before = created(&c);
        assert!(before.is_some());
        c.write(&unit, HELLO);
        let out = c.run_with(
            &c.driver_flags(driver, &api),
            &["start", "--no-block", "--replace", unit.as_str()],
        );
        assert_eq!(
            out.parts(),
            (
                0,
                format!("Unit {unit} launched\nTriggered unit {unit} start\n"),
                String::new()
            ),
            "{driver}"
        );
        assert_eq!(
            created(&c),
            before,
            "{driver}: the unit's key was never deleted"
        );
        let view =
            c.rt.block_on(fleet_registry::Registry::unit(&reg, &name))
                .expect("read")
                .expect("exists");
        assert_eq!(view.hash, hash_of(HELLO), "{driver}");
        assert_eq!(view.desired, TargetState::Launched, "{driver}");
        assert_eq!(view.machine_id.as_deref(), Some(M1), "{driver}");
    }
}

/// `start` and `load` of local unit files create each new unit in the command's desired state
/// with one PUT and nothing else (fleet's fleetctl, and this one before, looked it up, created
/// it inactive, then changed its state: three requests). A unit that was there already is
/// then looked up and changed as before. The lines are fleet's, in argument order.
#[test]
fn a_new_unit_costs_one_put() {
    let c = Cluster::start();
    let metrics = fleet_api::Metrics::new();
    let api = c.serve_api_counted(metrics.clone());
    let requests = |method: &str| -> u64 {
        let prefix = format!("fleet_api_requests_total{{method=\"{method}\",");
        metrics
            .encode()
            .lines()
            .filter(|l| l.starts_with(&prefix))
            .filter_map(|l| l.rsplit_once(' ')?.1.parse::<u64>().ok())
            .sum()
    };
    let names: Vec<String> = (1..=20).map(|i| format!("one-{i:02}.service")).collect();
    for n in &names {
        c.write(n, SLEEP);
    }
    c.write("loaded.service", SLEEP);
    let run = |args: &[&str]| -> Output {
        let out = c
            .bare_command()
            .arg(format!("--endpoint={api}"))
            .args(args)
            .output()
            .expect("run fleetctl");
        Output {
            code: out.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    };
    let out = run(&["load", "--no-block", "loaded.service"]);
    assert_eq!(
        (out.code, out.stdout.as_str(), out.stderr.as_str()),
        (
            0,
            "Unit loaded.service inactive\nTriggered unit loaded.service load\n",
            ""
        )
    );
    // and one GET, which tells that fleetd honours create-only PUTs (fleet v1.0's did not)
    assert_eq!((requests("GET"), requests("PUT")), (1, 1));

    // 20 new units and one that is there (loaded), in the middle
    let mut args = vec!["start", "--no-block"];
    args.extend(names[..10].iter().map(String::as_str));
    args.push("loaded.service");
    args.extend(names[10..].iter().map(String::as_str));
    let out = run(&args);
    let created: String = names
        .iter()
        .map(|n| format!("Unit {n} inactive\n"))
        .collect();
    let triggered: String = names[..10]
        .iter()
        .chain(std::iter::once(&"loaded.service".to_string()))
        .chain(&names[10..])
        .map(|n| format!("Triggered unit {n} start\n"))
        .collect();
    assert_eq!(
        (out.code, out.stdout.clone(), out.stderr.as_str()),
        (0, created + &triggered, ""),
        "{out:?}"
    );
    // one PUT per new unit and one GET of the command's to learn that it may; loaded.service:
    // a refused create, two lookups (what to do with it, then its state) and the change of
    // its state
    assert_eq!((requests("GET"), requests("PUT")), (1 + 1 + 2, 1 + 22));
    let out = run(&["list-unit-files", "--no-legend", "--fields=unit,dstate"]);
    let want: String = std::iter::once(&"loaded.service".to_string())
        .chain(&names)
        .map(|n| format!("{n}\tlaunched\n"))
        .collect();
    assert_eq!(out.stdout, want, "{out:?}");

    // instances of a template in the registry (no local files: looked up first, then each
    // created in its state with one PUT)
    c.write("tm@.service", SLEEP);
    let out = run(&["submit", "tm@.service"]);
    assert_eq!(out.stdout, "Unit tm@.service inactive\n", "{out:?}");
    let (gets, puts) = (requests("GET"), requests("PUT"));
    let out = run(&["start", "--no-block", "tm@1.service", "tm@2.service"]);
    assert_eq!(
        (out.code, out.stdout.as_str(), out.stderr.as_str()),
        (
            0,
            "Unit tm@1.service inactive\nUnit tm@2.service inactive\n\
             Triggered unit tm@1.service start\nTriggered unit tm@2.service start\n",
            ""
        )
    );
    // each instance: its lookup, its template's, one PUT
    assert_eq!((requests("GET") - gets, requests("PUT") - puts), (4, 2));
}

/// fleet v1.0's fleetd ignores `If-None-Match: *`: a create-only PUT with a desired state
/// would set the state of a unit that is there, or overwrite it with other options. To such a
/// fleetd (one that does not say it honours create-only PUTs), every unit is looked up first.
#[test]
fn a_fleet_v1_fleetd_gets_lookups_first() {
    let c = Cluster::start();
    let api = c.serve_api_like_fleet_v1();
    let flags = vec![format!("--endpoint={api}")];
    c.write("there.service", HELLO);
    let out = c.run_with(&flags, &["submit", "there.service"]);
    assert_eq!(out.stdout, "Unit there.service inactive\n", "{out:?}");
    // the local file now differs from the unit in the registry
    c.write("there.service", SLEEP);
    c.write("new.service", SLEEP);
    let out = c.run_with(
        &flags,
        &["load", "--no-block", "there.service", "new.service"],
    );
    assert_eq!(
        (out.code, out.stdout.as_str()),
        (
            0,
            "Unit new.service inactive\n\
             Triggered unit there.service load\nTriggered unit new.service load\n"
        ),
        "{out:?}"
    );
    let out = c.run_with(&flags, &["cat", "there.service"]);
    assert_eq!(out.stdout.trim_end(), HELLO.trim_end(), "{out:?}");
}

/// A creation that fails for another reason than "already exists" (here the API's 500) ends
/// the command as in fleet, and like fleet's (which created every unit inactive and set states
/// afterwards) it leaves the units it did create inactive, though each was created launched.
#[test]
fn a_failed_creation_leaves_the_created_units_inactive() {
    let c = Cluster::start();
    let api = c.serve_api_failing_create("c.service");
    let names = [
        "a.service",
        "b.service",
        "c.service",
        "d.service",
        "e.service",
    ];
    for n in names {
        c.write(n, SLEEP);
    }
    let flags = vec![format!("--endpoint={api}")];
    let mut args = vec!["start", "--no-block"];
    args.extend(names);
    let out = c.run_with(&flags, &args);
    assert_eq!(out.code, 1, "{out:?}");
    assert!(
        out.stderr
            .starts_with("Error creating units: failed creating unit c.service: "),
        "{out:?}"
    );
    assert!(!out.stdout.contains("Triggered"), "{out:?}");
    let out = c.run_with(
        &flags,
        &["list-unit-files", "--no-legend", "--fields=unit,dstate"],
    );
    assert_eq!(
        out.stdout,
        "a.service\tinactive\nb.service\tinactive\nd.service\tinactive\ne.service\tinactive\n",
        "{out:?}"
    );
}

/// Whether `list-unit-files --fields=unit,dstate` lists `unit` in `state`.
fn has(listed: &str, unit: &str, state: &str) -> bool {
    listed
        .lines()
        .any(|l| l.split_whitespace().eq([unit, state]))
}

/// What fleet printed for a burst mixing new units with a unit already there whose local file
/// differs (a warning, the registry's copy kept) and, in another command, a template (created,
/// then refused a start): the same through the API and through etcd.
#[test]
fn a_burst_with_units_already_there_or_templates_prints_what_fleet_did() {
    let c = Cluster::start();
    let api = c.serve_api();
    for driver in ["etcd", "api"] {
        let flags = if driver == "etcd" {
            vec![
                "--driver=etcd".to_string(),
                format!("--endpoint={}", c.etcd.endpoint()),
            ]
        } else {
            vec![format!("--endpoint={api}")]
        };
        let run = |args: &[&str]| -> Output {
            let out = c
                .bare_command()
                .args(&flags)
                .args(args)
                .output()
                .expect("run fleetctl");
            Output {
                code: out.status.code().unwrap_or(-1),
                stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
                stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
            }
        };
        let (a, b, old) = (
            format!("{driver}-a.service"),
            format!("{driver}-b.service"),
            format!("{driver}-old.service"),
        );
        c.write(&old, SLEEP);
        let out = run(&["submit", &old]);
        assert_eq!(out.stdout, format!("Unit {old} inactive\n"), "{out:?}");
        c.write(&old, HELLO);
        c.write(&a, SLEEP);
        c.write(&b, SLEEP);
        let out = run(&["start", "--no-block", &a, &old, &b]);
        assert_eq!(
            (out.code, out.stdout.clone(), out.stderr.clone()),
            (
                0,
                format!(
                    "Unit {a} inactive\nUnit {b} inactive\nTriggered unit {a} start\n\
                     Triggered unit {old} start\nTriggered unit {b} start\n"
                ),
                format!(
                    "WARNING: Unit {old} in registry differs from local unit file {old}. \
                     Add --replace to override.\n"
                )
            ),
            "{driver}"
        );
        let out = run(&["cat", &old]);
        assert_eq!(out.stdout, SLEEP, "{driver}: the registry keeps its copy");

        let tmpl = format!("{driver}-t@.service");
        let c2 = format!("{driver}-c.service");
        c.write(&tmpl, SLEEP);
        c.write(&c2, SLEEP);
        let out = run(&["start", "--no-block", &c2, &tmpl]);
        let created = format!("Unit {c2} inactive\nUnit {tmpl} inactive\n");
        let listed = run(&["list-unit-files", "--no-legend", "--fields=unit,dstate"]);
        if driver == "api" {
            // the API refuses to start a template, once it was created inactive
            assert_eq!(
                (out.code, out.stdout.as_str(), out.stderr.as_str()),
                (
                    1,
                    created.as_str(),
                    format!(
                        "Error starting units: googleapi: Error 400: cannot activate template \"{tmpl}\"\n"
                    )
                    .as_str()
                ),
                "{driver}: {out:?}"
            );
            assert!(
                has(&listed.stdout, &tmpl, "inactive"),
                "{driver}: {listed:?}"
            );
        } else {
            // etcd takes what it is given (as fleet's etcd driver did)
            assert_eq!(
                (out.code, out.stdout.clone()),
                (
                    0,
                    format!("{created}Triggered unit {c2} start\nTriggered unit {tmpl} start\n")
                ),
                "{driver}: {out:?}"
            );
            assert!(has(&listed.stdout, &c2, "launched"), "{driver}: {listed:?}");
        }
    }
}
