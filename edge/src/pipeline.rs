//! The one request pipeline behind every protocol:
//! key → lookup → coalesce → fetch → store → respond.
//!
//! HTTP/1.1, HTTP/2 and HTTP/3 listeners turn their requests into
//! `http::Request`s and call [`Pipeline::handle`]. Concurrent misses for a key share
//! one origin fetch (`fill::Fill`); the fill runs in its own task, so a client that goes
//! away does not abort it for the others, and every waiter streams the body as it
//! arrives.

mod fill;
mod respond;

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{Arc, Mutex, PoisonError},
    time::{Duration, Instant},
};

use bytes::Bytes;
use http::{
    HeaderMap, HeaderName, HeaderValue, Method, Request, Response, StatusCode, Version, header, request::Parts,
};
use http_body_util::BodyExt as _;
use tracing::debug;

use cdn_node::listener::{Body, BoxError, empty, full};

pub(crate) use self::respond::stream_body;
use self::{
    fill::{Fill, Outcome},
    respond::{SlicedSource, Source, represent},
};
use cdn_http::policy::{self, Action, Directives, Settings};

use crate::{
    clock::Clock,
    error::FetchError,
    metrics::{CacheResult, Metrics, Protocol},
    store::{Found, Head, Sliced, Store, vary_values},
    upstream::{Upstream, strip_hop_by_hop},
};

const X_CACHE: HeaderName = HeaderName::from_static("x-cache");
const CACHE_STATUS: HeaderName = HeaderName::from_static("cache-status");
const X_SERVED_BY: HeaderName = HeaderName::from_static("x-served-by");
const SURROGATE_KEY: HeaderName = HeaderName::from_static("surrogate-key");
const CACHE_TAG: HeaderName = HeaderName::from_static("cache-tag");
const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");

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
    parts: Parts,
    directives: Directives,
    pragma_no_cache: bool,
    key: String,
    scheme: &'static str,
}

/// The outcome of one request, for headers and metrics.
struct Served {
    response: Response<Body>,
    result: CacheResult,
    status: String,
}

/// The shared state of the edge's request handling.
pub(crate) struct Pipeline {
    node_id: String,
    served_by: HeaderValue,
    pub(crate) alt_svc: Option<HeaderValue>,
    pub(crate) store: Store,
    inflight: Mutex<HashMap<String, Arc<Fill>>>,
    upstream: Upstream,
    pub(crate) metrics: Metrics,
    clock: Clock,
    settings: Settings,
    max_object: u64,
    slice_size: u64,
    ignore_query: bool,
    /// Keys recently found uncacheable: requests for them skip coalescing.
    pass_marks: moka::sync::Cache<String, ()>,
    /// Bumped by every purge.
    epoch: std::sync::atomic::AtomicU64,
}

impl Pipeline {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        node_id: String,
        store: Store,
        upstream: Upstream,
        metrics: Metrics,
        clock: Clock,
        settings: Settings,
        max_object: u64,
        slice_size: u64,
        ignore_query: bool,
    ) -> Self {
        let served_by = HeaderValue::from_str(&node_id).unwrap_or_else(|_| HeaderValue::from_static("edge"));
        Self {
            node_id,
            served_by,
            alt_svc: None,
            store,
            inflight: Mutex::default(),
            upstream,
            metrics,
            clock,
            settings,
            max_object,
            slice_size,
            ignore_query,
            pass_marks: moka::sync::Cache::builder()
                .max_capacity(100_000)
                .time_to_live(Duration::from_secs(30))
                .build(),
            epoch: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// Handles one client request, whatever protocol it came over.
    pub(crate) async fn handle<B>(self: &Arc<Self>, request: Request<B>, conn: Conn) -> Response<Body>
    where
        B: http_body::Body<Data = Bytes> + Send + 'static,
        B::Error: Into<BoxError>,
    {
        let started = Instant::now();
        let served = self.route(request, conn).await;
        let Served { mut response, result, status } = served;
        let headers = response.headers_mut();
        headers.remove(SURROGATE_KEY);
        headers.remove(CACHE_TAG);
        headers.insert(X_CACHE, HeaderValue::from_static(result.x_cache()));
        if let Ok(value) = HeaderValue::from_str(&status) {
            headers.insert(CACHE_STATUS, value);
        }
        headers.insert(X_SERVED_BY, self.served_by.clone());
        if conn.tls
            && conn.protocol != Protocol::H3
            && let Some(alt_svc) = &self.alt_svc
        {
            headers.insert(header::ALT_SVC, alt_svc.clone());
        }
        self.metrics.count_request(conn.protocol, result);
        self.metrics.duration.observe(started.elapsed().as_secs_f64());
        let counter = self.metrics.response_bytes.clone();
        response.map(|body| {
            body.map_frame(move |frame| {
                if let Some(data) = frame.data_ref() {
                    counter.inc_by(data.len() as u64);
                }
                frame
            })
            .boxed_unsync()
        })
    }

    async fn route<B>(self: &Arc<Self>, request: Request<B>, conn: Conn) -> Served
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
        let Some(host) = request_host(&request) else {
            return error(StatusCode::BAD_REQUEST, "missing or invalid host\n", CacheResult::Bypass);
        };
        let scheme = if conn.tls { "https" } else { "http" };
        let key = cache_key(scheme, &host, request.uri(), self.ignore_query);
        let method = request.method().clone();
        if method == Method::GET || method == Method::HEAD {
            let (parts, _) = request.into_parts();
            let directives = Directives::from_headers(&parts.headers);
            let pragma_no_cache = !parts.headers.contains_key(header::CACHE_CONTROL)
                && parts
                    .headers
                    .get_all(header::PRAGMA)
                    .iter()
                    .any(|v| v.to_str().is_ok_and(|v| v.to_ascii_lowercase().contains("no-cache")));
            let req = Req { parts, directives, pragma_no_cache, key, scheme };
            return self.cached(req, conn).await;
        }
        let unsafe_method = !matches!(method, Method::OPTIONS | Method::TRACE);
        let (parts, body) = request.into_parts();
        let body = body.map_err(Into::into).boxed_unsync();
        // Cold paths (forwarding, fills) are boxed: their futures are large, and a
        // HIT's future would otherwise carry (and move, several times per request)
        // their space.
        let mut served = Box::pin(self.forward(&parts, conn, body, scheme)).await;
        if unsafe_method && (served.response.status().is_success() || served.response.status().is_redirection()) {
            self.invalidate_after_unsafe(&key, served.response.headers(), scheme, &host);
        }
        served.result = CacheResult::Bypass;
        served.status = "cdn; fwd=bypass".into();
        served
    }

    /// RFC 9111 §4.4: an unsafe request invalidates the target and the
    /// Location/Content-Location URLs of the same host.
    fn invalidate_after_unsafe(&self, key: &str, headers: &HeaderMap, scheme: &str, host: &str) {
        for scheme_variant in ["http", "https"] {
            let other = key.replacen(scheme, scheme_variant, 1);
            self.store.invalidate_url(&other);
        }
        for name in [header::LOCATION, header::CONTENT_LOCATION] {
            let Some(uri) = headers.get(&name).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<http::Uri>().ok())
            else {
                continue;
            };
            let same_host = uri.host().is_none_or(|h| h.eq_ignore_ascii_case(host));
            if same_host && uri.path().starts_with('/') {
                self.store.invalidate_url(&cache_key(scheme, host, &uri, self.ignore_query));
            }
        }
    }

    async fn cached(self: &Arc<Self>, req: Req, conn: Conn) -> Served {
        if self.pass_marks.contains_key(&req.key) {
            // Recently uncacheable ("hit-for-pass"): go straight to the origin.
            let mut served = Box::pin(self.forward(&req.parts, conn, empty(), req.scheme)).await;
            served.result = CacheResult::Bypass;
            served.status = format!("cdn; fwd=bypass; fwd-status={}", served.response.status().as_u16());
            return served;
        }
        let now = self.clock.now();
        if let Some(found) = self.store.lookup(&req.key, &req.parts.headers).await {
            let head = found.head().clone();
            let age = head.timing.current_age(now);
            let action = if head.purged.load(std::sync::atomic::Ordering::Acquire) {
                Action::Revalidate // soft-purged
            } else {
                policy::evaluate(&req.directives, req.pragma_no_cache, &head.directives, head.lifetime, age)
            };
            debug!(key = %req.key, ?action, age = age.as_secs(), "cache lookup");
            let ttl = ttl(head.lifetime, age);
            let (result, status) = match action {
                Action::Fresh => (CacheResult::Hit, format!("cdn; hit; ttl={ttl}")),
                Action::StaleAllowed => (CacheResult::Stale, format!("cdn; hit; ttl={ttl}; detail=max-stale")),
                Action::StaleWhileRevalidate => {
                    self.revalidate_in_background(&req, conn, found.clone());
                    (CacheResult::Stale, format!("cdn; hit; ttl={ttl}; detail=stale-while-revalidate"))
                }
                Action::Revalidate if req.directives.only_if_cached => {
                    return error(StatusCode::GATEWAY_TIMEOUT, "stale and only-if-cached\n", CacheResult::Miss);
                }
                Action::Revalidate => return Box::pin(self.fill(req, conn, Some(found))).await,
            };
            let source = self.source(&found, &req, conn);
            return represent(&req.parts, &head, source, age, result, status);
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
        fill::strip_for_shared(&mut headers);
        let origin = Arc::new((path_and_query(&req.parts.uri), headers));
        let (pipeline, key, object) = (self.clone(), req.key.clone(), sliced.clone());
        SlicedSource::new(sliced.clone(), move |index| {
            let (pipeline, key, object, origin) = (pipeline.clone(), key.clone(), object.clone(), origin.clone());
            Box::pin(async move { pipeline.slice(&key, &object, index, &origin).await })
        })
    }

    fn revalidate_in_background(self: &Arc<Self>, req: &Req, conn: Conn, stale: Found) {
        let busy = self.inflight.lock().unwrap_or_else(PoisonError::into_inner).contains_key(&req.key);
        if !busy {
            let _ = self.join_or_start(req, conn, Some(stale));
        }
    }

    /// The purge epoch (see `fill`).
    pub(crate) fn purge_epoch(&self) -> u64 {
        self.epoch.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Applies a purge to the cache; in-flight fills started before it will not be
    /// stored.
    pub(crate) async fn purge(&self, target: &cdn_cluster::purge::Target, soft: bool) {
        self.epoch.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        if !soft {
            self.pass_marks.invalidate_all();
        }
        self.store.purge(target, soft).await;
    }

    /// Remembers for a while that `key` is not cacheable.
    pub(crate) fn mark_pass(&self, key: &str) {
        self.pass_marks.insert(key.to_string(), ());
    }

    async fn fill(self: &Arc<Self>, req: Req, conn: Conn, stale: Option<Found>) -> Served {
        let (fill, leader) = self.join_or_start(&req, conn, stale.clone());
        let outcome = fill.outcome().await;
        let now = self.clock.now();
        // A stale object may stand in for an origin failure (RFC 5861 stale-if-error).
        let stale_for_error = |status: Option<StatusCode>| {
            let stale = stale.as_ref()?;
            if status.is_some_and(|s| !s.is_server_error()) {
                return None;
            }
            let head = stale.head();
            let age = head.timing.current_age(now);
            policy::stale_if_error(&req.directives, &head.directives, head.lifetime, age).then(|| {
                let ttl = ttl(head.lifetime, age);
                let source = self.source(stale, &req, conn);
                let status = format!("cdn; hit; ttl={ttl}; fwd=stale; detail=stale-if-error");
                represent(&req.parts, head, source, age, CacheResult::Stale, status)
            })
        };
        let fwd = if stale.is_some() { "stale" } else { "miss" };
        match &*outcome {
            Outcome::Stream { head, body } => {
                if let Some(served) = stale_for_error(Some(head.status)) {
                    return served;
                }
                if !self.vary_matches(head, &req.parts.headers) {
                    return self.forward_get(&req, conn).await;
                }
                let age = head.timing.current_age(now);
                let status = format!("cdn; fwd={fwd}; fwd-status={}; stored", head.status.as_u16());
                represent(&req.parts, head, Source::Growing(body.clone()), age, CacheResult::Miss, status)
            }
            Outcome::Sliced(sliced) => {
                let age = sliced.head.timing.current_age(now);
                let status = format!("cdn; fwd={fwd}; fwd-status=206; stored; detail=sliced");
                let source = Source::Sliced(self.sliced_source(sliced, &req, conn));
                represent(&req.parts, &sliced.head, source, age, CacheResult::Miss, status)
            }
            Outcome::Updated(found) => {
                if !self.vary_matches(found.head(), &req.parts.headers) {
                    return self.forward_get(&req, conn).await;
                }
                let head = found.head();
                let age = head.timing.current_age(now);
                let ttl = ttl(head.lifetime, age);
                let source = self.source(found, &req, conn);
                let status = format!("cdn; fwd=stale; fwd-status=304; ttl={ttl}");
                represent(&req.parts, head, source, age, CacheResult::Revalidated, status)
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
                        Served {
                            response,
                            result: CacheResult::Miss,
                            status: format!("cdn; fwd=miss; fwd-status={}", status.as_u16()),
                        }
                    }
                    None => self.forward_get(&req, conn).await,
                }
            }
            Outcome::Slice(_) => fetch_failure(&FetchError::Unreachable("unexpected fill outcome".into())),
            Outcome::Failed(fetch_error) => {
                if let Some(served) = stale_for_error(None) {
                    return served;
                }
                fetch_failure(fetch_error)
            }
        }
    }

    /// Whether the origin answers at all (any HTTP response counts).
    pub(crate) async fn origin_reachable(&self) -> bool {
        let Ok(uri) = self.upstream.uri("/") else { return false };
        let mut request = Request::new(empty());
        *request.method_mut() = Method::HEAD;
        *request.uri_mut() = uri;
        self.upstream.send(request).await.is_ok()
    }

    fn vary_matches(&self, head: &Head, request: &HeaderMap) -> bool {
        if head.vary.is_empty() {
            return true;
        }
        let names: Vec<HeaderName> = head.vary.iter().map(|(name, _)| name.clone()).collect();
        vary_values(&names, request) == head.vary
    }

    /// A GET/HEAD sent on its own (not coalesced, not stored).
    async fn forward_get(&self, req: &Req, conn: Conn) -> Served {
        let mut served = self.forward(&req.parts, conn, empty(), req.scheme).await;
        served.status = format!("cdn; fwd=uri-miss; fwd-status={}", served.response.status().as_u16());
        served
    }

    /// Sends a request to the origin as it is and streams the answer back.
    async fn forward(&self, parts: &Parts, conn: Conn, body: Body, scheme: &str) -> Served {
        let headers = self.origin_headers(parts, conn, scheme);
        let uri = match self.upstream.uri(&path_and_query(&parts.uri)) {
            Ok(uri) => uri,
            Err(e) => return fetch_failure(&e),
        };
        let mut request = Request::new(body);
        *request.method_mut() = parts.method.clone();
        *request.uri_mut() = uri;
        *request.headers_mut() = headers;
        match self.upstream.send(request).await {
            Ok(response) => {
                self.metrics.origin_status(response.status().as_u16());
                let (mut rp, body) = response.into_parts();
                strip_hop_by_hop(&mut rp.headers);
                let status = rp.status;
                let body = body.map_err(|e| Box::new(e) as BoxError).boxed_unsync();
                Served {
                    response: Response::from_parts(rp, body),
                    result: CacheResult::Miss,
                    status: format!("cdn; fwd=miss; fwd-status={}", status.as_u16()),
                }
            }
            Err(e) => {
                self.metrics.origin_error(matches!(e, FetchError::Timeout));
                fetch_failure(&e)
            }
        }
    }

    /// The headers sent to the origin for a client request.
    fn origin_headers(&self, parts: &Parts, conn: Conn, scheme: &str) -> HeaderMap {
        let mut headers = parts.headers.clone();
        strip_hop_by_hop(&mut headers);
        if let Some(host) = &self.upstream.host {
            headers.insert(header::HOST, host.clone());
        } else if !headers.contains_key(header::HOST)
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
            Some(previous) => format!("{previous}, {version} {}", self.node_id),
            None => format!("{version} {}", self.node_id),
        };
        if let Ok(value) = HeaderValue::from_str(&via) {
            headers.insert(header::VIA, value);
        }
        headers
    }
}

/// Tags from `Surrogate-Key` (space-separated) and `Cache-Tag` (comma-separated).
pub(crate) fn surrogate_keys(headers: &HeaderMap) -> Vec<String> {
    let mut tags: Vec<String> = Vec::new();
    let mut add = |tag: &str| {
        let tag = tag.trim();
        if !tag.is_empty() && !tags.iter().any(|t| t == tag) {
            tags.push(tag.to_string());
        }
    };
    for value in headers.get_all(SURROGATE_KEY).iter().filter_map(|v| v.to_str().ok()) {
        value.split_ascii_whitespace().for_each(&mut add);
    }
    for value in headers.get_all(CACHE_TAG).iter().filter_map(|v| v.to_str().ok()) {
        value.split(',').for_each(&mut add);
    }
    tags
}

/// Remaining freshness in whole seconds; negative when stale.
fn ttl(lifetime: Duration, age: Duration) -> i64 {
    let lifetime = i64::try_from(lifetime.as_secs()).unwrap_or(i64::MAX);
    let age = i64::try_from(age.as_secs()).unwrap_or(i64::MAX);
    lifetime.saturating_sub(age)
}

fn error(status: StatusCode, text: &'static str, result: CacheResult) -> Served {
    let mut response = Response::new(full(text));
    *response.status_mut() = status;
    response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"));
    response.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    Served { response, result, status: format!("cdn; fwd=miss; detail={}", status.as_u16()) }
}

fn fetch_failure(e: &FetchError) -> Served {
    match e {
        FetchError::Timeout => error(StatusCode::GATEWAY_TIMEOUT, "origin timed out\n", CacheResult::Miss),
        FetchError::Unreachable(_) => error(StatusCode::BAD_GATEWAY, "origin unreachable\n", CacheResult::Miss),
    }
}

/// The request's host, lowercased, without port: from the URI (HTTP/2, HTTP/3,
/// absolute-form) or the Host header.
fn request_host<B>(request: &Request<B>) -> Option<String> {
    let authority = match request.uri().authority() {
        Some(authority) => authority.clone(),
        None => {
            let value = request.headers().get(header::HOST)?.to_str().ok()?;
            value.parse::<http::uri::Authority>().ok()?
        }
    };
    let host = authority.host().trim_start_matches('[').trim_end_matches(']');
    (!host.is_empty()).then(|| host.to_ascii_lowercase())
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

/// The primary cache key: scheme, host, path and (unless ignored) query.
pub(crate) fn cache_key(scheme: &str, host: &str, uri: &http::Uri, ignore_query: bool) -> String {
    let path = if uri.path().is_empty() { "/" } else { uri.path() };
    match uri.query().filter(|_| !ignore_query) {
        Some(query) => format!("{scheme}://{host}{path}?{query}"),
        None => format!("{scheme}://{host}{path}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut headers = HeaderMap::new();
        for (name, value) in pairs {
            headers.append(HeaderName::from_static(name), HeaderValue::from_static(value));
        }
        headers
    }

    #[test]
    fn keys() {
        let uri: http::Uri = "/v/a.mp4?x=1".parse().unwrap();
        assert_eq!(cache_key("https", "www.cdn.test", &uri, false), "https://www.cdn.test/v/a.mp4?x=1");
        assert_eq!(cache_key("https", "www.cdn.test", &uri, true), "https://www.cdn.test/v/a.mp4");
        let request = Request::builder().uri("/x").header("host", "WWW.cdn.test:8443").body(()).unwrap();
        assert_eq!(request_host(&request).as_deref(), Some("www.cdn.test"));
        let request = Request::builder().uri("https://[::1]:8443/x").body(()).unwrap();
        assert_eq!(request_host(&request).as_deref(), Some("::1"));
        let request = Request::builder().uri("/x").body(()).unwrap();
        assert_eq!(request_host(&request), None);
    }

    #[test]
    fn tags() {
        let headers = map(&[("surrogate-key", "video  home"), ("cache-tag", "a, b,video")]);
        assert_eq!(surrogate_keys(&headers), vec!["video", "home", "a", "b"]);
    }
}
