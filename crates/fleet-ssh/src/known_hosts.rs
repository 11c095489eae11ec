//! Known-hosts files in OpenSSH's format: parsing, host matching (wildcards, negation, hashed
//! `|1|` names, `[host]:port`), the check verdict, and appending a newly trusted key.
//!
//! Semantics follow fleet's `ssh/known_hosts.go`: a host is known when any entry whose host
//! pattern matches it carries exactly the presented key; it is a mismatch when entries match the
//! host but none carries that key (whatever their key type); otherwise it is unknown. fleet
//! rejected hashed names and `@` markers; here hashed names are matched and `@revoked` is honoured
//! (`@cert-authority` lines are skipped, as certificates are never requested).

use std::fs::{self, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use hmac::{Hmac, Mac};
use russh::keys::{Algorithm, EcdsaCurve, HashAlg, PublicKey};
use sha1::Sha1;

use crate::error::SshError;

/// The port OpenSSH leaves out of known-hosts names.
pub const DEFAULT_SSH_PORT: u16 = 22;

/// The name under which `host:port` is recorded in a known-hosts file: the bare host for the
/// default port, `[host]:port` otherwise (OpenSSH's `put_host_port`). Lowercased, as OpenSSH
/// does before matching or hashing.
pub fn host_port_name(host: &str, port: u16) -> String {
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let host = host.to_ascii_lowercase();
    if port == DEFAULT_SSH_PORT || port == 0 {
        host
    } else {
        format!("[{host}]:{port}")
    }
}

/// A marker at the start of a known-hosts line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Marker {
    Revoked,
}

/// One usable line of a known-hosts file.
#[derive(Debug, Clone)]
struct Entry {
    /// 1-based line number in the file, for messages.
    line: usize,
    marker: Option<Marker>,
    /// The comma-separated host field as written.
    hosts: String,
    key: PublicKey,
}

/// What a known-hosts file says about a host's key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// An entry for the host carries this key.
    Known,
    /// No entry names the host.
    Unknown,
    /// Entries name the host, none with this key; `line` is the first such entry (one of the same
    /// key type when there is one, as that is the key the server would have shown).
    Mismatch { line: usize },
    /// The key is listed under `@revoked`.
    Revoked { line: usize },
}

/// The parsed contents of a known-hosts file.
#[derive(Debug, Clone, Default)]
pub struct KnownHosts {
    entries: Vec<Entry>,
}

impl KnownHosts {
    /// Parses known-hosts text. Lines that cannot be parsed are skipped with a warning naming
    /// `origin` and the line (fleet did the same), so one bad line does not lock a user out.
    pub fn parse(text: &str, origin: &Path) -> KnownHosts {
        let mut entries = Vec::new();
        for (idx, raw) in text.lines().enumerate() {
            let line = idx + 1;
            match parse_line(raw) {
                Ok(Some(parsed)) => {
                    if let Some((marker, hosts, key)) = parsed {
                        entries.push(Entry {
                            line,
                            marker,
                            hosts,
                            key,
                        });
                    }
                }
                Ok(None) => {}
                Err(reason) => {
                    tracing::warn!("{}:{line} - {reason}", origin.display());
                }
            }
        }
        KnownHosts { entries }
    }

    /// Reads and parses `path`; a missing file is an empty list.
    pub fn load(path: &Path) -> Result<KnownHosts, SshError> {
        let mut text = String::new();
        match fs::File::open(path) {
            Ok(mut f) => {
                f.read_to_string(&mut text)
                    .map_err(|source| SshError::KnownHostsRead {
                        file: path.to_path_buf(),
                        source,
                    })?;
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(source) => {
                return Err(SshError::KnownHostsRead {
                    file: path.to_path_buf(),
                    source,
                });
            }
        }
        Ok(KnownHosts::parse(&text, path))
    }

    /// Checks `key` for a host known under any of `names` (each as made by [`host_port_name`]).
    pub fn check(&self, names: &[String], key: &PublicKey) -> Verdict {
        let mut first_same_type = None;
        let mut first_other = None;
        for entry in &self.entries {
            if !names.iter().any(|n| match_host_list(n, &entry.hosts)) {
                continue;
            }
            let same_key = entry.key.key_data() == key.key_data();
            match entry.marker {
                Some(Marker::Revoked) => {
                    if same_key {
                        return Verdict::Revoked { line: entry.line };
                    }
                }
                None => {
                    if same_key {
                        // Any matching key is a success, whatever other lines say; but a
                        // revoked listing later in the file still wins, so keep scanning.
                        if self.is_revoked(names, key).is_none() {
                            return Verdict::Known;
                        }
                        continue;
                    }
                    if entry.key.algorithm().as_str() == key.algorithm().as_str() {
                        first_same_type.get_or_insert(entry.line);
                    } else {
                        first_other.get_or_insert(entry.line);
                    }
                }
            }
        }
        if let Some(line) = self.is_revoked(names, key) {
            return Verdict::Revoked { line };
        }
        match first_same_type.or(first_other) {
            Some(line) => Verdict::Mismatch { line },
            None => Verdict::Unknown,
        }
    }

    /// Records a key trusted during this run (line 0: not from the file).
    pub(crate) fn insert(&mut self, name: &str, key: PublicKey) {
        self.entries.push(Entry {
            line: 0,
            marker: None,
            hosts: name.to_string(),
            key,
        });
    }

    fn is_revoked(&self, names: &[String], key: &PublicKey) -> Option<usize> {
        self.entries
            .iter()
            .find(|e| {
                e.marker == Some(Marker::Revoked)
                    && e.key.key_data() == key.key_data()
                    && names.iter().any(|n| match_host_list(n, &e.hosts))
            })
            .map(|e| e.line)
    }

    /// The host-key algorithms to offer a host known under `names`, in `preferred` order: only
    /// those of key types recorded for it (fleet's `GetHostKeyAlgorithms`), so a server with
    /// several host keys shows the one we know. Empty when the host is unknown.
    pub fn algorithms_for(&self, names: &[String], preferred: &[Algorithm]) -> Vec<Algorithm> {
        let known: Vec<&PublicKey> = self
            .entries
            .iter()
            .filter(|e| e.marker.is_none() && names.iter().any(|n| match_host_list(n, &e.hosts)))
            .map(|e| &e.key)
            .collect();
        preferred
            .iter()
            .filter(|alg| {
                known.iter().any(|k| match (k.algorithm(), alg) {
                    (Algorithm::Rsa { .. }, Algorithm::Rsa { .. }) => true,
                    (a, b) => a == **b,
                })
            })
            .cloned()
            .collect()
    }
}

/// Parses one line: `Ok(None)` for blank lines and comments, `Ok(Some(None))` for lines that are
/// valid but ignored (`@cert-authority`), an error string for malformed lines.
#[allow(clippy::type_complexity)]
fn parse_line(raw: &str) -> Result<Option<Option<(Option<Marker>, String, PublicKey)>>, String> {
    let line = raw.trim_start_matches([' ', '\t']);
    if line.is_empty() || line.starts_with('#') {
        return Ok(None);
    }
    let mut fields = line.split_ascii_whitespace();
    let mut first = fields.next().unwrap_or_default();
    let mut marker = None;
    if let Some(name) = first.strip_prefix('@') {
        match name {
            "revoked" => marker = Some(Marker::Revoked),
            "cert-authority" => return Ok(Some(None)),
            other => return Err(format!("unknown marker @{other}")),
        }
        first = fields.next().ok_or("bad format (insufficient fields)")?;
    }
    let hosts = first.to_string();
    let (Some(alg), Some(b64)) = (fields.next(), fields.next()) else {
        return Err("bad format (insufficient fields)".to_string());
    };
    let key = PublicKey::from_openssh(&format!("{alg} {b64}"))
        .map_err(|e| format!("error parsing key: {e}"))?;
    Ok(Some(Some((marker, hosts, key))))
}

/// Matches `host` against a comma-separated pattern list as in OpenSSH and fleet's `matchHost`:
/// `*` and `?` wildcards, `!` negation (a negated match rejects the line outright), and hashed
/// `|1|salt|hash` names.
pub fn match_host_list(host: &str, patterns: &str) -> bool {
    let mut found = false;
    for pattern in patterns.split(',') {
        if let Some(negated) = pattern.strip_prefix('!') {
            if match_one(host, negated) {
                return false;
            }
            continue;
        }
        if match_one(host, pattern) {
            found = true;
        }
    }
    found
}

fn match_one(host: &str, pattern: &str) -> bool {
    if let Some(hashed) = pattern.strip_prefix("|1|") {
        return match_hashed(host, hashed);
    }
    wildcard_match(host.as_bytes(), pattern.to_ascii_lowercase().as_bytes())
}

/// `salt|hash`, both base64: the name matches when HMAC-SHA1(salt, name) == hash.
fn match_hashed(host: &str, salt_and_hash: &str) -> bool {
    let Some((salt, hash)) = salt_and_hash.split_once('|') else {
        return false;
    };
    let (Ok(salt), Ok(hash)) = (BASE64.decode(salt), BASE64.decode(hash)) else {
        return false;
    };
    let Ok(mut mac) = Hmac::<Sha1>::new_from_slice(&salt) else {
        return false;
    };
    mac.update(host.as_bytes());
    mac.verify_slice(&hash).is_ok()
}

/// Hashes `name` with `salt` into OpenSSH's `|1|salt|hash` form (what `ssh-keygen -H` writes).
pub fn hash_host_name(name: &str, salt: &[u8]) -> String {
    // An HMAC accepts keys of any length, so this cannot fail.
    let mut mac = match Hmac::<Sha1>::new_from_slice(salt) {
        Ok(mac) => mac,
        Err(_) => return String::new(),
    };
    mac.update(name.as_bytes());
    let hash = mac.finalize().into_bytes();
    format!("|1|{}|{}", BASE64.encode(salt), BASE64.encode(hash))
}

/// Glob match with `*` (any run) and `?` (one byte), iterative with single backtracking point.
fn wildcard_match(s: &[u8], p: &[u8]) -> bool {
    let (mut i, mut j) = (0usize, 0usize);
    let mut star: Option<(usize, usize)> = None;
    while j < s.len() {
        if i < p.len() && (p[i] == b'?' || p[i] == s[j]) {
            i += 1;
            j += 1;
        } else if i < p.len() && p[i] == b'*' {
            star = Some((i, j));
            i += 1;
        } else if let Some((si, sj)) = star {
            i = si + 1;
            j = sj + 1;
            star = Some((si, sj + 1));
        } else {
            return false;
        }
    }
    while i < p.len() && p[i] == b'*' {
        i += 1;
    }
    i == p.len()
}

/// The known-hosts line recording `key` under `name`, newline-terminated.
pub fn render_line(name: &str, key: &PublicKey) -> String {
    let mut bare = key.clone();
    bare.set_comment("");
    let text = bare
        .to_openssh()
        .unwrap_or_else(|_| key.algorithm().as_str().to_string());
    format!("{name} {}\n", text.trim_end())
}

/// Appends `key` for `name` to `path`, creating missing directories (mode 0700) and the file
/// (mode 0600). A file that does not end in a newline gets one first.
pub fn append(path: &Path, name: &str, key: &PublicKey) -> io::Result<()> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)?;
    }
    let needs_newline = match fs::read(path) {
        Ok(existing) => !existing.is_empty() && !existing.ends_with(b"\n"),
        Err(e) if e.kind() == io::ErrorKind::NotFound => false,
        Err(e) => return Err(e),
    };
    let mut f = OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(path)?;
    let mut out = String::new();
    if needs_newline {
        out.push('\n');
    }
    out.push_str(&render_line(name, key));
    f.write_all(out.as_bytes())?;
    f.flush()
}

/// fleet's short algorithm names in messages: RSA, DSA, ECDSA, else the SSH name.
pub fn algo_string(key: &PublicKey) -> String {
    match key.algorithm() {
        Algorithm::Rsa { .. } => "RSA".to_string(),
        Algorithm::Dsa => "DSA".to_string(),
        Algorithm::Ecdsa { .. } => "ECDSA".to_string(),
        other => other.as_str().to_string(),
    }
}

/// The SHA256 fingerprint as OpenSSH prints it (`SHA256:...`).
pub fn fingerprint(key: &PublicKey) -> String {
    key.fingerprint(HashAlg::Sha256).to_string()
}

/// The warning printed when a known host shows a different key; the essence of fleet's and
/// OpenSSH's, plus the offending file and line.
pub fn mismatch_warning(algo: &str, fingerprint: &str, file: &Path, line: usize) -> String {
    let bar = "@".repeat(59);
    format!(
        "{bar}\n\
         @    WARNING: REMOTE HOST IDENTIFICATION HAS CHANGED!     @\n\
         {bar}\n\
         IT IS POSSIBLE THAT SOMEONE IS DOING SOMETHING NASTY!\n\
         Someone could be eavesdropping on you right now (man-in-the-middle attack)!\n\
         It is also possible that a host key has just been changed.\n\
         The fingerprint for the {algo} key sent by the remote host is\n\
         {fingerprint}.\n\
         Please contact your system administrator.\n\
         Add correct host key in {file} to get rid of this message.\n\
         Offending key in {file}:{line}\n\
         Host key verification failed.\n",
        file = file.display(),
    )
}

/// fleet's prompt before trusting a new host.
pub fn trust_prompt(name: &str, algo: &str, fingerprint: &str) -> String {
    format!(
        "The authenticity of host '{name}' can't be established.\n\
         {algo} key fingerprint is {fingerprint}.\n\
         Are you sure you want to continue connecting (yes/no)? "
    )
}

/// Expands a leading `~` or `~/` to `$HOME` (fleet's `ParseFilepath`, without `~user`).
pub fn expand_tilde(path: &Path) -> PathBuf {
    let Some(s) = path.to_str() else {
        return path.to_path_buf();
    };
    let rest = if s == "~" {
        ""
    } else if let Some(rest) = s.strip_prefix("~/") {
        rest
    } else {
        return path.to_path_buf();
    };
    match std::env::var_os("HOME").filter(|h| !h.is_empty()) {
        Some(home) => PathBuf::from(home).join(rest),
        None => path.to_path_buf(),
    }
}

/// The host-key algorithms offered by default, most preferred first.
pub(crate) fn default_host_key_algorithms() -> Vec<Algorithm> {
    vec![
        Algorithm::Ed25519,
        Algorithm::Ecdsa {
            curve: EcdsaCurve::NistP256,
        },
        Algorithm::Ecdsa {
            curve: EcdsaCurve::NistP384,
        },
        Algorithm::Ecdsa {
            curve: EcdsaCurve::NistP521,
        },
        Algorithm::Rsa {
            hash: Some(HashAlg::Sha512),
        },
        Algorithm::Rsa {
            hash: Some(HashAlg::Sha256),
        },
        Algorithm::Rsa { hash: None },
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    const ED_A: &str =
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIEkP4IgVb43HC+1lDKwbQhcxFyAuKy9HbigZCxUUYAQI";
    const ED_B: &str =
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGRSOgarNF6WOPOhmmebYAa2LRKfxZfdnuMVrx/TM7t9";
    const RSA: &str = "ssh-rsa AAAAB3NzaC1yc2EAAAADAQABAAAAgQCSbcml0llLD0vvyim03zBW2erGsN907Ofkdb67Jo2soZRZ4PdCmzfLx1NFLYtqIa3pjDTDpa1JoXFxHxK13gkjAHMYM9iqBkAuqt+AjPGZ9yzCdzueA5xNZd/1YRuhqfGB5zADxc+hECMsUv/OPhRyjn1I+/KA4MCIcNXc6Bb+EQ==";

    fn key(s: &str) -> PublicKey {
        PublicKey::from_openssh(s).expect("test key parses")
    }

    #[test]
    fn wildcard_and_negation_matching() {
        let check = |host: &str, patterns: &str, expected: bool| {
            assert_eq!(
                match_host_list(host, patterns),
                expected,
                "host {host:?} patterns {patterns:?}"
            );
        };
        check("10.0.0.1", "10.0.0.1", true);
        check("10.0.0.1", "10.0.0.2", false);
        check("10.0.0.1", "10.0.0.*", true);
        check("10.0.0.12", "10.0.0.?", false);
        check("10.0.0.1", "10.0.0.?", true);
        check("10.0.0.1", "*", true);
        check("10.0.0.1", "!10.0.0.1,*", false);
        check("10.0.0.2", "!10.0.0.1,*", true);
        check("[10.0.0.1]:2222", "[10.0.0.1]:2222", true);
        check("[10.0.0.1]:2222", "10.0.0.1", false);
        check("10.0.0.1", "[10.0.0.1]:2222", false);
        check("node1.example.com", "*.example.com", true);
        check("node1.example.com", "*.EXAMPLE.com", true);
        check("example.com", "*.example.com", false);
        check("a", "a*b*c", false);
        check("abxbc", "a*b*c", true);
        check("h", "", false);
        check("h", "g,h,i", true);
    }

    #[test]
    fn host_port_names() {
        let check = |host: &str, port: u16, expected: &str| {
            assert_eq!(host_port_name(host, port), expected, "{host}:{port}");
        };
        check("10.0.0.1", 22, "10.0.0.1");
        check("10.0.0.1", 2222, "[10.0.0.1]:2222");
        check("Node.Example.COM", 22, "node.example.com");
        check("::1", 22, "::1");
        check("::1", 2200, "[::1]:2200");
        check("[::1]", 2200, "[::1]:2200");
    }

    #[test]
    fn hashed_names_round_trip() {
        let hashed = hash_host_name("[127.0.0.1]:2222", b"0123456789abcdefghij");
        assert!(hashed.starts_with("|1|"));
        assert!(match_host_list("[127.0.0.1]:2222", &hashed));
        assert!(!match_host_list("127.0.0.1", &hashed));
        assert!(!match_host_list("x", "|1|notbase64!|alsonot"));
        assert!(!match_host_list("x", "|1|"));
    }

    #[test]
    fn verdicts() {
        let hashed = hash_host_name("10.0.0.9", b"salt-salt-salt-salt!");
        let file = format!(
            "# comment\n\
             \n\
             10.0.0.1 {ED_A}\n\
             [10.0.0.1]:2222 {ED_B}\n\
             10.0.0.2,10.0.0.3 {RSA} some comment\n\
             {hashed} {ED_A}\n\
             garbage line\n\
             10.0.0.4 {ED_A}\n\
             10.0.0.4 {ED_B}\n\
             @revoked 10.0.0.5 {ED_A}\n\
             10.0.0.5 {ED_A}\n\
             @cert-authority *.example.com {ED_B}\n\
             \t 10.0.0.6\t{ED_A}\n"
        );
        let kh = KnownHosts::parse(&file, Path::new("/kh"));
        let check = |name: &str, k: &str, expected: Verdict| {
            assert_eq!(
                kh.check(&[name.to_string()], &key(k)),
                expected,
                "{name} with {k}"
            );
        };
        check("10.0.0.1", ED_A, Verdict::Known);
        check("10.0.0.1", ED_B, Verdict::Mismatch { line: 3 });
        check("[10.0.0.1]:2222", ED_B, Verdict::Known);
        check("[10.0.0.1]:2222", ED_A, Verdict::Mismatch { line: 4 });
        check("10.0.0.3", RSA, Verdict::Known);
        check("10.0.0.3", ED_A, Verdict::Mismatch { line: 5 });
        check("10.0.0.9", ED_A, Verdict::Known);
        check("10.0.0.9", ED_B, Verdict::Mismatch { line: 6 });
        check("10.0.0.4", ED_B, Verdict::Known);
        check("10.0.0.5", ED_A, Verdict::Revoked { line: 10 });
        check("10.0.0.6", ED_A, Verdict::Known);
        check("10.0.0.7", ED_A, Verdict::Unknown);
        check("foo.example.com", ED_B, Verdict::Unknown);
        // Either of several names may be the known one.
        assert_eq!(
            kh.check(&["nosuch".into(), "10.0.0.1".into()], &key(ED_A)),
            Verdict::Known
        );
    }

    #[test]
    fn algorithms_offered_follow_known_key_types() {
        let file = format!("a {ED_A}\nb {RSA}\nc {ED_A}\nc {RSA}\n");
        let kh = KnownHosts::parse(&file, Path::new("/kh"));
        let prefs = default_host_key_algorithms();
        let algs = |name: &str| kh.algorithms_for(&[name.to_string()], &prefs);
        assert_eq!(algs("a"), vec![Algorithm::Ed25519]);
        assert_eq!(algs("b").len(), 3);
        assert!(algs("b").iter().all(|a| matches!(a, Algorithm::Rsa { .. })));
        assert_eq!(algs("c").len(), 4);
        assert!(algs("d").is_empty());
    }

    #[test]
    fn render_and_append() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("sub/dir/known_hosts");
        append(
            &path,
            "[127.0.0.1]:2222",
            &key(&format!("{ED_A} a comment")),
        )
        .expect("append");
        std::fs::write(
            &path,
            std::fs::read_to_string(&path).expect("read").trim_end(),
        )
        .expect("rewrite without newline");
        append(&path, "10.0.0.1", &key(RSA)).expect("append");
        let text = std::fs::read_to_string(&path).expect("read");
        assert_eq!(text, format!("[127.0.0.1]:2222 {ED_A}\n10.0.0.1 {RSA}\n"));
        use std::os::unix::fs::PermissionsExt;
        let mode = |p: &Path| std::fs::metadata(p).expect("stat").permissions().mode() & 0o777;
        assert_eq!(mode(&path), 0o600);
        assert_eq!(mode(&dir.path().join("sub/dir")), 0o700);
        let kh = KnownHosts::load(&path).expect("load");
        assert_eq!(kh.check(&["10.0.0.1".into()], &key(RSA)), Verdict::Known);
        let missing = KnownHosts::load(&dir.path().join("nope")).expect("missing is empty");
        assert_eq!(missing.check(&["x".into()], &key(RSA)), Verdict::Unknown);
    }

    #[test]
    fn messages() {
        let k = key(RSA);
        assert_eq!(algo_string(&k), "RSA");
        assert_eq!(algo_string(&key(ED_A)), "ssh-ed25519");
        assert!(fingerprint(&k).starts_with("SHA256:"));
        let w = mismatch_warning("RSA", "SHA256:abc", Path::new("/home/u/kh"), 7);
        assert!(w.contains("WARNING: REMOTE HOST IDENTIFICATION HAS CHANGED!"));
        assert!(w.contains("Offending key in /home/u/kh:7"));
        assert!(w.contains("Add correct host key in /home/u/kh to get rid of this message."));
        assert!(w.ends_with("Host key verification failed.\n"));
        assert_eq!(
            trust_prompt("10.0.0.1", "RSA", "SHA256:abc"),
            "The authenticity of host '10.0.0.1' can't be established.\n\
             RSA key fingerprint is SHA256:abc.\n\
             Are you sure you want to continue connecting (yes/no)? "
        );
    }
}
