//! fleetd's reload and state dump as fleet v1.0 had them (issue 14): a fleet v1.0-style
//! fleet.conf is read as fleet read it, SIGHUP rebuilds the API on the socket it had (a new
//! `token_limit` reaches it) without restarting fleetd or the units, and SIGUSR1 prints the
//! agent's state as one line of JSON in the journal.

use std::time::Duration;

use functional::fleet::{api_get, boot, must, quick_spec};
use functional::{FleetCluster, wait_for};

const WAIT: Duration = Duration::from_secs(30);

#[test]
fn sighup_rebuilds_the_api_and_sigusr1_dumps_the_agent() {
    let c = boot(quick_spec("sigs", 1));
    must(c.wait_for_machines(1, 1, WAIT));
    let hello = must(c.put_fixture(1, "hello.service"));
    must(c.fleetctl_ok(1, &["start", "--no-block", &hello]));
    let other = must(c.put_unit(1, "other.service", "[Service]\nExecStart=/bin/sleep 3600\n"));
    must(c.fleetctl_ok(1, &["submit", &other]));
    must(c.wait_for_active(1, 1, WAIT));
    let before = must(c.systemd_unit(1, "hello.service"));
    let fleetd = must(c.fleetd_pid(1));
    let page = api_get(&c, 1, "/fleet/v1/units").expect("the API answers");
    assert!(
        page.contains("other.service") && !page.contains("nextPageToken"),
        "{page}"
    );

    // fleet v1.0 read this as token_limit=1: the continued comment swallows the next line,
    // keys are case-insensitive, values may be single-quoted or followed by a comment, and
    // sections are ignored. Before, the quotes and the section stopped the reload (old
    // configuration kept). (`'1' ; comment` would not do: fleet kept the quotes there and
    // ignored the value, and so do we.)
    let conf = r"
# pages of one \
token_limit=7
ETCD_KEY_PREFIX = '/_coreos.com/fleet/'
TOKEN_LIMIT = 1 ; one unit per page
[unused]
token_limit=50
";
    let append = r#"printf '%s' "$1" >> /etc/fleet/fleet.conf"#;
    must(c.exec(1, &["sh", "-c", append, "sh", conf]));
    must(c.exec(1, &["systemctl", "kill", "-s", "HUP", "fleet.service"]));
    // before, the API kept its first configuration until fleetd restarted
    must(wait_for("the API pages by one unit", WAIT, || {
        let page = api_get(&c, 1, "/fleet/v1/units").map_err(|e| e.to_string())?;
        if page.contains("nextPageToken") && page.matches("\"desiredState\"").count() == 1 {
            Ok(())
        } else {
            Err(page)
        }
    }));
    assert_eq!(
        must(c.fleetd_pid(1)),
        fleetd,
        "SIGHUP must not restart fleetd"
    );
    let after = must(c.systemd_unit(1, "hello.service"));
    assert_eq!(
        (after.main_pid, after.active_enter_us),
        (before.main_pid, before.active_enter_us),
        "the reload restarted hello.service"
    );
    // fleetctl v1.0's way of listing follows the pages
    let listed = must(c.fleetctl_ok(1, &["list-unit-files", "--no-legend", "--fields", "unit"]));
    assert_eq!(
        listed.stdout.split_whitespace().collect::<Vec<_>>(),
        ["hello.service", "other.service"]
    );

    // SIGUSR1: before, it killed fleetd (no handler)
    must(c.exec(
        1,
        &[
            "systemctl",
            "kill",
            "--kill-whom=main",
            "-s",
            "USR1",
            "fleet.service",
        ],
    ));
    let want = r#"{"Agent":{"Cache":{"TargetStates":{"hello.service":"launched"}}},"UnitStatePublisher":{"Cache":{"hello.service":{"LoadState":"loaded","ActiveState":"active","SubState":"running","#;
    must(wait_for("the state dump in the journal", WAIT, || {
        let out = c
            .exec(
                1,
                &[
                    "journalctl",
                    "-u",
                    "fleet.service",
                    "-o",
                    "cat",
                    "--no-pager",
                ],
            )
            .map_err(|e| e.to_string())?;
        match out.stdout.lines().find(|l| l.starts_with(r#"{"Agent":"#)) {
            Some(line)
                if line.starts_with(want)
                    && line
                        .ends_with(r#""UnitStateGenerator":{"Subscribed":["hello.service"]}}"#) =>
            {
                Ok(())
            }
            Some(line) => Err(format!("unexpected dump: {line}")),
            None => Err("no dump yet".into()),
        }
    }));
    assert_eq!(
        must(c.fleetd_pid(1)),
        fleetd,
        "SIGUSR1 must not stop fleetd"
    );
}
