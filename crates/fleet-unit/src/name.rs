//! Unit names (`hello.service`, templates `web@.service`, instances `web@1.service`) with
//! fleet's validation rules and error messages.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::quote::{go_quote, go_quote_char};

/// Longest unit name accepted, in bytes: the longest systemd loads (its `UNIT_NAME_MAX` is
/// 256 with the terminating NUL). fleet v1.0 accepted 256 bytes, a name no node could run.
pub const UNIT_NAME_MAX: usize = 255;

/// Longest name of a unit that may already be in the registry: fleet v1.0's limit. Such a
/// unit can be read, listed and destroyed ([`UnitName::parse_stored`]), but never created,
/// scheduled or run.
pub const STORED_UNIT_NAME_MAX: usize = 256;

/// Unit types fleet accepted as a name's suffix.
pub const UNIT_TYPES: &[&str] = &[
    "automount",
    "busname",
    "device",
    "mount",
    "path",
    "scope",
    "service",
    "slice",
    "snapshot",
    "socket",
    "swap",
    "target",
    "timer",
];

/// Unit types that may be templates or instances (names containing `@`).
pub const TEMPLATE_TYPES: &[&str] = &["path", "service", "socket", "target", "timer"];

/// Unit types fleet manages: the suffixes fleetctl recognizes before it appends `.service` to
/// an argument, and the files of the units directory that fleetd lists.
pub const RECOGNIZED_TYPES: &[&str] = &[
    "service",
    "socket",
    "timer",
    "path",
    "device",
    "mount",
    "automount",
];

/// Why a string is not a valid unit name. `Display` is fleet's message, word for word.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UnitNameError {
    #[error("unit name cannot be empty")]
    Empty,
    #[error("unit name exceeds maximum length ({max})")]
    TooLong { max: usize },
    #[error("unit name must contain \".\"")]
    NoDot,
    #[error("unit name cannot end in \".\"")]
    EndsInDot,
    #[error("invalid unit type: {}", go_quote(.0))]
    InvalidType(String),
    #[error("invalid unit type for template: {}", go_quote(.0))]
    InvalidTemplateType(String),
    #[error("invalid character {} in unit name", go_quote_char(*.0))]
    InvalidCharacter(char),
    #[error("unit name cannot start in \"@\"")]
    StartsWithAt,
}

/// A validated unit name.
///
/// Valid means: at most 255 bytes; `prefix[@instance].type` where `type` is one of
/// [`UNIT_TYPES`] (one of [`TEMPLATE_TYPES`] if the name contains `@`), everything before the
/// last `.` uses only `[A-Za-z0-9:_.@\-]` and `\`, and the name does not start with `@`.
/// Such a name can never contain `/` or NUL and can never be `.` or `..`, so it always names a
/// file directly inside a units directory.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct UnitName {
    full: String,
    /// Byte index of the last `.`.
    dot: usize,
    /// Byte index of the first `@` before the dot, if any.
    at: Option<usize>,
}

impl UnitName {
    /// Validates `name` with fleet's rules (`api.ValidateName`), reporting the first problem;
    /// at most [`UNIT_NAME_MAX`] bytes. For a name to create or run.
    pub fn parse(name: &str) -> Result<UnitName, UnitNameError> {
        UnitName::parse_within(name, UNIT_NAME_MAX)
    }

    /// [`UnitName::parse`], but up to [`STORED_UNIT_NAME_MAX`] bytes, as fleet v1.0 allowed:
    /// for a name read from the registry, or of a unit to look up or destroy, so that a unit
    /// stored under such a name can still be seen and removed. Whether it can run:
    /// [`UnitName::is_runnable`].
    pub fn parse_stored(name: &str) -> Result<UnitName, UnitNameError> {
        UnitName::parse_within(name, STORED_UNIT_NAME_MAX)
    }

    fn parse_within(name: &str, max: usize) -> Result<UnitName, UnitNameError> {
        if name.is_empty() {
            return Err(UnitNameError::Empty);
        }
        if name.len() > max {
            return Err(UnitNameError::TooLong { max });
        }
        let dot = name.rfind('.').ok_or(UnitNameError::NoDot)?;
        if dot == name.len() - 1 {
            return Err(UnitNameError::EndsInDot);
        }
        let suffix = &name[dot + 1..];
        if !UNIT_TYPES.contains(&suffix) {
            return Err(UnitNameError::InvalidType(suffix.to_string()));
        }
        if name.contains('@') && !TEMPLATE_TYPES.contains(&suffix) {
            return Err(UnitNameError::InvalidTemplateType(suffix.to_string()));
        }
        if let Some(bad) = name[..dot].chars().find(|c| !valid_char(*c)) {
            return Err(UnitNameError::InvalidCharacter(bad));
        }
        if name.starts_with('@') {
            return Err(UnitNameError::StartsWithAt);
        }
        Ok(UnitName {
            full: name.to_string(),
            dot,
            at: name[..dot].find('@'),
        })
    }

    /// Whether systemd can load a unit of this name (at most [`UNIT_NAME_MAX`] bytes; only
    /// a name from [`UnitName::parse_stored`] can be longer).
    pub fn is_runnable(&self) -> bool {
        self.full.len() <= UNIT_NAME_MAX
    }

    /// The whole name, e.g. `web@1.service`.
    pub fn as_str(&self) -> &str {
        &self.full
    }

    /// The name without its type suffix, e.g. `web@1` (systemd's `%N`).
    pub fn stem(&self) -> &str {
        &self.full[..self.dot]
    }

    /// The part before `@`, or before the suffix when there is no `@` (systemd's `%p`).
    pub fn prefix(&self) -> &str {
        match self.at {
            Some(at) => &self.full[..at],
            None => self.stem(),
        }
    }

    /// The instance of an instance unit (`1` for `web@1.service`); None for templates
    /// and plain units.
    pub fn instance(&self) -> Option<&str> {
        let at = self.at?;
        let inst = &self.full[at + 1..self.dot];
        (!inst.is_empty()).then_some(inst)
    }

    /// The type suffix without the dot, e.g. `service`.
    pub fn suffix(&self) -> &str {
        &self.full[self.dot + 1..]
    }

    /// A template: `name@.suffix`.
    pub fn is_template(&self) -> bool {
        self.at.is_some() && self.instance().is_none()
    }

    /// An instance of a template: `name@instance.suffix`.
    pub fn is_instance(&self) -> bool {
        self.instance().is_some()
    }

    /// The template this name belongs to (`web@.service` for `web@1.service`, and a template
    /// for itself); None for names without `@`.
    pub fn template(&self) -> Option<UnitName> {
        self.at?;
        let full = format!("{}@.{}", self.prefix(), self.suffix());
        let dot = full.len() - self.suffix().len() - 1;
        Some(UnitName {
            at: Some(self.prefix().len()),
            dot,
            full,
        })
    }

    /// Expands fleet's specifiers in `value`: `%n` full name, `%N` name without suffix,
    /// `%p` prefix, `%i` instance (empty when there is none). Replacements are applied one
    /// specifier after the other, in that order, as fleet did.
    ///
    /// `%n` can make a value 127 times longer; with input from others use
    /// [`UnitName::expand_specifiers_within`].
    pub fn expand_specifiers(&self, value: &str) -> String {
        self.expand_specifiers_within(value, usize::MAX)
            .unwrap_or_default()
    }

    /// [`UnitName::expand_specifiers`], or None when the expanded value would be longer
    /// than `max` bytes.
    ///
    /// Names hold no `%`, so every replacement uses up one `%` of `value` and removes at most
    /// two bytes from what later steps produce. A step whose result, less two bytes for each
    /// `%` left, is longer than `max` therefore stops the expansion before its text is built:
    /// nothing longer than `max` plus twice the number of `%` in `value` is ever allocated.
    pub fn expand_specifiers_within(&self, value: &str, max: usize) -> Option<String> {
        let mut percents = value.bytes().filter(|b| *b == b'%').count();
        let too_long = |len: usize, percents: usize| len.saturating_sub(2 * percents) > max;
        if too_long(value.len(), percents) {
            return None;
        }
        if percents == 0 {
            return Some(value.to_string());
        }
        let steps = [
            ("%n", self.as_str()),
            ("%N", self.stem()),
            ("%p", self.prefix()),
            ("%i", self.instance().unwrap_or("")),
        ];
        let mut out = value.to_string();
        for (from, to) in steps {
            // str::replace replaces these non-overlapping matches, left to right
            let n = out.matches(from).count();
            if n == 0 {
                continue;
            }
            let len = (out.len() - n * from.len()).checked_add(n.checked_mul(to.len())?)?;
            percents -= n;
            if too_long(len, percents) {
                return None;
            }
            out = out.replace(from, to);
        }
        (out.len() <= max).then_some(out)
    }
}

fn valid_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, ':' | '-' | '_' | '.' | '\\' | '@')
}

/// What fleetctl does with a command-line argument that lacks a recognized unit suffix:
/// append `.service`. Recognized suffixes are service, socket, timer, path, device, mount
/// and automount (so `foo.target` becomes `foo.target.service`, as in fleet).
pub fn default_unit_type(name: &str) -> String {
    let recognized = RECOGNIZED_TYPES
        .iter()
        .any(|t| name.strip_suffix(t).is_some_and(|rest| rest.ends_with('.')));
    if recognized {
        name.to_string()
    } else {
        format!("{name}.service")
    }
}

impl fmt::Display for UnitName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.full)
    }
}

impl fmt::Debug for UnitName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "UnitName({:?})", self.full)
    }
}

impl FromStr for UnitName {
    type Err = UnitNameError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        UnitName::parse(s)
    }
}

impl AsRef<str> for UnitName {
    fn as_ref(&self) -> &str {
        &self.full
    }
}

impl std::borrow::Borrow<str> for UnitName {
    fn borrow(&self) -> &str {
        &self.full
    }
}

impl Serialize for UnitName {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.full)
    }
}

/// Names are deserialized from records in the registry, which fleet v1.0 may have written:
/// up to [`STORED_UNIT_NAME_MAX`] bytes ([`UnitName::parse_stored`]).
impl<'de> Deserialize<'de> for UnitName {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        UnitName::parse_stored(&s).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(name: &str, want: Result<(), &str>) {
        let got = UnitName::parse(name).map(|_| ()).map_err(|e| e.to_string());
        assert_eq!(got, want.map_err(str::to_string), "name {name:?}");
    }

    #[test]
    fn validates_like_fleet() {
        let long_ok = format!("{}.service", "a".repeat(UNIT_NAME_MAX - 8));
        let long_bad = format!("{}.service", "a".repeat(UNIT_NAME_MAX - 7));
        let cases: Vec<(&str, Result<(), &str>)> = vec![
            ("", Err("unit name cannot be empty")),
            (&long_bad, Err("unit name exceeds maximum length (255)")),
            (&long_ok, Ok(())),
            ("fooservice", Err("unit name must contain \".\"")),
            ("bar@foo", Err("unit name must contain \".\"")),
            ("foo.", Err("unit name cannot end in \".\"")),
            ("foo@foo.service.", Err("unit name cannot end in \".\"")),
            ("foo.bar", Err("invalid unit type: \"bar\"")),
            ("foo.servICE", Err("invalid unit type: \"servICE\"")),
            ("foo%.service", Err("invalid character '%' in unit name")),
            ("foo$asd.service", Err("invalid character '$' in unit name")),
            (
                "hello world.service",
                Err("invalid character ' ' in unit name"),
            ),
            ("yes/no.service", Err("invalid character '/' in unit name")),
            ("../x.service", Err("invalid character '/' in unit name")),
            (
                "a\0b.service",
                Err("invalid character '\\x00' in unit name"),
            ),
            ("this+that.mount", Err("invalid character '+' in unit name")),
            (
                "dog=woof@.mount",
                Err("invalid unit type for template: \"mount\""),
            ),
            (
                "dog=woof@.service",
                Err("invalid character '=' in unit name"),
            ),
            ("@foo.service", Err("unit name cannot start in \"@\"")),
            (
                "foo@1.automount",
                Err("invalid unit type for template: \"automount\""),
            ),
            (
                "foo@1.swap",
                Err("invalid unit type for template: \"swap\""),
            ),
            ("foo.service", Ok(())),
            ("hello.mount", Ok(())),
            ("foo@123.service", Ok(())),
            ("foo@.service", Ok(())),
            ("yo.yo.service", Ok(())),
            ("hello@world.path", Ok(())),
            ("hello:world.service", Ok(())),
            ("yes@no\\.service", Ok(())),
            ("jalapano_chips.service", Ok(())),
            ("foo@1.timer", Ok(())),
            ("..service", Ok(())),
        ];
        for (name, want) in cases {
            check(name, want);
        }
    }

    #[test]
    fn stored_names_may_be_one_byte_longer() {
        let name = |len: usize| format!("{}.service", "a".repeat(len - ".service".len()));
        // (length, parse, parse_stored)
        type Case = (usize, Result<(), &'static str>, Result<(), &'static str>);
        let cases: &[Case] = &[
            (255, Ok(()), Ok(())),
            (256, Err("unit name exceeds maximum length (255)"), Ok(())),
            (
                257,
                Err("unit name exceeds maximum length (255)"),
                Err("unit name exceeds maximum length (256)"),
            ),
        ];
        for (len, parse, stored) in cases {
            let n = name(*len);
            let got = UnitName::parse(&n).map(|_| ()).map_err(|e| e.to_string());
            assert_eq!(got, parse.map_err(str::to_string), "parse {len}");
            let got = UnitName::parse_stored(&n).map_err(|e| e.to_string());
            assert_eq!(
                got.as_ref().map(|_| ()).map_err(Clone::clone),
                stored.map_err(str::to_string),
                "parse_stored {len}"
            );
            if let Ok(u) = got {
                assert_eq!(u.is_runnable(), *len <= UNIT_NAME_MAX, "{len}");
            }
        }
        // the other rules still hold
        assert!(UnitName::parse_stored(&format!("{}/.service", "a".repeat(247))).is_err());
        // records in the registry may hold such a name
        let json = format!("\"{}\"", name(256));
        let n: UnitName = serde_json::from_str(&json).expect("stored name");
        assert!(!n.is_runnable());
    }

    #[test]
    fn parts_of_names() {
        // (name, prefix, instance, suffix, template, is_template, is_instance)
        type Row = (
            &'static str,
            &'static str,
            Option<&'static str>,
            &'static str,
            Option<&'static str>,
            bool,
            bool,
        );
        let cases: &[Row] = &[
            (
                "hello.service",
                "hello",
                None,
                "service",
                None,
                false,
                false,
            ),
            (
                "yo.yo.service",
                "yo.yo",
                None,
                "service",
                None,
                false,
                false,
            ),
            (
                "web@.service",
                "web",
                None,
                "service",
                Some("web@.service"),
                true,
                false,
            ),
            (
                "web@1.service",
                "web",
                Some("1"),
                "service",
                Some("web@.service"),
                false,
                true,
            ),
            (
                "a@b@c.socket",
                "a",
                Some("b@c"),
                "socket",
                Some("a@.socket"),
                false,
                true,
            ),
        ];
        for (name, prefix, instance, suffix, template, is_t, is_i) in cases {
            let n = UnitName::parse(name).expect("valid name");
            assert_eq!(n.prefix(), *prefix, "{name}");
            assert_eq!(n.instance(), *instance, "{name}");
            assert_eq!(n.suffix(), *suffix, "{name}");
            assert_eq!(
                n.template().map(|t| t.to_string()),
                template.map(str::to_string),
                "{name}"
            );
            if let Some(t) = n.template() {
                assert_eq!(t, UnitName::parse(t.as_str()).expect("template valid"));
            }
            assert_eq!(n.is_template(), *is_t, "{name}");
            assert_eq!(n.is_instance(), *is_i, "{name}");
        }
    }

    #[test]
    fn no_valid_name_escapes_the_units_directory() {
        for name in [".service", "..service", "...service", "a..b.service"] {
            let n = UnitName::parse(name).expect("valid");
            assert!(!n.as_str().contains('/'));
            assert_ne!(n.as_str(), ".");
            assert_ne!(n.as_str(), "..");
        }
        for name in [
            "../etc.service",
            "a/../b.service",
            "/abs.service",
            "..",
            ".",
        ] {
            assert!(UnitName::parse(name).is_err(), "{name} must be rejected");
        }
    }

    #[test]
    fn specifiers_expand_like_fleet() {
        let cases: &[(&str, &str, &str)] = &[
            ("web@1.service", "%n", "web@1.service"),
            ("web@1.service", "%N", "web@1"),
            ("web@1.service", "%p", "web"),
            ("web@1.service", "%i", "1"),
            ("web@1.service", "%p-db@%i.service", "web-db@1.service"),
            ("hello.service", "x%iy", "xy"),
            ("hello.service", "100%", "100%"),
            ("hello.service", "%%n", "%hello.service"),
            // %n can make a %N: replacements are applied in turn, as fleet did
            ("Nx.service", "%%n", "Nxx.service"),
        ];
        for (name, value, want) in cases {
            let n = UnitName::parse(name).expect("valid");
            assert_eq!(n.expand_specifiers(value), *want, "{name} {value}");
            assert_eq!(
                n.expand_specifiers_within(value, want.len()).as_deref(),
                Some(*want),
                "{name} {value}"
            );
        }
    }

    proptest::proptest! {
        /// The capped expansion is the expansion when it fits, and None when it does not.
        #[test]
        fn capped_expansion_agrees(
            name in "(N|n|p|i|x){1,6}(@(N|n|p|i|x){0,4})?\\.service",
            value in "(%|N|n|p|i|x|-){0,24}",
            max in 0usize..64,
        ) {
            let n = UnitName::parse(&name).expect("valid");
            let full = n.expand_specifiers(&value);
            let want = (full.len() <= max).then_some(full);
            proptest::prop_assert_eq!(n.expand_specifiers_within(&value, max), want);
        }
    }

    #[test]
    fn capped_expansion_stops_at_the_cap() {
        let n = UnitName::parse("web@1.service").expect("valid");
        // (value, cap, expanded or None)
        let cases: &[(&str, usize, Option<&str>)] = &[
            ("%n%n", 26, Some("web@1.serviceweb@1.service")),
            ("%n%n", 25, None),
            ("%n", 12, None),
            // a step may be longer than the cap when later ones shrink it again
            ("%n%i", 14, Some("web@1.service1")),
            ("%p%i%i%i%i", 7, Some("web1111")),
            ("%p%i%i%i%i", 6, None),
            ("abc", 2, None),
            ("abc", 3, Some("abc")),
            // a value may shrink (%i is one byte here)
            ("%i%i%i", 3, Some("111")),
            ("%i%i%i", 2, None),
        ];
        for (value, cap, want) in cases {
            assert_eq!(
                n.expand_specifiers_within(value, *cap).as_deref(),
                *want,
                "{value} within {cap}"
            );
        }
    }

    #[test]
    fn default_unit_type_like_fleetctl() {
        let cases: &[(&str, &str)] = &[
            ("hello", "hello.service"),
            ("hello.service", "hello.service"),
            ("hello.socket", "hello.socket"),
            ("hello.automount", "hello.automount"),
            ("hello.target", "hello.target.service"),
            ("service", "service.service"),
        ];
        for (input, want) in cases {
            assert_eq!(default_unit_type(input), *want, "{input}");
        }
    }

    #[test]
    fn serde_as_string() {
        let n = UnitName::parse("web@1.service").expect("valid");
        let json = serde_json::to_string(&n).expect("serialize");
        assert_eq!(json, "\"web@1.service\"");
        let back: UnitName = serde_json::from_str(&json).expect("deserialize");
        assert_eq!(back, n);
        let bad: Result<UnitName, _> = serde_json::from_str("\"bad name.service\"");
        assert!(bad.is_err());
    }
}
