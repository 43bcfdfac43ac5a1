//! A typed client of the control API, for the `cdn purge|nodes|drain|routing`
//! commands, tests and benchmarks.

use cdn_node::tls::{self, ClientTrust};

pub use crate::api::{NodeView, PurgeAck, PurgeStatus, RoutingAck, RoutingView};
use crate::{purge::PurgeRequest, routing::Format};
use std::{path::PathBuf, time::Duration};

use bytes::Bytes;
use http::{Method, Request, StatusCode, header};
use http_body_util::{BodyExt as _, Full};
use hyper_util::{client::legacy::Client, rt::TokioExecutor};
use serde_json::Value;

/// What went wrong talking to the control API; each variant keeps its cause
/// (`{:#}` prints the whole chain, as the `cdn` commands do).
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The base URL does not parse.
    #[error("bad control address {base:?}")]
    Address {
        /// What was given.
        base: String,
        /// Why it does not parse.
        source: http::uri::InvalidUri,
    },
    /// A request could not be built (a node id or purge id that is no URL path).
    #[error("bad request")]
    Request(#[from] http::Error),
    /// rustls refused the client's TLS settings.
    #[error("tls setup failed")]
    Tls(#[from] rustls::Error),
    /// No connection, or no answer.
    #[error("control API unreachable")]
    Unreachable(#[source] hyper_util::client::legacy::Error),
    /// No answer within 10 s.
    #[error("control API unreachable: timed out")]
    Timeout,
    /// The answer broke off.
    #[error("control API answer cut short")]
    Body(#[source] hyper::Error),
    /// The API refused the call.
    #[error("{status}: {message}")]
    Refused {
        /// HTTP status.
        status: StatusCode,
        /// The API's `error` text.
        message: String,
    },
    /// The API refused a routing document (`400`); nothing changed.
    #[error("{status}: {message}")]
    InvalidRouting {
        /// HTTP status.
        status: StatusCode,
        /// The API's `error` text.
        message: String,
        /// Every problem, as `field.path: what is wrong`.
        problems: Vec<String>,
    },
    /// The control node holds no routing document yet (`GET /v1/routing`: 404).
    #[error("no routing document yet")]
    NoRouting,
    /// The answer is not what the API promises.
    #[error("unexpected answer")]
    Unexpected(#[source] serde_json::Error),
    /// The certificates to trust could not be loaded.
    #[error("cannot load trusted certificates from {path}")]
    Trust {
        /// The PEM file.
        path: PathBuf,
        /// Why.
        source: TrustError,
    },
}

/// Why a file of trusted certificates could not be used.
#[derive(Debug, thiserror::Error)]
pub enum TrustError {
    /// The file is not readable PEM.
    #[error(transparent)]
    Pem(#[from] rustls_pki_types::pem::Error),
    /// It holds no certificate.
    #[error("no CERTIFICATE block found")]
    Empty,
    /// rustls refused a certificate as a trust anchor.
    #[error(transparent)]
    Anchor(#[from] rustls::Error),
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

/// The certificates of a PEM file, as trust anchors.
fn roots_from(path: &std::path::Path) -> Result<rustls::RootCertStore, ClientError> {
    use rustls_pki_types::{CertificateDer, pem::PemObject as _};
    let load = || -> Result<rustls::RootCertStore, TrustError> {
        let certificates = CertificateDer::pem_file_iter(path)?.collect::<Result<Vec<_>, _>>()?;
        if certificates.is_empty() {
            return Err(TrustError::Empty);
        }
        let mut roots = rustls::RootCertStore::empty();
        for certificate in certificates {
            roots.add(certificate)?;
        }
        Ok(roots)
    };
    load().map_err(|source| ClientError::Trust { path: path.to_owned(), source })
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
        if let Err(source) = base.parse::<http::Uri>() {
            return Err(ClientError::Address { base, source });
        }
        let trust = match trust {
            ServerTrust::PublicRoots => ClientTrust::PublicRoots,
            ServerTrust::CaFile(path) => ClientTrust::Roots(roots_from(path)?),
            ServerTrust::Insecure => ClientTrust::AnyCertificate,
        };
        let tls = tls::client_config(trust, false, &[])?;
        let connector =
            hyper_rustls::HttpsConnectorBuilder::new().with_tls_config(tls).https_or_http().enable_http1().build();
        Ok(Self { base, token: token.to_string(), client: Client::builder(TokioExecutor::new()).build(connector) })
    }

    async fn call(&self, method: Method, path: &str, body: Option<String>) -> Result<Value, ClientError> {
        self.send(method, path, Format::Json, Bytes::from(body.unwrap_or_default())).await
    }

    async fn send(&self, method: Method, path: &str, format: Format, body: Bytes) -> Result<Value, ClientError> {
        let request = Request::builder()
            .method(method)
            .uri(format!("{}{path}", self.base))
            .header(header::AUTHORIZATION, format!("Bearer {}", self.token))
            .header(header::CONTENT_TYPE, format.content_type())
            .body(Full::new(body))?;
        let response = tokio::time::timeout(Duration::from_secs(10), self.client.request(request))
            .await
            .map_err(|_| ClientError::Timeout)?
            .map_err(ClientError::Unreachable)?;
        let status = response.status();
        let bytes = response.into_body().collect().await.map_err(ClientError::Body)?.to_bytes();
        let value: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        if !status.is_success() {
            let message = value["error"].as_str().unwrap_or("no error text").to_string();
            let problems: Vec<String> = value["problems"]
                .as_array()
                .map(|problems| problems.iter().filter_map(|p| p.as_str().map(str::to_string)).collect())
                .unwrap_or_default();
            if status == StatusCode::BAD_REQUEST && !problems.is_empty() {
                return Err(ClientError::InvalidRouting { status, message, problems });
            }
            return Err(ClientError::Refused { status, message });
        }
        Ok(value)
    }

    /// `POST /v1/purge` with a body as documented (`urls`, `prefixes`, `tags`, `all`, `soft`).
    pub async fn purge(&self, body: &PurgeRequest) -> Result<PurgeAck, ClientError> {
        let body = serde_json::to_string(body).map_err(ClientError::Unexpected)?;
        let value = self.call(Method::POST, "/v1/purge", Some(body)).await?;
        serde_json::from_value(value).map_err(ClientError::Unexpected)
    }

    /// `GET /v1/purge/{id}`.
    pub async fn status(&self, id: &str) -> Result<PurgeStatus, ClientError> {
        let value = self.call(Method::GET, &format!("/v1/purge/{id}"), None).await?;
        serde_json::from_value(value).map_err(ClientError::Unexpected)
    }

    /// `GET /v1/nodes`.
    pub async fn nodes(&self) -> Result<Vec<NodeView>, ClientError> {
        let value = self.call(Method::GET, "/v1/nodes", None).await?;
        serde_json::from_value(value).map_err(ClientError::Unexpected)
    }

    /// `PUT /v1/routing` with a document in `format` (sent as it is: the control
    /// node reads, validates and versions it). A refused document is
    /// [`ClientError::InvalidRouting`], with every problem naming its field.
    pub async fn routing_put(&self, document: impl Into<Bytes>, format: Format) -> Result<RoutingAck, ClientError> {
        let value = self.send(Method::PUT, "/v1/routing", format, document.into()).await?;
        serde_json::from_value(value).map_err(ClientError::Unexpected)
    }

    /// `GET /v1/routing`: the document the control node holds, its version and
    /// each edge's; [`ClientError::NoRouting`] when there is none yet.
    pub async fn routing_get(&self) -> Result<RoutingView, ClientError> {
        let value = match self.call(Method::GET, "/v1/routing", None).await {
            Err(ClientError::Refused { status: StatusCode::NOT_FOUND, .. }) => return Err(ClientError::NoRouting),
            other => other?,
        };
        serde_json::from_value(value).map_err(ClientError::Unexpected)
    }

    /// `POST /v1/edges/{node}/drain` (or `undrain`).
    pub async fn drain(&self, node: &str, on: bool) -> Result<(), ClientError> {
        let action = if on { "drain" } else { "undrain" };
        self.call(Method::POST, &format!("/v1/edges/{node}/{action}"), None).await.map(|_| ())
    }
}
