//! The JSON entities of fleet's API v1, kept apart from the domain types.
//!
//! Field names, field order and omission rules follow fleet's generated Go types, so what we
//! send is what fleet sent: every field is left out when empty, fields appear in the order
//! fleet's encoder wrote them, and `null` reads as empty. Unknown fields are ignored on input.
//! The one addition is `reason` on [`Unit`], which old clients never look at.

use std::collections::BTreeMap;

use serde::{Deserialize, Deserializer, Serialize};

/// Response header by which our fleetd says that a unit's PUT with `If-None-Match: *` only
/// creates (412 when the unit exists). fleet v1.0's fleetd ignored that request header, and
/// set the state of (or overwrote) a unit that was there: a client that creates without
/// looking first does so only once it has seen this header.
pub const CREATE_ONLY_HEADER: &str = "x-fleet-create-only";

/// Reads `null` (and absence, with `#[serde(default)]`) as the type's empty value, as Go did.
fn nullable<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: Default + Deserialize<'de>,
{
    Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
}

/// One `Name=Value` line of a unit file and the section it belongs to.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct UnitOption {
    #[serde(
        default,
        deserialize_with = "nullable",
        skip_serializing_if = "String::is_empty"
    )]
    pub name: String,
    #[serde(
        default,
        deserialize_with = "nullable",
        skip_serializing_if = "String::is_empty"
    )]
    pub section: String,
    #[serde(
        default,
        deserialize_with = "nullable",
        skip_serializing_if = "String::is_empty"
    )]
    pub value: String,
}

/// A unit: what the user asked for (`options`, `desiredState`) and where it stands.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Unit {
    #[serde(
        default,
        deserialize_with = "nullable",
        skip_serializing_if = "String::is_empty"
    )]
    pub current_state: String,
    #[serde(
        default,
        deserialize_with = "nullable",
        skip_serializing_if = "String::is_empty"
    )]
    pub desired_state: String,
    #[serde(
        rename = "machineID",
        default,
        deserialize_with = "nullable",
        skip_serializing_if = "String::is_empty"
    )]
    pub machine_id: String,
    #[serde(
        default,
        deserialize_with = "nullable",
        skip_serializing_if = "String::is_empty"
    )]
    pub name: String,
    #[serde(
        default,
        deserialize_with = "nullable",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub options: Vec<UnitOption>,
    /// Why the scheduler cannot place the unit now. Not part of fleet's schema: an extension
    /// that clients which do not know it ignore.
    #[serde(
        default,
        deserialize_with = "nullable",
        skip_serializing_if = "String::is_empty"
    )]
    pub reason: String,
}

/// One page of units.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct UnitPage {
    #[serde(
        default,
        deserialize_with = "nullable",
        skip_serializing_if = "String::is_empty"
    )]
    pub next_page_token: String,
    #[serde(
        default,
        deserialize_with = "nullable",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub units: Vec<Unit>,
}

/// What one machine's systemd says about one unit.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct UnitState {
    #[serde(
        default,
        deserialize_with = "nullable",
        skip_serializing_if = "String::is_empty"
    )]
    pub hash: String,
    #[serde(
        rename = "machineID",
        default,
        deserialize_with = "nullable",
        skip_serializing_if = "String::is_empty"
    )]
    pub machine_id: String,
    #[serde(
        default,
        deserialize_with = "nullable",
        skip_serializing_if = "String::is_empty"
    )]
    pub name: String,
    #[serde(
        default,
        deserialize_with = "nullable",
        skip_serializing_if = "String::is_empty"
    )]
    pub systemd_active_state: String,
    #[serde(
        default,
        deserialize_with = "nullable",
        skip_serializing_if = "String::is_empty"
    )]
    pub systemd_load_state: String,
    #[serde(
        default,
        deserialize_with = "nullable",
        skip_serializing_if = "String::is_empty"
    )]
    pub systemd_sub_state: String,
}

/// One page of unit states.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct UnitStatePage {
    #[serde(
        default,
        deserialize_with = "nullable",
        skip_serializing_if = "String::is_empty"
    )]
    pub next_page_token: String,
    #[serde(
        default,
        deserialize_with = "nullable",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub states: Vec<UnitState>,
}

/// A machine of the cluster.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Machine {
    #[serde(
        default,
        deserialize_with = "nullable",
        skip_serializing_if = "String::is_empty"
    )]
    pub id: String,
    #[serde(
        default,
        deserialize_with = "nullable",
        skip_serializing_if = "BTreeMap::is_empty"
    )]
    pub metadata: BTreeMap<String, String>,
    #[serde(
        rename = "primaryIP",
        default,
        deserialize_with = "nullable",
        skip_serializing_if = "String::is_empty"
    )]
    pub primary_ip: String,
}

/// One page of machines.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MachinePage {
    #[serde(
        default,
        deserialize_with = "nullable",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub machines: Vec<Machine>,
    #[serde(
        default,
        deserialize_with = "nullable",
        skip_serializing_if = "String::is_empty"
    )]
    pub next_page_token: String,
}

/// The body of every error response: `{"error":{"code":N,"message":"..."}}`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorResponse {
    pub error: ErrorEntity,
}

/// The status code again, and a message that is empty where fleet sent none.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorEntity {
    #[serde(default)]
    pub code: u16,
    #[serde(default, deserialize_with = "nullable")]
    pub message: String,
}

/// One JSON Patch operation of `PATCH /machines`, as sent (validated by the server).
///
/// `value` is kept raw: fleet v1.0 read `{"value": "v"}` where its documentation shows `"v"`,
/// and both are accepted (see [`MachinePatchOp::value_string`]).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct MachinePatchOp {
    #[serde(default, deserialize_with = "nullable")]
    pub op: String,
    #[serde(default, deserialize_with = "nullable")]
    pub path: String,
    #[serde(default, skip_serializing_if = "serde_json::Value::is_null")]
    pub value: serde_json::Value,
}

impl MachinePatchOp {
    /// The metadata value this operation carries: a JSON string, or fleet v1.0's object form
    /// `{"value": "v"}`; absent or null gives `""`. Any other shape is an error.
    pub fn value_string(&self) -> Result<String, String> {
        use serde_json::Value;
        match &self.value {
            Value::Null => Ok(String::new()),
            Value::String(s) => Ok(s.clone()),
            Value::Object(map) => match map.get("value") {
                None | Some(Value::Null) => Ok(String::new()),
                Some(Value::String(s)) => Ok(s.clone()),
                Some(other) => Err(format!("invalid value: expected a string, got {other}")),
            },
            other => Err(format!("invalid value: expected a string, got {other}")),
        }
    }
}

/// A unit file as the API's options, in the file's order: what the server sends and what a
/// client submits.
pub fn options_to_wire(file: &fleet_unit::UnitFile) -> Vec<UnitOption> {
    file.options()
        .iter()
        .map(|o| UnitOption {
            name: o.name.clone(),
            section: o.section.to_string(),
            value: o.value.clone(),
        })
        .collect()
}

/// The unit file the API's options describe: what the server receives and what a client
/// reads back.
pub fn options_from_wire(options: Vec<UnitOption>) -> fleet_unit::UnitFile {
    fleet_unit::UnitFile::from_options(
        options
            .into_iter()
            .map(|o| fleet_unit::UnitOption::new(o.section, o.name, o.value))
            .collect(),
    )
}

/// Serializes like Go's `encoding/json`: `<`, `>`, `&`, U+2028 and U+2029 escaped, so bodies
/// match fleet's byte for byte.
pub fn to_go_json<T: Serialize>(value: &T) -> Vec<u8> {
    // Plain structs with string keys: serialization cannot fail.
    let text = serde_json::to_string(value).unwrap_or_default();
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        match c {
            // serde's escapes, as fleet v1.0's Go wrote them: \b and \f as \u00XX (Go
            // gained the short forms only in 1.22)
            '\\' => match chars.next() {
                Some('b') => out.push_str("\\u0008"),
                Some('f') => out.push_str("\\u000c"),
                Some(next) => {
                    out.push('\\');
                    out.push(next);
                }
                None => out.push('\\'),
            },
            '<' => out.push_str("\\u003c"),
            '>' => out.push_str("\\u003e"),
            '&' => out.push_str("\\u0026"),
            '\u{2028}' => out.push_str("\\u2028"),
            '\u{2029}' => out.push_str("\\u2029"),
            c => out.push(c),
        }
    }
    out.into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check<T: Serialize>(value: &T, expected: &str) {
        assert_eq!(String::from_utf8_lossy(&to_go_json(value)), expected);
    }

    #[test]
    fn serializes_like_fleet() {
        check(&UnitPage::default(), "{}");
        check(&MachinePage::default(), "{}");
        check(&UnitStatePage::default(), "{}");
        check(
            &Unit {
                current_state: "inactive".into(),
                desired_state: "launched".into(),
                name: "a.service".into(),
                options: vec![UnitOption {
                    section: "Service".into(),
                    name: "ExecStart".into(),
                    value: String::new(),
                }],
                ..Unit::default()
            },
            r#"{"currentState":"inactive","desiredState":"launched","name":"a.service","options":[{"name":"ExecStart","section":"Service"}]}"#,
        );
        check(
            &Machine {
                id: "m1".into(),
                metadata: [("b".to_string(), "2".to_string()), ("a".into(), "1".into())].into(),
                primary_ip: "10.0.0.1".into(),
            },
            r#"{"id":"m1","metadata":{"a":"1","b":"2"},"primaryIP":"10.0.0.1"}"#,
        );
        check(
            &ErrorResponse {
                error: ErrorEntity {
                    code: 400,
                    message: "a<b & \"c\"".into(),
                },
            },
            r#"{"error":{"code":400,"message":"a\u003cb \u0026 \"c\""}}"#,
        );
        check(
            &UnitStatePage {
                next_page_token: "tok".into(),
                states: vec![UnitState {
                    name: "a.service".into(),
                    ..UnitState::default()
                }],
            },
            r#"{"nextPageToken":"tok","states":[{"name":"a.service"}]}"#,
        );
    }

    #[test]
    fn reads_nulls_and_unknown_fields() {
        let u: Unit = serde_json::from_str(
            r#"{"name":null,"options":null,"desiredState":"loaded","bogus":[1,2],"machineID":null}"#,
        )
        .expect("decodes");
        assert_eq!(
            u,
            Unit {
                desired_state: "loaded".into(),
                ..Unit::default()
            }
        );
    }

    #[test]
    fn patch_values() {
        let cases: &[(&str, Result<&str, ()>)] = &[
            (
                r#"{"op":"add","path":"/m/metadata/k","value":"v"}"#,
                Ok("v"),
            ),
            (
                r#"{"op":"add","path":"/m/metadata/k","value":{"value":"v"}}"#,
                Ok("v"),
            ),
            (r#"{"op":"remove","path":"/m/metadata/k"}"#, Ok("")),
            (r#"{"op":"add","path":"/m/metadata/k","value":{}}"#, Ok("")),
            (r#"{"op":"add","path":"/m/metadata/k","value":5}"#, Err(())),
            (
                r#"{"op":"add","path":"/m/metadata/k","value":{"value":[1]}}"#,
                Err(()),
            ),
        ];
        for (json, expected) in cases {
            let op: MachinePatchOp = serde_json::from_str(json).expect(json);
            assert_eq!(
                op.value_string().map_err(|_| ()),
                expected.map(String::from),
                "{json}"
            );
        }
    }
}
