//! The CDN cluster and the plumbing every node shares.
//!
//! Every role (origin, edge, control, geo) links this crate: it owns what a
//! *node* of the CDN is, so the other roles do not copy it.
//!
//! # Layout
//! - [`listener`]: the HTTP/1.1 + HTTP/2 accept loop (TCP or TLS) with limits and
//!   graceful shutdown, used by every HTTP server in the project.
//! - [`tls`]: certificates — PEM files or a self-signed certificate for development.
//! - [`cluster`]: gossip membership and state (chitchat), the view every role reads.
//! - [`client`]: a typed client of the control API.
//! - [`admin`]: the per-node admin listener (`/metrics`, `/healthz`, `/readyz`).
//! - [`server`]: the control node (purge API, routing).
//! - [`purge`]: purge requests, matching and the durable purge log.
//! - [`error`]: this crate's error type.
//! - [`zerocopy`]: large cached bodies in sealed memory files, sent with `sendfile`.

pub mod admin;
pub mod client;
pub mod cluster;
pub mod error;
pub mod listener;
pub mod purge;
pub mod server;
mod status;
pub mod tls;
pub mod zerocopy;

pub use error::{ConfigError, Error};
