//! Unit files: parsing with the systemd rules as fleet (go-systemd) implemented them, and
//! fleet's canonical serialization, whose SHA-1 is the unit hash.
//!
//! Parsing, as fleet did it:
//! - Before the first `[Section]` everything is skipped, except that a `#` or `;` starts a
//!   comment (running to the end of its line) and a `[` starts a section header.
//! - A section header runs from `[` to the next `]` (even across lines; not trimmed); only
//!   whitespace may follow `]` on its line.
//! - Inside a section, lines whose first non-space character is `#` or `;` are comments. A
//!   comment line ending in `\` (after dropping one trailing space) continues on the next line.
//! - Any other line is `Name=Value`; name and value are trimmed. A line without `=` is an error.
//! - A value line ending in `\` continues: the value keeps the `\`, a `\n` and the next line
//!   verbatim (leading spaces included; a continuation line is never an option or comment). A
//!   blank line ends a continuation (the value then ends in `\` and `\n`). `\` followed by a
//!   space does not continue.
//! - Repeated keys and repeated sections are all kept, in file order.
//!
//! Where this parser deliberately differs from fleet v1.0 (all corner cases that made fleet's
//! canonical form unstable or its line check wrong):
//! - Line length: any physical line with 2048 bytes or more before its line break (`\n` or
//!   `\r\n`) is an error, i.e. a line may hold at most 2048 bytes including its newline
//!   (systemd's LINE_MAX). fleet only checked when its read buffer happened to hold 2048 bytes.
//! - CRLF: `\r\n` (any run of `\r` before `\n`, or before the end of input) is a line break
//!   everywhere, so a CRLF line ending in `\` continues (fleet kept the `\r` and then failed on
//!   the next line).
//! - End of input acts as a newline: a value whose last line ends in `\` with no newline after
//!   it ends in `\` and `\n`, as it would with the newline (fleet dropped that `\n`, so the
//!   same file with and without a final newline hashed differently).
//! - A value whose last line ends in `\` followed by whitespace keeps that trailing
//!   whitespace (fleet trimmed it, and its serialization then turned the `\` into a
//!   continuation that swallowed the next option when re-read by fleet or systemd).
//! - A name at the very end of the input without `=` reports the same error as one followed
//!   by a newline (fleet said `EOF`).

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::hash::UnitHash;

/// systemd's LINE_MAX: the longest line, newline included, a unit file may have.
pub const LINE_MAX: usize = 2048;

/// One `Name=Value` of a unit file, with the section it appeared in.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct UnitOption {
    /// Shared by all options of a section block: a long section name followed by many short
    /// options must not cost its length once per option (memory stays linear in the text).
    pub section: SectionName,
    pub name: String,
    pub value: String,
}

/// A section name: reads like a `&str` (it derefs to one and compares with strings), and
/// clones without copying the text.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct SectionName(Arc<str>);

impl SectionName {
    /// The name as a string slice.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::ops::Deref for SectionName {
    type Target = str;
    fn deref(&self) -> &str {
        &self.0
    }
}

impl std::borrow::Borrow<str> for SectionName {
    fn borrow(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for SectionName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&*self.0, f)
    }
}

impl fmt::Display for SectionName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl From<&str> for SectionName {
    fn from(s: &str) -> Self {
        SectionName(Arc::from(s))
    }
}

impl From<String> for SectionName {
    fn from(s: String) -> Self {
        SectionName(Arc::from(s))
    }
}

impl From<&String> for SectionName {
    fn from(s: &String) -> Self {
        SectionName(Arc::from(s.as_str()))
    }
}

impl PartialEq<str> for SectionName {
    fn eq(&self, other: &str) -> bool {
        &*self.0 == other
    }
}

impl PartialEq<&str> for SectionName {
    fn eq(&self, other: &&str) -> bool {
        &*self.0 == *other
    }
}

impl PartialEq<SectionName> for str {
    fn eq(&self, other: &SectionName) -> bool {
        self == &*other.0
    }
}

impl PartialEq<SectionName> for &str {
    fn eq(&self, other: &SectionName) -> bool {
        *self == &*other.0
    }
}

impl Serialize for SectionName {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for SectionName {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d).map(SectionName::from)
    }
}

impl UnitOption {
    /// Convenience constructor.
    pub fn new(
        section: impl Into<SectionName>,
        name: impl Into<String>,
        value: impl Into<String>,
    ) -> UnitOption {
        UnitOption {
            section: section.into(),
            name: name.into(),
            value: value.into(),
        }
    }
}

/// Why a unit file could not be parsed. `Display` is fleet's message (the line number is
/// available in the variant for callers that want to point at it).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    /// A physical line holds 2048 bytes or more before its line break.
    #[error("line too long (max {LINE_MAX} bytes)")]
    LineTooLong { line: usize },
    /// A `[` without a matching `]`.
    #[error("unable to find end of section")]
    UnterminatedSection { line: usize },
    /// Non-whitespace text after `]` on a section header line.
    #[error("found garbage after section name {section}: {}", crate::quote::go_quote(.garbage))]
    GarbageAfterSection {
        line: usize,
        section: String,
        garbage: String,
    },
    /// A line inside a section that is neither a comment nor `Name=Value`.
    #[error("unexpected newline encountered while parsing option name")]
    NewlineInOptionName { line: usize },
}

impl ParseError {
    /// 1-based line where the problem was found.
    pub fn line(&self) -> usize {
        match self {
            ParseError::LineTooLong { line }
            | ParseError::UnterminatedSection { line }
            | ParseError::GarbageAfterSection { line, .. }
            | ParseError::NewlineInOptionName { line } => *line,
        }
    }
}

/// A parsed unit file: its options in file order.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct UnitFile {
    options: Vec<UnitOption>,
}

impl UnitFile {
    /// Parses unit file text (see the module docs for the exact rules).
    pub fn parse(text: &str) -> Result<UnitFile, ParseError> {
        check_line_lengths(text)?;
        Lexer {
            text,
            pos: 0,
            counted: 0,
            line: 1,
        }
        .run()
        .map(UnitFile::from_options)
    }

    /// A unit file made of these options (as fleet's API builds units from JSON options).
    pub fn from_options(options: Vec<UnitOption>) -> UnitFile {
        UnitFile { options }
    }

    /// All options, in file order.
    pub fn options(&self) -> &[UnitOption] {
        &self.options
    }

    /// Consumes the file, returning its options.
    pub fn into_options(self) -> Vec<UnitOption> {
        self.options
    }

    /// fleet's canonical form: sections in first-seen order, each section's options (from
    /// all its blocks) under one header in their original order, `Name=Value` verbatim, one
    /// blank line between sections, a single `\n` at the end; empty when there are no options.
    pub fn serialize(&self) -> String {
        let Grouped {
            sections,
            options,
            starts,
        } = self.grouped();
        let size: usize = self
            .options
            .iter()
            .map(|o| o.name.len() + o.value.len() + 2)
            .sum::<usize>()
            + sections.iter().map(|s| s.len() + 4).sum::<usize>();
        let mut out = String::with_capacity(size);
        for (i, section) in sections.iter().enumerate() {
            if i > 0 {
                out.push('\n');
            }
            out.push('[');
            out.push_str(section);
            out.push_str("]\n");
            for opt in &options[starts[i]..starts[i + 1]] {
                out.push_str(&opt.name);
                out.push('=');
                out.push_str(&opt.value);
                out.push('\n');
            }
        }
        out
    }

    /// The options grouped by section. Linear in the text: a section is found through a map,
    /// not by scanning the ones seen so far, and its name is hashed once per block (options
    /// of a parsed block share it), not once per option; then one counting sort.
    fn grouped(&self) -> Grouped<'_> {
        let mut sections: Vec<&str> = Vec::new();
        let mut index: HashMap<&str, usize> = HashMap::new();
        let mut previous: Option<(&SectionName, usize)> = None;
        let mut section_of = Vec::with_capacity(self.options.len());
        for opt in &self.options {
            let i = match previous {
                Some((section, i)) if Arc::ptr_eq(&section.0, &opt.section.0) => i,
                _ => *index.entry(&opt.section).or_insert_with(|| {
                    sections.push(&opt.section);
                    sections.len() - 1
                }),
            };
            section_of.push(i);
            previous = Some((&opt.section, i));
        }
        let mut starts = vec![0usize; sections.len() + 1];
        for &i in &section_of {
            starts[i + 1] += 1;
        }
        for i in 1..starts.len() {
            starts[i] += starts[i - 1];
        }
        let mut next = starts.clone();
        let mut slots: Vec<Option<&UnitOption>> = vec![None; self.options.len()];
        for (opt, &i) in self.options.iter().zip(&section_of) {
            slots[next[i]] = Some(opt);
            next[i] += 1;
        }
        Grouped {
            sections,
            options: slots.into_iter().flatten().collect(),
            starts,
        }
    }

    /// The options in canonical order: grouped by section in first-seen order, file order
    /// within a section (the order in which [`UnitFile::serialize`] writes them).
    pub fn canonical_options(&self) -> Vec<&UnitOption> {
        self.grouped().options
    }

    /// The unit as every other component will see it: its canonical text read back. Fails
    /// when that text does not parse (a line too long) or reads back as other options (a
    /// line break in a value starts new options or sections, whitespace is trimmed, a final
    /// backslash swallows the next line, ...), naming the first option that changes. A unit
    /// built from options (the API) must pass this before it is validated, so that what is
    /// validated is what runs.
    pub fn reread(&self) -> Result<UnitFile, RereadError> {
        let again = UnitFile::parse(&self.serialize()).map_err(RereadError::Parse)?;
        let want = self.canonical_options();
        let changed = want
            .iter()
            .zip(again.options())
            .position(|(w, g)| **w != *g)
            .or_else(|| {
                (want.len() != again.options().len()).then(|| want.len().min(again.options().len()))
            });
        match changed {
            None => Ok(again),
            Some(i) => {
                // Fewer options given than read back: the last one given spilled over.
                let opt = want.get(i).or(want.last()).copied();
                let (section, name, reason) = match opt {
                    Some(o) => (o.section.to_string(), o.name.clone(), reread_problem(o)),
                    None => (String::new(), String::new(), "it is not in canonical form"),
                };
                Err(RereadError::Changed {
                    section,
                    name,
                    reason,
                })
            }
        }
    }

    /// SHA-1 of [`UnitFile::serialize`]: the unit hash.
    pub fn hash(&self) -> UnitHash {
        UnitHash::of(self.serialize().as_bytes())
    }

    /// The first `Description=` of the `[Unit]` section.
    pub fn description(&self) -> Option<&str> {
        self.values("Unit", "Description").into_iter().next()
    }

    /// Whether any option belongs to `section`.
    pub fn has_section(&self, section: &str) -> bool {
        self.options.iter().any(|o| &*o.section == section)
    }

    /// The raw values of `name` in `section`, in file order.
    pub fn values(&self, section: &str, name: &str) -> Vec<&str> {
        self.options
            .iter()
            .filter(|o| &*o.section == section && o.name == name)
            .map(|o| o.value.as_str())
            .collect()
    }

    /// The values of `name` in `section` as fleet read them: in `[X-Fleet]` a value that
    /// begins and ends with `"` is split into several (see [`split_multivalue`]).
    pub fn fleet_values(&self, section: &str, name: &str) -> Vec<String> {
        let mut out = Vec::new();
        for v in self.values(section, name) {
            if section == "X-Fleet" {
                out.extend(split_multivalue(v));
            } else {
                out.push(v.to_string());
            }
        }
        out
    }
}

/// A unit's options grouped by section: section `i` is `sections[i]`, its options are
/// `options[starts[i]..starts[i + 1]]`.
struct Grouped<'a> {
    sections: Vec<&'a str>,
    options: Vec<&'a UnitOption>,
    starts: Vec<usize>,
}

/// Why a unit made of options would not read back as the same options.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RereadError {
    /// Its canonical text does not parse.
    #[error(transparent)]
    Parse(ParseError),
    /// It reads back as other options.
    #[error(
        "option {} in section {} changes when the unit file is read back: {reason}",
        crate::quote::go_quote(.name),
        crate::quote::go_quote(.section)
    )]
    Changed {
        section: String,
        name: String,
        reason: &'static str,
    },
}

/// Why this option does not survive being written and parsed again.
fn reread_problem(o: &UnitOption) -> &'static str {
    let line_break = |s: &str| s.contains(['\n', '\r']);
    let padded = |s: &str| s.trim() != s;
    if line_break(&o.section) || o.section.contains(']') {
        "section names cannot contain line breaks or ']'"
    } else if line_break(&o.name) || o.name.contains('=') {
        "option names cannot contain line breaks or '='"
    } else if o.name.starts_with(['#', ';', '[']) {
        "option names cannot start with '#', ';' or '['"
    } else if padded(&o.name) {
        "option names cannot begin or end with whitespace"
    } else if o.value.contains('\r') {
        "values cannot contain carriage returns"
    } else if o
        .value
        .split('\n')
        .rev()
        .skip(1)
        .any(|l| !l.ends_with('\\'))
    {
        "a line break in a value must follow a backslash"
    } else if o.value.ends_with('\\') {
        "values cannot end with a backslash"
    } else if padded(&o.value) {
        "values cannot begin or end with whitespace"
    } else {
        "it is not in canonical form"
    }
}

/// fleet's reading of an `[X-Fleet]` value: if it begins and ends with `"`, quotes are dropped
/// and spaces outside quotes separate values (`"a=b" "c=d"` gives `a=b` and `c=d`); otherwise
/// the value is returned whole.
pub fn split_multivalue(value: &str) -> Vec<String> {
    if !(value.starts_with('"') && value.ends_with('"')) {
        return vec![value.to_string()];
    }
    let mut values = Vec::new();
    let mut current = String::new();
    let mut quoted = false;
    for c in value.chars() {
        match c {
            '"' => quoted = !quoted,
            ' ' if !quoted => values.push(std::mem::take(&mut current)),
            c => current.push(c),
        }
    }
    values.push(current);
    values
}

fn check_line_lengths(text: &str) -> Result<(), ParseError> {
    for (i, line) in text.split('\n').enumerate() {
        let line = line.trim_end_matches('\r');
        if line.len() >= LINE_MAX {
            return Err(ParseError::LineTooLong { line: i + 1 });
        }
    }
    Ok(())
}

fn is_comment(c: char) -> bool {
    c == '#' || c == ';'
}

/// A cursor over the text implementing go-systemd's lexer states.
struct Lexer<'a> {
    text: &'a str,
    pos: usize,
    /// Line numbers are counted incrementally: `line` is the line at byte `counted`.
    counted: usize,
    line: usize,
}

impl<'a> Lexer<'a> {
    /// The 1-based line at the current position. Amortized O(1): the position only moves
    /// forward (except by one non-newline character), so each byte is counted once.
    fn line_number(&mut self) -> usize {
        let newlines = |s: &str| s.bytes().filter(|b| *b == b'\n').count();
        if self.pos >= self.counted {
            self.line += newlines(&self.text[self.counted..self.pos]);
        } else {
            self.line -= newlines(&self.text[self.pos..self.counted]);
        }
        self.counted = self.pos;
        self.line
    }

    fn peek(&self) -> Option<char> {
        self.text[self.pos..].chars().next()
    }

    fn next_char(&mut self) -> Option<char> {
        let c = self.peek()?;
        self.pos += c.len_utf8();
        Some(c)
    }

    /// The rest of the current line without its `\n` and any `\r` before it, and whether input
    /// ended there.
    fn line_rest(&mut self) -> (&'a str, bool) {
        let rest = &self.text[self.pos..];
        let (line, eof) = match rest.find('\n') {
            Some(i) => {
                self.pos += i + 1;
                (&rest[..i], false)
            }
            None => {
                self.pos = self.text.len();
                (rest, true)
            }
        };
        // Carriage returns before the line break belong to the break (CRLF, and stray CRs).
        (line.trim_end_matches('\r'), eof)
    }

    fn run(mut self) -> Result<Vec<UnitOption>, ParseError> {
        let mut options = Vec::new();
        let mut section: Option<SectionName> = None;
        while let Some(c) = self.next_char() {
            if c == '[' {
                section = Some(SectionName::from(self.section_header()?));
            } else if is_comment(c) {
                self.skip_comment();
            } else if let Some(sec) = &section {
                if c.is_whitespace() {
                    continue;
                }
                self.pos -= c.len_utf8();
                let name = self.option_name()?;
                let value = self.option_value();
                options.push(UnitOption {
                    section: sec.clone(),
                    name,
                    value,
                });
            }
            // Before the first section anything else is skipped.
        }
        options.shrink_to_fit();
        Ok(options)
    }

    /// After `[`: the name up to `]`, then nothing but whitespace up to the end of the line.
    fn section_header(&mut self) -> Result<String, ParseError> {
        let line = self.line_number();
        let rest = &self.text[self.pos..];
        let end = rest
            .find(']')
            .ok_or(ParseError::UnterminatedSection { line })?;
        let name = rest[..end].to_string();
        self.pos += end + 1;
        let line = self.line_number();
        let (garbage, _) = self.line_rest();
        let garbage = garbage.trim();
        if !garbage.is_empty() {
            return Err(ParseError::GarbageAfterSection {
                line,
                section: name,
                garbage: garbage.to_string(),
            });
        }
        Ok(name)
    }

    /// Skips a comment, following `\` continuations (one trailing space is ignored).
    fn skip_comment(&mut self) {
        loop {
            let (line, eof) = self.line_rest();
            let line = line.strip_suffix(' ').unwrap_or(line);
            if eof || !line.ends_with('\\') {
                return;
            }
        }
    }

    fn option_name(&mut self) -> Result<String, ParseError> {
        let line = self.line_number();
        let rest = &self.text[self.pos..];
        match rest.find(['=', '\n', '\r']) {
            Some(i) if rest.as_bytes()[i] == b'=' => {
                self.pos += i + 1;
                Ok(rest[..i].trim().to_string())
            }
            _ => Err(ParseError::NewlineInOptionName { line }),
        }
    }

    fn option_value(&mut self) -> String {
        let mut partial = String::new();
        loop {
            let (line, eof) = self.line_rest();
            if line.trim().is_empty() {
                break;
            }
            partial.push_str(line);
            if !line.ends_with('\\') {
                break;
            }
            partial.push('\n');
            if eof {
                break;
            }
        }
        if partial.ends_with('\n') {
            let mut v = partial.trim().to_string();
            v.push('\n');
            v
        } else if partial.trim_end().ends_with('\\') {
            // Keep the whitespace after a final backslash so that it stays a literal
            // backslash when the canonical form is read again.
            partial.trim_start().to_string()
        } else {
            partial.trim().to_string()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    type Expected<'a> = Result<&'a [(&'a str, &'a str, &'a str)], &'a str>;

    fn opts(list: &[(&str, &str, &str)]) -> Vec<UnitOption> {
        list.iter()
            .map(|(s, n, v)| UnitOption::new(*s, *n, *v))
            .collect()
    }

    fn check(input: &str, want: Expected<'_>) {
        let got = UnitFile::parse(input)
            .map(UnitFile::into_options)
            .map_err(|e| e.to_string());
        let want = want.map(opts).map_err(str::to_string);
        assert_eq!(got, want, "input {input:?}");
    }

    #[test]
    fn parses_like_fleet() {
        let cases: &[(&str, Expected<'_>)] = &[
            ("", Ok(&[])),
            ("[Unit]\n", Ok(&[])),
            (
                "\nThis=Ignored\n[Unit]\n;ignore this guy\nDescription = Foo\n\n[Service]\nExecStart=echo \"ping\";\nExecStop=echo \"pong\"\n# ignore me, too\nExecStop=echo post\n",
                Ok(&[
                    ("Unit", "Description", "Foo"),
                    ("Service", "ExecStart", "echo \"ping\";"),
                    ("Service", "ExecStop", "echo \"pong\""),
                    ("Service", "ExecStop", "echo post"),
                ]),
            ),
            (
                "\n>>>>>>\n[Service]\nExecStart=jim\n<<<<<<=bar\n",
                Ok(&[
                    ("Service", "ExecStart", "jim"),
                    ("Service", "<<<<<<", "bar"),
                ]),
            ),
            // continuations keep the backslash, the newline and leading spaces
            (
                "[Service]\nExecStart=echo \\\n  \"pi\\\n  ng\"\nExecStop=\\\necho \"po\\\nng\"\nExecStopPre=echo\\\n#pang\nExecStopPost=echo\\\n#peng\\\npung\n",
                Ok(&[
                    ("Service", "ExecStart", "echo \\\n  \"pi\\\n  ng\""),
                    ("Service", "ExecStop", "\\\necho \"po\\\nng\""),
                    ("Service", "ExecStopPre", "echo\\\n#pang"),
                    ("Service", "ExecStopPost", "echo\\\n#peng\\\npung"),
                ]),
            ),
            // a continuation line is never an option or a section
            (
                "[A]\nX=a\\\n[B]\nY=b\n",
                Ok(&[("A", "X", "a\\\n[B]"), ("A", "Y", "b")]),
            ),
            // a blank line ends a continuation; the value keeps the newline
            (
                "[A]\nX=a \\\n\nY=b\n",
                Ok(&[("A", "X", "a \\\n"), ("A", "Y", "b")]),
            ),
            // backslash then space does not continue (and the space is kept)
            (
                "[A]\nX=a\\ \nY=b\n",
                Ok(&[("A", "X", "a\\ "), ("A", "Y", "b")]),
            ),
            // inline # stays in the value; Key= gives an empty value
            (
                "[A]\nX=a # b\nY=\nZ= \t \n",
                Ok(&[("A", "X", "a # b"), ("A", "Y", ""), ("A", "Z", "")]),
            ),
            // repeated sections and keys are all kept, in order
            (
                "[A]\nX=1\n[B]\nY=2\n[A]\nX=3\n",
                Ok(&[("A", "X", "1"), ("B", "Y", "2"), ("A", "X", "3")]),
            ),
            // section names are not trimmed; whitespace after ] is fine
            ("[ A ]  \t\nX=1\n", Ok(&[(" A ", "X", "1")])),
            // CRLF
            (
                "[A]\r\nX=1\r\nY = 2 \r\nZ=a\\\r\n b\r\n",
                Ok(&[("A", "X", "1"), ("A", "Y", "2"), ("A", "Z", "a\\\n b")]),
            ),
            // missing final newline
            ("[A]\nX=1", Ok(&[("A", "X", "1")])),
            ("[A]\nX=1\\", Ok(&[("A", "X", "1\\\n")])),
            ("[A]\nX=1\\\n", Ok(&[("A", "X", "1\\\n")])),
            // comments: leading spaces, continuation, ';'
            (
                "[A]\n   # c \\ \nX=swallowed\n;x\nY=1\n",
                Ok(&[("A", "Y", "1")]),
            ),
            // before the first section, [ anywhere starts a header and # a comment
            ("junk # [Not]\nmore[A]\nX=1\n", Ok(&[("A", "X", "1")])),
            // = in values, spaces around names
            (
                "[X-Fleet]\n  MachineMetadata = \"a=b\" \"c=d\"  \n",
                Ok(&[("X-Fleet", "MachineMetadata", "\"a=b\" \"c=d\"")]),
            ),
            // errors
            ("[A", Err("unable to find end of section")),
            ("[A]\nX=1\n[B", Err("unable to find end of section")),
            (
                "[A] junk\n",
                Err("found garbage after section name A: \"junk\""),
            ),
            (
                "[A]\nnovalue\n",
                Err("unexpected newline encountered while parsing option name"),
            ),
            (
                "[A]\nnovalue",
                Err("unexpected newline encountered while parsing option name"),
            ),
            ("[A]\nX=1\\\r\nY\r\n", Ok(&[("A", "X", "1\\\nY")])),
            (
                "[A]\nnovalue\r\nX=1\n",
                Err("unexpected newline encountered while parsing option name"),
            ),
        ];
        for (input, want) in cases {
            check(input, *want);
        }
    }

    #[test]
    fn line_length_limit_is_exact() {
        let at = |n: usize, end: &str| format!("[A]\nX={}{end}", "v".repeat(n - 2));
        let cases: Vec<(String, bool)> = vec![
            (at(2047, "\n"), true),
            (at(2048, "\n"), false),
            (at(2047, ""), true),
            (at(2048, ""), false),
            (at(2047, "\r\n"), true),
            (at(2048, "\r\n"), false),
            (format!("# {}\n[A]\n", "c".repeat(5000)), false),
            (format!("[A]\nX=1\n{}", "y".repeat(2048)), false),
        ];
        for (input, ok) in cases {
            let got = UnitFile::parse(&input);
            if ok {
                assert!(got.is_ok(), "len {} should parse", input.len());
            } else {
                let err = got.expect_err("too long");
                assert_eq!(err.to_string(), "line too long (max 2048 bytes)");
            }
        }
        let err = UnitFile::parse(&at(3000, "\n")).expect_err("too long");
        assert_eq!(err.line(), 2);
    }

    #[test]
    fn serializes_like_fleet() {
        let cases: &[(&str, &str)] = &[
            ("", ""),
            ("[Unit]\n", ""),
            ("[A]\nX=1", "[A]\nX=1\n"),
            (
                "[A]\nX=1\n[B]\nY=2\n[A]\nX=3\n",
                "[A]\nX=1\nX=3\n\n[B]\nY=2\n",
            ),
            (
                "# c\n[Unit]\nDescription = Hi \n\n\n[Service]\r\nExecStart=/bin/a \\\n   b\n",
                "[Unit]\nDescription=Hi\n\n[Service]\nExecStart=/bin/a \\\n   b\n",
            ),
            ("[A]\nX=a \\\n\n[B]\nY=1\n", "[A]\nX=a \\\n\n\n[B]\nY=1\n"),
        ];
        for (input, want) in cases {
            let f = UnitFile::parse(input).expect("parses");
            assert_eq!(f.serialize(), *want, "input {input:?}");
        }
    }

    #[test]
    fn options_that_change_when_read_back_are_refused() {
        let ok = Ok(());
        let changed = |s: &str, n: &str, reason: &'static str| {
            Err(RereadError::Changed {
                section: s.into(),
                name: n.into(),
                reason,
            })
        };
        type Case<'a> = (&'a [(&'a str, &'a str, &'a str)], Result<(), RereadError>);
        let cases: Vec<Case<'_>> = vec![
            (&[("Service", "ExecStart", "/bin/true")], ok.clone()),
            // a continuation as the parser keeps it reads back the same
            (&[("Service", "ExecStart", "echo \\\n  b")], ok.clone()),
            (&[("A", "X", "a \\\n")], ok.clone()),
            // interleaved sections are only regrouped
            (
                &[("A", "X", "1"), ("B", "Y", "2"), ("A", "Z", "3")],
                ok.clone(),
            ),
            (
                &[("Service", "ExecStart", "x\n[X-Fleet]\nGlobal=true")],
                changed(
                    "Service",
                    "ExecStart",
                    "a line break in a value must follow a backslash",
                ),
            ),
            (
                &[("Service", "ExecStart", "x\n")],
                changed(
                    "Service",
                    "ExecStart",
                    "a line break in a value must follow a backslash",
                ),
            ),
            (
                &[("A", "X", "a\\"), ("A", "Y", "b")],
                changed("A", "X", "values cannot end with a backslash"),
            ),
            (
                &[("A", "X", " a")],
                changed("A", "X", "values cannot begin or end with whitespace"),
            ),
            (
                &[("A", "X", "a\r")],
                changed("A", "X", "values cannot contain carriage returns"),
            ),
            (
                &[("A", "X=Y", "a")],
                changed("A", "X=Y", "option names cannot contain line breaks or '='"),
            ),
            (
                &[("A", "#X", "a")],
                changed("A", "#X", "option names cannot start with '#', ';' or '['"),
            ),
            (
                &[("A", "X ", "a")],
                changed(
                    "A",
                    "X ",
                    "option names cannot begin or end with whitespace",
                ),
            ),
            (
                &[("A]\n[X-Fleet", "Global", "true")],
                changed(
                    "A]\n[X-Fleet",
                    "Global",
                    "section names cannot contain line breaks or ']'",
                ),
            ),
        ];
        for (given, want) in cases {
            let file = UnitFile::from_options(opts(given));
            let got = file.reread().map(|again| {
                assert_eq!(again.serialize(), file.serialize(), "{given:?}");
            });
            assert_eq!(got, want, "{given:?}");
        }
        let err = UnitFile::from_options(opts(&[(
            "Service",
            "ExecStart",
            "x\n[X-Fleet]\nGlobal=true",
        )]))
        .reread()
        .expect_err("changes");
        assert_eq!(
            err.to_string(),
            "option \"ExecStart\" in section \"Service\" changes when the unit file is read back: a line break in a value must follow a backslash"
        );
        let long = UnitFile::from_options(opts(&[("A", "X", &"v".repeat(3000))]));
        assert_eq!(
            long.reread().expect_err("too long").to_string(),
            "line too long (max 2048 bytes)"
        );
    }

    #[test]
    fn multivalue_like_fleet() {
        let cases: &[(&str, &[&str])] = &[
            ("\"bar\" \"ping\" \"pong\"", &["bar", "ping", "pong"]),
            ("\"bar\"", &["bar"]),
            ("", &[""]),
            ("\"\"", &[""]),
            ("\"bar", &["\"bar"]),
            ("bar\"", &["bar\""]),
            ("foo\\\"bar", &["foo\\\"bar"]),
            ("\"foo\\\"bar\"", &["foo\\bar"]),
            ("\"a=b c\" \"d=e\"", &["a=b c", "d=e"]),
            ("\"a\"  \"b\"", &["a", "", "b"]),
            ("\"", &[""]),
        ];
        for (input, want) in cases {
            assert_eq!(split_multivalue(input), *want, "input {input:?}");
        }
    }

    #[test]
    fn accessors() {
        let f = UnitFile::parse(
            "[Unit]\nDescription=first\nDescription=second\n[X-Fleet]\nConflicts=\"a\" \"b\"\nConflicts=c\n",
        )
        .expect("parses");
        assert_eq!(f.description(), Some("first"));
        assert!(f.has_section("X-Fleet"));
        assert!(!f.has_section("Service"));
        assert_eq!(f.values("X-Fleet", "Conflicts"), vec!["\"a\" \"b\"", "c"]);
        assert_eq!(f.fleet_values("X-Fleet", "Conflicts"), vec!["a", "b", "c"]);
        assert_eq!(
            UnitFile::parse("[Service]\nX=1\n")
                .expect("parses")
                .description(),
            None
        );
    }
}
