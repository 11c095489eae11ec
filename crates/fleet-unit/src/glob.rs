//! Glob matching with the semantics of Go's `path.Match`, which fleet used for `Conflicts`,
//! `Replaces` and the `MachineOf`-versus-`Conflicts` validation.
//!
//! `*` matches any run of characters other than `/`, `?` one character other than `/`,
//! `[...]` a character class (`^` negates, `a-z` ranges, `\` escapes), `\c` the character `c`.
//! A malformed pattern (unterminated class, empty class, trailing `\`, ...) matches nothing,
//! which is what fleet's callers observed because they ignored the error.

/// Whether `name` matches the Go `path.Match` pattern `pattern`. Malformed patterns match nothing.
pub fn glob_match(pattern: &str, name: &str) -> bool {
    if !is_valid_pattern(pattern) {
        return false;
    }
    match_valid(pattern, name)
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

fn match_valid(mut pattern: &str, mut name: &str) -> bool {
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

#[cfg(test)]
mod tests {
    use super::*;

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
