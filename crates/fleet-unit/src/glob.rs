//! Glob matching with the semantics of Go's `path.Match`, which fleet used for `Conflicts`,
//! `Replaces` and the `MachineOf`-versus-`Conflicts` validation.
//!
//! `*` matches any run of characters other than `/`, `?` one character other than `/`,
//! `[...]` a character class (`^` negates, `a-z` ranges, `\` escapes), `\c` the character `c`.
//! A malformed pattern (unterminated class, empty class, trailing `\`, ...) matches nothing,
//! which is what fleet's callers observed because they ignored the error.

/// Whether `name` matches the Go `path.Match` pattern `pattern`. Malformed patterns match nothing.
pub fn glob_match(pattern: &str, name: &str) -> bool {
    Glob::new(pattern).is_some_and(|g| g.matches(name))
}

/// Whether `pattern` is a well-formed Go `path.Match` pattern.
pub fn is_valid_pattern(pattern: &str) -> bool {
    let mut chars = pattern.chars();
    while let Some(c) = chars.next() {
        let ok = match c {
            '\\' => chars.next().is_some(),
            '[' => skip_class(&mut chars),
            _ => true,
        };
        if !ok {
            return false;
        }
    }
    true
}

/// Whether `pattern` contains any glob metacharacter (if not, it only matches itself).
pub fn is_literal_pattern(pattern: &str) -> bool {
    !pattern.contains(['*', '?', '[', '\\'])
}

/// The literal text every match of `pattern` must start with (the text before the first
/// metacharacter). Used to narrow a sorted name list before matching.
pub fn literal_prefix(pattern: &str) -> &str {
    match pattern.find(['*', '?', '[', '\\']) {
        Some(i) => &pattern[..i],
        None => pattern,
    }
}

/// Consumes a character class body (after `[`) up to and including `]`; false if malformed.
fn skip_class(chars: &mut std::str::Chars<'_>) -> bool {
    let mut rest = chars.clone();
    if rest.clone().next() == Some('^') {
        rest.next();
    }
    let mut ranges = 0usize;
    loop {
        if rest.clone().next() == Some(']') && ranges > 0 {
            rest.next();
            *chars = rest;
            return true;
        }
        if class_char(&mut rest).is_none() {
            return false;
        }
        if rest.clone().next() == Some('-') {
            rest.next();
            if class_char(&mut rest).is_none() {
                return false;
            }
        }
        ranges += 1;
    }
}

/// One (possibly escaped) character of a class; None when malformed or when the class
/// would end right after it without a closing bracket.
fn class_char(chars: &mut std::str::Chars<'_>) -> Option<char> {
    let c = chars.next()?;
    let c = match c {
        '-' | ']' => return None,
        '\\' => chars.next()?,
        c => c,
    };
    // A class must continue after any character (at least its closing bracket).
    chars.clone().next()?;
    Some(c)
}

/// Splits off the leading stars and the next chunk (text up to the next unbracketed `*`).
fn scan_chunk(pattern: &str) -> (bool, &str, &str) {
    let trimmed = pattern.trim_start_matches('*');
    let star = trimmed.len() != pattern.len();
    let mut in_class = false;
    let mut iter = trimmed.char_indices();
    while let Some((i, c)) = iter.next() {
        match c {
            '\\' => {
                iter.next();
            }
            '[' => in_class = true,
            ']' => in_class = false,
            '*' if !in_class => return (star, &trimmed[..i], &trimmed[i..]),
            _ => {}
        }
    }
    (star, trimmed, "")
}

/// One element of a chunk: it always consumes exactly one character of the name.
#[derive(Debug, Clone)]
enum Elem {
    Lit(char),
    /// `?`: any character but `/`.
    Any,
    /// `[...]`: inclusive ranges, possibly negated (may match `/`, as in Go).
    Class {
        negated: bool,
        ranges: Vec<(char, char)>,
    },
}

impl Elem {
    fn matches(&self, c: char) -> bool {
        match self {
            Elem::Lit(l) => *l == c,
            Elem::Any => c != '/',
            Elem::Class { negated, ranges } => {
                ranges.iter().any(|(lo, hi)| *lo <= c && c <= *hi) != *negated
            }
        }
    }
}

/// The text between stars: a fixed number of elements, and its text when all are literal
/// (then it is found with a linear-time substring search).
#[derive(Debug, Clone)]
struct Chunk {
    /// Whether stars precede it (only the first chunk can lack them).
    star: bool,
    elems: Vec<Elem>,
    literal: Option<String>,
}

impl Chunk {
    /// `text` is a well-formed chunk (no unbracketed star).
    fn parse(star: bool, text: &str) -> Option<Chunk> {
        let mut chars = text.chars();
        let mut elems = Vec::new();
        while let Some(c) = chars.next() {
            elems.push(match c {
                '?' => Elem::Any,
                '\\' => Elem::Lit(chars.next()?),
                '[' => {
                    let mut negated = false;
                    if chars.clone().next() == Some('^') {
                        chars.next();
                        negated = true;
                    }
                    let mut ranges = Vec::new();
                    loop {
                        if chars.clone().next() == Some(']') && !ranges.is_empty() {
                            chars.next();
                            break;
                        }
                        let lo = class_char(&mut chars)?;
                        let mut hi = lo;
                        if chars.clone().next() == Some('-') {
                            chars.next();
                            hi = class_char(&mut chars)?;
                        }
                        ranges.push((lo, hi));
                    }
                    Elem::Class { negated, ranges }
                }
                c => Elem::Lit(c),
            });
        }
        let literal = elems
            .iter()
            .map(|e| match e {
                Elem::Lit(c) => Some(*c),
                _ => None,
            })
            .collect::<Option<String>>();
        Some(Chunk {
            star,
            elems,
            literal,
        })
    }

    /// Whether the chunk matches at the start of `s`; the rest of `s` if so. O(chunk).
    fn match_at<'a>(&self, s: &'a str) -> Option<&'a str> {
        if let Some(lit) = &self.literal {
            return s.strip_prefix(lit.as_str());
        }
        let mut chars = s.chars();
        for e in &self.elems {
            if !e.matches(chars.next()?) {
                return None;
            }
        }
        Some(chars.as_str())
    }

    /// The leftmost match starting at a byte offset `<= limit` of `s`: (start, rest after
    /// it). Literal chunks use `str::find` (linear in `s` plus the chunk); others a
    /// shift-and scan, O(len(s) · (elements / 64 + class ranges)).
    fn find<'a>(&self, s: &'a str, limit: usize) -> Option<&'a str> {
        if let Some(lit) = &self.literal {
            let at = s.find(lit.as_str())?;
            return (at <= limit).then(|| &s[at + lit.len()..]);
        }
        let k = self.elems.len();
        let masks = Masks::new(&self.elems);
        let mut state = vec![0u64; masks.words];
        let mut mask = vec![0u64; masks.words];
        let last_word = (k - 1) / 64;
        let last_bit = 1u64 << ((k - 1) % 64);
        // byte offsets of the last k characters seen, to recover where a match started
        let mut starts = std::collections::VecDeque::with_capacity(k);
        for (i, c) in s.char_indices() {
            if starts.len() == k {
                starts.pop_front();
            }
            starts.push_back(i);
            if starts.front().is_some_and(|st| *st > limit) {
                return None;
            }
            masks.of(c, &self.elems, &mut mask);
            let mut carry = 1u64;
            for (w, m) in state.iter_mut().zip(&mask) {
                let next_carry = *w >> 63;
                *w = ((*w << 1) | carry) & m;
                carry = next_carry;
            }
            if state[last_word] & last_bit != 0 {
                let end = i + c.len_utf8();
                return Some(&s[end..]);
            }
        }
        None
    }
}

/// Which elements of a chunk each character matches, as bit sets (for the shift-and scan).
struct Masks {
    words: usize,
    /// Bits of the literal elements, per character.
    literal: std::collections::HashMap<char, Vec<u64>>,
    /// Bits of the `?` elements (they match anything but `/`).
    any: Vec<u64>,
    /// Indexes of the class elements, tested one by one.
    classes: Vec<usize>,
}

impl Masks {
    fn new(elems: &[Elem]) -> Masks {
        let words = elems.len().div_ceil(64);
        let mut m = Masks {
            words,
            literal: std::collections::HashMap::new(),
            any: vec![0; words],
            classes: Vec::new(),
        };
        for (j, e) in elems.iter().enumerate() {
            let bit = 1u64 << (j % 64);
            match e {
                Elem::Lit(c) => {
                    m.literal.entry(*c).or_insert_with(|| vec![0; words])[j / 64] |= bit
                }
                Elem::Any => m.any[j / 64] |= bit,
                Elem::Class { .. } => m.classes.push(j),
            }
        }
        m
    }

    /// Writes into `out` the bits of the elements that match `c`.
    fn of(&self, c: char, elems: &[Elem], out: &mut [u64]) {
        match self.literal.get(&c) {
            Some(bits) => out.copy_from_slice(bits),
            None => out.iter_mut().for_each(|w| *w = 0),
        }
        if c != '/' {
            out.iter_mut().zip(&self.any).for_each(|(w, a)| *w |= a);
        }
        for &j in &self.classes {
            if elems[j].matches(c) {
                out[j / 64] |= 1 << (j % 64);
            }
        }
    }
}

/// A compiled Go `path.Match` pattern. Matching costs O(len(name) + len(pattern)) when the
/// text between stars is literal (the usual case), and never backtracks over earlier chunks:
/// Go's algorithm is greedy (each starred chunk takes its leftmost match), so the leftmost
/// match is found with one scan per chunk instead of one attempt per position.
#[derive(Debug, Clone)]
pub struct Glob {
    chunks: Vec<Chunk>,
    /// Stars end the pattern: the rest of the name must have no `/`.
    trailing_star: bool,
    /// How many characters a matching name has at least.
    min_chars: usize,
}

impl Glob {
    /// Compiles `pattern`; None when it is malformed (a malformed pattern matches nothing).
    pub fn new(pattern: &str) -> Option<Glob> {
        if !is_valid_pattern(pattern) {
            return None;
        }
        let mut chunks = Vec::new();
        let mut trailing_star = false;
        let mut rest = pattern;
        while !rest.is_empty() {
            let (star, chunk, r) = scan_chunk(rest);
            rest = r;
            if star && chunk.is_empty() {
                trailing_star = true;
                break;
            }
            chunks.push(Chunk::parse(star, chunk)?);
        }
        let min_chars = chunks.iter().map(|c| c.elems.len()).sum();
        Some(Glob {
            chunks,
            trailing_star,
            min_chars,
        })
    }

    /// Whether `name` matches.
    pub fn matches(&self, name: &str) -> bool {
        // Every character is at least one byte: a cheap bound before counting characters.
        if name.len() < self.min_chars || name.chars().count() < self.min_chars {
            return false;
        }
        let mut name = name;
        let n = self.chunks.len();
        for (i, chunk) in self.chunks.iter().enumerate() {
            let last = i + 1 == n && !self.trailing_star;
            if !chunk.star {
                match chunk.match_at(name) {
                    Some(t) if t.is_empty() || !last => {
                        name = t;
                        continue;
                    }
                    _ => return false,
                }
            }
            // A star never swallows a '/': the chunk must start at or before the first one.
            let limit = name.find('/').unwrap_or(name.len());
            if last {
                // The chunk must end the name: it starts `elems` characters before the end.
                let k = chunk.elems.len();
                let Some(start) = char_start_from_end(name, k) else {
                    return false;
                };
                return start <= limit && chunk.match_at(&name[start..]) == Some("");
            }
            match chunk.find(name, limit) {
                Some(t) => name = t,
                None => return false,
            }
        }
        if self.trailing_star {
            !name.contains('/')
        } else {
            name.is_empty()
        }
    }
}

/// Byte offset of the character `k` characters before the end of `s`.
fn char_start_from_end(s: &str, k: usize) -> Option<usize> {
    if k == 0 {
        return Some(s.len());
    }
    s.char_indices().rev().nth(k - 1).map(|(i, _)| i)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// The previous matcher, a direct transcription of Go's backtracking algorithm
    /// (O(len(name) x len(pattern))); the compiled matcher must agree with it everywhere.
    mod reference {
        use super::super::{class_char, scan_chunk};

        /// Matches `chunk` (no unbracketed stars, known well-formed) against the start of `s`;
        /// returns the rest of `s` on success.
        fn match_chunk<'a>(chunk: &str, s: &'a str) -> Option<&'a str> {
            let mut chunk = chunk.chars();
            let mut s_iter = s.chars();
            loop {
                let pc = match chunk.clone().next() {
                    None => return Some(s_iter.as_str()),
                    Some(pc) => pc,
                };
                let sc = s_iter.next()?;
                chunk.next();
                match pc {
                    '[' => {
                        let mut negated = false;
                        if chunk.clone().next() == Some('^') {
                            chunk.next();
                            negated = true;
                        }
                        let mut matched = false;
                        let mut ranges = 0usize;
                        loop {
                            if chunk.clone().next() == Some(']') && ranges > 0 {
                                chunk.next();
                                break;
                            }
                            let lo = class_char(&mut chunk)?;
                            let mut hi = lo;
                            if chunk.clone().next() == Some('-') {
                                chunk.next();
                                hi = class_char(&mut chunk)?;
                            }
                            if lo <= sc && sc <= hi {
                                matched = true;
                            }
                            ranges += 1;
                        }
                        if matched == negated {
                            return None;
                        }
                    }
                    '?' => {
                        if sc == '/' {
                            return None;
                        }
                    }
                    '\\' => {
                        let lit = chunk.next()?;
                        if lit != sc {
                            return None;
                        }
                    }
                    lit => {
                        if lit != sc {
                            return None;
                        }
                    }
                }
            }
        }

        pub(super) fn match_valid(mut pattern: &str, mut name: &str) -> bool {
            'chunks: while !pattern.is_empty() {
                let (star, chunk, rest) = scan_chunk(pattern);
                pattern = rest;
                if star && chunk.is_empty() {
                    // A trailing star matches the rest of the name, unless it crosses a separator.
                    return !name.contains('/');
                }
                if let Some(t) = match_chunk(chunk, name) {
                    // Without a following star the chunk must consume the whole name.
                    if t.is_empty() || !pattern.is_empty() {
                        name = t;
                        continue;
                    }
                }
                if star {
                    // Let the star swallow more and more (never a '/') and retry the chunk.
                    for (i, c) in name.char_indices() {
                        if c == '/' {
                            break;
                        }
                        let after = &name[i + c.len_utf8()..];
                        if let Some(t) = match_chunk(chunk, after) {
                            if pattern.is_empty() && !t.is_empty() {
                                continue;
                            }
                            name = t;
                            continue 'chunks;
                        }
                    }
                }
                return false;
            }
            name.is_empty()
        }
    }

    fn reference_match(pattern: &str, name: &str) -> bool {
        is_valid_pattern(pattern) && reference::match_valid(pattern, name)
    }

    const PIECES: &[&str] = &[
        "*", "*", "?", "a", "b", "/", "\\", "\\*", "[", "]", "^", "-", "[ab]", "[^a]", "[a-c]",
        "[/]", "\u{263a}", "\u{3b1}", "ab", "aab", ".", "@",
    ];
    const NAME_PIECES: &[&str] = &[
        "a", "b", "c", "/", "\u{263a}", "\u{3b1}", "ab", ".", "@", "*",
    ];

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(4000))]

        #[test]
        fn agrees_with_the_backtracking_matcher(
            pattern in prop::collection::vec(prop::sample::select(PIECES), 0..10).prop_map(|p| p.concat()),
            name in prop::collection::vec(prop::sample::select(NAME_PIECES), 0..12).prop_map(|p| p.concat()),
        ) {
            prop_assert_eq!(
                glob_match(&pattern, &name),
                reference_match(&pattern, &name),
                "pattern {:?} name {:?}", pattern, name
            );
        }
    }

    #[test]
    fn long_wildcard_chunks_match_like_the_backtracking_matcher() {
        // chunks longer than one 64-bit word, with and without a match, near a '/'
        let a = "a".repeat(150);
        let cases = [
            (format!("*{a}?b*"), format!("x{a}ab/y")),
            (format!("*{a}?b*"), format!("x{a}/b")),
            (format!("*[a]{a}b*c"), format!("{a}{a}bc")),
            (format!("*?{a}b"), format!("{a}{a}b")),
            (format!("*?{a}b"), format!("{a}{a}c")),
            (format!("*?{a}b*"), format!("/{a}{a}b")),
            (format!("x*?{a}"), format!("x{a}/{a}")),
        ];
        for (pattern, name) in cases {
            assert_eq!(
                glob_match(&pattern, &name),
                reference_match(&pattern, &name),
                "pattern {pattern:?} name {name:?}"
            );
        }
    }

    #[test]
    fn matches_like_go_path_match() {
        // (pattern, name, matches) — cases chosen after Go's own path.Match behaviour.
        let cases: &[(&str, &str, bool)] = &[
            ("abc", "abc", true),
            ("*", "abc", true),
            ("*c", "abc", true),
            ("a*", "a", true),
            ("a*", "abc", true),
            ("a*", "ab/c", false),
            ("a*/b", "abc/b", true),
            ("a*/b", "a/c/b", false),
            ("a*b*c*d*e*/f", "axbxcxdxe/f", true),
            ("a*b*c*d*e*/f", "axbxcxdxexxx/f", true),
            ("a*b*c*d*e*/f", "axbxcxdxe/xxx/f", false),
            ("a*b*c*d*e*/f", "axbxcxdxexxx/fff", false),
            ("a*b?c*x", "abxbbxdbxebxczzx", true),
            ("a*b?c*x", "abxbbxdbxebxczzy", false),
            ("ab[c]", "abc", true),
            ("ab[b-d]", "abc", true),
            ("ab[e-g]", "abc", false),
            ("ab[^c]", "abc", false),
            ("ab[^b-d]", "abc", false),
            ("ab[^e-g]", "abc", true),
            ("a\\*b", "a*b", true),
            ("a\\*b", "ab", false),
            ("a?b", "a\u{263a}b", true),
            ("a[^a]b", "a\u{263a}b", true),
            ("a???b", "a\u{263a}b", false),
            ("a[^a][^a][^a]b", "a\u{263a}b", false),
            ("[a-\u{3b6}]*", "\u{3b1}", true),
            ("*[a-\u{3b6}]", "A", false),
            ("a?b", "a/b", false),
            ("a*b", "a/b", false),
            ("[\\]a]", "]", true),
            ("[\\-]", "-", true),
            ("[x\\-]", "x", true),
            ("[x\\-]", "-", true),
            ("[x\\-]", "z", false),
            ("[\\-x]", "x", true),
            ("[\\-x]", "a", false),
            // malformed patterns never match
            ("[]a]", "]", false),
            ("[-]", "-", false),
            ("[x-]", "x", false),
            ("[-x]", "x", false),
            ("\\", "a", false),
            ("[a-b-c]", "a", false),
            ("[", "a", false),
            ("[^", "a", false),
            ("[^bc", "a", false),
            ("a[", "a", false),
            ("a[", "ab", false),
            ("*x", "xxx", true),
            // fleet-style unit globs
            ("conflict.*.service", "conflict.1.service", true),
            ("conflict.*.service", "conflict.multiple.0.service", true),
            ("conflict.*.service", "conflicts.1.service", false),
            ("web@*.service", "web@1.service", true),
            ("hello.service", "hello.service", true),
            ("hello.service", "hello@.service", false),
        ];
        for (pattern, name, want) in cases {
            assert_eq!(
                glob_match(pattern, name),
                *want,
                "pattern {pattern:?} name {name:?}"
            );
        }
    }

    #[test]
    fn literal_prefix_stops_at_first_metacharacter() {
        let cases: &[(&str, &str)] = &[
            ("web.*.service", "web."),
            ("abc", "abc"),
            ("*x", ""),
            ("a?b", "a"),
            ("a[bc]", "a"),
            ("a\\*", "a"),
        ];
        for (pattern, want) in cases {
            assert_eq!(literal_prefix(pattern), *want, "pattern {pattern:?}");
        }
    }
}
