//! The status page of a control node (`GET /`) and the data behind it
//! (`GET /v1/overview`, token-protected like every `/v1` call).
//!
//! The page is one self-contained HTML document (inline SVG world map, no scripts
//! from elsewhere). It asks for the API token once (or reads it from the URL
//! fragment, which browsers never send to the server), keeps it in the tab's
//! session storage, and polls the overview every second.

use std::{
    collections::HashMap,
    sync::{Arc, PoisonError},
    time::Instant,
};

use http::{HeaderValue, Response, header};
use serde_json::{Value, json};

use cdn_cluster::{Role, purge::PurgeRecord, state::Stats};
use cdn_node::listener::{Body, full};

use crate::server::State;

/// Per-edge traffic counters from the previous poll, to turn totals into rates.
#[derive(Debug, Default)]
pub(crate) struct Rates {
    previous: HashMap<String, (Instant, Stats)>,
    current: HashMap<String, Rate>,
}

/// An edge's rates between two polls, per second.
#[derive(Debug, Default, Clone, Copy)]
struct Rate {
    requests: f64,
    bytes: f64,
    /// Upstream requests (tiered caching): to origins, shield edges, region peers.
    origin: f64,
    shield: f64,
    peer: f64,
}

impl Rate {
    fn between(before: &Stats, now: &Stats, seconds: f64) -> Self {
        let per_s = |now: u64, before: u64| now.saturating_sub(before) as f64 / seconds;
        let (u, b) = (&now.upstream, &before.upstream);
        Self {
            requests: per_s(now.requests, before.requests),
            bytes: per_s(now.bytes, before.bytes),
            origin: per_s(u.origin, b.origin),
            shield: per_s(u.shield, b.shield),
            peer: per_s(u.peer, b.peer),
        }
    }
}

/// A one-line description of a purge.
pub(crate) fn summary(record: &PurgeRecord) -> String {
    let t = &record.target;
    let mut parts = Vec::new();
    if t.all {
        parts.push("everything".to_string());
    }
    if !t.urls.is_empty() {
        parts.push(format!("urls: {}", t.urls.join(", ")));
    }
    if !t.prefixes.is_empty() {
        parts.push(format!("prefixes: {}", t.prefixes.join(", ")));
    }
    if !t.tags.is_empty() {
        parts.push(format!("tags: {}", t.tags.join(", ")));
    }
    let mut text = parts.join("; ");
    if text.len() > 120 {
        text.truncate(117);
        text.push_str("...");
    }
    if record.soft {
        text.push_str(" (soft)");
    }
    text
}

/// Everything the status page shows.
pub(crate) async fn overview(state: &Arc<State>) -> Value {
    let Some(cluster) = &state.cluster else {
        return json!({ "control": state.node_id, "nodes": [], "purges": [] });
    };
    let stats = cluster.stats().await;
    let applied = cluster.applied(&state.node_id).await;
    let mut nodes = Vec::new();
    {
        let mut rates = state.rates.lock().unwrap_or_else(PoisonError::into_inner);
        let now = Instant::now();
        for (node, counters) in &stats {
            if let Some((then, before)) = rates.previous.get(node).copied() {
                let seconds = now.duration_since(then).as_secs_f64();
                if seconds >= 0.5 {
                    rates.current.insert(node.clone(), Rate::between(&before, counters, seconds));
                    rates.previous.insert(node.clone(), (now, *counters));
                }
            } else {
                rates.previous.insert(node.clone(), (now, *counters));
            }
        }
        for member in cluster.members().iter() {
            let counters = stats.get(&member.node_id).copied().unwrap_or_default();
            let rate = rates.current.get(&member.node_id).copied().unwrap_or_default();
            let upstream = counters.upstream;
            let hit_ratio = (counters.requests > 0).then(|| counters.hits as f64 / counters.requests as f64);
            nodes.push(json!({
                "node_id": member.node_id,
                "role": member.role,
                "region": member.region,
                "location": member.location,
                "addr": member.public_addr.map(|a| a.to_string()),
                "state": member.state,
                "ready": member.ready,
                "load": member.load,
                "applied_seq": applied.get(&member.node_id),
                "requests": counters.requests,
                "hit_ratio": hit_ratio,
                "requests_per_s": rate.requests,
                "bytes_per_s": rate.bytes,
                // Requests the edge sent upstream since it started, and per second.
                "upstream": { "origin": upstream.origin, "shield": upstream.shield, "peer": upstream.peer },
                "upstream_per_s": { "origin": rate.origin, "shield": rate.shield, "peer": rate.peer },
                "edge": member.role == Role::Edge,
            }));
        }
    }
    let mut purges: Vec<(u64, Value)> = state
        .completions
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .iter()
        .map(|(seq, c)| {
            (
                *seq,
                json!({
                    "id": format!("{}-{seq}", state.node_id),
                    "what": c.summary,
                    "accepted_ms": c.acked_ms,
                    "completed_ms": c.completed_ms,
                    "edges": c.per_edge,
                }),
            )
        })
        .collect();
    purges.sort_by_key(|p| std::cmp::Reverse(p.0));
    purges.truncate(20);
    json!({
        "control": state.node_id,
        "nodes": nodes,
        "purges": purges.into_iter().map(|(_, v)| v).collect::<Vec<_>>(),
    })
}

/// The page itself.
pub(crate) fn page() -> Response<Body> {
    let mut response = Response::new(full(PAGE));
    response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("text/html; charset=utf-8"));
    response.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response.headers_mut().insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static("default-src 'self'; script-src 'unsafe-inline'; style-src 'unsafe-inline'"),
    );
    response
}

const PAGE: &str = include_str!("status.html");
