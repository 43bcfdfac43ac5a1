//! Faults and abuse: an origin that breaks mid-body, slowloris, huge headers.

use std::time::{Duration, Instant};

use bytes::Bytes;
use http::StatusCode;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

use cdn_test_support::{
    client::{client, get, h2c_client, unpooled_client},
    edge::TestEdge,
    mock_origin::{MockOrigin, Route},
    net::raw_request,
};

#[tokio::test]
async fn a_body_cut_short_is_never_stored_or_served_as_complete() {
    let origin = MockOrigin::start().await;
    origin.route("/cut", Route::ok("max-age=600", vec![b'x'; 10_000]).truncated(50_000));
    let edge = TestEdge::start(&origin.url(), |_| {}).await;
    let c = client();
    for _ in 0..2 {
        let request = http::Request::get(edge.url("/cut")).body(http_body_util::Empty::<Bytes>::new()).unwrap();
        // The client sees an error (or fewer bytes than announced), never a short
        // body presented as complete.
        if let Ok(response) = c.request(request).await {
            let status = response.status();
            if let Ok(body) = http_body_util::BodyExt::collect(response.into_body()).await {
                assert_eq!(status, StatusCode::BAD_GATEWAY, "a cut body was delivered as complete: {body:?}");
            }
        }
    }
    assert_eq!(origin.hits("/cut"), 2, "nothing was stored: the second request went to the origin");
    edge.stop().await;
}

#[tokio::test]
async fn slowloris_connections_are_cut_and_good_clients_keep_their_latency() {
    let origin = MockOrigin::start().await;
    origin.route("/ok", Route::ok("max-age=600", "fine"));
    let edge = TestEdge::start(&origin.url(), |c| {
        c.limits.header_read_timeout = Duration::from_secs(1);
        c.limits.max_connections = 300;
    })
    .await;
    // A fresh connection per good request: each one's head is timed like the attackers'.
    let c = unpooled_client();
    get(&c, &edge.url("/ok"), &[]).await;
    // 200 connections trickle a request head a byte at a time.
    let addr = edge.http;
    let mut attackers = Vec::new();
    for _ in 0..200 {
        attackers.push(tokio::spawn(async move {
            let Ok(mut stream) = tokio::net::TcpStream::connect(addr).await else { return Duration::ZERO };
            let started = Instant::now();
            for byte in b"GET /ok HTTP/1.1\r\nHost: a\r\nX-Slow: ".iter().cycle() {
                if stream.write_all(&[*byte]).await.is_err() {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
                if started.elapsed() > Duration::from_secs(6) {
                    break;
                }
            }
            let mut rest = Vec::new();
            let _ = tokio::time::timeout(Duration::from_secs(1), stream.read_to_end(&mut rest)).await;
            started.elapsed()
        }));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    // Meanwhile, good clients.
    let mut latencies = Vec::new();
    for _ in 0..100 {
        let started = Instant::now();
        let r = get(&c, &edge.url("/ok"), &[]).await;
        assert_eq!(r.status, StatusCode::OK);
        latencies.push(started.elapsed());
    }
    latencies.sort();
    let p99 = latencies[98];
    eprintln!("good clients under slowloris: p50 {:?}, p99 {p99:?}", latencies[50]);
    assert!(p99 < Duration::from_secs(1), "p99 {p99:?}");
    // Every slow connection was cut by the header timeout, long before the attacker gave up.
    for attacker in attackers {
        let lasted = attacker.await.unwrap();
        assert!(lasted < Duration::from_secs(4), "a slowloris connection lasted {lasted:?}");
    }
    edge.stop().await;
}

#[tokio::test]
async fn keep_alive_lasts_the_idle_timeout_while_slow_heads_are_cut() {
    let origin = MockOrigin::start().await;
    origin.route("/ok", Route::ok("max-age=600", "fine"));
    let (head_timeout, idle_timeout) = (Duration::from_secs(1), Duration::from_secs(4));
    let edge = TestEdge::start(&origin.url(), |c| {
        c.limits.header_read_timeout = head_timeout;
        c.limits.idle_timeout = idle_timeout;
    })
    .await;
    let request = format!("GET /ok HTTP/1.1\r\nHost: {}\r\n\r\n", edge.http);
    // Reads one response (this object's is small) or the end of the connection.
    async fn answer(stream: &mut tokio::net::TcpStream) -> String {
        let mut buffer = vec![0; 4096];
        let n = tokio::time::timeout(Duration::from_secs(10), stream.read(&mut buffer)).await.unwrap().unwrap_or(0);
        String::from_utf8_lossy(&buffer[..n]).into_owned()
    }
    // Waits for the server to close the connection; how long that took.
    async fn closed(stream: &mut tokio::net::TcpStream) -> Duration {
        let started = Instant::now();
        let mut rest = Vec::new();
        tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut rest)).await.unwrap().ok();
        started.elapsed()
    }

    // Keep-alive: a second request twice the header timeout after the first is served.
    let mut kept = tokio::net::TcpStream::connect(edge.http).await.unwrap();
    kept.write_all(request.as_bytes()).await.unwrap();
    assert!(answer(&mut kept).await.starts_with("HTTP/1.1 200"));
    tokio::time::sleep(head_timeout * 2).await;
    kept.write_all(request.as_bytes()).await.unwrap();
    let second = answer(&mut kept).await;
    let kept_idle = Instant::now();
    assert!(second.starts_with("HTTP/1.1 200"), "an idle keep-alive connection was cut early: {second:?}");

    // HTTP/2 (prior knowledge) is never taken for a slow HTTP/1 head.
    let h2c = h2c_client();
    assert_eq!(get(&h2c, &edge.url("/ok"), &[]).await.status, StatusCode::OK);
    tokio::time::sleep(head_timeout * 2).await;
    assert_eq!(get(&h2c, &edge.url("/ok"), &[]).await.status, StatusCode::OK);

    // A connection that never sends a request, and a head that stops half-way after a
    // served request, are dropped after the header timeout.
    let mut silent = tokio::net::TcpStream::connect(edge.http).await.unwrap();
    let waited = closed(&mut silent).await;
    assert!(waited >= head_timeout && waited < head_timeout * 3, "a silent connection lasted {waited:?}");
    let mut half = tokio::net::TcpStream::connect(edge.http).await.unwrap();
    half.write_all(request.as_bytes()).await.unwrap();
    assert!(answer(&mut half).await.starts_with("HTTP/1.1 200"));
    half.write_all(b"GET /ok HTTP/1.1\r\nHost: x\r\n").await.unwrap();
    let waited = closed(&mut half).await;
    assert!(waited >= head_timeout && waited < head_timeout * 3, "a stalled head lasted {waited:?}");
    assert!(edge.metric("cdn_connections_closed_total", &[("reason", "header_timeout")]) >= 2.0);

    // The kept connection goes at the idle timeout, counted as idle.
    closed(&mut kept).await;
    let waited = kept_idle.elapsed();
    assert!(waited >= idle_timeout && waited < idle_timeout * 2, "idle keep-alive closed after {waited:?}");
    assert!(edge.metric("cdn_connections_closed_total", &[("reason", "idle")]) >= 1.0);
    edge.stop().await;
}

#[tokio::test]
async fn huge_request_heads_are_refused() {
    let origin = MockOrigin::start().await;
    origin.route("/ok", Route::ok("max-age=600", "fine"));
    let edge = TestEdge::start(&origin.url(), |c| c.limits.max_header_size = bytesize::ByteSize::kib(16)).await;
    let mut stream = tokio::net::TcpStream::connect(edge.http).await.unwrap();
    let big = "a".repeat(64 * 1024);
    let request = format!("GET /ok HTTP/1.1\r\nHost: a\r\nX-Big: {big}\r\n\r\n");
    let _ = stream.write_all(request.as_bytes()).await;
    let mut reply = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut reply)).await;
    let reply = String::from_utf8_lossy(&reply);
    assert!(reply.starts_with("HTTP/1.1 431") || reply.is_empty(), "{reply}");
    assert_eq!(origin.hits("/ok"), 0, "nothing reached the origin");
    // The edge still serves.
    assert_eq!(get(&client(), &edge.url("/ok"), &[]).await.status, StatusCode::OK);
    edge.stop().await;
}

#[tokio::test]
async fn unkeyed_headers_never_reach_a_shared_fill() {
    let origin = MockOrigin::start().await;
    origin.route("/page", Route::ok("max-age=600", "page"));
    origin.route("/video", Route::ok("max-age=600", vec![b'v'; 3 * 1024 * 1024]).ranges());
    origin.route("/form", Route::ok("no-store", "form"));
    let edge = TestEdge::start(&origin.url(), |_| {}).await;
    let c = client();
    let poison = [
        ("x-forwarded-host", "evil.example"),
        ("x-original-url", "/admin"),
        ("x-rewrite-url", "/admin"),
        ("x-http-method-override", "DELETE"),
        ("forwarded", "host=evil.example"),
    ];
    // A whole-object fill, and a slice fill of a large object (a range miss).
    assert_eq!(get(&c, &edge.url("/page"), &poison).await.status, StatusCode::OK);
    let mut ranged = poison.to_vec();
    ranged.push(("range", "bytes=0-99"));
    assert_eq!(get(&c, &edge.url("/video"), &ranged).await.status, StatusCode::PARTIAL_CONTENT);
    for path in ["/page", "/video"] {
        let seen = origin.last_headers(path);
        for (name, _) in &poison {
            assert!(!seen.contains_key(*name), "{name} reached the origin in the fill of {path}");
        }
    }
    // What the next client gets is what the origin made without them.
    let next = get(&c, &edge.url("/page"), &[]).await;
    assert_eq!((next.x_cache(), &next.body[..]), ("HIT", &b"page"[..]));
    // Once the edge knows a URL is not stored (hit-for-pass), its requests are the
    // client's own and their headers go through.
    get(&c, &edge.url("/form"), &poison).await;
    get(&c, &edge.url("/form"), &poison).await;
    assert_eq!(origin.last_headers("/form").get("x-forwarded-host").unwrap(), "evil.example");
    edge.stop().await;
}

#[tokio::test]
async fn the_cache_key_is_the_path_the_origin_sees() {
    // No normalisation on either side: a path that an origin might resolve like
    // another is keyed, and fetched, as sent. Nothing cached under /ok answers it.
    let origin = MockOrigin::start().await;
    origin.route("/ok", Route::ok("max-age=600", "ok"));
    origin.route("/a/../ok", Route::ok("max-age=600", "dot-dot"));
    origin.route("/%6Fk", Route::ok("max-age=600", "encoded"));
    let edge = TestEdge::start(&origin.url(), |_| {}).await;
    let c = client();
    assert_eq!(&get(&c, &edge.url("/ok"), &[]).await.body[..], b"ok");
    for (path, body) in [("/a/../ok", &b"dot-dot"[..]), ("/%6Fk", &b"encoded"[..])] {
        let reply =
            raw_request(edge.http, &format!("GET {path} HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")).await;
        assert!(reply.starts_with("HTTP/1.1 200"), "{path}: {reply}");
        assert!(reply.ends_with(std::str::from_utf8(body).unwrap()), "{path}: {reply}");
        assert_eq!(origin.hits(path), 1, "{path} went to the origin as sent");
    }
    edge.stop().await;
}

#[tokio::test]
async fn a_slow_origin_gets_504_in_time_and_a_stalled_body_is_not_stored() {
    let origin = MockOrigin::start().await;
    origin.route("/slow-head", Route::ok("max-age=600", "late").delay(Duration::from_secs(3)));
    // 4 chunks of 1000 bytes, 2 s apart: the pause is longer than the origin timeout.
    origin.route("/stalls", Route::ok("max-age=600", vec![b's'; 4000]).trickle(1000, Duration::from_secs(2)));
    origin.route("/ok", Route::ok("max-age=600", "fine"));
    let edge =
        TestEdge::start(&origin.url(), |c| c.origin.as_mut().unwrap().timeout = Duration::from_millis(700)).await;
    let c = client();

    let started = Instant::now();
    let reply = get(&c, &edge.url("/slow-head"), &[]).await;
    let took = started.elapsed();
    eprintln!("origin slower than origin.timeout: {} after {took:?}", reply.status);
    assert_eq!(reply.status, StatusCode::GATEWAY_TIMEOUT);
    assert!(took < Duration::from_secs(2), "{took:?}");
    // Meanwhile and after, the edge serves others.
    assert_eq!(get(&c, &edge.url("/ok"), &[]).await.status, StatusCode::OK);

    // A body that stalls longer than the timeout is cut, never stored.
    for _ in 0..2 {
        let request = http::Request::get(edge.url("/stalls")).body(http_body_util::Empty::<Bytes>::new()).unwrap();
        if let Ok(response) = c.request(request).await {
            let body = http_body_util::BodyExt::collect(response.into_body()).await;
            assert!(body.is_err(), "a stalled body was delivered as complete");
        }
    }
    assert_eq!(origin.hits("/stalls"), 2, "the cut body was stored");
    edge.stop().await;
}
