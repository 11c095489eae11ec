//! PUT validation of hostile unit bodies, through the real server and a private etcd: the
//! work is bounded (400 naming the limit), and options that would change when the stored
//! text is read back are refused, with nothing written.

mod common;

use std::time::Instant;

use common::Harness;
use fleet_api::ApiConfig;
use fleet_registry::Registry;
use fleet_unit::{TargetState, UnitFile, UnitName};
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
        (400, "[X-Fleet] section exceeds 65536 bytes".into())
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

/// Many short values, within every limit: the PUT reaches the matching of MachineOf values
/// against Conflicts patterns (1,024 pairs of 100 characters), and gets its answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requirements_within_the_limits_are_matched() {
    let h = Harness::start(ApiConfig::default()).await;
    let a = "a".repeat(100);
    let unit = |last_peer: String| {
        let mut options = vec![("Service", "ExecStart", "/bin/true".to_string())];
        for _ in 0..31 {
            options.push(("X-Fleet", "MachineOf", a.clone()));
        }
        options.push(("X-Fleet", "MachineOf", last_peer));
        for _ in 0..32 {
            options.push(("X-Fleet", "Conflicts", format!("*{}b", &a[2..])));
        }
        put_body(&options)
    };
    let r = h
        .put("/fleet/v1/units/apart.service", &unit(a.clone()))
        .await;
    assert_eq!(r.status, 201, "{r:?}");
    // only the last pair matches
    let peer = format!("{}b", &a[1..]);
    let r = h
        .put("/fleet/v1/units/clash.service", &unit(peer.clone()))
        .await;
    assert_eq!(
        (r.status, r.error_message()),
        (
            400,
            format!(
                "unresolvable requirements: peer \"{peer}\" matches conflict \"*{}b\"",
                &a[2..]
            )
        )
    );
    // patterns without MachineOf: matched by the scheduler against every unit, so counted
    let patterns = |n: usize| {
        let mut options = vec![("Service", "ExecStart", "/bin/true".to_string())];
        options.extend((0..n).map(|i| ("X-Fleet", "Conflicts", format!("c{i}-*.service"))));
        put_body(&options)
    };
    let r = h.put("/fleet/v1/units/many.service", &patterns(256)).await;
    assert_eq!(r.status, 201, "{r:?}");
    let r = h.put("/fleet/v1/units/more.service", &patterns(257)).await;
    assert_eq!(
        (r.status, r.error_message()),
        (
            400,
            "[X-Fleet] 257 Conflicts and Replaces patterns exceed 256".into()
        )
    );
    let names: Vec<String> = h
        .reg()
        .units()
        .await
        .expect("units")
        .iter()
        .map(|u| u.name.to_string())
        .collect();
    assert_eq!(names, ["apart.service", "many.service"]);
}

/// fleet v1.0 created names of 256 bytes, one more than systemd loads (and than a PUT may
/// create now): such a unit already in etcd can still be read and destroyed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn units_with_fleet_v1_names_can_be_destroyed() {
    let h = Harness::start(ApiConfig::default()).await;
    let long = format!("{}.service", "a".repeat(248));
    let name = UnitName::parse_stored(&long).expect("fleet v1.0 name");
    let file = UnitFile::parse("[Service]\nExecStart=/bin/true\n").expect("unit");
    h.reg()
        .create_unit(&name, &file, TargetState::Launched)
        .await
        .expect("stored as fleet v1.0 did");
    let path = format!("/fleet/v1/units/{long}");
    let r = h.get(&path).await;
    assert_eq!((r.status, r.json()["name"].clone()), (200, json!(long)));
    let r = h.get("/fleet/v1/units").await;
    assert_eq!(r.json()["units"][0]["name"], json!(long));
    // it cannot be created or changed
    let body = json!({"desiredState": "inactive"}).to_string();
    let r = h.put(&path, &body).await;
    assert_eq!(
        (r.status, r.error_message()),
        (400, "unit name exceeds maximum length (255)".into())
    );
    let r = h.send("DELETE", &path, None, "").await;
    assert_eq!(r.status, 204, "{r:?}");
    let r = h.get(&path).await;
    assert_eq!(r.status, 404);
    assert!(h.reg().units().await.expect("units").is_empty());
    // longer than fleet v1.0 ever stored: no such unit
    let r = h
        .send("DELETE", &format!("/fleet/v1/units/a{long}"), None, "")
        .await;
    assert_eq!(
        (r.status, r.error_message()),
        (404, "unit does not exist".into())
    );
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
