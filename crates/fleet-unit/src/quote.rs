//! Go-style `%q` quoting, so that messages which quote user input read exactly as fleet's did.

use std::fmt::Write as _;

/// Whether Go's `unicode.IsPrint` would call `c` printable (close approximation: controls,
/// non-ASCII spaces and the common invisible format characters are not printable).
fn printable(c: char) -> bool {
    if c == ' ' {
        return true;
    }
    if c.is_control() || c.is_whitespace() {
        return false;
    }
    !matches!(
        c,
        '\u{ad}'
            | '\u{600}'..='\u{605}'
            | '\u{61c}'
            | '\u{6dd}'
            | '\u{70f}'
            | '\u{180e}'
            | '\u{200b}'..='\u{200f}'
            | '\u{202a}'..='\u{202e}'
            | '\u{2060}'..='\u{206f}'
            | '\u{feff}'
            | '\u{fff9}'..='\u{fffb}'
            | '\u{e000}'..='\u{f8ff}'
    )
}

fn escape_into(out: &mut String, c: char, quote: char) {
    match c {
        '\u{7}' => out.push_str("\\a"),
        '\u{8}' => out.push_str("\\b"),
        '\u{c}' => out.push_str("\\f"),
        '\n' => out.push_str("\\n"),
        '\r' => out.push_str("\\r"),
        '\t' => out.push_str("\\t"),
        '\u{b}' => out.push_str("\\v"),
        '\\' => out.push_str("\\\\"),
        c if c == quote => {
            out.push('\\');
            out.push(c);
        }
        c if printable(c) => out.push(c),
        c if (c as u32) < 0x80 => {
            let _ = write!(out, "\\x{:02x}", c as u32);
        }
        c if (c as u32) < 0x10000 => {
            let _ = write!(out, "\\u{:04x}", c as u32);
        }
        c => {
            let _ = write!(out, "\\U{:08x}", c as u32);
        }
    }
}

/// `fmt.Sprintf("%q", s)` for a string: double quotes, Go escapes.
pub fn go_quote(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        escape_into(&mut out, c, '"');
    }
    out.push('"');
    out
}

/// `fmt.Sprintf("%q", r)` for a rune: single quotes, Go escapes.
pub(crate) fn go_quote_char(c: char) -> String {
    let mut out = String::with_capacity(4);
    out.push('\'');
    escape_into(&mut out, c, '\'');
    out.push('\'');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quotes_like_go() {
        let cases: &[(&str, &str)] = &[
            ("Foo", "\"Foo\""),
            ("a\"b", "\"a\\\"b\""),
            ("tab\there", "\"tab\\there\""),
            ("nul\0", "\"nul\\x00\""),
            ("caf\u{e9}", "\"caf\u{e9}\""),
            ("nb\u{a0}sp", "\"nb\\u00a0sp\""),
            ("back\\slash", "\"back\\\\slash\""),
        ];
        for (input, want) in cases {
            assert_eq!(go_quote(input), *want, "input {input:?}");
        }
    }

    #[test]
    fn quotes_chars_like_go() {
        let cases: &[(char, &str)] = &[
            (' ', "' '"),
            ('%', "'%'"),
            ('\'', "'\\''"),
            ('"', "'\"'"),
            ('/', "'/'"),
            ('\n', "'\\n'"),
            ('\u{e9}', "'\u{e9}'"),
        ];
        for (input, want) in cases {
            assert_eq!(go_quote_char(*input), *want, "input {input:?}");
        }
    }
}
