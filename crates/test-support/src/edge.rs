//! An edge (`cdn_edge::Edge`) in-process on loopback: plain, with HTTPS and HTTP/3
//! on one port, or joined to a gossip cluster (optionally a lossy one). Its clock
//! is the test's to move ([`TestEdge::clock`]).
//!
//! Moved from tests/edge/harness.rs (which tests/control/main.rs also pulled in with
//! `#[path]`) and tests/control/main.rs (`start_edge`, `start_edge_with_loss`, now
//! [`TestEdge::join`] and [`TestEdge::join_with_loss`]). Its clients are in
//! [`crate::client`].

use std::{net::SocketAddr, sync::Arc, time::Duration};

use cdn_cluster::{Cluster, ClusterConfig, PacketLoss};
use cdn_edge::{Clock, Config, Edge};
use prometheus::Registry;
use tokio_util::sync::CancellationToken;

use crate::net::free_port;

/// A running edge, node id `edge-test-1` unless the config says otherwise.
pub struct TestEdge {
    /// Its node id (`edge-test-1` unless the config said otherwise).
    pub node_id: String,
    pub http: SocketAddr,
    pub https: Option<SocketAddr>,
    pub h3: Option<SocketAddr>,
    pub admin: SocketAddr,
    /// The cache's clock: `clock.advance(..)` ages every stored response.
    pub clock: Clock,
    pub registry: Registry,
    /// Its gossip cluster, when it joined one (the view it serves by).
    pub cluster: Option<Arc<Cluster>>,
    pub shutdown: CancellationToken,
    pub task: tokio::task::JoinHandle<()>,
}

impl TestEdge {
    /// An edge in front of `origin` (a URL), HTTP and admin on 127.0.0.1:0, with the
    /// config changed by `tweak` first; serving once this returns.
    pub async fn start(origin: &str, tweak: impl FnOnce(&mut Config)) -> Self {
        let mut config = Config::new("edge-test-1", origin);
        config.listen.http = Some(SocketAddr::from(([127, 0, 0, 1], 0)));
        config.listen.admin = Some(SocketAddr::from(([127, 0, 0, 1], 0)));
        tweak(&mut config);
        let node_id = config.node_id.clone();
        let registry = Registry::new();
        let clock = Clock::system();
        let edge = Edge::bind_with_clock(config, &registry, clock.clone()).await.expect("edge binds");
        let (http, https, admin) = (
            edge.http_addr().expect("an HTTP listener"),
            edge.https_addr(),
            edge.admin_addr().expect("an admin listener"),
        );
        let h3 = edge.h3_addr();
        let cluster = edge.cluster();
        let shutdown = CancellationToken::new();
        let task = tokio::spawn({
            let shutdown = shutdown.clone();
            async move { edge.serve(shutdown).await.expect("edge serves") }
        });
        Self { node_id, http, https, h3, admin, clock, registry, cluster, shutdown, task }
    }

    /// Edge `edge-<last octet of ip>`, with HTTP, admin and gossip on `ip` (port 0),
    /// joining the cluster through `seed` with `secret`.
    pub async fn join(ip: [u8; 4], origin: &str, seed: SocketAddr, secret: &str) -> Self {
        Self::join_with_loss(ip, origin, seed, secret, PacketLoss::default()).await
    }

    /// [`join`](Self::join), with gossip that drops what `loss` says (a clone the
    /// test keeps and changes).
    pub async fn join_with_loss(ip: [u8; 4], origin: &str, seed: SocketAddr, secret: &str, loss: PacketLoss) -> Self {
        Self::join_with(ip, origin, seed, secret, loss, |_| {}).await
    }

    /// [`join_with_loss`](Self::join_with_loss), with the config changed by `tweak`
    /// last (its region, `[cache]`, the cluster's timings...).
    pub async fn join_with(
        ip: [u8; 4],
        origin: &str,
        seed: SocketAddr,
        secret: &str,
        loss: PacketLoss,
        tweak: impl FnOnce(&mut Config),
    ) -> Self {
        Self::start(origin, |c| {
            c.node_id = format!("edge-{}", ip[3]);
            c.listen.http = Some((ip, 0).into());
            c.listen.admin = Some((ip, 0).into());
            let mut cluster = ClusterConfig::new((ip, 0).into(), secret);
            cluster.seeds = vec![seed.to_string()];
            cluster.loss = loss;
            c.cluster = Some(cluster);
            tweak(c);
        })
        .await
    }

    /// `http://<http listener><path>`.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.http)
    }

    /// The sum of the samples of metric `name` whose labels include all of `labels`.
    pub fn metric(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        crate::metrics::sum_in(&self.registry, name, labels)
    }

    /// Cancels the edge and waits (at most 15 s) for it to finish.
    pub async fn stop(self) {
        self.shutdown.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(15), self.task).await;
    }
}

/// An edge with HTTPS and HTTP/3 on one port (self-signed certificate).
pub async fn start_tls_edge(origin: &str, tweak: impl FnOnce(&mut Config)) -> TestEdge {
    TestEdge::start(origin, |c| {
        let port = free_port();
        c.listen.https = Some(([127, 0, 0, 1], port).into());
        c.listen.h3 = Some(([127, 0, 0, 1], port).into());
        c.tls = Some(cdn_node::tls::TlsConfig { self_signed: true, ..Default::default() });
        tweak(c);
    })
    .await
}
