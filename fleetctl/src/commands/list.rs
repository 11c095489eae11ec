//! list-units, list-unit-files and list-machines: fleet's tab-aligned tables with selectable
//! columns, or JSON for scripts.

use std::collections::BTreeMap;

use serde::Serialize;

use crate::cli::{ListArgs, OutputFormat};
use crate::context::{Ctx, machine_id_legend};
use crate::error::{Failure, Outcome, describe};
use crate::table;
use crate::ui;

/// Checks `--fields` against the valid names (fleet's messages, exit 1).
fn parse_fields<'a>(
    fields: &'a str,
    valid: &[&str],
    deprecated: &[(&str, &str)],
) -> Result<Vec<&'a str>, Failure> {
    if fields.is_empty() {
        return Err(Failure::msg("Must define output format"));
    }
    let cols: Vec<&str> = fields.split(',').collect();
    for c in &cols {
        if !valid.contains(c) {
            return Err(Failure::msg(format!("Invalid key in output format: {c:?}")));
        }
        if let Some((_, instead)) = deprecated.iter().find(|(d, _)| d == c) {
            ui::err(format!(
                "WARNING: The {c:?} field is deprecated. Use {instead:?} instead"
            ));
        }
    }
    Ok(cols)
}

/// Prints a table: the header (unless `--no-legend`) and the rows.
fn print_table(cols: &[&str], rows: Vec<Vec<String>>, no_legend: bool) {
    let mut all = Vec::with_capacity(rows.len() + 1);
    if !no_legend {
        all.push(cols.iter().map(|c| c.to_uppercase()).collect());
    }
    all.extend(rows);
    ui::out_raw(&table::render(&all));
}

fn print_json<T: Serialize>(rows: &T) -> Outcome {
    let text = serde_json::to_string_pretty(rows)
        .map_err(|e| Failure::msg(format!("encoding JSON: {e}")))?;
    ui::out(text);
    Ok(())
}

fn dash(s: &str) -> String {
    if s.is_empty() {
        "-".to_string()
    } else {
        s.to_string()
    }
}

const UNIT_FILE_FIELDS: &[&str] = &[
    "desc", "dstate", "global", "hash", "reason", "state", "target", "tmachine", "unit",
];

/// A unit in `list-unit-files -o json`.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct UnitFileJson {
    name: String,
    hash: String,
    desired_state: String,
    current_state: String,
    #[serde(rename = "machineID")]
    machine_id: Option<String>,
    global: bool,
    description: Option<String>,
    reason: Option<String>,
}

pub async fn unit_files(ctx: &Ctx, args: &ListArgs, fields: &str) -> Outcome {
    let cols = if args.output == OutputFormat::Table {
        parse_fields(fields, UNIT_FILE_FIELDS, &[("tmachine", "target")])?
    } else {
        Vec::new()
    };
    let reg = ctx.registry().await?;
    let units = reg.units().await.map_err(|e| {
        Failure::msg(format!(
            "Error retrieving list of units from repository: {}",
            describe(&e)
        ))
    })?;
    if args.output == OutputFormat::Json {
        let rows: Vec<UnitFileJson> = units
            .into_iter()
            .map(|u| UnitFileJson {
                name: u.name.to_string(),
                hash: u.hash.to_string(),
                desired_state: u.desired.to_string(),
                current_state: u.current.to_string(),
                machine_id: u.machine_id.clone(),
                global: u.global,
                description: u.file.description().map(str::to_string),
                reason: u.reason,
            })
            .collect();
        return print_json(&rows);
    }
    let mut rows = Vec::with_capacity(units.len());
    for u in &units {
        let mut row = Vec::with_capacity(cols.len());
        for c in &cols {
            let cell = match *c {
                "unit" => u.name.to_string(),
                "global" => u.global.to_string(),
                "dstate" => u.desired.to_string(),
                "state" if u.global => "-".to_string(),
                "state" => u.current.to_string(),
                "hash" if args.full => u.hash.to_string(),
                "hash" => u.hash.short(),
                "desc" => dash(u.file.description().unwrap_or("")),
                // not in fleet v1.0: why the unit is not placed, or not where it should be
                // on its machine (a file it cannot write)
                "reason" => dash(u.reason.as_deref().unwrap_or("")),
                // target and tmachine
                _ if u.global => "global".to_string(),
                _ => match &u.machine_id {
                    Some(id) => ctx.legend(id, args.full).await,
                    None => "-".to_string(),
                },
            };
            row.push(cell);
        }
        rows.push(row);
    }
    print_table(&cols, rows, args.no_legend);
    Ok(())
}

const UNIT_FIELDS: &[&str] = &["active", "hash", "load", "machine", "sub", "unit"];

/// A unit state in `list-units -o json` (the names of fleet's API).
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct UnitStateJson {
    name: String,
    hash: String,
    #[serde(rename = "machineID")]
    machine_id: String,
    systemd_load_state: String,
    systemd_active_state: String,
    systemd_sub_state: String,
}

pub async fn units(ctx: &Ctx, args: &ListArgs, fields: &str) -> Outcome {
    let cols = if args.output == OutputFormat::Table {
        parse_fields(fields, UNIT_FIELDS, &[])?
    } else {
        Vec::new()
    };
    let reg = ctx.registry().await?;
    let states = reg.unit_states().await.map_err(|e| {
        Failure::msg(format!(
            "Error retrieving list of units from repository: {}",
            describe(&e)
        ))
    })?;
    if args.output == OutputFormat::Json {
        let rows: Vec<UnitStateJson> = states
            .into_iter()
            .map(|s| UnitStateJson {
                name: s.name,
                hash: s.hash,
                machine_id: s.machine_id,
                systemd_load_state: s.load_state,
                systemd_active_state: s.active_state,
                systemd_sub_state: s.sub_state,
            })
            .collect();
        return print_json(&rows);
    }
    let mut rows = Vec::with_capacity(states.len());
    for s in &states {
        let mut row = Vec::with_capacity(cols.len());
        for c in &cols {
            let cell = match *c {
                "unit" => dash(&s.name),
                "load" => dash(&s.load_state),
                "active" => dash(&s.active_state),
                "sub" => dash(&s.sub_state),
                "hash" if s.hash.is_empty() => "-".to_string(),
                "hash" if args.full => s.hash.clone(),
                "hash" => s.hash.chars().take(7).collect(),
                // machine
                _ if s.machine_id.is_empty() => "-".to_string(),
                _ => ctx.legend(&s.machine_id, args.full).await,
            };
            row.push(cell);
        }
        rows.push(row);
    }
    print_table(&cols, rows, args.no_legend);
    Ok(())
}

const MACHINE_FIELDS: &[&str] = &["machine", "ip", "metadata"];

/// A machine in `list-machines -o json` (the names of fleet's API, plus the fleet version).
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct MachineJson {
    id: String,
    #[serde(rename = "primaryIP")]
    primary_ip: String,
    metadata: BTreeMap<String, String>,
    version: String,
}

/// `k=v` pairs sorted by key, joined by `,`.
fn format_metadata(metadata: &BTreeMap<String, String>) -> String {
    metadata
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}

pub async fn machines(ctx: &Ctx, args: &ListArgs, fields: &str) -> Outcome {
    let cols = if args.output == OutputFormat::Table {
        parse_fields(fields, MACHINE_FIELDS, &[])?
    } else {
        Vec::new()
    };
    let reg = ctx.registry().await?;
    let machines = match reg.machines().await {
        Ok(m) => m,
        Err(e) => {
            ui::err(format!(
                "Error retrieving list of active machines from fleet API ({})",
                describe(&e)
            ));
            ui::err("Possible issues:");
            ui::err("  etcd is unhealthy and/or lost quorum");
            return Err(Failure::msg(
                "  connection cannot be established to any etcd servers",
            ));
        }
    };
    if args.output == OutputFormat::Json {
        let rows: Vec<MachineJson> = machines
            .into_iter()
            .map(|m| MachineJson {
                id: m.id,
                primary_ip: m.public_ip,
                metadata: m.metadata,
                version: m.version,
            })
            .collect();
        return print_json(&rows);
    }
    let rows = machines
        .iter()
        .map(|m| {
            cols.iter()
                .map(|c| match *c {
                    "machine" => machine_id_legend(&m.id, args.full),
                    "ip" => dash(&m.public_ip),
                    _ if m.metadata.is_empty() => "-".to_string(),
                    _ => format_metadata(&m.metadata),
                })
                .collect()
        })
        .collect();
    print_table(&cols, rows, args.no_legend);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_are_checked_like_fleet() {
        let check = |fields: &str, want: Result<Vec<&str>, &str>| {
            let got =
                parse_fields(fields, UNIT_FIELDS, &[]).map_err(|f| f.message.unwrap_or_default());
            assert_eq!(got, want.map_err(str::to_string), "{fields:?}");
        };
        check("unit,machine", Ok(vec!["unit", "machine"]));
        check("", Err("Must define output format"));
        check("x", Err("Invalid key in output format: \"x\""));
        check("unit,", Err("Invalid key in output format: \"\""));
        check("UNIT", Err("Invalid key in output format: \"UNIT\""));
    }

    #[test]
    fn metadata_is_sorted() {
        let md: BTreeMap<String, String> = [("ping", "pong"), ("foo", "bar")]
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        assert_eq!(format_metadata(&md), "foo=bar,ping=pong");
    }

    #[test]
    fn legend_helpers_used_by_tables() {
        assert_eq!(
            crate::context::machine_full_legend("other-id", "1.2.3.4", true),
            "other-id/1.2.3.4"
        );
    }
}
