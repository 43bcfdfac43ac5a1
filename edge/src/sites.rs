//! Sites: which site a request belongs to, and the origins and rules it is served
//! by — from the routing document the control plane publishes, or, until one
//! exists, from the edge's own `[origin]` section (the *implicit site*).
//!
//! The current document lives in one [`Table`] behind an `ArcSwap`: a request loads
//! it once and keeps its site (`Arc<Site>`) to the end, so a new document swaps in
//! between requests and a request in flight finishes under the one it started
//! with. [`follow`] keeps the table in step with the cluster.

use std::{borrow::Cow, sync::Arc, time::Duration};

use arc_swap::ArcSwap;
use cdn_cluster::{
    Cluster, Role,
    routing::{Router, Rule, Versioned},
    state::Topic,
};
use cdn_http::policy::Directives;
use cdn_node::{admin::Readiness, tls::ClientTrust};
use http::{StatusCode, Uri};
use prometheus::{Histogram, HistogramOpts, IntGauge, IntGaugeVec, Opts, Registry};
use rustls_pki_types::{CertificateDer, pem::PemObject as _};
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::{
    metrics::{Metrics, SiteCounters},
    pool::{Origin, Pool},
    signing::Verifier,
    upstream::UpstreamSpec,
};

/// The `site` label (and name) of the implicit site of `[origin]`. Not a valid
/// document site name, so it never collides with one.
pub(crate) const IMPLICIT: &str = "_origin";

/// One site as an edge serves it.
pub(crate) struct Site {
    /// Its name (the `site` label).
    pub(crate) name: String,
    /// What its cache keys start with: `name:` (empty for the implicit site, whose
    /// keys are what they were before routing documents existed).
    key_prefix: String,
    /// The document's site; `None` for the implicit site.
    spec: Option<cdn_cluster::routing::Site>,
    /// Its origins.
    pub(crate) pool: Arc<Pool>,
    /// The implicit site's `cache.ignore_query`.
    ignore_query: bool,
    /// Paths that need a signed URL (the document's `signed`, or `[origin] signed`).
    signed: Option<cdn_cluster::routing::Signed>,
    /// Its request counters.
    pub(crate) counters: SiteCounters,
}

impl Site {
    /// The regions whose edges fetch this site's misses from the origins (none:
    /// every edge does).
    pub(crate) fn shield(&self) -> &[String] {
        self.spec.as_ref().map_or(&[], |spec| spec.shield.as_slice())
    }

    /// Whether each key has one owner edge per region (`share = "region"`).
    pub(crate) fn share_region(&self) -> bool {
        self.spec.as_ref().is_some_and(|spec| spec.share == Some(cdn_cluster::routing::Share::Region))
    }

    /// Paths that need a signed URL.
    pub(crate) fn signed(&self) -> Option<&cdn_cluster::routing::Signed> {
        self.signed.as_ref()
    }

    /// The index of the rule for `path` (without the query).
    pub(crate) fn rule_index(&self, path: &str) -> Option<usize> {
        self.spec.as_ref()?.rules.iter().position(|rule| rule.matches(path))
    }

    /// Rule `index` ([`rule_index`](Self::rule_index)).
    pub(crate) fn rule(&self, index: Option<usize>) -> Option<&Rule> {
        self.spec.as_ref()?.rules.get(index?)
    }

    /// The primary cache key of a request for `uri` on `host` over `scheme`, under
    /// `rule`: `site:scheme://host/path?query`, the query without the parameters
    /// the rule ignores.
    pub(crate) fn key(&self, scheme: &str, host: &str, uri: &Uri, rule: Option<&Rule>) -> String {
        self.key_of(scheme, host, uri.path(), uri.query(), rule)
    }

    /// [`key`](Self::key) from the target's path and query.
    pub(crate) fn key_of(
        &self,
        scheme: &str,
        host: &str,
        path: &str,
        query: Option<&str>,
        rule: Option<&Rule>,
    ) -> String {
        let path = if path.is_empty() { "/" } else { path };
        let query = self.keyed_query(query, rule);
        let mut key = String::with_capacity(
            self.key_prefix.len()
                + scheme.len()
                + 3
                + host.len()
                + path.len()
                + query.as_ref().map_or(0, |q| q.len() + 1),
        );
        key.push_str(&self.key_prefix);
        key.push_str(scheme);
        key.push_str("://");
        key.push_str(host);
        key.push_str(path);
        if let Some(query) = query {
            key.push('?');
            key.push_str(&query);
        }
        key
    }

    /// The query as far as the cache key (and a shared fill) sees it.
    pub(crate) fn keyed_query<'a>(&self, query: Option<&'a str>, rule: Option<&Rule>) -> Option<Cow<'a, str>> {
        let query = query?;
        if self.ignore_query {
            return None;
        }
        match rule.and_then(|rule| rule.query.as_ref()) {
            Some(ignore) => ignore.strip(query).map(Cow::Owned),
            None => Some(Cow::Borrowed(query)),
        }
    }
}

/// The freshness a rule gives a stored response of `status`, replacing the
/// origin's: `negative_ttl` for 404 and 410, `ttl` for other statuses below 400.
pub(crate) fn forced_lifetime(rule: Option<&Rule>, status: StatusCode) -> Option<Duration> {
    let rule = rule?;
    match status.as_u16() {
        404 | 410 => rule.negative_ttl,
        s if s < 400 => rule.ttl,
        _ => None,
    }
}

/// The response directives with a rule's `stale_while_revalidate` and
/// `stale_if_error` applied as if the origin had sent them.
pub(crate) fn with_rule<'a>(directives: &'a Directives, rule: Option<&Rule>) -> Cow<'a, Directives> {
    let Some(rule) = rule.filter(|r| r.stale_while_revalidate.is_some() || r.stale_if_error.is_some()) else {
        return Cow::Borrowed(directives);
    };
    let mut directives = directives.clone();
    if let Some(swr) = rule.stale_while_revalidate {
        directives.stale_while_revalidate = Some(swr.as_secs());
    }
    if let Some(sie) = rule.stale_if_error {
        directives.stale_if_error = Some(sie.as_secs());
    }
    Cow::Owned(directives)
}

/// One routing document, ready to serve by.
pub(crate) struct Table {
    /// Its version (0: none, the implicit site serves).
    pub(crate) version: u64,
    /// Who accepted it.
    by: String,
    router: Router,
    /// Its sites, in the document's order (the router's indices).
    sites: Vec<Arc<Site>>,
    /// Stops this document's health probes.
    probes: CancellationToken,
}

impl Table {
    fn empty() -> Self {
        Self {
            version: 0,
            by: String::new(),
            router: Router::default(),
            sites: Vec::new(),
            probes: CancellationToken::new(),
        }
    }
}

/// What a request's Host finds.
pub(crate) enum Found {
    /// Its site.
    Site(Arc<Site>),
    /// No site lists it and there is no default site: 421.
    NoSite,
    /// No routing document yet, and no `[origin]`: 503.
    NoRouting,
}

/// The edge's sites: the current routing document and the implicit site.
pub(crate) struct Sites {
    table: ArcSwap<Table>,
    implicit: Option<Arc<Site>>,
    connect_timeout: Duration,
    timeout: Duration,
    metrics: Metrics,
    health: IntGaugeVec,
    version: IntGauge,
    apply: Histogram,
    /// Signed-URL checks (the edge's `[[signing.keys]]`).
    signing: Verifier,
}

impl Sites {
    /// The sites of an edge with `config`, before any document.
    pub(crate) fn new(
        config: &crate::config::Config,
        metrics: Metrics,
        registry: &Registry,
    ) -> Result<Self, crate::Error> {
        let health = IntGaugeVec::new(
            Opts::new("cdn_origin_health", "Whether each origin of each site is up (1) or down (0)"),
            &["site", "origin"],
        )?;
        let version =
            IntGauge::new("cdn_routing_version", "Version of the routing document this edge serves by (0: none)")?;
        let apply = Histogram::with_opts(
            HistogramOpts::new(
                "cdn_routing_apply_seconds",
                "Time from a routing document's acceptance by a control node to its application here",
            )
            .buckets(vec![0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0]),
        )?;
        registry.register(Box::new(health.clone()))?;
        registry.register(Box::new(version.clone()))?;
        registry.register(Box::new(apply.clone()))?;
        let (connect_timeout, timeout) = config
            .origin
            .as_ref()
            .map_or((crate::config::DEFAULT_CONNECT_TIMEOUT, crate::config::DEFAULT_TIMEOUT), |o| {
                (o.connect_timeout, o.timeout)
            });
        let implicit = match &config.origin {
            Some(origin) => {
                let gauge = health.with_label_values(&[IMPLICIT, &origin.url]);
                let signed = origin.signed.clone();
                let origin =
                    Origin::new(UpstreamSpec::of_config(origin), None, gauge).map_err(crate::Error::Upstream)?;
                Some(Arc::new(Site {
                    name: IMPLICIT.to_string(),
                    key_prefix: String::new(),
                    spec: None,
                    pool: Arc::new(Pool::new(IMPLICIT, vec![(Arc::new(origin), 1, false)], None)),
                    ignore_query: config.cache.ignore_query,
                    signed,
                    counters: metrics.site_counters(IMPLICIT),
                }))
            }
            None => None,
        };
        let signing = Verifier::new(&config.signing, registry)?;
        Ok(Self {
            table: ArcSwap::from_pointee(Table::empty()),
            implicit,
            connect_timeout,
            timeout,
            metrics,
            health,
            version,
            apply,
            signing,
        })
    }

    /// The signed-URL checks.
    pub(crate) fn signing(&self) -> &Verifier {
        &self.signing
    }

    /// The site of a request for `host` (lowercase, without port).
    pub(crate) fn find(&self, host: &str) -> Found {
        let table = self.table.load();
        if table.version == 0 {
            return match &self.implicit {
                Some(site) => Found::Site(site.clone()),
                None => Found::NoRouting,
            };
        }
        match table.router.index_for(host) {
            Some(index) => Found::Site(table.sites[index].clone()),
            None => Found::NoSite,
        }
    }

    /// Whether the edge can reach an origin: with a document, whether any origin of
    /// it is up; without, whether the `[origin]` answers at all (no `[origin]`:
    /// nothing to serve from yet).
    pub(crate) async fn origin_ok(&self) -> bool {
        let table = self.table.load_full();
        if table.version != 0 {
            return table.sites.is_empty() || table.sites.iter().any(|site| site.pool.any_up());
        }
        match &self.implicit {
            Some(site) => match site.pool.origins().next() {
                Some(origin) => origin.reachable().await,
                None => false,
            },
            None => false,
        }
    }

    /// Serves by `versioned` from now on: builds its sites (keeping the clients and
    /// health of origins the document keeps), swaps, and stops the old probes.
    pub(crate) fn apply(&self, versioned: &Versioned) {
        let old = self.table.load_full();
        let probes = CancellationToken::new();
        let mut sites = Vec::with_capacity(versioned.routing.sites.len());
        for spec in &versioned.routing.sites {
            let old_site = old.sites.iter().find(|s| s.name == spec.name);
            let mut members = Vec::with_capacity(spec.origins.len());
            for origin in &spec.origins {
                let kept = old_site.and_then(|site| {
                    site.pool
                        .origins()
                        .find(|o| o.same(&origin.url, origin.ca.as_deref(), origin.host.as_deref()))
                        .cloned()
                });
                let built = match kept {
                    Some(kept) => Some(kept),
                    None => self.origin(&spec.name, origin).map(Arc::new),
                };
                if let Some(built) = built {
                    members.push((built, origin.weight, origin.backup));
                }
            }
            crate::signing::warn_missing_keys(&self.signing, &spec.name, spec.signed.as_ref());
            let pool = Arc::new(Pool::new(&spec.name, members, spec.health.clone()));
            pool.spawn_probes(&probes);
            sites.push(Arc::new(Site {
                name: spec.name.clone(),
                key_prefix: format!("{}:", spec.name),
                spec: Some(spec.clone()),
                pool,
                ignore_query: false,
                signed: spec.signed.clone(),
                counters: self.metrics.site_counters(&spec.name),
            }));
        }
        let table = Table {
            version: versioned.version,
            by: versioned.by.clone(),
            router: Router::new(versioned.routing.clone()),
            sites,
            probes,
        };
        // Health gauges of origins the new document no longer has.
        let pairs = |t: &Table| -> Vec<(String, String)> {
            t.sites.iter().flat_map(|s| s.pool.origins().map(|o| (s.name.clone(), o.url.clone()))).collect()
        };
        let (before, after) = (pairs(&old), pairs(&table));
        let table = Arc::new(table);
        self.table.store(table.clone());
        old.probes.cancel();
        for (site, origin) in before.iter().filter(|pair| !after.contains(pair)) {
            let _ = self.health.remove_label_values(&[site, origin]);
        }
        if old.version == 0
            && let Some(implicit) = &self.implicit
        {
            for origin in implicit.pool.origins() {
                let _ = self.health.remove_label_values(&[IMPLICIT, &origin.url]);
            }
        }
        self.version.set(i64::try_from(table.version).unwrap_or(i64::MAX));
        info!(version = table.version, by = %table.by, sites = table.sites.len(), "routing document applied");
    }

    /// A new origin of site `site`.
    fn origin(&self, site: &str, origin: &cdn_cluster::routing::OriginSpec) -> Option<Origin> {
        let trust = match &origin.ca {
            Some(pem) => {
                let mut roots = rustls::RootCertStore::empty();
                for cert in CertificateDer::pem_slice_iter(pem.as_bytes()).flatten() {
                    if let Err(e) = roots.add(cert) {
                        warn!(site, origin = %origin.url, error = %e, "a ca certificate is unusable");
                    }
                }
                ClientTrust::Roots(roots)
            }
            None => ClientTrust::PublicRoots,
        };
        let spec = UpstreamSpec {
            url: &origin.url,
            connect_timeout: self.connect_timeout,
            timeout: self.timeout,
            host: origin.host.as_deref(),
            trust,
        };
        let gauge = self.health.with_label_values(&[site, &origin.url]);
        match Origin::new(spec, origin.ca.as_deref(), gauge) {
            Ok(built) => Some(built),
            Err(e) => {
                let _ = self.health.remove_label_values(&[site, &origin.url]);
                error!(site, origin = %origin.url, error = %e, "origin unusable; left out of the pool");
                None
            }
        }
    }

    /// Stops the current document's probes (the edge is stopping).
    fn stop(&self) {
        self.table.load().probes.cancel();
    }
}

/// Keeps `sites` on the cluster's newest routing document until `shutdown`, tells
/// the cluster which version this edge serves by, and holds the edge's readiness
/// (`routing`) until it serves by the current document.
pub(crate) fn follow(
    sites: Arc<Sites>,
    cluster: Arc<Cluster>,
    readiness: Readiness,
    shutdown: CancellationToken,
) -> impl Future<Output = ()> + Send + 'static {
    // Not ready from this call on, not from the task's first poll: in between, every
    // other condition may hold while no routing document has been applied.
    readiness.set("routing", false);
    follow_until(sites, cluster, readiness, shutdown)
}

async fn follow_until(sites: Arc<Sites>, cluster: Arc<Cluster>, readiness: Readiness, shutdown: CancellationToken) {
    let mut changes = cluster.subscribe(Topic::Routing).await;
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let started = tokio::time::Instant::now();
    // Documents accepted before this edge started were not waiting for it: their
    // "apply latency" would be the edge's downtime.
    let started_ms = cdn_cluster::now_ms();
    let mut current: Option<(u64, String)> = None;
    cluster.set_routing_applied(0).await;
    loop {
        tokio::select! {
            () = shutdown.cancelled() => break,
            change = changes.recv() => if change.is_none() { break },
            _ = tick.tick() => {}
        }
        // One look for a burst (a document's chunks, then its head).
        while changes.try_recv().is_some() {}
        let heads = cluster.routing_heads().await;
        // The document is read (assembled, parsed, validated: up to 1 MiB) only when
        // a control node holds another version than the one served.
        let served = |version: u64, by: &str| current.as_ref().is_some_and(|(v, b)| (*v, b.as_str()) == (version, by));
        let news = heads.values().any(|head| !head.is_none() && !served(head.version, &head.by));
        if news
            && let Some(versioned) = cluster.routing().await
            && !served(versioned.version, &versioned.by)
        {
            sites.apply(&versioned);
            if versioned.accepted_ms >= started_ms {
                let ms = cdn_cluster::now_ms().saturating_sub(versioned.accepted_ms);
                sites.apply.observe(ms as f64 / 1000.0);
            }
            current = Some((versioned.version, versioned.by.clone()));
            cluster.set_routing_applied(versioned.version).await;
            // Tell the control nodes now rather than at the next gossip round.
            for member in cluster.members().iter().filter(|m| m.role == Role::Control) {
                cluster.push_to(member.gossip_addr);
            }
        }
        if current.is_none() {
            // Ready without a document when the control nodes hold none; with no
            // control node in sight after a while, serve anyway (as for purges).
            let none_exists = !heads.is_empty() && heads.values().all(|head| head.is_none());
            let alone = heads.is_empty() && started.elapsed() > Duration::from_secs(5);
            readiness.set("routing", none_exists || alone);
        } else {
            readiness.set("routing", true);
        }
    }
    sites.stop();
}

#[cfg(test)]
mod tests {
    use super::*;
    use cdn_cluster::routing::QueryRule;

    /// Not ready from the start of the routing task, not from its first poll: in
    /// between, every other condition may hold while no document has been applied.
    #[tokio::test]
    async fn the_edge_is_not_ready_from_the_start_of_the_routing_task() {
        let shutdown = CancellationToken::new();
        let cluster = crate::purge::tests::test_cluster(&shutdown).await;
        let registry = Registry::new();
        let metrics = Metrics::register(&registry).unwrap();
        let edge = crate::config::Config::new("e", "http://127.0.0.1:1");
        let sites = Arc::new(Sites::new(&edge, metrics, &registry).unwrap());
        let readiness = Readiness::new();
        let task = follow(sites, cluster.clone(), readiness.clone(), shutdown.clone());
        assert_eq!(readiness.failing(), ["routing"], "not ready before the task first runs");
        drop(task);
        shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(5), cluster.stopped()).await.expect("the cluster stops");
    }

    fn site(ignore: &[&str]) -> Site {
        let registry = Registry::new();
        let metrics = Metrics::register(&registry).unwrap();
        let gauge = IntGauge::new("g", "g").unwrap();
        let spec = UpstreamSpec {
            url: "http://127.0.0.1:1",
            connect_timeout: Duration::from_secs(1),
            timeout: Duration::from_secs(1),
            host: None,
            trust: ClientTrust::PublicRoots,
        };
        let origin = Arc::new(Origin::new(spec, None, gauge).unwrap());
        let rules = vec![
            Rule { path_suffix: Some(".m3u8".into()), ttl: Some(Duration::from_secs(2)), ..Rule::default() },
            Rule {
                query: Some(QueryRule { ignore: ignore.iter().map(|s| s.to_string()).collect() }),
                negative_ttl: Some(Duration::from_secs(10)),
                stale_if_error: Some(Duration::from_secs(3600)),
                ..Rule::default()
            },
        ];
        let spec = cdn_cluster::routing::Site {
            name: "video".into(),
            hosts: vec![],
            origins: vec![],
            health: None,
            shield: vec![],
            share: None,
            rules,
            signed: None,
        };
        Site {
            name: "video".into(),
            key_prefix: "video:".into(),
            spec: Some(spec),
            pool: Arc::new(Pool::new("video", vec![(origin, 1, false)], None)),
            ignore_query: false,
            signed: None,
            counters: metrics.site_counters("video"),
        }
    }

    #[test]
    fn keys_carry_the_site_and_drop_ignored_parameters() {
        let site = site(&["utm_*"]);
        let uri: Uri = "/v/a.mp4?utm_source=x&t=1&utm_medium=y".parse().unwrap();
        let rule = site.rule(site.rule_index(uri.path()));
        assert_eq!(site.key("https", "www.cdn.test", &uri, rule), "video:https://www.cdn.test/v/a.mp4?t=1");
        assert_eq!(cdn_http::key::url(&site.key("https", "h", &uri, rule)), "h/v/a.mp4?t=1");
        let only_ignored: Uri = "/v/a.mp4?utm_source=x".parse().unwrap();
        assert_eq!(site.key("http", "h", &only_ignored, rule), "video:http://h/v/a.mp4");
        // The playlist rule ignores nothing.
        let playlist: Uri = "/live/index.m3u8?utm_source=x".parse().unwrap();
        let rule = site.rule(site.rule_index(playlist.path()));
        assert_eq!(site.key("http", "h", &playlist, rule), "video:http://h/live/index.m3u8?utm_source=x");
    }

    #[test]
    fn rules_force_freshness_and_staleness() {
        let site = site(&["*"]);
        let playlist = site.rule(site.rule_index("/live/index.m3u8"));
        assert_eq!(forced_lifetime(playlist, StatusCode::OK), Some(Duration::from_secs(2)));
        assert_eq!(forced_lifetime(playlist, StatusCode::NOT_FOUND), None);
        let other = site.rule(site.rule_index("/v/a.mp4"));
        assert_eq!(forced_lifetime(other, StatusCode::OK), None);
        assert_eq!(forced_lifetime(other, StatusCode::GONE), Some(Duration::from_secs(10)));
        assert_eq!(forced_lifetime(other, StatusCode::INTERNAL_SERVER_ERROR), None);
        assert_eq!(forced_lifetime(None, StatusCode::OK), None);
        let origin = Directives::parse("max-age=60");
        assert_eq!(with_rule(&origin, other).stale_if_error, Some(3600));
        assert!(matches!(with_rule(&origin, playlist), Cow::Borrowed(_)));
        // `*` drops the whole query.
        let uri: Uri = "/v/a.mp4?a=1&b=2".parse().unwrap();
        assert_eq!(site.key("http", "h", &uri, other), "video:http://h/v/a.mp4");
    }
}
