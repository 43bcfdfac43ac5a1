//! The HTTP/1.1 + HTTP/2 accept loop every HTTP server of the project uses.
//!
//! One loop for plain TCP (HTTP/1.1 and h2c by preface) and TLS (ALPN `h2`,
//! `http/1.1`), with a connection limit, header-read and handshake timeouts, a cap
//! on header size and on concurrent HTTP/2 streams, and graceful shutdown: when the
//! token is cancelled the loop stops accepting, HTTP/2 connections get GOAWAY,
//! HTTP/1 connections close after their current response, and whatever is still
//! open after the grace period is dropped.
//!
//! Each connection is driven next to its [`activity::Activity`]: a connection with no
//! request for `idle_timeout` is closed gracefully, one whose client has taken no
//! response data for `send_timeout` (while nothing waits on the origin) is dropped,
//! and one that cancels more requests than it lets finish (HTTP/2 rapid reset,
//! stream floods) is dropped at once.

pub mod activity;
pub mod fast;

use std::{
    convert::Infallible,
    future::Future,
    net::SocketAddr,
    pin::{Pin, pin},
    sync::Arc,
    time::{Duration, Instant},
};

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Empty, Full, combinators::UnsyncBoxBody};
use hyper::body::Incoming;
use hyper_util::{
    rt::{TokioIo, TokioTimer},
    server::conn::auto,
};
use tokio::{net::TcpListener, sync::Semaphore};
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tracing::{debug, info, warn};

use self::{
    activity::{Activity, Closed, Reason, Tracked, Verdict, Watched},
    fast::{FastPath, NoFastPath, Rewound},
};
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
    /// A connection with no request in progress for this long is closed.
    pub idle_timeout: Duration,
    /// A connection whose client takes no response data for this long (while no
    /// response waits on the origin) is dropped: slow and stalled readers.
    pub send_timeout: Duration,
    /// How long shutdown waits for open connections to finish.
    pub grace: Duration,
    /// Counts open connections, when set.
    pub connections: Option<prometheus::IntGauge>,
    /// Counts connections the server closed (idle, stalled, cancels), when set.
    pub closed: Option<Closed>,
    /// Decides at accept whether the client may open one more connection, when set.
    pub admission: Option<Admission>,
}

/// What a listener asks at accept: `Some(guard)` admits the client (the guard is
/// held while the connection is open), `None` closes the connection at once.
#[derive(Clone)]
pub struct Admission(Arc<AdmitFn>);

type AdmitFn = dyn Fn(SocketAddr) -> Option<Box<dyn Send + Sync>> + Send + Sync;

impl Admission {
    /// An admission deciding with `admit`.
    pub fn new(admit: impl Fn(SocketAddr) -> Option<Box<dyn Send + Sync>> + Send + Sync + 'static) -> Self {
        Self(Arc::new(admit))
    }
}

impl std::fmt::Debug for Admission {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Admission")
    }
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            header_read_timeout: Duration::from_secs(10),
            max_header_size: 64 * 1024,
            max_concurrent_streams: 256,
            max_connections: 10_000,
            idle_timeout: Duration::from_secs(60),
            send_timeout: Duration::from_secs(30),
            grace: Duration::from_secs(10),
            connections: None,
            closed: None,
            admission: None,
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
    serve_fast::<H, F, NoFastPath>(name, listener, tls, limits, shutdown, handler, None).await;
}

/// [`serve`], with a short way for simple HTTP/1.1 requests ([`fast`]): plain
/// HTTP/1.1 connections and TLS ones that chose `http/1.1` offer their simple
/// requests to `fast_path` first; hyper serves the rest.
pub async fn serve_fast<H, F, P>(
    name: &'static str,
    listener: TcpListener,
    tls: Option<Arc<rustls::ServerConfig>>,
    limits: Limits,
    shutdown: CancellationToken,
    handler: H,
    fast_path: Option<Arc<P>>,
) where
    H: Fn(Request<Incoming>, ConnInfo) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Response<Body>> + Send + 'static,
    P: FastPath,
{
    let local = match listener.local_addr() {
        Ok(addr) => addr,
        Err(error) => {
            warn!(%error, listener = name, "listener has no local address");
            return;
        }
    };
    info!(listener = name, addr = %local, tls = tls.is_some(), "listening");
    let mut builder = auto::Builder::new(InlineFirst);
    builder
        .http1()
        .timer(TokioTimer::new())
        // The head timer is the driver's (Activity::verdict): hyper's starts when it
        // waits for the next request, so it would also close idle keep-alive
        // connections after `header_read_timeout` instead of `idle_timeout`.
        .header_read_timeout(None)
        .max_buf_size(limits.max_header_size.max(8192));
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(limits.max_concurrent_streams)
        .max_header_list_size(u32::try_from(limits.max_header_size).unwrap_or(u32::MAX))
        // No keep-alive PINGs: the driver closes a connection idle for `idle_timeout`
        // and drops one whose client stops reading (`send_timeout`), which is what
        // they would find out; and hyper's ping recorder takes a lock and reads the
        // clock for every frame received.
        .keep_alive_interval(None);
    let acceptor = tls.map(tokio_rustls::TlsAcceptor::from);
    let permits = Arc::new(Semaphore::new(limits.max_connections));
    let tasks = TaskTracker::new();
    // Cancelled when the grace period is over: drops whatever is still open.
    let force = CancellationToken::new();

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
        let admitted = match &limits.admission {
            Some(admission) => match (admission.0)(peer) {
                Some(guard) => Some(guard),
                None => continue, // closed before any TLS or HTTP work
            },
            None => None,
        };
        let _ = stream.set_nodelay(true);
        let info = ConnInfo { peer, local, tls: acceptor.is_some() };
        let activity = Activity::new(Instant::now());
        let service = {
            let handler = handler.clone();
            let activity = activity.clone();
            hyper::service::service_fn(move |req: Request<Incoming>| {
                let mut guard = activity.start();
                let head = req.method() == http::Method::HEAD;
                let fut = handler(req, info);
                async move {
                    let response = fut.await;
                    guard.responded();
                    let expected = announced_length(&response, head);
                    Ok::<_, Infallible>(response.map(|inner| Tracked::new(inner, guard, expected)))
                }
            })
        };
        let builder = builder.clone();
        let acceptor = acceptor.clone();
        let limits = limits.clone();
        let (shutdown, force) = (shutdown.clone(), force.clone());
        if let Some(gauge) = &limits.connections {
            gauge.inc();
        }
        let fast_path = fast_path.clone();
        tasks.spawn(async move {
            let _permit = permit;
            let _admitted = admitted;
            let _open = OpenConnection(limits.connections.clone());
            let driver = Driver { activity: &activity, limits: &limits, shutdown: &shutdown, force: &force };
            let end = match acceptor {
                None => {
                    let io = Watched::new(stream, activity.clone());
                    driver.serve(io, fast_path.as_deref(), info, &builder, service).await
                }
                Some(acceptor) => {
                    let handshake = tokio::time::timeout(limits.header_read_timeout, acceptor.accept(stream));
                    let tls = tokio::select! {
                        () = shutdown.cancelled() => return,
                        handshake = handshake => match handshake {
                            Ok(Ok(tls)) => tls,
                            Ok(Err(error)) => {
                                debug!(%error, %peer, "tls handshake failed");
                                return;
                            }
                            Err(_) => {
                                debug!(%peer, "tls handshake timed out");
                                return;
                            }
                        },
                    };
                    // HTTP/2 (ALPN h2) goes straight to hyper.
                    let fast_path = fast_path.as_deref().filter(|_| tls.get_ref().1.alpn_protocol() != Some(b"h2"));
                    let io = Watched::new(tls, activity.clone());
                    driver.serve(io, fast_path, info, &builder, service).await
                }
            };
            let reason = match end {
                End::Done(Ok(())) | End::Forced => return,
                End::Done(Err(error)) => {
                    debug!(error = %error, %peer, "connection ended with an error");
                    return;
                }
                End::Closed(reason) => reason,
            };
            match reason {
                Reason::Idle => {}
                Reason::HeaderTimeout => {
                    debug!(%peer, timeout = ?limits.header_read_timeout, "request head too slow; connection dropped");
                }
                Reason::Stalled => {
                    debug!(%peer, timeout = ?limits.send_timeout, "client stopped reading; connection dropped");
                }
                Reason::Cancels => {
                    let (finished, cancelled) = activity.counts();
                    warn!(%peer, finished, cancelled, "client cancels most of its requests; connection dropped");
                }
            }
            if let Some(closed) = &limits.closed {
                closed.count(reason);
            }
        });
    }
    drop(listener);
    tasks.close();
    debug!(listener = name, open = tasks.len(), "draining connections");
    if tokio::time::timeout(limits.grace, tasks.wait()).await.is_err() {
        warn!(listener = name, open = tasks.len(), "grace period over, dropping open connections");
        force.cancel();
        tasks.wait().await;
    }
}

/// Raises this process's soft limit on open files to its hard limit, as servers do:
/// every connection and every sealed body ([`crate::zerocopy`]) holds a descriptor.
/// Returns the limit now in force.
pub fn raise_open_files_limit() -> Option<u64> {
    use rustix::process::{Resource, getrlimit, setrlimit};
    let mut limit = getrlimit(Resource::Nofile);
    if limit.current < limit.maximum {
        limit.current = limit.maximum;
        if let Err(error) = setrlimit(Resource::Nofile, limit) {
            debug!(%error, "cannot raise the open-files limit");
        }
    }
    getrlimit(Resource::Nofile).current
}

/// The body length a response announces: none for HEAD and for statuses without a
/// body, else its `Content-Length`. HTTP/1 sends that many bytes and drops the body
/// without asking for its end.
fn announced_length(response: &Response<Body>, head: bool) -> Option<u64> {
    let status = response.status();
    if head
        || status.is_informational()
        || status == http::StatusCode::NO_CONTENT
        || status == http::StatusCode::NOT_MODIFIED
    {
        return Some(0);
    }
    response.headers().get(http::header::CONTENT_LENGTH)?.to_str().ok()?.parse().ok()
}

/// How long an idle connection closed gracefully may take to go.
const CLOSE_WAIT: Duration = Duration::from_secs(2);

/// How a connection's driver ended.
enum End<R = Result<(), BoxError>> {
    /// The connection finished by itself (or after a graceful close).
    Done(R),
    /// Closed by the server's limits.
    Closed(Reason),
    /// The shutdown grace period ran out.
    Forced,
}

/// Drives one connection next to its activity; see the module docs.
struct Driver<'a> {
    activity: &'a Activity,
    limits: &'a Limits,
    shutdown: &'a CancellationToken,
    force: &'a CancellationToken,
}

impl Driver<'_> {
    /// Serves a connection: the short way while `fast_path` answers its requests
    /// (when there is one), then hyper, with what the short way read replayed.
    async fn serve<S, P, Svc>(
        &self,
        io: Watched<S>,
        fast_path: Option<&P>,
        info: ConnInfo,
        builder: &auto::Builder<InlineFirst>,
        service: Svc,
    ) -> End
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + crate::zerocopy::Sink + Unpin + Send + 'static,
        P: FastPath,
        Svc: hyper::service::Service<Request<Incoming>, Response = Response<Tracked>, Error = Infallible>
            + Clone
            + Send
            + 'static,
        Svc::Future: Send + 'static,
    {
        let (io, read) = match fast_path {
            None => (io, bytes::Bytes::new()),
            Some(fast_path) => {
                let stop = fast::Stop::default();
                let run = pin!(fast::run(io, fast_path, info, self.activity, &stop));
                match self.drive(run, |_| stop.stop()).await {
                    End::Done(fast::Outcome::Handoff(io, read)) => (io, read),
                    End::Done(fast::Outcome::Done) => return End::Done(Ok(())),
                    End::Done(fast::Outcome::Failed(error)) => return End::Done(Err(error.into())),
                    End::Closed(reason) => return End::Closed(reason),
                    End::Forced => return End::Forced,
                }
            }
        };
        let io = TokioIo::new(Rewound::new(io, read));
        let conn = pin!(builder.serve_connection(io, service));
        self.drive(conn, |conn| conn.graceful_shutdown()).await
    }

    async fn drive<C, R>(&self, mut conn: Pin<&mut C>, graceful: impl Fn(Pin<&mut C>)) -> End<R>
    where
        C: Future<Output = R>,
    {
        let (idle, send, head) = (self.limits.idle_timeout, self.limits.send_timeout, self.limits.header_read_timeout);
        let mut closing = false;
        let mut idle_closed = false;
        let mut next = Instant::now() + idle.min(send).min(head);
        loop {
            tokio::select! {
                result = conn.as_mut() => return if idle_closed { End::Closed(Reason::Idle) } else { End::Done(result) },
                () = self.shutdown.cancelled(), if !closing => {
                    graceful(conn.as_mut());
                    closing = true;
                }
                () = self.force.cancelled() => return End::Forced,
                () = self.activity.abused() => return End::Closed(Reason::Cancels),
                () = tokio::time::sleep_until(next.into()) => {
                    let now = Instant::now();
                    match self.activity.verdict(now, idle, send, Some(head)) {
                        Verdict::Fine(at) => next = at,
                        Verdict::Stalled => return End::Closed(Reason::Stalled),
                        Verdict::SlowHead => return End::Closed(Reason::HeaderTimeout),
                        // Asked to close once and still open: drop it.
                        Verdict::Idle if closing => return End::Closed(Reason::Idle),
                        Verdict::Idle => {
                            graceful(conn.as_mut());
                            closing = true;
                            idle_closed = true;
                            // An idle client has nothing in flight: it gets a moment to
                            // take the GOAWAY (HTTP/2 waits for a PING's answer), no more.
                            next = now + CLOSE_WAIT;
                        }
                    }
                }
            }
        }
    }
}

/// The executor of HTTP/2 streams: each stream's future (the handler, then sending
/// the response) is first polled once on the connection's own task, and spawned as
/// a task of its own only if it cannot finish at once. A response the handler has
/// ready (an edge's cache HIT) is then sent without a task per stream, a wake-up of
/// the connection's task from another one, or a trip through the scheduler;
/// anything that waits (a miss on the origin, a body larger than the stream's
/// window) goes on in its own task as before.
///
/// The first poll uses a no-op waker: a future that is not ready is spawned at once,
/// and the spawned task's first poll registers its real waker (futures must allow a
/// poll that nothing woke), so no wake-up is lost.
#[derive(Debug, Clone, Copy)]
pub struct InlineFirst;

impl<F> hyper::rt::Executor<F> for InlineFirst
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    fn execute(&self, future: F) {
        let mut future = Box::pin(future);
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        if future.as_mut().poll(&mut cx).is_pending() {
            tokio::spawn(future);
        }
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

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, Ordering};

    use hyper::rt::Executor as _;

    use super::*;

    #[tokio::test]
    async fn ready_streams_run_inline_and_waiting_ones_in_a_task() {
        // Ready at once: done before `execute` returns, on this task.
        let done = Arc::new(AtomicBool::new(false));
        let flag = done.clone();
        InlineFirst.execute(async move { flag.store(true, Ordering::SeqCst) });
        assert!(done.load(Ordering::SeqCst));

        // Waiting: spawned, and woken by what it waits for although its first poll
        // had a no-op waker.
        let (tx, rx) = tokio::sync::oneshot::channel::<u32>();
        let (done_tx, done_rx) = tokio::sync::oneshot::channel();
        InlineFirst.execute(async move {
            let value = rx.await.unwrap();
            done_tx.send(value + 1).unwrap();
        });
        tokio::task::yield_now().await;
        tx.send(41).unwrap();
        let value = tokio::time::timeout(Duration::from_secs(5), done_rx).await.expect("the spawned task was woken");
        assert_eq!(value.unwrap(), 42);
    }
}
