//! Certificates through ACME DNS-01 against a real ACME server (pebble, Let's
//! Encrypt's test CA) that asks our own geo-DNS for the challenges: the control node
//! orders a certificate for `www.cdn.test` and `*.cdn.test`, a running edge installs
//! it from the cluster and serves it over HTTP/2 and HTTP/3, and a forced renewal
//! reaches the same edge without a restart.

use std::{net::SocketAddr, process::Stdio, time::Duration};

use cdn_cluster::ClusterConfig;
use cdn_control::acme::AcmeConfig;
use cdn_test_support::{
    control::{SECRET, TOKEN, TestControl, api},
    curl::curl,
    edge::start_tls_edge,
    http3::H3Client,
    mock_origin::{MockOrigin, Route},
    net::free_port,
    tls::{any_certificate, served_chain, write_self_signed},
    wait,
};
use http::{Method, StatusCode};
use http_body_util::{BodyExt as _, Empty};
use rustls_pki_types::pem::PemObject as _;

/// Pebble's root (the trust anchor of what it issues), from its management API.
async fn pebble_root(management: u16) -> String {
    let client = cdn_test_support::client::https_client::<Empty<bytes::Bytes>>(any_certificate());
    let url = format!("https://127.0.0.1:{management}/roots/0");
    let response = client.get(url.parse().unwrap()).await.expect("pebble's management API answers");
    assert_eq!(response.status(), StatusCode::OK);
    String::from_utf8(response.into_body().collect().await.unwrap().to_bytes().to_vec()).unwrap()
}

#[tokio::test]
async fn a_certificate_is_issued_through_our_dns_installed_on_edges_and_renewed() {
    let dir = tempfile::tempdir().unwrap();
    // The ACME server: pebble on 127.0.0.1 with a certificate of its own.
    let (pebble_cert, pebble_key, _) = write_self_signed(dir.path(), "pebble", &["localhost", "127.0.0.1"]);
    let (acme_port, management) = (free_port(), free_port());
    let geo_port = free_port();
    let pebble_config = dir.path().join("pebble.json");
    std::fs::write(
        &pebble_config,
        serde_json::json!({"pebble": {
            "listenAddress": format!("127.0.0.1:{acme_port}"),
            "managementListenAddress": format!("127.0.0.1:{management}"),
            "certificate": pebble_cert, "privateKey": pebble_key,
            "httpPort": free_port(), "tlsPort": free_port(),
            "ocspResponderURL": "", "externalAccountBindingRequired": false}})
        .to_string(),
    )
    .unwrap();
    let mut pebble = tokio::process::Command::new("pebble")
        .arg("-config")
        .arg(&pebble_config)
        .args(["-dnsserver", &format!("127.0.0.1:{geo_port}")])
        // No sleeping before validation; no nonces refused at random.
        .env("PEBBLE_VA_NOSLEEP", "1")
        .env("PEBBLE_WFE_NONCEREJECT", "0")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("pebble runs (scripts/test-deps.sh installs it)");
    let pebble_output = cdn_test_support::process::capture_output(&mut pebble);
    let acme_addr: SocketAddr = ([127, 0, 0, 1], acme_port).into();
    wait::until("pebble listens", Duration::from_secs(20), Duration::from_millis(50), async || {
        tokio::net::TcpStream::connect(acme_addr).await.ok().map(|_| ())
    })
    .await;

    // Two control nodes with [acme]: control-1 orders, control-2 must not race it.
    // Geo answers the challenges; an edge serves.
    let acme = AcmeConfig {
        directory: format!("https://127.0.0.1:{acme_port}/dir"),
        ca: Some(pebble_cert.clone()),
        contact: vec!["mailto:ops@cdn.test".into()],
        names: vec!["www.cdn.test".into(), "*.cdn.test".into()],
        renew_before: Duration::from_secs(30 * 86_400),
        check: Duration::from_secs(1),
        dns_wait: Duration::from_millis(500),
    };
    let any: SocketAddr = "127.0.0.1:0".parse().unwrap();
    let data_2 = dir.path().join("control-2");
    std::fs::create_dir_all(&data_2).unwrap();
    let control_2 = TestControl::start_with(&data_2, any, any, |c| {
        c.node_id = "control-2".into();
        c.acme = Some(acme.clone());
    })
    .await;
    let control = TestControl::start_with(dir.path(), any, any, |c| {
        c.acme = Some(acme.clone());
        c.cluster.as_mut().unwrap().seeds = vec![control_2.cluster.gossip_addr().to_string()];
    })
    .await;
    let seed = control.cluster.gossip_addr();
    let mut geo_config = cdn_geo::Config::new("cdn.test");
    geo_config.listen.dns = ([127, 0, 0, 1], geo_port).into();
    geo_config.listen.admin = None;
    let mut cluster = ClusterConfig::new("127.0.0.1:0".parse().unwrap(), SECRET);
    cluster.seeds = vec![seed.to_string()];
    geo_config.cluster = Some(cluster);
    let geo_shutdown = tokio_util::sync::CancellationToken::new();
    let geo_registry = prometheus::Registry::new();
    let geo = tokio::spawn(cdn_geo::run(geo_config, geo_shutdown.clone(), geo_registry.clone()));
    let origin = MockOrigin::start().await;
    origin.route("/x", Route::ok("max-age=60", "hello"));
    let edge = start_tls_edge(&origin.url(), |c| {
        c.node_id = "edge-acme".into();
        let mut cluster = ClusterConfig::new("127.0.0.1:0".parse().unwrap(), SECRET);
        cluster.seeds = vec![seed.to_string()];
        c.cluster = Some(cluster);
    })
    .await;
    let (https, h3) = (edge.https.unwrap(), edge.h3.unwrap());

    // The issued certificate reaches the running edge.
    let root = pebble_root(management).await;
    let root_file = dir.path().join("pebble-root.pem");
    std::fs::write(&root_file, &root).unwrap();
    let issued = wait::until(
        "the edge serves the issued certificate",
        Duration::from_secs(60),
        Duration::from_millis(200),
        async || {
            let chain = served_chain(https, Some("www.cdn.test"), b"h2").await;
            (chain.len() > 1).then_some(chain)
        },
    )
    .await;
    // Checked by curl against pebble's root, for the name and under the wildcard.
    for name in ["www.cdn.test", "video.cdn.test"] {
        let resolve = format!("{name}:{}:127.0.0.1", https.port());
        let url = format!("https://{name}:{}/x", https.port());
        let reply = curl(&["--http2", "--resolve", &resolve, "--cacert", root_file.to_str().unwrap(), &url]).await;
        assert_eq!((reply.status, reply.version.as_str()), (200, "2"), "{name}: {}", reply.stderr);
    }
    // And over HTTP/3.
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pki_types::CertificateDer::pem_slice_iter(root.as_bytes()) {
        roots.add(cert.unwrap()).unwrap();
    }
    let mut client = H3Client::connect_to(h3, "www.cdn.test", roots.clone()).await.expect("h3 with pebble's root");
    assert_eq!(client.get("/x", &[]).await.status, StatusCode::OK);
    // Stored in the control node's data_dir; the key only readable by its owner.
    let key = dir.path().join("acme/key.pem");
    assert!(dir.path().join("acme/cert.pem").is_file() && dir.path().join("acme/account.json").is_file());
    use std::os::unix::fs::PermissionsExt as _;
    assert_eq!(std::fs::metadata(&key).unwrap().permissions().mode() & 0o777, 0o600);
    let (status, view) = api(Method::GET, &format!("http://{}/v1/certificates", control.api), Some(TOKEN), None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(view["certificate"]["label"], "www.cdn.test");
    // The key never travels in clear: no gossip value holds a PEM private key.
    let sealed = control.cluster.certs().await;
    assert!(!sealed["www.cdn.test"].key.contains("PRIVATE KEY"));

    // One order only (control-2 saw control-1 and left it the ordering), and control-2
    // adopted the certificate, so it could renew it should control-1 go.
    let log = pebble_output.lock().unwrap().clone();
    assert_eq!(log.matches("POST /order-plz").count(), 1, "one order for two control nodes:\n{log}");
    wait::until("control-2 adopts the certificate", Duration::from_secs(10), Duration::from_millis(100), async || {
        std::fs::read_to_string(data_2.join("acme/cert.pem")).ok().filter(|pem| pem.contains("BEGIN CERTIFICATE"))
    })
    .await;

    // A forced renewal reaches the same running edge.
    let (status, _) = api(Method::POST, &format!("http://{}/v1/certificates/renew", control.api), None, None).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "renewals need the token");
    let (status, _) =
        api(Method::POST, &format!("http://{}/v1/certificates/renew", control.api), Some(TOKEN), None).await;
    assert_eq!(status, StatusCode::ACCEPTED);
    let renewed = wait::until(
        "the edge serves the renewed certificate",
        Duration::from_secs(60),
        Duration::from_millis(200),
        async || {
            let chain = served_chain(https, Some("www.cdn.test"), b"h2").await;
            (chain[0] != issued[0]).then_some(chain)
        },
    )
    .await;
    assert!(renewed.len() > 1);
    let client = H3Client::connect_to(h3, "www.cdn.test", roots).await.expect("h3 after the renewal");
    assert_eq!(client.peer_chain()[0], renewed[0], "QUIC serves the renewed one too");
    assert!(!edge.task.is_finished(), "the same edge process");
    // Pebble validated the challenges by asking our geo-DNS (its only resolver).
    let log = pebble_output.lock().unwrap().clone();
    assert!(log.contains("set VALID by completed challenge"), "pebble validated:\n{log}");
    let answered = cdn_test_support::metrics::sum_in(&geo_registry, "cdn_dns_queries_total", &[("rcode", "noerror")]);
    assert!(answered >= 2.0, "geo answered the TXT queries ({answered})");

    edge.stop().await;
    control.stop().await;
    control_2.stop().await;
    geo_shutdown.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(10), geo).await;
}
