//! Overload and abusive clients at the connection level: floods of idle
//! connections (HTTP/1.1, HTTP/2, HTTP/3), readers that stop reading, HTTP/2 and
//! HTTP/3 rapid reset, HTTP/2 stream floods. Each test measures that well-behaved
//! clients keep being served and that the abuser is cut within its limit.
//!
//! HTTP/2 abuse is written as raw frames: real clients (the h2 crate included)
//! respect the limits these tests attack.

use std::{
    net::SocketAddr,
    time::{Duration, Instant},
};

use http::StatusCode;
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::TcpStream,
};

use cdn_test_support::{
    client::{client, get, h2c_client, send, unpooled_client},
    edge::{TestEdge, start_tls_edge},
    http3::{H3Client, quic_connect},
    metrics,
    mock_origin::{MockOrigin, Route},
    net::free_port,
    wait,
};

/// p50 and p99 of `n` sequential GETs of `url`, each of which must be 200.
async fn good_client_latency(url: &str, n: usize) -> (Duration, Duration) {
    let client = unpooled_client();
    let mut latencies = Vec::with_capacity(n);
    for _ in 0..n {
        let started = Instant::now();
        let reply = get(&client, url, &[]).await;
        assert_eq!(reply.status, StatusCode::OK);
        latencies.push(started.elapsed());
    }
    latencies.sort();
    (latencies[n / 2], latencies[n * 99 / 100])
}

/// Resident memory of a process, bytes, from its /proc/<pid>/status.
fn rss_of(path: &str) -> u64 {
    let status = std::fs::read_to_string(path).unwrap();
    let kib: u64 = status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap();
    kib * 1024
}

/// `cdn edge` as its own process, so its memory is its own: the other tests of this
/// binary run in parallel and share the test process.
struct EdgeProcess {
    child: tokio::process::Child,
    http: SocketAddr,
    h3: SocketAddr,
    admin: SocketAddr,
    _dir: tempfile::TempDir,
}

impl EdgeProcess {
    async fn start(origin: &str, limits: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let port = |_| free_port();
        let (http, tls, admin): (SocketAddr, SocketAddr, SocketAddr) =
            (([127, 0, 0, 1], port(0)).into(), ([127, 0, 0, 1], port(1)).into(), ([127, 0, 0, 1], port(2)).into());
        let config = dir.path().join("edge.toml");
        std::fs::write(
            &config,
            format!(
                "node_id = \"overload\"\n[listen]\nhttp = \"{http}\"\nhttps = \"{tls}\"\nh3 = \"{tls}\"\n\
                 admin = \"{admin}\"\n[tls]\nself_signed = true\n[origin]\nurl = \"{origin}\"\n[limits]\n{limits}\n"
            ),
        )
        .unwrap();
        let child = tokio::process::Command::new(env!("CARGO_BIN_EXE_cdn"))
            .args(["edge", "--config"])
            .arg(&config)
            .env("RUST_LOG", "warn")
            .stdin(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("cdn edge starts");
        let edge = Self { child, http, h3: tls, admin, _dir: dir };
        let client = unpooled_client();
        wait::until("cdn edge to come up", Duration::from_secs(10), Duration::from_millis(50), async || {
            let request = http::Request::get(format!("http://{admin}/healthz"))
                .body(http_body_util::Empty::<bytes::Bytes>::new())
                .unwrap();
            client.request(request).await.is_ok_and(|r| r.status() == StatusCode::OK).then_some(())
        })
        .await;
        edge
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.http)
    }

    /// Resident memory of the edge process, bytes.
    fn rss(&self) -> u64 {
        rss_of(&format!("/proc/{}/status", self.child.id().unwrap()))
    }

    /// The sum of the samples of `name` whose labels include `labels`, from /metrics.
    async fn metric(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        metrics::sum(&metrics::scrape(self.admin).await, name, labels)
    }
}

// --- raw HTTP/2 frames ------------------------------------------------------------------

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const HEADERS: u8 = 0x1;
const RST_STREAM: u8 = 0x3;
const SETTINGS: u8 = 0x4;
const GOAWAY: u8 = 0x7;
const END_STREAM: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const ACK: u8 = 0x1;
const CANCEL: u32 = 0x8;

fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = u32::try_from(payload.len()).unwrap().to_be_bytes();
    let mut out = vec![len[1], len[2], len[3], kind, flags];
    out.extend_from_slice(&stream.to_be_bytes());
    out.extend_from_slice(payload);
    out
}

/// A GET for `path` as an HPACK block: static-table :method GET and :scheme http,
/// literal :path and :authority without indexing.
fn get_block(path: &str) -> Vec<u8> {
    let mut block = vec![0x82, 0x86, 0x04, u8::try_from(path.len()).unwrap()];
    block.extend_from_slice(path.as_bytes());
    block.extend_from_slice(&[0x01, 0x01, b'a']);
    block
}

/// Opens an h2c (prior knowledge) connection: preface and `settings`, then reads the
/// server's SETTINGS and acknowledges them.
async fn h2c(addr: SocketAddr, settings: &[(u16, u32)]) -> TcpStream {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    let mut payload = Vec::new();
    for (id, value) in settings {
        payload.extend_from_slice(&id.to_be_bytes());
        payload.extend_from_slice(&value.to_be_bytes());
    }
    let mut hello = PREFACE.to_vec();
    hello.extend(frame(SETTINGS, 0, 0, &payload));
    stream.write_all(&hello).await.unwrap();
    loop {
        let mut head = [0u8; 9];
        stream.read_exact(&mut head).await.unwrap();
        let len = usize::from(head[0]) << 16 | usize::from(head[1]) << 8 | usize::from(head[2]);
        let mut body = vec![0u8; len];
        stream.read_exact(&mut body).await.unwrap();
        if head[3] == SETTINGS && head[4] & ACK == 0 {
            break;
        }
    }
    stream.write_all(&frame(SETTINGS, ACK, 0, &[])).await.unwrap();
    stream
}

/// Reads frames until the connection ends; returns the error code of the GOAWAY
/// that came, if one did.
async fn drain_frames(mut read: tokio::net::tcp::OwnedReadHalf) -> Option<u32> {
    let mut goaway = None;
    let mut head = [0u8; 9];
    while read.read_exact(&mut head).await.is_ok() {
        let len = usize::from(head[0]) << 16 | usize::from(head[1]) << 8 | usize::from(head[2]);
        let mut body = vec![0u8; len];
        if read.read_exact(&mut body).await.is_err() {
            break;
        }
        if head[3] == GOAWAY && body.len() >= 8 {
            goaway = Some(u32::from_be_bytes([body[4], body[5], body[6], body[7]]));
        }
    }
    goaway
}

// --- tests ------------------------------------------------------------------------------

#[tokio::test]
async fn idle_connection_floods_are_closed_after_the_idle_timeout() {
    let origin = MockOrigin::start().await;
    origin.route("/ok", Route::ok("max-age=600", "fine"));
    let idle = Duration::from_secs(5);
    let edge = EdgeProcess::start(&origin.url(), "idle_timeout = \"5s\"").await;
    get(&unpooled_client(), &edge.url("/ok"), &[]).await;
    let before = edge.rss();

    // 50 HTTP/3 connections that only do the handshake, 300 HTTP/2 connections that
    // only say hello, 1000 HTTP/1.1 connections that never send a byte.
    let opened = Instant::now();
    let mut h3 = Vec::new();
    for _ in 0..50 {
        h3.push(quic_connect(edge.h3).await);
    }
    let after_h3 = edge.rss();
    let mut h2 = Vec::new();
    for _ in 0..300 {
        h2.push(h2c(edge.http, &[]).await);
    }
    let after_h2 = edge.rss();
    let mut h1 = Vec::new();
    for _ in 0..1000 {
        h1.push(TcpStream::connect(edge.http).await.unwrap());
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let after_h1 = edge.rss();
    let took = opened.elapsed();
    eprintln!("opened 1350 connections in {took:?}");
    let tcp_open = edge.metric("cdn_connections", &[("protocol", "tcp")]).await;
    let h3_open = edge.metric("cdn_connections", &[("protocol", "h3")]).await;
    if took < idle {
        assert!(tcp_open >= 1300.0 && h3_open >= 50.0, "open: tcp {tcp_open}, h3 {h3_open}");
    }
    let per = |from: u64, to: u64, n: u64| to.saturating_sub(from) / n;
    let (h3_each, h2_each, h1_each) =
        (per(before, after_h3, 50), per(after_h3, after_h2, 300), per(after_h2, after_h1, 1000));
    eprintln!("edge RSS per idle connection: h1 {h1_each} B, h2 {h2_each} B, h3 {h3_each} B");
    assert!(
        h1_each < 16 * 1024 && h2_each < 64 * 1024 && h3_each < 256 * 1024,
        "h1 {h1_each} B, h2 {h2_each} B, h3 {h3_each} B per idle connection"
    );

    // Good clients are served meanwhile.
    let (p50, p99) = good_client_latency(&edge.url("/ok"), 100).await;
    eprintln!("good clients among 1350 idle connections: p50 {p50:?}, p99 {p99:?}");
    assert!(p99 < Duration::from_millis(500), "p99 {p99:?}");

    // Every idle connection is closed once it has been idle for the timeout.
    let mut closed = false;
    while opened.elapsed() < idle * 3 {
        let tcp = edge.metric("cdn_connections", &[("protocol", "tcp")]).await;
        let h3 = edge.metric("cdn_connections", &[("protocol", "h3")]).await;
        if tcp == 0.0 && h3 == 0.0 {
            closed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let after = opened.elapsed();
    assert!(closed, "connections still open {after:?} after the flood began");
    eprintln!("all idle connections closed {after:?} after the flood began (idle timeout {idle:?})");
    assert!(after >= idle, "closed before the idle timeout: {after:?}");
    for mut stream in h1 {
        let mut buf = [0u8; 1];
        let read = tokio::time::timeout(Duration::from_secs(2), stream.read(&mut buf)).await;
        assert!(matches!(read, Ok(Ok(0) | Err(_))), "an h1 connection is still open: {read:?}");
    }
    for (_, connection) in &h3 {
        let reason = tokio::time::timeout(Duration::from_secs(2), connection.closed()).await;
        assert!(reason.is_ok(), "an h3 connection is still open");
    }
    assert!(edge.metric("cdn_connections_closed_total", &[("reason", "idle")]).await >= 1350.0);
    drop(h2);
}

#[tokio::test]
async fn readers_that_stop_are_cut_and_slow_steady_readers_are_not() {
    let origin = MockOrigin::start().await;
    let size = 16 * 1024 * 1024;
    origin.route("/big", Route::ok("max-age=600", vec![b'v'; size]));
    let edge = EdgeProcess::start(&origin.url(), "send_timeout = \"1s\"").await;
    assert_eq!(get(&unpooled_client(), &edge.url("/big"), &[]).await.body.len(), size);
    // The baseline is taken once the object is stored (sealed) and read once through
    // a copying path (h2c), so the fill's own buffers, which come and go with its
    // task, are not counted as the readers' growth.
    wait::until("the object is stored", Duration::from_secs(10), Duration::from_millis(50), async || {
        let reply = get(&h2c_client(), &edge.url("/big"), &[]).await;
        (reply.x_cache() == "HIT" && reply.body.len() == size).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let before = edge.rss();

    // 30 HTTP/1.1 clients ask for 16 MiB and read nothing; 10 HTTP/2 clients do the
    // same with a zero flow-control window.
    let mut stalled = Vec::new();
    for _ in 0..30 {
        let mut stream = TcpStream::connect(edge.http).await.unwrap();
        stream.write_all(b"GET /big HTTP/1.1\r\nHost: a\r\n\r\n").await.unwrap();
        stalled.push(stream);
    }
    let mut zero_window = Vec::new();
    for _ in 0..10 {
        let mut stream = h2c(edge.http, &[(0x4, 0)]).await;
        stream.write_all(&frame(HEADERS, END_STREAM | END_HEADERS, 1, &get_block("/big"))).await.unwrap();
        zero_window.push(stream);
    }
    // One client reads slowly but steadily: 256 KiB every 300 ms.
    let steady = tokio::spawn({
        let addr = edge.http;
        async move {
            let mut stream = TcpStream::connect(addr).await.unwrap();
            stream.write_all(b"GET /big HTTP/1.1\r\nHost: a\r\n\r\n").await.unwrap();
            let mut total = 0;
            let mut buf = vec![0u8; 256 * 1024];
            let started = Instant::now();
            while started.elapsed() < Duration::from_secs(4) {
                let mut chunk = 0;
                while chunk < buf.len() {
                    match stream.read(&mut buf[chunk..]).await {
                        Ok(0) | Err(_) => return (total + chunk, false),
                        Ok(n) => chunk += n,
                    }
                }
                total += chunk;
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
            (total, true)
        }
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    let grown = edge.rss().saturating_sub(before);
    eprintln!("41 readers of a 16 MiB object: edge RSS +{} KiB", grown / 1024);
    // The object is shared: no reader gets a copy of it.
    assert!(grown < 64 * 1024 * 1024, "RSS grew by {grown} bytes");

    let (p50, p99) = good_client_latency(&edge.url("/big"), 20).await;
    eprintln!("good clients fetching 16 MiB among stalled readers: p50 {p50:?}, p99 {p99:?}");

    let started = Instant::now();
    let mut cut = 0.0;
    while started.elapsed() < Duration::from_secs(8) && cut < 40.0 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        cut = edge.metric("cdn_connections_closed_total", &[("reason", "stalled")]).await;
    }
    assert!(cut >= 40.0, "{cut} of 40 stalled readers cut");
    for mut stream in stalled {
        // What the kernel buffered, then the end (or a reset): never the whole object.
        let mut rest = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut rest)).await;
        assert!(read.is_ok(), "a stalled h1 connection is still open");
        assert!(rest.len() < size, "a stalled reader got the whole object");
    }
    for stream in zero_window {
        let (read, _write) = stream.into_split();
        assert!(tokio::time::timeout(Duration::from_secs(5), drain_frames(read)).await.is_ok());
    }
    let (read, whole) = steady.await.unwrap();
    assert!(whole, "the steady slow reader was cut after {read} bytes");
}

#[tokio::test]
async fn an_h2_rapid_reset_flood_is_cut_and_others_keep_being_served() {
    let origin = MockOrigin::start().await;
    // Every request would cost an origin request: the amplification the attack is after.
    origin.route("/pass", Route::ok("no-store", "x").delay(Duration::from_millis(200)));
    origin.route("/ok", Route::ok("max-age=600", "fine"));
    let edge = TestEdge::start(&origin.url(), |_| {}).await;
    get(&unpooled_client(), &edge.url("/ok"), &[]).await;

    let good = tokio::spawn({
        let url = edge.url("/ok");
        async move { good_client_latency(&url, 100).await }
    });
    // Resets right behind the requests, and resets 50 ms later when the requests are
    // under way at the origin. The h2 library cuts both (GOAWAY ENHANCE_YOUR_CALM
    // once more than 20 streams reset by the client are still held by the server);
    // the edge's own cancel accounting is the second line (and the first for HTTP/3).
    for pace in [Duration::ZERO, Duration::from_millis(50)] {
        origin.reset_hits();
        let (sent, took, goaway) = rapid_reset(edge.http, pace).await;
        let hits: usize = (0..40_000).step_by(2).map(|id| origin.hits(&format!("/pass?{}", id + 1))).sum();
        eprintln!(
            "rapid reset paced {pace:?}: {sent} of 20000 streams written in {took:?} before the connection was cut \
             (GOAWAY code {goaway:?}); the origin saw {hits} requests"
        );
        assert!(sent < 20_000, "the edge took all 20000 reset streams");
        assert!(hits < 500, "{hits} origin requests");
        if !pace.is_zero() {
            // Not held back by the library: the edge's own accounting cut this one.
            assert_eq!(edge.metric("cdn_connections_closed_total", &[("reason", "cancels")]), 1.0);
        }
    }
    let (p50, p99) = good.await.unwrap();
    eprintln!("good clients during the rapid reset flood: p50 {p50:?}, p99 {p99:?}");
    assert!(p99 < Duration::from_secs(1), "p99 {p99:?}");
    edge.stop().await;
}

#[tokio::test]
async fn an_h2_stream_flood_is_held_to_the_stream_limit() {
    let origin = MockOrigin::start().await;
    origin.route("/pass", Route::ok("no-store", "x").delay(Duration::from_secs(2)));
    origin.route("/ok", Route::ok("max-age=600", "fine"));
    let edge = TestEdge::start(&origin.url(), |c| c.limits.max_concurrent_streams = 50).await;
    get(&unpooled_client(), &edge.url("/ok"), &[]).await;

    // 2000 streams opened at once, ignoring the advertised limit of 50.
    let stream = h2c(edge.http, &[]).await;
    let (read, mut write) = stream.into_split();
    let reader = tokio::spawn(drain_frames(read));
    // Distinct URLs, so that coalescing does not hide the load.
    let mut bytes = Vec::new();
    for i in 0..2000u32 {
        bytes.extend(frame(HEADERS, END_STREAM | END_HEADERS, 2 * i + 1, &get_block(&format!("/pass?{i}"))));
    }
    let _ = write.write_all(&bytes).await;
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let seen: usize = (0..2000).map(|i| origin.hits(&format!("/pass?{i}"))).sum();
    let goaway = tokio::time::timeout(Duration::from_secs(5), reader).await.expect("the connection was not closed");
    eprintln!(
        "stream flood: 2000 streams opened at once, the origin saw {seen} requests (limit 50), \
         the connection closed with GOAWAY code {:?}",
        goaway.unwrap()
    );
    assert!(seen <= 50, "{seen} requests went to the origin");
    let (p50, p99) = good_client_latency(&edge.url("/ok"), 100).await;
    eprintln!("good clients during the stream flood: p50 {p50:?}, p99 {p99:?}");
    assert!(p99 < Duration::from_secs(1), "p99 {p99:?}");
    drop(write);
    edge.stop().await;
}

#[tokio::test]
async fn an_h3_rapid_reset_flood_is_cut() {
    let origin = MockOrigin::start().await;
    origin.route("/pass", Route::ok("no-store", "x").delay(Duration::from_millis(200)));
    origin.route("/ok", Route::ok("max-age=600", "fine"));
    let edge = start_tls_edge(&origin.url(), |_| {}).await;
    let (_endpoint, connection) = quic_connect(edge.h3.unwrap()).await;
    let (mut driver, mut send) = h3::client::new(h3_quinn::Connection::new(connection.clone())).await.unwrap();
    tokio::spawn(async move {
        let _ = std::future::poll_fn(|cx| driver.poll_close(cx)).await;
    });
    let started = Instant::now();
    let mut sent = 0;
    for _ in 0..5000 {
        let request =
            http::Request::get(format!("https://localhost:{}/pass", edge.h3.unwrap().port())).body(()).unwrap();
        let Ok(mut stream) = send.send_request(request).await else { break };
        stream.stop_stream(h3::error::Code::H3_REQUEST_CANCELLED);
        stream.stop_sending(h3::error::Code::H3_REQUEST_CANCELLED);
        sent += 1;
    }
    let reason = tokio::time::timeout(Duration::from_secs(5), connection.closed()).await.expect("not closed");
    eprintln!(
        "h3 rapid reset: {sent} of 5000 requests sent in {:?}; connection closed: {reason}; origin saw {}",
        started.elapsed(),
        origin.hits("/pass")
    );
    assert!(sent < 5000, "the edge took all 5000 cancelled requests");
    assert!(
        matches!(reason, quinn::ConnectionError::ApplicationClosed(ref close) if close.error_code == quinn::VarInt::from_u32(0x107)),
        "{reason}"
    );
    assert!(origin.hits("/pass") < 1000);
    // Others still get served over HTTP/3.
    let mut client = H3Client::connect(edge.h3.unwrap()).await;
    assert_eq!(client.get("/ok", &[]).await.status, StatusCode::OK);
    edge.stop().await;
}

/// Opens streams for `/pass` on a fresh h2c connection in batches of 40 and resets
/// each batch `pace` after opening it, until the server cuts the connection or
/// 20000 streams went out. Returns the streams written, the time it took and the
/// GOAWAY's error code.
async fn rapid_reset(addr: SocketAddr, pace: Duration) -> (u32, Duration, Option<u32>) {
    let stream = h2c(addr, &[]).await;
    let (read, mut write) = stream.into_split();
    let reader = tokio::spawn(drain_frames(read));
    let started = Instant::now();
    let mut sent = 0u32;
    for batch in 0..500u32 {
        let ids: Vec<u32> = (0..40).map(|i| 2 * (batch * 40 + i) + 1).collect();
        // Distinct URLs, so that coalescing does not hide the load.
        let opens: Vec<u8> = ids
            .iter()
            .flat_map(|id| frame(HEADERS, END_STREAM | END_HEADERS, *id, &get_block(&format!("/pass?{id}"))))
            .collect();
        let resets: Vec<u8> = ids.iter().flat_map(|id| frame(RST_STREAM, 0, *id, &CANCEL.to_be_bytes())).collect();
        if write.write_all(&opens).await.is_err() {
            break;
        }
        if pace.is_zero() {
            tokio::task::yield_now().await;
        } else {
            tokio::time::sleep(pace).await;
        }
        if write.write_all(&resets).await.is_err() {
            break;
        }
        sent += 40;
    }
    let took = started.elapsed();
    let goaway = tokio::time::timeout(Duration::from_secs(5), reader).await.expect("the connection was not closed");
    (sent, took, goaway.unwrap())
}

#[tokio::test]
async fn a_keep_alive_client_is_never_taken_for_a_flood() {
    // Streamed responses with a Content-Length (misses, whose bodies arrive from the
    // origin as they are sent), HEADs and 304s, 150 of each on one connection: none
    // may count as cancelled (HTTP/1 drops a body once its announced length went out).
    let origin = MockOrigin::start().await;
    origin.route("/s", Route::ok("max-age=600", vec![b's'; 100_000]).header("etag", "\"s\""));
    let edge = TestEdge::start(&origin.url(), |_| {}).await;
    let c = client();
    for i in 0..150 {
        let reply = get(&c, &edge.url(&format!("/s?{i}")), &[]).await;
        assert_eq!((reply.status, reply.body.len()), (StatusCode::OK, 100_000), "request {i}");
    }
    for i in 0..150 {
        let reply = send(&c, "HEAD", &edge.url(&format!("/s?{i}")), &[]).await;
        assert_eq!(reply.status, StatusCode::OK, "HEAD {i}");
        let reply = get(&c, &edge.url(&format!("/s?{i}")), &[("if-none-match", "\"s\"")]).await;
        assert_eq!(reply.status, StatusCode::NOT_MODIFIED, "conditional {i}");
    }
    assert_eq!(edge.metric("cdn_connections_closed_total", &[("reason", "cancels")]), 0.0);
    assert_eq!(edge.metric("cdn_connections_closed_total", &[]), 0.0);
    edge.stop().await;
}
