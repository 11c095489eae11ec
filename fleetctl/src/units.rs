//! From command-line arguments to units in the cluster: fleet's name mangling, local unit
//! files and templates, and the "create what is missing" step shared by submit, load, start
//! and restart (fleet's `lazyCreateUnits`).
//!
//! An argument is a path to a unit file, or a unit name. A unit is taken, in this order, from
//! the registry (already submitted: nothing to do unless `--replace`), from the file the
//! argument names, or, for an instance `foo@1.service`, from its template `foo@.service` in
//! the registry or next to the argument on disk.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use fleet_registry::{Registry, UnitView};
use fleet_unit::{Requirements, TargetState, UnitFile, UnitName, default_unit_type};

use crate::context::Ctx;
use crate::error::{Failure, describe};
use crate::ui;
use crate::wait;

/// fleet's `unitNameMangle`: the last path element, with `.service` appended unless the
/// argument already ends in a unit type fleetctl recognizes.
pub fn mangle(arg: &str) -> String {
    default_unit_type(base(arg))
}

/// Go's `path.Base` for the arguments fleetctl gets (never empty here).
fn base(arg: &str) -> &str {
    let trimmed = arg.trim_end_matches('/');
    if trimmed.is_empty() {
        return if arg.is_empty() { "." } else { "/" };
    }
    trimmed.rsplit('/').next().unwrap_or(trimmed)
}

/// Go's `path.Dir`, enough for joining a template's name next to an argument.
fn dir(arg: &str) -> PathBuf {
    match Path::new(arg).parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// Looks a unit up by a name that may not be valid: invalid names are simply not there.
pub async fn lookup(reg: &Arc<dyn Registry>, name: &str) -> Result<Option<UnitView>, String> {
    match UnitName::parse(name) {
        Ok(n) => reg.unit(&n).await.map_err(|e| describe(&e)),
        Err(_) => Ok(None),
    }
}

/// fleet's `findUnits`: the units of the registry named by `args` (mangled), in argument
/// order; names not in the registry are skipped.
pub async fn find_units(ctx: &Ctx, args: &[String]) -> Result<Vec<UnitView>, Failure> {
    let reg = ctx.registry().await?;
    let units = reg.units().await.map_err(|e| Failure::msg(describe(&e)))?;
    Ok(args
        .iter()
        .filter_map(|a| {
            let name = mangle(a);
            units.iter().find(|u| u.name.as_str() == name).cloned()
        })
        .collect())
}

/// Which command is creating units: it decides which desired states `--replace` may replace.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Creator {
    Submit,
    Load,
    Start,
    Restart,
}

impl Creator {
    fn may_replace(self, desired: TargetState) -> Option<bool> {
        use TargetState::*;
        match self {
            Creator::Submit => Some(desired == Inactive),
            Creator::Load => Some(matches!(desired, Inactive | Loaded)),
            Creator::Start => Some(true),
            Creator::Restart => None,
        }
    }
}

/// Reads and parses a local unit file.
fn read_unit_file(path: &Path) -> Result<UnitFile, String> {
    let text = std::fs::read_to_string(path).map_err(|e| io_message("open", path, &e))?;
    tracing::debug!(
        "Unit({}) found in local filesystem",
        base(&path.to_string_lossy())
    );
    UnitFile::parse(&text).map_err(|e| e.to_string())
}

/// An I/O error worded like Go's (`stat foo.service: no such file or directory`).
fn io_message(op: &str, path: &Path, e: &std::io::Error) -> String {
    let what = match e.kind() {
        std::io::ErrorKind::NotFound => "no such file or directory".to_string(),
        std::io::ErrorKind::PermissionDenied => "permission denied".to_string(),
        _ => e.to_string(),
    };
    format!("{op} {}: {what}", path.display())
}

/// Does the local file at `path` have the same content as `unit`? Errors when there is no
/// such file or it cannot be parsed.
fn matches_local_file(path: &Path, unit: &UnitView) -> Result<bool, String> {
    std::fs::metadata(path).map_err(|e| io_message("stat", path, &e))?;
    Ok(read_unit_file(path)?.hash() == unit.hash)
}

/// fleet's `isLocalUnitDifferent`: compares the local file `arg` (or, for an instance without
/// its own file, the local template) with `unit` from the registry, warning when they differ
/// and `--replace` was not given. `Ok(true)` means different.
fn local_differs(arg: &str, unit: &UnitView, replace: bool) -> Result<bool, String> {
    let path = Path::new(arg);
    match matches_local_file(path, unit) {
        Ok(same) => {
            if !same && !replace {
                ui::err(format!(
                    "WARNING: Unit {} in registry differs from local unit file {arg}. Add --replace to override.",
                    unit.name
                ));
            }
            return Ok(!same);
        }
        Err(e) if path.exists() => return Err(e),
        Err(_) => {}
    }
    let name = base(arg);
    let Some(template) = UnitName::parse(name)
        .ok()
        .filter(|n| n.is_instance())
        .and_then(|n| n.template())
    else {
        return Err(format!(
            "error Unit {arg} does not seem to be a template unit"
        ));
    };
    let template_path = dir(arg).join(template.as_str());
    let same = matches_local_file(&template_path, unit)?;
    if !same && !replace {
        ui::err(format!(
            "WARNING: Unit {} in registry differs from local template unit file {arg}. Add --replace to override.",
            unit.name
        ));
    }
    Ok(!same)
}

/// fleet's `getUnitFile`: the unit file for argument `arg` (whose unit is called `name`).
async fn unit_file_for(
    reg: &Arc<dyn Registry>,
    arg: &str,
    name: &str,
    replace: bool,
) -> Result<UnitFile, String> {
    let path = Path::new(arg);
    if path.exists() {
        return read_unit_file(path)
            .map_err(|e| format!("failed getting Unit({arg}) from file: {e}"));
    }
    let Some(template) = UnitName::parse(name)
        .ok()
        .filter(|n| n.is_instance())
        .and_then(|n| n.template())
    else {
        return Err(format!(
            "unable to find Unit({name}) in Registry or on filesystem"
        ));
    };
    let from_template = async {
        let in_registry = reg.unit(&template).await.map_err(|e| {
            format!(
                "error retrieving template Unit({template}) from Registry: {}",
                describe(&e)
            )
        })?;
        if let Some(tmpl) = in_registry {
            // only to warn about a differing local template; the registry's copy is used
            let _ = local_differs(arg, &tmpl, replace);
            tracing::debug!("Template Unit({template}) found in registry");
            return Ok(tmpl.file);
        }
        let template_path = dir(arg).join(template.as_str());
        if !template_path.exists() {
            return Err(format!(
                "unable to find template Unit({template}) in Registry or on filesystem"
            ));
        }
        read_unit_file(&template_path)
            .map_err(|e| format!("unable to load template Unit({template}) from file: {e}"))
    };
    from_template
        .await
        .map_err(|e: String| format!("failed getting Unit({arg}) from template: {e}"))
}

/// Validates a unit as fleet did before creating it: the name, then the `[X-Fleet]`
/// requirements (errors name the unit and the options; unknown keys are warnings).
pub fn validate(name: &str, file: &UnitFile) -> Result<UnitName, String> {
    let name = UnitName::parse(name).map_err(|e| e.to_string())?;
    let (_, warnings) = Requirements::from_unit(&name, file).map_err(|e| e.to_string())?;
    for w in warnings {
        tracing::warn!("Unit {name}: {w}");
    }
    Ok(name)
}

/// fleet's `lazyCreateUnits`: makes sure every argument's unit is in the registry, creating
/// the missing ones (and, with `--replace`, replacing differing ones the command may replace).
/// Each created unit is reported (`Unit hello.service inactive`). The error is the text after
/// fleet's `Error creating units: `.
pub async fn lazy_create(
    ctx: &Ctx,
    args: &[String],
    replace: bool,
    creator: Creator,
    attempts: i64,
) -> Result<(), Failure> {
    let reg = ctx.registry().await?;
    let fail = |e: String| Failure::msg(format!("Error creating units: {e}"));
    for arg in args {
        let arg = default_unit_type(arg);
        let name = mangle(&arg);
        let existing = lookup(&reg, &name)
            .await
            .map_err(|e| fail(format!("error retrieving Unit({name}) from Registry: {e}")))?;
        if let Some(unit) = &existing {
            if !should_recreate(&arg, unit, replace, creator).map_err(fail)? {
                continue;
            }
        } else if replace {
            tracing::debug!("Unit({name}) was not found in Registry");
        }
        tracing::debug!("Looking for Unit({name}) or its corresponding template");
        let file = unit_file_for(&reg, &arg, &name, replace)
            .await
            .map_err(fail)?;
        let unit_name = validate(&name, &file).map_err(fail)?;
        if existing.is_some() {
            // the registry has no "replace": the old unit goes, the new one comes, as inactive
            reg.destroy_unit(&unit_name)
                .await
                .map_err(|e| fail(format!("failed creating unit {name}: {}", describe(&e))))?;
        }
        reg.create_unit(&unit_name, &file, TargetState::Inactive)
            .await
            .map_err(|e| fail(format!("failed creating unit {name}: {}", describe(&e))))?;
        tracing::debug!("Created Unit({name}) in Registry");
        // fleet waits with the command's --block-attempts even with --no-block
        wait::wait_for_unit_states(ctx, &[unit_name], TargetState::Inactive, attempts.max(0))
            .await
            .map_err(|e| {
                ui::err(format!("Error waiting on unit creation: {e}"));
                Failure::msg("Error creating units: One or more errors creating units")
            })?;
    }
    Ok(())
}

/// fleet's `checkUnitCreation` for a unit already in the registry: create it again only with
/// `--replace`, when the local file differs and the command may replace a unit in its state.
fn should_recreate(
    arg: &str,
    unit: &UnitView,
    replace: bool,
    creator: Creator,
) -> Result<bool, String> {
    let differs = local_differs(arg, unit, replace);
    if !replace {
        if let Ok(false) = differs {
            tracing::debug!(
                "Found same Unit({}) in Registry, no need to recreate it",
                unit.name
            );
        }
        return Ok(false);
    }
    if !differs? {
        ui::out(format!(
            "Found same Unit({}) in Registry, nothing to do",
            unit.name
        ));
        return Ok(false);
    }
    match creator.may_replace(unit.desired) {
        Some(true) => Ok(true),
        Some(false) => {
            ui::err(format!(
                "Warning: can not replace Unit({}) in state '{}', use the appropriate command",
                unit.name, unit.desired
            ));
            Ok(false)
        }
        None => Err("error: replacing units is not supported in this context".to_string()),
    }
}

/// fleet's `setTargetStateOfUnits`: sets the desired state of the named units; returns those
/// that were changed (units already in that state are skipped).
pub async fn set_target_states(
    ctx: &Ctx,
    args: &[String],
    state: TargetState,
) -> Result<Vec<UnitView>, String> {
    let reg = ctx
        .registry()
        .await
        .map_err(|f| f.message.unwrap_or_default())?;
    let mut triggered = Vec::new();
    for arg in args {
        let name = mangle(arg);
        let unit = lookup(&reg, &name)
            .await
            .map_err(|e| format!("error retrieving unit {name} from registry: {e}"))?
            .ok_or_else(|| format!("unable to find unit {name}"))?;
        if unit.desired == state {
            tracing::debug!("Unit({name}) already {state}, skipping.");
            continue;
        }
        tracing::debug!("Setting Unit({name}) target state to {state}");
        reg.set_desired_state(&unit.name, state)
            .await
            .map_err(|e| describe(&e))?;
        triggered.push(unit);
    }
    Ok(triggered)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mangles_like_fleet() {
        for (arg, want) in [
            ("foo", "foo.service"),
            ("foo.1", "foo.1.service"),
            ("foo/bar.socket", "bar.socket"),
            ("foo.socket", "foo.socket"),
            ("foo.service", "foo.service"),
            ("units/web@1.service", "web@1.service"),
            ("./hello.service", "hello.service"),
            ("foo.target", "foo.target.service"),
        ] {
            assert_eq!(mangle(arg), want, "{arg}");
        }
    }

    #[test]
    fn dirs_like_go() {
        assert_eq!(dir("hello.service"), PathBuf::from("."));
        assert_eq!(dir("units/web@1.service"), PathBuf::from("units"));
        assert_eq!(dir("/abs/web@1.service"), PathBuf::from("/abs"));
    }

    #[test]
    fn replace_rules() {
        use TargetState::*;
        for (creator, state, want) in [
            (Creator::Submit, Inactive, Some(true)),
            (Creator::Submit, Loaded, Some(false)),
            (Creator::Load, Loaded, Some(true)),
            (Creator::Load, Launched, Some(false)),
            (Creator::Start, Launched, Some(true)),
            (Creator::Restart, Inactive, None),
        ] {
            assert_eq!(creator.may_replace(state), want, "{creator:?} {state}");
        }
    }

    #[test]
    fn validation_names_unit_and_option() {
        let check = |name: &str, text: &str, want: Result<(), &str>| {
            let file = UnitFile::parse(text).expect("parse");
            let got = validate(name, &file).map(|_| ());
            assert_eq!(got, want.map_err(|e| e.to_string()), "{name}: {text:?}");
        };
        check("foo.service", "[Service]\nExecStart=/bin/true\n", Ok(()));
        check(
            "foo@{1,3}.service",
            "",
            Err("invalid character '{' in unit name"),
        );
        check(
            "foo.service",
            "[X-Fleet]\nGlobal=true\nMachineOf=abcd\n",
            Err("unit foo.service: Global cannot be used with MachineOf"),
        );
        check("foo.service", "[X-Fleet]\nBogus=1\n", Ok(()));
    }
}
