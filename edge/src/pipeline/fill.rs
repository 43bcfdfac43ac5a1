//! Origin fetches shared by every request that waits for them (coalescing), and
//! sliced fills of large objects.
//!
//! A miss sends one *probe*: a GET for the slice that covers the first byte the
//! client wants (`Range: bytes=k·S-(k+1)·S−1`). A 206 tells the total length: a
//! small object comes back whole and is stored whole; a large one is stored as a
//! head plus slices, each fetched (once, coalesced) when a reader reaches it. An
//! origin that ignores ranges answers 200 and the object is filled whole.

use std::{
    sync::{Arc, Mutex, PoisonError},
    time::SystemTime,
};

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::BodyExt as _;
use hyper::body::Incoming;
use tokio::sync::watch;
use tracing::{debug, warn};

use cdn_node::listener::empty;

use super::{CACHE_TAG, Conn, Pipeline, Req, SURROGATE_KEY, path_and_query, surrogate_keys};
use cdn_http::policy::{self, Directives, Settings, Timing};

use crate::{
    body::Growing,
    error::FetchError,
    store::{Found, Head, Object, Sliced, slice_key, vary_values},
    upstream::strip_hop_by_hop,
};

/// One origin fetch shared by every request that waits for it.
pub(super) struct Fill {
    outcome: watch::Sender<Option<Arc<Outcome>>>,
}

impl Fill {
    fn new() -> Arc<Self> {
        Arc::new(Self { outcome: watch::Sender::new(None) })
    }

    fn publish(&self, outcome: Outcome) {
        self.outcome.send_replace(Some(Arc::new(outcome)));
    }

    /// Waits for the outcome (the origin's response head, or the failure).
    pub(super) async fn outcome(self: Arc<Self>) -> Arc<Outcome> {
        let mut rx = self.outcome.subscribe();
        drop(self);
        loop {
            if let Some(outcome) = rx.borrow_and_update().clone() {
                return outcome;
            }
            if rx.changed().await.is_err() {
                return Arc::new(Outcome::Failed(FetchError::Unreachable("fill abandoned".into())));
            }
        }
    }
}

/// What a fill produced, as soon as the origin's response head is known.
pub(super) enum Outcome {
    /// A whole storable response, streaming into the cache.
    Stream { head: Arc<Head>, body: Arc<Growing> },
    /// A large object: its head is stored, its slices are fetched as they are read.
    Sliced(Arc<Sliced>),
    /// One slice, streaming into the cache.
    Slice(Arc<Growing>),
    /// A 304 refreshed the stored response.
    Updated(Found),
    /// Not shareable. `response` is the origin's answer to exactly the leader's
    /// request when it can be handed over; everyone else fetches for themselves.
    Pass { response: Mutex<Option<Response<Incoming>>>, status: StatusCode },
    /// The origin could not be reached.
    Failed(FetchError),
}

struct FillJob {
    fill: Arc<Fill>,
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
pub(super) const CLIENT_CONDITIONALS: [HeaderName; 6] = [
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
pub(super) const UNKEYED: [HeaderName; 12] = [
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
pub(super) fn strip_for_shared(headers: &mut HeaderMap) {
    for name in CLIENT_CONDITIONALS.iter().chain(&UNKEYED) {
        headers.remove(name);
    }
}

impl Pipeline {
    /// Joins the fill of `req.key` or starts one; `true` when this request started it.
    pub(super) fn join_or_start(self: &Arc<Self>, req: &Req, conn: Conn, stale: Option<Found>) -> (Arc<Fill>, bool) {
        let mut inflight = self.inflight.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(fill) = inflight.get(&req.key) {
            return (fill.clone(), false);
        }
        let fill = Fill::new();
        inflight.insert(req.key.clone(), fill.clone());
        drop(inflight);
        let mut headers = self.origin_headers(&req.parts, conn, req.scheme);
        strip_for_shared(&mut headers);
        if let Some(stale) = &stale {
            let head = stale.head();
            if let Some(etag) = head.headers.get(header::ETAG) {
                headers.insert(header::IF_NONE_MATCH, etag.clone());
            }
            if let Some(modified) = head.headers.get(header::LAST_MODIFIED) {
                headers.insert(header::IF_MODIFIED_SINCE, modified.clone());
            }
        }
        let client_plain = !CLIENT_CONDITIONALS.iter().any(|name| req.parts.headers.contains_key(name));
        let job = FillJob {
            fill: fill.clone(),
            key: req.key.clone(),
            path: path_and_query(&req.parts.uri),
            origin_headers: headers,
            client_headers: req.parts.headers.clone(),
            client_directives: req.directives.clone(),
            client_plain,
            stale,
            probe: Some(self.probe_index(&req.parts.headers)),
            epoch: self.purge_epoch(),
        };
        tokio::spawn(self.clone().run_fill(job));
        (fill, true)
    }

    /// The slice holding the first byte a request wants.
    fn probe_index(&self, request: &HeaderMap) -> u64 {
        let first = request
            .get(header::RANGE)
            .and_then(|v| v.to_str().ok())
            .and_then(cdn_http::range::parse)
            .and_then(|specs| specs.into_iter().next());
        match first {
            Some(cdn_http::range::Spec::From { first, .. }) => first / self.slice_size,
            _ => 0,
        }
    }

    async fn send_fill(
        &self,
        job: &FillJob,
        range: Option<std::ops::Range<u64>>,
    ) -> Result<Response<Incoming>, FetchError> {
        let uri = self.upstream.uri(&job.path)?;
        let mut request = Request::new(empty());
        *request.uri_mut() = uri;
        *request.headers_mut() = job.origin_headers.clone();
        if let Some(range) = range {
            let value = format!("bytes={}-{}", range.start, range.end - 1);
            if let Ok(value) = HeaderValue::from_str(&value) {
                request.headers_mut().insert(header::RANGE, value);
            }
        }
        let result = self.upstream.send(request).await;
        match &result {
            Ok(response) => self.metrics.origin_status(response.status().as_u16()),
            Err(e) => self.metrics.origin_error(matches!(e, FetchError::Timeout)),
        }
        result
    }

    async fn run_fill(self: Arc<Self>, job: FillJob) {
        self.run_fill_inner(&job).await;
        self.finish_fill(&job.key, &job.fill);
    }

    async fn run_fill_inner(self: &Arc<Self>, job: &FillJob) {
        let mut probe = job.probe.map(|index| index * self.slice_size..(index + 1) * self.slice_size);
        loop {
            let request_time = self.clock.now();
            let response = match self.send_fill(job, probe.clone()).await {
                Ok(response) => response,
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
                let updated = self.refreshed(&job.key, stale, &rp.headers, request_time, response_time).await;
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
                    job.fill.publish(Outcome::Failed(FetchError::Unreachable("bad content-range from origin".into())));
                    return;
                };
                if range.start == 0 && range.end == total && total <= self.slice_size {
                    // The whole object fit in the probe: store it whole.
                    rp.status = StatusCode::OK;
                    rp.headers.remove(header::CONTENT_RANGE);
                    rp.headers.insert(header::CONTENT_LENGTH, HeaderValue::from(total));
                } else {
                    match self.start_sliced(job, rp, body, range, total, request_time, response_time).await {
                        Ok(()) => return,
                        Err(reason) => {
                            debug!(key = %job.key, reason, "not sliceable, fetching whole");
                            probe = None;
                            continue;
                        }
                    }
                }
            }
            self.fill_whole(job, rp, body, request_time, response_time).await;
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
    ) {
        let directives = Directives::from_headers(&rp.headers);
        let authorization = job.client_headers.contains_key(header::AUTHORIZATION);
        let content_length = content_length(&rp.headers);
        let storable = policy::storable(
            &Method::GET,
            &job.client_directives,
            authorization,
            rp.status,
            &rp.headers,
            &directives,
            &self.settings,
        )
        .and_then(|()| if content_length.is_some_and(|len| len > self.max_object) { Err("too-large") } else { Ok(()) })
        // An error never replaces a stored response that may still serve stale.
        .and_then(|()| {
            if job.stale.is_some() && rp.status.is_server_error() { Err("error-over-stale") } else { Ok(()) }
        });
        if let Err(reason) = storable {
            debug!(key = %job.key, reason, "not storable");
            if !matches!(reason, "too-large" | "error-over-stale") {
                self.mark_pass(&job.key);
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
        let lifetime = policy::freshness_lifetime(rp.status, &rp.headers, &directives, response_time, &self.settings);
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
            && growing.len() <= self.max_object
            && self.purge_epoch() == job.epoch
            && let Some(bytes) = growing.concat()
        {
            self.store.insert(&job.key, Object { head, body: bytes }).await;
        }
    }

    /// Reads an origin body into `growing`; `true` when it arrived whole.
    async fn read_into(&self, key: &str, mut body: Incoming, growing: &Growing, expected: Option<u64>) -> bool {
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
        request_time: SystemTime,
        response_time: SystemTime,
    ) -> Result<(), &'static str> {
        let etag = rp.headers.get(header::ETAG).filter(|v| !v.as_bytes().starts_with(b"W/")).cloned();
        if etag.is_none() {
            return Err("no strong etag");
        }
        if !policy::vary_names(&rp.headers).is_some_and(|names| names.is_empty()) {
            return Err("vary");
        }
        let index = range.start / self.slice_size;
        let slice_start = index * self.slice_size;
        if range != (slice_start..(slice_start + self.slice_size).min(total)) {
            return Err("origin answered another range");
        }
        rp.headers.remove(header::CONTENT_RANGE);
        rp.headers.insert(header::CONTENT_LENGTH, HeaderValue::from(total));
        let directives = Directives::from_headers(&rp.headers);
        let authorization = job.client_headers.contains_key(header::AUTHORIZATION);
        policy::storable(
            &Method::GET,
            &job.client_directives,
            authorization,
            StatusCode::OK,
            &rp.headers,
            &directives,
            &self.settings,
        )?;
        let tags = surrogate_keys(&rp.headers);
        rp.headers.remove(SURROGATE_KEY);
        rp.headers.remove(CACHE_TAG);
        let lifetime =
            policy::freshness_lifetime(StatusCode::OK, &rp.headers, &directives, response_time, &self.settings);
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
        let sliced = Arc::new(Sliced { head, total, slice: self.slice_size, etag: etag.clone() });
        if self.purge_epoch() == job.epoch {
            self.store.insert_sliced(&job.key, sliced.clone()).await;
        }

        // The probed slice is a slice fill of its own that readers can join.
        let slice_fill = Fill::new();
        let slice_key = slice_fill_key(&job.key, &sliced, index);
        self.inflight.lock().unwrap_or_else(PoisonError::into_inner).insert(slice_key.clone(), slice_fill.clone());
        let growing = Growing::new(Some(range.end - range.start));
        slice_fill.publish(Outcome::Slice(growing.clone()));
        job.fill.publish(Outcome::Sliced(sliced.clone()));
        self.finish_fill(&job.key, &job.fill);
        if self.read_into(&slice_key, body, &growing, Some(range.end - range.start)).await
            && let Some(bytes) = growing.concat()
        {
            self.store.insert_slice(&job.key, index, etag, bytes).await;
        }
        self.finish_fill(&slice_key, &slice_fill);
        Ok(())
    }

    /// Slice `index` of a sliced object: from the cache, or joined to (or started
    /// as) a coalesced slice fill.
    pub(super) async fn slice(
        self: &Arc<Self>,
        key: &str,
        sliced: &Arc<Sliced>,
        index: u64,
        origin: &(String, HeaderMap),
    ) -> Result<SliceData, FetchError> {
        if let Some(bytes) = self.store.slice(key, sliced, index).await {
            return Ok(SliceData::Stored(bytes));
        }
        let fill_key = slice_fill_key(key, sliced, index);
        let (fill, leader) = {
            let mut inflight = self.inflight.lock().unwrap_or_else(PoisonError::into_inner);
            match inflight.get(&fill_key) {
                Some(fill) => (fill.clone(), false),
                None => {
                    let fill = Fill::new();
                    inflight.insert(fill_key.clone(), fill.clone());
                    (fill, true)
                }
            }
        };
        if leader {
            let (pipeline, key, sliced, origin, fill) =
                (self.clone(), key.to_string(), sliced.clone(), origin.clone(), fill.clone());
            tokio::spawn(async move {
                pipeline.run_slice_fill(&key, &sliced, index, &origin, &fill).await;
                pipeline.finish_fill(&fill_key, &fill);
            });
        }
        match &*fill.outcome().await {
            Outcome::Slice(growing) => Ok(SliceData::Filling(growing.clone())),
            Outcome::Failed(e) => Err(e.clone()),
            _ => Err(FetchError::Unreachable("unexpected slice outcome".into())),
        }
    }

    async fn run_slice_fill(&self, key: &str, sliced: &Sliced, index: u64, origin: &(String, HeaderMap), fill: &Fill) {
        let bounds = sliced.bounds(index);
        let (path, headers) = origin;
        let job_uri = match self.upstream.uri(path) {
            Ok(uri) => uri,
            Err(e) => return fill.publish(Outcome::Failed(e)),
        };
        let mut request = Request::new(empty());
        *request.uri_mut() = job_uri;
        *request.headers_mut() = headers.clone();
        if let Ok(value) = HeaderValue::from_str(&format!("bytes={}-{}", bounds.start, bounds.end - 1)) {
            request.headers_mut().insert(header::RANGE, value);
        }
        if let Some(etag) = &sliced.etag {
            request.headers_mut().insert(header::IF_MATCH, etag.clone());
        }
        let response = match self.upstream.send(request).await {
            Ok(response) => response,
            Err(e) => {
                self.metrics.origin_error(matches!(e, FetchError::Timeout));
                return fill.publish(Outcome::Failed(e));
            }
        };
        self.metrics.origin_status(response.status().as_u16());
        let (rp, body) = response.into_parts();
        let same = rp.status == StatusCode::PARTIAL_CONTENT
            && content_range(&rp.headers) == Some((bounds.clone(), sliced.total))
            && rp.headers.get(header::ETAG) == sliced.etag.as_ref();
        if !same {
            // The object changed at the origin (or the origin misbehaves): never splice
            // two versions. Drop the old head and slices; the next request starts over.
            warn!(%key, status = %rp.status, "object changed between slices; dropping it");
            self.store.invalidate_url(key);
            return fill.publish(Outcome::Failed(FetchError::Unreachable("object changed at the origin".into())));
        }
        let growing = Growing::new(Some(bounds.end - bounds.start));
        fill.publish(Outcome::Slice(growing.clone()));
        if self.read_into(key, body, &growing, Some(bounds.end - bounds.start)).await
            && let Some(bytes) = growing.concat()
        {
            self.store.insert_slice(key, index, sliced.etag.clone(), bytes).await;
        }
    }

    pub(super) fn finish_fill(&self, key: &str, fill: &Arc<Fill>) {
        let mut inflight = self.inflight.lock().unwrap_or_else(PoisonError::into_inner);
        if inflight.get(key).is_some_and(|current| Arc::ptr_eq(current, fill)) {
            inflight.remove(key);
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
    ) -> Found {
        let head = refreshed_head(stale.head(), update, request_time, response_time, &self.settings);
        match stale {
            Found::Object(object) => {
                let object = Object { head, body: object.body.clone() };
                self.store.insert(key, object.clone()).await;
                Found::Object(object)
            }
            Found::Sliced(sliced) => {
                let sliced =
                    Arc::new(Sliced { head, total: sliced.total, slice: sliced.slice, etag: sliced.etag.clone() });
                self.store.insert_sliced(key, sliced.clone()).await;
                Found::Sliced(sliced)
            }
        }
    }
}

/// A slice's bytes: stored, or still arriving.
pub(super) enum SliceData {
    Stored(Bytes),
    Filling(Arc<Growing>),
}

fn slice_fill_key(key: &str, sliced: &Sliced, index: u64) -> String {
    let etag = sliced.etag.as_ref().and_then(|v| v.to_str().ok()).unwrap_or("");
    format!("{}@{etag}", slice_key(key, index))
}

fn content_length(headers: &HeaderMap) -> Option<u64> {
    headers.get(header::CONTENT_LENGTH)?.to_str().ok()?.trim().parse().ok()
}

/// `Content-Range: bytes a-b/total` → (a..b+1, total).
pub(super) fn content_range(headers: &HeaderMap) -> Option<(std::ops::Range<u64>, u64)> {
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
    use super::*;

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
