//! Unit files, unit names and the `[X-Fleet]` model of fleet v1.0, as pure values (no IO).
//!
//! The model:
//! - A [`UnitFile`] is an ordered list of [`UnitOption`]s (section, name, value), parsed with
//!   the systemd rules as fleet implemented them ([`UnitFile::parse`]). Its canonical text
//!   ([`UnitFile::serialize`]) groups options by section in first-seen order; the SHA-1 of
//!   that text is the [`UnitHash`] fleet shows and stores unit bodies under.
//! - A [`UnitName`] is a validated name: `prefix.type`, a template `prefix@.type`, or an
//!   instance `prefix@instance.type`. An instance without its own file takes its template's
//!   body; fleet's specifiers `%n %N %p %i` ([`UnitName::expand_specifiers`]) are expanded
//!   in `[X-Fleet]` values of that instance.
//! - [`Requirements`] are what the `[X-Fleet]` section asks for (MachineID, MachineOf,
//!   MachineMetadata, Conflicts, Global, Replaces, and the deprecated spellings), validated
//!   as fleet did.
//! - [`TargetState`] is the state a user asked for: inactive, loaded or launched.
//! - [`glob_match`] is Go's `path.Match`, the glob fleet used for Conflicts and Replaces;
//!   [`Glob`] is a compiled pattern that matches without backtracking.
//! - Work is bounded on hostile input: parsing and serializing are linear, and `[X-Fleet]`
//!   sizes are limited ([`MAX_SECTION_BYTES`] and friends).

mod file;
mod glob;
mod hash;
mod name;
mod quote;
pub use quote::go_quote;
mod requirements;
mod state;

pub use file::{
    LINE_MAX, ParseError, RereadError, SectionName, UnitFile, UnitOption, split_multivalue,
};
pub use glob::{Glob, glob_match, is_literal_pattern, is_valid_pattern, literal_prefix};
pub use hash::{UnitHash, UnitHashError};
pub use name::{
    RECOGNIZED_TYPES, STORED_UNIT_NAME_MAX, TEMPLATE_TYPES, UNIT_NAME_MAX, UNIT_TYPES, UnitName,
    UnitNameError, default_unit_type,
};
pub use requirements::{
    AT_MOST_ONCE_IGNORED, FleetOption, KNOWN_KEYS, MAX_MATCH_PAIRS, MAX_MATCH_WORK, MAX_PATTERNS,
    MAX_SECTION_BYTES, MAX_VALUE_BYTES, RequirementError, RequirementErrorKind, Requirements,
    X_FLEET,
};
pub use state::{TargetState, TargetStateError};
