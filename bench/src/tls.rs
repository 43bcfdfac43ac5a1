//! rustls client configs: the ring provider, ALPN per protocol, and `--insecure`.

use cdn_node::tls::{self, ClientTrust};

use crate::Proto;

/// A client config for `proto`: TLS 1.3 only for h3 (QUIC needs it), 1.2/1.3 otherwise.
pub(crate) fn client_config(proto: Proto, insecure: bool) -> anyhow::Result<rustls::ClientConfig> {
    let trust = if insecure { ClientTrust::AnyCertificate } else { ClientTrust::PublicRoots };
    let alpn: &[u8] = match proto {
        Proto::H1 => b"http/1.1",
        Proto::H2 => b"h2",
        Proto::H3 => b"h3",
    };
    Ok(tls::client_config(trust, proto == Proto::H3, &[alpn])?)
}
