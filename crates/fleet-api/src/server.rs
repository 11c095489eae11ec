//! The accept loops and per-connection serving: HTTP/1.1 on hyper, with timeouts and limits
//! so that slow or malformed clients cannot hold the server, and graceful shutdown.

use std::convert::Infallible;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::{Duration, Instant};

use fleet_registry::Registry;
use futures_util::FutureExt;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::{GracefulShutdown, Watcher};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tracing::{debug, info, warn};

use crate::handlers::Api;
use crate::listen::{Listener, Socket};
use crate::live::{AnyBody, ListenerKind, Live, boxed};
use crate::metrics::MethodLabel;
use crate::write_timeout::WriteTimeout;
use crate::{ApiConfig, ServeError};

/// Request headers larger than this get 431 (hyper's minimum is 8 KiB).
const MAX_HEADER_BUF: usize = 64 * 1024;

/// Serves the API on `listeners` until `shutdown` resolves, then lets open connections finish
/// their current request for up to `config.shutdown_grace`.
///
/// The listeners come from outside ([`crate::listeners_from_systemd`], [`crate::bind_unix`],
/// [`crate::bind_tcp`]), so tests and fleetd choose where to listen.
pub async fn serve(
    listeners: Vec<Listener>,
    registry: Arc<dyn Registry>,
    config: ApiConfig,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ServeError> {
    serve_keeping_listeners(listeners, registry, config, shutdown)
        .await
        .map(drop)
}

/// [`serve`], handing the listeners back once it is done, so that a new server (another
/// registry, another configuration: fleetd's SIGHUP) can go on with the same sockets, as
/// fleet v1.0 did on reload. Clients arriving in between wait in the listen backlog.
pub async fn serve_keeping_listeners(
    listeners: Vec<Listener>,
    registry: Arc<dyn Registry>,
    config: ApiConfig,
    shutdown: impl Future<Output = ()>,
) -> Result<Vec<Listener>, ServeError> {
    if listeners.is_empty() {
        return Err(ServeError::NoListeners);
    }
    let grace = config.shutdown_grace;
    // One budget per kind of listener: network clients (TLS handshakes included) can use up
    // the TCP slots, never the local socket's.
    let slots = Slots {
        unix: Arc::new(Semaphore::new(config.max_unix_connections.max(1))),
        tcp: Arc::new(Semaphore::new(config.max_tcp_connections.max(1))),
    };
    // ends the event streams, which would otherwise hold their connections past the grace
    let (stop_streams, streams_stopped) = tokio::sync::watch::channel(false);
    let live = Arc::new(Live::new(&config, streams_stopped));
    let api = Arc::new(Api::new(registry, config));
    let graceful = GracefulShutdown::new();
    for l in &listeners {
        info!(listener = %l.describe(), tls = l.tls.is_some(), "serving fleet API");
    }
    {
        let loops = listeners
            .iter()
            .map(|l| {
                let slots = match l.socket {
                    Socket::Unix(_) => slots.unix.clone(),
                    Socket::Tcp(_) => slots.tcp.clone(),
                };
                Box::pin(accept_loop(l, &api, &live, &graceful, slots))
            })
            .collect::<Vec<_>>();
        tokio::select! {
            _ = futures_util::future::join_all(loops) => {}
            _ = shutdown => {}
        }
        // the accept loops end here: no new connections (they wait in the backlog)
    }
    let _ = stop_streams.send(true);
    if tokio::time::timeout(grace, graceful.shutdown())
        .await
        .is_err()
    {
        warn!(
            ?grace,
            "API connections still open after the shutdown grace period; dropping them"
        );
    }
    Ok(listeners)
}

/// Serves HTTP on one already-connected stream (for example one end of an in-memory pipe)
/// until the client closes it or a timeout ends it, with the same limits and timeouts as a
/// connection accepted by [`serve`]. The API fuzz target drives the handlers through this.
pub async fn serve_stream<IO>(io: IO, registry: Arc<dyn Registry>, config: ApiConfig)
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (_stop_streams, streams_stopped) = tokio::sync::watch::channel(false);
    let live = Arc::new(Live::new(&config, streams_stopped));
    let api = Arc::new(Api::new(registry, config));
    let graceful = GracefulShutdown::new();
    let io = WriteTimeout::new(io, api.config.write_timeout, api.config.min_write_rate);
    serve_connection(io, api, live, graceful.watcher(), None, ListenerKind::Tcp).await;
}

/// The connection budgets of one server, one per kind of listener.
struct Slots {
    unix: Arc<Semaphore>,
    tcp: Arc<Semaphore>,
}

async fn accept_loop(
    listener: &Listener,
    api: &Arc<Api>,
    live: &Arc<Live>,
    graceful: &GracefulShutdown,
    slots: Arc<Semaphore>,
) {
    let name = listener.describe();
    loop {
        // wait for a free connection slot before accepting: excess clients queue in the backlog
        let Ok(permit) = slots.clone().acquire_owned().await else {
            return;
        };
        let accepted = match &listener.socket {
            Socket::Unix(l) => l.accept().await.map(|(s, _)| Conn::Unix(s)),
            Socket::Tcp(l) => l.accept().await.map(|(s, peer)| {
                let _ = s.set_nodelay(true);
                Conn::Tcp(s, peer)
            }),
        };
        let conn = match accepted {
            Ok(c) => c,
            Err(e) => {
                // e.g. EMFILE: back off a little instead of spinning
                warn!(listener = %name, error = %e, "accepting an API connection failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let api = api.clone();
        let live = live.clone();
        let watcher = graceful.watcher();
        let tls = listener.tls.clone();
        let (write_timeout, min_rate) = (api.config.write_timeout, api.config.min_write_rate);
        tokio::spawn(async move {
            let permit = Some(permit);
            match (conn, tls) {
                (Conn::Unix(s), _) => {
                    let io = WriteTimeout::new(s, write_timeout, min_rate);
                    serve_connection(io, api, live, watcher, permit, ListenerKind::Unix).await
                }
                (Conn::Tcp(s, _), None) => {
                    let io = WriteTimeout::new(s, write_timeout, min_rate);
                    serve_connection(io, api, live, watcher, permit, ListenerKind::Tcp).await
                }
                (Conn::Tcp(s, peer), Some(acceptor)) => {
                    // the handshake's own writes are bounded by the write timeout too
                    let io = WriteTimeout::new(s, write_timeout, min_rate);
                    let timeout = api.config.tls_handshake_timeout;
                    match tokio::time::timeout(timeout, acceptor.accept(io)).await {
                        Ok(Ok(tls)) => {
                            serve_connection(tls, api, live, watcher, permit, ListenerKind::Tcp)
                                .await
                        }
                        Ok(Err(e)) => debug!(%peer, error = %e, "TLS handshake failed"),
                        Err(_) => debug!(%peer, ?timeout, "TLS handshake timed out"),
                    }
                }
            }
        });
    }
}

enum Conn {
    Unix(tokio::net::UnixStream),
    Tcp(tokio::net::TcpStream, std::net::SocketAddr),
}

async fn serve_connection<IO>(
    io: IO,
    api: Arc<Api>,
    live: Arc<Live>,
    watcher: Watcher,
    // held until the connection ends; `None` for streams not accepted by `serve`
    _permit: Option<OwnedSemaphorePermit>,
    kind: ListenerKind,
) where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let service_api = api.clone();
    let service = service_fn(move |req: hyper::Request<Incoming>| {
        let api = service_api.clone();
        let live = live.clone();
        async move {
            let start = Instant::now();
            // a fixed set of labels, whatever method token the client sent
            let method = MethodLabel::of(req.method());
            // a bug in a handler answers 500 for that request, never takes the server down
            let answer = async {
                match live.respond(&req, kind).await {
                    Some(r) => with_server(r, &api),
                    None => boxed(api.respond(req).await),
                }
            };
            let reply = match AssertUnwindSafe(answer).catch_unwind().await {
                Ok(r) => r,
                Err(_) => {
                    warn!("API request handler panicked");
                    boxed(api.panic_reply())
                }
            };
            api.config
                .metrics
                .api_request(method, reply.status().as_u16(), start.elapsed());
            Ok::<_, Infallible>(reply)
        }
    });
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(api.config.header_read_timeout)
        .max_buf_size(MAX_HEADER_BUF)
        .max_header_size(MAX_HEADER_BUF)
        .keep_alive(true)
        // a client that closes its write side after a request still gets its answer
        // (`printf 'GET ...' | fleetctl fd-forward`), as with Go's server
        .half_close(true);
    let conn = builder.serve_connection(TokioIo::new(io), service);
    if let Err(e) = watcher.watch(conn).await {
        debug!(error = %e, "API connection ended with an error");
    }
}

/// `reply` with the `Server` header every v1 answer has.
fn with_server(mut reply: http::Response<AnyBody>, api: &Api) -> http::Response<AnyBody> {
    reply
        .headers_mut()
        .insert(http::header::SERVER, api.server_header());
    reply
}
