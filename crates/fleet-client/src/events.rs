//! `GET /fleet/v1/events` for fleetctl (`fleetctl events`, `list-units --watch`): one
//! connection of its own, kept open, its Server-Sent Events parsed into the JSON events.

use bytes::Bytes;
use fleet_registry::{EventItem, EventMessage, EventQuery, StreamEnd};
use http::{Method, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use tokio::sync::mpsc;

use crate::{Answer, ClientError, HttpRegistry, api_error, encode_component, go_op};

/// A single SSE message larger than this ends the stream (the server's are far smaller).
const MAX_MESSAGE_BYTES: usize = 16 * 1024 * 1024;

impl HttpRegistry {
    /// Opens the event stream; the events arrive on the receiver, the end as an `Err`.
    pub(crate) async fn follow_events(
        &self,
        q: &EventQuery,
    ) -> Result<mpsc::Receiver<EventItem>, ClientError> {
        let mut target = format!("{}events", self.endpoint.base_path());
        let mut params = Vec::new();
        if let Some(s) = q.since {
            params.push(format!("since={s}"));
        }
        if let Some(u) = &q.unit {
            params.push(format!("unit={}", encode_component(u)));
        }
        if let Some(m) = &q.machine {
            params.push(format!("machine={}", encode_component(m)));
        }
        if !params.is_empty() {
            target.push('?');
            target.push_str(&params.join("&"));
        }
        let url = format!(
            "{}://{}{}",
            self.endpoint.url_scheme(),
            self.endpoint.host_header(),
            target
        );
        let op = go_op(&Method::GET);
        let transport = |reason: String| ClientError::Transport {
            op: op.clone(),
            url: url.clone(),
            reason,
        };
        let req = http::Request::builder()
            .method(Method::GET)
            .uri(&target)
            .header(http::header::HOST, self.endpoint.host_header())
            .header(http::header::ACCEPT, "text/event-stream")
            .header(
                http::header::USER_AGENT,
                concat!("fleetctl/", env!("CARGO_PKG_VERSION")),
            )
            .body(Full::new(Bytes::new()))
            .map_err(|e| transport(format!("building request: {e}")))?;
        // the answer's head within the request timeout; the stream itself has none
        let head = async {
            let mut sender = self.connect(&op, &url).await?;
            sender
                .send_request(req)
                .await
                .map_err(|e| transport(e.to_string()))
        };
        let resp = tokio::time::timeout(self.timeout, head)
            .await
            .map_err(|_| ClientError::Timeout {
                op: op.clone(),
                url: url.clone(),
                after: self.timeout,
            })??;
        let status = resp.status();
        if status != StatusCode::OK {
            let body = Limited::new(resp.into_body(), 1024 * 1024)
                .collect()
                .await
                .map(|c| c.to_bytes())
                .unwrap_or_default();
            return Err(api_error(&Answer {
                status,
                body,
                op,
                url,
            }));
        }
        let (tx, rx) = mpsc::channel(256);
        let mut body = resp.into_body();
        tokio::spawn(async move {
            let mut pending: Vec<u8> = Vec::new();
            loop {
                while let Some(pos) = pending.windows(2).position(|w| w == b"\n\n") {
                    let message: Vec<u8> = pending.drain(..pos + 2).collect();
                    if let Some(item) = parse_message(&message)
                        && tx.send(item).await.is_err()
                    {
                        return;
                    }
                }
                if pending.len() > MAX_MESSAGE_BYTES {
                    let end = StreamEnd::Broken("event stream: message too large".into());
                    let _ = tx.send(Err(end)).await;
                    return;
                }
                let frame = tokio::select! {
                    f = body.frame() => f,
                    _ = tx.closed() => return,
                };
                match frame {
                    Some(Ok(f)) => {
                        if let Ok(data) = f.into_data() {
                            pending.extend_from_slice(&data);
                        }
                    }
                    Some(Err(e)) => {
                        let _ = tx
                            .send(Err(StreamEnd::Broken(format!("event stream: {e}"))))
                            .await;
                        return;
                    }
                    None => {
                        let end = StreamEnd::Broken("event stream closed by fleetd".into());
                        let _ = tx.send(Err(end)).await;
                        return;
                    }
                }
            }
        });
        Ok(rx)
    }
}

/// One SSE message: its `id:` (the resume point) and its `data:` lines as JSON; comments
/// alone are none. An `id:` without data (a filtered stream's keepalive) only moves the
/// resume point.
fn parse_message(message: &[u8]) -> Option<EventItem> {
    let text = String::from_utf8_lossy(message);
    let field = |name: &str| {
        let name = name.to_string();
        text.lines()
            .filter_map(move |l| l.strip_prefix(name.as_str()))
            .map(|d| d.strip_prefix(' ').unwrap_or(d))
    };
    let data: Vec<&str> = field("data:").collect();
    let id = field("id:")
        .next_back()
        .and_then(|v| v.trim().parse::<i64>().ok());
    if data.is_empty() && id.is_none() {
        return None;
    }
    let event = if data.is_empty() {
        None
    } else {
        match serde_json::from_str(&data.join("\n")) {
            Ok(v) => Some(v),
            Err(e) => {
                return Some(Err(StreamEnd::Broken(format!(
                    "event stream: unreadable event: {e}"
                ))));
            }
        }
    };
    Some(Ok(EventMessage { event, id }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_parse_into_events() {
        let ev = parse_message(b"id: 5\ndata: {\"type\":\"hello\",\"revision\":5}\n\n");
        assert_eq!(
            ev,
            Some(Ok(EventMessage {
                event: Some(serde_json::json!({"type": "hello", "revision": 5})),
                id: Some(5),
            }))
        );
        // not the last event of its revision: no resume point
        let ev = parse_message(b"data: {\"type\":\"unit-placed\",\"revision\":6}\n\n");
        assert_eq!(ev.and_then(Result::ok).map(|m| m.id), Some(None));
        assert_eq!(parse_message(b": keepalive\n\n"), None);
        // a filtered stream's keepalive carries the revision it has seen up to
        assert_eq!(
            parse_message(b": keepalive\nid: 9\n\n"),
            Some(Ok(EventMessage {
                event: None,
                id: Some(9)
            }))
        );
        assert!(matches!(parse_message(b"data: {oops\n\n"), Some(Err(_))));
    }
}
