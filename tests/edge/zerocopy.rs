//! Large cached bodies leave cleartext connections with `sendfile` from sealed memory
//! files (crates/node/src/zerocopy.rs); every byte must still arrive, in order, over
//! every protocol, however slowly the client reads.

use std::time::Duration;

use bytes::Bytes;
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpSocket, TcpStream},
};

use cdn_test_support::{
    client::{HttpClient, client, get, h2c_client, tls_client},
    edge::{TestEdge, start_tls_edge},
    mock_origin::{MockOrigin, Route},
};

const WHOLE: usize = 3 * 1024 * 1024 + 4321;
const SLICED: usize = 5 * 1024 * 1024 + 123;

fn pattern(len: usize, seed: usize) -> Bytes {
    (0..len).map(|i| ((i * 31 + i / 4093 + seed) % 256) as u8).collect::<Vec<u8>>().into()
}

/// One HTTP/1.1 response read off a raw socket: status line, headers, body.
struct Raw {
    head: String,
    body: Vec<u8>,
}

/// Sends `request` on `stream` and reads one response, `chunk` bytes at a time with
/// a pause now and then, so that the edge's socket fills and its sends are partial.
async fn exchange(stream: &mut TcpStream, request: &str, chunk: usize) -> Raw {
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut buffer = Vec::new();
    let head_end = loop {
        let mut piece = vec![0; chunk];
        let n = stream.read(&mut piece).await.unwrap();
        assert!(n > 0, "connection closed before the head");
        buffer.extend_from_slice(&piece[..n]);
        if let Some(end) = buffer.windows(4).position(|w| w == b"\r\n\r\n") {
            break end + 4;
        }
    };
    let head = String::from_utf8(buffer[..head_end].to_vec()).unwrap();
    let length: usize = head
        .lines()
        .find_map(|line| line.to_ascii_lowercase().strip_prefix("content-length:").map(|v| v.trim().parse().unwrap()))
        .expect("content-length");
    let mut body = buffer[head_end..].to_vec();
    let mut reads = 0;
    while body.len() < length {
        let mut piece = vec![0; chunk.min(length - body.len())];
        let n = stream.read(&mut piece).await.unwrap();
        assert!(n > 0, "connection closed after {} of {length} body bytes", body.len());
        body.extend_from_slice(&piece[..n]);
        reads += 1;
        if reads % 64 == 0 {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }
    assert_eq!(body.len(), length, "no bytes beyond the body");
    Raw { head, body }
}

/// Fetches `path` until the edge answers it from its cache (the fill stores the
/// object just after the last byte went out), checking every answer.
async fn warm(c: &HttpClient, url: &str, expected: &Bytes) {
    for _ in 0..100 {
        let reply = get(c, url, &[]).await;
        assert!(reply.body == expected, "{url}: body differs from the origin's");
        if reply.x_cache() == "HIT" {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("{url} never became a HIT");
}

/// A connection with a small receive buffer.
async fn slow_connection(edge: &TestEdge) -> TcpStream {
    let socket = TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(8 * 1024).unwrap();
    socket.connect(edge.http).await.unwrap()
}

#[tokio::test]
async fn large_hits_are_sent_from_sealed_memory_byte_exact() {
    let origin = MockOrigin::start().await;
    let whole = pattern(WHOLE, 1);
    let sliced = pattern(SLICED, 2);
    origin.route("/whole", Route::ok("max-age=600", whole.clone()));
    origin.route("/sliced", Route::ok("max-age=600", sliced.clone()).header("etag", "\"s1\"").ranges());
    let edge = TestEdge::start(&origin.url(), |c| {
        c.cache.max_object = bytesize::ByteSize::mib(4);
        c.cache.slice = bytesize::ByteSize::mib(1);
    })
    .await;
    let c = client();
    // Fill both (MISS), then everything below is a HIT.
    warm(&c, &edge.url("/whole"), &whole).await;
    warm(&c, &edge.url("/sliced"), &sliced).await;
    let before = edge.metric("cdn_zero_copy_bytes_total", &[]);

    // HTTP/1.1 keep-alive on one slow connection: whole, sliced, a range across a
    // slice boundary, a HEAD and the whole object again — each head must sit right
    // after the previous body.
    let mut stream = slow_connection(&edge).await;
    let host = edge.http;
    let request = |path: &str, extra: &str| format!("GET {path} HTTP/1.1\r\nHost: {host}\r\n{extra}\r\n");
    for (chunk, path, expected) in [(1000, "/whole", &whole), (65_536, "/sliced", &sliced), (333, "/whole", &whole)] {
        let raw = exchange(&mut stream, &request(path, ""), chunk).await;
        assert!(raw.head.starts_with("HTTP/1.1 200"), "{}", raw.head);
        assert!(raw.head.to_ascii_lowercase().contains("x-cache: hit"), "{}", raw.head);
        assert!(raw.body == expected[..], "{path}: body differs from the origin's");
    }
    let (from, to) = (1024 * 1024 - 100_000, 3 * 1024 * 1024 + 99);
    let raw = exchange(&mut stream, &request("/sliced", &format!("Range: bytes={from}-{to}\r\n")), 4096).await;
    assert!(raw.head.starts_with("HTTP/1.1 206"), "{}", raw.head);
    assert!(raw.body == sliced[from..=to], "range body differs");
    stream.write_all(request("/whole", "").replace("GET", "HEAD").as_bytes()).await.unwrap();
    let mut head = vec![0; 4096];
    let n = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut head)).await.unwrap().unwrap();
    let head = String::from_utf8_lossy(&head[..n]);
    assert!(head.starts_with("HTTP/1.1 200") && head.ends_with("\r\n\r\n"), "HEAD answered with a head only: {head}");
    let raw = exchange(&mut stream, &request("/whole", ""), 100_000).await;
    assert!(raw.body == whole[..], "body after a HEAD differs");

    let sent = edge.metric("cdn_zero_copy_bytes_total", &[]) - before;
    let bodies = (3 * WHOLE + SLICED + (to - from + 1)) as f64;
    assert!(sent >= bodies * 0.9, "only {sent} of {bodies} body bytes went out by sendfile");

    // hyper's client over HTTP/1.1, many at once.
    let fetches: Vec<_> = (0..8)
        .map(|i| {
            let (c, url) = (c.clone(), edge.url(if i % 2 == 0 { "/whole" } else { "/sliced" }));
            tokio::spawn(async move { get(&c, &url, &[]).await })
        })
        .collect();
    for (i, fetch) in fetches.into_iter().enumerate() {
        let reply = fetch.await.unwrap();
        assert_eq!(reply.x_cache(), "HIT");
        assert!(reply.body == if i % 2 == 0 { &whole } else { &sliced }, "concurrent fetch {i} differs");
    }
    assert_eq!(origin.hits("/whole"), 1);
    edge.stop().await;
}

#[tokio::test]
async fn sealed_bodies_are_byte_exact_over_h2c_and_tls() {
    let origin = MockOrigin::start().await;
    let whole = pattern(WHOLE, 3);
    origin.route("/whole", Route::ok("max-age=600", whole.clone()));
    let edge = start_tls_edge(&origin.url(), |_| {}).await;
    let https = format!("https://localhost:{}/whole", edge.https.unwrap().port());
    warm(&client(), &edge.url("/whole"), &whole).await;
    let tls = tls_client();
    // The scheme is part of the cache key: the first HTTPS request fills its own entry.
    for round in 0..3 {
        let response =
            tls.request(http::Request::get(&https).body(http_body_util::Empty::new()).unwrap()).await.unwrap();
        assert_eq!(response.version(), http::Version::HTTP_2);
        if round == 2 {
            assert_eq!(response.headers()["x-cache"], "HIT");
        }
        let body = http_body_util::BodyExt::collect(response.into_body()).await.unwrap().to_bytes();
        assert!(body == whole, "TLS h2 round {round} differs");
    }
    let h2c = h2c_client();
    let reply = get(&h2c, &edge.url("/whole"), &[]).await;
    assert_eq!(reply.version, http::Version::HTTP_2);
    assert_eq!(reply.x_cache(), "HIT");
    assert!(reply.body == whole, "h2c body differs");
    assert_eq!(origin.hits("/whole"), 2, "one fill per scheme");
    edge.stop().await;
}
