//! The CDN origin: serves a content directory to the edges (and to browsers) with
//! everything a cache needs — strong validators, conditional requests, byte ranges,
//! per-path `Cache-Control` and surrogate keys — over HTTP/1.1 and HTTP/2, plain
//! (h2c by preface) or TLS (ALPN), plus generated objects of any size for tests.
//!
//! The listeners run under one [`Supervisor`]: when one fails, `/readyz` turns 503,
//! the others stop gracefully and [`Origin::serve`] returns the error.
//!
//! ```no_run
//! # async fn example() -> Result<(), cdn_origin::Error> {
//! let registry = prometheus::Registry::new();
//! let shutdown = tokio_util::sync::CancellationToken::new();
//! let origin = cdn_origin::Origin::bind(cdn_origin::Config::new("examples/content"), &registry).await?;
//! println!("serving on http://{}", origin.http_addr());
//! origin.serve(shutdown).await
//! # }
//! ```
//!
//! # Layout
//! - [`config`]: the `Config` (TOML) and its validation; cache-policy rules.
//! - [`error`]: this crate's error type.
//! - `server`: request handling — methods, CORS, preconditions, ranges, responses.
//! - `files`: request paths to files under the root (refusing traversal), content
//!   types and validators.
//! - [`generate`]: the deterministic objects under `/_gen/<size>`.
//! - `body`: streaming response bodies from files or generated content.
//! - `metrics`: the Prometheus metrics.

#![forbid(unsafe_code)]

use std::{fmt, net::SocketAddr, sync::Arc};

use cdn_node::{
    admin::{self, Readiness},
    listener::{self, ConnInfo, Limits},
    supervise::{Faults, Supervisor},
};
use prometheus::Registry;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::info;

mod body;
pub mod config;
pub mod error;
mod files;
pub mod generate;
mod metrics;
mod server;

pub use config::{Config, Listen, Rule};
pub use error::Error;

/// An origin whose listeners are bound but not yet serving.
pub struct Origin {
    http: TcpListener,
    https: Option<(TcpListener, Arc<rustls::ServerConfig>)>,
    admin: Option<TcpListener>,
    http_addr: SocketAddr,
    https_addr: Option<SocketAddr>,
    admin_addr: Option<SocketAddr>,
    shared: Arc<server::Shared>,
    registry: Registry,
    faults: Faults,
}

impl fmt::Debug for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Origin")
            .field("http", &self.http_addr)
            .field("https", &self.https_addr)
            .field("admin", &self.admin_addr)
            .field("root", &self.shared.root)
            .finish_non_exhaustive()
    }
}

impl Origin {
    /// Validates `config`, registers the metrics in `registry` and binds every
    /// listener (port 0 picks a free port; see the `*_addr` methods).
    pub async fn bind(config: Config, registry: &Registry) -> Result<Self, Error> {
        config.validate()?;
        let policy = config::Policy::new(&config)?;
        let root = tokio::fs::canonicalize(&config.root)
            .await
            .map_err(|source| Error::Root { path: config.root.clone(), source })?;
        let metrics = metrics::Metrics::register(registry)?;

        let tls = match (config.listen.https, &config.tls) {
            (Some(addr), Some(tls)) => {
                let ips: Vec<_> = Some(addr.ip()).filter(|ip| !ip.is_unspecified()).into_iter().collect();
                // Chosen by SNI like the edge's (read once: the origin does not reload).
                let certs = tls.certs(&[], &ips)?;
                Some(Arc::new(certs.server_config(&[b"h2", b"http/1.1"], false)?))
            }
            _ => None,
        };

        let http = listener::bind(config.listen.http).await?;
        let http_addr = local_addr(&http, "http")?;
        let https = match (config.listen.https, tls) {
            (Some(addr), Some(tls)) => Some((listener::bind(addr).await?, tls)),
            _ => None,
        };
        let https_addr = https.as_ref().map(|(l, _)| local_addr(l, "https")).transpose()?;
        let admin = match config.listen.admin {
            Some(addr) => Some(listener::bind(addr).await?),
            None => None,
        };
        let admin_addr = admin.as_ref().map(|l| local_addr(l, "admin")).transpose()?;

        let shared = Arc::new(server::Shared { root, generate: config.generate, policy, metrics });
        Ok(Self {
            http,
            https,
            admin,
            http_addr,
            https_addr,
            admin_addr,
            shared,
            registry: registry.clone(),
            faults: Faults::default(),
        })
    }

    /// The plain HTTP listener's address (HTTP/1.1 and h2c).
    pub fn http_addr(&self) -> SocketAddr {
        self.http_addr
    }

    /// The HTTPS listener's address, when `listen.https` is set.
    pub fn https_addr(&self) -> Option<SocketAddr> {
        self.https_addr
    }

    /// The admin listener's address, when `listen.admin` is set.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin_addr
    }

    /// Test hook: makes a named task (`http`, `https`, `admin`) panic on demand
    /// (with `cdn-node`'s `test-util` feature; otherwise inert).
    #[doc(hidden)]
    pub fn faults(&self) -> Faults {
        self.faults.clone()
    }

    /// Serves until `shutdown` is cancelled, then lets open connections finish
    /// (within the listener's grace period) and returns.
    ///
    /// The listeners run under one [`Supervisor`]: when one fails (panics or stops
    /// accepting), `/readyz` turns 503, the others shut down gracefully, and `serve`
    /// returns [`Error::Task`] naming it.
    pub async fn serve(self, shutdown: CancellationToken) -> Result<(), Error> {
        let Self { http, https, admin, shared, registry, faults, .. } = self;
        info!(root = %shared.root.display(), generate = shared.generate, "origin serving");
        let readiness = Readiness::new();
        readiness.set("origin", true);
        let mut tasks = Supervisor::new("origin", shutdown.child_token(), Some(readiness.clone())).with_faults(faults);
        let token = tasks.token();

        let handler = move |request: http::Request<hyper::body::Incoming>, conn: ConnInfo| {
            server::handle(shared.clone(), request, conn)
        };
        tasks.spawn(
            "http",
            listener::serve("origin-http", http, None, Limits::default(), token.clone(), handler.clone()),
        );
        if let Some((listener, tls)) = https {
            tasks.spawn(
                "https",
                listener::serve("origin-https", listener, Some(tls), Limits::default(), token, handler),
            );
        }
        if let Some(listener) = admin {
            // Stops after the others: `/readyz` says 503 while they drain.
            tasks.spawn_last("admin", admin::serve(listener, registry, readiness, tasks.last_token()));
        }
        let result = tasks.run().await;
        info!("origin stopped");
        Ok(result?)
    }
}

fn local_addr(listener: &TcpListener, name: &'static str) -> Result<SocketAddr, Error> {
    listener.local_addr().map_err(|source| Error::LocalAddr { listener: name, source })
}

/// Binds and serves until `shutdown` is cancelled; an error when a listener failed.
pub async fn run(config: Config, shutdown: CancellationToken, registry: Registry) -> Result<(), Error> {
    Origin::bind(config, &registry).await?.serve(shutdown).await
}
