//! Our discovery document against fleet's `schema/v1.json`: the same structure, ids, paths,
//! methods, parameters, schemas and property names; only the "description" texts differ
//! (they are ours, as the document must not be copied).

use std::path::Path;
use std::process::Command;

use fleet_api::DISCOVERY_JSON;
use serde_json::Value;

const FLEET_REPO: &str = "/work/.mirror/coreos+fleet/repo";

/// The value with every string-valued "description" member removed.
fn without_descriptions(v: &Value) -> Value {
    match v {
        Value::Object(map) => Value::Object(
            map.iter()
                .filter(|(k, v)| !(k.as_str() == "description" && v.is_string()))
                .map(|(k, v)| (k.clone(), without_descriptions(v)))
                .collect(),
        ),
        Value::Array(items) => Value::Array(items.iter().map(without_descriptions).collect()),
        other => other.clone(),
    }
}

/// Every "description" string of a document, to check that ours are our own words.
fn descriptions(v: &Value, out: &mut Vec<String>) {
    match v {
        Value::Object(map) => {
            for (k, v) in map {
                match v {
                    Value::String(s) if k == "description" => out.push(s.clone()),
                    _ => descriptions(v, out),
                }
            }
        }
        Value::Array(items) => items.iter().for_each(|i| descriptions(i, out)),
        _ => {}
    }
}

#[test]
fn ours_is_wellformed() {
    let ours: Value = serde_json::from_str(DISCOVERY_JSON).expect("our discovery document is JSON");
    assert_eq!(ours["kind"], "discovery#restDescription");
    assert_eq!(ours["basePath"], "/fleet/v1/");
    let methods: Vec<&str> = ["Machines", "Units", "UnitState"]
        .iter()
        .flat_map(|r| {
            ours["resources"][r]["methods"]
                .as_object()
                .into_iter()
                .flat_map(|m| m.values())
        })
        .filter_map(|m| m["id"].as_str())
        .collect();
    assert_eq!(methods.len(), 7, "{methods:?}");
}

#[test]
fn same_structure_as_fleets() {
    if !Path::new(FLEET_REPO).exists() {
        println!(
            "note: {FLEET_REPO} is not here; structural comparison with fleet's schema/v1.json skipped"
        );
        return;
    }
    let out = Command::new("git")
        .args(["--git-dir", FLEET_REPO, "show", "HEAD:schema/v1.json"])
        .output()
        .expect("run git");
    assert!(
        out.status.success(),
        "git show failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let fleets: Value =
        serde_json::from_slice(&out.stdout).expect("fleet's discovery document is JSON");
    let ours: Value = serde_json::from_str(DISCOVERY_JSON).expect("ours is JSON");
    assert_eq!(without_descriptions(&ours), without_descriptions(&fleets));
    let (mut a, mut b) = (Vec::new(), Vec::new());
    descriptions(&ours, &mut a);
    descriptions(&fleets, &mut b);
    assert_eq!(a.len(), b.len(), "the same places carry a description");
    for (mine, theirs) in a.iter().zip(&b) {
        assert!(
            theirs.is_empty() || mine != theirs,
            "description copied from fleet: {mine:?}"
        );
    }
}
