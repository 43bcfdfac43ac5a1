//! Authenticated gossip.
//!
//! chitchat's transport hook hands over decoded envelopes, not bytes, and its wire
//! encoding is private; so authentication sits one step further out, as an
//! in-process UDP relay. chitchat talks plain UDP on a private loopback socket;
//! the relay owns the public gossip socket and, per peer, a loopback "pipe" socket:
//!
//! ```text
//! chitchat ──(pipe of peer P)──▶ relay ──[payload ‖ HMAC]──▶ P's public socket
//! chitchat ◀──(pipe of peer P)── relay ◀──[payload ‖ HMAC]── P
//! ```
//!
//! Every datagram on the public socket carries a truncated HMAC-SHA256 of its
//! payload under the cluster secret; one that does not verify is dropped and
//! counted, so an outsider can neither join, fake a node nor inject a purge.
//! (Replays of genuine datagrams are harmless: chitchat state is versioned.)
//!
//! The relay is also where tests make the network bad: a `PacketLoss` (feature
//! `test-util`) drops a share of the datagrams going out and coming in (up to all
//! of them, a partition).

use std::{
    collections::HashMap,
    net::{Ipv4Addr, SocketAddr},
    sync::{Arc, Mutex, PoisonError},
};
#[cfg(feature = "test-util")]
use std::{
    fmt,
    sync::atomic::{AtomicU32, AtomicU64, Ordering},
};

use anyhow::Context as _;
use async_trait::async_trait;
use chitchat::{
    ChitchatEnvelope,
    transport::{RecvOutcome, SendOutcome, Socket, Transport, UdpSocket as ChitchatSocket},
};
use prometheus::IntCounter;
use ring::hmac;
use tokio::net::UdpSocket;
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tracing::debug;

/// Bytes of the (truncated) HMAC-SHA256 tag appended to each datagram.
const TAG_LEN: usize = 16;
/// Largest UDP payload.
const MAX_DATAGRAM: usize = 65_507;

fn key(secret: &[u8]) -> hmac::Key {
    hmac::Key::new(hmac::HMAC_SHA256, secret)
}

/// Appends the tag of `payload` to it.
fn seal(key: &hmac::Key, payload: &mut Vec<u8>) {
    let tag = hmac::sign(key, payload);
    payload.extend_from_slice(&tag.as_ref()[..TAG_LEN]);
}

/// The payload of a datagram whose tag verifies, or `None`.
fn open<'a>(key: &hmac::Key, datagram: &'a [u8]) -> Option<&'a [u8]> {
    let split = datagram.len().checked_sub(TAG_LEN)?;
    let (payload, tag) = datagram.split_at(split);
    let expected = hmac::sign(key, payload);
    // Constant-time comparison of the truncated tags.
    let difference = expected.as_ref()[..TAG_LEN].iter().zip(tag).fold(0u8, |acc, (a, b)| acc | (a ^ b));
    (difference == 0).then_some(payload)
}

/// Deliberate loss of gossip datagrams, for tests of lossy networks and partitions.
///
/// Clones share one state, so a test keeps a clone and changes the loss while the
/// node runs. Decisions come from a seeded generator (splitmix64): the same seed
/// gives the same sequence of drops for the same sequence of datagrams.
#[doc(hidden)]
#[cfg(feature = "test-util")]
#[derive(Clone, Default)]
pub struct PacketLoss(Arc<LossState>);

#[cfg(feature = "test-util")]
#[derive(Default)]
struct LossState {
    /// Parts per million of outgoing datagrams dropped.
    outgoing: AtomicU32,
    /// Parts per million of incoming (authenticated) datagrams dropped.
    incoming: AtomicU32,
    rng: AtomicU64,
    dropped: AtomicU64,
}

#[cfg(feature = "test-util")]
impl PacketLoss {
    /// No loss yet; decisions drawn from `seed`.
    pub fn new(seed: u64) -> Self {
        let loss = Self::default();
        loss.0.rng.store(seed, Ordering::Relaxed);
        loss
    }

    /// Drops each outgoing datagram with probability `outgoing` and each incoming
    /// one with probability `incoming` (0.0 ..= 1.0; 1.0 both ways is a partition).
    pub fn set(&self, outgoing: f64, incoming: f64) {
        let ppm = |p: f64| (p.clamp(0.0, 1.0) * 1e6).round() as u32;
        self.0.outgoing.store(ppm(outgoing), Ordering::Relaxed);
        self.0.incoming.store(ppm(incoming), Ordering::Relaxed);
    }

    /// Datagrams dropped so far.
    pub fn dropped(&self) -> u64 {
        self.0.dropped.load(Ordering::Relaxed)
    }

    fn drop_outgoing(&self) -> bool {
        self.decide(self.0.outgoing.load(Ordering::Relaxed))
    }

    fn drop_incoming(&self) -> bool {
        self.decide(self.0.incoming.load(Ordering::Relaxed))
    }

    fn decide(&self, ppm: u32) -> bool {
        if ppm == 0 {
            return false;
        }
        // splitmix64: one atomic step of the state, then the output mix.
        let mut z = self.0.rng.fetch_add(0x9E37_79B9_7F4A_7C15, Ordering::Relaxed).wrapping_add(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        let dropped = z % 1_000_000 < u64::from(ppm);
        if dropped {
            self.0.dropped.fetch_add(1, Ordering::Relaxed);
        }
        dropped
    }
}

#[cfg(feature = "test-util")]
impl fmt::Debug for PacketLoss {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PacketLoss")
            .field("outgoing_ppm", &self.0.outgoing.load(Ordering::Relaxed))
            .field("incoming_ppm", &self.0.incoming.load(Ordering::Relaxed))
            .finish()
    }
}

/// Pipes by peer and peers by pipe address.
#[derive(Default)]
struct Pipes {
    by_peer: HashMap<SocketAddr, Arc<UdpSocket>>,
    by_pipe: HashMap<SocketAddr, SocketAddr>,
}

struct Relay {
    public: Arc<UdpSocket>,
    /// Where chitchat's private socket listens.
    inner: SocketAddr,
    key: hmac::Key,
    rejected: IntCounter,
    traffic: Traffic,
    pipes: Mutex<Pipes>,
    #[cfg(feature = "test-util")]
    loss: PacketLoss,
    shutdown: CancellationToken,
    tasks: TaskTracker,
}

impl Relay {
    /// The pipe for `peer`, made (with its forwarding task) on first use.
    async fn pipe(self: &Arc<Self>, peer: SocketAddr) -> std::io::Result<Arc<UdpSocket>> {
        if let Some(pipe) = self.pipes.lock().unwrap_or_else(PoisonError::into_inner).by_peer.get(&peer) {
            return Ok(pipe.clone());
        }
        let pipe = Arc::new(UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).await?);
        let pipe_addr = pipe.local_addr()?;
        {
            let mut pipes = self.pipes.lock().unwrap_or_else(PoisonError::into_inner);
            if let Some(existing) = pipes.by_peer.get(&peer) {
                return Ok(existing.clone());
            }
            pipes.by_peer.insert(peer, pipe.clone());
            pipes.by_pipe.insert(pipe_addr, peer);
        }
        let relay = self.clone();
        let outgoing = pipe.clone();
        self.tasks.spawn(async move {
            // chitchat → pipe → seal → peer.
            let mut buffer = vec![0u8; MAX_DATAGRAM];
            loop {
                let received = tokio::select! {
                    () = relay.shutdown.cancelled() => return,
                    received = outgoing.recv_from(&mut buffer) => received,
                };
                let Ok((len, from)) = received else { continue };
                if from != relay.inner {
                    continue;
                }
                #[cfg(feature = "test-util")]
                if relay.loss.drop_outgoing() {
                    continue;
                }
                let mut datagram = buffer[..len].to_vec();
                seal(&relay.key, &mut datagram);
                if datagram.len() > MAX_DATAGRAM {
                    debug!(len, %peer, "gossip datagram too large once sealed, dropped");
                    continue;
                }
                match relay.public.send_to(&datagram, peer).await {
                    Ok(sent) => relay.traffic.sent.inc_by(sent as u64),
                    Err(error) => debug!(%error, %peer, "gossip send failed"),
                }
            }
        });
        Ok(pipe)
    }

    /// peer → verify → pipe → chitchat.
    async fn incoming(self: Arc<Self>) {
        let mut buffer = vec![0u8; MAX_DATAGRAM];
        loop {
            let received = tokio::select! {
                () = self.shutdown.cancelled() => return,
                received = self.public.recv_from(&mut buffer) => received,
            };
            let (len, peer) = match received {
                Ok(received) => received,
                Err(error) => {
                    debug!(%error, "gossip recv failed");
                    continue;
                }
            };
            self.traffic.received.inc_by(len as u64);
            let Some(payload) = open(&self.key, &buffer[..len]) else {
                self.rejected.inc();
                debug!(from = %peer, len, "gossip datagram failed authentication, dropped");
                continue;
            };
            #[cfg(feature = "test-util")]
            if self.loss.drop_incoming() {
                continue;
            }
            match self.pipe(peer).await {
                Ok(pipe) => {
                    let _ = pipe.send_to(payload, self.inner).await;
                }
                Err(error) => debug!(%error, "no pipe for gossip peer"),
            }
        }
    }
}

/// Gossip bytes on the wire (sealed datagrams, as the network carries them).
#[derive(Clone)]
pub(crate) struct Traffic {
    /// Bytes of the datagrams sent to peers.
    pub(crate) sent: IntCounter,
    /// Bytes of the datagrams received, authentic or not.
    pub(crate) received: IntCounter,
}

/// A chitchat transport whose traffic goes through the authenticating relay.
pub(crate) struct AuthTransport {
    public: Mutex<Option<UdpSocket>>,
    key: hmac::Key,
    rejected: IntCounter,
    traffic: Traffic,
    #[cfg(feature = "test-util")]
    loss: PacketLoss,
    shutdown: CancellationToken,
    tasks: TaskTracker,
}

impl AuthTransport {
    /// `public` is the bound gossip socket peers send to; `loss` (feature
    /// `test-util`) drops datagrams on purpose (none unless a test sets it). The
    /// relay's tasks end with `shutdown` and are tracked in `tasks`.
    pub(crate) fn new(
        public: UdpSocket,
        secret: &[u8],
        rejected: IntCounter,
        traffic: Traffic,
        #[cfg(feature = "test-util")] loss: PacketLoss,
        shutdown: CancellationToken,
        tasks: TaskTracker,
    ) -> Self {
        Self {
            public: Mutex::new(Some(public)),
            key: key(secret),
            rejected,
            traffic,
            #[cfg(feature = "test-util")]
            loss,
            shutdown,
            tasks,
        }
    }
}

#[async_trait]
impl Transport for AuthTransport {
    async fn open(&self, _listen_addr: SocketAddr) -> anyhow::Result<Box<dyn Socket>> {
        let public = self
            .public
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
            .context("the gossip socket was already opened")?;
        let public_addr = public.local_addr()?;
        let inner = ChitchatSocket::open(SocketAddr::from((Ipv4Addr::LOCALHOST, 0))).await?;
        let relay = Arc::new(Relay {
            public: Arc::new(public),
            inner: inner.local_addr()?,
            key: self.key.clone(),
            rejected: self.rejected.clone(),
            traffic: self.traffic.clone(),
            pipes: Mutex::default(),
            #[cfg(feature = "test-util")]
            loss: self.loss.clone(),
            shutdown: self.shutdown.clone(),
            tasks: self.tasks.clone(),
        });
        self.tasks.spawn(relay.clone().incoming());
        Ok(Box::new(AuthSocket { inner, relay, public_addr }))
    }
}

struct AuthSocket {
    inner: ChitchatSocket,
    relay: Arc<Relay>,
    public_addr: SocketAddr,
}

#[async_trait]
impl Socket for AuthSocket {
    fn local_addr(&self) -> anyhow::Result<SocketAddr> {
        Ok(self.public_addr)
    }

    async fn send(&mut self, to: SocketAddr, envelope: ChitchatEnvelope) -> anyhow::Result<SendOutcome> {
        match self.relay.pipe(to).await {
            Ok(pipe) => self.inner.send(pipe.local_addr()?, envelope).await,
            Err(error) => {
                debug!(%error, %to, "no pipe for gossip peer");
                Ok(SendOutcome { num_bytes_sent: 0 })
            }
        }
    }

    async fn recv(&mut self) -> anyhow::Result<RecvOutcome> {
        loop {
            let mut outcome = self.inner.recv().await?;
            let peer = self
                .relay
                .pipes
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .by_pipe
                .get(&outcome.from_addr)
                .copied();
            if let Some(peer) = peer {
                outcome.from_addr = peer;
                return Ok(outcome);
            }
            // Not from one of our pipes: something local wrote to the private socket.
            self.relay.rejected.inc();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tags_verify_only_under_the_same_secret() {
        let (a, b) = (key(b"secret-one-secret-one"), key(b"secret-two-secret-two"));
        let mut datagram = b"hello gossip".to_vec();
        seal(&a, &mut datagram);
        assert_eq!(open(&a, &datagram), Some(&b"hello gossip"[..]));
        assert_eq!(open(&b, &datagram), None);
        let mut tampered = datagram.clone();
        tampered[0] ^= 1;
        assert_eq!(open(&a, &tampered), None);
        assert_eq!(open(&a, &datagram[..5]), None);
        assert_eq!(open(&a, &[]), None);
    }

    #[cfg(feature = "test-util")]
    #[test]
    fn loss_drops_about_the_share_asked_for_and_is_repeatable() {
        let count = |loss: &PacketLoss| (0..10_000).filter(|_| loss.drop_outgoing()).count();
        let loss = PacketLoss::new(7);
        assert_eq!(count(&loss), 0, "no loss until set");
        loss.set(0.25, 0.0);
        let dropped = count(&loss);
        assert!((2_200..2_800).contains(&dropped), "{dropped} of 10000 at 25%");
        assert_eq!(loss.dropped(), dropped as u64);
        assert!((0..1000).all(|_| !loss.drop_incoming()), "the other direction is untouched");
        let again = PacketLoss::new(7);
        again.set(0.25, 0.0);
        assert_eq!(count(&again), dropped, "same seed, same drops");
        loss.set(1.0, 1.0);
        assert!((0..1000).all(|_| loss.drop_outgoing() && loss.drop_incoming()), "a partition");
    }
}
