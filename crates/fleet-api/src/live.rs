//! The routes beside API v1 that answer with something other than one JSON document: the
//! event stream (`/fleet/v1/events`) and, when enabled, the dashboard (`/dashboard/`).
//! Every other request goes to the v1 handlers unchanged.

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use fleet_unit::Glob;
use http::header::{CACHE_CONTROL, CONTENT_TYPE, HeaderValue, LOCATION};
use http::{Method, Response, StatusCode};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full};
use tokio::sync::watch;

use crate::ApiConfig;
use crate::events::{Filter, Hub, Limits, SubscribeError};
use crate::handlers::{error_reply, parse_query};

/// The body of every reply: a whole document, or a stream.
pub(crate) type AnyBody = UnsyncBoxBody<Bytes, Infallible>;

/// The path of the event stream.
pub const EVENTS_PATH: &str = "/fleet/v1/events";
/// Where the dashboard lives, when enabled.
pub const DASHBOARD_PATH: &str = "/dashboard/";

pub(crate) struct Live {
    hub: Option<Hub>,
    dashboard: bool,
    available: Option<watch::Receiver<bool>>,
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
        }
    }

    /// The reply to `req` when it is one of these routes; `None` for the v1 handlers.
    pub(crate) async fn respond<B>(
        self: &Arc<Self>,
        req: &http::Request<B>,
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
        Some(self.events(req).await)
    }

    async fn events<B>(&self, req: &http::Request<B>) -> Response<AnyBody> {
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
        match hub.subscribe(since, filter).await {
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

/// `since` (query, or `Last-Event-ID` as `EventSource` sends on reconnecting), `unit` and
/// `machine` from a request.
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
    let since = match get("since") {
        Some(v) => Some(revision(v)?),
        None => match req.headers().get("last-event-id") {
            Some(v) => Some(revision(v.to_str().unwrap_or("?"))?),
            None => None,
        },
    };
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
