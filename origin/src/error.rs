//! Errors of the origin role.

use std::{io, path::PathBuf};

/// What can stop the origin from starting or serving.
///
/// Request-level problems never surface here: they become 4xx/5xx responses.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The configuration did not validate.
    #[error("invalid origin configuration: {0}")]
    Config(#[from] cdn_node::ConfigError),
    /// The content root could not be resolved.
    #[error("cannot use root {path}: {source}")]
    Root {
        /// The configured root.
        path: PathBuf,
        /// Why it could not be resolved.
        source: io::Error,
    },
    /// A listener could not bind, or TLS could not be set up.
    #[error(transparent)]
    Node(#[from] cdn_node::Error),
    /// A listener's local address could not be read.
    #[error("cannot read the local address of the {listener} listener: {source}")]
    LocalAddr {
        /// `http`, `https` or `admin`.
        listener: &'static str,
        /// Why.
        source: io::Error,
    },
    /// The metrics could not be registered (a name already taken in the registry).
    #[error("cannot register origin metrics: {0}")]
    Metrics(#[from] prometheus::Error),
    /// A listener failed (panicked or stopped accepting); the origin stopped.
    #[error(transparent)]
    Task(#[from] cdn_node::supervise::TaskFailed),
}
