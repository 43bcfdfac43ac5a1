//! The control path on loopback: a control node and three edges in a gossip
//! cluster; purges by URL, prefix, tag and everything reach every edge; routing;
//! durability across restarts; authentication.
//!
//! Faults and security, in modules: `disk_full` (the purge log on a full tmpfs),
//! `lossy` (packet loss and partitions between control and edges), `security`
//! (TLS for the API, the admin listener's address, no secrets in logs or metrics);
//! `process` runs a control node as a real process; `routing` is the routing
//! document's API, versions, durability and agreement between control nodes;
//! `edge_routing` is the edges applying it (sites, origin pools, rules) with real
//! servers; `tiers` is tiered caching (shields, in-region sharing, loops, purges
//! through shields) with real servers.

mod acme;
mod disk_full;
mod edge_routing;
mod lossy;
mod process;
mod routing;
mod security;
mod signing;
mod tiers;

use std::{net::SocketAddr, time::Duration};

use cdn_cluster::{ClusterConfig, MemberState};
use cdn_test_support::{
    client::{client, get},
    control::{SECRET, TOKEN, TestControl, api, wait_for_edges, wait_for_state},
    edge::TestEdge,
    geo::dig as dig_at,
    mock_origin::{MockOrigin, Route},
    net::free_port,
};
use http::{Method, StatusCode};
use prometheus::Registry;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

/// Purges and waits until every edge applied it; returns the purge's id.
async fn purge(control: &TestControl, body: Value) -> String {
    let (status, reply) =
        api(Method::POST, &format!("http://{}/v1/purge", control.api), Some(TOKEN), Some(&body.to_string())).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{reply}");
    let id = reply["id"].as_str().unwrap().to_string();
    for _ in 0..100 {
        let (_, status) = api(Method::GET, &format!("http://{}/v1/purge/{id}", control.api), Some(TOKEN), None).await;
        if status["status"] == "complete" && status["completed_ms"].is_u64() {
            assert!(status["completed_ms"].as_u64().unwrap() < 1000, "{status}");
            return id;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("purge {id} did not complete");
}

#[tokio::test]
async fn purges_reach_every_edge_and_survive_restarts() {
    let origin = MockOrigin::start().await;
    for path in ["/a", "/other", "/v/one", "/v/two", "/tagged", "/soft"] {
        let route = Route::ok("max-age=600", format!("body of {path}")).header("etag", "\"e1\"").revalidate();
        let route = if path == "/tagged" { route.header("surrogate-key", "video home") } else { route };
        origin.route(path, route);
    }
    let data = tempfile::tempdir().unwrap();
    let control = TestControl::start(data.path(), "127.0.0.1:0".parse().unwrap(), "127.0.0.1:0".parse().unwrap()).await;
    let seed = control.cluster.gossip_addr();
    let mut edges = Vec::new();
    for last in [21u8, 22, 23] {
        edges.push(TestEdge::join([127, 0, 0, last], &origin.url(), seed, SECRET).await);
    }
    wait_for_edges(&control, &["edge-21", "edge-22", "edge-23"]).await;
    let c = client();
    let warm = |paths: &'static [&'static str]| {
        let c = c.clone();
        let urls: Vec<Vec<String>> = edges.iter().map(|e| paths.iter().map(|p| e.url(p)).collect()).collect();
        async move {
            for edge_urls in urls {
                for url in edge_urls {
                    get(&c, &url, &[]).await;
                    assert_eq!(get(&c, &url, &[]).await.x_cache(), "HIT", "{url}");
                }
            }
        }
    };
    let all_paths: &'static [&'static str] = &["/a", "/other", "/v/one", "/v/two", "/tagged", "/soft"];
    warm(all_paths).await;
    let x_cache = |path: &'static str| {
        let c = c.clone();
        let urls: Vec<String> = edges.iter().map(|e| e.url(path)).collect();
        async move {
            let mut out = Vec::new();
            for url in urls {
                out.push(get(&c, &url, &[]).await.x_cache().to_string());
            }
            out
        }
    };

    // By URL (the key's host is the edge's address: purge that URL on each edge).
    for edge in &edges {
        purge(&control, json!({ "urls": [format!("https://{}/a", edge.http.ip())] })).await;
    }
    assert_eq!(x_cache("/a").await, ["MISS"; 3]);
    assert_eq!(x_cache("/other").await, ["HIT"; 3], "unrelated objects stay");
    // By prefix.
    let prefixes: Vec<String> = edges.iter().map(|e| format!("{}/v/", e.http.ip())).collect();
    purge(&control, json!({ "prefixes": prefixes })).await;
    assert_eq!(x_cache("/v/one").await, ["MISS"; 3]);
    assert_eq!(x_cache("/v/two").await, ["MISS"; 3]);
    assert_eq!(x_cache("/other").await, ["HIT"; 3]);
    // By tag.
    purge(&control, json!({ "tags": ["video"] })).await;
    assert_eq!(x_cache("/tagged").await, ["MISS"; 3]);
    assert_eq!(x_cache("/other").await, ["HIT"; 3]);
    // Soft: the next request revalidates (the origin answers 304).
    let soft: Vec<String> = edges.iter().map(|e| format!("http://{}/soft", e.http.ip())).collect();
    purge(&control, json!({ "urls": soft, "soft": true })).await;
    assert_eq!(x_cache("/soft").await, ["REVALIDATED"; 3]);
    assert_eq!(x_cache("/soft").await, ["HIT"; 3]);
    // Everything.
    let last_id = purge(&control, json!({ "all": true })).await;
    assert_eq!(x_cache("/other").await, ["MISS"; 3]);

    // Bad input changes nothing; no token is refused.
    let url = format!("http://{}/v1/purge", control.api);
    for (token, body, want) in [
        (None, r#"{"all": true}"#, StatusCode::UNAUTHORIZED),
        (Some("wrong-token-0123456789"), r#"{"all": true}"#, StatusCode::UNAUTHORIZED),
        (Some(TOKEN), "{not json", StatusCode::BAD_REQUEST),
        (Some(TOKEN), r#"{"urls": ["https://h/x"], "extra": 1}"#, StatusCode::BAD_REQUEST),
        (Some(TOKEN), r#"{}"#, StatusCode::BAD_REQUEST),
        (Some(TOKEN), r#"{"urls": ["no url here"]}"#, StatusCode::BAD_REQUEST),
    ] {
        let (status, reply) = api(Method::POST, &url, token, Some(body)).await;
        assert_eq!(status, want, "{body}: {reply}");
        assert!(reply["error"].is_string(), "{reply}");
    }
    let (status, _) = api(Method::GET, &format!("http://{}/v1/nodes", control.api), None, None).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(x_cache("/other").await, ["HIT"; 3], "nothing was purged by bad calls");

    // Drain and undrain travel to the view.
    let (status, _) =
        api(Method::POST, &format!("http://{}/v1/edges/edge-22/drain", control.api), Some(TOKEN), Some("")).await;
    assert_eq!(status, StatusCode::OK);
    wait_for_state(&control, "edge-22", MemberState::Drained).await;
    let (_, nodes) = api(Method::GET, &format!("http://{}/v1/nodes", control.api), Some(TOKEN), None).await;
    assert!(nodes.as_array().unwrap().iter().any(|n| n["node_id"] == "edge-22" && n["state"] == "drained"), "{nodes}");
    assert_eq!(get(&c, &edges[1].url("/other"), &[]).await.status, StatusCode::OK, "a drained edge still serves");
    api(Method::POST, &format!("http://{}/v1/edges/edge-22/undrain", control.api), Some(TOKEN), Some("")).await;
    wait_for_state(&control, "edge-22", MemberState::Alive).await;
    let (status, _) =
        api(Method::POST, &format!("http://{}/v1/edges/nobody/drain", control.api), Some(TOKEN), Some("")).await;
    assert_eq!(status, StatusCode::NOT_FOUND);

    // An edge that was down misses purges; restarted, it applies them all before
    // it reports ready.
    let down = edges.pop().unwrap();
    let down_ip = down.http.ip();
    down.stop().await;
    let mut missed = String::new();
    for _ in 0..3 {
        let (status, reply) = api(Method::POST, &url, Some(TOKEN), Some(r#"{"tags": ["nothing-cached"]}"#)).await;
        assert_eq!(status, StatusCode::ACCEPTED);
        missed = reply["id"].as_str().unwrap().to_string();
    }
    let latest: u64 = missed.rsplit('-').next().unwrap().parse().unwrap();
    let std::net::IpAddr::V4(v4) = down_ip else { unreachable!() };
    let back = TestEdge::join(v4.octets(), &origin.url(), seed, SECRET).await;
    let readyz = format!("http://{}/readyz", back.admin);
    let mut ready_at_seq = None;
    for _ in 0..200 {
        if get(&c, &readyz, &[]).await.status == StatusCode::OK {
            // What the edge itself applied when it said ready (a fresh edge applies
            // every record from 1 on). The control node learns it a gossip round later.
            ready_at_seq = Some(back.metric("cdn_purges_applied_total", &[]) as u64);
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let ready_at_seq = ready_at_seq.expect("the restarted edge became ready");
    assert!(ready_at_seq >= latest, "ready at applied {ready_at_seq} < latest purge {latest}");
    let mut reported = 0;
    for _ in 0..100 {
        reported = back_applied(&control, "edge-23").await;
        if reported >= latest {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert!(reported >= latest, "the control node sees edge-23 at {reported} < {latest}");

    // The control node restarts: acknowledged purges are still known, and new
    // purges get higher sequence numbers.
    let api_addr = control.api;
    let gossip = control.cluster.gossip_addr();
    control.stop().await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let control = TestControl::start(data.path(), api_addr, gossip).await;
    let (status, reply) =
        api(Method::GET, &format!("http://{}/v1/purge/{last_id}", control.api), Some(TOKEN), None).await;
    assert_eq!(status, StatusCode::OK, "{reply}");
    let (status, reply) = api(Method::POST, &url, Some(TOKEN), Some(r#"{"tags": ["after-restart"]}"#)).await;
    assert_eq!(status, StatusCode::ACCEPTED);
    assert!(reply["seq"].as_u64().unwrap() > latest, "{reply}");

    back.stop().await;
    for edge in edges {
        edge.stop().await;
    }
    control.stop().await;
}

#[tokio::test]
async fn a_node_with_another_secret_never_joins() {
    let origin = MockOrigin::start().await;
    let data = tempfile::tempdir().unwrap();
    let control = TestControl::start(data.path(), "127.0.0.1:0".parse().unwrap(), "127.0.0.1:0".parse().unwrap()).await;
    let seed = control.cluster.gossip_addr();
    let good = TestEdge::join([127, 0, 0, 31], &origin.url(), seed, SECRET).await;
    let intruder = TestEdge::join([127, 0, 0, 32], &origin.url(), seed, "not-the-cluster-secret-xyz").await;
    wait_for_edges(&control, &["edge-31"]).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (_, nodes) = api(Method::GET, &format!("http://{}/v1/nodes", control.api), Some(TOKEN), None).await;
    assert!(!nodes.as_array().unwrap().iter().any(|n| n["node_id"] == "edge-32"), "{nodes}");
    // Its datagrams were counted as rejected.
    let rejected = control.metric("cdn_gossip_rejected_total", &[]);
    assert!(rejected > 0.0, "rejected datagrams are counted");
    // Every datagram is counted on the wire: the intruder's too (received), and
    // what the control sends to the good edge.
    let sent = control.metric("cdn_gossip_bytes_total", &[("direction", "sent")]);
    let received = control.metric("cdn_gossip_bytes_total", &[("direction", "received")]);
    let good_received = good.metric("cdn_gossip_bytes_total", &[("direction", "received")]);
    assert!(sent > 0.0 && received > 0.0 && good_received > 0.0, "{sent} {received} {good_received}");
    intruder.stop().await;
    good.stop().await;
    control.stop().await;
}

async fn back_applied(control: &TestControl, node: &str) -> u64 {
    let (_, nodes) = api(Method::GET, &format!("http://{}/v1/nodes", control.api), Some(TOKEN), None).await;
    nodes
        .as_array()
        .and_then(|nodes| nodes.iter().find(|n| n["node_id"] == node))
        .and_then(|n| n["applied_seq"].as_u64())
        .unwrap_or(0)
}

/// `dig +short` for `www.cdn.test A` from a client in `subnet`.
async fn dig(dns: SocketAddr, subnet: &str) -> Vec<String> {
    dig_at(dns, &["www.cdn.test", "A", "+short", "+time=1", "+tries=1", &format!("+subnet={subnet}")]).await.short()
}

/// Waits (up to 10 s) until `check` holds for the answer; returns how long it took.
async fn until_answer(dns: SocketAddr, subnet: &str, check: impl Fn(&[String]) -> bool) -> Duration {
    let started = std::time::Instant::now();
    loop {
        let answer = dig(dns, subnet).await;
        if check(&answer) {
            return started.elapsed();
        }
        assert!(started.elapsed() < Duration::from_secs(10), "answer for {subnet} stuck at {answer:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn geo_dns_follows_the_cluster_drains_and_deaths() {
    let origin = MockOrigin::start().await;
    let data = tempfile::tempdir().unwrap();
    let control = TestControl::start(data.path(), "127.0.0.1:0".parse().unwrap(), "127.0.0.1:0".parse().unwrap()).await;
    let seed = control.cluster.gossip_addr();

    // Geo, in-process, joined to the cluster.
    let mut geo = cdn_geo::Config::new("cdn.test.");
    geo.listen.dns = "127.0.0.1:0".parse().unwrap();
    geo.listen.admin = None;
    let port = free_port();
    geo.listen.dns = ([127, 0, 0, 1], port).into();
    geo.networks = vec![
        cdn_geo::config::Network {
            cidr: "10.1.0.0/16".into(),
            location: Some(cdn_geo::config::Location { lat: 40.7, lon: -74.0 }),
            region: None,
        },
        cdn_geo::config::Network {
            cidr: "10.2.0.0/16".into(),
            location: Some(cdn_geo::config::Location { lat: 53.3, lon: -6.3 }),
            region: None,
        },
    ];
    let mut cluster = ClusterConfig::new("127.0.0.1:0".parse().unwrap(), SECRET);
    cluster.seeds = vec![seed.to_string()];
    geo.cluster = Some(cluster);
    let geo_shutdown = CancellationToken::new();
    tokio::spawn(cdn_geo::run(geo, geo_shutdown.clone(), Registry::new()));
    let dns: SocketAddr = ([127, 0, 0, 1], port).into();

    // Two edges as real processes, so one can be killed for real.
    let dir = tempfile::tempdir().unwrap();
    let mut children = Vec::new();
    for (last, lat, lon) in [(51u8, 40.7, -74.0), (52u8, 53.3, -6.3)] {
        let file = dir.path().join(format!("edge-{last}.toml"));
        std::fs::write(
            &file,
            format!(
                r#"node_id = "edge-{last}"
region = "r{last}"
location = {{ lat = {lat}, lon = {lon} }}
public_addr = "127.0.0.{last}"
[listen]
http = "127.0.0.{last}:0"
admin = "127.0.0.{last}:0"
[origin]
url = "{origin}"
[cluster]
listen = "127.0.0.{last}:0"
seeds = ["{seed}"]
secret = "{SECRET}"
"#,
                origin = origin.url(),
            ),
        )
        .unwrap();
        let child = tokio::process::Command::new(env!("CARGO_BIN_EXE_cdn"))
            .args(["edge", "--config"])
            .arg(&file)
            .env("RUST_LOG", "warn")
            .kill_on_drop(true)
            .spawn()
            .expect("cdn edge starts");
        children.push(child);
    }
    // Each region's clients get their own edge first.
    until_answer(dns, "10.1.0.0/24", |a| a.first().map(String::as_str) == Some("127.0.0.51")).await;
    until_answer(dns, "10.2.0.0/24", |a| a.first().map(String::as_str) == Some("127.0.0.52")).await;

    // Drain through the control API: out of answers while it keeps running.
    let (status, _) =
        api(Method::POST, &format!("http://{}/v1/edges/edge-52/drain", control.api), Some(TOKEN), Some("")).await;
    assert_eq!(status, StatusCode::OK);
    let drained = until_answer(dns, "10.2.0.0/24", |a| !a.is_empty() && !a.iter().any(|ip| ip == "127.0.0.52")).await;
    eprintln!("drain reached DNS answers in {drained:?}");
    api(Method::POST, &format!("http://{}/v1/edges/edge-52/undrain", control.api), Some(TOKEN), Some("")).await;
    until_answer(dns, "10.2.0.0/24", |a| a.first().map(String::as_str) == Some("127.0.0.52")).await;

    // Kill -9 the Dublin edge: gone from answers within 3 s.
    let mut dublin = children.pop().unwrap();
    dublin.start_kill().unwrap();
    let _ = dublin.wait().await;
    let gone = until_answer(dns, "10.2.0.0/24", |a| !a.is_empty() && !a.iter().any(|ip| ip == "127.0.0.52")).await;
    eprintln!("killed edge left DNS answers in {gone:?}");
    assert!(gone < Duration::from_secs(3), "killed edge still answered after {gone:?}");

    geo_shutdown.cancel();
    control.stop().await;
}

#[tokio::test]
async fn operator_commands_purge_list_and_drain() {
    let origin = MockOrigin::start().await;
    origin.route("/x", Route::ok("max-age=600", "x").header("surrogate-key", "ops"));
    let data = tempfile::tempdir().unwrap();
    let control = TestControl::start(data.path(), "127.0.0.1:0".parse().unwrap(), "127.0.0.1:0".parse().unwrap()).await;
    let edge = TestEdge::join([127, 0, 0, 61], &origin.url(), control.cluster.gossip_addr(), SECRET).await;
    wait_for_edges(&control, &["edge-61"]).await;
    let c = client();
    get(&c, &edge.url("/x"), &[]).await;
    assert_eq!(get(&c, &edge.url("/x"), &[]).await.x_cache(), "HIT");
    let cdn = |args: &[&str]| {
        let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_cdn"));
        command
            .args(args)
            .env("CDN_CONTROL", format!("http://{}", control.api))
            .env("CDN_TOKEN", TOKEN)
            .kill_on_drop(true);
        command
    };
    let out = cdn(&["purge", "--tag", "ops", "--wait"]).output().await.unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}{}", String::from_utf8_lossy(&out.stderr));
    assert!(text.contains("accepted") && text.contains("edge-61") && text.contains("complete on 1 edges"), "{text}");
    assert_eq!(get(&c, &edge.url("/x"), &[]).await.x_cache(), "MISS");
    let out = cdn(&["nodes"]).output().await.unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.starts_with("NODE") && text.contains("edge-61") && text.contains("control-1"), "{text}");
    let out = cdn(&["drain", "edge-61"]).output().await.unwrap();
    assert!(out.status.success());
    wait_for_state(&control, "edge-61", MemberState::Drained).await;
    let out = cdn(&["undrain", "edge-61"]).output().await.unwrap();
    assert!(out.status.success());
    // The status page and its data: the page is public, the data needs the token.
    let page = get(&c, &format!("http://{}/", control.api), &[]).await;
    assert_eq!(page.status, StatusCode::OK);
    assert!(page.header("content-type").starts_with("text/html"));
    assert!(String::from_utf8_lossy(&page.body).contains("<svg"));
    assert!(String::from_utf8_lossy(&page.body).contains("upstream/s"), "the upstream column");
    let (status, _) = api(Method::GET, &format!("http://{}/v1/overview", control.api), None, None).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let mut seen = Value::Null;
    for _ in 0..60 {
        let (_, overview) = api(Method::GET, &format!("http://{}/v1/overview", control.api), Some(TOKEN), None).await;
        let edge = overview["nodes"].as_array().and_then(|n| n.iter().find(|n| n["node_id"] == "edge-61").cloned());
        if let Some(edge) = edge.filter(|e| e["requests"].as_u64() >= Some(3)) {
            seen = overview.clone();
            assert!(edge["hit_ratio"].as_f64().is_some_and(|r| r > 0.0 && r < 1.0), "{edge}");
            // Its upstream: the two MISSes went to the origin (no shield, no region peer).
            let up = &edge["upstream"];
            assert!(up["origin"].as_u64() >= Some(2), "{edge}");
            assert_eq!((up["shield"].as_u64(), up["peer"].as_u64()), (Some(0), Some(0)), "{edge}");
            for kind in ["origin", "shield", "peer"] {
                assert!(edge["upstream_per_s"][kind].as_f64().is_some_and(|r| r >= 0.0), "{kind}: {edge}");
            }
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(seen["purges"].as_array().is_some_and(|p| p.iter().any(|p| p["what"] == "tags: ops")), "{seen}");
    // Misses while the page polls: the origin's upstream rate rises above zero.
    let mut rate = 0.0;
    for i in 0..80 {
        get(&c, &edge.url(&format!("/x?r={i}")), &[]).await;
        let (_, overview) = api(Method::GET, &format!("http://{}/v1/overview", control.api), Some(TOKEN), None).await;
        let edge = overview["nodes"].as_array().and_then(|n| n.iter().find(|n| n["node_id"] == "edge-61").cloned());
        rate = edge.and_then(|e| e["upstream_per_s"]["origin"].as_f64()).unwrap_or(0.0);
        if rate > 0.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(rate > 0.0, "no origin requests per second on the status page");
    // Refusals are clear and exit non-zero.
    let out = cdn(&["purge", "--url", "not a url"]).output().await.unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("400"), "{}", String::from_utf8_lossy(&out.stderr));
    let out = cdn(&["nodes"]).env("CDN_TOKEN", "wrong-token-wrong-token").output().await.unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("401"));
    edge.stop().await;
    control.stop().await;
}
