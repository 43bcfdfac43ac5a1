//! Starting an edge in-process and talking to it with real clients.
#![allow(dead_code)]

use std::{net::SocketAddr, sync::Arc, time::Duration};

use bytes::Bytes;
use cdn_edge::{Clock, Config, Edge};
use http::{HeaderMap, Request, StatusCode, Version};
use http_body_util::{BodyExt as _, Empty};
use hyper_util::{client::legacy::Client, rt::TokioExecutor};
use prometheus::Registry;
use tokio_util::sync::CancellationToken;

pub(crate) struct TestEdge {
    pub(crate) http: SocketAddr,
    pub(crate) https: Option<SocketAddr>,
    pub(crate) h3: Option<SocketAddr>,
    pub(crate) admin: SocketAddr,
    pub(crate) clock: Clock,
    pub(crate) registry: Registry,
    pub(crate) shutdown: CancellationToken,
    pub(crate) task: tokio::task::JoinHandle<()>,
}

impl TestEdge {
    pub(crate) async fn start(origin: &str, tweak: impl FnOnce(&mut Config)) -> Self {
        let mut config = Config::new("edge-test-1", origin);
        config.listen.http = Some("127.0.0.1:0".parse().unwrap());
        config.listen.admin = Some("127.0.0.1:0".parse().unwrap());
        tweak(&mut config);
        let registry = Registry::new();
        let clock = Clock::system();
        let edge = Edge::bind_with_clock(config, &registry, clock.clone()).await.expect("edge binds");
        let (http, https, admin) = (edge.http_addr().unwrap(), edge.https_addr(), edge.admin_addr().unwrap());
        let h3 = edge.h3_addr();
        let shutdown = CancellationToken::new();
        let task = tokio::spawn({
            let shutdown = shutdown.clone();
            async move { edge.serve(shutdown).await.expect("edge serves") }
        });
        Self { http, https, h3, admin, clock, registry, shutdown, task }
    }

    pub(crate) fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.http)
    }

    /// The value of a metric sample whose labels contain all of `labels`, summed.
    pub(crate) fn metric(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        let mut total = 0.0;
        for family in self.registry.gather() {
            if family.name() != name {
                continue;
            }
            for m in family.get_metric() {
                let ok = labels.iter().all(|(k, v)| m.get_label().iter().any(|l| l.name() == *k && l.value() == *v));
                if ok {
                    total += m.get_counter().get_value() + m.get_gauge().get_value();
                }
            }
        }
        total
    }

    pub(crate) async fn stop(self) {
        self.shutdown.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(15), self.task).await;
    }
}

/// A port free on 127.0.0.1 for both TCP and UDP (for HTTPS + HTTP/3 on one port).
pub(crate) fn free_port() -> u16 {
    loop {
        let tcp = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = tcp.local_addr().unwrap().port();
        if std::net::UdpSocket::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

/// An edge with HTTPS and HTTP/3 on one port (self-signed certificate).
pub(crate) async fn start_tls_edge(origin: &str, tweak: impl FnOnce(&mut Config)) -> TestEdge {
    TestEdge::start(origin, |c| {
        let port = free_port();
        c.listen.https = Some(([127, 0, 0, 1], port).into());
        c.listen.h3 = Some(([127, 0, 0, 1], port).into());
        c.tls = Some(cdn_node::tls::TlsConfig { self_signed: true, ..Default::default() });
        tweak(c);
    })
    .await
}

#[derive(Debug)]
pub(crate) struct Reply {
    pub(crate) status: StatusCode,
    pub(crate) headers: HeaderMap,
    pub(crate) body: Bytes,
    pub(crate) version: Version,
}

impl Reply {
    pub(crate) fn header(&self, name: &str) -> &str {
        self.headers.get(name).map_or("", |v| v.to_str().unwrap_or(""))
    }

    pub(crate) fn x_cache(&self) -> &str {
        self.header("x-cache")
    }
}

pub(crate) type HttpClient = Client<hyper_util::client::legacy::connect::HttpConnector, Empty<Bytes>>;

pub(crate) fn client() -> HttpClient {
    Client::builder(TokioExecutor::new()).build_http()
}

pub(crate) async fn get(client: &HttpClient, url: &str, headers: &[(&str, &str)]) -> Reply {
    send(client, "GET", url, headers).await
}

pub(crate) async fn send(client: &HttpClient, method: &str, url: &str, headers: &[(&str, &str)]) -> Reply {
    let mut builder = Request::builder().method(method).uri(url);
    for (name, value) in headers {
        builder = builder.header(*name, *value);
    }
    let response = client.request(builder.body(Empty::new()).unwrap()).await.expect("request");
    let (parts, body) = response.into_parts();
    let body = body.collect().await.expect("body").to_bytes();
    Reply { status: parts.status, headers: parts.headers, body, version: parts.version }
}

/// An HTTPS client that negotiates h2 by ALPN and accepts any certificate.
pub(crate) fn tls_client()
-> Client<hyper_rustls::HttpsConnector<hyper_util::client::legacy::connect::HttpConnector>, Empty<Bytes>> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(cdn_node::tls::AcceptAnyCertificate::new())
        .with_no_client_auth();
    let _ = provider;
    let connector = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(config)
        .https_only()
        .enable_http1()
        .enable_http2()
        .build();
    Client::builder(TokioExecutor::new()).build(connector)
}
