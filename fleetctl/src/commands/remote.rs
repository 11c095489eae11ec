//! The commands that act on a machine itself over SSH (status, journal, ssh, and the global
//! part of restart), and fd-forward, the far end of an API tunnel.

use std::path::Path;

use crate::cli::{JournalArgs, SshArgs};
use crate::context::Ctx;
use crate::error::{Failure, Outcome, describe};
use crate::ui;
use crate::units;

/// The exit status fleet ended with when a command could not be run at all (Go's -1).
const NOT_RUN: i32 = 255;

/// The exit status when whoever read our output went away (`fleetctl journal -f x | head`):
/// fleet, a Go program, died of SIGPIPE there, which shells report as 128 + 13.
const READER_GONE: i32 = 141;

/// Did a remote command end because our stdout was closed? Then there is nothing to report:
/// the reader stopped listening, as with any other command in a pipeline.
fn reader_gone(e: &fleet_ssh::SshError) -> bool {
    matches!(e, fleet_ssh::SshError::Io { source, .. }
        if source.kind() == std::io::ErrorKind::BrokenPipe)
}

/// This host's machine ID, if it has one.
fn local_machine_id() -> Option<String> {
    let id = std::fs::read_to_string("/etc/machine-id").ok()?;
    let id = id.trim();
    (!id.is_empty()).then(|| id.to_string())
}

/// Quotes an argument for the remote shell as fleet did (Go's `%q`).
fn quote(arg: &str) -> String {
    format!("{arg:?}")
}

/// fleet's `runCommand`: runs `cmd args...` on machine `machine_id`, locally when that is
/// this host, else over SSH to the machine's public IP; returns the exit status.
pub async fn run_command(ctx: &Ctx, machine_id: &str, port: u16, cmd: &str, args: &[&str]) -> i32 {
    if local_machine_id().as_deref() == Some(machine_id) {
        let status = tokio::process::Command::new(cmd).args(args).status().await;
        return match status {
            Ok(s) => s.code().unwrap_or(NOT_RUN),
            Err(e) => {
                ui::err(format!("Error running local command: {e}"));
                NOT_RUN
            }
        };
    }
    let ip = match ctx.machine(machine_id).await {
        Some(m) if !m.public_ip.is_empty() => m.public_ip,
        _ => {
            ui::err(format!(
                "Error getting machine IP: machine {machine_id} not found or without a public IP"
            ));
            return 1;
        }
    };
    let mut line = cmd.to_string();
    for a in args {
        line.push(' ');
        line.push_str(&quote(a));
    }
    let session = match ctx.ssh(&ip, port, false).await {
        Ok(s) => s,
        Err(e) => {
            ui::err(format!("Unable to SSH to remote host: {e:#}"));
            return NOT_RUN;
        }
    };
    // fleet's Execute: a PTY and our stdin when stdin is a terminal
    match session.execute(&line).await {
        Ok(code) => code,
        Err(e) if reader_gone(&e) => READER_GONE,
        Err(e) => {
            ui::err(format!("Unable to SSH to remote host: {e}"));
            NOT_RUN
        }
    }
}

/// Runs `systemctl <verb> <unit>` on every machine that reports each of the (global) units.
pub async fn on_machines_running(
    ctx: &Ctx,
    units: &[fleet_unit::UnitName],
    verb: &str,
    port: u16,
) -> Result<(), String> {
    let reg = ctx
        .registry()
        .await
        .map_err(|f| f.message.unwrap_or_default())?;
    let states = reg.unit_states().await.map_err(|e| describe(&e))?;
    for name in units {
        for s in states.iter().filter(|s| s.name == name.as_str()) {
            if run_command(
                ctx,
                &s.machine_id,
                port,
                "systemctl",
                &[verb, name.as_str()],
            )
            .await
                != 0
            {
                return Err(format!(
                    "Error running systemctl {verb}. machine id={}, unit name={name}",
                    s.machine_id
                ));
            }
        }
    }
    Ok(())
}

/// fleet's `status`: `systemctl status -l` of each unit on its machine, then of the global
/// units on every machine reporting them. A failing remote status (an inactive unit: 3) stops
/// the loop, but the global units named before it are still shown, and its status is the
/// exit status, as with fleet.
pub async fn status(ctx: &Ctx, args: &[String], port: u16) -> Outcome {
    let reg = ctx.registry().await?;
    let mut globals = Vec::new();
    let mut exit = 0;
    for (i, arg) in args.iter().enumerate() {
        let name = units::mangle(arg);
        let unit = units::lookup(&reg, &name)
            .await
            .map_err(|e| Failure::msg(format!("Error retrieving unit: {e}")))?
            .ok_or_else(|| Failure::msg(format!("Unit {name} does not exist.")))?;
        if unit.global {
            globals.push(unit.name);
            continue;
        }
        let Some(machine) = unit
            .machine_id
            .filter(|_| unit.current != fleet_unit::TargetState::Inactive)
        else {
            return Err(Failure::msg(format!(
                "Unit {} does not appear to be loaded.",
                unit.name
            )));
        };
        // a blank line between units, as systemctl status prints them
        if i != 0 {
            ui::out("");
        }
        let code = run_command(
            ctx,
            &machine,
            port,
            "systemctl",
            &["status", "-l", unit.name.as_str()],
        )
        .await;
        if code != 0 {
            exit = code;
            break;
        }
    }
    on_machines_running(ctx, &globals, "status", port)
        .await
        .map_err(|e| {
            Failure::msg(format!(
                "Error retrieving machine state for global units: {e}"
            ))
        })?;
    match exit {
        0 => Ok(()),
        code => Err(Failure::silent(code)),
    }
}

pub async fn journal(ctx: &Ctx, a: &JournalArgs) -> Outcome {
    let [arg] = a.units.as_slice() else {
        return Err(Failure::msg("One unit file must be provided."));
    };
    let name = units::mangle(arg);
    let reg = ctx.registry().await?;
    let unit = units::lookup(&reg, &name)
        .await
        .map_err(|e| Failure::msg(format!("Error retrieving unit {name}: {e}")))?
        .ok_or_else(|| Failure::msg(format!("Unit {name} does not exist.")))?;
    if unit.global {
        return Err(Failure::msg(format!(
            "Unable to retrieve journal of global unit {name}."
        )));
    }
    let Some(machine) = unit
        .machine_id
        .filter(|_| unit.current != fleet_unit::TargetState::Inactive)
    else {
        return Err(Failure::msg(format!(
            "Unit {name} does not appear to be running."
        )));
    };
    let lines = a.lines.to_string();
    let mut cmd = vec![
        "journalctl",
        "--unit",
        name.as_str(),
        "--no-pager",
        "-n",
        lines.as_str(),
        "--output",
        a.output.as_str(),
    ];
    if a.sudo {
        cmd.insert(0, "sudo");
    }
    if a.follow {
        cmd.push("-f");
    }
    match run_command(ctx, &machine, a.ssh_port, cmd[0], &cmd[1..]).await {
        0 => Ok(()),
        code => Err(Failure::silent(code)),
    }
}

/// fleet's `findAddressInMachineList`: the IP of the one machine whose ID starts with `lookup`.
async fn machine_address(ctx: &Ctx, lookup: &str) -> Result<String, String> {
    let reg = ctx
        .registry()
        .await
        .map_err(|f| f.message.unwrap_or_default())?;
    let machines = reg.machines().await.map_err(|e| describe(&e))?;
    let mut matching = machines.iter().filter(|m| m.id.starts_with(lookup));
    match (matching.next(), matching.next()) {
        (Some(m), None) => Ok(m.public_ip.clone()),
        (Some(_), Some(_)) => Err("found more than one machine".to_string()),
        (None, _) => Err("machine does not exist".to_string()),
    }
}

/// fleet's `findAddressInRunningUnits`: the IP of the machine running unit `name`; `Ok(None)`
/// when the unit is not on a machine with a known IP.
async fn unit_address(ctx: &Ctx, name: &str) -> Result<Option<String>, String> {
    let name = units::mangle(name);
    let reg = ctx
        .registry()
        .await
        .map_err(|f| f.message.unwrap_or_default())?;
    let unit = units::lookup(&reg, &name)
        .await?
        .ok_or("unit does not exist")?;
    if unit.global {
        return Err("global units unsupported".to_string());
    }
    let Some(id) = unit.machine_id else {
        return Ok(None);
    };
    Ok(ctx
        .machine(&id)
        .await
        .map(|m| m.public_ip)
        .filter(|ip| !ip.is_empty()))
}

pub async fn ssh(ctx: &Ctx, a: &SshArgs) -> Outcome {
    if a.unit.is_some() && a.machine.is_some() {
        return Err(Failure::msg(
            "Both machine and unit flags provided, please specify only one.",
        ));
    }
    let mut args: &[String] = &a.args;
    let addr = if let Some(m) = &a.machine {
        machine_address(ctx, m).await
    } else if let Some(u) = &a.unit {
        unit_address(ctx, u).await.map(Option::unwrap_or_default)
    } else if let Some((lookup, rest)) = args.split_first() {
        args = rest;
        let machine = machine_address(ctx, lookup)
            .await
            .ok()
            .filter(|ip| !ip.is_empty());
        let unit = unit_address(ctx, lookup).await.ok().flatten();
        match (machine, unit) {
            (Some(_), Some(_)) => Err(format!(
                "ambiguous argument, both machine and unit found for `{lookup}`.\nPlease use flag `-m` or `-u` to refine the search"
            )),
            (Some(ip), None) | (None, Some(ip)) => Ok(ip),
            (None, None) => Err("could not find matching unit or machine".to_string()),
        }
    } else {
        Err("one machine or unit must be provided".to_string())
    };
    let addr = addr.map_err(|e| Failure::msg(format!("Unable to proceed: {e}")))?;
    if addr.is_empty() {
        return Err(Failure::msg("Could not determine address of machine."));
    }
    if let Some(i) = args.iter().position(|s| s == "--") {
        args = &args[i + 1..];
    }
    let session = ctx
        .ssh(&addr, a.ssh_port, a.forward_agent)
        .await
        .map_err(|e| Failure::msg(format!("Failed building SSH client: {e:#}")))?;
    let command = (!args.is_empty()).then(|| args.join(" "));
    let code = match session.shell(command.as_deref()).await {
        Ok(code) => code,
        Err(e) if reader_gone(&e) => READER_GONE,
        Err(e) if command.is_none() => {
            return Err(Failure::msg(format!("Failed opening shell over SSH: {e}")));
        }
        Err(e) => {
            return Err(Failure::new(
                NOT_RUN,
                format!("Failed running command over SSH: {e}"),
            ));
        }
    };
    match code {
        0 => Ok(()),
        code => Err(Failure::silent(code)),
    }
}

pub async fn fd_forward(args: &[String]) -> Outcome {
    let [socket] = args else {
        return Err(Failure::msg("Provide a single argument"));
    };
    fleet_ssh::fd_forward(Path::new(socket))
        .await
        .map_err(|e| Failure::msg(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_closed_stdout_ends_a_remote_command_quietly() {
        let io = |kind: std::io::ErrorKind| fleet_ssh::SshError::Io {
            what: "failed writing remote output".into(),
            source: kind.into(),
        };
        let cases = [
            (io(std::io::ErrorKind::BrokenPipe), true),
            (io(std::io::ErrorKind::PermissionDenied), false),
            (
                fleet_ssh::SshError::NoExitStatus {
                    addr: "10.0.0.1:22".into(),
                    command: "true".into(),
                },
                false,
            ),
        ];
        for (e, want) in cases {
            assert_eq!(reader_gone(&e), want, "{e}");
        }
    }

    #[test]
    fn remote_arguments_are_go_quoted() {
        assert_eq!(quote("hello.service"), "\"hello.service\"");
        assert_eq!(quote("-l"), "\"-l\"");
        assert_eq!(quote("a\"b"), "\"a\\\"b\"");
    }
}
