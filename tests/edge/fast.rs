//! The HTTP/1.1 HIT short way (`cdn_node::listener::fast`, `cdn_edge` pipeline::fast):
//! what it answers is byte for byte what the full pipeline answers, on raw TCP
//! connections (pipelined, split heads, long heads), and everything unusual is
//! handed to hyper with the bytes already read.

use std::{net::SocketAddr, time::Duration};

use cdn_test_support::{
    client::{Reply, get, h2c_client, send, tls_client},
    edge::{TestEdge, start_tls_edge},
    mock_origin::{MockOrigin, Route},
};
use http::{StatusCode, Version};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::TcpStream,
};

/// A raw HTTP/1.1 client connection that reads responses one by one.
struct Conn {
    stream: TcpStream,
    buf: Vec<u8>,
}

/// One response: its head (status line and headers, with `\r\n`s) and body.
#[derive(Debug, PartialEq, Eq)]
struct Raw {
    head: String,
    body: Vec<u8>,
}

impl Raw {
    fn header(&self, name: &str) -> Option<&str> {
        self.head.split("\r\n").find_map(|line| {
            let (n, v) = line.split_once(": ")?;
            n.eq_ignore_ascii_case(name).then_some(v)
        })
    }

    /// The head without its `date` value (hyper's clock and ours may be a second apart).
    fn dateless(&self) -> String {
        self.head
            .split("\r\n")
            .map(|line| if line.to_ascii_lowercase().starts_with("date: ") { "date: (now)" } else { line })
            .collect::<Vec<_>>()
            .join("\r\n")
    }
}

impl Conn {
    async fn open(addr: SocketAddr) -> Self {
        Self { stream: TcpStream::connect(addr).await.unwrap(), buf: Vec::new() }
    }

    async fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).await.unwrap();
    }

    /// Reads the next response (`head_request`: it has no body).
    async fn response(&mut self, head_request: bool) -> Raw {
        tokio::time::timeout(Duration::from_secs(5), async {
            loop {
                if let Some(end) = self.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                    let head = String::from_utf8(self.buf[..end + 4].to_vec()).unwrap();
                    let status: u16 = head[9..12].parse().unwrap();
                    let len = if head_request || status == 304 {
                        0
                    } else {
                        head.split("\r\n")
                            .find_map(|l| l.to_ascii_lowercase().strip_prefix("content-length: ").map(str::to_string))
                            .map_or(0, |v| v.parse().unwrap())
                    };
                    if self.buf.len() >= end + 4 + len {
                        let body = self.buf[end + 4..end + 4 + len].to_vec();
                        self.buf.drain(..end + 4 + len);
                        return Raw { head, body };
                    }
                }
                let mut chunk = [0u8; 16384];
                let n = self.stream.read(&mut chunk).await.unwrap();
                assert!(n > 0, "connection closed; read so far: {:?}", String::from_utf8_lossy(&self.buf));
                self.buf.extend_from_slice(&chunk[..n]);
            }
        })
        .await
        .expect("a response within 5 s")
    }

    async fn get(&mut self, request: &str) -> Raw {
        self.send(request.as_bytes()).await;
        self.response(request.starts_with("HEAD ")).await
    }
}

fn fast_hits(edge: &TestEdge) -> f64 {
    edge.metric("cdn_fast_hits_total", &[])
}

/// An edge with `/f` stored (a 1 KiB body with validators), and its request head.
async fn warm_edge() -> (MockOrigin, TestEdge, String) {
    let origin = MockOrigin::start().await;
    origin.route(
        "/f",
        Route::ok("public, max-age=600", vec![b'x'; 1024])
            .header("etag", "\"f1\"")
            .header("last-modified", "Tue, 15 Nov 1994 12:45:26 GMT")
            .header("content-type", "application/octet-stream"),
    );
    let edge = TestEdge::start(&origin.url(), |_| {}).await;
    let host = format!("127.0.0.1:{}", edge.http.port());
    let mut conn = Conn::open(edge.http).await;
    let first = conn.get(&format!("GET /f HTTP/1.1\r\nHost: {host}\r\n\r\n")).await;
    assert_eq!(first.header("x-cache"), Some("MISS"));
    (origin, edge, host)
}

#[tokio::test]
async fn a_fast_hit_is_byte_for_byte_the_pipelines() {
    let (origin, edge, host) = warm_edge().await;
    edge.clock.advance(Duration::from_secs(7));
    let mut conn = Conn::open(edge.http).await;
    for method in ["GET", "HEAD"] {
        // The same request both ways: a header outside the short way's list sends it
        // through hyper and the pipeline. A second boundary between the two can change
        // Age and ttl: then once more.
        let mut same = false;
        for _ in 0..3 {
            let before = fast_hits(&edge);
            let hits = edge.metric("cdn_requests_total", &[("protocol", "h1"), ("cache", "hit")]);
            let fast = conn.get(&format!("{method} /f HTTP/1.1\r\nHost: {host}\r\nUser-Agent: t\r\n\r\n")).await;
            assert_eq!(fast_hits(&edge), before + 1.0, "{method}: the short way answered");
            // Counted as the pipeline counts HITs.
            assert_eq!(edge.metric("cdn_requests_total", &[("protocol", "h1"), ("cache", "hit")]), hits + 1.0);
            let mut full_conn = Conn::open(edge.http).await;
            let full = full_conn.get(&format!("{method} /f HTTP/1.1\r\nHost: {host}\r\nX-Full: 1\r\n\r\n")).await;
            assert_eq!(fast_hits(&edge), before + 1.0, "{method}: the full way answered");
            assert_eq!(fast.header("x-cache"), Some("HIT"));
            assert!(fast.head.starts_with("HTTP/1.1 200 OK\r\n"), "{}", fast.head);
            assert!(
                fast.header("age").is_some_and(|age| age.starts_with('7') || age.starts_with('8')),
                "{}",
                fast.head
            );
            for name in ["etag", "last-modified", "content-type", "cache-status", "x-served-by", "content-length"] {
                assert!(fast.header(name).is_some(), "{method}: {name} missing:\n{}", fast.head);
            }
            assert_eq!(fast.body, if method == "GET" { vec![b'x'; 1024] } else { vec![] });
            if fast.dateless() == full.dateless() && fast.body == full.body {
                same = true;
                break;
            }
            eprintln!("{method} differs (a second boundary?):\n{}\n---\n{}", fast.head, full.head);
        }
        assert!(same, "{method}: the short way's answer is the pipeline's");
    }
    assert_eq!(origin.hits("/f"), 1);
    edge.stop().await;
}

#[tokio::test]
async fn pipelined_split_and_long_requests() {
    let (origin, edge, host) = warm_edge().await;
    let get = format!("GET /f HTTP/1.1\r\nHost: {host}\r\n\r\n");
    let head = format!("HEAD /f HTTP/1.1\r\nHost: {host}\r\n\r\n");
    let full = format!("GET /f HTTP/1.1\r\nHost: {host}\r\nX-Full: 1\r\n\r\n");

    // Three requests in one write: two short-way answers, then the rest through hyper
    // (which gets the third request's bytes replayed), in order.
    let mut conn = Conn::open(edge.http).await;
    let before = fast_hits(&edge);
    conn.send(format!("{get}{head}{full}").as_bytes()).await;
    let (a, b, c) = (conn.response(false).await, conn.response(true).await, conn.response(false).await);
    assert_eq!((a.body.len(), b.body.len(), c.body.len()), (1024, 0, 1024));
    assert!([&a, &b, &c].iter().all(|r| r.header("x-cache") == Some("HIT")));
    assert_eq!(b.header("content-length"), Some("1024"));
    assert_eq!(fast_hits(&edge), before + 2.0);
    // The connection lives on, now served by hyper.
    let d = conn.get(&get).await;
    assert_eq!((d.header("x-cache"), d.body.len()), (Some("HIT"), 1024));

    // A request head split across TCP segments.
    let mut conn = Conn::open(edge.http).await;
    conn.stream.set_nodelay(true).unwrap();
    let before = fast_hits(&edge);
    for piece in get.as_bytes().chunks(7) {
        conn.send(piece).await;
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let split = conn.response(false).await;
    assert_eq!((split.header("x-cache"), split.body.len()), (Some("HIT"), 1024));
    assert_eq!(fast_hits(&edge), before + 1.0);
    let again = conn.get(&get).await;
    assert_eq!(again.body.len(), 1024);
    assert_eq!(fast_hits(&edge), before + 2.0, "and the connection stays on the short way");

    // A head longer than the short way's buffer: hyper reads the rest and answers.
    let cookie = "c".repeat(cdn_node::listener::fast::MAX_HEAD + 100);
    let before = fast_hits(&edge);
    let mut conn = Conn::open(edge.http).await;
    let long = conn.get(&format!("GET /f HTTP/1.1\r\nHost: {host}\r\nCookie: {cookie}\r\n\r\n")).await;
    assert_eq!((long.header("x-cache"), long.body.len()), (Some("HIT"), 1024));
    assert_eq!(fast_hits(&edge), before);
    assert_eq!(origin.hits("/f"), 1);
    edge.stop().await;
}

#[tokio::test]
async fn anything_unusual_goes_the_full_way() {
    let (origin, edge, host) = warm_edge().await;
    let before = fast_hits(&edge);
    let mut conn = Conn::open(edge.http).await;
    // Preconditions: 304 from the pipeline.
    let r = conn.get(&format!("GET /f HTTP/1.1\r\nHost: {host}\r\nIf-None-Match: \"f1\"\r\n\r\n")).await;
    assert!(r.head.starts_with("HTTP/1.1 304"), "{}", r.head);
    let mut conn = Conn::open(edge.http).await;
    let r = conn
        .get(&format!("GET /f HTTP/1.1\r\nHost: {host}\r\nIf-Modified-Since: Tue, 15 Nov 1994 12:45:26 GMT\r\n\r\n"))
        .await;
    assert!(r.head.starts_with("HTTP/1.1 304"), "{}", r.head);
    // Ranges: 206.
    let mut conn = Conn::open(edge.http).await;
    let r = conn.get(&format!("GET /f HTTP/1.1\r\nHost: {host}\r\nRange: bytes=0-9\r\n\r\n")).await;
    assert!(r.head.starts_with("HTTP/1.1 206"), "{}", r.head);
    assert_eq!(r.body.len(), 10);
    // HTTP/1.0, absolute-form, an uppercase host: answered, the full way.
    let mut conn = Conn::open(edge.http).await;
    let r = conn.get(&format!("GET /f HTTP/1.0\r\nHost: {host}\r\n\r\n")).await;
    assert!(r.head.starts_with("HTTP/1.1 200") || r.head.starts_with("HTTP/1.0 200"), "{}", r.head);
    let mut conn = Conn::open(edge.http).await;
    let r = conn.get(&format!("GET http://{host}/f HTTP/1.1\r\nHost: {host}\r\n\r\n")).await;
    assert_eq!(r.header("x-cache"), Some("HIT"));
    // Two Host lines: whatever the pipeline makes of them, not the short way.
    let mut conn = Conn::open(edge.http).await;
    conn.get(&format!("GET /f HTTP/1.1\r\nHost: {host}\r\nHost: other\r\n\r\n")).await;
    assert_eq!(fast_hits(&edge), before, "none of these took the short way");
    // A malformed head gets hyper's 400.
    let mut conn = Conn::open(edge.http).await;
    let r = conn.get(&format!("GET /f HTTP/1.1\r\nHost: {host}\r\nBad Header: x\r\n\r\n")).await;
    assert!(r.head.starts_with("HTTP/1.1 400"), "{}", r.head);
    // A request that must be revalidated goes to the origin.
    let mut conn = Conn::open(edge.http).await;
    let r = conn.get(&format!("GET /f HTTP/1.1\r\nHost: {host}\r\nCache-Control: no-cache\r\n\r\n")).await;
    assert_ne!(r.header("x-cache"), Some("HIT"), "{}", r.head);
    assert_eq!(origin.hits("/f"), 2);
    // An unsafe request invalidates the object: the next GET is a miss, not a fast HIT.
    let mut conn = Conn::open(edge.http).await;
    let r = conn.get(&format!("POST /f HTTP/1.1\r\nHost: {host}\r\nContent-Length: 0\r\n\r\n")).await;
    assert!(r.head.starts_with("HTTP/1.1 2"), "{}", r.head);
    let before = fast_hits(&edge);
    let mut conn = Conn::open(edge.http).await;
    let r = conn.get(&format!("GET /f HTTP/1.1\r\nHost: {host}\r\n\r\n")).await;
    assert_eq!(r.header("x-cache"), Some("MISS"), "{}", r.head);
    assert_eq!(fast_hits(&edge), before);
    // Stale: the short way declines, the pipeline revalidates.
    edge.clock.advance(Duration::from_secs(601));
    let r = conn.get(&format!("GET /f HTTP/1.1\r\nHost: {host}\r\n\r\n")).await;
    assert_ne!(r.header("x-cache"), Some("HIT"), "{}", r.head);
    assert_eq!(fast_hits(&edge), before);
    edge.stop().await;
}

/// The short way and the edge's other features: a compressed text object (Vary)
/// goes the full way with its encoding while a plain object answers the short way
/// whatever the Accept-Encoding; a client over its rate gets the full way's 429; an
/// edge with an access log logs every HIT (no short way).
#[tokio::test]
async fn compression_limits_and_access_logs_keep_their_say() {
    let origin = MockOrigin::start().await;
    origin.route("/f", Route::ok("public, max-age=600", vec![b'x'; 1024]).header("content-type", "image/png"));
    origin.route("/t", Route::ok("public, max-age=600", "some text ".repeat(100)).header("content-type", "text/plain"));
    let edge = TestEdge::start(&origin.url(), |c| {
        c.limits.client_rps = Some(50);
        c.limits.client_burst = Some(5);
    })
    .await;
    let host = format!("127.0.0.1:{}", edge.http.port());
    let mut conn = Conn::open(edge.http).await;
    let ae = "Accept-Encoding: gzip, br";
    for path in ["/f", "/t", "/t"] {
        conn.get(&format!("GET {path} HTTP/1.1\r\nHost: {host}\r\n{ae}\r\n\r\n")).await;
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    // A connection that went the full way once stays with hyper: a new one.
    let mut conn = Conn::open(edge.http).await;
    let before = fast_hits(&edge);
    let r = conn.get(&format!("GET /f HTTP/1.1\r\nHost: {host}\r\n{ae}\r\n\r\n")).await;
    assert_eq!((r.header("x-cache"), fast_hits(&edge)), (Some("HIT"), before + 1.0), "{}", r.head);
    let r = conn.get(&format!("GET /t HTTP/1.1\r\nHost: {host}\r\n{ae}\r\n\r\n")).await;
    assert_eq!(r.header("x-cache"), Some("HIT"), "{}", r.head);
    assert_eq!(r.header("content-encoding"), Some("br"), "{}", r.head);
    assert_eq!(fast_hits(&edge), before + 1.0, "a varying object goes the full way");
    let mut conn = Conn::open(edge.http).await;
    // Over the rate: the burst of 5 goes, then 429s, from the full way.
    let mut limited = 0;
    for _ in 0..20 {
        let r = conn.get(&format!("GET /f HTTP/1.1\r\nHost: {host}\r\n\r\n")).await;
        if r.head.starts_with("HTTP/1.1 429") {
            limited += 1;
            assert!(r.header("retry-after").is_some(), "{}", r.head);
        }
    }
    assert!(limited >= 10, "{limited} of 20 limited");
    edge.stop().await;

    let logs = tempfile::tempdir().unwrap();
    let log = logs.path().join("access.log");
    let edge = TestEdge::start(&origin.url(), |c| c.access_log = Some(cdn_edge::access_log::Settings::new(&log))).await;
    let host = format!("127.0.0.1:{}", edge.http.port());
    let mut conn = Conn::open(edge.http).await;
    for _ in 0..3 {
        conn.get(&format!("GET /f HTTP/1.1\r\nHost: {host}\r\n\r\n")).await;
    }
    assert_eq!(fast_hits(&edge), 0.0, "with an access log every request goes the full way");
    cdn_test_support::wait::until("three lines", Duration::from_secs(10), Duration::from_millis(20), async || {
        (std::fs::read_to_string(&log).unwrap_or_default().lines().count() == 3).then_some(())
    })
    .await;
    edge.stop().await;
}

/// A response's headers in order, `date` left out (hyper's clock and the test's may
/// be a second apart).
fn dateless(reply: &Reply) -> Vec<(String, String)> {
    reply
        .headers
        .iter()
        .filter(|(name, _)| *name != "date")
        .map(|(name, value)| (name.to_string(), String::from_utf8_lossy(value.as_bytes()).into_owned()))
        .collect()
}

/// The HTTP/2 short way (fresh memory HITs answered with a prepared header map,
/// pipeline::fast): the same response as the full pipeline over h2c and h2 over TLS,
/// counted the same, and anything unusual goes the full way.
#[tokio::test]
async fn an_h2_fast_hit_is_the_pipelines_answer() {
    let (origin, edge, _) = warm_edge().await;
    edge.clock.advance(Duration::from_secs(7));
    let h2c = h2c_client();
    let url = edge.url("/f");
    for method in ["GET", "HEAD"] {
        let mut same = false;
        for _ in 0..3 {
            let before = fast_hits(&edge);
            let hits = edge.metric("cdn_requests_total", &[("protocol", "h2"), ("cache", "hit")]);
            let fast = send(&h2c, method, &url, &[("user-agent", "t")]).await;
            assert_eq!(fast.version, Version::HTTP_2);
            assert_eq!(fast_hits(&edge), before + 1.0, "{method}: the short way answered");
            assert_eq!(edge.metric("cdn_requests_total", &[("protocol", "h2"), ("cache", "hit")]), hits + 1.0);
            let full = send(&h2c, method, &url, &[("x-full", "1")]).await;
            assert_eq!(fast_hits(&edge), before + 1.0, "{method}: the full way answered");
            assert_eq!(fast.status, StatusCode::OK);
            assert_eq!(fast.x_cache(), "HIT");
            assert!(!fast.header("date").is_empty(), "hyper dates it");
            assert_eq!(fast.header("content-length"), "1024");
            assert!(fast.header("age").starts_with('7') || fast.header("age").starts_with('8'));
            assert_eq!(fast.body, if method == "GET" { vec![b'x'; 1024] } else { vec![] });
            if dateless(&fast) == dateless(&full) && fast.body == full.body {
                same = true;
                break;
            }
            eprintln!("{method} differs (a second boundary?):\n{:?}\n---\n{:?}", fast.headers, full.headers);
        }
        assert!(same, "{method}: the short way's answer is the pipeline's");
    }
    // Unusual requests: a Host field that is not the :authority (the full way's 400),
    // a request that must be revalidated, a range.
    let before = fast_hits(&edge);
    let r = get(&h2c, &url, &[("host", "other.test")]).await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    let r = get(&h2c, &url, &[("range", "bytes=0-9")]).await;
    assert_eq!((r.status, r.body.len()), (StatusCode::PARTIAL_CONTENT, 10));
    let r = get(&h2c, &url, &[("cache-control", "no-cache")]).await;
    assert_ne!(r.x_cache(), "HIT");
    assert_eq!(origin.hits("/f"), 2);
    assert_eq!(fast_hits(&edge), before, "none of these took the short way");
    edge.stop().await;

    // Over TLS (ALPN h2): the short way too, with the full way's Alt-Svc.
    let origin = MockOrigin::start().await;
    origin.route("/t", Route::ok("public, max-age=600", vec![b'y'; 2048]));
    let edge = start_tls_edge(&origin.url(), |_| {}).await;
    let tls = tls_client();
    let url = format!("https://localhost:{}/t", edge.https.unwrap().port());
    assert_eq!(get(&tls, &url, &[]).await.x_cache(), "MISS");
    let before = fast_hits(&edge);
    let fast = get(&tls, &url, &[]).await;
    assert_eq!((fast.version, fast.x_cache()), (Version::HTTP_2, "HIT"));
    assert_eq!(fast_hits(&edge), before + 1.0);
    assert!(!fast.header("alt-svc").is_empty(), "{:?}", fast.headers);
    let full = get(&tls, &url, &[("x-full", "1")]).await;
    assert_eq!(fast.header("alt-svc"), full.header("alt-svc"));
    assert_eq!(fast.body, full.body);
    assert_eq!(origin.hits("/t"), 1);
    edge.stop().await;
}
