//! Property tests: the canonical form is a fixed point, and a missing final newline changes
//! nothing.

use fleet_unit::UnitFile;
use proptest::prelude::*;

/// Fragments that exercise every lexer state: headers, comments, continuations, CRLF,
/// Unicode spaces, quotes and specifiers.
const TOKENS: &[&str] = &[
    "[",
    "]",
    "Unit",
    "Service",
    "X-Fleet",
    "=",
    "Key",
    "ExecStart",
    "val",
    " ",
    "  ",
    "\t",
    "\\",
    "\\ ",
    "\n",
    "\n",
    "\n",
    "\r\n",
    "\r",
    "#",
    ";",
    "\"",
    "\u{e9}",
    "\u{a0}",
    "%n",
    "a=b",
    "[Unit]\n",
    "[X-Fleet]\n",
    "Description=x\n",
    "K=v\\\n",
    "\n\n",
];

/// The options in canonical order: grouped by section in first-seen order, stable within.
fn grouped(unit: &UnitFile) -> Vec<fleet_unit::UnitOption> {
    let mut sections: Vec<&str> = Vec::new();
    for o in unit.options() {
        if !sections.contains(&o.section.as_str()) {
            sections.push(&o.section);
        }
    }
    let mut out = unit.options().to_vec();
    out.sort_by_key(|o| sections.iter().position(|s| *s == o.section));
    out
}

fn unit_text() -> impl Strategy<Value = String> {
    prop::collection::vec(prop::sample::select(TOKENS), 0..40).prop_map(|t| t.concat())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(4096))]

    #[test]
    fn canonical_form_is_stable(text in unit_text()) {
        if let Ok(unit) = UnitFile::parse(&text) {
            let canonical = unit.serialize();
            let again = UnitFile::parse(&canonical);
            prop_assert!(again.is_ok(), "canonical form {canonical:?} of {text:?} does not parse: {again:?}");
            let again = again.unwrap_or_default();
            let want = grouped(&unit);
            prop_assert_eq!(again.options(), want.as_slice(), "options differ after a round trip of {:?}", text);
            prop_assert_eq!(again.serialize(), canonical.clone());
            prop_assert_eq!(again.hash(), unit.hash());
        }
    }

    /// What the API requires of units built from options holds for every parsed unit, so
    /// fleetctl's options (taken from a parsed file) are never refused.
    #[test]
    fn parsed_units_read_back_unchanged(text in unit_text()) {
        if let Ok(unit) = UnitFile::parse(&text) {
            let again = unit.reread();
            prop_assert!(again.is_ok(), "{text:?}: {again:?}");
            let want = grouped(&unit);
            let again = again.unwrap_or_default();
            prop_assert_eq!(again.options(), want.as_slice());
        }
    }

    #[test]
    fn final_newline_changes_nothing(text in unit_text()) {
        let text = text.trim_end_matches('\n');
        let without = UnitFile::parse(text);
        let with = UnitFile::parse(&format!("{text}\n"));
        match (without, with) {
            (Ok(a), Ok(b)) => {
                prop_assert_eq!(a.options(), b.options());
                prop_assert_eq!(a.hash(), b.hash());
            }
            (Err(_), Err(_)) => {}
            (a, b) => prop_assert!(false, "{text:?}: without newline {a:?}, with newline {b:?}"),
        }
    }
}
