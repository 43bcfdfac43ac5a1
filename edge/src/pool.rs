//! A site's origin pool: weighted choice among healthy primaries, backups when no
//! primary is healthy, active health probes and passive marks, and one retry on
//! another origin for an idempotent request that could not reach the first.
//!
//! Health is kept per origin ([`Origin`]) and survives a new routing document that
//! keeps the origin (same site, URL, `ca` and `host`): a document swap neither
//! forgets that an origin is down nor drops its pooled connections.

use std::{
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
    },
    time::Duration,
};

use cdn_cluster::routing::Health;
use cdn_node::listener::{Body, empty};
use http::{HeaderMap, Method, Request, Response};
use hyper::body::Incoming;
use prometheus::IntGauge;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::{
    error::FetchError,
    metrics::Metrics,
    upstream::{Upstream, UpstreamSpec},
};

/// How long a site without active probes leaves an origin alone after a failed
/// connection before trying it again.
pub(crate) const PASSIVE_DOWN: Duration = Duration::from_secs(10);

/// One origin: its client (with its connection pool) and its health.
pub(crate) struct Origin {
    /// Its URL as the document writes it (the `origin` metric label).
    pub(crate) url: String,
    /// What identifies it across documents: URL, `ca`, `host`.
    identity: (String, Option<String>, Option<String>),
    upstream: Upstream,
    up: AtomicBool,
    /// Failures and successes in a row.
    streak: Mutex<(u32, u32)>,
    /// Without active probes: when a passively marked origin may be tried again (ms
    /// since the Unix epoch; 0: not marked).
    retry_at_ms: AtomicU64,
    gauge: IntGauge,
}

impl Origin {
    /// A client for `spec`, up until told otherwise.
    pub(crate) fn new(
        spec: UpstreamSpec<'_>,
        ca: Option<&str>,
        gauge: IntGauge,
    ) -> Result<Self, crate::error::UpstreamSetup> {
        let identity = (spec.url.to_string(), ca.map(str::to_string), spec.host.map(str::to_string));
        let url = spec.url.to_string();
        let upstream = Upstream::new(spec)?;
        gauge.set(1);
        Ok(Self {
            url,
            identity,
            upstream,
            up: AtomicBool::new(true),
            streak: Mutex::new((0, 0)),
            retry_at_ms: AtomicU64::new(0),
            gauge,
        })
    }

    /// Whether a new document's origin (URL, `ca`, `host`) is this one.
    pub(crate) fn same(&self, url: &str, ca: Option<&str>, host: Option<&str>) -> bool {
        self.identity.0 == url && self.identity.1.as_deref() == ca && self.identity.2.as_deref() == host
    }

    /// Whether requests may go to it now.
    fn usable(&self, now_ms: u64) -> bool {
        if self.up.load(Ordering::Relaxed) {
            return true;
        }
        let retry_at = self.retry_at_ms.load(Ordering::Relaxed);
        retry_at != 0 && now_ms >= retry_at
    }

    /// Whether it is marked up.
    pub(crate) fn is_up(&self) -> bool {
        self.up.load(Ordering::Relaxed)
    }

    /// Records a probe (or a passive) result; `health`: the site's thresholds, none
    /// for a site without probes (then one failure marks it down for
    /// [`PASSIVE_DOWN`] and one success up).
    fn record(&self, ok: bool, health: Option<&Health>, site: &str) {
        let (fails_needed, passes_needed) = health.map_or((1, 1), |h| (h.fails.max(1), h.passes.max(1)));
        let mut streak = self.streak.lock().unwrap_or_else(PoisonError::into_inner);
        if ok {
            streak.0 = 0;
            streak.1 = streak.1.saturating_add(1);
        } else {
            streak.1 = 0;
            streak.0 = streak.0.saturating_add(1);
        }
        let (fails, passes) = *streak;
        drop(streak);
        let up = self.up.load(Ordering::Relaxed);
        if up && !ok && fails >= fails_needed {
            self.up.store(false, Ordering::Relaxed);
            self.gauge.set(0);
            warn!(site, origin = %self.url, fails, "origin marked down");
        } else if !up && ok && passes >= passes_needed {
            self.up.store(true, Ordering::Relaxed);
            self.retry_at_ms.store(0, Ordering::Relaxed);
            self.gauge.set(1);
            info!(site, origin = %self.url, passes, "origin marked up");
        }
        if !ok && health.is_none() {
            self.retry_at_ms.store(cdn_cluster::now_ms() + PASSIVE_DOWN.as_millis() as u64, Ordering::Relaxed);
        }
    }

    /// One active probe: `GET path`, any answer below 500 within `timeout` passes.
    async fn probe(&self, path: &str, timeout: Duration) -> bool {
        let Ok(uri) = self.upstream.uri(path) else { return false };
        let mut request = Request::new(empty());
        *request.uri_mut() = uri;
        match tokio::time::timeout(timeout, self.upstream.send(request)).await {
            Ok(Ok(response)) => !response.status().is_server_error(),
            _ => false,
        }
    }
}

/// One origin of a pool, as the current document places it.
struct Member {
    origin: Arc<Origin>,
    weight: u32,
    backup: bool,
}

/// A site's origins.
pub(crate) struct Pool {
    site: String,
    members: Vec<Member>,
    health: Option<Health>,
    next: AtomicUsize,
}

/// A request for an origin, independent of which origin gets it.
pub(crate) struct OriginRequest<'a> {
    pub(crate) method: Method,
    /// Path and query.
    pub(crate) path: &'a str,
    pub(crate) headers: HeaderMap,
}

impl Pool {
    /// A pool of `origins` (origin, weight, backup) for `site`.
    pub(crate) fn new(site: &str, origins: Vec<(Arc<Origin>, u32, bool)>, health: Option<Health>) -> Self {
        let members = origins
            .into_iter()
            .map(|(origin, weight, backup)| Member { origin, weight: weight.max(1), backup })
            .collect();
        Self { site: site.to_string(), members, health, next: AtomicUsize::new(0) }
    }

    /// The pool's origins.
    pub(crate) fn origins(&self) -> impl Iterator<Item = &Arc<Origin>> {
        self.members.iter().map(|m| &m.origin)
    }

    /// Whether any origin is marked up.
    pub(crate) fn any_up(&self) -> bool {
        self.members.iter().any(|m| m.origin.is_up())
    }

    /// The origin for the next request: by weight among the usable primaries, else
    /// the usable backups, else (nothing usable) the primaries anyway; never
    /// `exclude` while there is another.
    pub(crate) fn pick(&self, exclude: Option<&Arc<Origin>>) -> Option<&Arc<Origin>> {
        let now = cdn_cluster::now_ms();
        let not_excluded = |m: &&Member| exclude.is_none_or(|e| !Arc::ptr_eq(e, &m.origin));
        let tiers: [&dyn Fn(&Member) -> bool; 4] =
            [&|m| !m.backup && m.origin.usable(now), &|m| m.backup && m.origin.usable(now), &|m| !m.backup, &|_| true];
        for tier in tiers {
            let total: u64 =
                self.members.iter().filter(not_excluded).filter(|m| tier(m)).map(|m| u64::from(m.weight)).sum();
            if total == 0 {
                continue;
            }
            let mut n = self.next.fetch_add(1, Ordering::Relaxed) as u64 % total;
            for member in self.members.iter().filter(not_excluded).filter(|m| tier(m)) {
                let weight = u64::from(member.weight);
                if n < weight {
                    return Some(&member.origin);
                }
                n -= weight;
            }
        }
        None
    }

    /// Sends `request` to an origin of the pool. A GET or HEAD (whose body is empty)
    /// that does not reach the first origin — no connection, or one closed before
    /// any answer — goes once to another; a failed connection is a passive mark.
    pub(crate) async fn send(
        &self,
        request: OriginRequest<'_>,
        body: Body,
        metrics: &Metrics,
    ) -> Result<Response<Incoming>, FetchError> {
        let retry = matches!(request.method, Method::GET | Method::HEAD);
        let mut body = Some(body);
        let mut tried: Option<&Arc<Origin>> = None;
        loop {
            let Some(origin) = self.pick(tried) else { return Err(FetchError::NoOrigin) };
            if tried.is_some_and(|t| Arc::ptr_eq(t, origin)) {
                return Err(FetchError::NoOrigin);
            }
            let mut outgoing = Request::new(body.take().unwrap_or_else(empty));
            *outgoing.method_mut() = request.method.clone();
            *outgoing.uri_mut() = origin.upstream.uri(request.path)?;
            *outgoing.headers_mut() = request.headers.clone();
            let result = origin.upstream.send(outgoing).await;
            match &result {
                Ok(response) => {
                    metrics.origin_status(&self.site, response.status().as_u16());
                    if !origin.is_up() && self.health.is_none() {
                        origin.record(true, None, &self.site);
                    }
                }
                Err(e) => {
                    metrics.origin_error(&self.site, e.is_timeout());
                    if e.is_connect() {
                        origin.record(false, self.health.as_ref(), &self.site);
                    }
                    if retry && tried.is_none() && e.not_reached() && self.members.len() > 1 {
                        warn!(site = %self.site, origin = %origin.url, error = %e, "origin not reached; trying another");
                        tried = Some(origin);
                        continue;
                    }
                }
            }
            return result;
        }
    }

    /// Runs the active probes of every origin until `stop`.
    pub(crate) fn spawn_probes(self: &Arc<Self>, stop: &CancellationToken) {
        let Some(health) = self.health.clone() else { return };
        for member in &self.members {
            let (origin, health, stop, site) = (member.origin.clone(), health.clone(), stop.clone(), self.site.clone());
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(health.interval);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    tokio::select! {
                        () = stop.cancelled() => return,
                        _ = tick.tick() => {}
                    }
                    let ok = tokio::select! {
                        () = stop.cancelled() => return,
                        ok = origin.probe(&health.path, health.timeout) => ok,
                    };
                    origin.record(ok, Some(&health), &site);
                }
            });
        }
    }
}

impl Origin {
    /// Whether the origin answers at all (any HTTP response counts).
    pub(crate) async fn reachable(&self) -> bool {
        let Ok(uri) = self.upstream.uri("/") else { return false };
        let mut request = Request::new(empty());
        *request.method_mut() = Method::HEAD;
        *request.uri_mut() = uri;
        self.upstream.send(request).await.is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn origin(url: &str) -> Arc<Origin> {
        let spec = UpstreamSpec {
            url,
            connect_timeout: Duration::from_secs(1),
            timeout: Duration::from_secs(1),
            host: None,
            trust: cdn_node::tls::ClientTrust::PublicRoots,
        };
        Arc::new(Origin::new(spec, None, IntGauge::new("g", "g").unwrap()).unwrap())
    }

    fn counts(pool: &Pool, n: usize) -> Vec<usize> {
        let mut counts = vec![0; pool.members.len()];
        for _ in 0..n {
            let picked = pool.pick(None).unwrap();
            let i = pool.members.iter().position(|m| Arc::ptr_eq(&m.origin, picked)).unwrap();
            counts[i] += 1;
        }
        counts
    }

    #[test]
    fn weights_then_backups_then_anything() {
        let (a, b, c) = (origin("http://a"), origin("http://b"), origin("http://c"));
        let pool = Pool::new("s", vec![(a.clone(), 2, false), (b.clone(), 1, false), (c.clone(), 1, true)], None);
        assert_eq!(counts(&pool, 300), vec![200, 100, 0]);
        // A passive failure takes `a` out for a while (no probes: one is enough).
        a.record(false, None, "s");
        assert_eq!(counts(&pool, 300), vec![0, 300, 0]);
        b.record(false, None, "s");
        assert_eq!(counts(&pool, 300), vec![0, 0, 300]);
        c.record(false, None, "s");
        // Nothing usable: the primaries anyway, by weight.
        assert_eq!(counts(&pool, 300), vec![200, 100, 0]);
        // The other one, when asked to avoid one.
        assert!(Arc::ptr_eq(pool.pick(Some(&a)).unwrap(), &b));
        b.record(true, None, "s");
        assert_eq!(counts(&pool, 300), vec![0, 300, 0]);
    }

    #[test]
    fn probes_need_fails_and_passes_in_a_row() {
        let a = origin("http://a");
        let health = Health { fails: 2, passes: 3, ..Health::default() };
        a.record(false, Some(&health), "s");
        assert!(a.is_up());
        a.record(true, Some(&health), "s");
        a.record(false, Some(&health), "s");
        assert!(a.is_up(), "not in a row");
        a.record(false, Some(&health), "s");
        assert!(!a.is_up());
        assert_eq!(a.gauge.get(), 0);
        // With probes, a down origin is not tried again until they say so.
        assert!(!a.usable(u64::MAX));
        a.record(true, Some(&health), "s");
        a.record(true, Some(&health), "s");
        assert!(!a.is_up());
        a.record(true, Some(&health), "s");
        assert!(a.is_up());
        assert_eq!(a.gauge.get(), 1);
    }
}
