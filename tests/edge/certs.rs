//! Certificates chosen by SNI over TCP (HTTP/2) and QUIC (HTTP/3), and replaced on
//! disk while the edge runs: picked up within seconds without a restart or a dropped
//! connection; a broken file keeps the certificate before it; `SIGHUP` re-reads at
//! once.

use std::time::{Duration, Instant};

use bytes::Bytes;
use cdn_node::tls::{CertFiles, TlsConfig};
use cdn_test_support::{
    curl::curl,
    edge::start_tls_edge,
    http3::H3Client,
    mock_origin::{MockOrigin, Route},
    tls::{any_certificate, served_chain, write_self_signed},
    wait,
};
use http::StatusCode;
use http_body_util::{BodyExt as _, Empty};

fn roots(cert: &rustls_pki_types::CertificateDer<'static>) -> rustls::RootCertStore {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(cert.clone()).unwrap();
    roots
}

#[tokio::test]
async fn each_hostname_gets_its_own_certificate_over_h2_and_h3() {
    let dir = tempfile::tempdir().unwrap();
    let (www_cert, www_key, www) = write_self_signed(dir.path(), "www", &["www.cdn.test"]);
    let (shop_cert, shop_key, shop) = write_self_signed(dir.path(), "shop", &["shop.cdn.test", "*.video.test"]);
    let origin = MockOrigin::start().await;
    origin.route("/x", Route::ok("max-age=60", "hello"));
    let edge = start_tls_edge(&origin.url(), |c| {
        c.tls = Some(TlsConfig {
            cert: Some(www_cert.clone()),
            key: Some(www_key.clone()),
            certs: vec![CertFiles { cert: shop_cert.clone(), key: shop_key.clone() }],
            ..TlsConfig::default()
        })
    })
    .await;
    let https = edge.https.unwrap();
    // HTTP/2 with curl, each name checked against its own certificate only.
    for (name, ca) in [("www.cdn.test", &www_cert), ("shop.cdn.test", &shop_cert), ("a.video.test", &shop_cert)] {
        let resolve = format!("{name}:{}:127.0.0.1", https.port());
        let url = format!("https://{name}:{}/x", https.port());
        let ca = ca.to_str().unwrap();
        let reply = curl(&["--http2", "--resolve", &resolve, "--cacert", ca, &url]).await;
        assert_eq!(reply.status, 200, "{name}: {}", reply.stderr);
        assert_eq!(reply.version, "2", "{name}");
        assert_eq!(reply.body, b"hello");
    }
    // The wrong certificate for a name does not verify: it really is chosen by SNI.
    let resolve = format!("www.cdn.test:{}:127.0.0.1", https.port());
    let url = format!("https://www.cdn.test:{}/x", https.port());
    let wrong = curl(&["--http2", "--resolve", &resolve, "--cacert", shop_cert.to_str().unwrap(), &url]).await;
    assert_ne!(wrong.status, 200, "www.cdn.test verified against shop's certificate");
    // Names no certificate has, and no SNI at all, get the first (default) one.
    assert_eq!(served_chain(https, Some("other.test"), b"h2").await[0], www);
    assert_eq!(served_chain(https, None, b"h2").await[0], www);
    assert_eq!(served_chain(https, Some("a.b.video.test"), b"h2").await[0], www, "one label only");

    // HTTP/3: the same choice over QUIC.
    let h3 = edge.h3.unwrap();
    for (name, expected) in [("www.cdn.test", &www), ("shop.cdn.test", &shop), ("b.video.test", &shop)] {
        let mut client = H3Client::connect_to(h3, name, roots(expected)).await.expect("QUIC handshake");
        assert_eq!(client.peer_chain()[0], *expected, "{name}");
        let reply = client.get("/x", &[]).await;
        assert_eq!(reply.status, StatusCode::OK, "{name}");
        assert_eq!(reply.body, "hello");
    }
    assert!(H3Client::connect_to(h3, "shop.cdn.test", roots(&www)).await.is_err(), "shop is not served www's");
    edge.stop().await;
}

#[tokio::test]
async fn a_certificate_replaced_on_disk_is_served_within_seconds_without_dropping_connections() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key, first) = write_self_signed(dir.path(), "edge", &["www.cdn.test", "127.0.0.1"]);
    let origin = MockOrigin::start().await;
    origin.route("/x", Route::ok("max-age=60", "hello"));
    let edge = start_tls_edge(&origin.url(), |c| {
        c.tls = Some(TlsConfig { cert: Some(cert.clone()), key: Some(key.clone()), ..TlsConfig::default() })
    })
    .await;
    let https = edge.https.unwrap();
    assert_eq!(served_chain(https, Some("www.cdn.test"), b"h2").await[0], first);
    // An HTTP/2 connection opened before the change.
    let mut tls = any_certificate();
    tls.alpn_protocols = vec![b"h2".to_vec()];
    let tcp = tokio::net::TcpStream::connect(https).await.unwrap();
    let name = rustls_pki_types::ServerName::try_from("www.cdn.test").unwrap();
    let stream = tokio_rustls::TlsConnector::from(std::sync::Arc::new(tls)).connect(name, tcp).await.unwrap();
    let (mut open, connection) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(stream),
    )
    .await
    .unwrap();
    tokio::spawn(connection);
    let get =
        || http::Request::get(format!("https://www.cdn.test:{}/x", https.port())).body(Empty::<Bytes>::new()).unwrap();
    assert_eq!(open.send_request(get()).await.unwrap().status(), StatusCode::OK);

    // Renewed on disk: served to new connections within seconds, same process.
    let replaced = Instant::now();
    let (_, _, second) = write_self_signed(dir.path(), "edge", &["www.cdn.test", "127.0.0.1"]);
    wait::until("the new certificate is served", Duration::from_secs(6), Duration::from_millis(50), async || {
        (served_chain(https, Some("www.cdn.test"), b"h2").await[0] == second).then_some(())
    })
    .await;
    assert!(replaced.elapsed() < Duration::from_secs(5), "took {:?}", replaced.elapsed());
    let h3 = edge.h3.unwrap();
    let client = H3Client::connect_to(h3, "www.cdn.test", roots(&second)).await.expect("QUIC gets the new one too");
    assert_eq!(client.peer_chain()[0], second);
    // The connection opened before is still up, under its certificate.
    let response = open.send_request(get()).await.expect("the old connection still serves");
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.into_body().collect().await.unwrap().to_bytes(), "hello");

    // A broken file (a renewal written in place, half done) keeps the certificate.
    std::fs::write(&cert, "-----BEGIN CERTIFICATE-----\nMIIBkTCB+wIJAK\n").unwrap();
    wait::until("the broken file is noticed", Duration::from_secs(6), Duration::from_millis(50), async || {
        (edge.metric("cdn_tls_reload_errors_total", &[]) >= 1.0).then_some(())
    })
    .await;
    assert_eq!(served_chain(https, Some("www.cdn.test"), b"h2").await[0], second, "the old certificate stays");
    let expiry = edge.metric("cdn_tls_cert_expiry_seconds", &[("name", "www.cdn.test")]);
    assert!(expiry > 86_400.0, "expiry {expiry}");
    edge.stop().await;
}

#[tokio::test]
async fn sighup_rereads_certificates_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key, first) = write_self_signed(dir.path(), "edge", &["www.cdn.test"]);
    let origin = MockOrigin::start().await;
    let (http, https, admin) =
        (cdn_test_support::net::free_port(), cdn_test_support::net::free_port(), cdn_test_support::net::free_port());
    let config = dir.path().join("edge.toml");
    std::fs::write(
        &config,
        format!(
            "node_id = \"edge-hup\"\n[listen]\nhttp = \"127.0.0.1:{http}\"\nhttps = \"127.0.0.1:{https}\"\n\
             admin = \"127.0.0.1:{admin}\"\n[tls]\ncert = \"{}\"\nkey = \"{}\"\n[origin]\nurl = \"{}\"\n",
            cert.display(),
            key.display(),
            origin.url()
        ),
    )
    .unwrap();
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_cdn"))
        .args(["edge", "--config"])
        .arg(&config)
        .env("NO_COLOR", "1")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("cdn edge starts");
    let output = cdn_test_support::process::capture_output(&mut child);
    let addr: std::net::SocketAddr = ([127, 0, 0, 1], https).into();
    wait::until("the edge serves TLS", Duration::from_secs(20), Duration::from_millis(20), async || {
        tokio::net::TcpStream::connect(addr).await.ok().map(|_| ())
    })
    .await;
    assert_eq!(served_chain(addr, Some("www.cdn.test"), b"h2").await[0], first);
    let pid = child.id().expect("a pid").to_string();
    // The files are polled every 2 s; after SIGHUP the new certificate is there at
    // once. Three rounds, each well inside the poll interval: polling alone would
    // pass all three by luck less than once in a hundred runs.
    for round in 0..3 {
        let (_, _, next) = write_self_signed(dir.path(), "edge", &["www.cdn.test"]);
        let sent = Instant::now();
        let status = tokio::process::Command::new("kill").args(["-HUP", &pid]).status().await.unwrap();
        assert!(status.success());
        let mut served = Vec::new();
        while sent.elapsed() < Duration::from_millis(400) {
            served = served_chain(addr, Some("www.cdn.test"), b"h2").await;
            if served[0] == next {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(served[0] == next, "round {round}: not re-read 400 ms after SIGHUP:\n{}", output.lock().unwrap());
    }
    assert!(child.try_wait().unwrap().is_none(), "SIGHUP did not stop the edge");
    assert!(output.lock().unwrap().contains("SIGHUP: reloading certificates"));
}
