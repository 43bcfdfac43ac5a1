//! The edge: a caching reverse proxy in front of an origin.
//!
//! HTTP/1.1 and HTTP/2 over TCP (plain or TLS) and HTTP/3 over QUIC feed one
//! protocol-agnostic request pipeline over one byte-bounded cache. Caching follows
//! RFC 9111 (the decisions are `cdn_http::policy`'s); ranges RFC 9110.
//!
//! Modules depend one way: `server` → `h3` → `pipeline` → `respond`, `fetch` →
//! `cache` → `body`; `purge` talks to `cache` only; `config`, `error`, `metrics`,
//! `clock` are leaves.
//!
//! # Layout
//! - [`config`]: the `cdn edge` configuration.
//! - `cache`: the one owner of what is stored and what is being fetched — store,
//!   fills in flight, purge epochs, pass marks (`lookup`, `join_or_start`, `purge`);
//!   the typed `Cache-Status`.
//! - `fetch`: origin fetches into the cache (coalesced fills, slices, revalidation).
//! - `pipeline`: key → lookup → coalesce → fetch → store → respond, for every
//!   protocol; `pipeline::respond` builds responses from a stored or filling source.
//! - `body`: bodies that are read while they fill (streaming, coalescing).
//! - `h3`: the HTTP/3 (QUIC) listener feeding the same pipeline.
//! - `sites`: Host → site, the routing document the edge serves by (swapped
//!   atomically) and its rules; `pool`: each site's origins, their health
//!   (probes, passive marks) and the choice among them; `upstream`: the pooled
//!   client to one origin; `tier`: shields and in-region owners (tiered caching).
//! - `purge`: applies purges arriving through gossip to the cache.
//! - `server`: listeners and lifecycle ([`Edge`], [`run`]).
//! - [`access_log`]: JSON access log lines, written off the request path;
//!   `limits`: per-client request rates and connections.
//! - [`metrics`], [`clock`], [`error`].

#![forbid(unsafe_code)]

pub mod access_log;
mod body;
mod cache;
pub mod clock;
mod compress;
pub mod config;
pub mod error;
mod fetch;
mod h3;
mod limits;
pub mod metrics;
mod pipeline;
mod pool;
mod purge;
mod server;
pub mod signing;
mod sites;
mod tier;
mod upstream;

pub use clock::Clock;
pub use config::Config;
pub use error::Error;
pub use server::{Edge, run};
