//! What a package installs beside fleetd and fleetctl, generated from the definitions the
//! binaries themselves use: man pages (fleetctl's and fleetd's clap trees, the same as
//! `--help`; fleet-config's option table for fleet.conf(5)), shell completions, and the
//! commented `/etc/fleet/fleet.conf`. Nothing here is written by hand twice, so nothing drifts.

use std::io::Write;

use clap_mangen::Man;
use fleet_config::{Config, OPTION_DOCS, OptionDoc};
use roff::{Roff, bold, italic, roman};

/// The manual these pages belong to, in their headers.
const MANUAL: &str = "fleet manual";

/// The package version the pages name.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// One generated file: its name and its bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct File {
    pub name: String,
    pub text: String,
}

/// Every man page: `fleetctl.1`, `fleetctl-<command>.1` for each command fleetctl lists in
/// its help, `fleetd.8` and `fleet.conf.5`.
pub fn man_pages() -> std::io::Result<Vec<File>> {
    let mut pages = fleetctl_pages()?;
    pages.push(fleetd_page()?);
    pages.push(File {
        name: "fleet.conf.5".into(),
        text: fleet_conf_page(),
    });
    Ok(pages)
}

fn man(cmd: clap::Command, section: &str) -> Man {
    Man::new(cmd)
        .section(section)
        .source(format!("fleet {VERSION}"))
        .manual(MANUAL)
}

fn render(w: &mut Vec<u8>, roff: &Roff) -> std::io::Result<()> {
    roff.to_writer(w)
}

/// A `.SH` section of paragraphs.
fn section(roff: &mut Roff, title: &str, paragraphs: &[&str]) {
    roff.control("SH", [title]);
    for (i, p) in paragraphs.iter().enumerate() {
        if i > 0 {
            roff.control("PP", []);
        }
        roff.text([roman(*p)]);
    }
}

/// A `.SH` section of tagged paragraphs (term in bold, then its description).
fn tagged(roff: &mut Roff, title: &str, items: &[(&str, &str)]) {
    roff.control("SH", [title]);
    for (term, text) in items {
        roff.control("TP", []);
        roff.text([bold(*term)]);
        roff.text([roman(*text)]);
    }
}

/// `SEE ALSO` with `name(section)` references.
fn see_also(roff: &mut Roff, refs: &[String]) {
    roff.control("SH", ["SEE ALSO"]);
    let mut line = Vec::new();
    for (i, r) in refs.iter().enumerate() {
        let (name, sect) = r.split_once('(').unwrap_or((r, ""));
        line.push(bold(name.to_string()));
        let tail = if i + 1 < refs.len() { "), " } else { ")" };
        line.push(roman(format!("({}{tail}", sect.trim_end_matches(')'))));
    }
    roff.text(line);
}

fn fleetctl_pages() -> std::io::Result<Vec<File>> {
    let mut root = fleetctl::cli::command().disable_help_subcommand(true);
    root.build();
    let subs: Vec<clap::Command> = root
        .get_subcommands()
        .filter(|s| !s.is_hide_set())
        .cloned()
        .collect();
    let mut refs: Vec<String> = vec!["fleetd(8)".into(), "fleet.conf(5)".into()];
    let mut pages = Vec::new();
    for sub in &subs {
        // the positional arguments under a heading of their own (in --help they come first
        // under ARGS; the page would otherwise show two OPTIONS headings)
        let sub = sub.clone().mut_args(|a| {
            if a.is_positional() {
                a.help_heading("ARGUMENTS")
            } else {
                a
            }
        });
        let m = man(sub.clone(), "1");
        let name = m.get_filename();
        let mut w = Vec::new();
        m.render_title(&mut w)?;
        m.render_name_section(&mut w)?;
        m.render_synopsis_section(&mut w)?;
        m.render_description_section(&mut w)?;
        if sub.get_arguments().any(|a| !a.is_hide_set()) {
            m.render_options_section(&mut w)?;
        }
        let mut extra = Roff::new();
        see_also(
            &mut extra,
            &["fleetctl(1)".to_string(), "fleet.conf(5)".to_string()],
        );
        render(&mut w, &extra)?;
        refs.push(format!("fleetctl-{}(1)", sub.get_name()));
        pages.push(File {
            name,
            text: String::from_utf8_lossy(&w).into_owned(),
        });
    }
    let m = man(root, "1");
    let mut w = Vec::new();
    m.render_title(&mut w)?;
    m.render_name_section(&mut w)?;
    m.render_synopsis_section(&mut w)?;
    m.render_description_section(&mut w)?;
    m.render_options_section(&mut w)?;
    m.render_subcommands_section(&mut w)?;
    let mut extra = Roff::new();
    section(
        &mut extra,
        "DRIVERS",
        &[
            "By default fleetctl talks to fleet's HTTP API on the local socket \
             unix:///var/run/fleet.sock, which fleet.socket provides on every machine running \
             fleetd. --endpoint names another API (http://host:port, https://host:port with \
             --ca-file, --cert-file and --key-file). --driver=etcd talks to etcd directly \
             instead; --tunnel=host[:port] reaches the endpoint through SSH on that machine.",
        ],
    );
    section(
        &mut extra,
        "ENVIRONMENT",
        &[
            "Each global option can also be set as FLEETCTL_ followed by its name in upper case \
           with - as _ (for example FLEETCTL_ENDPOINT, FLEETCTL_TUNNEL); an empty variable \
           counts as unset. FLEETCTL_SSH_IDENTITY names the SSH identity file.",
        ],
    );
    tagged(
        &mut extra,
        "EXIT STATUS",
        &[
            ("0", "The command succeeded."),
            ("1", "The command failed; the reason is on standard error."),
            (
                "2",
                "The command line could not be parsed, or asked for signed units, which are \
                 no longer supported.",
            ),
            (
                "other",
                "ssh, status and journal exit with the status of the command they ran on the \
                 remote machine.",
            ),
        ],
    );
    section(
        &mut extra,
        "SHELL COMPLETION",
        &[
            "fleetctl completion bash (or zsh, fish, elvish, powershell) prints a completion \
           script; the Debian package installs the bash and zsh ones.",
        ],
    );
    see_also(&mut extra, &refs);
    render(&mut w, &extra)?;
    m.render_version_section(&mut w)?;
    pages.insert(
        0,
        File {
            name: m.get_filename(),
            text: String::from_utf8_lossy(&w).into_owned(),
        },
    );
    Ok(pages)
}

fn fleetd_page() -> std::io::Result<File> {
    let m = man(fleetd::cli::command(), "8");
    let mut w = Vec::new();
    m.render_title(&mut w)?;
    m.render_name_section(&mut w)?;
    m.render_synopsis_section(&mut w)?;
    let mut extra = Roff::new();
    section(
        &mut extra,
        "DESCRIPTION",
        &[
            "fleetd is fleet's daemon. It runs on every machine of a fleet cluster and holds \
             three parts: the agent, which makes this machine's systemd run the units \
             scheduled to it and reports their states; the engine, which on one elected \
             machine at a time decides where each unit runs; and the HTTP API that fleetctl \
             and other tools use. All of them coordinate through etcd.",
            "fleetd is normally started by systemd as fleet.service, with fleet.socket \
             passing it the API socket /var/run/fleet.sock. Its configuration is read from \
             /etc/fleet/fleet.conf (or --config) and FLEET_* environment variables, and is \
             checked whole before fleetd connects to anything; see fleet.conf(5). -config and \
             -version, fleet v1.0's spellings, are accepted too.",
        ],
    );
    render(&mut w, &extra)?;
    m.render_options_section(&mut w)?;
    let mut extra = Roff::new();
    tagged(
        &mut extra,
        "SIGNALS",
        &[
            (
                "SIGTERM, SIGINT",
                "Stop. Before exiting, fleetd stops and removes the units it runs on this \
                 machine and leaves the cluster at once, so the engine schedules them \
                 elsewhere. systemctl stop fleet.service sends SIGTERM, so stopping the \
                 service moves this machine's units away.",
            ),
            (
                "SIGHUP",
                "Read the configuration again and restart agent and engine with it, without \
                 touching running units. A configuration that does not load or start is \
                 refused and the previous one keeps running.",
            ),
            (
                "SIGKILL",
                "fleetd ends without cleaning up; its units keep running. A fleetd started \
                 again within agent_ttl recognizes this machine's registration and adopts \
                 its units without restarting them; later, the cluster has already \
                 scheduled them elsewhere.",
            ),
        ],
    );
    tagged(
        &mut extra,
        "EXIT STATUS",
        &[
            ("0", "fleetd stopped on a signal after cleaning up."),
            (
                "1",
                "The configuration is invalid, the first start failed (etcd, D-Bus or the \
                 machine ID), or fleetd stopped while it could not run its units.",
            ),
        ],
    );
    tagged(
        &mut extra,
        "FILES",
        &[
            (
                "/etc/fleet/fleet.conf",
                "The configuration, see fleet.conf(5).",
            ),
            (
                "/var/run/fleet.sock",
                "The local API socket (fleet.socket).",
            ),
            (
                "/run/fleet/units/",
                "The unit files of the units scheduled to this machine (units_directory).",
            ),
            ("/etc/machine-id", "This machine's ID in the cluster."),
        ],
    );
    see_also(
        &mut extra,
        &[
            "fleetctl(1)".into(),
            "fleet.conf(5)".into(),
            "systemd.unit(5)".into(),
            "etcd(1)".into(),
        ],
    );
    render(&mut w, &extra)?;
    Ok(File {
        name: m.get_filename(),
        text: String::from_utf8_lossy(&w).into_owned(),
    })
}

/// `default: ...` as a page or the sample configuration shows it.
fn default_of(d: &OptionDoc) -> String {
    Config::default().option_text(d.name).unwrap_or_default()
}

fn fleet_conf_page() -> String {
    let mut r = Roff::new();
    r.control(
        "TH",
        ["FLEET.CONF", "5", "", &format!("fleet {VERSION}"), MANUAL],
    );
    r.control("SH", ["NAME"]);
    r.text([roman("fleet.conf - configuration of fleetd")]);
    section(&mut r, "SYNOPSIS", &["/etc/fleet/fleet.conf"]);
    section(
        &mut r,
        "DESCRIPTION",
        &[
            "fleetd(8) reads its options from /etc/fleet/fleet.conf (another file with \
             --config), then from environment variables: FLEET_ and the option's name in \
             upper case, such as FLEET_PUBLIC_IP, override the file. With fleet.service, set \
             them in a drop-in (systemctl edit fleet.service). fleetd checks every value \
             before it connects to anything, and refuses to start on an invalid one, naming \
             the option; on SIGHUP an invalid file is refused and the running configuration \
             kept.",
            "The file holds one option per line as name=value; values may be quoted with \
             double quotes. Lines starting with # or ; are comments. Unknown options are \
             logged and ignored.",
        ],
    );
    r.control("SH", ["OPTIONS"]);
    for d in OPTION_DOCS {
        r.control("TP", []);
        r.text([bold(d.name), roman("="), italic(d.value)]);
        r.text([roman(d.help)]);
        r.control("br", []);
        let default = default_of(d);
        let shown = if default.is_empty() {
            "empty".to_string()
        } else {
            default
        };
        r.text([
            roman("Default: "),
            bold(shown),
            roman(". Environment: "),
            bold(format!("FLEET_{}", d.name.to_uppercase())),
            roman("."),
        ]);
    }
    r.control("SH", ["EXAMPLE"]);
    r.control("nf", []);
    for line in [
        "etcd_servers=https://10.0.0.1:2379,https://10.0.0.2:2379",
        "etcd_cafile=/etc/fleet/etcd-ca.pem",
        "public_ip=10.0.0.21",
        "metadata=region=eu-west,disk=ssd",
    ] {
        r.text([roman(line)]);
    }
    r.control("fi", []);
    see_also(
        &mut r,
        &[
            "fleetd(8)".into(),
            "fleetctl(1)".into(),
            "systemctl(1)".into(),
        ],
    );
    r.to_roff()
}

/// The commented `/etc/fleet/fleet.conf` of a package: every option, commented out at its
/// default, with what it does.
pub fn sample_config() -> String {
    let mut out = String::from(
        "# /etc/fleet/fleet.conf: configuration of fleetd, see fleet.conf(5).\n\
         #\n\
         # Every option is listed at its default, commented out. FLEET_<OPTION> environment\n\
         # variables (a drop-in of fleet.service) override this file. After a change, make fleetd\n\
         # re-read it without touching running units (SIGHUP):\n\
         #   systemctl kill --kill-whom=main --signal=HUP fleet.service\n\
         # Most machines need etcd_servers, and public_ip when they have several addresses.\n",
    );
    for d in OPTION_DOCS {
        out.push('\n');
        for line in wrap(d.help, 88) {
            out.push_str(&format!("# {line}\n"));
        }
        out.push_str(&format!("#{}={}\n", d.name, default_of(d)));
    }
    out
}

/// `text` in lines of at most `width` characters (words are never split).
fn wrap(text: &str, width: usize) -> Vec<String> {
    let mut lines = Vec::new();
    let mut line = String::new();
    for word in text.split_whitespace() {
        if !line.is_empty() && line.len() + 1 + word.len() > width {
            lines.push(std::mem::take(&mut line));
        }
        if !line.is_empty() {
            line.push(' ');
        }
        line.push_str(word);
    }
    if !line.is_empty() {
        lines.push(line);
    }
    lines
}

/// fleetctl's completion scripts for the shells the package installs them for, named as
/// bash-completion and zsh look for them: `bash/fleetctl`, `zsh/_fleetctl`. The same
/// scripts `fleetctl completion SHELL` prints.
pub fn completions() -> Vec<File> {
    use clap_complete::Shell;
    [
        (Shell::Bash, "bash/fleetctl"),
        (Shell::Zsh, "zsh/_fleetctl"),
    ]
    .into_iter()
    .map(|(shell, name)| {
        let mut cmd = fleetctl::cli::command();
        let mut buf = Vec::new();
        clap_complete::generate(shell, &mut cmd, "fleetctl", &mut buf);
        File {
            name: name.into(),
            text: String::from_utf8_lossy(&buf).into_owned(),
        }
    })
    .collect()
}

/// Writes `files` below `dir`, creating directories as needed.
pub fn write_all(dir: &std::path::Path, files: &[File]) -> std::io::Result<()> {
    for f in files {
        let path = dir.join(&f.name);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)?;
        }
        let mut out = std::fs::File::create(&path)?;
        out.write_all(f.text.as_bytes())?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn page<'a>(pages: &'a [File], name: &str) -> &'a str {
        &pages
            .iter()
            .find(|p| p.name == name)
            .unwrap_or_else(|| panic!("no page {name}"))
            .text
    }

    /// Every command fleetctl's help lists has its page and is named in fleetctl(1); the
    /// hidden ones (verify) have none.
    #[test]
    fn a_page_per_fleetctl_command() {
        let pages = man_pages().expect("pages");
        let root = page(&pages, "fleetctl.1");
        let cmd = fleetctl::cli::command();
        for sub in cmd.get_subcommands() {
            let name = format!("fleetctl-{}.1", sub.get_name());
            let listed = pages.iter().any(|p| p.name == name);
            assert_eq!(listed, !sub.is_hide_set(), "{name}");
            if listed {
                let roff_name = sub.get_name().replace('-', "\\-");
                assert!(
                    root.contains(&format!("fleetctl\\-{roff_name}(1)")),
                    "{name}"
                );
            }
        }
        assert!(!pages.iter().any(|p| p.name == "fleetctl-help.1"));
        // the pages carry what --help says, flags and environment variables included
        let start = page(&pages, "fleetctl-start.1");
        assert!(
            start.contains("no\\-block") && start.contains("replace"),
            "{start}"
        );
        assert!(root.contains("FLEETCTL_ENDPOINT"), "{root}");
        let fleetd = page(&pages, "fleetd.8");
        assert!(
            fleetd.contains(".TH fleetd 8") && fleetd.contains("\\-\\-config"),
            "{fleetd}"
        );
    }

    /// fleet.conf(5) and the sample configuration list every option with its default, as
    /// fleet-config defines them.
    #[test]
    fn every_option_with_its_default() {
        let pages = man_pages().expect("pages");
        let conf = page(&pages, "fleet.conf.5");
        let sample = sample_config();
        for name in fleet_config::OPTIONS {
            let default = Config::default().option_text(name).expect(name);
            let shown = if default.is_empty() {
                "empty"
            } else {
                &default
            };
            assert!(conf.contains(&format!("\\fB{name}\\fR")), "{name}");
            assert!(
                conf.contains(&format!("Default: \\fB{}\\fR", shown.replace('-', "\\-"))),
                "{name} default {shown:?}"
            );
            assert!(sample.contains(&format!("\n#{name}={default}\n")), "{name}");
        }
        assert!(conf.contains("/_coreos.com/fleet/") && sample.contains("#agent_ttl=30s\n"));
    }

    /// The sample configuration, uncommented, is a valid configuration equal to the defaults.
    #[test]
    fn the_sample_config_uncommented_is_the_defaults() {
        let dir = std::env::temp_dir().join(format!("fleet-dist-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let path = dir.join("fleet.conf");
        let plain: String = sample_config()
            .lines()
            .filter_map(|l| l.strip_prefix('#'))
            .filter(|l| l.contains('=') && !l.starts_with(' '))
            .map(|l| format!("{l}\n"))
            .collect();
        std::fs::write(&path, &plain).expect("write");
        let mut loaded = Config::load(Some(&path), []).expect("load");
        let _ = std::fs::remove_dir_all(&dir);
        loaded.warnings.clear();
        assert_eq!(loaded, Config::default(), "{plain}");
        // and it is all comments as shipped
        assert!(
            sample_config()
                .lines()
                .all(|l| l.is_empty() || l.starts_with('#'))
        );
    }

    #[test]
    fn completions_for_bash_and_zsh() {
        let files = completions();
        assert_eq!(files.len(), 2);
        assert!(files[0].text.contains("fleetctl") && files[0].text.contains("list-units"));
        assert!(files[1].text.starts_with("#compdef fleetctl"));
    }
}
