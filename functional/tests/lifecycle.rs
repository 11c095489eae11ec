//! A unit's life as a user drives it with fleetctl: submit, load, start, stop, unload and
//! destroy round trips with fleet's messages, `cat` and `list-unit-files`, and units with an
//! [Install] section, checked against fleetctl's tables and the node's own systemd.

use functional::fleet::{
    WAIT, boot, fixture, fleetctl, fleetctl_ok, must, quick_spec, short_id, wait_systemd,
};
use functional::{Cluster, FleetCluster, wait_for};

/// `Unit <name> <state> on <short id>.../<ip>`, what blocking commands print.
fn on_machine(c: &Cluster, node: usize, name: &str, state: &str) -> String {
    format!(
        "Unit {name} {state} on {}.../{}\n",
        short_id(c.machine_id(node)),
        c.ip(node)
    )
}

/// Waits until `list-units` shows exactly `rows` as (unit, active, sub).
fn wait_list_units(c: &Cluster, node: usize, rows: &[(&str, &str, &str)]) {
    let want: Vec<(String, String, String)> = rows
        .iter()
        .map(|(u, a, s)| (u.to_string(), a.to_string(), s.to_string()))
        .collect();
    must(wait_for(&format!("list-units {want:?}"), WAIT, || {
        let got: Vec<(String, String, String)> = c
            .list_units(node)
            .map_err(|e| e.to_string())?
            .into_iter()
            .map(|r| (r.unit, r.active, r.sub))
            .collect();
        if got == want {
            Ok(())
        } else {
            Err(format!("{got:?}"))
        }
    }));
}

#[test]
fn unit_commands_round_trip_with_fleets_messages() {
    let c = boot(quick_spec("rtrip", 1));
    let id = c.machine_id(1).to_string();
    let hello = must(c.put_fixture(1, "hello.service"));

    // submit: registry only, nothing in systemd
    let out = fleetctl_ok(&c, 1, &["submit", &hello]);
    assert_eq!(out.stdout, "Unit hello.service inactive\n", "{out}");
    let out = fleetctl_ok(&c, 1, &["submit", &hello]);
    assert_eq!(
        out.stdout, "",
        "resubmitting the same file prints nothing: {out}"
    );
    let files = must(c.list_unit_files(1));
    assert_eq!(files.len(), 1, "{files:?}");
    let f = &files[0];
    assert_eq!(
        (
            f.unit.as_str(),
            f.dstate.as_str(),
            f.state.as_str(),
            f.target.as_str()
        ),
        ("hello.service", "inactive", "inactive", "-")
    );
    assert!(
        f.hash.len() == 40 && f.hash.chars().all(|ch| ch.is_ascii_hexdigit()),
        "{f:?}"
    );
    assert_eq!(
        must(c.systemd_unit(1, "hello.service")).load_state,
        "not-found"
    );

    // a different local file of the same name is refused without --replace
    let changed = fixture("hello.service").replace("every two seconds", "now and then");
    let other = must(c.put_unit(1, "other/hello.service", &changed));
    let out = fleetctl(&c, 1, &["submit", &other]);
    assert!(
        out.stderr.contains(&format!(
            "WARNING: Unit hello.service in registry differs from local unit file {other}. \
             Add --replace to override."
        )),
        "{out}"
    );
    let cat = fleetctl_ok(&c, 1, &["cat", "hello.service"]);
    assert_eq!(
        cat.stdout,
        fixture("hello.service"),
        "the registry kept the first file"
    );

    // load: scheduled and linked into systemd, not started
    let out = fleetctl_ok(&c, 1, &["load", "hello.service"]);
    assert_eq!(
        out.stdout,
        on_machine(&c, 1, "hello.service", "loaded"),
        "{out}"
    );
    wait_systemd(&c, 1, "hello.service", Some("loaded"), "inactive");
    assert_eq!(
        must(c.systemd_unit(1, "hello.service")).unit_file_state,
        "linked-runtime"
    );
    wait_list_units(&c, 1, &[("hello.service", "inactive", "dead")]);
    let f = &must(c.list_unit_files(1))[0];
    assert_eq!(
        (f.dstate.as_str(), f.state.as_str(), f.target.as_str()),
        ("loaded", "loaded", id.as_str())
    );

    // start
    let out = fleetctl_ok(&c, 1, &["start", "hello.service"]);
    assert_eq!(
        out.stdout,
        on_machine(&c, 1, "hello.service", "launched"),
        "{out}"
    );
    let u = must(c.systemd_unit(1, "hello.service"));
    assert_eq!(
        (u.active_state.as_str(), u.sub_state.as_str()),
        ("active", "running"),
        "{u}"
    );
    assert!(u.main_pid > 0, "{u}");
    wait_list_units(&c, 1, &[("hello.service", "active", "running")]);

    // stop: back to loaded
    let out = fleetctl_ok(&c, 1, &["stop", "hello.service"]);
    assert_eq!(
        out.stdout,
        on_machine(&c, 1, "hello.service", "loaded"),
        "{out}"
    );
    wait_systemd(&c, 1, "hello.service", Some("loaded"), "inactive");
    wait_list_units(&c, 1, &[("hello.service", "inactive", "dead")]);

    // unload: off the machine, file gone from systemd
    let out = fleetctl_ok(&c, 1, &["unload", "hello.service"]);
    assert_eq!(out.stdout, "Unit hello.service inactive\n", "{out}");
    wait_systemd(&c, 1, "hello.service", Some("not-found"), "inactive");
    wait_list_units(&c, 1, &[]);
    let f = &must(c.list_unit_files(1))[0];
    assert_eq!(
        (f.dstate.as_str(), f.state.as_str(), f.target.as_str()),
        ("inactive", "inactive", "-")
    );
    let out = fleetctl(&c, 1, &["stop", "hello.service"]);
    assert!(!out.success(), "stopping an inactive unit must fail: {out}");
    assert!(
        out.stderr
            .contains("Unable to stop unit hello.service in state inactive"),
        "{out}"
    );

    // destroy
    let out = fleetctl_ok(&c, 1, &["destroy", "hello.service"]);
    assert_eq!(out.stdout, "Destroyed hello.service\n", "{out}");
    assert_eq!(must(c.list_unit_files(1)), vec![]);
    let out = fleetctl(&c, 1, &["cat", "hello.service"]);
    assert!(!out.success(), "{out}");
    assert!(out.stderr.contains("Unit hello.service not found"), "{out}");
    let out = fleetctl(&c, 1, &["destroy", "hello.service"]);
    assert!(out.stderr.contains("Units not found in registry"), "{out}");
    let out = fleetctl(&c, 1, &["start", "nosuch.service"]);
    assert!(!out.success(), "{out}");
    assert!(
        out.stderr.contains(
            "Error creating units: unable to find Unit(nosuch.service) in Registry or on filesystem"
        ),
        "{out}"
    );

    // the same trip without blocking, three instances of a template next to them
    let _template = must(c.put_fixture(1, "hello@.service"));
    let dir = functional::fleet::NODE_UNITS_DIR;
    let names = ["hello@1.service", "hello@2.service", "hello@3.service"];
    let paths: Vec<String> = names.iter().map(|n| format!("{dir}/{n}")).collect();
    let paths: Vec<&str> = paths.iter().map(String::as_str).collect();
    let triggered = |verb: &str| -> String {
        names
            .iter()
            .map(|n| format!("Triggered unit {n} {verb}\n"))
            .collect()
    };
    // units fleetctl creates on the way are reported as submitted first (in any order)
    let out = fleetctl_ok(&c, 1, &[&["load", "--no-block"][..], &paths].concat());
    let (created, rest) = out
        .stdout
        .split_at(out.stdout.find("Triggered").unwrap_or(0));
    let mut created: Vec<&str> = created.lines().collect();
    created.sort_unstable();
    let want: Vec<String> = names.iter().map(|n| format!("Unit {n} inactive")).collect();
    assert_eq!(created, want, "{out}");
    assert_eq!(rest, triggered("load"), "{out}");
    wait_list_units(&c, 1, &names.map(|n| (n, "inactive", "dead")));
    let out = fleetctl_ok(&c, 1, &[&["start", "--no-block"][..], &names[..]].concat());
    assert_eq!(out.stdout, triggered("start"), "{out}");
    wait_list_units(&c, 1, &names.map(|n| (n, "active", "running")));
    for n in names {
        wait_systemd(&c, 1, n, Some("loaded"), "active");
    }
    let out = fleetctl_ok(&c, 1, &[&["stop", "--no-block"][..], &names[..]].concat());
    assert_eq!(out.stdout, triggered("stop"), "{out}");
    wait_list_units(&c, 1, &names.map(|n| (n, "inactive", "dead")));
    let out = fleetctl_ok(&c, 1, &[&["unload", "--no-block"][..], &names[..]].concat());
    assert_eq!(out.stdout, triggered("unload"), "{out}");
    wait_list_units(&c, 1, &[]);
    for n in names {
        wait_systemd(&c, 1, n, Some("not-found"), "inactive");
    }
    let out = fleetctl_ok(&c, 1, &[&["destroy"][..], &names[..]].concat());
    let destroyed: String = names.iter().map(|n| format!("Destroyed {n}\n")).collect();
    assert_eq!(out.stdout, destroyed, "{out}");
    assert_eq!(must(c.list_unit_files(1)), vec![]);

    // start straight from a file: submitted, loaded and launched in one go
    let out = fleetctl_ok(&c, 1, &["start", &hello]);
    assert_eq!(
        out.stdout,
        format!(
            "Unit hello.service inactive\n{}",
            on_machine(&c, 1, "hello.service", "launched")
        ),
        "{out}"
    );
    wait_systemd(&c, 1, "hello.service", Some("loaded"), "active");
    let first = must(c.systemd_unit(1, "hello.service"));

    // --replace puts the changed file in place: the registry and systemd run the new one
    fleetctl_ok(&c, 1, &["start", "--replace", &other]);
    let cat = fleetctl_ok(&c, 1, &["cat", "hello.service"]);
    assert_eq!(cat.stdout, changed);
    must(wait_for("the replaced hello.service running", WAIT, || {
        let d = c
            .exec(
                1,
                &[
                    "systemctl",
                    "show",
                    "-p",
                    "Description",
                    "--value",
                    "hello.service",
                ],
            )
            .map_err(|e| e.to_string())?;
        let u = c
            .systemd_unit(1, "hello.service")
            .map_err(|e| e.to_string())?;
        if d.trimmed() == "Greets the journal now and then"
            && u.active_state == "active"
            && u.main_pid != first.main_pid
        {
            Ok(())
        } else {
            Err(format!("{}: {u}", d.trimmed()))
        }
    }));
    wait_list_units(&c, 1, &[("hello.service", "active", "running")]);

    let out = fleetctl_ok(&c, 1, &["destroy", "hello.service"]);
    assert_eq!(out.stdout, "Destroyed hello.service\n", "{out}");
    wait_systemd(&c, 1, "hello.service", Some("not-found"), "inactive");
}

#[test]
fn cat_round_trips_units_and_list_unit_files_is_sorted() {
    let c = boot(quick_spec("catlist", 1));

    // a unit already in fleet's canonical form comes back byte for byte
    let hello = must(c.put_fixture(1, "hello.service"));
    fleetctl_ok(&c, 1, &["submit", &hello]);
    let out = fleetctl_ok(&c, 1, &["cat", "hello.service"]);
    assert_eq!(out.stdout, fixture("hello.service"));

    // any other file comes back as fleet serializes it: comments dropped, a repeated
    // section merged into the first, one blank line between sections, continuation kept
    let messy = "# leading comment\n\
                 [Unit]\n\
                 Description=messy ; not a comment here\n\
                 \n\
                 \n\
                 [Service]\n\
                 ExecStart=/bin/sh -c \\\n  \"sleep 100000\"\n\
                 ; a comment\n\
                 [Unit]\n\
                 After=network.target\n\
                 [X-Fleet]\n\
                 Conflicts=hello.service";
    let want = "[Unit]\n\
                Description=messy ; not a comment here\n\
                After=network.target\n\
                \n\
                [Service]\n\
                ExecStart=/bin/sh -c \\\n  \"sleep 100000\"\n\
                \n\
                [X-Fleet]\n\
                Conflicts=hello.service\n";
    let path = must(c.put_unit(1, "messy.service", messy));
    fleetctl_ok(&c, 1, &["submit", &path]);
    let out = fleetctl_ok(&c, 1, &["cat", "messy.service"]);
    assert_eq!(out.stdout, want);
    // and what cat printed is a fixed point: submitting it again changes nothing
    let again = must(c.put_unit(1, "again/messy.service", &out.stdout));
    let out = fleetctl_ok(&c, 1, &["submit", &again]);
    assert_eq!(out.stdout, "", "{out}");
    assert!(!out.stderr.contains("differs"), "{out}");

    let out = fleetctl(&c, 1, &["cat", "nosuch.service"]);
    assert!(!out.success(), "{out}");
    assert!(
        out.stderr.contains("Unit nosuch.service not found"),
        "{out}"
    );

    // 20 instances submitted out of order (plus the two above) list sorted by name
    must(c.put_fixture(1, "hello@.service"));
    let dir = functional::fleet::NODE_UNITS_DIR;
    let mut args = vec!["submit".to_string()];
    for i in [
        7, 20, 1, 13, 2, 19, 8, 14, 3, 18, 9, 15, 4, 17, 10, 16, 5, 11, 6, 12,
    ] {
        args.push(format!("{dir}/hello@{i:02}.service"));
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    fleetctl_ok(&c, 1, &args);
    let out = fleetctl_ok(
        &c,
        1,
        &["list-unit-files", "--no-legend", "--fields", "unit"],
    );
    let got: Vec<&str> = out.stdout.lines().collect();
    let mut want: Vec<String> = (1..=20).map(|i| format!("hello@{i:02}.service")).collect();
    want.push("hello.service".into());
    want.push("messy.service".into());
    want.sort();
    assert_eq!(got, want);
    // the default table has fleet's header and one row per unit
    let out = fleetctl_ok(&c, 1, &["list-unit-files"]);
    let mut lines = out.stdout.lines();
    let header: Vec<&str> = lines
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .collect();
    assert_eq!(header, ["UNIT", "HASH", "DSTATE", "STATE", "TARGET"]);
    assert_eq!(lines.count(), 22);
}

#[test]
fn units_with_an_install_section_are_enabled_beside_what_wants_them() {
    let c = boot(quick_spec("install", 2));
    must(c.wait_for_machines(1, 2, WAIT));
    let hello = must(c.put_fixture(1, "hello.service"));
    let discovery = must(c.put_fixture(1, "discovery.service"));

    // loaded together (MachineOf), nothing runs yet
    fleetctl_ok(&c, 1, &["load", &hello, &discovery]);
    let files = must(c.list_unit_files(1));
    let target = |unit: &str| {
        files
            .iter()
            .find(|f| f.unit == unit)
            .map(|f| f.target.clone())
            .unwrap_or_default()
    };
    assert_eq!(
        target("hello.service"),
        target("discovery.service"),
        "{files:?}"
    );
    let node = c
        .node_of(&target("hello.service"))
        .unwrap_or_else(|| panic!("hello.service not on a machine: {files:?}"));
    wait_systemd(&c, node, "discovery.service", Some("loaded"), "inactive");
    // fleet links every unit into systemd's runtime directory and also enables (runtime)
    // those with an [Install] section
    let d = must(c.systemd_unit(node, "discovery.service"));
    assert_eq!(d.unit_file_state, "enabled-runtime", "{d}");
    let h = must(c.systemd_unit(node, "hello.service"));
    assert_eq!(h.unit_file_state, "linked-runtime", "{h}");
    let wants = must(c.exec(
        node,
        &[
            "systemctl",
            "show",
            "-p",
            "Wants",
            "--value",
            "hello.service",
        ],
    ));
    assert!(wants.stdout.contains("discovery.service"), "{wants}");

    // starting hello.service pulls discovery.service in (WantedBy=), stopping it stops
    // discovery.service too (BindsTo=)
    fleetctl_ok(&c, 1, &["start", "hello.service"]);
    wait_systemd(&c, node, "discovery.service", Some("loaded"), "active");
    fleetctl_ok(&c, 1, &["stop", "hello.service"]);
    wait_systemd(&c, node, "discovery.service", Some("loaded"), "inactive");
    wait_systemd(&c, node, "hello.service", Some("loaded"), "inactive");

    // unloading takes the enablement away with the file
    fleetctl_ok(&c, 1, &["unload", "discovery.service"]);
    wait_systemd(&c, node, "discovery.service", Some("not-found"), "inactive");
    let wants = must(c.exec(
        node,
        &[
            "systemctl",
            "show",
            "-p",
            "Wants",
            "--value",
            "hello.service",
        ],
    ));
    assert!(!wants.stdout.contains("discovery.service"), "{wants}");
}
