//! API v1 against the real server over a real socket, with a private etcd behind it: every
//! status code, fleet's messages, pagination, machine metadata, unit states, discovery.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::Harness;
use fleet_api::{ApiConfig, DISCOVERY_JSON, PageToken};
use fleet_registry::{EngineOp, MachineRecord, Registry, StateRecord};
use fleet_testutil::{eventually, records};
use fleet_unit::{TargetState, UnitName};

const HELLO: &str = r#"{"desiredState":"launched","options":[{"section":"Service","name":"ExecStart","value":"/bin/sleep 100"}]}"#;

fn machine(id: &str, ip: &str) -> MachineRecord {
    MachineRecord {
        public_ip: ip.into(),
        metadata: BTreeMap::from([("region".into(), "east".into())]),
        ..records::machine(id)
    }
}

fn state(unit: &str, machine: &str) -> StateRecord {
    records::state(unit, machine, "1c6fb6f3684bafb0c173d8b8b957ceff031180c1")
}

/// (status, method, path, content type, body, expected error message)
type Case<'a> = (
    u16,
    &'a str,
    String,
    Option<&'a str>,
    String,
    Option<&'a str>,
);

/// Expected (status, message) of error responses; `None` message: a success status.
async fn expect(
    h: &Harness,
    method: &str,
    path: &str,
    ct: Option<&str>,
    body: &str,
    status: u16,
    message: Option<&str>,
) {
    let r = h.send(method, path, ct, body).await;
    assert_eq!(r.status, status, "{method} {path} {body}: {r:?}");
    if let Some(m) = message {
        assert_eq!(r.error_message(), m, "{method} {path} {body}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn units_create_modify_get_destroy() {
    let h = Harness::start(ApiConfig::default()).await;
    let u = "/fleet/v1/units";
    let json = Some("application/json");

    let r = h.get(&format!("{u}?alt=json")).await;
    assert_eq!((r.status, r.body.as_str()), (200, "{}"));
    assert_eq!(r.header("server"), Some("fleetd/1.0.0"));
    assert_eq!(r.header("content-type"), Some("application/json"));

    // create: 201 with no body; unknown fields ignored
    let with_extra = HELLO.replacen('{', r#"{"bogus":{"x":[1]},"currentState":"launched","#, 1);
    let r = h.put(&format!("{u}/hello.service"), &with_extra).await;
    assert_eq!((r.status, r.body.as_str()), (201, ""), "{r:?}");

    let r = h.get(&format!("{u}/hello.service?alt=json")).await;
    assert_eq!(r.status, 200);
    assert_eq!(
        r.body,
        r#"{"currentState":"inactive","desiredState":"launched","name":"hello.service","options":[{"name":"ExecStart","section":"Service","value":"/bin/sleep 100"}]}"#
    );

    // (status, method, path, content type, body, message) — in order, each on the state left by the previous
    let cases: Vec<Case> = vec![
        // same options, new desired state: an update
        (204, "PUT", format!("{u}/hello.service"), json, HELLO.replace("launched", "loaded"), None),
        // only the desired state
        (204, "PUT", format!("{u}/hello.service"), json, r#"{"desiredState":"inactive"}"#.into(), None),
        // name from the URL when the body has none; a matching one is fine
        (204, "PUT", format!("{u}/hello.service"), json, r#"{"name":"hello.service","desiredState":"loaded"}"#.into(), None),
        (400, "PUT", format!("{u}/hello.service"), json, r#"{"name":"other.service","desiredState":"loaded"}"#.into(),
            Some(r#"name in URL "hello.service" differs from unit name in request body "other.service""#)),
        (409, "PUT", format!("{u}/hello.service"), json, "{}".into(), Some("must provide DesiredState to update existing unit")),
        (400, "PUT", format!("{u}/hello.service"), json, r#"{"desiredState":"running"}"#.into(), Some(r#"invalid value "running" for JobState"#)),
        // other options under a taken name: a new version replaces the unit, as in fleet
        (201, "PUT", format!("{u}/hello.service"), json, HELLO.replace("100", "200"), None),
        // no options for a unit that does not exist
        (409, "PUT", format!("{u}/nosuch.service"), json, r#"{"desiredState":"launched"}"#.into(), Some("unit does not exist and options field empty")),
        (409, "PUT", format!("{u}/nosuch.service"), json, r#"{"desiredState":"launched","options":[]}"#.into(), Some("unit does not exist and options field empty")),
        // invalid names and bodies
        (400, "PUT", format!("{u}/bad%20name.service"), json, HELLO.into(), Some("invalid character ' ' in unit name")),
        (400, "PUT", format!("{u}/hello.bogus"), json, HELLO.into(), Some(r#"invalid unit type: "bogus""#)),
        // the longest name systemd loads is 255 bytes (fleet v1.0 also took 256, which never ran)
        (201, "PUT", format!("{u}/{}.service", "a".repeat(247)), json, HELLO.into(), None),
        (204, "DELETE", format!("{u}/{}.service", "a".repeat(247)), None, String::new(), None),
        (400, "PUT", format!("{u}/{}.service", "a".repeat(248)), json, HELLO.into(), Some("unit name exceeds maximum length (255)")),
        (400, "PUT", format!("{u}/x.service"), json, "{not json".into(), None),
        (400, "PUT", format!("{u}/x.service"), json, r#"{"options":"nope"}"#.into(), None),
        (400, "PUT", format!("{u}/x.service"), json,
            r#"{"desiredState":"launched","options":[{"section":"X-Fleet","name":"MachineID","value":"abc"},{"section":"X-Fleet","name":"Global","value":"true"}]}"#.into(),
            Some("MachineID cannot be used with Global")),
        // ours (not in fleet v1.0): AtMostOnce, refused like fleet's own checks
        (400, "PUT", format!("{u}/x.service"), json,
            r#"{"desiredState":"launched","options":[{"section":"X-Fleet","name":"AtMostOnce","value":"maybe"}]}"#.into(),
            Some(r#"[X-Fleet] AtMostOnce value "maybe" is not a boolean: use true or false"#)),
        // a template's value may name its instance: checked per instance
        (201, "PUT", format!("{u}/once@.service"), json,
            r#"{"desiredState":"inactive","options":[{"section":"X-Fleet","name":"AtMostOnce","value":"%i"}]}"#.into(),
            None),
        (400, "PUT", format!("{u}/x.service"), json,
            format!(r#"{{"desiredState":"launched","options":[{{"section":"Service","name":"ExecStart","value":"{}"}}]}}"#, "a".repeat(3000)),
            Some("line too long (max 2048 bytes)")),
        // templates can be submitted but never loaded or launched
        (400, "PUT", format!("{u}/web@.service"), json, HELLO.into(), Some(r#"cannot activate template "web@.service""#)),
        (201, "PUT", format!("{u}/web@.service"), json, HELLO.replace("launched", "inactive"), None),
        (400, "PUT", format!("{u}/web@.service"), json, r#"{"desiredState":"loaded"}"#.into(), Some(r#"cannot activate template "web@.service""#)),
        // an instance without options is not filled from its template (fleetctl does that)
        (409, "PUT", format!("{u}/web@1.service"), json, r#"{"desiredState":"launched"}"#.into(), Some("unit does not exist and options field empty")),
        // a desired state is optional on create: inactive
        (201, "PUT", format!("{u}/quiet.service"), json, HELLO.replace(r#""desiredState":"launched","#, ""), None),
        // content type: fleet v1.0 answers 415
        (415, "PUT", format!("{u}/y.service"), None, HELLO.into(), Some("expected 1 Content-Type, got 0")),
        (415, "PUT", format!("{u}/y.service"), Some("text/plain"), HELLO.into(), Some("only acceptable Content-Type is application/json")),
        (201, "PUT", format!("{u}/y.service"), Some("application/json; charset=utf-8"), HELLO.into(), None),
        // methods and paths
        (405, "POST", u.to_string(), json, "{}".into(), Some("only GET supported against this resource")),
        (405, "PATCH", format!("{u}/hello.service"), json, "{}".into(), Some("only GET, PUT and DELETE supported against this resource")),
        (404, "GET", format!("{u}/a/b"), None, String::new(), Some("")),
        (404, "GET", format!("{u}/"), None, String::new(), Some("")),
        (404, "GET", format!("{u}/nosuch.service"), None, String::new(), Some("unit does not exist")),
        (404, "GET", format!("{u}/not%20a%20name"), None, String::new(), None),
        (405, "GET", "/fleet/v1".into(), None, String::new(), Some("")),
        (405, "GET", "/".into(), None, String::new(), Some("")),
        (404, "GET", "/nothing/here".into(), None, String::new(), Some("")),
        (200, "GET", "/v1-alpha/units/hello.service".into(), None, String::new(), None),
        // destroy
        (204, "DELETE", format!("{u}/hello.service"), None, String::new(), None),
        (404, "DELETE", format!("{u}/hello.service"), None, String::new(), Some("unit does not exist")),
        (404, "GET", format!("{u}/hello.service"), None, String::new(), Some("unit does not exist")),
    ];
    for (status, method, path, ct, body, message) in cases {
        expect(&h, method, &path, ct, &body, status, message).await;
    }
    let quiet = h
        .reg()
        .unit(&UnitName::parse("quiet.service").expect("name"))
        .await
        .expect("read")
        .expect("exists");
    assert_eq!(quiet.desired, TargetState::Inactive);
    let bad = h.put(&format!("{u}/x.service"), "{not json").await;
    assert!(
        bad.error_message().starts_with("unable to decode body: "),
        "{bad:?}"
    );
    h.stop().await.expect("clean shutdown");
}

/// A PUT with other options for an existing unit replaces it (fleet v1.0 overwrote the job;
/// its fleetctl sends exactly that for `start|load|submit --replace`: name and options, no
/// desired state). A refused replacement leaves the old version alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replace_with_other_options_as_fleetctl_replace_sends() {
    let h = Harness::start(ApiConfig::default()).await;
    let u = "/fleet/v1/units";
    let opts = |exec: &str, extra: &str| {
        format!(r#"[{{"section":"Service","name":"ExecStart","value":"{exec}"}}{extra}]"#)
    };
    let global = r#",{"section":"X-Fleet","name":"Global","value":"true"}"#;
    let bad = r#",{"section":"X-Fleet","name":"MachineID","value":"abc"},{"section":"X-Fleet","name":"Global","value":"true"}"#;
    // (unit, first body, second body, status of the second PUT, then: desired state, ExecStart, global)
    let cases: Vec<(&str, String, String, u16, &str, &str, bool)> = vec![
        // what fleetctl --replace sends: the new options, no desired state -> inactive
        (
            "a.service",
            format!(
                r#"{{"desiredState":"launched","options":{}}}"#,
                opts("/bin/sleep 1", "")
            ),
            format!(
                r#"{{"name":"a.service","options":{}}}"#,
                opts("/bin/sleep 2", "")
            ),
            201,
            "inactive",
            "/bin/sleep 2",
            false,
        ),
        // with a desired state, the new version gets it
        (
            "b.service",
            format!(
                r#"{{"desiredState":"loaded","options":{}}}"#,
                opts("/bin/sleep 1", "")
            ),
            format!(
                r#"{{"desiredState":"launched","options":{}}}"#,
                opts("/bin/sleep 2", "")
            ),
            201,
            "launched",
            "/bin/sleep 2",
            false,
        ),
        // a global unit replaced by a scheduled one, and the other way round
        (
            "c.service",
            format!(
                r#"{{"desiredState":"launched","options":{}}}"#,
                opts("/bin/sleep 1", global)
            ),
            format!(
                r#"{{"desiredState":"launched","options":{}}}"#,
                opts("/bin/sleep 2", "")
            ),
            201,
            "launched",
            "/bin/sleep 2",
            false,
        ),
        (
            "d.service",
            format!(
                r#"{{"desiredState":"launched","options":{}}}"#,
                opts("/bin/sleep 1", "")
            ),
            format!(
                r#"{{"desiredState":"launched","options":{}}}"#,
                opts("/bin/sleep 2", global)
            ),
            201,
            "launched",
            "/bin/sleep 2",
            true,
        ),
        // the same options: no replacement, just the desired state
        (
            "e.service",
            format!(
                r#"{{"desiredState":"launched","options":{}}}"#,
                opts("/bin/sleep 1", "")
            ),
            format!(
                r#"{{"desiredState":"loaded","options":{}}}"#,
                opts("/bin/sleep 1", "")
            ),
            204,
            "loaded",
            "/bin/sleep 1",
            false,
        ),
        // refused replacements keep the old version
        (
            "f.service",
            format!(
                r#"{{"desiredState":"launched","options":{}}}"#,
                opts("/bin/sleep 1", "")
            ),
            format!(
                r#"{{"desiredState":"launched","options":{}}}"#,
                opts("/bin/sleep 2", bad)
            ),
            400,
            "launched",
            "/bin/sleep 1",
            false,
        ),
        (
            "g@.service",
            format!(r#"{{"options":{}}}"#, opts("/bin/sleep 1", "")),
            format!(
                r#"{{"desiredState":"launched","options":{}}}"#,
                opts("/bin/sleep 2", "")
            ),
            400,
            "inactive",
            "/bin/sleep 1",
            false,
        ),
    ];
    for (unit, first, second, status, desired, exec, is_global) in cases {
        let path = format!("{u}/{unit}");
        let r = h.put(&path, &first).await;
        assert_eq!(r.status, 201, "{unit} create: {r:?}");
        let r = h.put(&path, &second).await;
        assert_eq!(r.status, status, "{unit} second PUT: {r:?}");
        let got = h.get(&path).await.json();
        assert_eq!(got["desiredState"].as_str(), Some(desired), "{unit}: {got}");
        assert_eq!(
            got["options"][0]["value"].as_str(),
            Some(exec),
            "{unit}: {got}"
        );
        let view = h
            .reg()
            .unit(&UnitName::parse(unit).expect("name"))
            .await
            .expect("read")
            .expect("exists");
        assert_eq!(view.global, is_global, "{unit}: {view:?}");
    }
    // the list shows each unit once, in the new version
    let list = h.get(u).await.json();
    let names: Vec<&str> = list["units"]
        .as_array()
        .expect("units")
        .iter()
        .filter_map(|x| x["name"].as_str())
        .collect();
    assert_eq!(
        names,
        [
            "a.service",
            "b.service",
            "c.service",
            "d.service",
            "e.service",
            "f.service",
            "g@.service"
        ]
    );
    h.stop().await.expect("clean shutdown");
}

/// Replacing a placed unit is one etcd transaction over the same key (never a delete then a
/// create, which the engine would see as the unit going away): the unit keeps its machine.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replacing_a_placed_unit_is_one_write_and_keeps_its_machine() {
    let h = Harness::start(ApiConfig::default()).await;
    let reg = h.reg();
    let path = "/fleet/v1/units/a.service";
    assert_eq!(h.put(path, HELLO).await.status, 201);
    let a = UnitName::parse("a.service").expect("name");
    let hash = reg.unit(&a).await.expect("read").expect("a").hash;
    let leadership = reg
        .campaign("m1", Duration::from_secs(10))
        .await
        .expect("campaign")
        .expect("leader");
    let op = EngineOp::Schedule {
        unit: "a.service".into(),
        machine: "m1".into(),
        hash,
        desired: TargetState::Launched,
    };
    reg.apply(&leadership, std::slice::from_ref(&op))
        .await
        .expect("schedule");
    let key = reg.keys().unit("a.service");
    let mut kv = reg.client().kv_client();
    let before = kv.get(key.as_str(), None).await.expect("get");
    let created = before.kvs()[0].create_revision();
    let rev = before.header().expect("header").revision();

    let r = h.put(path, &HELLO.replace("100", "200")).await;
    assert_eq!(r.status, 201, "{r:?}");
    let after = kv.get(key.as_str(), None).await.expect("get");
    assert_eq!(
        after.kvs()[0].create_revision(),
        created,
        "same key, not re-created"
    );
    assert_eq!(
        after.header().expect("header").revision(),
        rev + 1,
        "one transaction"
    );
    let got = h.get(path).await.json();
    assert_eq!(got["machineID"].as_str(), Some("m1"), "{got}");
    assert_eq!(got["desiredState"].as_str(), Some("launched"), "{got}");
    assert_eq!(
        got["options"][0]["value"].as_str(),
        Some("/bin/sleep 200"),
        "{got}"
    );
    h.stop().await.expect("clean shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn placement_reason_and_global_units_as_fleet_shows_them() {
    let h = Harness::start(ApiConfig::default()).await;
    let reg = h.reg();
    let global = r#"{"desiredState":"launched","options":[{"section":"Service","name":"ExecStart","value":"/bin/true"},{"section":"X-Fleet","name":"Global","value":"true"}]}"#;
    assert_eq!(h.put("/fleet/v1/units/g.service", global).await.status, 201);
    assert_eq!(h.put("/fleet/v1/units/a.service", HELLO).await.status, 201);
    assert_eq!(h.put("/fleet/v1/units/b.service", HELLO).await.status, 201);

    let leadership = reg
        .campaign("m1", Duration::from_secs(10))
        .await
        .expect("campaign")
        .expect("leader");
    let hash = reg
        .unit(&UnitName::parse("a.service").expect("name"))
        .await
        .expect("read")
        .expect("a")
        .hash;
    let lease = reg
        .register_machine(&machine("m1", "10.0.0.1"), Duration::from_secs(30))
        .await
        .expect("register");
    reg.apply(
        &leadership,
        &[
            EngineOp::Schedule {
                unit: "a.service".into(),
                machine: "m1".into(),
                hash,
                desired: TargetState::Launched,
            },
            EngineOp::SetReason {
                unit: "b.service".into(),
                reason: "no machine satisfies MachineMetadata".into(),
            },
        ],
    )
    .await
    .expect("engine writes");
    reg.publish_state("a.service", "m1", Some(&state("a.service", "m1")), &lease)
        .await
        .expect("publish");

    let a = h.get("/fleet/v1/units/a.service").await.json();
    assert_eq!(
        (a["machineID"].as_str(), a["currentState"].as_str()),
        (Some("m1"), Some("launched")),
        "{a}"
    );
    assert!(a.get("reason").is_none(), "{a}");
    let b = h.get("/fleet/v1/units/b.service").await.json();
    assert_eq!(
        b["reason"].as_str(),
        Some("no machine satisfies MachineMetadata"),
        "{b}"
    );
    assert_eq!(b["currentState"].as_str(), Some("inactive"));
    assert!(b.get("machineID").is_none(), "{b}");
    // global units: no machine, no current state
    let g = h.get("/fleet/v1/units/g.service").await.json();
    assert!(
        g.get("currentState").is_none() && g.get("machineID").is_none(),
        "{g}"
    );
    h.stop().await.expect("clean shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pagination_with_token_limit_2() {
    let h = Harness::start(ApiConfig {
        token_limit: 2,
        ..ApiConfig::default()
    })
    .await;
    let reg = h.reg();
    for i in 1..=5 {
        assert_eq!(
            h.put(&format!("/fleet/v1/units/u{i}.service"), HELLO)
                .await
                .status,
            201
        );
    }
    let mut leases = Vec::new();
    for i in 1..=3 {
        let id = format!("m{i}");
        leases.push(
            reg.register_machine(&machine(&id, "10.0.0.1"), Duration::from_secs(30))
                .await
                .expect("register"),
        );
        for u in ["a.service", "b.service"] {
            reg.publish_state(u, &id, Some(&state(u, &id)), &leases[i - 1])
                .await
                .expect("publish");
        }
    }

    // walk a list: (collection key, names per page)
    async fn walk(h: &Harness, path: &str, key: &str, id: &str) -> Vec<Vec<String>> {
        let mut pages = Vec::new();
        let mut token = String::new();
        for _ in 0..10 {
            let sep = if path.contains('?') { '&' } else { '?' };
            let url = if token.is_empty() {
                path.to_string()
            } else {
                format!("{path}{sep}nextPageToken={token}")
            };
            let r = h.get(&url).await;
            assert_eq!(r.status, 200, "{url}: {r:?}");
            let v = r.json();
            let names = v[key]
                .as_array()
                .map(|a| {
                    a.iter()
                        .map(|i| i[id].as_str().unwrap_or("").to_string())
                        .collect()
                })
                .unwrap_or_default();
            pages.push(names);
            match v["nextPageToken"].as_str() {
                Some(t) => token = t.to_string(),
                None => return pages,
            }
        }
        panic!("more than 10 pages at {path}");
    }
    let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
    assert_eq!(
        walk(&h, "/fleet/v1/units", "units", "name").await,
        vec![
            s(&["u1.service", "u2.service"]),
            s(&["u3.service", "u4.service"]),
            s(&["u5.service"])
        ]
    );
    // a full last page points at an empty one, as in fleet
    assert_eq!(
        walk(&h, "/fleet/v1/machines", "machines", "id").await,
        vec![s(&["m1", "m2"]), s(&["m3"])]
    );
    let states = walk(&h, "/fleet/v1/state?alt=json", "states", "machineID").await;
    assert_eq!(
        states,
        vec![s(&["m1", "m2"]), s(&["m3", "m1"]), s(&["m2", "m3"]), s(&[])]
    );
    let filtered = walk(
        &h,
        "/fleet/v1/state?unitName=b.service&machineID=m2",
        "states",
        "name",
    )
    .await;
    assert_eq!(filtered, vec![s(&["b.service"])]);
    let by_machine = walk(&h, "/fleet/v1/state?machineID=m3", "states", "name").await;
    assert_eq!(by_machine, vec![s(&["a.service", "b.service"]), s(&[])]);

    let other_limit = PageToken::new(100, 2).encode();
    let zero = PageToken::new(2, 0).encode();
    let good = PageToken::new(2, 2).encode();
    for resource in ["units", "machines", "state"] {
        let cases = [
            (
                format!("nextPageToken={other_limit}"),
                "token limit must be 2",
            ),
            (
                format!("nextPageToken={zero}"),
                "token page must be greater than zero",
            ),
            (
                format!("nextPageToken={good}&nextPageToken={good}"),
                "too many values for page token",
            ),
            (
                "nextPageToken=%21%21%21%21".to_string(),
                "illegal base64 data at input byte 0",
            ),
        ];
        for (query, message) in cases {
            let r = h.get(&format!("/fleet/v1/{resource}?{query}")).await;
            assert_eq!(r.status, 400, "{resource}?{query}");
            assert_eq!(r.error_message(), message, "{resource}?{query}");
        }
    }
    let r = h.get("/fleet/v1/state/a.service").await;
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["systemdSubState"].as_str(), Some("running"));
    let r = h.get("/fleet/v1/state/nosuch.service").await;
    assert_eq!(
        (r.status, r.error_message().as_str()),
        (404, "unit state does not exist")
    );
    let r = h.send("DELETE", "/fleet/v1/state", None, "").await;
    assert_eq!(
        (r.status, r.error_message().as_str()),
        (405, "only GET supported against this resource")
    );
    h.stop().await.expect("clean shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn machine_metadata_patch() {
    let h = Harness::start(ApiConfig::default()).await;
    let reg = h.reg();
    let lease = reg
        .register_machine(&machine("m1", "10.0.0.1"), Duration::from_secs(30))
        .await
        .expect("register");

    let r = h.get("/fleet/v1/machines?alt=json").await;
    assert_eq!(
        r.body,
        r#"{"machines":[{"id":"m1","metadata":{"region":"east"},"primaryIP":"10.0.0.1"}]}"#
    );

    // fleet v1.0's value form and the documented one; replace; a machine not registered yet
    let body = r#"[
        {"op":"add","path":"/m1/metadata/disk","value":{"value":"ssd"}},
        {"op":"add","path":"/m1/metadata/rack","value":"r1"},
        {"op":"replace","path":"/m1/metadata/region","value":"west"},
        {"op":"add","path":"/m9/metadata/role","value":"db"}
    ]"#;
    let r = h.patch(body).await;
    assert_eq!((r.status, r.body.as_str()), (204, ""), "{r:?}");
    let r = h.get("/fleet/v1/machines").await;
    assert_eq!(
        r.json()["machines"][0]["metadata"],
        serde_json::json!({"disk":"ssd","rack":"r1","region":"west"})
    );

    assert_eq!(
        h.patch(r#"[{"op":"remove","path":"/m1/metadata/rack"}]"#)
            .await
            .status,
        204
    );
    let md = |v: serde_json::Value| v["machines"][0]["metadata"].clone();
    assert_eq!(
        md(h.get("/fleet/v1/machines").await.json()),
        serde_json::json!({"disk":"ssd","region":"west"})
    );

    // metadata set through the API survives the machine leaving and rejoining, and applies to
    // a machine that registers later
    reg.withdraw_machine("m1", lease).await;
    assert!(
        eventually(Duration::from_secs(5), || async {
            h.get("/fleet/v1/machines").await.body == "{}"
        })
        .await
    );
    let _l1 = reg
        .register_machine(&machine("m1", "10.0.0.1"), Duration::from_secs(30))
        .await
        .expect("rejoin");
    let _l9 = reg
        .register_machine(&machine("m9", "10.0.0.9"), Duration::from_secs(30))
        .await
        .expect("join");
    let v = h.get("/fleet/v1/machines").await.json();
    assert_eq!(
        v["machines"][0]["metadata"],
        serde_json::json!({"disk":"ssd","region":"west"})
    );
    assert_eq!(
        v["machines"][1]["metadata"],
        serde_json::json!({"region":"east","role":"db"})
    );

    let cases: &[(&str, &str)] = &[
        (
            r#"[{"op":"move","path":"/m1/metadata/a","value":"v"}]"#,
            "invalid op: expect add, remove, or replace",
        ),
        (
            r#"[{"path":"/m1/metadata/a","value":"v"}]"#,
            "invalid op: expect add, remove, or replace",
        ),
        (
            r#"[{"op":"add","path":"/m1/foo","value":"v"}]"#,
            "machine metadata path invalid",
        ),
        (
            r#"[{"op":"add","path":"/m1/metadata/a/b","value":"v"}]"#,
            "machine metadata path invalid",
        ),
        (
            r#"[{"op":"add","path":"/m1/metadata/sp ace","value":"v"}]"#,
            "machine metadata path invalid",
        ),
        (
            r#"[{"op":"add","path":"m1/metadata/a","value":"v"}]"#,
            "machine metadata path invalid",
        ),
        (
            r#"[{"op":"add","path":"/m1/metadata/a"}]"#,
            "invalid value: add and replace require a value",
        ),
        (
            r#"[{"op":"replace","path":"/m1/metadata/a","value":""}]"#,
            "invalid value: add and replace require a value",
        ),
        (
            r#"[{"op":"add","path":"/m1/metadata/a","value":{"value":""}}]"#,
            "invalid value: add and replace require a value",
        ),
        (
            r#"[{"op":"add","path":"/m1/metadata/a","value":7}]"#,
            "invalid value: expected a string, got 7",
        ),
        // validated before anything is applied: the first op must not land
        (
            r#"[{"op":"add","path":"/m1/metadata/first","value":"v"},{"op":"bogus","path":"/m1/metadata/a","value":"v"}]"#,
            "invalid op: expect add, remove, or replace",
        ),
    ];
    for (body, message) in cases {
        let r = h.patch(body).await;
        assert_eq!(r.status, 400, "{body}");
        assert_eq!(r.error_message(), *message, "{body}");
    }
    assert!(
        md(h.get("/fleet/v1/machines").await.json())
            .get("first")
            .is_none()
    );
    for body in ["{not json", r#"{"op":"add"}"#, "[1]"] {
        assert_eq!(h.patch(body).await.status, 400, "{body}");
    }
    // fleet v1.0 took a PATCH whatever its Content-Type (only unit PUTs were checked)
    let ops = r#"[{"op":"add","path":"/m1/metadata/a","value":"v"}]"#;
    for ct in [None, Some("text/plain")] {
        expect(&h, "PATCH", "/fleet/v1/machines", ct, ops, 204, None).await;
    }
    expect(
        &h,
        "PUT",
        "/fleet/v1/machines",
        Some("application/json"),
        ops,
        405,
        Some("only GET and PATCH supported against this resource"),
    )
    .await;
    expect(&h, "GET", "/fleet/v1/machines/m1", None, "", 404, Some("")).await;
    h.stop().await.expect("clean shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn discovery_and_metrics() {
    let h = Harness::start(ApiConfig::default()).await;
    let r = h.get("/fleet/v1/discovery").await;
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-type"), Some("application/json"));
    assert_eq!(r.body, DISCOVERY_JSON);
    let doc = r.json();
    assert_eq!(doc["id"], "fleet:v1");
    assert_eq!(
        doc["resources"]["Units"]["methods"]["Set"]["httpMethod"],
        "PUT"
    );
    let r = h
        .send(
            "POST",
            "/fleet/v1/discovery",
            Some("application/json"),
            "{}",
        )
        .await;
    assert_eq!(
        (r.status, r.error_message().as_str()),
        (400, "only HTTP GET supported against this resource")
    );

    let r = h.get("/metrics").await;
    assert_eq!(r.status, 200);
    assert!(
        r.header("content-type")
            .is_some_and(|c| c.starts_with("application/openmetrics-text")),
        "{r:?}"
    );
    assert!(
        r.body
            .contains("fleet_api_requests_total{method=\"GET\",code=\"200\"}"),
        "{}",
        r.body
    );
    assert!(
        r.body
            .contains("# TYPE fleet_engine_reconcile_count counter"),
        "{}",
        r.body
    );
    h.stop().await.expect("clean shutdown");
}

/// `If-None-Match: *` on a unit PUT (our fleetctl's create): 201 for a new unit, 412 for an
/// existing one, which stays exactly as it was, also when the options are the same (without
/// the header fleet's rule applies: an identical PUT sets the desired state).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_only_put_leaves_an_existing_unit_alone() {
    let h = Harness::start(ApiConfig::default()).await;
    let path = "/fleet/v1/units/once.service";
    let put_new = async |body: &str| {
        let mut raw = common::request("PUT", path, Some("application/json"), body);
        let at = raw
            .windows(2)
            .position(|w| w == b"\r\n")
            .expect("request line")
            + 2;
        raw.splice(at..at, b"If-None-Match: *\r\n".iter().copied());
        common::send(h.addr, &raw).await
    };
    let inactive = HELLO.replace("launched", "inactive");
    let r = put_new(&inactive).await;
    assert_eq!(r.status, 201, "{r:?}");
    let r = h.put(path, r#"{"desiredState":"launched"}"#).await;
    assert_eq!(r.status, 204, "{r:?}");
    for body in [inactive.clone(), HELLO.replace("100", "300")] {
        let r = put_new(&body).await;
        assert_eq!(
            (r.status, r.error_message()),
            (412, "unit already exists".into()),
            "{r:?}"
        );
    }
    let r = h.get(path).await;
    assert!(
        r.body.contains(r#""desiredState":"launched""#) && r.body.contains("/bin/sleep 100"),
        "{r:?}"
    );
}

/// A create-only PUT of a new unit with its desired state (what our fleetctl sends for each
/// unit it starts) costs fleetd one etcd transaction and no read; one refused because the
/// unit exists costs the same, and leaves it as it was.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_only_put_is_one_etcd_transaction() {
    let etcd = fleet_testutil::EtcdServer::start();
    let metrics = fleet_metrics::Metrics::new();
    let reg = fleet_testutil::fixture::connect(&etcd, "/test/", std::time::Duration::from_secs(3))
        .await
        .with_metrics(metrics.clone());
    let h = Harness::with_registry(std::sync::Arc::new(reg.clone()), ApiConfig::default()).await;
    let put_new = async |body: &str| {
        let path = "/fleet/v1/units/once.service";
        let mut raw = common::request("PUT", path, Some("application/json"), body);
        let at = raw
            .windows(2)
            .position(|w| w == b"\r\n")
            .expect("request line")
            + 2;
        raw.splice(at..at, b"If-None-Match: *\r\n".iter().copied());
        common::send(h.addr, &raw).await
    };
    let ops = |kind: &str| {
        let line = format!("fleet_registry_operation_count_total{{type=\"{kind}\"}} ");
        metrics
            .encode()
            .lines()
            .find_map(|l| l.strip_prefix(line.as_str()).map(str::to_string))
            .unwrap_or_else(|| "0".into())
    };
    let r = put_new(HELLO).await;
    assert_eq!(r.status, 201, "{r:?}");
    assert_eq!(
        (ops("set"), ops("get"), ops("get_all")),
        ("1".into(), "0".into(), "0".into())
    );
    let r = put_new(&HELLO.replace("launched", "inactive")).await;
    assert_eq!(r.status, 412, "{r:?}");
    assert_eq!(
        (ops("set"), ops("get"), ops("get_all")),
        ("2".into(), "0".into(), "0".into())
    );
    let unit = reg
        .unit(&"once.service".parse().expect("name"))
        .await
        .expect("read")
        .expect("created");
    assert_eq!(unit.desired, TargetState::Launched);
    h.stop().await.expect("clean shutdown");
}
