//! `fleetd --version` as fleet v1.0 printed it (scripts parse it), in each of fleet's
//! spellings, and fleet's answer to an argument fleetd does not take.

use std::process::Command;

fn fleetd(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_fleetd"))
        .args(args)
        .output()
        .expect("run fleetd");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn version_in_fleets_words_and_spellings() {
    let want = format!("fleetd version {}\n", env!("CARGO_PKG_VERSION"));
    for args in [&["--version"][..], &["-version"], &["version"]] {
        assert_eq!(fleetd(args), (0, want.clone(), String::new()), "{args:?}");
    }
    let (code, stdout, stderr) = fleetd(&["start"]);
    assert_eq!((code, stdout.as_str()), (1, ""));
    assert!(
        stderr.starts_with("fleetd takes no arguments. Did you mean to invoke fleetctl instead?"),
        "{stderr}"
    );
}
