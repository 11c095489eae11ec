//! A page of units written as JSON straight from the registry's views into the response's
//! buffer: the same bytes as [`crate::wire::to_go_json`] of the [`crate::wire::UnitPage`] that
//! `unit_to_wire` would build, without building it.
//!
//! Why: at 100,000 units a listing is 1,000 pages, and copying every unit's options into
//! wire structs, serializing them, then copying the text again to escape it as Go does, was
//! a large share of the API's time per page (most of it in the allocator).

use std::sync::Arc;

use fleet_registry::UnitView;

#[cfg(test)]
use crate::wire;

/// The JSON of a page of units (`next`: its next page token, empty when none), as fleet's
/// `UnitPage`: fields in fleet's order, each left out when empty.
pub(crate) fn units_page(next: &str, units: &[Arc<UnitView>]) -> Vec<u8> {
    // (a guess that is right for most units: one allocation per page)
    let mut out = Vec::with_capacity(64 + units.len() * 512);
    out.push(b'{');
    let mut first = true;
    field(&mut out, &mut first, "nextPageToken", next);
    if !units.is_empty() {
        key(&mut out, &mut first, "units");
        out.push(b'[');
        for (i, u) in units.iter().enumerate() {
            if i > 0 {
                out.push(b',');
            }
            unit(&mut out, u);
        }
        out.push(b']');
    }
    out.push(b'}');
    out
}

/// One unit as fleet's `Unit` (see `handlers::unit_to_wire`: `currentState` only for
/// non-global units, `machineID` whenever the unit is placed).
fn unit(out: &mut Vec<u8>, u: &UnitView) {
    out.push(b'{');
    let mut first = true;
    let current = if u.global { "" } else { u.current.as_str() };
    field(out, &mut first, "currentState", current);
    field(out, &mut first, "desiredState", u.desired.as_str());
    field(
        out,
        &mut first,
        "machineID",
        u.machine_id.as_deref().unwrap_or_default(),
    );
    field(out, &mut first, "name", u.name.as_str());
    let options = u.file.options();
    if !options.is_empty() {
        key(out, &mut first, "options");
        out.push(b'[');
        for (i, o) in options.iter().enumerate() {
            if i > 0 {
                out.push(b',');
            }
            out.push(b'{');
            let mut first = true;
            field(out, &mut first, "name", &o.name);
            field(out, &mut first, "section", o.section.as_str());
            field(out, &mut first, "value", &o.value);
            out.push(b'}');
        }
        out.push(b']');
    }
    field(
        out,
        &mut first,
        "reason",
        u.reason.as_deref().unwrap_or_default(),
    );
    out.push(b'}');
}

/// `"name":` after a comma unless it is the object's first field. `name` needs no escaping.
fn key(out: &mut Vec<u8>, first: &mut bool, name: &str) {
    if !*first {
        out.push(b',');
    }
    *first = false;
    out.push(b'"');
    out.extend_from_slice(name.as_bytes());
    out.extend_from_slice(b"\":");
}

/// A string field, left out when empty (Go's `omitempty`).
fn field(out: &mut Vec<u8>, first: &mut bool, name: &str, value: &str) {
    if value.is_empty() {
        return;
    }
    key(out, first, name);
    string(out, value);
}

/// The bytes [`string`] looks at twice: control characters, `"`, `\\`, `<`, `>`, `&`, and
/// 0xE2, which starts U+2028 and U+2029.
static SPECIAL: [bool; 256] = {
    let mut t = [false; 256];
    let mut b = 0;
    while b < 0x20 {
        t[b] = true;
        b += 1;
    }
    t[b'"' as usize] = true;
    t[b'\\' as usize] = true;
    t[b'<' as usize] = true;
    t[b'>' as usize] = true;
    t[b'&' as usize] = true;
    t[0xe2] = true;
    t
};

/// `s` as a JSON string, escaped as serde_json does and then as [`crate::wire::to_go_json`] does
/// (`<`, `>`, `&`, U+2028 and U+2029 as `\u` escapes, as Go's encoder writes them).
fn string(out: &mut Vec<u8>, s: &str) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let bytes = s.as_bytes();
    out.push(b'"');
    let mut plain = 0;
    let mut i = 0;
    while let Some(&b) = bytes.get(i) {
        if !SPECIAL[usize::from(b)] {
            // (most bytes: one look in the table)
            i += 1;
            continue;
        }
        let escape: Option<&[u8]> = match b {
            b'"' => Some(b"\\\""),
            b'\\' => Some(b"\\\\"),
            b'\n' => Some(b"\\n"),
            b'\r' => Some(b"\\r"),
            b'\t' => Some(b"\\t"),
            // (fleet v1.0's Go wrote these two as \u00XX too; Go's \b and \f came later)
            0x08 => Some(b"\\u0008"),
            0x0c => Some(b"\\u000c"),
            b'<' => Some(b"\\u003c"),
            b'>' => Some(b"\\u003e"),
            b'&' => Some(b"\\u0026"),
            _ => None,
        };
        // U+2028 and U+2029: E2 80 A8 and E2 80 A9 in UTF-8
        let separator = b == 0xe2
            && bytes.get(i + 1) == Some(&0x80)
            && matches!(bytes.get(i + 2), Some(0xa8 | 0xa9));
        if escape.is_none() && b >= 0x20 && !separator {
            i += 1;
            continue;
        }
        out.extend_from_slice(bytes.get(plain..i).unwrap_or_default());
        match escape {
            Some(e) => {
                out.extend_from_slice(e);
                i += 1;
            }
            None if separator => {
                out.extend_from_slice(if bytes.get(i + 2) == Some(&0xa8) {
                    b"\\u2028"
                } else {
                    b"\\u2029"
                });
                i += 3;
            }
            None => {
                // another control character
                out.extend_from_slice(b"\\u00");
                out.push(HEX[usize::from(b >> 4)]);
                out.push(HEX[usize::from(b & 0xf)]);
                i += 1;
            }
        }
        plain = i;
    }
    out.extend_from_slice(bytes.get(plain..).unwrap_or_default());
    out.push(b'"');
}

/// The JSON of the same page the slow way, for the tests.
#[cfg(test)]
fn units_page_slowly(next: &str, units: &[Arc<UnitView>]) -> Vec<u8> {
    wire::to_go_json(&wire::UnitPage {
        next_page_token: next.to_string(),
        units: units
            .iter()
            .map(|u| crate::handlers::unit_to_wire(u))
            .collect(),
    })
}

#[cfg(test)]
mod tests {
    use fleet_unit::{TargetState, UnitFile, UnitName, UnitOption};

    use super::*;

    fn view(name: &str, options: Vec<UnitOption>, global: bool) -> Arc<UnitView> {
        let file = UnitFile::from_options(options);
        Arc::new(UnitView {
            name: UnitName::parse(name).expect("a valid name"),
            hash: file.hash(),
            file: Arc::new(file),
            desired: TargetState::Launched,
            global,
            machine_id: (!global).then(|| "m1".to_string()),
            current: TargetState::Loaded,
            reason: None,
        })
    }

    fn check(next: &str, units: &[Arc<UnitView>]) {
        assert_eq!(
            String::from_utf8_lossy(&units_page(next, units)),
            String::from_utf8_lossy(&units_page_slowly(next, units)),
        );
    }

    #[test]
    fn strings_are_escaped_as_before() {
        // every ASCII character, the separators Go escapes, and other non-ASCII text
        let mut tricky: String = (0u8..0x80).map(char::from).collect();
        tricky.push_str("\u{2028}x\u{2029}\u{2027}\u{202a}é€😀\u{7f}\u{85}");
        for s in [tricky.as_str(), "", "plain", "\u{2028}", "a\"b\\c", "<&>"] {
            let mut mine = Vec::new();
            string(&mut mine, s);
            assert_eq!(
                String::from_utf8_lossy(&mine),
                String::from_utf8_lossy(&wire::to_go_json(&s)),
                "{s:?}"
            );
        }
        // the bytes fleet v1.0 sent (Go 1.7's encoder)
        let mut mine = Vec::new();
        string(&mut mine, "a\u{8}b\u{c}c\\bd\u{1}<");
        assert_eq!(
            String::from_utf8_lossy(&mine),
            r#""a\u0008b\u000cc\\bd\u0001\u003c""#
        );
    }

    #[test]
    fn pages_are_the_bytes_of_the_wire_types() {
        let opt = |section: &str, name: &str, value: &str| UnitOption::new(section, name, value);
        let mut odd = view(
            "odd.service",
            vec![
                opt("Unit", "Description", "a <b> & \"c\"\tü\u{2028}"),
                opt("Service", "ExecStart", ""),
                opt("X-Fleet", "Global", "true"),
            ],
            true,
        );
        Arc::make_mut(&mut odd).reason = Some("no machine\nfits".into());
        let mut unplaced = view(
            "unplaced.service",
            vec![opt("Service", "ExecStart", "/bin/true")],
            false,
        );
        let u = Arc::make_mut(&mut unplaced);
        u.machine_id = None;
        u.current = TargetState::Inactive;
        let empty = view("empty.service", vec![], false);
        check("", &[]);
        check("tok", &[]);
        check("", std::slice::from_ref(&odd));
        check("tok", &[odd, unplaced, empty]);
    }
}
