//! Client conditionals answered from the cache (RFC 9110 §13): entity-tag lists
//! whose tags contain commas, and `If-Match` / `If-Unmodified-Since` on a HIT, with
//! a real edge in front of a real origin (and the mock origin where the stored ETag
//! itself must contain a comma).

use http::StatusCode;

use cdn_test_support::{
    client::{Reply, client, get, send},
    edge::TestEdge,
    mock_origin::{MockOrigin, Route},
    origin::{self, TestOrigin},
};

const BODY: &str = "conditional requests, answered by the edge\n";

/// Caches `/doc.txt` at the edge; returns the edge and the origin's 200.
async fn cached_doc(origin: &TestOrigin) -> (TestEdge, Reply) {
    let edge = TestEdge::start(&origin.url(""), |_| {}).await;
    let first = get(&client(), &edge.url("/doc.txt"), &[]).await;
    assert_eq!((first.status, first.x_cache()), (StatusCode::OK, "MISS"));
    assert!(first.header("etag").starts_with('"'), "{:?}", first.headers);
    assert!(!first.header("last-modified").is_empty());
    (edge, first)
}

fn assert_hit(r: &Reply, status: StatusCode, what: &str) {
    assert_eq!(r.status, status, "{what}: {:?}", r.headers);
    assert_eq!(r.x_cache(), "HIT", "{what}");
    assert!(r.header("cache-status").starts_with("cdn; hit"), "{what}: {}", r.header("cache-status"));
    assert_eq!(r.header("x-served-by"), "edge-test-1", "{what}");
}

#[tokio::test]
async fn if_none_match_lists_with_commas_inside_tags() {
    let origin = origin::start_serving(&[("doc.txt", BODY.as_bytes())]).await;
    let (edge, first) = cached_doc(&origin).await;
    let etag = first.header("etag");
    let c = client();
    // One tag of the list matches, next to one with commas inside: 304.
    let list = format!("\"a,b\", {etag}, W/\"c,\"");
    let r = get(&c, &edge.url("/doc.txt"), &[("if-none-match", &list)]).await;
    assert_hit(&r, StatusCode::NOT_MODIFIED, &list);
    assert!(r.body.is_empty());
    assert_eq!(r.header("etag"), etag);
    // None matches: `"x,*,y"` is one tag (splitting on commas would find a `*`).
    for list in ["\"x,*,y\"".to_string(), format!("\"x,*,y\", \"{}\"", etag.trim_matches('"').replace('-', ","))] {
        let r = get(&c, &edge.url("/doc.txt"), &[("if-none-match", &list)]).await;
        assert_hit(&r, StatusCode::OK, &list);
        assert_eq!(r.body, BODY);
    }
    edge.stop().await;
}

#[tokio::test]
async fn a_stored_etag_with_a_comma_is_matched_whole() {
    let origin = MockOrigin::start().await;
    origin.route("/c", Route::ok("max-age=600", "comma").header("etag", "\"v1,2\""));
    let edge = TestEdge::start(&origin.url(), |_| {}).await;
    let c = client();
    assert_eq!(get(&c, &edge.url("/c"), &[]).await.x_cache(), "MISS");
    for (list, status) in [
        ("\"x\", \"v1,2\"", StatusCode::NOT_MODIFIED),
        ("W/\"v1,2\"", StatusCode::NOT_MODIFIED),
        ("\"v1\", \"2\"", StatusCode::OK),
        ("\"v1,2,3\"", StatusCode::OK),
    ] {
        let r = get(&c, &edge.url("/c"), &[("if-none-match", list)]).await;
        assert_hit(&r, status, list);
    }
    let r = get(&c, &edge.url("/c"), &[("if-match", "\"v1,2\"")]).await;
    assert_hit(&r, StatusCode::OK, "if-match");
    assert_eq!(r.body, "comma");
    let r = get(&c, &edge.url("/c"), &[("if-match", "\"v1\", \"2\"")]).await;
    assert_hit(&r, StatusCode::PRECONDITION_FAILED, "if-match split");
    assert_eq!(origin.hits("/c"), 1);
    edge.stop().await;
}

#[tokio::test]
async fn if_match_on_a_hit() {
    let origin = origin::start_serving(&[("doc.txt", BODY.as_bytes())]).await;
    let (edge, first) = cached_doc(&origin).await;
    let etag = first.header("etag");
    let c = client();
    let url = edge.url("/doc.txt");
    for value in ["\"other\"", "W/\"other\"", format!("W/{etag}").as_str(), "\"a,b\""] {
        let r = get(&c, &url, &[("if-match", value)]).await;
        assert_hit(&r, StatusCode::PRECONDITION_FAILED, value);
        assert_ne!(r.body, BODY);
    }
    let r = send(&c, "HEAD", &url, &[("if-match", "\"other\"")]).await;
    assert_hit(&r, StatusCode::PRECONDITION_FAILED, "HEAD");
    assert!(r.body.is_empty());
    // 412 comes before 304 (RFC 9110 §13.2.2).
    let r = get(&c, &url, &[("if-match", "\"other\""), ("if-none-match", etag)]).await;
    assert_hit(&r, StatusCode::PRECONDITION_FAILED, "if-match before if-none-match");
    // Matching: the object, whole or in part.
    for value in [etag, "*", format!("\"a,b\", {etag}").as_str()] {
        let r = get(&c, &url, &[("if-match", value)]).await;
        assert_hit(&r, StatusCode::OK, value);
        assert_eq!(r.body, BODY);
    }
    let r = get(&c, &url, &[("if-match", etag), ("range", "bytes=0-10")]).await;
    assert_hit(&r, StatusCode::PARTIAL_CONTENT, "if-match with range");
    assert_eq!(r.body, BODY[..11]);
    // Both preconditions pass, then If-None-Match decides.
    let r = get(&c, &url, &[("if-match", etag), ("if-none-match", etag)]).await;
    assert_hit(&r, StatusCode::NOT_MODIFIED, "if-match and if-none-match");
    edge.stop().await;
}

#[tokio::test]
async fn if_unmodified_since_on_a_hit() {
    let origin = origin::start_serving(&[("doc.txt", BODY.as_bytes())]).await;
    let (edge, first) = cached_doc(&origin).await;
    let modified = first.header("last-modified");
    let c = client();
    let url = edge.url("/doc.txt");
    let earlier = "Sat, 01 Jan 2000 00:00:00 GMT";
    let r = get(&c, &url, &[("if-unmodified-since", earlier)]).await;
    assert_hit(&r, StatusCode::PRECONDITION_FAILED, "earlier");
    assert_ne!(r.body, BODY);
    for value in [modified, "Fri, 01 Jan 2100 00:00:00 GMT", "not a date"] {
        let r = get(&c, &url, &[("if-unmodified-since", value)]).await;
        assert_hit(&r, StatusCode::OK, value);
        assert_eq!(r.body, BODY);
    }
    // If-Match, when present, is evaluated instead.
    let r = get(&c, &url, &[("if-match", first.header("etag")), ("if-unmodified-since", earlier)]).await;
    assert_hit(&r, StatusCode::OK, "if-match instead");
    edge.stop().await;
}
