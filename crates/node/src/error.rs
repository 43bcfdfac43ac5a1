//! Errors of the node plumbing.

use std::{io, net::SocketAddr, path::PathBuf};

/// What can go wrong in the shared node plumbing.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A listener could not bind its address.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address that was asked for.
        addr: SocketAddr,
        /// Why the bind failed.
        source: io::Error,
    },
    /// A certificate or key file could not be read or parsed.
    #[error("cannot load {what} from {path}: {source}")]
    TlsFile {
        /// `certificate` or `private key`.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// Why.
        source: rustls_pki_types::pem::Error,
    },
    /// A certificate file held no certificate.
    #[error("cannot load certificate from {path}: no CERTIFICATE block found")]
    NoCertificate {
        /// The file.
        path: PathBuf,
    },
    /// rustls refused the certificate/key pair or a TLS setting.
    #[error("tls setup failed: {0}")]
    Tls(#[from] rustls::Error),
    /// A self-signed certificate could not be generated.
    #[error("cannot generate a certificate: {0}")]
    Certificate(#[from] rcgen::Error),
    /// A PEM certificate or key could not be decoded.
    #[error("cannot decode pem: {0}")]
    Pem(#[from] rustls_pki_types::pem::Error),
}

/// A config file that could not be used: every problem, each naming its key.
#[derive(Debug, thiserror::Error)]
#[error("{}", problems.join("\n"))]
pub struct ConfigError {
    /// One line per problem, `key: what is wrong`.
    pub problems: Vec<String>,
}

impl ConfigError {
    /// `Ok` when there are no problems.
    pub fn check(problems: Vec<String>) -> Result<(), Self> {
        if problems.is_empty() { Ok(()) } else { Err(Self { problems }) }
    }
}
