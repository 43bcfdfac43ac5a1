//! The HTTP/1.1 + HTTP/2 accept loop every HTTP server of the project uses.
//!
//! One loop for plain TCP (HTTP/1.1 and h2c by preface) and TLS (ALPN `h2`,
//! `http/1.1`), with a connection limit, header-read and handshake timeouts, a cap
//! on header size and on concurrent HTTP/2 streams, and graceful shutdown: when the
//! token is cancelled the loop stops accepting, HTTP/2 connections get GOAWAY,
//! HTTP/1 connections close after their current response, and whatever is still
//! open after the grace period is dropped.

use std::{convert::Infallible, future::Future, net::SocketAddr, sync::Arc, time::Duration};

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Empty, Full, combinators::UnsyncBoxBody};
use hyper::body::Incoming;
use hyper_util::{
    rt::{TokioExecutor, TokioIo, TokioTimer},
    server::{conn::auto, graceful::GracefulShutdown},
};
use tokio::{net::TcpListener, sync::Semaphore};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::Error;

/// The boxed error type of response bodies.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The response body type every server in the project returns.
pub type Body = UnsyncBoxBody<Bytes, BoxError>;

/// A body holding `bytes`.
pub fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into()).map_err(|never| match never {}).boxed_unsync()
}

/// An empty body.
pub fn empty() -> Body {
    Empty::new().map_err(|never| match never {}).boxed_unsync()
}

/// Per-listener limits. The defaults suit an edge facing the internet.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Time allowed for a TLS handshake and for a request's headers to arrive.
    pub header_read_timeout: Duration,
    /// Largest request head (HTTP/1 buffer, HTTP/2 header list), bytes.
    pub max_header_size: usize,
    /// Concurrent streams per HTTP/2 connection.
    pub max_concurrent_streams: u32,
    /// Open connections on this listener; further connections wait in the backlog.
    pub max_connections: usize,
    /// How long shutdown waits for open connections to finish.
    pub grace: Duration,
    /// Counts open connections, when set.
    pub connections: Option<prometheus::IntGauge>,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            header_read_timeout: Duration::from_secs(10),
            max_header_size: 64 * 1024,
            max_concurrent_streams: 256,
            max_connections: 10_000,
            grace: Duration::from_secs(10),
            connections: None,
        }
    }
}

/// What a handler knows about the connection a request came on.
#[derive(Debug, Clone, Copy)]
pub struct ConnInfo {
    /// The client's address.
    pub peer: SocketAddr,
    /// Our address the client connected to.
    pub local: SocketAddr,
    /// Whether the connection is TLS.
    pub tls: bool,
}

/// Binds `addr`, reporting the address in the error.
pub async fn bind(addr: SocketAddr) -> Result<TcpListener, Error> {
    let socket = if addr.is_ipv4() { tokio::net::TcpSocket::new_v4() } else { tokio::net::TcpSocket::new_v6() }
        .map_err(|source| Error::Bind { addr, source })?;
    socket.set_reuseaddr(true).map_err(|source| Error::Bind { addr, source })?;
    socket.set_nodelay(true).map_err(|source| Error::Bind { addr, source })?;
    socket.bind(addr).map_err(|source| Error::Bind { addr, source })?;
    socket.listen(1024).map_err(|source| Error::Bind { addr, source })
}

/// Serves HTTP on `listener` until `shutdown` is cancelled, then drains connections
/// for at most `limits.grace`.
pub async fn serve<H, F>(
    name: &'static str,
    listener: TcpListener,
    tls: Option<Arc<rustls::ServerConfig>>,
    limits: Limits,
    shutdown: CancellationToken,
    handler: H,
) where
    H: Fn(Request<Incoming>, ConnInfo) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Response<Body>> + Send + 'static,
{
    let local = match listener.local_addr() {
        Ok(addr) => addr,
        Err(error) => {
            warn!(%error, listener = name, "listener has no local address");
            return;
        }
    };
    info!(listener = name, addr = %local, tls = tls.is_some(), "listening");
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .max_buf_size(limits.max_header_size.max(8192));
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(limits.max_concurrent_streams)
        .max_header_list_size(u32::try_from(limits.max_header_size).unwrap_or(u32::MAX))
        .keep_alive_interval(Some(Duration::from_secs(30)))
        .keep_alive_timeout(Duration::from_secs(20));
    let acceptor = tls.map(tokio_rustls::TlsAcceptor::from);
    let permits = Arc::new(Semaphore::new(limits.max_connections));
    let graceful = GracefulShutdown::new();

    loop {
        let permit = tokio::select! {
            () = shutdown.cancelled() => break,
            permit = permits.clone().acquire_owned() => match permit {
                Ok(permit) => permit,
                Err(_) => break,
            },
        };
        let (stream, peer) = tokio::select! {
            () = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    // EMFILE and friends: back off instead of spinning.
                    warn!(%error, listener = name, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        let info = ConnInfo { peer, local, tls: acceptor.is_some() };
        let handler = handler.clone();
        let service = hyper::service::service_fn(move |req| {
            let fut = handler(req, info);
            async move { Ok::<_, Infallible>(fut.await) }
        });
        let builder = builder.clone();
        let watcher = graceful.watcher();
        let acceptor = acceptor.clone();
        let handshake_timeout = limits.header_read_timeout;
        let gauge = limits.connections.clone();
        if let Some(gauge) = &gauge {
            gauge.inc();
        }
        tokio::spawn(async move {
            let _permit = permit;
            let _open = OpenConnection(gauge);
            let result = match acceptor {
                None => watcher.watch(builder.serve_connection(TokioIo::new(stream), service)).await,
                Some(acceptor) => {
                    let tls = match tokio::time::timeout(handshake_timeout, acceptor.accept(stream)).await {
                        Ok(Ok(tls)) => tls,
                        Ok(Err(error)) => {
                            debug!(%error, %peer, "tls handshake failed");
                            return;
                        }
                        Err(_) => {
                            debug!(%peer, "tls handshake timed out");
                            return;
                        }
                    };
                    watcher.watch(builder.serve_connection(TokioIo::new(tls), service)).await
                }
            };
            if let Err(error) = result {
                debug!(error = %error, %peer, "connection ended with an error");
            }
        });
    }
    drop(listener);
    debug!(listener = name, open = graceful.count(), "draining connections");
    if tokio::time::timeout(limits.grace, graceful.shutdown()).await.is_err() {
        warn!(listener = name, "grace period over, dropping open connections");
    }
}

/// Decrements the open-connections gauge when the connection ends.
struct OpenConnection(Option<prometheus::IntGauge>);

impl Drop for OpenConnection {
    fn drop(&mut self) {
        if let Some(gauge) = &self.0 {
            gauge.dec();
        }
    }
}
