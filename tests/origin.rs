//! The origin role end to end: a real `cdn_origin::Origin` on loopback, driven by
//! hyper (HTTP/1.1 and h2c) and by curl.

use std::time::{Duration, Instant};

use cdn_test_support::{
    client::{client, get, h2c_client, send},
    curl::curl,
    multipart::{parse_content_range, parse_http_date, parse_multipart},
    origin::{self, SAMPLE_LEN, sample_bytes},
};
use http::{Method, StatusCode, Version};

#[tokio::test]
async fn serves_files_with_validators_and_policy() {
    let origin = origin::start_with(|config| {
        config.rules.push(cdn_origin::Rule {
            path_prefix: "/v/".into(),
            cache_control: Some("public, max-age=86400".into()),
            surrogate_keys: vec!["video".into(), "sample".into()],
        });
    })
    .await;
    let http = client();

    let r = get(&http, &origin.url("/hello.txt?cache=bust"), &[]).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(&r.body[..], b"hello, world\n");
    assert_eq!(r.header("content-type"), "text/plain; charset=utf-8");
    assert_eq!(r.header("content-length"), "13");
    assert_eq!(r.header("accept-ranges"), "bytes");
    assert_eq!(r.header("cache-control"), "public, max-age=60");
    assert_eq!(r.header("surrogate-key"), "");
    assert_eq!(r.header("access-control-allow-origin"), "*");
    assert!(r.header("access-control-expose-headers").contains("X-Served-By"));
    let etag = r.header("etag");
    assert!(etag.starts_with('"') && etag.ends_with('"') && etag.len() > 2, "strong etag: {etag}");
    let modified = parse_http_date(r.header("last-modified")).expect("Last-Modified is an HTTP date");
    let on_disk = std::fs::metadata(origin.root.join("hello.txt")).unwrap().modified().unwrap();
    assert!(on_disk.duration_since(modified).unwrap() < Duration::from_secs(1));
    parse_http_date(r.header("date")).expect("Date is an HTTP date");

    let r = get(&http, &origin.url("/v/sample.mp4"), &[]).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.header("content-type"), "video/mp4");
    assert_eq!(r.header("cache-control"), "public, max-age=86400");
    assert_eq!(r.header("surrogate-key"), "video sample");
    assert_eq!(r.body, sample_bytes(SAMPLE_LEN));

    let r = get(&http, &origin.url("/data.json"), &[]).await;
    assert_eq!(r.header("content-type"), "application/json");
    let r = get(&http, &origin.url("/"), &[]).await;
    assert_eq!((r.status, r.header("content-type")), (StatusCode::OK, "text/html; charset=utf-8"));
    assert!(std::str::from_utf8(&r.body).unwrap().contains("<h1>home</h1>"));
    let r = get(&http, &origin.url("/v/"), &[]).await;
    assert_eq!(&r.body[..], b"<h1>videos</h1>\n");
    assert_eq!(r.header("surrogate-key"), "video sample");
    for missing in ["/nope.txt", "/dir/", "/hello.txt/"] {
        let r = get(&http, &origin.url(missing), &[]).await;
        assert_eq!(r.status, StatusCode::NOT_FOUND, "{missing}");
        assert_eq!(r.header("access-control-allow-origin"), "*");
    }
    origin.stop().await.unwrap();
}

#[tokio::test]
async fn conditional_requests() {
    let origin = origin::start_with_content().await;
    let http = client();
    let url = origin.url("/v/sample.mp4");
    let first = get(&http, &url, &[]).await;
    let etag = first.header("etag").to_owned();
    let modified = first.header("last-modified").to_owned();

    let r = get(&http, &url, &[("if-none-match", &etag)]).await;
    assert_eq!(r.status, StatusCode::NOT_MODIFIED);
    assert!(r.body.is_empty());
    assert_eq!(r.header("etag"), etag);
    assert_eq!(r.header("last-modified"), modified);
    assert_eq!(r.header("cache-control"), "public, max-age=60");
    assert!(!r.header("date").is_empty());
    let r = get(&http, &url, &[("if-none-match", &format!("\"nope\", W/{etag}"))]).await;
    assert_eq!(r.status, StatusCode::NOT_MODIFIED, "weak comparison");
    let r = get(&http, &url, &[("if-none-match", "*")]).await;
    assert_eq!(r.status, StatusCode::NOT_MODIFIED);
    let r = get(&http, &url, &[("if-none-match", "\"other\"")]).await;
    assert_eq!((r.status, r.body.len()), (StatusCode::OK, SAMPLE_LEN));
    let r = get(&http, &url, &[("if-modified-since", &modified)]).await;
    assert_eq!(r.status, StatusCode::NOT_MODIFIED);
    let r = get(&http, &url, &[("if-modified-since", "Sat, 01 Jan 2000 00:00:00 GMT")]).await;
    assert_eq!(r.status, StatusCode::OK);

    let r = get(&http, &url, &[("if-match", "\"other\"")]).await;
    assert_eq!(r.status, StatusCode::PRECONDITION_FAILED);
    let r = get(&http, &url, &[("if-match", &etag)]).await;
    assert_eq!(r.status, StatusCode::OK);
    let r = get(&http, &url, &[("if-unmodified-since", "Sat, 01 Jan 2000 00:00:00 GMT")]).await;
    assert_eq!(r.status, StatusCode::PRECONDITION_FAILED);

    // curl agrees.
    let c = curl(&["-H", &format!("If-None-Match: {etag}"), &url]).await;
    assert_eq!(c.status, 304, "{c:?}");
    let c = curl(&["-H", "If-Match: \"other\"", &url]).await;
    assert_eq!(c.status, 412, "{c:?}");

    // A changed file gets a new ETag; the old one no longer matches.
    std::fs::write(origin.root.join("v/sample.mp4"), b"changed").unwrap();
    let r = get(&http, &url, &[("if-none-match", &etag)]).await;
    assert_eq!((r.status, &r.body[..]), (StatusCode::OK, &b"changed"[..]));
    assert_ne!(r.header("etag"), etag);
    origin.stop().await.unwrap();
}

#[tokio::test]
async fn byte_ranges() {
    let origin = origin::start_with_content().await;
    let http = client();
    let url = origin.url("/v/sample.mp4");
    let all = sample_bytes(SAMPLE_LEN);
    let len = SAMPLE_LEN as u64;

    for (spec, start, end) in
        [("bytes=0-99", 0, 100), ("bytes=-100", SAMPLE_LEN - 100, SAMPLE_LEN), ("bytes=100-", 100, SAMPLE_LEN)]
    {
        let r = get(&http, &url, &[("range", spec)]).await;
        assert_eq!(r.status, StatusCode::PARTIAL_CONTENT, "{spec}");
        assert_eq!(r.header("content-range"), format!("bytes {}-{}/{len}", start, end - 1), "{spec}");
        assert_eq!(r.header("content-length"), (end - start).to_string(), "{spec}");
        assert_eq!(r.header("content-type"), "video/mp4");
        assert_eq!(r.body, all[start..end], "{spec}");

        let c = curl(&["-r", spec.trim_start_matches("bytes="), &url]).await;
        assert_eq!(c.status, 206, "{c:?}");
        assert_eq!(c.body, all[start..end], "curl {spec}");
    }

    // Two ranges: multipart/byteranges with an exact Content-Length.
    let r = get(&http, &url, &[("range", "bytes=0-9, 200000-200099")]).await;
    assert_eq!(r.status, StatusCode::PARTIAL_CONTENT);
    assert_eq!(r.header("content-length"), r.body.len().to_string());
    let content_type = r.header("content-type");
    assert!(content_type.starts_with("multipart/byteranges; boundary="), "{content_type}");
    let parts = parse_multipart(content_type, &r.body);
    assert_eq!(parts.len(), 2);
    for (part, range) in parts.iter().zip([0..10u64, 200_000..200_100]) {
        assert_eq!(part.range, range);
        assert_eq!(part.complete_length, len);
        assert_eq!(part.content_type.as_deref(), Some("video/mp4"));
        assert_eq!(part.body, all[range.start as usize..range.end as usize]);
    }
    let c = curl(&["-r", "0-9,200000-200099", &url]).await;
    assert_eq!(c.status, 206);
    assert_eq!(parse_multipart(c.header("content-type"), &c.body), parts);

    // Past the end: 416 with the length.
    let r = get(&http, &url, &[("range", &format!("bytes={len}-"))]).await;
    assert_eq!(r.status, StatusCode::RANGE_NOT_SATISFIABLE);
    assert_eq!(r.header("content-range"), format!("bytes */{len}"));
    let c = curl(&["-r", "999999999-", &url]).await;
    assert_eq!((c.status, c.header("content-range")), (416, format!("bytes */{len}").as_str()));

    // If-Range: the current validator applies the range, a stale one sends everything.
    let full = get(&http, &url, &[]).await;
    let etag = full.header("etag").to_owned();
    let modified = full.header("last-modified").to_owned();
    for validator in [&etag, &modified] {
        let r = get(&http, &url, &[("range", "bytes=5-9"), ("if-range", validator)]).await;
        assert_eq!((r.status, &r.body[..]), (StatusCode::PARTIAL_CONTENT, &all[5..10]), "{validator}");
    }
    for stale in ["\"stale\"", "W/\"weak\"", "Sat, 01 Jan 2000 00:00:00 GMT"] {
        let r = get(&http, &url, &[("range", "bytes=5-9"), ("if-range", stale)]).await;
        assert_eq!((r.status, r.body.len()), (StatusCode::OK, SAMPLE_LEN), "{stale}");
    }
    let c = curl(&["-r", "5-9", "-H", "If-Range: \"stale\"", &url]).await;
    assert_eq!((c.status, c.body.len()), (200, SAMPLE_LEN));

    // Range on HEAD is ignored; a syntactically bad Range is ignored.
    let r = send(&http, Method::HEAD, &url, &[("range", "bytes=0-1")]).await;
    assert_eq!((r.status, r.header("content-length")), (StatusCode::OK, SAMPLE_LEN.to_string().as_str()));
    let r = get(&http, &url, &[("range", "bytes=9-1")]).await;
    assert_eq!(r.status, StatusCode::OK);
    origin.stop().await.unwrap();
}

#[tokio::test]
async fn path_traversal_is_refused() {
    let outside = tempfile::tempdir().unwrap();
    std::fs::write(outside.path().join("secret.txt"), "secret").unwrap();
    let origin = origin::start_with_content().await;
    std::os::unix::fs::symlink(outside.path().join("secret.txt"), origin.root.join("leak.txt")).unwrap();
    std::os::unix::fs::symlink(outside.path(), origin.root.join("leakdir")).unwrap();
    std::os::unix::fs::symlink(origin.root.join("hello.txt"), origin.root.join("alias.txt")).unwrap();

    let attempts = [
        "/../etc/passwd",
        "/v/../../etc/passwd",
        "/%2e%2e/etc/passwd",
        "/%2E%2e/%2e%2E/etc/passwd",
        "/..%2f..%2fetc%2fpasswd",
        "/v/..%5c..%5cetc%5cpasswd",
        "/hello.txt%00.html",
        "/leak.txt",
        "/leakdir/secret.txt",
    ];
    let http = client();
    for path in attempts {
        let r = get(&http, &origin.url(path), &[]).await;
        assert_eq!(r.status, StatusCode::NOT_FOUND, "hyper {path}");
        assert!(!r.body.windows(6).any(|w| w == b"secret" || w == b"root:x"), "{path}");
        let c = curl(&["--path-as-is", &origin.url(path)]).await;
        assert_eq!(c.status, 404, "curl {path}: {c:?}");
    }
    let r = get(&http, &origin.url("/%ff%fe"), &[]).await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    // A symlink that stays inside the root is served.
    let r = get(&http, &origin.url("/alias.txt"), &[]).await;
    assert_eq!((r.status, &r.body[..]), (StatusCode::OK, &b"hello, world\n"[..]));
    origin.stop().await.unwrap();
}

#[tokio::test]
async fn head_options_and_other_methods() {
    let origin = origin::start_with_content().await;
    let http = client();
    let url = origin.url("/v/sample.mp4");

    let r = send(&http, Method::HEAD, &url, &[]).await;
    assert_eq!(r.status, StatusCode::OK);
    assert!(r.body.is_empty());
    assert_eq!(r.header("content-length"), SAMPLE_LEN.to_string());
    assert_eq!(r.header("content-type"), "video/mp4");
    assert!(!r.header("etag").is_empty());
    let c = curl(&["-I", &url]).await;
    assert_eq!((c.status, c.header("content-length")), (200, SAMPLE_LEN.to_string().as_str()));
    // With -I curl writes the headers where the body would go: nothing else came.
    assert!(c.body.starts_with(b"HTTP/1.1 200") && c.body.len() < 2000, "{c:?}");

    let r = send(
        &http,
        Method::OPTIONS,
        &url,
        &[
            ("origin", "https://player.example"),
            ("access-control-request-method", "GET"),
            ("access-control-request-headers", "range"),
        ],
    )
    .await;
    assert_eq!(r.status, StatusCode::NO_CONTENT);
    assert_eq!(r.header("access-control-allow-origin"), "*");
    assert!(r.header("access-control-allow-methods").contains("GET"));
    let allowed = r.header("access-control-allow-headers").to_ascii_lowercase();
    for name in ["range", "if-none-match", "if-modified-since", "if-range"] {
        assert!(allowed.contains(name), "{name} in {allowed}");
    }
    assert_eq!(r.header("access-control-max-age"), "86400");

    for method in ["POST", "PUT", "DELETE"] {
        let c = curl(&["-X", method, &url]).await;
        assert_eq!(c.status, 405, "{method}");
        assert_eq!(c.header("allow"), "GET, HEAD, OPTIONS");
    }
    // The file is untouched.
    assert_eq!(get(&http, &url, &[]).await.body.len(), SAMPLE_LEN);
    origin.stop().await.unwrap();
}

#[tokio::test]
async fn http2_with_prior_knowledge() {
    let origin = origin::start_with_content().await;
    let url = origin.url("/v/sample.mp4");
    let c = curl(&["--http2-prior-knowledge", &url]).await;
    assert_eq!((c.status, c.version.as_str()), (200, "2"), "{c:?}");
    assert_eq!(c.body, sample_bytes(SAMPLE_LEN));
    let c = curl(&["--http2-prior-knowledge", "-r", "10-19", &url]).await;
    assert_eq!((c.status, c.version.as_str()), (206, "2"));
    assert_eq!(c.body, sample_bytes(SAMPLE_LEN)[10..20]);
    let c = curl(&["--http2-prior-knowledge", "-I", &url]).await;
    assert_eq!((c.status, c.header("content-length")), (200, SAMPLE_LEN.to_string().as_str()));

    let h2 = h2c_client();
    let r = get(&h2, &url, &[("range", "bytes=-5")]).await;
    assert_eq!((r.status, r.version), (StatusCode::PARTIAL_CONTENT, Version::HTTP_2));
    assert_eq!(r.body, sample_bytes(SAMPLE_LEN)[SAMPLE_LEN - 5..]);
    let r = get(&h2, &origin.url("/_gen/1000000"), &[]).await;
    assert_eq!(r.body, cdn_origin::generate::content(0..1_000_000, 0));
    origin.stop().await.unwrap();
}

#[tokio::test]
async fn https_with_alpn() {
    let origin = origin::start_with(|config| {
        config.listen.https = Some("127.0.0.1:0".parse().unwrap());
        config.tls = Some(cdn_node::tls::TlsConfig { self_signed: true, ..Default::default() });
    })
    .await;
    let c = curl(&["-k", "--http2", &origin.https_url("/hello.txt")]).await;
    assert_eq!((c.status, c.version.as_str()), (200, "2"), "{c:?}");
    assert_eq!(c.body, b"hello, world\n");
    let c = curl(&["-k", "--http1.1", &origin.https_url("/hello.txt")]).await;
    assert_eq!((c.status, c.version.as_str()), (200, "1.1"), "{c:?}");
    origin.stop().await.unwrap();
}

#[tokio::test]
async fn generated_objects() {
    let origin = origin::start_with_content().await;
    let http = client();
    let r = get(&http, &origin.url("/_gen/1000000"), &[]).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.header("content-length"), "1000000");
    assert_eq!(r.header("content-type"), "application/octet-stream");
    assert_eq!(r.header("etag"), "\"gen-1000000-0\"");
    assert_eq!(r.body, cdn_origin::generate::content(0..1_000_000, 0));
    assert!(r.body.iter().enumerate().take(5000).all(|(i, b)| *b == cdn_origin::generate::byte_at(i as u64, 0)));

    // Another seed: other bytes, another ETag, and the old validator no longer matches.
    let r = get(&http, &origin.url("/_gen/1MiB?v=7"), &[("if-none-match", "\"gen-1048576-0\"")]).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.header("etag"), "\"gen-1048576-7\"");
    assert_eq!(r.body, cdn_origin::generate::content(0..1_048_576, 7));
    let r = get(&http, &origin.url("/_gen/1MiB?v=7"), &[("if-none-match", "\"gen-1048576-7\"")]).await;
    assert_eq!(r.status, StatusCode::NOT_MODIFIED);

    let r = get(&http, &origin.url("/_gen/10GiB"), &[("range", "bytes=5000000000-5000000099")]).await;
    assert_eq!(r.status, StatusCode::PARTIAL_CONTENT);
    let (range, complete) = parse_content_range(r.header("content-range")).unwrap();
    assert_eq!((range.clone(), complete), (5_000_000_000..5_000_000_100, 10 << 30));
    assert_eq!(r.body, cdn_origin::generate::content(range, 0));
    let c = curl(&["-r", "0-9,100-109", &origin.url("/_gen/1000")]).await;
    let parts = parse_multipart(c.header("content-type"), &c.body);
    assert_eq!(parts[1].body, cdn_origin::generate::content(100..110, 0));

    // rate= trickles the body.
    let start = Instant::now();
    let r = get(&http, &origin.url("/_gen/30000?rate=100000"), &[]).await;
    assert_eq!(r.body.len(), 30_000);
    assert!(start.elapsed() >= Duration::from_millis(200), "{:?}", start.elapsed());

    for (path, status) in [("/_gen/abc", 404), ("/_gen/1/2", 404), ("/_gen/65GiB", 400), ("/_gen/1?rate=0", 400)] {
        assert_eq!(get(&http, &origin.url(path), &[]).await.status.as_u16(), status, "{path}");
    }
    origin.stop().await.unwrap();

    let off = origin::start_with(|config| config.generate = false).await;
    let r = get(&client(), &off.url("/_gen/1000000"), &[]).await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    off.stop().await.unwrap();
}

#[tokio::test]
async fn admin_shows_metrics() {
    let origin = origin::start_with_content().await;
    let http = client();
    get(&http, &origin.url("/hello.txt"), &[]).await;
    get(&http, &origin.url("/hello.txt"), &[]).await;
    get(&http, &origin.url("/missing"), &[]).await;
    let r = get(&http, &origin.admin_url("/metrics"), &[]).await;
    assert_eq!(r.status, StatusCode::OK);
    let text = String::from_utf8(r.body.to_vec()).unwrap();
    for line in [
        "cdn_origin_responses_total{status=\"2xx\"} 2",
        "cdn_origin_responses_total{status=\"4xx\"} 1",
        "cdn_origin_responses_total{status=\"5xx\"} 0",
        "cdn_response_bytes_total 36",
        "cdn_request_duration_seconds_count 3",
    ] {
        assert!(text.lines().any(|l| l == line), "{line:?} not in\n{text}");
    }
    assert_eq!(get(&http, &origin.admin_url("/healthz"), &[]).await.status, StatusCode::OK);
    assert_eq!(get(&http, &origin.admin_url("/readyz"), &[]).await.status, StatusCode::OK);
    // The same numbers are in the registry the test passed in.
    let families = origin.registry.gather();
    assert!(families.iter().any(|f| f.name() == "cdn_origin_responses_total"));
    origin.stop().await.unwrap();
}

#[tokio::test]
async fn cancelling_the_token_stops_serve() {
    let origin = origin::start_with_content().await;
    let url = origin.url("/hello.txt");
    let admin = origin.admin_url("/healthz");
    // Keep-alive connections open on both protocols.
    let h1 = client();
    let h2 = h2c_client();
    assert_eq!(get(&h1, &url, &[]).await.status, StatusCode::OK);
    assert_eq!(get(&h2, &url, &[]).await.status, StatusCode::OK);
    let start = Instant::now();
    origin.stop_within(Duration::from_secs(5)).await.unwrap();
    assert!(start.elapsed() < Duration::from_secs(5));
    let c = curl(&["--max-time", "2", &url]).await;
    assert_eq!(c.status, 0, "nothing listens any more: {c:?}");
    let c = curl(&["--max-time", "2", &admin]).await;
    assert_eq!(c.status, 0, "admin stopped too: {c:?}");
}

#[tokio::test]
async fn bind_rejects_a_bad_config() {
    let mut config = origin::config(std::path::Path::new("/definitely/not/here"));
    config.rules.push(cdn_origin::Rule { path_prefix: "nope".into(), cache_control: None, surrogate_keys: vec![] });
    let error = cdn_origin::Origin::bind(config, &prometheus::Registry::new()).await.unwrap_err().to_string();
    assert!(error.contains("root: directory /definitely/not/here does not exist"), "{error}");
    assert!(error.contains("rules[0].path_prefix"), "{error}");
}

#[tokio::test]
async fn the_example_config_serves_the_demo_content() {
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/examples/origin.toml")).unwrap();
    let mut config: cdn_origin::Config = toml::from_str(&text).unwrap();
    config.root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(&config.root);
    config.validate().unwrap();
    assert!(config.generate);
    config.listen.http = "127.0.0.1:0".parse().unwrap();
    config.listen.admin = Some("127.0.0.1:0".parse().unwrap());
    let origin = origin::start(config).await;
    let http = client();

    let r = get(&http, &origin.url("/"), &[]).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.header("content-type"), "text/html; charset=utf-8");
    assert_eq!(r.header("cache-control"), "public, max-age=10, stale-while-revalidate=30");
    let page = String::from_utf8(r.body.to_vec()).unwrap();
    for reference in ["v/demo.webm", "v/demo.mp4", "hello.txt", "info.json"] {
        assert!(page.contains(&format!("\"{reference}\"")), "{reference}");
        let r = send(&http, Method::HEAD, &origin.url(&format!("/{reference}")), &[]).await;
        assert_eq!(r.status, StatusCode::OK, "{reference}");
    }
    assert!(!page.contains("<script src"), "self-contained page");
    let r = get(&http, &origin.url("/v/demo.webm"), &[("range", "bytes=0-3")]).await;
    assert_eq!((r.status, &r.body[..]), (StatusCode::PARTIAL_CONTENT, &[0x1a, 0x45, 0xdf, 0xa3][..]), "EBML magic");
    assert_eq!(r.header("content-type"), "video/webm");
    assert_eq!(r.header("cache-control"), "public, max-age=86400");
    assert_eq!(r.header("surrogate-key"), "video demo");
    let r = get(&http, &origin.url("/v/demo.mp4"), &[("range", "bytes=4-7")]).await;
    assert_eq!((&r.body[..], r.header("content-type")), (&b"ftyp"[..], "video/mp4"));
    let r = get(&http, &origin.url("/info.json"), &[]).await;
    assert_eq!((r.header("content-type"), r.header("cache-control")), ("application/json", "public, max-age=60"));
    origin.stop().await.unwrap();
}
