//! fleet-dist OUTDIR: writes what a package installs beside the binaries into OUTDIR:
//! `man/` (the man pages), `completions/` (bash and zsh) and `fleet.conf` (commented).

use std::path::PathBuf;
use std::process::ExitCode;

fn main() -> ExitCode {
    let mut args = std::env::args_os().skip(1);
    let (Some(out), None) = (args.next(), args.next()) else {
        eprintln!("usage: fleet-dist OUTDIR");
        return ExitCode::from(2);
    };
    match write(&PathBuf::from(out)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("fleet-dist: {e:#}");
            ExitCode::from(1)
        }
    }
}

fn write(out: &std::path::Path) -> anyhow::Result<()> {
    use anyhow::Context;
    let pages = fleet_dist::man_pages().context("rendering the man pages")?;
    for (dir, files) in [
        ("man", pages),
        ("completions", fleet_dist::completions()),
        (
            "",
            vec![fleet_dist::File {
                name: "fleet.conf".into(),
                text: fleet_dist::sample_config(),
            }],
        ),
    ] {
        let dir = out.join(dir);
        fleet_dist::write_all(&dir, &files)
            .with_context(|| format!("writing into {}", dir.display()))?;
    }
    Ok(())
}
