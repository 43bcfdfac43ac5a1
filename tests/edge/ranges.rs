//! Byte ranges and sliced storage: video seeking against a real origin.

use std::{ops::Range, time::Duration};

use bytes::Bytes;
use cdn_test_support::{
    client::{client, get, send},
    edge::TestEdge,
    mock_origin::{MockOrigin, Route},
    multipart::parse_multipart,
    origin::{self, TestOrigin},
};
use http::StatusCode;

/// Successful (2xx) responses the origin sent; the edge's readiness probe of
/// `/` gets a 404 and is not counted.
fn responses(origin: &TestOrigin) -> u64 {
    origin.metric("cdn_origin_responses_total", &[("status", "2xx")]) as u64
}

fn expected(range: Range<u64>) -> Vec<u8> {
    cdn_origin::generate::content(range, 0)
}

async fn edge_for(origin: &str) -> TestEdge {
    TestEdge::start(origin, |_| {}).await
}

#[tokio::test]
async fn first_bytes_of_an_uncached_object_cost_one_slice() {
    let origin = origin::start_generator().await;
    let edge = edge_for(&origin.url("")).await;
    let c = client();
    let r = get(&c, &edge.url("/_gen/10MiB"), &[("range", "bytes=0-1")]).await;
    assert_eq!(r.status, StatusCode::PARTIAL_CONTENT);
    assert_eq!(r.body, expected(0..2));
    assert_eq!(r.header("content-range"), format!("bytes 0-1/{}", 10 << 20));
    assert_eq!(r.x_cache(), "MISS");
    assert_eq!(responses(&origin), 1, "one slice request");
    // bytes=0- on a miss is a 206 too (Safari and Chrome start with it).
    let r = get(&c, &edge.url("/_gen/3MiB"), &[("range", "bytes=0-")]).await;
    assert_eq!(r.status, StatusCode::PARTIAL_CONTENT);
    assert_eq!(r.body.len(), 3 << 20);
    assert!(r.body == expected(0..3 << 20));
    // Now cached: the same range again costs nothing.
    let before = responses(&origin);
    let r = get(&c, &edge.url("/_gen/10MiB"), &[("range", "bytes=0-1")]).await;
    assert_eq!((r.status, r.x_cache()), (StatusCode::PARTIAL_CONTENT, "HIT"));
    assert_eq!(responses(&origin), before);
    edge.stop().await;
}

#[tokio::test]
async fn a_seek_into_a_large_uncached_object_fetches_only_covering_slices() {
    let origin = origin::start_generator().await;
    let edge = edge_for(&origin.url("")).await;
    let c = client();
    let size: u64 = 200 << 20;
    let (start, end) = (100_000_000u64, 101_000_000u64);
    let r = get(&c, &edge.url("/_gen/200MiB"), &[("range", &format!("bytes={start}-{}", end - 1))]).await;
    assert_eq!(r.status, StatusCode::PARTIAL_CONTENT);
    assert_eq!(r.header("content-range"), format!("bytes {start}-{}/{size}", end - 1));
    assert!(r.body == expected(start..end), "byte-exact");
    // 100,000,000..101,000,000 spans slices 95 and 96 of 1 MiB.
    assert_eq!(responses(&origin), 2);
    // HEAD of the object is answered from the stored head.
    let h = send(&c, "HEAD", &edge.url("/_gen/200MiB"), &[]).await;
    assert_eq!(h.header("content-length"), size.to_string());
    assert_eq!(h.x_cache(), "HIT");
    assert_eq!(responses(&origin), 2);
    edge.stop().await;
}

#[tokio::test]
async fn whole_large_object_streams_slice_after_slice() {
    let origin = origin::start_generator().await;
    let edge = edge_for(&origin.url("")).await;
    let c = client();
    let size = 5 * (1 << 20) + 12345;
    let r = get(&c, &edge.url(&format!("/_gen/{size}")), &[]).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.body.len(), size as usize);
    assert!(r.body == expected(0..size), "byte-exact");
    assert_eq!(responses(&origin), 6, "one request per slice");
    let again = get(&c, &edge.url(&format!("/_gen/{size}")), &[]).await;
    assert_eq!(again.x_cache(), "HIT");
    assert!(again.body == r.body);
    assert_eq!(responses(&origin), 6);
    edge.stop().await;
}

#[tokio::test]
async fn multipart_ranges_416_and_if_range() {
    let origin = origin::start_generator().await;
    let edge = edge_for(&origin.url("")).await;
    let c = client();
    let url = edge.url("/_gen/3MiB");
    let full = get(&c, &url, &[]).await;
    let etag = full.header("etag").to_string();
    assert!(etag.starts_with('"'));
    let r = get(&c, &url, &[("range", "bytes=0-9,2097150-2097160")]).await;
    assert_eq!(r.status, StatusCode::PARTIAL_CONTENT);
    let parts = parse_multipart(r.header("content-type"), &r.body);
    assert_eq!(parts.len(), 2);
    assert_eq!((parts[0].range.clone(), parts[0].complete_length), (0..10, 3145728));
    assert_eq!(parts[0].body, expected(0..10));
    assert_eq!((parts[1].range.clone(), parts[1].complete_length), (2_097_150..2_097_161, 3145728));
    assert_eq!(parts[1].body, expected(2_097_150..2_097_161));
    assert_eq!(r.header("content-length"), r.body.len().to_string());
    let r = get(&c, &url, &[("range", "bytes=4000000-")]).await;
    assert_eq!(r.status, StatusCode::RANGE_NOT_SATISFIABLE);
    assert_eq!(r.header("content-range"), "bytes */3145728");
    let r = get(&c, &url, &[("range", "bytes=100-199"), ("if-range", &etag)]).await;
    assert_eq!(r.status, StatusCode::PARTIAL_CONTENT);
    assert_eq!(r.body, expected(100..200));
    let r = get(&c, &url, &[("range", "bytes=100-199"), ("if-range", "\"gen-old\"")]).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.body.len(), 3 << 20);
    edge.stop().await;
}

#[tokio::test]
async fn concurrent_random_ranges_fetch_each_slice_once() {
    let origin = origin::start_generator().await;
    let edge = edge_for(&origin.url("")).await;
    let c = client();
    let size: u64 = 32 << 20;
    let mut seed: u64 = 42;
    let mut next = || {
        seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        seed >> 33
    };
    let mut tasks = Vec::new();
    let mut slices = std::collections::BTreeSet::new();
    for _ in 0..64 {
        let start = next() % (size - 300_000);
        let end = start + 1 + next() % 300_000;
        for s in start / (1 << 20)..=(end - 1) / (1 << 20) {
            slices.insert(s);
        }
        let (c, url) = (c.clone(), edge.url("/_gen/32MiB"));
        tasks.push(tokio::spawn(async move {
            let r = get(&c, &url, &[("range", &format!("bytes={start}-{}", end - 1))]).await;
            assert_eq!(r.status, StatusCode::PARTIAL_CONTENT);
            assert!(r.body == expected(start..end), "bytes {start}-{end} exact");
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    let fetched = responses(&origin);
    // Each distinct slice at most once, plus the probe that learned the length
    // (which is itself a slice request).
    assert!(fetched <= slices.len() as u64 + 1, "{fetched} origin requests for {} distinct slices", slices.len());
    edge.stop().await;
}

#[tokio::test]
async fn an_object_replaced_between_slices_is_never_spliced() {
    let origin = MockOrigin::start().await;
    let size = 3 << 20;
    let old = Bytes::from(vec![b'a'; size]);
    let new = Bytes::from(vec![b'b'; size]);
    origin.route("/movie", Route::ok("max-age=600", old).header("etag", "\"one\"").ranges());
    let edge = edge_for(&origin.url()).await;
    let c = client();
    let first = get(&c, &edge.url("/movie"), &[("range", "bytes=0-9")]).await;
    assert_eq!(first.body, vec![b'a'; 10]);
    origin.route("/movie", Route::ok("max-age=600", new).header("etag", "\"two\"").ranges());
    // Slice 2 comes back with another ETag: the response fails instead of splicing.
    let url = edge.url("/movie");
    let request =
        http::Request::get(&url).header("range", "bytes=0-").body(http_body_util::Empty::<Bytes>::new()).unwrap();
    let response = c.request(request).await.unwrap();
    let body = http_body_util::BodyExt::collect(response.into_body()).await;
    // Either the body fails (the usual case), or it ends short of the whole.
    if let Ok(collected) = body {
        let bytes = collected.to_bytes();
        assert!(bytes.len() < size, "a spliced body must not arrive complete");
        assert!(bytes.iter().all(|b| *b == b'a'), "no bytes of the new version in the old response");
    }
    // The next request starts over on the new version, whole and consistent.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let r = get(&c, &edge.url("/movie"), &[("range", "bytes=0-")]).await;
    assert_eq!(r.body.len(), size);
    assert!(r.body.iter().all(|b| *b == b'b'));
    assert_eq!(r.header("etag"), "\"two\"");
    edge.stop().await;
}

#[tokio::test]
async fn cors_for_players_passes_through() {
    let origin = origin::start_generator().await;
    let edge = edge_for(&origin.url("")).await;
    let c = client();
    let preflight = send(
        &c,
        "OPTIONS",
        &edge.url("/_gen/2MiB"),
        &[
            ("origin", "https://player.example"),
            ("access-control-request-method", "GET"),
            ("access-control-request-headers", "range"),
        ],
    )
    .await;
    assert!(preflight.status.is_success(), "{:?}", preflight.status);
    assert!(
        preflight.header("access-control-allow-headers").to_ascii_lowercase().contains("range"),
        "{:?}",
        preflight.headers
    );
    assert!(!preflight.header("access-control-allow-origin").is_empty());
    let r = get(&c, &edge.url("/_gen/2MiB"), &[("origin", "https://player.example"), ("range", "bytes=0-1")]).await;
    assert_eq!(r.status, StatusCode::PARTIAL_CONTENT);
    assert_eq!(r.header("access-control-allow-origin"), "*");
    assert!(r.header("access-control-expose-headers").contains("Content-Range"));
    edge.stop().await;
}
