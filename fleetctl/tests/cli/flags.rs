//! Version, help, completions, environment and global flags; the API driver answering like the etcd driver; TLS flags; import-v1.

use std::process::Command;

use fleet_unit::{TargetState, UnitFile};

use crate::support::*;

#[test]
fn version_help_completion_and_env() {
    let c = Cluster::start();
    let version = format!("fleetctl version {}\n", env!("CARGO_PKG_VERSION"));
    c.check(&["version"], 0, &version, "");
    c.check(&["--version"], 0, &version, "");
    c.check(&["-v"], 0, &version, "");
    c.check(
        &["verify", "x.service"],
        2,
        "",
        "Command \"verify\" is deprecated, DEPRECATED - No longer works\nWARNING: The signed/verified units feature is DEPRECATED and cannot be used.\n",
    );
    c.check(
        &["submit", "--sign", "x.service"],
        2,
        "",
        "WARNING: The signed/verified units feature is DEPRECATED and cannot be used.\n",
    );

    let help = c.run(&["help"]);
    assert_eq!(help.code, 0, "{help:?}");
    for cmd in [
        "list-unit-files",
        "list-machines",
        "submit",
        "journal",
        "ssh",
        "completion",
    ] {
        assert!(
            help.stdout.contains(cmd),
            "help lacks {cmd}: {}",
            help.stdout
        );
    }
    assert!(
        !help.stdout.contains("verify"),
        "deprecated command listed: {}",
        help.stdout
    );
    let bash = c.run(&["completion", "bash"]);
    assert_eq!(bash.code, 0);
    assert!(
        bash.stdout.contains("list-unit-files") && bash.stdout.contains("--block-attempts"),
        "{}",
        bash.stdout
    );

    // a reader that went away (`| head -1`) ends the script quietly, without a panic
    let closed = Command::new("bash")
        .args([
            "-c",
            "set -o pipefail; { sleep 0.3; \"$0\" completion bash; } | true",
            env!("CARGO_BIN_EXE_fleetctl"),
        ])
        .output()
        .expect("run bash");
    assert!(
        closed.status.success() && closed.stderr.is_empty(),
        "{closed:?}"
    );

    // prefixes of commands work, as with fleet's cobra
    c.check(&["list-m", "--no-legend"], 0, "", "");

    // the FLEETCTL_* environment instead of flags; empty variables count as unset
    c.write("a.service", SLEEP);
    let out = Command::new(env!("CARGO_BIN_EXE_fleetctl"))
        .current_dir(c.dir.path())
        .env("FLEETCTL_DRIVER", "etcd")
        .env("FLEETCTL_ENDPOINT", c.etcd.endpoint())
        .env("FLEETCTL_REQUEST_TIMEOUT", "")
        .env("FLEETCTL_TUNNEL", "")
        .args(["submit", "a.service"])
        .output()
        .expect("run");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "Unit a.service inactive\n",
        "{out:?}"
    );
    // a different key prefix is a different cluster
    c.check(
        &[
            "--etcd-key-prefix=/other/",
            "list-unit-files",
            "--no-legend",
        ],
        0,
        "",
        "",
    );
    c.check(
        &["list-unit-files", "--no-legend", "--fields=unit"],
        0,
        "a.service\n",
        "",
    );
    c.check(
        &["--driver=zk", "list-units"],
        1,
        "",
        "Unable to initialize client: unrecognized driver \"zk\"\n",
    );
}

#[test]
fn api_driver_answers_like_the_etcd_driver() {
    let c = Cluster::start();
    let endpoint = c.serve_api();
    c.add_machine(M1, "172.17.8.103", &[("role", "web")]);
    c.write("hello.service", HELLO);
    let api = |args: &[&str]| c.run_with(&c.driver_flags("api", &endpoint), args).parts();
    let same = |args: &[&str]| {
        let via_etcd = c.run(args);
        assert_eq!(
            api(args),
            (via_etcd.code, via_etcd.stdout, via_etcd.stderr),
            "fleetctl {args:?}"
        );
    };
    assert_eq!(
        api(&["submit", "hello.service"]),
        (
            0,
            "Unit hello.service inactive\n".to_string(),
            String::new()
        )
    );
    same(&["cat", "hello.service"]);
    same(&["cat", "nosuch.service"]);
    same(&["list-unit-files"]);
    same(&[
        "list-unit-files",
        "--full",
        "--fields=unit,hash,desc,global",
    ]);
    same(&["list-machines", "-l"]);
    same(&["submit", "hello.service"]);
    same(&["submit", "nosuch.service"]);
    assert_eq!(
        api(&["start", "--no-block", "hello"]),
        (
            0,
            "Triggered unit hello.service start\n".to_string(),
            String::new()
        )
    );
    same(&["list-unit-files", "--fields=unit,dstate,state"]);
    c.publish(
        "hello.service",
        M1,
        &hash_of(HELLO).to_string(),
        "active",
        "running",
        TargetState::Launched,
    );
    same(&["list-units"]);
    assert_eq!(
        api(&["destroy", "hello"]),
        (0, "Destroyed hello.service\n".to_string(), String::new())
    );
    same(&["list-unit-files"]);
    // nothing listening: fleet's advice names the socket
    let out = c
        .bare_command()
        .args(["--endpoint=unix:///nonexistent/fleet.sock", "list-units"])
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stdout).is_empty());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.starts_with("Error retrieving list of units from repository: "),
        "{stderr}"
    );
}

/// fleet's deprecated `--etcd-cafile`, `--etcd-certfile` and `--etcd-keyfile` set the same TLS
/// files as `--ca-file` and friends, for the API driver too: a CA file that cannot be read
/// stops an https endpoint before anything is sent.
#[test]
fn deprecated_tls_flags_reach_the_api_driver() {
    let c = Cluster::start();
    let port = fleet_testutil::free_port();
    for flag in ["--etcd-cafile", "--ca-file"] {
        let out = c
            .bare_command()
            .args([
                "--driver=api",
                &format!("--endpoint=https://127.0.0.1:{port}"),
                &format!("{flag}=/nonexistent/ca.pem"),
                "list-machines",
            ])
            .output()
            .expect("run");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{flag}: {stderr}");
        assert!(
            stderr.contains("/nonexistent/ca.pem"),
            "{flag}: the CA file was not used: {stderr}"
        );
    }
}

#[test]
fn import_v1_says_what_it_could_not_import() {
    let c = Cluster::start_with(&["--enable-v2=true"]);
    let ep = c.etcd.endpoint().to_string();
    c.check(
        &["import-v1"],
        1,
        "",
        &format!("no fleet v1.0 registry under /_coreos.com/fleet/ at {ep}\n"),
    );
    c.check(
        &["import-v1", "--v1-endpoint=https://127.0.0.1:1"],
        1,
        "",
        "cannot read fleet v1.0's registry: https://127.0.0.1:1: only http endpoints are supported for fleet v1.0's registry\n",
    );
    // one unit as fleet v1.0 wrote it, and one whose object is damaged
    let file = UnitFile::parse(SLEEP).expect("unit");
    let bytes: Vec<String> = file.hash().as_bytes().iter().map(u8::to_string).collect();
    let raw = serde_json::json!({ "Raw": SLEEP }).to_string();
    v2_put(&ep, &format!("unit/{}", file.hash()), &raw);
    v2_put(
        &ep,
        "job/sleep.service/object",
        &format!(
            r#"{{"Name":"sleep.service","UnitHash":[{}]}}"#,
            bytes.join(",")
        ),
    );
    v2_put(&ep, "job/sleep.service/target-state", "launched");
    v2_put(&ep, "job/sleep.service/target", M1);
    v2_put(&ep, "job/broken.service/object", "{");
    // the first endpoint that answers is used
    let endpoints = format!("--v1-endpoint=http://127.0.0.1:1,{ep}");
    c.check(
        &["import-v1", &endpoints],
        1,
        &format!("imported sleep.service (launched on {M1})\nimported: 1, already there: 0, skipped: 1, errors: 0\n"),
        "skipped job/broken.service/object: not a fleet v1.0 job record: EOF while parsing an object at line 1 column 1\n\
         not everything was imported: fix or remove the records named above, then run import-v1 again\n",
    );
    c.check(
        &[
            "list-unit-files",
            "--no-legend",
            "--fields=unit,dstate,target",
        ],
        0,
        &format!("sleep.service\tlaunched\t{}...\n", &M1[..8]),
        "",
    );
    c.check(
        &["import-v1", "--dry-run", "--v1-endpoint", &ep],
        1,
        "already there: sleep.service\nwould import: 0, already there: 1, skipped: 1, errors: 0\n",
        "skipped job/broken.service/object: not a fleet v1.0 job record: EOF while parsing an object at line 1 column 1\n\
         not everything was imported: fix or remove the records named above, then run import-v1 again\n",
    );
}
