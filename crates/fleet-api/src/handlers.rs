//! The API's routes and what each answers, status codes and messages as fleet v1.0's.

use std::str::FromStr;
use std::sync::Arc;

use bytes::Bytes;
use fleet_registry::{MachineView, Registry, RegistryError, StateRecord, UnitView};
use fleet_unit::{Requirements, TargetState, UnitFile, UnitHash, UnitName, go_quote};
use http::header::{CONTENT_TYPE, HeaderValue, SERVER};
use http::{HeaderMap, Method, Response, StatusCode};
use http_body_util::{BodyExt, Full, LengthLimitError, Limited};
use hyper::body::Body;
use tracing::{debug, error, warn};

use crate::page::{Cursors, PageToken};
use crate::{ApiConfig, DISCOVERY_JSON};
use crate::{unit_json, wire};

/// Both prefixes fleet served the same resources under.
const PREFIXES: [&str; 2] = ["/v1-alpha", "/fleet/v1"];

const JSON: &str = "application/json";

/// The request-independent part of the server: the registry and the configuration.
pub(crate) struct Api {
    pub(crate) registry: Arc<dyn Registry>,
    pub(crate) config: ApiConfig,
    server: HeaderValue,
    /// Where the next pages of the unit list start (the name each page ended with).
    unit_cursors: Cursors<String>,
    /// Where the next pages of the state list start (the unit and machine each ended with).
    state_cursors: Cursors<(String, String)>,
}

type Reply = Response<Full<Bytes>>;

/// A failed request: status code and fleet's message (empty where fleet sent none).
#[derive(Debug)]
struct Failure {
    code: StatusCode,
    message: String,
}

fn fail(code: StatusCode, message: impl Into<String>) -> Failure {
    Failure {
        code,
        message: message.into(),
    }
}

/// fleet answered registry failures with a bare 500 and logged the cause. When etcd cannot be
/// reached we say so, with fleet's 503 wording, so a client knows what is wrong.
fn internal(what: &str, e: &RegistryError) -> Failure {
    error!(error = %e, "{what}");
    if e.is_unavailable() {
        return fail(
            StatusCode::SERVICE_UNAVAILABLE,
            "fleet server unable to communicate with etcd",
        );
    }
    fail(StatusCode::INTERNAL_SERVER_ERROR, "")
}

type Result<T, E = Failure> = std::result::Result<T, E>;

impl Api {
    pub(crate) fn new(registry: Arc<dyn Registry>, config: ApiConfig) -> Api {
        let server = HeaderValue::from_str(&format!("fleetd/{}", config.version))
            .unwrap_or_else(|_| HeaderValue::from_static("fleetd"));
        Api {
            registry,
            config,
            server,
            unit_cursors: Cursors::default(),
            state_cursors: Cursors::default(),
        }
    }

    /// Answers one request. Never fails: every problem becomes an error response.
    pub(crate) async fn respond<B>(&self, req: http::Request<B>) -> Reply
    where
        B: Body<Data = Bytes>,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        debug!("HTTP {} {}", req.method(), req.uri());
        let deadline = tokio::time::Instant::now() + self.config.request_timeout;
        let result = match tokio::time::timeout_at(deadline, self.route(req, deadline)).await {
            Ok(r) => r,
            Err(_) => Err(fail(StatusCode::SERVICE_UNAVAILABLE, "request timed out")),
        };
        let mut reply = result.unwrap_or_else(|f| error_reply(f.code, &f.message));
        self.common_headers(&mut reply);
        reply
    }

    /// `Server`, and the advertisement that a unit's PUT honours `If-None-Match: *`.
    fn common_headers(&self, reply: &mut Reply) {
        reply.headers_mut().insert(SERVER, self.server.clone());
        if !self.config.ignore_create_only {
            reply.headers_mut().insert(
                crate::wire::CREATE_ONLY_HEADER,
                HeaderValue::from_static("1"),
            );
        }
    }

    /// `Server: fleetd/<version>`.
    pub(crate) fn server_header(&self) -> HeaderValue {
        self.server.clone()
    }

    /// A reply for a request whose handler panicked.
    pub(crate) fn panic_reply(&self) -> Reply {
        let mut reply = error_reply(StatusCode::INTERNAL_SERVER_ERROR, "");
        self.common_headers(&mut reply);
        reply
    }

    async fn route<B>(&self, req: http::Request<B>, deadline: tokio::time::Instant) -> Result<Reply>
    where
        B: Body<Data = Bytes>,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        if self
            .config
            .available
            .as_ref()
            .is_some_and(|rx| !*rx.borrow())
        {
            return Err(fail(
                StatusCode::SERVICE_UNAVAILABLE,
                "fleet server unable to communicate with etcd",
            ));
        }
        let path = percent_decode(req.uri().path())
            .ok_or_else(|| fail(StatusCode::BAD_REQUEST, "invalid URL escape in path"))?;
        let query = parse_query(req.uri().query().unwrap_or(""));
        if path == "/metrics" {
            return Ok(bytes_reply(
                StatusCode::OK,
                crate::metrics::CONTENT_TYPE,
                self.config.metrics.encode().into_bytes(),
            ));
        }
        for prefix in PREFIXES {
            if path == prefix {
                return Err(fail(StatusCode::METHOD_NOT_ALLOWED, ""));
            }
            let Some(rest) = path.strip_prefix(prefix).and_then(|r| r.strip_prefix('/')) else {
                continue;
            };
            let (resource, item) = match rest.split_once('/') {
                Some((r, i)) => (r, Some(i)),
                None => (rest, None),
            };
            let method = req.method().clone();
            return match (resource, item) {
                ("discovery", None) => discovery(&method),
                ("machines", None) => match method {
                    Method::GET => self.list_machines(&query).await,
                    Method::PATCH => {
                        // fleet v1.0 checked the Content-Type of unit PUTs only
                        let body = self.body(req, deadline, false).await?;
                        self.patch_machines(&body).await
                    }
                    _ => Err(fail(
                        StatusCode::METHOD_NOT_ALLOWED,
                        "only GET and PATCH supported against this resource",
                    )),
                },
                ("units", None) => match method {
                    Method::GET => self.list_units(&query).await,
                    _ => Err(fail(
                        StatusCode::METHOD_NOT_ALLOWED,
                        "only GET supported against this resource",
                    )),
                },
                ("units", Some(item)) if is_item(item) => match method {
                    Method::GET => self.get_unit(item).await,
                    Method::DELETE => self.destroy_unit(item).await,
                    Method::PUT => {
                        let create_only = !self.config.ignore_create_only
                            && req
                                .headers()
                                .get(http::header::IF_NONE_MATCH)
                                .is_some_and(|v| v.as_bytes() == b"*");
                        let body = self.json_body(req, deadline).await?;
                        self.set_unit(item, body, create_only).await
                    }
                    _ => Err(fail(
                        StatusCode::METHOD_NOT_ALLOWED,
                        "only GET, PUT and DELETE supported against this resource",
                    )),
                },
                ("state", None) => match method {
                    Method::GET => self.list_states(&query).await,
                    _ => Err(fail(
                        StatusCode::METHOD_NOT_ALLOWED,
                        "only GET supported against this resource",
                    )),
                },
                ("state", Some(item)) if is_item(item) => match method {
                    Method::GET => self.get_state(item).await,
                    _ => Err(fail(
                        StatusCode::METHOD_NOT_ALLOWED,
                        "only GET supported against this resource",
                    )),
                },
                _ => Err(fail(StatusCode::NOT_FOUND, "")),
            };
        }
        if path == "/" {
            return Err(fail(StatusCode::METHOD_NOT_ALLOWED, ""));
        }
        Err(fail(StatusCode::NOT_FOUND, ""))
    }

    /// The body of a unit PUT: JSON only (415 otherwise, as fleet v1.0), see [`Self::body`].
    async fn json_body<B>(
        &self,
        req: http::Request<B>,
        deadline: tokio::time::Instant,
    ) -> Result<Bytes>
    where
        B: Body<Data = Bytes>,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        self.body(req, deadline, true).await
    }

    /// A request body (with `json_only`, only under `Content-Type: application/json`: 415
    /// otherwise), at most `max_body_bytes` (413), received before the deadline (408).
    async fn body<B>(
        &self,
        req: http::Request<B>,
        deadline: tokio::time::Instant,
        json_only: bool,
    ) -> Result<Bytes>
    where
        B: Body<Data = Bytes>,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        if json_only {
            check_content_type(req.headers())?;
        }
        let limit = self.config.max_body_bytes;
        let too_large = || {
            fail(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("request body exceeds {limit} bytes"),
            )
        };
        let declared = req
            .headers()
            .get(http::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if declared.is_some_and(|n| n > limit as u64) {
            return Err(too_large());
        }
        let collected =
            tokio::time::timeout_at(deadline, Limited::new(req.into_body(), limit).collect()).await;
        match collected {
            Err(_) => Err(fail(
                StatusCode::REQUEST_TIMEOUT,
                "request body not received in time",
            )),
            Ok(Ok(c)) => Ok(c.to_bytes()),
            Ok(Err(e)) if e.downcast_ref::<LengthLimitError>().is_some() => Err(too_large()),
            Ok(Err(e)) => Err(fail(
                StatusCode::BAD_REQUEST,
                format!("unable to read body: {e}"),
            )),
        }
    }

    // ---- units ----

    async fn list_units(&self, query: &[(String, String)]) -> Result<Reply> {
        let token = self.unit_cursors.listing(self.page_token(query)?);
        let limit = usize::from(token.limit);
        // only this page is read, from where the page before ended
        let items = self
            .registry
            .units_page_shared(&self.unit_cursors.start(token), limit)
            .await
            .map_err(|e| internal("failed fetching page of units", &e))?;
        // as in fleet, a full page gets a next token, even when nothing follows
        let next = (items.len() == limit).then(|| token.next());
        if let (Some(next), Some(last)) = (next, items.last()) {
            self.unit_cursors.remember(next, last.name.to_string());
        }
        // (written straight from the views: the bytes of a wire::UnitPage of unit_to_wire)
        let next = next.map(PageToken::encode).unwrap_or_default();
        Ok(bytes_reply(
            StatusCode::OK,
            JSON,
            unit_json::units_page(&next, &items),
        ))
    }

    /// GET of a unit. Like DELETE, it takes names up to fleet v1.0's limit, one byte longer
    /// than a PUT may create, so that a unit stored by fleet v1.0 can be seen and destroyed.
    async fn get_unit(&self, item: &str) -> Result<Reply> {
        let unit = match UnitName::parse_stored(item) {
            Ok(name) => self
                .registry
                .unit(&name)
                .await
                .map_err(|e| internal("failed fetching unit", &e))?,
            // no unit can have an invalid name
            Err(_) => None,
        };
        match unit {
            Some(u) => Ok(json_reply(StatusCode::OK, &unit_to_wire(&u))),
            None => Err(fail(StatusCode::NOT_FOUND, "unit does not exist")),
        }
    }

    async fn destroy_unit(&self, item: &str) -> Result<Reply> {
        let Ok(name) = UnitName::parse_stored(item) else {
            return Err(fail(StatusCode::NOT_FOUND, "unit does not exist"));
        };
        match self.registry.destroy_unit(&name).await {
            Ok(true) => Ok(empty_reply(StatusCode::NO_CONTENT)),
            Ok(false) => Err(fail(StatusCode::NOT_FOUND, "unit does not exist")),
            Err(e) => Err(internal("failed destroying unit", &e)),
        }
    }

    /// PUT: create a unit, replace one with other options, or change the desired state of an
    /// existing one.
    ///
    /// Decoding and validating the body is CPU work proportional to its size (up to
    /// `max_body_bytes`): it runs on the blocking pool, never on the runtime's few workers,
    /// which also drive the agent, the engine and the lease keep-alive.
    /// PUT of a unit. With `create_only` (`If-None-Match: *`, an extension fleetctl sends:
    /// fleet's own clients never did) an existing unit is left alone and the answer is 412,
    /// so that two clients creating the same unit at once never change what the other made.
    async fn set_unit(&self, item: &str, body: Bytes, create_only: bool) -> Result<Reply> {
        let item_owned = item.to_string();
        let put = tokio::task::spawn_blocking(move || PreparedPut::new(&item_owned, &body))
            .await
            .map_err(|e| {
                error!(error = %e, "checking a unit failed");
                fail(StatusCode::INTERNAL_SERVER_ERROR, "")
            })??;
        let PreparedPut {
            name,
            desired_state,
            has_options,
            hash,
            checked,
        } = put;
        if create_only && has_options {
            // A creation that passes every check needs no read first: the transaction itself
            // refuses an existing unit (412). Anything else is answered as below.
            if let (Ok((file, warnings)), Ok(desired)) =
                (&checked, desired_or_inactive(&desired_state))
                && check_template(&name, desired).is_ok()
            {
                log_warnings(&name, warnings);
                return self.create_new(&name, file, desired, true).await;
            }
        }
        let existing = self
            .registry
            .unit(&name)
            .await
            .map_err(|e| internal("failed fetching unit", &e))?;
        if create_only && existing.is_some() {
            return Err(fail(StatusCode::PRECONDITION_FAILED, "unit already exists"));
        }
        let create = match &existing {
            None if !has_options => {
                return Err(fail(
                    StatusCode::CONFLICT,
                    "unit does not exist and options field empty",
                ));
            }
            None => true,
            // the same name with other contents is a new version of the unit: it replaces
            // the old one (what `fleetctl start|load|submit --replace` sends)
            Some(eu) => has_options && eu.hash != hash,
        };
        if create {
            let (file, warnings) = checked?;
            log_warnings(&name, &warnings);
            let desired = desired_or_inactive(&desired_state)?;
            check_template(&name, desired)?;
            if existing.is_some() {
                // fleet overwrote the unit in place: one transaction, the placement stays
                // (the engine moves the unit only if the new options forbid its machine).
                // Without a desired state the unit becomes inactive, as in fleet: its own
                // fleetctl waited for that before starting the new version.
                return match self.registry.replace_unit(&name, &file, desired).await {
                    Ok(()) => Ok(empty_reply(StatusCode::CREATED)),
                    Err(e) => Err(internal("failed creating unit", &e)),
                };
            }
            return self.create_new(&name, &file, desired, create_only).await;
        }
        if desired_state.is_empty() {
            return Err(fail(
                StatusCode::CONFLICT,
                "must provide DesiredState to update existing unit",
            ));
        }
        let desired = parse_state(&desired_state)?;
        check_template(&name, desired)?;
        match self.registry.set_desired_state(&name, desired).await {
            Ok(()) => Ok(empty_reply(StatusCode::NO_CONTENT)),
            Err(RegistryError::NotFound(_)) => {
                Err(fail(StatusCode::NOT_FOUND, "unit does not exist"))
            }
            Err(e) => Err(internal("failed setting target state of unit", &e)),
        }
    }

    /// Creates a unit that was not there; when it is there after all (created meanwhile),
    /// 412 under `If-None-Match: *`, else 409.
    async fn create_new(
        &self,
        name: &UnitName,
        file: &UnitFile,
        desired: TargetState,
        create_only: bool,
    ) -> Result<Reply> {
        match self.registry.create_unit(name, file, desired).await {
            Ok(()) => Ok(empty_reply(StatusCode::CREATED)),
            Err(RegistryError::AlreadyExists(_)) if create_only => {
                Err(fail(StatusCode::PRECONDITION_FAILED, "unit already exists"))
            }
            Err(RegistryError::AlreadyExists(_)) => Err(fail(
                StatusCode::CONFLICT,
                format!(
                    "unit {} already exists with different options",
                    go_quote(name.as_str())
                ),
            )),
            Err(e) => Err(internal("failed creating unit", &e)),
        }
    }

    // ---- state ----

    async fn list_states(&self, query: &[(String, String)]) -> Result<Reply> {
        let token = self.page_token(query)?;
        let machine = first_value(query, "machineID");
        let unit = first_value(query, "unitName");
        let (items, next) = if machine.is_none() && unit.is_none() {
            // only this page is read, from where the page before ended
            let token = self.state_cursors.listing(token);
            let limit = usize::from(token.limit);
            let items = self
                .registry
                .unit_states_page(&self.state_cursors.start(token), limit)
                .await
                .map_err(|e| internal("failed fetching page of unit states", &e))?;
            let next = (items.len() == limit).then(|| token.next());
            if let (Some(next), Some(last)) = (next, items.last()) {
                self.state_cursors
                    .remember(next, (last.name.clone(), last.machine_id.clone()));
            }
            (items, next)
        } else {
            let states = self
                .registry
                .unit_states()
                .await
                .map_err(|e| internal("failed fetching page of unit states", &e))?;
            let filtered: Vec<StateRecord> = states
                .into_iter()
                .filter(|s| machine.is_none_or(|m| m == s.machine_id))
                .filter(|s| unit.is_none_or(|u| u == s.name))
                .collect();
            token.slice(&filtered)
        };
        let page = wire::UnitStatePage {
            next_page_token: next.map(PageToken::encode).unwrap_or_default(),
            states: items.iter().map(state_to_wire).collect(),
        };
        Ok(json_reply(StatusCode::OK, &page))
    }

    async fn get_state(&self, item: &str) -> Result<Reply> {
        let states = self
            .registry
            .unit_states()
            .await
            .map_err(|e| internal("failed fetching unit state", &e))?;
        match states.iter().find(|s| s.name == item) {
            Some(s) => Ok(json_reply(StatusCode::OK, &state_to_wire(s))),
            None => Err(fail(StatusCode::NOT_FOUND, "unit state does not exist")),
        }
    }

    // ---- machines ----

    async fn list_machines(&self, query: &[(String, String)]) -> Result<Reply> {
        let token = self.page_token(query)?;
        let machines = self
            .registry
            .machines()
            .await
            .map_err(|e| internal("failed fetching page of machines", &e))?;
        let (items, next) = token.slice(&machines);
        let page = wire::MachinePage {
            machines: items.iter().map(machine_to_wire).collect(),
            next_page_token: next.map(PageToken::encode).unwrap_or_default(),
        };
        Ok(json_reply(StatusCode::OK, &page))
    }

    /// PATCH: JSON Patch add/replace/remove of `/<machineID>/metadata/<key>`. Every operation
    /// is validated before any is applied; then they run in order.
    async fn patch_machines(&self, body: &[u8]) -> Result<Reply> {
        let ops: Vec<wire::MachinePatchOp> = serde_json::from_slice(body)
            .map_err(|e| fail(StatusCode::BAD_REQUEST, e.to_string()))?;
        let mut planned = Vec::with_capacity(ops.len());
        for op in &ops {
            if !matches!(op.op.as_str(), "add" | "remove" | "replace") {
                return Err(fail(
                    StatusCode::BAD_REQUEST,
                    "invalid op: expect add, remove, or replace",
                ));
            }
            let Some((machine, key)) = metadata_path(&op.path) else {
                return Err(fail(
                    StatusCode::BAD_REQUEST,
                    "machine metadata path invalid",
                ));
            };
            let value = if op.op == "remove" {
                None
            } else {
                let v = op
                    .value_string()
                    .map_err(|m| fail(StatusCode::BAD_REQUEST, m))?;
                if v.is_empty() {
                    return Err(fail(
                        StatusCode::BAD_REQUEST,
                        "invalid value: add and replace require a value",
                    ));
                }
                Some(v)
            };
            planned.push((machine, key, value));
        }
        for (machine, key, value) in planned {
            if let Err(e) = self
                .registry
                .set_machine_metadata(machine, key, value.as_deref())
                .await
            {
                warn!(machine, key, error = %e, "failed changing machine metadata");
                return Err(fail(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()));
            }
        }
        Ok(empty_reply(StatusCode::NO_CONTENT))
    }

    fn page_token(&self, query: &[(String, String)]) -> Result<PageToken> {
        let values: Vec<String> = query
            .iter()
            .filter(|(k, _)| k == "nextPageToken")
            .map(|(_, v)| v.clone())
            .collect();
        PageToken::from_query(&values, self.config.token_limit)
            .map_err(|m| fail(StatusCode::BAD_REQUEST, m))
    }
}

fn discovery(method: &Method) -> Result<Reply> {
    if method != Method::GET {
        return Err(fail(
            StatusCode::BAD_REQUEST,
            "only HTTP GET supported against this resource",
        ));
    }
    Ok(bytes_reply(
        StatusCode::OK,
        JSON,
        DISCOVERY_JSON.as_bytes().to_vec(),
    ))
}

/// fleet's `validateContentType`: exactly one Content-Type, of media type application/json.
fn check_content_type(headers: &HeaderMap) -> Result<()> {
    let values: Vec<&HeaderValue> = headers.get_all(CONTENT_TYPE).iter().collect();
    if values.len() != 1 {
        return Err(fail(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            format!("expected 1 Content-Type, got {}", values.len()),
        ));
    }
    let media = values[0]
        .to_str()
        .unwrap_or("")
        .split(';')
        .next()
        .unwrap_or("")
        .trim();
    if media != JSON {
        return Err(fail(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "only acceptable Content-Type is application/json",
        ));
    }
    Ok(())
}

fn parse_state(s: &str) -> Result<TargetState> {
    TargetState::from_str(s).map_err(|e| fail(StatusCode::BAD_REQUEST, e.to_string()))
}

/// The desired state of a new unit: inactive when the request names none.
fn desired_or_inactive(s: &str) -> Result<TargetState> {
    if s.is_empty() {
        Ok(TargetState::Inactive)
    } else {
        parse_state(s)
    }
}

/// Logs a new unit's warnings: a hostile unit may have thousands of unknown keys, so a few
/// of them and the count.
fn log_warnings(name: &UnitName, warnings: &[String]) {
    for w in warnings.iter().take(MAX_LOGGED_WARNINGS) {
        warn!(unit = %name, "{w}");
    }
    if warnings.len() > MAX_LOGGED_WARNINGS {
        warn!(unit = %name, "{} more warnings", warnings.len() - MAX_LOGGED_WARNINGS);
    }
}

fn check_template(name: &UnitName, desired: TargetState) -> Result<()> {
    if name.is_template() && desired != TargetState::Inactive {
        return Err(fail(
            StatusCode::BAD_REQUEST,
            format!("cannot activate template {}", go_quote(name.as_str())),
        ));
    }
    Ok(())
}

/// How many of a unit's warnings (unknown `[X-Fleet]` keys, ...) a PUT logs one by one.
const MAX_LOGGED_WARNINGS: usize = 10;

/// A PUT body decoded and checked (CPU work, done on the blocking pool).
struct PreparedPut {
    name: UnitName,
    desired_state: String,
    has_options: bool,
    /// Hash of the given options (what an existing unit is compared with).
    hash: UnitHash,
    /// The unit to store and the warnings about it, or why it may not be created.
    checked: Result<(UnitFile, Vec<String>)>,
}

impl PreparedPut {
    fn new(item: &str, body: &[u8]) -> Result<PreparedPut> {
        let mut su: wire::Unit = serde_json::from_slice(body).map_err(|e| {
            fail(
                StatusCode::BAD_REQUEST,
                format!("unable to decode body: {e}"),
            )
        })?;
        if su.name.is_empty() {
            su.name = item.to_string();
        }
        if su.name != item {
            return Err(fail(
                StatusCode::BAD_REQUEST,
                format!(
                    "name in URL {} differs from unit name in request body {}",
                    go_quote(item),
                    go_quote(&su.name)
                ),
            ));
        }
        let name =
            UnitName::parse(&su.name).map_err(|e| fail(StatusCode::BAD_REQUEST, e.to_string()))?;
        let has_options = !su.options.is_empty();
        let file = wire::options_from_wire(su.options);
        let hash = file.hash();
        let checked = if has_options {
            validate_options(&name, &file)
        } else {
            Ok((file, Vec::new()))
        };
        Ok(PreparedPut {
            name,
            desired_state: su.desired_state,
            has_options,
            hash,
            checked,
        })
    }
}

/// fleet's `ValidateOptions`: the unit must survive its own serialization (line lengths) and
/// its `[X-Fleet]` requirements must be consistent. Also, it must read back as the options
/// given (a line break in a value would otherwise add options or sections, e.g. an
/// `[X-Fleet]` that was never validated, once other nodes parse the stored text): the unit
/// read back is what is validated, stored and cached. Returns it with fleet's warnings.
fn validate_options(name: &UnitName, file: &UnitFile) -> Result<(UnitFile, Vec<String>)> {
    let file = file
        .reread()
        .map_err(|e| fail(StatusCode::BAD_REQUEST, e.to_string()))?;
    let (_, warnings) = Requirements::from_submitted(name, &file)
        .map_err(|e| fail(StatusCode::BAD_REQUEST, e.fleet_message()))?;
    Ok((file, warnings))
}

/// `/<machineID>/metadata/<key>` with key in `[A-Za-z0-9_.-]+`.
fn metadata_path(path: &str) -> Option<(&str, &str)> {
    let rest = path.strip_prefix('/')?;
    let (machine, rest) = rest.split_once('/')?;
    let key = rest.strip_prefix("metadata/")?;
    let key_ok = !key.is_empty()
        && key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b));
    (!machine.is_empty() && key_ok).then_some((machine, key))
}

/// An item path segment as fleet's `path.Match(base/*)` took it: no further `/`, not empty.
fn is_item(item: &str) -> bool {
    !item.is_empty() && !item.contains('/')
}

fn first_value<'a>(query: &'a [(String, String)], key: &str) -> Option<&'a str> {
    query
        .iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
}

// ---- domain -> wire ----

/// A unit as fleet showed it: `currentState` and `machineID` only for non-global units.
pub(crate) fn unit_to_wire(u: &UnitView) -> wire::Unit {
    wire::Unit {
        current_state: if u.global {
            String::new()
        } else {
            u.current.to_string()
        },
        desired_state: u.desired.to_string(),
        machine_id: u.machine_id.clone().unwrap_or_default(),
        name: u.name.to_string(),
        options: wire::options_to_wire(&u.file),
        reason: u.reason.clone().unwrap_or_default(),
    }
}

fn state_to_wire(s: &StateRecord) -> wire::UnitState {
    wire::UnitState {
        hash: s.hash.clone(),
        machine_id: s.machine_id.clone(),
        name: s.name.clone(),
        systemd_active_state: s.active_state.clone(),
        systemd_load_state: s.load_state.clone(),
        systemd_sub_state: s.sub_state.clone(),
    }
}

fn machine_to_wire(m: &MachineView) -> wire::Machine {
    wire::Machine {
        id: m.id.clone(),
        metadata: m.metadata.clone(),
        primary_ip: m.public_ip.clone(),
    }
}

// ---- replies ----

fn bytes_reply(code: StatusCode, content_type: &'static str, body: Vec<u8>) -> Reply {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = code;
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    r
}

fn json_reply<T: serde::Serialize>(code: StatusCode, value: &T) -> Reply {
    bytes_reply(code, JSON, wire::to_go_json(value))
}

fn empty_reply(code: StatusCode) -> Reply {
    let mut r = Response::new(Full::new(Bytes::new()));
    *r.status_mut() = code;
    r
}

pub(crate) fn error_reply(code: StatusCode, message: &str) -> Reply {
    let body = wire::ErrorResponse {
        error: wire::ErrorEntity {
            code: code.as_u16(),
            message: message.to_string(),
        },
    };
    json_reply(code, &body)
}

// ---- URL pieces ----

/// Decodes `%XX` escapes of a URL path (not `+`); `None` for a malformed escape or non-UTF-8.
pub(crate) fn percent_decode(s: &str) -> Option<String> {
    decode_bytes(s, false)
}

fn decode_bytes(s: &str, plus_is_space: bool) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                let hex = bytes.get(i + 1..i + 3)?;
                let hex = std::str::from_utf8(hex).ok()?;
                out.push(u8::from_str_radix(hex, 16).ok()?);
                i += 3;
            }
            b'+' if plus_is_space => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8(out).ok()
}

/// `a=1&b=2` into pairs; pairs that do not decode are skipped, as Go's `URL.Query` did.
pub(crate) fn parse_query(q: &str) -> Vec<(String, String)> {
    q.split(['&', ';'])
        .filter(|p| !p.is_empty())
        .filter_map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            Some((decode_bytes(k, true)?, decode_bytes(v, true)?))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metadata_paths() {
        let cases: &[(&str, Option<(&str, &str)>)] = &[
            ("/m1/metadata/region", Some(("m1", "region"))),
            ("/m1/metadata/a.b-c_d", Some(("m1", "a.b-c_d"))),
            ("/m1/metadata/", None),
            ("/m1/metadata/a/b", None),
            ("/m1/metadata/a b", None),
            ("m1/metadata/a", None),
            ("//metadata/a", None),
            ("/m1/foo", None),
            ("/m1/x/metadata/a", None),
        ];
        for (path, expected) in cases {
            assert_eq!(metadata_path(path), *expected, "{path}");
        }
    }

    #[test]
    fn url_decoding() {
        assert_eq!(
            percent_decode("/fleet/v1/units/a%40b.service").as_deref(),
            Some("/fleet/v1/units/a@b.service")
        );
        assert_eq!(percent_decode("/a+b").as_deref(), Some("/a+b"));
        assert_eq!(percent_decode("/a%4"), None);
        assert_eq!(percent_decode("/a%zz"), None);
        assert_eq!(
            parse_query("alt=json&unitName=a%40b.service&machineID=x+y&flag"),
            vec![
                ("alt".to_string(), "json".to_string()),
                ("unitName".to_string(), "a@b.service".to_string()),
                ("machineID".to_string(), "x y".to_string()),
                ("flag".to_string(), String::new()),
            ]
        );
    }

    #[test]
    fn content_types() {
        let check = |values: &[&str]| {
            let mut h = HeaderMap::new();
            for v in values {
                h.append(CONTENT_TYPE, HeaderValue::from_str(v).expect("header"));
            }
            check_content_type(&h).map_err(|f| (f.code.as_u16(), f.message))
        };
        assert!(check(&["application/json"]).is_ok());
        assert!(check(&["application/json; charset=utf-8"]).is_ok());
        assert_eq!(
            check(&[]),
            Err((415, "expected 1 Content-Type, got 0".into()))
        );
        assert_eq!(
            check(&["a", "b"]),
            Err((415, "expected 1 Content-Type, got 2".into()))
        );
        assert_eq!(
            check(&["text/plain"]),
            Err((
                415,
                "only acceptable Content-Type is application/json".into()
            ))
        );
    }
}
