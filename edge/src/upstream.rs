//! The pooled client to the origin (http or https), with timeouts.

use std::{sync::Arc, time::Duration};

use http::{HeaderMap, HeaderValue, Request, Response, Uri, header};
use hyper::body::Incoming;
use hyper_util::{
    client::legacy::{Client, connect::HttpConnector},
    rt::TokioExecutor,
};

use cdn_node::listener::Body;

use cdn_node::tls::{self, ClientTrust};

use crate::{
    config,
    error::{FetchError, UpstreamSetup},
};

/// Hop-by-hop headers (RFC 9110 §7.6.1), never forwarded in either direction.
const HOP_BY_HOP: [&str; 8] =
    ["connection", "keep-alive", "proxy-connection", "te", "trailer", "transfer-encoding", "upgrade", "http2-settings"];

/// Removes hop-by-hop headers, including those named in `Connection`.
pub(crate) fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<String> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|v| v.trim().to_ascii_lowercase())
        .filter(|v| !v.is_empty())
        .collect();
    for name in HOP_BY_HOP.iter().copied().chain(named.iter().map(String::as_str)) {
        headers.remove(name);
    }
}

/// A pooled HTTP client (`http://`, and `https://` trusting `trust`; HTTP/1.1, or
/// HTTP/2 by ALPN) with TCP keepalive, no Nagle and idle connections kept 60 s.
pub(crate) type HttpClient = Client<hyper_rustls::HttpsConnector<HttpConnector>, Body>;

/// The edge's one way to build an [`HttpClient`] (origins, other edges).
pub(crate) fn client(
    connect_timeout: Duration,
    trust: ClientTrust,
    max_idle_per_host: usize,
) -> Result<HttpClient, UpstreamSetup> {
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_connect_timeout(Some(connect_timeout));
    http.set_nodelay(true);
    http.set_keepalive(Some(Duration::from_secs(60)));
    let tls = tls::client_config(trust, false, &[])?;
    let connector = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_http1()
        .enable_http2()
        .wrap_connector(http);
    Ok(Client::builder(TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(60))
        .pool_max_idle_per_host(max_idle_per_host)
        .build(connector))
}

/// The client to one origin.
#[derive(Clone)]
pub(crate) struct Upstream {
    client: HttpClient,
    base: Uri,
    base_path: String,
    host: Option<HeaderValue>,
    timeout: Duration,
}

/// How to reach one origin.
pub(crate) struct UpstreamSpec<'a> {
    /// `http://host[:port]` or `https://…` (a path is prepended to request paths).
    pub(crate) url: &'a str,
    /// Time to establish a connection.
    pub(crate) connect_timeout: Duration,
    /// Time to the response head, and the longest pause between body chunks.
    pub(crate) timeout: Duration,
    /// The Host header sent instead of the client's.
    pub(crate) host: Option<&'a str>,
    /// Whom an `https` origin's certificate must come from.
    pub(crate) trust: ClientTrust,
}

impl<'a> UpstreamSpec<'a> {
    /// The edge's `[origin]` section.
    pub(crate) fn of_config(config: &'a config::Origin) -> Self {
        let trust = if config.insecure { ClientTrust::AnyCertificate } else { ClientTrust::PublicRoots };
        Self {
            url: &config.url,
            connect_timeout: config.connect_timeout,
            timeout: config.timeout,
            host: config.host.as_deref(),
            trust,
        }
    }
}

impl Upstream {
    pub(crate) fn new(spec: UpstreamSpec<'_>) -> Result<Self, UpstreamSetup> {
        let base: Uri = spec.url.parse()?;
        let client = client(spec.connect_timeout, spec.trust, 256)?;
        let host = match spec.host {
            Some(host) => Some(HeaderValue::from_str(host)?),
            None => None,
        };
        let base_path = base.path().trim_end_matches('/').to_string();
        Ok(Self { client, base, base_path, host, timeout: spec.timeout })
    }

    /// The origin URI for a client request's path and query.
    pub(crate) fn uri(&self, path_and_query: &str) -> Result<Uri, FetchError> {
        let mut parts = self.base.clone().into_parts();
        let joined = format!("{}{}", self.base_path, path_and_query);
        parts.path_and_query = Some(joined.parse().map_err(|e| FetchError::Uri(Arc::new(e)))?);
        Uri::from_parts(parts).map_err(|e| FetchError::Uri(Arc::new(e)))
    }

    /// Sends `request` (its Host replaced when this origin wants another), waiting
    /// at most the configured timeout for the response head.
    pub(crate) async fn send(&self, mut request: Request<Body>) -> Result<Response<Incoming>, FetchError> {
        if let Some(host) = &self.host {
            request.headers_mut().insert(header::HOST, host.clone());
        }
        match tokio::time::timeout(self.timeout, self.client.request(request)).await {
            Err(_) => Err(FetchError::Timeout),
            Ok(Err(error)) => Err(FetchError::upstream(error)),
            Ok(Ok(response)) => Ok(response),
        }
    }
}
