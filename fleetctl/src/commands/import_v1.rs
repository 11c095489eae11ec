//! `fleetctl import-v1`: copies a fleet v1.0 cluster's registry (etcd v2 keys) into this
//! project's registry (etcd v3), so the units keep running where they run.
//!
//! fleet v1.0 kept, under its key prefix in etcd's v2 keyspace:
//! - `unit/<sha1>`: `{"Raw":"<unit file text>"}`, one per distinct body;
//! - `job/<name>/object`: `{"Name":"<name>","UnitHash":[20 numbers]}` (a Go byte array);
//! - `job/<name>/target-state`: `inactive`, `loaded` or `launched` (plain text);
//! - `job/<name>/target`: the machine ID the engine scheduled the unit to (plain text);
//! - `machines/<id>/metadata/<key>`: metadata set through the API (plain text; an empty
//!   value removed a configured key);
//! - presence (`machines/<id>/object`), states and heartbeats, which are not imported: our
//!   agents publish their own.
//!
//! Each unit becomes `bodies/<sha1>`, `units/<name>` (and `global/<name>`) and, when fleet
//! v1.0 had placed it and wants it loaded or launched, `schedule/<machine>/<name>` with
//! `placement/<name>`: the engine keeps a unit where it is placed, so nothing moves. One
//! transaction per unit: a unit is imported whole or not at all.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::Duration;

use etcd_client::{Compare, CompareOp, GetOptions, Txn, TxnOp};
use fleet_registry::{EtcdRegistry, GlobalRecord, ScheduleRecord, UnitRecord, keys};
use fleet_unit::{Requirements, TargetState, UnitFile, UnitHash, UnitName};
use http_body_util::BodyExt;
use serde::Deserialize;

use crate::cli::ImportV1Args;
use crate::context::Ctx;
use crate::error::{Failure, Outcome};
use crate::ui;

/// Largest v2 answer read (the whole registry in one read).
const MAX_V2_BODY: usize = 512 << 20;

pub async fn run(ctx: &Ctx, args: &ImportV1Args) -> Outcome {
    let endpoints: Vec<String> = match &args.v1_endpoint {
        Some(e) => e
            .split(',')
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty())
            .collect(),
        None => ctx.etcd_endpoints(),
    };
    if endpoints.is_empty() {
        return Err(Failure::msg("no etcd endpoint: give --v1-endpoint"));
    }
    let timeout = ctx.request_timeout().max(Duration::from_secs(10));
    // the first endpoint that answers, as etcd's clients do
    let mut answer = Err(String::new());
    for endpoint in &endpoints {
        answer = fetch_tree(endpoint, &args.v1_key_prefix, timeout).await;
        if answer.is_ok() {
            break;
        }
    }
    let tree =
        answer.map_err(|e| Failure::msg(format!("cannot read fleet v1.0's registry: {e}")))?;
    let Some(tree) = tree else {
        return Err(Failure::msg(format!(
            "no fleet v1.0 registry under {} at {}",
            args.v1_key_prefix,
            endpoints.join(",")
        )));
    };
    let v1 = read_v1(&tree, &args.v1_key_prefix);
    let etcd = ctx
        .etcd()
        .await
        .map_err(|e| Failure::msg(format!("Unable to initialize client: {e:#}")))?;
    let opts = Options {
        dry_run: args.dry_run,
        replace: args.replace,
    };
    let report = import(&etcd, &v1, opts)
        .await
        .map_err(|e| Failure::msg(format!("cannot read the registry: {e}")))?;
    for line in &report.out {
        ui::out(line);
    }
    for line in &report.err {
        ui::err(line);
    }
    ui::out(report.summary(opts.dry_run));
    if report.skipped > 0 || report.errors > 0 {
        return Err(Failure::msg(
            "not everything was imported: fix or remove the records named above, then run import-v1 again",
        ));
    }
    Ok(())
}

/// A node of etcd's v2 key tree, as `GET /v2/keys/<key>?recursive=true` returns it.
#[derive(Debug, Clone, Deserialize)]
pub struct V2Node {
    pub key: String,
    #[serde(default)]
    pub dir: bool,
    #[serde(default)]
    pub value: Option<String>,
    #[serde(default)]
    pub nodes: Vec<V2Node>,
}

#[derive(Debug, Deserialize)]
struct V2Response {
    node: V2Node,
}

/// One unit as fleet v1.0 held it.
#[derive(Debug, Clone, PartialEq)]
pub struct V1Unit {
    pub name: UnitName,
    pub file: UnitFile,
    pub desired: TargetState,
    /// The machine fleet v1.0's engine placed it on.
    pub machine: Option<String>,
    pub global: bool,
}

/// A v1 record that cannot be imported: its key (relative to the prefix) and why.
#[derive(Debug, Clone, PartialEq)]
pub struct Skip {
    pub key: String,
    pub reason: String,
}

/// What was read from fleet v1.0's registry.
#[derive(Debug, Default)]
pub struct V1Registry {
    pub units: Vec<V1Unit>,
    /// (machine ID, key) → value
    pub metadata: BTreeMap<(String, String), String>,
    pub skipped: Vec<Skip>,
}

/// Reads the v2 tree under `prefix` (None: no such key).
pub async fn fetch_tree(
    endpoint: &str,
    prefix: &str,
    timeout: Duration,
) -> Result<Option<V2Node>, String> {
    let path = format!(
        "/v2/keys{}?recursive=true&sorted=true",
        encode_path(prefix.trim_end_matches('/'))
    );
    let (status, body) = tokio::time::timeout(timeout, v2_request(endpoint, "GET", &path, None))
        .await
        .map_err(|_| format!("{endpoint} did not answer within {timeout:?}"))??;
    if status == 404 {
        return Ok(None);
    }
    if status != 200 {
        return Err(format!(
            "{endpoint} answered {status}: {}",
            String::from_utf8_lossy(&body).trim()
        ));
    }
    let resp: V2Response = serde_json::from_slice(&body)
        .map_err(|e| format!("{endpoint}: not an etcd v2 answer: {e}"))?;
    Ok(Some(resp.node))
}

/// One HTTP/1.1 request to etcd's v2 API: (status, body). `form` is sent as
/// `application/x-www-form-urlencoded`.
pub async fn v2_request(
    endpoint: &str,
    method: &str,
    path_and_query: &str,
    form: Option<String>,
) -> Result<(u16, Vec<u8>), String> {
    let authority = match endpoint.strip_prefix("http://") {
        Some(rest) => rest.trim_end_matches('/').to_string(),
        None if endpoint.starts_with("https://") => {
            return Err(format!(
                "{endpoint}: only http endpoints are supported for fleet v1.0's registry"
            ));
        }
        None => return Err(format!("{endpoint}: not an http:// URL")),
    };
    if authority.is_empty() || authority.contains('/') {
        return Err(format!("{endpoint}: not an http://host:port URL"));
    }
    let stream = tokio::net::TcpStream::connect(&authority)
        .await
        .map_err(|e| format!("{endpoint}: {e}"))?;
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .map_err(|e| format!("{endpoint}: {e}"))?;
    tokio::spawn(conn);
    let mut req = http::Request::builder()
        .method(method)
        .uri(path_and_query)
        .header(http::header::HOST, authority.as_str());
    if form.is_some() {
        req = req.header(
            http::header::CONTENT_TYPE,
            "application/x-www-form-urlencoded",
        );
    }
    let req = req
        .body(http_body_util::Full::new(bytes_of(
            form.unwrap_or_default(),
        )))
        .map_err(|e| format!("{endpoint}: {e}"))?;
    let resp = sender
        .send_request(req)
        .await
        .map_err(|e| format!("{endpoint}: {e}"))?;
    let status = resp.status().as_u16();
    let body = http_body_util::Limited::new(resp.into_body(), MAX_V2_BODY)
        .collect()
        .await
        .map_err(|e| format!("{endpoint}: reading the answer: {e}"))?
        .to_bytes()
        .to_vec();
    Ok((status, body))
}

fn bytes_of(s: String) -> hyper::body::Bytes {
    hyper::body::Bytes::from(s)
}

/// Percent-encodes a key path for a URL (slashes kept).
pub fn encode_path(path: &str) -> String {
    let mut out = String::with_capacity(path.len());
    for b in path.bytes() {
        if b.is_ascii_alphanumeric() || b"/-_.~@:".contains(&b) {
            out.push(b as char);
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}

/// Percent-encodes a form value (tests write v2 keys as fleet v1.0 did).
#[cfg(test)]
pub fn encode_form(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for b in value.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(b as char);
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}

/// `job/<name>/object` as fleet v1.0 wrote it.
#[derive(Deserialize)]
struct JobObject {
    #[serde(rename = "Name")]
    name: String,
    #[serde(rename = "UnitHash")]
    unit_hash: Vec<u8>,
}

/// `unit/<sha1>` as fleet v1.0 wrote it.
#[derive(Deserialize)]
struct UnitObject {
    #[serde(rename = "Raw")]
    raw: String,
}

/// Every leaf under `root`, keyed relative to `prefix`.
fn leaves(root: &V2Node, prefix: &str) -> BTreeMap<String, String> {
    let base = format!("/{}/", prefix.trim_matches('/'));
    let mut out = BTreeMap::new();
    let mut stack = vec![root];
    while let Some(n) = stack.pop() {
        if n.dir {
            stack.extend(n.nodes.iter());
        } else if let Some(rel) = n.key.strip_prefix(&base) {
            out.insert(rel.to_string(), n.value.clone().unwrap_or_default());
        }
    }
    out
}

/// Decodes fleet v1.0's records. Pure: every record is either read whole or named in
/// `skipped` with the reason.
pub fn read_v1(root: &V2Node, prefix: &str) -> V1Registry {
    let all = leaves(root, prefix);
    let mut v1 = V1Registry::default();
    let mut bodies: BTreeMap<&str, Result<UnitFile, String>> = BTreeMap::new();
    let mut jobs: BTreeMap<&str, BTreeMap<&str, &str>> = BTreeMap::new();
    for (key, value) in &all {
        if let Some(hash) = key.strip_prefix("unit/") {
            let body = serde_json::from_str::<UnitObject>(value)
                .map_err(|e| format!("not a fleet v1.0 unit record: {e}"))
                .and_then(|u| {
                    UnitFile::parse(&u.raw).map_err(|e| format!("unit file does not parse: {e}"))
                });
            bodies.insert(hash, body);
        } else if let Some(rest) = key.strip_prefix("job/") {
            if let Some((name, field)) = rest.split_once('/') {
                jobs.entry(name).or_default().insert(field, value);
            } else {
                v1.skipped.push(Skip {
                    key: key.clone(),
                    reason: "a value where fleet v1.0 kept a directory".into(),
                });
            }
        } else if let Some(rest) = key.strip_prefix("machines/") {
            let mut parts = rest.splitn(3, '/');
            if let (Some(id), Some("metadata"), Some(mkey)) =
                (parts.next(), parts.next(), parts.next())
            {
                if !valid_machine_id(id) {
                    v1.skipped.push(Skip {
                        key: key.clone(),
                        reason: "not a machine ID".into(),
                    });
                } else if !valid_metadata_key(mkey) {
                    v1.skipped.push(Skip {
                        key: key.clone(),
                        reason: format!(
                            "not a metadata key (1 to {MAX_METADATA_KEY} letters, digits, '_', '.' or '-')"
                        ),
                    });
                } else if value.len() > MAX_METADATA_VALUE {
                    v1.skipped.push(Skip {
                        key: key.clone(),
                        reason: format!(
                            "a value of {} bytes (at most {MAX_METADATA_VALUE})",
                            value.len()
                        ),
                    });
                } else if value.is_empty() {
                    v1.skipped.push(Skip {
                        key: key.clone(),
                        reason: "an empty value (fleet v1.0 removed the configured key this way) has no equivalent here: remove the key from that machine's fleet.conf".into(),
                    });
                } else {
                    v1.metadata
                        .insert((id.to_string(), mkey.to_string()), value.clone());
                }
            }
        }
    }
    for (name, fields) in jobs {
        match read_job(name, &fields, &bodies) {
            Ok(u) => v1.units.push(u),
            Err(skip) => v1.skipped.push(skip),
        }
    }
    v1
}

fn read_job(
    dir: &str,
    fields: &BTreeMap<&str, &str>,
    bodies: &BTreeMap<&str, Result<UnitFile, String>>,
) -> Result<V1Unit, Skip> {
    let skip = |field: &str, reason: String| Skip {
        key: if field.is_empty() {
            format!("job/{dir}")
        } else {
            format!("job/{dir}/{field}")
        },
        reason,
    };
    let name = UnitName::parse(dir).map_err(|e| skip("", format!("invalid unit name: {e}")))?;
    let object = fields.get("object").ok_or_else(|| {
        skip(
            "object",
            "missing (fleet v1.0 ignored this unit too)".into(),
        )
    })?;
    let obj: JobObject = serde_json::from_str(object)
        .map_err(|e| skip("object", format!("not a fleet v1.0 job record: {e}")))?;
    if obj.name != dir {
        return Err(skip(
            "object",
            format!("names another unit ({:?})", obj.name),
        ));
    }
    let bytes: [u8; 20] = obj
        .unit_hash
        .as_slice()
        .try_into()
        .map_err(|_| skip("object", "UnitHash is not 20 bytes".into()))?;
    let hash = UnitHash(bytes).to_string();
    let file = match bodies.get(hash.as_str()) {
        None => {
            return Err(skip(
                "object",
                format!("its unit file unit/{hash} is missing"),
            ));
        }
        Some(Err(reason)) => {
            return Err(Skip {
                key: format!("unit/{hash}"),
                reason: format!("{reason} (needed by {dir})"),
            });
        }
        Some(Ok(f)) => f.clone(),
    };
    let desired = fields
        .get("target-state")
        .ok_or_else(|| skip("target-state", "missing".into()))?;
    let desired: TargetState = desired
        .parse()
        .map_err(|_| skip("target-state", format!("invalid target state {desired:?}")))?;
    let machine = match fields.get("target") {
        None => None,
        Some(m) if valid_machine_id(m) => Some(m.to_string()),
        Some(m) => {
            return Err(skip("target", format!("invalid machine ID {m:?}")));
        }
    };
    let (req, _) = Requirements::from_unit(&name, &file)
        .map_err(|e| skip("object", format!("unit file not accepted: {e}")))?;
    Ok(V1Unit {
        name,
        file,
        desired,
        machine,
        global: req.global,
    })
}

/// Longest metadata key imported.
const MAX_METADATA_KEY: usize = 255;
/// Longest metadata value imported, in bytes.
const MAX_METADATA_VALUE: usize = 4096;

/// A metadata key as the API accepts one (letters, digits, `_`, `.`, `-`), and not too long.
fn valid_metadata_key(key: &str) -> bool {
    !key.is_empty()
        && key.len() <= MAX_METADATA_KEY
        && key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b))
}

fn valid_machine_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 255
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
}

#[derive(Debug, Clone, Copy, Default)]
pub struct Options {
    pub dry_run: bool,
    pub replace: bool,
}

/// What an import did (or, dry, would do).
#[derive(Debug, Default)]
pub struct Report {
    /// Lines for stdout, in order.
    pub out: Vec<String>,
    /// Lines for stderr (skipped records, errors), in order.
    pub err: Vec<String>,
    pub imported: usize,
    pub already: usize,
    pub skipped: usize,
    pub errors: usize,
}

impl Report {
    pub fn summary(&self, dry_run: bool) -> String {
        let verb = if dry_run { "would import" } else { "imported" };
        format!(
            "{verb}: {}, already there: {}, skipped: {}, errors: {}",
            self.imported, self.already, self.skipped, self.errors
        )
    }
}

/// Where a unit will run, as the report says it.
fn describe(u: &V1Unit) -> String {
    match (&u.machine, scheduled_on(u)) {
        _ if u.global => format!("{}, global", u.desired),
        (_, Some(m)) => format!("{} on {m}", u.desired),
        (Some(_), None) | (None, None) => format!("{}, not scheduled", u.desired),
    }
}

/// The machine to schedule the unit to: where fleet v1.0 placed it, if it is to be loaded
/// or launched there (global units and templates are never scheduled).
fn scheduled_on(u: &V1Unit) -> Option<&str> {
    if u.global || u.name.is_template() || u.desired == TargetState::Inactive {
        return None;
    }
    u.machine.as_deref()
}

/// Writes `v1` into the registry behind `etcd`. Fails only when the registry cannot be read;
/// failed writes are counted in the report.
pub async fn import(
    etcd: &EtcdRegistry,
    v1: &V1Registry,
    opts: Options,
) -> Result<Report, etcd_client::Error> {
    let keys = etcd.keys().clone();
    let mut kv = etcd.client().kv_client();
    let mut report = Report::default();
    report.err.extend(engine_warning(&mut kv, &keys).await?);
    for s in &v1.skipped {
        report.skipped += 1;
        report.err.push(format!("skipped {}: {}", s.key, s.reason));
    }
    let existing = kv
        .get(keys.dir(keys::UNITS), Some(GetOptions::new().with_prefix()))
        .await?;
    let existing: BTreeMap<String, (i64, Option<UnitRecord>)> = existing
        .kvs()
        .iter()
        .map(|kv| {
            (
                String::from_utf8_lossy(kv.key()).into_owned(),
                (kv.mod_revision(), serde_json::from_slice(kv.value()).ok()),
            )
        })
        .collect();
    for u in &v1.units {
        let hash = u.file.hash();
        let unit_key = keys.unit(u.name.as_str());
        let rec = UnitRecord {
            version: 1,
            name: u.name.clone(),
            hash,
            desired_state: u.desired,
            global: u.global,
        };
        let prev = existing.get(&unit_key);
        let prev_rev = match prev {
            None => None,
            Some((_, Some(p))) if *p == rec => {
                report.already += 1;
                report.out.push(format!("already there: {}", u.name));
                continue;
            }
            Some((rev, _)) if opts.replace => Some(*rev),
            Some(_) => {
                report.skipped += 1;
                report.err.push(format!(
                    "skipped {}: present with different content or state (--replace overwrites it)",
                    u.name
                ));
                continue;
            }
        };
        let verb = match (opts.dry_run, prev_rev.is_some()) {
            (true, false) => "would import",
            (true, true) => "would replace",
            (false, false) => "imported",
            (false, true) => "replaced",
        };
        if opts.dry_run {
            report.imported += 1;
            report
                .out
                .push(format!("{verb} {} ({})", u.name, describe(u)));
            continue;
        }
        match write_unit(etcd, u, &rec, prev_rev).await {
            Ok(true) => {
                report.imported += 1;
                report
                    .out
                    .push(format!("{verb} {} ({})", u.name, describe(u)));
            }
            Ok(false) => {
                report.skipped += 1;
                report.err.push(format!(
                    "skipped {}: changed in the registry while importing; run import-v1 again",
                    u.name
                ));
            }
            Err(e) => {
                report.errors += 1;
                report.err.push(format!("error {}: {e}", u.name));
            }
        }
    }
    for ((machine, key), value) in &v1.metadata {
        let k = keys.metadata(machine, key);
        let cur = kv.get(k.as_str(), None).await?;
        let cur = cur.kvs().first().map(|kv| kv.value().to_vec());
        let what = format!("metadata {machine} {key}={value}");
        match cur {
            Some(c) if c == value.as_bytes() => {
                report.already += 1;
                report.out.push(format!("already there: {what}"));
                continue;
            }
            Some(_) if !opts.replace => {
                report.skipped += 1;
                report.err.push(format!(
                    "skipped machines/{machine}/metadata/{key}: present with another value (--replace overwrites it)"
                ));
                continue;
            }
            _ => {}
        }
        if opts.dry_run {
            report.imported += 1;
            report.out.push(format!("would import {what}"));
            continue;
        }
        match kv.put(k.as_str(), value.as_str(), None).await {
            Ok(_) => {
                report.imported += 1;
                report.out.push(format!("imported {what}"));
            }
            Err(e) => {
                report.errors += 1;
                report.err.push(format!("error {what}: {e}"));
            }
        }
    }
    Ok(report)
}

/// A warning (no error) when this project's fleetd already runs against the registry: a
/// machine registered or an engine leader elected. Its engine may then place imported units
/// before their machines' fleetd registered, so move them (the migration's order — import
/// first, then start fleetd — avoids it).
async fn engine_warning(
    kv: &mut etcd_client::KvClient,
    keys: &keys::Keys,
) -> Result<Option<String>, etcd_client::Error> {
    let count = |r: etcd_client::GetResponse| r.count();
    let machines = count(
        kv.get(
            keys.dir(keys::MACHINES),
            Some(GetOptions::new().with_prefix().with_count_only()),
        )
        .await?,
    );
    let leader = count(
        kv.get(
            keys.leader(),
            Some(GetOptions::new().with_prefix().with_count_only()),
        )
        .await?,
    );
    if machines == 0 && leader == 0 {
        return Ok(None);
    }
    Ok(Some(format!(
        "warning: this registry already has {machines} machine(s) registered{}: its engine may move imported units elsewhere before their machines register (import before starting any fleetd, as the migration guide says)",
        if leader > 0 {
            " and an engine leader"
        } else {
            ""
        }
    )))
}

/// One unit in one transaction (its body first, create-only and shared). False when
/// `units/<name>` changed since it was read.
async fn write_unit(
    etcd: &EtcdRegistry,
    u: &V1Unit,
    rec: &UnitRecord,
    prev_rev: Option<i64>,
) -> Result<bool, etcd_client::Error> {
    let keys = etcd.keys();
    let mut kv = etcd.client().kv_client();
    let name = u.name.as_str();
    let body_key = keys.body(&rec.hash.to_string());
    kv.txn(
        Txn::new()
            .when([Compare::create_revision(
                body_key.as_str(),
                CompareOp::Equal,
                0,
            )])
            .and_then([TxnOp::put(body_key.as_str(), u.file.serialize(), None)]),
    )
    .await?;
    let unit_key = keys.unit(name);
    let mut ops = vec![TxnOp::put(unit_key.as_str(), json(rec), None)];
    if u.global {
        let g = GlobalRecord {
            version: 1,
            hash: rec.hash,
            desired_state: rec.desired_state,
        };
        ops.push(TxnOp::put(keys.global(name), json(&g), None));
    } else {
        ops.push(TxnOp::delete(keys.global(name), None));
    }
    if prev_rev.is_some() {
        // replacing: the engine's previous decision goes with the unit it was for
        let placed = kv.get(keys.placement(name), None).await?;
        if let Some(m) = placed.kvs().first() {
            let m = String::from_utf8_lossy(m.value()).into_owned();
            if Some(m.as_str()) != scheduled_on(u) {
                ops.push(TxnOp::delete(keys.schedule(&m, name), None));
                ops.push(TxnOp::delete(keys.placement(name), None));
            }
        }
    }
    if let Some(machine) = scheduled_on(u) {
        let s = ScheduleRecord {
            version: 1,
            hash: rec.hash,
            desired_state: rec.desired_state,
        };
        ops.push(TxnOp::put(keys.schedule(machine, name), json(&s), None));
        ops.push(TxnOp::put(keys.placement(name), machine, None));
        ops.push(TxnOp::delete(keys.reason(name), None));
    }
    let when = match prev_rev {
        None => Compare::create_revision(unit_key.as_str(), CompareOp::Equal, 0),
        Some(rev) => Compare::mod_revision(unit_key.as_str(), CompareOp::Equal, rev),
    };
    Ok(kv
        .txn(Txn::new().when([when]).and_then(ops))
        .await?
        .succeeded())
}

fn json<T: serde::Serialize>(v: &T) -> Vec<u8> {
    serde_json::to_vec(v).unwrap_or_default()
}

#[cfg(test)]
mod tests;
