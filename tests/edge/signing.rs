//! Signed URLs (RFC 9246) on a standalone edge (`[origin] signed`): tokens made here
//! with ring's HMAC and base64 (not the edge's JWT crate), fetched with real
//! HTTP/1.1 and HTTP/2 clients.

use std::time::{SystemTime, UNIX_EPOCH};

use base64::{Engine as _, engine::general_purpose::URL_SAFE_NO_PAD};
use bytes::Bytes;
use cdn_cluster::routing::Signed;
use cdn_edge::signing::SigningKey;
use cdn_test_support::{
    client::{client, get, tls_client},
    edge::{TestEdge, start_tls_edge},
    mock_origin::{MockOrigin, Route},
};
use http::StatusCode;
use http_body_util::{BodyExt as _, Empty};
use serde_json::{Value, json};

const K1: &[u8] = b"k1-secret-0123456789-abcdefghijkl";
const K2: &[u8] = b"k2-secret-0123456789-mnopqrstuvwx";

/// A compact HS256 JWS with `kid`, made by hand.
fn sign(kid: &str, secret: &[u8], claims: &Value) -> String {
    let header = json!({"alg": "HS256", "typ": "JWT", "kid": kid});
    let input =
        format!("{}.{}", URL_SAFE_NO_PAD.encode(header.to_string()), URL_SAFE_NO_PAD.encode(claims.to_string()));
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret);
    format!("{input}.{}", URL_SAFE_NO_PAD.encode(ring::hmac::sign(&key, input.as_bytes())))
}

fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs()
}

/// Valid for five minutes.
fn fresh() -> Value {
    json!({"exp": now() + 300})
}

fn sha256(uri: &str) -> String {
    URL_SAFE_NO_PAD.encode(ring::digest::digest(&ring::digest::SHA256, uri.as_bytes()))
}

/// A standalone edge whose `/paid/` paths need a token of `k1` or `k2`.
async fn signing_edge(origin: &MockOrigin) -> TestEdge {
    signing_edge_logged(origin, None).await
}

/// The same, with its access log in `log`.
async fn signing_edge_logged(origin: &MockOrigin, log: Option<&std::path::Path>) -> TestEdge {
    TestEdge::start(&origin.url(), |c| {
        c.access_log = log.map(cdn_edge::access_log::Settings::new);
        c.signing.keys = vec![SigningKey::hs256("k1", K1).unwrap(), SigningKey::hs256("k2", K2).unwrap()];
        c.origin.as_mut().unwrap().signed =
            Some(Signed { path_prefix: "/paid/".into(), keys: vec!["k1".into(), "k2".into()] });
    })
    .await
}

fn with(path: &str, token: &str) -> String {
    let join = if path.contains('?') { '&' } else { '?' };
    format!("{path}{join}URISigningPackage={token}")
}

#[tokio::test]
async fn a_signed_url_is_served_and_cached_once_for_every_token() {
    let origin = MockOrigin::start().await;
    origin.route("/paid/movie.mp4", Route::ok("public, max-age=600", "the movie"));
    origin.route("/free/trailer.mp4", Route::ok("public, max-age=600", "the trailer"));
    let edge = signing_edge(&origin).await;
    let c = client();
    let first = get(&c, &edge.url(&with("/paid/movie.mp4", &sign("k1", K1, &fresh()))), &[]).await;
    assert_eq!((first.status, first.x_cache(), &first.body[..]), (StatusCode::OK, "MISS", &b"the movie"[..]));
    // The same URL again; then another token (another exp, the other key of the
    // rotation) for the same path: one cached object.
    let again = get(&c, &edge.url(&with("/paid/movie.mp4", &sign("k1", K1, &fresh()))), &[]).await;
    assert_eq!((again.status, again.x_cache()), (StatusCode::OK, "HIT"));
    let later = json!({"exp": now() + 3600, "cdniv": 1});
    let other = get(&c, &edge.url(&with("/paid/movie.mp4", &sign("k2", K2, &later))), &[]).await;
    assert_eq!((other.status, other.x_cache(), &other.body[..]), (StatusCode::OK, "HIT", &b"the movie"[..]));
    // Other query parameters stay in the key and go to the origin.
    let versioned = with("/paid/movie.mp4?v=2", &sign("k2", K2, &fresh()));
    assert_eq!(get(&c, &edge.url(&versioned), &[]).await.x_cache(), "MISS");
    // Paths outside the prefix need nothing.
    assert_eq!(get(&c, &edge.url("/free/trailer.mp4"), &[]).await.status, StatusCode::OK);
    // The origin saw each object once, and never a package.
    assert_eq!(origin.hits("/paid/movie.mp4"), 1);
    assert_eq!(origin.hits("/paid/movie.mp4?v=2"), 1);
    let seen = origin.requests();
    assert!(seen.iter().all(|(path, _)| !path.contains("URISigningPackage") && !path.contains("eyJ")), "{seen:?}");
    let headers = origin.last_headers("/paid/movie.mp4");
    assert!(headers.iter().all(|(_, v)| !v.to_str().unwrap_or("").contains("eyJ")), "{headers:?}");
    assert_eq!(edge.metric("cdn_signing_accepted_total", &[]), 4.0);
    edge.stop().await;
}

#[tokio::test]
async fn bad_tokens_are_refused_before_the_cache_and_the_origin() {
    let origin = MockOrigin::start().await;
    origin.route("/paid/movie.mp4", Route::ok("public, max-age=600", "the movie"));
    let logs = tempfile::tempdir().unwrap();
    let log = logs.path().join("access.log");
    let edge = signing_edge_logged(&origin, Some(&log)).await;
    let c = client();
    // Stored first, so a refusal cannot be an origin's answer.
    let good = sign("k1", K1, &fresh());
    assert_eq!(get(&c, &edge.url(&with("/paid/movie.mp4", &good)), &[]).await.status, StatusCode::OK);
    let (head, rest) = good.split_once('.').unwrap();
    let (_, signature) = rest.split_once('.').unwrap();
    let forever = URL_SAFE_NO_PAD.encode(json!({"exp": now() + 999_999}).to_string());
    let elsewhere = format!("hash:{}", sha256(&format!("http://{}/paid/other.mp4", edge.http)));
    let cases = [
        ("tampered", format!("{head}.{forever}.{signature}"), "bad_signature"),
        ("expired", sign("k1", K1, &json!({"exp": now() - 10})), "expired"),
        ("unknown kid", sign("k9", K1, &fresh()), "unknown_key"),
        ("right kid, wrong secret", sign("k1", K2, &fresh()), "bad_signature"),
        ("wrong path", sign("k1", K1, &json!({"exp": now() + 300, "cdniuc": elsewhere})), "uri_mismatch"),
        ("not yet valid", sign("k1", K1, &json!({"exp": now() + 300, "nbf": now() + 120})), "not_yet_valid"),
        ("no exp", sign("k1", K1, &json!({"nbf": now() - 10})), "missing_exp"),
        ("renewal", sign("k1", K1, &json!({"exp": now() + 300, "cdnistt": 1, "cdniets": 30})), "renewal_unsupported"),
    ];
    for (what, token, reason) in &cases {
        let before = edge.metric("cdn_signing_rejected_total", &[("reason", reason)]);
        let r = get(&c, &edge.url(&with("/paid/movie.mp4", token)), &[]).await;
        assert_eq!(r.status, StatusCode::FORBIDDEN, "{what}");
        assert_eq!(r.body, "forbidden\n", "{what}: the reason is not in the body");
        assert_eq!(r.header("cache-control"), "no-store", "{what}");
        let after = edge.metric("cdn_signing_rejected_total", &[("reason", reason)]);
        assert_eq!(after - before, 1.0, "{what}: counted as {reason}");
    }
    // No token at all, and a dot-segment way around the prefix.
    for path in ["/paid/movie.mp4", "/free/../paid/movie.mp4"] {
        assert_eq!(get(&c, &edge.url(path), &[]).await.status, StatusCode::FORBIDDEN, "{path}");
    }
    assert_eq!(edge.metric("cdn_signing_rejected_total", &[("reason", "missing")]), 2.0);
    // A token for the path itself still works, and the origin was asked once.
    let here = format!("hash:{}", sha256(&format!("http://{}/paid/movie.mp4", edge.http)));
    let pinned = sign("k2", K2, &json!({"exp": now() + 300, "cdniuc": here}));
    let r = get(&c, &edge.url(&with("/paid/movie.mp4", &pinned)), &[]).await;
    assert_eq!((r.status, r.x_cache()), (StatusCode::OK, "HIT"));
    assert_eq!(origin.hits("/paid/movie.mp4"), 1);
    // The access log says why each refusal happened, and never shows a token.
    let expected = 1 + cases.len() + 2 + 1;
    let lines = cdn_test_support::wait::until(
        "every request in the access log",
        std::time::Duration::from_secs(10),
        std::time::Duration::from_millis(20),
        async || {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            let lines: Vec<Value> = text.lines().map(|line| serde_json::from_str(line).unwrap()).collect();
            (lines.len() >= expected).then_some(lines)
        },
    )
    .await;
    let reasons: Vec<&str> =
        lines.iter().filter(|l| l["status"] == 403).map(|l| l["reason"].as_str().unwrap()).collect();
    let mut wanted: Vec<&str> = cases.iter().map(|(_, _, reason)| *reason).collect();
    wanted.extend(["missing", "missing"]);
    assert_eq!(reasons, wanted, "{lines:?}");
    for line in &lines {
        let path = line["path"].as_str().unwrap();
        assert!(!path.contains(&good) && !path.contains(&pinned), "a token reached the log: {path}");
    }
    edge.stop().await;
}

#[tokio::test]
async fn one_regex_token_covers_every_segment_of_a_stream() {
    let origin = MockOrigin::start().await;
    origin.route("/paid/stream/index.m3u8", Route::ok("max-age=2", "#EXTM3U\n"));
    for n in 1..=5 {
        origin.route(&format!("/paid/stream/seg-{n}.ts"), Route::ok("max-age=600", format!("segment {n}")));
    }
    origin.route("/paid/other/seg-1.ts", Route::ok("max-age=600", "not yours"));
    let edge = signing_edge(&origin).await;
    let c = client();
    let container = r"regex:http://127\.0\.0\.1(:[0-9]+)?/paid/stream/(index\.m3u8|seg-[0-9]+\.ts)";
    let token = sign("k2", K2, &json!({"exp": now() + 300, "cdniv": 1, "cdniuc": container}));
    let playlist = get(&c, &edge.url(&with("/paid/stream/index.m3u8", &token)), &[]).await;
    assert_eq!(playlist.status, StatusCode::OK);
    for n in 1..=5 {
        let r = get(&c, &edge.url(&with(&format!("/paid/stream/seg-{n}.ts"), &token)), &[]).await;
        assert_eq!((r.status, r.body), (StatusCode::OK, Bytes::from(format!("segment {n}"))), "segment {n}");
    }
    // Twice over: the second round is all HITs.
    for n in 1..=5 {
        let r = get(&c, &edge.url(&with(&format!("/paid/stream/seg-{n}.ts"), &token)), &[]).await;
        assert_eq!(r.x_cache(), "HIT", "segment {n}");
    }
    // Not another stream, not a segment name the regex does not allow.
    for path in ["/paid/other/seg-1.ts", "/paid/stream/seg-1.ts.bak", "/paid/stream/seg-x.ts"] {
        let r = get(&c, &edge.url(&with(path, &token)), &[]).await;
        assert_eq!(r.status, StatusCode::FORBIDDEN, "{path}");
    }
    assert_eq!(edge.metric("cdn_signing_rejected_total", &[("reason", "uri_mismatch")]), 3.0);
    assert_eq!(origin.hits("/paid/other/seg-1.ts"), 0);
    edge.stop().await;
}

#[tokio::test]
async fn keys_rotate_and_https_uris_are_signed_as_https() {
    let origin = MockOrigin::start().await;
    origin.route("/paid/a.mp4", Route::ok("max-age=600", "a"));
    origin.route("/paid/b.mp4", Route::ok("max-age=600", "b"));
    // While k1 is replaced by k2, the site accepts both; the edge also has k3,
    // which this site does not accept.
    let edge = start_tls_edge(&origin.url(), |c| {
        c.signing.keys = vec![
            SigningKey::hs256("k1", K1).unwrap(),
            SigningKey::hs256("k2", K2).unwrap(),
            SigningKey::hs256("k3", b"k3-secret-0123456789-yzABCDEFGHIJ").unwrap(),
        ];
        c.origin.as_mut().unwrap().signed =
            Some(Signed { path_prefix: "/paid/".into(), keys: vec!["k1".into(), "k2".into()] });
    })
    .await;
    let port = edge.https.unwrap().port();
    let c = tls_client();
    let fetch = |path: String, token: String| {
        let c = c.clone();
        async move {
            let url = format!("https://localhost:{port}{}", with(&path, &token));
            let response = c.request(http::Request::get(url).body(Empty::<Bytes>::new()).unwrap()).await.unwrap();
            let status = response.status();
            let x_cache = response.headers().get("x-cache").map(|v| v.to_str().unwrap().to_string());
            let body = response.into_body().collect().await.unwrap().to_bytes();
            (status, x_cache.unwrap_or_default(), body)
        }
    };
    // A hash of the https URI, as a signer that knows the edge's name makes it.
    let a = format!("hash:{}", sha256(&format!("https://localhost:{port}/paid/a.mp4")));
    let (status, _, body) =
        fetch("/paid/a.mp4".into(), sign("k1", K1, &json!({"exp": now() + 300, "cdniuc": a}))).await;
    assert_eq!((status, &body[..]), (StatusCode::OK, &b"a"[..]));
    // The same hash for the http URI does not match over https.
    let plain = format!("hash:{}", sha256(&format!("http://localhost:{port}/paid/a.mp4")));
    let (status, _, _) =
        fetch("/paid/a.mp4".into(), sign("k1", K1, &json!({"exp": now() + 300, "cdniuc": plain}))).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    // Tokens of either key work, and fill one object.
    let (status, x_cache, _) = fetch("/paid/b.mp4".into(), sign("k2", K2, &fresh())).await;
    assert_eq!((status, x_cache.as_str()), (StatusCode::OK, "MISS"));
    let (status, x_cache, _) = fetch("/paid/b.mp4".into(), sign("k1", K1, &fresh())).await;
    assert_eq!((status, x_cache.as_str()), (StatusCode::OK, "HIT"));
    // k3 is the edge's, but not accepted by this site.
    let (status, _, _) = fetch("/paid/b.mp4".into(), sign("k3", b"k3-secret-0123456789-yzABCDEFGHIJ", &fresh())).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert_eq!(edge.metric("cdn_signing_rejected_total", &[("reason", "unknown_key")]), 1.0);
    assert_eq!(origin.hits("/paid/b.mp4"), 1);
    edge.stop().await;
}

/// `cdn sign URL ...`: the signed URL it prints.
fn cdn_sign(args: &[&str]) -> String {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_cdn")).arg("sign").args(args).output().unwrap();
    assert!(out.status.success(), "cdn sign {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

#[tokio::test]
async fn cdn_sign_makes_urls_the_edge_accepts() {
    let origin = MockOrigin::start().await;
    origin.route("/paid/one.mp4", Route::ok("max-age=600", "one"));
    origin.route("/paid/two.mp4", Route::ok("max-age=600", "two"));
    for n in 1..=3 {
        origin.route(&format!("/paid/live/seg-{n}.ts"), Route::ok("max-age=600", format!("seg {n}")));
    }
    let edge = signing_edge(&origin).await;
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("k1");
    std::fs::write(&secret, format!("base64:{}\n", base64::engine::general_purpose::STANDARD.encode(K1))).unwrap();
    let secret = secret.to_str().unwrap();
    let c = client();
    // One URL (hash:): it works, and its token does not open another path.
    let one = cdn_sign(&[&edge.url("/paid/one.mp4"), "--key-id", "k1", "--secret-file", secret]);
    assert!(one.contains("?URISigningPackage=ey"), "{one}");
    assert_eq!(get(&c, &one, &[]).await.body, "one");
    let two = one.replace("/paid/one.mp4", "/paid/two.mp4");
    assert_eq!(get(&c, &two, &[]).await.status, StatusCode::FORBIDDEN);
    assert_eq!(edge.metric("cdn_signing_rejected_total", &[("reason", "uri_mismatch")]), 1.0);
    // A stream (regex:): one token for every segment.
    let regex = format!(r"http://127\.0\.0\.1:{}/paid/live/seg-[0-9]+\.ts", edge.http.port());
    let live =
        cdn_sign(&[&edge.url("/paid/live/seg-1.ts"), "--key-id", "k1", "--secret-file", secret, "--regex", &regex]);
    for n in 1..=3 {
        let r = get(&c, &live.replace("seg-1.ts", &format!("seg-{n}.ts")), &[]).await;
        assert_eq!((r.status, r.body), (StatusCode::OK, Bytes::from(format!("seg {n}"))), "segment {n}");
    }
    // Expired at once.
    let gone = cdn_sign(&[&edge.url("/paid/one.mp4"), "--key-id", "k1", "--secret-file", secret, "--expires", "0s"]);
    assert_eq!(get(&c, &gone, &[]).await.status, StatusCode::FORBIDDEN);
    assert_eq!(edge.metric("cdn_signing_rejected_total", &[("reason", "expired")]), 1.0);
    // A key of the wrong id is refused by the edge, a short secret by cdn sign.
    let k9 = cdn_sign(&[&edge.url("/paid/one.mp4"), "--key-id", "k9", "--secret-file", secret]);
    assert_eq!(get(&c, &k9, &[]).await.status, StatusCode::FORBIDDEN);
    std::fs::write(dir.path().join("short"), "too short").unwrap();
    let short = dir.path().join("short");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_cdn"))
        .args(["sign", &edge.url("/paid/one.mp4"), "--key-id", "k1", "--secret-file", short.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("at least 32"), "{}", String::from_utf8_lossy(&out.stderr));
    edge.stop().await;
}
