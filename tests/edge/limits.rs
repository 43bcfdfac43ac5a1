//! Per-client limits: a client over its request rate gets 429 with `Retry-After`
//! while another client (another loopback source address) is served; connections
//! over the per-client limit are closed at accept (TCP) or refused (QUIC).
//! (IPv6 /64 grouping: unit tests in edge/src/limits.rs.)

use std::{net::SocketAddr, sync::Arc, time::Duration};

use bytes::Bytes;
use cdn_test_support::{
    client::{HttpClient, get},
    edge::{TestEdge, start_tls_edge},
    http3::H3Client,
    mock_origin::{MockOrigin, Route},
    wait,
};
use http::StatusCode;
use http_body_util::Empty;
use hyper_util::{
    client::legacy::{Client, connect::HttpConnector},
    rt::TokioExecutor,
};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

/// Client source addresses of these tests.
const CLIENT_A: [u8; 4] = [127, 0, 0, 141];
const CLIENT_B: [u8; 4] = [127, 0, 0, 142];

/// An HTTP/1.1 client whose connections come from `ip`.
fn client_from(ip: [u8; 4]) -> HttpClient {
    let mut connector = HttpConnector::new();
    connector.set_local_address(Some(ip.into()));
    Client::builder(TokioExecutor::new()).build::<_, Empty<Bytes>>(connector)
}

#[tokio::test]
async fn a_client_over_its_rate_gets_429_while_another_is_served() {
    let origin = MockOrigin::start().await;
    origin.route("/a", Route::ok("public, max-age=600", "hello"));
    let edge = TestEdge::start(&origin.url(), |c| {
        c.limits.client_rps = Some(2);
        c.limits.client_burst = Some(3);
    })
    .await;
    let (a, b) = (client_from(CLIENT_A), client_from(CLIENT_B));
    let mut statuses = Vec::new();
    let mut retry_after = None;
    for _ in 0..20 {
        let reply = get(&a, &edge.url("/a"), &[]).await;
        if reply.status == StatusCode::TOO_MANY_REQUESTS {
            let seconds: u64 = reply.header("retry-after").parse().expect("Retry-After in seconds");
            assert!((1..=2).contains(&seconds), "Retry-After {seconds}");
            assert_eq!(reply.header("cache-control"), "no-store");
            retry_after = Some(seconds);
        }
        statuses.push(reply.status.as_u16());
    }
    let limited = statuses.iter().filter(|s| **s == 429).count();
    // A burst of 3 (and 2 more a second): at most a handful of the 20 pass.
    assert!(statuses[..3].iter().all(|s| *s == 200), "{statuses:?}");
    assert!(limited >= 12, "{statuses:?}");
    // The other client is served all along.
    for _ in 0..3 {
        assert_eq!(get(&b, &edge.url("/a"), &[]).await.status, StatusCode::OK);
    }
    assert_eq!(edge.metric("cdn_limited_total", &[("kind", "rate")]), limited as f64);
    // After Retry-After, A is served again.
    tokio::time::sleep(Duration::from_secs(retry_after.unwrap())).await;
    assert_eq!(get(&a, &edge.url("/a"), &[]).await.status, StatusCode::OK);
    assert_eq!(origin.hits("/a"), 1, "limited requests never reached the origin");
    edge.stop().await;
}

/// A TCP connection from `ip` that has answered one request.
async fn connection_from(ip: [u8; 4], edge: SocketAddr) -> std::io::Result<tokio::net::TcpStream> {
    let socket = tokio::net::TcpSocket::new_v4()?;
    socket.bind((ip, 0).into())?;
    let mut stream = socket.connect(edge).await?;
    stream.write_all(b"GET /a HTTP/1.1\r\nhost: a.test\r\n\r\n").await?;
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(10), stream.read(&mut buf)).await??;
    if n == 0 {
        return Err(std::io::ErrorKind::UnexpectedEof.into());
    }
    assert!(buf[..n].starts_with(b"HTTP/1.1 200"), "{}", String::from_utf8_lossy(&buf[..n]));
    Ok(stream)
}

#[tokio::test]
async fn connections_over_the_limit_are_closed() {
    let origin = MockOrigin::start().await;
    origin.route("/a", Route::ok("public, max-age=600", "hello"));
    let edge = TestEdge::start(&origin.url(), |c| c.limits.client_connections = Some(2)).await;
    let first = connection_from(CLIENT_A, edge.http).await.unwrap();
    let _second = connection_from(CLIENT_A, edge.http).await.unwrap();
    let third = connection_from(CLIENT_A, edge.http).await;
    assert!(third.is_err(), "a third connection from one client was served");
    assert_eq!(edge.metric("cdn_limited_total", &[("kind", "connections")]), 1.0);
    // Another client is not affected.
    let _other = connection_from(CLIENT_B, edge.http).await.unwrap();
    // A closed connection frees its place.
    drop(first);
    wait::until("a freed connection slot", Duration::from_secs(10), Duration::from_millis(20), async || {
        connection_from(CLIENT_A, edge.http).await.ok()
    })
    .await;
    edge.stop().await;
}

/// A QUIC connection (ALPN h3, any certificate) from 127.0.0.1, or why not.
async fn quic_connect(addr: SocketAddr) -> Result<(quinn::Endpoint, quinn::Connection), quinn::ConnectionError> {
    let mut tls = cdn_test_support::tls::any_certificate();
    tls.alpn_protocols = vec![b"h3".to_vec()];
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls).unwrap();
    let mut endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    endpoint.set_default_client_config(quinn::ClientConfig::new(Arc::new(crypto)));
    let connection = endpoint.connect(addr, "localhost").unwrap().await?;
    Ok((endpoint, connection))
}

#[tokio::test]
async fn http3_clients_are_limited_too() {
    let origin = MockOrigin::start().await;
    origin.route("/a", Route::ok("public, max-age=600", "hello"));
    let edge = start_tls_edge(&origin.url(), |c| {
        c.limits.client_rps = Some(1);
        c.limits.client_connections = Some(1);
    })
    .await;
    let h3 = edge.h3.unwrap();
    let mut client = H3Client::connect(h3).await;
    assert_eq!(client.get("/a", &[]).await.status, StatusCode::OK);
    let limited = client.get("/a", &[]).await;
    assert_eq!(limited.status, StatusCode::TOO_MANY_REQUESTS);
    assert!(!limited.header("retry-after").is_empty());
    // A second QUIC connection from the same address is refused.
    let second = quic_connect(h3).await;
    assert!(matches!(second, Err(quinn::ConnectionError::ConnectionClosed(_))), "{:?}", second.map(|_| ()));
    assert_eq!(edge.metric("cdn_limited_total", &[("kind", "connections")]), 1.0);
    // Once the first is gone, a new one is admitted.
    client.connection.close(0u32.into(), b"done");
    drop(client);
    wait::until("a freed QUIC slot", Duration::from_secs(10), Duration::from_millis(50), async || {
        quic_connect(h3).await.ok()
    })
    .await;
    edge.stop().await;
}
