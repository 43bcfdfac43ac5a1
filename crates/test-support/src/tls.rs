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

/// The certificate chain a TLS server at `addr` presents to a client that sends
/// `sni` (none: no SNI, as for an IP address), with ALPN `alpn`.
pub async fn served_chain(
    addr: std::net::SocketAddr,
    sni: Option<&str>,
    alpn: &[u8],
) -> Vec<rustls_pki_types::CertificateDer<'static>> {
    let mut tls = any_certificate();
    tls.alpn_protocols = vec![alpn.to_vec()];
    tls.enable_sni = sni.is_some();
    let name = match sni {
        Some(name) => rustls_pki_types::ServerName::try_from(name.to_string()).expect("a DNS name"),
        None => rustls_pki_types::ServerName::IpAddress(addr.ip().into()),
    };
    let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let stream =
        tokio_rustls::TlsConnector::from(std::sync::Arc::new(tls)).connect(name, tcp).await.expect("handshake");
    stream.get_ref().1.peer_certificates().expect("a certificate").to_vec()
}

/// A self-signed certificate for `names` (DNS names or IP addresses) written as
/// `<dir>/<file>.pem` and `<dir>/<file>.key`; returns (cert path, key path, DER).
pub fn write_self_signed(
    dir: &std::path::Path,
    file: &str,
    names: &[&str],
) -> (std::path::PathBuf, std::path::PathBuf, rustls_pki_types::CertificateDer<'static>) {
    let generated =
        rcgen::generate_simple_self_signed(names.iter().map(|n| n.to_string()).collect::<Vec<_>>()).expect("rcgen");
    let (cert, key) = (dir.join(format!("{file}.pem")), dir.join(format!("{file}.key")));
    // Written beside and renamed: a reader never sees half a file.
    let tmp = dir.join(format!(".{file}.tmp"));
    std::fs::write(&tmp, generated.signing_key.serialize_pem()).expect("write the key");
    std::fs::rename(&tmp, &key).expect("rename the key");
    std::fs::write(&tmp, generated.cert.pem()).expect("write the certificate");
    std::fs::rename(&tmp, &cert).expect("rename the certificate");
    (cert, key, generated.cert.der().clone())
}
