//! The `[X-Fleet]` section: scheduling requirements of a unit, read and validated as fleet did.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::file::{LINE_MAX, UnitFile, split_multivalue};
use crate::glob::{Glob, glob_match};
use crate::name::UnitName;
use crate::quote::go_quote;

/// The section fleet reads requirements from.
pub const X_FLEET: &str = "X-Fleet";

/// The longest `[X-Fleet]` value after specifier expansion (`%n` can make a short value
/// long): systemd's line limit, which the value had to fit before expansion anyway.
pub const MAX_VALUE_BYTES: usize = LINE_MAX;

/// The most bytes the `[X-Fleet]` options of a unit may hold, as written and again after
/// specifier expansion (names and values, each counted one byte longer). Bounds the memory of
/// a unit's requirements, its warnings, and the work of matching its globs everywhere.
pub const MAX_SECTION_BYTES: usize = 64 * 1024;

/// The most `Conflicts` (each value split on whitespace) and `Replaces` patterns a unit may
/// declare together. Every pattern is matched against the names of the whole cluster in each
/// reconcile, so their number bounds the scheduler's work, with or without `MachineOf`.
pub const MAX_PATTERNS: usize = 256;

/// The most `MachineOf` x (`Conflicts` + `Replaces`) pairs validation checks; fleet
/// matched every pair, so an unbounded count multiplied out to minutes of CPU.
pub const MAX_MATCH_PAIRS: usize = 1024;

/// The most (bytes of `MachineOf` values) x (bytes of `Conflicts` and `Replaces` patterns)
/// validation accepts: a bound on the total matching work whatever the shape of the globs.
pub const MAX_MATCH_WORK: usize = 1 << 24;

/// Every key fleet accepts in `[X-Fleet]` (current and deprecated spellings).
pub const KNOWN_KEYS: &[&str] = &[
    "MachineID",
    "X-ConditionMachineID",
    "X-ConditionMachineBootID",
    "X-ConditionMachineOf",
    "MachineOf",
    "X-Conflicts",
    "Conflicts",
    "X-ConditionMachineMetadata",
    "MachineMetadata",
    "Global",
    "Replaces",
    "AtMostOnce",
];

/// What a unit asks of the machine it runs on, with specifiers expanded and deprecated
/// spellings folded in.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Requirements {
    /// Run only on this machine (`MachineID`, else `X-ConditionMachineID`, else
    /// `X-ConditionMachineBootID`; the first value wins). Matches a machine's full ID or its
    /// 8-character short ID.
    pub machine_id: Option<String>,
    /// Run only where all these units are (`X-ConditionMachineOf` then `MachineOf`; exact names).
    pub machine_of: Vec<String>,
    /// Run only on machines whose metadata has, for every key, one of the listed values
    /// (AND across keys, OR within a key). Values sorted and unique.
    pub metadata: BTreeMap<String, Vec<String>>,
    /// Never share a machine with units matching these globs (`X-Conflicts` then `Conflicts`,
    /// each value split on whitespace).
    pub conflicts: Vec<String>,
    /// Run on every eligible machine instead of being scheduled (`Global`, last value wins).
    pub global: bool,
    /// Push units matching these globs off the machine this unit is placed on.
    pub replaces: Vec<String>,
    /// Never run on two machines at once (`AtMostOnce`, last value wins; not in fleet v1.0):
    /// the agent stops the unit when its machine's lease goes unrenewed, and the engine
    /// moves it only once that stop has surely happened (see `fleet_registry::AtMostOnce`).
    #[serde(default)]
    pub at_most_once: bool,
}

/// How the warning about an `AtMostOnce` value that is not a boolean starts.
pub const AT_MOST_ONCE_IGNORED: &str = "ignoring AtMostOnce value";

impl Requirements {
    /// Whether the unit runs on every machine (`Global=true`). A unit whose requirements do
    /// not parse is not global: every registry and client reads it so.
    pub fn is_global(name: &UnitName, file: &UnitFile) -> bool {
        Requirements::from_unit(name, file).is_ok_and(|(r, _)| r.global)
    }

    /// Reads the `[X-Fleet]` section of `file` for the unit called `name`.
    ///
    /// Returns the requirements and warnings (unknown keys, with fleet's text, ignored
    /// malformed `MachineMetadata` values, and an `AtMostOnce` that is not a boolean, read as
    /// false), or an error for combinations fleet rejects. A stored unit is read so: one
    /// written by fleet v1.0, to which `AtMostOnce` was an unknown key, stays valid.
    pub fn from_unit(
        name: &UnitName,
        file: &UnitFile,
    ) -> Result<(Requirements, Vec<String>), RequirementError> {
        Requirements::read(name, file, false)
    }

    /// As [`Requirements::from_unit`], for a unit being submitted: an `AtMostOnce` that is
    /// not a boolean is refused (a typo must not silently allow two copies), except in a
    /// template, whose value may name its instance (`AtMostOnce=%i`): each instance is
    /// checked when it is submitted.
    pub fn from_submitted(
        name: &UnitName,
        file: &UnitFile,
    ) -> Result<(Requirements, Vec<String>), RequirementError> {
        Requirements::read(name, file, !name.is_template())
    }

    fn read(
        name: &UnitName,
        file: &UnitFile,
        strict: bool,
    ) -> Result<(Requirements, Vec<String>), RequirementError> {
        let err = |kind| RequirementError {
            unit: name.clone(),
            kind,
        };
        // key -> values, keys in first-seen order, values split and expanded. Sizes are
        // bounded twice: as written (before a value is copied), and after expansion, whose
        // length is known before it is built; so a hostile section costs at most about
        // MAX_SECTION_BYTES. Every option and value counts one byte more than its text, so
        // that empty ones count too.
        let mut keys: Vec<(&str, Vec<String>)> = Vec::new();
        let mut index: HashMap<&str, usize> = HashMap::new();
        let mut written = 0usize;
        let mut expanded = 0usize;
        for opt in file.options().iter().filter(|o| &*o.section == X_FLEET) {
            written = written.saturating_add(opt.name.len() + opt.value.len() + 2);
            if written > MAX_SECTION_BYTES {
                return Err(err(RequirementErrorKind::SectionTooLarge {
                    expanded: false,
                }));
            }
            expanded += opt.name.len() + 1;
            if expanded > MAX_SECTION_BYTES {
                return Err(err(RequirementErrorKind::SectionTooLarge {
                    expanded: true,
                }));
            }
            let i = *index.entry(&opt.name).or_insert_with(|| {
                keys.push((&opt.name, Vec::new()));
                keys.len() - 1
            });
            for v in split_multivalue(&opt.value) {
                let Some(v) = name.expand_specifiers_within(&v, MAX_VALUE_BYTES) else {
                    return Err(err(RequirementErrorKind::ValueTooLong {
                        key: opt.name.clone(),
                    }));
                };
                expanded += v.len() + 1;
                if expanded > MAX_SECTION_BYTES {
                    return Err(err(RequirementErrorKind::SectionTooLarge {
                        expanded: true,
                    }));
                }
                keys[i].1.push(v);
            }
        }
        let get = |key: &str| -> &[String] {
            index.get(key).map(|i| keys[*i].1.as_slice()).unwrap_or(&[])
        };

        let mut warnings = Vec::new();
        for (key, _) in &keys {
            if !KNOWN_KEYS.contains(key) {
                warnings.push(format!(
                    "unrecognized requirement in [X-Fleet] section: {}",
                    go_quote(key)
                ));
            }
        }

        let machine_id = [
            "MachineID",
            "X-ConditionMachineID",
            "X-ConditionMachineBootID",
        ]
        .iter()
        .find_map(|k| get(k).first().cloned());

        let mut machine_of: Vec<String> = Vec::new();
        for k in ["X-ConditionMachineOf", "MachineOf"] {
            machine_of.extend(get(k).iter().cloned());
        }

        let mut metadata: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        for k in ["X-ConditionMachineMetadata", "MachineMetadata"] {
            for pair in get(k) {
                let parts: Vec<&str> = pair.split('=').collect();
                match parts.as_slice() {
                    [key, value] if !key.is_empty() && !value.is_empty() => {
                        metadata
                            .entry(key.to_string())
                            .or_default()
                            .insert(value.to_string());
                    }
                    _ => warnings.push(format!(
                        "ignoring {k} value {}: expected key=value",
                        go_quote(pair)
                    )),
                }
            }
        }

        let mut conflicts: Vec<String> = Vec::new();
        for k in ["X-Conflicts", "Conflicts"] {
            for v in get(k) {
                conflicts.extend(v.split_whitespace().map(str::to_string));
            }
        }

        let global = get("Global").last().is_some_and(|v| is_truthy(v));
        let replaces = get("Replaces").to_vec();
        // read like Global, except that a value that is neither true nor false is refused
        // when submitted (strict), and otherwise read as false with a warning
        let at_most_once = match get("AtMostOnce").last() {
            None => false,
            Some(v) if is_truthy(v) => true,
            Some(v) if is_falsy(v) => false,
            Some(v) if strict => {
                return Err(err(RequirementErrorKind::NotABoolean {
                    key: "AtMostOnce".into(),
                    value: v.clone(),
                }));
            }
            Some(v) => {
                warnings.push(format!(
                    "{AT_MOST_ONCE_IGNORED} {}: not a boolean, read as false",
                    go_quote(v)
                ));
                false
            }
        };

        let req = Requirements {
            machine_id,
            machine_of,
            metadata: metadata
                .into_iter()
                .map(|(k, v)| (k, v.into_iter().collect()))
                .collect(),
            conflicts,
            global,
            replaces,
            at_most_once,
        };
        req.validate().map_err(|kind| RequirementError {
            unit: name.clone(),
            kind,
        })?;
        Ok((req, warnings))
    }

    /// fleet's consistency checks (the API's `ValidateOptions`), first failure reported.
    /// Every pair is matched only after the work is known to be bounded (`MAX_MATCH_PAIRS`,
    /// `MAX_MATCH_WORK`); each pattern is compiled once.
    fn validate(&self) -> Result<(), RequirementErrorKind> {
        let peers = self.machine_of.len();
        let patterns = self.conflicts.len() + self.replaces.len();
        if patterns > MAX_PATTERNS {
            return Err(RequirementErrorKind::TooManyPatterns { patterns });
        }
        if peers.saturating_mul(patterns) > MAX_MATCH_PAIRS {
            return Err(RequirementErrorKind::TooManyPairs { peers, patterns });
        }
        let bytes = |v: &[String]| v.iter().map(String::len).sum::<usize>();
        let peer_bytes = bytes(&self.machine_of);
        let pattern_bytes = bytes(&self.conflicts) + bytes(&self.replaces);
        if peer_bytes.saturating_mul(pattern_bytes) > MAX_MATCH_WORK {
            return Err(RequirementErrorKind::TooMuchMatching {
                peer_bytes,
                pattern_bytes,
            });
        }
        let compile = |v: &[String]| v.iter().map(|p| Glob::new(p)).collect::<Vec<_>>();
        let conflicts = compile(&self.conflicts);
        let replaces = compile(&self.replaces);
        let find = |globs: &[Option<Glob>], peer: &str| {
            globs
                .iter()
                .position(|g| g.as_ref().is_some_and(|g| g.matches(peer)))
        };
        for peer in &self.machine_of {
            if let Some(i) = find(&conflicts, peer) {
                return Err(RequirementErrorKind::PeerMatchesConflict {
                    peer: peer.clone(),
                    conflict: self.conflicts[i].clone(),
                });
            }
            if let Some(i) = find(&replaces, peer) {
                let r = &self.replaces[i];
                return Err(RequirementErrorKind::PeerMatchesReplace {
                    peer: peer.clone(),
                    replace: r.clone(),
                });
            }
        }
        let target = self.machine_id.is_some();
        let peers = !self.machine_of.is_empty();
        let conflicts = !self.conflicts.is_empty();
        let replaces = !self.replaces.is_empty();
        let global = self.global;
        let clash = |first, second| Err(RequirementErrorKind::Combination { first, second });
        match () {
            _ if target && peers => clash(FleetOption::MachineId, FleetOption::Peers),
            _ if target && conflicts => clash(FleetOption::MachineId, FleetOption::Conflicts),
            _ if target && global => clash(FleetOption::MachineId, FleetOption::Global),
            _ if target && replaces => clash(FleetOption::MachineId, FleetOption::Replaces),
            _ if global && peers => clash(FleetOption::Global, FleetOption::Peers),
            _ if global && replaces => clash(FleetOption::Global, FleetOption::Replaces),
            _ if conflicts && replaces => clash(FleetOption::Conflicts, FleetOption::Replaces),
            // a global unit runs on every machine by design: at most once means nothing there
            _ if global && self.at_most_once => clash(FleetOption::Global, FleetOption::AtMostOnce),
            _ => Ok(()),
        }
    }

    /// Whether a machine with this metadata satisfies `MachineMetadata` (every required key
    /// present with one of its allowed values).
    pub fn metadata_satisfied_by(&self, machine: &BTreeMap<String, String>) -> bool {
        self.metadata.iter().all(|(key, allowed)| {
            machine
                .get(key)
                .is_some_and(|v| allowed.iter().any(|a| a == v))
        })
    }

    /// Whether this unit's `Conflicts` globs match `other`.
    pub fn conflicts_with(&self, other: &str) -> bool {
        self.conflicts.iter().any(|p| glob_match(p, other))
    }

    /// Whether this unit's `Replaces` globs match `other`.
    pub fn replaces_unit(&self, other: &str) -> bool {
        self.replaces.iter().any(|p| glob_match(p, other))
    }
}

/// fleet's truthy spellings for `Global`: true, yes, 1, on, t (any case).
fn is_truthy(v: &str) -> bool {
    matches!(
        v.to_ascii_lowercase().as_str(),
        "true" | "yes" | "1" | "on" | "t"
    )
}

/// fleet's falsy spellings, the counterparts of [`is_truthy`]: false, no, 0, off, f (any case).
fn is_falsy(v: &str) -> bool {
    matches!(
        v.to_ascii_lowercase().as_str(),
        "false" | "no" | "0" | "off" | "f"
    )
}

/// An option as fleet's validation messages named it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FleetOption {
    MachineId,
    /// `MachineOf` (fleet's messages call it "Peers").
    Peers,
    Conflicts,
    Global,
    Replaces,
    /// `AtMostOnce` (ours; fleet v1.0 had no such option).
    AtMostOnce,
}

impl FleetOption {
    /// The word fleet's message used.
    pub fn fleet_word(self) -> &'static str {
        match self {
            FleetOption::MachineId => "MachineID",
            FleetOption::Peers => "Peers",
            FleetOption::Conflicts => "Conflicts",
            FleetOption::Global => "Global",
            FleetOption::Replaces => "Replaces",
            FleetOption::AtMostOnce => "AtMostOnce",
        }
    }

    /// The option name a user writes in `[X-Fleet]`.
    pub fn option_name(self) -> &'static str {
        match self {
            FleetOption::Peers => "MachineOf",
            other => other.fleet_word(),
        }
    }
}

/// What is wrong with a unit's requirements.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RequirementErrorKind {
    /// A `MachineOf` unit matches one of the unit's own `Conflicts`.
    PeerMatchesConflict { peer: String, conflict: String },
    /// A `MachineOf` unit matches one of the unit's own `Replaces`.
    PeerMatchesReplace { peer: String, replace: String },
    /// Two options that cannot be used together.
    Combination {
        first: FleetOption,
        second: FleetOption,
    },
    /// A value longer than [`MAX_VALUE_BYTES`] after specifier expansion.
    ValueTooLong { key: String },
    /// Options longer than [`MAX_SECTION_BYTES`] together, as written or (`expanded`) after
    /// specifier expansion.
    SectionTooLarge { expanded: bool },
    /// More than [`MAX_PATTERNS`] `Conflicts` and `Replaces` patterns.
    TooManyPatterns { patterns: usize },
    /// More than [`MAX_MATCH_PAIRS`] `MachineOf` x (`Conflicts` + `Replaces`) pairs.
    TooManyPairs { peers: usize, patterns: usize },
    /// More than [`MAX_MATCH_WORK`] bytes of `MachineOf` values x bytes of patterns.
    TooMuchMatching {
        peer_bytes: usize,
        pattern_bytes: usize,
    },
    /// A boolean option (`AtMostOnce`) whose value is neither true nor false.
    NotABoolean { key: String, value: String },
}

impl RequirementErrorKind {
    /// The message of a check fleet did not have (size limits, `AtMostOnce`), or None for
    /// fleet's own checks.
    fn limit_message(&self) -> Option<String> {
        Some(match self {
            RequirementErrorKind::ValueTooLong { key } => format!(
                "[X-Fleet] {key} value exceeds {MAX_VALUE_BYTES} bytes after specifier expansion"
            ),
            RequirementErrorKind::SectionTooLarge { expanded: false } => {
                format!("[X-Fleet] section exceeds {MAX_SECTION_BYTES} bytes")
            }
            RequirementErrorKind::SectionTooLarge { expanded: true } => format!(
                "[X-Fleet] section exceeds {MAX_SECTION_BYTES} bytes after specifier expansion"
            ),
            RequirementErrorKind::TooManyPatterns { patterns } => format!(
                "[X-Fleet] {patterns} Conflicts and Replaces patterns exceed {MAX_PATTERNS}"
            ),
            RequirementErrorKind::TooManyPairs { peers, patterns } => format!(
                "[X-Fleet] requirements too large to check: {peers} MachineOf values x {patterns} Conflicts and Replaces patterns exceed {MAX_MATCH_PAIRS} pairs"
            ),
            RequirementErrorKind::TooMuchMatching {
                peer_bytes,
                pattern_bytes,
            } => format!(
                "[X-Fleet] requirements too large to check: {peer_bytes} bytes of MachineOf values x {pattern_bytes} bytes of Conflicts and Replaces patterns exceed {MAX_MATCH_WORK}"
            ),
            RequirementErrorKind::NotABoolean { key, value } => format!(
                "[X-Fleet] {key} value {} is not a boolean: use true or false",
                go_quote(value)
            ),
            _ => return None,
        })
    }
}

/// A unit whose `[X-Fleet]` section fleet would refuse. `Display` names the unit and the
/// options; [`RequirementError::fleet_message`] is fleet's exact text (for API answers).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequirementError {
    pub unit: UnitName,
    pub kind: RequirementErrorKind,
}

impl RequirementError {
    /// The message fleet v1.0 gave, word for word (e.g. `MachineID cannot be used with Peers`).
    pub fn fleet_message(&self) -> String {
        if let Some(m) = self.kind.limit_message() {
            return m;
        }
        match &self.kind {
            RequirementErrorKind::PeerMatchesConflict { peer, conflict } => format!(
                "unresolvable requirements: peer {} matches conflict {}",
                go_quote(peer),
                go_quote(conflict)
            ),
            RequirementErrorKind::PeerMatchesReplace { peer, replace } => format!(
                "unresolvable requirements: peer {} matches replace {}",
                go_quote(peer),
                go_quote(replace)
            ),
            RequirementErrorKind::Combination { first, second } => format!(
                "{} cannot be used with {}",
                first.fleet_word(),
                second.fleet_word()
            ),
            _ => String::new(),
        }
    }
}

impl fmt::Display for RequirementError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "unit {}: ", self.unit)?;
        match &self.kind {
            RequirementErrorKind::PeerMatchesConflict { peer, conflict } => write!(
                f,
                "unresolvable requirements: MachineOf={peer} matches Conflicts={conflict}"
            ),
            RequirementErrorKind::PeerMatchesReplace { peer, replace } => write!(
                f,
                "unresolvable requirements: MachineOf={peer} matches Replaces={replace}"
            ),
            RequirementErrorKind::Combination { first, second } => write!(
                f,
                "{} cannot be used with {}",
                first.option_name(),
                second.option_name()
            ),
            kind => f.write_str(&kind.limit_message().unwrap_or_default()),
        }
    }
}

impl std::error::Error for RequirementError {}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(name: &str, xfleet: &str) -> Result<(Requirements, Vec<String>), RequirementError> {
        let name = UnitName::parse(name).expect("valid name");
        Requirements::from_unit(&name, &with_x_fleet(xfleet))
    }

    fn with_x_fleet(xfleet: &str) -> UnitFile {
        UnitFile::parse(&format!(
            "[Service]\nExecStart=/bin/true\n\n[X-Fleet]\n{xfleet}"
        ))
        .expect("valid unit")
    }

    fn md(pairs: &[(&str, &[&str])]) -> BTreeMap<String, Vec<String>> {
        pairs
            .iter()
            .map(|(k, vs)| (k.to_string(), vs.iter().map(|v| v.to_string()).collect()))
            .collect()
    }

    fn strs(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn reads_requirements() {
        let cases: Vec<(&str, &str, Requirements)> = vec![
            ("a.service", "", Requirements::default()),
            (
                "a.service",
                "MachineID=abc\nMachineID=def\n",
                Requirements {
                    machine_id: Some("abc".into()),
                    ..Default::default()
                },
            ),
            (
                "a.service",
                "X-ConditionMachineID=old\n",
                Requirements {
                    machine_id: Some("old".into()),
                    ..Default::default()
                },
            ),
            (
                "a.service",
                "X-ConditionMachineBootID=boot\nX-ConditionMachineID=mid\n",
                Requirements {
                    machine_id: Some("mid".into()),
                    ..Default::default()
                },
            ),
            (
                "pin@m1.service",
                "MachineID=%i\n",
                Requirements {
                    machine_id: Some("m1".into()),
                    ..Default::default()
                },
            ),
            (
                "a.service",
                "MachineOf=b.service\nX-ConditionMachineOf=c.service\n",
                Requirements {
                    machine_of: strs(&["c.service", "b.service"]),
                    ..Default::default()
                },
            ),
            (
                "sidekick@web.service",
                "MachineOf=%i.service\n",
                Requirements {
                    machine_of: strs(&["web.service"]),
                    ..Default::default()
                },
            ),
            (
                "a.service",
                "MachineMetadata=\"region=us-east-1\" \"diskType=SSD\"\nMachineMetadata=region=us-west-1\nX-ConditionMachineMetadata=region=eu\n",
                Requirements {
                    metadata: md(&[
                        ("diskType", &["SSD"]),
                        ("region", &["eu", "us-east-1", "us-west-1"]),
                    ]),
                    ..Default::default()
                },
            ),
            (
                "metadata@host1.service",
                "MachineMetadata=hostname=%i\n",
                Requirements {
                    metadata: md(&[("hostname", &["host1"])]),
                    ..Default::default()
                },
            ),
            (
                "a.service",
                "Conflicts=x.service y.service\nX-Conflicts=z.service\nConflicts=\"q.service\" \"r.*\"\n",
                Requirements {
                    conflicts: strs(&["z.service", "x.service", "y.service", "q.service", "r.*"]),
                    ..Default::default()
                },
            ),
            (
                "a.service",
                "Global=true\nGlobal=no\n",
                Requirements::default(),
            ),
            (
                "a.service",
                "Global=false\nGlobal=Yes\n",
                Requirements {
                    global: true,
                    ..Default::default()
                },
            ),
            (
                "a.service",
                "Global=t\nMachineMetadata=role=edge\nConflicts=b.service\n",
                Requirements {
                    global: true,
                    metadata: md(&[("role", &["edge"])]),
                    conflicts: strs(&["b.service"]),
                    ..Default::default()
                },
            ),
            (
                "a.service",
                "Replaces=b.service\nReplaces=\"c.service\" \"d.service\"\n",
                Requirements {
                    replaces: strs(&["b.service", "c.service", "d.service"]),
                    ..Default::default()
                },
            ),
        ];
        for (name, xfleet, want) in cases {
            let (got, warnings) = read(name, xfleet).expect("valid requirements");
            assert_eq!(got, want, "{name} {xfleet:?}");
            assert!(warnings.is_empty(), "{name} {xfleet:?}: {warnings:?}");
        }
    }

    #[test]
    fn at_most_once_is_a_checked_boolean() {
        // (x-fleet section, the value read)
        let ok: &[(&str, bool)] = &[
            ("", false),
            ("AtMostOnce=true\n", true),
            ("AtMostOnce=YES\n", true),
            ("AtMostOnce=1\n", true),
            ("AtMostOnce=on\n", true),
            ("AtMostOnce=t\n", true),
            ("AtMostOnce=false\n", false),
            ("AtMostOnce=No\n", false),
            ("AtMostOnce=0\n", false),
            ("AtMostOnce=off\n", false),
            ("AtMostOnce=f\n", false),
            // the last value wins, as for Global
            ("AtMostOnce=true\nAtMostOnce=false\n", false),
            ("AtMostOnce=false\nAtMostOnce=true\n", true),
            // with the other scheduling options
            ("AtMostOnce=true\nMachineID=m1\n", true),
            (
                "AtMostOnce=true\nMachineOf=db.service\nConflicts=web.*\n",
                true,
            ),
            ("AtMostOnce=true\nReplaces=old.service\n", true),
            ("AtMostOnce=true\nGlobal=false\n", true),
        ];
        for (xfleet, want) in ok {
            let (got, warnings) = read("a.service", xfleet).expect(xfleet);
            assert_eq!(got.at_most_once, *want, "{xfleet:?}");
            assert!(warnings.is_empty(), "{xfleet:?}: {warnings:?}");
        }
        let (got, _) = read("a@true.service", "AtMostOnce=%i\n").expect("expanded");
        assert!(got.at_most_once);
        // a template names its instance: checked per instance, not in the template
        let template: UnitName = "a@.service".parse().expect("name");
        let (got, _) = Requirements::from_submitted(&template, &with_x_fleet("AtMostOnce=%i\n"))
            .expect("template accepted");
        assert!(!got.at_most_once);
        // (x-fleet section, the API's message)
        let bad: &[(&str, &str)] = &[
            (
                "AtMostOnce=maybe\n",
                "[X-Fleet] AtMostOnce value \"maybe\" is not a boolean: use true or false",
            ),
            (
                "AtMostOnce=\n",
                "[X-Fleet] AtMostOnce value \"\" is not a boolean: use true or false",
            ),
            // a bad last value is refused even after a good one (the last one counts)
            (
                "AtMostOnce=true\nAtMostOnce=ture\n",
                "[X-Fleet] AtMostOnce value \"ture\" is not a boolean: use true or false",
            ),
            (
                "Global=true\nAtMostOnce=true\n",
                "Global cannot be used with AtMostOnce",
            ),
        ];
        let name: UnitName = "a.service".parse().expect("name");
        for (xfleet, want) in bad {
            let err = Requirements::from_submitted(&name, &with_x_fleet(xfleet)).expect_err(xfleet);
            assert_eq!(err.fleet_message(), *want, "{xfleet:?}");
            assert_eq!(err.to_string(), format!("unit a.service: {want}"));
        }
    }

    /// Regression: a stored unit whose `AtMostOnce` is not a boolean (written by fleet v1.0,
    /// to which it was an unknown key, or imported from it) became invalid after an upgrade,
    /// and the engine took it off its machine. Read from the store, such a value is false,
    /// with a warning.
    #[test]
    fn a_stored_non_boolean_at_most_once_reads_as_false() {
        for xfleet in [
            "AtMostOnce=maybe\n",
            "AtMostOnce=\n",
            "Global=true\nAtMostOnce=x\n",
        ] {
            let (got, warnings) = read("a.service", xfleet).expect(xfleet);
            assert!(!got.at_most_once, "{xfleet:?}");
            assert!(
                warnings.iter().any(|w| w.starts_with(AT_MOST_ONCE_IGNORED)),
                "{xfleet:?}: {warnings:?}"
            );
        }
    }

    #[test]
    fn warns_about_unknown_keys_and_bad_metadata() {
        let cases: &[(&str, &[&str])] = &[
            (
                "Foo=bar\nMachineID=x\nFoo=baz\nbar=1\n",
                &[
                    "unrecognized requirement in [X-Fleet] section: \"Foo\"",
                    "unrecognized requirement in [X-Fleet] section: \"bar\"",
                ],
            ),
            (
                "MachineMetadata=a=b=c\nMachineMetadata=novalue\nMachineMetadata==x\nMachineMetadata=ok=1\n",
                &[
                    "ignoring MachineMetadata value \"a=b=c\": expected key=value",
                    "ignoring MachineMetadata value \"novalue\": expected key=value",
                    "ignoring MachineMetadata value \"=x\": expected key=value",
                ],
            ),
        ];
        for (xfleet, want) in cases {
            let (_, warnings) = read("a.service", xfleet).expect("valid");
            assert_eq!(warnings, *want, "{xfleet:?}");
        }
    }

    #[test]
    fn rejects_what_fleet_rejects() {
        // (x-fleet section, fleet's message, our message)
        let cases: &[(&str, &str, &str)] = &[
            (
                "MachineOf=db.service\nConflicts=db.*\n",
                "unresolvable requirements: peer \"db.service\" matches conflict \"db.*\"",
                "unit a.service: unresolvable requirements: MachineOf=db.service matches Conflicts=db.*",
            ),
            (
                "MachineOf=db.service\nReplaces=db.service\n",
                "unresolvable requirements: peer \"db.service\" matches replace \"db.service\"",
                "unit a.service: unresolvable requirements: MachineOf=db.service matches Replaces=db.service",
            ),
            (
                "MachineID=m1\nMachineOf=db.service\n",
                "MachineID cannot be used with Peers",
                "unit a.service: MachineID cannot be used with MachineOf",
            ),
            (
                "MachineID=m1\nConflicts=x.service\n",
                "MachineID cannot be used with Conflicts",
                "unit a.service: MachineID cannot be used with Conflicts",
            ),
            (
                "MachineID=m1\nGlobal=true\n",
                "MachineID cannot be used with Global",
                "unit a.service: MachineID cannot be used with Global",
            ),
            (
                "X-ConditionMachineID=m1\nReplaces=x.service\n",
                "MachineID cannot be used with Replaces",
                "unit a.service: MachineID cannot be used with Replaces",
            ),
            (
                "Global=true\nMachineOf=db.service\n",
                "Global cannot be used with Peers",
                "unit a.service: Global cannot be used with MachineOf",
            ),
            (
                "Global=true\nReplaces=x.service\n",
                "Global cannot be used with Replaces",
                "unit a.service: Global cannot be used with Replaces",
            ),
            (
                "X-Conflicts=x.service\nReplaces=y.service\n",
                "Conflicts cannot be used with Replaces",
                "unit a.service: Conflicts cannot be used with Replaces",
            ),
        ];
        for (xfleet, fleet, ours) in cases {
            let err = read("a.service", xfleet).expect_err(xfleet);
            assert_eq!(err.fleet_message(), *fleet, "{xfleet:?}");
            assert_eq!(err.to_string(), *ours, "{xfleet:?}");
        }
    }

    /// A unit made of these `[X-Fleet]` options (built from options, as the API does, so
    /// values may be as long as a line allows).
    fn x_fleet(opts: &[(&str, String)]) -> UnitFile {
        UnitFile::from_options(
            opts.iter()
                .map(|(k, v)| crate::UnitOption::new(X_FLEET, *k, v.clone()))
                .collect(),
        )
    }

    #[test]
    fn refuses_requirements_too_large_to_check() {
        let a = |n: usize| "a".repeat(n);
        let many = |key: &'static str, n: usize, v: String| vec![(key, v); n];
        // the unit of the security review: 250 MachineOf and 250 Conflicts=*aaa…b of ~2,000
        // characters, 62,500 pairs that each cost ~len(name) x len(pattern) before
        let mut hostile = many("MachineOf", 250, a(2000));
        hostile.extend(many("Conflicts", 250, format!("*{}b", a(1998))));
        // a value that %n makes longer than a line
        let long_name = format!("{}.service", "x".repeat(200));
        let expanded = vec![("MachineOf", "%n".repeat(20))];
        // a section that is large only in total
        let large = many("MachineMetadata", 40, format!("k={}", a(1998)));
        // many options with nothing in them
        let empty: Vec<(&str, String)> = vec![("", String::new()); 40000];
        // many short pairs
        let mut pairs = many("MachineOf", 40, "db.service".into());
        pairs.extend(many("Conflicts", 30, "web.*".into()));
        pairs.extend(many("X-Conflicts", 10, "x.*".into()));
        // within the section as written, over it once %n is expanded (41 x 1,600 bytes)
        let grows = many("MachineOf", 41, "%n".repeat(100));
        let grows_name = format!("{}.service", "g".repeat(8));
        // patterns without MachineOf: no pairs to check, but the scheduler matches them all
        let patterns: Vec<(&str, String)> = vec![(
            "Conflicts",
            (0..250)
                .map(|i| format!("c{i}.*"))
                .collect::<Vec<_>>()
                .join(" "),
        )];
        let mut patterns_and_replaces = patterns.clone();
        patterns_and_replaces.extend(many("Replaces", 7, "r.service".into()));
        let split = vec![("X-Conflicts", "a.* ".repeat(300))];
        // few pairs, but long ones
        let mut heavy = many("MachineOf", 16, a(2000));
        heavy.extend(many("Conflicts", 16, format!("*{}b", a(1998))));
        type Case<'a> = (&'a str, Vec<(&'a str, String)>, String);
        let cases: Vec<Case<'_>> = vec![
            (
                "a.service",
                hostile,
                "[X-Fleet] section exceeds 65536 bytes".into(),
            ),
            (
                "a.service",
                empty,
                "[X-Fleet] section exceeds 65536 bytes".into(),
            ),
            (
                "a.service",
                pairs,
                "[X-Fleet] requirements too large to check: 40 MachineOf values x 40 Conflicts and Replaces patterns exceed 1024 pairs".into(),
            ),
            (
                &long_name,
                expanded,
                "[X-Fleet] MachineOf value exceeds 2048 bytes after specifier expansion".into(),
            ),
            (
                &grows_name,
                grows,
                "[X-Fleet] section exceeds 65536 bytes after specifier expansion".into(),
            ),
            (
                "a.service",
                patterns_and_replaces,
                "[X-Fleet] 257 Conflicts and Replaces patterns exceed 256".into(),
            ),
            (
                "a.service",
                split,
                "[X-Fleet] 300 Conflicts and Replaces patterns exceed 256".into(),
            ),
            (
                "a.service",
                large,
                "[X-Fleet] section exceeds 65536 bytes".into(),
            ),
            (
                "a.service",
                heavy,
                "[X-Fleet] requirements too large to check: 32000 bytes of MachineOf values x 32000 bytes of Conflicts and Replaces patterns exceed 16777216".into(),
            ),
        ];
        for (name, opts, want) in cases {
            let name = UnitName::parse(name).expect("valid name");
            let err = Requirements::from_unit(&name, &x_fleet(&opts)).expect_err(&want);
            assert_eq!(err.fleet_message(), want);
            assert_eq!(err.to_string(), format!("unit {name}: {want}"));
        }
        // the same unit as text written straight to etcd, as the engine and agents read it
        let text = format!(
            "[Service]\nExecStart=/bin/true\n\n[X-Fleet]\n{}",
            format!("MachineOf={}\nConflicts=*{}b\n", a(2000), a(1998)).repeat(250)
        );
        let stored = UnitFile::parse(&text).expect("stored text parses");
        let name = UnitName::parse("a.service").expect("valid name");
        let err = Requirements::from_unit(&name, &stored).expect_err("too large");
        assert_eq!(err.fleet_message(), "[X-Fleet] section exceeds 65536 bytes");
        // just inside the limits: checked, and a match is still found
        let mut inside = many("MachineOf", 31, a(100));
        inside.push(("MachineOf", format!("{}b", a(99))));
        inside.extend(many("Conflicts", 32, format!("*{}b", a(98))));
        let name = UnitName::parse("a.service").expect("valid name");
        let err = Requirements::from_unit(&name, &x_fleet(&inside)).expect_err("conflict");
        assert!(
            err.fleet_message()
                .starts_with("unresolvable requirements: peer"),
            "{err}"
        );
        // as many patterns as allowed, in Conflicts and Replaces of two units
        let (req, _) = Requirements::from_unit(&name, &x_fleet(&patterns)).expect("250 patterns");
        assert_eq!(req.conflicts.len(), 250);
        let max = vec![("Replaces", "r.service".to_string()); MAX_PATTERNS];
        let (req, _) = Requirements::from_unit(&name, &x_fleet(&max)).expect("256 patterns");
        assert_eq!(req.replaces.len(), MAX_PATTERNS);
    }

    #[test]
    fn machine_checks() {
        let (req, _) = read(
            "a.service",
            "MachineMetadata=\"region=us-east-1\" \"region=us-west-1\"\nMachineMetadata=disk=ssd\nConflicts=web.*\n",
        )
        .expect("valid");
        let machine = |pairs: &[(&str, &str)]| -> BTreeMap<String, String> {
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        let cases: &[(&[(&str, &str)], bool)] = &[
            (&[("region", "us-east-1"), ("disk", "ssd")], true),
            (
                &[("region", "us-west-1"), ("disk", "ssd"), ("x", "y")],
                true,
            ),
            (&[("region", "eu"), ("disk", "ssd")], false),
            (&[("region", "us-east-1")], false),
            (&[], false),
        ];
        for (pairs, want) in cases {
            assert_eq!(
                req.metadata_satisfied_by(&machine(pairs)),
                *want,
                "{pairs:?}"
            );
        }
        assert!(req.conflicts_with("web.1.service"));
        assert!(!req.conflicts_with("db.service"));
    }
}
