//! PUT validation of hostile unit bodies, through the real server and a private etcd: the
//! work is bounded (400 naming the limit), and options that would change when the stored
//! text is read back are refused, with nothing written.

mod common;

use std::time::Instant;

use common::Harness;
use fleet_api::ApiConfig;
use fleet_registry::Registry;
use serde_json::json;

fn put_body(options: &[(&str, &str, String)]) -> String {
    let options: Vec<_> = options
        .iter()
        .map(|(s, n, v)| json!({"section": s, "name": n, "value": v}))
        .collect();
    json!({"desiredState": "launched", "options": options}).to_string()
}

/// The PUT of the security review (~250 MachineOf and ~250 `Conflicts=*aaa…b` values of
/// ~2,000 characters), which kept both runtime workers busy for minutes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_requirements_are_refused_at_once() {
    let h = Harness::start(ApiConfig::default()).await;
    let a = "a".repeat(1990);
    let mut options = vec![("Service", "ExecStart", "/bin/true".to_string())];
    for _ in 0..250 {
        options.push(("X-Fleet", "MachineOf", a.clone()));
        options.push(("X-Fleet", "Conflicts", format!("*{}b", &a[1..])));
    }
    let body = put_body(&options);
    let start = Instant::now();
    let r = h.put("/fleet/v1/units/hostile.service", &body).await;
    eprintln!(
        "hostile PUT of {} bytes answered {} in {:?}",
        body.len(),
        r.status,
        start.elapsed()
    );
    assert_eq!(
        (r.status, r.error_message()),
        (
            400,
            "[X-Fleet] section exceeds 65536 bytes after specifier expansion".into()
        )
    );
    // within the section limit, but too many pairs
    let mut options = vec![("Service", "ExecStart", "/bin/true".to_string())];
    for _ in 0..33 {
        options.push(("X-Fleet", "MachineOf", "aaaa".into()));
        options.push(("X-Fleet", "Conflicts", "*b".into()));
    }
    let r = h
        .put("/fleet/v1/units/pairs.service", &put_body(&options))
        .await;
    assert_eq!(
        (r.status, r.error_message()),
        (400, "[X-Fleet] requirements too large to check: 33 MachineOf values x 33 Conflicts and Replaces patterns exceed 1024 pairs".into())
    );
    assert!(h.reg().units().await.expect("units").is_empty());
}

/// Every other component parses the stored text, not the options the API was given: a line
/// break must not smuggle in an `[X-Fleet]` section that was never validated.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn values_that_change_when_read_back_are_refused() {
    let h = Harness::start(ApiConfig::default()).await;
    let cases: &[(&str, &str, &str, &str)] = &[
        (
            "Service",
            "ExecStart",
            "x\n[X-Fleet]\nGlobal=true",
            "option \"ExecStart\" in section \"Service\" changes when the unit file is read back: a line break in a value must follow a backslash",
        ),
        (
            "Service",
            "ExecStart",
            "x\nMachineID=abc",
            "option \"ExecStart\" in section \"Service\" changes when the unit file is read back: a line break in a value must follow a backslash",
        ),
        (
            "Service",
            "ExecStart",
            "/bin/true \\",
            "option \"ExecStart\" in section \"Service\" changes when the unit file is read back: values cannot end with a backslash",
        ),
        (
            "Service]\n[X-Fleet",
            "Global",
            "true",
            "option \"Global\" in section \"Service]\\n[X-Fleet\" changes when the unit file is read back: section names cannot contain line breaks or ']'",
        ),
    ];
    for (section, name, value, message) in cases {
        let body = put_body(&[
            (section, name, value.to_string()),
            ("Service", "ExecStop", "/bin/true".into()),
        ]);
        let r = h.put("/fleet/v1/units/smuggle.service", &body).await;
        assert_eq!(
            (r.status, r.error_message()),
            (400, message.to_string()),
            "{value:?}"
        );
        let r = h.get("/fleet/v1/units/smuggle.service").await;
        assert_eq!(r.status, 404, "nothing written for {value:?}");
    }
    assert!(h.reg().units().await.expect("units").is_empty());
    // a continuation as fleetctl sends it (backslash, line break) is fine and stored as given
    let body = put_body(&[("Service", "ExecStart", "/bin/echo \\\n  hi".into())]);
    let r = h.put("/fleet/v1/units/multi.service", &body).await;
    assert_eq!(r.status, 201, "{r:?}");
    let r = h.get("/fleet/v1/units/multi.service").await;
    assert_eq!(r.json()["options"][0]["value"], "/bin/echo \\\n  hi");
}
