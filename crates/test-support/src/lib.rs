//! What the cross-role tests in tests/ share: each role started in-process on
//! loopback (port 0, or the loopback address a test picks) and ready when its start
//! returns, mock origins, a client for every protocol the roles speak, and one
//! reader of Prometheus metrics. A test drives the roles through the same
//! interfaces operators and clients use; nothing here reaches into a role.
//!
//! Only tests use this crate: it is a dev-dependency of the root package `cdn`,
//! never published. It turns on the roles' `test-util` hooks (the edge's movable
//! clock, gossip packet loss), so build the binary with `-p cdn` or `--bin cdn` (as
//! deploy/ and bench/ do): cargo unifies features across the packages it builds
//! together, and `cargo build --workspace` would build the binary with the hooks.
//!
//! Helpers fail the test (panic, naming what went wrong) rather than return errors.
//!
//! # Layout
//! - [`origin`]: a real origin over a temporary content directory ([`origin::TestOrigin`]).
//! - [`mock_origin`]: a programmable origin: fixed routes, delays, trickled or
//!   cut-short bodies, ranges, revalidation; it counts requests ([`mock_origin::MockOrigin`]).
//! - [`edge`]: an edge, plain, with HTTPS + HTTP/3, or in a (lossy) cluster ([`edge::TestEdge`]).
//! - [`control`]: a control node in a cluster ([`control::TestControl`]) and its JSON API.
//! - [`geo`]: a geo-DNS over a member list the test changes ([`geo::TestGeo`]), and `dig`.
//! - [`client`]: hyper clients (HTTP/1.1, h2c, HTTPS with h2 by ALPN) and whole
//!   responses ([`client::Reply`]).
//! - [`http3`]: QUIC connections and an HTTP/3 client (quinn + h3).
//! - [`tls`]: the one rustls client config, which accepts any certificate.
//! - [`curl`]: curl as an independent client, from async tests or blocking.
//! - [`multipart`]: `multipart/byteranges`, `Content-Range` and HTTP-date parsing.
//! - [`metrics`]: the sum of a metric's samples, from a registry or a `/metrics` page.
//! - [`net`]: ports free for TCP and UDP, raw HTTP/1.1 exchanges.
//! - [`wait`]: polling until something holds, with a deadline.

#![forbid(unsafe_code)]

pub mod client;
pub mod control;
pub mod curl;
pub mod edge;
pub mod geo;
pub mod http3;
pub mod metrics;
pub mod mock_origin;
pub mod multipart;
pub mod net;
pub mod origin;
pub mod process;
pub mod tls;
pub mod wait;
