//! The CDN's HTTP protocol code: pure functions of their inputs, no I/O, no clock.
//!
//! What the origin and the edge both need to be correct to RFC 9110/9111 lives here
//! once: a time is always a parameter (`now`), so everything is unit-testable and
//! fuzzable. The crate has no tokio dependency.
//!
//! # Layout
//! - [`range`]: `Range` parsing and resolution (RFC 9110 §14), `Content-Range`,
//!   `multipart/byteranges` framing, and [`range::plan`]: 200, 206, multipart or 416
//!   (with `If-Range`) and the framing headers, for the origin and the edge alike.
//! - [`conditional`]: `If-Match`, `If-None-Match`, `If-Modified-Since`,
//!   `If-Unmodified-Since` and `If-Range` evaluation (RFC 9110 §13) against the
//!   [`conditional::Validators`] of a file or of a stored response, entity-tag lists,
//!   what a 304 carries.
//! - [`policy`]: Cache-Control directives, storability, freshness, age and what to
//!   do with a stored response (RFC 9111, RFC 5861).
//! - [`key`]: cache keys (primary, variant, slice), surrogate keys.
//! - [`coding`]: `Accept-Encoding` folded into `br`, `gzip` or `identity`, the media
//!   types worth compressing, `no-transform`.

#![forbid(unsafe_code)]

pub mod coding;
pub mod conditional;
pub mod key;
pub mod policy;
pub mod range;
