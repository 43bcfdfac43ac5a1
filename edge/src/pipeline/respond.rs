//! Turning a stored (or filling) representation into the response a request asks
//! for: [`represent`], a function of the request, the stored head and a [`Source`] of
//! the bytes.
//!
//! What the request gets — 304 or 412 from its preconditions, then 200, 206,
//! multipart 206 or 416 from its Range and If-Range — is decided by
//! [`cdn_http::conditional::evaluate`] and [`cdn_http::range::plan`], the same code
//! the origin answers with; this module only builds the body from its source (a
//! stored body, a body still arriving, or the slices of a large object). A sliced
//! source fetches the slices it lacks through a narrow [`SlicedSource`] handle, not
//! the whole pipeline. HEAD gets the same status and headers with no body.

use std::{ops::Range, sync::Arc, time::Duration};

use bytes::Bytes;
use futures_util::{StreamExt as _, future::BoxFuture, stream};
use http::{HeaderMap, HeaderValue, Method, Response, StatusCode, header, request::Parts};
use http_body_util::{BodyExt as _, StreamBody};
use hyper::body::Frame;

use cdn_http::{
    conditional::{self, Decision, Validators},
    range::{self, Plan},
};
use cdn_node::listener::{Body, BoxError, empty, full};

use crate::{
    body::Growing,
    cache::{Head, Sliced, status::CacheStatus},
    error::FetchError,
    fetch::SliceData,
};

/// A response and the cache's account of it (for the pipeline's headers and metrics).
pub(super) struct Served {
    pub(super) response: Response<Body>,
    pub(super) status: CacheStatus,
}

/// Where a representation's bytes come from.
pub(super) enum Source {
    /// A whole stored body.
    Bytes(Bytes),
    /// A body still arriving from the origin.
    Growing(Arc<Growing>),
    /// A sliced object, read slice by slice (each fetched on first use).
    Sliced(SlicedSource),
}

/// Gets slice `index` of a sliced object: from the cache, or from a (coalesced)
/// slice fill.
type FetchSlice = Arc<dyn Fn(u64) -> BoxFuture<'static, Result<SliceData, FetchError>> + Send + Sync>;

/// What reading a sliced object needs: its layout and a way to get each slice.
#[derive(Clone)]
pub(super) struct SlicedSource {
    sliced: Arc<Sliced>,
    fetch: FetchSlice,
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

    /// The body a plan asks for (not for a 416, whose body is empty).
    fn planned_body(self, plan: &Plan) -> Body {
        match plan {
            Plan::Full { .. } => self.full_body(),
            Plan::Single { range, .. } => self.range_body(range.clone()),
            Plan::Multipart { ranges, framing } => self.multipart_body(ranges, framing),
            Plan::Unsatisfiable { .. } => empty(),
        }
    }
}

impl SlicedSource {
    /// A sliced object whose slices `fetch` gets, each when a reader reaches it.
    pub(super) fn new(
        sliced: Arc<Sliced>,
        fetch: impl Fn(u64) -> BoxFuture<'static, Result<SliceData, FetchError>> + Send + Sync + 'static,
    ) -> Self {
        Self { sliced, fetch: Arc::new(fetch) }
    }

    /// Streams `range` of the object: the covering slices in order, each fetched
    /// (coalesced) when needed, the next one while the current one is sent. Stops at
    /// the first error, so a client never gets a spliced or truncated body that
    /// looks complete.
    fn stream(&self, range: Range<u64>) -> impl futures_util::Stream<Item = Result<Bytes, BoxError>> + Send + 'static {
        let source = self.clone();
        let size = source.sliced.slice;
        let (first, last) = (range.start / size, range.end.saturating_sub(1) / size);
        let fetches = stream::iter(first..=last).map(move |index| {
            let (bounds, data) = (source.sliced.bounds(index), (source.fetch)(index));
            async move { (bounds, data.await) }
        });
        fetches
            .buffered(2)
            .flat_map(move |(bounds, data)| {
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

/// The response to `request` from a stored or filling representation: `head` and
/// the bytes of `source`, `age` old. `status` (what the cache did) is passed
/// through for the pipeline's headers and metrics.
///
/// Preconditions and ranges apply to a stored 200 (RFC 9110 §13.2.1, §14); ranges
/// only when the length is known, which it always is once stored (a filling body
/// has one when the origin sent Content-Length).
pub(super) fn represent(request: &Parts, head: &Head, source: Source, age: Duration, status: CacheStatus) -> Served {
    let served = |code, headers, body| Served { response: build(code, headers, body), status };
    let head_only = request.method == Method::HEAD;
    let age = age.as_secs();
    let mut headers = head.headers.clone();
    headers.insert(header::AGE, HeaderValue::from(age));
    if head.status != StatusCode::OK {
        if let Some(len) = source.len() {
            headers.insert(header::CONTENT_LENGTH, HeaderValue::from(len));
        }
        let body = if head_only { empty() } else { source.full_body() };
        return served(head.status, headers, body);
    }

    let validators = Validators::from_headers(&head.headers);
    match conditional::evaluate(&request.method, &request.headers, validators) {
        Decision::Proceed => {}
        Decision::NotModified => {
            let mut headers = conditional::not_modified_headers(&head.headers);
            headers.insert(header::AGE, HeaderValue::from(age));
            return served(StatusCode::NOT_MODIFIED, headers, empty());
        }
        Decision::PreconditionFailed => {
            let (headers, body) = precondition_failed(head_only);
            return served(StatusCode::PRECONDITION_FAILED, headers, body);
        }
    }

    let Some(len) = source.len() else {
        // Still arriving, length unknown: the whole body, as it comes.
        let body = if head_only { empty() } else { source.full_body() };
        return served(head.status, headers, body);
    };
    let part_type = || head.headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok());
    let plan = range::plan(&request.method, &request.headers, len, validators, part_type, range::boundary);
    plan.set_headers(&mut headers);
    if let Plan::Unsatisfiable { .. } = plan {
        headers.insert(header::CONTENT_LENGTH, HeaderValue::from(0));
    }
    let body = if head_only { empty() } else { source.planned_body(&plan) };
    served(plan.status(), headers, body)
}

/// A 412's headers and body (none for HEAD): short text that no cache keeps, as the
/// origin sends it.
fn precondition_failed(head_only: bool) -> (HeaderMap, Body) {
    const TEXT: &str = "precondition failed\n";
    let mut headers = HeaderMap::new();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"));
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    headers.insert(header::CONTENT_LENGTH, HeaderValue::from(TEXT.len()));
    (headers, if head_only { empty() } else { full(TEXT) })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::CacheResult;

    fn head(status: StatusCode, pairs: &[(&'static str, &'static str)]) -> Head {
        let mut headers = HeaderMap::new();
        for (name, value) in pairs {
            headers.append(*name, HeaderValue::from_static(value));
        }
        Head {
            status,
            timing: cdn_http::policy::Timing::new(&headers, std::time::SystemTime::now(), std::time::SystemTime::now()),
            directives: cdn_http::policy::Directives::from_headers(&headers),
            headers,
            lifetime: Duration::from_secs(60),
            tags: vec![],
            vary: vec![],
            purged: Default::default(),
        }
    }

    fn request(method: Method, pairs: &[(&'static str, &'static str)]) -> Parts {
        let mut builder = http::Request::builder().method(method).uri("/x");
        for (name, value) in pairs {
            builder = builder.header(*name, *value);
        }
        builder.body(()).unwrap().into_parts().0
    }

    async fn call(request: &Parts, head: &Head, body: &'static str) -> (Response<()>, Bytes) {
        let source = Source::Bytes(Bytes::from_static(body.as_bytes()));
        let served = represent(request, head, source, Duration::from_secs(7), CacheStatus::hit(CacheResult::Hit, 0));
        let (parts, body) = served.response.into_parts();
        (Response::from_parts(parts, ()), body.collect().await.unwrap().to_bytes())
    }

    const STORED: &[(&str, &str)] = &[
        ("etag", "\"v1,2\""),
        ("last-modified", "Tue, 15 Nov 1994 12:45:26 GMT"),
        ("cache-control", "max-age=60"),
        ("content-type", "text/plain"),
        ("content-length", "10"),
    ];

    #[tokio::test]
    async fn preconditions_on_a_stored_200() {
        let ok = head(StatusCode::OK, STORED);
        let (r, body) = call(&request(Method::GET, &[("if-none-match", "\"x\", \"v1,2\"")]), &ok, "0123456789").await;
        assert_eq!((r.status(), body.len()), (StatusCode::NOT_MODIFIED, 0));
        assert_eq!(r.headers()["etag"], "\"v1,2\"");
        assert_eq!(r.headers()["age"], "7");
        assert!(!r.headers().contains_key("content-type") && !r.headers().contains_key("content-length"));
        let (r, body) = call(&request(Method::GET, &[("if-match", "\"v1\", \"2\"")]), &ok, "0123456789").await;
        assert_eq!((r.status(), &body[..]), (StatusCode::PRECONDITION_FAILED, &b"precondition failed\n"[..]));
        assert_eq!(r.headers()["content-length"], "20");
        assert!(!r.headers().contains_key("etag"));
        let (r, body) = call(&request(Method::HEAD, &[("if-match", "\"x\"")]), &ok, "0123456789").await;
        assert_eq!((r.status(), body.len()), (StatusCode::PRECONDITION_FAILED, 0));
        let ius = [("if-unmodified-since", "Mon, 14 Nov 1994 12:45:26 GMT")];
        let (r, _) = call(&request(Method::GET, &ius), &ok, "0123456789").await;
        assert_eq!(r.status(), StatusCode::PRECONDITION_FAILED);
        let (r, body) = call(&request(Method::GET, &[("if-match", "\"v1,2\"")]), &ok, "0123456789").await;
        assert_eq!((r.status(), &body[..]), (StatusCode::OK, &b"0123456789"[..]));
        assert_eq!(r.headers()["age"], "7");
        // Preconditions are for a 200 only: a stored 404 is served as it is.
        let missing = head(StatusCode::NOT_FOUND, STORED);
        let (r, body) = call(&request(Method::GET, &[("if-match", "\"x\"")]), &missing, "gone").await;
        assert_eq!((r.status(), &body[..]), (StatusCode::NOT_FOUND, &b"gone"[..]));
        assert!(!r.headers().contains_key("accept-ranges"));
    }

    #[tokio::test]
    async fn ranges_from_a_stored_body() {
        let ok = head(StatusCode::OK, STORED);
        let (r, body) = call(&request(Method::GET, &[("range", "bytes=2-4")]), &ok, "0123456789").await;
        assert_eq!((r.status(), &body[..]), (StatusCode::PARTIAL_CONTENT, &b"234"[..]));
        assert_eq!(r.headers()["content-range"], "bytes 2-4/10");
        assert_eq!(r.headers()["content-length"], "3");
        let (r, body) = call(&request(Method::GET, &[("range", "bytes=0-0,8-")]), &ok, "0123456789").await;
        assert_eq!(r.status(), StatusCode::PARTIAL_CONTENT);
        assert_eq!(r.headers()["content-length"], body.len().to_string().as_str());
        let text = String::from_utf8(body.to_vec()).unwrap();
        assert!(text.contains("Content-Type: text/plain\r\nContent-Range: bytes 8-9/10\r\n\r\n89\r\n"), "{text}");
        let (r, body) = call(&request(Method::GET, &[("range", "bytes=10-")]), &ok, "0123456789").await;
        assert_eq!((r.status(), body.len()), (StatusCode::RANGE_NOT_SATISFIABLE, 0));
        assert_eq!(r.headers()["content-range"], "bytes */10");
        assert_eq!(r.headers()["content-length"], "0");
        let if_range = [("range", "bytes=2-4"), ("if-range", "\"old\"")];
        let (r, body) = call(&request(Method::GET, &if_range), &ok, "0123456789").await;
        assert_eq!((r.status(), body.len()), (StatusCode::OK, 10));
        assert_eq!(r.headers()["accept-ranges"], "bytes");
        // HEAD: Range does not apply (RFC 9110 §14.2), no body.
        let (r, body) = call(&request(Method::HEAD, &[("range", "bytes=2-4")]), &ok, "0123456789").await;
        assert_eq!((r.status(), body.len()), (StatusCode::OK, 0));
        assert_eq!(r.headers()["content-length"], "10");
    }
}
