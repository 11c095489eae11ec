//! `GET /fleet/v1/events` for fleetctl (`fleetctl events`, `list-units --watch`): one
//! connection of its own, kept open, its Server-Sent Events parsed into the JSON events.

use bytes::Bytes;
use fleet_registry::{EventItem, EventQuery};
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
                    let _ = tx.send(Err("event stream: message too large".into())).await;
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
                        let _ = tx.send(Err(format!("event stream: {e}"))).await;
                        return;
                    }
                    None => {
                        let _ = tx.send(Err("event stream closed by fleetd".into())).await;
                        return;
                    }
                }
            }
        });
        Ok(rx)
    }
}

/// One SSE message: its `data:` lines as JSON; comments and messages without data are none.
fn parse_message(message: &[u8]) -> Option<EventItem> {
    let text = String::from_utf8_lossy(message);
    let data: Vec<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("data:"))
        .map(|d| d.strip_prefix(' ').unwrap_or(d))
        .collect();
    if data.is_empty() {
        return None;
    }
    Some(
        serde_json::from_str(&data.join("\n"))
            .map_err(|e| format!("event stream: unreadable event: {e}")),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_parse_into_events() {
        let ev = parse_message(b"id: 5\ndata: {\"type\":\"hello\",\"revision\":5}\n\n");
        assert_eq!(
            ev,
            Some(Ok(serde_json::json!({"type": "hello", "revision": 5})))
        );
        assert_eq!(parse_message(b": keepalive\n\n"), None);
        assert!(matches!(parse_message(b"data: {oops\n\n"), Some(Err(_))));
    }
}
