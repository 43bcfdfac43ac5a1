//! hyper clients for tests: HTTP/1.1, HTTP/2 with prior knowledge (h2c) and HTTPS
//! (h2 or HTTP/1.1 by ALPN, any certificate), and whole responses ([`Reply`]).
//!
//! One shape for what tests/edge/harness.rs (`client`, `get`, `send`, `tls_client`,
//! `Reply`) and tests/support/client.rs (`Http`, `Fetched`) each had. The clients
//! are hyper's own, so a test can still send a request by hand and read the body
//! frame by frame.

use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Method, Request, StatusCode, Version};
use http_body_util::{BodyExt as _, Empty};
use hyper_rustls::HttpsConnector;
use hyper_util::{
    client::legacy::{
        Client,
        connect::{Connect, HttpConnector},
    },
    rt::TokioExecutor,
};

/// How long any one request (and, apart, its body) may take before the test fails.
pub const TIMEOUT: Duration = Duration::from_secs(30);

/// A whole response.
#[derive(Debug, Clone)]
pub struct Reply {
    pub status: StatusCode,
    pub version: Version,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Reply {
    /// The header's value, or `""` when absent (or not text).
    pub fn header(&self, name: &str) -> &str {
        self.headers.get(name).and_then(|v| v.to_str().ok()).unwrap_or("")
    }

    /// `X-Cache` (`HIT`, `MISS`, ...), or `""`.
    pub fn x_cache(&self) -> &str {
        self.header("x-cache")
    }
}

/// A cleartext client; clone it to share its connection pool.
pub type HttpClient = Client<HttpConnector, Empty<Bytes>>;

/// An HTTPS client ([`tls_client`]).
pub type TlsClient = Client<HttpsConnector<HttpConnector>, Empty<Bytes>>;

/// An HTTP/1.1 client that keeps connections alive.
pub fn client() -> HttpClient {
    Client::builder(TokioExecutor::new()).build_http()
}

/// An HTTP/2 client with prior knowledge (h2c).
pub fn h2c_client() -> HttpClient {
    Client::builder(TokioExecutor::new()).http2_only(true).build_http()
}

/// An HTTP/1.1 client that opens a connection per request, so no pooled connection
/// races a server's idle timeout and every request's head is timed afresh.
pub fn unpooled_client() -> HttpClient {
    Client::builder(TokioExecutor::new()).pool_max_idle_per_host(0).build_http()
}

/// An HTTPS client that negotiates h2 (or HTTP/1.1) by ALPN and accepts any
/// certificate ([`crate::tls::any_certificate`]).
pub fn tls_client() -> TlsClient {
    https_client(crate::tls::any_certificate())
}

/// An HTTPS-only client over `tls`, offering h2 and HTTP/1.1 by ALPN; `B` is the
/// request body type.
pub fn https_client<B>(tls: rustls::ClientConfig) -> Client<HttpsConnector<HttpConnector>, B>
where
    B: hyper::body::Body + Send + 'static,
    B::Data: Send,
{
    let connector = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_only()
        .enable_http1()
        .enable_http2()
        .build();
    Client::builder(TokioExecutor::new()).build(connector)
}

/// `GET url` with request `headers`; the whole response.
pub async fn get<C>(client: &Client<C, Empty<Bytes>>, url: &str, headers: &[(&str, &str)]) -> Reply
where
    C: Connect + Clone + Send + Sync + 'static,
{
    send(client, Method::GET, url, headers).await
}

/// A request with `method` (a [`Method`] or its name) and `headers`, without a
/// body; reads the whole response. Fails the test when the request fails or takes
/// longer than [`TIMEOUT`].
pub async fn send<C, M>(client: &Client<C, Empty<Bytes>>, method: M, url: &str, headers: &[(&str, &str)]) -> Reply
where
    C: Connect + Clone + Send + Sync + 'static,
    Method: TryFrom<M>,
    <Method as TryFrom<M>>::Error: Into<http::Error>,
{
    let mut request = Request::builder().method(method).uri(url);
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let request = request.body(Empty::new()).expect("a valid request");
    let response = tokio::time::timeout(TIMEOUT, client.request(request))
        .await
        .unwrap_or_else(|_| panic!("{url}: timed out"))
        .unwrap_or_else(|e| panic!("{url}: {e:?}"));
    let (parts, body) = response.into_parts();
    let body = tokio::time::timeout(TIMEOUT, body.collect())
        .await
        .unwrap_or_else(|_| panic!("{url}: body timed out"))
        .unwrap_or_else(|e| panic!("{url}: body: {e:?}"))
        .to_bytes();
    Reply { status: parts.status, version: parts.version, headers: parts.headers, body }
}
