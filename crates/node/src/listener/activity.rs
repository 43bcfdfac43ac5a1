//! What one client connection is doing, so its driver can tell a quiet client from
//! an idle one, a slow origin from a client that stopped reading, and ordinary
//! cancellations from a rapid-reset flood.
//!
//! Every request holds a [`RequestGuard`] from the moment the server accepts it to
//! the moment its response body ends or is dropped. The guard tracks whether the
//! request is waiting on *us* (the handler is running, or the body is waiting on the
//! origin) or on the *client* (the body has data but the connection does not ask for
//! it: a full socket buffer, an exhausted HTTP/2 window). The connection's driver
//! asks [`Activity::verdict`] when to look again and what to do:
//!
//! - no request in flight for `idle_timeout`: close gracefully;
//! - a write to the socket blocked for `send_timeout` ([`Watched`]), or requests in
//!   flight, none waiting on us, and the connection asked for no response data for
//!   `send_timeout` (an HTTP/2 or HTTP/3 window the client never opens): the client
//!   stopped reading; drop the connection;
//! - more requests cancelled by the client than completed, past a floor: an HTTP/2
//!   rapid-reset or stream flood; drop the connection at once ([`Activity::abused`]).
//!
//! One uncontended mutex per connection; two lock/unlock pairs per request plus one
//! per body frame.

use std::{
    io,
    pin::Pin,
    sync::{
        Arc, Mutex, MutexGuard,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    task::{Context, Poll},
    time::{Duration, Instant},
};

use bytes::Bytes;
use hyper::body::{Body as _, Frame, SizeHint};
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    sync::Notify,
};

use super::{Body, BoxError};
use crate::zerocopy::Sink;

/// Cancelled requests a connection may have before the cancel ratio is checked.
pub const CANCEL_FLOOR: u64 = 100;

/// Per-connection accounting shared by the connection's requests and its driver.
#[derive(Debug)]
pub struct Activity {
    state: Mutex<State>,
    abuse: Notify,
    /// When the connection opened: the origin of `blocked`.
    opened: Instant,
    /// Milliseconds after `opened` (plus one) since which a socket write has been
    /// blocked; 0 when writes flow.
    blocked: AtomicU64,
    /// Milliseconds after `opened` (plus one) since which an HTTP/1 request head has
    /// been arriving (its first bytes came while no request was in progress), or since
    /// the connection opened until its first request; 0 otherwise.
    head: AtomicU64,
    /// The client speaks HTTP/2: its bytes between requests are frames, not heads.
    multiplexed: AtomicBool,
}

#[derive(Debug)]
struct State {
    /// Requests accepted whose response has not ended.
    in_flight: u32,
    /// Of those, the ones waiting on the server (handler or origin), not the client.
    on_us: u32,
    /// When `in_flight` last became zero (or the connection opened).
    idle_since: Instant,
    /// When the connection last took a response frame from us.
    progress: Instant,
    /// Responses delivered to their end.
    finished: u64,
    /// Requests the client abandoned before their response ended.
    cancelled: u64,
}

/// What the driver should do now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Nothing to do; look again at this instant.
    Fine(Instant),
    /// No request for the idle timeout: close gracefully.
    Idle,
    /// A request head took longer than the header timeout (slowloris), or the first
    /// request did not come within it: drop the connection.
    SlowHead,
    /// The client has taken nothing for the send timeout: drop the connection.
    Stalled,
}

impl Activity {
    pub fn new(now: Instant) -> Arc<Self> {
        Arc::new(Self {
            state: Mutex::new(State {
                in_flight: 0,
                on_us: 0,
                idle_since: now,
                progress: now,
                finished: 0,
                cancelled: 0,
            }),
            abuse: Notify::new(),
            opened: now,
            blocked: AtomicU64::new(0),
            head: AtomicU64::new(1),
            multiplexed: AtomicBool::new(false),
        })
    }

    /// Milliseconds after `opened`, plus one (0 stands for "none").
    fn stamp(&self, now: Instant) -> u64 {
        u64::try_from(now.saturating_duration_since(self.opened).as_millis()).unwrap_or(u64::MAX - 1) + 1
    }

    fn at(&self, stamp: u64) -> Option<Instant> {
        (stamp != 0).then(|| self.opened + Duration::from_millis(stamp - 1))
    }

    /// Bytes arrived from the client: between requests, they start a request head.
    fn received(&self) {
        if self.head.load(Ordering::Relaxed) != 0 || self.multiplexed.load(Ordering::Relaxed) {
            return;
        }
        let state = self.lock();
        if state.in_flight == 0 {
            self.head.store(self.stamp(Instant::now()), Ordering::Relaxed);
        }
    }

    /// The connection turned out to be HTTP/2 (its preface): no head timer.
    fn multiplexed(&self) {
        self.multiplexed.store(true, Ordering::Relaxed);
        self.head.store(0, Ordering::Relaxed);
    }

    /// A socket write returned `Pending` (`true`) or made progress.
    fn wrote(&self, pending: bool) {
        if !pending {
            if self.blocked.load(Ordering::Relaxed) != 0 {
                self.blocked.store(0, Ordering::Relaxed);
            }
        } else if self.blocked.load(Ordering::Relaxed) == 0 {
            let since = self.stamp(Instant::now());
            let _ = self.blocked.compare_exchange(0, since, Ordering::Relaxed, Ordering::Relaxed);
        }
    }

    /// Since when socket writes have been blocked, if they are.
    fn blocked_since(&self) -> Option<Instant> {
        self.at(self.blocked.load(Ordering::Relaxed))
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // The state is plain counters: a panic elsewhere cannot leave it torn.
        self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// A request arrived; the handler is about to run.
    pub fn start(self: &Arc<Self>) -> RequestGuard {
        let mut state = self.lock();
        state.in_flight += 1;
        state.on_us += 1;
        self.head.store(0, Ordering::Relaxed);
        RequestGuard { activity: self.clone(), phase: Phase::Handler }
    }

    /// A request answered whole at once (the listener's short way, `super::fast`):
    /// one finished request, the connection idle again from `now`.
    pub fn served(&self, now: Instant) {
        let mut state = self.lock();
        state.finished += 1;
        state.progress = now;
        if state.in_flight == 0 {
            state.idle_since = now;
        }
        self.head.store(0, Ordering::Relaxed);
    }

    /// Responses finished and requests cancelled so far.
    pub fn counts(&self) -> (u64, u64) {
        let state = self.lock();
        (state.finished, state.cancelled)
    }

    /// Resolves when the connection has cancelled more than it completed, past
    /// [`CANCEL_FLOOR`].
    pub async fn abused(&self) {
        loop {
            let notified = self.abuse.notified();
            if self.lock().abusive() {
                return;
            }
            notified.await;
        }
    }

    /// What the connection's driver should do at `now`. `head_timeout` bounds how
    /// long an HTTP/1 request head may take to arrive once it started, and the first
    /// request after the connection opened (`None`: no such limit, as for QUIC).
    pub fn verdict(
        &self,
        now: Instant,
        idle_timeout: Duration,
        send_timeout: Duration,
        head_timeout: Option<Duration>,
    ) -> Verdict {
        // A blocked socket write is the client's doing, whatever else is going on.
        let blocked = self.blocked_since().map(|since| since + send_timeout);
        if blocked.is_some_and(|deadline| now >= deadline) {
            return Verdict::Stalled;
        }
        let soonest = |deadline: Instant| Verdict::Fine(blocked.map_or(deadline, |b| b.min(deadline)));
        let state = self.lock();
        if state.in_flight == 0 {
            let idle = state.idle_since + idle_timeout;
            if now >= idle {
                return Verdict::Idle;
            }
            let head = head_timeout.zip(self.at(self.head.load(Ordering::Relaxed)));
            return match head.map(|(timeout, since)| since + timeout) {
                Some(head) if now >= head => Verdict::SlowHead,
                Some(head) => soonest(head.min(idle)),
                None => soonest(idle),
            };
        }
        if state.on_us > 0 {
            // Waiting on the origin or the handler: the client is not at fault.
            return soonest(now + send_timeout);
        }
        let deadline = state.progress + send_timeout;
        if now >= deadline { Verdict::Stalled } else { soonest(deadline) }
    }
}

impl State {
    fn abusive(&self) -> bool {
        self.cancelled >= CANCEL_FLOOR && self.cancelled > self.finished
    }

    fn end(&mut self, now: Instant) {
        self.in_flight -= 1;
        if self.in_flight == 0 {
            self.idle_since = now;
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// The handler is running (counted in `on_us`).
    Handler,
    /// The body is being sent; `true` while it waits on its source (counted in `on_us`).
    Body { waiting: bool },
    /// Accounted for.
    Done,
}

/// One request's hold on its connection's [`Activity`]; see the module docs.
#[derive(Debug)]
pub struct RequestGuard {
    activity: Arc<Activity>,
    phase: Phase,
}

impl RequestGuard {
    /// The handler returned a response; its body is about to be sent.
    pub fn responded(&mut self) {
        if self.phase == Phase::Handler {
            let now = Instant::now();
            let mut state = self.activity.lock();
            state.on_us -= 1;
            state.progress = now;
            self.phase = Phase::Body { waiting: false };
        }
    }

    /// The connection polled the body; `pending` when the body had nothing yet,
    /// `ended` when this poll delivered its end.
    pub fn polled(&mut self, pending: bool, ended: bool) {
        let Phase::Body { waiting } = self.phase else { return };
        let now = Instant::now();
        let mut state = self.activity.lock();
        state.progress = now;
        if pending != waiting {
            if pending {
                state.on_us += 1;
            } else {
                state.on_us -= 1;
            }
        }
        if ended {
            state.finished += 1;
            state.end(now);
            self.phase = Phase::Done;
        } else {
            self.phase = Phase::Body { waiting: pending };
        }
    }

    /// Marks the response delivered even though the body was never polled (an
    /// empty body hyper ends by itself).
    pub fn finish_if(&mut self, ended: bool) {
        if ended && matches!(self.phase, Phase::Body { .. }) {
            self.polled(false, true);
        }
    }
}

impl Drop for RequestGuard {
    fn drop(&mut self) {
        let on_us = match self.phase {
            Phase::Done => return,
            Phase::Handler | Phase::Body { waiting: true } => true,
            Phase::Body { waiting: false } => false,
        };
        let mut state = self.activity.lock();
        if on_us {
            state.on_us -= 1;
        }
        state.cancelled += 1;
        state.end(Instant::now());
        if state.abusive() {
            drop(state);
            self.activity.abuse.notify_one();
        }
    }
}

/// The largest data frame [`Tracked`] hands on: larger ones are split (without
/// copying) so that the connection asks for each piece and a client that stops
/// taking data shows as a body nobody polls.
const MAX_FRAME: usize = 256 * 1024;

/// A response body that reports its progress to its connection's activity.
pub struct Tracked {
    inner: Body,
    guard: RequestGuard,
    /// What is left of a large data frame.
    rest: Bytes,
    /// The body's length when the response announced it (`Content-Length`): HTTP/1
    /// stops polling a body once that many bytes went out, so reaching it is the end.
    expected: Option<u64>,
    /// Data bytes handed on so far.
    sent: u64,
}

impl Tracked {
    /// `inner`, reporting to `guard`'s connection; `expected` is the length the
    /// response announced, if it did.
    pub fn new(inner: Body, mut guard: RequestGuard, expected: Option<u64>) -> Self {
        guard.finish_if(inner.is_end_stream() || expected == Some(0));
        Self { inner, guard, rest: Bytes::new(), expected, sent: 0 }
    }

    /// Whether everything has been handed on.
    fn done(&self) -> bool {
        self.rest.is_empty() && (self.inner.is_end_stream() || self.expected.is_some_and(|len| self.sent >= len))
    }

    /// The next piece of at most [`MAX_FRAME`] bytes of `data`, keeping the rest.
    fn piece(&mut self, mut data: Bytes) -> Bytes {
        if data.len() > MAX_FRAME {
            self.rest = data.split_off(MAX_FRAME);
        }
        self.sent += data.len() as u64;
        data
    }
}

impl hyper::body::Body for Tracked {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        if !this.rest.is_empty() {
            let rest = std::mem::take(&mut this.rest);
            let piece = this.piece(rest);
            let ended = this.done();
            this.guard.polled(false, ended);
            return Poll::Ready(Some(Ok(Frame::data(piece))));
        }
        let poll = match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => match frame.into_data() {
                Ok(data) => Poll::Ready(Some(Ok(Frame::data(this.piece(data))))),
                Err(frame) => Poll::Ready(Some(Ok(frame))),
            },
            other => other,
        };
        let ended = match &poll {
            Poll::Pending => false,
            Poll::Ready(None | Some(Err(_))) => true,
            Poll::Ready(Some(Ok(_))) => this.done(),
        };
        this.guard.polled(poll.is_pending(), ended);
        poll
    }

    fn is_end_stream(&self) -> bool {
        self.rest.is_empty() && self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        let inner = self.inner.size_hint();
        let rest = self.rest.len() as u64;
        let mut hint = SizeHint::new();
        hint.set_lower(inner.lower() + rest);
        if let Some(upper) = inner.upper() {
            hint.set_upper(upper + rest);
        }
        hint
    }
}

/// A connection's socket (TCP or TLS) that tells its [`Activity`] when writes block:
/// a client that stops reading shows as a write that stays `Pending`.
#[derive(Debug)]
pub struct Watched<S> {
    inner: S,
    activity: Arc<Activity>,
    /// The first bytes were looked at (HTTP/1 or the HTTP/2 preface).
    sniffed: bool,
}

impl<S> Watched<S> {
    /// `inner`, reporting to `activity`.
    pub fn new(inner: S, activity: Arc<Activity>) -> Self {
        Self { inner, activity, sniffed: false }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Watched<S> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let poll = Pin::new(&mut self.inner).poll_read(cx, buf);
        let read = &buf.filled()[before..];
        if !read.is_empty() {
            if !self.sniffed {
                self.sniffed = true;
                // The HTTP/2 connection preface (RFC 9113 §3.4); no HTTP/1 method is PRI.
                if read.starts_with(b"PRI") {
                    self.activity.multiplexed();
                }
            }
            self.activity.received();
        }
        poll
    }
}

impl<S: AsyncWrite + Sink + Unpin> AsyncWrite for Watched<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let poll = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.activity.wrote(poll.is_pending());
        poll
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let poll = match self.inner.poll_write_zero_copy(cx, bufs) {
            Some(poll) => poll,
            None => Pin::new(&mut self.inner).poll_write_vectored(cx, bufs),
        };
        self.activity.wrote(poll.is_pending());
        poll
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let poll = Pin::new(&mut self.inner).poll_flush(cx);
        self.activity.wrote(poll.is_pending());
        poll
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Why the server closed a connection (the `reason` label of its counter).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// No request for the idle timeout.
    Idle,
    /// The client took no response data for the send timeout.
    Stalled,
    /// The client cancelled more requests than it completed (rapid reset).
    Cancels,
    /// A request head (or the first request) took longer than the header timeout.
    HeaderTimeout,
}

impl Reason {
    const ALL: [Self; 4] = [Self::Idle, Self::Stalled, Self::Cancels, Self::HeaderTimeout];

    /// The label value.
    pub fn label(self) -> &'static str {
        match self {
            Self::Idle => "idle",
            Self::Stalled => "stalled",
            Self::Cancels => "cancels",
            Self::HeaderTimeout => "header_timeout",
        }
    }
}

/// Counters of connections the server closed, by [`Reason`].
#[derive(Debug, Clone)]
pub struct Closed([prometheus::IntCounter; 4]);

impl Closed {
    /// The counters of `protocol` in a vector labelled `(protocol, reason)`.
    pub fn of(vec: &prometheus::IntCounterVec, protocol: &str) -> Self {
        Self(Reason::ALL.map(|reason| vec.with_label_values(&[protocol, reason.label()])))
    }

    /// Counts one connection closed for `reason`.
    pub fn count(&self, reason: Reason) {
        self.0[reason as usize].inc();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const IDLE: Duration = Duration::from_secs(60);
    const SEND: Duration = Duration::from_secs(30);

    #[test]
    fn each_close_counts_under_its_own_reason() {
        let vec =
            prometheus::IntCounterVec::new(prometheus::Opts::new("closed", "closed"), &["protocol", "reason"]).unwrap();
        let closed = Closed::of(&vec, "tcp");
        for reason in Reason::ALL {
            closed.count(reason);
            assert_eq!(vec.with_label_values(&["tcp", reason.label()]).get(), 1, "{reason:?}");
        }
    }

    #[test]
    fn an_idle_connection_is_closed_after_the_idle_timeout() {
        let t0 = Instant::now();
        let activity = Activity::new(t0);
        assert_eq!(activity.verdict(t0, IDLE, SEND, None), Verdict::Fine(t0 + IDLE));
        assert_eq!(activity.verdict(t0 + IDLE, IDLE, SEND, None), Verdict::Idle);
    }

    #[test]
    fn heads_are_timed_from_their_first_byte_and_keep_alive_from_the_last_response() {
        const HEAD: Duration = Duration::from_secs(10);
        let t0 = Instant::now();
        let activity = Activity::new(t0);
        // The first request must come within the header timeout.
        assert_eq!(activity.verdict(t0, IDLE, SEND, Some(HEAD)), Verdict::Fine(t0 + HEAD));
        assert_eq!(activity.verdict(t0 + HEAD, IDLE, SEND, Some(HEAD)), Verdict::SlowHead);
        // Between requests only the idle timeout counts, until bytes of a head arrive.
        let mut guard = activity.start();
        guard.responded();
        drop(guard);
        assert!(
            matches!(activity.verdict(Instant::now(), IDLE, SEND, Some(HEAD)), Verdict::Fine(at) if at > t0 + HEAD)
        );
        activity.received();
        let started = Instant::now();
        match activity.verdict(started, IDLE, SEND, Some(HEAD)) {
            Verdict::Fine(at) => assert!(at <= started + HEAD),
            other => panic!("{other:?}"),
        }
        assert_eq!(activity.verdict(started + HEAD + HEAD, IDLE, SEND, Some(HEAD)), Verdict::SlowHead);
        // HTTP/2: frames between requests are not heads.
        let h2 = Activity::new(t0);
        h2.multiplexed();
        h2.received();
        assert_eq!(h2.verdict(t0 + HEAD, IDLE, SEND, Some(HEAD)), Verdict::Fine(t0 + IDLE));
    }

    #[test]
    fn a_slow_handler_or_origin_is_not_the_clients_fault() {
        let t0 = Instant::now();
        let activity = Activity::new(t0);
        let mut guard = activity.start();
        assert!(matches!(activity.verdict(t0 + IDLE * 10, IDLE, SEND, None), Verdict::Fine(_)));
        guard.responded();
        guard.polled(true, false);
        assert!(matches!(activity.verdict(Instant::now() + SEND * 10, IDLE, SEND, None), Verdict::Fine(_)));
        guard.polled(false, false);
        // Data handed over, and the client takes nothing more.
        assert_eq!(activity.verdict(Instant::now() + SEND * 2, IDLE, SEND, None), Verdict::Stalled);
        guard.polled(false, true);
        assert!(matches!(activity.verdict(Instant::now(), IDLE, SEND, None), Verdict::Fine(_)));
        assert_eq!(activity.counts(), (1, 0));
    }

    #[test]
    fn a_write_blocked_past_the_send_timeout_is_a_stall_even_when_idle() {
        let t0 = Instant::now();
        let activity = Activity::new(t0);
        activity.wrote(true);
        let verdict = activity.verdict(Instant::now(), IDLE, SEND, None);
        assert!(matches!(verdict, Verdict::Fine(at) if at <= Instant::now() + SEND));
        assert_eq!(activity.verdict(Instant::now() + SEND, IDLE, SEND, None), Verdict::Stalled);
        activity.wrote(false);
        assert_eq!(activity.verdict(Instant::now() + SEND, IDLE, SEND, None), Verdict::Fine(t0 + IDLE));
    }

    #[test]
    fn a_dropped_request_counts_as_cancelled_and_ends_the_flight() {
        let activity = Activity::new(Instant::now());
        drop(activity.start());
        let mut body = activity.start();
        body.responded();
        drop(body);
        let mut empty = activity.start();
        empty.responded();
        empty.finish_if(true);
        drop(empty);
        assert_eq!(activity.counts(), (1, 2));
        let state = activity.lock();
        assert_eq!((state.in_flight, state.on_us), (0, 0));
    }

    #[tokio::test]
    async fn more_cancelled_than_finished_past_the_floor_is_abuse() {
        let activity = Activity::new(Instant::now());
        for _ in 0..CANCEL_FLOOR {
            let mut guard = activity.start();
            guard.responded();
            guard.polled(false, true);
        }
        for _ in 0..CANCEL_FLOOR {
            drop(activity.start());
        }
        // As many cancelled as finished: still fine.
        let waited = tokio::time::timeout(Duration::from_millis(50), activity.abused()).await;
        assert!(waited.is_err());
        let waiter = tokio::spawn({
            let activity = activity.clone();
            async move { activity.abused().await }
        });
        drop(activity.start());
        tokio::time::timeout(Duration::from_secs(5), waiter).await.unwrap().unwrap();
    }
}
