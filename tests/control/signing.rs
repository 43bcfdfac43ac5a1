//! Signed URLs (RFC 9246) through a routing document and a shield: a control node,
//! edge A (region `sa`, where clients come) and edge B (region `sb`, the site's
//! shield), both with the key `k1`. A client's token is checked by A; A's fill
//! through B carries no token and B, recognising a member of the cluster, does not
//! ask for one; a client reaching B directly still must show one.
//!
//! Edges use 127.0.0.243 and 127.0.0.244; the rest of the suite does not.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::{Engine as _, engine::general_purpose::URL_SAFE_NO_PAD};
use cdn_cluster::PacketLoss;
use cdn_edge::signing::SigningKey;
use cdn_test_support::{
    client::{client, get},
    control::{SECRET, TOKEN, TestControl, api, wait_for_edges},
    edge::TestEdge,
    mock_origin::{MockOrigin, Route},
    wait,
};
use http::{Method, StatusCode};
use serde_json::{Value, json};

const HOST: &str = "www.sign.test";
const K1: &[u8] = b"k1-secret-0123456789-abcdefghijkl";

fn sign(claims: &Value) -> String {
    let header = json!({"alg": "HS256", "kid": "k1"});
    let input =
        format!("{}.{}", URL_SAFE_NO_PAD.encode(header.to_string()), URL_SAFE_NO_PAD.encode(claims.to_string()));
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, K1);
    format!("{input}.{}", URL_SAFE_NO_PAD.encode(ring::hmac::sign(&key, input.as_bytes())))
}

fn exp_in(secs: u64) -> Value {
    json!({"exp": SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs() + secs})
}

/// The node ids in the `CDN-Loop` of the origin's last request for `path`.
fn origin_loop(origin: &MockOrigin, path: &str) -> Vec<String> {
    crate::tiers::loop_ids(&origin.last_headers(path))
}

#[tokio::test]
async fn a_shield_does_not_ask_the_edge_that_checked_the_client_for_a_token() {
    let origin = MockOrigin::start().await;
    let data = tempfile::tempdir().unwrap();
    let any = "127.0.0.1:0".parse().unwrap();
    let control = TestControl::start(data.path(), any, any).await;
    let seed = control.cluster.gossip_addr();
    let mut edges = Vec::new();
    for (last, region) in [(243, "sa"), (244, "sb")] {
        let edge = TestEdge::join_with([127, 0, 0, last], &origin.url(), seed, SECRET, PacketLoss::default(), |c| {
            c.region = region.to_string();
            c.signing.keys = vec![SigningKey::hs256("k1", K1).unwrap()];
        })
        .await;
        edges.push(edge);
    }
    let (a, b) = (&edges[0], &edges[1]);
    wait_for_edges(&control, &[&a.node_id, &b.node_id]).await;
    let document = json!({"sites": [{
        "name": "paid", "hosts": [HOST], "origins": [{"url": origin.url()}],
        "shield": ["sb"], "signed": {"path_prefix": "/paid/", "keys": ["k1"]},
    }]});
    let url = format!("http://{}/v1/routing", control.api);
    let (status, reply) = api(Method::PUT, &url, Some(TOKEN), Some(&document.to_string())).await;
    assert_eq!(status, StatusCode::OK, "{reply}");
    let version = reply["version"].as_u64().unwrap();
    for edge in [a, b] {
        wait::until("the document applied", Duration::from_secs(10), Duration::from_millis(5), async || {
            (edge.metric("cdn_routing_version", &[]) as u64 >= version).then_some(())
        })
        .await;
    }
    let c = client();
    let token = sign(&exp_in(300));
    let host = [("host", HOST)];
    // New objects through A until one is filled through B (A's view of B is
    // gossip's, so the first may go straight to the origin).
    let mut through_b = None;
    for n in 0..200 {
        let path = format!("/paid/v{n}.mp4");
        origin.route(&path, Route::ok("public, max-age=600", format!("video {n}")));
        let r = get(&c, &a.url(&format!("{path}?URISigningPackage={token}")), &host).await;
        assert_eq!((r.status, r.body.clone()), (StatusCode::OK, format!("video {n}").into()), "{path}: {r:?}");
        if origin_loop(&origin, &path) == [a.node_id.clone(), b.node_id.clone()] {
            through_b = Some(path);
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let path = through_b.expect("a fill through the shield");
    // B served A's fill without a token, and never checked one.
    assert_eq!(b.metric("cdn_signing_rejected_total", &[]), 0.0);
    assert_eq!(b.metric("cdn_signing_accepted_total", &[]), 0.0);
    assert!(origin.requests().iter().all(|(p, _)| !p.contains("URISigningPackage")), "{:?}", origin.requests());
    // B stored it: a client of B with a token gets a HIT; without one, 403.
    let r = get(&c, &b.url(&format!("{path}?URISigningPackage={token}")), &host).await;
    assert_eq!((r.status, r.x_cache()), (StatusCode::OK, "HIT"));
    assert_eq!(get(&c, &b.url(&path), &host).await.status, StatusCode::FORBIDDEN);
    // A pretended member header from a client is no way around the check.
    let forged = [("host", HOST), ("cdn-peer", "edge-244 12345 AAAA")];
    assert_eq!(get(&c, &a.url(&path), &forged).await.status, StatusCode::FORBIDDEN);
    assert_eq!(a.metric("cdn_signing_rejected_total", &[("reason", "missing")]), 1.0);
    assert_eq!(origin.hits(&path), 1);
    for edge in edges {
        edge.stop().await;
    }
    control.stop().await;
    origin.stop();
}
