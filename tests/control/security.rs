//! Security of the control plane: the API over TLS (and the operators' commands
//! talking https), the admin listener bound to a private address only, and the
//! token and gossip secret kept out of logs and metrics.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use bytes::Bytes;
use cdn_node::tls::{TlsConfig, self_signed_pem};
use http::{Method, StatusCode};
use http_body_util::{BodyExt as _, Full};
use hyper_util::{client::legacy::Client, rt::TokioExecutor};
use rustls_pki_types::{CertificateDer, pem::PemObject as _};
use serde_json::Value;

use cdn_test_support::{
    client::{client, get, https_client},
    control::{SECRET, TOKEN, TestControl, api},
    edge::TestEdge,
    mock_origin::{MockOrigin, Route},
};

use crate::process::{ControlProcess, DataDir};

/// `GET url` over https trusting only `ca`, with `token` if given.
async fn https_get(url: &str, ca: &std::path::Path, token: Option<&str>) -> Result<(StatusCode, Value), String> {
    let mut roots = rustls::RootCertStore::empty();
    for certificate in CertificateDer::pem_file_iter(ca).unwrap() {
        roots.add(certificate.unwrap()).unwrap();
    }
    let tls = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let client = https_client::<Full<Bytes>>(tls);
    let mut request = http::Request::builder().uri(url);
    if let Some(token) = token {
        request = request.header("authorization", format!("Bearer {token}"));
    }
    let response = client.request(request.body(Full::default()).unwrap()).await.map_err(|e| format!("{e:?}"))?;
    let status = response.status();
    let body = response.into_body().collect().await.map_err(|e| e.to_string())?.to_bytes();
    Ok((status, serde_json::from_slice(&body).unwrap_or(Value::Null)))
}

#[tokio::test]
async fn the_control_api_over_tls() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = self_signed_pem(&["control.test".into()], &["127.0.0.1".parse().unwrap()]).unwrap();
    let (cert_file, key_file) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    std::fs::write(&cert_file, cert).unwrap();
    std::fs::write(&key_file, key).unwrap();
    let origin = MockOrigin::start().await;
    origin.route("/x", Route::ok("max-age=600", "x").header("surrogate-key", "tls-tag"));
    let control = TestControl::start_with(
        &dir.path().join("data"),
        "127.0.0.1:0".parse().unwrap(),
        "127.0.0.1:0".parse().unwrap(),
        |c| {
            c.tls = Some(TlsConfig { cert: Some(cert_file.clone()), key: Some(key_file.clone()), ..Default::default() })
        },
    )
    .await;
    let edge = TestEdge::join([127, 0, 0, 91], &origin.url(), control.cluster.gossip_addr(), SECRET).await;
    let mut joined = false;
    for _ in 0..200 {
        let (_, nodes) =
            https_get(&format!("https://{}/v1/nodes", control.api), &cert_file, Some(TOKEN)).await.unwrap();
        if nodes.as_array().is_some_and(|n| n.iter().any(|n| n["node_id"] == "edge-91" && n["ready"] == true)) {
            joined = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(joined, "edge-91 joined");
    let c = client();
    get(&c, &edge.url("/x"), &[]).await;
    assert_eq!(get(&c, &edge.url("/x"), &[]).await.x_cache(), "HIT");

    let base = format!("https://{}", control.api);
    let cdn = |args: &[&str]| {
        let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_cdn"));
        command.args(args).env("CDN_CONTROL", &base).env("CDN_TOKEN", TOKEN).env_remove("CDN_CA").kill_on_drop(true);
        command
    };
    let text = |out: &std::process::Output| {
        format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
    };

    // The operators' commands trust the control node's certificate when told to.
    let ca = cert_file.to_str().unwrap();
    let out = cdn(&["purge", "--tag", "tls-tag", "--wait", "--ca", ca]).output().await.unwrap();
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("complete on 1 edges"), "{}", text(&out));
    assert_eq!(get(&c, &edge.url("/x"), &[]).await.x_cache(), "MISS", "the purge over https applied");
    let out = cdn(&["nodes"]).env("CDN_CA", ca).output().await.unwrap();
    assert!(out.status.success() && text(&out).contains("edge-91"), "{}", text(&out));
    let out = cdn(&["nodes", "--insecure"]).output().await.unwrap();
    assert!(out.status.success(), "{}", text(&out));
    // By default only public CAs are trusted: a self-signed certificate is refused,
    // and the token never leaves.
    let out = cdn(&["nodes"]).output().await.unwrap();
    eprintln!("without --ca: {}", text(&out).trim());
    assert!(!out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("unreachable") && text(&out).to_lowercase().contains("certificate"), "{}", text(&out));
    let out = cdn(&["nodes", "--ca", "/nonexistent.pem"]).output().await.unwrap();
    assert!(!out.status.success() && text(&out).contains("/nonexistent.pem"), "{}", text(&out));
    // A wrong token is still a 401 over TLS.
    let out = cdn(&["nodes", "--ca", ca]).env("CDN_TOKEN", "wrong-token-wrong-token").output().await.unwrap();
    assert!(!out.status.success() && text(&out).contains("401"), "{}", text(&out));

    // No token: 401, and nothing purged.
    let purge_url = format!("{base}/v1/nodes");
    let (status, reply) = https_get(&purge_url, &cert_file, None).await.unwrap();
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{reply}");
    assert!(reply["error"].is_string());
    let (status, _) = https_get(&purge_url, &cert_file, Some(TOKEN)).await.unwrap();
    assert_eq!(status, StatusCode::OK);

    // Plain HTTP to the TLS port gets no answer.
    let plain: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let request = http::Request::builder()
        .method(Method::GET)
        .uri(format!("http://{}/v1/nodes", control.api))
        .header("authorization", format!("Bearer {TOKEN}"))
        .body(Full::default())
        .unwrap();
    let answer = tokio::time::timeout(Duration::from_secs(5), plain.request(request)).await.expect("no hang");
    assert!(answer.is_err(), "plain http to the TLS port was answered: {:?}", answer.map(|r| r.status()));
    let out = cdn(&["nodes"]).env("CDN_CONTROL", format!("http://{}", control.api)).output().await.unwrap();
    assert!(!out.status.success(), "{}", text(&out));

    edge.stop().await;
    control.stop().await;
}

/// Whether a TCP connection to `addr` is accepted.
async fn reachable(addr: SocketAddr) -> bool {
    matches!(tokio::time::timeout(Duration::from_secs(2), tokio::net::TcpStream::connect(addr)).await, Ok(Ok(_)))
}

#[tokio::test]
async fn the_admin_listener_stays_on_its_private_address() {
    let control = ControlProcess::start(
        "control-admin",
        TOKEN,
        SECRET,
        ([127, 0, 0, 65], [127, 0, 0, 66]),
        DataDir::Plain,
        "warn",
    )
    .await;
    let c = client();
    let metrics = get(&c, &format!("http://{}/metrics", control.admin), &[]).await;
    assert_eq!(metrics.status, StatusCode::OK);
    assert_eq!(get(&c, &format!("http://{}/healthz", control.admin), &[]).await.status, StatusCode::OK);
    let port = control.admin.port();
    for ip in [[127, 0, 0, 65], [127, 0, 0, 1]] {
        let elsewhere = SocketAddr::from((ip, port));
        assert!(!reachable(elsewhere).await, "the admin port answers on {elsewhere}");
    }
    // Nor does the API answer on the admin address.
    assert!(!reachable(SocketAddr::from(([127, 0, 0, 66], control.api.port()))).await);
    assert!(reachable(control.api).await);
    control.stop().await;
}

#[tokio::test]
async fn the_token_and_gossip_secret_never_reach_logs_or_metrics() {
    // Distinctive values, so any appearance (even in part) is found.
    const TOKEN: &str = "tok-9f8e7d6c5b4a3928";
    const SECRET: &str = "sec-1a2b3c4d5e6f7081";
    let control = ControlProcess::start(
        "control-quiet",
        TOKEN,
        SECRET,
        ([127, 0, 0, 1], [127, 0, 0, 1]),
        DataDir::Plain,
        "debug",
    )
    .await;
    // A cluster at work: an edge joins, purges flow, calls succeed and fail.
    let origin = MockOrigin::start().await;
    let edge = TestEdge::join([127, 0, 0, 95], &origin.url(), control.gossip, SECRET).await;
    let base = format!("http://{}", control.api);
    for _ in 0..100 {
        let (_, nodes) = api(Method::GET, &format!("{base}/v1/nodes"), Some(TOKEN), None).await;
        if nodes.as_array().is_some_and(|n| n.iter().any(|n| n["node_id"] == "edge-95" && n["ready"] == true)) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (status, reply) = api(Method::POST, &format!("{base}/v1/purge"), Some(TOKEN), Some(r#"{"all": true}"#)).await;
    assert_eq!(status, StatusCode::ACCEPTED);
    let id = reply["id"].as_str().unwrap().to_string();
    api(Method::GET, &format!("{base}/v1/purge/{id}"), Some(TOKEN), None).await;
    api(Method::GET, &format!("{base}/v1/overview"), Some(TOKEN), None).await;
    let (status, _) = api(Method::POST, &format!("{base}/v1/purge"), Some("not-the-token-1234567"), Some("{}")).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    api(Method::POST, &format!("{base}/v1/purge"), Some(TOKEN), Some("{bad json")).await;
    // A node with another secret knocks.
    let intruder = TestEdge::join([127, 0, 0, 96], &origin.url(), control.gossip, "another-secret-entirely-xyz").await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let metrics = get(&client(), &format!("http://{}/metrics", control.admin), &[]).await;
    let metrics = String::from_utf8_lossy(&metrics.body).into_owned();
    intruder.stop().await;
    edge.stop().await;
    let log = control.stop().await;

    assert!(log.contains("purge accepted") && log.contains("joined the cluster"), "the log was captured:\n{log}");
    assert!(metrics.contains("cdn_api_unauthorized_total 1"), "{metrics}");
    assert!(metrics.contains("cdn_gossip_rejected_total") && !metrics.contains("cdn_gossip_rejected_total 0"));
    for (what, secret) in [("the API token", TOKEN), ("the gossip secret", SECRET)] {
        // Whole, or any 8-character piece of the random part.
        let pieces: Vec<&str> = (4..=secret.len() - 8).map(|i| &secret[i..i + 8]).collect();
        for piece in std::iter::once(secret).chain(pieces) {
            assert!(!log.contains(piece), "{what} ({piece}) is in the log:\n{log}");
            assert!(!metrics.contains(piece), "{what} ({piece}) is in /metrics");
        }
    }
    eprintln!(
        "checked {} bytes of trace-level log and {} bytes of /metrics: no token, no secret",
        log.len(),
        metrics.len()
    );
}
