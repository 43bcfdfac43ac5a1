//! The control role: the control-plane server of the CDN.
//!
//! A control node joins the cluster like every role; it takes purges through its
//! API, keeps them in a durable log, publishes them in gossip and reports when every
//! edge applied them; it drains and undrains edges and serves the status page.
//!
//! # Layout
//! - [`server`]: the control node ([`server::Control`]): config, the `/v1` API, gossip.
//! - [`api`]: the API's answers, typed (shared by the server and the client).
//! - [`purge`]: the API's purge body and its validation; [`purge::log`], the durable log.
//! - [`client`]: a typed client of the control API (`cdn purge`, `cdn nodes`, `cdn drain`).
//! - `status`: the status page.
//! - [`error`]: this crate's error type.

#![forbid(unsafe_code)]

pub mod api;
pub mod client;
pub mod error;
pub mod purge;
pub mod server;
mod status;

pub use error::Error;
