//! Errors of the edge role: what stops it ([`Error`]) and why an origin fetch
//! failed ([`FetchError`], mapped once to 502 or 504).

use std::{error::Error as StdError, fmt, io, sync::Arc};

use http::StatusCode;

/// What can stop an edge from starting or running.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A listener, certificate or the admin server failed.
    #[error(transparent)]
    Node(#[from] cdn_node::Error),
    /// The edge could not join the cluster.
    #[error(transparent)]
    Cluster(#[from] cdn_cluster::Error),
    /// The certificate cannot serve QUIC (no TLS 1.3 cipher suite QUIC can use).
    #[error("quic: {0}")]
    QuicCrypto(#[from] quinn::crypto::rustls::NoInitialCipherSuite),
    /// `quic.idle_timeout` is beyond what QUIC can carry.
    #[error("quic.idle_timeout: too large ({0})")]
    QuicIdleTimeout(#[from] quinn::VarIntBoundsExceeded),
    /// The configuration is unusable.
    #[error(transparent)]
    Config(#[from] cdn_node::ConfigError),
    /// The upstream client could not be built.
    #[error("origin client: {0}")]
    Upstream(#[source] UpstreamSetup),
    /// The disk tier could not be opened.
    #[error(transparent)]
    Disk(#[from] DiskError),
    /// The access log could not be opened.
    #[error("access_log.path {path}: {source}")]
    AccessLog {
        /// The file.
        path: std::path::PathBuf,
        /// What failed.
        #[source]
        source: io::Error,
    },
    /// A metric could not be registered.
    #[error("metrics: {0}")]
    Metrics(#[from] prometheus::Error),
    /// A task failed (a listener panicked or stopped accepting); the edge stopped.
    #[error(transparent)]
    Task(#[from] cdn_node::supervise::TaskFailed),
}

/// Why the disk tier could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    /// A directory could not be created, read or written.
    #[error("cache.disk {path}: {source}")]
    Io {
        /// The directory.
        path: std::path::PathBuf,
        /// What failed.
        #[source]
        source: io::Error,
    },
    /// Another process holds the directory.
    #[error("cache.disk {0}: used by another edge (locked)")]
    Locked(std::path::PathBuf),
    /// Rebuilding the index panicked.
    #[error("cache.disk: the index rebuild failed: {0}")]
    Index(#[source] tokio::task::JoinError),
}

/// Why the origin client could not be built.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamSetup {
    /// `origin.url` does not parse.
    #[error("origin.url: {0}")]
    Url(#[from] http::uri::InvalidUri),
    /// `origin.host` is not a valid header value.
    #[error("origin.host: {0}")]
    Host(#[from] http::header::InvalidHeaderValue),
    /// rustls refused the client configuration.
    #[error("tls: {0}")]
    Tls(#[from] rustls::Error),
}

/// What kind of failure an origin fetch ran into (pingora's `ErrorType`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum UpstreamKind {
    /// The origin refused the connection.
    ConnectRefused,
    /// The origin's name did not resolve.
    Dns,
    /// No connection within `origin.connect_timeout`.
    ConnectTimeout,
    /// The TLS handshake with the origin failed.
    Tls,
    /// The connection was reset or closed mid-response.
    Reset,
    /// The origin spoke broken HTTP (or promised a body it did not send).
    Protocol,
    /// Anything else on the way to the origin.
    Other,
}

impl fmt::Display for UpstreamKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::ConnectRefused => "connection refused",
            Self::Dns => "name did not resolve",
            Self::ConnectTimeout => "connect timed out",
            Self::Tls => "tls handshake failed",
            Self::Reset => "connection reset",
            Self::Protocol => "protocol error",
            Self::Other => "unreachable",
        })
    }
}

/// A shareable error cause (fills hand one failure to every waiter).
pub(crate) type Cause = Arc<dyn StdError + Send + Sync>;

/// Why an origin fetch failed; [`FetchError::status`] decides 502 or 504.
#[derive(Debug, Clone, thiserror::Error)]
pub(crate) enum FetchError {
    /// The request did not reach the origin, or its answer broke: 502.
    #[error("origin {kind}")]
    Upstream {
        /// What went wrong.
        kind: UpstreamKind,
        /// The client's error, with its chain.
        #[source]
        source: Cause,
    },
    /// No response head within `origin.timeout`: 504.
    #[error("origin timed out")]
    Timeout,
    /// The client's path cannot be sent to the origin: 502.
    #[error("cannot address the origin: {0}")]
    Uri(#[source] Cause),
    /// A probe's 206 carried an unusable `Content-Range`: 502.
    #[error("origin sent a bad content-range")]
    BadContentRange,
    /// The object changed at the origin between two slices: 502 (never spliced).
    #[error("object changed at the origin between slices")]
    Changed,
    /// The fill ended without telling its waiters anything (its task died): 502.
    #[error("fill abandoned")]
    Abandoned,
    /// The site's pool has no origin to send to: 502.
    #[error("no origin to send to")]
    NoOrigin,
}

impl FetchError {
    /// The client's error, classified by its chain of causes.
    pub(crate) fn upstream(error: hyper_util::client::legacy::Error) -> Self {
        let kind = classify(&error);
        Self::Upstream { kind, source: Arc::new(error) }
    }

    /// The status a client gets for this failure.
    pub(crate) fn status(&self) -> StatusCode {
        match self {
            Self::Timeout => StatusCode::GATEWAY_TIMEOUT,
            _ => StatusCode::BAD_GATEWAY,
        }
    }

    /// Whether no connection could be made (refused, timed out, name unknown, TLS
    /// handshake failed): a passive mark against the origin.
    pub(crate) fn is_connect(&self) -> bool {
        matches!(
            self,
            Self::Upstream {
                kind: UpstreamKind::ConnectRefused
                    | UpstreamKind::ConnectTimeout
                    | UpstreamKind::Dns
                    | UpstreamKind::Tls,
                ..
            }
        )
    }

    /// Whether the request surely did not reach the origin's application: no
    /// connection, or a (pooled) connection that closed before any answer. Such a
    /// GET may go to another origin.
    pub(crate) fn not_reached(&self) -> bool {
        self.is_connect() || matches!(self, Self::Upstream { kind: UpstreamKind::Reset, .. })
    }

    /// Whether this is a timeout (for `cdn_origin_requests_total{status="timeout"}`).
    pub(crate) fn is_timeout(&self) -> bool {
        matches!(self, Self::Timeout)
    }
}

/// Walks the cause chain for the first thing that tells what happened.
fn classify(error: &(dyn StdError + 'static)) -> UpstreamKind {
    let mut current: Option<&(dyn StdError + 'static)> = Some(error);
    while let Some(error) = current {
        if error.is::<rustls::Error>() {
            return UpstreamKind::Tls;
        }
        if let Some(io) = error.downcast_ref::<io::Error>() {
            match io.kind() {
                io::ErrorKind::ConnectionRefused => return UpstreamKind::ConnectRefused,
                io::ErrorKind::TimedOut => return UpstreamKind::ConnectTimeout,
                io::ErrorKind::ConnectionReset
                | io::ErrorKind::ConnectionAborted
                | io::ErrorKind::BrokenPipe
                | io::ErrorKind::UnexpectedEof => return UpstreamKind::Reset,
                _ => {}
            }
            if io.get_ref().is_some_and(|inner| inner.is::<rustls::Error>()) {
                return UpstreamKind::Tls;
            }
        }
        if let Some(hyper) = error.downcast_ref::<hyper::Error>() {
            if hyper.is_parse() || hyper.is_parse_status() || hyper.is_user() {
                return UpstreamKind::Protocol;
            }
            if hyper.is_incomplete_message() || hyper.is_canceled() || hyper.is_closed() {
                return UpstreamKind::Reset;
            }
        }
        // hyper-util's connector says "dns error" around the resolver's io::Error.
        if error.to_string().starts_with("dns error") {
            return UpstreamKind::Dns;
        }
        current = error.source();
    }
    UpstreamKind::Other
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("{0}")]
    struct Wrapped(&'static str, #[source] io::Error);

    #[test]
    fn classifies_by_cause() {
        let refused = Wrapped("tcp connect error", io::Error::from(io::ErrorKind::ConnectionRefused));
        assert_eq!(classify(&refused), UpstreamKind::ConnectRefused);
        let dns = Wrapped("dns error", io::Error::other("failed to lookup address information"));
        assert_eq!(classify(&dns), UpstreamKind::Dns);
        let tls = io::Error::new(io::ErrorKind::InvalidData, rustls::Error::DecryptError);
        assert_eq!(classify(&tls), UpstreamKind::Tls);
        let reset = Wrapped("connection error", io::Error::from(io::ErrorKind::ConnectionReset));
        assert_eq!(classify(&reset), UpstreamKind::Reset);
        assert_eq!(classify(&io::Error::other("?")), UpstreamKind::Other);
    }

    #[test]
    fn statuses() {
        assert_eq!(FetchError::Timeout.status(), StatusCode::GATEWAY_TIMEOUT);
        assert_eq!(FetchError::Changed.status(), StatusCode::BAD_GATEWAY);
        let refused: Cause = Arc::new(io::Error::from(io::ErrorKind::ConnectionRefused));
        let error = FetchError::Upstream { kind: UpstreamKind::ConnectRefused, source: refused };
        assert_eq!(error.status(), StatusCode::BAD_GATEWAY);
        assert_eq!(error.to_string(), "origin connection refused");
    }
}
