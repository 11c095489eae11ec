//! An index of glob patterns (`Conflicts`, `Replaces`) against unit names, so the scheduler
//! can find "who conflicts with whom" without matching every pattern against every unit.
//!
//! Each distinct pattern is matched once against the sorted unit names that share its literal
//! prefix. Patterns whose prefix range is too large to enumerate cheaply are "broad": they are
//! matched on demand against the few units on one machine instead.

use fleet_unit::{glob_match, is_literal_pattern, literal_prefix};

use crate::fasthash::FastMap;

/// Prefix ranges longer than this make a pattern broad.
const BROAD_LIMIT: usize = 4096;

pub(crate) struct PatternIndex<'a> {
    patterns: Vec<&'a str>,
    /// Units (in the universe) each pattern matches; None for broad patterns.
    matches: Vec<Option<Vec<u32>>>,
    /// Unit -> ids of the patterns it declares.
    own: Vec<Vec<u32>>,
    /// Unit -> ids of the narrow patterns that match its name.
    matched_by: Vec<Vec<u32>>,
    /// Pattern -> units declaring it.
    users: Vec<Vec<u32>>,
    /// Unit -> whether it declares a broad pattern.
    has_broad: Vec<bool>,
    pub(crate) any_broad: bool,
}

impl<'a> PatternIndex<'a> {
    /// `names` are all unit names, sorted; `in_universe` says which units take part (both as
    /// declarers and as match targets); `declared(u)` gives unit `u`'s patterns.
    pub(crate) fn build(
        names: &[&'a str],
        in_universe: &[bool],
        declared: impl Fn(usize) -> &'a [String],
    ) -> PatternIndex<'a> {
        let n = names.len();
        let mut idx = PatternIndex {
            patterns: Vec::new(),
            matches: Vec::new(),
            own: vec![Vec::new(); n],
            matched_by: vec![Vec::new(); n],
            users: Vec::new(),
            has_broad: vec![false; n],
            any_broad: false,
        };
        let mut ids: FastMap<&'a str, u32> = FastMap::default();
        for u in 0..n {
            if !in_universe[u] {
                continue;
            }
            for pattern in declared(u) {
                let pattern = pattern.as_str();
                let id = match ids.get(pattern) {
                    Some(id) => *id,
                    None => {
                        let id = idx.patterns.len() as u32;
                        ids.insert(pattern, id);
                        let matches = match_range(names, in_universe, pattern);
                        if let Some(list) = &matches {
                            for &w in list {
                                idx.matched_by[w as usize].push(id);
                            }
                        }
                        idx.patterns.push(pattern);
                        idx.matches.push(matches);
                        idx.users.push(Vec::new());
                        id
                    }
                };
                if idx.own[u].contains(&id) {
                    continue;
                }
                idx.own[u].push(id);
                idx.users[id as usize].push(u as u32);
                if idx.matches[id as usize].is_none() {
                    idx.has_broad[u] = true;
                    idx.any_broad = true;
                }
            }
        }
        idx
    }

    /// Whether `u` declares any pattern.
    pub(crate) fn declares_any(&self, u: usize) -> bool {
        !self.own[u].is_empty()
    }

    /// Units matched by `u`'s narrow patterns (may repeat, may include `u`).
    pub(crate) fn targets(&self, u: usize) -> impl Iterator<Item = u32> + '_ {
        self.own[u]
            .iter()
            .filter_map(|p| self.matches[*p as usize].as_deref())
            .flatten()
            .copied()
    }

    /// Units whose narrow patterns match `u` (may repeat, may include `u`).
    pub(crate) fn sources(&self, u: usize) -> impl Iterator<Item = u32> + '_ {
        self.matched_by[u]
            .iter()
            .flat_map(|p| self.users[*p as usize].iter())
            .copied()
    }

    /// Whether one of `u`'s broad patterns matches `name`.
    pub(crate) fn broad_matches(&self, u: usize, name: &str) -> bool {
        self.has_broad[u]
            && self.own[u].iter().any(|p| {
                self.matches[*p as usize].is_none() && glob_match(self.patterns[*p as usize], name)
            })
    }

    /// Whether any of `u`'s patterns (narrow or broad) matches `name`.
    pub(crate) fn any_matches(&self, u: usize, name: &str) -> bool {
        self.own[u]
            .iter()
            .any(|p| glob_match(self.patterns[*p as usize], name))
    }
}

/// The universe units matching `pattern`, or None when the pattern is broad.
fn match_range(names: &[&str], in_universe: &[bool], pattern: &str) -> Option<Vec<u32>> {
    if is_literal_pattern(pattern) {
        return Some(match names.binary_search(&pattern) {
            Ok(i) if in_universe[i] => vec![i as u32],
            _ => Vec::new(),
        });
    }
    let prefix = literal_prefix(pattern);
    let lo = names.partition_point(|n| *n < prefix);
    let len = names[lo..].partition_point(|n| n.starts_with(prefix));
    if len > BROAD_LIMIT {
        return None;
    }
    Some(
        (lo..lo + len)
            .filter(|i| in_universe[*i] && glob_match(pattern, names[*i]))
            .map(|i| i as u32)
            .collect(),
    )
}
