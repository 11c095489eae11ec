//! Tests of `import-v1`: fleet v1.0's records decoded one by one (the unreadable ones named
//! by key and skipped whole), and imports into a real etcd seeded through its v2 API.

use std::time::Duration;

use fleet_registry::{EtcdRegistry, Registry};
use fleet_testutil::EtcdServer;

use super::*;

const PREFIX: &str = fleet_registry::DEFAULT_KEY_PREFIX;

const HELLO: &str = "[Unit]\nDescription=hello\n\n[Service]\nExecStart=/bin/sleep 1000\n";
const GLOBAL: &str = "[Service]\nExecStart=/bin/sleep 1000\n\n[X-Fleet]\nGlobal=true\n";

/// `unit/<sha1>` and its value, as fleet v1.0's `storeOrGetUnitFile` wrote them.
fn v1_body(text: &str) -> (String, String) {
    let file = UnitFile::parse(text).expect("unit");
    let raw = serde_json::json!({ "Raw": file.serialize() }).to_string();
    (format!("unit/{}", file.hash()), raw)
}

/// `job/<name>/object`'s value as fleet v1.0's `CreateUnit` wrote it (a Go `[20]byte` is a
/// JSON array of numbers).
fn v1_object(name: &str, text: &str) -> String {
    let file = UnitFile::parse(text).expect("unit");
    serde_json::json!({ "Name": name, "UnitHash": file.hash().as_bytes().to_vec() }).to_string()
}

/// A flat v2 tree (the reader only walks directories and looks at leaves' full keys).
fn tree(records: &[(&str, &str)]) -> V2Node {
    V2Node {
        key: "/_coreos.com/fleet".into(),
        dir: true,
        value: None,
        nodes: records
            .iter()
            .map(|(k, v)| V2Node {
                key: format!("{PREFIX}{k}"),
                dir: false,
                value: Some(v.to_string()),
                nodes: vec![],
            })
            .collect(),
    }
}

/// A well-formed launched hello.service on machine m1, plus `extra` records.
fn hello_with(extra: &[(&str, &str)]) -> V1Registry {
    let (bk, bv) = v1_body(HELLO);
    let obj = v1_object("hello.service", HELLO);
    let mut recs: Vec<(&str, &str)> = vec![
        (bk.as_str(), bv.as_str()),
        ("job/hello.service/object", obj.as_str()),
        ("job/hello.service/target-state", "launched"),
        ("job/hello.service/target", "m1"),
    ];
    recs.extend_from_slice(extra);
    read_v1(&tree(&recs), PREFIX)
}

#[test]
fn reads_a_launched_unit_with_its_machine() {
    let v1 = hello_with(&[]);
    assert_eq!(v1.skipped, vec![]);
    assert_eq!(v1.units.len(), 1);
    let u = &v1.units[0];
    assert_eq!(u.name.as_str(), "hello.service");
    assert_eq!(u.desired, TargetState::Launched);
    assert_eq!(u.machine.as_deref(), Some("m1"));
    assert!(!u.global);
    assert_eq!(u.file.serialize(), HELLO);
}

#[test]
fn reads_global_units_templates_and_metadata() {
    let (gk, gv) = v1_body(GLOBAL);
    let gobj = v1_object("g.service", GLOBAL);
    let tobj = v1_object("t@.service", HELLO);
    let v1 = hello_with(&[
        (gk.as_str(), gv.as_str()),
        ("job/g.service/object", gobj.as_str()),
        ("job/g.service/target-state", "launched"),
        ("job/t@.service/object", tobj.as_str()),
        ("job/t@.service/target-state", "inactive"),
        ("machines/m1/object", r#"{"ID":"m1","PublicIP":"10.0.0.1"}"#),
        ("machines/m1/metadata/region", "east"),
        ("states/hello.service/m1", "{}"),
        ("job/hello.service/job-state", "launched"),
    ]);
    assert_eq!(v1.skipped, vec![]);
    let names: Vec<&str> = v1.units.iter().map(|u| u.name.as_str()).collect();
    assert_eq!(names, ["g.service", "hello.service", "t@.service"]);
    assert!(v1.units[0].global);
    assert_eq!(scheduled_on(&v1.units[0]), None);
    assert_eq!(scheduled_on(&v1.units[1]), Some("m1"));
    assert_eq!(scheduled_on(&v1.units[2]), None);
    assert_eq!(
        v1.metadata.get(&("m1".to_string(), "region".to_string())),
        Some(&"east".to_string())
    );
}

/// Each broken record: the key reported, nothing of that unit read.
/// Extra v2 records, the key reported as skipped, and a part of the reason.
type Case<'a> = (Vec<(&'a str, &'a str)>, &'a str, &'a str);

#[test]
fn unreadable_records_are_skipped_by_key() {
    let (bk, _) = v1_body(HELLO);
    let other = v1_object("other.service", HELLO);
    let short = r#"{"Name":"x.service","UnitHash":[1,2,3]}"#;
    let table: Vec<Case> = vec![
        (
            vec![("job/x.service/object", "{not json")],
            "job/x.service/object",
            "not a fleet v1.0 job record",
        ),
        (
            vec![
                ("job/x.service/object", short),
                ("job/x.service/target-state", "launched"),
            ],
            "job/x.service/object",
            "UnitHash is not 20 bytes",
        ),
        (
            vec![
                ("job/x.service/object", other.as_str()),
                ("job/x.service/target-state", "launched"),
            ],
            "job/x.service/object",
            "names another unit",
        ),
        (
            vec![("job/x.service/target-state", "launched")],
            "job/x.service/object",
            "missing",
        ),
        (
            vec![("job/bad name/object", "{}")],
            "job/bad name",
            "invalid unit name",
        ),
    ];
    for (extra, key, reason) in table {
        let v1 = hello_with(&extra);
        assert_eq!(v1.units.len(), 1, "{key}: only hello.service is read");
        assert_eq!(v1.skipped.len(), 1, "{key}: {:?}", v1.skipped);
        assert_eq!(v1.skipped[0].key, key);
        assert!(
            v1.skipped[0].reason.contains(reason),
            "{key}: {}",
            v1.skipped[0].reason
        );
    }
    // the hello.service records themselves broken
    let table: Vec<(&str, &str, &str, &str)> = vec![
        (
            "job/hello.service/target-state",
            "running",
            "job/hello.service/target-state",
            "invalid target state",
        ),
        (
            "job/hello.service/target",
            "m 1",
            "job/hello.service/target",
            "invalid machine ID",
        ),
        (
            bk.as_str(),
            "{\"Raw\":",
            bk.as_str(),
            "not a fleet v1.0 unit record",
        ),
        (
            bk.as_str(),
            r#"{"Raw":"[Service]\nExecStart=/bin/true\n[X-Fleet]\nMachineOf=a.service\nConflicts=a.service\n"}"#,
            "job/hello.service/object",
            "unit file not accepted",
        ),
    ];
    for (k, v, key, reason) in table {
        let (bk2, bv2) = v1_body(HELLO);
        let obj = v1_object("hello.service", HELLO);
        let mut recs: Vec<(&str, &str)> = vec![
            (bk2.as_str(), bv2.as_str()),
            ("job/hello.service/object", obj.as_str()),
            ("job/hello.service/target-state", "launched"),
            ("job/hello.service/target", "m1"),
        ];
        recs.retain(|(rk, _)| *rk != k);
        recs.push((k, v));
        let v1 = read_v1(&tree(&recs), PREFIX);
        assert_eq!(v1.units, vec![], "{key}");
        assert_eq!(v1.skipped.len(), 1, "{key}: {:?}", v1.skipped);
        assert_eq!(v1.skipped[0].key, key);
        assert!(
            v1.skipped[0].reason.contains(reason),
            "{key}: {}",
            v1.skipped[0].reason
        );
    }
    // the body missing altogether
    let obj = v1_object("hello.service", HELLO);
    let v1 = read_v1(
        &tree(&[
            ("job/hello.service/object", obj.as_str()),
            ("job/hello.service/target-state", "launched"),
        ]),
        PREFIX,
    );
    assert_eq!(v1.units, vec![]);
    assert_eq!(v1.skipped[0].key, "job/hello.service/object");
    assert!(v1.skipped[0].reason.contains("is missing"));
    // an empty metadata value: fleet v1.0's way of removing a configured key
    let v1 = hello_with(&[("machines/m1/metadata/region", "")]);
    assert!(v1.metadata.is_empty());
    assert_eq!(v1.skipped[0].key, "machines/m1/metadata/region");
}

/// A metadata record is imported only with a machine ID, a key the API would take, and a
/// value of bounded size; the others are named and skipped.
#[test]
fn odd_metadata_records_are_skipped() {
    let long = "x".repeat(4097);
    let long_key = format!("machines/m1/metadata/{}", "k".repeat(256));
    for (key, value, reason) in [
        ("machines/m 1/metadata/region", "east", "not a machine ID"),
        ("machines/m1%2f/metadata/region", "east", "not a machine ID"),
        ("machines/m1/metadata/re gion", "east", "not a metadata key"),
        ("machines/m1/metadata/région", "east", "not a metadata key"),
        (long_key.as_str(), "east", "not a metadata key"),
        ("machines/m1/metadata/region", long.as_str(), "4097 bytes"),
    ] {
        let v1 = hello_with(&[(key, value)]);
        assert!(v1.metadata.is_empty(), "{key}");
        assert_eq!(v1.skipped.len(), 1, "{key}");
        assert_eq!(v1.skipped[0].key, key);
        assert!(
            v1.skipped[0].reason.contains(reason),
            "{key}: {}",
            v1.skipped[0].reason
        );
    }
    let v1 = hello_with(&[("machines/m-1_a/metadata/a.b-c_d", &"v".repeat(4096))]);
    assert_eq!(v1.skipped, vec![]);
    assert_eq!(v1.metadata.len(), 1);
}

#[test]
fn paths_and_forms_are_encoded() {
    assert_eq!(encode_path("/_coreos.com/fleet"), "/_coreos.com/fleet");
    assert_eq!(encode_path("/a b/c?"), "/a%20b/c%3F");
    assert_eq!(encode_form("a=b&c\n"), "a%3Db%26c%0A");
}

/// Writes one v2 key as fleet v1.0's etcd client did (`PUT /v2/keys/<key>`, form `value=`).
async fn v2_put(endpoint: &str, key: &str, value: &str) {
    let path = format!("/v2/keys{}", encode_path(&format!("{PREFIX}{key}")));
    let (status, body) = v2_request(
        endpoint,
        "PUT",
        &path,
        Some(format!("value={}", encode_form(value))),
    )
    .await
    .expect("v2 put");
    assert!(
        status == 200 || status == 201,
        "{status}: {}",
        String::from_utf8_lossy(&body)
    );
}

async fn registry(etcd: &EtcdServer) -> EtcdRegistry {
    fleet_testutil::fixture::connect(etcd, PREFIX, Duration::from_secs(3)).await
}

/// The plan only, nothing written.
const DRY_RUN: Options = Options {
    dry_run: true,
    replace: false,
};

async fn get(reg: &EtcdRegistry, key: &str) -> Option<String> {
    let mut kv = reg.client().kv_client();
    let r = kv.get(key, None).await.expect("get");
    r.kvs()
        .first()
        .map(|kv| String::from_utf8_lossy(kv.value()).into_owned())
}

async fn seed(endpoint: &str, broken: bool) {
    for (name, text, state, target) in [
        ("hello.service", HELLO, "launched", Some("m1")),
        ("g.service", GLOBAL, "launched", None),
        ("t@.service", HELLO, "inactive", None),
        ("t@1.service", HELLO, "loaded", Some("m2")),
    ] {
        let (bk, bv) = v1_body(text);
        v2_put(endpoint, &bk, &bv).await;
        v2_put(
            endpoint,
            &format!("job/{name}/object"),
            &v1_object(name, text),
        )
        .await;
        v2_put(endpoint, &format!("job/{name}/target-state"), state).await;
        if let Some(m) = target {
            v2_put(endpoint, &format!("job/{name}/target"), m).await;
        }
    }
    v2_put(endpoint, "machines/m1/metadata/region", "east").await;
    if broken {
        v2_put(endpoint, "job/broken.service/object", "{\"Name\":").await;
        v2_put(endpoint, "job/broken.service/target-state", "launched").await;
    }
}

#[tokio::test(flavor = "current_thread")]
async fn imports_what_fleet_v1_wrote_and_is_idempotent() {
    let etcd = EtcdServer::start_with(&["--enable-v2=true"]);
    let ep = etcd.endpoint().to_string();
    seed(&ep, true).await;
    let tree = fetch_tree(&ep, PREFIX, Duration::from_secs(10))
        .await
        .expect("fetch")
        .expect("tree");
    let v1 = read_v1(&tree, PREFIX);
    let reg = registry(&etcd).await;
    let keys = reg.keys().clone();

    // dry run: the plan, nothing written
    let dry = import(&reg, &v1, DRY_RUN).await.expect("dry run");
    assert_eq!(
        dry.summary(true),
        "would import: 5, already there: 0, skipped: 1, errors: 0"
    );
    assert!(
        dry.out
            .contains(&"would import hello.service (launched on m1)".to_string())
    );
    assert_eq!(
        dry.err,
        vec!["skipped job/broken.service/object: not a fleet v1.0 job record: EOF while parsing a value at line 1 column 8".to_string()]
    );
    assert!(reg.units().await.expect("units").is_empty());

    let first = import(&reg, &v1, Options::default()).await.expect("import");
    assert_eq!(
        first.summary(false),
        "imported: 5, already there: 0, skipped: 1, errors: 0"
    );
    let units = reg.units().await.expect("units");
    let view: Vec<(String, TargetState, Option<String>, bool)> = units
        .iter()
        .map(|u| {
            (
                u.name.to_string(),
                u.desired,
                u.machine_id.clone(),
                u.global,
            )
        })
        .collect();
    assert_eq!(
        view,
        vec![
            ("g.service".into(), TargetState::Launched, None, true),
            (
                "hello.service".into(),
                TargetState::Launched,
                Some("m1".into()),
                false
            ),
            ("t@.service".into(), TargetState::Inactive, None, false),
            (
                "t@1.service".into(),
                TargetState::Loaded,
                Some("m2".into()),
                false
            ),
        ]
    );
    let hello = UnitFile::parse(HELLO).expect("unit");
    assert_eq!(
        get(&reg, &keys.body(&hello.hash().to_string()))
            .await
            .as_deref(),
        Some(HELLO)
    );
    let sched: ScheduleRecord = serde_json::from_str(
        &get(&reg, &keys.schedule("m1", "hello.service"))
            .await
            .expect("schedule"),
    )
    .expect("record");
    assert_eq!(sched.hash, hello.hash());
    assert_eq!(sched.desired_state, TargetState::Launched);
    assert!(get(&reg, &keys.global("g.service")).await.is_some());
    assert_eq!(
        get(&reg, &keys.metadata("m1", "region")).await.as_deref(),
        Some("east")
    );
    assert!(get(&reg, &keys.unit("broken.service")).await.is_none());

    // again: everything already there
    let again = import(&reg, &v1, Options::default()).await.expect("again");
    assert_eq!(
        again.summary(false),
        "imported: 0, already there: 5, skipped: 1, errors: 0"
    );

    // a unit changed here since: left alone and reported, unless --replace
    reg.set_desired_state(
        &UnitName::parse("hello.service").expect("n"),
        TargetState::Loaded,
    )
    .await
    .expect("set state");
    let kept = import(&reg, &v1, Options::default()).await.expect("kept");
    assert_eq!(
        kept.summary(false),
        "imported: 0, already there: 4, skipped: 2, errors: 0"
    );
    assert!(kept.err.contains(
        &"skipped hello.service: present with different content or state (--replace overwrites it)"
            .to_string()
    ));
    let replaced = import(
        &reg,
        &v1,
        Options {
            dry_run: false,
            replace: true,
        },
    )
    .await
    .expect("replace");
    assert_eq!(
        replaced.summary(false),
        "imported: 1, already there: 4, skipped: 1, errors: 0"
    );
    assert!(
        replaced
            .out
            .contains(&"replaced hello.service (launched on m1)".to_string())
    );
    let u = reg
        .unit(&UnitName::parse("hello.service").expect("n"))
        .await
        .expect("unit")
        .expect("present");
    assert_eq!(u.desired, TargetState::Launched);
}

#[tokio::test(flavor = "current_thread")]
async fn a_missing_registry_is_none() {
    let etcd = EtcdServer::start_with(&["--enable-v2=true"]);
    let got = fetch_tree(etcd.endpoint(), PREFIX, Duration::from_secs(10))
        .await
        .expect("fetch");
    assert!(got.is_none());
}

/// An import into a registry some fleetd already uses warns (and still imports): that
/// fleetd's engine may move the units before their machines register.
#[tokio::test(flavor = "current_thread")]
async fn warns_when_a_fleetd_already_uses_the_registry() {
    let etcd = EtcdServer::start_with(&["--enable-v2=true"]);
    let reg = registry(&etcd).await;
    let keys = reg.keys().clone();
    let v1 = hello_with(&[]);
    let quiet = import(&reg, &v1, DRY_RUN).await.expect("dry run");
    assert_eq!(quiet.err, Vec::<String>::new());
    let mut kv = reg.client().kv_client();
    kv.put(keys.machine("m9"), "{}", None).await.expect("put");
    kv.put(keys.leader(), "m9", None).await.expect("put");
    let warned = import(&reg, &v1, Options::default()).await.expect("import");
    assert_eq!(warned.err.len(), 1, "{:?}", warned.err);
    assert!(
        warned.err[0].starts_with("warning: this registry already has 1 machine(s) registered and an engine leader: its engine may move imported units"),
        "{}",
        warned.err[0]
    );
    assert_eq!(
        warned.summary(false),
        "imported: 1, already there: 0, skipped: 0, errors: 0"
    );
}
