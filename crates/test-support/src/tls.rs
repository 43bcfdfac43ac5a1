//! The one rustls client config of the tests: it accepts any server certificate
//! (the servers under test present self-signed ones), on the ring provider.
//!
//! Replaces the configs built by hand in tests/edge/harness.rs (`tls_client`) and
//! tests/edge/h3.rs (`quic_connect_accepting`); the verifier is cdn-node's
//! [`AcceptAnyCertificate`](cdn_node::tls::AcceptAnyCertificate).

use cdn_node::tls::{ClientTrust, client_config};

/// TLS 1.2 and 1.3, no client certificate, no ALPN (callers set
/// `alpn_protocols`: hyper-rustls does, [`crate::http3`] asks for `h3`): cdn-node's
/// one client builder with [`ClientTrust::AnyCertificate`].
pub fn any_certificate() -> rustls::ClientConfig {
    client_config(ClientTrust::AnyCertificate, false, &[]).expect("ring supports TLS 1.2 and 1.3")
}
