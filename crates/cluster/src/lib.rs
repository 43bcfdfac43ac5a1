//! The cluster: gossip membership and per-node state (chitchat), joined by every role.
//!
//! Each node writes only its own keys (who it is, whether it is ready and how loaded;
//! control nodes their purges, floors and drains; edges what they applied), and reads
//! everyone else's after anti-entropy; [`state`] lists every key and is the one place
//! they are spelled. Liveness comes from chitchat's phi-accrual failure detector;
//! "suspect" is ours: alive, but no heartbeat for a while.
//!
//! Every role links this crate to join the cluster; what the roles tell each other
//! through it has a type here and a typed accessor on [`Cluster`]
//! ([`publish_purge`](Cluster::publish_purge), [`purges`](Cluster::purges),
//! [`set_applied`](Cluster::set_applied), [`set_drain`](Cluster::set_drain), ...), so
//! no role spells gossip keys by hand.
//!
//! # Layout
//! - [`member`]: the view of one node ([`Member`]).
//! - [`state`]: the typed gossip state ([`state::Key`], [`state::Entry`]): every key,
//!   its value, their wire encoding.
//! - [`purge`]: what a purge matches ([`purge::Target`]) and the record gossip carries.
//! - [`routing`]: the routing document ([`routing::Routing`]): sites, origin pools,
//!   rules; parsed, validated, and indexed for the edge ([`routing::Router`]). It
//!   travels chunked ([`Cluster::publish_routing`], [`Cluster::routing`]).
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
pub mod peer;
pub mod purge;
pub mod routing;
pub mod state;
mod transport;

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    fmt,
    hash::{Hash as _, Hasher as _},
    net::{IpAddr, SocketAddr},
    sync::{Arc, Mutex as StdMutex, PoisonError},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use chitchat::{ChitchatConfig, ChitchatHandle, ChitchatId, FailureDetectorConfig, ProtocolVersion};
use prometheus::{IntCounter, IntCounterVec, IntGaugeVec, Opts, Registry};
use serde::Deserialize;
use tokio::sync::{mpsc, watch};
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tracing::{debug, info, warn};

pub use member::{GeoPoint, Member, MemberState, Role};
use purge::PurgeRecord;
use routing::Versioned;
use state::{Drain, Entry, Key, NodeView, Purges, RoutingHead, Serve, Stats, Topic};
#[doc(hidden)]
#[cfg(feature = "test-util")]
pub use transport::PacketLoss;

pub use crate::error::Error;
pub use crate::peer::{CertSeal, PeerKey};

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
#[serde(try_from = "RawClusterConfig")]
pub struct ClusterConfig {
    /// UDP address to gossip on (port 0 picks one).
    pub listen: SocketAddr,
    /// `host:port` of nodes to join through.
    pub seeds: Vec<String>,
    /// Shared secret (at least 16 bytes); gossip without it is dropped. In a file,
    /// `secret` is `secret_file`'s content (read when the config is loaded, without a
    /// trailing newline).
    pub secret: Secret,
    /// Address peers reach this node at, if not `listen` (NAT, containers).
    pub advertise: Option<SocketAddr>,
    /// Or: the network (CIDR) whose address of this node peers reach it at, found
    /// when the node joins (the source address of a route into that network), with
    /// the gossip port. For containers whose address is assigned at start (Docker
    /// Swarm overlay networks).
    pub advertise_network: Option<Network>,
    /// Time between gossip rounds.
    pub gossip_interval: Duration,
    /// A node alive but silent this long is reported `suspect` (and left out of DNS).
    pub suspect_after: Duration,
    /// Test hook (feature `test-util`): gossip datagrams this node drops on purpose
    /// (lossy networks, partitions). Not settable from a config file.
    #[doc(hidden)]
    #[cfg(feature = "test-util")]
    pub loss: PacketLoss,
}

/// `[cluster]` as written in a file: `secret` or `secret_file`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawClusterConfig {
    listen: SocketAddr,
    #[serde(default)]
    seeds: Vec<String>,
    secret: Option<Secret>,
    secret_file: Option<std::path::PathBuf>,
    advertise: Option<SocketAddr>,
    advertise_network: Option<Network>,
    #[serde(default = "default_interval", with = "humantime_serde")]
    gossip_interval: Duration,
    #[serde(default = "default_suspect", with = "humantime_serde")]
    suspect_after: Duration,
}

impl TryFrom<RawClusterConfig> for ClusterConfig {
    type Error = String;

    fn try_from(raw: RawClusterConfig) -> Result<Self, String> {
        let secret = match (raw.secret, raw.secret_file) {
            (Some(secret), None) => secret,
            (None, Some(path)) => match std::fs::read_to_string(&path) {
                Ok(text) => Secret::new(text.trim_end_matches(['\r', '\n'])),
                Err(error) => return Err(format!("secret_file: cannot read {}: {error}", path.display())),
            },
            (Some(_), Some(_)) => return Err("secret and secret_file: give one of them".into()),
            (None, None) => return Err("missing field `secret` (or `secret_file`)".into()),
        };
        if raw.advertise.is_some() && raw.advertise_network.is_some() {
            return Err("advertise and advertise_network: give one of them".into());
        }
        Ok(Self {
            listen: raw.listen,
            seeds: raw.seeds,
            secret,
            advertise: raw.advertise,
            advertise_network: raw.advertise_network,
            gossip_interval: raw.gossip_interval,
            suspect_after: raw.suspect_after,
            #[cfg(feature = "test-util")]
            loss: PacketLoss::default(),
        })
    }
}

/// An IP network, `address/prefix` (`10.211.0.0/24`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub struct Network {
    addr: IpAddr,
    prefix: u8,
}

impl TryFrom<String> for Network {
    type Error = String;

    fn try_from(text: String) -> Result<Self, String> {
        let bad = || format!("{text:?} is not a network like \"10.0.0.0/24\"");
        let (addr, prefix) = text.split_once('/').ok_or_else(bad)?;
        let addr: IpAddr = addr.parse().map_err(|_| bad())?;
        let prefix: u8 = prefix.parse().map_err(|_| bad())?;
        let bits = if addr.is_ipv4() { 32 } else { 128 };
        if prefix > bits {
            return Err(bad());
        }
        Ok(Self { addr, prefix })
    }
}

impl fmt::Display for Network {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

impl Network {
    /// Whether `ip` is in this network.
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = u32::MAX.checked_shl(32 - u32::from(self.prefix)).unwrap_or(0);
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = u128::MAX.checked_shl(128 - u32::from(self.prefix)).unwrap_or(0);
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }

    /// This host's address on the network: the source address the kernel picks
    /// for a route into it (a UDP `connect`, which sends nothing).
    pub fn local_address(&self) -> std::io::Result<IpAddr> {
        let unspecified: IpAddr = if self.addr.is_ipv4() { [0, 0, 0, 0].into() } else { [0u16; 8].into() };
        let socket = std::net::UdpSocket::bind(SocketAddr::new(unspecified, 0))?;
        socket.connect(SocketAddr::new(self.addr, 9))?;
        let ip = socket.local_addr()?.ip();
        if self.contains(ip) {
            Ok(ip)
        } else {
            Err(std::io::Error::other(format!("no address on {self} (the route there leaves from {ip})")))
        }
    }
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
            advertise_network: None,
            gossip_interval: default_interval(),
            suspect_after: default_suspect(),
            #[cfg(feature = "test-util")]
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

/// A key of some node changed in gossip (see [`Cluster::subscribe`]); read the
/// state through the typed accessors.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    /// The node that owns the key.
    pub node_id: String,
    /// The key.
    pub key: Key,
}

/// Changes of one [`Topic`], as they arrive.
#[derive(Debug)]
pub struct Changes {
    rx: mpsc::UnboundedReceiver<(String, String)>,
}

impl Changes {
    /// The next change; `None` once the cluster is gone.
    pub async fn recv(&mut self) -> Option<Change> {
        loop {
            let (node_id, key) = self.rx.recv().await?;
            if let Some(change) = Self::decode(node_id, &key) {
                return Some(change);
            }
        }
    }

    /// A change that already arrived, if any.
    pub fn try_recv(&mut self) -> Option<Change> {
        while let Ok((node_id, key)) = self.rx.try_recv() {
            if let Some(change) = Self::decode(node_id, &key) {
                return Some(change);
            }
        }
        None
    }

    fn decode(node_id: String, key: &str) -> Option<Change> {
        match Key::parse(key) {
            Ok(key) => Some(Change { node_id, key }),
            Err(error) => {
                debug!(%error, node = %node_id, "gossip change ignored");
                None
            }
        }
    }
}

/// Peers' keys and values this version cannot read. The member view and the
/// accessors read them again and again; each is logged once.
#[derive(Default)]
struct Unreadable(StdMutex<HashSet<(String, String, u64)>>);

impl Unreadable {
    /// Most remembered at once (then forgotten and logged again).
    const MAX: usize = 1024;

    fn report(&self, node: &str, key: &str, value: &str, error: &Error) {
        if !self.first_time(node, key, value) {
            return;
        }
        match error {
            Error::UnknownKey { .. } => debug!(%error, node, "gossip key ignored (a newer peer?)"),
            _ => warn!(%error, node, "gossip value ignored"),
        }
    }

    /// Whether `node`'s `key` = `value` was not reported yet.
    fn first_time(&self, node: &str, key: &str, value: &str) -> bool {
        let mut hasher = std::hash::DefaultHasher::new();
        value.hash(&mut hasher);
        let mut seen = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        if seen.len() >= Self::MAX {
            seen.clear();
        }
        seen.insert((node.to_string(), key.to_string(), hasher.finish()))
    }
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
    unreadable: Unreadable,
    /// Routing documents [`routing`](Self::routing) could not read or apply, by
    /// control node and checksum: their chunks added up, so the same bytes will not
    /// read better later; not parsed again.
    routing_refused: StdMutex<HashSet<(String, u64)>>,
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
        let gossip_addr = match (config.advertise, config.advertise_network) {
            (Some(addr), _) => addr,
            (None, Some(network)) => {
                let ip = network.local_address().map_err(|source| Error::Advertise { network, source })?;
                SocketAddr::new(ip, bound.port())
            }
            (None, None) if bound.ip().is_unspecified() => SocketAddr::new(IpAddr::from([127, 0, 0, 1]), bound.port()),
            (None, None) => bound,
        };
        let rejected = IntCounter::new(
            "cdn_gossip_rejected_total",
            "Gossip datagrams dropped because they failed authentication",
        )?;
        let members_gauge = IntGaugeVec::new(Opts::new("cdn_cluster_members", "Cluster members by state"), &["state"])?;
        let bytes = IntCounterVec::new(
            Opts::new("cdn_gossip_bytes_total", "Gossip datagram bytes on the wire, by direction"),
            &["direction"],
        )?;
        let traffic = transport::Traffic {
            sent: bytes.with_label_values(&["sent"]),
            received: bytes.with_label_values(&["received"]),
        };
        registry.register(Box::new(rejected.clone()))?;
        registry.register(Box::new(bytes))?;
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
        let initial = Entry::announcement(&node).iter().map(|entry| (entry.key().to_string(), entry.value())).collect();
        let tasks = TaskTracker::new();
        let transport = transport::AuthTransport::new(
            socket,
            config.secret.bytes(),
            rejected,
            traffic,
            #[cfg(feature = "test-util")]
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
            unreadable: Unreadable::default(),
            routing_refused: StdMutex::default(),
            tasks: tasks.clone(),
            shutdown: shutdown.clone(),
            view_stopped: CancellationToken::new(),
        });
        tasks.spawn(cluster.clone().refresh_view(config.gossip_interval, shutdown.clone()));
        let named: Vec<String> = config.seeds.iter().filter(|s| s.parse::<SocketAddr>().is_err()).cloned().collect();
        if !named.is_empty() {
            tasks.spawn(cluster.clone().reach_named_seeds(named, shutdown));
        }
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

    /// Sets some of this node's keys, together.
    async fn set(&self, entries: &[Entry]) {
        let entries: Vec<(String, String)> = entries.iter().map(|e| (e.key().to_string(), e.value())).collect();
        self.handle
            .with_chitchat(|chitchat| {
                let state = chitchat.self_node_state();
                for (key, value) in &entries {
                    state.set(key, value);
                }
            })
            .await;
    }

    /// Deletes one of this node's keys (a tombstone other nodes learn about).
    async fn delete(&self, key: &Key) {
        let key = key.to_string();
        self.handle.with_chitchat(|chitchat| chitchat.self_node_state().delete(&key)).await;
    }

    /// Starts a gossip round with `addr` now, instead of waiting for the next tick
    /// (eager push of fresh state).
    pub fn push_to(&self, addr: SocketAddr) {
        if let Err(error) = self.handle.gossip(addr) {
            debug!(%error, %addr, "eager gossip failed");
        }
    }

    /// Every live node's entries of `topic`, with the newest generation of each
    /// node id: `(node_id, entry)`. What this version cannot read is logged and
    /// left out.
    async fn entries(&self, topic: Topic) -> Vec<(String, Entry)> {
        let prefix = topic.prefix();
        let raw = self
            .handle
            .with_chitchat(|chitchat| {
                let live: Vec<ChitchatId> = chitchat.live_nodes().cloned().collect();
                let mut out = Vec::new();
                for id in newest_generations(live.iter()) {
                    if let Some(state) = chitchat.node_state(id) {
                        for (key, value) in state.key_values() {
                            if key.starts_with(prefix) {
                                out.push((id.node_id.to_string(), key.to_string(), value.to_string()));
                            }
                        }
                    }
                }
                out
            })
            .await;
        raw.into_iter()
            .filter_map(|(node, key, value)| match Entry::parse(&key, &value) {
                Ok(entry) => Some((node, entry)),
                Err(error) => {
                    self.unreadable.report(&node, &key, &value, &error);
                    None
                }
            })
            .collect()
    }

    /// Changes of `topic`'s keys on any node, as they arrive. (Deletions are not
    /// reported; the accessors read the state.)
    pub async fn subscribe(&self, topic: Topic) -> Changes {
        let (tx, rx) = mpsc::unbounded_channel();
        let prefix = topic.prefix();
        let handle = self
            .handle
            .with_chitchat(|chitchat| {
                let tx = tx.clone();
                chitchat.subscribe_event(prefix, move |event| {
                    // Runs under chitchat's lock: only forward. (chitchat strips the
                    // subscription prefix from the key; put it back.)
                    let _ = tx.send((event.node.node_id.to_string(), format!("{prefix}{}", event.key)));
                })
            })
            .await;
        // The subscription lives as long as the process.
        std::mem::forget(handle);
        Changes { rx }
    }

    /// Publishes a purge this (control) node accepted. Eager push is the caller's.
    pub async fn publish_purge(&self, record: &PurgeRecord) {
        self.set(&[Entry::Purge(record.clone())]).await;
    }

    /// Withdraws a purge record from gossip (collected; the floor says so).
    pub async fn withdraw_purge(&self, seq: u64) {
        self.delete(&Key::Purge(seq)).await;
    }

    /// Publishes the oldest sequence number this (control) node still holds.
    pub async fn set_purge_floor(&self, floor: u64) {
        self.set(&[Entry::PurgeFloor(floor)]).await;
    }

    /// Every live control node's purge records and floor, by control node id. A
    /// record that names another control node than the one gossiping it is ignored.
    pub async fn purges(&self) -> BTreeMap<String, Purges> {
        let mut purges: BTreeMap<String, Purges> = BTreeMap::new();
        for (node, entry) in self.entries(Topic::Purges).await {
            match entry {
                Entry::PurgeFloor(floor) => purges.entry(node).or_default().floor = Some(floor),
                Entry::Purge(record) if record.control == node => {
                    purges.entry(node).or_default().records.insert(record.seq, record);
                }
                Entry::Purge(record)
                    if self.unreadable.first_time(&node, &Key::Purge(record.seq).to_string(), &record.control) =>
                {
                    warn!(%node, control = %record.control, seq = record.seq, "purge record names another control node; ignored");
                }
                _ => {}
            }
        }
        purges
    }

    /// Publishes the last purge of `control` this (edge) node applied.
    pub async fn set_applied(&self, control: &str, seq: u64) {
        self.set(&[Entry::Applied { control: control.to_string(), seq }]).await;
    }

    /// Each live node's last applied purge of `control`: node id → seq.
    pub async fn applied(&self, control: &str) -> BTreeMap<String, u64> {
        self.entries(Topic::Applied)
            .await
            .into_iter()
            .filter_map(|(node, entry)| match entry {
                Entry::Applied { control: of, seq } if of == control => Some((node, seq)),
                _ => None,
            })
            .collect()
    }

    /// Each live node's last applied purge of every control node: node id →
    /// control node id → seq.
    pub async fn applied_all(&self) -> BTreeMap<String, BTreeMap<String, u64>> {
        let mut applied: BTreeMap<String, BTreeMap<String, u64>> = BTreeMap::new();
        for (node, entry) in self.entries(Topic::Applied).await {
            if let Entry::Applied { control, seq } = entry {
                applied.entry(node).or_default().insert(control, seq);
            }
        }
        applied
    }

    /// Drains (or undrains) `node`, as of now: this (control) node's word on it.
    pub async fn set_drain(&self, node: &str, drained: bool) {
        self.set(&[Entry::Drain { node: node.to_string(), drain: Drain { drained, at_ms: now_ms() } }]).await;
    }

    /// Publishes where this (edge) node takes requests from other edges.
    pub async fn publish_serve(&self, serve: Serve) {
        self.set(&[Entry::Serve(serve)]).await;
    }

    /// Every live edge's listeners for other edges, by node id.
    pub async fn serve_all(&self) -> BTreeMap<String, Serve> {
        self.entries(Topic::Serve)
            .await
            .into_iter()
            .filter_map(|(node, entry)| match entry {
                Entry::Serve(serve) => Some((node, serve)),
                _ => None,
            })
            .collect()
    }

    /// Publishes (or replaces) the TXT values of an ACME DNS-01 challenge name.
    pub async fn publish_acme(&self, name: &str, values: Vec<String>) {
        self.set(&[Entry::Acme { name: name.to_ascii_lowercase(), values }]).await;
    }

    /// Withdraws an ACME challenge name published by this node.
    pub async fn withdraw_acme(&self, name: &str) {
        let key = Key::Acme(name.to_ascii_lowercase()).to_string();
        self.handle.with_chitchat(|chitchat| chitchat.self_node_state().delete(&key)).await;
    }

    /// Every live node's ACME challenge names and their TXT values (merged).
    pub async fn acme_all(&self) -> BTreeMap<String, Vec<String>> {
        let mut all: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for (_, entry) in self.entries(Topic::Acme).await {
            if let Entry::Acme { name, values } = entry {
                let merged = all.entry(name).or_default();
                for value in values {
                    if !merged.contains(&value) {
                        merged.push(value);
                    }
                }
            }
        }
        all
    }

    /// Publishes a certificate this (control) node holds.
    pub async fn publish_cert(&self, cert: state::SealedCert) {
        self.set(&[Entry::Cert(cert)]).await;
    }

    /// The newest certificate of each label the live nodes publish.
    pub async fn certs(&self) -> BTreeMap<String, state::SealedCert> {
        let mut newest: BTreeMap<String, state::SealedCert> = BTreeMap::new();
        for (_, entry) in self.entries(Topic::Cert).await {
            if let Entry::Cert(cert) = entry {
                match newest.get(&cert.label) {
                    Some(have) if have.not_after >= cert.not_after => {}
                    _ => {
                        newest.insert(cert.label.clone(), cert);
                    }
                }
            }
        }
        newest
    }

    /// Publishes this (edge) node's traffic counters.
    pub async fn publish_stats(&self, stats: Stats) {
        self.set(&[Entry::Stats(stats)]).await;
    }

    /// Every live node's traffic counters, by node id.
    pub async fn stats(&self) -> BTreeMap<String, Stats> {
        self.entries(Topic::Stats)
            .await
            .into_iter()
            .filter_map(|(node, entry)| match entry {
                Entry::Stats(stats) => Some((node, stats)),
                _ => None,
            })
            .collect()
    }

    /// Publishes the routing document this (control) node holds, in place of the one
    /// before: its chunks, then its head, then the old chunks are deleted (see
    /// [`state`]). A document that does not validate, a version 0 or no author is
    /// [`Error::InvalidRouting`] and nothing changes. Eager push is the caller's.
    pub async fn publish_routing(&self, versioned: &Versioned) -> Result<(), Error> {
        let mut problems = Vec::new();
        if versioned.version == 0 {
            problems.push("version: must be at least 1".to_string());
        }
        if versioned.by.is_empty() {
            problems.push("by: names no control node".to_string());
        }
        if let Err(more) = versioned.routing.validate() {
            problems.extend(more);
        }
        if !problems.is_empty() {
            return Err(Error::InvalidRouting { problems });
        }
        self.replace_routing(RoutingHead::split(versioned)?).await;
        Ok(())
    }

    /// Says that this (control) node holds no routing document (yet), so that an
    /// edge can tell "none exists" from "not heard yet"
    /// ([`routing_heads`](Self::routing_heads)).
    pub async fn publish_no_routing(&self) {
        self.replace_routing(vec![Entry::RoutingHead(RoutingHead::none(&self.node_id))]).await;
    }

    /// Writes a routing document's entries (chunks, then the head) and deletes every
    /// other chunk of this node, in one step.
    async fn replace_routing(&self, entries: Vec<Entry>) {
        let keep: HashSet<String> = entries
            .iter()
            .filter(|entry| matches!(entry, Entry::RoutingChunk { .. }))
            .map(|entry| entry.key().to_string())
            .collect();
        let entries: Vec<(String, String)> = entries.iter().map(|e| (e.key().to_string(), e.value())).collect();
        self.handle
            .with_chitchat(|chitchat| {
                let state = chitchat.self_node_state();
                for (key, value) in &entries {
                    state.set(key, value);
                }
                let stale: Vec<String> = state
                    .key_values()
                    .filter(|(key, _)| matches!(Key::parse(key), Ok(Key::RoutingChunk { .. })) && !keep.contains(*key))
                    .map(|(key, _)| key.to_string())
                    .collect();
                for key in stale {
                    state.delete(&key);
                }
            })
            .await;
    }

    /// Each live control node's routing head (what document it holds; version 0:
    /// none), by node id; a control node missing here was not heard from yet. Cheap:
    /// no chunk is read.
    pub async fn routing_heads(&self) -> BTreeMap<String, RoutingHead> {
        self.handle
            .with_chitchat(|chitchat| {
                self.control_heads(chitchat).into_iter().map(|(_, node, head)| (node, head)).collect()
            })
            .await
    }

    /// The newest routing document the live control nodes hold, complete and
    /// valid: the highest version, and of equal versions the one whose author
    /// (`by`) is the greatest node id ([`Versioned::supersedes`]). A control node
    /// whose document is still arriving, or cannot be read or applied here (logged
    /// once, and not read again), is passed over for the next newest. `None`: no
    /// live control node holds one this node has whole (an edge then keeps what it
    /// serves by).
    pub async fn routing(&self) -> Option<Versioned> {
        // Documents passed over in this call.
        let mut skip: HashSet<(String, u64)> = HashSet::new();
        loop {
            let (node, head, chunks) = self
                .handle
                .with_chitchat(|chitchat| {
                    let mut heads = self.control_heads(chitchat);
                    let refused = self.routing_refused.lock().unwrap_or_else(PoisonError::into_inner);
                    heads.retain(|(_, node, head)| {
                        let key = (node.clone(), head.xxh3);
                        !head.is_none() && !refused.contains(&key) && !skip.contains(&key)
                    });
                    drop(refused);
                    heads.sort_by(|(_, a_node, a), (_, b_node, b)| {
                        (b.version, &b.by, b_node).cmp(&(a.version, &a.by, a_node))
                    });
                    heads.into_iter().find_map(|(id, node, head)| {
                        let state = chitchat.node_state(&id)?;
                        let chunks: Option<Vec<String>> =
                            head.chunk_keys().map(|key| state.get(&key.to_string()).map(str::to_string)).collect();
                        // Missing chunks: still arriving; the next newest may be whole.
                        Some((node, head, chunks?))
                    })
                })
                .await?;
            let chunks: Vec<&str> = chunks.iter().map(String::as_str).collect();
            let read = head.assemble(&chunks).and_then(|versioned| match versioned.routing.validate() {
                Ok(()) => Ok(versioned),
                Err(problems) => Err(Error::InvalidRouting { problems }),
            });
            match read {
                Ok(versioned) => return Some(versioned),
                Err(error) => {
                    self.unreadable.report(
                        &node,
                        &Key::RoutingHead.to_string(),
                        &Entry::RoutingHead(head.clone()).value(),
                        &error,
                    );
                    // Chunks that do not add up are looked at again (cheap: a hash);
                    // a document that added up but did not parse or validate is not.
                    let mut refused = self.routing_refused.lock().unwrap_or_else(PoisonError::into_inner);
                    if !matches!(error, Error::BadValue { .. }) {
                        if refused.len() >= Unreadable::MAX {
                            refused.clear();
                        }
                        refused.insert((node.clone(), head.xxh3));
                    }
                    drop(refused);
                    // This one is passed over in the next round.
                    skip.insert((node, head.xxh3));
                }
            }
        }
    }

    /// Every live control node's readable routing head, with the newest generation
    /// of each node id: `(id, node_id, head)`.
    fn control_heads(&self, chitchat: &chitchat::Chitchat) -> Vec<(ChitchatId, String, RoutingHead)> {
        let live: Vec<ChitchatId> = chitchat.live_nodes().cloned().collect();
        let (role_key, head_key) = (Key::Role.to_string(), Key::RoutingHead.to_string());
        let mut heads = Vec::new();
        for id in newest_generations(live.iter()) {
            let Some(state) = chitchat.node_state(id) else { continue };
            if state.get(&role_key) != Some(Role::Control.as_str()) {
                continue;
            }
            let Some(value) = state.get(&head_key) else { continue };
            match Entry::decode(Key::RoutingHead, value) {
                Ok(Entry::RoutingHead(head)) => heads.push((id.clone(), id.node_id.to_string(), head)),
                Ok(_) => {}
                Err(error) => self.unreadable.report(&id.node_id, &head_key, value, &error),
            }
        }
        heads
    }

    /// Publishes the routing version this (edge) node serves by.
    pub async fn set_routing_applied(&self, version: u64) {
        self.set(&[Entry::RoutingApplied(version)]).await;
    }

    /// Each live node's applied routing version: node id → version.
    pub async fn routing_applied_all(&self) -> BTreeMap<String, u64> {
        self.entries(Topic::RoutingApplied)
            .await
            .into_iter()
            .filter_map(|(node, entry)| match entry {
                Entry::RoutingApplied(version) => Some((node, version)),
                _ => None,
            })
            .collect()
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

    /// Seeds given by name (`control-1:7946`) may not resolve yet when this node
    /// starts (in Docker Swarm a service's name resolves once its task runs), and
    /// chitchat looks them up again only every 60 s. So for its first minute, every
    /// second, this looks them up itself and gossips to each address that is not yet
    /// a live member.
    async fn reach_named_seeds(self: Arc<Self>, seeds: Vec<String>, shutdown: CancellationToken) {
        let until = tokio::time::Instant::now() + Duration::from_secs(60);
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        while tokio::time::Instant::now() < until {
            tokio::select! {
                () = shutdown.cancelled() => return,
                _ = tick.tick() => {}
            }
            let members = self.members();
            let mut all_known = true;
            for seed in &seeds {
                let Ok(addrs) = tokio::net::lookup_host(seed.as_str()).await else {
                    all_known = false;
                    continue;
                };
                for addr in addrs {
                    if addr != self.gossip_addr
                        && !members.iter().any(|m| m.gossip_addr == addr && m.state != MemberState::Dead)
                    {
                        all_known = false;
                        debug!(%seed, %addr, "gossiping to a seed found by name");
                        self.push_to(addr);
                    }
                }
            }
            if all_known {
                return;
            }
        }
    }

    async fn compute_members(&self) -> Vec<Member> {
        let now = Instant::now();
        let nodes = self
            .handle
            .with_chitchat(|chitchat| {
                let live: HashSet<ChitchatId> = chitchat.live_nodes().cloned().collect();
                let all: Vec<ChitchatId> = chitchat.node_states().keys().cloned().collect();
                let mut nodes = Vec::new();
                for id in newest_generations(all.iter()) {
                    let Some(state) = chitchat.node_state(id) else { continue };
                    // Only the member view's keys: purge records are many and large.
                    let values: Vec<(Key, String)> = state
                        .key_values()
                        .filter_map(|(key, value)| {
                            Key::parse(key).ok().filter(Key::describes_member).map(|key| (key, value.to_string()))
                        })
                        .collect();
                    nodes.push((id.clone(), live.contains(id), state.heartbeat(), values));
                }
                nodes
            })
            .await;
        let mut views = Vec::with_capacity(nodes.len());
        let mut drains: HashMap<String, Drain> = HashMap::new();
        for (id, live, heartbeat, values) in nodes {
            let mut view = NodeView::default();
            for (key, value) in values {
                match Entry::decode(key.clone(), &value) {
                    Ok(entry) => view.add(entry),
                    Err(error) => self.unreadable.report(&id.node_id, &key.to_string(), &value, &error),
                }
            }
            if view.role == Some(Role::Control) {
                for (node, drain) in &view.drains {
                    let newest = drains.entry(node.clone()).or_insert(*drain);
                    if drain.at_ms > newest.at_ms {
                        *newest = *drain;
                    }
                }
            }
            views.push((id, live, heartbeat, view));
        }
        let mut heartbeats = self.heartbeats.lock().unwrap_or_else(PoisonError::into_inner);
        let mut members = Vec::with_capacity(views.len());
        for (id, live, heartbeat, view) in views {
            let beat = u64::from(heartbeat);
            let entry = heartbeats.entry(id.clone()).or_insert((beat, now));
            if entry.0 != beat {
                *entry = (beat, now);
            }
            let silent = *id.node_id != *self.node_id && now.duration_since(entry.1) > self.suspect_after;
            let drained = drains.get(&*id.node_id).is_some_and(|drain| drain.drained);
            let state = match (live, silent, drained) {
                (false, _, _) => MemberState::Dead,
                (true, true, _) => MemberState::Suspect,
                (true, false, true) => MemberState::Drained,
                (true, false, false) => MemberState::Alive,
            };
            let Some(role) = view.role else { continue };
            members.push(Member {
                node_id: id.node_id.to_string(),
                role,
                region: view.region.clone().unwrap_or_default(),
                location: view.location(),
                public_addr: view.public_addr,
                admin_addr: view.admin,
                gossip_addr: id.gossip_advertise_addr,
                state,
                ready: view.ready,
                load: view.load,
            });
        }
        members.sort_by(|a, b| a.node_id.cmp(&b.node_id));
        members
    }

    /// Publishes readiness and load (call periodically).
    pub async fn publish_health(&self, ready: bool, load: f64) {
        self.set(&[Entry::Ready(ready), Entry::Load(load)]).await;
    }
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
        b.set_applied("a", 7).await;
        let mut seen = false;
        for _ in 0..100 {
            if a.applied("a").await.get("b") == Some(&7) {
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

    /// Polls `what` until it holds (or gives up after 5 s).
    async fn eventually<F: Future<Output = bool>>(what: impl Fn() -> F) -> bool {
        for _ in 0..250 {
            if what().await {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        false
    }

    #[tokio::test]
    async fn typed_state_travels_and_unreadable_values_are_skipped() {
        let shutdown = CancellationToken::new();
        let secret = "a-shared-secret-of-enough-bytes";
        let first = ClusterConfig::new("127.0.0.1:0".parse().unwrap(), secret);
        let control =
            Cluster::join(&first, node("c", Role::Control), &Registry::new(), shutdown.clone()).await.unwrap();
        let mut second = ClusterConfig::new("127.0.0.1:0".parse().unwrap(), secret);
        second.seeds = vec![control.gossip_addr().to_string()];
        let edge = Cluster::join(&second, node("e", Role::Edge), &Registry::new(), shutdown.clone()).await.unwrap();
        let mut changes = edge.subscribe(Topic::Purges).await;

        let record = |seq| PurgeRecord {
            id: format!("c-{seq}"),
            seq,
            control: "c".into(),
            created_ms: 1_700_000_000_000,
            soft: false,
            target: purge::Target::everything(),
        };
        control.publish_purge(&record(2)).await;
        control.publish_purge(&record(3)).await;
        control.set_purge_floor(2).await;
        control.set_drain("e", true).await;
        // What a newer (or broken) peer might write: skipped, nothing else lost.
        control
            .handle
            .with_chitchat(|chitchat| {
                let state = chitchat.self_node_state();
                state.set("purge:4", "{not a record");
                state.set("purge:5", serde_json::to_string(&PurgeRecord { control: "x".into(), ..record(5) }).unwrap());
                state.set("purge_v2:1", "anything");
                state.set("load", "busy");
            })
            .await;

        let expected = Purges { floor: Some(2), records: [(2, record(2)), (3, record(3))].into() };
        assert!(eventually(|| async { edge.purges().await.get("c") == Some(&expected) }).await);
        assert_eq!(edge.purges().await.len(), 1, "only control nodes publish purges");
        let change = tokio::time::timeout(Duration::from_secs(5), changes.recv()).await.unwrap().unwrap();
        assert_eq!(change.node_id, "c");
        assert!(matches!(change.key, Key::Purge(_) | Key::PurgeFloor), "{change:?}");

        assert!(
            eventually(|| async { edge.members().iter().any(|m| m.node_id == "e" && m.state == MemberState::Drained) })
                .await
        );
        assert!(eventually(|| async { edge.members().iter().any(|m| m.node_id == "c" && m.load == 0.0) }).await);

        edge.set_applied("c", 3).await;
        edge.publish_stats(Stats { requests: 5, hits: 4, bytes: 3, ms: 2, ..Stats::default() }).await;
        assert!(eventually(|| async { control.applied("c").await.get("e") == Some(&3) }).await);
        assert_eq!(control.applied_all().await.get("e"), Some(&[("c".to_string(), 3)].into()));
        assert!(control.applied("other").await.is_empty());
        assert!(eventually(|| async { control.stats().await.get("e").is_some_and(|s| s.requests == 5) }).await);

        control.set_drain("e", false).await;
        control.set_purge_floor(3).await;
        control.withdraw_purge(2).await;
        assert!(
            eventually(|| async { edge.members().iter().any(|m| m.node_id == "e" && m.state == MemberState::Alive) })
                .await
        );
        assert!(
            eventually(|| async {
                edge.purges().await.get("c").is_some_and(|p| !p.records.contains_key(&2) && p.knows(2))
            })
            .await
        );
        shutdown.cancel();
    }

    /// The keys of a node's own routing chunks.
    async fn own_chunk_keys(cluster: &Cluster) -> Vec<Key> {
        cluster
            .handle
            .with_chitchat(|chitchat| {
                let state = chitchat.self_node_state();
                state
                    .key_values()
                    .filter_map(|(key, _)| Key::parse(key).ok().filter(|k| matches!(k, Key::RoutingChunk { .. })))
                    .collect()
            })
            .await
    }

    #[tokio::test]
    async fn routing_travels_chunked_and_the_newest_complete_document_wins() {
        use routing::tests::sample;
        let shutdown = CancellationToken::new();
        let secret = "a-shared-secret-of-enough-bytes";
        let first = ClusterConfig::new("127.0.0.1:0".parse().unwrap(), secret);
        let c1 = Cluster::join(&first, node("c1", Role::Control), &Registry::new(), shutdown.clone()).await.unwrap();
        let mut config = ClusterConfig::new("127.0.0.1:0".parse().unwrap(), secret);
        config.seeds = vec![c1.gossip_addr().to_string()];
        let c2 = Cluster::join(&config, node("c2", Role::Control), &Registry::new(), shutdown.clone()).await.unwrap();
        let edge = Cluster::join(&config, node("e", Role::Edge), &Registry::new(), shutdown.clone()).await.unwrap();
        let mut changes = edge.subscribe(Topic::Routing).await;
        let versioned = |version, by: &str, routing| Versioned { version, by: by.into(), accepted_ms: 0, routing };

        // Not heard from, then "none yet": an edge can tell the two apart.
        assert!(eventually(|| async { edge.members().iter().any(|m| m.node_id == "c1") }).await);
        assert!(edge.routing_heads().await.is_empty());
        c1.publish_no_routing().await;
        c2.publish_no_routing().await;
        assert!(
            eventually(|| async { edge.routing_heads().await.values().filter(|h| h.is_none()).count() == 2 }).await
        );
        assert_eq!(edge.routing().await, None);
        while changes.try_recv().is_some() {}

        // A small document, then a large one (chunked), replace each other whole.
        let v1 = versioned(1, "c1", sample(2));
        c1.publish_routing(&v1).await.unwrap();
        assert!(eventually(|| async { edge.routing().await.as_ref() == Some(&v1) }).await);
        let change = tokio::time::timeout(Duration::from_secs(5), changes.recv()).await.unwrap().unwrap();
        assert_eq!(change.node_id, "c1");
        assert!(matches!(change.key, Key::RoutingHead | Key::RoutingChunk { .. }), "{change:?}");
        let v2 = versioned(2, "c1", sample(600));
        c1.publish_routing(&v2).await.unwrap();
        assert!(eventually(|| async { edge.routing().await.as_ref() == Some(&v2) }).await);
        let head = &edge.routing_heads().await["c1"];
        assert!(head.chunks > 10, "{head:?}");
        let mut own = own_chunk_keys(&c1).await;
        own.sort();
        assert_eq!(own, head.chunk_keys().collect::<Vec<_>>(), "the old chunks are deleted");

        // Another control node's newer version wins; on equal versions the greater author.
        let v3 = versioned(3, "c2", sample(3));
        c2.publish_routing(&v3).await.unwrap();
        assert!(eventually(|| async { edge.routing().await.as_ref() == Some(&v3) }).await);
        c1.publish_routing(&versioned(3, "c1", sample(4))).await.unwrap();
        assert!(eventually(|| async { edge.routing_heads().await["c1"].version == 3 }).await);
        assert_eq!(edge.routing().await.as_ref(), Some(&v3), "(3, c2) beats (3, c1)");
        let v3_adopted = versioned(3, "c3", sample(5));
        c1.publish_routing(&v3_adopted).await.unwrap();
        assert!(eventually(|| async { edge.routing().await.as_ref() == Some(&v3_adopted) }).await);

        // What cannot be assembled is never returned: the next newest is.
        let (chunk, mut head) = match RoutingHead::split(&versioned(4, "c2", sample(6))).unwrap().as_slice() {
            [Entry::RoutingChunk { index: 0, text, .. }, Entry::RoutingHead(head)] => (text.clone(), head.clone()),
            other => panic!("one chunk and a head: {other:?}"),
        };
        let set_raw = |cluster: Arc<Cluster>, entries: Vec<(String, String)>| async move {
            cluster
                .handle
                .with_chitchat(|chitchat| {
                    for (key, value) in &entries {
                        chitchat.self_node_state().set(key, value);
                    }
                })
                .await;
        };
        // A head whose chunk is missing.
        let missing = Entry::RoutingHead(head.clone());
        set_raw(c2.clone(), vec![(missing.key().to_string(), missing.value())]).await;
        assert!(eventually(|| async { edge.routing_heads().await["c2"].version == 4 }).await);
        assert_eq!(edge.routing().await.as_ref(), Some(&v3_adopted));
        // A chunk that does not add up to its checksum.
        head.version = 5;
        let corrupt = Entry::RoutingChunk { xxh3: head.xxh3, index: 0, text: chunk.replace("site-", "site_") };
        let corrupt_head = Entry::RoutingHead(head.clone());
        set_raw(
            c2.clone(),
            vec![(corrupt.key().to_string(), corrupt.value()), (corrupt_head.key().to_string(), corrupt_head.value())],
        )
        .await;
        assert!(eventually(|| async { edge.routing_heads().await["c2"].version == 5 }).await);
        assert_eq!(edge.routing().await.as_ref(), Some(&v3_adopted));
        assert!(edge.routing_refused.lock().unwrap().is_empty(), "looked at again");
        // Whole again: taken.
        let fixed = Entry::RoutingChunk { xxh3: head.xxh3, index: 0, text: chunk };
        set_raw(c2.clone(), vec![(fixed.key().to_string(), fixed.value())]).await;
        assert!(eventually(|| async { edge.routing().await.is_some_and(|v| v.version == 5 && v.by == "c2") }).await);
        // Whole but not valid here (what `publish_routing` refuses to write): passed
        // over, and not parsed again.
        let mut invalid = sample(7);
        invalid.default_site = Some("nowhere".into());
        let raw: Vec<(String, String)> = RoutingHead::split(&versioned(6, "c2", invalid))
            .unwrap()
            .iter()
            .map(|entry| (entry.key().to_string(), entry.value()))
            .collect();
        set_raw(c2.clone(), raw).await;
        assert!(eventually(|| async { edge.routing_heads().await["c2"].version == 6 }).await);
        assert_eq!(edge.routing().await.as_ref(), Some(&v3_adopted));
        assert_eq!(edge.routing_refused.lock().unwrap().len(), 1, "not parsed again");
        // A proper publication: taken.
        let v7 = versioned(7, "c2", sample(8));
        c2.publish_routing(&v7).await.unwrap();
        assert!(eventually(|| async { edge.routing().await.as_ref() == Some(&v7) }).await);
        assert_eq!(own_chunk_keys(&c2).await.len(), 1, "the others deleted");

        // A control node refuses to publish what an edge could not apply.
        let mut invalid = sample(1);
        invalid.default_site = Some("nowhere".into());
        let error = c1.publish_routing(&versioned(9, "c1", invalid)).await.unwrap_err();
        assert!(
            matches!(&error, Error::InvalidRouting { problems } if problems[0].starts_with("default_site")),
            "{error}"
        );
        assert!(c1.publish_routing(&versioned(0, "c1", sample(1))).await.is_err());
        assert_eq!(c1.routing_heads().await["c1"].version, 3, "nothing changed");

        // Edges say which version they serve by.
        edge.set_routing_applied(5).await;
        assert!(eventually(|| async { c1.routing_applied_all().await.get("e") == Some(&5) }).await);
        assert_eq!(c1.routing_applied_all().await.len(), 1);
        shutdown.cancel();
    }

    #[test]
    fn each_unreadable_value_is_reported_once() {
        let unreadable = Unreadable::default();
        assert!(unreadable.first_time("a", "load", "busy"));
        assert!(!unreadable.first_time("a", "load", "busy"), "read again every gossip interval: not logged again");
        assert!(unreadable.first_time("a", "load", "idle"), "a new value is");
        assert!(unreadable.first_time("b", "load", "busy"), "and so is another node's");
        for n in 0..Unreadable::MAX {
            unreadable.first_time("c", &n.to_string(), "");
        }
        assert!(unreadable.0.lock().unwrap().len() <= Unreadable::MAX, "bounded");
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
    fn secret_from_a_file() {
        let path = std::env::temp_dir().join(format!("cdn-cluster-secret-{}", std::process::id()));
        std::fs::write(&path, "a-secret-from-a-file-123\n").unwrap();
        let file = path.display().to_string();
        let parse = |text: &str| toml::from_str::<ClusterConfig>(text).map_err(|e| e.to_string());
        let config = parse(&format!("listen = \"0.0.0.0:7946\"\nsecret_file = {file:?}")).unwrap();
        assert!(config.secret == Secret::new("a-secret-from-a-file-123"), "read, newline dropped");
        assert!(config.problems("cluster").is_empty());
        let inline = parse("listen = \"0.0.0.0:7946\"\nsecret = \"an-inline-secret-1234\"").unwrap();
        assert!(inline.secret == Secret::new("an-inline-secret-1234"));
        let both = parse(&format!("listen = \"0.0.0.0:7946\"\nsecret = \"x\"\nsecret_file = {file:?}")).unwrap_err();
        assert!(both.contains("secret_file"), "{both}");
        std::fs::remove_file(&path).unwrap();
        let missing = parse(&format!("listen = \"0.0.0.0:7946\"\nsecret_file = {file:?}")).unwrap_err();
        assert!(missing.contains("cannot read") && !missing.contains("a-secret"), "{missing}");
        let neither = parse("listen = \"0.0.0.0:7946\"").unwrap_err();
        assert!(neither.contains("secret"), "{neither}");
        let unknown = parse("listen = \"0.0.0.0:7946\"\nsecret = \"an-inline-secret-1234\"\nbogus = 1").unwrap_err();
        assert!(unknown.contains("bogus"), "{unknown}");
    }

    #[test]
    fn advertise_network() {
        let net = |text: &str| Network::try_from(text.to_string());
        let core = net("10.211.0.0/24").unwrap();
        assert!(core.contains("10.211.0.7".parse().unwrap()));
        assert!(!core.contains("10.211.1.7".parse().unwrap()));
        assert!(net("0.0.0.0/0").unwrap().contains("192.0.2.1".parse().unwrap()));
        assert!(net("fd00::/8").unwrap().contains("fd12::1".parse().unwrap()));
        for bad in ["10.211.0.0", "10.211.0.0/33", "nonsense/8", "::/129"] {
            assert!(net(bad).is_err(), "{bad}");
        }
        // Loopback: the route into 127.0.0.0/8 leaves from 127.0.0.1.
        let lo = net("127.0.0.0/8").unwrap();
        assert!(lo.local_address().unwrap().is_loopback());
        // A network this host has no address on is an error, not a wrong address.
        // The route into 127.0.0.128/25 leaves from 127.0.0.1 too, which is not in it.
        assert!(net("127.0.0.128/25").unwrap().local_address().is_err());
        let text = "listen = \"0.0.0.0:0\"\nsecret = \"an-inline-secret-1234\"\nadvertise_network = \"127.0.0.0/8\"";
        let config: ClusterConfig = toml::from_str(text).unwrap();
        assert_eq!(config.advertise_network, Some(lo));
        let both = format!("{text}\nadvertise = \"127.0.0.1:1\"");
        assert!(toml::from_str::<ClusterConfig>(&both).unwrap_err().to_string().contains("advertise"));
    }
}
