//! Reading Prometheus metrics the way a scraper does: from the text exposition
//! format, whether it comes from an admin listener's `/metrics` ([`scrape`]) or
//! from a registry in this process ([`text`]). [`sum`] is the one reader every
//! suite uses.
//!
//! Replaces the readers in tests/edge/harness.rs (registry), tests/edge/overload.rs
//! (`/metrics` text), tests/docker.rs (text), tests/geo.rs (registry),
//! tests/edge/ranges.rs (registry) and tests/control/main.rs (registry).

use std::net::SocketAddr;

use prometheus::{Encoder as _, Registry, TextEncoder};

/// The sum of the samples of metric `name` whose labels include all of `labels`
/// (0 when there are none). A histogram's series are named `<name>_bucket`,
/// `<name>_sum` and `<name>_count`.
pub fn sum(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter_map(sample)
        .filter(|s| s.name == name)
        .filter(|s| labels.iter().all(|(k, v)| s.labels.iter().any(|(name, value)| name == k && value == v)))
        .map(|s| s.value)
        .sum()
}

/// What `registry` holds now, in the text format.
pub fn text(registry: &Registry) -> String {
    let mut out = Vec::new();
    TextEncoder::new().encode(&registry.gather(), &mut out).expect("the registry encodes");
    String::from_utf8(out).expect("the text format is UTF-8")
}

/// [`sum`] over what `registry` holds now.
pub fn sum_in(registry: &Registry, name: &str, labels: &[(&str, &str)]) -> f64 {
    sum(&text(registry), name, labels)
}

/// The body of `GET http://{admin}/metrics` (any role's admin listener).
pub async fn scrape(admin: SocketAddr) -> String {
    let reply = crate::client::get(&crate::client::unpooled_client(), &format!("http://{admin}/metrics"), &[]).await;
    assert!(reply.status.is_success(), "GET /metrics on {admin}: {}", reply.status);
    String::from_utf8_lossy(&reply.body).into_owned()
}

/// One sample line: `name{label="value",...} value [timestamp]`.
struct Sample<'a> {
    name: &'a str,
    labels: Vec<(&'a str, String)>,
    value: f64,
}

fn sample(line: &str) -> Option<Sample<'_>> {
    let line = line.trim();
    if line.is_empty() || line.starts_with('#') {
        return None;
    }
    let name_end = line.find(['{', ' ']).unwrap_or(line.len());
    let name = &line[..name_end];
    let mut rest = &line[name_end..];
    let mut labels = Vec::new();
    if let Some(inner) = rest.strip_prefix('{') {
        rest = inner;
        loop {
            rest = rest.trim_start_matches([',', ' ']);
            if let Some(after) = rest.strip_prefix('}') {
                rest = after;
                break;
            }
            let (key, quoted) = rest.split_once("=\"")?;
            // The value runs to the first unescaped quote; `\\`, `\"` and `\n` are escapes.
            let mut value = String::new();
            let mut chars = quoted.char_indices();
            let end = loop {
                match chars.next()? {
                    (_, '\\') => match chars.next()?.1 {
                        'n' => value.push('\n'),
                        other => value.push(other),
                    },
                    (i, '"') => break i,
                    (_, c) => value.push(c),
                }
            };
            labels.push((key.trim(), value));
            rest = &quoted[end + 1..];
        }
    }
    let value = rest.split_whitespace().next()?.parse().ok()?;
    Some(Sample { name, labels, value })
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = "\
# HELP cdn_requests_total Requests.
# TYPE cdn_requests_total counter
cdn_requests_total{cache=\"hit\",protocol=\"h1\"} 2
cdn_requests_total{cache=\"miss\",protocol=\"h1\"} 1
cdn_requests_total{cache=\"hit\",protocol=\"h2\"} 4
cdn_cache_bytes 1048576
cdn_odd{path=\"a \\\"b\\\"\\\\c}\",x=\"1\"} 3
cdn_duration_seconds_bucket{le=\"+Inf\"} 7
cdn_duration_seconds_count 7
";

    #[test]
    fn sums_the_samples_whose_labels_match() {
        assert_eq!(sum(TEXT, "cdn_requests_total", &[]), 7.0);
        assert_eq!(sum(TEXT, "cdn_requests_total", &[("cache", "hit")]), 6.0);
        assert_eq!(sum(TEXT, "cdn_requests_total", &[("protocol", "h1"), ("cache", "miss")]), 1.0);
        assert_eq!(sum(TEXT, "cdn_requests_total", &[("protocol", "h3")]), 0.0);
        assert_eq!(sum(TEXT, "cdn_cache_bytes", &[]), 1_048_576.0);
        assert_eq!(sum(TEXT, "cdn_odd", &[("path", "a \"b\"\\c}"), ("x", "1")]), 3.0);
        assert_eq!(sum(TEXT, "cdn_duration_seconds", &[]), 0.0, "a histogram's series have their own names");
        assert_eq!(sum(TEXT, "cdn_duration_seconds_count", &[]), 7.0);
        assert_eq!(sum(TEXT, "cdn_missing", &[]), 0.0);
    }

    #[test]
    fn a_registry_reads_like_its_metrics_page() {
        let registry = Registry::new();
        let counter = prometheus::IntCounterVec::new(prometheus::Opts::new("cdn_x_total", "x"), &["kind"]).unwrap();
        registry.register(Box::new(counter.clone())).unwrap();
        let gauge = prometheus::Gauge::new("cdn_y", "y").unwrap();
        registry.register(Box::new(gauge.clone())).unwrap();
        counter.with_label_values(&["a"]).inc_by(3);
        counter.with_label_values(&["b"]).inc();
        gauge.set(2.5);
        assert_eq!(sum_in(&registry, "cdn_x_total", &[]), 4.0);
        assert_eq!(sum_in(&registry, "cdn_x_total", &[("kind", "a")]), 3.0);
        assert_eq!(sum_in(&registry, "cdn_y", &[]), 2.5);
    }
}
