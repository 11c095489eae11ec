//! Our discovery document against the structure of fleet's `schema/v1.json` (a fixture in
//! this repository): the same ids, paths, methods, parameters, schemas and property names, and
//! a description in the same places; the description texts are our own.

use fleet_api::DISCOVERY_JSON;
use serde_json::Value;

/// fleet v1.0's `schema/v1.json` with every description emptied: its structure (ids, paths,
/// methods, parameters, schemas, property names and types), which is fact, without its prose.
/// Made with: `git show v1.0.0:schema/v1.json`, each string-valued "description" set to "".
const FLEET_STRUCTURE: &str = include_str!("fixtures/fleet-v1-discovery-structure.json");

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
    let fleets: Value =
        serde_json::from_str(FLEET_STRUCTURE).expect("the fixture of fleet's document is JSON");
    let ours: Value = serde_json::from_str(DISCOVERY_JSON).expect("ours is JSON");
    assert_eq!(without_descriptions(&ours), without_descriptions(&fleets));
    let (mut a, mut b) = (Vec::new(), Vec::new());
    descriptions(&ours, &mut a);
    descriptions(&fleets, &mut b);
    assert_eq!(a.len(), b.len(), "the same places carry a description");
}
