//! The edge: a caching reverse proxy in front of an origin.
//!
//! HTTP/1.1 and HTTP/2 over TCP (plain or TLS) feed one protocol-agnostic request
//! pipeline over one byte-bounded cache. Caching follows RFC 9111; ranges RFC 9110.
//!
//! # Layout
//! - [`config`]: the `cdn edge` configuration.
//! - `store`: the moka cache bounded in bytes, with Vary variants.
//! - `body`: bodies that are read while they fill (streaming, coalescing).
//! - `pipeline`: key → lookup → coalesce → fetch → store → respond, for every protocol.
//! - `h3`: the HTTP/3 (QUIC) listener feeding the same pipeline.
//! - `upstream`: the pooled origin client.
//! - `purge`: applies purges arriving through gossip.
//! - `server`: listeners and lifecycle ([`Edge`], [`run`]).
//! - [`metrics`], [`clock`], [`error`].

#![forbid(unsafe_code)]

mod body;
pub mod clock;
pub mod config;
pub mod error;
mod h3;
pub mod metrics;
mod pipeline;
mod purge;
mod server;
mod store;
mod upstream;

pub use clock::Clock;
pub use config::Config;
pub use error::Error;
pub use server::{Edge, run};
