//! The one request pipeline behind every protocol:
//! key → lookup → coalesce → fetch → store → respond.
//!
//! HTTP/1.1, HTTP/2 and HTTP/3 listeners turn their requests into
//! `http::Request`s and call [`Pipeline::handle`]. The pipeline decides (with the
//! policy of `cdn_http::policy`) and delegates: lookups and coalescing to the
//! [`Cache`], origin fetches to the [`Fetcher`], building the response to `respond`.

pub(crate) mod fast;
mod respond;

use std::{
    net::SocketAddr,
    sync::{Arc, PoisonError},
    time::{Duration, Instant},
};

use bytes::Bytes;
use cdn_cluster::routing::Rule;
use cdn_http::{
    key::{self, CACHE_TAG, SURROGATE_KEY},
    policy::{self, Action, Directives},
};
use cdn_node::listener::{Body, BoxError, empty, full};
use http::{
    HeaderMap, HeaderName, HeaderValue, Method, Request, Response, StatusCode, Version, header, request::Parts,
};
use http_body_util::BodyExt as _;
use tracing::debug;

pub(crate) use self::respond::stream_body;
use self::respond::{Served, SlicedSource, Source, represent};
use crate::{
    access_log::{self, AccessLog, Counted},
    cache::{
        Cache, Flight, Found, Head, Outcome, Sliced, Tier,
        status::{CacheStatus, Detail, Fwd},
    },
    clock::Clock,
    error::FetchError,
    fetch::{Fetcher, FillRequest, SliceOrigin, strip_for_shared},
    limits::ClientLimits,
    metrics::{CacheResult, Metrics, Protocol},
    sites::{self, Site, Sites},
    tier,
    upstream::strip_hop_by_hop,
};

const X_CACHE: HeaderName = HeaderName::from_static("x-cache");
const CACHE_STATUS: HeaderName = HeaderName::from_static("cache-status");
const X_SERVED_BY: HeaderName = HeaderName::from_static("x-served-by");
const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");

/// The pipeline's settings, from the edge's configuration.
#[derive(Debug, Clone)]
pub(crate) struct Settings {
    /// This edge's id (`X-Served-By`, `Via`).
    pub(crate) node_id: String,
    /// `Alt-Svc` for TLS responses (the HTTP/3 port), when HTTP/3 is served.
    pub(crate) alt_svc: Option<HeaderValue>,
    /// Whether plain HTTP/1.1 cache HITs may take the short way (`fast`); off when
    /// something must see every request in `handle` (access logs, ...).
    pub(crate) fast_hits: bool,
}

/// What a listener knows about the connection a request came on.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Conn {
    /// The protocol.
    pub(crate) protocol: Protocol,
    /// The client.
    pub(crate) peer: SocketAddr,
    /// Whether the request came over TLS (or QUIC).
    pub(crate) tls: bool,
}

/// The request facts the pipeline uses after taking the request apart.
struct Req {
    site: Arc<Site>,
    /// The index of the site's rule for the path.
    rule: Option<usize>,
    parts: Parts,
    directives: Directives,
    pragma_no_cache: bool,
    key: String,
    scheme: &'static str,
}

/// The shared state of the edge's request handling.
pub(crate) struct Pipeline {
    settings: Settings,
    served_by: HeaderValue,
    cache: Arc<Cache>,
    fetcher: Arc<Fetcher>,
    sites: Arc<Sites>,
    pub(crate) metrics: Metrics,
    clock: Clock,
    access_log: Option<Arc<AccessLog>>,
    limits: Option<Arc<ClientLimits>>,
}

impl Pipeline {
    pub(crate) fn new(
        settings: Settings,
        cache: Arc<Cache>,
        fetcher: Arc<Fetcher>,
        sites: Arc<Sites>,
        metrics: Metrics,
        clock: Clock,
    ) -> Self {
        let served_by = HeaderValue::from_str(&settings.node_id).unwrap_or_else(|_| HeaderValue::from_static("edge"));
        Self { settings, served_by, cache, fetcher, sites, metrics, clock, access_log: None, limits: None }
    }

    /// Logs requests to `access_log`.
    pub(crate) fn with_access_log(mut self, access_log: Option<Arc<AccessLog>>) -> Self {
        self.access_log = access_log;
        self
    }

    /// Holds clients to `limits`.
    pub(crate) fn with_client_limits(mut self, limits: Option<Arc<ClientLimits>>) -> Self {
        self.limits = limits;
        self
    }

    /// The per-client limits, when configured.
    pub(crate) fn client_limits(&self) -> Option<&Arc<ClientLimits>> {
        self.limits.as_ref()
    }

    /// The access log, when configured.
    pub(crate) fn access_log(&self) -> Option<&Arc<AccessLog>> {
        self.access_log.as_ref()
    }

    /// The cache behind the pipeline.
    pub(crate) fn cache(&self) -> &Arc<Cache> {
        &self.cache
    }

    /// Where fills go.
    pub(crate) fn tiers(&self) -> &Arc<tier::Tiers> {
        self.fetcher.tiers()
    }

    /// The edge's sites.
    pub(crate) fn sites(&self) -> &Arc<Sites> {
        &self.sites
    }

    /// Handles one client request, whatever protocol it came over.
    pub(crate) async fn handle<B>(self: &Arc<Self>, request: Request<B>, conn: Conn) -> Response<Body>
    where
        B: http_body::Body<Data = Bytes> + Send + 'static,
        B::Error: Into<BoxError>,
    {
        let started = Instant::now();
        let pending = self.access_log.as_ref().and_then(|log| log.start(&request, conn.peer, conn.protocol));
        let mut site = None;
        // The edge's own cache fields reach other edges (which obey them too), never
        // clients (RFC 9213 §2 lets a cache that honours CDN-Cache-Control remove it).
        let from_edge =
            request.headers().contains_key(tier::CDN_PEER) && self.fetcher.tiers().member(request.headers()).is_some();
        let served = match self.limits.as_ref().map(|limits| limits.check_rate(conn.peer.ip())) {
            Some(Err(wait)) => rate_limited(wait),
            _ => self.route(request, conn, from_edge, &mut site).await,
        };
        let Served { mut response, status } = served;
        self.decorate(response.headers_mut(), &status, conn.tls, conn.protocol, from_edge);
        self.metrics.count_request(site.as_ref().map(|site| &site.counters), conn.protocol, status.result);
        self.metrics.duration.observe(started.elapsed().as_secs_f64());
        let record = pending.map(|pending| {
            let cache_status = status.header_value();
            let head = access_log::Head {
                site: site.as_deref().map(|site| site.name.as_str()),
                cache: status.result.x_cache(),
                cache_status: cache_status.to_str().unwrap_or_default(),
            };
            pending.responded(&response, &head)
        });
        let counter = self.metrics.response_bytes.clone();
        response.map(|body| Counted::new(body, counter, record).boxed_unsync())
    }

    /// The headers every response gets from the edge (`X-Cache`, `Cache-Status`,
    /// `X-Served-By`, `Alt-Svc`), the same for the HIT short way (`fast`). The edge's
    /// own cache fields (CDN-Cache-Control, Surrogate-Control) stay only for another
    /// edge of the cluster (`from_edge`).
    fn decorate(&self, headers: &mut HeaderMap, status: &CacheStatus, tls: bool, protocol: Protocol, from_edge: bool) {
        headers.remove(SURROGATE_KEY);
        headers.remove(CACHE_TAG);
        if !from_edge {
            headers.remove(policy::CDN_CACHE_CONTROL);
            headers.remove(policy::SURROGATE_CONTROL);
        }
        headers.insert(X_CACHE, HeaderValue::from_static(status.result.x_cache()));
        // An upstream cache's account (a shield's) comes first (RFC 9211 §2: the
        // cache nearest the origin first).
        let ours = status.header_value();
        let value = match headers.get(CACHE_STATUS).and_then(|v| v.to_str().ok()) {
            Some(upstream) if !upstream.trim().is_empty() => {
                HeaderValue::from_str(&format!("{upstream}, {}", ours.to_str().unwrap_or_default())).unwrap_or(ours)
            }
            _ => ours,
        };
        headers.insert(CACHE_STATUS, value);
        headers.insert(X_SERVED_BY, self.served_by.clone());
        if tls
            && protocol != Protocol::H3
            && let Some(alt_svc) = &self.settings.alt_svc
        {
            headers.insert(header::ALT_SVC, alt_svc.clone());
        }
    }

    /// Finds the request's site (left in `found` for the metrics) and serves it.
    async fn route<B>(
        self: &Arc<Self>,
        mut request: Request<B>,
        conn: Conn,
        from_edge: bool,
        found: &mut Option<Arc<Site>>,
    ) -> Served
    where
        B: http_body::Body<Data = Bytes> + Send + 'static,
        B::Error: Into<BoxError>,
    {
        // RFC 9112 §6.3: both framings at once is how requests are smuggled.
        if request.headers().contains_key(header::TRANSFER_ENCODING)
            && request.headers().contains_key(header::CONTENT_LENGTH)
        {
            return error(
                StatusCode::BAD_REQUEST,
                "conflicting content-length and transfer-encoding\n",
                CacheResult::Bypass,
            );
        }
        let host = match request_host(&request, conn.tls, from_edge) {
            Ok(host) => host,
            Err(why) => return error(StatusCode::BAD_REQUEST, why, CacheResult::Bypass),
        };
        let site = match self.sites.find(&host) {
            sites::Found::Site(site) => site,
            sites::Found::NoSite => {
                return error(StatusCode::MISDIRECTED_REQUEST, "no site for this host\n", CacheResult::Bypass);
            }
            sites::Found::NoRouting => {
                let mut served =
                    error(StatusCode::SERVICE_UNAVAILABLE, "no routing document yet\n", CacheResult::Bypass);
                served.response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
                return served;
            }
        };
        *found = Some(site.clone());
        let rule_index = site.rule_index(request.uri().path());
        let rule = site.rule(rule_index);
        let cors = rule.is_some_and(|rule| rule.cors);
        if cors && let Some(preflight) = preflight(&request) {
            return preflight;
        }
        // URI signing (RFC 9246): checked, and the package taken out of the URI,
        // before the cache key, the cache and the origin see the request.
        let signing = self.sites.signing().check(
            site.signed(),
            &mut request,
            conn.peer.ip(),
            conn.tls,
            self.clock.now(),
            |headers| self.fetcher.tiers().member(headers).is_some(),
        );
        let mut served = match signing {
            Ok(()) => Box::pin(self.route_site(request, conn, &site, rule_index, &host)).await,
            Err(rejected) => {
                let mut served = error(StatusCode::FORBIDDEN, "forbidden\n", CacheResult::Bypass);
                served.response.extensions_mut().insert(rejected);
                served
            }
        };
        if cors {
            add_cors(served.response.headers_mut());
        }
        served
    }

    async fn route_site<B>(
        self: &Arc<Self>,
        request: Request<B>,
        conn: Conn,
        site: &Arc<Site>,
        rule_index: Option<usize>,
        host: &str,
    ) -> Served
    where
        B: http_body::Body<Data = Bytes> + Send + 'static,
        B::Error: Into<BoxError>,
    {
        let scheme = if conn.tls { "https" } else { "http" };
        let rule = site.rule(rule_index);
        let key = site.key(scheme, host, request.uri(), rule);
        let method = request.method().clone();
        let bypass = rule.is_some_and(|rule| rule.bypass);
        if (method == Method::GET || method == Method::HEAD) && !bypass {
            let (parts, _) = request.into_parts();
            // Another edge that applied purges this one has not: answer from the
            // origins, not from a cache that may still hold what was purged.
            if parts.headers.contains_key(tier::CDN_PURGED)
                && self.fetcher.tiers().member(&parts.headers).is_some()
                && !self.fetcher.tiers().caught_up(&parts.headers).await
            {
                debug!(key = %key, "behind the requesting edge's purges: not answering from the cache");
                let mut served = Box::pin(self.forward(site, &parts, conn, empty(), scheme)).await;
                served.status = CacheStatus::bypass(Some(served.response.status().as_u16()));
                return served;
            }
            let directives = Directives::from_headers(&parts.headers);
            let pragma_no_cache = !parts.headers.contains_key(header::CACHE_CONTROL)
                && parts
                    .headers
                    .get_all(header::PRAGMA)
                    .iter()
                    .any(|v| v.to_str().is_ok_and(|v| v.to_ascii_lowercase().contains("no-cache")));
            let req = Req { site: site.clone(), rule: rule_index, parts, directives, pragma_no_cache, key, scheme };
            return self.cached(req, conn).await;
        }
        // A GET or HEAD gets here only when its rule bypasses the cache.
        let unsafe_method = !matches!(method, Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE);
        let (parts, body) = request.into_parts();
        let body = body.map_err(Into::into).boxed_unsync();
        // Cold paths (forwarding, fills) are boxed: their futures are large, and a
        // HIT's future would otherwise carry (and move, several times per request)
        // their space.
        let mut served = Box::pin(self.forward(site, &parts, conn, body, scheme)).await;
        if unsafe_method && (served.response.status().is_success() || served.response.status().is_redirection()) {
            self.invalidate_after_unsafe(site, &parts.uri, rule, served.response.headers(), host);
        }
        served.status = CacheStatus::bypass(None);
        served
    }

    /// RFC 9111 §4.4: an unsafe request invalidates the target and the
    /// Location/Content-Location URLs of the same host.
    fn invalidate_after_unsafe(
        &self,
        site: &Site,
        target: &http::Uri,
        rule: Option<&Rule>,
        headers: &HeaderMap,
        host: &str,
    ) {
        for scheme in ["http", "https"] {
            self.cache.invalidate_url(&site.key(scheme, host, target, rule));
        }
        for name in [header::LOCATION, header::CONTENT_LOCATION] {
            let Some(uri) = headers.get(&name).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<http::Uri>().ok())
            else {
                continue;
            };
            let same_host = uri.host().is_none_or(|h| key::normalize_host(h).as_deref() == Some(host));
            if same_host && uri.path().starts_with('/') {
                let rule = site.rule(site.rule_index(uri.path()));
                for scheme in ["http", "https"] {
                    self.cache.invalidate_url(&site.key(scheme, host, &uri, rule));
                }
            }
        }
    }

    async fn cached(self: &Arc<Self>, req: Req, conn: Conn) -> Served {
        if self.cache.is_pass(&req.key) {
            // Recently uncacheable ("hit-for-pass"): go straight to the origin.
            let mut served = Box::pin(self.forward_read(&req, conn)).await;
            served.status = CacheStatus::bypass(Some(served.response.status().as_u16()));
            return served;
        }
        let now = self.clock.now();
        if let Some((found, tier)) = self.cache.lookup(&req.key, &req.parts.headers).await {
            let head = found.head().clone();
            let age = head.timing.current_age(now);
            let soft_purged = head.purged.load(std::sync::atomic::Ordering::Acquire);
            let rule = req.site.rule(req.rule);
            let lifetime = sites::forced_lifetime(rule, head.status).unwrap_or(head.lifetime);
            let action = policy::evaluate(
                &req.directives,
                req.pragma_no_cache,
                &sites::with_rule(&head.directives, rule),
                lifetime,
                age,
                soft_purged,
            );
            debug!(key = %req.key, ?action, age = age.as_secs(), "cache lookup");
            let ttl = ttl(lifetime, age);
            let status = match action {
                Action::Fresh if tier == Tier::Disk => {
                    CacheStatus::hit(CacheResult::Hit, ttl).with_detail(Detail::Disk)
                }
                Action::Fresh => CacheStatus::hit(CacheResult::Hit, ttl),
                Action::StaleAllowed => CacheStatus::hit(CacheResult::Stale, ttl).with_detail(Detail::MaxStale),
                Action::StaleWhileRevalidate => {
                    self.revalidate_in_background(&req, conn, found.clone());
                    CacheStatus::hit(CacheResult::Stale, ttl).with_detail(Detail::StaleWhileRevalidate)
                }
                Action::Revalidate if req.directives.only_if_cached => {
                    return error(StatusCode::GATEWAY_TIMEOUT, "stale and only-if-cached\n", CacheResult::Miss);
                }
                Action::Revalidate => return Box::pin(self.fill(req, conn, Some(found))).await,
            };
            let source = self.source(&found, &req, conn);
            return represent(&req.parts, &head, source, age, status);
        }
        if req.directives.only_if_cached {
            return error(StatusCode::GATEWAY_TIMEOUT, "not cached (only-if-cached)\n", CacheResult::Miss);
        }
        Box::pin(self.fill(req, conn, None)).await
    }

    /// How to read a stored representation.
    fn source(self: &Arc<Self>, found: &Found, req: &Req, conn: Conn) -> Source {
        match found {
            Found::Object(object) => Source::Bytes(object.body.clone()),
            Found::Sliced(sliced) => Source::Sliced(self.sliced_source(sliced, req, conn)),
        }
    }

    fn sliced_source(self: &Arc<Self>, sliced: &Arc<Sliced>, req: &Req, conn: Conn) -> SlicedSource {
        let mut headers = self.origin_headers(&req.parts, conn, req.scheme);
        strip_for_shared(&mut headers);
        let origin = Arc::new(SliceOrigin {
            site: req.site.clone(),
            seen: tier::seen(&req.parts.headers),
            path: self.fill_path(req),
            headers,
        });
        let (fetcher, key, object) = (self.fetcher.clone(), req.key.clone(), sliced.clone());
        SlicedSource::new(sliced.clone(), move |index| {
            let (fetcher, key, object, origin) = (fetcher.clone(), key.clone(), object.clone(), origin.clone());
            Box::pin(async move { fetcher.slice(&key, &object, index, &origin).await })
        })
    }

    fn revalidate_in_background(self: &Arc<Self>, req: &Req, conn: Conn, stale: Found) {
        if !self.cache.is_filling(&req.key) {
            let _ = self.fetcher.join_or_start(&req.key, || self.fill_request(req, conn), Some(stale));
        }
    }

    /// What a fill started by `req` sends and remembers.
    fn fill_request(&self, req: &Req, conn: Conn) -> FillRequest {
        let mut origin_headers = self.origin_headers(&req.parts, conn, req.scheme);
        strip_for_shared(&mut origin_headers);
        crate::compress::fill_accept_encoding(&mut origin_headers);
        FillRequest {
            site: req.site.clone(),
            rule: req.rule,
            seen: tier::seen(&req.parts.headers),
            key: req.key.clone(),
            path: self.fill_path(req),
            origin_headers,
            client_headers: req.parts.headers.clone(),
            client_directives: req.directives.clone(),
        }
    }

    /// The path and query a shared fill asks the origin for: the query without the
    /// parameters the cache key leaves out (they must not shape a shared object).
    fn fill_path(&self, req: &Req) -> String {
        let uri = &req.parts.uri;
        let path = if uri.path().is_empty() { "/" } else { uri.path() };
        match req.site.keyed_query(uri.query(), req.site.rule(req.rule)) {
            Some(query) => format!("{path}?{query}"),
            None => path.to_string(),
        }
    }

    async fn fill(self: &Arc<Self>, req: Req, conn: Conn, stale: Option<Found>) -> Served {
        let flight = self.fetcher.join_or_start(&req.key, || self.fill_request(&req, conn), stale.clone());
        let leader = matches!(flight, Flight::Leader(_));
        let outcome = flight.fill().clone().outcome().await;
        let now = self.clock.now();
        // A stale object may stand in for an origin failure (RFC 5861 stale-if-error).
        let stale_for_error = |status: Option<StatusCode>| {
            let stale = stale.as_ref()?;
            if status.is_some_and(|s| !s.is_server_error()) {
                return None;
            }
            let head = stale.head();
            let age = head.timing.current_age(now);
            let rule = req.site.rule(req.rule);
            let lifetime = sites::forced_lifetime(rule, head.status).unwrap_or(head.lifetime);
            let directives = sites::with_rule(&head.directives, rule);
            policy::stale_if_error(&req.directives, &directives, lifetime, age).then(|| {
                let ttl = ttl(lifetime, age);
                let source = self.source(stale, &req, conn);
                let status = CacheStatus { fwd: Some(Fwd::Stale), ..CacheStatus::hit(CacheResult::Stale, ttl) }
                    .with_detail(Detail::StaleIfError);
                represent(&req.parts, head, source, age, status)
            })
        };
        let fwd = if stale.is_some() { Fwd::Stale } else { Fwd::Miss };
        match &*outcome {
            Outcome::Stream { head, body } => {
                if let Some(served) = stale_for_error(Some(head.status)) {
                    return served;
                }
                if !self.vary_matches(head, &req.parts.headers) {
                    return self.forward_get(&req, conn).await;
                }
                let age = head.timing.current_age(now);
                let status = CacheStatus::forward(CacheResult::Miss, fwd, head.status.as_u16()).stored();
                represent(&req.parts, head, Source::Growing(body.clone()), age, status)
            }
            Outcome::Sliced(sliced) => {
                let age = sliced.head.timing.current_age(now);
                let status = CacheStatus::forward(CacheResult::Miss, fwd, 206).stored().with_detail(Detail::Sliced);
                let source = Source::Sliced(self.sliced_source(sliced, &req, conn));
                represent(&req.parts, &sliced.head, source, age, status)
            }
            Outcome::Stored(found) => {
                let head = found.head();
                let age = head.timing.current_age(now);
                let lifetime = sites::forced_lifetime(req.site.rule(req.rule), head.status).unwrap_or(head.lifetime);
                let source = self.source(found, &req, conn);
                represent(&req.parts, head, source, age, CacheStatus::hit(CacheResult::Hit, ttl(lifetime, age)))
            }
            Outcome::Updated(found) => {
                if !self.vary_matches(found.head(), &req.parts.headers) {
                    return self.forward_get(&req, conn).await;
                }
                let head = found.head();
                let age = head.timing.current_age(now);
                let lifetime = sites::forced_lifetime(req.site.rule(req.rule), head.status).unwrap_or(head.lifetime);
                let ttl = ttl(lifetime, age);
                let source = self.source(found, &req, conn);
                let status = CacheStatus::forward(CacheResult::Revalidated, Fwd::Stale, 304).with_ttl(ttl);
                represent(&req.parts, head, source, age, status)
            }
            Outcome::Pass { response, status } => {
                if let Some(served) = stale_for_error(Some(*status)) {
                    return served;
                }
                let taken = if leader { response.lock().unwrap_or_else(PoisonError::into_inner).take() } else { None };
                match taken {
                    Some(response) => {
                        let response = if req.parts.method == Method::HEAD {
                            response.map(|_| empty())
                        } else {
                            response.map(|body| body.map_err(|e| Box::new(e) as BoxError).boxed_unsync())
                        };
                        Served { response, status: CacheStatus::forward(CacheResult::Miss, Fwd::Miss, status.as_u16()) }
                    }
                    None => self.forward_get(&req, conn).await,
                }
            }
            Outcome::Slice(_) => fetch_failure(&FetchError::Abandoned),
            Outcome::Failed(fetch_error) => {
                if let Some(served) = stale_for_error(None) {
                    return served;
                }
                fetch_failure(fetch_error)
            }
        }
    }

    fn vary_matches(&self, head: &Head, request: &HeaderMap) -> bool {
        if head.vary.is_empty() {
            return true;
        }
        let names: Vec<HeaderName> = head.vary.iter().map(|(name, _)| name.clone()).collect();
        key::vary_values(&names, request) == head.vary
    }

    /// A GET/HEAD sent on its own (not coalesced, not stored).
    async fn forward_get(&self, req: &Req, conn: Conn) -> Served {
        let mut served = self.forward_read(req, conn).await;
        if served.status.fwd_status.is_some() {
            served.status.fwd = Some(Fwd::UriMiss);
        }
        served
    }

    /// A GET or HEAD of a cacheable URL sent as it is; a 200 to a HEAD updates (or
    /// drops) the stored response (RFC 9111 §4.3.5).
    async fn forward_read(&self, req: &Req, conn: Conn) -> Served {
        let sent = self.clock.now();
        let served = self.forward(&req.site, &req.parts, conn, empty(), req.scheme).await;
        if req.parts.method == Method::HEAD && served.response.status() == StatusCode::OK {
            let times = (sent, self.clock.now());
            self.fetcher.head_answered(&req.key, &req.parts.headers, served.response.headers(), times).await;
        }
        served
    }

    /// Sends a request to the origin as it is and streams the answer back.
    async fn forward(&self, site: &Site, parts: &Parts, conn: Conn, body: Body, scheme: &str) -> Served {
        let headers = self.origin_headers(parts, conn, scheme);
        match self.fetcher.forward(site, parts.method.clone(), &path_and_query(&parts.uri), headers, body).await {
            Ok(response) => {
                let (mut rp, body) = response.into_parts();
                strip_hop_by_hop(&mut rp.headers);
                let status = CacheStatus::forward(CacheResult::Miss, Fwd::Miss, rp.status.as_u16());
                let body = body.map_err(|e| Box::new(e) as BoxError).boxed_unsync();
                Served { response: Response::from_parts(rp, body), status }
            }
            Err(e) => fetch_failure(&e),
        }
    }

    /// The headers sent to the origin for a client request.
    fn origin_headers(&self, parts: &Parts, conn: Conn, scheme: &str) -> HeaderMap {
        let mut headers = parts.headers.clone();
        strip_hop_by_hop(&mut headers);
        if !headers.contains_key(header::HOST)
            && let Some(authority) = parts.uri.authority()
            && let Ok(value) = HeaderValue::from_str(authority.as_str())
        {
            headers.insert(header::HOST, value);
        }
        let peer = conn.peer.ip().to_string();
        let forwarded_for = match headers.get(&X_FORWARDED_FOR).and_then(|v| v.to_str().ok()) {
            Some(previous) => format!("{previous}, {peer}"),
            None => peer,
        };
        if let Ok(value) = HeaderValue::from_str(&forwarded_for) {
            headers.insert(X_FORWARDED_FOR, value);
        }
        headers.insert(X_FORWARDED_PROTO, HeaderValue::from_static(if scheme == "https" { "https" } else { "http" }));
        let version = match parts.version {
            Version::HTTP_2 => "2",
            Version::HTTP_3 => "3",
            Version::HTTP_10 => "1.0",
            _ => "1.1",
        };
        let via = match headers.get(header::VIA).and_then(|v| v.to_str().ok()) {
            Some(previous) => format!("{previous}, {version} {}", self.settings.node_id),
            None => format!("{version} {}", self.settings.node_id),
        };
        if let Ok(value) = HeaderValue::from_str(&via) {
            headers.insert(header::VIA, value);
        }
        tier::add_loop(&mut headers, &self.settings.node_id);
        headers
    }
}

/// A CORS preflight (`OPTIONS` with `Origin` and `Access-Control-Request-Method`),
/// answered at the edge for a path whose rule says `cors`.
fn preflight<B>(request: &Request<B>) -> Option<Served> {
    let headers = request.headers();
    if request.method() != Method::OPTIONS
        || !headers.contains_key(header::ORIGIN)
        || !headers.contains_key(header::ACCESS_CONTROL_REQUEST_METHOD)
    {
        return None;
    }
    let mut response = Response::new(empty());
    *response.status_mut() = StatusCode::NO_CONTENT;
    let out = response.headers_mut();
    out.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, HeaderValue::from_static("*"));
    out.insert(header::ACCESS_CONTROL_ALLOW_METHODS, HeaderValue::from_static("GET, HEAD, OPTIONS"));
    // The request headers asked for, when they are a plain list of header names.
    if let Some(asked) = headers.get(header::ACCESS_CONTROL_REQUEST_HEADERS)
        && let Ok(text) = asked.to_str()
        && text.split(',').map(str::trim).all(|name| name.is_empty() || HeaderName::from_bytes(name.as_bytes()).is_ok())
    {
        out.insert(header::ACCESS_CONTROL_ALLOW_HEADERS, asked.clone());
    }
    out.insert(header::ACCESS_CONTROL_MAX_AGE, HeaderValue::from_static("86400"));
    out.insert(
        header::VARY,
        HeaderValue::from_static("Origin, Access-Control-Request-Method, Access-Control-Request-Headers"),
    );
    Some(Served { response, status: CacheStatus::bypass(None) })
}

/// CORS headers on a response of a `cors` path: any origin may read it (the
/// origin's own `Access-Control-Allow-Origin` stays), with the headers a player
/// needs for ranges and cache diagnostics.
fn add_cors(headers: &mut HeaderMap) {
    if !headers.contains_key(header::ACCESS_CONTROL_ALLOW_ORIGIN) {
        headers.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, HeaderValue::from_static("*"));
    }
    if !headers.contains_key(header::ACCESS_CONTROL_EXPOSE_HEADERS) {
        headers.insert(
            header::ACCESS_CONTROL_EXPOSE_HEADERS,
            HeaderValue::from_static("Content-Length, Content-Range, Accept-Ranges, Age, Cache-Status, X-Cache"),
        );
    }
}

/// Remaining freshness in whole seconds; negative when stale.
fn ttl(lifetime: Duration, age: Duration) -> i64 {
    let lifetime = i64::try_from(lifetime.as_secs()).unwrap_or(i64::MAX);
    let age = i64::try_from(age.as_secs()).unwrap_or(i64::MAX);
    lifetime.saturating_sub(age)
}

/// 429 for a client over its request rate.
fn rate_limited(wait: Duration) -> Served {
    let mut served = error(StatusCode::TOO_MANY_REQUESTS, "too many requests\n", CacheResult::Bypass);
    let headers = served.response.headers_mut();
    headers.insert(header::RETRY_AFTER, HeaderValue::from(crate::limits::retry_after(wait)));
    served.response.extensions_mut().insert(access_log::Reason("rate limit"));
    served
}

fn error(status: StatusCode, text: &'static str, result: CacheResult) -> Served {
    let mut response = Response::new(full(text));
    *response.status_mut() = status;
    response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"));
    response.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    Served { response, status: CacheStatus::error(result, status.as_u16()) }
}

/// The one mapping of origin failures to what the client gets (502 or 504).
fn fetch_failure(e: &FetchError) -> Served {
    debug!(error = %e, "origin fetch failed");
    let status = e.status();
    let text = if status == StatusCode::GATEWAY_TIMEOUT { "origin timed out\n" } else { "origin unreachable\n" };
    error(status, text, CacheResult::Miss)
}

/// The request's host as the key, site and purge matching use it
/// ([`key::normalize_host`]: lowercase, no trailing dot, no port), or why the
/// request is refused with 400 (RFC 9112 §3.2, RFC 9113 §8.3.1, RFC 9114 §4.3.1):
/// more than one `Host` field line, an invalid `Host`, no host at all, or an
/// HTTP/2 or HTTP/3 `:authority` that names another host or port than `Host`.
/// An HTTP/1.1 absolute-form target's authority wins over `Host` (RFC 9112 §3.2.2).
/// A request from another edge of the cluster (`from_edge`: a verified `cdn-peer`
/// token) names the peer's address in its URI and the client's host in `Host`, as a
/// proxy does: there `Host` wins.
fn request_host<B>(request: &Request<B>, tls: bool, from_edge: bool) -> Result<String, &'static str> {
    let mut hosts = request.headers().get_all(header::HOST).iter();
    let host_field = hosts.next();
    if hosts.next().is_some() {
        return Err("more than one host field\n");
    }
    let scheme = request.uri().scheme_str().unwrap_or(if tls { "https" } else { "http" });
    let host_field = match host_field {
        Some(value) => {
            Some(value.to_str().ok().and_then(|v| key::request_authority(v, scheme)).ok_or("invalid host field\n")?)
        }
        None => None,
    };
    let authority = request.uri().authority().filter(|_| !(from_edge && host_field.is_some()));
    let Some(authority) = authority else {
        return host_field.map(|(host, _)| host).ok_or("missing host\n");
    };
    let target = key::request_authority(authority.as_str(), scheme).ok_or("invalid request authority\n")?;
    if matches!(request.version(), Version::HTTP_2 | Version::HTTP_3)
        && host_field.as_ref().is_some_and(|field| *field != target)
    {
        return Err(":authority and host disagree\n");
    }
    Ok(target.0)
}

fn path_and_query(uri: &http::Uri) -> String {
    uri.path_and_query().map_or_else(
        || "/".to_string(),
        |pq| {
            let s = pq.as_str();
            if s.starts_with('/') { s.to_string() } else { format!("/{s}") }
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys() {
        let uri: http::Uri = "/v/a.mp4?x=1".parse().unwrap();
        assert_eq!(key::primary("https", "www.cdn.test", &uri, false), "https://www.cdn.test/v/a.mp4?x=1");
        assert_eq!(key::primary("https", "www.cdn.test", &uri, true), "https://www.cdn.test/v/a.mp4");
        let host = |request: &Request<()>| request_host(request, true, false);
        let request = Request::builder().uri("/x").header("host", "WWW.cdn.test:8443").body(()).unwrap();
        assert_eq!(host(&request).as_deref(), Ok("www.cdn.test"));
        let request = Request::builder().uri("/x").header("host", "WWW.cdn.test.").body(()).unwrap();
        assert_eq!(host(&request).as_deref(), Ok("www.cdn.test"));
        let request = Request::builder().uri("https://[::1]:8443/x").body(()).unwrap();
        assert_eq!(host(&request).as_deref(), Ok("::1"));
        let request = Request::builder().uri("/x").body(()).unwrap();
        assert!(host(&request).is_err());
        // Two Host lines, or an invalid one: refused.
        let request = Request::builder().uri("/x").header("host", "a.test").header("host", "a.test").body(()).unwrap();
        assert!(host(&request).is_err());
        let request = Request::builder().uri("/x").header("host", "a.test:abc").body(()).unwrap();
        assert!(host(&request).is_err());
        // HTTP/1.1 absolute-form: the target's authority wins over Host.
        let request = Request::builder().uri("http://b.test/x").header("host", "a.test").body(()).unwrap();
        assert_eq!(host(&request).as_deref(), Ok("b.test"));
        // HTTP/2: :authority and Host must name the same host and port.
        let h2 = |uri: &str, field: &str| {
            let request = Request::builder().version(Version::HTTP_2).uri(uri).header("host", field).body(()).unwrap();
            host(&request)
        };
        assert_eq!(h2("https://a.test/x", "A.test.:443").as_deref(), Ok("a.test"));
        assert!(h2("https://a.test/x", "b.test").is_err());
        assert!(h2("https://a.test/x", "a.test:8443").is_err());
        // From another edge (a tier request over h2 to the peer's address): Host wins.
        let request = Request::builder()
            .version(Version::HTTP_2)
            .uri("https://10.0.0.2:443/x")
            .header("host", "A.test")
            .body(())
            .unwrap();
        assert_eq!(request_host(&request, true, true).as_deref(), Ok("a.test"));
    }
}
