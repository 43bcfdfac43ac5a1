//! The geo-DNS's Prometheus metrics (names as in DESIGN.md).

use hickory_proto::op::ResponseCode;
use prometheus::{Histogram, HistogramOpts, IntCounter, IntCounterVec, Opts, Registry};

/// The `rcode` label values.
pub(crate) const RCODES: [&str; 6] = ["noerror", "nxdomain", "refused", "formerr", "servfail", "notimp"];

/// The `rcode` label of a response code (BADVERS counts as `formerr`, anything
/// else unexpected as `servfail`).
pub(crate) fn rcode_label(code: ResponseCode) -> &'static str {
    match code {
        ResponseCode::NoError => "noerror",
        ResponseCode::NXDomain => "nxdomain",
        ResponseCode::Refused => "refused",
        ResponseCode::FormErr | ResponseCode::BADVERS => "formerr",
        ResponseCode::NotImp => "notimp",
        _ => "servfail",
    }
}

/// Every metric of the geo role.
#[derive(Debug, Clone)]
pub(crate) struct Metrics {
    /// `cdn_dns_answers_total{region}`: edge answers, by the region of the first edge.
    pub(crate) answers: IntCounterVec,
    /// `cdn_dns_answer_duration_seconds`: time from query to response sent.
    pub(crate) duration: Histogram,
    /// `cdn_dns_rate_limited_total`: UDP responses dropped or slipped by the rate limit.
    pub(crate) rate_limited: IntCounter,
    /// `cdn_dns_truncated_total`: UDP responses sent truncated (TC) because they were too large.
    pub(crate) truncated: IntCounter,
    /// `cdn_dns_degraded_answers_total`: answers given with no healthy edge (least-bad edges).
    pub(crate) degraded: IntCounter,
    /// `cdn_dns_queries_total{rcode}`: responses sent, by response code; one
    /// child per [`RCODES`] entry, resolved once (counting is one atomic add).
    by_rcode: [IntCounter; RCODES.len()],
}

impl Metrics {
    /// Registers the metrics in `registry`.
    pub(crate) fn register(registry: &Registry) -> Result<Self, prometheus::Error> {
        let queries =
            IntCounterVec::new(Opts::new("cdn_dns_queries_total", "DNS responses sent, by response code"), &["rcode"])?;
        let answers = IntCounterVec::new(
            Opts::new("cdn_dns_answers_total", "Edge answers given, by the region of the first edge"),
            &["region"],
        )?;
        let duration = Histogram::with_opts(
            HistogramOpts::new("cdn_dns_answer_duration_seconds", "Time from a DNS query to its response")
                .buckets(vec![0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.1]),
        )?;
        let rate_limited =
            IntCounter::new("cdn_dns_rate_limited_total", "UDP responses dropped or truncated by the rate limit")?;
        let truncated =
            IntCounter::new("cdn_dns_truncated_total", "UDP responses truncated (TC) because they were too large")?;
        let degraded = IntCounter::new(
            "cdn_dns_degraded_answers_total",
            "Answers given with no healthy edge, from the least-bad edges",
        )?;
        registry.register(Box::new(queries.clone()))?;
        registry.register(Box::new(answers.clone()))?;
        registry.register(Box::new(duration.clone()))?;
        registry.register(Box::new(rate_limited.clone()))?;
        registry.register(Box::new(truncated.clone()))?;
        registry.register(Box::new(degraded.clone()))?;
        let by_rcode = RCODES.map(|rcode| queries.with_label_values(&[rcode]));
        Ok(Self { answers, duration, rate_limited, truncated, degraded, by_rcode })
    }

    /// `cdn_dns_queries_total{rcode}` for a response with `code`.
    pub(crate) fn query(&self, code: ResponseCode) -> &IntCounter {
        let label = rcode_label(code);
        let index = RCODES.iter().position(|rcode| *rcode == label).unwrap_or(RCODES.len() - 1);
        &self.by_rcode[index]
    }
}
