//! fleetctl's default driver: the fleet [`Registry`] over fleetd's HTTP API v1.
//!
//! [`HttpRegistry`] speaks to `unix:///var/run/fleet.sock` (the default), `http://host:port`
//! or `https://host:port` (with `--ca-file`, `--cert-file`, `--key-file`), list endpoints
//! followed page by page. `request_timeout` bounds each request until its answer starts, and
//! then any silence while the answer comes (never its whole length). Connections are kept alive and reused
//! (a few idle ones are pooled), so many requests, also concurrent ones, cost few connects.
//! fleetctl holds it as an `Arc<dyn Registry>`, exactly like the etcd driver.
//!
//! Errors come back as [`RegistryError`]s: a 404 is `None`/`false`/`NotFound`, a 409 on
//! create is `AlreadyExists`; everything else carries a [`ClientError`] (fleet's wording
//! plus a hint), which [`ClientError::from_registry`] gets back out.

mod connector;
mod endpoint;
mod error;
mod events;
mod tls;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use fleet_api::wire;
use fleet_registry::{MachineView, Registry, RegistryError, StateRecord, UnitView};
use fleet_unit::{Requirements, TargetState, UnitFile, UnitName};
use http::{Method, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::rt::TokioIo;
use serde::de::DeserializeOwned;
use tracing::debug;

pub use connector::{Connector, Stream, TcpConnector, UnixConnector};
pub use endpoint::{DEFAULT_ENDPOINT, Endpoint};
pub use error::ClientError;

use error::to_registry;

/// Responses larger than this are refused (a page of 100 units is far smaller).
const MAX_RESPONSE_BYTES: usize = 64 * 1024 * 1024;
/// Idle connections kept for reuse; more concurrent requests open more, closed after use.
/// Few, and not for long: each holds one of fleetd's connection slots while it waits.
const MAX_IDLE_CONNECTIONS: usize = 4;
/// An idle connection older than this is closed rather than reused.
const MAX_IDLE_TIME: Duration = Duration::from_secs(1);

type Sender = hyper::client::conn::http1::SendRequest<Full<Bytes>>;

/// How to reach fleetd; fleetctl's `--endpoint`, `--request-timeout` and TLS flags.
#[derive(Clone)]
pub struct ClientConfig {
    /// `unix:///path`, `http://host:port[/prefix]` or `https://host:port[/prefix]`; of a
    /// comma-separated list only the first is used, as in fleet.
    pub endpoint: String,
    /// Bound on one request until its answer starts (connecting, sending, the response head),
    /// and on any silence while the answer is read; a long answer that keeps coming is read
    /// whole. fleet bounded its etcd requests so (`HeaderTimeoutPerRequest`).
    pub request_timeout: Duration,
    pub ca_file: Option<std::path::PathBuf>,
    pub cert_file: Option<std::path::PathBuf>,
    pub key_file: Option<std::path::PathBuf>,
    /// Replaces the dialing of the endpoint's address (e.g. a stream over an SSH tunnel); the
    /// endpoint still decides the URL, the Host header and whether TLS is spoken.
    pub connector: Option<Arc<dyn Connector>>,
}

impl Default for ClientConfig {
    fn default() -> Self {
        ClientConfig {
            endpoint: DEFAULT_ENDPOINT.to_string(),
            request_timeout: Duration::from_secs(3),
            ca_file: None,
            cert_file: None,
            key_file: None,
            connector: None,
        }
    }
}

impl std::fmt::Debug for ClientConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientConfig")
            .field("endpoint", &self.endpoint)
            .field("request_timeout", &self.request_timeout)
            .field("ca_file", &self.ca_file)
            .field("cert_file", &self.cert_file)
            .field("key_file", &self.key_file)
            .field("connector", &self.connector.as_ref().map(|c| c.target()))
            .finish()
    }
}

/// The registry as seen through fleetd's API. Cheap to clone; clones share the idle
/// connections.
#[derive(Clone)]
pub struct HttpRegistry {
    endpoint: Endpoint,
    connector: Arc<dyn Connector>,
    tls: Option<tls::ClientTls>,
    timeout: Duration,
    /// Kept-alive connections with no request in flight (and since when), newest last.
    idle: Arc<Mutex<Vec<(Sender, std::time::Instant)>>>,
    /// Whether an answer carried [`wire::CREATE_ONLY_HEADER`]: fleetd honours
    /// `If-None-Match: *`, so a unit may be created in a state without looking first.
    create_only: Arc<AtomicBool>,
    /// The answer of the one request sent to learn [`HttpRegistry::create_only`] when
    /// nothing had told it yet (fleet v1.0's fleetd never does).
    probed: Arc<tokio::sync::OnceCell<bool>>,
}

impl std::fmt::Debug for HttpRegistry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpRegistry")
            .field("endpoint", &self.endpoint)
            .finish()
    }
}

/// A copy of a request without a body (a GET), to send again.
fn clone_request(req: &http::Request<Full<Bytes>>) -> Option<http::Request<Full<Bytes>>> {
    let mut b = http::Request::builder()
        .method(req.method().clone())
        .uri(req.uri().clone());
    for (k, v) in req.headers() {
        b = b.header(k, v);
    }
    b.body(Full::new(Bytes::new())).ok()
}

/// A request's JSON body.
struct Body {
    json: Vec<u8>,
    /// Send `If-None-Match: *` (a PUT that must only create).
    create_only: bool,
}

/// A finished HTTP exchange.
struct Answer {
    status: StatusCode,
    body: Bytes,
    op: String,
    url: String,
}

impl HttpRegistry {
    /// Validates the endpoint and reads the TLS files; connects only when asked something.
    pub fn new(cfg: &ClientConfig) -> Result<HttpRegistry, ClientError> {
        let endpoint = Endpoint::parse(&cfg.endpoint)?;
        let connector: Arc<dyn Connector> = match &cfg.connector {
            Some(c) => c.clone(),
            None => endpoint.connector(),
        };
        let tls = if endpoint.is_https() {
            Some(tls::ClientTls::load(
                endpoint.host(),
                cfg.ca_file.as_deref(),
                cfg.cert_file.as_deref(),
                cfg.key_file.as_deref(),
            )?)
        } else {
            None
        };
        Ok(HttpRegistry {
            endpoint,
            connector,
            tls,
            timeout: cfg.request_timeout,
            idle: Arc::default(),
            create_only: Arc::default(),
            probed: Arc::default(),
        })
    }

    pub fn endpoint(&self) -> &Endpoint {
        &self.endpoint
    }

    /// One request; `path` is relative to `/fleet/v1/`. `?alt=json` is added as fleet's
    /// client did. Any status is an answer; only transport problems are errors.
    async fn exchange(
        &self,
        method: Method,
        path: &str,
        query: &[(&str, &str)],
        body: Option<Body>,
    ) -> Result<Answer, ClientError> {
        let mut target = format!("{}{}?alt=json", self.endpoint.base_path(), path);
        for (k, v) in query {
            target.push('&');
            target.push_str(&encode_component(k));
            target.push('=');
            target.push_str(&encode_component(v));
        }
        let url = format!(
            "{}://{}{}",
            self.endpoint.url_scheme(),
            self.endpoint.host_header(),
            target
        );
        let op = go_op(&method);
        debug!("{op} {url}");
        self.exchange_inner(method, &target, body, &op, &url).await
    }

    async fn exchange_inner(
        &self,
        method: Method,
        target: &str,
        body: Option<Body>,
        op: &str,
        url: &str,
    ) -> Result<Answer, ClientError> {
        let transport = |reason: String| ClientError::Transport {
            op: op.to_string(),
            url: url.to_string(),
            reason,
        };
        let mut req = http::Request::builder()
            .method(method)
            .uri(target)
            .header(http::header::HOST, self.endpoint.host_header())
            .header(
                http::header::USER_AGENT,
                concat!("fleetctl/", env!("CARGO_PKG_VERSION")),
            );
        if let Some(b) = &body {
            req = req.header(http::header::CONTENT_TYPE, "application/json");
            if b.create_only {
                req = req.header(http::header::IF_NONE_MATCH, "*");
            }
        }
        let mut req = req
            .body(Full::new(Bytes::from(
                body.map(|b| b.json).unwrap_or_default(),
            )))
            .map_err(|e| transport(format!("building request: {e}")))?;
        // A kept-alive connection may have been closed by fleetd meanwhile: a request it
        // hands back unsent goes out again on another connection, and so does a GET that
        // met the close after it was sent (it changes nothing).
        let idempotent = req.method() == Method::GET;
        // a copy of a GET to send again (bodies of GETs are empty)
        let mut retry = idempotent.then(|| clone_request(&req)).flatten();
        // `--request-timeout` bounds what fleet's own bound did (the etcd client's time per
        // request until the response headers): connecting, sending, and fleetd's answer
        // starting. A long answer is then read for as long as it keeps coming, so a large
        // page over a slow link is not cut off; an answer that stalls for the same time is.
        let head = async {
            loop {
                let (mut sender, reused) = match self.take_idle() {
                    Some(s) => (s, true),
                    None => (self.connect(op, url).await?, false),
                };
                match sender.try_send_request(req).await {
                    Ok(resp) => break Ok::<_, ClientError>((sender, resp)),
                    Err(mut e) => match e.take_message() {
                        Some(unsent) if reused => {
                            debug!(error = %e.error(), "kept-alive API connection closed; reconnecting");
                            req = unsent;
                        }
                        None if reused && idempotent => {
                            debug!(error = %e.error(), "kept-alive API connection closed; sending again");
                            req = retry
                                .take()
                                .ok_or_else(|| transport(e.into_error().to_string()))?;
                        }
                        _ => return Err(transport(e.into_error().to_string())),
                    },
                }
            }
        };
        let (mut sender, resp) = match tokio::time::timeout(self.timeout, head).await {
            Ok(r) => r?,
            Err(_) => {
                return Err(ClientError::Timeout {
                    op: op.to_string(),
                    url: url.to_string(),
                    after: self.timeout,
                });
            }
        };
        let status = resp.status();
        if resp.headers().contains_key(wire::CREATE_ONLY_HEADER) {
            self.create_only.store(true, Ordering::Relaxed);
        }
        let mut stream = Limited::new(resp.into_body(), MAX_RESPONSE_BYTES);
        let mut body = Vec::new();
        loop {
            match tokio::time::timeout(self.timeout, stream.frame()).await {
                Err(_) => {
                    return Err(transport(format!(
                        "reading response: nothing received for {:?}",
                        self.timeout
                    )));
                }
                Ok(None) => break,
                Ok(Some(Err(e))) => return Err(transport(format!("reading response: {e}"))),
                Ok(Some(Ok(frame))) => {
                    if let Ok(data) = frame.into_data() {
                        body.extend_from_slice(&data);
                    }
                }
            }
        }
        let body = Bytes::from(body);
        // ready again once hyper has seen the end of the response
        if let Ok(Ok(())) = tokio::time::timeout(self.timeout, sender.ready()).await {
            self.put_idle(sender);
        }
        Ok(Answer {
            status,
            body,
            op: op.to_string(),
            url: url.to_string(),
        })
    }

    /// A new connection (with TLS where the endpoint wants it), its driver task spawned.
    async fn connect(&self, op: &str, url: &str) -> Result<Sender, ClientError> {
        let transport = |reason: String| ClientError::Transport {
            op: op.to_string(),
            url: url.to_string(),
            reason,
        };
        let stream = self
            .connector
            .connect()
            .await
            .map_err(|e| ClientError::Unreachable {
                op: op.to_string(),
                url: url.to_string(),
                target: self.connector.target(),
                reason: connector::go_dial_reason(&e),
                hint: self.connector.hint(),
            })?;
        let stream: Box<dyn Stream> = match &self.tls {
            Some(tls) => Box::new(
                tls.connect(stream)
                    .await
                    .map_err(|e| transport(format!("TLS: {e}")))?,
            ),
            None => stream,
        };
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| transport(e.to_string()))?;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                debug!(error = %e, "API connection ended with an error");
            }
        });
        Ok(sender)
    }

    /// An idle connection that is still open and fresh, if there is one.
    fn take_idle(&self) -> Option<Sender> {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        while let Some((s, since)) = idle.pop() {
            if s.is_ready() && since.elapsed() < MAX_IDLE_TIME {
                return Some(s);
            }
        }
        None
    }

    fn put_idle(&self, sender: Sender) {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        idle.retain(|(_, since)| since.elapsed() < MAX_IDLE_TIME);
        if idle.len() < MAX_IDLE_CONNECTIONS {
            idle.push((sender, std::time::Instant::now()));
        }
    }

    /// GET of a JSON entity; `None` on 404.
    async fn get_json<T: DeserializeOwned>(
        &self,
        path: &str,
        query: &[(&str, &str)],
    ) -> Result<Option<T>, ClientError> {
        let a = self.exchange(Method::GET, path, query, None).await?;
        match a.status {
            StatusCode::OK => decode(&a).map(Some),
            StatusCode::NOT_FOUND => Ok(None),
            _ => Err(api_error(&a)),
        }
    }

    /// Every item of a paginated list.
    async fn list_all<P, T>(
        &self,
        path: &str,
        split: impl Fn(P) -> (Vec<T>, String),
    ) -> Result<Vec<T>, ClientError>
    where
        P: DeserializeOwned,
    {
        self.list_pages(path, &[], split, &mut None).await
    }

    /// Every page of `path` (with `query`), and in `first` when the first page came back.
    async fn list_pages<P, T>(
        &self,
        path: &str,
        query: &[(&str, &str)],
        split: impl Fn(P) -> (Vec<T>, String),
        first: &mut Option<std::time::Instant>,
    ) -> Result<Vec<T>, ClientError>
    where
        P: DeserializeOwned,
    {
        let mut out = Vec::new();
        let mut token = String::new();
        loop {
            let mut q: Vec<(&str, &str)> = query.to_vec();
            if !token.is_empty() {
                q.push(("nextPageToken", token.as_str()));
            }
            let a = self.exchange(Method::GET, path, &q, None).await?;
            if a.status != StatusCode::OK {
                return Err(api_error(&a));
            }
            first.get_or_insert_with(std::time::Instant::now);
            let (items, next) = split(decode::<P>(&a)?);
            out.extend(items);
            if next.is_empty() {
                return Ok(out);
            }
            token = next;
        }
    }

    /// PUT of a unit; `create_only` asks fleetd to leave an existing unit alone (412).
    async fn put_unit(
        &self,
        name: &UnitName,
        unit: &wire::Unit,
        create_only: bool,
    ) -> Result<Answer, ClientError> {
        let body = Body {
            json: serde_json::to_vec(unit).unwrap_or_default(),
            create_only,
        };
        self.exchange(
            Method::PUT,
            &format!("units/{}", encode_component(name.as_str())),
            &[],
            Some(body),
        )
        .await
    }

    /// Whether fleetd honours `If-None-Match: *` (ours does and says so in every answer;
    /// fleet v1.0's ignores it). Unless an answer said so already, the first caller asks
    /// with a GET of `name`, and the others wait for that answer.
    async fn honours_create_only(&self, name: &UnitName) -> Result<bool, ClientError> {
        if self.create_only.load(Ordering::Relaxed) {
            return Ok(true);
        }
        let path = format!("units/{}", encode_component(name.as_str()));
        self.probed
            .get_or_try_init(|| async {
                self.exchange(Method::GET, &path, &[], None).await?;
                Ok(self.create_only.load(Ordering::Relaxed))
            })
            .await
            .copied()
    }

    /// All units as the API sends them (fleet's wire form).
    pub async fn wire_units(&self) -> Result<Vec<wire::Unit>, ClientError> {
        self.list_all("units", |p: wire::UnitPage| (p.units, p.next_page_token))
            .await
    }

    /// All unit states as the API sends them, optionally filtered by the server.
    pub async fn wire_states(
        &self,
        machine_id: Option<&str>,
        unit_name: Option<&str>,
    ) -> Result<Vec<wire::UnitState>, ClientError> {
        let mut query: Vec<(&str, &str)> = Vec::new();
        if let Some(m) = machine_id {
            query.push(("machineID", m));
        }
        if let Some(u) = unit_name {
            query.push(("unitName", u));
        }
        self.list_pages("state", &query, split_states, &mut None)
            .await
    }

    /// All units and all unit states, listed at once, and when the later of the two first
    /// pages came back. fleetd serves a listing's later pages at the revision of its first
    /// while it keeps what it read ahead (a page whose chunk it dropped, after 30 s or when
    /// more listings run at once than it keeps chunks for, is read afresh), so both lists
    /// show the registry as it was by then at the latest.
    pub async fn units_and_states_shown(
        &self,
    ) -> fleet_registry::Result<(Vec<UnitView>, Vec<StateRecord>, std::time::Instant)> {
        let (mut units_first, mut states_first) = (None, None);
        let (units, states) = tokio::join!(
            self.list_pages(
                "units",
                &[],
                |p: wire::UnitPage| (p.units, p.next_page_token),
                &mut units_first
            ),
            self.list_pages("state", &[], split_states, &mut states_first)
        );
        let units = units
            .map_err(to_registry)?
            .into_iter()
            .map(|u| unit_view(u).map_err(|reason| self.bad_unit("units", reason)))
            .collect::<fleet_registry::Result<Vec<UnitView>>>()?;
        let states = states
            .map_err(to_registry)?
            .into_iter()
            .map(state_record)
            .collect();
        let shown = units_first
            .into_iter()
            .chain(states_first)
            .max()
            .unwrap_or_else(std::time::Instant::now);
        Ok((units, states, shown))
    }
}

/// A page of unit states: its states, and the token of the next page.
fn split_states(p: wire::UnitStatePage) -> (Vec<wire::UnitState>, String) {
    (p.states, p.next_page_token)
}

#[async_trait]
impl Registry for HttpRegistry {
    async fn events(
        &self,
        query: &fleet_registry::EventQuery,
    ) -> Result<tokio::sync::mpsc::Receiver<fleet_registry::EventItem>, RegistryError> {
        self.follow_events(query).await.map_err(to_registry)
    }

    async fn create_unit(
        &self,
        name: &UnitName,
        file: &UnitFile,
        desired: TargetState,
    ) -> fleet_registry::Result<()> {
        // `If-None-Match: *` makes our fleetd refuse any existing unit, atomically (412).
        // fleet v1.0's fleetd ignores the header; it refuses a PUT without desired state for
        // an existing unit (409), which is what fleet's own fleetctl relied on, but with a
        // desired state it would set that state on the unit, or overwrite its options: to
        // such a fleetd the unit is looked up first, as fleet's fleetctl did.
        if desired != TargetState::Inactive
            && !self.honours_create_only(name).await.map_err(to_registry)?
            && self.unit(name).await?.is_some()
        {
            return Err(RegistryError::AlreadyExists(name.to_string()));
        }
        let unit = wire::Unit {
            name: name.to_string(),
            // fleet's fleetctl sent no desired state to create (a new unit is inactive); with
            // one, fleet v1.0's fleetd would set it on an identical unit that exists already
            desired_state: if desired == TargetState::Inactive {
                String::new()
            } else {
                desired.to_string()
            },
            options: wire::options_to_wire(file),
            ..wire::Unit::default()
        };
        let a = self
            .put_unit(name, &unit, true)
            .await
            .map_err(to_registry)?;
        match a.status {
            StatusCode::CREATED => Ok(()),
            // 204: a fleetd that ignored `If-None-Match: *` found the unit there (and set its
            // state): it was there already all the same
            StatusCode::NO_CONTENT | StatusCode::CONFLICT | StatusCode::PRECONDITION_FAILED => {
                Err(RegistryError::AlreadyExists(name.to_string()))
            }
            _ => Err(to_registry(api_error(&a))),
        }
    }

    async fn replace_unit(
        &self,
        name: &UnitName,
        file: &UnitFile,
        desired: TargetState,
    ) -> fleet_registry::Result<()> {
        // fleet's own PUT of other options over a unit: one request, which our fleetd (and
        // fleet v1.0's) applies as one write; the desired state goes with it, so the unit is
        // never inactive in between
        let unit = wire::Unit {
            name: name.to_string(),
            desired_state: desired.to_string(),
            options: wire::options_to_wire(file),
            ..wire::Unit::default()
        };
        let a = self
            .put_unit(name, &unit, false)
            .await
            .map_err(to_registry)?;
        match a.status {
            // 204: fleet v1.0's fleetd found the same options there (a desired state change)
            StatusCode::CREATED | StatusCode::NO_CONTENT => Ok(()),
            _ => Err(to_registry(api_error(&a))),
        }
    }

    async fn set_desired_state(
        &self,
        name: &UnitName,
        desired: TargetState,
    ) -> fleet_registry::Result<()> {
        let unit = wire::Unit {
            name: name.to_string(),
            desired_state: desired.to_string(),
            ..wire::Unit::default()
        };
        let a = self
            .put_unit(name, &unit, false)
            .await
            .map_err(to_registry)?;
        match a.status {
            StatusCode::NO_CONTENT => Ok(()),
            // "unit does not exist and options field empty"
            StatusCode::CONFLICT | StatusCode::NOT_FOUND => {
                Err(RegistryError::NotFound(name.to_string()))
            }
            _ => Err(to_registry(api_error(&a))),
        }
    }

    async fn destroy_unit(&self, name: &UnitName) -> fleet_registry::Result<bool> {
        let path = format!("units/{}", encode_component(name.as_str()));
        let a = self
            .exchange(Method::DELETE, &path, &[], None)
            .await
            .map_err(to_registry)?;
        match a.status {
            StatusCode::NO_CONTENT | StatusCode::OK => Ok(true),
            StatusCode::NOT_FOUND => Ok(false),
            _ => Err(to_registry(api_error(&a))),
        }
    }

    async fn unit(&self, name: &UnitName) -> fleet_registry::Result<Option<UnitView>> {
        let path = format!("units/{}", encode_component(name.as_str()));
        let unit: Option<wire::Unit> = self.get_json(&path, &[]).await.map_err(to_registry)?;
        unit.map(|u| unit_view(u).map_err(|reason| self.bad_unit(&path, reason)))
            .transpose()
    }

    async fn units(&self) -> fleet_registry::Result<Vec<UnitView>> {
        let units = self.wire_units().await.map_err(to_registry)?;
        units
            .into_iter()
            .map(|u| unit_view(u).map_err(|reason| self.bad_unit("units", reason)))
            .collect()
    }

    async fn machines(&self) -> fleet_registry::Result<Vec<MachineView>> {
        let machines = self
            .list_all("machines", |p: wire::MachinePage| {
                (p.machines, p.next_page_token)
            })
            .await
            .map_err(to_registry)?;
        Ok(machines
            .into_iter()
            .map(|m| MachineView {
                id: m.id,
                public_ip: m.primary_ip,
                metadata: m.metadata,
                version: String::new(),
            })
            .collect())
    }

    async fn unit_states(&self) -> fleet_registry::Result<Vec<StateRecord>> {
        let states = self.wire_states(None, None).await.map_err(to_registry)?;
        Ok(states.into_iter().map(state_record).collect())
    }

    async fn set_machine_metadata(
        &self,
        machine: &str,
        key: &str,
        value: Option<&str>,
    ) -> fleet_registry::Result<()> {
        // fleet v1.0's own form of the value (`{"value": "v"}`), which every fleetd accepts
        let op = match value {
            Some(v) => wire::MachinePatchOp {
                op: "add".into(),
                path: format!("/{machine}/metadata/{key}"),
                value: serde_json::json!({ "value": v }),
            },
            None => wire::MachinePatchOp {
                op: "remove".into(),
                path: format!("/{machine}/metadata/{key}"),
                value: serde_json::Value::Null,
            },
        };
        let body = serde_json::to_vec(&[op]).unwrap_or_default();
        let a = self
            .exchange(
                Method::PATCH,
                "machines",
                &[],
                Some(Body {
                    json: body,
                    create_only: false,
                }),
            )
            .await
            .map_err(to_registry)?;
        match a.status {
            StatusCode::NO_CONTENT | StatusCode::OK => Ok(()),
            _ => Err(to_registry(api_error(&a))),
        }
    }
}

impl HttpRegistry {
    fn bad_unit(&self, path: &str, reason: String) -> RegistryError {
        let url = format!(
            "{}://{}{}{}",
            self.endpoint.url_scheme(),
            self.endpoint.host_header(),
            self.endpoint.base_path(),
            path
        );
        to_registry(ClientError::BadResponse {
            op: "Get".into(),
            url,
            reason,
        })
    }
}

/// A unit from the wire: its body from its options, its hash and globalness from the body.
fn unit_view(u: wire::Unit) -> Result<UnitView, String> {
    // a unit stored by fleet v1.0 may have a name one byte longer than can be created
    let name =
        UnitName::parse_stored(&u.name).map_err(|e| format!("unit name {:?}: {e}", u.name))?;
    let file = wire::options_from_wire(u.options);
    let desired = parse_state(&u.desired_state).map_err(|e| format!("unit {name}: {e}"))?;
    let current = parse_state(&u.current_state).map_err(|e| format!("unit {name}: {e}"))?;
    let global = Requirements::is_global(&name, &file);
    Ok(UnitView {
        hash: file.hash(),
        name,
        file: file.into(),
        desired,
        global,
        machine_id: non_empty(u.machine_id),
        current,
        reason: non_empty(u.reason),
    })
}

fn parse_state(s: &str) -> Result<TargetState, fleet_unit::TargetStateError> {
    if s.is_empty() {
        Ok(TargetState::Inactive)
    } else {
        s.parse()
    }
}

/// A unit state from the wire. API v1 does not carry what the agent did with the unit
/// (`agent_state`); it is derived from systemd's states: loaded and active (or on its way) is
/// `launched`, loaded is `loaded`, anything else `inactive`.
fn state_record(s: wire::UnitState) -> StateRecord {
    let agent_state = match (
        s.systemd_load_state.as_str(),
        s.systemd_active_state.as_str(),
    ) {
        ("loaded", "active" | "activating" | "reloading") => TargetState::Launched,
        ("loaded", _) => TargetState::Loaded,
        _ => TargetState::Inactive,
    };
    StateRecord {
        // the record format this client knows; the API does not send one
        version: 1,
        name: s.name,
        machine_id: s.machine_id,
        hash: s.hash,
        load_state: s.systemd_load_state,
        active_state: s.systemd_active_state,
        sub_state: s.systemd_sub_state,
        agent_state,
        // the API's unit states carry no reason (it reaches clients as the unit's)
        reason: None,
    }
}

fn non_empty(s: String) -> Option<String> {
    (!s.is_empty()).then_some(s)
}

fn decode<T: DeserializeOwned>(a: &Answer) -> Result<T, ClientError> {
    serde_json::from_slice(&a.body).map_err(|e| ClientError::BadResponse {
        op: a.op.clone(),
        url: a.url.clone(),
        reason: e.to_string(),
    })
}

/// An error status as googleapi reported it: the message of fleet's error entity, else the body.
fn api_error(a: &Answer) -> ClientError {
    let body = String::from_utf8_lossy(&a.body).into_owned();
    match serde_json::from_slice::<wire::ErrorResponse>(&a.body) {
        Ok(e) => ClientError::Api {
            code: if e.error.code == 0 {
                a.status.as_u16()
            } else {
                e.error.code
            },
            message: e.error.message,
            body,
        },
        Err(_) => ClientError::Api {
            code: a.status.as_u16(),
            message: String::new(),
            body,
        },
    }
}

/// Go's `url.Error` operation name: `Get`, `Put`, `Delete`, `Patch`.
fn go_op(m: &Method) -> String {
    let s = m.as_str();
    let mut out = s[..1].to_string();
    out.push_str(&s[1..].to_lowercase());
    out
}

/// Percent-encodes everything but unreserved characters and `@` `:`.
fn encode_component(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~@:".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn helpers() {
        assert_eq!(go_op(&Method::DELETE), "Delete");
        assert_eq!(encode_component("a@b.service"), "a@b.service");
        assert_eq!(encode_component("a\\x2d b"), "a%5Cx2d%20b");
        let cases = [
            (("loaded", "active"), TargetState::Launched),
            (("loaded", "inactive"), TargetState::Loaded),
            (("not-found", "inactive"), TargetState::Inactive),
        ];
        for ((load, active), expected) in cases {
            let s = wire::UnitState {
                systemd_load_state: load.into(),
                systemd_active_state: active.into(),
                ..Default::default()
            };
            assert_eq!(state_record(s).agent_state, expected, "{load}/{active}");
        }
    }

    #[test]
    fn unit_views_from_the_wire() {
        let u = wire::Unit {
            name: "g.service".into(),
            desired_state: "launched".into(),
            options: vec![
                wire::UnitOption {
                    section: "Service".into(),
                    name: "ExecStart".into(),
                    value: "/bin/true".into(),
                },
                wire::UnitOption {
                    section: "X-Fleet".into(),
                    name: "Global".into(),
                    value: "true".into(),
                },
            ],
            reason: "no machines".into(),
            ..Default::default()
        };
        let v = unit_view(u).expect("valid unit");
        assert!(v.global);
        assert_eq!(v.hash, v.file.hash());
        assert_eq!(
            (v.desired, v.current),
            (TargetState::Launched, TargetState::Inactive)
        );
        assert_eq!(v.reason.as_deref(), Some("no machines"));
        assert!(
            unit_view(wire::Unit {
                name: "bad name".into(),
                ..Default::default()
            })
            .is_err()
        );
        assert!(
            unit_view(wire::Unit {
                name: "a.service".into(),
                desired_state: "x".into(),
                ..Default::default()
            })
            .is_err()
        );
    }
}
