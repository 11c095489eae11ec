//! Submitting, reading, listing and removing units, and their requirements checked on submit.

use std::path::Path;

use crate::support::*;

#[test]
fn submit_cat_and_resubmit() {
    let c = Cluster::start();
    let hello = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/hello.service"),
    )
    .expect("examples/hello.service");
    c.write("hello.service", &hello);

    c.check(&["submit"], 0, "", "No units given\n");
    c.check(
        &["submit", "hello.service"],
        0,
        "Unit hello.service inactive\n",
        "",
    );
    // the canonical text, byte for byte, by name or by short name
    c.check(&["cat", "hello.service"], 0, &hello, "");
    c.check(&["cat", "hello"], 0, &hello, "");
    c.check(
        &["list-unit-files"],
        0,
        "UNIT\t\tHASH\tDSTATE\t\tSTATE\t\tTARGET\nhello.service\te55c0ae\tinactive\tinactive\t-\n",
        "",
    );

    // identical content: nothing to do, nothing printed
    c.check(&["submit", "hello.service"], 0, "", "");
    c.check(
        &["submit", "--replace", "hello.service"],
        0,
        "Found same Unit(hello.service) in Registry, nothing to do\n",
        "",
    );

    // different content: a warning, the registry keeps its copy
    c.write("hello.service", SLEEP);
    c.check(
        &["submit", "hello.service"],
        0,
        "",
        "WARNING: Unit hello.service in registry differs from local unit file hello.service. Add --replace to override.\n",
    );
    c.check(&["cat", "hello.service"], 0, &hello, "");

    // --replace takes the new content
    c.check(
        &["submit", "--replace", "hello.service"],
        0,
        "Unit hello.service inactive\n",
        "",
    );
    c.check(&["cat", "hello.service"], 0, SLEEP, "");
    c.check(
        &["list-unit-files", "--full", "--no-legend"],
        0,
        "hello.service\t1c6fb6f3684bafb0c173d8b8b957ceff031180c1\tinactive\tinactive\t-\n",
        "",
    );

    // a unit that is loaded may not be replaced by submit
    c.check(
        &["load", "--no-block", "hello.service"],
        0,
        "Triggered unit hello.service load\n",
        "",
    );
    c.write("hello.service", &hello);
    c.check(
        &["submit", "--replace", "hello.service"],
        0,
        "",
        "Warning: can not replace Unit(hello.service) in state 'loaded', use the appropriate command\n",
    );
    // load may replace a loaded unit: the new version stays loaded, and is waited for again
    c.check(
        &["load", "--no-block", "--replace", "hello.service"],
        0,
        "Unit hello.service loaded\nTriggered unit hello.service load\n",
        "",
    );
    c.check(&["cat", "hello.service"], 0, &hello, "");
    c.check(
        &["list-unit-files", "--no-legend", "--fields=unit,dstate"],
        0,
        "hello.service\tloaded\n",
        "",
    );
}

#[test]
fn missing_units_and_templates() {
    let c = Cluster::start();
    c.check(
        &["submit", "nosuch.service"],
        1,
        "",
        "Error creating units: unable to find Unit(nosuch.service) in Registry or on filesystem\n",
    );
    c.check(
        &["start", "--no-block", "nosuch"],
        1,
        "",
        "Error creating units: unable to find Unit(nosuch.service) in Registry or on filesystem\n",
    );
    c.check(
        &["cat", "nosuch.service"],
        1,
        "",
        "Unit nosuch.service not found\n",
    );
    c.check(&["cat"], 1, "", "One unit file must be provided\n");
    c.check(
        &["cat", "a", "b"],
        1,
        "",
        "One unit file must be provided\n",
    );
    c.check(
        &["destroy", "nosuch.service"],
        0,
        "",
        "Units not found in registry\n",
    );
    c.check(
        &["stop", "nosuch.service"],
        0,
        "",
        "Units not found in registry\n",
    );
    c.check(
        &["unload", "nosuch.service"],
        0,
        "",
        "Units not found in registry\n",
    );
    c.check(
        &["submit", "foo@1.service"],
        1,
        "",
        "Error creating units: failed getting Unit(foo@1.service) from template: unable to find template Unit(foo@.service) in Registry or on filesystem\n",
    );

    // an instance from a local template, in the argument's directory
    std::fs::create_dir(c.dir.path().join("units")).expect("mkdir");
    c.write(
        "units/web@.service",
        "[Unit]\nDescription=Web %i\n\n[Service]\nExecStart=/bin/true\n",
    );
    c.check(
        &["submit", "units/web@1.service"],
        0,
        "Unit web@1.service inactive\n",
        "",
    );
    c.check(
        &["cat", "web@1"],
        0,
        "[Unit]\nDescription=Web %i\n\n[Service]\nExecStart=/bin/true\n",
        "",
    );

    // an instance from a template in the registry (no local file)
    c.check(
        &["submit", "units/web@.service"],
        0,
        "Unit web@.service inactive\n",
        "",
    );
    std::fs::remove_file(c.dir.path().join("units/web@.service")).expect("rm");
    c.check(&["submit", "web@2"], 0, "Unit web@2.service inactive\n", "");
    c.check(
        &["list-unit-files", "--fields=unit,desc"],
        0,
        "UNIT\t\tDESC\nweb@.service\tWeb %i\nweb@1.service\tWeb %i\nweb@2.service\tWeb %i\n",
        "",
    );

    // several arguments: the first unknown one stops the command, earlier ones stay created
    c.write("a.service", SLEEP);
    c.check(
        &["submit", "a.service", "y1.service", "web@3.service"],
        1,
        "Unit a.service inactive\n",
        "Error creating units: unable to find Unit(y1.service) in Registry or on filesystem\n",
    );
}

#[test]
fn list_unit_files_fields_and_formats() {
    let c = Cluster::start();
    c.write(
        "b.service",
        "[Unit]\nDescription=Bee\n\n[Service]\nExecStart=/bin/true\n",
    );
    c.write("a.service", SLEEP);
    c.write(
        "global.service",
        "[Service]\nExecStart=/bin/true\n\n[X-Fleet]\nGlobal=true\n",
    );
    c.check(
        &["submit", "b.service", "a.service", "global.service"],
        0,
        "Unit b.service inactive\nUnit a.service inactive\nUnit global.service inactive\n",
        "",
    );
    let ha = hash_of(SLEEP).short();
    let hb = hash_of("[Unit]\nDescription=Bee\n\n[Service]\nExecStart=/bin/true\n").short();
    let hg = hash_of("[Service]\nExecStart=/bin/true\n\n[X-Fleet]\nGlobal=true\n").short();
    c.check(
        &["list-unit-files"],
        0,
        &format!(
            "UNIT\t\tHASH\tDSTATE\t\tSTATE\t\tTARGET\n\
             a.service\t{ha}\tinactive\tinactive\t-\n\
             b.service\t{hb}\tinactive\tinactive\t-\n\
             global.service\t{hg}\tinactive\t-\t\tglobal\n"
        ),
        "",
    );
    c.check(
        &[
            "list-unit-files",
            "--fields=unit,global,desc",
            "--no-legend",
        ],
        0,
        "a.service\tfalse\t-\nb.service\tfalse\tBee\nglobal.service\ttrue\t-\n",
        "",
    );
    c.check(
        &["list-unit-files", "--fields=unit,tmachine"],
        0,
        "UNIT\t\tTMACHINE\na.service\t-\nb.service\t-\nglobal.service\tglobal\n",
        "WARNING: The \"tmachine\" field is deprecated. Use \"target\" instead\n",
    );
    c.check(
        &["list-unit-files", "--fields=unit,x"],
        1,
        "",
        "Invalid key in output format: \"x\"\n",
    );
    c.check(
        &["list-unit-files", "--fields="],
        1,
        "",
        "Must define output format\n",
    );
    c.check(
        &["list-units", "--fields=foo"],
        1,
        "",
        "Invalid key in output format: \"foo\"\n",
    );
    c.check(
        &["list-machines", "--fields="],
        1,
        "",
        "Must define output format\n",
    );

    let json = c.run(&["list-unit-files", "-o", "json"]);
    assert_eq!(json.code, 0, "{json:?}");
    let v: serde_json::Value = serde_json::from_str(&json.stdout).expect("json");
    assert_eq!(v[0]["name"], "a.service");
    assert_eq!(v[0]["hash"], hash_of(SLEEP).to_string());
    assert_eq!(v[1]["description"], "Bee");
    assert_eq!(v[2]["global"], true);
    assert_eq!(v[2]["desiredState"], "inactive");
    assert_eq!(v[2]["machineID"], serde_json::Value::Null);
}

#[test]
fn destroy_stop_unload_and_no_block() {
    let c = Cluster::start();
    c.write("a.service", SLEEP);
    c.write("b.service", "[Service]\nExecStart=/bin/sleep 200\n");
    c.write(
        "global.service",
        "[Service]\nExecStart=/bin/true\n\n[X-Fleet]\nGlobal=true\n",
    );
    c.check(&["submit", "a.service"], 0, "Unit a.service inactive\n", "");
    c.check(
        &["load", "--no-block", "a.service", "b"],
        0,
        "Unit b.service inactive\nTriggered unit a.service load\nTriggered unit b.service load\n",
        "",
    );
    // already loaded: nothing to trigger
    c.check(&["load", "--no-block", "a.service"], 0, "", "");
    c.check(
        &["start", "--no-block", "a.service"],
        0,
        "Triggered unit a.service start\n",
        "",
    );
    c.check(
        &["start", "global.service"],
        0,
        "Unit global.service inactive\nTriggered global unit global.service start\n",
        "",
    );
    c.check(
        &["list-unit-files", "--fields=unit,dstate,state"],
        0,
        "UNIT\t\tDSTATE\t\tSTATE\na.service\tlaunched\tinactive\nb.service\tloaded\t\tinactive\nglobal.service\tlaunched\t-\n",
        "",
    );
    // no machine has them: their current state is inactive
    c.check(
        &["stop", "a.service"],
        1,
        "",
        "Unable to stop unit a.service in state inactive\n",
    );
    c.check(
        &["stop", "global"],
        0,
        "Triggered global unit global.service stop\n",
        "Successfully stopped units [].\n",
    );
    c.check(
        &["unload", "--no-block", "a.service", "b.service", "global.service"],
        0,
        "Triggered global unit global.service unload\nTriggered unit a.service unload\nTriggered unit b.service unload\n",
        "Successfully unloaded units [a.service b.service].\n",
    );
    c.check(
        &["destroy", "a.service", "nosuch", "b"],
        0,
        "Destroyed a.service\nDestroyed b.service\n",
        "",
    );
    c.check(
        &["destroy", "a.service"],
        0,
        "",
        "Units not found in registry\n",
    );
    c.check(
        &["list-unit-files", "--no-legend", "--fields=unit"],
        0,
        "global.service\n",
        "",
    );
    c.check(
        &["destroy", "global.service", "--no-block"],
        0,
        "Destroyed global.service\n",
        "",
    );
    c.check(
        &["list-unit-files"],
        0,
        "UNIT\tHASH\tDSTATE\tSTATE\tTARGET\n",
        "",
    );
}

#[test]
fn requirements_are_validated_on_submit() {
    let c = Cluster::start();
    c.write(
        "bad.service",
        "[Service]\nExecStart=/bin/true\n\n[X-Fleet]\nGlobal=true\nMachineOf=abcd\n",
    );
    c.check(
        &["submit", "bad.service"],
        1,
        "",
        "Error creating units: unit bad.service: Global cannot be used with MachineOf\n",
    );
    c.write(
        "once.service",
        "[Service]\nExecStart=/bin/true\n\n[X-Fleet]\nAtMostOnce=maybe\n",
    );
    c.check(
        &["submit", "once.service"],
        1,
        "",
        "Error creating units: unit once.service: [X-Fleet] AtMostOnce value \"maybe\" is not a boolean: use true or false\n",
    );
    c.write(
        "odd.service",
        "[Service]\nExecStart=/bin/true\n\n[X-Fleet]\nBogus=1\n",
    );
    let out = c.run(&["submit", "odd.service"]);
    assert_eq!(
        (out.code, out.stdout.as_str()),
        (0, "Unit odd.service inactive\n"),
        "{out:?}"
    );
    assert!(
        out.stderr.contains("WARN")
            && out.stderr.contains(
                "Unit odd.service: unrecognized requirement in [X-Fleet] section: \"Bogus\""
            ),
        "{out:?}"
    );
    c.write("bad name.service", SLEEP);
    c.check(
        &["submit", "bad name.service"],
        1,
        "",
        "Error creating units: invalid character ' ' in unit name\n",
    );
    c.write("garbage.service", "[Service\nExecStart=/bin/true\n");
    c.check(
        &["submit", "garbage.service"],
        1,
        "",
        "Error creating units: failed getting Unit(garbage.service) from file: unable to find end of section\n",
    );
}
