//! Compression at the edge (docs/caching.md, "Compression"): text a real origin
//! sends uncompressed is compressed once into gzip and brotli variants, each served
//! from the cache; `Accept-Encoding` folds into three variants; ranges, HEAD,
//! conditionals and revalidation on a compressed variant; media, encoded bodies,
//! `no-transform` and small bodies left alone (mock origin).

use std::{io::Read as _, time::Duration};

use bytes::Bytes;
use http::StatusCode;

use cdn_test_support::{
    client::{Reply, client, get, send},
    edge::TestEdge,
    metrics::sum_in,
    mock_origin::{MockOrigin, Route},
    origin,
};

/// A page of text that compresses well (about 30 KB).
fn page() -> String {
    (0..600).map(|i| format!("<li class=\"item\">entry {i}: compressed once at the edge</li>\n")).collect()
}

fn gunzip(body: &[u8]) -> String {
    let mut text = String::new();
    flate2::read::GzDecoder::new(body).read_to_string(&mut text).expect("a gzip body");
    text
}

fn unbrotli(body: &[u8]) -> String {
    let mut text = String::new();
    brotli::Decompressor::new(body, 4096).read_to_string(&mut text).expect("a brotli body");
    text
}

fn vary_has_accept_encoding(r: &Reply) -> bool {
    r.headers
        .get_all("vary")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|name| name.trim().eq_ignore_ascii_case("accept-encoding"))
}

/// Waits until the fill's compressed variants are stored (they are made once the
/// body is whole, after the first client got it as the origin sent it).
async fn compressed(edge: &TestEdge) {
    let registry = &edge.registry;
    cdn_test_support::wait::until(
        "the compressed variants",
        Duration::from_secs(10),
        Duration::from_millis(5),
        async || (sum_in(registry, "cdn_compressed_total", &[]) >= 2.0).then_some(()),
    )
    .await;
}

fn origin_requests(edge: &TestEdge) -> f64 {
    sum_in(&edge.registry, "cdn_origin_requests_total", &[])
}

/// The first request fills (identity, as the origin sent it); then gzip, br and
/// identity are HITs, each decoding to the original; every spelling of
/// `Accept-Encoding` lands on one of the three, from one origin request.
#[tokio::test]
async fn text_is_compressed_once_and_served_per_encoding() {
    let text = page();
    let origin = origin::start_serving(&[("page.html", text.as_bytes())]).await;
    let edge = TestEdge::start(&origin.url(""), |_| {}).await;
    let (c, url) = (client(), edge.url("/page.html"));

    let first = get(&c, &url, &[("accept-encoding", "gzip, deflate, br")]).await;
    assert_eq!((first.status, first.x_cache()), (StatusCode::OK, "MISS"));
    assert_eq!(first.header("content-encoding"), "", "the fill streams what the origin sent");
    assert_eq!(first.body, text.as_bytes());
    assert!(vary_has_accept_encoding(&first), "{:?}", first.headers);
    let etag = first.header("etag").to_string();
    assert!(etag.starts_with('"'), "the origin's strong tag: {etag}");
    // At once (the variants may still be in the making): a HIT of the body as it came.
    let again = get(&c, &url, &[("accept-encoding", "gzip")]).await;
    assert_eq!(again.x_cache(), "HIT", "{:?}", again.headers);
    let decoded = match again.header("content-encoding") {
        "" => String::from_utf8(again.body.to_vec()).unwrap(),
        _ => gunzip(&again.body),
    };
    assert_eq!(decoded, text);
    compressed(&edge).await;

    let gz = get(&c, &url, &[("accept-encoding", "gzip")]).await;
    assert_eq!((gz.status, gz.x_cache()), (StatusCode::OK, "HIT"), "{:?}", gz.headers);
    assert_eq!(gz.header("content-encoding"), "gzip");
    assert_eq!(gz.header("content-length"), gz.body.len().to_string());
    assert!(gz.body.len() < text.len() / 4, "gzip: {} of {}", gz.body.len(), text.len());
    assert_eq!(gunzip(&gz.body), text);
    assert_eq!(gz.header("etag"), format!("W/{etag}"), "another representation: a weak tag");
    assert!(vary_has_accept_encoding(&gz));

    let br = get(&c, &url, &[("accept-encoding", "gzip;q=0, br")]).await;
    assert_eq!((br.status, br.x_cache()), (StatusCode::OK, "HIT"));
    assert_eq!(br.header("content-encoding"), "br");
    assert_eq!(unbrotli(&br.body), text);
    assert!(br.body.len() <= gz.body.len());

    for (ae, want) in [(None, ""), (Some("identity"), ""), (Some("br;q=0, gzip;q=0"), "")] {
        let headers: Vec<(&str, &str)> = ae.map(|ae| ("accept-encoding", ae)).into_iter().collect();
        let r = get(&c, &url, &headers).await;
        assert_eq!((r.x_cache(), r.header("content-encoding")), ("HIT", want), "{ae:?}");
        assert_eq!(r.body, text.as_bytes(), "{ae:?}");
        assert_eq!(r.header("etag"), etag, "{ae:?}");
    }

    // Many spellings, three variants: all HITs, nothing more from the origin.
    let spellings = [
        ("gzip, deflate, br, zstd", "br"),
        ("br;q=1.0, gzip;q=0.8, *;q=0.1", "br"),
        ("gzip,deflate", "gzip"),
        ("deflate, gzip;q=1.0, *;q=0.5", "gzip"),
        ("x-gzip", "gzip"),
        ("GZIP", "gzip"),
        ("br;q=0.5, gzip", "gzip"),
        ("*", "br"),
        ("*;q=0", ""),
        ("deflate", ""),
        ("zstd", ""),
        ("gzip;q=0.5, identity", ""),
        ("br, gzip, identity;q=0", "br"),
        ("", ""),
    ];
    for (ae, want) in spellings {
        let r = get(&c, &url, &[("accept-encoding", ae)]).await;
        assert_eq!((r.x_cache(), r.header("content-encoding")), ("HIT", want), "{ae:?}");
        let decoded = match want {
            "gzip" => gunzip(&r.body),
            "br" => unbrotli(&r.body),
            _ => String::from_utf8(r.body.to_vec()).unwrap(),
        };
        assert_eq!(decoded, text, "{ae:?}");
    }
    assert_eq!(origin_requests(&edge), 1.0, "one fill for every encoding");
    assert_eq!(sum_in(&edge.registry, "cdn_compressed_total", &[("encoding", "gzip")]), 1.0);
    assert_eq!(sum_in(&edge.registry, "cdn_compressed_total", &[("encoding", "br")]), 1.0);
    let saved = sum_in(&edge.registry, "cdn_compressed_saved_bytes_total", &[("encoding", "gzip")]);
    assert_eq!(saved, (text.len() - gz.body.len()) as f64);
    edge.stop().await;
}

/// HEAD, ranges, `If-None-Match` and `If-Range` apply to the compressed variant a
/// request selects; a stale variant revalidates with its weak tag and stays one.
#[tokio::test]
async fn ranges_conditionals_and_revalidation_of_a_compressed_variant() {
    let text = page();
    let origin = origin::start_serving(&[("page.html", text.as_bytes())]).await;
    let edge = TestEdge::start(&origin.url(""), |_| {}).await;
    let (c, url) = (client(), edge.url("/page.html"));
    let first = get(&c, &url, &[]).await;
    assert_eq!(first.x_cache(), "MISS");
    let etag = first.header("etag").to_string();
    compressed(&edge).await;
    let gz = get(&c, &url, &[("accept-encoding", "gzip")]).await;
    assert_eq!((gz.x_cache(), gz.header("content-encoding")), ("HIT", "gzip"));
    let len = gz.body.len();

    // HEAD: the variant's headers, no body.
    let head = send(&c, "HEAD", &url, &[("accept-encoding", "gzip")]).await;
    assert_eq!((head.status, head.x_cache()), (StatusCode::OK, "HIT"));
    assert_eq!(head.header("content-encoding"), "gzip");
    assert_eq!(head.header("content-length"), len.to_string());
    assert!(head.body.is_empty());

    // A range is of the selected representation: the gzip bytes.
    let r = get(&c, &url, &[("accept-encoding", "gzip"), ("range", "bytes=0-99")]).await;
    assert_eq!((r.status, r.x_cache()), (StatusCode::PARTIAL_CONTENT, "HIT"));
    assert_eq!(r.header("content-encoding"), "gzip");
    assert_eq!(r.header("content-range"), format!("bytes 0-99/{len}"));
    assert_eq!(r.body, gz.body.slice(0..100));
    let r = get(&c, &url, &[("accept-encoding", "gzip"), ("range", "bytes=-10")]).await;
    assert_eq!(r.header("content-range"), format!("bytes {}-{}/{len}", len - 10, len - 1));
    assert_eq!(r.body, gz.body.slice(len - 10..));
    // Resuming the identity download with If-Range never splices gzip bytes into it:
    // the identity's strong tag does not hold for the gzip variant, so it is whole.
    let r = get(&c, &url, &[("accept-encoding", "gzip"), ("range", "bytes=100-"), ("if-range", &etag)]).await;
    assert_eq!((r.status, r.header("content-encoding")), (StatusCode::OK, "gzip"));
    assert_eq!(gunzip(&r.body), text);
    // The identity variant still resumes with it.
    let r = get(&c, &url, &[("range", "bytes=100-"), ("if-range", &etag)]).await;
    assert_eq!(r.status, StatusCode::PARTIAL_CONTENT);
    assert_eq!(r.body, text.as_bytes()[100..]);

    // If-None-Match compares weakly: the identity's tag and the variant's match.
    for tag in [etag.clone(), format!("W/{etag}")] {
        let r = get(&c, &url, &[("accept-encoding", "br"), ("if-none-match", &tag)]).await;
        assert_eq!((r.status, r.x_cache()), (StatusCode::NOT_MODIFIED, "HIT"), "{tag}");
        assert_eq!(r.header("etag"), format!("W/{etag}"));
        assert!(vary_has_accept_encoding(&r));
        assert!(r.body.is_empty());
    }
    let r = get(&c, &url, &[("accept-encoding", "br"), ("if-none-match", "\"other\"")]).await;
    assert_eq!((r.status, r.header("content-encoding")), (StatusCode::OK, "br"));

    // Stale (max-age=60): the origin answers the weak tag's revalidation with 304, and
    // the variant stays a gzip body with a weak tag.
    edge.clock.advance(Duration::from_secs(61));
    let r = get(&c, &url, &[("accept-encoding", "gzip")]).await;
    assert_eq!((r.status, r.x_cache()), (StatusCode::OK, "REVALIDATED"), "{:?}", r.headers);
    assert_eq!(r.header("content-encoding"), "gzip");
    assert_eq!(r.header("etag"), format!("W/{etag}"));
    assert!(vary_has_accept_encoding(&r));
    assert_eq!(gunzip(&r.body), text);
    // (Not asked again: the origin's Date is 61 s behind the edge's moved clock, so
    // the refreshed copy is already stale here.)
    assert_eq!(origin_requests(&edge), 2.0, "the fill and one revalidation");
    // The identity variant is still there, with its strong tag.
    let r = get(&c, &url, &[]).await;
    assert_eq!((r.header("content-encoding"), r.header("etag")), ("", etag.as_str()));
    edge.stop().await;
}

/// Video, a body the origin encoded, `no-transform` and bodies under the minimum are
/// never compressed; the origin is asked with the coding the client prefers.
#[tokio::test]
async fn media_encoded_no_transform_and_small_bodies_are_left_alone() {
    let origin = MockOrigin::start().await;
    let text = page();
    let pre = Bytes::from(gzip_of(&text));
    origin.route("/v.mp4", Route::ok("max-age=60", text.clone()).header("content-type", "video/mp4"));
    origin.route("/seg.ts", Route::ok("max-age=60", text.clone()).header("content-type", "video/mp2t"));
    origin.route(
        "/app.js",
        Route::ok("max-age=60", pre.clone())
            .header("content-type", "application/javascript")
            .header("content-encoding", "gzip")
            .header("vary", "Accept-Encoding"),
    );
    origin.route("/nt.css", Route::ok("max-age=60, no-transform", text.clone()).header("content-type", "text/css"));
    // 250 bytes that compress well, under the 256-byte minimum.
    let small = format!("[{}0]", "0,".repeat(124));
    origin.route("/small.json", Route::ok("max-age=60", small).header("content-type", "application/json"));
    // A content coding the edge does not know, over text: still never touched.
    origin.route(
        "/deflated.css",
        Route::ok("max-age=60", text.clone()).header("content-type", "text/css").header("content-encoding", "deflate"),
    );
    origin.route(
        "/list.m3u8",
        Route::ok("max-age=60", text.clone()).header("content-type", "application/vnd.apple.mpegurl"),
    );
    let edge = TestEdge::start(&origin.url(), |_| {}).await;
    let c = client();
    for (path, encoding) in
        [("/v.mp4", ""), ("/seg.ts", ""), ("/nt.css", ""), ("/small.json", ""), ("/deflated.css", "deflate")]
    {
        for want in ["MISS", "HIT"] {
            let r = get(&c, &edge.url(path), &[("accept-encoding", "gzip, br")]).await;
            assert_eq!((r.status, r.x_cache()), (StatusCode::OK, want), "{path}");
            assert_eq!(r.header("content-encoding"), encoding, "{path}");
            assert!(r.body.len() >= 250, "{path}: the origin's body");
            assert!(!vary_has_accept_encoding(&r), "{path}: {:?}", r.headers);
        }
        assert_eq!(origin.hits(path), 1, "{path}");
        assert_eq!(sum_in(&edge.registry, "cdn_compressed_total", &[]), 0.0, "{path}");
    }
    // The origin was asked for the one coding the client prefers.
    assert_eq!(origin.last_headers("/v.mp4")["accept-encoding"], "br");

    // Already gzip: stored as the origin sent it, for the gzip variant only.
    for want in ["MISS", "HIT"] {
        let r = get(&c, &edge.url("/app.js"), &[("accept-encoding", "gzip, deflate")]).await;
        assert_eq!((r.x_cache(), r.header("content-encoding")), (want, "gzip"));
        assert_eq!(r.body, pre, "the origin's bytes, untouched");
    }
    assert_eq!(origin.last_headers("/app.js")["accept-encoding"], "gzip");
    assert_eq!(sum_in(&edge.registry, "cdn_compressed_total", &[]), 0.0);

    // A playlist is text: compressed.
    let url = edge.url("/list.m3u8");
    assert_eq!(get(&c, &url, &[("accept-encoding", "br")]).await.x_cache(), "MISS");
    compressed(&edge).await;
    let r = get(&c, &url, &[("accept-encoding", "br")]).await;
    assert_eq!((r.x_cache(), r.header("content-encoding")), ("HIT", "br"));
    assert_eq!(unbrotli(&r.body), text);
    edge.stop().await;
}

/// Concurrent misses in every encoding share one fill: one origin request, one
/// compression per encoding; then each encoding is a HIT.
#[tokio::test]
async fn concurrent_misses_compress_once() {
    let origin = MockOrigin::start().await;
    let text = page();
    origin.route(
        "/slow.css",
        Route::ok("max-age=60", text.clone()).header("content-type", "text/css").delay(Duration::from_millis(300)),
    );
    let edge = TestEdge::start(&origin.url(), |_| {}).await;
    let c = client();
    let url = edge.url("/slow.css");
    let encodings = ["gzip", "br", "identity", "gzip, br", "br;q=0.1, gzip", "*"];
    let replies = futures_util::future::join_all((0..12).map(|i| {
        let (c, url) = (c.clone(), url.clone());
        async move { get(&c, &url, &[("accept-encoding", encodings[i % encodings.len()])]).await }
    }))
    .await;
    for r in &replies {
        assert_eq!((r.status, r.header("content-encoding")), (StatusCode::OK, ""), "{:?}", r.headers);
        assert_eq!(r.body, text.as_bytes());
    }
    compressed(&edge).await;
    for (ae, want) in [("gzip", "gzip"), ("br", "br"), ("identity", "")] {
        let r = get(&c, &url, &[("accept-encoding", ae)]).await;
        assert_eq!((r.x_cache(), r.header("content-encoding")), ("HIT", want), "{ae}");
    }
    assert_eq!(origin.hits("/slow.css"), 1);
    assert_eq!(sum_in(&edge.registry, "cdn_compressed_total", &[]), 2.0, "gzip and br, once each");
    edge.stop().await;
}

/// `[cache] compress = false`: text is stored and served as the origin sent it.
#[tokio::test]
async fn compression_can_be_turned_off() {
    let origin = MockOrigin::start().await;
    let text = page();
    origin.route("/p.html", Route::ok("max-age=60", text.clone()).header("content-type", "text/html"));
    let edge = TestEdge::start(&origin.url(), |config| config.cache.compress = false).await;
    let c = client();
    for want in ["MISS", "HIT"] {
        let r = get(&c, &edge.url("/p.html"), &[("accept-encoding", "gzip, br")]).await;
        assert_eq!((r.x_cache(), r.header("content-encoding")), (want, ""));
        assert_eq!(r.body, text.as_bytes());
    }
    edge.stop().await;
}

fn gzip_of(text: &str) -> Vec<u8> {
    use std::io::Write as _;
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    encoder.write_all(text.as_bytes()).unwrap();
    encoder.finish().unwrap()
}
