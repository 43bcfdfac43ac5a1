//! What every process of the CDN needs, whatever its role.
//!
//! The origin, edge, control and geo roles all serve HTTP (their admin listener at
//! least), load certificates, report readiness and run their tasks under one
//! supervisor; this crate holds that plumbing once, so no role imports another.
//!
//! # Layout
//! - [`listener`]: the HTTP/1.1 + HTTP/2 accept loop (TCP or TLS) with limits, connection
//!   accounting (idle, stalled readers, rapid reset) and graceful shutdown.
//! - [`tls`]: certificates — PEM files or a self-signed certificate for development —
//!   and the one rustls client builder (`tls::client_config`); [`certs`]: the
//!   certificates a node serves, chosen by SNI and reloaded without a restart.
//! - [`admin`]: the per-node admin listener (`/metrics`, `/healthz`, `/readyz`).
//! - [`supervise`]: runs a role's tasks; one that fails or panics stops the role.
//! - [`zerocopy`]: large cached bodies in sealed memory files, sent with `sendfile`
//!   (the workspace's only `unsafe` code).
//! - [`location`]: a point on the globe (edges, clients).
//! - [`secret`]: constant-time comparison of secrets.
//! - [`error`]: this crate's error type, and [`ConfigError`] every role reports.

pub mod admin;
pub mod certs;
pub mod error;
pub mod listener;
pub mod location;
pub mod secret;
pub mod supervise;
pub mod tls;
pub mod zerocopy;

pub use error::{ConfigError, Error};
