//! Errors of the edge role.

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
    Upstream(String),
    /// A metric could not be registered.
    #[error("metrics: {0}")]
    Metrics(#[from] prometheus::Error),
    /// A task failed (a listener panicked or stopped accepting); the edge stopped.
    #[error(transparent)]
    Task(#[from] cdn_node::supervise::TaskFailed),
}

/// Why an origin fetch failed; decides 502 or 504 for the client.
#[derive(Debug, Clone, thiserror::Error)]
pub(crate) enum FetchError {
    /// No connection or a broken response: 502.
    #[error("origin unreachable: {0}")]
    Unreachable(String),
    /// No answer in time: 504.
    #[error("origin timed out")]
    Timeout,
}
