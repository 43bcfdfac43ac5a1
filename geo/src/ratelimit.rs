//! Response-rate limiting for UDP: a token bucket per client network (/24 for
//! IPv4, /56 for IPv6), so the server cannot be turned into an amplifier against a
//! spoofed victim. Over the limit a response is dropped, except every `slip`-th,
//! which goes out truncated (empty, TC set): a real client behind the network then
//! retries over TCP, which cannot be spoofed.
//!
//! Pure: the caller passes `now`.

use std::{
    collections::HashMap,
    net::IpAddr,
    time::{Duration, Instant},
};

use ipnet::IpNet;

/// What to do with one response.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// Under the limit: answer.
    Answer,
    /// Over the limit: send an empty truncated response.
    Slip,
    /// Over the limit: send nothing.
    Drop,
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    last: Instant,
    limited: u32,
}

/// Token buckets per client network.
#[derive(Debug)]
pub(crate) struct RateLimiter {
    rate: f64,
    burst: f64,
    slip: u32,
    max_entries: usize,
    buckets: HashMap<IpNet, Bucket>,
    last_prune: Option<Instant>,
}

/// The network a client address is limited as.
pub(crate) fn client_network(addr: IpAddr) -> IpNet {
    let addr = addr.to_canonical();
    let prefix = if addr.is_ipv4() { 24 } else { 56 };
    IpNet::new(addr, prefix).map(|net| net.trunc()).unwrap_or_else(|_| IpNet::from(addr))
}

impl RateLimiter {
    /// `rate` responses per second per network (bursts up to one second's worth),
    /// every `slip`-th limited response truncated (0: drop all), tracking at most
    /// `max_entries` networks (beyond that, new networks are not limited).
    pub(crate) fn new(rate: u32, slip: u32, max_entries: usize) -> Self {
        let rate = f64::from(rate.max(1));
        Self { rate, burst: rate.max(1.0), slip, max_entries, buckets: HashMap::new(), last_prune: None }
    }

    /// Decides one response to `addr` at `now`.
    pub(crate) fn check(&mut self, addr: IpAddr, now: Instant) -> Verdict {
        let key = client_network(addr);
        if !self.buckets.contains_key(&key) && self.buckets.len() >= self.max_entries {
            self.prune(now);
            if self.buckets.len() >= self.max_entries {
                return Verdict::Answer;
            }
        }
        let (rate, burst) = (self.rate, self.burst);
        let bucket = self.buckets.entry(key).or_insert(Bucket { tokens: burst, last: now, limited: 0 });
        let elapsed = now.saturating_duration_since(bucket.last).as_secs_f64();
        bucket.tokens = (bucket.tokens + elapsed * rate).min(burst);
        bucket.last = now;
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            bucket.limited = 0;
            return Verdict::Answer;
        }
        bucket.limited = bucket.limited.wrapping_add(1);
        if self.slip > 0 && bucket.limited.is_multiple_of(self.slip) { Verdict::Slip } else { Verdict::Drop }
    }

    /// Forgets networks whose bucket has refilled (they are as good as new); at most
    /// once a second, so a flood of new networks cannot make every check scan.
    fn prune(&mut self, now: Instant) {
        if self.last_prune.is_some_and(|last| now.saturating_duration_since(last) < Duration::from_secs(1)) {
            return;
        }
        self.last_prune = Some(now);
        let (rate, burst) = (self.rate, self.burst);
        self.buckets.retain(|_, bucket| {
            bucket.tokens + now.saturating_duration_since(bucket.last).as_secs_f64() * rate < burst
        });
    }

    /// How many networks are tracked.
    #[cfg(test)]
    fn tracked(&self) -> usize {
        self.buckets.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(addr: &str) -> IpAddr {
        addr.parse().unwrap()
    }

    #[test]
    fn networks() {
        assert_eq!(client_network(ip("192.0.2.77")), "192.0.2.0/24".parse::<IpNet>().unwrap());
        assert_eq!(client_network(ip("::ffff:192.0.2.77")), "192.0.2.0/24".parse::<IpNet>().unwrap());
        assert_eq!(client_network(ip("2001:db8:1:2ff::1")), "2001:db8:1:200::/56".parse::<IpNet>().unwrap());
    }

    #[test]
    fn limits_per_network_with_slip_and_refill() {
        let start = Instant::now();
        let mut limiter = RateLimiter::new(10, 2, 1000);
        let verdicts: Vec<_> = (0..14).map(|_| limiter.check(ip("192.0.2.1"), start)).collect();
        assert!(verdicts[..10].iter().all(|v| *v == Verdict::Answer), "{verdicts:?}");
        assert_eq!(&verdicts[10..], [Verdict::Drop, Verdict::Slip, Verdict::Drop, Verdict::Slip]);
        // The same /24 shares the bucket; another network has its own.
        assert_eq!(limiter.check(ip("192.0.2.200"), start), Verdict::Drop);
        assert_eq!(limiter.check(ip("192.0.3.1"), start), Verdict::Answer);
        // Tokens come back at `rate` per second.
        let later = start + Duration::from_millis(200);
        assert_eq!(limiter.check(ip("192.0.2.1"), later), Verdict::Answer);
        assert_eq!(limiter.check(ip("192.0.2.1"), later), Verdict::Answer);
        assert_ne!(limiter.check(ip("192.0.2.1"), later), Verdict::Answer);
        // A clock that goes backwards refills nothing and does not panic.
        assert_ne!(limiter.check(ip("192.0.2.1"), start), Verdict::Answer);
        let mut no_slip = RateLimiter::new(1, 0, 10);
        assert_eq!(no_slip.check(ip("192.0.2.1"), start), Verdict::Answer);
        assert!((0..10).all(|_| no_slip.check(ip("192.0.2.1"), start) == Verdict::Drop));
    }

    #[test]
    fn table_is_bounded() {
        let start = Instant::now();
        let mut limiter = RateLimiter::new(5, 2, 100);
        for i in 0..300u32 {
            let addr = IpAddr::from((0x0A00_0000u32 + (i << 8)).to_be_bytes());
            assert_eq!(limiter.check(addr, start), Verdict::Answer);
        }
        assert_eq!(limiter.tracked(), 100);
        // Once their buckets refill, old networks are forgotten to make room.
        let later = start + Duration::from_secs(2);
        assert_eq!(limiter.check(ip("192.0.2.1"), later), Verdict::Answer);
        assert_eq!(limiter.tracked(), 1);
    }
}
