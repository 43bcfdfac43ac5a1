//! Errors of the control role.

use std::{io, path::PathBuf};

/// What can stop a control node from starting or serving.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The configuration did not validate.
    #[error(transparent)]
    Config(#[from] cdn_node::ConfigError),
    /// `token_file` could not be read.
    #[error("token_file {path}: {source}")]
    TokenFile {
        /// The file.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// The purge log could not be opened.
    #[error("purge log in {dir}: {source}")]
    PurgeLog {
        /// `data_dir`.
        dir: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// The stored routing document could not be read.
    #[error("routing document in {dir}: {source}")]
    RoutingStore {
        /// `data_dir`.
        dir: PathBuf,
        /// Why.
        source: crate::routing::store::StoreError,
    },
    /// A listener or TLS failed.
    #[error(transparent)]
    Node(#[from] cdn_node::Error),
    /// The node could not join the cluster.
    #[error(transparent)]
    Cluster(#[from] cdn_cluster::Error),
    /// A metric could not be registered.
    #[error("metrics: {0}")]
    Metrics(#[from] prometheus::Error),
    /// A task failed (the API listener panicked, ...); the node stopped.
    #[error(transparent)]
    Task(#[from] cdn_node::supervise::TaskFailed),
}
