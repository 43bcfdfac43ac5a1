//! The cluster: gossip membership and per-node state (chitchat), joined by every role.
//!
//! Each node writes only its own keys (`role`, `region`, `lat`, `lon`,
//! `public_addr`, `admin`, `ready`, `load`; control nodes also `purge:<seq>`,
//! `purge_floor` and `drain:<node>`; edges `applied:<control>`), and reads
//! everyone else's after anti-entropy. Liveness comes from chitchat's phi-accrual
//! failure detector; "suspect" is ours: alive, but no heartbeat for a while.
//!
//! Every role links this crate to join the cluster; what the roles tell each other
//! through it has a type here ([`purge::PurgeRecord`], ...), so no role spells gossip
//! keys by hand.
//!
//! # Layout
//! - [`member`]: the view of one node ([`Member`]).
//! - [`purge`]: what a purge matches ([`purge::Target`]) and the record gossip carries.
//! - `transport`: HMAC-authenticated UDP datagrams.
//!
//! The cluster's own tasks (the member view's refresh, the gossip relay) are tracked
//! here, not orphaned: they end with the token given to [`Cluster::join`], and
//! [`Cluster::stopped`] waits for them; a role runs [`Cluster::supervise`] under its
//! supervisor, so a member view that stops refreshing stops the role.
//! - [`error`]: this crate's error type.

#![forbid(unsafe_code)]

pub mod error;
pub mod member;
pub mod purge;
mod transport;

use std::{
    collections::{BTreeMap, HashMap},
    fmt,
    net::{IpAddr, SocketAddr},
    sync::{Arc, Mutex as StdMutex, PoisonError},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use chitchat::{ChitchatConfig, ChitchatHandle, ChitchatId, FailureDetectorConfig, ProtocolVersion};
use prometheus::{IntCounter, IntGaugeVec, Opts, Registry};
use serde::Deserialize;
use tokio::sync::{mpsc, watch};
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tracing::{debug, info};

pub use member::{GeoPoint, Member, MemberState, Role};
#[doc(hidden)]
pub use transport::PacketLoss;

pub use crate::error::Error;

/// The shared secret that authenticates gossip. Never printed.
#[derive(Clone, Deserialize, PartialEq, Eq)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    /// Wraps a secret.
    pub fn new(secret: impl Into<String>) -> Self {
        Self(secret.into())
    }

    fn bytes(&self) -> &[u8] {
        self.0.as_bytes()
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

/// The `[cluster]` section every role shares.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterConfig {
    /// UDP address to gossip on (port 0 picks one).
    pub listen: SocketAddr,
    /// `host:port` of nodes to join through.
    #[serde(default)]
    pub seeds: Vec<String>,
    /// Shared secret (at least 16 bytes); gossip without it is dropped.
    pub secret: Secret,
    /// Address peers reach this node at, if not `listen` (NAT, containers).
    pub advertise: Option<SocketAddr>,
    /// Time between gossip rounds.
    #[serde(default = "default_interval", with = "humantime_serde")]
    pub gossip_interval: Duration,
    /// A node alive but silent this long is reported `suspect` (and left out of DNS).
    #[serde(default = "default_suspect", with = "humantime_serde")]
    pub suspect_after: Duration,
    /// Test hook: gossip datagrams this node drops on purpose (lossy networks,
    /// partitions). Not settable from a config file.
    #[doc(hidden)]
    #[serde(skip)]
    pub loss: PacketLoss,
}

fn default_interval() -> Duration {
    Duration::from_millis(100)
}

fn default_suspect() -> Duration {
    Duration::from_millis(1500)
}

impl ClusterConfig {
    /// A config gossiping on `listen` with `secret`, defaults elsewhere.
    pub fn new(listen: SocketAddr, secret: impl Into<String>) -> Self {
        Self {
            listen,
            seeds: Vec::new(),
            secret: Secret::new(secret),
            advertise: None,
            gossip_interval: default_interval(),
            suspect_after: default_suspect(),
            loss: PacketLoss::default(),
        }
    }

    /// Problems with this section, each naming its key under `prefix`.
    pub fn problems(&self, prefix: &str) -> Vec<String> {
        let mut problems = Vec::new();
        if self.secret.0.len() < 16 {
            problems.push(format!("{prefix}.secret: must be at least 16 bytes"));
        }
        if self.gossip_interval < Duration::from_millis(10) || self.gossip_interval > Duration::from_secs(10) {
            problems.push(format!("{prefix}.gossip_interval: must be within 10ms..10s"));
        }
        if self.suspect_after < self.gossip_interval * 3 {
            problems.push(format!("{prefix}.suspect_after: must be at least 3 gossip intervals"));
        }
        for seed in &self.seeds {
            if seed.rsplit_once(':').is_none_or(|(_, port)| port.parse::<u16>().is_err()) {
                problems.push(format!("{prefix}.seeds: {seed:?} is not host:port"));
            }
        }
        problems
    }
}

/// What a node tells the cluster about itself when it joins.
#[derive(Debug, Clone)]
pub struct NodeInfo {
    /// Stable id (survives restarts).
    pub node_id: String,
    /// Its role.
    pub role: Role,
    /// Region (edges).
    pub region: Option<String>,
    /// Location (edges).
    pub location: Option<GeoPoint>,
    /// Address DNS hands out (edges).
    pub public_addr: Option<IpAddr>,
    /// Admin listener.
    pub admin: Option<SocketAddr>,
}

/// A key change seen in gossip: `(node_id, key, value)`.
#[derive(Debug, Clone)]
pub struct KeyChange {
    /// The node that owns the key.
    pub node_id: String,
    /// The key (with its prefix).
    pub key: String,
    /// The new value.
    pub value: String,
}

/// A joined cluster: this node's handle on gossip.
pub struct Cluster {
    handle: ChitchatHandle,
    node_id: String,
    gossip_addr: SocketAddr,
    suspect_after: Duration,
    heartbeats: StdMutex<HashMap<ChitchatId, (u64, Instant)>>,
    view: watch::Sender<Arc<Vec<Member>>>,
    members_gauge: IntGaugeVec,
    /// The cluster's own tasks (the member view, the gossip relay); see
    /// [`stopped`](Self::stopped).
    tasks: TaskTracker,
    /// The token given to [`join`](Self::join).
    shutdown: CancellationToken,
    /// Cancelled when the member view stops being refreshed, for whatever reason.
    view_stopped: CancellationToken,
}

impl fmt::Debug for Cluster {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Cluster").field("node_id", &self.node_id).field("gossip_addr", &self.gossip_addr).finish()
    }
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

impl Cluster {
    /// Binds the gossip socket, joins through the seeds and starts keeping the
    /// member view current until `shutdown`.
    pub async fn join(
        config: &ClusterConfig,
        node: NodeInfo,
        registry: &Registry,
        shutdown: CancellationToken,
    ) -> Result<Arc<Self>, Error> {
        let socket = tokio::net::UdpSocket::bind(config.listen)
            .await
            .map_err(|source| Error::Bind { addr: config.listen, source })?;
        let bound = socket.local_addr().map_err(|source| Error::Bind { addr: config.listen, source })?;
        let gossip_addr = config.advertise.unwrap_or(if bound.ip().is_unspecified() {
            SocketAddr::new(IpAddr::from([127, 0, 0, 1]), bound.port())
        } else {
            bound
        });
        let rejected = IntCounter::new(
            "cdn_gossip_rejected_total",
            "Gossip datagrams dropped because they failed authentication",
        )?;
        let members_gauge = IntGaugeVec::new(Opts::new("cdn_cluster_members", "Cluster members by state"), &["state"])?;
        registry.register(Box::new(rejected.clone()))?;
        registry.register(Box::new(members_gauge.clone()))?;

        let generation = now_ms();
        let chitchat_id = ChitchatId::new(node.node_id.clone(), generation, gossip_addr);
        let failure_detector_config = FailureDetectorConfig {
            phi_threshold: 8.0,
            initial_interval: config.gossip_interval * 2,
            dead_node_grace_period: Duration::from_secs(3600),
            ..FailureDetectorConfig::default()
        };
        let chitchat_config = ChitchatConfig {
            chitchat_id,
            cluster_id: "cdn".into(),
            gossip_interval: config.gossip_interval,
            listen_addr: bound,
            seed_nodes: config.seeds.clone(),
            failure_detector_config,
            marked_for_deletion_grace_period: Duration::from_secs(3600),
            catchup_callback: None,
            extra_liveness_predicate: None,
            protocol_version: ProtocolVersion::V0,
        };
        let mut initial = vec![("role".to_string(), node.role.as_str().to_string()), ("ready".into(), "0".into())];
        if let Some(region) = &node.region {
            initial.push(("region".into(), region.clone()));
        }
        if let Some(location) = node.location {
            initial.push(("lat".into(), location.lat.to_string()));
            initial.push(("lon".into(), location.lon.to_string()));
        }
        if let Some(addr) = node.public_addr {
            initial.push(("public_addr".into(), addr.to_string()));
        }
        if let Some(admin) = node.admin {
            initial.push(("admin".into(), admin.to_string()));
        }
        let tasks = TaskTracker::new();
        let transport = transport::AuthTransport::new(
            socket,
            config.secret.bytes(),
            rejected,
            config.loss.clone(),
            shutdown.clone(),
            tasks.clone(),
        );
        let handle = chitchat::spawn_chitchat(chitchat_config, initial, &transport)
            .await
            .map_err(|source| Error::Start { source })?;
        info!(node_id = %node.node_id, role = node.role.as_str(), gossip = %gossip_addr, seeds = ?config.seeds, "joined the cluster");
        let cluster = Arc::new(Self {
            handle,
            node_id: node.node_id,
            gossip_addr,
            suspect_after: config.suspect_after,
            heartbeats: StdMutex::default(),
            view: watch::Sender::new(Arc::new(Vec::new())),
            members_gauge,
            tasks: tasks.clone(),
            shutdown: shutdown.clone(),
            view_stopped: CancellationToken::new(),
        });
        tasks.spawn(cluster.clone().refresh_view(config.gossip_interval, shutdown));
        // Tasks spawned later (the relay's pipes) are still tracked; `stopped` can
        // return once they have all ended.
        tasks.close();
        Ok(cluster)
    }

    /// Runs until `until` is cancelled; an error when the cluster's member view
    /// stops being refreshed before that (its task panicked), so that the role's
    /// supervisor stops a node that would otherwise act on a frozen view.
    pub async fn supervise(self: Arc<Self>, until: CancellationToken) -> Result<(), Error> {
        tokio::select! {
            () = until.cancelled() => Ok(()),
            () = self.view_stopped.cancelled() => {
                if self.shutdown.is_cancelled() { Ok(()) } else { Err(Error::ViewStopped) }
            }
        }
    }

    /// Waits for the cluster's own tasks to end, once the token given to
    /// [`join`](Self::join) is cancelled (the node has then left the gossip).
    pub async fn stopped(&self) {
        self.tasks.wait().await;
    }

    /// This node's id.
    pub fn node_id(&self) -> &str {
        &self.node_id
    }

    /// The address peers gossip with this node at.
    pub fn gossip_addr(&self) -> SocketAddr {
        self.gossip_addr
    }

    /// Sets one of this node's keys.
    pub async fn set(&self, key: &str, value: &str) {
        self.handle.with_chitchat(|chitchat| chitchat.self_node_state().set(key, value)).await;
    }

    /// Deletes one of this node's keys (a tombstone other nodes learn about).
    pub async fn delete(&self, key: &str) {
        self.handle.with_chitchat(|chitchat| chitchat.self_node_state().delete(key)).await;
    }

    /// Starts a gossip round with `addr` now, instead of waiting for the next tick
    /// (eager push of fresh state).
    pub fn push_to(&self, addr: SocketAddr) {
        if let Err(error) = self.handle.gossip(addr) {
            debug!(%error, %addr, "eager gossip failed");
        }
    }

    /// Every live node's keys starting with `prefix`, with the newest generation of
    /// each node id: `(node_id, key, value)`.
    pub async fn values(&self, prefix: &str) -> Vec<KeyChange> {
        self.handle
            .with_chitchat(|chitchat| {
                let live: Vec<ChitchatId> = chitchat.live_nodes().cloned().collect();
                let mut out = Vec::new();
                for id in newest_generations(live.iter()) {
                    if let Some(state) = chitchat.node_state(id) {
                        for (key, value) in state.key_values() {
                            if key.starts_with(prefix) {
                                out.push(KeyChange {
                                    node_id: id.node_id.to_string(),
                                    key: key.to_string(),
                                    value: value.to_string(),
                                });
                            }
                        }
                    }
                }
                out
            })
            .await
    }

    /// Changes of keys starting with `prefix` on any node, as they arrive.
    /// (Deletions are not reported; read [`values`](Self::values) for the state.)
    pub async fn subscribe(&self, prefix: &str) -> mpsc::UnboundedReceiver<KeyChange> {
        let (tx, rx) = mpsc::unbounded_channel();
        let handle = self
            .handle
            .with_chitchat(|chitchat| {
                let tx = tx.clone();
                let prefix = prefix.to_string();
                chitchat.subscribe_event(prefix.clone(), move |event| {
                    // Runs under chitchat's lock: only forward. (chitchat strips the
                    // subscription prefix from the key; put it back.)
                    let _ = tx.send(KeyChange {
                        node_id: event.node.node_id.to_string(),
                        key: format!("{prefix}{}", event.key),
                        value: event.value.to_string(),
                    });
                })
            })
            .await;
        // The subscription lives as long as the process.
        std::mem::forget(handle);
        rx
    }

    /// The member view, refreshed every gossip interval.
    pub fn members(&self) -> Arc<Vec<Member>> {
        self.view.borrow().clone()
    }

    /// Waits for the next refresh of the member view.
    pub fn watch(&self) -> watch::Receiver<Arc<Vec<Member>>> {
        self.view.subscribe()
    }

    async fn refresh_view(self: Arc<Self>, interval: Duration, shutdown: CancellationToken) {
        // Dropped when this task ends, also by a panic: `supervise` notices.
        let _stopped = self.view_stopped.clone().drop_guard();
        let mut tick = tokio::time::interval(interval.max(Duration::from_millis(50)));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        loop {
            tokio::select! {
                () = shutdown.cancelled() => break,
                _ = tick.tick() => {}
            }
            let members = self.compute_members().await;
            let mut counts: BTreeMap<&str, i64> =
                [("alive", 0), ("suspect", 0), ("dead", 0), ("drained", 0)].into_iter().collect();
            for member in &members {
                let state = match member.state {
                    MemberState::Alive => "alive",
                    MemberState::Suspect => "suspect",
                    MemberState::Dead => "dead",
                    MemberState::Drained => "drained",
                };
                *counts.entry(state).or_default() += 1;
            }
            for (state, count) in counts {
                self.members_gauge.with_label_values(&[state]).set(count);
            }
            self.view.send_replace(Arc::new(members));
        }
        // Leave quietly: peers will see us dead.
        let _ = self.handle.initiate_shutdown();
    }

    async fn compute_members(&self) -> Vec<Member> {
        let now = Instant::now();
        let (nodes, drains) = self
            .handle
            .with_chitchat(|chitchat| {
                let live: std::collections::HashSet<ChitchatId> = chitchat.live_nodes().cloned().collect();
                let all: Vec<ChitchatId> = chitchat.node_states().keys().cloned().collect();
                let mut nodes = Vec::new();
                let mut drains: HashMap<String, (bool, u64)> = HashMap::new();
                for id in newest_generations(all.iter()) {
                    let Some(state) = chitchat.node_state(id) else { continue };
                    let values: HashMap<String, String> =
                        state.key_values().map(|(k, v)| (k.to_string(), v.to_string())).collect();
                    if values.get("role").map(String::as_str) == Some("control") {
                        for (key, value) in &values {
                            if let Some(target) = key.strip_prefix("drain:") {
                                let (on, at) = parse_drain(value);
                                let entry = drains.entry(target.to_string()).or_insert((on, at));
                                if at > entry.1 {
                                    *entry = (on, at);
                                }
                            }
                        }
                    }
                    nodes.push((id.clone(), live.contains(id), state.heartbeat(), values));
                }
                (nodes, drains)
            })
            .await;
        let mut heartbeats = self.heartbeats.lock().unwrap_or_else(PoisonError::into_inner);
        let mut members = Vec::with_capacity(nodes.len());
        for (id, live, heartbeat, values) in nodes {
            let beat = u64::from(heartbeat);
            let entry = heartbeats.entry(id.clone()).or_insert((beat, now));
            if entry.0 != beat {
                *entry = (beat, now);
            }
            let silent = *id.node_id != *self.node_id && now.duration_since(entry.1) > self.suspect_after;
            let drained = drains.get(&*id.node_id).is_some_and(|(on, _)| *on);
            let state = match (live, silent, drained) {
                (false, _, _) => MemberState::Dead,
                (true, true, _) => MemberState::Suspect,
                (true, false, true) => MemberState::Drained,
                (true, false, false) => MemberState::Alive,
            };
            let Some(role) = values.get("role").and_then(|r| Role::parse(r)) else { continue };
            let location = match (values.get("lat"), values.get("lon")) {
                (Some(lat), Some(lon)) => match (lat.parse(), lon.parse()) {
                    (Ok(lat), Ok(lon)) => Some(GeoPoint { lat, lon }),
                    _ => None,
                },
                _ => None,
            };
            members.push(Member {
                node_id: id.node_id.to_string(),
                role,
                region: values.get("region").cloned().unwrap_or_default(),
                location,
                public_addr: values.get("public_addr").and_then(|v| v.parse().ok()),
                admin_addr: values.get("admin").and_then(|v| v.parse().ok()),
                gossip_addr: id.gossip_advertise_addr,
                state,
                ready: values.get("ready").map(String::as_str) == Some("1"),
                load: values.get("load").and_then(|v| v.parse().ok()).unwrap_or(0.0),
            });
        }
        members.sort_by(|a, b| a.node_id.cmp(&b.node_id));
        members
    }

    /// Publishes readiness and load (call periodically).
    pub async fn publish_health(&self, ready: bool, load: f64) {
        let load = format!("{:.3}", load.clamp(0.0, 1.0));
        self.handle
            .with_chitchat(|chitchat| {
                let state = chitchat.self_node_state();
                state.set("ready", if ready { "1" } else { "0" });
                state.set("load", &load);
            })
            .await;
    }
}

/// `"1:<ms>"` → (drained, when).
fn parse_drain(value: &str) -> (bool, u64) {
    let (on, at) = value.split_once(':').unwrap_or((value, "0"));
    (on == "1", at.parse().unwrap_or(0))
}

/// Of several generations of one node id (restarts), only the newest.
fn newest_generations<'a>(ids: impl Iterator<Item = &'a ChitchatId>) -> Vec<&'a ChitchatId> {
    let mut newest: HashMap<&str, &ChitchatId> = HashMap::new();
    for id in ids {
        let entry = newest.entry(&*id.node_id).or_insert(id);
        if id.generation_id > entry.generation_id {
            *entry = id;
        }
    }
    newest.into_values().collect()
}

impl Drop for Cluster {
    fn drop(&mut self) {
        // Usually already stopped: the member view's task leaves the gossip when the
        // join token is cancelled, and roles wait for it (`stopped`) before dropping.
        if self.handle.initiate_shutdown().is_err() {
            debug!("gossip already stopped");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(id: &str, role: Role) -> NodeInfo {
        NodeInfo { node_id: id.into(), role, region: Some("r".into()), location: None, public_addr: None, admin: None }
    }

    async fn wait_for(cluster: &Cluster, what: impl Fn(&[Member]) -> bool) -> bool {
        for _ in 0..100 {
            if what(&cluster.members()) {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        false
    }

    #[tokio::test]
    async fn nodes_with_the_secret_see_each_other_and_an_outsider_never_joins() {
        let shutdown = CancellationToken::new();
        let secret = "a-shared-secret-of-enough-bytes";
        let first = ClusterConfig::new("127.0.0.1:0".parse().unwrap(), secret);
        let a = Cluster::join(&first, node("a", Role::Control), &Registry::new(), shutdown.clone()).await.unwrap();
        let mut second = ClusterConfig::new("127.0.0.1:0".parse().unwrap(), secret);
        second.seeds = vec![a.gossip_addr().to_string()];
        let b = Cluster::join(&second, node("b", Role::Edge), &Registry::new(), shutdown.clone()).await.unwrap();
        let mut outsider_config = ClusterConfig::new("127.0.0.1:0".parse().unwrap(), "another-secret-entirely-123");
        outsider_config.seeds = vec![a.gossip_addr().to_string()];
        let registry = Registry::new();
        let outsider =
            Cluster::join(&outsider_config, node("x", Role::Edge), &Registry::new(), shutdown.clone()).await.unwrap();
        let _ = registry;
        assert!(wait_for(&a, |m| m.iter().any(|m| m.node_id == "b" && m.state == MemberState::Alive)).await);
        assert!(wait_for(&b, |m| m.iter().any(|m| m.node_id == "a" && m.role == Role::Control)).await);
        b.set("applied:a", "7").await;
        let mut seen = false;
        for _ in 0..100 {
            if a.values("applied:").await.iter().any(|k| k.node_id == "b" && k.value == "7") {
                seen = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(seen, "state travels");
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert!(!a.members().iter().any(|m| m.node_id == "x"), "the outsider never joined");
        assert!(outsider.members().iter().all(|m| m.node_id == "x"), "and learned nothing");
        shutdown.cancel();
        for cluster in [a, b, outsider] {
            tokio::time::timeout(Duration::from_secs(5), cluster.stopped()).await.expect("the cluster's tasks end");
        }
    }

    #[tokio::test]
    async fn supervise_fails_when_the_member_view_stops_before_shutdown() {
        let shutdown = CancellationToken::new();
        let config = ClusterConfig::new("127.0.0.1:0".parse().unwrap(), "a-shared-secret-of-enough-bytes");
        let cluster = Cluster::join(&config, node("a", Role::Edge), &Registry::new(), shutdown.clone()).await.unwrap();
        let until = CancellationToken::new();
        let supervised = tokio::spawn(cluster.clone().supervise(until.clone()));
        until.cancel();
        assert!(supervised.await.unwrap().is_ok(), "ends with the role");
        // As if the refresh task had panicked.
        cluster.view_stopped.cancel();
        let error = cluster.clone().supervise(CancellationToken::new()).await.unwrap_err();
        assert!(matches!(error, Error::ViewStopped), "{error}");
        shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(5), cluster.stopped()).await.expect("the cluster's tasks end");
        cluster.clone().supervise(CancellationToken::new()).await.expect("after shutdown, a stopped view is fine");
    }

    #[test]
    fn secrets_are_never_printed() {
        let config = ClusterConfig::new("127.0.0.1:0".parse().unwrap(), "very-secret-value-123");
        let text = format!("{config:?}");
        assert!(!text.contains("very-secret"), "{text}");
        assert!(text.contains("redacted"));
    }

    #[test]
    fn config_problems_name_keys() {
        let mut config = ClusterConfig::new("127.0.0.1:0".parse().unwrap(), "short");
        config.seeds = vec!["nohost".into()];
        let problems = config.problems("cluster");
        assert!(problems.iter().any(|p| p.starts_with("cluster.secret")));
        assert!(problems.iter().any(|p| p.starts_with("cluster.seeds")));
    }

    #[test]
    fn drain_values() {
        assert_eq!(parse_drain("1:1700"), (true, 1700));
        assert_eq!(parse_drain("0:1800"), (false, 1800));
        assert_eq!(parse_drain("junk"), (false, 0));
    }
}
