//! Edges applying the routing document (issue 19), with real servers: a control node,
//! edges on 127.0.0.x (in-process, and one `cdn edge` process), mock origins that
//! count what reaches them.
//!
//! - Sites by Host (exact, wildcard, default, else 421; HTTP/2's `:authority`), the
//!   site in the cache key, purges by URL and prefix still naming hosts.
//! - A new document on every edge within 1 s and served by, under load, with no
//!   failed request; a request under way finishes under the document it started
//!   with.
//! - Origin pools: a dead primary → the backup (no client error), back to the
//!   primary once it heals; `cdn_origin_health`; the per-origin `host`; weights;
//!   passive marks without probes; an HTTPS origin trusted through its `ca` only.
//! - Rules: a playlist's 2 s ttl over the origin's hour while segments keep a day,
//!   and a new document changing what is already cached; ignored query parameters
//!   (one object, not sent upstream; `*`: the whole query); bypass; negative_ttl;
//!   CORS preflights at the edge; stale_if_error and stale_while_revalidate forced;
//!   a ttl storing what the origin left open but not no-store, private or
//!   Set-Cookie.
//! - A bad document changes nothing; a restarted control node keeps the document and
//!   the edges keep serving by it meanwhile; an edge started after the `PUT` is ready
//!   only with the document (a `cdn edge` process without `[origin]`, a document
//!   large enough to travel in several gossip chunks).
//!
//! Edges use 127.0.0.101..=183 (node ids `edge-<last octet>`; the HTTP/3 edge is on
//! 127.0.0.1 as `edge-157`); the rest of the suite does not.

use std::{
    net::SocketAddr,
    path::Path,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use bytes::Bytes;
use cdn_cluster::{Cluster, ClusterConfig, MemberState, NodeInfo, Role};
use cdn_test_support::{
    client::{HttpClient, Reply, client, get, send},
    control::{SECRET, TOKEN, TestControl, api, wait_for_edges},
    curl::curl,
    edge::TestEdge,
    metrics,
    mock_origin::{MockOrigin, Route},
    net::free_port,
    process::capture_output,
    wait,
};
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt as _, Empty};
use prometheus::Registry;
use serde_json::{Value, json};
use tempfile::TempDir;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

fn any() -> SocketAddr {
    "127.0.0.1:0".parse().unwrap()
}

/// A control node and edges joined to it, all serving; the edges' `[origin]` (the
/// implicit site, used until a document arrives) is `implicit`.
struct Setup {
    control: TestControl,
    edges: Vec<TestEdge>,
    implicit: MockOrigin,
    data: TempDir,
}

impl Setup {
    /// Control, then edges `edge-<last>` on `127.0.0.<last>`, each alive and ready in
    /// the control node's view (so the first `PUT` is not held back).
    async fn start(lasts: &[u8]) -> Self {
        let implicit = MockOrigin::start().await;
        let data = tempfile::tempdir().unwrap();
        let control = TestControl::start(data.path(), any(), any()).await;
        let seed = control.cluster.gossip_addr();
        let mut edges = Vec::new();
        for &last in lasts {
            edges.push(TestEdge::join([127, 0, 0, last], &implicit.url(), seed, SECRET).await);
        }
        let ids = ids(lasts);
        wait_for_edges(&control, &ids.iter().map(String::as_str).collect::<Vec<_>>()).await;
        Self { control, edges, implicit, data }
    }

    fn edge_ids(&self) -> Vec<String> {
        self.edges.iter().map(|e| format!("edge-{}", last_octet(e))).collect()
    }

    /// `PUT /v1/routing`: the version it got.
    async fn put(&self, doc: &Value) -> u64 {
        put(&self.control, doc).await
    }

    /// `PUT`, then waits until every edge reports the version; the version, and the
    /// time from sending the `PUT` to the last edge's report.
    async fn apply(&self, doc: &Value) -> (u64, Duration) {
        let started = Instant::now();
        let version = self.put(doc).await;
        wait_applied(&self.control, version, &self.edge_ids()).await;
        (version, started.elapsed())
    }

    async fn stop(self) {
        for edge in self.edges {
            edge.stop().await;
        }
        self.control.stop().await;
        self.implicit.stop();
        drop(self.data);
    }
}

fn ids(lasts: &[u8]) -> Vec<String> {
    lasts.iter().map(|l| format!("edge-{l}")).collect()
}

fn last_octet(edge: &TestEdge) -> u8 {
    match edge.http.ip() {
        std::net::IpAddr::V4(v4) => v4.octets()[3],
        std::net::IpAddr::V6(_) => unreachable!("edges listen on 127.0.0.x"),
    }
}

async fn put(control: &TestControl, doc: &Value) -> u64 {
    let (status, reply) = put_raw(control, &doc.to_string()).await;
    assert_eq!(status, StatusCode::OK, "PUT /v1/routing: {reply}");
    reply["version"].as_u64().expect("a version")
}

async fn put_raw(control: &TestControl, body: &str) -> (StatusCode, Value) {
    api(Method::PUT, &format!("http://{}/v1/routing", control.api), Some(TOKEN), Some(body)).await
}

async fn routing_view(control: &TestControl) -> Value {
    let (status, view) = api(Method::GET, &format!("http://{}/v1/routing", control.api), Some(TOKEN), None).await;
    assert_eq!(status, StatusCode::OK, "GET /v1/routing: {view}");
    view
}

/// Waits (up to 10 s, polling every 10 ms) until `GET /v1/routing` shows every one
/// of `edges` at `version` or later.
async fn wait_applied(control: &TestControl, version: u64, edges: &[String]) {
    let url = format!("http://{}/v1/routing", control.api);
    let what = format!("{edges:?} to report routing version {version}");
    wait::until(&what, Duration::from_secs(10), Duration::from_millis(10), async || {
        let (_, view) = api(Method::GET, &url, Some(TOKEN), None).await;
        edges.iter().all(|id| view["edges"][id.as_str()].as_u64().is_some_and(|v| v >= version)).then_some(())
    })
    .await;
}

/// `GET http://<edge><path>` with `Host: host`.
async fn at(c: &HttpClient, edge: &TestEdge, host: &str, path: &str) -> Reply {
    get(c, &edge.url(path), &[("host", host)]).await
}

fn body(reply: &Reply) -> String {
    String::from_utf8_lossy(&reply.body).into_owned()
}

/// A `GET` that reports failures instead of failing the test (for load loops).
async fn try_get(c: &HttpClient, url: &str, host: &str) -> Result<Reply, String> {
    let request = Request::get(url).header("host", host).body(Empty::<Bytes>::new()).expect("a valid request");
    let response = tokio::time::timeout(Duration::from_secs(10), c.request(request))
        .await
        .map_err(|_| "no answer within 10 s".to_string())?
        .map_err(|e| format!("{e:?}"))?;
    let (parts, body) = response.into_parts();
    let body = tokio::time::timeout(Duration::from_secs(10), body.collect())
        .await
        .map_err(|_| "body not complete within 10 s".to_string())?
        .map_err(|e| format!("body: {e:?}"))?
        .to_bytes();
    Ok(Reply { status: parts.status, version: parts.version, headers: parts.headers, body })
}

/// Purges `body` through the control API and waits until every edge applied it.
async fn purge(control: &TestControl, body: Value) {
    let (status, reply) =
        api(Method::POST, &format!("http://{}/v1/purge", control.api), Some(TOKEN), Some(&body.to_string())).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{reply}");
    let id = reply["id"].as_str().unwrap().to_string();
    let url = format!("http://{}/v1/purge/{id}", control.api);
    wait::until(&format!("purge {id} to complete"), Duration::from_secs(10), Duration::from_millis(20), async || {
        let (_, status) = api(Method::GET, &url, Some(TOKEN), None).await;
        (status["status"] == "complete").then_some(())
    })
    .await;
}

/// One request of a load loop.
#[derive(Debug, Clone)]
struct Sample {
    started: Instant,
    ended: Instant,
    /// The request's number (its query in loops that make each URL unique).
    n: usize,
    /// `Ok(body)` for a 200, else what went wrong.
    outcome: Result<String, String>,
}

/// Concurrent clients sending `GET`s round robin over `targets` (edge base URL, Host)
/// until stopped.
struct Load {
    stop: Arc<AtomicBool>,
    samples: Arc<Mutex<Vec<Sample>>>,
    tasks: Vec<JoinHandle<()>>,
}

impl Load {
    /// `clients` loops; request `n` asks for `path(n)`.
    fn start(clients: usize, targets: Vec<(String, String)>, path: fn(usize) -> String) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let samples = Arc::new(Mutex::new(Vec::new()));
        let counter = Arc::new(AtomicUsize::new(0));
        let targets = Arc::new(targets);
        let tasks = (0..clients)
            .map(|_| {
                let (stop, samples, counter, targets) =
                    (stop.clone(), samples.clone(), counter.clone(), targets.clone());
                tokio::spawn(async move {
                    let c = client();
                    while !stop.load(Ordering::Relaxed) {
                        let n = counter.fetch_add(1, Ordering::Relaxed);
                        let (base, host) = &targets[n % targets.len()];
                        let url = format!("{base}{}", path(n));
                        let started = Instant::now();
                        let outcome = match try_get(&c, &url, host).await {
                            Ok(reply) if reply.status == StatusCode::OK => Ok(body(&reply)),
                            Ok(reply) => Err(format!("{url} (Host {host}): {} {}", reply.status, body(&reply))),
                            Err(e) => Err(format!("{url} (Host {host}): {e}")),
                        };
                        samples.lock().unwrap().push(Sample { started, ended: Instant::now(), n, outcome });
                    }
                })
            })
            .collect();
        Self { stop, samples, tasks }
    }

    fn samples(&self) -> Vec<Sample> {
        self.samples.lock().unwrap().clone()
    }

    /// Waits (up to 20 s) until at least `count` requests started after `from` ended.
    async fn until_done_after(&self, from: Instant, count: usize) {
        wait::until(
            &format!("{count} requests after {:?} ago", from.elapsed()),
            Duration::from_secs(20),
            Duration::from_millis(10),
            async || (self.samples().iter().filter(|s| s.started >= from).count() >= count).then_some(()),
        )
        .await;
    }

    async fn stop(self) -> Vec<Sample> {
        self.stop.store(true, Ordering::Relaxed);
        for task in self.tasks {
            task.await.expect("a load loop ends cleanly");
        }
        self.samples.lock().unwrap().clone()
    }
}

/// The health of `origin` (its URL as the document writes it) in `site`, as the edge
/// exports it: 1 up, 0 down, `None` before the edge exports it.
fn origin_health(edge: &TestEdge, site: &str, origin: &str) -> Option<f64> {
    let text = metrics::text(&edge.registry);
    let wanted = [("site", site), ("origin", origin)];
    let present = text.lines().any(|line| {
        line.starts_with("cdn_origin_health{") && wanted.iter().all(|(k, v)| line.contains(&format!("{k}=\"{v}\"")))
    });
    present.then(|| metrics::sum(&text, "cdn_origin_health", &wanted))
}

// ---------------------------------------------------------------------------------
// 1. Sites by Host.

#[tokio::test]
async fn sites_are_chosen_by_host_and_cached_apart() {
    let (a, b) = (MockOrigin::start().await, MockOrigin::start().await);
    a.route("/x", Route::ok("max-age=600", "from a"));
    b.route("/x", Route::ok("max-age=600", "from b"));
    let setup = Setup::start(&[101]).await;
    setup.implicit.route("/x", Route::ok("max-age=600", "from the implicit origin"));
    let edge = &setup.edges[0];
    let c = client();

    // No document yet: every Host is served from the edge's own [origin], as before.
    assert_eq!(body(&at(&c, edge, "anything.test", "/x").await), "from the implicit origin");
    assert_eq!(edge.metric("cdn_routing_version", &[]), 0.0);

    let mut doc = json!({"sites": [
        {"name": "alpha", "hosts": ["a.test", "*.wild.test"], "origins": [{"url": a.url()}]},
        {"name": "beta", "hosts": ["b.test"], "origins": [{"url": b.url()}]}]});
    let (v1, took) = setup.apply(&doc).await;
    eprintln!("version {v1} on the edge after {took:?}");
    assert_eq!(edge.metric("cdn_routing_version", &[]), v1 as f64, "the edge exports the version it serves by");

    // Exact hosts, each site from its own origin; the same path on two sites is two
    // objects (one fill on each origin), each a HIT afterwards.
    let first = at(&c, edge, "a.test", "/x").await;
    assert_eq!((first.status, body(&first).as_str(), first.x_cache()), (StatusCode::OK, "from a", "MISS"));
    let first = at(&c, edge, "b.test", "/x").await;
    assert_eq!((first.status, body(&first).as_str(), first.x_cache()), (StatusCode::OK, "from b", "MISS"));
    for (host, want) in [("a.test", "from a"), ("b.test", "from b"), ("A.Test:8080", "from a")] {
        let reply = at(&c, edge, host, "/x").await;
        assert_eq!((body(&reply).as_str(), reply.x_cache()), (want, "HIT"), "Host: {host}");
    }
    assert_eq!((a.hits("/x"), b.hits("/x")), (1, 1));

    // HTTP/2 names the host in `:authority` (curl sends no Host header then).
    let port = edge.http.port();
    let h2 = curl(&[
        "--http2-prior-knowledge",
        "--resolve",
        &format!("b.test:{port}:{}", edge.http.ip()),
        &format!("http://b.test:{port}/x"),
    ])
    .await;
    assert_eq!(
        (h2.status, h2.version.as_str(), h2.text().as_str(), h2.x_cache()),
        (200, "2", "from b", "HIT"),
        "{h2:?}"
    );

    // One-label wildcard; a trailing dot is ignored.
    let reply = at(&c, edge, "cam1.wild.test", "/x").await;
    assert_eq!((reply.status, body(&reply).as_str()), (StatusCode::OK, "from a"), "*.wild.test");
    assert_eq!(body(&at(&c, edge, "b.test.", "/x").await), "from b", "a trailing dot");

    // No site, no default_site: 421, and no origin sees the request.
    let before = (a.hits("/x"), b.hits("/x"), setup.implicit.hits("/x"));
    for host in ["unknown.test", "wild.test", "two.labels.wild.test", "a.test.evil"] {
        let reply = at(&c, edge, host, "/x").await;
        assert_eq!(reply.status, StatusCode::MISDIRECTED_REQUEST, "Host: {host}: {}", body(&reply));
        assert_eq!(body(&reply), "no site for this host\n", "Host: {host}");
    }
    assert_eq!((a.hits("/x"), b.hits("/x"), setup.implicit.hits("/x")), before, "a 421 reaches no origin");

    // Metrics carry the site, a small set: the document's names, never a Host.
    assert!(edge.metric("cdn_requests_total", &[("site", "alpha"), ("cache", "hit")]) >= 2.0);
    assert!(edge.metric("cdn_origin_requests_total", &[("site", "beta"), ("status", "2xx")]) >= 1.0);
    let text = metrics::text(&edge.registry);
    for host in ["unknown.test", "a.test", "cam1.wild.test"] {
        assert!(!text.contains(&format!("site=\"{host}\"")), "a Host as a site label: {host}\n{text}");
    }

    // A purge by URL still names the host: only that site's object goes.
    purge(&setup.control, json!({"urls": ["https://a.test/x"]})).await;
    assert_eq!(at(&c, edge, "a.test", "/x").await.x_cache(), "MISS", "purged");
    assert_eq!(at(&c, edge, "b.test", "/x").await.x_cache(), "HIT", "the other site's object stays");
    assert_eq!(at(&c, edge, "cam1.wild.test", "/x").await.x_cache(), "HIT", "another host of the site stays");
    assert_eq!(a.hits("/x"), 3);

    // And by prefix.
    purge(&setup.control, json!({"prefixes": ["b.test/"]})).await;
    assert_eq!(at(&c, edge, "b.test", "/x").await.x_cache(), "MISS", "purged by prefix");
    assert_eq!(at(&c, edge, "a.test", "/x").await.x_cache(), "HIT", "another host");

    // With a default_site, unknown hosts go there.
    doc["default_site"] = json!("beta");
    let (v2, _) = setup.apply(&doc).await;
    assert!(v2 > v1);
    // The latency from acceptance to application is observed for every document
    // accepted after the edge started (both here; not one older than the edge).
    assert_eq!(edge.metric("cdn_routing_apply_seconds_count", &[]), 2.0, "apply latency is exported");
    assert_eq!(edge.metric("cdn_routing_version", &[]), v2 as f64);
    let reply = at(&c, edge, "unknown.test", "/x").await;
    assert_eq!((reply.status, body(&reply).as_str()), (StatusCode::OK, "from b"), "the default site");
    assert_eq!(body(&at(&c, edge, "two.labels.wild.test", "/x").await), "from b", "two labels: not the wildcard");
    assert_eq!(body(&at(&c, edge, "a.test", "/x").await), "from a", "listed hosts keep their site");
    assert_eq!(setup.implicit.hits("/x"), 1, "the implicit origin served only before the first document");

    setup.stop().await;
    a.stop();
    b.stop();
}

// ---------------------------------------------------------------------------------
// 2. A new document everywhere within a second, under load.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_document_reaches_every_edge_within_a_second_under_load() {
    const PUTS: usize = 5;
    let (a, b) = (MockOrigin::start().await, MockOrigin::start().await);
    a.route("/obj", Route::ok("max-age=600", "A"));
    b.route("/obj", Route::ok("max-age=600", "B"));
    // The one host moves between two sites, each on its own origin: a request is
    // served by the document only if the edge routes by the new one (the site is in
    // the cache key, so the other site's cached object does not answer for it).
    let doc = |to_b: bool| {
        let (name, origin) = if to_b { ("site-b", b.url()) } else { ("site-a", a.url()) };
        json!({"sites": [
            {"name": name, "hosts": ["www.swap.test"], "origins": [{"url": origin}]},
            {"name": "static", "hosts": ["static.swap.test"], "origins": [{"url": a.url()}]}]})
    };
    a.route("/slow", Route::ok("max-age=600", "slow A").delay(Duration::from_millis(1500)));
    b.route("/slow", Route::ok("max-age=600", "slow B"));
    let setup = Setup::start(&[111, 112, 113]).await;
    let (v1, _) = setup.apply(&doc(false)).await;
    let c = client();
    for edge in &setup.edges {
        assert_eq!(body(&at(&c, edge, "www.swap.test", "/obj").await), "A");
    }

    // A request under way when the document changes finishes under the one it
    // started with; the next one is served by the new one.
    let slow = tokio::spawn({
        let (c, url) = (c.clone(), setup.edges[0].url("/slow"));
        async move { try_get(&c, &url, "www.swap.test").await }
    });
    wait::until("the slow request at origin a", Duration::from_secs(5), Duration::from_millis(5), async || {
        (a.hits("/slow") == 1).then_some(())
    })
    .await;
    let (v2, _) = setup.apply(&doc(true)).await;
    let reply = slow.await.unwrap().expect("the request under way completes");
    assert_eq!((reply.status, body(&reply).as_str()), (StatusCode::OK, "slow A"), "finished under version {v1}");
    assert_eq!(body(&at(&c, &setup.edges[0], "www.swap.test", "/slow").await), "slow B", "version {v2}");

    // Several clients on every edge while the documents change.
    let targets: Vec<(String, String)> = setup
        .edges
        .iter()
        .flat_map(|e| [(e.url(""), "www.swap.test".to_string()), (e.url(""), "static.swap.test".to_string())])
        .collect();
    let load = Load::start(4, targets, |_| "/obj".to_string());
    load.until_done_after(Instant::now(), 20).await;

    // Each PUT, timed from sending it to the last edge reporting the new version.
    // On a loaded 2-core CI machine one round can be slow for reasons of its own (the
    // whole suite runs in parallel), so the bound holds for the median of PUTS
    // rounds; every round must still end within the wait's 10 s.
    let mut took = Vec::new();
    let mut version = v2;
    for round in 0..PUTS {
        let to_b = round % 2 == 1;
        let (v, elapsed) = setup.apply(&doc(to_b)).await;
        assert!(v > version, "versions grow: {v} after {version}");
        version = v;
        took.push(elapsed);
        // Served by it at once, on every edge, without a restart.
        for edge in &setup.edges {
            let reply = at(&c, edge, "www.swap.test", "/obj").await;
            assert_eq!(body(&reply), if to_b { "B" } else { "A" }, "edge-{} after version {v}", last_octet(edge));
            assert_eq!(edge.metric("cdn_routing_version", &[]), v as f64);
            // The health of the site the document no longer has is gone.
            let (gone, kept) = if to_b {
                (("site-a", a.url()), ("site-b", b.url()))
            } else {
                (("site-b", b.url()), ("site-a", a.url()))
            };
            assert_eq!(origin_health(edge, gone.0, &gone.1), None, "{gone:?} after version {v}");
            assert_eq!(origin_health(edge, kept.0, &kept.1), Some(1.0), "{kept:?} after version {v}");
            assert_eq!(origin_health(edge, "static", &a.url()), Some(1.0));
        }
        load.until_done_after(Instant::now(), 10).await;
    }
    let samples = load.stop().await;
    took.sort();
    eprintln!("PUT → every edge reports it: {took:?}");
    let median = took[took.len() / 2];
    assert!(median <= Duration::from_secs(1), "median PUT → applied on 3 edges {median:?} > 1 s ({took:?})");

    // No failed request during the swaps, and only the two origins' answers.
    let failed: Vec<&String> = samples.iter().filter_map(|s| s.outcome.as_ref().err()).collect();
    assert!(failed.is_empty(), "{} of {} requests failed during the swaps: {failed:?}", failed.len(), samples.len());
    assert!(samples.iter().all(|s| matches!(s.outcome.as_deref(), Ok("A" | "B"))), "only A or B answered");
    assert!(samples.len() >= 20 + PUTS * 10, "the load ran: {} requests", samples.len());
    for edge in &setup.edges {
        // Observed for every document accepted after the edge started: all PUTS + 2.
        assert!(edge.metric("cdn_routing_apply_seconds_count", &[]) >= (PUTS + 2) as f64);
        assert!(edge.metric("cdn_routing_apply_seconds_sum", &[]) <= (PUTS + 2) as f64, "under a second each");
        assert!(!edge.task.is_finished(), "edge-{} still runs", last_octet(edge));
    }
    setup.stop().await;
    a.stop();
    b.stop();
}

// ---------------------------------------------------------------------------------
// 3. Origin pools: failover to the backup and back.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_primary_fails_over_to_the_backup_and_back() {
    const INTERVAL: Duration = Duration::from_millis(200);
    const FAILS: u32 = 2;
    const PASSES: u32 = 2;
    let routes = |origin: &MockOrigin, name: &str| {
        origin.route("/health", Route::ok("no-store", "ok"));
        origin.route("/obj", Route::ok("max-age=600", name.to_string()));
    };
    let primary = MockOrigin::start().await;
    let backup = MockOrigin::start().await;
    routes(&primary, "primary");
    routes(&backup, "backup");
    let (primary_url, backup_url) = (primary.url(), backup.url());
    let doc = json!({"sites": [{
        "name": "pool",
        "hosts": ["pool.test"],
        "origins": [{"url": primary_url}, {"url": backup_url, "backup": true, "host": "backup.internal"}],
        "health": {"path": "/health", "interval": "200ms", "timeout": "180ms", "fails": FAILS, "passes": PASSES}}]});
    let setup = Setup::start(&[121]).await;
    setup.apply(&doc).await;
    let edge = &setup.edges[0];
    wait::until("both origins up", Duration::from_secs(5), Duration::from_millis(20), async || {
        (origin_health(edge, "pool", &primary_url) == Some(1.0)
            && origin_health(edge, "pool", &backup_url) == Some(1.0))
        .then_some(())
    })
    .await;
    assert!(primary.hits("/health") >= 1, "the edge probes the primary");

    // Every request its own object (a fill each), so each one reaches an origin.
    let target = vec![(edge.url(""), "pool.test".to_string())];
    let load = Load::start(3, target, |n| format!("/obj?n={n}"));
    load.until_done_after(Instant::now(), 30).await;
    assert!(
        load.samples().iter().all(|s| s.outcome.as_deref() == Ok("primary")),
        "all from the primary while it is up"
    );
    let n = load.samples().last().unwrap().n;
    assert_eq!(primary.last_headers(&format!("/obj?n={n}"))["host"], "pool.test", "the client's Host by default");

    // Kill the primary (it stops accepting and drops its connections).
    let primary_addr = primary.addr;
    primary.stop();
    let killed = Instant::now();
    let bound = INTERVAL * FAILS + Duration::from_secs(1);
    let down = wait::until("the primary marked down", Duration::from_secs(10), Duration::from_millis(10), async || {
        (origin_health(edge, "pool", &primary_url) == Some(0.0)).then_some(killed.elapsed())
    })
    .await;
    load.until_done_after(killed + bound, 20).await;
    let samples = load.samples();
    // Requests in flight at the kill may lose their connection; every request sent
    // after it succeeds (a fill that cannot connect is retried on another origin).
    let failed: Vec<&Sample> = samples.iter().filter(|s| s.started >= killed && s.outcome.is_err()).collect();
    assert!(failed.is_empty(), "requests failed after the primary died: {failed:?}");
    let in_flight = samples.iter().filter(|s| s.started < killed && s.ended > killed && s.outcome.is_err()).count();
    let last_primary = samples.iter().filter(|s| s.outcome.as_deref() == Ok("primary")).map(|s| s.started).max();
    let failover = last_primary.map_or(Duration::ZERO, |t| t.saturating_duration_since(killed));
    eprintln!(
        "primary killed: marked down after {down:?}, last answer from it for a request sent {failover:?} after, {in_flight} in-flight requests lost"
    );
    assert!(failover <= bound, "requests reached the dead primary until {failover:?} > {bound:?}");
    assert!(down <= bound, "marked down after {down:?} > interval × fails + 1 s = {bound:?}");
    assert!(
        samples.iter().filter(|s| s.started >= killed + bound).all(|s| s.outcome.as_deref() == Ok("backup")),
        "all from the backup"
    );
    let n = samples.iter().rfind(|s| s.outcome.as_deref() == Ok("backup")).unwrap().n;
    assert_eq!(backup.last_headers(&format!("/obj?n={n}"))["host"], "backup.internal", "the backup's host override");
    assert_eq!(origin_health(edge, "pool", &backup_url), Some(1.0));
    let text = metrics::scrape(edge.admin).await;
    assert!(
        text.lines().any(|l| l.starts_with("cdn_origin_health{") && l.contains("site=\"pool\"") && l.ends_with(" 0")),
        "the admin listener's /metrics shows the primary down:\n{text}"
    );

    // A new document that keeps the pool (a rule added) keeps what the edge knows
    // of its origins: the primary is still down.
    let mut next = doc.clone();
    next["sites"][0]["rules"] = json!([{"path_prefix": "/unused/", "ttl": "1s"}]);
    setup.apply(&next).await;
    assert_eq!(origin_health(edge, "pool", &primary_url), Some(0.0), "a new document forgot the primary is down");

    // The primary comes back on its address: after `passes` good probes, requests
    // go to it again.
    let primary = MockOrigin::start_on(primary_addr).await;
    routes(&primary, "primary");
    let healed = Instant::now();
    let up =
        wait::until("the primary marked up again", Duration::from_secs(10), Duration::from_millis(10), async || {
            (origin_health(edge, "pool", &primary_url) == Some(1.0)).then_some(healed.elapsed())
        })
        .await;
    let back_bound = INTERVAL * PASSES + Duration::from_secs(2);
    load.until_done_after(healed + back_bound, 20).await;
    let samples = load.stop().await;
    let last_backup =
        samples.iter().filter(|s| s.started >= healed && s.outcome.as_deref() == Ok("backup")).map(|s| s.started).max();
    let back = last_backup.map_or(Duration::ZERO, |t| t.saturating_duration_since(healed));
    eprintln!("primary back: marked up after {up:?}, last request to the backup sent {back:?} after");
    assert!(up <= back_bound, "marked up after {up:?}");
    assert!(back <= back_bound, "requests still went to the backup {back:?} after the primary came back");
    assert!(samples.iter().filter(|s| s.started >= healed).all(|s| s.outcome.is_ok()), "no errors while healing");
    assert!(primary.hits("/health") >= PASSES as usize, "probed back to health");

    setup.stop().await;
    primary.stop();
    backup.stop();
}

// ---------------------------------------------------------------------------------
// 4. Live playlists: a 2 s rule over the origin's hour; segments keep a long ttl.

#[tokio::test]
async fn a_playlist_rule_expires_the_origins_hour_after_two_seconds() {
    let origin = MockOrigin::start().await;
    origin.route("/live/ch1/index.m3u8", Route::ok("max-age=3600", "#EXTM3U\n#EXT-X-MEDIA-SEQUENCE:100\n"));
    origin.route("/live/ch1/seg-100.m4s", Route::ok("max-age=60", "segment 100"));
    origin.route("/other.txt", Route::ok("max-age=60", "not under a rule"));
    let setup = Setup::start(&[131]).await;
    let edge = &setup.edges[0];
    origin.use_clock(edge.clock.clone());
    setup
        .apply(&json!({"sites": [{
            "name": "live",
            "hosts": ["live.test"],
            "origins": [{"url": origin.url()}],
            "rules": [
                {"path_suffix": ".m3u8", "ttl": "2s"},
                {"path_prefix": "/live/", "path_suffix": ".m4s", "ttl": "1d"}]}]}))
        .await;
    let c = client();
    let (playlist, segment) = ("/live/ch1/index.m3u8", "/live/ch1/seg-100.m4s");
    for path in [playlist, segment, "/other.txt"] {
        assert_eq!(at(&c, edge, "live.test", path).await.x_cache(), "MISS", "{path}");
    }
    let reply = at(&c, edge, "live.test", playlist).await;
    assert_eq!(reply.x_cache(), "HIT");
    assert_eq!(reply.header("cache-control"), "max-age=3600", "clients still get the origin's Cache-Control");

    // `Date` has whole seconds, so the stored age starts anywhere in [0, 1) s: 0.9 s
    // on it is fresh whatever it was, 2.1 s on it is stale.
    edge.clock.advance(Duration::from_millis(900));
    assert_eq!(at(&c, edge, "live.test", playlist).await.x_cache(), "HIT", "fresh for 2 s");
    assert_eq!(origin.hits(playlist), 1);
    edge.clock.advance(Duration::from_millis(1200));
    let reply = at(&c, edge, "live.test", playlist).await;
    assert_ne!(reply.x_cache(), "HIT", "stale after 2 s although the origin said an hour");
    assert_eq!(origin.hits(playlist), 2, "the next request went to the origin");
    assert_eq!(at(&c, edge, "live.test", playlist).await.x_cache(), "HIT", "and is fresh again");

    // Two minutes on: the segment rule's day beats the origin's 60 s; a path under
    // no rule keeps the origin's word.
    edge.clock.advance(Duration::from_secs(120));
    assert_eq!(at(&c, edge, "live.test", segment).await.x_cache(), "HIT", "a day, by rule");
    assert_eq!(origin.hits(segment), 1);
    assert_ne!(at(&c, edge, "live.test", "/other.txt").await.x_cache(), "HIT", "the origin's 60 s");
    assert_eq!(origin.hits("/other.txt"), 2);

    // Rules apply when a stored object is looked up: a new document changes what is
    // already cached. Now playlists are kept an hour, and segments fall back to the
    // origin's 60 s (this one is 2 minutes old).
    assert_ne!(at(&c, edge, "live.test", playlist).await.x_cache(), "HIT", "2 minutes on");
    setup
        .apply(&json!({"sites": [{
            "name": "live",
            "hosts": ["live.test"],
            "origins": [{"url": origin.url()}],
            "rules": [{"path_suffix": ".m3u8", "ttl": "1h"}]}]}))
        .await;
    edge.clock.advance(Duration::from_secs(3));
    assert_eq!(at(&c, edge, "live.test", playlist).await.x_cache(), "HIT", "an hour now");
    assert_eq!(origin.hits(playlist), 3);
    assert_ne!(at(&c, edge, "live.test", segment).await.x_cache(), "HIT", "the origin's 60 s now");
    assert_eq!(origin.hits(segment), 2);

    setup.stop().await;
    origin.stop();
}

// ---------------------------------------------------------------------------------
// 5. Rules: ignored query parameters, bypass, negative_ttl, CORS, stale_if_error.

#[tokio::test]
async fn rules_ignore_parameters_bypass_cache_404s_answer_preflights_and_serve_stale() {
    let origin = MockOrigin::start().await;
    origin.route("/q/page", Route::ok("max-age=600", "page"));
    origin.route("/api/data", Route::ok("max-age=600", "data"));
    origin.route("/static/app.js", Route::ok("max-age=600", "js"));
    origin.route("/stale/obj", Route::ok("max-age=1", "good"));
    origin.route("/stale/two", Route::ok("max-age=1", "two"));
    let setup = Setup::start(&[141]).await;
    let edge = &setup.edges[0];
    origin.use_clock(edge.clock.clone());
    setup
        .apply(&json!({"sites": [{
            "name": "rules",
            "hosts": ["rules.test"],
            "origins": [{"url": origin.url()}],
            "rules": [
                {"path_prefix": "/api/", "bypass": true},
                {"path_prefix": "/static/", "cors": true},
                {"path_prefix": "/stale/", "stale_if_error": "1h"},
                {"path_prefix": "/missing/", "negative_ttl": "10s"},
                {"path_prefix": "/q/", "query": {"ignore": ["utm_*", "fbclid"]}}]}]}))
        .await;
    let c = client();
    let get = |path: &'static str| at(&c, edge, "rules.test", path);

    // Ignored parameters: one object, and the origin never sees them.
    let first = get("/q/page?utm_source=a&x=1").await;
    assert_eq!((first.status, first.x_cache()), (StatusCode::OK, "MISS"));
    for path in ["/q/page?x=1&utm_source=b", "/q/page?utm_medium=c&x=1&fbclid=zz", "/q/page?x=1"] {
        let reply = get(path).await;
        assert_eq!((body(&reply).as_str(), reply.x_cache()), ("page", "HIT"), "{path} shares the object");
    }
    assert_eq!(
        origin.requests().iter().filter(|(p, _)| p.starts_with("/q/")).cloned().collect::<Vec<_>>(),
        [("/q/page?x=1".to_string(), 1)]
    );
    assert_eq!(get("/q/page?x=2&utm_source=a").await.x_cache(), "MISS", "other parameters still count");
    assert_eq!(origin.hits("/q/page?x=2"), 1);
    get("/q/page?utm_source=only").await;
    let sent: Vec<String> = origin.requests().into_iter().map(|(p, _)| p).collect();
    assert!(!sent.iter().any(|p| p.contains("utm_") || p.contains("fbclid")), "ignored parameters were sent: {sent:?}");

    // Bypass: the origin's max-age notwithstanding, every request reaches it.
    for _ in 0..3 {
        let reply = get("/api/data").await;
        assert_eq!((body(&reply).as_str(), reply.x_cache()), ("data", "BYPASS"));
    }
    assert_eq!(origin.hits("/api/data"), 3, "never stored");

    // CORS: a preflight is answered at the edge; other responses get the headers.
    let preflight = send(
        &c,
        Method::OPTIONS,
        &edge.url("/static/app.js"),
        &[
            ("host", "rules.test"),
            ("origin", "https://app.example"),
            ("access-control-request-method", "GET"),
            ("access-control-request-headers", "x-player"),
        ],
    )
    .await;
    assert_eq!(preflight.status, StatusCode::NO_CONTENT);
    assert_eq!(preflight.header("access-control-allow-origin"), "*");
    assert!(preflight.header("access-control-allow-methods").contains("GET"), "{:?}", preflight.headers);
    assert!(preflight.header("access-control-allow-headers").to_ascii_lowercase().contains("x-player"));
    assert_eq!(preflight.header("access-control-max-age"), "86400");
    assert_eq!(origin.hits("/static/app.js"), 0, "the origin never saw the preflight");
    let reply = at(&c, edge, "rules.test", "/static/app.js").await;
    assert_eq!(reply.header("access-control-allow-origin"), "*");
    assert!(reply.header("access-control-expose-headers").contains("Cache-Status"), "{:?}", reply.headers);

    // negative_ttl: a 404 (no freshness from the origin) is kept 10 s.
    for _ in 0..2 {
        assert_eq!(get("/missing/thing").await.status, StatusCode::NOT_FOUND);
    }
    assert_eq!(origin.hits("/missing/thing"), 1, "the 404 was stored");
    edge.clock.advance(Duration::from_secs(11));
    assert_eq!(get("/missing/thing").await.status, StatusCode::NOT_FOUND);
    assert_eq!(origin.hits("/missing/thing"), 2, "and expired after 10 s");

    // stale_if_error by rule: the origin fails after the objects went stale, with a
    // 500, then by not answering at all.
    assert_eq!(body(&get("/stale/obj").await), "good");
    assert_eq!(body(&get("/stale/two").await), "two");
    edge.clock.advance(Duration::from_secs(5));
    origin.route("/stale/obj", Route::ok("no-store", "broken").status(500));
    let reply = get("/stale/obj").await;
    assert_eq!((reply.status, body(&reply).as_str(), reply.x_cache()), (StatusCode::OK, "good", "STALE"));
    assert_eq!(origin.hits("/stale/obj"), 2, "the origin was asked");
    origin.stop();
    let reply = get("/stale/two").await;
    assert_eq!((reply.status, body(&reply).as_str(), reply.x_cache()), (StatusCode::OK, "two", "STALE"), "origin down");
    // Beyond the rule's hour, the error goes through.
    edge.clock.advance(Duration::from_secs(3700));
    assert_eq!(get("/stale/two").await.status, StatusCode::BAD_GATEWAY);

    setup.stop().await;
    origin.stop();
}

/// A 200 without any caching header.
fn no_freshness(body: &'static str) -> Route {
    Route { headers: Vec::new(), ..Route::ok("", body) }
}

#[tokio::test]
async fn a_ttl_rule_stores_what_the_origin_left_open_but_not_what_it_forbids() {
    let origin = MockOrigin::start().await;
    origin.route("/ttl/plain", no_freshness("plain"));
    origin.route("/ttl/no-store", Route::ok("no-store", "no-store"));
    origin.route("/ttl/private", Route::ok("private, max-age=600", "private"));
    origin.route("/ttl/cookie", no_freshness("cookie").header("set-cookie", "session=1"));
    origin.route("/swr/obj", Route::ok("max-age=1", "swr"));
    origin.route("/all/p", Route::ok("max-age=600", "all"));
    let setup = Setup::start(&[145]).await;
    let edge = &setup.edges[0];
    origin.use_clock(edge.clock.clone());
    setup
        .apply(&json!({"sites": [{
            "name": "ttl",
            "hosts": ["ttl.test"],
            "origins": [{"url": origin.url()}],
            "rules": [
                {"path_prefix": "/ttl/", "ttl": "1h"},
                {"path_prefix": "/swr/", "stale_while_revalidate": "1h"},
                {"path_prefix": "/all/", "query": {"ignore": ["*"]}}]}]}))
        .await;
    let c = client();
    let get = |path: &'static str| at(&c, edge, "ttl.test", path);

    // Without freshness information the rule's ttl makes it storable; no-store,
    // private and Set-Cookie still keep it out of the cache.
    for _ in 0..3 {
        for path in ["/ttl/plain", "/ttl/no-store", "/ttl/private", "/ttl/cookie"] {
            assert_eq!(get(path).await.status, StatusCode::OK, "{path}");
        }
    }
    assert_eq!(get("/ttl/plain").await.x_cache(), "HIT");
    assert_eq!(origin.hits("/ttl/plain"), 1, "stored for the rule's hour");
    for path in ["/ttl/no-store", "/ttl/private", "/ttl/cookie"] {
        assert_eq!(origin.hits(path), 3, "{path}: never stored");
    }

    // stale_while_revalidate by rule: served stale at once, refreshed behind.
    assert_eq!(body(&get("/swr/obj").await), "swr");
    edge.clock.advance(Duration::from_secs(5));
    let reply = get("/swr/obj").await;
    assert_eq!((body(&reply).as_str(), reply.x_cache()), ("swr", "STALE"), "{:?}", reply.headers);
    wait::until("the background refresh", Duration::from_secs(5), Duration::from_millis(10), async || {
        (origin.hits("/swr/obj") == 2).then_some(())
    })
    .await;

    // `*` drops the whole query, from the key and from what the origin is asked.
    for path in ["/all/p?a=1", "/all/p?b=2&c=3", "/all/p"] {
        assert_eq!(body(&get(path).await), "all", "{path}");
    }
    let all: Vec<(String, usize)> = origin.requests().into_iter().filter(|(p, _)| p.starts_with("/all/")).collect();
    assert_eq!(all, [("/all/p".to_string(), 1)]);

    setup.stop().await;
    origin.stop();
}

// ---------------------------------------------------------------------------------
// HTTP/3 (and HTTPS) names the host in `:authority`; the scheme is in the key.

#[tokio::test]
async fn http3_requests_are_routed_by_their_authority() {
    let (local, other) = (MockOrigin::start().await, MockOrigin::start().await);
    local.route("/x", Route::ok("max-age=600", "localhost's site"));
    other.route("/x", Route::ok("max-age=600", "the default site"));
    let setup = Setup::start(&[]).await;
    let seed = setup.control.cluster.gossip_addr();
    let edge = cdn_test_support::edge::start_tls_edge(&setup.implicit.url(), |c| {
        c.node_id = "edge-157".into();
        let mut cluster = ClusterConfig::new(any(), SECRET);
        cluster.seeds = vec![seed.to_string()];
        c.cluster = Some(cluster);
    })
    .await;
    wait_for_edges(&setup.control, &["edge-157"]).await;
    let version = put(
        &setup.control,
        &json!({"default_site": "other", "sites": [
            {"name": "local", "hosts": ["localhost"], "origins": [{"url": local.url()}]},
            {"name": "other", "hosts": ["other.test"], "origins": [{"url": other.url()}]}]}),
    )
    .await;
    wait_applied(&setup.control, version, &["edge-157".to_string()]).await;

    let mut h3 = cdn_test_support::http3::H3Client::connect(edge.h3.unwrap()).await;
    let reply = h3.get("/x", &[]).await;
    assert_eq!((reply.status, body(&reply).as_str(), reply.x_cache()), (StatusCode::OK, "localhost's site", "MISS"));
    assert_eq!(h3.get("/x", &[]).await.x_cache(), "HIT");
    // Over HTTP/1.1 (plain) the same host and path is another key (the scheme).
    let reply = get(&client(), &edge.url("/x"), &[("host", "localhost")]).await;
    assert_eq!((body(&reply).as_str(), reply.x_cache()), ("localhost's site", "MISS"));
    assert_eq!(local.hits("/x"), 2);
    // HTTPS with h2 by ALPN: the URL's authority (127.0.0.1) is no site's: the default.
    let reply = get(&cdn_test_support::client::tls_client(), &format!("https://{}/x", edge.https.unwrap()), &[]).await;
    assert_eq!((reply.version, body(&reply).as_str()), (http::Version::HTTP_2, "the default site"));

    edge.stop().await;
    setup.stop().await;
    local.stop();
    other.stop();
}

// ---------------------------------------------------------------------------------
// Origin pools without probes: weights, passive marks, the retry.

#[tokio::test]
async fn primaries_share_by_weight_and_a_refused_origin_is_marked_down_passively() {
    const REQUESTS: usize = 90;
    let (heavy, light, live) = (MockOrigin::start().await, MockOrigin::start().await, MockOrigin::start().await);
    for (origin, name) in [(&heavy, "heavy"), (&light, "light"), (&live, "live")] {
        origin.route("/obj", Route::ok("max-age=600", name));
    }
    // An address nothing listens on any more.
    let dead = MockOrigin::start().await;
    let dead_url = dead.url();
    dead.stop();
    let setup = Setup::start(&[151]).await;
    setup
        .apply(&json!({"sites": [
            {"name": "weighted", "hosts": ["weighted.test"],
             "origins": [{"url": heavy.url(), "weight": 2}, {"url": light.url(), "weight": 1}]},
            {"name": "passive", "hosts": ["passive.test"],
             "origins": [{"url": dead_url}, {"url": live.url()}],
             "rules": [{"path_prefix": "/api/", "bypass": true}]}]}))
        .await;
    let edge = &setup.edges[0];
    let c = client();

    // Weighted round robin: two to one (a random choice by weight would land within
    // this bound too, nearly always; an even split or one origin only would not).
    for n in 0..REQUESTS {
        let reply = at(&c, edge, "weighted.test", &format!("/obj?n={n}")).await;
        assert_eq!(reply.status, StatusCode::OK);
    }
    let count = |origin: &MockOrigin| origin.requests().iter().filter(|(p, _)| p.starts_with("/obj")).count();
    let (h, l) = (count(&heavy), count(&light));
    eprintln!("weights 2:1 over {REQUESTS} fills: {h} and {l}");
    assert_eq!(h + l, REQUESTS);
    assert!((50..=70).contains(&h), "heavy got {h} of {REQUESTS}, light {l}");

    // No health probes: a refused connection marks the origin down, and the request
    // is retried on the other one, so no client sees the failure: a request that
    // bypasses the cache (two in a row: one of them is sent to the dead origin
    // first), then fills.
    live.route("/api/obj", Route::ok("no-store", "live api"));
    for _ in 0..2 {
        let reply = at(&c, edge, "passive.test", "/api/obj").await;
        assert_eq!((reply.status, body(&reply).as_str(), reply.x_cache()), (StatusCode::OK, "live api", "BYPASS"));
    }
    assert_eq!(origin_health(edge, "passive", &dead_url), Some(0.0), "marked down by the refused connection");
    for n in 0..10 {
        let reply = at(&c, edge, "passive.test", &format!("/obj?n={n}")).await;
        assert_eq!((reply.status, body(&reply).as_str()), (StatusCode::OK, "live"), "request {n}");
    }
    assert_eq!(count(&live), 10);
    assert_eq!(origin_health(edge, "passive", &dead_url), Some(0.0), "down for 10 s");
    assert_eq!(origin_health(edge, "passive", &live.url()), Some(1.0));
    assert_eq!(origin_health(edge, "weighted", &heavy.url()), Some(1.0));

    setup.stop().await;
    for origin in [heavy, light, live] {
        origin.stop();
    }
}

// ---------------------------------------------------------------------------------
// HTTPS origins: `ca` is the only trust.

#[tokio::test]
async fn an_https_origin_is_trusted_through_its_ca_only() {
    let dir = tempfile::tempdir().unwrap();
    let ip: std::net::IpAddr = [127, 0, 0, 1].into();
    let (cert, key) = cdn_node::tls::self_signed_pem(&["origin.test".to_string()], &[ip]).unwrap();
    let (other_cert, _) = cdn_node::tls::self_signed_pem(&["origin.test".to_string()], &[ip]).unwrap();
    std::fs::write(dir.path().join("cert.pem"), &cert).unwrap();
    std::fs::write(dir.path().join("key.pem"), &key).unwrap();
    let origin = cdn_test_support::origin::start_with(|config| {
        config.listen.https = Some(any());
        config.tls = Some(cdn_node::tls::TlsConfig {
            cert: Some(dir.path().join("cert.pem")),
            key: Some(dir.path().join("key.pem")),
            ..Default::default()
        });
    })
    .await;
    let url = format!("https://{}", origin.https.unwrap());
    let setup = Setup::start(&[155]).await;
    setup
        .apply(&json!({"sites": [
            {"name": "trusted", "hosts": ["trusted.test"], "origins": [{"url": url, "ca": cert}]},
            {"name": "other-ca", "hosts": ["other-ca.test"], "origins": [{"url": url, "ca": other_cert}]},
            {"name": "no-ca", "hosts": ["no-ca.test"], "origins": [{"url": url}]}]}))
        .await;
    let edge = &setup.edges[0];
    let c = client();
    let reply = at(&c, edge, "trusted.test", "/hello.txt").await;
    assert_eq!((reply.status, body(&reply).as_str()), (StatusCode::OK, "hello, world\n"), "through its CA");
    for host in ["other-ca.test", "no-ca.test"] {
        let reply = at(&c, edge, host, "/hello.txt").await;
        assert_eq!(reply.status, StatusCode::BAD_GATEWAY, "{host}: a certificate its CA did not sign");
    }
    setup.stop().await;
    origin.stop().await.unwrap();
}

// ---------------------------------------------------------------------------------
// 6. A bad document changes nothing.

#[tokio::test]
async fn a_bad_document_is_refused_and_edges_keep_the_old_one() {
    let (a, b) = (MockOrigin::start().await, MockOrigin::start().await);
    a.route("/fresh", Route::ok("no-store", "A"));
    b.route("/fresh", Route::ok("no-store", "B"));
    let setup = Setup::start(&[161, 162]).await;
    let good = json!({"sites": [{"name": "good", "hosts": ["good.test"], "origins": [{"url": a.url()}]}]});

    // Applied with the operators' command, waiting for the edges.
    let file = setup.data.path().join("routing-upload.json");
    std::fs::write(&file, good.to_string()).unwrap();
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_cdn"))
        .args(["routing", "apply"])
        .arg(&file)
        .args(["--wait", "--timeout", "15s"])
        .env("CDN_CONTROL", format!("http://{}", setup.control.api))
        .env("CDN_TOKEN", TOKEN)
        .env("RUST_LOG", "warn")
        .kill_on_drop(true)
        .output()
        .await
        .unwrap();
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{stdout}{stderr}");
    assert!(stdout.contains("version 1 applied on 2 edges"), "{stdout}");
    let c = client();
    for edge in &setup.edges {
        assert_eq!(body(&at(&c, edge, "good.test", "/fresh").await), "A");
    }

    // Each would send good.test to origin b; each is refused, naming the field.
    let mut bad_meaning = json!({"default_site": "nope", "sites": [
        {"name": "good", "hosts": ["good.test"], "origins": [{"url": b.url()}]}]});
    let mut bad_rule = bad_meaning.clone();
    bad_rule["default_site"] = json!("good");
    bad_rule["sites"][0]["rules"] = json!([{"path_prefix": "/", "bypass": true, "ttl": "1h"}]);
    let mut secret = bad_rule.clone();
    secret["sites"][0]["rules"] = json!([]);
    secret["sites"][0]["origins"][0]["url"] = json!(b.url().replace("http://", "http://user:pw@"));
    for (doc, field) in [
        (bad_meaning.clone(), "default_site"),
        (bad_rule, "sites[0].rules[0].ttl"),
        (secret, "sites[0].origins[0].url"),
    ] {
        let (status, reply) = put_raw(&setup.control, &doc.to_string()).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{doc}: {reply}");
        let problems = reply["problems"].as_array().cloned().unwrap_or_default();
        assert!(problems.iter().any(|p| p.as_str().is_some_and(|p| p.starts_with(field))), "{field} in {reply}");
    }
    bad_meaning["sites"] = json!("not a list");
    let (status, _) = put_raw(&setup.control, &bad_meaning.to_string()).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(routing_view(&setup.control).await["version"], 1, "the version is unchanged");

    // For longer than the edges take to follow a document (they also look every
    // 500 ms), they keep version 1 and its behaviour. A negative check: it needs time.
    let until = Instant::now() + Duration::from_millis(1500);
    while Instant::now() < until {
        let view = routing_view(&setup.control).await;
        for id in setup.edge_ids() {
            assert_eq!(view["edges"][id.as_str()], 1, "{view}");
        }
        for edge in &setup.edges {
            assert_eq!(body(&at(&c, edge, "good.test", "/fresh").await), "A", "still served by version 1");
            assert_eq!(at(&c, edge, "other.test", "/fresh").await.status, StatusCode::MISDIRECTED_REQUEST);
            assert_eq!(edge.metric("cdn_routing_version", &[]), 1.0);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(b.hits("/fresh"), 0, "nothing reached the refused documents' origin");
    setup.stop().await;
    a.stop();
    b.stop();
}

// ---------------------------------------------------------------------------------
// 7. A control node restarts: the document stays, and edges serve by it meanwhile.

/// A bare cluster member (role geo, so it counts as no edge) that watches the view.
struct Observer {
    cluster: Arc<Cluster>,
    shutdown: CancellationToken,
}

impl Observer {
    async fn join(seed: SocketAddr) -> Self {
        let mut config = ClusterConfig::new(any(), SECRET);
        config.seeds = vec![seed.to_string()];
        let node = NodeInfo {
            node_id: "observer".into(),
            role: Role::Geo,
            region: None,
            location: None,
            public_addr: None,
            admin: None,
        };
        let shutdown = CancellationToken::new();
        let cluster = Cluster::join(&config, node, &Registry::new(), shutdown.clone()).await.expect("joins");
        Self { cluster, shutdown }
    }

    async fn wait_for(&self, node: &str, state: MemberState) {
        wait::until(&format!("{node} {state:?}"), Duration::from_secs(20), Duration::from_millis(50), async || {
            self.cluster.members().iter().any(|m| m.node_id == node && m.state == state).then_some(())
        })
        .await;
    }

    async fn stop(self) {
        self.shutdown.cancel();
        self.cluster.stopped().await;
    }
}

#[tokio::test]
async fn a_restarted_control_node_keeps_the_document_and_edges_keep_serving_by_it() {
    let (a, b) = (MockOrigin::start().await, MockOrigin::start().await);
    a.route("/fresh", Route::ok("no-store", "A"));
    b.route("/fresh", Route::ok("no-store", "B"));
    let Setup { control, edges, implicit, data } = Setup::start(&[171, 172]).await;
    let edge_ids = ids(&[171, 172]);
    let doc = |origin: &MockOrigin| json!({"sites": [{"name": "kept", "hosts": ["kept.test"], "origins": [{"url": origin.url()}]}]});
    let v1 = put(&control, &doc(&a)).await;
    wait_applied(&control, v1, &edge_ids).await;
    let observer = Observer::join(control.cluster.gossip_addr()).await;
    observer.wait_for("control-1", MemberState::Alive).await;
    let c = client();
    let serving_by_v1 = async || {
        for edge in &edges {
            let reply = at(&c, edge, "kept.test", "/fresh").await;
            assert_eq!((reply.status, body(&reply).as_str()), (StatusCode::OK, "A"), "edge-{}", last_octet(edge));
            assert_eq!(at(&c, edge, "elsewhere.test", "/fresh").await.status, StatusCode::MISDIRECTED_REQUEST);
            assert_eq!(edge.metric("cdn_routing_version", &[]), v1 as f64);
        }
    };
    serving_by_v1().await;

    // Control down, long enough to be declared dead: no live control node holds a
    // document now, and the edges keep the one they serve by.
    let (api_addr, gossip) = (control.api, control.cluster.gossip_addr());
    control.stop().await;
    observer.wait_for("control-1", MemberState::Dead).await;
    serving_by_v1().await;
    let served_through = a.hits("/fresh");

    // Back on the same data directory: the same document and version, the edges'
    // reports, and the next document goes on from there.
    let control = TestControl::start(data.path(), api_addr, gossip).await;
    let view = routing_view(&control).await;
    assert_eq!(view["version"], v1, "{view}");
    assert_eq!(view["routing"]["sites"][0]["name"], "kept", "{view}");
    wait_applied(&control, v1, &edge_ids).await;
    serving_by_v1().await;
    let v2 = put(&control, &doc(&b)).await;
    assert_eq!(v2, v1 + 1);
    wait_applied(&control, v2, &edge_ids).await;
    for edge in &edges {
        assert_eq!(body(&at(&c, edge, "kept.test", "/fresh").await), "B", "edge-{}", last_octet(edge));
    }
    assert!(served_through >= 4);

    observer.stop().await;
    for edge in edges {
        edge.stop().await;
    }
    control.stop().await;
    for origin in [a, b, implicit] {
        origin.stop();
    }
}

// ---------------------------------------------------------------------------------
// 8. An edge started after the PUT is ready only with the document.

/// A document large enough to travel in several gossip chunks (15 KiB each): the
/// `late` site plus filler sites.
fn large_document(origin: &str) -> Value {
    let mut sites = vec![json!({"name": "late", "hosts": ["late.test"], "origins": [{"url": origin}],
                                "rules": [{"path_suffix": ".m3u8", "ttl": "2s"}]})];
    for i in 0..300 {
        sites.push(json!({
            "name": format!("filler-{i:03}"),
            "hosts": [format!("filler-{i:03}.example.test"), format!("*.filler-{i:03}.example.test")],
            "origins": [{"url": "http://127.0.0.1:1"}]}));
    }
    json!({"sites": sites})
}

#[tokio::test]
async fn an_edge_started_after_the_put_is_ready_only_with_the_document() {
    let origin = MockOrigin::start().await;
    origin.route("/hello", Route::ok("no-store", "hello from the document's origin"));
    // One edge first, so the control node has heard a member and takes the PUT at once.
    let setup = Setup::start(&[181]).await;
    let doc = large_document(&origin.url());
    assert!(doc.to_string().len() > 2 * 15 * 1024, "several chunks");
    let (version, _) = setup.apply(&doc).await;

    // A `cdn edge` process, no [origin]: the document is all it serves by.
    let dir = tempfile::tempdir().unwrap();
    let (http, admin) =
        (SocketAddr::from(([127, 0, 0, 183], free_port())), SocketAddr::from(([127, 0, 0, 183], free_port())));
    let config = dir.path().join("edge.toml");
    write_edge_config(&config, "edge-183", http, admin, setup.control.cluster.gossip_addr());
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_cdn"))
        .args(["edge", "--config"])
        .arg(&config)
        .env("RUST_LOG", "info")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("cdn edge starts");
    let output = capture_output(&mut child);
    let log = || output.lock().unwrap().clone();

    // Poll /readyz; at the first 200 the document is applied, and a request routed
    // by it succeeds right away.
    let c = client();
    let readyz = format!("http://{admin}/readyz");
    let started = Instant::now();
    let (mut not_ready, mut applied) = (0, None);
    loop {
        assert!(started.elapsed() < Duration::from_secs(20), "the late edge never became ready:\n{}", log());
        if let Ok(status) = child.try_wait() {
            assert!(status.is_none(), "the late edge exited ({status:?}):\n{}", log());
        }
        match try_get(&c, &readyz, &admin.to_string()).await {
            Ok(reply) if reply.status == StatusCode::OK => break,
            Ok(reply) => {
                not_ready += 1;
                if applied.is_none() && body(&reply).trim() == "not ready: origin" {
                    // Routing and purges are done: the document was applied.
                    applied = Some(started.elapsed());
                }
            }
            Err(_) => {}
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let ready = started.elapsed();
    let reply = get(&c, &format!("http://{http}/hello"), &[("host", "late.test")]).await;
    let metrics = metrics::scrape(admin).await;
    eprintln!(
        "late edge ready after {ready:?} ({not_ready} answers 'not ready' before; waiting only for 'origin' from {applied:?})"
    );
    // Once the document is applied, only the origin check is left, and an unready
    // edge repeats it every second (it was every 5 s: ready 5 s after start).
    if let Some(applied) = applied {
        assert!(ready - applied <= Duration::from_secs(3), "ready {ready:?}, document applied by {applied:?}");
    }
    assert_eq!(
        (reply.status, body(&reply).as_str()),
        (StatusCode::OK, "hello from the document's origin"),
        "right when ready:\n{}",
        log()
    );
    assert_eq!(metrics::sum(&metrics, "cdn_routing_version", &[]), version as f64, "ready with the document");
    let reply = get(&c, &format!("http://{http}/hello"), &[("host", "filler-007.example.test")]).await;
    assert_eq!(reply.status, StatusCode::BAD_GATEWAY, "a filler site (its origin is not there)");
    assert_eq!(
        get(&c, &format!("http://{http}/hello"), &[("host", "nowhere.test")]).await.status,
        StatusCode::MISDIRECTED_REQUEST
    );
    wait_applied(&setup.control, version, &["edge-183".to_string()]).await;

    child.start_kill().unwrap();
    let _ = child.wait().await;
    setup.stop().await;
    origin.stop();
}

fn write_edge_config(path: &Path, node_id: &str, http: SocketAddr, admin: SocketAddr, seed: SocketAddr) {
    let ip = http.ip();
    std::fs::write(
        path,
        format!(
            r#"node_id = "{node_id}"
region = "late"
[listen]
http = "{http}"
admin = "{admin}"
[cluster]
listen = "{ip}:0"
seeds = ["{seed}"]
secret = "{SECRET}"
"#
        ),
    )
    .unwrap();
}
