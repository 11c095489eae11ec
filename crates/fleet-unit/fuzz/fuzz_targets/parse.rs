//! Fuzz target: parsing arbitrary text never panics, the canonical form of anything that
//! parses is a fixed point with the same hash, and reading requirements never panics.
#![no_main]

use fleet_unit::{Requirements, UnitFile, UnitName, glob_match};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(unit) = UnitFile::parse(text) {
        let canonical = unit.serialize();
        let again = match UnitFile::parse(&canonical) {
            Ok(again) => again,
            Err(e) => panic!("canonical form {canonical:?} does not parse: {e}"),
        };
        assert_eq!(again.serialize(), canonical, "canonical form is not a fixed point");
        assert_eq!(again.hash(), unit.hash());
        if let Err(e) = unit.reread() {
            panic!("parsed unit {text:?} does not read back unchanged: {e}");
        }
        for name in ["fuzz.service", "fuzz@inst.service", "fuzz@.service"] {
            if let Ok(name) = UnitName::parse(name) {
                let _ = Requirements::from_unit(&name, &unit);
            }
        }
    }
    // Names and globs must not panic either.
    let _ = UnitName::parse(text);
    if let Some((pattern, name)) = text.split_once('\n') {
        let _ = glob_match(pattern, name);
    }
});
