//! Errors of the geo role.

use std::{io, net::SocketAddr, path::PathBuf};

/// What can stop the geo-DNS from starting or running.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The admin listener failed.
    #[error(transparent)]
    Node(#[from] cdn_node::Error),
    /// The geo node could not join the cluster.
    #[error(transparent)]
    Cluster(#[from] cdn_cluster::Error),
    /// The configuration is unusable.
    #[error(transparent)]
    Config(#[from] cdn_node::ConfigError),
    /// The DNS socket (UDP or TCP) could not be bound.
    #[error("cannot listen for dns on {addr} ({protocol}): {source}")]
    Bind {
        /// The address that was asked for.
        addr: SocketAddr,
        /// `udp` or `tcp`.
        protocol: &'static str,
        /// Why the bind failed.
        source: io::Error,
    },
    /// The GeoIP database could not be loaded at start.
    #[error("geoip_db: cannot load {path}: {source}")]
    GeoDb {
        /// The `.mmdb` file.
        path: PathBuf,
        /// Why.
        source: crate::mmdb::GeoDbError,
    },
    /// A metric could not be registered.
    #[error("metrics: {0}")]
    Metrics(#[from] prometheus::Error),
    /// A task failed (the DNS server stopped on its own or with an error, a task
    /// panicked); the node stopped.
    #[error(transparent)]
    Task(#[from] cdn_node::supervise::TaskFailed),
}
