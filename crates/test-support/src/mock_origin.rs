//! A programmable origin for edge tests: routes with fixed responses, delays,
//! trickled or cut-short bodies, single ranges and ETag revalidation; it counts
//! every request it sees (by path, and by path and `Range`) and keeps the last
//! headers of each.
//!
//! Moved from tests/edge/mock_origin.rs (which tests/control/main.rs also pulled
//! in with `#[path]`).

use std::{
    collections::HashMap,
    convert::Infallible,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use bytes::Bytes;
use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::{BodyExt as _, StreamBody, combinators::BoxBody};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// One route's behaviour.
#[derive(Clone, Debug)]
pub struct Route {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Bytes,
    /// Wait before sending the response head.
    pub delay: Duration,
    /// Send the body in chunks of this size with this pause between them.
    pub trickle: Option<(usize, Duration)>,
    /// Answer `If-None-Match` equal to this route's ETag with 304.
    pub revalidate: bool,
    /// Answer single `Range` requests with 206.
    pub ranges: bool,
    /// Announce this Content-Length but send only `body` (a reset mid-body).
    pub announce: Option<usize>,
}

impl Route {
    /// A 200 with `Cache-Control: cache_control` and `body`, at once.
    pub fn ok(cache_control: &str, body: impl Into<Bytes>) -> Self {
        Self {
            status: 200,
            headers: vec![("cache-control".into(), cache_control.into())],
            body: body.into(),
            delay: Duration::ZERO,
            trickle: None,
            revalidate: false,
            ranges: false,
            announce: None,
        }
    }

    /// Adds a response header.
    pub fn header(mut self, name: &str, value: &str) -> Self {
        self.headers.push((name.into(), value.into()));
        self
    }

    /// Answers with `status` instead of 200.
    pub fn status(mut self, status: u16) -> Self {
        self.status = status;
        self
    }

    /// Waits `delay` before the response head.
    pub fn delay(mut self, delay: Duration) -> Self {
        self.delay = delay;
        self
    }

    /// Sends the body in `chunk`-byte pieces, `pause` apart.
    pub fn trickle(mut self, chunk: usize, pause: Duration) -> Self {
        self.trickle = Some((chunk, pause));
        self
    }

    /// Announces `len` bytes but sends only the body: the connection breaks mid-body.
    pub fn truncated(mut self, len: usize) -> Self {
        self.announce = Some(len);
        self
    }

    /// Answers single `Range` requests with 206.
    pub fn ranges(mut self) -> Self {
        self.ranges = true;
        self
    }

    /// Answers a matching `If-None-Match` with 304.
    pub fn revalidate(mut self) -> Self {
        self.revalidate = true;
        self
    }

    fn etag(&self) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n.eq_ignore_ascii_case("etag")).map(|(_, v)| v.as_str())
    }
}

#[derive(Default)]
struct State {
    clock: Option<cdn_edge::Clock>,
    routes: HashMap<String, Route>,
    hits: HashMap<String, usize>,
    /// Requests per (path and query, `Range` header or `""`).
    range_hits: HashMap<(String, String), usize>,
    last_headers: HashMap<String, HeaderMap>,
}

/// A running mock origin; [`stop`](Self::stop) ends it.
pub struct MockOrigin {
    pub addr: SocketAddr,
    state: Arc<Mutex<State>>,
    stop: CancellationToken,
}

impl MockOrigin {
    /// A mock origin on 127.0.0.1, any port.
    pub async fn start() -> Self {
        Self::start_on("127.0.0.1:0".parse().unwrap()).await
    }

    /// A mock origin on `addr`.
    pub async fn start_on(addr: SocketAddr) -> Self {
        let listener = TcpListener::bind(addr).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(Mutex::new(State::default()));
        let stop = CancellationToken::new();
        let (task_state, task_stop) = (state.clone(), stop.clone());
        tokio::spawn(async move {
            let mut connections = tokio::task::JoinSet::new();
            loop {
                let stream = tokio::select! {
                    () = task_stop.cancelled() => break,
                    accepted = listener.accept() => match accepted { Ok((s, _)) => s, Err(_) => continue },
                };
                let state = task_state.clone();
                let conn_stop = task_stop.clone();
                connections.spawn(async move {
                    let service = hyper::service::service_fn(move |req| {
                        let state = state.clone();
                        async move { Ok::<_, Infallible>(respond(&state, req).await) }
                    });
                    let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
                    let conn = builder.serve_connection(TokioIo::new(stream), service);
                    tokio::select! {
                        _ = conn => {}
                        () = conn_stop.cancelled() => {}
                    }
                });
            }
            connections.abort_all();
        });
        Self { addr, state, stop }
    }

    /// `http://<addr>`, no trailing slash.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Dates this origin's responses with `clock` (the edge's, in tests that move it).
    pub fn use_clock(&self, clock: cdn_edge::Clock) {
        self.state.lock().unwrap().clock = Some(clock);
    }

    /// Sets (or replaces) the route for `path` (a path, or a path and query).
    pub fn route(&self, path: &str, route: Route) {
        self.state.lock().unwrap().routes.insert(path.to_string(), route);
    }

    /// Requests seen for `path_and_query`.
    pub fn hits(&self, path: &str) -> usize {
        self.state.lock().unwrap().hits.get(path).copied().unwrap_or(0)
    }

    /// Every path (and query) requested so far, with its count, sorted by path: what
    /// an edge sent, where a test must show what it did *not* send.
    pub fn requests(&self) -> Vec<(String, usize)> {
        let mut seen: Vec<(String, usize)> =
            self.state.lock().unwrap().hits.iter().map(|(p, n)| (p.clone(), *n)).collect();
        seen.sort();
        seen
    }

    /// Forgets the requests counted so far.
    pub fn reset_hits(&self) {
        let mut state = self.state.lock().unwrap();
        state.hits.clear();
        state.range_hits.clear();
    }

    /// The headers of the last request for `path` (empty if none came).
    pub fn last_headers(&self, path: &str) -> HeaderMap {
        self.state.lock().unwrap().last_headers.get(path).cloned().unwrap_or_default()
    }

    /// The requests seen for `path_and_query`, counted by their `Range` header
    /// (`""`: none), sorted by it.
    pub fn range_hits(&self, path: &str) -> Vec<(String, usize)> {
        let state = self.state.lock().unwrap();
        let mut seen: Vec<(String, usize)> =
            state.range_hits.iter().filter(|((p, _), _)| p == path).map(|((_, r), n)| (r.clone(), *n)).collect();
        seen.sort();
        seen
    }

    /// Stops accepting and drops every open connection.
    pub fn stop(&self) {
        self.stop.cancel();
    }
}

async fn respond(state: &Mutex<State>, req: Request<Incoming>) -> Response<BoxBody<Bytes, BoxError>> {
    let key = req.uri().path_and_query().map_or("/".to_string(), |pq| pq.as_str().to_string());
    let (route, now) = {
        let mut state = state.lock().unwrap();
        let now = state.clock.as_ref().map_or_else(std::time::SystemTime::now, |c| c.now());
        *state.hits.entry(key.clone()).or_default() += 1;
        let range = req.headers().get("range").and_then(|v| v.to_str().ok()).unwrap_or("").to_string();
        *state.range_hits.entry((key.clone(), range)).or_default() += 1;
        state.last_headers.insert(key.clone(), req.headers().clone());
        (state.routes.get(&key).or_else(|| state.routes.get(req.uri().path())).cloned(), now)
    };
    let Some(route) = route else {
        let mut response = Response::new(full(Bytes::from_static(b"no such route\n")));
        *response.status_mut() = StatusCode::NOT_FOUND;
        return response;
    };
    if !route.delay.is_zero() {
        tokio::time::sleep(route.delay).await;
    }
    let not_modified = route.revalidate
        && route
            .etag()
            .is_some_and(|etag| req.headers().get("if-none-match").is_some_and(|v| v.to_str().unwrap_or("") == etag));
    let mut builder = Response::builder().status(if not_modified { 304 } else { route.status });
    for (name, value) in &route.headers {
        builder = builder.header(name, value);
    }
    builder = builder.header("date", httpdate::fmt_http_date(now));
    if not_modified || req.method() == http::Method::HEAD {
        return builder.body(full(Bytes::new())).unwrap();
    }
    if route.ranges
        && let Some(range) =
            req.headers().get("range").and_then(|v| v.to_str().ok()).and_then(|v| single_range(v, route.body.len()))
    {
        let part = route.body.slice(range.clone());
        return builder
            .status(206)
            .header("content-range", format!("bytes {}-{}/{}", range.start, range.end - 1, route.body.len()))
            .header("content-length", part.len())
            .body(full(part))
            .unwrap();
    }
    builder = builder.header("content-length", route.announce.unwrap_or(route.body.len()));
    if route.announce.is_some() {
        // A body shorter than announced, sent as a stream so hyper does not object:
        // the connection breaks before the announced length.
        let chunk = route.body.clone();
        let stream = futures_util::stream::once(async move { Ok::<_, BoxError>(Frame::data(chunk)) });
        return builder.body(StreamBody::new(stream).boxed()).unwrap();
    }
    match route.trickle {
        None => builder.body(full(route.body.clone())).unwrap(),
        Some((chunk, pause)) => {
            let body = route.body.clone();
            let chunks: Vec<Bytes> =
                (0..body.len()).step_by(chunk).map(|i| body.slice(i..(i + chunk).min(body.len()))).collect();
            let stream = futures_util::stream::unfold(chunks.into_iter(), move |mut chunks| async move {
                let next = chunks.next()?;
                tokio::time::sleep(pause).await;
                Some((Ok::<_, BoxError>(Frame::data(next)), chunks))
            });
            builder.body(StreamBody::new(stream).boxed()).unwrap()
        }
    }
}

fn full(bytes: Bytes) -> BoxBody<Bytes, BoxError> {
    http_body_util::Full::new(bytes).map_err(|never| match never {}).boxed()
}

fn single_range(value: &str, len: usize) -> Option<std::ops::Range<usize>> {
    let (first, last) = value.strip_prefix("bytes=")?.split_once('-')?;
    let first: usize = first.parse().ok()?;
    let last: usize = if last.is_empty() { len - 1 } else { last.parse::<usize>().ok()?.min(len - 1) };
    (first <= last && first < len).then_some(first..last + 1)
}
