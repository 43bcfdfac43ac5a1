//! TLS certificates for the HTTPS and QUIC listeners.
//!
//! A node either loads a PEM certificate chain and key (`[tls] cert, key`) or, for
//! development, generates a self-signed certificate (`self_signed = true`) naming its
//! addresses and `localhost`. Everything uses the ring provider.

use std::{net::IpAddr, path::Path, sync::Arc};

use rustls::crypto::ring as ring_provider;
use rustls_pki_types::{
    CertificateDer, PrivateKeyDer,
    pem::{self, PemObject},
};

use crate::Error;

/// The `[tls]` section of a role's config.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM certificate chain, leaf first.
    pub cert: Option<std::path::PathBuf>,
    /// PEM private key.
    pub key: Option<std::path::PathBuf>,
    /// Generate a self-signed certificate at start (development only).
    #[serde(default)]
    pub self_signed: bool,
    /// More certificates, chosen by the client's SNI (`[[tls.certs]]`); the first
    /// certificate (`cert`/`key`, else the self-signed one, else the first of these)
    /// is the default. See [`crate::certs`].
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub certs: Vec<CertFiles>,
}

/// `[[tls.certs]]`: one more certificate.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct CertFiles {
    /// PEM certificate chain, leaf first.
    pub cert: std::path::PathBuf,
    /// PEM private key.
    pub key: std::path::PathBuf,
}

impl TlsConfig {
    /// Problems with this section, each naming its key under `prefix` (e.g. `tls`).
    pub fn problems(&self, prefix: &str) -> Vec<String> {
        let mut problems = Vec::new();
        match (&self.cert, &self.key, self.self_signed) {
            (Some(_), Some(_), false) | (None, None, true) => {}
            (Some(_), Some(_), true) => {
                problems.push(format!("{prefix}.self_signed: set either cert and key or self_signed = true, not both"))
            }
            (Some(_), None, _) => problems.push(format!("{prefix}.key: required when {prefix}.cert is set")),
            (None, Some(_), _) => problems.push(format!("{prefix}.cert: required when {prefix}.key is set")),
            (None, None, false) if !self.certs.is_empty() => {}
            (None, None, false) => {
                problems.push(format!("{prefix}: needs cert and key, [[{prefix}.certs]], or self_signed = true"))
            }
        }
        problems
    }

    /// Every certificate of the section, chosen by SNI and reloaded when the files
    /// change; `names`/`ips` go into a self-signed one.
    pub fn certs(&self, names: &[String], ips: &[IpAddr]) -> Result<Arc<crate::certs::Certs>, Error> {
        crate::certs::Certs::load(self, names, ips).map(Arc::new)
    }
}

/// A certificate chain with its private key, ready for rustls or quinn.
#[derive(Debug)]
pub struct CertifiedKey {
    /// Leaf first.
    pub chain: Vec<CertificateDer<'static>>,
    /// The leaf's private key.
    pub key: PrivateKeyDer<'static>,
}

impl Clone for CertifiedKey {
    fn clone(&self) -> Self {
        Self { chain: self.chain.clone(), key: self.key.clone_key() }
    }
}

impl CertifiedKey {
    /// Loads a PEM certificate chain and a PEM private key (PKCS#8, PKCS#1 or SEC1).
    pub fn from_pem_files(cert: &Path, key: &Path) -> Result<Self, Error> {
        let file_err = |what, path: &Path, source: pem::Error| Error::TlsFile { what, path: path.to_owned(), source };
        let chain = CertificateDer::pem_file_iter(cert)
            .map_err(|e| file_err("certificate", cert, e))?
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| file_err("certificate", cert, e))?;
        if chain.is_empty() {
            return Err(Error::NoCertificate { path: cert.to_owned() });
        }
        let key = PrivateKeyDer::from_pem_file(key).map_err(|e| file_err("private key", key, e))?;
        Ok(Self { chain, key })
    }

    /// Generates a self-signed certificate for `localhost`, the given names and addresses.
    pub fn self_signed(names: &[String], ips: &[IpAddr]) -> Result<Self, Error> {
        let (cert, key) = self_signed_pem(names, ips)?;
        let chain = vec![CertificateDer::from_pem_slice(cert.as_bytes())?];
        let key = PrivateKeyDer::from_pem_slice(key.as_bytes())?;
        Ok(Self { chain, key })
    }

    /// SHA-256 of the leaf's SubjectPublicKeyInfo, base64: what Chromium's
    /// `--ignore-certificate-errors-spki-list` wants.
    pub fn spki_sha256_base64(&self) -> Result<String, Error> {
        use base64::Engine as _;
        use rcgen::PublicKeyData as _;
        let pair = rcgen::KeyPair::try_from(&self.key)?;
        let digest = ring::digest::digest(&ring::digest::SHA256, &pair.subject_public_key_info());
        Ok(base64::engine::general_purpose::STANDARD.encode(digest.as_ref()))
    }
}

/// The project's one rustls server configuration: the ring provider, TLS 1.3 only
/// when `tls13_only` (QUIC), no client certificates, certificates from `resolver`,
/// the given ALPN protocols.
pub fn server_config(
    resolver: Arc<dyn rustls::server::ResolvesServerCert>,
    alpn: &[&[u8]],
    tls13_only: bool,
) -> Result<rustls::ServerConfig, Error> {
    let provider = Arc::new(ring_provider::default_provider());
    let builder = rustls::ServerConfig::builder_with_provider(provider);
    let builder = if tls13_only {
        builder.with_protocol_versions(&[&rustls::version::TLS13])
    } else {
        builder.with_safe_default_protocol_versions()
    }?;
    let mut config = builder.with_no_client_auth().with_cert_resolver(resolver);
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(config)
}

/// Which server certificates a client accepts.
#[derive(Debug, Clone)]
pub enum ClientTrust {
    /// Certificates from the public web PKI (Mozilla's roots, built in).
    PublicRoots,
    /// Certificates from these roots only (a private CA, a node's self-signed cert).
    Roots(rustls::RootCertStore),
    /// Any certificate (`--insecure`, tests, an origin configured `insecure`).
    AnyCertificate,
}

/// The project's one rustls client configuration: the ring provider, `trust`, TLS
/// 1.3 only when `tls13_only` (QUIC), and the given ALPN protocols.
pub fn client_config(
    trust: ClientTrust,
    tls13_only: bool,
    alpn: &[&[u8]],
) -> Result<rustls::ClientConfig, rustls::Error> {
    let provider = Arc::new(ring_provider::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider);
    let builder = if tls13_only {
        builder.with_protocol_versions(&[&rustls::version::TLS13])?
    } else {
        builder.with_safe_default_protocol_versions()?
    };
    let mut config = match trust {
        ClientTrust::PublicRoots => builder
            .with_root_certificates(rustls::RootCertStore::from_iter(webpki_roots::TLS_SERVER_ROOTS.iter().cloned())),
        ClientTrust::Roots(roots) => builder.with_root_certificates(roots),
        ClientTrust::AnyCertificate => {
            builder.dangerous().with_custom_certificate_verifier(AcceptAnyCertificate::new())
        }
    }
    .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(config)
}

/// A client-side verifier that accepts any server certificate (it still checks the
/// handshake signatures). For tests, benchmarks and `origin.insecure = true` only.
#[derive(Debug)]
pub struct AcceptAnyCertificate(Arc<rustls::crypto::CryptoProvider>);

impl AcceptAnyCertificate {
    /// The verifier, on the ring provider.
    pub fn new() -> Arc<Self> {
        Arc::new(Self(Arc::new(ring_provider::default_provider())))
    }
}

impl rustls::client::danger::ServerCertVerifier for AcceptAnyCertificate {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &rustls_pki_types::ServerName<'_>,
        _: &[u8],
        _: rustls_pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// Generates a self-signed certificate for `localhost` plus the given DNS names and
/// addresses; returns `(certificate PEM, PKCS#8 key PEM)`.
pub fn self_signed_pem(names: &[String], ips: &[IpAddr]) -> Result<(String, String), Error> {
    let mut sans: Vec<String> = vec!["localhost".into(), "127.0.0.1".into(), "::1".into()];
    sans.extend(names.iter().cloned());
    sans.extend(ips.iter().map(IpAddr::to_string));
    sans.sort();
    sans.dedup();
    let generated = rcgen::generate_simple_self_signed(sans)?;
    Ok((generated.cert.pem(), generated.signing_key.serialize_pem()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn self_signed_builds_a_server_config_and_spki_hash() {
        let key = CertifiedKey::self_signed(&["www.cdn.test".into()], &["127.0.0.11".parse().unwrap()]).unwrap();
        let config = TlsConfig { self_signed: true, ..TlsConfig::default() };
        let certs = config.certs(&["www.cdn.test".into()], &["127.0.0.11".parse().unwrap()]).unwrap();
        certs.server_config(&[b"h2", b"http/1.1"], false).unwrap();
        certs.server_config(&[b"h3"], true).unwrap();
        let spki = key.spki_sha256_base64().unwrap();
        assert_eq!(spki.len(), 44, "base64 of 32 bytes: {spki}");
        // The same key gives the same hash; another key another.
        assert_eq!(spki, key.clone().spki_sha256_base64().unwrap());
        let other = CertifiedKey::self_signed(&[], &[]).unwrap();
        assert_ne!(spki, other.spki_sha256_base64().unwrap());
    }

    #[test]
    fn missing_and_empty_files_are_clear_errors() {
        let dir = tempfile::tempdir().unwrap();
        let cert = dir.path().join("cert.pem");
        let key = dir.path().join("key.pem");
        let err = CertifiedKey::from_pem_files(&cert, &key).unwrap_err().to_string();
        assert!(err.contains("certificate") && err.contains("cert.pem"), "{err}");
        std::fs::write(&cert, "nothing here").unwrap();
        let err = CertifiedKey::from_pem_files(&cert, &key).unwrap_err().to_string();
        assert!(err.contains("no CERTIFICATE block"), "{err}");
        let (c, k) = self_signed_pem(&[], &[]).unwrap();
        std::fs::write(&cert, c).unwrap();
        std::fs::write(&key, k).unwrap();
        CertifiedKey::from_pem_files(&cert, &key).unwrap();
    }
}
