//! The edge against the caching standards, as a strict cache tester tries them:
//! CDN-Cache-Control (RFC 9213) and Surrogate-Control over Cache-Control, malformed
//! and duplicate directives, `Age` with junk, request `no-store`, conditionals the
//! cache cannot answer, HEAD updating a stored GET (RFC 9111 §4.3.5), 304s carrying
//! `Set-Cookie` or `Content-Range`, heuristic freshness, 103 Early Hints, sliced 206s
//! combined, and host handling (RFC 9112 §3.2, RFC 9113 §8.3.1). Real origin (the
//! mock, or a raw socket), real edge, real clients on loopback.

use std::time::Duration;

use cdn_test_support::{
    client::{client, get, h2c_client, send},
    edge::TestEdge,
    mock_origin::{MockOrigin, Route},
    net::raw_request,
};
use http::StatusCode;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

/// A 200 with exactly `headers` (no Cache-Control unless given).
fn bare(body: &'static str, headers: &[(&str, &str)]) -> Route {
    let mut route = Route::ok("", body);
    route.headers.clear();
    for (name, value) in headers {
        route = route.header(name, value);
    }
    route
}

#[tokio::test]
async fn cdn_cache_control_beats_cache_control_both_ways() {
    let origin = MockOrigin::start().await;
    origin.route("/edge-only", bare("e", &[("cdn-cache-control", "max-age=60"), ("cache-control", "no-store")]));
    origin.route("/browser-only", bare("b", &[("cdn-cache-control", "no-store"), ("cache-control", "max-age=60")]));
    origin.route("/shorter", bare("s", &[("cdn-cache-control", "max-age=10"), ("cache-control", "max-age=600")]));
    // Invalid as a Structured Field (trailing comma): ignored as a whole.
    origin.route("/invalid", bare("i", &[("cdn-cache-control", "no-store,"), ("cache-control", "max-age=60")]));
    let edge = TestEdge::start(&origin.url(), |_| {}).await;
    let c = client();

    let first = get(&c, &edge.url("/edge-only"), &[]).await;
    assert_eq!(first.x_cache(), "MISS");
    let second = get(&c, &edge.url("/edge-only"), &[]).await;
    assert_eq!(second.x_cache(), "HIT", "CDN-Cache-Control max-age=60 beats Cache-Control no-store");
    assert_eq!(second.body, "e");
    for reply in [&first, &second] {
        assert_eq!(reply.header("cache-control"), "no-store", "browsers still see the origin's Cache-Control");
        assert!(!reply.headers.contains_key("cdn-cache-control"), "not forwarded to clients");
    }
    assert_eq!(origin.hits("/edge-only"), 1);

    for _ in 0..3 {
        let reply = get(&c, &edge.url("/browser-only"), &[]).await;
        assert_ne!(reply.x_cache(), "HIT", "CDN-Cache-Control no-store beats Cache-Control max-age=60");
        assert_eq!(reply.header("cache-control"), "max-age=60");
    }
    assert_eq!(origin.hits("/browser-only"), 3);

    get(&c, &edge.url("/shorter"), &[]).await;
    edge.clock.advance(Duration::from_secs(5));
    assert_eq!(get(&c, &edge.url("/shorter"), &[]).await.x_cache(), "HIT");
    edge.clock.advance(Duration::from_secs(10));
    assert_eq!(get(&c, &edge.url("/shorter"), &[]).await.x_cache(), "MISS", "stale after CDN-Cache-Control's 10 s");

    get(&c, &edge.url("/invalid"), &[]).await;
    assert_eq!(get(&c, &edge.url("/invalid"), &[]).await.x_cache(), "HIT", "an invalid field is ignored whole");
    edge.stop().await;
}

#[tokio::test]
async fn surrogate_control_beats_cache_control_and_never_reaches_clients() {
    let origin = MockOrigin::start().await;
    origin.route(
        "/sc",
        bare("sc", &[("surrogate-control", "max-age=60, content=\"ESI/1.0\""), ("cache-control", "no-store")]),
    );
    origin.route("/sc-no-store", bare("n", &[("surrogate-control", "no-store"), ("cache-control", "max-age=60")]));
    origin.route(
        "/both",
        bare(
            "b",
            &[("cdn-cache-control", "no-store"), ("surrogate-control", "max-age=60"), ("cache-control", "max-age=60")],
        ),
    );
    let edge = TestEdge::start(&origin.url(), |_| {}).await;
    let c = client();
    get(&c, &edge.url("/sc"), &[]).await;
    let hit = get(&c, &edge.url("/sc"), &[]).await;
    assert_eq!(hit.x_cache(), "HIT");
    assert!(!hit.headers.contains_key("surrogate-control"), "removed before the client");
    assert_eq!(hit.header("cache-control"), "no-store");
    for path in ["/sc-no-store", "/both"] {
        for _ in 0..2 {
            let reply = get(&c, &edge.url(path), &[]).await;
            assert_ne!(reply.x_cache(), "HIT", "{path}");
            assert!(!reply.headers.contains_key("surrogate-control"));
        }
        assert_eq!(origin.hits(path), 2, "{path}");
    }
    edge.stop().await;
}

#[tokio::test]
async fn malformed_and_duplicate_directives_parse_as_the_rfc_says() {
    let origin = MockOrigin::start().await;
    // (path, Cache-Control, reused while fresh?)
    let cases = [
        ("/dup-short-first", "max-age=1, max-age=3600", false),
        ("/dup-long-first", "max-age=3600, max-age=1", true),
        ("/spaces", "max-age = 3600", false),
        ("/decimal", "max-age=3600.0", false),
        ("/letter", "max-age=a100", false),
        ("/quoted", "max-age=\"3600\"", true),
    ];
    for (path, cc, _) in cases {
        origin.route(path, Route::ok(cc, "d"));
    }
    let edge = TestEdge::start(&origin.url(), |_| {}).await;
    let c = client();
    for (path, _, _) in cases {
        assert_eq!(get(&c, &edge.url(path), &[]).await.x_cache(), "MISS", "{path}");
    }
    edge.clock.advance(Duration::from_secs(2));
    for (path, cc, reused) in cases {
        let reply = get(&c, &edge.url(path), &[]).await;
        assert_eq!(reply.x_cache() == "HIT", reused, "{path} ({cc}): {}", reply.x_cache());
        assert_eq!(origin.hits(path), if reused { 1 } else { 2 }, "{path}");
    }
    edge.stop().await;
}

#[tokio::test]
async fn an_age_with_junk_after_the_number_is_ignored() {
    let origin = MockOrigin::start().await;
    origin.route("/junk", Route::ok("max-age=60", "j").header("age", "30abc"));
    origin.route("/good", Route::ok("max-age=60", "g").header("age", "30"));
    let edge = TestEdge::start(&origin.url(), |_| {}).await;
    let c = client();
    let junk = get(&c, &edge.url("/junk"), &[]).await;
    let age: u64 = junk.header("age").parse().unwrap();
    assert!(age <= 1, "Age: 30abc is invalid and ignored, got {age}");
    let good = get(&c, &edge.url("/good"), &[]).await;
    let age: u64 = good.header("age").parse().unwrap();
    assert!((30..=31).contains(&age), "Age: 30 counts, got {age}");
    // Invalid Age does not make it stale either: 40 s later /junk is still fresh.
    edge.clock.advance(Duration::from_secs(40));
    assert_eq!(get(&c, &edge.url("/junk"), &[]).await.x_cache(), "HIT");
    assert_eq!(get(&c, &edge.url("/good"), &[]).await.x_cache(), "MISS");
    edge.stop().await;
}

#[tokio::test]
async fn a_request_with_no_store_is_not_stored_but_does_not_spoil_the_url() {
    let origin = MockOrigin::start().await;
    origin.route("/rns", Route::ok("max-age=60", "r"));
    let edge = TestEdge::start(&origin.url(), |_| {}).await;
    let c = client();
    let first = get(&c, &edge.url("/rns"), &[("cache-control", "no-store")]).await;
    assert_eq!((first.status, first.x_cache()), (StatusCode::OK, "MISS"));
    let second = get(&c, &edge.url("/rns"), &[]).await;
    assert_eq!(second.x_cache(), "MISS", "the no-store request's response was not stored");
    assert_eq!(get(&c, &edge.url("/rns"), &[]).await.x_cache(), "HIT", "the next plain request's was");
    assert_eq!(origin.hits("/rns"), 2);
    edge.stop().await;
}

#[tokio::test]
async fn conditionals_the_cache_cannot_answer_reach_the_origin_unchanged() {
    let origin = MockOrigin::start().await;
    // Not storable: every conditional goes to the origin as the client wrote it.
    origin.route("/private", Route::ok("private", "p").header("etag", "\"v1\"").revalidate());
    origin.route("/stored", Route::ok("max-age=60", "s").header("etag", "\"s1\""));
    let edge = TestEdge::start(&origin.url(), |_| {}).await;
    let c = client();
    let forwarded = [
        ("if-none-match", "\"v1\""),
        ("if-none-match", "W/\"v1\""),
        ("if-none-match", "\"x\", \"v1\""),
        ("if-none-match", "*"),
        ("if-none-match", "v1"),
        ("if-match", "\"v1\""),
        ("if-modified-since", "Sun, 06 Nov 1994 08:49:37 GMT"),
    ];
    for (name, value) in forwarded {
        let reply = get(&c, &edge.url("/private"), &[(name, value)]).await;
        let seen = origin.last_headers("/private");
        assert_eq!(seen.get(name).map(|v| v.to_str().unwrap()), Some(value), "{name}: {value} forwarded verbatim");
        // The mock answers exactly `"v1"` with 304; the edge passes that on.
        let expected = if (name, value) == ("if-none-match", "\"v1\"") { 304 } else { 200 };
        assert_eq!(reply.status.as_u16(), expected, "{name}: {value}");
    }
    // Stored: answered by the edge (weak comparison for If-None-Match; a list; `*`;
    // an unquoted tag is malformed and matches nothing).
    get(&c, &edge.url("/stored"), &[]).await;
    for (value, status) in [("W/\"s1\"", 304), ("\"a\", \"s1\"", 304), ("*", 304), ("s1", 200), ("\"s2\"", 200)] {
        let reply = get(&c, &edge.url("/stored"), &[("if-none-match", value)]).await;
        assert_eq!(reply.status.as_u16(), status, "If-None-Match: {value}");
        assert_eq!(reply.x_cache(), "HIT");
    }
    assert_eq!(origin.hits("/stored"), 1);
    edge.stop().await;
}

#[tokio::test]
async fn a_forwarded_head_updates_the_stored_get() {
    let origin = MockOrigin::start().await;
    let route = |generation: &str| {
        Route::ok("max-age=10", "v").header("vary", "x-v").header("etag", "\"e1\"").header("x-gen", generation)
    };
    origin.route("/hv", route("1"));
    let edge = TestEdge::start(&origin.url(), |_| {}).await;
    origin.use_clock(edge.clock.clone());
    let c = client();
    assert_eq!(get(&c, &edge.url("/hv"), &[("x-v", "b")]).await.x_cache(), "MISS");
    edge.clock.advance(Duration::from_secs(20));
    origin.route("/hv", route("2").delay(Duration::from_millis(600)));
    // Variant a fills slowly; the HEAD for the stale variant b joins that fill, finds
    // it is another variant, and is forwarded as a HEAD.
    let leader = tokio::spawn({
        let (c, url) = (c.clone(), edge.url("/hv"));
        async move { get(&c, &url, &[("x-v", "a")]).await }
    });
    tokio::time::sleep(Duration::from_millis(150)).await;
    let head = send(&c, "HEAD", &edge.url("/hv"), &[("x-v", "b")]).await;
    assert_eq!(head.status, StatusCode::OK);
    assert_eq!(head.header("x-gen"), "2");
    assert_eq!(leader.await.unwrap().header("x-gen"), "2");
    let hits = origin.hits("/hv");
    assert_eq!(hits, 3, "b, a, and the HEAD");
    // The HEAD's 200 refreshed the stored GET of variant b: fresh again, new headers.
    origin.route("/hv", route("3"));
    let reply = get(&c, &edge.url("/hv"), &[("x-v", "b")]).await;
    assert_eq!(reply.x_cache(), "HIT");
    assert_eq!(reply.header("x-gen"), "2");
    assert_eq!(reply.body, "v");
    assert_eq!(origin.hits("/hv"), hits);
    edge.stop().await;
}

#[tokio::test]
async fn a_304_brings_neither_set_cookie_nor_content_range_into_the_stored_response() {
    let origin = MockOrigin::start().await;
    let route = || Route::ok("max-age=10", "0123456789").header("etag", "\"c1\"").revalidate();
    origin.route("/c", route());
    let edge = TestEdge::start(&origin.url(), |_| {}).await;
    origin.use_clock(edge.clock.clone());
    let c = client();
    get(&c, &edge.url("/c"), &[]).await;
    edge.clock.advance(Duration::from_secs(30));
    origin.route(
        "/c",
        route().header("set-cookie", "session=alice").header("content-range", "bytes 0-1/2").header("x-new", "1"),
    );
    let revalidated = get(&c, &edge.url("/c"), &[]).await;
    assert_eq!(revalidated.x_cache(), "REVALIDATED");
    let hit = get(&c, &edge.url("/c"), &[]).await;
    assert_eq!(hit.x_cache(), "HIT");
    for reply in [&revalidated, &hit] {
        assert_eq!(reply.status, StatusCode::OK);
        assert_eq!(reply.header("x-new"), "1", "other headers are updated");
        assert!(!reply.headers.contains_key("set-cookie"), "a shared cache must not hand out the cookie");
        assert!(!reply.headers.contains_key("content-range"));
        assert_eq!(reply.header("content-length"), "10");
        assert_eq!(reply.body, "0123456789");
    }
    edge.stop().await;
}

#[tokio::test]
async fn heuristic_freshness_is_a_tenth_of_the_age_of_last_modified_capped() {
    let origin = MockOrigin::start().await;
    let modified = |ago: u64| httpdate::fmt_http_date(std::time::SystemTime::now() - Duration::from_secs(ago));
    origin.route("/h", bare("h", &[("last-modified", &modified(1000))]));
    origin.route("/capped", bare("c", &[("last-modified", &modified(100_000))]));
    origin.route("/redirect", bare("r", &[("last-modified", &modified(1000))]).status(302).header("location", "/h"));
    let edge = TestEdge::start(&origin.url(), |c| c.cache.heuristic_max = Duration::from_secs(300)).await;
    let c = client();
    for path in ["/h", "/capped", "/redirect"] {
        get(&c, &edge.url(path), &[]).await;
    }
    edge.clock.advance(Duration::from_secs(50));
    let hit = get(&c, &edge.url("/h"), &[]).await;
    assert_eq!(hit.x_cache(), "HIT");
    let ttl: i64 = hit.header("cache-status").rsplit("ttl=").next().unwrap().parse().unwrap();
    assert!((48..=51).contains(&ttl), "10 % of 1000 s minus 50 s: {}", hit.header("cache-status"));
    assert_eq!(get(&c, &edge.url("/capped"), &[]).await.x_cache(), "HIT");
    assert_ne!(get(&c, &edge.url("/redirect"), &[]).await.x_cache(), "HIT", "302 is not heuristically cacheable");
    edge.clock.advance(Duration::from_secs(60));
    assert_eq!(get(&c, &edge.url("/h"), &[]).await.x_cache(), "MISS", "stale after 100 s");
    assert_eq!(get(&c, &edge.url("/capped"), &[]).await.x_cache(), "HIT", "within the 300 s cap");
    edge.clock.advance(Duration::from_secs(200));
    assert_eq!(get(&c, &edge.url("/capped"), &[]).await.x_cache(), "MISS", "cache.heuristic_max caps it");
    edge.stop().await;
}

/// An origin on a raw socket that sends `103 Early Hints` before every final response
/// (counting the requests for `/hints`: the edge's reachability check asks too).
async fn early_hints_origin() -> (std::net::SocketAddr, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let count = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let seen = count.clone();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let seen = seen.clone();
            tokio::spawn(async move {
                let mut buffer = Vec::new();
                let mut chunk = [0u8; 4096];
                loop {
                    let Ok(n) = stream.read(&mut chunk).await else { return };
                    if n == 0 {
                        return;
                    }
                    buffer.extend_from_slice(&chunk[..n]);
                    while let Some(end) = buffer.windows(4).position(|w| w == b"\r\n\r\n") {
                        let head: Vec<u8> = buffer.drain(..end + 4).collect();
                        if head.starts_with(b"GET /hints ") {
                            seen.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                        }
                        let reply = "HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload\r\n\r\n\
                                     HTTP/1.1 200 OK\r\nCache-Control: max-age=60\r\nContent-Length: 5\r\n\r\nhello";
                        if stream.write_all(reply.as_bytes()).await.is_err() {
                            return;
                        }
                    }
                }
            });
        }
    });
    (addr, count)
}

#[tokio::test]
async fn early_hints_are_never_stored_and_the_final_response_is() {
    let (addr, count) = early_hints_origin().await;
    let edge = TestEdge::start(&format!("http://{addr}"), |_| {}).await;
    let c = client();
    for expected in ["MISS", "HIT"] {
        let reply = get(&c, &edge.url("/hints"), &[]).await;
        assert_eq!(reply.status, StatusCode::OK);
        assert_eq!(reply.x_cache(), expected);
        assert_eq!(reply.body, "hello");
        assert!(!reply.headers.contains_key("link"), "the 103's fields are not merged into the final response");
    }
    assert_eq!(count.load(std::sync::atomic::Ordering::SeqCst), 1);
    // Over a raw socket: one status line, the final one (hyper's server sends no 103).
    let raw = raw_request(edge.http, "GET /hints HTTP/1.1\r\nHost: a.test\r\nConnection: close\r\n\r\n").await;
    assert!(raw.starts_with("HTTP/1.1 200 OK\r\n"), "{raw}");
    assert_eq!(raw.matches("HTTP/1.1 ").count(), 1, "{raw}");
    edge.stop().await;
}

#[tokio::test]
async fn slices_fetched_by_ranges_combine_into_the_whole_object() {
    let origin = MockOrigin::start().await;
    let slice = 64 * 1024;
    let body: Vec<u8> = (0..3 * slice + 100).map(|i| (i % 251) as u8).collect();
    origin.route("/obj.bin", Route::ok("max-age=600", body.clone()).header("etag", "\"o1\"").ranges());
    let edge = TestEdge::start(&origin.url(), |c| c.cache.slice = bytesize::ByteSize::b(slice as u64)).await;
    let c = client();
    // Each request is a 206 for a part of another slice.
    for index in 0..4 {
        let first = index * slice + 10;
        let range = format!("bytes={first}-{}", first + 19);
        let reply = get(&c, &edge.url("/obj.bin"), &[("range", &range)]).await;
        assert_eq!(reply.status, StatusCode::PARTIAL_CONTENT, "{range}");
        assert_eq!(&reply.body[..], &body[first..first + 20], "{range}");
    }
    let fetched = origin.hits("/obj.bin");
    assert_eq!(fetched, 4, "one probe or slice fetch per slice");
    // The stored slices combine: the whole object is a HIT, byte-exact, and costs
    // the origin nothing more.
    let whole = get(&c, &edge.url("/obj.bin"), &[]).await;
    assert_eq!(whole.status, StatusCode::OK);
    assert_eq!(whole.x_cache(), "HIT");
    assert_eq!(whole.header("content-length"), body.len().to_string());
    assert!(whole.body == body, "combined body is byte-exact");
    // So is a range across slice boundaries.
    let across = format!("bytes={}-{}", slice - 5, 2 * slice + 4);
    let reply = get(&c, &edge.url("/obj.bin"), &[("range", &across)]).await;
    assert_eq!(&reply.body[..], &body[slice - 5..2 * slice + 5]);
    assert_eq!(origin.hits("/obj.bin"), fetched);
    edge.stop().await;
}

#[tokio::test]
async fn hosts_are_normalised_and_ambiguous_ones_refused() {
    let origin = MockOrigin::start().await;
    origin.route("/host", Route::ok("max-age=60", "h"));
    let edge = TestEdge::start(&origin.url(), |_| {}).await;
    let raw = |host_lines: &str| format!("GET /host HTTP/1.1\r\n{host_lines}Connection: close\r\n\r\n");
    let first = raw_request(edge.http, &raw("Host: a.test\r\n")).await;
    assert!(first.contains("x-cache: MISS"), "{first}");
    for same in ["Host: A.Test.\r\n", "Host: a.test:80\r\n", "Host: a.test.:8080\r\n"] {
        let reply = raw_request(edge.http, &raw(same)).await;
        assert!(reply.starts_with("HTTP/1.1 200"), "{same:?}: {reply}");
        assert!(reply.contains("x-cache: HIT"), "{same:?} is the same cache entry: {reply}");
    }
    // Absolute-form: the target's authority wins over Host.
    let absolute =
        raw_request(edge.http, "GET http://A.TEST./host HTTP/1.1\r\nHost: other.test\r\nConnection: close\r\n\r\n")
            .await;
    assert!(absolute.contains("x-cache: HIT"), "{absolute}");
    // Two Host fields, or an invalid one: 400, never an answer from the cache.
    for bad in [
        "Host: a.test\r\nHost: a.test\r\n",
        "Host: a.test\r\nHost: b.test\r\n",
        "Host: a.test:x\r\n",
        "Host: a..test\r\n",
    ] {
        let reply = raw_request(edge.http, &raw(bad)).await;
        assert!(reply.starts_with("HTTP/1.1 400"), "{bad:?}: {reply}");
        assert!(!reply.contains("x-cache: HIT"), "{bad:?}: {reply}");
    }
    assert_eq!(origin.hits("/host"), 1);
    // HTTP/2: :authority and Host must agree.
    let h2 = h2c_client();
    let url = edge.url("/host");
    let authority = edge.http.to_string();
    let agree = get(&h2, &url, &[("host", &authority)]).await;
    assert_eq!(agree.status, StatusCode::OK);
    let disagree = get(&h2, &url, &[("host", "other.test")]).await;
    assert_eq!(disagree.status, StatusCode::BAD_REQUEST, "{:?}", disagree.headers);
    edge.stop().await;
}
