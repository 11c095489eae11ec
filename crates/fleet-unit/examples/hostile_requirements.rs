//! Times reading the `[X-Fleet]` requirements of the security review's hostile unit: N
//! `MachineOf` values of LEN characters and N `Conflicts=*aaa…b` patterns, as the API, the
//! engine and the agent read them.
//!
//! `cargo run --release -p fleet-unit --example hostile_requirements -- [N] [LEN]`
//! (defaults 250 and 2000)

use std::time::Instant;

use fleet_unit::{Requirements, UnitFile, UnitName, UnitOption, glob_match};

fn main() {
    let mut args = std::env::args().skip(1);
    let n: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(250);
    let len: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(2000);
    let a = "a".repeat(len);
    let mut options = vec![UnitOption::new("Service", "ExecStart", "/bin/true")];
    for _ in 0..n {
        options.push(UnitOption::new("X-Fleet", "MachineOf", a.clone()));
        options.push(UnitOption::new(
            "X-Fleet",
            "Conflicts",
            format!("*{}b", &a[1..]),
        ));
    }
    let file = UnitFile::from_options(options);
    let Ok(name) = UnitName::parse("hostile.service") else {
        return;
    };
    let start = Instant::now();
    let result = Requirements::from_unit(&name, &file);
    let took = start.elapsed();
    match result {
        Ok(_) => println!("{n} x {n} values of {len} chars: accepted in {took:?}"),
        Err(e) => println!("{n} x {n} values of {len} chars: refused in {took:?}: {e}"),
    }
    // one pair, matched 100 times: what every pair cost
    let pattern = format!("*{}b", &a[1..]);
    let start = Instant::now();
    let matched = (0..100).filter(|_| glob_match(&pattern, &a)).count();
    println!(
        "glob {len} x {len} chars, 100 times: {:?} ({matched} matched)",
        start.elapsed()
    );
}
