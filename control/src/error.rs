//! Errors of the cluster and node plumbing.

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
    #[error("cannot load {what} from {path}: {reason}")]
    TlsFile {
        /// `certificate` or `private key`.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// rustls refused the certificate/key pair or the generated certificate failed.
    #[error("tls setup failed: {0}")]
    Tls(String),
    /// Gossip could not start.
    #[error("cluster: {0}")]
    Cluster(String),
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
