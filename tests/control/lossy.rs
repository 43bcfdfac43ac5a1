//! Bad networks between the control node and the edges, made by the gossip relay's
//! [`PacketLoss`] hook: purges still reach every edge under heavy packet loss; an
//! edge cut off from control (partitioned, or control down) keeps serving and
//! catches up when it can hear control again.

use std::{
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use cdn_cluster::PacketLoss;
use http::{Method, StatusCode};
use serde_json::json;

use cdn_test_support::{
    client::{client, get},
    control::{SECRET, TOKEN, TestControl, api, wait_for_edges},
    edge::TestEdge,
    mock_origin::{MockOrigin, Route},
};

/// Purges applied so far by `edge` (each edge applies one control node's purges in
/// sequence order, so this is also the last sequence number it applied).
fn applied(edge: &TestEdge) -> u64 {
    edge.metric("cdn_purges_applied_total", &[]) as u64
}

type FirstSeen = Vec<Vec<Option<Instant>>>;

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

#[tokio::test]
async fn purges_reach_every_edge_under_heavy_packet_loss() {
    const PURGES: u64 = 50;
    const LOSS: f64 = 0.25;
    let origin = MockOrigin::start().await;
    let data = tempfile::tempdir().unwrap();
    let control_loss = PacketLoss::new(1);
    let control =
        TestControl::start_with(data.path(), "127.0.0.1:0".parse().unwrap(), "127.0.0.1:0".parse().unwrap(), |c| {
            c.cluster.as_mut().unwrap().loss = control_loss.clone()
        })
        .await;
    let seed = control.cluster.gossip_addr();
    let mut edges = Vec::new();
    let mut losses = vec![control_loss];
    for last in [71u8, 72, 73] {
        let loss = PacketLoss::new(u64::from(last));
        edges.push(TestEdge::join_with_loss([127, 0, 0, last], &origin.url(), seed, SECRET, loss.clone()).await);
        losses.push(loss);
    }
    wait_for_edges(&control, &["edge-71", "edge-72", "edge-73"]).await;

    // Every node drops a quarter of the datagrams it sends: every link loses 25% in
    // each direction (a full gossip round, three datagrams, gets through 42% of the time).
    for loss in &losses {
        loss.set(LOSS, 0.0);
    }

    // Sample every edge's applied count; note when each purge first shows on each.
    let edges = Arc::new(edges);
    // Edge → purge → when it was first seen applied.
    let seen: Arc<Mutex<FirstSeen>> = Arc::new(Mutex::new(vec![vec![None; PURGES as usize + 1]; edges.len()]));
    let sampler = tokio::spawn({
        let (edges, seen) = (edges.clone(), seen.clone());
        async move {
            loop {
                let now = Instant::now();
                let mut done = true;
                for (i, edge) in edges.iter().enumerate() {
                    let count = applied(edge).min(PURGES) as usize;
                    let mut firsts = seen.lock().unwrap();
                    for at in &mut firsts[i][1..=count] {
                        at.get_or_insert(now);
                    }
                    done &= count == PURGES as usize;
                }
                if done {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        }
    });

    // 50 purges, ten a second.
    let url = format!("http://{}/v1/purge", control.api);
    let mut acked = Vec::new();
    let started = Instant::now();
    for n in 1..=PURGES {
        let (status, reply) =
            api(Method::POST, &url, Some(TOKEN), Some(&json!({ "tags": [format!("lossy-{n}")] }).to_string())).await;
        assert_eq!(status, StatusCode::ACCEPTED, "{reply}");
        assert_eq!(reply["seq"].as_u64(), Some(n));
        acked.push(Instant::now());
        tokio::time::sleep_until((started + Duration::from_millis(100 * n)).into()).await;
    }
    let bound = Duration::from_secs(5);
    if tokio::time::timeout(bound + Duration::from_secs(1), sampler).await.is_err() {
        let counts: Vec<u64> = edges.iter().map(applied).collect();
        panic!("propagation stalled under {LOSS} loss: edges applied {counts:?} of {PURGES}");
    }

    // Propagation of purge n: from its acknowledgement to the last edge applying it.
    let seen = std::mem::take(&mut *seen.lock().unwrap());
    let mut all_edges = Vec::new();
    let mut each_edge = Vec::new();
    for (n, ack) in acked.iter().enumerate() {
        let per_edge: Vec<Duration> = seen.iter().map(|e| e[n + 1].unwrap().saturating_duration_since(*ack)).collect();
        all_edges.push(*per_edge.iter().max().unwrap());
        each_edge.extend(per_edge);
    }
    all_edges.sort();
    each_edge.sort();
    let dropped: u64 = losses.iter().map(PacketLoss::dropped).sum();
    eprintln!(
        "purge propagation under {:.0}% loss per link and direction, {PURGES} purges to 3 edges ({dropped} datagrams dropped):\n  \
         to every edge: p50 {:?}  p99 {:?}  max {:?}\n  to one edge:   p50 {:?}  p99 {:?}  max {:?}",
        LOSS * 100.0,
        percentile(&all_edges, 50.0),
        percentile(&all_edges, 99.0),
        all_edges.last().unwrap(),
        percentile(&each_edge, 50.0),
        percentile(&each_edge, 99.0),
        each_edge.last().unwrap(),
    );
    assert!(dropped > 100, "the loss was real: {dropped} datagrams dropped");
    assert!(*all_edges.last().unwrap() < bound, "a purge took {:?} to reach every edge", all_edges.last().unwrap());

    // The edges' reports travel back through the same loss: the control node sees
    // the last purge complete.
    let last = format!("control-1-{PURGES}");
    let mut status = serde_json::Value::Null;
    for _ in 0..100 {
        (_, status) = api(Method::GET, &format!("http://{}/v1/purge/{last}", control.api), Some(TOKEN), None).await;
        if status["status"] == "complete" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(status["status"], "complete", "{status}");

    let edges = Arc::into_inner(edges).unwrap();
    for edge in edges {
        edge.stop().await;
    }
    control.stop().await;
}

/// `X-Cache` of `path` on `edge` (the request itself must succeed).
async fn x_cache(edge: &TestEdge, path: &str) -> String {
    let reply = get(&client(), &edge.url(path), &[]).await;
    assert_eq!(reply.status, StatusCode::OK, "{path} on {}", edge.http);
    reply.x_cache().to_string()
}

/// `/readyz` of `edge`: `Ok` when ready, else what it says.
async fn ready(edge: &TestEdge) -> Result<(), String> {
    let reply = get(&client(), &format!("http://{}/readyz", edge.admin), &[]).await;
    if reply.status == StatusCode::OK { Ok(()) } else { Err(String::from_utf8_lossy(&reply.body).into_owned()) }
}

/// Waits up to `bound` for `path` on `edge` to be purged (a MISS); returns how long it took.
async fn until_purged(edge: &TestEdge, path: &str, bound: Duration) -> Duration {
    let started = Instant::now();
    loop {
        if x_cache(edge, path).await == "MISS" {
            return started.elapsed();
        }
        assert!(started.elapsed() < bound, "{path} on {} still cached after {bound:?}", edge.http);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn edges_serve_while_cut_off_from_control_and_catch_up_afterwards() {
    let origin = MockOrigin::start().await;
    for path in ["/a", "/b", "/c"] {
        let tag = path.trim_start_matches('/');
        origin.route(path, Route::ok("max-age=600", format!("body of {path}")).header("surrogate-key", tag));
    }
    let data = tempfile::tempdir().unwrap();
    let control = TestControl::start(data.path(), "127.0.0.1:0".parse().unwrap(), "127.0.0.1:0".parse().unwrap()).await;
    let (api_addr, seed) = (control.api, control.cluster.gossip_addr());
    let cut_off = PacketLoss::new(81);
    let edges = [
        TestEdge::join_with_loss([127, 0, 0, 81], &origin.url(), seed, SECRET, cut_off.clone()).await,
        TestEdge::join_with_loss([127, 0, 0, 82], &origin.url(), seed, SECRET, PacketLoss::default()).await,
    ];
    let edges_started = Instant::now();
    wait_for_edges(&control, &["edge-81", "edge-82"]).await;
    for edge in &edges {
        for path in ["/a", "/b"] {
            x_cache(edge, path).await;
            assert_eq!(x_cache(edge, path).await, "HIT");
        }
    }

    // edge-81 is partitioned: nothing in or out of its gossip socket.
    cut_off.set(1.0, 1.0);
    let (status, reply) =
        api(Method::POST, &format!("http://{api_addr}/v1/purge"), Some(TOKEN), Some(r#"{"tags": ["a"]}"#)).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{reply}");
    until_purged(&edges[1], "/a", Duration::from_secs(2)).await;
    // Cut off, edge-81 keeps serving what it has (the purge cannot reach it) and
    // fetches what it does not, long enough for everyone to declare the other dead
    // (and past the first 5 s of the edge, during which an edge without a control
    // node in sight does not call itself ready).
    let partition = Instant::now();
    while partition.elapsed() < Duration::from_secs(3) || edges_started.elapsed() < Duration::from_millis(5500) {
        assert_eq!(x_cache(&edges[0], "/a").await, "HIT", "served from cache while cut off");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(x_cache(&edges[0], "/c").await == "MISS" && x_cache(&edges[0], "/c").await == "HIT");
    let (_, nodes) = api(Method::GET, &format!("http://{api_addr}/v1/nodes"), Some(TOKEN), None).await;
    let state = nodes.as_array().unwrap().iter().find(|n| n["node_id"] == "edge-81").unwrap()["state"].clone();
    assert!(state == "dead" || state == "suspect", "the partition is real: control sees edge-81 {state}");
    let readiness = ready(&edges[0]).await;
    assert_eq!(readiness, Ok(()), "an edge cut off from control stays ready (geo keeps sending users)");
    // The network heals: edge-81 applies the purge it missed.
    cut_off.set(0.0, 0.0);
    let caught_up = until_purged(&edges[0], "/a", Duration::from_secs(10)).await;
    eprintln!("partitioned edge applied the missed purge {caught_up:?} after the network healed");

    // The control node goes away entirely: the edges keep serving and stay ready.
    control.stop().await;
    let outage = Instant::now();
    while outage.elapsed() < Duration::from_secs(3) {
        for edge in &edges {
            assert_eq!(x_cache(edge, "/b").await, "HIT", "served from cache without control");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for edge in &edges {
        assert_eq!(ready(edge).await, Ok(()), "ready without control");
    }
    // It comes back (same addresses, same log): the edges rejoin and take its purges.
    let control = TestControl::start(data.path(), api_addr, seed).await;
    wait_for_edges(&control, &["edge-81", "edge-82"]).await;
    let (status, reply) =
        api(Method::POST, &format!("http://{api_addr}/v1/purge"), Some(TOKEN), Some(r#"{"tags": ["b"]}"#)).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{reply}");
    assert_eq!(reply["seq"], 2, "numbering goes on after the restart");
    for edge in &edges {
        let took = until_purged(edge, "/b", Duration::from_secs(5)).await;
        eprintln!("after control returned, {} applied a new purge in {took:?}", edge.http.ip());
    }

    let [a, b] = edges;
    a.stop().await;
    b.stop().await;
    control.stop().await;
}
