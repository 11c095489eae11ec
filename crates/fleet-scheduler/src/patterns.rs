//! An index of glob patterns (`Conflicts`, `Replaces`) against unit names, so the scheduler
//! can find "who conflicts with whom" without matching every pattern against every unit.
//!
//! Each distinct pattern is matched once against the sorted unit names that share its literal
//! prefix. Patterns whose prefix range is too large to enumerate cheaply are "broad": they are
//! matched on demand against the few units on one machine instead.
//!
//! Every distinct pattern is compiled once, when the index is built; matching never compiles.

use fleet_unit::{Glob, is_literal_pattern, literal_prefix};

use crate::fasthash::FastMap;

/// Prefix ranges longer than this make a pattern broad.
const BROAD_LIMIT: usize = 4096;

pub(crate) struct PatternIndex {
    /// Each distinct pattern compiled; None for a malformed one (it matches nothing).
    globs: Vec<Option<Glob>>,
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

impl PatternIndex {
    /// `names` are all unit names, sorted; `in_universe` says which units take part (both as
    /// declarers and as match targets); `declared(u)` gives unit `u`'s patterns.
    pub(crate) fn build<'a>(
        names: &[&'a str],
        in_universe: &[bool],
        declared: impl Fn(usize) -> &'a [String],
    ) -> PatternIndex {
        let n = names.len();
        let mut idx = PatternIndex {
            globs: Vec::new(),
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
                        let id = idx.globs.len() as u32;
                        ids.insert(pattern, id);
                        let glob = Glob::new(pattern);
                        let matches = match_range(names, in_universe, pattern, glob.as_ref());
                        if let Some(list) = &matches {
                            for &w in list {
                                idx.matched_by[w as usize].push(id);
                            }
                        }
                        idx.globs.push(glob);
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

    /// Whether pattern `p` matches `name`.
    fn matches(&self, p: u32, name: &str) -> bool {
        self.globs[p as usize]
            .as_ref()
            .is_some_and(|g| g.matches(name))
    }

    /// Whether one of `u`'s broad patterns matches `name`.
    pub(crate) fn broad_matches(&self, u: usize, name: &str) -> bool {
        self.has_broad[u]
            && self.own[u]
                .iter()
                .any(|p| self.matches[*p as usize].is_none() && self.matches(*p, name))
    }

    /// Whether any of `u`'s patterns (narrow or broad) matches `name`.
    pub(crate) fn any_matches(&self, u: usize, name: &str) -> bool {
        self.own[u].iter().any(|p| self.matches(*p, name))
    }
}

/// The universe units matching `pattern` (compiled: `glob`, None when malformed), or None
/// when the pattern is broad.
fn match_range(
    names: &[&str],
    in_universe: &[bool],
    pattern: &str,
    glob: Option<&Glob>,
) -> Option<Vec<u32>> {
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
            .filter(|i| in_universe[*i] && glob.is_some_and(|g| g.matches(names[*i])))
            .map(|i| i as u32)
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use fleet_unit::glob_match;

    use super::*;

    /// The index (narrow lists, broad patterns, malformed ones, the universe) answers what
    /// matching every pattern against every name answers.
    #[test]
    fn index_agrees_with_matching_every_pair() {
        // 5,000 names sharing the prefix "w" make "w*" broad
        let mut owned: Vec<String> = (0..5000).map(|i| format!("w{i:04}.service")).collect();
        owned.extend(
            [
                "a.service",
                "ab.service",
                "b@1.service",
                "b@2.service",
                "c.service",
            ]
            .map(String::from),
        );
        owned.sort();
        let names: Vec<&str> = owned.iter().map(String::as_str).collect();
        let at = |name: &str| names.binary_search(&name).expect("known name");
        let mut declared: Vec<Vec<String>> = vec![Vec::new(); names.len()];
        let strs = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        // literal, prefixed, malformed, outside the universe; twice the same pattern
        declared[at("a.service")] = strs(&["b@*.service", "a*", "[", "c.service", "a*"]);
        // broad: a long prefix range, and no prefix at all
        declared[at("ab.service")] = strs(&["w*", "*1.service"]);
        declared[at("b@1.service")] = strs(&["w000?.service", "b@[12].service", "a.service"]);
        // declared by a unit outside the universe: not indexed
        declared[at("c.service")] = strs(&["a.service"]);
        let in_universe: Vec<bool> = names.iter().map(|n| *n != "c.service").collect();
        let idx = PatternIndex::build(&names, &in_universe, |u| declared[u].as_slice());
        assert!(idx.any_broad);
        let mut pairs = 0;
        for u in 0..names.len() {
            assert_eq!(
                idx.declares_any(u),
                in_universe[u] && !declared[u].is_empty()
            );
            if !idx.declares_any(u) {
                continue;
            }
            let targets: BTreeSet<u32> = idx.targets(u).collect();
            for (w, name) in names.iter().enumerate() {
                let want = declared[u].iter().any(|p| glob_match(p, name));
                assert_eq!(idx.any_matches(u, name), want, "{} {name}", names[u]);
                let narrow = targets.contains(&(w as u32));
                assert!(!narrow || in_universe[w], "{} {name}", names[u]);
                if in_universe[w] {
                    let found = narrow || idx.broad_matches(u, name);
                    assert_eq!(found, want, "{} {name}", names[u]);
                    let source = idx.sources(w).any(|s| s as usize == u);
                    assert_eq!(source, narrow, "{} {name}", names[u]);
                    pairs += usize::from(want);
                }
            }
        }
        // a.service: b@1, b@2, a, ab; ab: 5,000 w, b@1; b@1: 10 w, b@1, b@2, a
        assert_eq!(pairs, 4 + 5001 + 13);
    }
}
