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
        match &mut self.ready {
            Some((_, channel)) => channel.poll_ready(cx).map_err(BoxError::from),
            None => Poll::Ready(Err("no etcd endpoint to dial".into())),
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
                let mut shared = lock(&shared);
                let n = shared.channels.len().max(1);
                if shared.current % n == i {
                    shared.current = (i + 1) % n;
                }
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

/// The host (IPv6 without brackets) and port of an endpoint URL; the scheme's port when the
/// URL names none, as a TCP connect would use.
fn host_port(uri: &Uri) -> Option<(String, u16)> {
    let host = uri.host()?;
    let host = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    if host.is_empty() {
        return None;
    }
    let port = uri
        .port_u16()
        .unwrap_or(if uri.scheme_str() == Some("https") {
            443
        } else {
            80
        });
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
}
