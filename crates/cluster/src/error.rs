//! Errors of the cluster: joining it, reading what peers gossip, routing documents
//! that cannot be read or applied, and a cluster that stopped working.

use std::{io, net::SocketAddr};

use crate::state::Key;

/// What can go wrong when a node joins the cluster, reads a peer's gossip state, or
/// while it is in it.
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
    /// `advertise_network` names a network this host has no address on.
    #[error("cannot advertise an address on {network}: {source}")]
    Advertise {
        /// The network.
        network: crate::Network,
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
    /// A gossip key this version does not know (a newer peer's); it is ignored.
    #[error("unknown gossip key {key:?}")]
    UnknownKey {
        /// The key as it came.
        key: String,
    },
    /// A gossip value this version cannot read; it is ignored.
    #[error("unreadable gossip value of {key}: {source}")]
    BadValue {
        /// Its key.
        key: Key,
        /// What is wrong with it.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// A routing document that does not parse (JSON or TOML): the field it
    /// stumbled on (`sites[0].origins[1].weight`; empty for the document itself)
    /// and why.
    #[error("{}{source}", at_field(.field))]
    RoutingSyntax {
        /// The path of the field.
        field: String,
        /// The parser's error.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// A routing document larger than [`routing::MAX_BYTES`](crate::routing::MAX_BYTES).
    #[error("the routing document is {bytes} bytes, at most {max}")]
    RoutingTooLarge {
        /// Its size.
        bytes: usize,
        /// The limit.
        max: usize,
    },
    /// A routing document that parses but cannot be applied (each problem as
    /// `field.path: what is wrong`); refused, nothing changed.
    #[error("invalid routing document: {}", .problems.join("; "))]
    InvalidRouting {
        /// Every problem.
        problems: Vec<String>,
    },
    /// The member view stopped being refreshed while the node was running.
    #[error("the cluster's member view stopped being refreshed")]
    ViewStopped,
}

/// `field: ` before a message, or nothing for the document itself.
fn at_field(field: &str) -> String {
    if field.is_empty() { String::new() } else { format!("{field}: ") }
}
