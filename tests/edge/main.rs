//! The edge cache against a mock origin, with real HTTP/1.1 and HTTP/2 clients.
//! The edges, the mock origin and the clients come from `cdn-test-support`.

mod access_log;
mod certs;
mod compression;
mod conditional;
mod disk;
mod fast;
mod h3;
mod hardening;
mod limits;
mod overload;
mod ranges;
mod signing;
mod standards;
mod zerocopy;

use std::time::{Duration, Instant};

use bytes::Bytes;
use cdn_test_support::{
    client::{client, get, send, tls_client},
    edge::TestEdge,
    mock_origin::{MockOrigin, Route},
    net::{free_port, raw_request},
};
use http::{StatusCode, Version};
use http_body_util::{BodyExt as _, Empty};

#[tokio::test]
async fn miss_then_hit_with_age_over_http1() {
    let origin = MockOrigin::start().await;
    origin.route("/a", Route::ok("public, max-age=60", "hello").header("etag", "\"a1\""));
    let edge = TestEdge::start(&origin.url(), |_| {}).await;
    let c = client();
    let first = get(&c, &edge.url("/a"), &[]).await;
    assert_eq!(first.status, StatusCode::OK);
    assert_eq!(first.x_cache(), "MISS");
    assert!(first.header("cache-status").starts_with("cdn; fwd=miss"), "{}", first.header("cache-status"));
    assert_eq!(first.header("x-served-by"), "edge-test-1");
    assert_eq!(first.body, "hello");
    edge.clock.advance(Duration::from_secs(7));
    let second = get(&c, &edge.url("/a"), &[]).await;
    assert_eq!(second.x_cache(), "HIT");
    assert_eq!(second.body, "hello");
    let age: u64 = second.header("age").parse().unwrap();
    assert!((7..=9).contains(&age), "age {age}");
    assert!(second.header("cache-status").starts_with("cdn; hit; ttl="), "{}", second.header("cache-status"));
    assert_eq!(origin.hits("/a"), 1);
    // The edge forwarded the usual proxy headers.
    let seen = origin.last_headers("/a");
    assert_eq!(seen.get("x-forwarded-for").unwrap(), "127.0.0.1");
    assert!(seen.get("via").unwrap().to_str().unwrap().ends_with("edge-test-1"));
    // A conditional request from the client is answered from the cache.
    let not_modified = get(&c, &edge.url("/a"), &[("if-none-match", "\"a1\"")]).await;
    assert_eq!(not_modified.status, StatusCode::NOT_MODIFIED);
    assert!(not_modified.body.is_empty());
    assert_eq!(origin.hits("/a"), 1);
    assert_eq!(edge.metric("cdn_requests_total", &[("protocol", "h1"), ("cache", "hit")]), 2.0);
    assert_eq!(edge.metric("cdn_requests_total", &[("protocol", "h1"), ("cache", "miss")]), 1.0);
    edge.stop().await;
}

#[tokio::test]
async fn miss_then_hit_over_http2_with_tls_and_alpn() {
    let origin = MockOrigin::start().await;
    origin.route("/b", Route::ok("max-age=60", "over h2"));
    let edge = TestEdge::start(&origin.url(), |c| {
        let port = free_port();
        c.listen.https = Some(([127, 0, 0, 1], port).into());
        c.listen.h3 = Some(([127, 0, 0, 1], port).into());
        c.tls = Some(cdn_node::tls::TlsConfig { self_signed: true, ..Default::default() });
    })
    .await;
    let url = format!("https://localhost:{}/b", edge.https.unwrap().port());
    let c = tls_client();
    let mut results = Vec::new();
    for _ in 0..2 {
        let response = c.request(http::Request::get(&url).body(Empty::<Bytes>::new()).unwrap()).await.unwrap();
        assert_eq!(response.version(), Version::HTTP_2, "ALPN negotiated h2");
        let x_cache = response.headers()["x-cache"].to_str().unwrap().to_string();
        let alt_svc = format!("h3=\":{}\"; ma=86400", edge.https.unwrap().port());
        assert_eq!(response.headers()["alt-svc"], alt_svc.as_str());
        assert!(response.headers().contains_key("age"));
        let body = response.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(body, "over h2");
        results.push(x_cache);
    }
    assert_eq!(results, ["MISS", "HIT"]);
    assert_eq!(edge.metric("cdn_requests_total", &[("protocol", "h2"), ("cache", "hit")]), 1.0);
    // And a peer client: curl over HTTP/2 with TLS.
    let out = tokio::process::Command::new("curl")
        .args([
            "-sk",
            "--max-time",
            "10",
            "--http2",
            "-o",
            "/dev/null",
            "-w",
            "%{http_version} %{http_code}",
            "-D",
            "-",
            &url,
        ])
        .output()
        .await
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_lowercase();
    assert!(text.contains("x-cache: hit"), "{text}");
    assert!(text.trim_end().ends_with("2 200"), "{text}");
    edge.stop().await;
}

#[tokio::test]
async fn no_store_and_private_are_never_served_from_cache() {
    let origin = MockOrigin::start().await;
    origin.route("/ns", Route::ok("no-store", "ns"));
    origin.route("/pv", Route::ok("private, max-age=600", "pv"));
    origin.route("/cookie", Route::ok("max-age=600", "c").header("set-cookie", "id=1"));
    let edge = TestEdge::start(&origin.url(), |_| {}).await;
    let c = client();
    for path in ["/ns", "/pv", "/cookie"] {
        for _ in 0..3 {
            let r = get(&c, &edge.url(path), &[]).await;
            assert_eq!(r.status, StatusCode::OK);
            // MISS the first time; then BYPASS: the edge remembers the key is uncacheable.
            assert!(matches!(r.x_cache(), "MISS" | "BYPASS"), "{path}: {}", r.x_cache());
        }
        assert_eq!(origin.hits(path), 3, "{path}");
    }
    edge.stop().await;
}

#[tokio::test]
async fn s_maxage_beats_max_age_and_expiry_is_honoured() {
    let origin = MockOrigin::start().await;
    origin.route("/s", Route::ok("max-age=1000, s-maxage=10", "s"));
    origin.route("/m", Route::ok("max-age=20", "m"));
    let edge = TestEdge::start(&origin.url(), |_| {}).await;
    let c = client();
    get(&c, &edge.url("/s"), &[]).await;
    get(&c, &edge.url("/m"), &[]).await;
    edge.clock.advance(Duration::from_secs(5));
    assert_eq!(get(&c, &edge.url("/s"), &[]).await.x_cache(), "HIT");
    assert_eq!(get(&c, &edge.url("/m"), &[]).await.x_cache(), "HIT");
    edge.clock.advance(Duration::from_secs(10));
    // 15 s: /s (s-maxage=10) expired, /m (max-age=20) still fresh.
    assert_eq!(get(&c, &edge.url("/s"), &[]).await.x_cache(), "MISS");
    assert_eq!(get(&c, &edge.url("/m"), &[]).await.x_cache(), "HIT");
    edge.clock.advance(Duration::from_secs(10));
    assert_eq!(get(&c, &edge.url("/m"), &[]).await.x_cache(), "MISS");
    assert_eq!(origin.hits("/s"), 2);
    assert_eq!(origin.hits("/m"), 2);
    // The client may ask for a fresher copy.
    assert_eq!(get(&c, &edge.url("/m"), &[("cache-control", "max-age=0")]).await.x_cache(), "MISS");
    assert_eq!(origin.hits("/m"), 3);
    edge.stop().await;
}

#[tokio::test]
async fn vary_keeps_variants_apart_and_vary_star_never_hits() {
    let origin = MockOrigin::start().await;
    origin.route("/v", Route::ok("max-age=60", "variant").header("vary", "Accept-Encoding"));
    origin.route("/star", Route::ok("max-age=60", "star").header("vary", "*"));
    let edge = TestEdge::start(&origin.url(), |_| {}).await;
    let c = client();
    assert_eq!(get(&c, &edge.url("/v"), &[("accept-encoding", "gzip")]).await.x_cache(), "MISS");
    assert_eq!(get(&c, &edge.url("/v"), &[("accept-encoding", "br")]).await.x_cache(), "MISS");
    assert_eq!(get(&c, &edge.url("/v"), &[("accept-encoding", "gzip")]).await.x_cache(), "HIT");
    assert_eq!(get(&c, &edge.url("/v"), &[("accept-encoding", "br")]).await.x_cache(), "HIT");
    assert_eq!(origin.hits("/v"), 2);
    for _ in 0..3 {
        assert_ne!(get(&c, &edge.url("/star"), &[]).await.x_cache(), "HIT");
    }
    assert_eq!(origin.hits("/star"), 3);
    edge.stop().await;
}

#[tokio::test]
async fn expired_entry_is_revalidated_with_its_etag() {
    let origin = MockOrigin::start().await;
    origin.route(
        "/r",
        Route::ok("max-age=10", "revalidate me").header("etag", "\"v1\"").header("x-version", "1").revalidate(),
    );
    let edge = TestEdge::start(&origin.url(), |_| {}).await;
    origin.use_clock(edge.clock.clone());
    let c = client();
    assert_eq!(get(&c, &edge.url("/r"), &[]).await.x_cache(), "MISS");
    edge.clock.advance(Duration::from_secs(30));
    // The origin's 304 carries a changed header, which must be merged.
    origin.route(
        "/r",
        Route::ok("max-age=10", "revalidate me").header("etag", "\"v1\"").header("x-version", "2").revalidate(),
    );
    let r = get(&c, &edge.url("/r"), &[]).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.x_cache(), "REVALIDATED");
    assert_eq!(r.body, "revalidate me");
    assert_eq!(r.header("x-version"), "2");
    assert_eq!(origin.last_headers("/r").get("if-none-match").unwrap(), "\"v1\"");
    assert!(r.header("cache-status").contains("fwd-status=304"));
    // Refreshed: fresh again.
    assert_eq!(get(&c, &edge.url("/r"), &[]).await.x_cache(), "HIT");
    assert_eq!(origin.hits("/r"), 2);
    edge.stop().await;
}

#[tokio::test]
async fn stale_if_error_serves_stale_when_the_origin_is_down() {
    let origin = MockOrigin::start().await;
    origin.route("/e", Route::ok("max-age=10, stale-if-error=600", "still here"));
    origin.route("/x", Route::ok("max-age=10", "gone"));
    let edge =
        TestEdge::start(&origin.url(), |c| c.origin.as_mut().unwrap().connect_timeout = Duration::from_millis(500))
            .await;
    let c = client();
    get(&c, &edge.url("/e"), &[]).await;
    get(&c, &edge.url("/x"), &[]).await;
    origin.stop();
    tokio::time::sleep(Duration::from_millis(100)).await;
    edge.clock.advance(Duration::from_secs(60));
    let r = get(&c, &edge.url("/e"), &[]).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.x_cache(), "STALE");
    assert_eq!(r.body, "still here");
    // Without stale-if-error the failure is reported.
    let r = get(&c, &edge.url("/x"), &[]).await;
    assert_eq!(r.status, StatusCode::BAD_GATEWAY);
    edge.stop().await;
}

#[tokio::test]
async fn stale_while_revalidate_answers_at_once_and_refreshes_once() {
    let origin = MockOrigin::start().await;
    origin.route("/w", Route::ok("max-age=10, stale-while-revalidate=60", "old"));
    let edge = TestEdge::start(&origin.url(), |_| {}).await;
    origin.use_clock(edge.clock.clone());
    let c = client();
    get(&c, &edge.url("/w"), &[]).await;
    edge.clock.advance(Duration::from_secs(20));
    origin.route("/w", Route::ok("max-age=10, stale-while-revalidate=60", "new").delay(Duration::from_millis(500)));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..10 {
        let (c, url) = (c.clone(), edge.url("/w"));
        tasks.push(tokio::spawn(async move { get(&c, &url, &[]).await }));
    }
    for task in tasks {
        let r = task.await.unwrap();
        assert_eq!(r.x_cache(), "STALE");
        assert_eq!(r.body, "old");
    }
    assert!(started.elapsed() < Duration::from_millis(400), "stale answers did not wait for the origin");
    tokio::time::sleep(Duration::from_millis(900)).await;
    assert_eq!(origin.hits("/w"), 2, "exactly one background refresh");
    let r = get(&c, &edge.url("/w"), &[]).await;
    assert_eq!((r.x_cache(), &r.body[..]), ("HIT", &b"new"[..]));
    edge.stop().await;
}

#[tokio::test]
async fn concurrent_misses_make_one_origin_request() {
    let origin = MockOrigin::start().await;
    origin.route("/slow", Route::ok("max-age=60", vec![7u8; 100_000]).delay(Duration::from_millis(300)));
    let edge = TestEdge::start(&origin.url(), |_| {}).await;
    let c = client();
    let mut tasks = Vec::new();
    for _ in 0..100 {
        let (c, url) = (c.clone(), edge.url("/slow"));
        tasks.push(tokio::spawn(async move { get(&c, &url, &[]).await }));
    }
    for task in tasks {
        let r = task.await.unwrap();
        assert_eq!(r.status, StatusCode::OK);
        assert_eq!(r.body.len(), 100_000);
    }
    assert_eq!(origin.hits("/slow"), 1);
    edge.stop().await;
}

#[tokio::test]
async fn large_objects_stream_while_filling_and_late_joiners_get_everything() {
    let origin = MockOrigin::start().await;
    let size = 50 * 1024 * 1024;
    let body: Vec<u8> = (0..size).map(|i| (i % 251) as u8).collect();
    let body = Bytes::from(body);
    // 50 MB in 1 MiB chunks, 40 ms apart: the origin needs ~2 s.
    origin.route("/big", Route::ok("max-age=60", body.clone()).trickle(1 << 20, Duration::from_millis(40)));
    let edge = TestEdge::start(&origin.url(), |c| c.cache.max_object = bytesize::ByteSize::mib(100)).await;
    let c = client();
    let started = Instant::now();
    let response = c.request(http::Request::get(edge.url("/big")).body(Empty::<Bytes>::new()).unwrap()).await.unwrap();
    assert_eq!(response.headers()["x-cache"], "MISS");
    let mut body_stream = response.into_body();
    let first = body_stream.frame().await.unwrap().unwrap();
    let first_byte = started.elapsed();
    assert!(first.data_ref().is_some_and(|d| !d.is_empty()));
    // A second client joins mid-fill.
    tokio::time::sleep(Duration::from_millis(400)).await;
    let late = tokio::spawn({
        let (c, url) = (c.clone(), edge.url("/big"));
        async move { get(&c, &url, &[]).await }
    });
    let mut received = first.into_data().unwrap().to_vec();
    while let Some(frame) = body_stream.frame().await {
        received.extend_from_slice(frame.unwrap().data_ref().unwrap());
    }
    let total = started.elapsed();
    assert!(first_byte * 5 < total, "first byte after {first_byte:?}, whole body after {total:?}");
    assert_eq!(received.len(), size);
    assert!(received == body, "first client's body is byte-exact");
    let late = late.await.unwrap();
    assert_eq!(late.body.len(), size);
    assert!(late.body == body, "late joiner's body is byte-exact");
    assert_eq!(origin.hits("/big"), 1);
    assert_eq!(get(&c, &edge.url("/big"), &[]).await.x_cache(), "HIT");
    edge.stop().await;
}

#[tokio::test]
async fn the_cache_stays_within_its_byte_bound() {
    let origin = MockOrigin::start().await;
    origin.route("/obj", Route::ok("max-age=600", vec![1u8; 100 * 1024]));
    let bound = 2 * 1024 * 1024;
    let edge = TestEdge::start(&origin.url(), |c| c.cache.memory = bytesize::ByteSize::b(bound)).await;
    let c = client();
    let mut peak = 0.0f64;
    for i in 0..100 {
        let r = get(&c, &edge.url(&format!("/obj?n={i}")), &[]).await;
        assert_eq!(r.body.len(), 100 * 1024);
        if i % 20 == 19 {
            tokio::time::sleep(Duration::from_millis(1100)).await;
            peak = peak.max(edge.metric("cdn_cache_bytes", &[]));
        }
    }
    assert!(peak > 0.0, "the gauge reports");
    assert!(peak <= bound as f64, "cache holds {peak} bytes, bound {bound}");
    edge.stop().await;
}

#[tokio::test]
async fn origin_down_gives_502_fast_and_bad_requests_400() {
    // Nothing listens on this port.
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", dead.local_addr().unwrap());
    drop(dead);
    let edge = TestEdge::start(&url, |_| {}).await;
    let c = client();
    let started = Instant::now();
    let r = get(&c, &edge.url("/nothing"), &[]).await;
    assert_eq!(r.status, StatusCode::BAD_GATEWAY);
    assert!(started.elapsed() < Duration::from_secs(2));
    // HTTP/1.1 without Host, and garbage, over a raw socket.
    for raw in ["GET / HTTP/1.1\r\n\r\n", "GARBAGE\r\n\r\n", "GET / HTTP/1.1\r\nHost: a\r\nContent-Length: x\r\n\r\n"] {
        let reply = raw_request(edge.http, raw).await;
        assert!(reply.starts_with("HTTP/1.1 400"), "{raw:?} → {reply:?}");
    }
    // Both framings at once (RFC 9112 §6.3): Transfer-Encoding wins, Content-Length is
    // dropped, and the connection is closed after the response so nothing can be
    // smuggled behind it.
    let raw = "GET / HTTP/1.1\r\nHost: a\r\nContent-Length: 40\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: a\r\n\r\n";
    let reply = raw_request(edge.http, raw).await.to_ascii_lowercase();
    assert!(reply.contains("connection: close"), "{reply}");
    assert_eq!(reply.matches("http/1.1 ").count(), 1, "{reply}");
    edge.stop().await;
}

#[tokio::test]
async fn unsafe_methods_pass_through_and_invalidate() {
    let origin = MockOrigin::start().await;
    origin.route("/p", Route::ok("max-age=600", "cached"));
    let edge = TestEdge::start(&origin.url(), |_| {}).await;
    let c = client();
    get(&c, &edge.url("/p"), &[]).await;
    assert_eq!(get(&c, &edge.url("/p"), &[]).await.x_cache(), "HIT");
    let post = send(&c, "POST", &edge.url("/p"), &[]).await;
    assert_eq!(post.x_cache(), "BYPASS");
    assert_eq!(get(&c, &edge.url("/p"), &[]).await.x_cache(), "MISS");
    edge.stop().await;
}

#[tokio::test]
async fn ranges_are_served_from_the_cache() {
    let origin = MockOrigin::start().await;
    let body: Vec<u8> = (0..1000u32).map(|i| (i % 256) as u8).collect();
    origin.route("/r.bin", Route::ok("max-age=600", body.clone()).header("etag", "\"r1\""));
    let edge = TestEdge::start(&origin.url(), |_| {}).await;
    let c = client();
    get(&c, &edge.url("/r.bin"), &[]).await;
    let r = get(&c, &edge.url("/r.bin"), &[("range", "bytes=10-19")]).await;
    assert_eq!(r.status, StatusCode::PARTIAL_CONTENT);
    assert_eq!(r.header("content-range"), "bytes 10-19/1000");
    assert_eq!(&r.body[..], &body[10..20]);
    assert_eq!(r.x_cache(), "HIT");
    let r = get(&c, &edge.url("/r.bin"), &[("range", "bytes=5000-")]).await;
    assert_eq!(r.status, StatusCode::RANGE_NOT_SATISFIABLE);
    assert_eq!(r.header("content-range"), "bytes */1000");
    let r = get(&c, &edge.url("/r.bin"), &[("range", "bytes=0-1"), ("if-range", "\"old\"")]).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.body.len(), 1000);
    edge.stop().await;
}
