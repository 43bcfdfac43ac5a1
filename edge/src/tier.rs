//! Tiered caching: where a fill goes — the edge of the region that owns the key
//! (`share = "region"`), a shield edge (`shield = [regions]`), or the site's
//! origins — chosen from the gossip view of the other edges.
//!
//! Each key has an order of edges by rendezvous hashing (highest
//! `xxh3(key ‖ node id)` first) over the edges that are alive, ready and not
//! drained, so every edge picks the same shield for a key and a dead shield moves
//! only its own keys. A fill tries the region's owner, then the first shield, then
//! the next shield, then the origins; a hop that cannot be reached or answers 5xx
//! (or 421: it does not know the site) passes to the next, so a client never sees a
//! shield's failure the origin could have answered.
//!
//! Loops: every request forwarded carries `CDN-Loop` (RFC 8586) with the ids of the
//! nodes it passed; a node that finds itself there goes straight to the origins,
//! and an edge never forwards to one already listed.
//!
//! Purges: an edge's request to another edge carries the purges it has applied
//! (`cdn-purged: control=seq, ...`) and a token proving it is a member
//! ([`PeerKey`]); the receiving edge answers from its cache only once it has applied
//! them too (waiting up to [`PURGE_WAIT`]), else from the origins without its cache.
//! So an edge never refills from a shield an object the shield has not purged yet.

use std::{collections::HashMap, net::SocketAddr, sync::Arc, time::Duration};

use arc_swap::ArcSwap;
use cdn_cluster::{Cluster, MemberState, PeerKey, Role, state::Serve};
use http::{HeaderMap, HeaderName, HeaderValue, Request, Response, Uri};
use hyper::body::Incoming;
use prometheus::{IntCounter, IntCounterVec, Opts, Registry};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::{error::FetchError, metrics::Metrics, pool::OriginRequest, sites::Site};

/// `CDN-Loop` (RFC 8586).
pub(crate) const CDN_LOOP: HeaderName = HeaderName::from_static("cdn-loop");
/// The member token of a request from another edge.
pub(crate) const CDN_PEER: HeaderName = HeaderName::from_static("cdn-peer");
/// The purges the requesting edge applied: `control=seq, ...`.
pub(crate) const CDN_PURGED: HeaderName = HeaderName::from_static("cdn-purged");
/// How long an edge waits to catch up with the purges a requesting edge applied.
pub(crate) const PURGE_WAIT: Duration = Duration::from_secs(1);

/// The purges an edge applied (or is applying), per control node.
pub(crate) type Applied = watch::Receiver<HashMap<String, u64>>;

/// Another edge, as the gossip view shows it.
#[derive(Debug)]
pub(crate) struct Peer {
    pub(crate) node_id: String,
    region: String,
    /// `http://addr` of its plain listener, or `https://addr` when it has only TLS.
    base: Uri,
}

/// Where one hop of a fill goes.
pub(crate) enum Hop {
    /// The edge of this region that owns the key.
    Peer(Arc<Peer>),
    /// A shield edge.
    Shield(Arc<Peer>),
    /// The site's origins.
    Origin,
}

/// The kinds of upstream, for `cdn_upstream_requests_total{kind}`.
#[derive(Clone)]
struct Counters {
    origin: IntCounter,
    shield: IntCounter,
    peer: IntCounter,
}

/// The tiers of this edge: the view of the other edges and the client to them.
pub(crate) struct Tiers {
    node_id: String,
    region: String,
    peers: ArcSwap<Vec<Arc<Peer>>>,
    client: crate::upstream::HttpClient,
    key: Option<PeerKey>,
    timeout: Duration,
    counters: Counters,
    /// The purges this edge applied, per control node.
    applied: watch::Receiver<HashMap<String, u64>>,
    /// The purges this edge is applying or applied (ahead of `applied`): what its
    /// requests to other edges name.
    announced: watch::Receiver<HashMap<String, u64>>,
}

impl Tiers {
    /// The tiers of edge `node_id` in `region`; `key`: its cluster's (none without
    /// a cluster: every fill goes to the origins).
    pub(crate) fn new(
        node_id: &str,
        region: &str,
        key: Option<PeerKey>,
        timeout: Duration,
        (applied, announced): (Applied, Applied),
        own_chain: &[rustls_pki_types::CertificateDer<'static>],
        registry: &Registry,
    ) -> Result<Self, crate::Error> {
        let requests = IntCounterVec::new(
            Opts::new(
                "cdn_upstream_requests_total",
                "Requests sent upstream by fills and forwards, by where they went",
            ),
            &["kind"],
        )?;
        registry.register(Box::new(requests.clone()))?;
        let counters = Counters {
            origin: requests.with_label_values(&["origin"]),
            shield: requests.with_label_values(&["shield"]),
            peer: requests.with_label_values(&["peer"]),
        };
        // Another edge's certificate is trusted when the public roots or this
        // edge's own certificate vouch for it (a fleet sharing a certificate or a
        // private CA whose root is in the chain).
        let mut roots = rustls::RootCertStore::from_iter(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
        for cert in own_chain {
            let _ = roots.add(cert.clone());
        }
        let client = crate::upstream::client(Duration::from_secs(1), cdn_node::tls::ClientTrust::Roots(roots), 64)
            .map_err(crate::Error::Upstream)?;
        Ok(Self {
            node_id: node_id.to_string(),
            region: region.to_string(),
            peers: ArcSwap::from_pointee(Vec::new()),
            client,
            key,
            timeout,
            counters,
            applied,
            announced,
        })
    }

    /// Upstream requests so far: (origin, shield, peer).
    pub(crate) fn counts(&self) -> (u64, u64, u64) {
        (self.counters.origin.get(), self.counters.shield.get(), self.counters.peer.get())
    }

    /// Counts a request that went to the origins outside [`send`](Self::send)
    /// (forwards).
    pub(crate) fn count_origin(&self) {
        self.counters.origin.inc();
    }

    /// The hops of a fill of `key` for `site`, in order; `seen`: the node ids in the
    /// request's `CDN-Loop`.
    pub(crate) fn plan(&self, site: &Site, key: &str, seen: &[String]) -> Vec<Hop> {
        let mut hops = Vec::with_capacity(4);
        let tiered = site.share_region() || !site.shield().is_empty();
        if !tiered || self.key.is_none() || seen.contains(&self.node_id) {
            hops.push(Hop::Origin);
            return hops;
        }
        let peers = self.peers.load();
        let unseen = |peer: &&Arc<Peer>| !seen.iter().any(|id| *id == peer.node_id);
        if site.share_region() {
            let own = score(key, &self.node_id);
            let owner = peers
                .iter()
                .filter(|p| p.region == self.region)
                .map(|p| (score(key, &p.node_id), p))
                .max_by_key(|(s, _)| *s);
            if let Some((best, owner)) = owner
                && best > own
                && unseen(&owner)
            {
                hops.push(Hop::Peer(owner.clone()));
            }
        }
        let shield = site.shield();
        if !shield.is_empty() {
            let mut candidates: Vec<(u64, &Arc<Peer>)> = peers
                .iter()
                .filter(|p| shield.iter().any(|r| *r == p.region))
                .filter(unseen)
                .map(|p| (score(key, &p.node_id), p))
                .collect();
            // An edge of a shield region is one of the shields: it asks only those
            // ranked above itself for the key (none when it is the key's shield), so
            // the whole fleet fetches each key from the origins once.
            if shield.contains(&self.region) {
                let own = score(key, &self.node_id);
                candidates.retain(|(score, _)| *score > own);
            }
            candidates.sort_by_key(|(score, _)| std::cmp::Reverse(*score));
            hops.extend(candidates.into_iter().take(2).map(|(_, p)| Hop::Shield(p.clone())));
        }
        hops.push(Hop::Origin);
        hops
    }

    /// Sends a fill's GET along `hops` until one answers (below 500, and not 421);
    /// the origins' answer, whatever it is, ends the walk. Returns the response and
    /// whether it came from another edge of this region (the owner of the key: then
    /// this edge does not store it).
    pub(crate) async fn send(
        &self,
        site: &Site,
        hops: &[Hop],
        request: OriginRequest<'_>,
        metrics: &Metrics,
    ) -> Result<(Response<Incoming>, bool), FetchError> {
        for hop in hops {
            let (peer, counter, kind) = match hop {
                Hop::Peer(peer) => (peer, &self.counters.peer, "peer"),
                Hop::Shield(peer) => (peer, &self.counters.shield, "shield"),
                Hop::Origin => {
                    self.counters.origin.inc();
                    let response = site.pool.send(request, cdn_node::listener::empty(), metrics).await?;
                    return Ok((response, false));
                }
            };
            counter.inc();
            match self.send_to(peer, &request).await {
                Ok(response) if !response.status().is_server_error() && response.status() != 421 => {
                    debug!(peer = %peer.node_id, kind, status = %response.status(), "filled from another edge");
                    return Ok((response, matches!(hop, Hop::Peer(_))));
                }
                Ok(response) => {
                    warn!(peer = %peer.node_id, kind, status = %response.status(), "edge upstream failed; next");
                }
                Err(e) => warn!(peer = %peer.node_id, kind, error = %e, "edge upstream unreachable; next"),
            }
        }
        Err(FetchError::NoOrigin)
    }

    async fn send_to(&self, peer: &Peer, request: &OriginRequest<'_>) -> Result<Response<Incoming>, FetchError> {
        let Some(key) = &self.key else { return Err(FetchError::NoOrigin) };
        let mut parts = peer.base.clone().into_parts();
        parts.path_and_query = Some(request.path.parse().map_err(|e| FetchError::Uri(Arc::new(e)))?);
        let uri = Uri::from_parts(parts).map_err(|e| FetchError::Uri(Arc::new(e)))?;
        let mut outgoing = Request::new(cdn_node::listener::empty());
        *outgoing.method_mut() = request.method.clone();
        *outgoing.uri_mut() = uri;
        *outgoing.headers_mut() = request.headers.clone();
        let headers = outgoing.headers_mut();
        if let Ok(token) = HeaderValue::from_str(&key.sign(&self.node_id, cdn_cluster::now_ms())) {
            headers.insert(CDN_PEER, token);
        }
        let announced = self.announced.borrow().clone();
        let purged: Vec<String> =
            announced.iter().filter(|(_, seq)| **seq > 0).map(|(c, s)| format!("{c}={s}")).collect();
        if !purged.is_empty()
            && let Ok(value) = HeaderValue::from_str(&purged.join(", "))
        {
            headers.insert(CDN_PURGED, value);
        }
        match tokio::time::timeout(self.timeout, self.client.request(outgoing)).await {
            Err(_) => Err(FetchError::Timeout),
            Ok(Err(error)) => Err(FetchError::upstream(error)),
            Ok(Ok(response)) => Ok(response),
        }
    }

    /// The id of the member that sent a request carrying `headers`, when its token
    /// is genuine.
    pub(crate) fn member<'a>(&self, headers: &'a HeaderMap) -> Option<&'a str> {
        let token = headers.get(CDN_PEER)?.to_str().ok()?;
        self.key.as_ref()?.verify(token, cdn_cluster::now_ms())
    }

    /// Waits (at most [`PURGE_WAIT`]) until this edge has applied every purge a
    /// member's request names; `false` when it has not by then.
    pub(crate) async fn caught_up(&self, headers: &HeaderMap) -> bool {
        let wanted: Vec<(String, u64)> = headers
            .get_all(CDN_PURGED)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .filter_map(|pair| {
                let (control, seq) = pair.trim().split_once('=')?;
                Some((control.to_string(), seq.trim().parse().ok()?))
            })
            .collect();
        if wanted.is_empty() {
            return true;
        }
        let done = |applied: &HashMap<String, u64>| {
            wanted.iter().all(|(control, seq)| applied.get(control).is_some_and(|have| have >= seq))
        };
        let mut applied = self.applied.clone();
        matches!(tokio::time::timeout(PURGE_WAIT, applied.wait_for(done)).await, Ok(Ok(_)))
    }

    /// Keeps the view of the other edges current until `shutdown`.
    pub(crate) async fn follow(self: Arc<Self>, cluster: Arc<Cluster>, shutdown: CancellationToken) {
        let mut tick = tokio::time::interval(Duration::from_millis(250));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                _ = tick.tick() => {}
            }
            let serve = cluster.serve_all().await;
            let members = cluster.members();
            let mut peers = Vec::new();
            for member in members.iter() {
                let usable = member.role == Role::Edge
                    && member.state == MemberState::Alive
                    && member.ready
                    && member.node_id != self.node_id;
                if !usable {
                    continue;
                }
                // Its plain listener when it has one (a fleet's private network),
                // else its TLS one.
                let base = match serve.get(&member.node_id) {
                    Some(Serve { http: Some(addr), .. }) => format!("http://{}", reachable(*addr, member)),
                    Some(Serve { https: Some(addr), .. }) => format!("https://{}", reachable(*addr, member)),
                    _ => continue,
                };
                let Ok(base) = base.parse::<Uri>() else { continue };
                let same = self.peers.load().iter().find(|p| p.node_id == member.node_id && p.base == base).cloned();
                peers.push(same.unwrap_or_else(|| {
                    Arc::new(Peer { node_id: member.node_id.clone(), region: member.region.clone(), base })
                }));
            }
            let changed = {
                let old = self.peers.load();
                old.len() != peers.len() || old.iter().zip(&peers).any(|(a, b)| !Arc::ptr_eq(a, b))
            };
            if changed {
                debug!(peers = peers.len(), "tier view changed");
                self.peers.store(Arc::new(peers));
            }
        }
    }
}

/// Where another edge's announced listener is reached: as announced, or, bound to
/// all interfaces, at the address the edge gossips on — the cluster's network, which
/// every member reaches (its `public_addr` is for users, and may sit on a network
/// other edges have no route to).
fn reachable(addr: SocketAddr, member: &cdn_cluster::Member) -> SocketAddr {
    if addr.ip().is_unspecified() { SocketAddr::new(member.gossip_addr.ip(), addr.port()) } else { addr }
}

/// The rendezvous score of `node_id` for `key`.
fn score(key: &str, node_id: &str) -> u64 {
    let mut hasher = twox_hash::XxHash3_64::with_seed(0);
    std::hash::Hasher::write(&mut hasher, key.as_bytes());
    std::hash::Hasher::write(&mut hasher, &[0xff]);
    std::hash::Hasher::write(&mut hasher, node_id.as_bytes());
    std::hash::Hasher::finish(&hasher)
}

/// The node ids of a request's `CDN-Loop` (RFC 8586: `id[; params], ...`).
pub(crate) fn seen(headers: &HeaderMap) -> Vec<String> {
    headers
        .get_all(CDN_LOOP)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|item| item.split(';').next())
        .map(str::trim)
        .filter(|id| !id.is_empty())
        .map(str::to_string)
        .collect()
}

/// Adds this node to a forwarded request's `CDN-Loop`.
pub(crate) fn add_loop(headers: &mut HeaderMap, node_id: &str) {
    let value = match headers.get(CDN_LOOP).and_then(|v| v.to_str().ok()) {
        Some(previous) if !previous.trim().is_empty() => format!("{previous}, {node_id}"),
        _ => node_id.to_string(),
    };
    if let Ok(value) = HeaderValue::from_str(&value) {
        headers.insert(CDN_LOOP, value);
    }
    // A member's token and purge list are for this hop only.
    headers.remove(CDN_PEER);
    headers.remove(CDN_PURGED);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rendezvous_spreads_and_moves_only_a_dead_nodes_keys() {
        let nodes = ["a", "b", "c", "d"];
        fn owner(key: &str, nodes: &[&'static str]) -> &'static str {
            nodes.iter().copied().max_by_key(|n| score(key, n)).unwrap()
        }
        let mut counts = HashMap::new();
        let mut moved = 0;
        for i in 0..4000 {
            let key = format!("video:https://h/v/{i}.ts");
            let first = owner(&key, &nodes);
            *counts.entry(first).or_insert(0) += 1;
            let without_c: Vec<&'static str> = nodes.iter().copied().filter(|n| *n != "c").collect();
            let second = owner(&key, &without_c);
            if first != "c" {
                assert_eq!(first, second, "a key of a live node moved");
            } else {
                moved += 1;
            }
        }
        assert_eq!(moved, counts["c"]);
        for n in nodes {
            assert!((800..1200).contains(&counts[n]), "{n}: {counts:?}");
        }
    }

    #[test]
    fn loop_headers() {
        let mut headers = HeaderMap::new();
        assert!(seen(&headers).is_empty());
        add_loop(&mut headers, "edge-1");
        headers.insert(CDN_PEER, HeaderValue::from_static("x"));
        add_loop(&mut headers, "edge-2");
        assert_eq!(headers.get(CDN_LOOP).unwrap(), "edge-1, edge-2");
        assert!(!headers.contains_key(CDN_PEER));
        headers.append(CDN_LOOP, HeaderValue::from_static("other-cdn; v=1"));
        assert_eq!(seen(&headers), vec!["edge-1", "edge-2", "other-cdn"]);
    }
}
