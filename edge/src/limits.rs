//! Per-client limits: requests per second (GCRA, `governor`'s keyed limiter) and
//! open connections, per client address: an IPv4 address, or an IPv6 /64 (one
//! subscriber's network; an IPv4-mapped IPv6 address counts as its IPv4 address).
//!
//! A request over the rate is answered 429 with `Retry-After` (by the pipeline,
//! before any cache or origin work); a connection over the limit is closed at
//! accept (TCP) or refused (QUIC), before any TLS work. Both are counted in
//! `cdn_limited_total{kind="rate"|"connections"}`. Off unless configured.

use std::{
    collections::HashMap,
    net::{IpAddr, Ipv6Addr, SocketAddr},
    num::NonZeroU32,
    sync::{Arc, Mutex, PoisonError},
    time::Duration,
};

use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter, clock::Clock as _};
use prometheus::{IntCounter, IntCounterVec, Opts, Registry};
use tokio_util::sync::CancellationToken;

use crate::config::Limits;

/// How often idle clients' rate state is forgotten.
const FORGET_EVERY: Duration = Duration::from_secs(10);

/// The per-client limits of one edge.
pub(crate) struct ClientLimits {
    rate: Option<DefaultKeyedRateLimiter<IpAddr>>,
    connections: Option<(u32, Mutex<HashMap<IpAddr, u32>>)>,
    limited_rate: IntCounter,
    limited_connections: IntCounter,
}

/// The address limits are counted by: the IPv4 address, or the IPv6 /64.
pub(crate) fn client_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(Ipv6Addr::from(v6.to_bits() & !((1u128 << 64) - 1))),
        },
    }
}

impl ClientLimits {
    /// Registers `cdn_limited_total`; the limits when any is configured.
    pub(crate) fn new(limits: &Limits, registry: &Registry) -> Result<Option<Arc<Self>>, prometheus::Error> {
        let limited = IntCounterVec::new(
            Opts::new(
                "cdn_limited_total",
                "Client requests answered 429 (kind=rate) and connections refused (kind=connections) by the per-client limits",
            ),
            &["kind"],
        )?;
        registry.register(Box::new(limited.clone()))?;
        let rate = limits.client_rps.and_then(NonZeroU32::new).map(|rps| {
            let burst = limits.client_burst.and_then(NonZeroU32::new).unwrap_or(rps);
            RateLimiter::keyed(Quota::per_second(rps).allow_burst(burst))
        });
        let connections = limits.client_connections.filter(|n| *n > 0).map(|n| (n, Mutex::new(HashMap::new())));
        if rate.is_none() && connections.is_none() {
            return Ok(None);
        }
        Ok(Some(Arc::new(Self {
            rate,
            connections,
            limited_rate: limited.with_label_values(&["rate"]),
            limited_connections: limited.with_label_values(&["connections"]),
        })))
    }

    /// `Err(retry_after)` when `peer` is over its rate (counted).
    pub(crate) fn check_rate(&self, peer: IpAddr) -> Result<(), Duration> {
        let Some(rate) = &self.rate else { return Ok(()) };
        rate.check_key(&client_key(peer)).map_err(|not_until| {
            self.limited_rate.inc();
            not_until.wait_time_from(rate.clock().now())
        })
    }

    /// A slot for one more connection from `peer`, held while it is open; `None`
    /// when it has as many as allowed (counted).
    pub(crate) fn admit(self: &Arc<Self>, peer: IpAddr) -> Option<Slot> {
        let Some((max, open)) = &self.connections else { return Some(Slot(None)) };
        let key = client_key(peer);
        let mut open = open.lock().unwrap_or_else(PoisonError::into_inner);
        let count = open.entry(key).or_insert(0);
        if *count >= *max {
            drop(open);
            self.limited_connections.inc();
            return None;
        }
        *count += 1;
        Some(Slot(Some((self.clone(), key))))
    }

    /// The hook the TCP listeners call at accept.
    pub(crate) fn admission(self: &Arc<Self>) -> Option<cdn_node::listener::Admission> {
        self.connections.as_ref()?;
        let this = self.clone();
        Some(cdn_node::listener::Admission::new(move |peer: SocketAddr| {
            this.admit(peer.ip()).map(|slot| Box::new(slot) as Box<dyn Send + Sync>)
        }))
    }

    /// Forgets the rate state of clients that have been quiet (their bucket is
    /// full again), so memory follows the active clients, until `shutdown`.
    pub(crate) async fn forget_idle(self: Arc<Self>, shutdown: CancellationToken) {
        let mut tick = tokio::time::interval(FORGET_EVERY);
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                _ = tick.tick() => {}
            }
            if let Some(rate) = &self.rate {
                rate.retain_recent();
                rate.shrink_to_fit();
            }
        }
    }

    /// The clients with rate state (tests).
    #[cfg(test)]
    fn tracked(&self) -> usize {
        self.rate.as_ref().map_or(0, |r| r.len())
    }
}

/// One open connection of a client; frees its place when dropped.
pub(crate) struct Slot(Option<(Arc<ClientLimits>, IpAddr)>);

impl Drop for Slot {
    fn drop(&mut self) {
        let Some((limits, key)) = self.0.take() else { return };
        let Some((_, open)) = &limits.connections else { return };
        let mut open = open.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(count) = open.get_mut(&key) {
            *count = count.saturating_sub(1);
            if *count == 0 {
                open.remove(&key);
            }
        }
    }
}

/// `Retry-After` seconds for a wait: rounded up, at least 1.
pub(crate) fn retry_after(wait: Duration) -> u64 {
    let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
    secs.max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(rps: Option<u32>, burst: Option<u32>, connections: Option<u32>) -> Arc<ClientLimits> {
        let limits =
            Limits { client_rps: rps, client_burst: burst, client_connections: connections, ..Limits::default() };
        ClientLimits::new(&limits, &Registry::new()).unwrap().unwrap()
    }

    #[test]
    fn ipv6_counts_per_64() {
        let a: IpAddr = "2001:db8:1:2:aaaa::1".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2:ffff:1:2:3".parse().unwrap();
        let c: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        assert_eq!(client_key(a), client_key(b));
        assert_ne!(client_key(a), client_key(c));
        assert_eq!(client_key(a), "2001:db8:1:2::".parse::<IpAddr>().unwrap());
        let mapped: IpAddr = "::ffff:192.0.2.7".parse().unwrap();
        assert_eq!(client_key(mapped), "192.0.2.7".parse::<IpAddr>().unwrap());
        let v4: IpAddr = "192.0.2.7".parse().unwrap();
        assert_eq!(client_key(v4), v4);

        // One /64 shares one rate and one connection count.
        let limits = limits(Some(1), Some(2), Some(1));
        assert!(limits.check_rate(a).is_ok());
        assert!(limits.check_rate(b).is_ok());
        let wait = limits.check_rate(a).unwrap_err();
        assert!(wait > Duration::ZERO && wait <= Duration::from_secs(1), "{wait:?}");
        assert!(limits.check_rate(c).is_ok(), "another /64 is another client");
        let slot = limits.admit(a).unwrap();
        assert!(limits.admit(b).is_none(), "same /64: over the connection limit");
        assert!(limits.admit(c).is_some());
        drop(slot);
        assert!(limits.admit(b).is_some(), "the slot came back");
        assert_eq!(limits.limited_rate.get(), 1);
        assert_eq!(limits.limited_connections.get(), 1);
    }

    #[test]
    fn off_unless_configured_and_memory_bounded() {
        assert!(ClientLimits::new(&Limits::default(), &Registry::new()).unwrap().is_none());
        let limits = limits(Some(1000), None, None);
        for i in 0..=255u8 {
            limits.check_rate(IpAddr::from([10, 0, 0, i])).unwrap();
        }
        assert_eq!(limits.tracked(), 256);
        std::thread::sleep(Duration::from_millis(20));
        // 1000/s: every bucket refilled after 1 ms, so all of them are forgotten.
        limits.rate.as_ref().unwrap().retain_recent();
        assert_eq!(limits.tracked(), 0);
        // No connection limit: every connection is admitted.
        assert!((0..100).all(|_| limits.admit(IpAddr::from([10, 0, 0, 1])).is_some()));
    }

    /// The docker and swarm edges have per-client limits on, far above what their
    /// tests send from one address.
    #[test]
    fn deployed_edges_limit_clients_generously() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let mut checked = 0;
        for dir in ["deploy/config", "deploy/swarm"] {
            for region in ["us", "eu", "ap"] {
                for n in 1..=2 {
                    let path = root.join(format!("{dir}/{region}-{n}.toml"));
                    let text = std::fs::read_to_string(&path).unwrap();
                    // The [limits] table only (the swarm's read secrets from files).
                    let table: toml::Table = toml::from_str(&text).unwrap();
                    let limits: Limits = table["limits"].clone().try_into().unwrap();
                    assert!(limits.client_rps.is_some_and(|n| n >= 1000), "{}", path.display());
                    assert!(limits.client_burst.is_some_and(|n| n >= 1000), "{}", path.display());
                    assert!(limits.client_connections.is_some_and(|n| n >= 256), "{}", path.display());
                    checked += 1;
                }
            }
        }
        assert_eq!(checked, 12);
    }

    #[test]
    fn retry_after_rounds_up() {
        assert_eq!(retry_after(Duration::ZERO), 1);
        assert_eq!(retry_after(Duration::from_millis(200)), 1);
        assert_eq!(retry_after(Duration::from_millis(1200)), 2);
        assert_eq!(retry_after(Duration::from_secs(3)), 3);
    }
}
