//! Errors of joining the cluster, and of a cluster that stopped working.

use std::{io, net::SocketAddr};

/// What can go wrong when a node joins the cluster, or while it is in it.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The gossip socket could not be bound.
    #[error("cannot gossip on {addr}: {source}")]
    Bind {
        /// The address asked for.
        addr: SocketAddr,
        /// Why.
        source: io::Error,
    },
    /// The cluster's metrics could not be registered (a name taken twice).
    #[error("cluster metrics: {0}")]
    Metrics(#[from] prometheus::Error),
    /// chitchat did not start.
    #[error("gossip did not start: {source:#}")]
    Start {
        /// chitchat's error.
        #[source]
        source: anyhow::Error,
    },
    /// The member view stopped being refreshed while the node was running.
    #[error("the cluster's member view stopped being refreshed")]
    ViewStopped,
}
