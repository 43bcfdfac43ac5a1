//! Helpers shared by the integration tests. Each test file does `mod support;` and
//! uses what it needs, so some helpers are unused in any one test binary.
//!
//! - [`client`]: an HTTP client (HTTP/1.1 or h2c) returning status, headers and the
//!   whole body; `curl` as a second, independent client; a `multipart/byteranges` parser.
//! - [`origin`]: a real `cdn_origin::Origin` on loopback over a temporary content directory.

#![allow(dead_code)]

pub(crate) mod client;
pub(crate) mod origin;
