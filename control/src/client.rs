//! A typed client of the control API, for the `cdn purge|nodes|drain` commands,
//! tests and benchmarks.

use cdn_node::tls::{self, ClientTrust};

pub use crate::api::{NodeView, PurgeAck, PurgeStatus};
use crate::purge::PurgeRequest;
use std::{path::PathBuf, time::Duration};

use bytes::Bytes;
use http::{Method, Request, StatusCode, header};
use http_body_util::{BodyExt as _, Full};
use hyper_util::{client::legacy::Client, rt::TokioExecutor};
use serde_json::Value;

/// What went wrong talking to the control API.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The base URL or a path does not parse.
    #[error("bad control address: {0}")]
    Address(String),
    /// No answer.
    #[error("control API unreachable: {0}")]
    Unreachable(String),
    /// The API refused the call.
    #[error("{status}: {message}")]
    Refused {
        /// HTTP status.
        status: StatusCode,
        /// The API's `error` text.
        message: String,
    },
    /// The answer is not what the API promises.
    #[error("unexpected answer: {0}")]
    Unexpected(String),
    /// The certificates to trust could not be loaded.
    #[error("cannot load trusted certificates from {path}: {reason}")]
    Trust {
        /// The PEM file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
}

/// How the client checks the certificate of an `https://` control node.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum ServerTrust {
    /// Certificates signed by a public CA (the Mozilla roots of `webpki-roots`).
    #[default]
    PublicRoots,
    /// Certificates signed by the CA certificates in this PEM file (a private CA, or
    /// the control node's own self-signed certificate).
    CaFile(PathBuf),
    /// Any certificate (the connection is encrypted but the server not authenticated:
    /// development only).
    Insecure,
}

/// An error with its causes (`client error (Connect): invalid peer certificate: UnknownIssuer`):
/// hyper's own text alone does not say why a connection failed.
fn with_causes(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut cause = error.source();
    while let Some(inner) = cause {
        let inner_text = inner.to_string();
        if !text.contains(&inner_text) {
            text.push_str(": ");
            text.push_str(&inner_text);
        }
        cause = inner.source();
    }
    text
}

/// The certificates of a PEM file, as trust anchors.
fn roots_from(path: &std::path::Path) -> Result<rustls::RootCertStore, ClientError> {
    use rustls_pki_types::{CertificateDer, pem::PemObject as _};
    let trust_error = |reason: String| ClientError::Trust { path: path.to_owned(), reason };
    let certificates = CertificateDer::pem_file_iter(path)
        .map_err(|e| trust_error(e.to_string()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| trust_error(e.to_string()))?;
    if certificates.is_empty() {
        return Err(trust_error("no CERTIFICATE block found".into()));
    }
    let mut roots = rustls::RootCertStore::empty();
    for certificate in certificates {
        roots.add(certificate).map_err(|e| trust_error(e.to_string()))?;
    }
    Ok(roots)
}

/// A client of one control node.
pub struct ControlClient {
    base: String,
    token: String,
    client: Client<hyper_rustls::HttpsConnector<hyper_util::client::legacy::connect::HttpConnector>, Full<Bytes>>,
}

impl ControlClient {
    /// A client of the control API at `base` (`http://127.0.0.1:9000`) with `token`;
    /// an `https://` base must present a certificate from a public CA.
    pub fn new(base: &str, token: &str) -> Result<Self, ClientError> {
        Self::with_trust(base, token, &ServerTrust::PublicRoots)
    }

    /// A client of the control API at `base` with `token`, checking the certificate
    /// of an `https://` base as `trust` says.
    pub fn with_trust(base: &str, token: &str, trust: &ServerTrust) -> Result<Self, ClientError> {
        let base = base.trim_end_matches('/').to_string();
        base.parse::<http::Uri>().map_err(|e| ClientError::Address(format!("{base}: {e}")))?;
        let trust = match trust {
            ServerTrust::PublicRoots => ClientTrust::PublicRoots,
            ServerTrust::CaFile(path) => ClientTrust::Roots(roots_from(path)?),
            ServerTrust::Insecure => ClientTrust::AnyCertificate,
        };
        let tls = tls::client_config(trust, false, &[]).map_err(|e| ClientError::Address(e.to_string()))?;
        let connector =
            hyper_rustls::HttpsConnectorBuilder::new().with_tls_config(tls).https_or_http().enable_http1().build();
        Ok(Self { base, token: token.to_string(), client: Client::builder(TokioExecutor::new()).build(connector) })
    }

    async fn call(&self, method: Method, path: &str, body: Option<String>) -> Result<Value, ClientError> {
        let request = Request::builder()
            .method(method)
            .uri(format!("{}{path}", self.base))
            .header(header::AUTHORIZATION, format!("Bearer {}", self.token))
            .header(header::CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(body.unwrap_or_default())))
            .map_err(|e| ClientError::Address(e.to_string()))?;
        let response = tokio::time::timeout(Duration::from_secs(10), self.client.request(request))
            .await
            .map_err(|_| ClientError::Unreachable("timed out".into()))?
            .map_err(|e| ClientError::Unreachable(with_causes(&e)))?;
        let status = response.status();
        let bytes =
            response.into_body().collect().await.map_err(|e| ClientError::Unreachable(e.to_string()))?.to_bytes();
        let value: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        if !status.is_success() {
            let message = value["error"].as_str().unwrap_or("no error text").to_string();
            return Err(ClientError::Refused { status, message });
        }
        Ok(value)
    }

    /// `POST /v1/purge` with a body as documented (`urls`, `prefixes`, `tags`, `all`, `soft`).
    pub async fn purge(&self, body: &PurgeRequest) -> Result<PurgeAck, ClientError> {
        let body = serde_json::to_string(body).map_err(|e| ClientError::Unexpected(e.to_string()))?;
        let value = self.call(Method::POST, "/v1/purge", Some(body)).await?;
        serde_json::from_value(value).map_err(|e| ClientError::Unexpected(e.to_string()))
    }

    /// `GET /v1/purge/{id}`.
    pub async fn status(&self, id: &str) -> Result<PurgeStatus, ClientError> {
        let value = self.call(Method::GET, &format!("/v1/purge/{id}"), None).await?;
        serde_json::from_value(value).map_err(|e| ClientError::Unexpected(e.to_string()))
    }

    /// `GET /v1/nodes`.
    pub async fn nodes(&self) -> Result<Vec<NodeView>, ClientError> {
        let value = self.call(Method::GET, "/v1/nodes", None).await?;
        serde_json::from_value(value).map_err(|e| ClientError::Unexpected(e.to_string()))
    }

    /// `POST /v1/edges/{node}/drain` (or `undrain`).
    pub async fn drain(&self, node: &str, on: bool) -> Result<(), ClientError> {
        let action = if on { "drain" } else { "undrain" };
        self.call(Method::POST, &format!("/v1/edges/{node}/{action}"), None).await.map(|_| ())
    }
}
