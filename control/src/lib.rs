//! The control role: the control-plane server of the CDN.
//!
//! A control node joins the cluster like every role; it takes purges through its
//! API, keeps them in a durable log, publishes them in gossip and reports when every
//! edge applied them; it holds the routing document (durably, and in agreement with
//! the other control nodes: the newest version wins) and publishes it to the edges;
//! it drains and undrains edges and serves the status page.
//!
//! # Layout
//! - [`server`]: the control node ([`server::Control`]): config, the `/v1` API, gossip.
//! - [`api`]: the API's answers, typed (shared by the server and the client).
//! - [`purge`]: the API's purge body and its validation; [`purge::log`], the durable log.
//! - [`routing`]: the API's routing body (JSON or TOML) and its validation;
//!   [`routing::store`], the document this node holds, kept durably.
//! - `durable`: files replaced atomically and durably (temporary file, sync, rename).
//! - [`client`]: a typed client of the control API (`cdn purge`, `cdn nodes`, `cdn drain`,
//!   `cdn routing`).
//! - `status`: the status page.
//! - [`error`]: this crate's error type.

#![forbid(unsafe_code)]

pub mod acme;
pub mod api;
pub mod client;
mod durable;
pub mod error;
pub mod purge;
pub mod routing;
pub mod server;
mod status;

pub use error::Error;
