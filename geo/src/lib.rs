//! The geo role: an authoritative DNS server that answers each query with the
//! nearest healthy edges.
//!
//! Authoritative for one zone over UDP and TCP (hickory-server): SOA and NS at the
//! apex, NXDOMAIN for unknown names, REFUSED outside the zone. The service names
//! (`www` by default) answer A/AAAA with the `answers` nearest healthy edges by
//! great-circle distance from the client, located by EDNS Client Subnet (the scope
//! echoed) or the source address, through static `[[networks]]` and a MaxMind
//! database that is reloaded when its file changes. Large UDP answers are truncated
//! (clients retry over TCP) and UDP responses are rate-limited per client network.
//!
//! # Layout
//! - [`config`]: the `cdn geo` configuration.
//! - [`locate`]: address → client location and ECS scope (pure).
//! - [`select`]: members + location → ordered edges, haversine distance (pure).
//! - `zone`: the zone's names and SOA/NS records (pure).
//! - `ratelimit`: token buckets per client network (pure; `now` passed in).
//! - `countries`: country and continent centroids for country-only databases.
//! - `mmdb`: the `.mmdb` reader and its reload on change.
//! - `handler`: one query → one response (ECS, EDNS, truncation, rate limit).
//! - `fast`: the UDP fast path (common queries answered from cached plans and
//!   pre-encoded records), falling back to `handler` for the rest.
//! - `udp`: the UDP sockets (`SO_REUSEPORT`, one thread each, datagrams read and
//!   answered in batches: `recvmmsg`, `sendmmsg`).
//! - `server`: sockets and lifecycle ([`Geo`]).
//! - `metrics`, [`error`].
//! - `fuzzing` (feature `test-util`): the server's request path over a fixed zone
//!   and cluster, for the `dns` fuzz target.

#![forbid(unsafe_code)]

pub mod config;
mod countries;
pub mod error;
mod fast;
#[doc(hidden)]
#[cfg(any(test, feature = "test-util"))]
pub mod fuzzing;
mod handler;
pub mod locate;
mod metrics;
mod mmdb;
mod ratelimit;
pub mod select;
mod server;
mod udp;
mod zone;

pub use config::Config;
pub use error::Error;
pub use handler::{MemberSource, MemberView};
pub use mmdb::GeoDbError;
pub use server::{Geo, run};
