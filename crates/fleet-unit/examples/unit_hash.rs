//! Prints fleet's unit hash and canonical size of each unit file given on the command line.
//!
//! `cargo run -p fleet-unit --example unit_hash -- examples/*.service`

use std::process::ExitCode;

use fleet_unit::UnitFile;

fn main() -> ExitCode {
    let mut status = ExitCode::SUCCESS;
    for path in std::env::args().skip(1) {
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) => {
                eprintln!("{path}: {e}");
                status = ExitCode::FAILURE;
                continue;
            }
        };
        match UnitFile::parse(&text) {
            Ok(unit) => println!("{}  {:4}  {path}", unit.hash(), unit.serialize().len()),
            Err(e) => {
                eprintln!("{path}: {e}");
                status = ExitCode::FAILURE;
            }
        }
    }
    status
}
