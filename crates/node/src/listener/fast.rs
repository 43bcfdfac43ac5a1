//! A short way for the commonest HTTP/1.1 request: a plain GET or HEAD that the
//! server can answer from memory (an edge's cache HIT).
//!
//! The accept loop reads an HTTP/1.1 connection's requests itself ([`run`]) and
//! parses each head with `httparse`. A request that is [`Simple`] — GET or HEAD,
//! HTTP/1.1, origin-form target, one `Host`, no body framing, no `Expect`, no
//! `Upgrade`, `Connection` at most `keep-alive`, a head that fits the buffer — is
//! offered to the server's [`FastPath`]; the answer (an encoded head and a body)
//! goes out with one vectored write, and the loop reads on (pipelined requests are
//! answered in order). Anything else, or a request the fast path declines, hands the
//! connection over to hyper with the bytes already read replayed in front of the
//! socket ([`Rewound`]), and hyper serves it (and the rest of the connection) as if
//! it had read everything itself. The rule is "anything unusual goes the full way":
//! the fast path only ever answers what the full path would answer the same way.
//!
//! The connection's [`Activity`] sees the short way as it sees hyper: the socket is
//! the same [`Watched`](super::activity::Watched) one (head and send timeouts), and
//! each answer counts as a finished request ([`Activity::served`]).

use std::{
    future::Future,
    io::{self, IoSlice},
    pin::Pin,
    task::{Context, Poll},
    time::Instant,
};

use bytes::{Buf as _, Bytes, BytesMut};
use futures_util::task::AtomicWaker;
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _, ReadBuf};

use super::{ConnInfo, activity::Activity};

/// Header lines a simple request may have (more: the full way).
const MAX_HEADERS: usize = 32;

/// The largest request head the short way reads before handing over; hyper reads
/// longer ones (up to the listener's `max_header_size`).
pub const MAX_HEAD: usize = 8 * 1024;

/// A request the listener parsed itself: HTTP/1.1, GET or HEAD, no body.
#[derive(Debug)]
pub struct Simple<'a> {
    /// `HEAD` (else `GET`).
    pub head: bool,
    /// The request target, origin-form (starts with `/`).
    pub target: &'a str,
    /// The one `Host` header's value.
    pub host: &'a str,
    /// Every header line, `Host` included, as received.
    pub headers: &'a [httparse::Header<'a>],
}

/// The whole response to a [`Simple`] request: the encoded status line and header
/// section (ending with the empty line), and the body (empty for HEAD).
#[derive(Debug, Clone)]
pub struct Answer {
    pub head: Bytes,
    pub body: Bytes,
}

/// A server's short way: answers a [`Simple`] request completely, or declines
/// (`None`) and the full server answers it.
pub trait FastPath: Send + Sync + 'static {
    /// The answer to `request` on the connection `info`, or `None`.
    fn answer(&self, request: &Simple<'_>, info: &ConnInfo) -> impl Future<Output = Option<Answer>> + Send;
}

/// The fast path of a listener that has none.
#[derive(Debug, Clone, Copy)]
pub enum NoFastPath {}

impl FastPath for NoFastPath {
    #[allow(clippy::manual_async_fn)]
    fn answer(&self, _: &Simple<'_>, _: &ConnInfo) -> impl Future<Output = Option<Answer>> + Send {
        async { match *self {} }
    }
}

/// The connection's request to stop the short way between requests (its graceful
/// close). Two atomics where a `CancellationToken` would take a lock per request.
#[derive(Debug, Default)]
pub(super) struct Stop {
    stopped: std::sync::atomic::AtomicBool,
    waker: AtomicWaker,
}

impl Stop {
    /// Asks the short way to stop.
    pub(super) fn stop(&self) {
        self.stopped.store(true, std::sync::atomic::Ordering::Release);
        self.waker.wake();
    }

    fn is_stopped(&self) -> bool {
        self.stopped.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Resolves once [`stop`](Self::stop) was called.
    fn poll_stopped(&self, cx: &mut Context<'_>) -> Poll<()> {
        if self.is_stopped() {
            return Poll::Ready(());
        }
        self.waker.register(cx.waker());
        if self.is_stopped() { Poll::Ready(()) } else { Poll::Pending }
    }
}

/// How the short way ended.
pub(super) enum Outcome<S> {
    /// The client closed, or the server asked the connection to close.
    Done,
    /// Hyper takes over: the socket and the bytes read but not answered.
    Handoff(S, Bytes),
    /// Reading or writing failed.
    Failed(io::Error),
}

/// What the buffer holds.
enum Parsed<'b> {
    /// Not a whole head yet, and it may still become a simple request.
    Partial,
    /// Not for the short way.
    Other,
    /// A simple request whose head is `len` bytes long.
    Simple(usize, Simple<'b>),
}

/// Looks at the buffered bytes: a simple request, a partial one, or something else.
fn parse<'b>(buf: &'b [u8], headers: &'b mut [httparse::Header<'b>; MAX_HEADERS]) -> Parsed<'b> {
    // Early out for what can never be simple (HTTP/2's preface, other methods, a
    // leading empty line): no need to wait for the whole head.
    let prefix = &buf[..buf.len().min(5)];
    if !b"GET ".starts_with(&prefix[..prefix.len().min(4)]) && !b"HEAD ".starts_with(prefix) {
        return Parsed::Other;
    }
    let mut request = httparse::Request::new(headers);
    let len = match request.parse(buf) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Parsed::Partial,
        Err(_) => return Parsed::Other,
    };
    let head = match request.method {
        Some("GET") => false,
        Some("HEAD") => true,
        _ => return Parsed::Other,
    };
    let Some(target) = request.path.filter(|t| t.starts_with('/')) else { return Parsed::Other };
    if request.version != Some(1) {
        return Parsed::Other;
    }
    let mut host = None;
    for header in request.headers.iter() {
        let name = header.name;
        if name.eq_ignore_ascii_case("host") {
            if host.is_some() {
                return Parsed::Other;
            }
            let Ok(value) = std::str::from_utf8(header.value) else { return Parsed::Other };
            host = Some(value);
        } else if name.eq_ignore_ascii_case("connection") {
            if !header.value.eq_ignore_ascii_case(b"keep-alive") {
                return Parsed::Other;
            }
        } else if name.eq_ignore_ascii_case("content-length")
            || name.eq_ignore_ascii_case("transfer-encoding")
            || name.eq_ignore_ascii_case("expect")
            || name.eq_ignore_ascii_case("upgrade")
        {
            return Parsed::Other;
        }
    }
    let Some(host) = host else { return Parsed::Other };
    let headers: &'b [httparse::Header<'b>] = request.headers;
    Parsed::Simple(len, Simple { head, target, host, headers })
}

/// Serves `io`'s requests the short way while they are simple and `fast` answers
/// them; returns the socket and the unanswered bytes for hyper otherwise. Stops
/// between requests once `stop` is set (the connection's graceful close).
pub(super) async fn run<S, P>(mut io: S, fast: &P, info: ConnInfo, activity: &Activity, stop: &Stop) -> Outcome<S>
where
    S: AsyncRead + AsyncWrite + Unpin,
    P: FastPath,
{
    let mut buf = BytesMut::with_capacity(4096);
    loop {
        if !buf.is_empty() {
            let mut slots = [httparse::EMPTY_HEADER; MAX_HEADERS];
            let answered = match parse(&buf, &mut slots) {
                Parsed::Partial if buf.len() < MAX_HEAD => None,
                Parsed::Partial | Parsed::Other => return Outcome::Handoff(io, buf.freeze()),
                Parsed::Simple(len, request) => match fast.answer(&request, &info).await {
                    Some(answer) => Some((len, answer)),
                    None => return Outcome::Handoff(io, buf.freeze()),
                },
            };
            if let Some((len, answer)) = answered {
                if let Err(error) = write_all(&mut io, &answer.head, &answer.body).await {
                    return Outcome::Failed(error);
                }
                activity.served(Instant::now());
                buf.advance(len);
                if stop.is_stopped() {
                    return Outcome::Done;
                }
                // Pipelined requests already here are answered before reading more.
                continue;
            }
        }
        let read = tokio::select! {
            biased;
            read = io.read_buf(&mut buf) => read,
            () = std::future::poll_fn(|cx| stop.poll_stopped(cx)), if buf.is_empty() => return Outcome::Done,
        };
        match read {
            Ok(0) => return Outcome::Done,
            Ok(_) => {}
            Err(error) => return Outcome::Failed(error),
        }
    }
}

/// Writes `head` then `body`, vectored, and flushes.
async fn write_all<S: AsyncWrite + Unpin>(io: &mut S, head: &[u8], body: &[u8]) -> io::Result<()> {
    let (mut head, mut body) = (head, body);
    while !head.is_empty() || !body.is_empty() {
        let n = io.write_vectored(&[IoSlice::new(head), IoSlice::new(body)]).await?;
        if n == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        let from_head = n.min(head.len());
        head = &head[from_head..];
        body = &body[n - from_head..];
    }
    io.flush().await
}

/// A socket whose first reads return bytes already read from it.
#[derive(Debug)]
pub struct Rewound<S> {
    prefix: Bytes,
    inner: S,
}

impl<S> Rewound<S> {
    /// `inner`, whose reads first yield `prefix`.
    pub fn new(inner: S, prefix: Bytes) -> Self {
        Self { prefix, inner }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Rewound<S> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        if !self.prefix.is_empty() {
            let n = self.prefix.len().min(buf.remaining());
            let bytes = self.prefix.split_to(n);
            buf.put_slice(&bytes);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Rewound<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn simple(bytes: &[u8]) -> Option<(usize, bool, String, String, usize)> {
        let mut slots = [httparse::EMPTY_HEADER; MAX_HEADERS];
        match parse(bytes, &mut slots) {
            Parsed::Simple(len, r) => Some((len, r.head, r.target.to_string(), r.host.to_string(), r.headers.len())),
            _ => None,
        }
    }

    fn partial(bytes: &[u8]) -> bool {
        let mut slots = [httparse::EMPTY_HEADER; MAX_HEADERS];
        matches!(parse(bytes, &mut slots), Parsed::Partial)
    }

    #[test]
    fn simple_requests() {
        let req = b"GET /a?b=1 HTTP/1.1\r\nHost: x.test\r\nAccept: */*\r\n\r\n";
        assert_eq!(simple(req), Some((req.len(), false, "/a?b=1".into(), "x.test".into(), 2)));
        let req = b"HEAD / HTTP/1.1\r\nhost: x.test:80\r\nConnection: Keep-Alive\r\n\r\nGET /next";
        assert_eq!(simple(req), Some((req.len() - 9, true, "/".into(), "x.test:80".into(), 2)));
        // Every prefix of a simple head is partial, never "other".
        let req = b"GET / HTTP/1.1\r\nHost: x.test\r\n\r\n";
        for n in 1..req.len() {
            assert!(partial(&req[..n]), "{:?}", String::from_utf8_lossy(&req[..n]));
        }
    }

    #[test]
    fn anything_else_goes_the_full_way() {
        for req in [
            &b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"[..],
            b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n",
            b"\r\nGET / HTTP/1.1\r\nHost: x\r\n\r\n",
            b"GET / HTTP/1.0\r\nHost: x\r\n\r\n",
            b"GET http://x/ HTTP/1.1\r\nHost: x\r\n\r\n",
            b"GET * HTTP/1.1\r\nHost: x\r\n\r\n",
            b"GET / HTTP/1.1\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: x\r\nHost: y\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: x\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: x\r\nBad Name: y\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: x\r\n folded\r\n\r\n",
            b"get / HTTP/1.1\r\nHost: x\r\n\r\n",
        ] {
            assert!(simple(req).is_none() && !partial(req), "{:?}", String::from_utf8_lossy(req));
        }
        let many: String = (0..MAX_HEADERS).map(|i| format!("X-{i}: y\r\n")).collect();
        let req = format!("GET / HTTP/1.1\r\nHost: x\r\n{many}\r\n");
        assert!(simple(req.as_bytes()).is_none() && !partial(req.as_bytes()));
    }

    #[tokio::test]
    async fn rewound_replays_its_prefix_first() {
        let (mut client, server) = tokio::io::duplex(64);
        let mut rewound = Rewound::new(server, Bytes::from_static(b"hello "));
        client.write_all(b"world").await.unwrap();
        drop(client);
        let mut all = String::new();
        rewound.read_to_string(&mut all).await.unwrap();
        assert_eq!(all, "hello world");
    }
}
