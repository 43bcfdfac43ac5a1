//! Fetching from the origin: fills shared by every request that waits for them
//! (coalescing), sliced fills of large objects, revalidations, and plain forwards.
//!
//! A miss sends one *probe*: a GET for the slice that covers the first byte the
//! client wants (`Range: bytes=k·S-(k+1)·S−1`). A 206 tells the total length: a
//! small object comes back whole and is stored whole; a large one is stored as a
//! head plus slices, each fetched (once, coalesced) when a reader reaches it. An
//! origin that ignores ranges answers 200 and the object is filled whole.

use std::{
    sync::{Arc, Mutex},
    time::SystemTime,
};

use bytes::Bytes;
use cdn_http::{
    key::{CACHE_TAG, SURROGATE_KEY, surrogate_keys, vary_values},
    policy::{self, Directives, Settings, Timing},
};
use cdn_node::listener::Body;
use http::{HeaderMap, HeaderName, HeaderValue, Method, Response, StatusCode, header};
use http_body_util::BodyExt as _;
use hyper::body::Incoming;
use tracing::{debug, warn};

use crate::{
    body::Growing,
    cache::{Cache, Fill, Flight, Found, Head, Object, Outcome, Sliced},
    clock::Clock,
    error::FetchError,
    metrics::Metrics,
    pool::OriginRequest,
    sites::{Site, forced_lifetime},
    tier::Tiers,
    upstream::strip_hop_by_hop,
};

/// Fetches from the origin into the cache: coalesced fills of whole objects and
/// slices, revalidations, and requests only forwarded.
pub(crate) struct Fetcher {
    cache: Arc<Cache>,
    tiers: Arc<Tiers>,
    metrics: Metrics,
    clock: Clock,
    settings: FetchSettings,
}

/// How the fetcher stores what it fetches.
#[derive(Debug, Clone)]
pub(crate) struct FetchSettings {
    /// The RFC 9111 policy's settings.
    pub(crate) policy: Settings,
    /// The largest object stored (`cache.max_object`).
    pub(crate) max_object: u64,
    /// Large objects are fetched and stored in slices of this size (`cache.slice`).
    pub(crate) slice_size: u64,
    /// The longest pause allowed between body chunks from an origin.
    pub(crate) idle: std::time::Duration,
    /// What the edge compresses.
    pub(crate) compress: crate::compress::Settings,
}

impl FetchSettings {
    /// The settings of an edge's `[cache]` section.
    pub(crate) fn from_config(cache: &crate::config::Cache, origin: Option<&crate::config::Origin>) -> Self {
        let policy = Settings {
            heuristic_max: cache.heuristic_max,
            store_set_cookie: cache.store_set_cookie,
            ..Settings::default()
        };
        let idle = origin.map_or(crate::config::DEFAULT_TIMEOUT, |origin| origin.timeout);
        let compress = crate::compress::Settings::from_config(cache);
        Self { policy, max_object: cache.max_object.as_u64(), slice_size: cache.slice.as_u64(), idle, compress }
    }
}

/// What a fill needs from the request that starts it.
pub(crate) struct FillRequest {
    /// The site (its origins and rules).
    pub(crate) site: Arc<Site>,
    /// The index of the site's rule for the path.
    pub(crate) rule: Option<usize>,
    /// The node ids in the request's `CDN-Loop`.
    pub(crate) seen: Vec<String>,
    /// The cache key.
    pub(crate) key: String,
    /// Path and query for the origin.
    pub(crate) path: String,
    /// Headers for the origin (see [`strip_for_shared`]).
    pub(crate) origin_headers: HeaderMap,
    /// The client's own headers (Vary, Range, Authorization, conditionals).
    pub(crate) client_headers: HeaderMap,
    /// The client's Cache-Control.
    pub(crate) client_directives: Directives,
}

struct FillJob {
    fill: Arc<Fill>,
    site: Arc<Site>,
    rule: Option<usize>,
    seen: Vec<String>,
    key: String,
    path: String,
    origin_headers: HeaderMap,
    client_headers: HeaderMap,
    client_directives: Directives,
    /// Whether the client's request had no Range or conditional headers (so a
    /// response to our cleaned request is a response to theirs).
    client_plain: bool,
    stale: Option<Found>,
    /// The slice to probe for, or `None` for a plain GET.
    probe: Option<u64>,
    /// The purge epoch when the fill started: a purge during the fill means its
    /// response may be what was purged, so it is served but not stored.
    epoch: u64,
}

/// Headers a fill must not forward from the client: the fill's answer is shared.
pub(crate) const CLIENT_CONDITIONALS: [HeaderName; 6] = [
    header::IF_NONE_MATCH,
    header::IF_MODIFIED_SINCE,
    header::IF_MATCH,
    header::IF_UNMODIFIED_SINCE,
    header::IF_RANGE,
    header::RANGE,
];

/// Request headers that are not part of the cache key but that origins (and their
/// frameworks) use to build responses: forwarded to a shared fill they would let one
/// client poison the object every client gets. A fill never sends them; requests
/// the edge only forwards (not stored) still do.
pub(crate) const UNKEYED: [HeaderName; 12] = [
    HeaderName::from_static("x-forwarded-host"),
    HeaderName::from_static("x-forwarded-server"),
    HeaderName::from_static("x-forwarded-port"),
    HeaderName::from_static("x-forwarded-scheme"),
    HeaderName::from_static("x-forwarded-prefix"),
    HeaderName::from_static("x-original-url"),
    HeaderName::from_static("x-rewrite-url"),
    HeaderName::from_static("x-http-method-override"),
    HeaderName::from_static("x-http-method"),
    HeaderName::from_static("x-method-override"),
    HeaderName::from_static("x-host"),
    HeaderName::from_static("forwarded"),
];

/// Removes what a shared fill must not forward from its client: conditionals and
/// ranges (the fill wants the whole representation) and the [`UNKEYED`] headers.
pub(crate) fn strip_for_shared(headers: &mut HeaderMap) {
    for name in CLIENT_CONDITIONALS.iter().chain(&UNKEYED) {
        headers.remove(name);
    }
}

impl Fetcher {
    pub(crate) fn new(
        cache: Arc<Cache>,
        tiers: Arc<Tiers>,
        metrics: Metrics,
        clock: Clock,
        settings: FetchSettings,
    ) -> Self {
        Self { cache, tiers, metrics, clock, settings }
    }

    /// The tiers fills go through.
    pub(crate) fn tiers(&self) -> &Arc<Tiers> {
        &self.tiers
    }

    /// Joins the fill of `key` or starts one (in a task of its own, so a client
    /// that goes away does not abort it for the others). `request` is built only
    /// when this request starts the fill (the waiters of a miss storm build
    /// nothing); `stale` is the stored response being revalidated, if any.
    pub(crate) fn join_or_start(
        self: &Arc<Self>,
        key: &str,
        request: impl FnOnce() -> FillRequest,
        stale: Option<Found>,
    ) -> Flight {
        let flight = self.cache.join_or_start(key);
        let Flight::Leader(fill) = &flight else { return flight };
        let FillRequest { site, rule, seen, key, path, mut origin_headers, client_headers, client_directives } =
            request();
        if let Some(stale) = &stale {
            let head = stale.head();
            if let Some(etag) = head.headers.get(header::ETAG) {
                origin_headers.insert(header::IF_NONE_MATCH, etag.clone());
            }
            if let Some(modified) = head.headers.get(header::LAST_MODIFIED) {
                origin_headers.insert(header::IF_MODIFIED_SINCE, modified.clone());
            }
        }
        let client_plain = !CLIENT_CONDITIONALS.iter().any(|name| client_headers.contains_key(name));
        let job = FillJob {
            fill: fill.clone(),
            site,
            rule,
            seen,
            key,
            path,
            origin_headers,
            probe: Some(self.probe_index(&client_headers)),
            client_headers,
            client_directives,
            client_plain,
            stale,
            epoch: self.cache.epoch(),
        };
        tokio::spawn(self.clone().run_fill(job));
        flight
    }

    /// Sends a request to the origin as it is (not coalesced, not stored).
    pub(crate) async fn forward(
        &self,
        site: &Site,
        method: Method,
        path: &str,
        headers: HeaderMap,
        body: Body,
    ) -> Result<Response<Incoming>, FetchError> {
        self.tiers.count_origin();
        site.pool.send(OriginRequest { method, path, headers }, body, &self.metrics).await
    }

    /// The slice holding the first byte a request wants.
    fn probe_index(&self, request: &HeaderMap) -> u64 {
        let first = request
            .get(header::RANGE)
            .and_then(|v| v.to_str().ok())
            .and_then(cdn_http::range::parse)
            .and_then(|specs| specs.into_iter().next());
        match first {
            Some(cdn_http::range::Spec::From { first, .. }) => first / self.settings.slice_size,
            _ => 0,
        }
    }

    /// Sends a fill's request up the tiers; with whether the answer came from the
    /// edge of this region that owns the key (then it is not stored here).
    async fn send_fill(
        &self,
        job: &FillJob,
        range: Option<std::ops::Range<u64>>,
    ) -> Result<(Response<Incoming>, bool), FetchError> {
        let mut headers = job.origin_headers.clone();
        if let Some(range) = range {
            let value = format!("bytes={}-{}", range.start, range.end - 1);
            if let Ok(value) = HeaderValue::from_str(&value) {
                headers.insert(header::RANGE, value);
            }
        }
        let request = OriginRequest { method: Method::GET, path: &job.path, headers };
        let hops = self.tiers.plan(&job.site, &job.key, &job.seen);
        self.tiers.send(&job.site, &hops, request, &self.metrics).await
    }

    async fn run_fill(self: Arc<Self>, job: FillJob) {
        self.run_fill_inner(&job).await;
        self.cache.land(&job.key, &job.fill);
    }

    async fn run_fill_inner(self: &Arc<Self>, job: &FillJob) {
        // A fill that landed between this request's miss and this fill's start may
        // have stored the object: no second fetch for it (a shield asked by five edges
        // at once fetched a key twice). Not when the client asked to revalidate.
        if job.stale.is_none()
            && !job.client_directives.no_cache
            && let Some((found, _)) = self.cache.lookup(&job.key, &job.client_headers).await
        {
            let head = found.head();
            let lifetime = forced_lifetime(job.site.rule(job.rule), head.status).unwrap_or(head.lifetime);
            let purged = head.purged.load(std::sync::atomic::Ordering::Acquire);
            if !purged && head.timing.current_age(self.clock.now()) < lifetime {
                job.fill.publish(Outcome::Stored(found));
                return;
            }
        }
        let mut probe = job.probe.map(|index| index * self.settings.slice_size..(index + 1) * self.settings.slice_size);
        loop {
            let request_time = self.clock.now();
            let (response, from_owner) = match self.send_fill(job, probe.clone()).await {
                Ok(sent) => sent,
                Err(e) => {
                    warn!(key = %job.key, error = %e, "origin fetch failed");
                    job.fill.publish(Outcome::Failed(e));
                    return;
                }
            };
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
                let updated =
                    self.refreshed(&job.key, stale, &rp.headers, request_time, response_time, job.epoch).await;
                job.fill.publish(Outcome::Updated(updated));
                return;
            }
            let probed = probe.is_some();
            if probed && rp.status == StatusCode::RANGE_NOT_SATISFIABLE {
                // Shorter than the probed slice (or empty): ask for it whole.
                probe = None;
                continue;
            }
            if probed && rp.status == StatusCode::PARTIAL_CONTENT {
                let Some((range, total)) = content_range(&rp.headers) else {
                    job.fill.publish(Outcome::Failed(FetchError::BadContentRange));
                    return;
                };
                if range.start == 0 && range.end == total && total <= self.settings.slice_size {
                    // The whole object fit in the probe: store it whole.
                    rp.status = StatusCode::OK;
                    rp.headers.remove(header::CONTENT_RANGE);
                    rp.headers.insert(header::CONTENT_LENGTH, HeaderValue::from(total));
                } else {
                    let times = (request_time, response_time);
                    match self.start_sliced(job, rp, body, range, total, times, !from_owner).await {
                        Ok(()) => return,
                        Err(reason) => {
                            debug!(key = %job.key, reason, "not sliceable, fetching whole");
                            probe = None;
                            continue;
                        }
                    }
                }
            }
            self.fill_whole(job, rp, body, request_time, response_time, !from_owner).await;
            return;
        }
    }

    /// A whole (non-sliced) response: stream it into the cache, or pass it on.
    async fn fill_whole(
        self: &Arc<Self>,
        job: &FillJob,
        mut rp: http::response::Parts,
        body: Incoming,
        request_time: SystemTime,
        response_time: SystemTime,
        store: bool,
    ) {
        let directives = Directives::response(&rp.headers);
        let authorization = job.client_headers.contains_key(header::AUTHORIZATION);
        let content_length = content_length(&rp.headers);
        let forced = forced_lifetime(job.site.rule(job.rule), rp.status);
        let storable = policy::storable(
            &Method::GET,
            &job.client_directives,
            authorization,
            rp.status,
            &rp.headers,
            &directives,
            &self.settings.policy,
        );
        let storable = forced_storable(storable, forced);
        let bypass = job.site.rule(job.rule).is_some_and(|rule| rule.bypass);
        let storable = if bypass { Err(policy::Reason::NoStore) } else { storable };
        let kept = policy::keep(storable, rp.status, content_length, self.settings.max_object, job.stale.is_some());
        if let Err(reason) = kept {
            debug!(key = %job.key, %reason, "not storable");
            if reason.remember() {
                self.cache.mark_pass(&job.key);
            }
            let status = rp.status;
            // Our request differed from the client's only in headers it did not send.
            let handover = job.client_plain && status != StatusCode::PARTIAL_CONTENT;
            let response = handover.then(|| Response::from_parts(rp, body));
            job.fill.publish(Outcome::Pass { response: Mutex::new(response), status });
            return;
        }
        let tags = surrogate_keys(&rp.headers);
        rp.headers.remove(SURROGATE_KEY);
        rp.headers.remove(CACHE_TAG);
        let vary = vary_values(&policy::vary_names(&rp.headers).unwrap_or_default(), &job.client_headers);
        crate::compress::prepare(&self.settings.compress, rp.status, &mut rp.headers, content_length);
        let lifetime =
            policy::freshness_lifetime(rp.status, &rp.headers, &directives, response_time, &self.settings.policy);
        let timing = Timing::new(&rp.headers, request_time, response_time);
        let head = Arc::new(Head {
            status: rp.status,
            headers: owned(rp.headers),
            timing,
            directives,
            lifetime,
            tags,
            vary,
            purged: Default::default(),
        });
        let growing = Growing::new(content_length);
        job.fill.publish(Outcome::Stream { head: head.clone(), body: growing.clone() });
        if self.read_into(&job.key, body, &growing, content_length).await
            && store
            && growing.len() <= self.settings.max_object
            && self.cache.epoch() == job.epoch
            && let Some(bytes) = growing.concat()
        {
            let (compression, settings) = (&self.metrics.compression, &self.settings.compress);
            crate::compress::store(
                &self.cache,
                compression,
                settings,
                &job.key,
                Object { head, body: bytes },
                job.epoch,
            )
            .await;
        }
    }

    /// Reads an origin body into `growing`; `true` when it arrived whole.
    async fn read_into(&self, key: &str, mut body: Incoming, growing: &Growing, expected: Option<u64>) -> bool {
        let idle = self.settings.idle;
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
        let result = result.and_then(|()| match expected {
            Some(expected) if expected != growing.len() => {
                Err(format!("origin body ended at {} of {expected} bytes", growing.len()))
            }
            _ => Ok(()),
        });
        match result {
            Ok(()) => {
                growing.finish(Ok(()));
                true
            }
            Err(e) => {
                warn!(%key, error = %e, "fill failed; nothing stored");
                growing.finish(Err(e));
                false
            }
        }
    }

    /// A probe answered 206 for part of a large object: store its head, stream the
    /// probed slice into the cache. `Err` when the object cannot be sliced.
    #[allow(clippy::too_many_arguments)]
    async fn start_sliced(
        self: &Arc<Self>,
        job: &FillJob,
        mut rp: http::response::Parts,
        body: Incoming,
        range: std::ops::Range<u64>,
        total: u64,
        (request_time, response_time): (SystemTime, SystemTime),
        store: bool,
    ) -> Result<(), &'static str> {
        let etag = rp.headers.get(header::ETAG).filter(|v| !v.as_bytes().starts_with(b"W/")).cloned();
        if etag.is_none() {
            return Err("no strong etag");
        }
        if !policy::vary_names(&rp.headers).is_some_and(|names| names.is_empty()) {
            return Err("vary");
        }
        let index = range.start / self.settings.slice_size;
        let slice_start = index * self.settings.slice_size;
        if range != (slice_start..(slice_start + self.settings.slice_size).min(total)) {
            return Err("origin answered another range");
        }
        rp.headers.remove(header::CONTENT_RANGE);
        rp.headers.insert(header::CONTENT_LENGTH, HeaderValue::from(total));
        let directives = Directives::response(&rp.headers);
        let authorization = job.client_headers.contains_key(header::AUTHORIZATION);
        let storable = policy::storable(
            &Method::GET,
            &job.client_directives,
            authorization,
            StatusCode::OK,
            &rp.headers,
            &directives,
            &self.settings.policy,
        );
        forced_storable(storable, forced_lifetime(job.site.rule(job.rule), StatusCode::OK))
            .map_err(policy::Reason::as_str)?;
        let tags = surrogate_keys(&rp.headers);
        rp.headers.remove(SURROGATE_KEY);
        rp.headers.remove(CACHE_TAG);
        let lifetime =
            policy::freshness_lifetime(StatusCode::OK, &rp.headers, &directives, response_time, &self.settings.policy);
        let timing = Timing::new(&rp.headers, request_time, response_time);
        let head = Arc::new(Head {
            status: StatusCode::OK,
            headers: owned(rp.headers),
            timing,
            directives,
            lifetime,
            tags,
            vary: vec![],
            purged: Default::default(),
        });
        let sliced = Arc::new(Sliced { head, total, slice: self.settings.slice_size, etag: etag.clone() });
        if store {
            self.cache.insert_sliced(&job.key, sliced.clone(), job.epoch).await;
        }

        // The probed slice is a slice fill of its own that readers can join.
        let slice_key = slice_fill_key(&job.key, &sliced, index);
        let slice_fill = self.cache.join_or_start(&slice_key).fill().clone();
        let growing = Growing::new(Some(range.end - range.start));
        slice_fill.publish(Outcome::Slice(growing.clone()));
        job.fill.publish(Outcome::Sliced(sliced.clone()));
        self.cache.land(&job.key, &job.fill);
        if self.read_into(&slice_key, body, &growing, Some(range.end - range.start)).await
            && store
            && let Some(bytes) = growing.concat()
        {
            self.cache.insert_slice(&job.key, index, etag, bytes, job.epoch).await;
        }
        self.cache.land(&slice_key, &slice_fill);
        Ok(())
    }

    /// Slice `index` of a sliced object: from the cache, or joined to (or started
    /// as) a coalesced slice fill.
    pub(crate) async fn slice(
        self: &Arc<Self>,
        key: &str,
        sliced: &Arc<Sliced>,
        index: u64,
        origin: &Arc<SliceOrigin>,
    ) -> Result<SliceData, FetchError> {
        if let Some(bytes) = self.cache.slice(key, sliced, index).await {
            return Ok(SliceData::Stored(bytes));
        }
        let fill_key = slice_fill_key(key, sliced, index);
        let flight = self.cache.join_or_start(&fill_key);
        let fill = flight.fill().clone();
        if let Flight::Leader(fill) = flight {
            let (fetcher, key, sliced, origin) = (self.clone(), key.to_string(), sliced.clone(), origin.clone());
            tokio::spawn(async move {
                fetcher.run_slice_fill(&key, &sliced, index, &origin, &fill).await;
                fetcher.cache.land(&fill_key, &fill);
            });
        }
        match &*fill.outcome().await {
            Outcome::Slice(growing) => Ok(SliceData::Filling(growing.clone())),
            Outcome::Failed(e) => Err(e.clone()),
            _ => Err(FetchError::Abandoned),
        }
    }

    async fn run_slice_fill(&self, key: &str, sliced: &Sliced, index: u64, origin: &SliceOrigin, fill: &Fill) {
        // A fill of this slice that landed between the reader's miss and this fill's
        // start has stored it: no second fetch. The probed slice races its own
        // reader so: the client whose miss sent the probe asks for that slice while
        // it arrives, may look in the cache just before it is stored and find the
        // probe's fill landed just after.
        if let Some(bytes) = self.cache.slice(key, sliced, index).await {
            return fill.publish(Outcome::Slice(Growing::whole(bytes)));
        }
        let epoch = self.cache.epoch();
        let bounds = sliced.bounds(index);
        let mut headers = origin.headers.clone();
        if let Ok(value) = HeaderValue::from_str(&format!("bytes={}-{}", bounds.start, bounds.end - 1)) {
            headers.insert(header::RANGE, value);
        }
        if let Some(etag) = &sliced.etag {
            headers.insert(header::IF_MATCH, etag.clone());
        }
        let request = OriginRequest { method: Method::GET, path: &origin.path, headers };
        let hops = self.tiers.plan(&origin.site, key, &origin.seen);
        let (response, from_owner) = match self.tiers.send(&origin.site, &hops, request, &self.metrics).await {
            Ok(sent) => sent,
            Err(e) => return fill.publish(Outcome::Failed(e)),
        };
        let (rp, body) = response.into_parts();
        let same = rp.status == StatusCode::PARTIAL_CONTENT
            && content_range(&rp.headers) == Some((bounds.clone(), sliced.total))
            && rp.headers.get(header::ETAG) == sliced.etag.as_ref();
        if !same {
            // The object changed at the origin (or the origin misbehaves): never splice
            // two versions. Drop the old head and slices; the next request starts over.
            warn!(%key, status = %rp.status, "object changed between slices; dropping it");
            self.cache.invalidate_url(key);
            return fill.publish(Outcome::Failed(FetchError::Changed));
        }
        let growing = Growing::new(Some(bounds.end - bounds.start));
        fill.publish(Outcome::Slice(growing.clone()));
        if self.read_into(key, body, &growing, Some(bounds.end - bounds.start)).await
            && !from_owner
            && let Some(bytes) = growing.concat()
        {
            self.cache.insert_slice(key, index, sliced.etag.clone(), bytes, epoch).await;
        }
    }

    /// A stored response refreshed by a 304 (RFC 9111 §4.3.4), stored again.
    async fn refreshed(
        &self,
        key: &str,
        stale: &Found,
        update: &HeaderMap,
        request_time: SystemTime,
        response_time: SystemTime,
        epoch: u64,
    ) -> Found {
        let head = refreshed_head(stale.head(), update, request_time, response_time, &self.settings.policy);
        match stale {
            Found::Object(object) => {
                let object = Object { head, body: object.body.clone() };
                self.cache.insert(key, object.clone(), epoch).await;
                Found::Object(object)
            }
            Found::Sliced(sliced) => {
                let sliced =
                    Arc::new(Sliced { head, total: sliced.total, slice: sliced.slice, etag: sliced.etag.clone() });
                self.cache.insert_sliced(key, sliced.clone(), epoch).await;
                Found::Sliced(sliced)
            }
        }
    }
}

impl Fetcher {
    /// A 200 answering a HEAD the edge forwarded (not a fill: fills are GETs) updates
    /// the stored GET response the request would have been served, or drops it when
    /// the validators say the representation changed (RFC 9111 §4.3.5).
    pub(crate) async fn head_answered(
        &self,
        key: &str,
        request: &HeaderMap,
        response: &HeaderMap,
        (request_time, response_time): (SystemTime, SystemTime),
    ) {
        let Some((found, _)) = self.cache.lookup(key, request).await else { return };
        let mut update = response.clone();
        strip_hop_by_hop(&mut update);
        match policy::head_update(&found.head().headers, &update) {
            policy::HeadUpdate::Invalidate => {
                debug!(%key, "a HEAD response changed the validators: dropping the stored response");
                self.cache.invalidate_url(key);
            }
            policy::HeadUpdate::Update => {
                debug!(%key, "a HEAD response updates the stored response");
                let epoch = self.cache.epoch();
                let _ = self.refreshed(key, &found, &update, request_time, response_time, epoch).await;
            }
        }
    }
}

/// Where a sliced object's slices come from: its site's origins, with the path
/// and headers of the request that found it.
pub(crate) struct SliceOrigin {
    pub(crate) site: Arc<Site>,
    /// The node ids in the request's `CDN-Loop`.
    pub(crate) seen: Vec<String>,
    pub(crate) path: String,
    pub(crate) headers: HeaderMap,
}

/// A response the RFC leaves without freshness is storable when a rule gives it
/// one (`ttl`, `negative_ttl`); a rule never overrides the origin's `no-store`,
/// `private` or `Set-Cookie`.
fn forced_storable(
    storable: Result<(), policy::Reason>,
    forced: Option<std::time::Duration>,
) -> Result<(), policy::Reason> {
    match storable {
        Err(policy::Reason::NoFreshness) if forced.is_some() => Ok(()),
        other => other,
    }
}

/// A slice's bytes: stored, or still arriving.
pub(crate) enum SliceData {
    Stored(Bytes),
    Filling(Arc<Growing>),
}

fn slice_fill_key(key: &str, sliced: &Sliced, index: u64) -> String {
    let etag = sliced.etag.as_ref().and_then(|v| v.to_str().ok()).unwrap_or("");
    format!("{}@{etag}", cdn_http::key::slice(key, index))
}

fn content_length(headers: &HeaderMap) -> Option<u64> {
    headers.get(header::CONTENT_LENGTH)?.to_str().ok()?.trim().parse().ok()
}

/// `Content-Range: bytes a-b/total` → (a..b+1, total).
pub(crate) fn content_range(headers: &HeaderMap) -> Option<(std::ops::Range<u64>, u64)> {
    let value = headers.get(header::CONTENT_RANGE)?.to_str().ok()?.trim();
    let rest = value.strip_prefix("bytes ")?;
    let (range, total) = rest.split_once('/')?;
    let (first, last) = range.split_once('-')?;
    let (first, last, total): (u64, u64, u64) = (first.parse().ok()?, last.parse().ok()?, total.parse().ok()?);
    (first <= last && last < total).then_some((first..last + 1, total))
}

/// The head of a stored response after a 304 (RFC 9111 §4.3.4).
fn refreshed_head(
    stale: &Head,
    update: &HeaderMap,
    request_time: SystemTime,
    response_time: SystemTime,
    settings: &Settings,
) -> Arc<Head> {
    let mut headers = stale.headers.clone();
    let mut replaced: Vec<&HeaderName> = Vec::new();
    for (name, value) in update {
        if policy::keep_on_update(name, settings) || name == SURROGATE_KEY || name == CACHE_TAG {
            continue;
        }
        if !replaced.contains(&name) {
            headers.remove(name);
            replaced.push(name);
        }
        headers.append(name.clone(), value.clone());
    }
    crate::compress::keep_on_refresh(&stale.headers, &mut headers);
    let directives = Directives::response(&headers);
    let lifetime = policy::freshness_lifetime(stale.status, &headers, &directives, response_time, settings);
    let timing = Timing::new(&headers, request_time, response_time);
    let mut tags = stale.tags.clone();
    for tag in surrogate_keys(update) {
        if !tags.contains(&tag) {
            tags.push(tag);
        }
    }
    Arc::new(Head {
        status: stale.status,
        headers: owned(headers),
        timing,
        directives,
        lifetime,
        tags,
        vary: stale.vary.clone(),
        purged: Default::default(),
    })
}

/// `headers` with every value in an allocation of its own. Values parsed by the
/// HTTP client share the connection's read buffer (8 KiB or more); a stored head that
/// kept them would keep that whole buffer alive for as long as the object is cached.
fn owned(headers: HeaderMap) -> HeaderMap {
    let mut owned = HeaderMap::with_capacity(headers.len());
    for (name, value) in &headers {
        let mut copy = HeaderValue::from_bytes(value.as_bytes()).unwrap_or_else(|_| value.clone());
        copy.set_sensitive(value.is_sensitive());
        owned.append(name.clone(), copy);
    }
    owned
}

#[cfg(test)]
mod tests {
    use std::{
        collections::HashMap,
        sync::atomic::{AtomicUsize, Ordering::SeqCst},
        time::Duration,
    };

    use super::*;
    use crate::{cache::store::test_head, sites::Sites};

    /// A reader that missed slice 0 while the probe's fill was storing it, and
    /// joined after that fill landed, leads a fill of its own: that fill finds the
    /// slice stored and asks the origin for nothing.
    #[tokio::test]
    async fn a_slice_fill_started_after_another_stored_the_slice_fetches_nothing() {
        // An origin that counts the connections it gets and answers none.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let config = crate::config::Config::new("edge-test", format!("http://{}", listener.local_addr().unwrap()));
        let connections = Arc::new(AtomicUsize::new(0));
        let counted = connections.clone();
        tokio::spawn(async move {
            while let Ok((_dropped, _)) = listener.accept().await {
                counted.fetch_add(1, SeqCst);
            }
        });
        let registry = prometheus::Registry::new();
        let metrics = Metrics::register(&registry).unwrap();
        let sites = Sites::new(&config, metrics.clone(), &registry).unwrap();
        let crate::sites::Found::Site(site) = sites.find("example.test") else { panic!("the [origin] site") };
        let (_, applied) = tokio::sync::watch::channel(HashMap::new());
        let timeout = Duration::from_secs(2);
        let tiers = Tiers::new("edge-test", "default", None, timeout, (applied.clone(), applied), &[], &registry);
        let cache = Arc::new(Cache::new(1 << 20, None));
        let settings = FetchSettings::from_config(&config.cache, config.origin.as_ref());
        let fetcher = Fetcher::new(cache.clone(), Arc::new(tiers.unwrap()), metrics, Clock::system(), settings);

        let (key, etag) = ("http://example.test/clip", HeaderValue::from_static("\"v1\""));
        let head = Arc::new(test_head(vec![], vec![]));
        let sliced = Arc::new(Sliced { head, total: 3000, slice: 1000, etag: Some(etag.clone()) });
        assert!(cache.slice(key, &sliced, 0).await.is_none(), "the reader misses");
        let stored = Bytes::from(vec![7u8; 1000]);
        cache.insert_slice(key, 0, Some(etag), stored.clone(), cache.epoch()).await;
        let Flight::Leader(fill) = cache.join_or_start(&slice_fill_key(key, &sliced, 0)) else {
            panic!("the other fill landed: the reader leads a fill");
        };
        let origin = SliceOrigin { site, seen: vec![], path: "/clip".into(), headers: HeaderMap::new() };
        fetcher.run_slice_fill(key, &sliced, 0, &origin, &fill).await;
        let Outcome::Slice(growing) = &*fill.clone().outcome().await else { panic!("the slice fill failed") };
        assert!(growing.concat() == Some(stored), "the stored slice");
        assert_eq!(connections.load(SeqCst), 0, "the origin was asked for a stored slice");
    }

    #[test]
    fn parses_content_range() {
        let mut headers = HeaderMap::new();
        headers.insert(header::CONTENT_RANGE, HeaderValue::from_static("bytes 0-1048575/209715200"));
        assert_eq!(content_range(&headers), Some((0..1_048_576, 209_715_200)));
        for bad in ["bytes */100", "bytes 5-1/100", "bytes 0-100/100", "items 0-1/2", "bytes 0-1/*"] {
            headers.insert(header::CONTENT_RANGE, HeaderValue::from_static(bad));
            assert_eq!(content_range(&headers), None, "{bad}");
        }
    }
}
