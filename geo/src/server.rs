//! The geo-DNS's sockets and lifecycle: bind everything first, then serve until
//! shutdown. The DNS server, the admin listener, the GeoIP reloader and the
//! cluster view run under one [`Supervisor`]: one that fails stops the node.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use hickory_server::Server;
use prometheus::Registry;
use tokio::net::{TcpListener, TcpSocket};
use tokio_util::sync::CancellationToken;
use tracing::info;

use cdn_node::{
    admin::{self, Readiness},
    supervise::{Faults, Supervisor},
};

use crate::{
    Error,
    config::Config,
    handler::{Handler, MemberView, Shared},
    metrics::Metrics,
    mmdb::GeoDb,
    udp,
};

/// How long an idle TCP connection may stay open.
const TCP_IDLE: Duration = Duration::from_secs(10);
/// Responses queued per TCP connection.
const TCP_QUEUE: usize = 32;

/// A geo-DNS whose sockets are bound, ready to [`serve`](Self::serve).
pub struct Geo {
    config: Config,
    shared: Arc<Shared>,
    /// The UDP sockets, all on `dns_addr` (`SO_REUSEPORT` when more than one).
    udp: Vec<std::net::UdpSocket>,
    tcp: TcpListener,
    admin: Option<TcpListener>,
    dns_addr: SocketAddr,
    admin_addr: Option<SocketAddr>,
    registry: Registry,
    readiness: Readiness,
    faults: Faults,
    /// The cluster whose view `members` reads (set by [`run`]), supervised with the
    /// other tasks.
    cluster: Option<Arc<cdn_cluster::Cluster>>,
}

impl std::fmt::Debug for Geo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Geo")
            .field("node_id", &self.config.node_id)
            .field("zone", &self.config.zone)
            .field("dns_addr", &self.dns_addr)
            .field("admin_addr", &self.admin_addr)
            .finish_non_exhaustive()
    }
}

fn bind_error(addr: SocketAddr, protocol: &'static str) -> impl FnOnce(std::io::Error) -> Error {
    move |source| Error::Bind { addr, protocol, source }
}

fn bind_tcp(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() { TcpSocket::new_v4()? } else { TcpSocket::new_v6()? };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(1024)
}

/// Binds `count` UDP sockets and TCP on one address; with port 0, on one free port
/// for all.
fn bind_dns(addr: SocketAddr, count: usize) -> Result<(Vec<std::net::UdpSocket>, TcpListener, SocketAddr), Error> {
    let attempts = if addr.port() == 0 { 20 } else { 1 };
    let shared = count > 1;
    let mut last = None;
    for _ in 0..attempts {
        let first = udp::bind(addr, shared).map_err(bind_error(addr, "udp"))?;
        let local = first.local_addr().map_err(bind_error(addr, "udp"))?;
        match bind_tcp(local) {
            Ok(tcp) => {
                let mut sockets = vec![first];
                for _ in 1..count {
                    sockets.push(udp::bind(local, true).map_err(bind_error(local, "udp"))?);
                }
                return Ok((sockets, tcp, local));
            }
            Err(error) => last = Some(error),
        }
    }
    let error = last.unwrap_or_else(|| std::io::Error::other("no attempt made"));
    Err(Error::Bind { addr, protocol: "tcp", source: error })
}

impl Geo {
    /// Validates the config, loads the GeoIP database and binds the DNS (UDP and
    /// TCP) and admin sockets. `members` is the cluster view: a [`MemberSource`]
    /// (read on every query) or a watch channel (read when its version changes).
    ///
    /// [`MemberSource`]: crate::MemberSource
    pub async fn bind(config: Config, registry: &Registry, members: impl Into<MemberView>) -> Result<Self, Error> {
        config.validate()?;
        let geodb = match &config.geoip_db {
            Some(path) => GeoDb::open(path).await.map_err(|source| Error::GeoDb { path: path.clone(), source })?,
            None => GeoDb::none(),
        };
        let metrics = Metrics::register(registry)?;
        let shared = Arc::new(Shared::new(&config, Arc::new(geodb), members, metrics)?);
        let (udp, tcp, dns_addr) = bind_dns(config.listen.dns, udp::socket_count(config.listen.udp_sockets))?;
        let admin = match config.listen.admin {
            Some(addr) => Some(cdn_node::listener::bind(addr).await?),
            None => None,
        };
        let admin_addr = admin.as_ref().and_then(|listener| listener.local_addr().ok());
        Ok(Self {
            config,
            shared,
            udp,
            tcp,
            admin,
            dns_addr,
            admin_addr,
            registry: registry.clone(),
            readiness: Readiness::new(),
            faults: Faults::default(),
            cluster: None,
        })
    }

    /// The DNS address (UDP and TCP).
    pub fn dns_addr(&self) -> SocketAddr {
        self.dns_addr
    }

    /// The admin address, when listening.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin_addr
    }

    /// Test hook: makes a named task (`dns`, `admin`, `geoip-reload`, `cluster`)
    /// panic on demand (with `cdn-node`'s `test-util` feature; otherwise inert).
    #[doc(hidden)]
    pub fn faults(&self) -> Faults {
        self.faults.clone()
    }

    /// Serves DNS (and the admin endpoints) until `shutdown` is cancelled.
    ///
    /// Every task runs under one [`Supervisor`]: when one fails (the DNS server
    /// stops on its own, a task panics), `/readyz` turns 503, the others stop
    /// gracefully, and `serve` returns [`Error::Task`] naming it.
    pub async fn serve(self, shutdown: CancellationToken) -> Result<(), Error> {
        let Self { config, shared, udp, tcp, admin, dns_addr, registry, readiness, faults, cluster, .. } = self;
        let mut tasks = Supervisor::new("geo", shutdown.child_token(), Some(readiness.clone())).with_faults(faults);
        let token = tasks.token();
        if let Some(listener) = admin {
            // Stops after the others: `/readyz` says 503 while DNS drains.
            tasks.spawn_last("admin", admin::serve(listener, registry, readiness, tasks.last_token()));
        }
        if config.geoip_db.is_some() {
            tasks.spawn("geoip-reload", shared.geodb.clone().watch(config.geoip_reload, token.clone()));
        }
        if let Some(cluster) = &cluster {
            tasks.spawn("cluster", cluster.clone().supervise(token.clone()));
            tasks.spawn("acme", follow_challenges(shared.clone(), cluster.clone(), token.clone()));
        }

        // UDP: our own sockets and threads (the fast path); TCP: hickory-server.
        let udp_sockets = udp.len();
        let mut udp = udp::Servers::spawn(udp, &shared).map_err(|source| Error::Bind {
            addr: dns_addr,
            protocol: "udp",
            source,
        })?;
        let mut server = Server::new(Handler(shared));
        server.register_listener(tcp, TCP_IDLE, TCP_QUEUE);
        // The DNS server ending on its own (Ok or not) before shutdown fails the role.
        tasks.spawn("dns", async move {
            // Also when this task is dropped unfinished (a panic).
            let _stop_udp = udp.stop_on_drop();
            let ended = tokio::select! {
                result = server.block_until_done() => Some(result.map_err(|error| std::io::Error::other(error.to_string()))),
                reason = udp.failed() => Some(Err(std::io::Error::other(reason))),
                () = token.cancelled() => None,
            };
            udp.stop().await;
            match ended {
                Some(result) => result,
                None => server.shutdown_gracefully().await.map_err(|error| std::io::Error::other(error.to_string())),
            }
        });
        info!(
            node_id = %config.node_id,
            zone = %config.zone,
            dns = %dns_addr,
            udp_sockets,
            geoip_db = ?config.geoip_db,
            "geo-dns started"
        );
        let result = tasks.run().await;
        info!(node_id = %config.node_id, "geo-dns stopped");
        Ok(result?)
    }
}

/// Joins the cluster (when configured), binds, and serves until `shutdown`; the
/// answers come from the cluster's live view of the edges. An error when a task
/// failed (the cluster leaves the gossip after the DNS listeners stopped).
pub async fn run(config: Config, shutdown: CancellationToken, registry: Registry) -> Result<(), Error> {
    let cluster_shutdown = CancellationToken::new();
    let (members, cluster): (MemberView, _) = match &config.cluster {
        Some(cluster_config) => {
            let node = cdn_cluster::NodeInfo {
                node_id: config.node_id.clone(),
                role: cdn_cluster::Role::Geo,
                region: None,
                location: None,
                public_addr: None,
                admin: config.listen.admin,
            };
            let cluster = cdn_cluster::Cluster::join(cluster_config, node, &registry, cluster_shutdown.clone()).await?;
            cluster.publish_health(true, 0.0).await;
            (MemberView::Watch(cluster.watch()), Some(cluster))
        }
        None => (MemberView::Source(Arc::new(|| Arc::new(Vec::new()))), None),
    };
    let result = match Geo::bind(config, &registry, members).await {
        Ok(mut geo) => {
            geo.cluster.clone_from(&cluster);
            geo.serve(shutdown).await
        }
        Err(error) => Err(error),
    };
    cluster_shutdown.cancel();
    if let Some(cluster) = cluster {
        cluster.stopped().await;
    }
    result
}

/// Keeps the ACME challenges the control plane publishes in `shared` (every
/// 250 ms), until `shutdown`.
async fn follow_challenges(shared: Arc<Shared>, cluster: Arc<cdn_cluster::Cluster>, shutdown: CancellationToken) {
    let mut tick = tokio::time::interval(std::time::Duration::from_millis(250));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        let all: std::collections::HashMap<String, Vec<String>> = cluster.acme_all().await.into_iter().collect();
        if **shared.challenges.load() != all {
            tracing::info!(names = all.len(), "ACME challenges changed");
            shared.challenges.store(Arc::new(all));
        }
    }
}
