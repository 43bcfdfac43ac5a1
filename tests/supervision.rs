//! Supervision across the roles: a task that dies stops its role, visibly.
//!
//! Each test starts a real role on loopback, makes one of its tasks panic through
//! the `test-util` hook (`cdn_node::supervise::Faults`, enabled for this package's
//! tests only), and checks what an operator and a load balancer see: `/readyz`
//! turns 503 while the rest drains, the other listeners close, and the role's
//! `serve`/`run` returns an error naming the task.

use std::{future::Future, net::SocketAddr, sync::Arc, time::Duration};

use cdn_node::supervise::{Cause, TaskFailed};
use cdn_test_support::wait;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};
use tokio_util::sync::CancellationToken;

const WITHIN: Duration = Duration::from_secs(15);

/// `GET path` over a fresh HTTP/1.1 connection: `(status, body)`, or `None` when
/// nothing accepts the connection.
async fn get(addr: SocketAddr, path: &str) -> Option<(u16, String)> {
    let mut stream = TcpStream::connect(addr).await.ok()?;
    let request = format!("GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.ok()?;
    let mut text = String::new();
    tokio::time::timeout(Duration::from_secs(5), stream.read_to_string(&mut text)).await.ok()?.ok()?;
    let status = text.split(' ').nth(1)?.parse().ok()?;
    let body = text.split_once("\r\n\r\n").map_or("", |(_, body)| body).to_string();
    Some((status, body))
}

/// Whether a TCP connection to `addr` is refused.
async fn refused(addr: SocketAddr) -> bool {
    TcpStream::connect(addr).await.is_err()
}

/// Polls `check` until it holds, failing the test after [`WITHIN`].
async fn eventually<F: Future<Output = bool>>(what: &str, mut check: impl FnMut() -> F) {
    wait::until(what, WITHIN, Duration::from_millis(50), async || check().await.then_some(())).await;
}

/// Waits for a role's `serve`/`run` to return, failing the test after [`WITHIN`].
async fn stopped<T>(task: tokio::task::JoinHandle<T>) -> T {
    tokio::time::timeout(WITHIN, task).await.expect("the role stops by itself").expect("serve does not panic")
}

fn assert_panicked(failed: &TaskFailed, role: &str, task: &str) {
    assert_eq!((failed.role, failed.task), (role, task), "{failed}");
    assert!(matches!(&failed.cause, Cause::Panicked(message) if message.contains("injected")), "{failed:?}");
}

#[tokio::test]
async fn an_edge_whose_h3_listener_dies_drains_the_others_and_says_why() {
    let origin = cdn_test_support::origin::start_with_content().await;
    let mut config = cdn_edge::Config::new("edge-1", origin.url(""));
    let any: SocketAddr = "127.0.0.1:0".parse().unwrap();
    config.listen.http = Some(any);
    config.listen.https = Some(any);
    config.listen.h3 = Some(any);
    config.listen.admin = Some(any);
    config.tls = Some(cdn_node::tls::TlsConfig { self_signed: true, ..Default::default() });
    // The drain lasts until the test lets go of its download (see below).
    config.limits.grace = Duration::from_secs(60);
    let edge = cdn_edge::Edge::bind(config, &prometheus::Registry::new()).await.expect("edge binds");
    let (http, https, admin) = (edge.http_addr().unwrap(), edge.https_addr().unwrap(), edge.admin_addr().unwrap());
    let faults = edge.faults();
    let shutdown = CancellationToken::new();
    let serving = tokio::spawn(edge.serve(shutdown.clone()));
    eventually("ready", || async { get(admin, "/readyz").await.is_some_and(|(status, _)| status == 200) }).await;

    // A download the client stops reading keeps the HTTP listener draining, so the
    // admin listener (which stops last) can be asked during the drain.
    let mut download = TcpStream::connect(http).await.unwrap();
    download.write_all(b"GET /_gen/1GiB HTTP/1.1\r\nHost: test\r\n\r\n").await.unwrap();
    let mut head = vec![0u8; 4096];
    let n = tokio::time::timeout(WITHIN, download.read(&mut head)).await.unwrap().unwrap();
    assert!(head[..n].starts_with(b"HTTP/1.1 200"), "{}", String::from_utf8_lossy(&head[..n]));

    faults.panic("h3");
    eventually("/readyz says 503 and why", || async {
        get(admin, "/readyz")
            .await
            .is_some_and(|(status, body)| status == 503 && body.contains("shutdown") && body.contains("tasks"))
    })
    .await;
    assert_eq!(get(admin, "/healthz").await.map(|(status, _)| status), Some(200), "still alive while draining");
    eventually("the https listener closed", || refused(https)).await;
    eventually("the http listener stopped accepting", || refused(http)).await;
    assert!(!serving.is_finished(), "the open download is still draining");

    drop(download);
    let error = stopped(serving).await.unwrap_err();
    let cdn_edge::Error::Task(failed) = &error else { panic!("not a task failure: {error}") };
    assert_panicked(failed, "edge", "h3");
    assert_eq!(error.to_string(), "edge task h3 panicked: injected fault in task h3");
    assert!(refused(admin).await, "the admin listener stopped last");
    assert!(!shutdown.is_cancelled(), "the role stops itself, not its caller's token");
}

#[tokio::test]
async fn an_origin_whose_http_listener_panics_returns_an_error_naming_it() {
    let dir = cdn_test_support::origin::content_dir();
    let config = cdn_test_support::origin::config(dir.path());
    let origin = cdn_origin::Origin::bind(config, &prometheus::Registry::new()).await.unwrap();
    let (http, admin) = (origin.http_addr(), origin.admin_addr().unwrap());
    let faults = origin.faults();
    let serving = tokio::spawn(origin.serve(CancellationToken::new()));
    assert_eq!(get(admin, "/readyz").await.map(|(status, _)| status), Some(200));
    assert_eq!(get(http, "/hello.txt").await.map(|(status, _)| status), Some(200));

    faults.panic("http");
    let error = stopped(serving).await.unwrap_err();
    let cdn_origin::Error::Task(failed) = &error else { panic!("not a task failure: {error}") };
    assert_panicked(failed, "origin", "http");
    assert!(refused(http).await && refused(admin).await, "every listener closed");
}

#[tokio::test]
async fn a_control_node_whose_api_panics_stops_and_leaves_the_cluster() {
    let data = tempfile::tempdir().unwrap();
    let mut config = cdn_control::server::Config::new("control-1", data.path(), "a-token-of-enough-length");
    config.listen.api = "127.0.0.1:0".parse().unwrap();
    config.listen.admin = Some("127.0.0.1:0".parse().unwrap());
    config.cluster =
        Some(cdn_cluster::ClusterConfig::new("127.0.0.1:0".parse().unwrap(), "a-gossip-secret-of-enough-bytes"));
    let control = cdn_control::server::Control::bind(config, &prometheus::Registry::new()).await.unwrap();
    let (api, admin) = (control.api_addr(), control.admin_addr().unwrap());
    let faults = control.faults();
    let serving = tokio::spawn(control.serve(CancellationToken::new()));
    assert_eq!(get(api, "/v1/nodes").await.map(|(status, _)| status), Some(401), "the API answers");

    faults.panic("api");
    let error = stopped(serving).await.unwrap_err();
    let cdn_control::Error::Task(failed) = &error else { panic!("not a task failure: {error}") };
    assert_panicked(failed, "control", "api");
    assert!(refused(api).await && refused(admin).await, "every listener closed");
}

#[tokio::test]
async fn a_geo_node_whose_dns_server_panics_stops() {
    let mut config = cdn_geo::Config::new("cdn.test.");
    config.listen.dns = "127.0.0.1:0".parse().unwrap();
    config.listen.admin = Some("127.0.0.1:0".parse().unwrap());
    let members: cdn_geo::MemberSource = Arc::new(|| Arc::new(Vec::new()));
    let geo = cdn_geo::Geo::bind(config, &prometheus::Registry::new(), members).await.unwrap();
    let (dns, admin) = (geo.dns_addr(), geo.admin_addr().unwrap());
    let faults = geo.faults();
    let serving = tokio::spawn(geo.serve(CancellationToken::new()));
    assert_eq!(get(admin, "/readyz").await.map(|(status, _)| status), Some(200));

    faults.panic("dns");
    let error = stopped(serving).await.unwrap_err();
    let cdn_geo::Error::Task(failed) = &error else { panic!("not a task failure: {error}") };
    assert_panicked(failed, "geo", "dns");
    assert!(refused(dns).await && refused(admin).await, "DNS over TCP and the admin listener closed");
}
