//! Counters, latency percentiles and the JSON report.

use std::{collections::HashMap, time::Duration};

use serde::Serialize;

use crate::Args;

/// The result line, in this field order. `mb_per_s` is 10^6 bytes of body per second.
#[derive(Debug, Serialize)]
pub(crate) struct Report {
    proto: &'static str,
    url: String,
    connections: usize,
    streams: usize,
    requests: u64,
    errors: u64,
    bytes: u64,
    seconds: f64,
    req_per_s: f64,
    mb_per_s: f64,
    p50_ms: f64,
    p99_ms: f64,
    /// Responses with `X-Cache: HIT` (0 from servers that do not send it).
    x_cache_hits: u64,
    /// CPU (user + system) the load generator used.
    client_cpu_s: Option<f64>,
}

/// What a request loop (or the whole run) counted.
#[derive(Debug, Default)]
pub(crate) struct Stats {
    /// Successful (2xx) requests.
    requests: u64,
    /// Of those, responses with `X-Cache: HIT…`.
    hits: u64,
    /// Failed requests and connection attempts.
    errors: u64,
    /// Response body bytes received (also of failed requests).
    pub(crate) bytes: u64,
    /// Latency of each successful request, microseconds.
    latencies: Vec<u32>,
    /// Error messages and how often each occurred.
    messages: HashMap<String, u64>,
}

impl Stats {
    pub(crate) fn ok(&mut self, latency: Duration, hit: bool) {
        self.requests += 1;
        self.hits += u64::from(hit);
        self.latencies.push(u32::try_from(latency.as_micros()).unwrap_or(u32::MAX));
    }

    pub(crate) fn error(&mut self, message: String) {
        self.errors += 1;
        *self.messages.entry(message).or_default() += 1;
    }

    pub(crate) fn merge(&mut self, other: Self) {
        self.requests += other.requests;
        self.hits += other.hits;
        self.errors += other.errors;
        self.bytes += other.bytes;
        self.latencies.extend(other.latencies);
        for (message, count) in other.messages {
            *self.messages.entry(message).or_default() += count;
        }
    }

    /// Distinct error messages, most frequent first (at most 10).
    pub(crate) fn error_messages(&self) -> Vec<(&str, u64)> {
        let mut messages: Vec<_> = self.messages.iter().map(|(m, c)| (m.as_str(), *c)).collect();
        messages.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(b.0)));
        messages.truncate(10);
        messages
    }

    pub(crate) fn report(mut self, args: &Args, seconds: f64, cpu: Option<f64>) -> Report {
        self.latencies.sort_unstable();
        let round = |x: f64, places: i32| (x * 10f64.powi(places)).round() / 10f64.powi(places);
        let percentile = |p: f64| {
            if self.latencies.is_empty() {
                return 0.0;
            }
            // Nearest rank.
            let rank = ((p / 100.0) * self.latencies.len() as f64).ceil() as usize;
            round(f64::from(self.latencies[rank.clamp(1, self.latencies.len()) - 1]) / 1000.0, 3)
        };
        Report {
            proto: args.proto.name(),
            url: args.url.to_string(),
            connections: args.connections,
            streams: args.streams,
            requests: self.requests,
            errors: self.errors,
            bytes: self.bytes,
            seconds: round(seconds, 3),
            req_per_s: round(self.requests as f64 / seconds, 1),
            mb_per_s: round(self.bytes as f64 / seconds / 1e6, 1),
            p50_ms: percentile(50.0),
            p99_ms: percentile(99.0),
            x_cache_hits: self.hits,
            client_cpu_s: cpu.map(|c| round(c, 2)),
        }
    }
}

/// User plus system CPU time of this process so far (Linux `/proc/self/stat`).
pub(crate) fn process_cpu_seconds() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the command name, which is in parentheses and may hold spaces.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the whole line, 12 and 13 here (1-based).
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    // USER_HZ is 100 on every Linux this runs on.
    Some(ticks as f64 / 100.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_time_is_readable() {
        assert!(process_cpu_seconds().is_some());
    }

    #[test]
    fn merge_adds_up() {
        let mut a = Stats::default();
        a.ok(Duration::from_millis(2), true);
        a.error("x".into());
        let mut b = Stats::default();
        b.ok(Duration::from_millis(4), false);
        b.error("x".into());
        b.bytes = 10;
        a.merge(b);
        assert_eq!((a.requests, a.hits, a.errors, a.bytes, a.latencies.len()), (2, 1, 2, 10, 2));
        assert_eq!(a.error_messages(), vec![("x", 2)]);
    }
}
