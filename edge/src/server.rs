//! The edge's listeners and lifecycle: bind everything first, then serve until
//! shutdown. Every task (listeners, admin, purge applier, maintenance, the cluster
//! view) runs under one [`Supervisor`]: one that fails stops the edge.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use http::{HeaderValue, Request, Version};
use hyper::body::Incoming;
use prometheus::Registry;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use cdn_node::{
    admin::{self, Readiness},
    listener::{self, ConnInfo, activity::Closed},
    supervise::{Faults, Supervisor},
};

use crate::{
    Error,
    cache::Cache,
    clock::Clock,
    config::Config,
    fetch::{FetchSettings, Fetcher},
    metrics::{Metrics, Protocol},
    pipeline::{self, Conn, Pipeline},
    sites::Sites,
};

/// An edge whose listeners are bound, ready to [`serve`](Self::serve).
pub struct Edge {
    config: Config,
    pipeline: Arc<Pipeline>,
    http: Option<TcpListener>,
    https: Option<(TcpListener, Arc<rustls::ServerConfig>)>,
    h3: Option<quinn::Endpoint>,
    admin: Option<TcpListener>,
    registry: Registry,
    readiness: Readiness,
    cluster: Option<Arc<cdn_cluster::Cluster>>,
    cluster_shutdown: CancellationToken,
    purge_metrics: crate::purge::PurgeMetrics,
    applied: tokio::sync::watch::Sender<std::collections::HashMap<String, u64>>,
    announced: tokio::sync::watch::Sender<std::collections::HashMap<String, u64>>,
    certs: Option<Arc<cdn_node::certs::Certs>>,
    faults: Faults,
    http_addr: Option<SocketAddr>,
    https_addr: Option<SocketAddr>,
    h3_addr: Option<SocketAddr>,
    admin_addr: Option<SocketAddr>,
}

impl Edge {
    /// Binds the edge's listeners with the system clock.
    pub async fn bind(config: Config, registry: &Registry) -> Result<Self, Error> {
        Self::bind_clocked(config, registry, Clock::system()).await
    }

    /// Binds the edge's listeners; the cache reads time from `clock`, which a test
    /// moves with [`Clock::advance`]. Test hook (feature `test-util`).
    #[cfg(feature = "test-util")]
    pub async fn bind_with_clock(config: Config, registry: &Registry, clock: Clock) -> Result<Self, Error> {
        Self::bind_clocked(config, registry, clock).await
    }

    async fn bind_clocked(config: Config, registry: &Registry, clock: Clock) -> Result<Self, Error> {
        config.validate()?;
        let metrics = Metrics::register(registry)?;
        let sites = Arc::new(Sites::new(&config, metrics.clone(), registry)?);
        let disk_metrics = crate::cache::disk::DiskMetrics::register(registry)?;
        // The disk index is rebuilt here, before any listener serves.
        let disks = {
            let (disks, metrics) = (config.cache.disk.clone(), disk_metrics);
            tokio::task::spawn_blocking(move || crate::cache::disk::Disks::open(&disks, metrics))
                .await
                .map_err(crate::error::DiskError::Index)??
        };
        if let Some(disks) = &disks
            && config.cluster.is_none()
        {
            // No purges to catch up with: the disk serves at once.
            disks.set_open();
        }
        let cache = Arc::new(Cache::new(config.cache.memory.as_u64(), disks));
        let fetch_settings = FetchSettings::from_config(&config.cache, config.origin.as_ref());

        // The HIT short way skips `Pipeline::handle`, where access log records start.
        let fast_hits = config.access_log_settings().is_none();
        let mut settings = pipeline::Settings { node_id: config.node_id.clone(), alt_svc: None, fast_hits };

        let http = match config.listen.http {
            Some(addr) => Some(listener::bind(addr).await?),
            None => None,
        };
        // One set of certificates (chosen by SNI) for HTTPS and HTTP/3.
        let certs = match &config.tls {
            Some(tls) if config.listen.https.is_some() || config.listen.h3.is_some() => {
                let ips: Vec<_> =
                    [config.listen.https.map(|a| a.ip()), config.listen.h3.map(|a| a.ip()), config.public_addr]
                        .into_iter()
                        .flatten()
                        .filter(|ip| !ip.is_unspecified())
                        .collect();
                let certs = tls.certs(std::slice::from_ref(&config.node_id), &ips)?;
                certs.register(registry)?;
                Some(certs)
            }
            _ => None,
        };
        let https = match (config.listen.https, &certs) {
            (Some(addr), Some(certs)) => {
                let server_config = certs.server_config(&[b"h2", b"http/1.1"], false)?;
                Some((listener::bind(addr).await?, Arc::new(server_config)))
            }
            _ => None,
        };
        let h3 = match (config.listen.h3, &certs) {
            (Some(addr), Some(certs)) => {
                let server_config =
                    crate::h3::server_config(certs, &config.quic, config.limits.max_concurrent_streams)?;
                Some(crate::h3::bind(addr, server_config, config.quic.socket_buffer.as_u64())?)
            }
            _ => None,
        };
        let (applied_tx, applied_rx) = tokio::sync::watch::channel(std::collections::HashMap::new());
        let (announced_tx, announced_rx) = tokio::sync::watch::channel(std::collections::HashMap::new());
        let tiers = Arc::new(crate::tier::Tiers::new(
            &config.node_id,
            &config.region,
            config.cluster.as_ref().map(|c| cdn_cluster::PeerKey::new(&c.secret)),
            fetch_settings.idle,
            (applied_rx, announced_rx),
            &certs.as_ref().map(|c| c.default_chain()).unwrap_or_default(),
            registry,
        )?);
        let fetcher = Arc::new(Fetcher::new(cache.clone(), tiers, metrics.clone(), clock.clone(), fetch_settings));
        let h3_addr = h3.as_ref().and_then(|e| e.local_addr().ok());
        if let Some(h3_addr) = h3_addr
            && let Ok(value) = HeaderValue::from_str(&format!("h3=\":{}\"; ma=86400", h3_addr.port()))
        {
            settings.alt_svc = Some(value);
        }
        let admin = match config.listen.admin {
            Some(addr) => Some(listener::bind(addr).await?),
            None => None,
        };
        let local = |l: Option<&TcpListener>| l.and_then(|l| l.local_addr().ok());
        let access_log = match &config.access_log_settings() {
            Some(settings) => Some(crate::access_log::AccessLog::open(settings, &config.node_id, registry)?),
            None => None,
        };
        let client_limits = crate::limits::ClientLimits::new(&config.limits, registry)?;
        let purge_metrics = crate::purge::PurgeMetrics::register(registry)?;
        let cluster_shutdown = CancellationToken::new();
        let cluster = match &config.cluster {
            Some(cluster_config) => {
                let public_addr = config.public_addr.or_else(|| {
                    [config.listen.https, config.listen.http]
                        .into_iter()
                        .flatten()
                        .map(|a| a.ip())
                        .find(|ip| !ip.is_unspecified())
                });
                let node = cdn_cluster::NodeInfo {
                    node_id: config.node_id.clone(),
                    role: cdn_cluster::Role::Edge,
                    region: Some(config.region.clone()),
                    location: Some(config.location),
                    public_addr,
                    // An admin bound to all interfaces is announced at the public address.
                    admin: local(admin.as_ref()).map(|addr| match (addr.ip().is_unspecified(), public_addr) {
                        (true, Some(ip)) => SocketAddr::new(ip, addr.port()),
                        _ => addr,
                    }),
                };
                Some(cdn_cluster::Cluster::join(cluster_config, node, registry, cluster_shutdown.clone()).await?)
            }
            None => None,
        };
        Ok(Self {
            http_addr: local(http.as_ref()),
            https_addr: local(https.as_ref().map(|(l, _)| l)),
            admin_addr: local(admin.as_ref()),
            h3_addr,
            config,
            pipeline: Arc::new(
                Pipeline::new(settings, cache, fetcher, sites, metrics, clock)
                    .with_access_log(access_log)
                    .with_client_limits(client_limits),
            ),
            http,
            https,
            h3,
            admin,
            registry: registry.clone(),
            readiness: Readiness::new(),
            cluster,
            cluster_shutdown,
            purge_metrics,
            applied: applied_tx,
            announced: announced_tx,
            certs,
            faults: Faults::default(),
        })
    }

    /// The plain HTTP address, when listening.
    pub fn http_addr(&self) -> Option<SocketAddr> {
        self.http_addr
    }

    /// The HTTPS address, when listening.
    pub fn https_addr(&self) -> Option<SocketAddr> {
        self.https_addr
    }

    /// The HTTP/3 (UDP) address, when listening.
    pub fn h3_addr(&self) -> Option<SocketAddr> {
        self.h3_addr
    }

    /// The admin address, when listening.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin_addr
    }

    /// The cluster handle, when the edge joined one.
    pub fn cluster(&self) -> Option<Arc<cdn_cluster::Cluster>> {
        self.cluster.clone()
    }

    /// The readiness conditions of this edge (shared with `/readyz`).
    pub fn readiness(&self) -> Readiness {
        self.readiness.clone()
    }

    /// Test hook: makes a named task (`http`, `https`, `h3`, `admin`, `purges`,
    /// `maintain`, `cluster`) panic on demand (with `cdn-node`'s `test-util`
    /// feature; otherwise inert).
    #[doc(hidden)]
    pub fn faults(&self) -> Faults {
        self.faults.clone()
    }

    /// Serves until `shutdown` is cancelled, then drains within the grace period.
    ///
    /// Every task runs under one [`Supervisor`]: when one fails (a listener panics
    /// or stops accepting), `/readyz` turns 503, the cluster hears the edge is not
    /// ready, the others drain, and `serve` returns [`Error::Task`] naming it.
    pub async fn serve(self, shutdown: CancellationToken) -> Result<(), Error> {
        let Self {
            config,
            pipeline,
            http,
            https,
            h3,
            admin,
            registry,
            readiness,
            cluster,
            cluster_shutdown,
            purge_metrics,
            applied,
            announced,
            certs,
            faults,
            http_addr,
            https_addr,
            ..
        } = self;
        let mut limits = config.limits.listener();
        limits.connections = Some(pipeline.metrics.connections.with_label_values(&["tcp"]));
        limits.closed = Some(Closed::of(&pipeline.metrics.connections_closed, "tcp"));
        limits.admission = pipeline.client_limits().and_then(|l| l.admission());
        readiness.set("origin", false);
        let mut tasks = Supervisor::new("edge", shutdown.child_token(), Some(readiness.clone())).with_faults(faults);
        let token = tasks.token();

        let handler = {
            let pipeline = pipeline.clone();
            move |request: Request<Incoming>, info: ConnInfo| {
                let pipeline = pipeline.clone();
                async move {
                    let protocol = if request.version() == Version::HTTP_2 { Protocol::H2 } else { Protocol::H1 };
                    // HTTP/2's short way for fresh memory HITs (pipeline::fast).
                    if protocol == Protocol::H2
                        && let Some(response) = pipeline.fast_hit_h2(&request, info.tls, info.peer.ip()).await
                    {
                        return response;
                    }
                    let conn = Conn { protocol, peer: info.peer, tls: info.tls };
                    // Boxed: the full way's future is large, and hyper moves this one
                    // (twice, for HTTP/2) before its first poll.
                    Box::pin(pipeline.handle(request, conn)).await
                }
            }
        };
        // Plain HTTP/1.1 cache HITs take the listener's short way (pipeline::fast).
        let fast = Some(Arc::new(pipeline::fast::FastHits(pipeline.clone())));
        if let Some(listener) = http {
            let serve = listener::serve_fast(
                "http",
                listener,
                None,
                limits.clone(),
                token.clone(),
                handler.clone(),
                fast.clone(),
            );
            tasks.spawn("http", serve);
        }
        if let Some((listener, tls)) = https {
            let serve =
                listener::serve_fast("https", listener, Some(tls), limits.clone(), token.clone(), handler, fast);
            tasks.spawn("https", serve);
        }
        if let Some(endpoint) = h3 {
            tasks.spawn("h3", crate::h3::serve(endpoint, pipeline.clone(), token.clone(), config.limits.clone()));
        }
        if let Some(client_limits) = pipeline.client_limits() {
            tasks.spawn("limits", client_limits.clone().forget_idle(token.clone()));
        }
        if let Some(access_log) = pipeline.access_log() {
            tasks.spawn("access-log", access_log.reopen_on_hangup(token.clone()));
        }
        if let Some(certs) = certs {
            if let (Some(cluster), Some(cluster_config)) = (&cluster, &config.cluster) {
                let seal = cdn_cluster::CertSeal::new(&cluster_config.secret);
                tasks.spawn("issued-certs", install_issued(certs.clone(), cluster.clone(), seal, token.clone()));
            }
            tasks.spawn("certs", certs.watch(token.clone()));
        }
        if let Some(listener) = admin {
            // Stops after the others: `/readyz` says 503 while they drain.
            tasks.spawn_last("admin", admin::serve(listener, registry, readiness.clone(), tasks.last_token()));
        }
        if let Some(cluster) = &cluster {
            tasks.spawn(
                "purges",
                crate::purge::run(
                    cluster.clone(),
                    pipeline.cache().clone(),
                    purge_metrics,
                    readiness.clone(),
                    applied,
                    announced,
                    token.clone(),
                ),
            );
            cluster.publish_serve(cdn_cluster::state::Serve { http: http_addr, https: https_addr }).await;
            tasks.spawn("tiers", pipeline.tiers().clone().follow(cluster.clone(), token.clone()));
            tasks.spawn(
                "routing",
                crate::sites::follow(pipeline.sites().clone(), cluster.clone(), readiness.clone(), token.clone()),
            );
            tasks.spawn("cluster", cluster.clone().supervise(token.clone()));
        }
        tasks.spawn(
            "maintain",
            maintain(pipeline.clone(), readiness.clone(), cluster.clone(), config.limits.max_connections, token),
        );
        let origin = config.origin.as_ref().map_or("(from the routing document)", |o| o.url.as_str());
        info!(node_id = %config.node_id, region = %config.region, origin, "edge started");
        let result = tasks.run().await;
        // A clean stop: the disk tier finishes its writes and saves its index.
        if let Some(disks) = pipeline.cache().disks() {
            disks.close().await;
        }
        // The cluster goes last: peers saw "not ready" while the listeners drained.
        cluster_shutdown.cancel();
        if let Some(cluster) = &cluster {
            cluster.stopped().await;
        }
        Ok(result?)
    }
}

/// Keeps the cache gauges current, checks that the origin answers, and publishes
/// readiness and load to the cluster; on shutdown, tells the cluster first that
/// the edge is not ready (so geo stops sending users here).
async fn maintain(
    pipeline: Arc<Pipeline>,
    readiness: Readiness,
    cluster: Option<Arc<cdn_cluster::Cluster>>,
    max_connections: usize,
    shutdown: CancellationToken,
) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let mut n: u64 = 0;
    loop {
        tokio::select! {
            () = shutdown.cancelled() => break,
            _ = tick.tick() => {}
        }
        let cache = pipeline.cache();
        let gauge = |n: u64| i64::try_from(n).unwrap_or(i64::MAX);
        let metrics = &pipeline.metrics;
        metrics.cache_bytes.with_label_values(&["memory"]).set(gauge(cache.bytes().await));
        metrics.cache_objects.with_label_values(&["memory"]).set(gauge(cache.objects()));
        if let Some(disks) = cache.disks() {
            metrics.cache_bytes.with_label_values(&["disk"]).set(gauge(disks.bytes()));
            metrics.cache_objects.with_label_values(&["disk"]).set(gauge(disks.objects()));
        }
        // Every 5 s; every second while not ready (a routing document just applied).
        if n.is_multiple_of(5) || !readiness.is_ready() {
            let reachable = pipeline.sites().origin_ok().await;
            if !reachable {
                warn!("origin unreachable");
            }
            readiness.set("origin", reachable);
        }
        if let Some(cluster) = &cluster {
            let open: i64 =
                ["tcp", "h3"].iter().map(|p| pipeline.metrics.connections.with_label_values(&[p]).get()).sum();
            let load = open as f64 / max_connections.max(1) as f64;
            cluster.publish_health(readiness.is_ready(), load).await;
            // Counters for the status page (rates are computed by the reader).
            let metrics = &pipeline.metrics;
            let (requests, hits) = metrics.totals();
            let bytes = metrics.response_bytes.get();
            let (origin, shield, peer) = pipeline.tiers().counts();
            let upstream = cdn_cluster::state::Upstreams { origin, shield, peer };
            cluster
                .publish_stats(cdn_cluster::state::Stats { requests, hits, bytes, ms: cdn_cluster::now_ms(), upstream })
                .await;
        }
        n += 1;
    }
    if let Some(cluster) = &cluster {
        cluster.publish_health(false, 1.0).await;
    }
}

/// Installs the certificates the control plane issues (gossip, keys sealed with the
/// cluster secret) as they arrive and when renewed, until `shutdown`.
async fn install_issued(
    certs: Arc<cdn_node::certs::Certs>,
    cluster: Arc<cdn_cluster::Cluster>,
    seal: cdn_cluster::CertSeal,
    shutdown: CancellationToken,
) {
    use rustls_pki_types::pem::PemObject as _;
    let mut installed: std::collections::HashMap<String, i64> = std::collections::HashMap::new();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        for (label, cert) in cluster.certs().await {
            if installed.get(&label).is_some_and(|have| *have >= cert.not_after) {
                continue;
            }
            // Marked as seen either way: a certificate that does not open or load is
            // reported once, not every second.
            installed.insert(label.clone(), cert.not_after);
            let Some(key) = seal.open(&cert.key) else {
                warn!(%label, "an issued certificate's key does not open with this cluster's secret");
                continue;
            };
            let chain: Result<Vec<_>, _> =
                rustls_pki_types::CertificateDer::pem_slice_iter(cert.chain.as_bytes()).collect();
            let key = rustls_pki_types::PrivateKeyDer::from_pem_slice(&key);
            match (chain, key) {
                (Ok(chain), Ok(key)) if !chain.is_empty() => {
                    if let Err(error) = certs.install(&label, chain, key) {
                        warn!(%label, %error, "an issued certificate was not installed");
                    }
                }
                _ => warn!(%label, "an issued certificate does not parse"),
            }
        }
    }
}

/// Binds and serves an edge until `shutdown`; an error when a task failed.
pub async fn run(config: Config, shutdown: CancellationToken, registry: Registry) -> Result<(), Error> {
    Edge::bind(config, &registry).await?.serve(shutdown).await
}
