//! From command-line arguments to units in the cluster: fleet's name mangling, local unit
//! files and templates, and the "create what is missing" step shared by submit, load, start
//! and restart (fleet's `lazyCreateUnits`).
//!
//! An argument is a path to a unit file, or a unit name. A unit is taken, in this order, from
//! the registry (already submitted: nothing to do unless `--replace`), from the file the
//! argument names, or, for an instance `foo@1.service`, from its template `foo@.service` in
//! the registry or next to the argument on disk.

use std::collections::HashSet;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use fleet_registry::{Registry, RegistryError, UnitView};
use fleet_unit::{Requirements, TargetState, UnitFile, UnitName, default_unit_type};
use futures_util::StreamExt;
use futures_util::stream::{self, FuturesOrdered};

use crate::context::Ctx;
use crate::error::{Failure, describe};
use crate::ui;

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

    /// The desired state the command gives its units right after creating them, if any.
    fn next_state(self) -> Option<TargetState> {
        match self {
            Creator::Load => Some(TargetState::Loaded),
            Creator::Start => Some(TargetState::Launched),
            Creator::Submit | Creator::Restart => None,
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
            return Ok(std::sync::Arc::unwrap_or_clone(tmpl.file));
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
    let (_, warnings) = Requirements::from_submitted(&name, file).map_err(|e| e.to_string())?;
    for w in warnings {
        tracing::warn!("Unit {name}: {w}");
    }
    Ok(name)
}

/// How many units fleetctl has requests in flight for at once. Whatever order the answers
/// come in, what is printed keeps the order of the arguments.
pub const IN_FLIGHT: usize = 32;

/// fleet's `lazyCreateUnits`: makes sure every argument's unit is in the registry, creating
/// the missing ones (and, with `--replace`, replacing differing ones the command may replace).
/// Each created unit is reported (`Unit hello.service inactive`). The error is the text after
/// fleet's `Error creating units: `.
///
/// fleet went unit by unit, then waited in the background for each new unit to show up in
/// the registry (always at once: the create had succeeded). Here every lookup is made at
/// once, then the arguments are decided in their order while the creations run up to
/// [`IN_FLIGHT`] at a time; a created unit is reported from what the create said (inactive,
/// on no machine), the lines in argument order after the creation step. A decision that
/// depends on an earlier creation (the same name again, an instance of a template created
/// just before) waits for the creations first. At the first argument that cannot be
/// created, the creations already under way are finished and reported, then the error.
///
/// `load` and `start` set the desired state of every unit right after this step. When no
/// argument depends on another's creation, every argument is decided first, and when all
/// can be created, each new unit is created with that state at once: one request instead of
/// a create and then a change of state (the next step knows and sends nothing for it). When
/// one cannot be created, the units before it are created inactive and the command stops, as
/// fleet's did.
pub async fn lazy_create(
    ctx: &Ctx,
    args: &[String],
    replace: bool,
    creator: Creator,
) -> Result<(), Failure> {
    let reg = ctx.registry().await?;
    let fail = |e: String| Failure::msg(format!("Error creating units: {e}"));
    let args: Vec<String> = args.iter().map(|a| default_unit_type(a)).collect();
    let names: Vec<String> = args.iter().map(|a| mangle(a)).collect();
    if let Some(state) = creator
        .next_state()
        .filter(|_| !replace && independent(&names))
        && let Some(files) = local_units(&args, &names)
    {
        return create_first(ctx, &reg, &args, &names, files, state, creator).await;
    }
    let found: Vec<Result<Option<UnitView>, String>> = stream::iter(&names)
        .map(|name| lookup(&reg, name))
        .buffered(IN_FLIGHT)
        .collect()
        .await;
    let mut creations = Creations::default();
    if let Some(state) = creator.next_state().filter(|_| independent(&names)) {
        let mut planned = Vec::new();
        let mut error = None;
        for ((arg, name), found) in args.iter().zip(&names).zip(found) {
            match decide(&reg, arg, name, found, replace, creator).await {
                Ok(None) => {}
                Ok(Some(p)) => planned.push(p),
                Err(e) => {
                    error = Some(fail(e));
                    break;
                }
            }
        }
        let state = if error.is_some() {
            TargetState::Inactive
        } else {
            state
        };
        for (unit_name, file, replacing) in planned {
            creations.names.insert(unit_name.to_string());
            creations.running.push_back(create_one(
                ctx, &reg, unit_name, file, replacing, state, false,
            ));
            if let Err(e) = creations.finish(IN_FLIGHT - 1).await {
                return creations.end(&reg, Some(e)).await;
            }
        }
        return creations.end(&reg, error).await;
    }
    let mut seen = HashSet::new();
    for ((arg, name), found) in args.iter().zip(&names).zip(found) {
        let template = UnitName::parse(name)
            .ok()
            .filter(UnitName::is_instance)
            .and_then(|n| n.template());
        let depends = !seen.insert(name.as_str())
            || template.is_some_and(|t| creations.names.contains(t.as_str()));
        let found = if depends {
            // what the registry holds now depends on the creations under way
            if let Err(e) = creations.finish(0).await {
                return creations.end(&reg, Some(e)).await;
            }
            lookup(&reg, name).await
        } else {
            found
        };
        match decide(&reg, arg, name, found, replace, creator).await {
            Ok(None) => {}
            Ok(Some((unit_name, file, replacing))) => {
                creations.names.insert(unit_name.to_string());
                creations.running.push_back(create_one(
                    ctx,
                    &reg,
                    unit_name,
                    file,
                    replacing,
                    TargetState::Inactive,
                    false,
                ));
                if let Err(e) = creations.finish(IN_FLIGHT - 1).await {
                    return creations.end(&reg, Some(e)).await;
                }
            }
            Err(e) => return creations.end(&reg, Some(fail(e))).await,
        }
    }
    creations.end(&reg, None).await
}

/// The units of `args` when every argument is a local unit file that is valid and draws no
/// warning (what a burst of `fleetctl start units/*.service` is); `None` otherwise.
fn local_units(args: &[String], names: &[String]) -> Option<Vec<(UnitName, UnitFile)>> {
    args.iter()
        .zip(names)
        .map(|(arg, name)| {
            let path = Path::new(arg);
            if !path.is_file() {
                return None;
            }
            let file = read_unit_file(path).ok()?;
            let name = UnitName::parse(name).ok()?;
            let (_, warnings) = Requirements::from_submitted(&name, &file).ok()?;
            warnings.is_empty().then_some((name, file))
        })
        .collect()
}

/// [`lazy_create`] for units that are all local files ([`local_units`]), none depending on
/// another, without `--replace`: nothing is looked up first. Each unit is created, create-only,
/// in the command's next `state`, up to [`IN_FLIGHT`] at a time: one request per new unit. The
/// units that turn out to be there already are then looked up and decided in argument order
/// as in fleet (a warning when the local file differs; nothing else is done to them).
async fn create_first(
    ctx: &Ctx,
    reg: &Arc<dyn Registry>,
    args: &[String],
    names: &[String],
    files: Vec<(UnitName, UnitFile)>,
    state: TargetState,
    creator: Creator,
) -> Result<(), Failure> {
    let mut creations = Creations::default();
    for (unit_name, file) in files {
        creations
            .running
            .push_back(create_one(ctx, reg, unit_name, file, None, state, true));
        if let Err(e) = creations.finish(IN_FLIGHT - 1).await {
            return creations.end(reg, Some(e)).await;
        }
    }
    if let Err(e) = creations.finish(0).await {
        return creations.end(reg, Some(e)).await;
    }
    let there = std::mem::take(&mut creations.there);
    for (arg, name) in args.iter().zip(names) {
        if !there.contains(name) {
            continue;
        }
        let found = lookup(reg, name).await;
        match decide(reg, arg, name, found, false, creator).await {
            Ok(None) => {}
            // destroyed again meanwhile: created now
            Ok(Some((unit_name, file, replacing))) => {
                creations.running.push_back(create_one(
                    ctx, reg, unit_name, file, replacing, state, false,
                ));
                if let Err(e) = creations.finish(0).await {
                    return creations.end(reg, Some(e)).await;
                }
            }
            Err(e) => {
                let e = Failure::msg(format!("Error creating units: {e}"));
                return creations.end(reg, Some(e)).await;
            }
        }
    }
    creations.end(reg, None).await
}

/// Whether every argument's unit may be created in the command's next state at once: no
/// name twice, no instance of a template that is itself among the names, and no template
/// (which may not be started or loaded: its error comes from the change of state, after
/// it was created, as in fleet).
fn independent(names: &[String]) -> bool {
    let all: HashSet<&str> = names.iter().map(String::as_str).collect();
    all.len() == names.len()
        && !names.iter().any(|n| {
            let Ok(n) = UnitName::parse(n) else {
                return false;
            };
            n.is_template()
                || n.is_instance() && n.template().is_some_and(|t| all.contains(t.as_str()))
        })
}

/// How one creation ended.
enum Created {
    /// The line reporting the new unit.
    Shown(String),
    /// Another client created the same unit at the same moment: nothing to report.
    Existing,
    /// The unit was there already (a creation sent without looking first): to be decided.
    There(String),
    /// Created in a state other than inactive (the command's next state, at once): the line
    /// reporting it, and its name, to set back to inactive if the command fails.
    Launched(String, UnitName),
    /// Not created: the command's error.
    Failed(Failure),
}

/// The creations under way, in argument order.
struct Creations<F: Future<Output = Created>> {
    running: FuturesOrdered<F>,
    /// Lines of finished creations, printed at the end of the command's creation step (as
    /// fleet's, which came from background waits, came after the messages of its loop).
    lines: Vec<String>,
    /// Names of every unit this command has created or is creating.
    names: HashSet<String>,
    /// Units a creation found there already ([`Created::There`]).
    there: HashSet<String>,
    /// Units this command created in a state other than inactive ([`Created::Launched`]).
    launched: Vec<UnitName>,
}

impl<F: Future<Output = Created>> Default for Creations<F> {
    fn default() -> Self {
        Creations {
            running: FuturesOrdered::new(),
            lines: Vec::new(),
            names: HashSet::new(),
            there: HashSet::new(),
            launched: Vec::new(),
        }
    }
}

impl<F: Future<Output = Created>> Creations<F> {
    /// Reports finished creations in order until at most `left` are under way. At the first
    /// that failed, every other one under way is still finished (none is cut off halfway,
    /// e.g. after a create was sent but before its answer came) and reported,
    /// and the first failure is the error.
    async fn finish(&mut self, left: usize) -> Result<(), Failure> {
        let mut failure = None;
        while self.running.len() > left || (failure.is_some() && !self.running.is_empty()) {
            match self.running.next().await {
                Some(Created::Shown(line)) => self.lines.push(line),
                Some(Created::Launched(line, name)) => {
                    self.lines.push(line);
                    self.launched.push(name);
                }
                Some(Created::Existing) => {}
                Some(Created::There(name)) => {
                    self.there.insert(name);
                }
                Some(Created::Failed(f)) => {
                    failure.get_or_insert(f);
                }
                None => break,
            }
        }
        failure.map_or(Ok(()), Err)
    }

    /// Finishes every creation, prints their lines, and says how the step ended.
    ///
    /// When the step fails, the units it created in the command's next state are set back to
    /// inactive first: fleet created every unit inactive and set states only once all were
    /// created, so a failed creation left the units before it inactive, and so does this.
    async fn end(mut self, reg: &Arc<dyn Registry>, error: Option<Failure>) -> Result<(), Failure> {
        let finished = self.finish(0).await;
        if finished.is_err() || error.is_some() {
            let launched = std::mem::take(&mut self.launched);
            let undone: Vec<_> = stream::iter(&launched)
                .map(|name| async move {
                    (
                        name,
                        reg.set_desired_state(name, TargetState::Inactive).await,
                    )
                })
                .buffered(IN_FLIGHT)
                .collect()
                .await;
            for (name, undone) in undone {
                if let Err(e) = undone {
                    ui::err(format!(
                        "Error setting Unit({name}) back to inactive: {}",
                        describe(&e)
                    ));
                }
            }
        }
        for line in self.lines.drain(..) {
            ui::out(line);
        }
        finished?;
        error.map_or(Ok(()), Err)
    }
}

/// What to do with one argument: `None` when its unit is there and stays, otherwise the unit
/// to create, its file, and, when it replaces a unit of that name, that unit's desired state.
async fn decide(
    reg: &Arc<dyn Registry>,
    arg: &str,
    name: &str,
    found: Result<Option<UnitView>, String>,
    replace: bool,
    creator: Creator,
) -> Result<Option<(UnitName, UnitFile, Option<TargetState>)>, String> {
    let existing =
        found.map_err(|e| format!("error retrieving Unit({name}) from Registry: {e}"))?;
    if let Some(unit) = &existing {
        if !should_recreate(arg, unit, replace, creator)? {
            return Ok(None);
        }
    } else if replace {
        tracing::debug!("Unit({name}) was not found in Registry");
    }
    tracing::debug!("Looking for Unit({name}) or its corresponding template");
    let file = unit_file_for(reg, arg, name, replace).await?;
    let unit_name = validate(name, &file)?;
    Ok(Some((unit_name, file, existing.map(|u| u.desired))))
}

/// Creates one unit with desired state `desired`, or replaces the old one when `replacing`
/// (its desired state). With `unlooked`, the unit was not looked up first: when it is there
/// already, that is all this says ([`Created::There`]).
///
/// fleet replaced a unit with a PUT of the new options alone, which made it inactive: the
/// unit was stopped and unscheduled before the command set its state again, and could come
/// back on another machine. Here the new version is written in one step with the old desired
/// state, so it stays on its machine unless its new options forbid that machine.
async fn create_one(
    ctx: &Ctx,
    reg: &Arc<dyn Registry>,
    unit_name: UnitName,
    file: UnitFile,
    replacing: Option<TargetState>,
    desired: TargetState,
    unlooked: bool,
) -> Created {
    let fail = |e: &RegistryError| {
        Created::Failed(Failure::msg(format!(
            "Error creating units: failed creating unit {unit_name}: {}",
            describe(e)
        )))
    };
    if let Some(desired) = replacing {
        return match reg.replace_unit(&unit_name, &file, desired).await {
            Ok(()) => {
                tracing::debug!("Replaced Unit({unit_name}) in Registry");
                ctx.note_replaced(unit_name.as_str());
                Created::Shown(format!("Unit {unit_name} {desired}"))
            }
            Err(e) => fail(&e),
        };
    }
    match reg.create_unit(&unit_name, &file, desired).await {
        Ok(()) => {
            tracing::debug!("Created Unit({unit_name}) in Registry");
            // what fleet's wait would read back at once: on no machine, inactive (unless
            // created with the command's next state)
            let global = Requirements::is_global(&unit_name, &file);
            ctx.note_created(UnitView {
                name: unit_name.clone(),
                hash: file.hash(),
                file: file.into(),
                desired,
                global,
                machine_id: None,
                current: TargetState::Inactive,
                reason: None,
            });
            let line = format!("Unit {unit_name} {}", TargetState::Inactive);
            if desired == TargetState::Inactive {
                Created::Shown(line)
            } else {
                Created::Launched(line, unit_name)
            }
        }
        Err(RegistryError::AlreadyExists(_)) if unlooked => Created::There(unit_name.to_string()),
        // another client created it meanwhile: with the same contents that is what this
        // one wanted too, and it is left alone, as if the lookup had found it (no line, no
        // wait: the other client may have moved it on already)
        Err(e @ RegistryError::AlreadyExists(_)) => match reg.unit(&unit_name).await {
            Ok(Some(u)) if u.hash == file.hash() => {
                tracing::debug!("Unit({unit_name}) was created by another client meanwhile");
                Created::Existing
            }
            Ok(_) => fail(&e),
            Err(read) => fail(&read),
        },
        Err(e) => fail(&e),
    }
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
/// that were changed (units already in that state are skipped). The units are looked up all
/// at once; if one cannot be found, the ones before it are changed and it is the error, as
/// in fleet. The changes then go out up to [`IN_FLIGHT`] at a time (fleet made them one
/// after the other: when a write fails, a few units after it may have been changed too).
pub async fn set_target_states(
    ctx: &Ctx,
    args: &[String],
    state: TargetState,
) -> Result<Vec<UnitView>, String> {
    let reg = ctx
        .registry()
        .await
        .map_err(|f| f.message.unwrap_or_default())?;
    let mut names: Vec<String> = args.iter().map(|a| mangle(a)).collect();
    // a name given twice is set once (the second time fleet found it set already)
    let mut seen = HashSet::new();
    names.retain(|n| seen.insert(n.clone()));
    // each unit, and whether this invocation created it with `state` already
    let found: Vec<Result<(UnitView, bool), String>> = stream::iter(&names)
        .map(|name| {
            let reg = &reg;
            async move {
                if let Some(u) = ctx.take_created(name) {
                    let set = u.desired == state;
                    return Ok((u, set));
                }
                lookup(reg, name)
                    .await
                    .map_err(|e| format!("error retrieving unit {name} from registry: {e}"))?
                    .map(|u| (u, false))
                    .ok_or_else(|| format!("unable to find unit {name}"))
            }
        })
        .buffered(IN_FLIGHT)
        .collect()
        .await;
    let mut units = Vec::new();
    let mut missing = None;
    for f in found {
        match f {
            Ok(u) => units.push(u),
            Err(e) => {
                missing = Some(e);
                break;
            }
        }
    }
    let mut changes = stream::iter(units)
        .map(|(unit, preset)| {
            // a unit created in its new state was changed as much as one changed now
            let changed = preset || ctx.was_replaced(unit.name.as_str());
            set_target_state(&reg, unit, state, changed)
        })
        .buffered(IN_FLIGHT);
    let mut triggered = Vec::new();
    while let Some(changed) = changes.next().await {
        triggered.extend(changed?);
    }
    missing.map_or(Ok(triggered), Err)
}

/// Sets one unit's desired state; `None` when it had that state already (unless it was
/// `changed` just before, replaced or created in that state: the command waits for it as for
/// a unit it changed now).
async fn set_target_state(
    reg: &Arc<dyn Registry>,
    unit: UnitView,
    state: TargetState,
    changed: bool,
) -> Result<Option<UnitView>, String> {
    if unit.desired == state && changed {
        return Ok(Some(unit));
    }
    if unit.desired == state {
        tracing::debug!("Unit({}) already {state}, skipping.", unit.name);
        return Ok(None);
    }
    tracing::debug!("Setting Unit({}) target state to {state}", unit.name);
    reg.set_desired_state(&unit.name, state)
        .await
        .map_err(|e| describe(&e))?;
    Ok(Some(unit))
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
