//! Trust on first use and changed host keys in fleetctl's known-hosts file.

use std::fs;
use std::path::Path;

use functional::Cluster;
use functional::fleet::{must, short_id};

use crate::support::*;

/// The `ssh-ed25519 AAAA...` part of the host key node `node` serves.
fn host_key(c: &Cluster, node: usize) -> String {
    let out = must(
        c.exec(node, &["cat", "/etc/ssh/ssh_host_ed25519_key.pub"])
            .and_then(|o| o.ok("reading the host key")),
    );
    out.stdout
        .split_whitespace()
        .take(2)
        .collect::<Vec<_>>()
        .join(" ")
}

/// The SHA256 fingerprint of the host key node `node` serves.
fn host_fingerprint(c: &Cluster, node: usize) -> String {
    let out = must(
        c.exec(
            node,
            &[
                "ssh-keygen",
                "-l",
                "-f",
                "/etc/ssh/ssh_host_ed25519_key.pub",
            ],
        )
        .and_then(|o| o.ok("ssh-keygen -l")),
    );
    match out.stdout.split_whitespace().nth(1) {
        Some(fp) => fp.to_string(),
        None => panic!("no fingerprint in {out}"),
    }
}

/// Known hosts, in a file of their own: a new host is asked about and stored on "yes"
/// (refused otherwise), a known one is not asked about, a changed host key is refused
/// naming the offending line, and removing the line or the file lets the new key in.
pub fn known_hosts_trust_on_first_use_and_changed_keys(h: &Host, node: usize) {
    let c = h.c;
    let kh = h.dir.0.join("fresh").join("known_hosts");
    let ip = c.ip(node);
    let m = short_id(c.machine_id(node)).to_string();
    let args = ["ssh", m.as_str(), "hostname"];
    let hostname = format!("node{node}\n");
    let prompt = format!("The authenticity of host '{ip}' can't be established.");
    let added =
        format!("Warning: Permanently added '{ip}' (ssh-ed25519) to the list of known hosts.");
    let line = |node: usize| format!("{ip} {}\n", host_key(c, node));
    let read = |p: &Path| fs::read_to_string(p).ok();

    // no answer, or "no": refused, nothing stored
    for input in [None, Some("no\n")] {
        let out = h.with_known_hosts(&kh, &args, input);
        assert!(!out.success(), "{input:?}: {out}");
        assert!(
            out.stderr.contains(&prompt)
                && out.stderr.contains(&host_fingerprint(c, node))
                && out.stderr.contains("Host key verification failed."),
            "{input:?}: {out}"
        );
        assert_eq!(read(&kh), None, "{input:?}: nothing may be stored");
    }
    // "yes": trusted, stored under the address reached
    let out = h.with_known_hosts(&kh, &args, Some("yes\n"));
    assert_eq!(
        (out.code, out.stdout.as_str()),
        (Some(0), hostname.as_str()),
        "{out}"
    );
    assert!(
        out.stderr.contains(&prompt) && out.stderr.contains(&added),
        "{out}"
    );
    assert_eq!(read(&kh), Some(line(node)));
    // known now: no question asked
    let out = h.with_known_hosts(&kh, &args, None);
    assert_eq!(
        (out.code, out.stdout.as_str()),
        (Some(0), hostname.as_str()),
        "{out}"
    );
    assert!(!out.stderr.contains(&prompt), "{out}");

    // the machine gets a new host key
    let old = line(node);
    let regen = "rm -f /etc/ssh/ssh_host_ed25519_key /etc/ssh/ssh_host_ed25519_key.pub && \
                 ssh-keygen -q -t ed25519 -N '' -C root@new -f /etc/ssh/ssh_host_ed25519_key && \
                 systemctl restart ssh.service";
    must(
        c.exec(node, &["sh", "-c", regen])
            .and_then(|o| o.ok("new host key")),
    );
    assert_ne!(line(node), old, "the host key must have changed");
    let out = h.with_known_hosts(&kh, &args, Some("yes\n"));
    assert!(!out.success(), "a changed host key must be refused: {out}");
    for want in [
        "WARNING: REMOTE HOST IDENTIFICATION HAS CHANGED!".to_string(),
        host_fingerprint(c, node),
        format!("Offending key in {}:1", kh.display()),
    ] {
        assert!(out.stderr.contains(&want), "lacks {want:?}: {out}");
    }
    assert!(out.stdout.is_empty(), "{out}");
    assert_eq!(read(&kh), Some(old.clone()), "the file stays as it was");
    // without strict host key checking the file is neither read nor written
    let out = h.with_known_hosts(
        &kh,
        &[&["--strict-host-key-checking=false"][..], &args[..]].concat(),
        None,
    );
    assert_eq!(
        (out.code, out.stdout.as_str()),
        (Some(0), hostname.as_str()),
        "{out}"
    );
    assert_eq!(read(&kh), Some(old.clone()), "the file stays as it was");
    // a tunnel through the changed host is refused the same way
    let mut targs = h.ssh_flags(&kh, true);
    targs.extend([format!("--tunnel={ip}"), "list-machines".to_string()]);
    let out = h.run(&targs, &[], None);
    assert!(
        out.code == Some(1)
            && out
                .stderr
                .contains("REMOTE HOST IDENTIFICATION HAS CHANGED")
            && out
                .stderr
                .contains("Unable to initialize client: failed initializing SSH client"),
        "{out}"
    );

    // resetting: without the line, then without the file, the new key is asked for and kept
    // (another host's line stays: the harness's client key serves as a stand-in host key)
    let client_key = fs::read_to_string(format!("{}.pub", h.key)).unwrap_or_default();
    let other = format!(
        "10.255.255.1 {}\n",
        client_key
            .split_whitespace()
            .take(2)
            .collect::<Vec<_>>()
            .join(" ")
    );
    let resets: [(&str, Option<&str>, String); 2] = [
        (
            "line removed",
            Some(&other),
            format!("{other}{}", line(node)),
        ),
        ("file removed", None, line(node)),
    ];
    for (what, contents, want) in resets {
        match contents {
            Some(text) => must_write(&kh, text),
            None => {
                let _ = fs::remove_file(&kh);
            }
        }
        let out = h.with_known_hosts(&kh, &args, Some("yes\n"));
        assert_eq!(
            (out.code, out.stdout.as_str()),
            (Some(0), hostname.as_str()),
            "{what}: {out}"
        );
        assert!(out.stderr.contains(&prompt), "{what}: {out}");
        assert_eq!(read(&kh), Some(want), "{what}");
    }
}

fn must_write(path: &Path, text: &str) {
    if let Err(e) = fs::write(path, text) {
        panic!("writing {}: {e}", path.display());
    }
}
