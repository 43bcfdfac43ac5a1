//! DNS over UDP: several sockets bound to the same address with `SO_REUSEPORT`
//! (the kernel spreads clients over them by their address and port), each read
//! by its own thread with a [`Worker`]: the fast path, else the slow path.
//!
//! Blocking sockets with a short read timeout, so a thread notices the stop flag;
//! one datagram in, at most one out, no allocation on the fast path.

use std::{
    io,
    net::{IpAddr, SocketAddr, UdpSocket},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

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

/// Reads datagrams from `socket` and answers them until the stop flag is set.
fn serve(socket: &UdpSocket, mut worker: Worker, exit: &Exit) {
    let mut buffer = vec![0u8; MAX_DATAGRAM];
    let mut last_warning: Option<Instant> = None;
    let mut errors = 0u32;
    while !exit.stop.load(Ordering::Relaxed) {
        let (len, src) = match socket.recv_from(&mut buffer) {
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
        if !answerable(src) {
            debug!(%src, "cannot respond to this source address");
            continue;
        }
        let start = Instant::now();
        if let Some(response) = worker.handle(&buffer[..len], src, start)
            && let Err(error) = socket.send_to(response, src)
        {
            debug!(%error, peer = %src, "cannot send a dns response");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answerable_sources() {
        assert!(answerable("192.0.2.1:53".parse().unwrap()));
        assert!(answerable("[2001:db8::1]:5353".parse().unwrap()));
        assert!(!answerable("192.0.2.1:0".parse().unwrap()));
        assert!(!answerable("0.0.0.0:53".parse().unwrap()));
        assert!(!answerable("255.255.255.255:53".parse().unwrap()));
        assert!(!answerable("[::]:53".parse().unwrap()));
    }

    #[test]
    fn sockets_share_a_port() {
        let first = bind("127.0.0.1:0".parse().unwrap(), true).unwrap();
        let addr = first.local_addr().unwrap();
        let second = bind(addr, true).unwrap();
        assert_eq!(second.local_addr().unwrap(), addr);
        // Without SO_REUSEPORT the port is taken.
        assert!(bind(addr, false).is_err());
        assert_eq!(socket_count(3), 3);
        assert!(socket_count(0) >= 1);
    }
}
