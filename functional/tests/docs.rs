//! The documentation's examples, run: every ```` ```console ```` block of `Documentation/*.md`
//! is executed in node1 of a three-node cluster and its output compared with the page, so the
//! pages cannot drift from the code.
//!
//! How a page marks its examples (also described in `Documentation/functional-harness.md`):
//!
//! - A fenced block whose info string is exactly `console` is run. In it, a line starting
//!   with `$ ` is a command (run by bash in node1, in a fresh directory per page, stdout and
//!   stderr together); the lines up to the next command are its expected output. Blocks of
//!   any other language (`sh`, `ini`, `text`, ...) are not run.
//! - A fenced block whose info string has a `file=NAME` word (```` ```ini file=hello.service ````)
//!   is written to NAME in the page's directory before the commands after it run.
//! - Expected output is compared line by line, with runs of spaces and tabs counted as one
//!   space and trailing blanks ignored. Placeholders stand for what differs between
//!   clusters: `<ID>` and `<HASH>` (hex digits), `<IP>` (digits and dots), `<ANY>` (any text
//!   within the line); a line `...` stands for any number of lines.
//! - The lines of a blocking `fleetctl start`, `load`, `stop` or `unload` of several units
//!   may come in any order (each unit is reported when it reaches its state), so theirs are
//!   compared as a set of lines.
//! - Commands that only read (`fleetctl list-…`, `fleetctl status`, `fleetctl journal`,
//!   `fleetctl cat`, `curl` without `-X`) are retried for up to 20 s until their output
//!   matches, since the machines report states a moment after a command returns.
//! - Before each page, every unit is destroyed, so each page starts from an empty cluster.
//!
//! Machines: node1 `region=east,disk=ssd`, node2 `region=east`, node3 `region=west`.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use functional::fleet::{boot, must};
use functional::{Cluster, ClusterSpec};

/// How long a read-only command is retried until its output matches.
const SETTLE: Duration = Duration::from_secs(20);

/// One step of a page, in page order.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Step {
    /// Write a file into the page's directory.
    File { name: String, text: String },
    /// Run a command and compare its output.
    Run {
        line: usize,
        command: String,
        expected: Vec<String>,
    },
}

/// The steps of one Markdown page.
fn extract(markdown: &str) -> Vec<Step> {
    let mut steps = Vec::new();
    let mut lines = markdown.lines().enumerate();
    while let Some((_, line)) = lines.next() {
        let Some(info) = line.trim_start().strip_prefix("```") else {
            continue;
        };
        let info = info.trim();
        let body: Vec<(usize, &str)> = lines
            .by_ref()
            .take_while(|(_, l)| l.trim_start() != "```")
            .collect();
        if info == "console" {
            for (n, l) in body {
                if let Some(cmd) = l.strip_prefix("$ ") {
                    steps.push(Step::Run {
                        line: n + 1,
                        command: cmd.to_string(),
                        expected: Vec::new(),
                    });
                } else if let Some(Step::Run { expected, .. }) = steps.last_mut() {
                    expected.push(l.to_string());
                }
            }
        } else if let Some(name) = info
            .split_whitespace()
            .find_map(|w| w.strip_prefix("file="))
        {
            let mut text: String = body.iter().map(|(_, l)| format!("{l}\n")).collect();
            if text.is_empty() {
                text.push('\n');
            }
            steps.push(Step::File {
                name: name.to_string(),
                text,
            });
        }
    }
    steps
}

/// Runs of spaces and tabs as one space, no trailing blanks.
fn normalize(line: &str) -> String {
    line.split([' ', '\t'])
        .filter(|w| !w.is_empty())
        .collect::<Vec<_>>()
        .join(" ")
}

/// A piece of an expected line.
#[derive(Debug, Clone)]
enum Piece {
    Text(char),
    /// One or more characters of the class.
    Class(fn(char) -> bool),
    /// Any text, also none.
    Any,
}

fn pieces(expected: &str) -> Vec<Piece> {
    let mut out = Vec::new();
    let mut rest = expected;
    'outer: while let Some(c) = rest.chars().next() {
        for (name, piece) in [
            ("<ID>", Piece::Class(|c: char| c.is_ascii_hexdigit())),
            ("<HASH>", Piece::Class(|c: char| c.is_ascii_hexdigit())),
            (
                "<IP>",
                Piece::Class(|c: char| c.is_ascii_digit() || c == '.'),
            ),
            ("<ANY>", Piece::Any),
        ] {
            if let Some(r) = rest.strip_prefix(name) {
                out.push(piece);
                rest = r;
                continue 'outer;
            }
        }
        out.push(Piece::Text(c));
        rest = &rest[c.len_utf8()..];
    }
    out
}

/// Does `actual` (normalized) match the expected line's pieces?
fn line_matches(pieces: &[Piece], actual: &[char]) -> bool {
    match pieces.split_first() {
        None => actual.is_empty(),
        Some((Piece::Text(c), rest)) => {
            actual.first() == Some(c) && line_matches(rest, &actual[1..])
        }
        Some((Piece::Any, rest)) => (0..=actual.len()).any(|i| line_matches(rest, &actual[i..])),
        Some((Piece::Class(is), rest)) => {
            let run = actual.iter().take_while(|c| is(**c)).count();
            (1..=run).rev().any(|i| line_matches(rest, &actual[i..]))
        }
    }
}

/// Does the whole output match the expected lines (`...` for any lines)?
fn output_matches(expected: &[String], actual: &str) -> bool {
    fn trim_end(mut v: Vec<String>) -> Vec<String> {
        while v.last().is_some_and(|l| l.is_empty()) {
            v.pop();
        }
        v
    }
    let want = trim_end(expected.iter().map(|l| normalize(l)).collect());
    let got = trim_end(actual.lines().map(normalize).collect());
    let got: Vec<Vec<char>> = got.iter().map(|l| l.chars().collect()).collect();
    let want: Vec<Option<Vec<Piece>>> = want
        .iter()
        .map(|l| (l != "...").then(|| pieces(l)))
        .collect();
    fn lines(want: &[Option<Vec<Piece>>], got: &[Vec<char>]) -> bool {
        match want.split_first() {
            None => got.is_empty(),
            Some((None, rest)) => (0..=got.len()).any(|i| lines(rest, &got[i..])),
            Some((Some(p), rest)) => {
                !got.is_empty() && line_matches(p, &got[0]) && lines(rest, &got[1..])
            }
        }
    }
    lines(&want, &got)
}

/// Does the output match the expected lines in some order (no `...` lines)?
fn output_matches_unordered(expected: &[String], actual: &str) -> bool {
    let want: Vec<Vec<Piece>> = expected
        .iter()
        .map(|l| normalize(l))
        .filter(|l| !l.is_empty())
        .map(|l| pieces(&l))
        .collect();
    let got: Vec<Vec<char>> = actual
        .lines()
        .map(normalize)
        .filter(|l| !l.is_empty())
        .map(|l| l.chars().collect())
        .collect();
    fn assign(want: &[Vec<Piece>], got: &[Vec<char>], used: &mut Vec<bool>) -> bool {
        let Some((first, rest)) = want.split_first() else {
            return true;
        };
        for i in 0..got.len() {
            if !used[i] && line_matches(first, &got[i]) {
                used[i] = true;
                if assign(rest, got, used) {
                    return true;
                }
                used[i] = false;
            }
        }
        false
    }
    want.len() == got.len()
        && !expected.iter().any(|l| l.trim() == "...")
        && assign(&want, &got, &mut vec![false; got.len()])
}

/// A blocking fleetctl command on several units, which reports them as they get there.
fn reports_in_any_order(command: &str) -> bool {
    let words: Vec<&str> = command.split_whitespace().collect();
    let verb = ["start", "load", "stop", "unload"]
        .iter()
        .any(|v| words.get(1) == Some(v));
    let units = words.iter().skip(2).filter(|w| !w.starts_with('-')).count();
    words.first() == Some(&"fleetctl") && verb && units > 1
}

/// Does `actual` match what the page shows for `command`?
fn matches(command: &str, expected: &[String], actual: &str) -> bool {
    output_matches(expected, actual)
        || (reports_in_any_order(command) && output_matches_unordered(expected, actual))
}

/// Commands whose output may lag the cluster, retried until they match.
fn read_only(command: &str) -> bool {
    let fleetctl_reads = ["list-", "status", "journal", "cat"]
        .iter()
        .any(|c| command.starts_with(&format!("fleetctl {c}")));
    let curl_get = command.starts_with("curl ") && !command.contains(" -X ");
    fleetctl_reads || curl_get
}

/// `'text'` for bash.
fn quote(text: &str) -> String {
    format!("'{}'", text.replace('\'', r"'\''"))
}

fn docs_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join("Documentation")
}

/// The pages with examples to run, by name.
fn pages() -> Vec<(String, Vec<Step>)> {
    let mut pages: Vec<(String, Vec<Step>)> = std::fs::read_dir(docs_dir())
        .expect("Documentation/")
        .filter_map(|e| {
            let path = e.ok()?.path();
            let name = path.file_name()?.to_str()?.to_string();
            if !name.ends_with(".md") {
                return None;
            }
            let text = std::fs::read_to_string(&path).ok()?;
            let steps = extract(&text);
            steps
                .iter()
                .any(|s| matches!(s, Step::Run { .. }))
                .then_some((name, steps))
        })
        .collect();
    pages.sort_by(|a, b| a.0.cmp(&b.0));
    pages
}

/// Runs `script` with bash in node1; stdout and stderr together.
fn bash(c: &Cluster, script: &str) -> String {
    let out = must(c.exec(1, &["bash", "-c", script]));
    format!("{}{}", out.stdout, out.stderr)
}

/// Runs one page; returns its mismatches.
fn run_page(c: &Cluster, name: &str, steps: &[Step]) -> Vec<String> {
    let dir = format!("/root/docs/{}", name.trim_end_matches(".md"));
    bash(
        c,
        &format!(
            "fleetctl list-unit-files --no-legend --fields=unit | xargs -r fleetctl destroy >/dev/null; \
             rm -rf {dir} && mkdir -p {dir}"
        ),
    );
    let mut failures = Vec::new();
    for step in steps {
        match step {
            Step::File { name: file, text } => {
                bash(c, &format!("printf '%s' {} > {dir}/{file}", quote(text)));
            }
            Step::Run {
                line,
                command,
                expected,
            } => {
                let script = format!("cd {dir} && {{ {command}\n}} 2>&1");
                let started = Instant::now();
                let mut actual = bash(c, &script);
                while !matches(command, expected, &actual)
                    && read_only(command)
                    && started.elapsed() < SETTLE
                {
                    std::thread::sleep(Duration::from_millis(500));
                    actual = bash(c, &script);
                }
                if !matches(command, expected, &actual) {
                    failures.push(format!(
                        "{name}:{line}: $ {command}\n--- expected\n{}\n--- actual\n{actual}",
                        expected.join("\n")
                    ));
                }
            }
        }
    }
    failures
}

#[test]
fn documentation_examples_match_the_cluster() {
    let pages = pages();
    assert!(
        pages.iter().any(|(n, _)| n == "using-the-client.md"),
        "no examples found in {}",
        docs_dir().display()
    );
    let c = boot(
        ClusterSpec::new("docs", 3)
            .metadata(1, "region=east,disk=ssd")
            .metadata(2, "region=east")
            .metadata(3, "region=west"),
    );
    functional::assert_eventually!(
        Duration::from_secs(30),
        bash(&c, "fleetctl list-machines --no-legend | wc -l").trim() == "3",
        "three machines in the cluster"
    );
    let mut failures = Vec::new();
    for (name, steps) in &pages {
        failures.extend(run_page(&c, name, steps));
    }
    assert!(
        failures.is_empty(),
        "{} example(s) differ from the pages:\n\n{}",
        failures.len(),
        failures.join("\n\n")
    );
    must(c.down());
}

#[test]
fn examples_are_extracted_as_documented() {
    let page = "text\n```ini file=a.service\n[Service]\nExecStart=/bin/true\n```\n\
                ```console\n$ fleetctl cat a\n[Service]\n$ true\n```\n```sh\n$ not run\n```\n";
    assert_eq!(
        extract(page),
        vec![
            Step::File {
                name: "a.service".into(),
                text: "[Service]\nExecStart=/bin/true\n".into()
            },
            Step::Run {
                line: 7,
                command: "fleetctl cat a".into(),
                expected: vec!["[Service]".into()]
            },
            Step::Run {
                line: 9,
                command: "true".into(),
                expected: vec![]
            },
        ]
    );
}

#[test]
fn placeholders_and_ellipses_match_what_they_stand_for() {
    let e = |lines: &[&str]| lines.iter().map(|l| l.to_string()).collect::<Vec<_>>();
    for (expected, actual, want) in [
        (
            e(&["Unit a launched on <ID>.../<IP>"]),
            "Unit a launched on 0123abcd.../172.20.1.11\n",
            true,
        ),
        (
            e(&["Unit a launched on <ID>.../<IP>"]),
            "Unit a launched on node1\n",
            false,
        ),
        (
            e(&["UNIT\t\tHASH", "a\t<HASH>"]),
            "UNIT HASH\na  3f2a1b0\n\n",
            true,
        ),
        (e(&["<ANY> hello"]), "Nov 26 node1 sh[42]: hello\n", true),
        (e(&["<ANY> hello"]), "Nov 26 node1 sh[42]: bye\n", false),
        (e(&["first", "...", "last"]), "first\nx\ny\nlast\n", true),
        (e(&["first", "...", "last"]), "first\nlast\n", true),
        (e(&["first", "...", "last"]), "first\nx\n", false),
        (e(&["one"]), "one\ntwo\n", false),
        (e(&[]), "", true),
    ] {
        assert_eq!(
            output_matches(&expected, actual),
            want,
            "{expected:?} vs {actual:?}"
        );
    }
    let launched = e(&[
        "Unit a inactive",
        "Unit a launched on <ID>.../<IP>",
        "Unit b launched on <ID>.../<IP>",
    ]);
    let swapped =
        "Unit a inactive\nUnit b launched on 01.../1.2.3.4\nUnit a launched on 02.../1.2.3.5\n";
    assert!(matches("fleetctl start a b", &launched, swapped));
    assert!(!matches("fleetctl start a", &launched, swapped));
    assert!(!matches("fleetctl list-units", &launched, swapped));
    assert!(!matches(
        "fleetctl start a b",
        &launched,
        "Unit a inactive\nUnit b launched on 01.../1.2.3.4\n"
    ));
    assert!(read_only("fleetctl list-units"));
    assert!(read_only(
        "curl -s --unix-socket /s http://localhost/fleet/v1/units"
    ));
    assert!(!read_only(
        "curl -s -X PUT http://localhost/fleet/v1/units/a"
    ));
    assert!(!read_only("fleetctl start a"));
}
