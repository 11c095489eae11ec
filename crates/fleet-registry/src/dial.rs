//! Reaching etcd through a transport the caller supplies (fleetctl's `--tunnel` opens an SSH
//! channel per connection), with no local listener in between.
//!
//! etcd-client builds one tonic `Endpoint` per configured URL (with its TLS settings, whose
//! server name is the URL's host); here each endpoint becomes a channel whose connections come
//! from the [`Dialer`] instead of a TCP connect. So https etcd is verified against its real
//! name, and nothing another local user could connect to ever exists. Requests go to one
//! endpoint at a time; a connection failure moves the next request to the next endpoint (the
//! order the user gave, like fleet's etcd client).

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};

use async_trait::async_trait;
use etcd_client::{BalancedChannelBuilder, Channel};
use http::Uri;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::mpsc;
use tonic::transport::Endpoint;
use tonic::transport::channel::Change;
use tower::util::BoxCloneSyncService;
use tower::{BoxError, Service};

/// A connection a [`Dialer`] opened: any byte stream.
pub trait DialStream: AsyncRead + AsyncWrite + Send + Unpin + 'static {}

impl<T: AsyncRead + AsyncWrite + Send + Unpin + 'static> DialStream for T {}

/// Opens connections to etcd's `host:port` (as written in the endpoint URL).
#[async_trait]
pub trait Dialer: Send + Sync + 'static {
    async fn dial(&self, host: &str, port: u16) -> io::Result<Box<dyn DialStream>>;
}

type Request = http::Request<tonic::body::Body>;
type Response = http::Response<tonic::body::Body>;
type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

/// Builds etcd-client's channel from the dialer (see [`crate::EtcdRegistry::connect_via`]).
pub(crate) struct Dialed {
    pub dialer: Arc<dyn Dialer>,
    /// Room for every endpoint etcd-client announces before the first request.
    pub endpoints: usize,
}

impl BalancedChannelBuilder for Dialed {
    type Error = etcd_client::Error;

    fn balanced_channel(
        self,
        buffer_size: usize,
    ) -> Result<(Channel, mpsc::Sender<Change<Uri, Endpoint>>), Self::Error> {
        let (tx, rx) = mpsc::channel(buffer_size.max(self.endpoints).max(1));
        let service = Failover {
            shared: Arc::new(Mutex::new(Shared {
                updates: rx,
                channels: Vec::new(),
                current: 0,
            })),
            dialer: self.dialer,
            ready: None,
        };
        Ok((Channel::Custom(BoxCloneSyncService::new(service)), tx))
    }
}

struct Shared {
    /// Endpoints etcd-client adds or removes; applied before a request is routed.
    updates: mpsc::Receiver<Change<Uri, Endpoint>>,
    channels: Vec<(Uri, tonic::transport::Channel)>,
    /// Index of the endpoint requests go to.
    current: usize,
}

impl Shared {
    fn apply_updates(&mut self, dialer: &Arc<dyn Dialer>) {
        while let Ok(change) = self.updates.try_recv() {
            match change {
                Change::Insert(uri, endpoint) => {
                    self.channels.retain(|(u, _)| *u != uri);
                    let channel = endpoint.connect_with_connector_lazy(Connect {
                        dialer: dialer.clone(),
                    });
                    self.channels.push((uri, channel));
                }
                Change::Remove(uri) => self.channels.retain(|(u, _)| *u != uri),
            }
        }
    }

    /// The endpoint at index `i` failed: requests go to the next one, unless another failure
    /// moved them on already.
    fn failed(&mut self, i: usize) {
        let n = self.channels.len().max(1);
        if self.current % n == i {
            self.current = (i + 1) % n;
        }
    }
}

fn lock(shared: &Mutex<Shared>) -> MutexGuard<'_, Shared> {
    shared.lock().unwrap_or_else(|e| e.into_inner())
}

/// The channel etcd-client sends every request through.
struct Failover {
    shared: Arc<Mutex<Shared>>,
    dialer: Arc<dyn Dialer>,
    /// The endpoint `poll_ready` picked (index and channel); `call` sends through it.
    ready: Option<(usize, tonic::transport::Channel)>,
}

impl Clone for Failover {
    /// A clone picks its own endpoint (and takes its own slot in that channel) when polled.
    fn clone(&self) -> Self {
        Failover {
            shared: self.shared.clone(),
            dialer: self.dialer.clone(),
            ready: None,
        }
    }
}

impl Service<Request> for Failover {
    type Response = Response;
    type Error = BoxError;
    type Future = BoxFuture<Result<Response, BoxError>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        if self.ready.is_none() {
            let mut shared = lock(&self.shared);
            shared.apply_updates(&self.dialer);
            if shared.channels.is_empty() {
                return Poll::Ready(Err("no etcd endpoint to dial".into()));
            }
            let i = shared.current % shared.channels.len();
            self.ready = Some((i, shared.channels[i].1.clone()));
        }
        let Some((i, channel)) = &mut self.ready else {
            return Poll::Ready(Err("no etcd endpoint to dial".into()));
        };
        match channel.poll_ready(cx) {
            Poll::Ready(Err(e)) => {
                // This channel is broken for good (its worker is gone): forget it, and let the
                // next poll pick the next endpoint.
                let i = *i;
                self.ready = None;
                lock(&self.shared).failed(i);
                Poll::Ready(Err(BoxError::from(e)))
            }
            other => other.map_err(BoxError::from),
        }
    }

    fn call(&mut self, req: Request) -> Self::Future {
        let Some((i, mut channel)) = self.ready.take() else {
            return Box::pin(async { Err("etcd channel called before it was ready".into()) });
        };
        let shared = self.shared.clone();
        let response = channel.call(req);
        Box::pin(async move {
            let result = response.await;
            if result.is_err() {
                // a transport failure (gRPC errors are responses): try the next endpoint
                lock(&shared).failed(i);
            }
            result.map_err(BoxError::from)
        })
    }
}

/// tonic's connector: each new HTTP/2 connection is one [`Dialer::dial`].
#[derive(Clone)]
struct Connect {
    dialer: Arc<dyn Dialer>,
}

impl Service<Uri> for Connect {
    type Response = TokioIo<Box<dyn DialStream>>;
    type Error = io::Error;
    type Future = BoxFuture<io::Result<Self::Response>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let dialer = self.dialer.clone();
        Box::pin(async move {
            let (host, port) = host_port(&uri).ok_or_else(|| {
                io::Error::new(io::ErrorKind::InvalidInput, format!("no host in {uri}"))
            })?;
            dialer.dial(&host, port).await.map(TokioIo::new)
        })
    }
}

/// The host (IPv6 without brackets) and port of an endpoint URL (`http://etcd:2379`,
/// `https://[::1]/`): the scheme's port (443 for https, else 80) when the URL names none, as a
/// TCP connect to it would use. None without a scheme or a host, or with a bad port. The one
/// parser of endpoint URLs, for the etcd dialer and fleetctl's tunnel and driver choice.
pub fn endpoint_host_port(url: &str) -> Option<(String, u16)> {
    let uri: Uri = url.parse().ok()?;
    uri.scheme_str()?;
    host_port(&uri)
}

/// [`endpoint_host_port`] of a parsed URL.
fn host_port(uri: &Uri) -> Option<(String, u16)> {
    let host = uri.host()?;
    let host = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    if host.is_empty() {
        return None;
    }
    // The text after the host: a port written there must be a valid one.
    let authority = uri.authority()?.as_str();
    let host_and_port = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    let after_host = host_and_port
        .rsplit_once(']')
        .map_or(host_and_port, |(_, rest)| rest);
    let port = match (uri.port_u16(), after_host.contains(':')) {
        (Some(port), _) => port,
        (None, true) => return None,
        (None, false) if uri.scheme_str() == Some("https") => 443,
        (None, false) => 80,
    };
    Some((host.to_string(), port))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_and_port_of_endpoints() {
        let check = |url: &str, want: Option<(&str, u16)>| {
            let uri: Uri = url.parse().expect("uri");
            assert_eq!(
                host_port(&uri),
                want.map(|(h, p)| (h.to_string(), p)),
                "{url}"
            );
        };
        check("http://etcd.example:2379", Some(("etcd.example", 2379)));
        check("https://10.0.0.1:4001/", Some(("10.0.0.1", 4001)));
        check("http://[::1]:2380", Some(("::1", 2380)));
        check("https://etcd", Some(("etcd", 443)));
        check("http://etcd", Some(("etcd", 80)));
    }

    #[test]
    fn endpoint_urls() {
        let check = |url: &str, want: Option<(&str, u16)>| {
            assert_eq!(
                endpoint_host_port(url),
                want.map(|(h, p)| (h.to_string(), p)),
                "{url}"
            );
        };
        check("http://127.0.0.1:2379", Some(("127.0.0.1", 2379)));
        check("https://etcd.example:4001/", Some(("etcd.example", 4001)));
        check("http://[::1]:2380", Some(("::1", 2380)));
        check("https://[::1]", Some(("::1", 443)));
        check("http://fleet.example", Some(("fleet.example", 80)));
        check(
            "https://fleet.example/fleet/v1",
            Some(("fleet.example", 443)),
        );
        check("http://:2379", None);
        check("etcd:2379", None);
        check("http://h:port", None);
        check("http://h:", None);
        check("http://[::1]:x", None);
        check("http://user:secret@etcd:2379", Some(("etcd", 2379)));
        check("", None);
    }

    /// A dialer that is never reached: the channels here are lazy and never connect.
    struct NoDial;

    #[async_trait]
    impl Dialer for NoDial {
        async fn dial(&self, _: &str, _: u16) -> io::Result<Box<dyn DialStream>> {
            Err(io::Error::other("not dialling in this test"))
        }
    }

    /// A channel whose `poll_ready` failed (its worker died with the runtime that ran it) was
    /// kept: every later request failed the same way. Now the next poll picks the next
    /// endpoint.
    #[test]
    fn a_channel_that_fails_poll_ready_is_given_up() {
        let (tx, rx) = mpsc::channel(4);
        let mut failover = Failover {
            shared: Arc::new(Mutex::new(Shared {
                updates: rx,
                channels: Vec::new(),
                current: 0,
            })),
            dialer: Arc::new(NoDial),
            ready: None,
        };
        let endpoint = |url: &'static str| (Uri::from_static(url), Endpoint::from_static(url));
        let (uri, ep) = endpoint("http://broken.invalid:2379");
        tx.try_send(Change::Insert(uri, ep)).expect("insert");
        let mut cx = Context::from_waker(std::task::Waker::noop());
        // The first endpoint's channel is made (and its worker spawned) on a runtime that is
        // then dropped, which kills the worker.
        {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            let _guard = rt.enter();
            assert!(matches!(failover.poll_ready(&mut cx), Poll::Ready(Ok(()))));
        }
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let _guard = rt.enter();
        let (uri, ep) = endpoint("http://working.invalid:2379");
        tx.try_send(Change::Insert(uri, ep)).expect("insert");
        let mut fresh = failover.clone();
        assert!(
            matches!(fresh.poll_ready(&mut cx), Poll::Ready(Err(_))),
            "the broken channel fails"
        );
        assert!(fresh.ready.is_none(), "the broken channel is not kept");
        assert!(
            matches!(fresh.poll_ready(&mut cx), Poll::Ready(Ok(()))),
            "the next endpoint is ready"
        );
        assert_eq!(fresh.ready.as_ref().map(|(i, _)| *i), Some(1));
        drop(failover);
    }
}
