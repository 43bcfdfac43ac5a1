//! Request handling: one function from a request to a response, the same for
//! HTTP/1.1 and HTTP/2, plain or TLS.
//!
//! GET and HEAD serve a file or a generated object with validators, cache policy,
//! conditional requests and ranges; OPTIONS answers a CORS preflight; every other
//! method gets 405. Every response carries the CORS headers browser players need.
//!
//! What a conditional or Range request gets (304, 412, 200, 206, multipart, 416) is
//! decided by [`cdn_http::conditional::evaluate`] and [`cdn_http::range::plan`], the
//! same as on the edge; this module only builds the body from the file or generator.

use std::{borrow::Cow, path::PathBuf, sync::Arc, time::SystemTime};

use bytes::Bytes;
use cdn_node::listener::{Body, ConnInfo, empty, full};
use http::{HeaderMap, HeaderName, HeaderValue, Method, Request, Response, StatusCode, Uri, header};
use tokio::time::Instant;
use tracing::{debug, warn};

use cdn_http::{
    conditional::{self, Decision, Validators},
    range::{self, Plan},
};

use crate::{
    body::{self, Part, Source},
    config::{PathPolicy, Policy},
    files::{self, Lookup},
    generate,
    metrics::Metrics,
};

/// What every request handler shares.
#[derive(Debug)]
pub(crate) struct Shared {
    /// The canonical content root.
    pub(crate) root: PathBuf,
    pub(crate) generate: bool,
    pub(crate) policy: Policy,
    pub(crate) metrics: Metrics,
}

/// Methods this server answers.
const ALLOW: &str = "GET, HEAD, OPTIONS";
/// Request headers a browser may send cross-origin.
const ALLOW_HEADERS: &str =
    "Range, If-Match, If-None-Match, If-Modified-Since, If-Unmodified-Since, If-Range, Cache-Control, Pragma";
/// Response headers a browser script may read.
const EXPOSE_HEADERS: &str =
    "Content-Length, Content-Range, Accept-Ranges, ETag, X-Cache, Cache-Status, X-Served-By, Age";

/// `Surrogate-Key` (not in the `http` crate's list).
static SURROGATE_KEY: HeaderName = HeaderName::from_static("surrogate-key");

/// Handles one request from a listener.
pub(crate) async fn handle<B>(shared: Arc<Shared>, request: Request<B>, conn: ConnInfo) -> Response<Body> {
    let start = Instant::now();
    let (parts, _body) = request.into_parts();
    let response = respond(&shared, &parts.method, &parts.uri, &parts.headers).await;
    debug!(
        target: "cdn_origin::access",
        method = %parts.method,
        path = parts.uri.path(),
        version = ?parts.version,
        status = response.status().as_u16(),
        peer = %conn.peer,
        "request"
    );
    shared.metrics.record(response, start)
}

/// The response to a request, by method.
pub(crate) async fn respond(shared: &Shared, method: &Method, uri: &Uri, headers: &HeaderMap) -> Response<Body> {
    let mut response = match *method {
        Method::GET | Method::HEAD => serve(shared, method, uri, headers).await,
        Method::OPTIONS => preflight(),
        _ => {
            let mut response = error(StatusCode::METHOD_NOT_ALLOWED, "method not allowed");
            response.headers_mut().insert(header::ALLOW, HeaderValue::from_static(ALLOW));
            response
        }
    };
    let headers = response.headers_mut();
    headers.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, HeaderValue::from_static("*"));
    headers.insert(header::ACCESS_CONTROL_EXPOSE_HEADERS, HeaderValue::from_static(EXPOSE_HEADERS));
    if let Ok(date) = HeaderValue::try_from(httpdate::fmt_http_date(SystemTime::now())) {
        headers.insert(header::DATE, date);
    }
    if method == Method::HEAD {
        *response.body_mut() = empty();
    }
    response
}

/// A CORS preflight: 204 allowing our methods and the conditional/range headers.
fn preflight() -> Response<Body> {
    let mut response = Response::new(empty());
    *response.status_mut() = StatusCode::NO_CONTENT;
    let headers = response.headers_mut();
    headers.insert(header::ALLOW, HeaderValue::from_static(ALLOW));
    headers.insert(header::ACCESS_CONTROL_ALLOW_METHODS, HeaderValue::from_static(ALLOW));
    headers.insert(header::ACCESS_CONTROL_ALLOW_HEADERS, HeaderValue::from_static(ALLOW_HEADERS));
    headers.insert(header::ACCESS_CONTROL_MAX_AGE, HeaderValue::from_static("86400"));
    response
}

/// A short plain-text error that no cache should keep.
fn error(status: StatusCode, message: &str) -> Response<Body> {
    let text = format!("{message}\n");
    let mut response = Response::new(empty());
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"));
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    headers.insert(header::CONTENT_LENGTH, HeaderValue::from(text.len()));
    *response.body_mut() = full(text);
    response
}

/// What a GET or HEAD selected.
struct Representation {
    len: u64,
    etag: String,
    last_modified: Option<SystemTime>,
    content_type: Cow<'static, str>,
    /// The path the cache rules match.
    rule_path: String,
    source: Source,
    rate: Option<u64>,
}

/// Selects the representation, then applies preconditions and ranges.
async fn serve(shared: &Shared, method: &Method, uri: &Uri, headers: &HeaderMap) -> Response<Body> {
    let representation = match select(shared, uri).await {
        Ok(representation) => representation,
        Err(response) => return response,
    };
    let policy = shared.policy.lookup(&representation.rule_path);
    let validators = Validators::new(Some(&representation.etag), representation.last_modified);
    match conditional::evaluate(method, headers, validators) {
        Decision::Proceed => {}
        Decision::NotModified => {
            let mut response = Response::new(empty());
            *response.status_mut() = StatusCode::NOT_MODIFIED;
            insert_validators(response.headers_mut(), &representation, &policy);
            return response;
        }
        Decision::PreconditionFailed => return error(StatusCode::PRECONDITION_FAILED, "precondition failed"),
    }

    let content_type = representation.content_type.as_ref();
    let plan = range::plan(method, headers, representation.len, validators, || Some(content_type), range::boundary);
    let (parts, tail) = match &plan {
        Plan::Full { len } => (vec![Part { head: Bytes::new(), range: 0..*len }], Bytes::new()),
        Plan::Single { range, .. } => (vec![Part { head: Bytes::new(), range: range.clone() }], Bytes::new()),
        Plan::Multipart { ranges, framing } => {
            let parts =
                framing.heads.iter().zip(ranges).map(|(head, range)| Part { head: head.clone(), range: range.clone() });
            (parts.collect(), framing.tail.clone())
        }
        Plan::Unsatisfiable { .. } => {
            let mut response = error(StatusCode::RANGE_NOT_SATISFIABLE, "range not satisfiable");
            plan.set_headers(response.headers_mut());
            return response;
        }
    };

    let mut response = Response::new(empty());
    *response.status_mut() = plan.status();
    let headers = response.headers_mut();
    insert_validators(headers, &representation, &policy);
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::try_from(content_type).unwrap_or(HeaderValue::from_static("application/octet-stream")),
    );
    plan.set_headers(headers);
    if method == Method::GET && (representation.len > 0 || !tail.is_empty()) {
        *response.body_mut() = body::stream(representation.source, parts, tail, representation.rate);
    }
    response
}

/// ETag, Last-Modified, Cache-Control and Surrogate-Key: what 200, 206 and 304 share.
fn insert_validators(headers: &mut HeaderMap, representation: &Representation, policy: &PathPolicy) {
    if let Ok(etag) = HeaderValue::try_from(representation.etag.as_str()) {
        headers.insert(header::ETAG, etag);
    }
    if let Some(modified) = representation.last_modified
        && let Ok(value) = HeaderValue::try_from(httpdate::fmt_http_date(modified))
    {
        headers.insert(header::LAST_MODIFIED, value);
    }
    headers.insert(header::CACHE_CONTROL, policy.cache_control.clone());
    if let Some(keys) = &policy.surrogate_key {
        headers.insert(SURROGATE_KEY.clone(), keys.clone());
    }
}

/// Finds what the path names: a generated object under `/_gen/` or a file.
async fn select(shared: &Shared, uri: &Uri) -> Result<Representation, Response<Body>> {
    let not_found = || error(StatusCode::NOT_FOUND, "not found");
    let path = match files::parse_path(uri.path()) {
        Ok(path) => path,
        Err(Lookup::BadRequest) => return Err(error(StatusCode::BAD_REQUEST, "bad request path")),
        Err(Lookup::NotFound | Lookup::Io(_)) => return Err(not_found()),
    };
    if path.segments.first().is_some_and(|s| s == "_gen") {
        let [_, size] = path.segments.as_slice() else { return Err(not_found()) };
        if !shared.generate || path.trailing_slash {
            return Err(not_found());
        }
        let generated = match generate::parse(size, uri.query()) {
            Ok(generated) => generated,
            Err(generate::Invalid::NotFound) => return Err(not_found()),
            Err(generate::Invalid::BadRequest(reason)) => return Err(error(StatusCode::BAD_REQUEST, &reason)),
        };
        return Ok(Representation {
            len: generated.size,
            etag: generate::etag(generated.size, generated.seed),
            last_modified: Some(generate::last_modified(generated.seed)),
            content_type: Cow::Borrowed("application/octet-stream"),
            rule_path: format!("/_gen/{size}"),
            source: Source::Generated { seed: generated.seed },
            rate: generated.rate,
        });
    }
    match files::open(&shared.root, &path).await {
        Ok(found) => Ok(Representation {
            len: found.metadata.len(),
            etag: files::etag(&found.metadata),
            last_modified: files::last_modified(&found.metadata),
            content_type: files::content_type(&found.path),
            rule_path: found.rule_path,
            source: Source::File(found.file),
            rate: None,
        }),
        Err(Lookup::NotFound) => Err(not_found()),
        Err(Lookup::BadRequest) => Err(error(StatusCode::BAD_REQUEST, "bad request path")),
        Err(Lookup::Io(error_)) => {
            warn!(error = %error_, path = uri.path(), "cannot open file");
            Err(error(StatusCode::INTERNAL_SERVER_ERROR, "cannot read the file"))
        }
    }
}

#[cfg(test)]
mod tests {
    use http_body_util::BodyExt as _;

    use super::*;
    use crate::config::{Config, Rule};

    struct Fixture {
        _dir: tempfile::TempDir,
        shared: Shared,
    }

    fn fixture() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().canonicalize().unwrap();
        std::fs::create_dir(root.join("v")).unwrap();
        std::fs::write(root.join("index.html"), "<h1>hi</h1>").unwrap();
        std::fs::write(root.join("v/a.mp4"), (0..1000u32).map(|i| (i % 256) as u8).collect::<Vec<_>>()).unwrap();
        std::fs::write(root.join("empty.txt"), "").unwrap();
        let mut config = Config::new(&root);
        config.generate = true;
        config.rules.push(Rule {
            path_prefix: "/v/".into(),
            cache_control: Some("public, max-age=86400".into()),
            surrogate_keys: vec!["video".into(), "a".into()],
        });
        let shared = Shared {
            root,
            generate: true,
            policy: Policy::new(&config).unwrap(),
            metrics: Metrics::register(&prometheus::Registry::new()).unwrap(),
        };
        Fixture { _dir: dir, shared }
    }

    async fn call(
        shared: &Shared,
        method: Method,
        uri: &str,
        headers: &[(&'static str, &str)],
    ) -> (Response<()>, Bytes) {
        let mut map = HeaderMap::new();
        for (name, value) in headers {
            map.append(*name, HeaderValue::from_str(value).unwrap());
        }
        let response = respond(shared, &method, &uri.parse().unwrap(), &map).await;
        let (parts, body) = response.into_parts();
        let bytes = body.collect().await.unwrap().to_bytes();
        (Response::from_parts(parts, ()), bytes)
    }

    fn header<'a>(response: &'a Response<()>, name: &str) -> &'a str {
        response.headers().get(name).map_or("", |v| v.to_str().unwrap())
    }

    #[tokio::test]
    async fn serves_files_with_headers() {
        let f = fixture();
        let (r, body) = call(&f.shared, Method::GET, "/v/a.mp4?x=1", &[]).await;
        assert_eq!(r.status(), StatusCode::OK);
        assert_eq!(body.len(), 1000);
        assert_eq!(header(&r, "content-type"), "video/mp4");
        assert_eq!(header(&r, "content-length"), "1000");
        assert_eq!(header(&r, "cache-control"), "public, max-age=86400");
        assert_eq!(header(&r, "surrogate-key"), "video a");
        assert_eq!(header(&r, "accept-ranges"), "bytes");
        assert_eq!(header(&r, "access-control-allow-origin"), "*");
        assert!(header(&r, "access-control-expose-headers").contains("Content-Range"));
        assert!(header(&r, "etag").starts_with("\"3e8-"));
        assert!(httpdate::parse_http_date(header(&r, "last-modified")).is_ok());
        assert!(httpdate::parse_http_date(header(&r, "date")).is_ok());

        let (r, body) = call(&f.shared, Method::GET, "/", &[]).await;
        assert_eq!((r.status(), &body[..]), (StatusCode::OK, &b"<h1>hi</h1>"[..]));
        assert_eq!(header(&r, "content-type"), "text/html; charset=utf-8");
        assert_eq!(header(&r, "cache-control"), "public, max-age=60");
        assert_eq!(header(&r, "surrogate-key"), "");

        let (r, body) = call(&f.shared, Method::HEAD, "/v/a.mp4", &[("range", "bytes=0-1")]).await;
        assert_eq!((r.status(), body.len()), (StatusCode::OK, 0));
        assert_eq!(header(&r, "content-length"), "1000");

        let (r, body) = call(&f.shared, Method::GET, "/empty.txt", &[]).await;
        assert_eq!((r.status(), body.len(), header(&r, "content-length")), (StatusCode::OK, 0, "0"));
        let (r, _) = call(&f.shared, Method::GET, "/empty.txt", &[("range", "bytes=0-")]).await;
        assert_eq!((r.status(), header(&r, "content-range")), (StatusCode::RANGE_NOT_SATISFIABLE, "bytes */0"));
    }

    #[tokio::test]
    async fn methods_and_preflight() {
        let f = fixture();
        let (r, _) = call(&f.shared, Method::OPTIONS, "/v/a.mp4", &[("access-control-request-method", "GET")]).await;
        assert_eq!(r.status(), StatusCode::NO_CONTENT);
        assert_eq!(header(&r, "access-control-allow-methods"), "GET, HEAD, OPTIONS");
        assert!(header(&r, "access-control-allow-headers").contains("Range"));
        assert!(header(&r, "access-control-allow-headers").contains("If-None-Match"));
        assert_eq!(header(&r, "access-control-max-age"), "86400");
        assert_eq!(header(&r, "access-control-allow-origin"), "*");
        for method in [Method::POST, Method::PUT, Method::DELETE, Method::PATCH] {
            let (r, _) = call(&f.shared, method, "/v/a.mp4", &[]).await;
            assert_eq!(r.status(), StatusCode::METHOD_NOT_ALLOWED);
            assert_eq!(header(&r, "allow"), "GET, HEAD, OPTIONS");
        }
    }

    #[tokio::test]
    async fn conditionals_and_ranges() {
        let f = fixture();
        let (r, _) = call(&f.shared, Method::GET, "/v/a.mp4", &[]).await;
        let etag = header(&r, "etag").to_owned();
        let modified = header(&r, "last-modified").to_owned();

        let (r, body) = call(&f.shared, Method::GET, "/v/a.mp4", &[("if-none-match", &etag)]).await;
        assert_eq!((r.status(), body.len()), (StatusCode::NOT_MODIFIED, 0));
        assert_eq!(header(&r, "etag"), etag);
        assert_eq!(header(&r, "cache-control"), "public, max-age=86400");
        assert_eq!(header(&r, "content-length"), "");
        let (r, _) = call(&f.shared, Method::GET, "/v/a.mp4", &[("if-modified-since", &modified)]).await;
        assert_eq!(r.status(), StatusCode::NOT_MODIFIED);
        let (r, _) = call(&f.shared, Method::GET, "/v/a.mp4", &[("if-match", "\"other\"")]).await;
        assert_eq!(r.status(), StatusCode::PRECONDITION_FAILED);

        let (r, body) = call(&f.shared, Method::GET, "/v/a.mp4", &[("range", "bytes=10-19")]).await;
        assert_eq!(r.status(), StatusCode::PARTIAL_CONTENT);
        assert_eq!(header(&r, "content-range"), "bytes 10-19/1000");
        assert_eq!(&body[..], (10..20u8).collect::<Vec<_>>());
        let (r, body) = call(&f.shared, Method::GET, "/v/a.mp4", &[("range", "bytes=0-1,10-11")]).await;
        assert_eq!(r.status(), StatusCode::PARTIAL_CONTENT);
        assert!(header(&r, "content-type").starts_with("multipart/byteranges; boundary="));
        assert_eq!(header(&r, "content-length"), body.len().to_string());
        let (r, _) = call(&f.shared, Method::GET, "/v/a.mp4", &[("range", "bytes=1000-")]).await;
        assert_eq!((r.status(), header(&r, "content-range")), (StatusCode::RANGE_NOT_SATISFIABLE, "bytes */1000"));
        // If-Range: a match applies the range, anything else sends it all.
        for (if_range, status) in [
            (etag.as_str(), StatusCode::PARTIAL_CONTENT),
            (modified.as_str(), StatusCode::PARTIAL_CONTENT),
            ("\"stale\"", StatusCode::OK),
            ("Thu, 01 Jan 1998 00:00:00 GMT", StatusCode::OK),
        ] {
            let (r, _) =
                call(&f.shared, Method::GET, "/v/a.mp4", &[("range", "bytes=0-9"), ("if-range", if_range)]).await;
            assert_eq!(r.status(), status, "{if_range}");
        }
        // An unsatisfiable range under a failed If-Range is ignored too.
        let (r, _) = call(&f.shared, Method::GET, "/v/a.mp4", &[("range", "bytes=5000-"), ("if-range", "\"x\"")]).await;
        assert_eq!(r.status(), StatusCode::OK);
        // Invalid Range syntax is ignored.
        let (r, _) = call(&f.shared, Method::GET, "/v/a.mp4", &[("range", "bytes=9-1")]).await;
        assert_eq!(r.status(), StatusCode::OK);
    }

    #[tokio::test]
    async fn refuses_traversal_and_serves_generated_objects() {
        let mut f = fixture();
        for path in
            ["/../etc/passwd", "/%2e%2e/etc/passwd", "/v/%2E%2e/%2e%2e/x", "/..%2f..%2fetc/passwd", "/nope", "/_gen/x"]
        {
            let (r, _) = call(&f.shared, Method::GET, path, &[]).await;
            assert_eq!(r.status(), StatusCode::NOT_FOUND, "{path}");
            assert_eq!(header(&r, "cache-control"), "no-store");
        }
        let (r, _) = call(&f.shared, Method::GET, "/%ff", &[]).await;
        assert_eq!(r.status(), StatusCode::BAD_REQUEST);

        let (r, body) = call(&f.shared, Method::GET, "/_gen/100000?v=3", &[]).await;
        assert_eq!(r.status(), StatusCode::OK);
        assert_eq!(header(&r, "etag"), "\"gen-100000-3\"");
        assert_eq!(header(&r, "content-type"), "application/octet-stream");
        assert_eq!(body, generate::content(0..100_000, 3));
        let (r, body) = call(&f.shared, Method::GET, "/_gen/1KiB", &[("range", "bytes=-10")]).await;
        assert_eq!(header(&r, "content-range"), "bytes 1014-1023/1024");
        assert_eq!(body, generate::content(1014..1024, 0));
        let (r, _) = call(&f.shared, Method::GET, "/_gen/1KiB", &[("if-none-match", "\"gen-1024-0\"")]).await;
        assert_eq!(r.status(), StatusCode::NOT_MODIFIED);
        let (r, _) = call(&f.shared, Method::GET, "/_gen/1KiB?v=1", &[("if-none-match", "\"gen-1024-0\"")]).await;
        assert_eq!(r.status(), StatusCode::OK);
        let (r, _) = call(&f.shared, Method::GET, "/_gen/65GiB", &[]).await;
        assert_eq!(r.status(), StatusCode::BAD_REQUEST);
        let (r, _) = call(&f.shared, Method::GET, "/_gen/1/2", &[]).await;
        assert_eq!(r.status(), StatusCode::NOT_FOUND);
        f.shared.generate = false;
        let (r, _) = call(&f.shared, Method::GET, "/_gen/1000", &[]).await;
        assert_eq!(r.status(), StatusCode::NOT_FOUND);
    }
}
