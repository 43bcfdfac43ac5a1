//! The edge's Prometheus metrics (names as in DESIGN.md).

use prometheus::{Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGaugeVec, Opts, Registry};

/// Which protocol a request came over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    /// HTTP/1.0 or HTTP/1.1.
    H1,
    /// HTTP/2.
    H2,
    /// HTTP/3.
    H3,
}

impl Protocol {
    const ALL: [Self; 3] = [Self::H1, Self::H2, Self::H3];

    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::H1 => "h1",
            Self::H2 => "h2",
            Self::H3 => "h3",
        }
    }
}

/// What the cache did for a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheResult {
    /// Served from the cache.
    Hit,
    /// Fetched from the origin.
    Miss,
    /// Served stale (stale-while-revalidate, stale-if-error, max-stale).
    Stale,
    /// Validated with the origin (304) and served from the cache.
    Revalidated,
    /// Not cacheable: passed to the origin.
    Bypass,
}

impl CacheResult {
    const ALL: [Self; 5] = [Self::Hit, Self::Miss, Self::Stale, Self::Revalidated, Self::Bypass];

    /// The label value.
    pub fn label(self) -> &'static str {
        match self {
            Self::Hit => "hit",
            Self::Miss => "miss",
            Self::Stale => "stale",
            Self::Revalidated => "revalidated",
            Self::Bypass => "bypass",
        }
    }

    /// The `X-Cache` value.
    pub fn x_cache(self) -> &'static str {
        match self {
            Self::Hit => "HIT",
            Self::Miss => "MISS",
            Self::Stale => "STALE",
            Self::Revalidated => "REVALIDATED",
            Self::Bypass => "BYPASS",
        }
    }
}

/// The `site` label of requests that found no site.
pub(crate) const NO_SITE: &str = "_none";

/// One site's request counters, by protocol and cache result.
#[derive(Clone)]
pub(crate) struct SiteCounters([[IntCounter; 5]; 3]);

/// The metrics of one edge.
#[derive(Clone)]
pub(crate) struct Metrics {
    pub(crate) requests: IntCounterVec,
    /// `requests`' counters of requests that found no site (421, a bad Host).
    no_site: SiteCounters,
    pub(crate) response_bytes: IntCounter,
    /// HITs the HTTP/1.1 short way answered (`pipeline::fast`); in `requests` too.
    pub(crate) fast_hits: IntCounter,
    pub(crate) duration: Histogram,
    pub(crate) origin_requests: IntCounterVec,
    pub(crate) cache_bytes: IntGaugeVec,
    pub(crate) cache_objects: IntGaugeVec,
    pub(crate) connections: IntGaugeVec,
    pub(crate) connections_closed: IntCounterVec,
    /// Variants the edge compressed and stored, and the bytes each saved.
    pub(crate) compression: crate::compress::Counters,
}

impl Metrics {
    /// The request counters of `site`, resolved once (no label hashing per request).
    pub(crate) fn site_counters(&self, site: &str) -> SiteCounters {
        SiteCounters(Protocol::ALL.map(|protocol| {
            CacheResult::ALL.map(|result| self.requests.with_label_values(&[protocol.as_str(), result.label(), site]))
        }))
    }

    /// Counts one client request of `site` (`None`: it found no site).
    pub(crate) fn count_request(&self, site: Option<&SiteCounters>, protocol: Protocol, result: CacheResult) {
        site.unwrap_or(&self.no_site).0[protocol as usize][result as usize].inc();
    }

    /// All client requests so far, and of them the hits (every site, protocol).
    pub(crate) fn totals(&self) -> (u64, u64) {
        use prometheus::core::Collector as _;
        let (mut requests, mut hits) = (0u64, 0u64);
        for family in self.requests.collect() {
            for metric in family.get_metric() {
                let n = metric.get_counter().get_value() as u64;
                requests += n;
                if metric.get_label().iter().any(|l| l.name() == "cache" && l.value() == "hit") {
                    hits += n;
                }
            }
        }
        (requests, hits)
    }

    pub(crate) fn register(registry: &Registry) -> Result<Self, prometheus::Error> {
        let requests = IntCounterVec::new(
            Opts::new("cdn_requests_total", "Client requests by protocol, cache result and site"),
            &["protocol", "cache", "site"],
        )?;
        let response_bytes = IntCounter::new("cdn_response_bytes_total", "Response body bytes sent to clients")?;
        let fast_hits = IntCounter::new(
            "cdn_fast_hits_total",
            "Cache HITs answered by the HTTP/1.1 short way (also counted in cdn_requests_total)",
        )?;
        let duration = Histogram::with_opts(
            HistogramOpts::new("cdn_request_duration_seconds", "Time to response headers")
                .buckets(vec![0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0]),
        )?;
        let origin_requests = IntCounterVec::new(
            Opts::new("cdn_origin_requests_total", "Requests to the origin by site and status class (or error)"),
            &["site", "status"],
        )?;
        let cache_bytes = IntGaugeVec::new(
            Opts::new("cdn_cache_bytes", "Bytes held by the cache, per tier (memory: weights; disk: file sizes)"),
            &["tier"],
        )?;
        let cache_objects =
            IntGaugeVec::new(Opts::new("cdn_cache_objects", "Entries held by the cache, per tier"), &["tier"])?;
        let connections = IntGaugeVec::new(
            Opts::new("cdn_connections", "Open client connections by transport (tcp carries h1 and h2)"),
            &["protocol"],
        )?;
        let connections_closed = IntCounterVec::new(
            Opts::new(
                "cdn_connections_closed_total",
                "Client connections the edge closed: idle, stalled (client stopped reading), cancels (rapid reset), header_timeout (slow request head)",
            ),
            &["protocol", "reason"],
        )?;
        registry.register(Box::new(connections.clone()))?;
        registry.register(Box::new(connections_closed.clone()))?;
        registry.register(Box::new(requests.clone()))?;
        registry.register(Box::new(response_bytes.clone()))?;
        registry.register(Box::new(fast_hits.clone()))?;
        registry.register(Box::new(duration.clone()))?;
        registry.register(Box::new(origin_requests.clone()))?;
        registry.register(Box::new(cache_bytes.clone()))?;
        registry.register(Box::new(cache_objects.clone()))?;
        let compression = crate::compress::Counters::register(registry)?;
        // Process-wide: every listener of this process sends through it.
        registry.register(Box::new(cdn_node::zerocopy::sent_counter()))?;
        let no_site = SiteCounters(Protocol::ALL.map(|protocol| {
            CacheResult::ALL.map(|result| requests.with_label_values(&[protocol.as_str(), result.label(), NO_SITE]))
        }));
        Ok(Self {
            no_site,
            requests,
            response_bytes,
            fast_hits,
            duration,
            origin_requests,
            cache_bytes,
            cache_objects,
            connections,
            connections_closed,
            compression,
        })
    }

    pub(crate) fn origin_status(&self, site: &str, status: u16) {
        let class = match status {
            200..=299 => "2xx",
            300..=399 => "3xx",
            400..=499 => "4xx",
            _ => "5xx",
        };
        self.origin_requests.with_label_values(&[site, class]).inc();
    }

    pub(crate) fn origin_error(&self, site: &str, timeout: bool) {
        self.origin_requests.with_label_values(&[site, if timeout { "timeout" } else { "error" }]).inc();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_request_counts_under_its_own_labels() {
        let metrics = Metrics::register(&Registry::new()).unwrap();
        let site = metrics.site_counters("video");
        for protocol in Protocol::ALL {
            for result in CacheResult::ALL {
                metrics.count_request(Some(&site), protocol, result);
                metrics.count_request(None, protocol, result);
                let counter = metrics.requests.with_label_values(&[protocol.as_str(), result.label(), "video"]);
                assert_eq!(counter.get(), 1, "{protocol:?} {result:?}");
                let counter = metrics.requests.with_label_values(&[protocol.as_str(), result.label(), NO_SITE]);
                assert_eq!(counter.get(), 1, "{protocol:?} {result:?}");
            }
        }
        assert_eq!(metrics.totals(), (30, 6));
    }
}
