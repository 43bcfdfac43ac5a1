//! Tiered caching (issue 20) with real servers: a control node, edges on 127.0.0.x
//! in regions, a mock origin that counts every request by path and `Range` and
//! keeps the `CDN-Loop` it was sent.
//!
//! - Shield: 3 regions × 2 edges, the site shielded by one region; six clients (one
//!   per edge, at once) reading a new 50 MiB video in ranges cost the origin one
//!   request per slice, and every byte is right; with `share = "region"` as well,
//!   the same.
//! - The shield edge of a key stopped: the next shield serves it; both shields
//!   stopped: the origin does; no client sees an error. `Cache-Status` through a
//!   shield lists the shield first, `X-Served-By` names the edge the client reached.
//! - A purge, then at once requests on every edge (the shields hearing gossip late):
//!   no edge that applied the purge serves the old bytes, and none keeps them
//!   (fails about one run in ten today: ignored, see the test).
//! - A loop (edge A on a document shielding by B's region, B on one shielding by
//!   A's) ends at the origin after both, one origin request.
//! - In-region sharing: two edges, 100 objects through both → 100 stored in the
//!   region, one origin request each, fills between the two counted as `peer`.
//! - A shield killed in the middle of a body: the transfer under way breaks (the
//!   limit of the hop walk), nothing broken is kept, the next request is whole.
//!   A sliced object filled from a shield, the shield gone, an origin without
//!   ranges: the client must still get its bytes (fails today: ignored, see the
//!   test).
//!
//! Ignored tests are open bugs: `cargo test --test control -- --ignored tiers::`.
//!
//! - CDN-Cache-Control through a shield: the edge behind it obeys it too, no client
//!   sees it.
//!
//! Edges use 127.0.0.201..=234 (node ids `edge-<last octet>`); the rest of the suite
//! does not.

use std::{
    collections::{BTreeMap, BTreeSet},
    ops::Range,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use bytes::Bytes;
use cdn_cluster::PacketLoss;
use cdn_edge::Config;
use cdn_test_support::{
    client::{HttpClient, Reply, client},
    control::{SECRET, TOKEN, TestControl, api, wait_for_edges},
    edge::TestEdge,
    mock_origin::{MockOrigin, Route},
    wait,
};
use http::{HeaderMap, Method, Request, StatusCode};
use http_body_util::{BodyExt as _, Empty};
use serde_json::{Value, json};
use tempfile::TempDir;

/// The tiered site's host: clients send it, so every edge keys objects alike.
const HOST: &str = "www.tier.test";

/// A control node, edges joined to it, one mock origin behind the site.
struct Tiered {
    control: TestControl,
    edges: Vec<TestEdge>,
    origin: Arc<MockOrigin>,
    _data: TempDir,
}

/// An edge to start: last octet of its address, region, gossip loss, config tweak.
struct Spec {
    last: u8,
    region: &'static str,
    loss: PacketLoss,
    tweak: fn(&mut Config),
}

impl Spec {
    fn new(last: u8, region: &'static str) -> Self {
        Self { last, region, loss: PacketLoss::default(), tweak: |_| {} }
    }
}

impl Tiered {
    /// Control, then the edges, each alive and ready in the control node's view.
    async fn start(specs: Vec<Spec>) -> Self {
        let origin = Arc::new(MockOrigin::start().await);
        origin.route("/probe", Route::ok("max-age=3600", "probe"));
        let data = tempfile::tempdir().unwrap();
        let any = "127.0.0.1:0".parse().unwrap();
        let control = TestControl::start(data.path(), any, any).await;
        let seed = control.cluster.gossip_addr();
        let mut edges = Vec::new();
        for spec in specs {
            let Spec { last, region, loss, tweak } = spec;
            let edge = TestEdge::join_with([127, 0, 0, last], &origin.url(), seed, SECRET, loss, |c| {
                c.region = region.to_string();
                tweak(c);
            })
            .await;
            edges.push(edge);
        }
        let ids: Vec<String> = edges.iter().map(|e| e.node_id.clone()).collect();
        wait_for_edges(&control, &ids.iter().map(String::as_str).collect::<Vec<_>>()).await;
        Self { control, edges, origin, _data: data }
    }

    /// The routing document: one site `tiered` on the mock origin for [`HOST`] (and
    /// as the default), with `extra` fields (`shield`, `share`).
    fn document(&self, extra: Value) -> Value {
        let mut site = json!({ "name": "tiered", "hosts": [HOST], "origins": [{ "url": self.origin.url() }] });
        for (key, value) in extra.as_object().expect("an object") {
            site[key] = value.clone();
        }
        json!({ "default_site": "tiered", "sites": [site] })
    }

    /// `PUT /v1/routing`: the version it got.
    async fn put(&self, document: &Value) -> u64 {
        let url = format!("http://{}/v1/routing", self.control.api);
        let (status, reply) = api(Method::PUT, &url, Some(TOKEN), Some(&document.to_string())).await;
        assert_eq!(status, StatusCode::OK, "PUT /v1/routing: {reply}");
        reply["version"].as_u64().expect("a version")
    }

    /// `PUT`s the document and waits until every edge serves by it.
    async fn apply(&self, extra: Value) -> u64 {
        let version = self.put(&self.document(extra)).await;
        for edge in &self.edges {
            wait_version(edge, version).await;
        }
        version
    }

    async fn stop(self) {
        for edge in self.edges {
            edge.stop().await;
        }
        self.control.stop().await;
        self.origin.stop();
    }
}

/// Waits (up to 10 s) until `edge` serves by routing version `version` or later.
async fn wait_version(edge: &TestEdge, version: u64) {
    let what = format!("{} to serve by routing version {version}", edge.node_id);
    wait::until(&what, Duration::from_secs(10), Duration::from_millis(5), async || {
        (edge.metric("cdn_routing_version", &[]) as u64 >= version).then_some(())
    })
    .await;
}

/// `GET` of `path` on `edge` with `Host: HOST` and `headers`, reporting failures
/// (no answer, a broken body) instead of failing the test.
async fn try_get(c: &HttpClient, edge: &TestEdge, path: &str, headers: &[(&str, &str)]) -> Result<Reply, String> {
    let mut request = Request::get(edge.url(path)).header("host", HOST);
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let request = request.body(Empty::<Bytes>::new()).expect("a valid request");
    let response = tokio::time::timeout(Duration::from_secs(20), c.request(request))
        .await
        .map_err(|_| "no answer within 20 s".to_string())?
        .map_err(|e| format!("{e:?}"))?;
    let (parts, body) = response.into_parts();
    let head = || {
        let header = |name: &str| parts.headers.get(name).and_then(|v| v.to_str().ok()).unwrap_or("").to_string();
        format!("{} x-cache {:?} cache-status {:?}", parts.status, header("x-cache"), header("cache-status"))
    };
    let body = tokio::time::timeout(Duration::from_secs(20), body.collect())
        .await
        .map_err(|_| format!("body not complete within 20 s, after {}", head()))?
        .map_err(|e| format!("body: {e:?}, after {}", head()))?
        .to_bytes();
    Ok(Reply { status: parts.status, version: parts.version, headers: parts.headers, body })
}

/// [`try_get`] that must succeed.
async fn get(c: &HttpClient, edge: &TestEdge, path: &str, headers: &[(&str, &str)]) -> Reply {
    try_get(c, edge, path, headers).await.unwrap_or_else(|e| panic!("GET {path} on {}: {e}", edge.node_id))
}

/// The body, as text (for messages).
fn text(reply: &Reply) -> String {
    String::from_utf8_lossy(&reply.body).into_owned()
}

/// The node ids of `CDN-Loop` in `headers`, in order.
pub(crate) fn loop_ids(headers: &HeaderMap) -> Vec<String> {
    headers
        .get_all("cdn-loop")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|item| item.split(';').next())
        .map(|id| id.trim().to_string())
        .filter(|id| !id.is_empty())
        .collect()
}

/// The `CDN-Loop` of the last request the origin saw for `path`.
fn origin_loop(origin: &MockOrigin, path: &str) -> Vec<String> {
    loop_ids(&origin.last_headers(path))
}

/// Probes `edge` with new objects until the origin has seen its fills arrive
/// through each of `upstreams` (node ids; the edge's own id: straight from it), so
/// that the edge's view of the other edges holds them all.
/// Returns how many probes (new objects) it took.
async fn wait_forwards(c: &HttpClient, origin: &MockOrigin, edge: &TestEdge, upstreams: &[&str]) -> usize {
    let mut seen = BTreeSet::new();
    let mut n = 0;
    let what = format!("{} to fill through each of {upstreams:?}", edge.node_id);
    wait::until(&what, Duration::from_secs(15), Duration::from_millis(10), async || {
        n += 1;
        let path = format!("/probe?from={}&n={n}", edge.node_id);
        let reply = try_get(c, edge, &path, &[]).await.ok()?;
        if reply.status == StatusCode::OK
            && let Some(last) = origin_loop(origin, &path).last()
        {
            seen.insert(last.clone());
        }
        upstreams.iter().all(|u| seen.contains(*u)).then_some(())
    })
    .await;
    n
}

/// `len` bytes that differ from one offset to the next (xorshift from `seed`).
fn content(len: usize, seed: u64) -> Bytes {
    let mut x = seed | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    Bytes::from(out)
}

/// `bytes=a-b` for the bytes in `range`.
fn range_header(range: &Range<usize>) -> String {
    format!("bytes={}-{}", range.start, range.end - 1)
}

/// The origin requests a sliced fill of `total` bytes in slices of `slice` makes:
/// one per slice, by its `Range` header.
fn one_per_slice(total: usize, slice: usize) -> BTreeMap<String, usize> {
    (0..total.div_ceil(slice)).map(|k| (range_header(&(k * slice..((k + 1) * slice).min(total))), 1)).collect()
}

/// What differs between the origin's requests and one per slice.
fn slice_report(got: &BTreeMap<String, usize>, want: &BTreeMap<String, usize>) -> String {
    let mut lines = Vec::new();
    for (range, n) in got {
        match want.get(range) {
            Some(1) if *n == 1 => {}
            Some(_) => lines.push(format!("{range}: {n} requests")),
            None => lines.push(format!("{range:?}: {n} requests, not a slice")),
        }
    }
    for range in want.keys().filter(|r| !got.contains_key(*r)) {
        lines.push(format!("{range}: never requested"));
    }
    lines.join("\n  ")
}

/// The members of a `Cache-Status` (RFC 9211), outermost (nearest the origin) first.
fn cache_status(reply: &Reply) -> Vec<String> {
    reply
        .headers
        .get_all("cache-status")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|m| m.trim().to_string())
        .collect()
}

/// Each edge's `cdn_upstream_requests_total` by kind, for failure messages.
fn upstreams(edges: &[TestEdge]) -> String {
    let kinds = ["origin", "shield", "peer"];
    let per_edge: Vec<String> = edges
        .iter()
        .map(|e| {
            let counts: Vec<String> = kinds
                .iter()
                .map(|k| format!("{k} {}", e.metric("cdn_upstream_requests_total", &[("kind", k)])))
                .collect();
            format!("{}: {}", e.node_id, counts.join(", "))
        })
        .collect();
    per_edge.join("; ")
}

/// 3 regions × 2 edges, `shield = ["r1"]` (the first two edges); six clients, one
/// per edge and all at once, read a new 50 MiB video in unaligned ranges of about
/// 3 MiB, each from its own starting point and round to it: the origin gets exactly
/// one request per 1 MiB slice (issue 20's Done-when), and every client gets every
/// byte right.
///
/// (It failed with 2 requests per slice, one per edge of the shield region, until
/// those edges asked the key's shield too.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn six_clients_on_six_edges_cost_the_origin_one_request_per_slice() {
    six_clients_read_a_new_video([201, 202, 203, 204, 205, 206], json!({ "shield": ["r1"] })).await;
}

/// The same with `share = "region"` as well: the shield region's two edges agree on
/// one owner per key, so one of them fetches each slice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_sharing_in_the_shield_region_six_clients_cost_one_request_per_slice() {
    six_clients_read_a_new_video([207, 208, 209, 210, 211, 212], json!({ "shield": ["r1"], "share": "region" })).await;
}

/// Edges `lasts` in regions r1, r1, r2, r2, r3, r3 under the site fields `extra`
/// (which shield by r1); six clients read a 50 MiB video at once, one per edge.
async fn six_clients_read_a_new_video(lasts: [u8; 6], extra: Value) {
    const SIZE: usize = 50 << 20;
    const SLICE: usize = 1 << 20;
    let regions = ["r1", "r1", "r2", "r2", "r3", "r3"];
    // 300 MiB through six debug-built edges on two busy cores can starve gossip for
    // over the default 1.5 s: a shield reported suspect for a moment is left out of
    // the view and its slice fetched from the origin again. This test is about the
    // fetches, not about failure detection: no suspects within 10 s of silence.
    let steady = |c: &mut Config| c.cluster.as_mut().unwrap().suspect_after = Duration::from_secs(10);
    let specs = lasts.iter().zip(regions).map(|(last, region)| Spec { tweak: steady, ..Spec::new(*last, region) });
    let cdn = Tiered::start(specs.collect()).await;
    cdn.apply(extra).await;
    let c = client();
    let shields = [cdn.edges[0].node_id.as_str(), cdn.edges[1].node_id.as_str()];
    for edge in &cdn.edges[2..] {
        wait_forwards(&c, &cdn.origin, edge, &shields).await;
    }
    let video = content(SIZE, 0x5eed);
    cdn.origin.route(
        "/video.mp4",
        Route::ok("public, max-age=3600", video.clone())
            .header("etag", "\"video-1\"")
            .header("content-type", "video/mp4")
            .ranges(),
    );

    let started = Instant::now();
    let mut clients = tokio::task::JoinSet::new();
    for (i, edge) in cdn.edges.iter().enumerate() {
        let (c, url_edge, video) = (client(), edge.url("/video.mp4"), video.clone());
        let node = edge.node_id.clone();
        // Unaligned chunks from a starting point of the client's own, round to it.
        let chunk = (3 << 20) + 12_345 * (i + 1);
        let start = (i * 8_388_608 + i * 777) % SIZE;
        let mut ranges = Vec::new();
        for (from, to) in [(start, SIZE), (0, start)] {
            let mut at = from;
            while at < to {
                ranges.push(at..(at + chunk).min(to));
                at += chunk;
            }
        }
        clients.spawn(async move {
            for range in ranges {
                let request = Request::get(&url_edge)
                    .header("host", HOST)
                    .header("range", range_header(&range))
                    .body(Empty::<Bytes>::new())
                    .unwrap();
                let response = c.request(request).await.map_err(|e| format!("{node} {range:?}: {e:?}"))?;
                let status = response.status();
                let content_range =
                    response.headers().get("content-range").and_then(|v| v.to_str().ok()).unwrap_or("").to_string();
                let body =
                    response.into_body().collect().await.map_err(|e| format!("{node} {range:?}: body: {e:?}"))?;
                let body = body.to_bytes();
                let want = format!("bytes {}-{}/{SIZE}", range.start, range.end - 1);
                if status != StatusCode::PARTIAL_CONTENT || content_range != want {
                    return Err(format!("{node} {range:?}: {status} {content_range:?}, not 206 {want:?}"));
                }
                if body != video.slice(range.clone()) {
                    return Err(format!("{node} {range:?}: wrong bytes ({} long)", body.len()));
                }
            }
            Ok::<_, String>(())
        });
    }
    while let Some(done) = clients.join_next().await {
        done.expect("a client task").expect("every range of every client right");
    }
    eprintln!("six clients read 50 MiB each through six edges in {:?}", started.elapsed());

    let got: BTreeMap<String, usize> = cdn.origin.range_hits("/video.mp4").into_iter().collect();
    let want = one_per_slice(SIZE, SLICE);
    assert!(
        got == want,
        "origin requests for the video, one per slice expected:\n  {}\nupstream requests by edge: {}",
        slice_report(&got, &want),
        upstreams(&cdn.edges)
    );
    let shield_fills: f64 =
        cdn.edges[2..].iter().map(|e| e.metric("cdn_upstream_requests_total", &[("kind", "shield")])).sum();
    assert!(shield_fills >= 4.0, "the other regions filled from a shield ({shield_fills} requests)");
    cdn.stop().await;
}

/// The node ids of `edges`.
fn ids(edges: &[TestEdge]) -> Vec<String> {
    edges.iter().map(|e| e.node_id.clone()).collect()
}

/// A load of new objects (`/load?..`) through `edges` until `stop`; every failure
/// (no answer, not 200, wrong bytes) and the count of requests, which `count`
/// follows.
fn load(
    edges: Vec<(String, String)>,
    count: Arc<AtomicUsize>,
    stop: tokio_util::sync::CancellationToken,
) -> tokio::task::JoinHandle<(usize, Vec<String>)> {
    tokio::spawn(async move {
        let c = client();
        let (mut n, mut failures) = (0, Vec::new());
        while !stop.is_cancelled() {
            for (node, base) in &edges {
                n += 1;
                count.store(n, Ordering::Relaxed);
                let url = format!("{base}/load?n={n}");
                let request = Request::get(&url).header("host", HOST).body(Empty::<Bytes>::new()).unwrap();
                let reply = match tokio::time::timeout(Duration::from_secs(10), c.request(request)).await {
                    Err(_) => Err("no answer within 10 s".to_string()),
                    Ok(Err(e)) => Err(format!("{e:?}")),
                    Ok(Ok(response)) => {
                        let status = response.status();
                        match response.into_body().collect().await.map(|b| b.to_bytes()) {
                            Ok(body) if status == StatusCode::OK && body == "load" => Ok(()),
                            Ok(body) => Err(format!("{status} {body:?}")),
                            Err(e) => Err(format!("body: {e:?}")),
                        }
                    }
                };
                if let Err(e) = reply {
                    failures.push(format!("{node} {url}: {e}"));
                }
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        (n, failures)
    })
}

/// Through a shield, `Cache-Status` lists the shield first and `X-Served-By` is the
/// client's edge. Then the shield edge of some keys is stopped (a load of new
/// objects running through the other regions): its keys go to the next shield by
/// the same hash; both shields stopped: to the origin. No client sees an error.
#[tokio::test]
async fn a_stopped_shield_passes_its_keys_to_the_next_then_to_the_origin() {
    let lasts = [213u8, 214, 215, 216, 217, 218];
    let regions = ["r1", "r1", "r2", "r2", "r3", "r3"];
    let mut cdn =
        Tiered::start(lasts.iter().zip(regions).map(|(last, region)| Spec::new(*last, region)).collect()).await;
    cdn.apply(json!({ "shield": ["r1"] })).await;
    let c = client();
    let shields = ids(&cdn.edges[..2]);
    let shield_refs: Vec<&str> = shields.iter().map(String::as_str).collect();
    for edge in &cdn.edges[2..] {
        wait_forwards(&c, &cdn.origin, edge, &shield_refs).await;
    }
    cdn.origin.route("/small", Route::ok("public, max-age=3600", "a small object").header("etag", "\"s1\""));
    cdn.origin.route("/obj", Route::ok("public, max-age=3600", "an object").header("etag", "\"o1\""));
    cdn.origin.route("/load", Route::ok("public, max-age=3600", "load"));

    // Cache-Status, shield first: a miss at both, then (another region) a shield
    // hit and an edge miss, then an edge hit after the shield's stored status.
    let (e2, e4) = (&cdn.edges[2], &cdn.edges[4]);
    let first = get(&c, e2, "/small", &[]).await;
    assert_eq!((first.status, text(&first)), (StatusCode::OK, "a small object".into()));
    let members = cache_status(&first);
    assert_eq!(members.len(), 2, "shield and edge: {members:?}");
    assert!(members.iter().all(|m| m.starts_with("cdn; fwd=miss")), "a miss at both: {members:?}");
    assert_eq!(first.header("x-served-by"), e2.node_id, "the client's edge");
    assert_eq!(first.x_cache(), "MISS");
    let via = origin_loop(&cdn.origin, "/small");
    assert!(via.len() == 2 && via[0] == e2.node_id && shields.contains(&via[1]), "origin saw CDN-Loop {via:?}");
    let second = get(&c, e4, "/small", &[]).await;
    let members = cache_status(&second);
    assert!(
        members.len() == 2 && members[0].starts_with("cdn; hit") && members[1].starts_with("cdn; fwd=miss"),
        "the shield's hit first, then the edge's miss: {members:?}"
    );
    assert_eq!(second.headers.get_all("x-served-by").iter().count(), 1);
    assert_eq!(second.header("x-served-by"), e4.node_id, "the client's edge, not the shield");
    let third = get(&c, e4, "/small", &[]).await;
    let members = cache_status(&third);
    assert!(
        members.len() == 2 && members[0].starts_with("cdn; hit") && members[1].starts_with("cdn; hit"),
        "the shield's status as stored, then the edge's hit: {members:?}"
    );
    assert_eq!((third.x_cache(), third.header("x-served-by")), ("HIT", e4.node_id.as_str()));
    assert_eq!(cdn.origin.hits("/small"), 1);

    // 24 objects through e2: which shield each went through.
    let mut shield_of = BTreeMap::new();
    for n in 0..24 {
        let path = format!("/obj?n={n}");
        let reply = get(&c, e2, &path, &[]).await;
        assert_eq!((reply.status, text(&reply)), (StatusCode::OK, "an object".into()));
        let via = origin_loop(&cdn.origin, &path);
        assert!(via.len() == 2 && via[0] == e2.node_id && shields.contains(&via[1]), "{path}: CDN-Loop {via:?}");
        shield_of.insert(path, via[1].clone());
    }
    let first_shield = shield_of.values().next().unwrap().clone();
    let (gone, next) = if first_shield == shields[0] {
        (shields[0].clone(), shields[1].clone())
    } else {
        (shields[1].clone(), shields[0].clone())
    };
    assert!(shield_of.values().any(|s| *s == next), "rendezvous spreads keys over both shields: {shield_of:?}");

    // New objects keep coming through the other regions while the shields go.
    let stop_load = tokio_util::sync::CancellationToken::new();
    let count = Arc::new(AtomicUsize::new(0));
    let loader =
        load(cdn.edges[3..].iter().map(|e| (e.node_id.clone(), e.url(""))).collect(), count.clone(), stop_load.clone());
    // Some of the load before each stop, some after.
    let some_load = async || {
        let from = count.load(Ordering::Relaxed);
        wait::until("the load to go on", Duration::from_secs(10), Duration::from_millis(5), async || {
            (count.load(Ordering::Relaxed) >= from + 6).then_some(())
        })
        .await;
    };
    some_load().await;

    // The shield of some keys stops: through another edge (r2, nothing cached
    // there), its keys come from the next shield, the others still from theirs.
    let index = cdn.edges.iter().position(|e| e.node_id == gone).unwrap();
    cdn.edges.remove(index).stop().await;
    some_load().await;
    let e3 = &cdn.edges.iter().find(|e| e.node_id == format!("edge-{}", lasts[3])).unwrap();
    for (path, shield) in &shield_of {
        let reply = try_get(&c, e3, path, &[]).await.unwrap_or_else(|e| panic!("{path} with {gone} down: {e}"));
        assert_eq!((reply.status, text(&reply)), (StatusCode::OK, "an object".into()), "{path}");
        if *shield == gone {
            assert_eq!(cdn.origin.hits(path), 2, "{path}: the next shield fetched it");
            assert_eq!(origin_loop(&cdn.origin, path), [e3.node_id.clone(), next.clone()], "{path}");
        } else {
            assert_eq!(cdn.origin.hits(path), 1, "{path}: still a hit at {shield}");
        }
    }

    // Both shields down: through r3 (nothing cached there), straight to the origin.
    some_load().await;
    let index = cdn.edges.iter().position(|e| e.node_id == next).unwrap();
    cdn.edges.remove(index).stop().await;
    some_load().await;
    let e5 = &cdn.edges.iter().find(|e| e.node_id == format!("edge-{}", lasts[5])).unwrap();
    for path in shield_of.keys() {
        let before = cdn.origin.hits(path);
        let reply = try_get(&c, e5, path, &[]).await.unwrap_or_else(|e| panic!("{path} with both shields down: {e}"));
        assert_eq!((reply.status, text(&reply)), (StatusCode::OK, "an object".into()), "{path}");
        assert_eq!(cdn.origin.hits(path), before + 1, "{path}");
        assert_eq!(origin_loop(&cdn.origin, path), [e5.node_id.as_str()], "{path}: from the edge itself");
    }

    stop_load.cancel();
    let (requests, failures) = loader.await.unwrap();
    assert!(
        failures.is_empty(),
        "{} of {requests} load requests failed while shields stopped: {failures:#?}",
        failures.len()
    );
    eprintln!("{requests} load requests while the shields stopped");
    cdn.stop().await;
}

/// Purges applied so far by `edge` (one control node: also the last sequence).
fn applied(edge: &TestEdge) -> u64 {
    edge.metric("cdn_purges_applied_total", &[]) as u64
}

/// A purge, then at once requests on every edge, five times: the origin changed the
/// object (body and ETag) before each purge, and the shields hear gossip late (60%
/// of what they receive is lost), so edges apply the purge before the shield they
/// fill from. No edge answers with the old bytes once it applied the purge, for a
/// small object or a sliced one, and afterwards every edge has the new bytes.
///
/// Found by this test and fixed: a purge's sequence was announced upstream
/// (`cdn-purged`) only after the cache was purged, so a fill starting in between
/// stored the shield's old bytes (edge/src/purge.rs now announces it first), and a
/// request after a purge could join a fill started before it (edge/src/cache.rs
/// detaches fills in flight on a purge). Not a violation: an edge that has not
/// applied the purge yet may cut a HIT on the old sliced object when a slice it
/// lacks can no longer be fetched (the origin changed), as single-tier slicing does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_purge_then_requests_on_every_edge_never_serve_the_old_bytes() {
    const CLIP: usize = 640 << 10;
    let lasts = [223u8, 224, 225, 226, 227, 228];
    let regions = ["r1", "r1", "r2", "r2", "r3", "r3"];
    let losses: Vec<PacketLoss> = lasts.iter().map(|l| PacketLoss::new(u64::from(*l))).collect();
    let specs = lasts
        .iter()
        .zip(regions)
        .zip(&losses)
        .map(|((last, region), loss)| Spec {
            loss: loss.clone(),
            tweak: |c| c.cache.slice = bytesize::ByteSize::kib(256),
            ..Spec::new(*last, region)
        })
        .collect();
    let cdn = Tiered::start(specs).await;
    cdn.apply(json!({ "shield": ["r1"] })).await;
    let c = client();
    let shields = ids(&cdn.edges[..2]);
    let shield_refs: Vec<&str> = shields.iter().map(String::as_str).collect();
    for edge in &cdn.edges[2..] {
        wait_forwards(&c, &cdn.origin, edge, &shield_refs).await;
    }
    let doc = |v: u64| Bytes::from(format!("document, version {v}"));
    let clip = |v: u64| content(CLIP, v);
    let publish = |v: u64| {
        let etag = format!("\"v{v}\"");
        cdn.origin.route("/doc", Route::ok("public, max-age=3600", doc(v)).header("etag", &etag));
        cdn.origin.route("/clip", Route::ok("public, max-age=3600", clip(v)).header("etag", &etag).ranges());
    };
    // What an edge answers now: (doc's version, clip's version), 0 for bytes of no version.
    let versions = async |edge: &TestEdge, v: u64| -> Result<((u64, u64), String), String> {
        let d = try_get(&c, edge, "/doc", &[]).await.map_err(|e| format!("/doc: {e}"))?;
        let k = try_get(&c, edge, "/clip", &[("range", "bytes=0-")]).await.map_err(|e| format!("/clip: {e}"))?;
        if d.status != StatusCode::OK || k.status != StatusCode::PARTIAL_CONTENT {
            return Err(format!("{} {}", d.status, k.status));
        }
        let which =
            |got: &Bytes, make: &dyn Fn(u64) -> Bytes| [v, v - 1].into_iter().find(|n| *got == make(*n)).unwrap_or(0);
        let statuses = format!("doc [{}] clip [{}]", cache_status(&d).join(", "), cache_status(&k).join(", "));
        Ok(((which(&d.body, &doc), which(&k.body, &|n| clip(n))), statuses))
    };
    publish(1);
    for edge in &cdn.edges {
        for _ in 0..2 {
            assert_eq!(versions(edge, 1).await.unwrap().0, (1, 1), "{} warm", edge.node_id);
        }
    }

    let purge_url = format!("http://{}/v1/purge", cdn.control.api);
    let mut violations = Vec::new();
    // Answers of an edge that had applied the purge while a shield had not, and
    // those among them a shield answered without its cache (`fwd=bypass`).
    let (mut raced, mut shield_bypasses, mut cut_before_purge) = (0, 0, 0);
    for v in 2..=6u64 {
        // The shields hear gossip late (odd versions: not at all until the other
        // edges are done); the origin has a new version; purge it.
        let deaf = v % 2 == 1;
        for loss in &losses[..2] {
            loss.set(0.0, if deaf { 1.0 } else { 0.6 });
        }
        publish(v);
        let body = json!({ "urls": [format!("http://{HOST}/doc"), format!("http://{HOST}/clip")] });
        let (status, reply) = api(Method::POST, &purge_url, Some(TOKEN), Some(&body.to_string())).await;
        assert_eq!(status, StatusCode::ACCEPTED, "{reply}");
        let seq = reply["seq"].as_u64().unwrap();
        // At once, on every edge: ask until the edge has applied the purge and
        // answered three times since.
        let others_done = AtomicUsize::new(0);
        let rounds = cdn.edges.iter().enumerate().map(async |(i, edge)| {
            let started = Instant::now();
            let mut answers = Vec::new();
            let mut after = 0;
            while after < 3 && started.elapsed() < Duration::from_secs(15) {
                let was_applied = applied(edge) >= seq;
                let shield_behind = cdn.edges[..2].iter().any(|s| applied(s) < seq);
                answers.push((was_applied, shield_behind, versions(edge, v).await));
                after += usize::from(was_applied);
            }
            if i >= 2 {
                others_done.fetch_add(1, Ordering::Relaxed);
            }
            (edge.node_id.clone(), i >= 2, after, answers)
        });
        let heal = async {
            wait::until(
                "the edges outside r1 to be done",
                Duration::from_secs(20),
                Duration::from_millis(10),
                async || (others_done.load(Ordering::Relaxed) == 4).then_some(()),
            )
            .await;
            for loss in &losses[..2] {
                loss.set(0.0, 0.0);
            }
        };
        let (results, ()) = tokio::join!(futures_util::future::join_all(rounds), heal);
        for (node, outside, after, answers) in results {
            if after < 3 {
                violations.push(format!("v{v} {node}: did not apply purge {seq} within 15 s"));
            }
            for (was_applied, shield_behind, got) in answers {
                match got {
                    // Before an edge applied the purge, a HIT on the old sliced object
                    // whose missing slice can no longer be fetched (the origin changed:
                    // `If-Match` on the old ETag fails) is cut: slicing's limit, on one
                    // tier as on two (nginx's slice module does the same). Not old bytes.
                    Err(e) if !was_applied && e.contains("IncompleteBody") => cut_before_purge += 1,
                    Err(e) => {
                        violations.push(format!("v{v} {node} (purge applied: {was_applied}): request failed: {e}"))
                    }
                    Ok((got, statuses)) => {
                        if outside && was_applied && shield_behind {
                            raced += 1;
                            shield_bypasses += usize::from(statuses.contains("fwd=bypass"));
                        }
                        // Before the edge applied the purge, either version (it may
                        // still hold the old one); after, only the new one.
                        let fine = if was_applied { got == (v, v) } else { got.0 != 0 && got.1 != 0 };
                        if !fine {
                            violations.push(format!(
                                "v{v} {node} (purge applied: {was_applied}): versions {got:?}, {statuses}"
                            ));
                        }
                    }
                }
            }
        }
        for loss in &losses[..2] {
            loss.set(0.0, 0.0);
        }
        for edge in &cdn.edges {
            let what = format!("{} to apply purge {seq}", edge.node_id);
            wait::until(&what, Duration::from_secs(10), Duration::from_millis(10), async || {
                (applied(edge) >= seq).then_some(())
            })
            .await;
        }
        // Nothing old was kept anywhere.
        for edge in &cdn.edges {
            match versions(edge, v).await {
                Ok((got, _)) if got == (v, v) => {}
                other => violations.push(format!("v{v} {} after the purge everywhere: {other:?}", edge.node_id)),
            }
        }
    }
    eprintln!(
        "purge race: {raced} answers from edges that had applied a purge while a shield had not, \
         {shield_bypasses} of them answered by a shield without its cache (fwd=bypass); \
         {cut_before_purge} sliced answers cut before the edge applied the purge"
    );
    assert!(violations.is_empty(), "old bytes after a purge:\n{}", violations.join("\n"));
    // A member's token and purge list are for the edge they were sent to.
    for path in ["/doc", "/clip"] {
        let headers = cdn.origin.last_headers(path);
        assert!(!headers.contains_key("cdn-peer") && !headers.contains_key("cdn-purged"), "{path}: {headers:?}");
    }
    assert!(raced > 0 && shield_bypasses > 0, "the race was run: {raced} raced answers, {shield_bypasses} bypasses");
    cdn.stop().await;
}

/// A request loop: edge A (region ra) still on a document that shields the site by
/// rb, edge B (rb) on the next one, which shields it by ra, so each takes the
/// other for its shield. A request to either goes to the other and then ends at
/// the origin: one origin request, and the origin's `CDN-Loop` names both edges.
///
/// A stays on the old document because it hears nothing (its gossip sends are all
/// lost: it still hears the others' heartbeats in their digests, so B stays alive
/// in its view, but no document reaches it); B keeps A in its view meanwhile (A
/// gossips slowly, so B's failure detector waits longer, and B calls nobody
/// suspect for a while). When B nevertheless stops seeing A before the requests,
/// the round is run again with fresh versions.
#[tokio::test]
async fn a_loop_between_two_edges_ends_at_the_origin() {
    let cut = PacketLoss::new(219);
    let specs = vec![
        Spec {
            loss: cut.clone(),
            tweak: |c| c.cluster.as_mut().unwrap().gossip_interval = Duration::from_millis(400),
            ..Spec::new(219, "ra")
        },
        Spec { tweak: |c| c.cluster.as_mut().unwrap().suspect_after = Duration::from_secs(60), ..Spec::new(220, "rb") },
    ];
    let cdn = Tiered::start(specs).await;
    let (a, b) = (&cdn.edges[0], &cdn.edges[1]);
    cdn.origin.route("/looped", Route::ok("public, max-age=3600", "looped"));
    let c = client();
    let mut attempts = Vec::new();
    for attempt in 1..=3 {
        // Both on a document that shields by rb: A fills through B.
        cut.set(0.0, 0.0);
        cdn.apply(json!({ "shield": ["rb"] })).await;
        wait_forwards(&c, &cdn.origin, a, &[&b.node_id]).await;
        // A hears no more; B gets a document that shields by ra.
        cut.set(1.0, 0.0);
        let old = a.metric("cdn_routing_version", &[]) as u64;
        let new = cdn.put(&cdn.document(json!({ "shield": ["ra"] }))).await;
        wait_version(b, new).await;
        let (from_a, from_b) =
            (format!("/looped?from=a&attempt={attempt}"), format!("/looped?from=b&attempt={attempt}"));
        let (via_a, via_b) = tokio::join!(get(&c, a, &from_a, &[]), get(&c, b, &from_b, &[]));
        let a_version = a.metric("cdn_routing_version", &[]) as u64;
        for (reply, path) in [(&via_a, &from_a), (&via_b, &from_b)] {
            assert_eq!((reply.status, text(reply)), (StatusCode::OK, "looped".into()), "{path}");
            assert_eq!(cdn.origin.hits(path), 1, "{path}: one origin request");
        }
        let (loop_a, loop_b) = (origin_loop(&cdn.origin, &from_a), origin_loop(&cdn.origin, &from_b));
        assert_eq!(a_version, old, "A stayed on its document");
        // Through A: A (old document) forwards to B, B (new) would forward to A but
        // A is in CDN-Loop: the origin.
        assert_eq!(loop_a, [a.node_id.clone(), b.node_id.clone()], "{from_a}: A → B → origin");
        if loop_b == [b.node_id.clone(), a.node_id.clone()] {
            // Through B: B → A → origin, so B had A in its view: a real loop.
            attempts.push(format!("attempt {attempt}: loop closed ({loop_a:?}, {loop_b:?})"));
            // Another CDN's id ahead of ours is kept (RFC 8586).
            let path = format!("/looped?from=other&attempt={attempt}");
            let reply = get(&c, a, &path, &[("cdn-loop", "other-cdn; v=1")]).await;
            assert_eq!(reply.status, StatusCode::OK);
            let seen = origin_loop(&cdn.origin, &path);
            assert_eq!(seen, ["other-cdn", a.node_id.as_str(), b.node_id.as_str()], "{path}");
            cut.set(0.0, 0.0);
            cdn.stop().await;
            eprintln!("{}", attempts.join("\n"));
            return;
        }
        attempts.push(format!("attempt {attempt}: B no longer saw A ({loop_b:?})"));
    }
    panic!("the loop never formed:\n{}", attempts.join("\n"));
}

/// In-region sharing: two edges of one region, `share = "region"`; 100 new objects
/// requested through both at once are stored once in the region (100 cache
/// entries over the two, not 200), the origin is asked once per object, and the
/// fills between the two are counted as `peer`. A second pass changes none of it.
#[tokio::test]
async fn in_region_sharing_stores_each_object_once_in_the_region() {
    const OBJECTS: usize = 100;
    let cdn = Tiered::start(vec![Spec::new(221, "r1"), Spec::new(222, "r1")]).await;
    cdn.apply(json!({ "share": "region" })).await;
    let c = client();
    let (x, y) = (&cdn.edges[0], &cdn.edges[1]);
    let probes =
        wait_forwards(&c, &cdn.origin, x, &[&y.node_id]).await + wait_forwards(&c, &cdn.origin, y, &[&x.node_id]).await;
    let body = |i: usize| Bytes::from(format!("object {i} ").repeat(100));
    for i in 0..OBJECTS {
        cdn.origin.route(&format!("/o/{i}"), Route::ok("public, max-age=3600", body(i)));
    }
    let stored =
        || -> u64 { cdn.edges.iter().map(|e| e.metric("cdn_cache_objects", &[("tier", "memory")]) as u64).sum() };
    let peer = |e: &TestEdge| e.metric("cdn_upstream_requests_total", &[("kind", "peer")]) as u64;
    let peers_before = (peer(x), peer(y));

    for pass in 1..=2 {
        // Both edges at once, in opposite orders, eight requests at a time each.
        let order = |edge: &'static str| -> Vec<usize> {
            if edge == "x" { (0..OBJECTS).collect() } else { (0..OBJECTS).rev().collect() }
        };
        let through = async |edge: &TestEdge, name: &'static str| -> Vec<String> {
            use futures_util::StreamExt as _;
            futures_util::stream::iter(order(name))
                .map(|i| {
                    let c = c.clone();
                    async move {
                        match try_get(&c, edge, &format!("/o/{i}"), &[]).await {
                            Ok(r) if r.status == StatusCode::OK && r.body == body(i) => None,
                            Ok(r) => Some(format!("pass {pass} {} /o/{i}: {} {:?}", edge.node_id, r.status, r.body)),
                            Err(e) => Some(format!("pass {pass} {} /o/{i}: {e}", edge.node_id)),
                        }
                    }
                })
                .buffer_unordered(8)
                .filter_map(|failure| async move { failure })
                .collect()
                .await
        };
        let (fx, fy) = tokio::join!(through(x, "x"), through(y, "y"));
        assert!(fx.is_empty() && fy.is_empty(), "failed requests: {fx:#?} {fy:#?}");
        let origin_requests: Vec<(usize, usize)> =
            (0..OBJECTS).map(|i| (i, cdn.origin.hits(&format!("/o/{i}")))).filter(|(_, n)| *n != 1).collect();
        assert!(origin_requests.is_empty(), "pass {pass}: objects not fetched exactly once: {origin_requests:?}");
        let want = probes as u64 + OBJECTS as u64;
        let what = format!("pass {pass}: {want} objects stored over the two edges ({probes} probes and {OBJECTS})");
        let mut last = 0;
        let settled = tokio::time::timeout(Duration::from_secs(5), async {
            loop {
                last = stored();
                if last == want {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
        .await;
        assert!(settled.is_ok(), "{what}: the edges hold {last}; {}", upstreams(&cdn.edges));
    }
    let peer_fills = (peer(x) - peers_before.0, peer(y) - peers_before.1);
    assert!(peer_fills.0 > 0 && peer_fills.1 > 0, "both edges filled from the other: {peer_fills:?}");
    eprintln!("peer fills over two passes: {peer_fills:?}");
    cdn.stop().await;
}

/// A shield that goes away in the middle of a body (stopped with almost no grace:
/// a kill, for the transfers under way; the origin does not do ranges, so the
/// object travels whole and slowly). The client reading through the shield at
/// that moment loses its response: the hop walk moves on only before a response
/// head, so this is the limit of what issue 20 promises, not held against the
/// edge here. What is checked: nothing broken is kept, and the next request is
/// answered whole and right (from the origin).
#[tokio::test]
async fn a_shield_dying_mid_body_breaks_only_the_transfer_under_way() {
    // Slices of 8 MiB: the 2 MiB object is stored whole (see the next test for a
    // sliced one).
    let specs = vec![
        Spec {
            tweak: |c| {
                c.limits.grace = Duration::from_millis(20);
                c.cache.slice = bytesize::ByteSize::mib(8);
            },
            ..Spec::new(229, "r1")
        },
        Spec { tweak: |c| c.cache.slice = bytesize::ByteSize::mib(8), ..Spec::new(230, "r2") },
    ];
    let mut cdn = Tiered::start(specs).await;
    cdn.apply(json!({ "shield": ["r1"] })).await;
    let c = client();
    let shield = cdn.edges[0].node_id.clone();
    wait_forwards(&c, &cdn.origin, &cdn.edges[1], &[&shield]).await;
    let body = content(2 << 20, 7);
    cdn.origin.route(
        "/slow",
        Route::ok("public, max-age=3600", body.clone())
            .header("etag", "\"slow\"")
            .trickle(64 << 10, Duration::from_millis(40)),
    );
    let request = Request::get(cdn.edges[1].url("/slow")).header("host", HOST).body(Empty::<Bytes>::new()).unwrap();
    let response = c.request(request).await.expect("a response head");
    assert_eq!(response.status(), StatusCode::OK);
    let mut stream = response.into_body();
    let mut got = Vec::new();
    while got.len() < (256 << 10) {
        let frame = stream.frame().await.expect("more of the body").expect("a frame");
        if let Ok(data) = frame.into_data() {
            got.extend_from_slice(&data);
        }
    }
    cdn.edges.remove(0).stop().await;
    match stream.collect().await {
        Ok(rest) => {
            got.extend_from_slice(&rest.to_bytes());
            assert!(got == body, "a body that ends is whole and right ({} of {} bytes)", got.len(), body.len());
            eprintln!("the transfer under way survived the shield's death");
        }
        Err(e) => eprintln!("the transfer under way broke after {} bytes when the shield died: {e}", got.len()),
    }
    let edge = &cdn.edges[0];
    let again = get(&c, edge, "/slow", &[]).await;
    assert!(
        again.status == StatusCode::OK && again.body == body,
        "the next request: {} {} bytes",
        again.status,
        again.body.len()
    );
    assert_eq!(origin_loop(&cdn.origin, "/slow"), [edge.node_id.as_str()], "from the origin");
    let stored = get(&c, edge, "/slow", &[]).await;
    assert!(
        stored.x_cache() == "HIT" && stored.body == body,
        "then a whole HIT: {} {} bytes",
        stored.x_cache(),
        stored.body.len()
    );
    cdn.stop().await;
}

/// An origin that does not do ranges, behind a shield that does (it serves 206
/// from its own copy): the edge stores the object in slices, as the shield's 206
/// allowed. The shield goes away; a client then asks the edge for a part it does not
/// hold yet. The origin can answer (a 200 of the whole object), so the client must
/// get its bytes.
///
/// BUG (found by this test, open): the slice fill goes to the origin, gets a 200
/// where it wants a 206, takes it for "object changed between slices", drops the
/// object and fails the client's response (a 206 head already sent, then a broken
/// body); the next request starts over and works.
#[tokio::test]
#[ignore = "bug: a sliced object filled from a shield cannot be completed from an origin without ranges; see the comment"]
async fn slices_from_a_shield_are_completed_by_an_origin_without_ranges() {
    let specs = vec![Spec::new(231, "r1"), Spec::new(232, "r2")];
    let mut cdn = Tiered::start(specs).await;
    cdn.apply(json!({ "shield": ["r1"] })).await;
    let c = client();
    let shield = cdn.edges[0].node_id.clone();
    wait_forwards(&c, &cdn.origin, &cdn.edges[1], &[&shield]).await;
    let body = content(3 << 20, 11);
    cdn.origin.route("/noranges", Route::ok("public, max-age=3600", body.clone()).header("etag", "\"nr\""));
    // The first bytes through the edge: the shield holds the object whole, the edge
    // its head and first slice.
    let first = get(&c, &cdn.edges[1], "/noranges", &[("range", "bytes=0-99")]).await;
    assert_eq!((first.status, first.body.clone()), (StatusCode::PARTIAL_CONTENT, body.slice(0..100)));
    assert!(
        cache_status(&first).iter().any(|m| m.contains("sliced")),
        "sliced at the edge: {:?}",
        cache_status(&first)
    );
    cdn.edges.remove(0).stop().await;
    let edge = &cdn.edges[0];
    let range = (2 << 20) + 5..(2 << 20) + 105;
    let later = try_get(&c, edge, "/noranges", &[("range", &range_header(&range))]).await;
    let later = later.unwrap_or_else(|e| panic!("a later part with the shield gone: {e}"));
    assert_eq!((later.status, later.body.clone()), (StatusCode::PARTIAL_CONTENT, body.slice(range)));
    cdn.stop().await;
}

/// CDN-Cache-Control (RFC 9213) through a shield: the shield passes it on to the edge
/// behind it (a verified edge request), which obeys it too; no client ever sees it.
#[tokio::test]
async fn cdn_cache_control_reaches_the_edge_behind_a_shield_but_no_client() {
    let cdn = Tiered::start(vec![Spec::new(233, "r1"), Spec::new(234, "r2")]).await;
    cdn.apply(json!({ "shield": ["r1"] })).await;
    let c = client();
    let (shield, edge) = (&cdn.edges[0], &cdn.edges[1]);
    wait_forwards(&c, &cdn.origin, edge, &[shield.node_id.as_str()]).await;
    cdn.origin.route(
        "/cdn-cc",
        Route::ok("no-store", "for the edges only")
            .header("cdn-cache-control", "max-age=600")
            .header("surrogate-control", "max-age=600"),
    );
    let first = get(&c, edge, "/cdn-cc", &[]).await;
    assert_eq!((first.status, text(&first)), (StatusCode::OK, "for the edges only".into()));
    let via = origin_loop(&cdn.origin, "/cdn-cc");
    assert_eq!(via, [edge.node_id.clone(), shield.node_id.clone()], "filled through the shield");
    let second = get(&c, edge, "/cdn-cc", &[]).await;
    assert_eq!(second.x_cache(), "HIT", "the edge behind the shield obeyed CDN-Cache-Control");
    for reply in [&first, &second] {
        assert_eq!(reply.header("cache-control"), "no-store", "clients get the origin's Cache-Control");
        assert!(!reply.headers.contains_key("cdn-cache-control"), "no client sees CDN-Cache-Control");
        assert!(!reply.headers.contains_key("surrogate-control"), "nor Surrogate-Control");
    }
    let direct = get(&c, shield, "/cdn-cc", &[]).await;
    assert_eq!(direct.x_cache(), "HIT");
    assert!(!direct.headers.contains_key("cdn-cache-control"), "a client of the shield does not see it either");
    assert_eq!(cdn.origin.hits("/cdn-cc"), 1);
    cdn.stop().await;
}
