//! The one request pipeline behind every protocol:
//! key → lookup → coalesce → fetch → store → respond.
//!
//! HTTP/1.1, HTTP/2 and HTTP/3 listeners turn their requests into
//! `http::Request`s and call [`Pipeline::handle`]. Concurrent misses for a key share
//! one origin fetch ([`Fill`]); the fill runs in its own task, so a client that goes
//! away does not abort it for the others, and every waiter streams the body as it
//! arrives.

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{Arc, Mutex, PoisonError},
    time::{Duration, Instant, SystemTime},
};

use bytes::Bytes;
use futures_util::{StreamExt as _, stream};
use http::{
    HeaderMap, HeaderName, HeaderValue, Method, Request, Response, StatusCode, Version, header, request::Parts,
};
use http_body_util::{BodyExt as _, StreamBody};
use hyper::body::{Frame, Incoming};
use tokio::sync::watch;
use tracing::{debug, warn};

use cdn_control::listener::{Body, BoxError, empty, full};
use cdn_origin::range;

use crate::{
    body::Growing,
    clock::Clock,
    error::FetchError,
    metrics::{CacheResult, Metrics, Protocol},
    policy::{self, Action, Directives, Settings, Timing},
    store::{Head, Object, Store, vary_values},
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

/// One origin fetch shared by every request that waits for it.
struct Fill {
    outcome: watch::Sender<Option<Arc<Outcome>>>,
}

/// What a fill produced, as soon as the origin's response head is known.
enum Outcome {
    /// A storable response, streaming into the cache.
    Stream { head: Arc<Head>, body: Arc<Growing> },
    /// A 304 refreshed the stored response.
    Updated(Object),
    /// Not shareable: only the request that started the fill may take it; the others
    /// fetch for themselves.
    Pass { response: Mutex<Option<Response<Incoming>>>, status: StatusCode, reason: &'static str },
    /// The origin could not be reached.
    Failed(FetchError),
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
    ignore_query: bool,
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
            ignore_query,
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
        self.metrics.requests.with_label_values(&[conn.protocol.as_str(), result.label()]).inc();
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
            let pragma_no_cache = parts
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
        let mut served = self.forward(&parts, conn, body, scheme).await;
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
        let now = self.clock.now();
        if let Some(object) = self.store.lookup(&req.key, &req.parts.headers).await {
            let head = &object.head;
            let age = head.timing.current_age(now);
            let action = policy::evaluate(&req.directives, req.pragma_no_cache, &head.directives, head.lifetime, age);
            debug!(key = %req.key, ?action, age = age.as_secs(), "cache lookup");
            let ttl = ttl(head.lifetime, age);
            match action {
                Action::Fresh => {
                    return self.represent(
                        &req,
                        head,
                        Source::Bytes(object.body.clone()),
                        age,
                        CacheResult::Hit,
                        format!("cdn; hit; ttl={ttl}"),
                    );
                }
                Action::StaleAllowed => {
                    return self.represent(
                        &req,
                        head,
                        Source::Bytes(object.body.clone()),
                        age,
                        CacheResult::Stale,
                        format!("cdn; hit; ttl={ttl}; detail=max-stale"),
                    );
                }
                Action::StaleWhileRevalidate => {
                    self.revalidate_in_background(&req, conn, object.clone());
                    return self.represent(
                        &req,
                        head,
                        Source::Bytes(object.body.clone()),
                        age,
                        CacheResult::Stale,
                        format!("cdn; hit; ttl={ttl}; detail=stale-while-revalidate"),
                    );
                }
                Action::Revalidate => return self.fill(req, conn, Some(object)).await,
            }
        }
        if req.directives.only_if_cached {
            return error(StatusCode::GATEWAY_TIMEOUT, "not cached (only-if-cached)\n", CacheResult::Miss);
        }
        self.fill(req, conn, None).await
    }

    fn revalidate_in_background(self: &Arc<Self>, req: &Req, conn: Conn, stale: Object) {
        let busy = self.inflight.lock().unwrap_or_else(PoisonError::into_inner).contains_key(&req.key);
        if !busy {
            let _ = self.join_or_start(req, conn, Some(stale));
        }
    }

    /// Joins the fill of `req.key` or starts one; `true` when this request started it.
    fn join_or_start(self: &Arc<Self>, req: &Req, conn: Conn, stale: Option<Object>) -> (Arc<Fill>, bool) {
        let mut inflight = self.inflight.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(fill) = inflight.get(&req.key) {
            return (fill.clone(), false);
        }
        let fill = Arc::new(Fill { outcome: watch::Sender::new(None) });
        inflight.insert(req.key.clone(), fill.clone());
        drop(inflight);
        let mut headers = self.origin_headers(&req.parts, conn, req.scheme);
        for name in [
            header::IF_NONE_MATCH,
            header::IF_MODIFIED_SINCE,
            header::IF_MATCH,
            header::IF_UNMODIFIED_SINCE,
            header::IF_RANGE,
            header::RANGE,
        ] {
            headers.remove(name);
        }
        if let Some(stale) = &stale {
            if let Some(etag) = stale.head.headers.get(header::ETAG) {
                headers.insert(header::IF_NONE_MATCH, etag.clone());
            }
            if let Some(modified) = stale.head.headers.get(header::LAST_MODIFIED) {
                headers.insert(header::IF_MODIFIED_SINCE, modified.clone());
            }
        }
        let job = FillJob {
            fill: fill.clone(),
            key: req.key.clone(),
            path: path_and_query(&req.parts.uri),
            origin_headers: headers,
            client_headers: req.parts.headers.clone(),
            client_directives: req.directives.clone(),
            stale,
        };
        tokio::spawn(self.clone().run_fill(job));
        (fill, true)
    }

    async fn fill(self: &Arc<Self>, req: Req, conn: Conn, stale: Option<Object>) -> Served {
        let (fill, leader) = self.join_or_start(&req, conn, stale.clone());
        let mut outcome_rx = fill.outcome.subscribe();
        drop(fill);
        let outcome = loop {
            if let Some(outcome) = outcome_rx.borrow_and_update().clone() {
                break outcome;
            }
            if outcome_rx.changed().await.is_err() {
                break Arc::new(Outcome::Failed(FetchError::Unreachable("fill abandoned".into())));
            }
        };
        let now = self.clock.now();
        // A stale object may stand in for an origin failure (RFC 5861 stale-if-error).
        let stale_for_error = |status: Option<StatusCode>| {
            let stale = stale.as_ref()?;
            if status.is_some_and(|s| !s.is_server_error()) {
                return None;
            }
            let age = stale.head.timing.current_age(now);
            policy::stale_if_error(&req.directives, &stale.head.directives, stale.head.lifetime, age).then(|| {
                let ttl = ttl(stale.head.lifetime, age);
                self.represent(
                    &req,
                    &stale.head,
                    Source::Bytes(stale.body.clone()),
                    age,
                    CacheResult::Stale,
                    format!("cdn; hit; ttl={ttl}; fwd=stale; detail=stale-if-error"),
                )
            })
        };
        match &*outcome {
            Outcome::Stream { head, body } => {
                if let Some(served) = stale_for_error(Some(head.status)) {
                    return served;
                }
                if !self.vary_matches(head, &req.parts.headers) {
                    return self.forward_get(&req, conn).await;
                }
                let fwd = if stale.is_some() { "stale" } else { "miss" };
                let age = head.timing.current_age(now);
                self.represent(
                    &req,
                    head,
                    Source::Growing(body.clone()),
                    age,
                    CacheResult::Miss,
                    format!("cdn; fwd={fwd}; fwd-status={}; stored", head.status.as_u16()),
                )
            }
            Outcome::Updated(object) => {
                if !self.vary_matches(&object.head, &req.parts.headers) {
                    return self.forward_get(&req, conn).await;
                }
                let age = object.head.timing.current_age(now);
                let ttl = ttl(object.head.lifetime, age);
                self.represent(
                    &req,
                    &object.head,
                    Source::Bytes(object.body.clone()),
                    age,
                    CacheResult::Revalidated,
                    format!("cdn; fwd=stale; fwd-status=304; ttl={ttl}"),
                )
            }
            Outcome::Pass { response, status, reason } => {
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
                            status: format!("cdn; fwd=miss; fwd-status={}; detail={reason}", status.as_u16()),
                        }
                    }
                    None => self.forward_get(&req, conn).await,
                }
            }
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

    async fn run_fill(self: Arc<Self>, job: FillJob) {
        let publish = |outcome: Outcome| {
            job.fill.outcome.send_replace(Some(Arc::new(outcome)));
        };
        let uri = match self.upstream.uri(&job.path) {
            Ok(uri) => uri,
            Err(e) => {
                publish(Outcome::Failed(e));
                self.finish_fill(&job);
                return;
            }
        };
        let mut request = Request::new(empty());
        *request.uri_mut() = uri;
        *request.headers_mut() = job.origin_headers.clone();
        let request_time = self.clock.now();
        let response = match self.upstream.send(request).await {
            Ok(response) => response,
            Err(e) => {
                warn!(key = %job.key, error = %e, "origin fetch failed");
                self.metrics.origin_error(matches!(e, FetchError::Timeout));
                publish(Outcome::Failed(e));
                self.finish_fill(&job);
                return;
            }
        };
        self.metrics.origin_status(response.status().as_u16());
        let response_time = self.clock.now();
        let (mut rp, body) = response.into_parts();
        strip_hop_by_hop(&mut rp.headers);
        if !rp.headers.contains_key(header::DATE)
            && let Ok(date) = HeaderValue::from_str(&httpdate::fmt_http_date(SystemTime::now()))
        {
            rp.headers.insert(header::DATE, date);
        }
        if rp.status == StatusCode::NOT_MODIFIED
            && let Some(stale) = &job.stale
        {
            let updated = refreshed(stale, &rp.headers, request_time, response_time, &self.settings);
            self.store.insert(&job.key, updated.clone()).await;
            publish(Outcome::Updated(updated));
            self.finish_fill(&job);
            return;
        }
        let directives = Directives::from_headers(&rp.headers);
        let authorization = job.client_headers.contains_key(header::AUTHORIZATION);
        let content_length =
            rp.headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok());
        let storable = policy::storable(
            &Method::GET,
            &job.client_directives,
            authorization,
            rp.status,
            &rp.headers,
            &directives,
            &self.settings,
        )
        .and_then(|()| if content_length.is_some_and(|len| len > self.max_object) { Err("too-large") } else { Ok(()) });
        if let Err(reason) = storable {
            debug!(key = %job.key, reason, "not storable");
            let status = rp.status;
            publish(Outcome::Pass { response: Mutex::new(Some(Response::from_parts(rp, body))), status, reason });
            self.finish_fill(&job);
            return;
        }
        let tags = surrogate_keys(&rp.headers);
        rp.headers.remove(SURROGATE_KEY);
        rp.headers.remove(CACHE_TAG);
        let vary = vary_values(&policy::vary_names(&rp.headers).unwrap_or_default(), &job.client_headers);
        let lifetime = policy::freshness_lifetime(rp.status, &rp.headers, &directives, response_time, &self.settings);
        let timing = Timing::new(&rp.headers, request_time, response_time);
        let head = Arc::new(Head { status: rp.status, headers: rp.headers, timing, directives, lifetime, tags, vary });
        let growing = Growing::new(content_length);
        publish(Outcome::Stream { head: head.clone(), body: growing.clone() });

        let mut body = body;
        let idle = self.upstream.idle_timeout();
        let result = loop {
            match tokio::time::timeout(idle, body.frame()).await {
                Err(_) => break Err("origin body timed out".to_string()),
                Ok(None) => break Ok(()),
                Ok(Some(Err(e))) => break Err(format!("origin body failed: {e}")),
                Ok(Some(Ok(frame))) => {
                    if let Ok(data) = frame.into_data() {
                        growing.push(data);
                    }
                }
            }
        };
        let result = result.and_then(|()| match content_length {
            Some(expected) if expected != growing.len() => {
                Err(format!("origin body ended at {} of {expected} bytes", growing.len()))
            }
            _ => Ok(()),
        });
        match result {
            Ok(()) => {
                growing.finish(Ok(()));
                if growing.len() <= self.max_object
                    && let Some(bytes) = growing.concat()
                {
                    self.store.insert(&job.key, Object { head, body: bytes }).await;
                }
            }
            Err(e) => {
                warn!(key = %job.key, error = %e, "fill failed; nothing stored");
                growing.finish(Err(e));
            }
        }
        self.finish_fill(&job);
    }

    fn finish_fill(&self, job: &FillJob) {
        let mut inflight = self.inflight.lock().unwrap_or_else(PoisonError::into_inner);
        if inflight.get(&job.key).is_some_and(|fill| Arc::ptr_eq(fill, &job.fill)) {
            inflight.remove(&job.key);
        }
    }

    /// The response for a stored or filling representation: conditionals, ranges, HEAD.
    fn represent(
        &self,
        req: &Req,
        head: &Head,
        source: Source,
        age: Duration,
        result: CacheResult,
        status: String,
    ) -> Served {
        let parts = &req.parts;
        let mut headers = head.headers.clone();
        headers.insert(header::AGE, HeaderValue::from(age.as_secs()));
        let ok = head.status == StatusCode::OK;
        if ok && not_modified(&parts.headers, &headers) {
            let mut response = Response::new(empty());
            *response.status_mut() = StatusCode::NOT_MODIFIED;
            for name in [
                header::CACHE_CONTROL,
                header::CONTENT_LOCATION,
                header::DATE,
                header::ETAG,
                header::EXPIRES,
                header::VARY,
                header::LAST_MODIFIED,
                header::AGE,
            ] {
                for value in headers.get_all(&name) {
                    response.headers_mut().append(name.clone(), value.clone());
                }
            }
            return Served { response, result, status };
        }
        let len = match &source {
            Source::Bytes(bytes) => Some(bytes.len() as u64),
            Source::Growing(growing) => growing.expected,
        };
        let head_only = parts.method == Method::HEAD;
        if let (true, Some(len)) = (ok, len) {
            headers.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
            let range_header = parts.headers.get(header::RANGE).and_then(|v| v.to_str().ok());
            if let Some(specs) =
                range_header.filter(|_| if_range_holds(&parts.headers, &headers)).and_then(range::parse)
            {
                match range::resolve(&specs, len) {
                    range::Resolved::Full => {}
                    range::Resolved::Unsatisfiable => {
                        headers.remove(header::CONTENT_LENGTH);
                        if let Ok(value) = HeaderValue::from_str(&range::unsatisfied_range(len)) {
                            headers.insert(header::CONTENT_RANGE, value);
                        }
                        headers.insert(header::CONTENT_LENGTH, HeaderValue::from(0));
                        return Served {
                            response: build(StatusCode::RANGE_NOT_SATISFIABLE, headers, empty()),
                            result,
                            status,
                        };
                    }
                    range::Resolved::Partial(ranges) if ranges.len() == 1 => {
                        let r = ranges[0].clone();
                        if let Ok(value) = HeaderValue::from_str(&range::content_range(&r, len)) {
                            headers.insert(header::CONTENT_RANGE, value);
                        }
                        headers.insert(header::CONTENT_LENGTH, HeaderValue::from(r.end - r.start));
                        let body = if head_only { empty() } else { source.range_body(r) };
                        return Served { response: build(StatusCode::PARTIAL_CONTENT, headers, body), result, status };
                    }
                    range::Resolved::Partial(ranges) => {
                        let part_type =
                            headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).map(str::to_owned);
                        let multipart = range::Multipart::new(&ranges, len, part_type.as_deref(), &range::boundary());
                        headers.remove(header::CONTENT_RANGE);
                        if let Ok(value) = HeaderValue::from_str(&multipart.content_type) {
                            headers.insert(header::CONTENT_TYPE, value);
                        }
                        headers.insert(header::CONTENT_LENGTH, HeaderValue::from(multipart.content_length));
                        let body = if head_only { empty() } else { source.multipart_body(&ranges, &multipart) };
                        return Served { response: build(StatusCode::PARTIAL_CONTENT, headers, body), result, status };
                    }
                }
            }
        }
        if let Some(len) = len {
            headers.insert(header::CONTENT_LENGTH, HeaderValue::from(len));
        }
        let body = if head_only { empty() } else { source.full_body() };
        Served { response: build(head.status, headers, body), result, status }
    }
}

/// Where a representation's bytes come from.
enum Source {
    Bytes(Bytes),
    Growing(Arc<Growing>),
}

impl Source {
    fn full_body(self) -> Body {
        match self {
            Self::Bytes(bytes) => full(bytes),
            Self::Growing(growing) => stream_body(growing.reader(None)),
        }
    }

    fn range_body(self, range: std::ops::Range<u64>) -> Body {
        match self {
            Self::Bytes(bytes) => full(bytes.slice(range.start as usize..range.end as usize)),
            Self::Growing(growing) => stream_body(growing.reader(Some(range))),
        }
    }

    fn multipart_body(self, ranges: &[std::ops::Range<u64>], multipart: &range::Multipart) -> Body {
        let mut pieces: Vec<futures_util::stream::BoxStream<'static, Result<Bytes, BoxError>>> = Vec::new();
        for (head, range) in multipart.heads.iter().zip(ranges) {
            pieces.push(stream::once(std::future::ready(Ok(head.clone()))).boxed());
            match &self {
                Self::Bytes(bytes) => {
                    let part = bytes.slice(range.start as usize..range.end as usize);
                    pieces.push(stream::once(std::future::ready(Ok(part))).boxed());
                }
                Self::Growing(growing) => pieces.push(growing.reader(Some(range.clone())).boxed()),
            }
        }
        pieces.push(stream::once(std::future::ready(Ok(multipart.tail.clone()))).boxed());
        stream_body(stream::iter(pieces).flatten())
    }
}

fn stream_body(stream: impl futures_util::Stream<Item = Result<Bytes, BoxError>> + Send + 'static) -> Body {
    StreamBody::new(stream.map(|chunk| chunk.map(Frame::data))).boxed_unsync()
}

fn build(status: StatusCode, headers: HeaderMap, body: Body) -> Response<Body> {
    let mut response = Response::new(body);
    *response.status_mut() = status;
    *response.headers_mut() = headers;
    response
}

struct FillJob {
    fill: Arc<Fill>,
    key: String,
    path: String,
    origin_headers: HeaderMap,
    client_headers: HeaderMap,
    client_directives: Directives,
    stale: Option<Object>,
}

/// A stored response refreshed by a 304 (RFC 9111 §4.3.4).
fn refreshed(
    stale: &Object,
    update: &HeaderMap,
    request_time: SystemTime,
    response_time: SystemTime,
    settings: &Settings,
) -> Object {
    let mut headers = stale.head.headers.clone();
    let mut replaced: Vec<&HeaderName> = Vec::new();
    for (name, value) in update {
        if policy::keep_on_update(name) || name == SURROGATE_KEY || name == CACHE_TAG {
            continue;
        }
        if !replaced.contains(&name) {
            headers.remove(name);
            replaced.push(name);
        }
        headers.append(name.clone(), value.clone());
    }
    let directives = Directives::from_headers(&headers);
    let lifetime = policy::freshness_lifetime(stale.head.status, &headers, &directives, response_time, settings);
    let timing = Timing::new(&headers, request_time, response_time);
    let mut tags = stale.head.tags.clone();
    for tag in surrogate_keys(update) {
        if !tags.contains(&tag) {
            tags.push(tag);
        }
    }
    let head =
        Head { status: stale.head.status, headers, timing, directives, lifetime, tags, vary: stale.head.vary.clone() };
    Object { head: Arc::new(head), body: stale.body.clone() }
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

/// Evaluates the client's If-None-Match / If-Modified-Since against a stored
/// response (RFC 9110 §13.1.2, §13.1.3): `true` → answer 304.
fn not_modified(request: &HeaderMap, stored: &HeaderMap) -> bool {
    if let Some(condition) = request.get(header::IF_NONE_MATCH).and_then(|v| v.to_str().ok()) {
        let Some(etag) = stored.get(header::ETAG).and_then(|v| v.to_str().ok()) else {
            return false;
        };
        let etag = etag.trim().trim_start_matches("W/");
        return condition.split(',').map(str::trim).any(|tag| tag == "*" || tag.trim_start_matches("W/") == etag);
    }
    let Some(since) = policy::date_header(request, &header::IF_MODIFIED_SINCE) else {
        return false;
    };
    policy::date_header(stored, &header::LAST_MODIFIED).is_some_and(|modified| modified <= since)
}

/// If-Range (RFC 9110 §13.1.5): the range applies only if the validator matches
/// strongly; an absent If-Range always holds.
fn if_range_holds(request: &HeaderMap, stored: &HeaderMap) -> bool {
    let Some(condition) = request.get(header::IF_RANGE).and_then(|v| v.to_str().ok()) else {
        return true;
    };
    let condition = condition.trim();
    if condition.starts_with('"') {
        return stored
            .get(header::ETAG)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|etag| !etag.starts_with("W/") && etag.trim() == condition);
    }
    if condition.starts_with("W/") {
        return false;
    }
    match (httpdate::parse_http_date(condition), policy::date_header(stored, &header::LAST_MODIFIED)) {
        (Ok(date), Some(modified)) => date == modified,
        _ => false,
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
    fn conditionals() {
        let stored = map(&[("etag", "\"abc\""), ("last-modified", "Tue, 15 Nov 1994 12:45:26 GMT")]);
        assert!(not_modified(&map(&[("if-none-match", "\"x\", W/\"abc\"")]), &stored));
        assert!(not_modified(&map(&[("if-none-match", "*")]), &stored));
        assert!(!not_modified(&map(&[("if-none-match", "\"x\"")]), &stored));
        assert!(not_modified(&map(&[("if-modified-since", "Tue, 15 Nov 1994 12:45:26 GMT")]), &stored));
        assert!(!not_modified(&map(&[("if-modified-since", "Mon, 14 Nov 1994 12:45:26 GMT")]), &stored));
        // If-None-Match takes precedence over If-Modified-Since.
        assert!(!not_modified(
            &map(&[("if-none-match", "\"x\""), ("if-modified-since", "Tue, 15 Nov 1994 12:45:26 GMT")]),
            &stored
        ));
        assert!(if_range_holds(&map(&[("if-range", "\"abc\"")]), &stored));
        assert!(!if_range_holds(&map(&[("if-range", "\"old\"")]), &stored));
        assert!(if_range_holds(&map(&[("if-range", "Tue, 15 Nov 1994 12:45:26 GMT")]), &stored));
        assert!(!if_range_holds(&map(&[("if-range", "W/\"abc\"")]), &stored));
        assert!(if_range_holds(&map(&[]), &stored));
    }

    #[test]
    fn tags() {
        let headers = map(&[("surrogate-key", "video  home"), ("cache-tag", "a, b,video")]);
        assert_eq!(surrogate_keys(&headers), vec!["video", "home", "a", "b"]);
    }
}
