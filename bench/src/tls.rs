//! rustls client configs: the ring provider, ALPN per protocol, and `--insecure`.

use std::sync::Arc;

use crate::Proto;

/// A client config for `proto`: TLS 1.3 only for h3 (QUIC needs it), 1.2/1.3 otherwise.
pub(crate) fn client_config(proto: Proto, insecure: bool) -> anyhow::Result<rustls::ClientConfig> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider);
    let builder = match proto {
        Proto::H3 => builder.with_protocol_versions(&[&rustls::version::TLS13])?,
        Proto::H1 | Proto::H2 => builder.with_safe_default_protocol_versions()?,
    };
    let mut config = if insecure {
        builder
            .dangerous()
            .with_custom_certificate_verifier(cdn_node::tls::AcceptAnyCertificate::new())
            .with_no_client_auth()
    } else {
        let roots = rustls::RootCertStore { roots: webpki_roots::TLS_SERVER_ROOTS.to_vec() };
        builder.with_root_certificates(roots).with_no_client_auth()
    };
    config.alpn_protocols = vec![match proto {
        Proto::H1 => b"http/1.1".to_vec(),
        Proto::H2 => b"h2".to_vec(),
        Proto::H3 => b"h3".to_vec(),
    }];
    Ok(config)
}
