//! Turning a stored (or filling) representation into the response a request asks
//! for: conditionals (304), ranges (206, multipart, 416), HEAD.

use std::{ops::Range, sync::Arc, time::Duration};

use bytes::Bytes;
use futures_util::{StreamExt as _, stream};
use http::{HeaderMap, HeaderValue, Method, Response, StatusCode, header};
use http_body_util::{BodyExt as _, StreamBody};
use hyper::body::Frame;

use cdn_http::range;
use cdn_node::listener::{Body, BoxError, empty, full};

use super::{Pipeline, Req, Served};
use cdn_http::policy;

use crate::{
    body::Growing,
    cache::{Head, Sliced, status::CacheStatus},
    fetch::{Fetcher, SliceData},
};

/// Where a representation's bytes come from.
pub(super) enum Source {
    /// A whole stored body.
    Bytes(Bytes),
    /// A body still arriving from the origin.
    Growing(Arc<Growing>),
    /// A sliced object, read slice by slice (each fetched on first use).
    Sliced(SlicedSource),
}

/// What reading a sliced object needs.
pub(super) struct SlicedSource {
    pub(super) fetcher: Arc<Fetcher>,
    pub(super) key: String,
    pub(super) sliced: Arc<Sliced>,
    /// Path and headers for slice requests to the origin.
    pub(super) origin: Arc<(String, HeaderMap)>,
}

impl Source {
    fn len(&self) -> Option<u64> {
        match self {
            Self::Bytes(bytes) => Some(bytes.len() as u64),
            Self::Growing(growing) => growing.expected,
            Self::Sliced(source) => Some(source.sliced.total),
        }
    }

    fn full_body(self) -> Body {
        match self {
            Self::Bytes(bytes) => full(bytes),
            Self::Growing(growing) => stream_body(growing.reader(None)),
            Self::Sliced(source) => {
                let total = source.sliced.total;
                stream_body(source.stream(0..total))
            }
        }
    }

    fn range_body(self, range: Range<u64>) -> Body {
        match self {
            Self::Bytes(bytes) => full(bytes.slice(range.start as usize..range.end as usize)),
            Self::Growing(growing) => stream_body(growing.reader(Some(range))),
            Self::Sliced(source) => stream_body(source.stream(range)),
        }
    }

    fn multipart_body(self, ranges: &[Range<u64>], multipart: &range::Multipart) -> Body {
        let mut pieces: Vec<stream::BoxStream<'static, Result<Bytes, BoxError>>> = Vec::new();
        for (head, range) in multipart.heads.iter().zip(ranges) {
            pieces.push(stream::once(std::future::ready(Ok(head.clone()))).boxed());
            match &self {
                Self::Bytes(bytes) => {
                    let part = bytes.slice(range.start as usize..range.end as usize);
                    pieces.push(stream::once(std::future::ready(Ok(part))).boxed());
                }
                Self::Growing(growing) => pieces.push(growing.reader(Some(range.clone())).boxed()),
                Self::Sliced(source) => pieces.push(source.stream(range.clone()).boxed()),
            }
        }
        pieces.push(stream::once(std::future::ready(Ok(multipart.tail.clone()))).boxed());
        stream_body(stream::iter(pieces).flatten())
    }
}

impl SlicedSource {
    fn clone_ref(&self) -> Self {
        Self {
            fetcher: self.fetcher.clone(),
            key: self.key.clone(),
            sliced: self.sliced.clone(),
            origin: self.origin.clone(),
        }
    }

    /// Streams `range` of the object: the covering slices in order, each fetched
    /// (coalesced) when needed, the next one while the current one is sent. Stops at
    /// the first error, so a client never gets a spliced or truncated body that
    /// looks complete.
    fn stream(&self, range: Range<u64>) -> impl futures_util::Stream<Item = Result<Bytes, BoxError>> + Send + 'static {
        let source = self.clone_ref();
        let size = source.sliced.slice;
        let (first, last) = (range.start / size, range.end.saturating_sub(1) / size);
        let fetches = stream::iter(first..=last).map(move |index| {
            let source = source.clone_ref();
            async move {
                let data = source.fetcher.slice(&source.key, &source.sliced, index, &source.origin).await;
                (index, source.sliced.bounds(index), data)
            }
        });
        fetches
            .buffered(2)
            .flat_map(move |(_, bounds, data)| {
                let from = range.start.max(bounds.start) - bounds.start;
                let to = range.end.min(bounds.end) - bounds.start;
                match data {
                    Err(e) => stream::once(std::future::ready(Err(BoxError::from(e.to_string())))).boxed(),
                    Ok(SliceData::Stored(bytes)) => {
                        let part = bytes.slice(from as usize..(to as usize).min(bytes.len()));
                        stream::once(std::future::ready(Ok(part))).boxed()
                    }
                    Ok(SliceData::Filling(growing)) => growing.reader(Some(from..to)).boxed(),
                }
            })
            .scan(false, |failed, item| {
                if *failed {
                    return std::future::ready(None);
                }
                *failed = item.is_err();
                std::future::ready(Some(item))
            })
    }
}

pub(crate) fn stream_body(stream: impl futures_util::Stream<Item = Result<Bytes, BoxError>> + Send + 'static) -> Body {
    StreamBody::new(stream.map(|chunk| chunk.map(Frame::data))).boxed_unsync()
}

fn build(status: StatusCode, headers: HeaderMap, body: Body) -> Response<Body> {
    let mut response = Response::new(body);
    *response.status_mut() = status;
    *response.headers_mut() = headers;
    response
}

impl Pipeline {
    /// The response for a stored or filling representation.
    pub(super) fn represent(
        &self,
        req: &Req,
        head: &Head,
        source: Source,
        age: Duration,
        status: CacheStatus,
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
            return Served { response, status };
        }
        let len = source.len();
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
                        if let Ok(value) = HeaderValue::from_str(&range::unsatisfied_range(len)) {
                            headers.insert(header::CONTENT_RANGE, value);
                        }
                        headers.insert(header::CONTENT_LENGTH, HeaderValue::from(0));
                        let response = build(StatusCode::RANGE_NOT_SATISFIABLE, headers, empty());
                        return Served { response, status };
                    }
                    range::Resolved::Partial(ranges) if ranges.len() == 1 => {
                        let r = ranges[0].clone();
                        if let Ok(value) = HeaderValue::from_str(&range::content_range(&r, len)) {
                            headers.insert(header::CONTENT_RANGE, value);
                        }
                        headers.insert(header::CONTENT_LENGTH, HeaderValue::from(r.end - r.start));
                        let body = if head_only { empty() } else { source.range_body(r) };
                        return Served { response: build(StatusCode::PARTIAL_CONTENT, headers, body), status };
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
                        return Served { response: build(StatusCode::PARTIAL_CONTENT, headers, body), status };
                    }
                }
            }
        }
        if let Some(len) = len {
            headers.insert(header::CONTENT_LENGTH, HeaderValue::from(len));
        }
        let body = if head_only { empty() } else { source.full_body() };
        Served { response: build(head.status, headers, body), status }
    }
}

/// Evaluates the client's If-None-Match / If-Modified-Since against a stored
/// response (RFC 9110 §13.1.2, §13.1.3): `true` → answer 304.
pub(super) fn not_modified(request: &HeaderMap, stored: &HeaderMap) -> bool {
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
pub(super) fn if_range_holds(request: &HeaderMap, stored: &HeaderMap) -> bool {
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
