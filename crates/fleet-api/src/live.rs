//! The routes beside API v1 that answer with something other than one JSON document: the
//! event stream (`/fleet/v1/events`) and, when enabled, the dashboard (`/dashboard/`).
//! Every other request goes to the v1 handlers unchanged.

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use fleet_unit::Glob;
use http::header::{CACHE_CONTROL, CONTENT_TYPE, HeaderValue, LOCATION, RETRY_AFTER};
use http::{Method, Response, StatusCode};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full};
use tokio::sync::{Semaphore, watch};

use crate::ApiConfig;
use crate::events::{Filter, Hub, Limits, SubscribeError};
use crate::handlers::{error_reply, parse_query};

/// The body of every reply: a whole document, or a stream.
pub(crate) type AnyBody = UnsyncBoxBody<Bytes, Infallible>;

/// The path of the event stream.
pub const EVENTS_PATH: &str = "/fleet/v1/events";
/// Where the dashboard lives, when enabled.
pub const DASHBOARD_PATH: &str = "/dashboard/";

/// Filter parameters longer than this are refused: no unit name or machine ID is near it.
const MAX_FILTER_BYTES: usize = 255;

/// How long a client refused for want of a stream slot is asked to wait.
const RETRY_AFTER_SECS: u64 = 5;

/// Which kind of listener a request came on: each has its own connection budget, and its own
/// share of it for event streams.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ListenerKind {
    Unix,
    Tcp,
}

pub(crate) struct Live {
    hub: Option<Hub>,
    dashboard: bool,
    available: Option<watch::Receiver<bool>>,
    /// Event streams hold their connection for as long as the client stays, so they may take
    /// at most half of each listener's connection budget: the other half stays for requests
    /// (on the unix socket, fleetctl's own), however many streams are open.
    unix_streams: Arc<Semaphore>,
    tcp_streams: Arc<Semaphore>,
    unix_stream_cap: usize,
    tcp_stream_cap: usize,
}

impl Live {
    pub(crate) fn new(config: &ApiConfig, shutdown: watch::Receiver<bool>) -> Live {
        let limits = Limits {
            history: config.event_history,
            history_bytes: config.event_history_bytes,
            backlog: config.event_backlog,
            heartbeat: config.event_heartbeat,
        };
        Live {
            hub: config
                .events
                .as_ref()
                .map(|f| Hub::new(f.0.clone(), limits, shutdown)),
            dashboard: config.dashboard,
            available: config.available.clone(),
            unix_streams: Arc::new(Semaphore::new(stream_cap(config.max_unix_connections))),
            tcp_streams: Arc::new(Semaphore::new(stream_cap(config.max_tcp_connections))),
            unix_stream_cap: stream_cap(config.max_unix_connections),
            tcp_stream_cap: stream_cap(config.max_tcp_connections),
        }
    }

    /// The reply to `req` when it is one of these routes; `None` for the v1 handlers.
    pub(crate) async fn respond<B>(
        self: &Arc<Self>,
        req: &http::Request<B>,
        kind: ListenerKind,
    ) -> Option<Response<AnyBody>> {
        let path = req.uri().path();
        let dashboard =
            self.dashboard && (path == "/dashboard" || path.starts_with(DASHBOARD_PATH));
        if path != EVENTS_PATH && !dashboard {
            return None;
        }
        if req.method() != Method::GET {
            return Some(boxed(error_reply(
                StatusCode::METHOD_NOT_ALLOWED,
                "only GET supported against this resource",
            )));
        }
        if dashboard {
            return Some(crate::dashboard::serve(path));
        }
        if self.available.as_ref().is_some_and(|rx| !*rx.borrow()) {
            return Some(boxed(error_reply(
                StatusCode::SERVICE_UNAVAILABLE,
                "fleet server unable to communicate with etcd",
            )));
        }
        Some(self.events(req, kind).await)
    }

    async fn events<B>(&self, req: &http::Request<B>, kind: ListenerKind) -> Response<AnyBody> {
        let Some(hub) = &self.hub else {
            return boxed(error_reply(
                StatusCode::NOT_FOUND,
                "the event stream is not available on this server",
            ));
        };
        let (since, filter) = match parse_request(req) {
            Ok(v) => v,
            Err(msg) => return boxed(error_reply(StatusCode::BAD_REQUEST, &msg)),
        };
        let (slots, cap) = match kind {
            ListenerKind::Unix => (&self.unix_streams, self.unix_stream_cap),
            ListenerKind::Tcp => (&self.tcp_streams, self.tcp_stream_cap),
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            let mut r = boxed(error_reply(
                StatusCode::SERVICE_UNAVAILABLE,
                &format!(
                    "too many event streams open on this listener (at most {cap}, half its connection limit); retry later"
                ),
            ));
            r.headers_mut()
                .insert(RETRY_AFTER, HeaderValue::from(RETRY_AFTER_SECS));
            return r;
        };
        match hub.subscribe(since, filter, Some(slot)).await {
            Ok(sub) => {
                let mut r = Response::new(BodyExt::boxed_unsync(sub.into_body()));
                let h = r.headers_mut();
                h.insert(CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
                h.insert(CACHE_CONTROL, HeaderValue::from_static("no-cache"));
                r
            }
            Err(SubscribeError::Gone { since, oldest }) => boxed(error_reply(
                StatusCode::GONE,
                &format!(
                    "revision {since} is too old to resume from (this server has events after revision {oldest} only); list units and machines again, then follow the stream without since"
                ),
            )),
            Err(SubscribeError::Unavailable(e)) => {
                tracing::error!(error = %e, "starting the event stream failed");
                boxed(error_reply(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "fleet server unable to communicate with etcd",
                ))
            }
        }
    }
}

/// How many event streams a listener with `budget` connections may hold: half, rounded
/// down, so that streams never take the last slots.
fn stream_cap(budget: usize) -> usize {
    budget.max(1) / 2
}

/// `since` (`Last-Event-ID` as `EventSource` sends on reconnecting, or else the query),
/// `unit` and `machine` from a request.
fn parse_request<B>(req: &http::Request<B>) -> Result<(Option<i64>, Filter), String> {
    let query = parse_query(req.uri().query().unwrap_or(""));
    let get = |k: &str| {
        query
            .iter()
            .find(|(key, _)| key == k)
            .map(|(_, v)| v.as_str())
    };
    let revision = |v: &str| {
        v.trim()
            .parse::<i64>()
            .ok()
            .filter(|r| *r >= 0)
            .ok_or_else(|| format!("invalid since {v:?}: expected a revision (a whole number)"))
    };
    // the header first: an `EventSource` opened on `?since=N` keeps that URL, and its
    // reconnections must continue from the last id it got, not from N again
    let since = match req.headers().get("last-event-id") {
        Some(v) => Some(revision(v.to_str().unwrap_or("?"))?),
        None => match get("since") {
            Some(v) => Some(revision(v)?),
            None => None,
        },
    };
    for key in ["unit", "machine"] {
        if get(key).is_some_and(|v| v.len() > MAX_FILTER_BYTES) {
            return Err(format!(
                "{key} filter too long: at most {MAX_FILTER_BYTES} bytes"
            ));
        }
    }
    let unit = match get("unit").filter(|u| !u.is_empty()) {
        Some(p) => Some(Glob::new(p).ok_or_else(|| format!("invalid unit pattern {p:?}"))?),
        None => None,
    };
    let machine = get("machine").filter(|m| !m.is_empty()).map(str::to_string);
    Ok((since, Filter { unit, machine }))
}

pub(crate) fn boxed(r: Response<Full<Bytes>>) -> Response<AnyBody> {
    r.map(|b| b.map_err(|never| match never {}).boxed_unsync())
}

/// A redirect to `to`.
pub(crate) fn redirect(to: &'static str) -> Response<AnyBody> {
    let mut r = Response::new(Full::new(Bytes::new()));
    *r.status_mut() = StatusCode::MOVED_PERMANENTLY;
    r.headers_mut()
        .insert(LOCATION, HeaderValue::from_static(to));
    boxed(r)
}
