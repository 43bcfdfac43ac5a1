//! DNS over UDP: several sockets bound to the same address with `SO_REUSEPORT`
//! (the kernel spreads clients over them by their address and port), each read
//! by its own thread with a [`Worker`]: the fast path, else the slow path.
//!
//! Blocking sockets with a short read timeout, so a thread notices the stop flag.
//! Datagrams come in batches: `recvmmsg` waits for the first and takes whatever
//! else is queued (up to [`BATCH`]), the worker answers each in turn, and one
//! `sendmmsg` sends the answers. One clock read when a batch arrives (the rate
//! limit's and the durations' start) and one after it is answered (the fast-path
//! answers' duration); no allocation on the fast path (the buffers are the
//! thread's, allocated once).

use std::{
    io::{self, IoSlice, IoSliceMut},
    net::{IpAddr, SocketAddr, SocketAddrV4, SocketAddrV6, UdpSocket},
    os::fd::AsRawFd,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use nix::sys::socket::{MsgFlags, MultiHeaders, SockaddrStorage, recvmmsg};
use rustix::net::{MMsgHdr, SendAncillaryBuffer, SendFlags, SocketAddrAny, addr::SocketAddrArg, sendmmsg};
use socket2::{Domain, Protocol, Socket, Type};
use tokio::sync::mpsc;
use tracing::{debug, warn};

use crate::{
    fast::{MAX_DATAGRAM, Worker},
    handler::Shared,
};

/// How often a blocked read wakes to check the stop flag.
const READ_TIMEOUT: Duration = Duration::from_millis(100);
/// Reads failing in a row after which a socket counts as broken (its thread ends
/// and the role stops).
const MAX_ERRORS: u32 = 10_000;
/// The receive buffer asked for (the kernel caps it at `net.core.rmem_max`).
const RECV_BUFFER: usize = 4 << 20;
/// Datagrams read, and answers sent, per system call at most.
pub(crate) const BATCH: usize = 32;

/// Binds one UDP socket on `addr` (with `SO_REUSEPORT` when `shared`, so that
/// more can join it).
pub(crate) fn bind(addr: SocketAddr, shared: bool) -> io::Result<UdpSocket> {
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    if shared {
        socket.set_reuse_port(true)?;
    }
    // Best effort: a larger buffer rides out bursts.
    let _ = socket.set_recv_buffer_size(RECV_BUFFER);
    socket.bind(&addr.into())?;
    socket.set_read_timeout(Some(READ_TIMEOUT))?;
    Ok(socket.into())
}

/// The number of UDP sockets for a `udp_sockets` setting (0: one per core).
pub(crate) fn socket_count(configured: usize) -> usize {
    if configured > 0 { configured } else { std::thread::available_parallelism().map_or(1, std::num::NonZero::get) }
}

/// Whether a response may be sent to `src` (as hickory-server: not port 0, not
/// an unspecified or broadcast address).
fn answerable(src: SocketAddr) -> bool {
    src.port() != 0
        && match src.ip() {
            IpAddr::V4(v4) => !v4.is_unspecified() && !v4.is_broadcast(),
            IpAddr::V6(v6) => !v6.is_unspecified(),
        }
}

/// The threads serving the UDP sockets.
#[derive(Debug)]
pub(crate) struct Servers {
    stop: Arc<AtomicBool>,
    ended: mpsc::UnboundedReceiver<(usize, Result<(), String>)>,
    running: usize,
}

/// Tells the serving threads to stop when dropped.
#[derive(Debug)]
pub(crate) struct StopOnDrop(Arc<AtomicBool>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// Reports a thread's end (a panic included) when dropped.
struct Exit {
    index: usize,
    stop: Arc<AtomicBool>,
    ended: mpsc::UnboundedSender<(usize, Result<(), String>)>,
}

impl Drop for Exit {
    fn drop(&mut self) {
        let result = if std::thread::panicking() {
            Err("panicked".to_string())
        } else if self.stop.load(Ordering::Relaxed) {
            Ok(())
        } else {
            Err("stopped reading".to_string())
        };
        let _ = self.ended.send((self.index, result));
    }
}

impl Servers {
    /// Starts one thread per socket.
    pub(crate) fn spawn(sockets: Vec<UdpSocket>, shared: &Arc<Shared>) -> io::Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let (tx, ended) = mpsc::unbounded_channel();
        let mut running = 0;
        for (index, socket) in sockets.into_iter().enumerate() {
            let exit = Exit { index, stop: stop.clone(), ended: tx.clone() };
            let shared = shared.clone();
            let spawned = std::thread::Builder::new()
                .name(format!("geo-udp-{index}"))
                .spawn(move || serve(&socket, Worker::new(shared, index), &exit));
            if let Err(error) = spawned {
                stop.store(true, Ordering::Relaxed);
                return Err(error);
            }
            running += 1;
        }
        Ok(Self { stop, ended, running })
    }

    /// A guard that stops the threads when dropped (also when the task holding it
    /// unwinds).
    pub(crate) fn stop_on_drop(&self) -> StopOnDrop {
        StopOnDrop(self.stop.clone())
    }

    /// Waits until a thread ends on its own (it failed): which, and why.
    pub(crate) async fn failed(&mut self) -> String {
        match self.ended.recv().await {
            Some((index, Err(reason))) => format!("udp socket {index}: {reason}"),
            Some((index, Ok(()))) => format!("udp socket {index} stopped"),
            None => "udp sockets closed".to_string(),
        }
    }

    /// Stops the threads and waits for them (at most one read timeout).
    pub(crate) async fn stop(mut self) {
        self.stop.store(true, Ordering::Relaxed);
        while self.running > 0 && self.ended.recv().await.is_some() {
            self.running -= 1;
        }
    }
}

/// The datagrams of one `recvmmsg`, into buffers allocated once.
struct Inbox {
    headers: MultiHeaders<SockaddrStorage>,
    /// [`BATCH`] buffers of [`MAX_DATAGRAM`] bytes, one after the other.
    buffers: Vec<u8>,
    /// Each datagram's length and source (`None`: not an IP address).
    received: Vec<(usize, Option<SocketAddr>)>,
}

impl Inbox {
    fn new() -> Self {
        Self {
            headers: MultiHeaders::preallocate(BATCH, None),
            buffers: vec![0; BATCH * MAX_DATAGRAM],
            received: Vec::with_capacity(BATCH),
        }
    }

    /// Waits for a datagram on `socket` (up to its read timeout), then takes the
    /// others already queued, [`BATCH`] at most: how many.
    fn receive(&mut self, socket: &UdpSocket) -> io::Result<usize> {
        self.received.clear();
        let mut chunks = self.buffers.chunks_exact_mut(MAX_DATAGRAM);
        let mut slices: [[IoSliceMut<'_>; 1]; BATCH] =
            std::array::from_fn(|_| [IoSliceMut::new(chunks.next().unwrap_or_default())]);
        // Longer datagrams are cut, as `recv_from` cuts them. The headers keep the
        // address length the kernel wrote last time: one socket, one family, so
        // it fits.
        let results =
            recvmmsg(socket.as_raw_fd(), &mut self.headers, slices.iter_mut(), MsgFlags::MSG_WAITFORONE, None)
                .map_err(io::Error::from)?;
        for message in results {
            self.received.push((message.bytes, message.address.as_ref().and_then(socket_addr)));
        }
        Ok(self.received.len())
    }

    /// The `index`th datagram received, and its source.
    fn datagram(&self, index: usize) -> Option<(&[u8], Option<SocketAddr>)> {
        let &(len, src) = self.received.get(index)?;
        let packet = self.buffers.chunks_exact(MAX_DATAGRAM).nth(index)?.get(..len)?;
        Some((packet, src))
    }
}

/// A source address as std has it.
fn socket_addr(addr: &SockaddrStorage) -> Option<SocketAddr> {
    if let Some(v4) = addr.as_sockaddr_in() {
        return Some(SocketAddrV4::from(*v4).into());
    }
    addr.as_sockaddr_in6().map(|v6| SocketAddrV6::from(*v6).into())
}

/// The answers to one batch, for one `sendmmsg`, in buffers allocated once.
struct Outbox {
    /// [`BATCH`] buffers; the first `peers.len()` hold answers.
    answers: Vec<Vec<u8>>,
    /// Where each answer goes (the same as `peers`, as the system call takes it).
    targets: Vec<SocketAddrAny>,
    peers: Vec<SocketAddr>,
}

impl Outbox {
    fn new() -> Self {
        Self {
            answers: (0..BATCH).map(|_| Vec::with_capacity(MAX_DATAGRAM)).collect(),
            targets: Vec::with_capacity(BATCH),
            peers: Vec::with_capacity(BATCH),
        }
    }

    /// Queues `answer` to `peer` (at most [`BATCH`]: one per datagram received).
    fn push(&mut self, answer: &[u8], peer: SocketAddr) {
        let Some(buffer) = self.answers.get_mut(self.peers.len()) else { return };
        buffer.clear();
        buffer.extend_from_slice(answer);
        self.targets.push(peer.as_any());
        self.peers.push(peer);
    }

    /// Sends the queued answers on `socket`: one `sendmmsg` unless one fails (it is
    /// then logged and skipped, and the rest sent on).
    fn send(&mut self, socket: &UdpSocket) {
        let count = self.peers.len();
        if count == 0 {
            return;
        }
        let iovs: [IoSlice<'_>; BATCH] =
            std::array::from_fn(|i| IoSlice::new(self.answers.get(i).map_or(&[][..], Vec::as_slice)));
        let mut controls: [SendAncillaryBuffer<'_, '_, '_>; BATCH] =
            std::array::from_fn(|_| SendAncillaryBuffer::default());
        let mut targets = self.targets.iter();
        let mut iov = iovs.iter();
        let mut messages = controls.each_mut().map(|control| {
            let iov = iov.next().map_or(&[][..], std::slice::from_ref);
            match targets.next() {
                Some(target) => MMsgHdr::new_with_addr(target, iov, control),
                None => MMsgHdr::new(&[], control),
            }
        });
        let mut at = 0;
        while at < count {
            let Some(pending) = messages.get_mut(at..count) else { break };
            match sendmmsg(socket, pending, SendFlags::empty()) {
                Ok(sent) if sent > 0 => at += sent,
                result => {
                    // The first pending answer failed (the kernel reports an error
                    // after the answers it sent, on the next call): skip it.
                    let error = match result {
                        Ok(_) => io::Error::other("nothing sent"),
                        Err(errno) => io::Error::from(errno),
                    };
                    if let Some(peer) = self.peers.get(at) {
                        debug!(%error, %peer, "cannot send a dns response");
                    }
                    at += 1;
                }
            }
        }
        self.targets.clear();
        self.peers.clear();
    }
}

/// Reads datagrams from `socket` and answers them until the stop flag is set.
fn serve(socket: &UdpSocket, mut worker: Worker, exit: &Exit) {
    let mut inbox = Inbox::new();
    let mut outbox = Outbox::new();
    let mut last_warning: Option<Instant> = None;
    let mut errors = 0u32;
    while !exit.stop.load(Ordering::Relaxed) {
        let received = match inbox.receive(socket) {
            Ok(received) => {
                errors = 0;
                received
            }
            Err(error) if matches!(error.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => continue,
            Err(error) if error.kind() == io::ErrorKind::Interrupted => continue,
            Err(error) => {
                // ICMP errors reported on the socket and the like: keep reading,
                // unless the socket only fails any more.
                if last_warning.is_none_or(|at| at.elapsed() > Duration::from_secs(5)) {
                    warn!(%error, "error receiving on a udp socket");
                    last_warning = Some(Instant::now());
                }
                errors += 1;
                if errors >= MAX_ERRORS {
                    return;
                }
                continue;
            }
        };
        let start = Instant::now();
        for index in 0..received {
            let Some((packet, src)) = inbox.datagram(index) else { continue };
            let Some(src) = src.filter(|src| answerable(*src)) else {
                debug!(?src, "cannot respond to this source address");
                continue;
            };
            if let Some(response) = worker.handle(packet, src, start) {
                outbox.push(response, src);
            }
        }
        worker.observe(start);
        outbox.send(socket);
    }
}

#[cfg(test)]
mod tests;
